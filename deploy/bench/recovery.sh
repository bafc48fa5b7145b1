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
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_tools=(fio qemu-io nbdinfo taskset)
bench_bin=(--bin-dir "$bench_target/release")
bench_building="nbdraid-node, nbdraid-array and nbdraid"
bench_cargo=(-p nbdraid-node -p nbdraid-raid -p nbdraid-cli)
bench_report=RECOVERY_SH_CMD
bench_run recovery.sh recovery.py "$@"
