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
# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# The node is built only when an nbdraid server is among --servers (all
# servers are, by default).
need_node=1 prev=''
for a in "$@"; do
  # --no-build is not passed on, so it is never the value of --servers.
  case $a in --no-build) continue ;; esac
  servers=
  case $a in --servers=*) servers=${a#--servers=} ;; esac
  [[ $prev == --servers ]] && servers=$a
  if [[ -n $servers ]]; then
    need_node=0
    IFS=, read -ra list <<<"$servers"
    for s in "${list[@]}"; do [[ ${s%%:*} == nbdraid ]] && need_node=1; done
  fi
  prev=$a
done

bench_print_only=(--list-rows)
bench_bin=(--node-bin "$bench_target/release/nbdraid-node")
if ((need_node)); then
  bench_building=nbdraid-node
  bench_cargo=(-p nbdraid-node)
fi
bench_run peers.sh peers.py "$@"
