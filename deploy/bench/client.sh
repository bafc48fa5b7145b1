#!/usr/bin/env bash
# One-command client benchmark: `nbdraid bench` (the completion-ring client)
# against fio's nbd engine (libnbd) at 4k random read/write, QD32, with one
# and four connections, on `nbdkit memory` and on `nbdraid-node` (volume on
# /dev/shm). Reports IOPS and client CPU seconds per million I/Os for both,
# and the ratio ours/fio. Builds release binaries first, then runs
# client.py (Python 3, stdlib only; helpers in benchlib.py). Options:
# client.sh --help.
#
#   deploy/bench/client.sh --quick                  # smoke test
#   deploy/bench/client.sh --json /tmp/client.json  # full: 3 passes x 10 s
#   deploy/bench/client.sh --servers nbdkit --rows randread-4k-qd32-1conn
#
# --no-build skips cargo (uses the existing target/release binaries).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

build=1 args=()
for a in "$@"; do
  case $a in
    --no-build) build=0; continue ;;
    -h | --help) build=0 ;;
  esac
  args+=("$a")
done

for tool in fio nbdkit nbdcopy taskset; do
  command -v "$tool" >/dev/null || { echo "client.sh: $tool is required" >&2; exit 1; }
done
if ((build)); then
  echo "building nbdraid and nbdraid-node (release)" >&2
  (cd "$root" && cargo build --release -p nbdraid-cli -p nbdraid-node)
fi

export CLIENT_SH="deploy/bench/client.sh"
exec python3 "$here/client.py" --nbdraid-bin "$target/release/nbdraid" \
  --node-bin "$target/release/nbdraid-node" "${args[@]}"
