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
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_tools=(fio nbdinfo taskset)
bench_print_only=(--list-rows --list-configs)
bench_bin=(--bin-dir "$bench_target/release")
bench_building="nbdraid-node, nbdraid-array and nbdraid"
bench_cargo=(-p nbdraid-node -p nbdraid-raid -p nbdraid-cli)
bench_report=ARRAY_SH_CMD
bench_run array.sh arraybench.py "$@"
