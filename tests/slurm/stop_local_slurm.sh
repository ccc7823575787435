#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_local_slurm.sh: cancel its jobs, then stop
# each daemon by the PID that script recorded (nothing is killed by name). The state dir stays, so
# a later start keeps the accounting database; remove it by hand for a clean slate.
set -uo pipefail

STATE=${PIPELINE_SLURM_DIR:-/tmp/pipeline-slurm}
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$PATH:/usr/sbin:/sbin

[ -d "$STATE/pids" ] || { echo "[local-slurm] nothing to stop (no $STATE/pids)"; exit 0; }

# Running jobs would leave slurmstepd processes behind once slurmd is gone.
if [ -s "$STATE/pids/slurmctld.pid" ] && kill -0 "$(cat "$STATE/pids/slurmctld.pid")" 2>/dev/null; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 20); do [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
fi

stop_pid() {
    local name=$1 file=$STATE/pids/$1.pid pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "[local-slurm] stopped $name (pid $pid)"
    fi
    rm -f "$file"
}

for f in "$STATE"/pids/slurmd-*.pid; do
    [ -e "$f" ] && stop_pid "$(basename "$f" .pid)"
done
for name in slurmctld slurmdbd mariadbd munged; do stop_pid "$name"; done
