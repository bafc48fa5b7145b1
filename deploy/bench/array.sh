#!/usr/bin/env bash
# One-command array benchmark: nbdraid-array's RAID 0, 1 (2 and 3 members),
# 5, 6 and 10 over local nbdraid-node volumes, degraded RAID 5 reads, the
# node served directly, and qemu-storage-daemon's quorum driver (the RAID 1
# peer), all on peers.py's fio rows. Reports IOPS, MB/s, p99 and CPU per
# I/O of the array daemon and of the nodes, against the issue's goals.
# Builds the release binaries first, then runs arraybench.py (Python 3, stdlib
# only; helpers in benchlib.py). Options: array.sh --help.
#
#   deploy/bench/array.sh --json /tmp/array.json    # full: 3 passes x 10 s
#   deploy/bench/array.sh --passes 1 --runtime 3 \
#       --rows randread-4k-qd32,randwrite-4k-qd32 --configs raid1,raid5
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
    -h | --help | --list-rows | --list-configs) build=0 ;;
    --bin-dir | --bin-dir=*) build=0 bin_dir=() ;;
  esac
  args+=("$a")
done

for tool in fio nbdinfo taskset; do
  command -v "$tool" >/dev/null || { echo "array.sh: $tool is required" >&2; exit 1; }
done
if ((build)); then
  echo "building nbdraid-node, nbdraid-array and nbdraid (release)" >&2
  (cd "$root" && cargo build --release -p nbdraid-node -p nbdraid-raid -p nbdraid-cli)
fi

# The command as typed, for the report (arraybench.py also sees --bin-dir).
ARRAY_SH_CMD="deploy/bench/array.sh$(printf ' %q' "$@")"
export ARRAY_SH_CMD
exec python3 "$here/arraybench.py" "${bin_dir[@]}" "${args[@]}"
