#!/usr/bin/env bash
# One-command stacked-throttling benchmark (issue 10): RAID 5 over 4 local
# nbdraid-node volumes, the array daemon leasing a grant at every member.
#   part cost: the array daemon's CPU per I/O with member-grant accounting
#              on vs off (4 KiB random read / write, memory not the limit);
#   part slow: member 3 slowed by fault injection vs not, write floods and
#              4 KiB reads beside them (head-of-line blocking): throughput,
#              p99, and member 3 stays active (throttled, not failed).
# Builds the release binaries first (the node with fault injection), then
# runs throttle.py (Python 3, stdlib only; helpers in benchlib.py and
# arraybench.py). Options: throttle.sh --help.
#
#   deploy/bench/throttle.sh --quick                      # smoke test, ~2 min
#   deploy/bench/throttle.sh --json /tmp/throttle.json    # full run
#
# --no-build skips cargo (uses the existing target/release binaries);
# --bin-dir DIR runs the binaries in DIR instead (and skips cargo too).
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_tools=(fio nbdinfo taskset)
bench_bin=(--bin-dir "$bench_target/release")
bench_building="nbdraid-node (with fault-injection), nbdraid-array and nbdraid"
bench_cargo=(-p nbdraid-node --features nbdraid-node/fault-injection -p nbdraid-raid -p nbdraid-cli)
bench_report=THROTTLE_SH_CMD
bench_run throttle.sh throttle.py "$@"
