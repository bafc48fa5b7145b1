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
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_tools=(fio nbdkit nbdcopy taskset)
bench_first=(--nbdraid-bin "$bench_target/release/nbdraid"
  --node-bin "$bench_target/release/nbdraid-node")
bench_building="nbdraid and nbdraid-node"
bench_cargo=(-p nbdraid-cli -p nbdraid-node)
bench_env=(CLIENT_SH=deploy/bench/client.sh)
bench_run client.sh client.py "$@"
