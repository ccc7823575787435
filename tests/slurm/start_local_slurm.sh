#!/usr/bin/env bash
# Start a 2-node SLURM cluster on 127.0.0.1 for the launcher's tests (Debian 12, as root).
#
#   tests/slurm/start_local_slurm.sh          # install what is missing, start, wait until idle
#   export SLURM_CONF=/tmp/pipeline-slurm/etc/slurm.conf   # printed at the end
#   tests/slurm/stop_local_slurm.sh           # stop every daemon this script started, by PID
#
# Installs Debian's slurm (22.05) + munge + slurmdbd + mariadb when missing (tests/system/install_slurm.sh), writes slurm.conf and
# slurmdbd.conf under the state dir ($PIPELINE_SLURM_DIR, default /tmp/pipeline-slurm), and starts
# munged, a private mariadbd, slurmdbd, slurmctld and one slurmd per node (Debian's build has
# MULTIPLE_SLURMD, so node1 and node2 share this host). Accounting is on because submitit reads job
# states from sacct. Idempotent: a daemon that is already running is left alone. Nothing is written
# under /etc except the `node1 node2` line in /etc/hosts and, if missing, munge's key.
set -euo pipefail

# The daemons outlive this script and inherit its open files: a caller's lock file, or a test runner's
# pipes, would be held until the cluster stops (a `flock LOCK make test` would lock out the next one).
# Close every descriptor above stderr except bash's own handle on this script (255).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-"; fi
done

STATE=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
NODES=(node1 node2)
CPUS_PER_NODE=${PIPELINE_SLURM_CPUS:-2}
CLUSTER=pipeline
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16306
DB_PASS=slurm-test-only  # a throwaway database on 127.0.0.1, private to this state dir
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the daemons run as SlurmUser=root)"

install_packages() {
    # `make system-deps` installs them before the suite; this covers running the script on its own.
    bash "$(dirname "${BASH_SOURCE[0]}")/../system/install_slurm.sh" >"$STATE/apt.log" 2>&1 \
        || die "apt-get could not install Debian's slurm packages (see $STATE/apt.log)"
}

# alive NAME: the daemon whose PID this script recorded is still running
alive() { [ -s "$STATE/pids/$1.pid" ] && kill -0 "$(cat "$STATE/pids/$1.pid")" 2>/dev/null; }

# wait_for SECONDS WHAT CMD...: poll CMD every 0.5 s
wait_for() {
    local limit=$1 what=$2; shift 2
    for _ in $(seq $((limit * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "$what did not come up within ${limit}s (logs: $STATE/log)"
}

write_configs() {
    mkdir -p "$STATE"/{etc,log,pids,state,run}
    for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
    local node_lines="" n port=17001
    for n in "${NODES[@]}"; do
        node_lines+="NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS_PER_NODE RealMemory=4000 State=UNKNOWN"$'\n'
        port=$((port + 1))
    done
    cat >"$SLURM_CONF" <<EOF
# Written by tests/slurm/start_local_slurm.sh: a test cluster on 127.0.0.1.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire + 1 s before they may start again (default 120 s).
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=2,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Jobs must name a known account (or none): a wrong --account is refused by sbatch, as on real clusters.
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/none
${node_lines}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$STATE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$STATE/etc/slurmdbd.conf"
}

add_hosts() {
    grep -qE '^127\.0\.0\.1([[:space:]].*)?[[:space:]]node1([[:space:]]|$)' /etc/hosts \
        || echo "127.0.0.1 ${NODES[*]}" >>/etc/hosts
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --force </dev/null >/dev/null 2>&1
    wait_for 10 munged sh -c 'munge -n </dev/null | unmunge'
    cp /run/munge/munged.pid "$STATE/pids/munged.pid"
}

db_sql() { mariadb --no-defaults --socket="$STATE/mysql.sock" -u root -e "$1"; }

start_mariadb() {
    alive mariadbd && return 0
    if [ ! -d "$STATE/mysql/mysql" ]; then
        mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fi
    setsid /usr/sbin/mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
        --socket="$STATE/mysql.sock" --port=$DB_PORT --bind-address=127.0.0.1 \
        --pid-file="$STATE/run/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" </dev/null >/dev/null 2>&1 &
    echo $! >"$STATE/pids/mariadbd.pid"
    wait_for 30 mariadbd db_sql "SELECT 1"
    db_sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
}

# start_daemon NAME CMD...: start CMD detached (it forks into the background itself) and record its PID
start_daemon() {
    local name=$1 pidfile=$2; shift 2
    alive "$name" && return 0
    rm -f "$pidfile"
    "$@" </dev/null >/dev/null 2>&1 || die "$name failed to start (see $STATE/log)"
    wait_for 20 "$name" test -s "$pidfile"
    cp "$pidfile" "$STATE/pids/$name.pid"
}

register_accounting() {
    sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" \
        || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    sacctmgr -n -P list account format=account 2>/dev/null | grep -qx pipeline \
        || sacctmgr -i add account pipeline cluster="$CLUSTER" description=tests organization=tests >/dev/null
    sacctmgr -n -P list assoc user=root account=pipeline format=account 2>/dev/null | grep -qx pipeline \
        || sacctmgr -i add user root account=pipeline cluster="$CLUSTER" >/dev/null
}

nodes_idle() {
    local idle
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "${#NODES[@]}" ]
}

main() {
    mkdir -p "$STATE"
    install_packages
    write_configs
    add_hosts
    start_munge
    start_mariadb
    start_daemon slurmdbd "$STATE/run/slurmdbd.pid" slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    register_accounting
    start_daemon slurmctld "$STATE/run/slurmctld.pid" slurmctld -i -f "$SLURM_CONF"
    for n in "${NODES[@]}"; do
        start_daemon "slurmd-$n" "$STATE/run/slurmd-$n.pid" slurmd -f "$SLURM_CONF" -N "$n"
    done
    # A node that was down when slurmctld last saw it comes back on its own (ReturnToService=2).
    wait_for 60 "idle nodes (${NODES[*]})" nodes_idle
    log "cluster '$CLUSTER' up: ${NODES[*]} idle; state in $STATE"
    echo "export SLURM_CONF=$SLURM_CONF"
}

main "$@"
