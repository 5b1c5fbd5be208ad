#!/usr/bin/env bash
# Debian's chromium and chromium-driver for the SaaS gate's browser test (Playwright drives
# /usr/bin/chromium; nothing is downloaded at test time). Installs only what is missing.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install_chromium: not root: install the Debian packages chromium and chromium-driver" \
        "to run the browser test (it is skipped without them)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
# Other jobs on the machine may hold the dpkg lock for a while: wait for it, don't fail.
if ! { apt-get -o DPkg::Lock::Timeout=600 update -qq \
        && apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
            chromium chromium-driver; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium: apt-get could not install chromium and chromium-driver (log above)" >&2
    exit 1
fi
rm -f "$log"
