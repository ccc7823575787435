#!/usr/bin/env bash
# Install Debian's chromium for the browser tests (Playwright drives it via executable_path;
# `playwright install` downloads its own build and cannot work offline). Idempotent: does
# nothing when chromium is already there. Needs root (CI runs as root); as another user it says
# what to run and exits 0, and the browser test then skips with that reason.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "skipping the chromium install (not root): run 'sudo apt-get install -y --no-install-recommends chromium'" \
        "for the browser test"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when a first install attempt cannot find the package.
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
echo "chromium installed: $(command -v chromium)"
