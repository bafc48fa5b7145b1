#!/usr/bin/env bash
# The main job on embedded defaults: builds nbdraid (release) and runs a
# storage node serving one volume, in the foreground, until Ctrl-C.
#
#   deploy/quickstart.sh                 # vol0 of 1G on 127.0.0.1:10809
#   NBDRAID_DATA=/srv/nbd deploy/quickstart.sh --volume big:100G
#
# Extra arguments go to nbdraid-node (see `nbdraid-node --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${NBDRAID_DATA:-$PWD/nbdraid-data}"
port=10809
if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "quickstart: port $port is busy; letting the node pick a free port"
    port=0
fi
cargo build --release -p nbdraid-node -p nbdraid-cli
ready="$data/ready.json"
mkdir -p "$data"
rm -f "$ready"
grpc=10810
if (exec 3<>/dev/tcp/127.0.0.1/$grpc) 2>/dev/null; then grpc=0; fi
args=(--listen "127.0.0.1:$port" --grpc-listen "127.0.0.1:$grpc" --metrics-listen 127.0.0.1:0 --data-dir "$data" --ready-file "$ready")
if [ $# -eq 0 ]; then
    args+=(--volume vol0:1G)
fi
target/release/nbdraid-node "${args[@]}" "$@" &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node' INT TERM
for _ in $(seq 100); do [ -s "$ready" ] && break; sleep 0.1; done
if [ ! -s "$ready" ]; then
    echo "quickstart: the node did not start" >&2
    wait $node
    exit 1
fi
nbd=$(sed -E 's/.*"nbd":"([^"]+)".*/\1/' "$ready")
metrics=$(sed -E 's/.*"metrics":"([^"]+)".*/\1/' "$ready")
grpcaddr=$(sed -E 's/.*"grpc":"([^"]+)".*/\1/' "$ready")
cat <<MSG

nbdraid-node is serving (data in $data):
  exports:   nbdinfo --list nbd://$nbd
  attach:    nbdfuse /tmp/mnt nbd://$nbd/vol0   |   qemu-img info nbd://$nbd/vol0
  client:    target/release/nbdraid info nbd://$nbd/vol0
  admin:     target/release/nbdraid volume list --node $grpcaddr
  metrics:   curl http://$metrics/metrics
Ctrl-C stops it (in-flight requests finish first).
MSG
wait $node
