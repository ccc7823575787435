#!/usr/bin/env bash
# Install Debian's chromium for the browser tests (Playwright drives it via executable_path;
# `playwright install` downloads its own build and cannot work offline). Idempotent: does
# nothing when chromium is already there. Needs root (CI runs as root).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium present: $(command -v chromium)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is missing and this is not root: run 'sudo apt-get install -y --no-install-recommends chromium'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Update the package lists only when a first install attempt cannot find the package.
if ! apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends chromium >/dev/null
fi
echo "chromium installed: $(command -v chromium)"
