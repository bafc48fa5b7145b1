#!/bin/sh
# Installs the NBD client tools the quick start tells you to use (nbdinfo,
# nbdcopy and nbdfuse from libnbd-bin; fusermount3 from fuse3; nbd-client;
# qemu-img from qemu-utils) when they are missing. Needs root or sudo on a
# Debian/Ubuntu system; elsewhere it prints what to install and exits 1.
set -eu
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
missing=""
for cmd in nbdinfo nbdfuse fusermount3 nbd-client qemu-img; do
    have "$cmd" || missing="$missing $cmd"
done
[ -z "$missing" ] && exit 0
PACKAGES="libnbd-bin fuse3 nbd-client qemu-utils"
echo "install-clients: missing:$missing"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-clients: install libnbd (nbdinfo, nbdfuse), fuse3, nbd-client and qemu-img with your package manager" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-clients: run as root: apt-get install -y $PACKAGES" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "install-clients: installing $PACKAGES"
$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES
