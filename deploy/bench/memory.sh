#!/usr/bin/env bash
# Memory under a write flood (throttle on vs off, nbdkit for scale).
#   deploy/bench/memory.sh [--runtime 30] [--capacity 72M] [--limit 3G] [--json out.json]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p nbdraid-node --features fault-injection
exec python3 deploy/bench/memory.py "$@"
