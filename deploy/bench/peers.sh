#!/usr/bin/env bash
# One-command side-by-side benchmark of NBD servers: nbdraid-node, nbd-server,
# nbdkit (file plugin) and qemu-nbd serving the same file, measured with the
# same fio/nbdcopy matrix. Builds nbdraid-node (release) when it is selected,
# then runs peers.py (Python 3, stdlib only). All options: peers.sh --help.
#
#   deploy/bench/peers.sh --quick                       # smoke test
#   deploy/bench/peers.sh --json /tmp/peers.json        # full run, 3 passes
#   deploy/bench/peers.sh --variant nothrottle='--no-throttle' \
#       --servers nbdraid,nbdraid:nothrottle,nbdkit     # the same server twice
#
# --no-build skips cargo (uses the existing target/release/nbdraid-node);
# --node-bin PATH runs that binary instead (and skips cargo too).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}

build=1 need_node=1 args=() prev= node_bin=("--node-bin" "$target/release/nbdraid-node")
for a in "$@"; do
  case $a in
    --no-build) build=0; continue ;;
    -h | --help | --list-rows) build=0 ;;
    --node-bin | --node-bin=*) build=0 node_bin=() ;;
  esac
  servers=
  case $a in --servers=*) servers=${a#--servers=} ;; esac
  [[ $prev == --servers ]] && servers=$a
  if [[ -n $servers ]]; then
    need_node=0
    IFS=, read -ra list <<<"$servers"
    for s in "${list[@]}"; do [[ ${s%%:*} == nbdraid ]] && need_node=1; done
  fi
  args+=("$a")
  prev=$a
done

if ((build && need_node)); then
  echo "building nbdraid-node (release)" >&2
  (cd "$root" && cargo build --release -p nbdraid-node)
fi

exec python3 "$here/peers.py" "${node_bin[@]}" "${args[@]}"
