#!/usr/bin/env bash
# Install Debian's SLURM (22.05) + munge + slurmdbd + mariadb, the packages
# tests/slurm/start_local_slurm.sh runs its 2-node test cluster with. Idempotent: a no-op (well under
# a second) when every package is installed. Needs root (CI runs as root); as another user it says
# what to run and exits 0, and the SLURM tests then skip with that reason.
set -euo pipefail

PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} = 0 ]; then
    echo "slurm packages present: ${PKGS[*]}"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "skipping the SLURM install (not root): missing ${missing[*]}; run" \
        "'sudo apt-get install -y --no-install-recommends ${PKGS[*]}' for the SLURM tests"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# A fresh machine (or an image built with `rm -rf /var/lib/apt/lists/*`) has no package lists yet.
if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" </dev/null >"$log" 2>&1; then
    apt-get update -q </dev/null >>"$log" 2>&1 || true
    if ! apt-get install -y -q --no-install-recommends "${PKGS[@]}" </dev/null >>"$log" 2>&1; then
        tail -20 "$log" >&2
        echo "apt-get could not install ${PKGS[*]} (log above)" >&2
        exit 1
    fi
fi
rm -f "$log"
echo "slurm packages installed: ${missing[*]}"
