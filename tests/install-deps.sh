#!/bin/sh
# Install the external tools the end-to-end tests (crate nbdraid-tests) drive.
# Idempotent: does nothing when every command is present; otherwise runs `apt-get update`
# once and installs exactly the packages below. Needs root (or sudo) on Debian/Ubuntu.
#
#   tests/install-deps.sh && NBDRAID_TEST_REQUIRE_TOOLS=1 cargo test -p nbdraid-tests
set -eu

PACKAGES="fio libnbd-bin python3-libnbd nbdkit nbd-server nbd-client qemu-utils fuse3 e2fsprogs"

missing=""
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
for cmd in fio nbdinfo nbdcopy nbdfuse nbdkit nbd-server nbd-client qemu-img qemu-io \
           fusermount3 mkfs.ext4 fsck.ext4; do
    have "$cmd" || missing="$missing $cmd"
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
    missing="$missing python3-libnbd"
fi

if [ -z "$missing" ]; then
    echo "install-deps: all test tools present"
    exit 0
fi
echo "install-deps: missing:$missing; installing $PACKAGES"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES
