#!/usr/bin/env bash
# Install the Debian packages spool_ext needs to build, test and demo, if missing.
# Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

packages=(
	build-essential
	postgresql-15
	postgresql-server-dev-15
	libipc-run-perl
	librdkafka-dev
	libjansson-dev
	kcat
	rsync
	bc
)

missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "spool_ext: installing Debian packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# The postgresql-15 package would start a system cluster; we only need its binaries.
$SUDO mkdir -p /usr/sbin
if [ ! -e /usr/sbin/policy-rc.d ]; then
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
	$SUDO chmod +x /usr/sbin/policy-rc.d
	trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
