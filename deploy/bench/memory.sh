#!/usr/bin/env bash
# Memory under a write flood: one node (throttle on vs off, nbdkit for scale)
# and the stack (RAID 5 array daemon over 4 nodes, one slowed down,
# cross-layer accounting on vs off). Options: memory.sh --help.
#   deploy/bench/memory.sh [--part node|stack|all] [--runtime 30] [--limit 3G] [--json out.json]
# --no-build skips cargo (uses the existing target/release binaries).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The node with fault injection (the slowed-down storage); the stack part
# also needs the array daemon and the CLI.
bench_cargo=(-p nbdraid-node --features nbdraid-node/fault-injection -p nbdraid-raid -p nbdraid-cli)
# memory.py runs from the repository root, where relative paths given to it
# (--json, --workdir...) have always been resolved.
cd "$bench_root"
bench_run memory.sh memory.py "$@"
