#!/usr/bin/env bash
# Debian tools the ops tests run: systemd-analyze (unit verification) and promtool (alert rules).
# Installs whatever is missing; a machine that has them all is left untouched.
set -euo pipefail
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "system_packages: missing ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "system_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Another apt-get (an unattended upgrade, a second install) holds the dpkg lock: wait for it.
apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
# Debian's prometheus package ships promtool (its server is not started without systemd).
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}" >/dev/null
