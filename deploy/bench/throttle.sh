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

for tool in fio nbdinfo taskset; do
  command -v "$tool" >/dev/null || { echo "throttle.sh: $tool is required" >&2; exit 1; }
done
if ((build)); then
  echo "building nbdraid-node (with fault-injection), nbdraid-array and nbdraid (release)" >&2
  (cd "$root" && cargo build --release -p nbdraid-node --features nbdraid-node/fault-injection \
    -p nbdraid-raid -p nbdraid-cli)
fi

# The command as typed, for the report.
THROTTLE_SH_CMD="deploy/bench/throttle.sh$(printf ' %q' "$@")"
export THROTTLE_SH_CMD
exec python3 "$here/throttle.py" "${bin_dir[@]}" "${args[@]}"
