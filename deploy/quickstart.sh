#!/usr/bin/env bash
# The main job on embedded defaults: builds nbdraid (release) and runs a
# local cluster on this machine, in the foreground, until Ctrl-C:
#
#   - four storage nodes (nbdraid-node), each serving a 1 GiB volume "m";
#   - one array daemon (nbdraid-array) serving "r5", a RAID 5 array over
#     those four volumes (3 GiB usable), on 127.0.0.1:10809.
#
#   deploy/quickstart.sh
#   NBDRAID_DATA=/srv/nbdraid deploy/quickstart.sh
#
# Environment (all optional):
#   NBDRAID_DATA     data root (default ./nbdraid-data): node0..node3/, array/
#   NBDRAID_BIN_DIR  use the binaries in this directory instead of building
#   NBDRAID_PORTS    "auto": every daemon on an OS-picked port (default: the
#                    well-known ports below when free)
#
# Ports (when free): array NBD 10809, array gRPC 10820, nodes NBD
# 10811-10814 and gRPC 10821-10824; a busy port is replaced by a free one.
# A second quick start on the same data root refuses at once and touches
# nothing of the running one. Ctrl-C stops everything this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${NBDRAID_DATA:-$PWD/nbdraid-data}"
mkdir -p "$data"

# One quick start per data root: the lock is held (fd 9) for as long as this
# script runs and released by the kernel however it ends.
exec 9>"$data/.quickstart.lock"
if ! flock -n 9; then
    echo "quickstart: another quick start is running on $data" >&2
    echo "quickstart: stop it first (Ctrl-C in its terminal), or use another NBDRAID_DATA" >&2
    exit 1
fi

# The client tools the attach lines below use.
deploy/install-clients.sh || echo "quickstart: continuing without the client tools"

if [ -n "${NBDRAID_BIN_DIR:-}" ]; then
    bin="$NBDRAID_BIN_DIR"
else
    cargo build --release -p nbdraid-node -p nbdraid-raid -p nbdraid-cli
    bin=target/release
fi

port() { # a well-known port if free, else 0 (the daemon picks one)
    if [ "${NBDRAID_PORTS:-}" = auto ] || (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        echo 0
    else
        echo "$1"
    fi
}
addr() { sed -E "s/.*\"$2\":\"([^\"]+)\".*/\\1/" "$1"; }

pids=()
stop_all() {
    # The array daemon first (it marks its arrays clean), then the nodes.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill -TERM "${pids[$i]}" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        while kill -0 "$p" 2>/dev/null; do wait "$p" 2>/dev/null || true; done
    done
}
trap 'stop_all; exit 130' INT TERM
trap 'stop_all' EXIT

wait_ready() { # ready-file pid name
    for _ in $(seq 300); do
        [ -s "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.1
    done
    echo "quickstart: $3 did not start; see $data/$3.log" >&2
    exit 1
}

members=()
for i in 0 1 2 3; do
    dir="$data/node$i"
    mkdir -p "$dir"
    rm -f "$dir/ready.json"
    "$bin/nbdraid-node" --listen "127.0.0.1:$(port $((10811 + i)))" \
        --grpc-listen "127.0.0.1:$(port $((10821 + i)))" \
        --data-dir "$dir" --ready-file "$dir/ready.json" --volume m:1G \
        >"$data/node$i.log" 2>&1 9>&- &
    pids+=($!)
    wait_ready "$dir/ready.json" $! "node$i"
    # ?grpc= names the node's control plane: the array leases a grant
    # there and follows the node's cost model (stacked throttling).
    members+=("\"nbd://$(addr "$dir/ready.json" nbd)/m?grpc=$(addr "$dir/ready.json" grpc)\"")
done

mkdir -p "$data/array"
rm -f "$data/array/ready.json"
cat >"$data/array.toml" <<TOML
# Written by deploy/quickstart.sh: a RAID 5 array over the four nodes' volumes.
[[array]]
name = "r5"
level = "raid5"
chunk = "512K"
members = [$(IFS=,; echo "${members[*]}")]
TOML
"$bin/nbdraid-array" --config "$data/array.toml" \
    --listen "127.0.0.1:$(port 10809)" --grpc-listen "127.0.0.1:$(port 10820)" \
    --metrics-listen 127.0.0.1:0 --data-dir "$data/array" \
    --ready-file "$data/array/ready.json" >"$data/array.log" 2>&1 9>&- &
pids+=($!)
wait_ready "$data/array/ready.json" $! array

nbd=$(addr "$data/array/ready.json" nbd)
grpc=$(addr "$data/array/ready.json" grpc)
metrics=$(addr "$data/array/ready.json" metrics)
cat <<MSG

nbdraid is serving: RAID 5 array "r5" over 4 nodes (data and logs in $data)
  status:    $bin/nbdraid array status r5 --array $grpc
  info:      nbdinfo nbd://$nbd/r5
  copy:      nbdcopy disk.img nbd://$nbd/r5
  mount:     mkdir -p /tmp/nbd && nbdfuse /tmp/nbd/r5 nbd://$nbd/r5 &
             mkfs.ext4 /tmp/nbd/r5 && mount -o loop /tmp/nbd/r5 /mnt     (as root)
  kernel:    nbd-client -N r5 ${nbd%:*} ${nbd##*:} /dev/nbd0            (needs the nbd module)
  qemu:      qemu-img info nbd://$nbd/r5
  check:     $bin/nbdraid array check r5 --array $grpc
  throttle:  $bin/nbdraid throttle show --array $grpc
  metrics:   curl http://$metrics/metrics
Ctrl-C stops everything (in-flight requests finish first; the array is marked clean).
MSG
# `wait` returns early when a signal arrives; the traps do the rest.
status=
while kill -0 "${pids[-1]}" 2>/dev/null; do
    wait "${pids[-1]}" 2>/dev/null && status=0 || status=$?
done
# Exited before the loop looked: its status is still there to collect.
[ -n "$status" ] || { wait "${pids[-1]}" 2>/dev/null && status=0 || status=$?; }
# Ctrl-C reaches the whole process group: the array daemon may stop (and
# be reaped here) before bash runs its INT trap. A daemon that stopped
# cleanly was asked to, so this is the Ctrl-C exit, not a failure.
if [ "$status" = 0 ]; then
    stop_all
    exit 130
fi
echo "quickstart: the array daemon exited (status $status); see $data/array.log" >&2
exit 1
