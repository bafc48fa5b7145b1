#!/usr/bin/env bash
# Recovery benchmark (issue 11) on RAID 5 over 4 local nbdraid-node volumes
# served by nbdraid-array, a 5th node holding the replacement volumes:
#   1. rebuild throughput (nbdraid array replace) vs one member's fio
#      sequential write throughput (1 MiB, QD8, the node directly);
#   2. the resync of ~1% dirty bitmap regions (a member's node killed and
#      back, re-added) vs the full rebuild: time and bytes copied;
#   3. 4 KiB random read p50/p99 while a rebuild runs at the default rate
#      vs idle.
# Builds the release binaries first, then runs recovery.py (Python 3,
# stdlib only; helpers in benchlib.py and arraybench.py). Needs fio,
# qemu-io (qemu-utils), nbdinfo (libnbd-bin) and taskset.
# Options: recovery.sh --help.
#
#   deploy/bench/recovery.sh --quick                      # smoke test, ~2 min
#   deploy/bench/recovery.sh --json /tmp/recovery.json    # full run
#
# --no-build skips cargo (uses the existing target/release binaries);
# --bin-dir DIR runs the binaries in DIR instead (and skips cargo too).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

build=1 args=() bin_dir=("--bin-dir" "$target/release")
for a in "$@"; do
  case $a in
    --no-build) build=0; continue ;;
    -h | --help) build=0 ;;
    --bin-dir | --bin-dir=*) build=0 bin_dir=() ;;
  esac
  args+=("$a")
done

for tool in fio qemu-io nbdinfo taskset; do
  command -v "$tool" >/dev/null || { echo "recovery.sh: $tool is required" >&2; exit 1; }
done
if ((build)); then
  echo "building nbdraid-node, nbdraid-array and nbdraid (release)" >&2
  (cd "$root" && cargo build --release -p nbdraid-node -p nbdraid-raid -p nbdraid-cli)
fi

# The command as typed, for the report.
RECOVERY_SH_CMD="deploy/bench/recovery.sh$(printf ' %q' "$@")"
export RECOVERY_SH_CMD
exec python3 "$here/recovery.py" "${bin_dir[@]}" "${args[@]}"
