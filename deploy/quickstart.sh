#!/usr/bin/env bash
# The main job on embedded defaults: builds nbdraid (release) and runs a
# storage node serving one volume, in the foreground, until Ctrl-C.
#
#   deploy/quickstart.sh                 # vol0 of 1G on 127.0.0.1:10809
#   NBDRAID_DATA=/srv/nbd deploy/quickstart.sh --volume big:100G
#
# Extra arguments go to nbdraid-node (see `nbdraid-node --help`).
# A second quick start on the same data dir refuses at once and touches
# nothing of the running one.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${NBDRAID_DATA:-$PWD/nbdraid-data}"
mkdir -p "$data"

# One quick start per data dir: the lock is held (fd 9) for as long as this
# script runs, and released by the kernel however it ends.
exec 9>"$data/.quickstart.lock"
if ! flock -n 9; then
    echo "quickstart: another quick start is running on $data" >&2
    echo "quickstart: stop it first (Ctrl-C in its terminal), or use another NBDRAID_DATA" >&2
    exit 1
fi

# The client tools the attach lines below use.
deploy/install-clients.sh || true

cargo build --release -p nbdraid-node -p nbdraid-cli
port=10809
if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "quickstart: port $port is busy; letting the node pick a free port"
    port=0
fi
grpc=10810
if (exec 3<>/dev/tcp/127.0.0.1/$grpc) 2>/dev/null; then grpc=0; fi
ready="$data/ready.json"
rm -f "$ready"
args=(--listen "127.0.0.1:$port" --grpc-listen "127.0.0.1:$grpc" --metrics-listen 127.0.0.1:0 --data-dir "$data" --ready-file "$ready")
if [ $# -eq 0 ]; then
    args+=(--volume vol0:1G)
fi
target/release/nbdraid-node "${args[@]}" "$@" 9>&- &
node=$!
trap 'kill -TERM $node 2>/dev/null' INT TERM
for _ in $(seq 100); do
    [ -s "$ready" ] && break
    kill -0 $node 2>/dev/null || break
    sleep 0.1
done
if [ ! -s "$ready" ]; then
    echo "quickstart: the node did not start" >&2
    wait $node || true
    exit 1
fi
nbd=$(sed -E 's/.*"nbd":"([^"]+)".*/\1/' "$ready")
metrics=$(sed -E 's/.*"metrics":"([^"]+)".*/\1/' "$ready")
grpcaddr=$(sed -E 's/.*"grpc":"([^"]+)".*/\1/' "$ready")
cat <<MSG

nbdraid-node is serving (data in $data):
  exports:   nbdinfo --list nbd://$nbd
  attach:    mkdir -p /tmp/nbd && nbdfuse /tmp/nbd/vol0 nbd://$nbd/vol0 &
             mkfs.ext4 /tmp/nbd/vol0 && mount -o loop /tmp/nbd/vol0 /mnt     (as root)
  kernel:    nbd-client -N vol0 ${nbd%:*} ${nbd##*:} /dev/nbd0             (needs the nbd module)
  qemu:      qemu-img info nbd://$nbd/vol0
  client:    target/release/nbdraid info nbd://$nbd/vol0
  admin:     target/release/nbdraid volume list --node $grpcaddr
  metrics:   curl http://$metrics/metrics
Ctrl-C stops it (in-flight requests finish first).
MSG
# `wait` returns early when a signal arrives; wait again for the node's exit.
while kill -0 $node 2>/dev/null; do
    wait $node || true
done
