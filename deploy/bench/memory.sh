#!/usr/bin/env bash
# Memory under a write flood: one node (throttle on vs off, nbdkit for scale)
# and the stack (RAID 5 array daemon over 4 nodes, one slowed down,
# cross-layer accounting on vs off). Options: memory.sh --help.
#   deploy/bench/memory.sh [--part node|stack|all] [--runtime 30] [--limit 3G] [--json out.json]
# --no-build skips cargo (uses the existing target/release binaries).
set -euo pipefail
cd "$(dirname "$0")/../.."
build=1 args=()
for a in "$@"; do
  case $a in
    --no-build) build=0; continue ;;
    -h | --help) build=0 ;;
  esac
  args+=("$a")
done
if ((build)); then
  # The node with fault injection (the slowed-down storage); the stack part
  # also needs the array daemon and the CLI.
  cargo build --release -p nbdraid-node --features nbdraid-node/fault-injection \
    -p nbdraid-raid -p nbdraid-cli
fi
exec python3 deploy/bench/memory.py "${args[@]}"
