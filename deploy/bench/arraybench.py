#!/usr/bin/env python3
"""Array benchmark: nbdraid-array's RAID 0, 1, 5, 6 and 10 over local
nbdraid-node volumes, against the node served directly and, for RAID 1,
qemu-storage-daemon's `quorum` driver over the same nodes.

Configurations (--configs), each served on 127.0.0.1:

  direct          one nbdraid-node serving one volume (the baseline)
  raid0           RAID 0 over 4 node volumes
  raid1           RAID 1, 2 members          raid1x3   RAID 1, 3 members
  raid5           RAID 5 over 4              raid6     RAID 6 over 4
  raid10          RAID 10 over 4 (2 copies, md's near layout)
  raid5-degraded  RAID 5 over 4 with member 3's node killed (read rows only)
  quorum          qemu-storage-daemon, blockdev `quorum` (vote-threshold 1,
                  read-pattern fifo) over 2 node volumes, exported over NBD
  quorum3         the same over 3 node volumes

Member i of a configuration is a volume on node i (its own nbdraid-node
process and data dir on /dev/shm, i = 0..3). Every volume is filled before
anything is timed, so no run pays for first-touch tmpfs page faults: the
direct and quorum volumes in place with random data (as peers.py does), the
arrays' members by writing the whole array once through the array daemon
(so parity and mirrors are consistent and the arrays start clean, with no
resync). Then, per fio row and pass, every configuration in turn (the order
rotates by pass): its nodes and its layer (array daemon or qemu) are
started fresh, pinned, measured, and stopped by PID.

Pinning: every server of a cell, i.e. ALL the nodes AND the array daemon
(or qemu-storage-daemon), share --server-cpus (default CPU 1); fio runs on
--client-cpus (default CPU 0). The daemons' `threads = 0` then gives each
one runtime worker. On 2 shared cores IOPS against the direct node are
reported, not targeted: an array costs the servers' core more work per I/O.

What is measured per cell (see /work/shared/benchmarking.md):
* IOPS, MB/s, p99 from fio's JSON (the rows are peers.py's fio rows).
* CPU per I/O from /proc/PID/stat (utime+stime+cutime+cstime) over the run,
  separately for the layer (array daemon / qemu-storage-daemon) and for the
  nodes (summed), divided by the I/Os fio completed: "layer us/IO",
  "nodes us/IO" and "total servers us/IO".
* Member I/Os per array I/O: the nodes' nbdraid_requests_total counters
  (Prometheus, scraped before and after the window), next to what the
  array's plans should issue ("k", see member_ios below).
* Other load: /proc/stat busy time minus the servers, fio and this script;
  a pass above --max-other cores is repeated (--retries), the least
  disturbed attempt kept, a cell still disturbed marked "!".

Goals (from the issue), per row, on the median CPU per I/O:
* healthy reads: array daemon us/IO <= 1.5 x the direct node's us/IO;
* writes: <= (0.5 + 0.5 k) x the node's, k = member I/Os per array write
  as the daemon plans it (RAID 0: chunks touched; RAID 1: copies; RAID 10:
  copies x chunks; RAID 5/6: full stripe = n writes, else the cheaper of
  read-modify-write and reconstruct-write, md's rule, which the daemon
  follows); mixed rows weight the read and write goals by fio's I/O mix;
* RAID 1 against the quorum of as many members: more IOPS on every row
  and at most 0.8 x qemu-storage-daemon's CPU per I/O.
Degraded RAID 5 has no goal; it is reported.

Every process this script starts is stopped by PID (array daemon first,
then the nodes), on success, error, Ctrl-C or SIGTERM.  Standard library
only; the helpers come from benchlib.py, the rows from peers.py.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import (CLK_TCK, Proc, busy_cores, command_line, cpu_model, f2, fill_random,
                      first_line, fmt_k, git_state, listening_port, log, log_tail, median_of,
                      parse_size, prom_samples, raise_on_signals, read_fio_job, run_child,
                      scrape_metrics, self_cpu, start_with_ready_file, sys_cpu, taskset,
                      tree_cpu_ticks, wait_quiet, write_raw_json)
import peers  # (the node benchmark's fio rows and fio runner)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
BINARIES = ("nbdraid-node", "nbdraid-array", "nbdraid")


# --------------------------------------------------------------------------
# Configurations


class Config:
    """One thing served to fio: the direct node, an array, or a quorum.

    `base` names the configuration whose volumes, array (and its name) this
    one serves (default: its own), so two configurations can serve the same
    array with different daemon settings; `toml` is put at the top of the
    array daemon's configuration file (e.g. a `[members]` table)."""

    def __init__(self, name, kind, members, level=None, copies=1, fail=None, desc="",
                 base=None, toml=""):
        self.name, self.kind, self.members, self.level = name, kind, members, level
        self.copies, self.fail, self.desc = copies, fail, desc
        self.array, self.toml = base or name, toml

    @property
    def reads_only(self):
        return self.fail is not None

    def volume(self, i):
        return "direct" if self.kind == "node" else f"{self.array}-{i}"


CONFIGS = [
    Config("direct", "node", 1, desc="nbdraid-node serving one volume directly (baseline)"),
    Config("raid0", "array", 4, "raid0", desc="RAID 0, 4 members"),
    Config("raid1", "array", 2, "raid1", copies=2, desc="RAID 1, 2 members"),
    Config("raid1x3", "array", 3, "raid1", copies=3, desc="RAID 1, 3 members"),
    Config("raid5", "array", 4, "raid5", desc="RAID 5, 4 members"),
    Config("raid6", "array", 4, "raid6", desc="RAID 6, 4 members"),
    Config("raid10", "array", 4, "raid10", copies=2, desc="RAID 10, 4 members, 2 copies (near)"),
    Config("raid5-nolog", "array", 4, "raid5", base="raid5", toml="write-log = false",
           desc="RAID 5, 4 members, partial-parity log off (what the log costs)"),
    Config("raid6-nolog", "array", 4, "raid6", base="raid6", toml="write-log = false",
           desc="RAID 6, 4 members, partial-parity log off (what the log costs)"),
    Config("raid5-degraded", "array", 4, "raid5", fail=3,
           desc="RAID 5, 4 members, member 3's node killed (read rows only)"),
    Config("quorum", "quorum", 2, desc="qemu-storage-daemon quorum (vote-threshold 1, "
                                       "read-pattern fifo) over 2 node volumes"),
    Config("quorum3", "quorum", 3, desc="qemu-storage-daemon quorum over 3 node volumes"),
]
CONFIG_BY_NAME = {c.name: c for c in CONFIGS}
# RAID 1 configuration -> its qemu peer (same members on the same nodes).
QUORUM_PEER = {"raid1": "quorum", "raid1x3": "quorum3"}


def is_read_row(row):
    return row.fio["rw"] in ("read", "randread")


# --------------------------------------------------------------------------
# What the array's plans issue: member I/Os per array I/O (the "k" of the goal)


def member_ios(cfg, chunk, bs, write):
    """Average (member reads, member writes) per array request of `bs` bytes
    at bs-aligned offsets (fio's random and sequential rows both are), as the
    daemon plans them (raid-layer/src/layout.rs `map`/`stripes`,
    array/read.rs, array/write.rs, array/parity_write.rs `plan`).

    Not counted: write-intent bitmap and superblock writes (the measured
    member I/Os include them)."""
    n, level = cfg.members, cfg.level
    if cfg.kind == "node":
        return (0.0, 1.0) if write else (1.0, 0.0)
    if cfg.kind == "quorum":  # fifo reads the first child; writes go to all
        return (0.0, float(n)) if write else (1.0, 0.0)
    if level == "raid1":  # one piece per request
        return (0.0, float(n)) if write else (1.0, 0.0)
    parity = {"raid5": 1, "raid6": 2}.get(level, 0)
    data = n - parity
    # Placement repeats every n rows: n stripes (parity rotation), n x copies
    # device slots (RAID 10).
    period = math.lcm(bs, chunk * n * (data if parity else max(cfg.copies, 1)))
    step = max(bs, period // 65536 // bs * bs)
    count, reads, writes = 0, 0, 0
    for off in range(0, period, step):
        count += 1
        c0, c1 = off // chunk, (off + bs - 1) // chunk
        pieces = c1 - c0 + 1
        if level in ("raid0", "raid10"):
            copies = cfg.copies if level == "raid10" else 1
            if write:
                writes += pieces * copies
            else:
                reads += pieces
            continue
        sd = data * chunk  # RAID 5/6: stripe data bytes
        if not write:
            for c in range(c0, c1 + 1):
                stripe, index = divmod(c, data)
                p_member = (n - 1) - stripe % n
                member = (p_member + parity + index) % n
                reads += (n - 1) if member == cfg.fail else 1
            continue
        pos, end = off, off + bs
        while pos < end:
            start = pos % sd
            ln = min(sd - start, end - pos)
            pos += ln
            if start == 0 and ln == sd:  # full stripe: no reads
                writes += n
                continue
            first, last = start // chunk, (start + ln - 1) // chunk
            chunks = [(j, max(start, j * chunk) - j * chunk,
                       min(start + ln, (j + 1) * chunk) - max(start, j * chunk))
                      for j in range(first, last + 1)]
            head, tail_end = start % chunk, (start + ln - 1) % chunk + 1
            if len(chunks) == 1:
                ranges = [(head, tail_end)]
            elif len(chunks) == 2 and tail_end < head:
                ranges = [(0, tail_end), (head, chunk)]
            else:
                ranges = [(0, chunk)]
            rmw = len(chunks) + parity * len(ranges)
            rcw = sum(1 for (a, b) in ranges for j in range(data)
                      if not any(ci == j and ic <= a and ic + cl >= b
                                 for (ci, ic, cl) in chunks))
            reads += rmw if rmw < rcw else rcw
            writes += len(chunks) + parity
    return reads / count, writes / count


def k_text(r, w):
    def f(x):
        return f"{x:.0f}" if abs(x - round(x)) < 0.01 else f"{x:.2f}"
    if r and w:
        return f"{f(r + w)} ({f(r)}r+{f(w)}w)"
    return f(r + w)


def row_model(cfg, chunk, row):
    """The row's model: member I/Os per array I/O for its reads and writes."""
    bs = parse_size(row.fio["bs"])
    rw = row.fio["rw"]
    out = {}
    if rw in ("read", "randread", "randrw", "rw"):
        out["read"] = member_ios(cfg, chunk, bs, False)
    if rw in ("write", "randwrite", "randrw", "rw"):
        out["write"] = member_ios(cfg, chunk, bs, True)
    return out


def goal_for(cfg, model, read_frac):
    """The issue's goal for the array daemon's CPU per I/O, in multiples of
    the direct node's (None: no goal): 1.5 for reads, 0.5 + 0.5 k for
    writes (k from the model), weighted by the row's read fraction."""
    if cfg.kind != "array" or cfg.reads_only:
        return None
    g = 0.0
    if "read" in model:
        g += read_frac * 1.5
    if "write" in model:
        k = sum(model["write"])
        g += (1 - read_frac) * (0.5 + 0.5 * k)
    return g


# --------------------------------------------------------------------------
# Processes


def node_metrics(addr):
    """{(export, op): count} of nbdraid_requests_total from a node's /metrics."""
    out = {}
    for lab, value in prom_samples(scrape_metrics(addr), "nbdraid_requests_total"):
        key = (lab.get("export", ""), lab.get("op", ""))
        out[key] = out.get(key, 0) + value
    return out


class Node:
    def __init__(self, ctx, cfg, i):
        self.ctx, self.cfg, self.i = ctx, cfg, i
        self.dir = os.path.join(ctx.workdir, "data", cfg.array, f"node{i}")
        self.volume = cfg.volume(i)
        self.log = os.path.join(ctx.workdir, "logs", f"{cfg.name}-node{i}.log")
        self.proc = self.port = self.metrics = self.grpc = None

    @property
    def backing(self):
        return os.path.join(self.dir, "volumes", f"{self.volume}.img")

    @property
    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/{self.volume}"

    @property
    def member_uri(self):
        """The URI an array names this volume by: with `?grpc=` when the node
        serves gRPC (--node-arg=--grpc-listen=...), so the array leases a
        grant there."""
        return self.uri + (f"?grpc={self.grpc}" if self.grpc else "")

    def start(self, prefix=()):
        """`prefix` goes before the command (it must exec the rest, as
        taskset and a cgroup wrapper do, so the PID stays the node's)."""
        os.makedirs(self.dir, exist_ok=True)
        ready = os.path.join(self.dir, "ready.json")
        cmd = list(prefix) + taskset(self.ctx.server_cpus) + [
            self.ctx.bins["nbdraid-node"], "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0", "--data-dir", self.dir,
            "--volume", f"{self.volume}:{self.ctx.member_size_spec}",
            "--ready-file", ready] + self.ctx.node_args
        self.proc, info = start_with_ready_file(cmd, ready, self.log)
        self.port = int(info["nbd"].rsplit(":", 1)[1])
        self.metrics = info.get("metrics")
        self.grpc = info.get("grpc")

    def set_fault(self, *args):
        """`nbdraid node fault VOLUME ARGS` (fault-injection builds only)."""
        r = subprocess.run([self.ctx.bins["nbdraid"], "node", "fault", self.volume,
                            "--node", self.grpc] + list(args),
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"node{self.i}: nbdraid node fault {' '.join(args)} failed "
                               f"(needs a node built with --features fault-injection): "
                               f"{(r.stderr or r.stdout).strip()[:300]}")

    def requests(self):
        """{op: count} this node served on its volume (None if unavailable)."""
        if not self.metrics or not self.proc or not self.proc.running():
            return None
        try:
            m = node_metrics(self.metrics)
        except (OSError, ValueError):
            return None
        return {op: v for (exp, op), v in m.items() if exp == self.volume}

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class Cell:
    """The processes of one configuration: its nodes and its layer.
    `prefix` goes before every server's command (see Node.start)."""

    def __init__(self, ctx, cfg, prefix=()):
        self.ctx, self.cfg, self.prefix = ctx, cfg, list(prefix)
        self.nodes = [Node(ctx, cfg, i) for i in range(cfg.members)]
        self.layer = None  # Proc of nbdraid-array or qemu-storage-daemon
        self.port = self.grpc = self.metrics = None
        self.killed = []
        self.log = os.path.join(ctx.workdir, "logs", f"{cfg.name}-layer.log")
        self.array_dir = os.path.join(ctx.workdir, "data", cfg.array, "array")

    @property
    def uri(self):
        if self.cfg.kind == "node":
            return self.nodes[0].uri
        return f"nbd://127.0.0.1:{self.port}/{self.cfg.array}"

    def live_nodes(self):
        return [n for n in self.nodes if n.proc is not None and n not in self.killed]

    def start(self, prefill=False):
        try:
            for n in self.nodes:
                n.start(self.prefix)
            if self.cfg.kind == "array":
                self._start_array()
                if any(n.grpc for n in self.nodes):
                    self.wait_leases()
            elif self.cfg.kind == "quorum":
                self._start_quorum()
            size = peers.probe_size(self.uri, 30)
            if self.cfg.fail is not None and not prefill:
                self._fail_member(self.cfg.fail)
            return size
        except BaseException:
            self.stop()
            raise

    def _start_array(self):
        os.makedirs(self.array_dir, exist_ok=True)
        conf = os.path.join(self.array_dir, "array.toml")
        members = ", ".join(f'"{n.member_uri}"' for n in self.nodes)
        extra = f"copies = {self.cfg.copies}\n" if self.cfg.level == "raid10" else ""
        chunk = "" if self.cfg.level == "raid1" else f'chunk = "{self.ctx.chunk_spec}"\n'
        with open(conf, "w") as f:
            f.write(f'# written by deploy/bench/arraybench.py for one cell\n{self.cfg.toml}\n'
                    f'[[array]]\n'
                    f'name = "{self.cfg.array}"\nlevel = "{self.cfg.level}"\n{chunk}{extra}'
                    f'members = [{members}]\n')
        ready = os.path.join(self.array_dir, "ready.json")
        cmd = self.prefix + taskset(self.ctx.server_cpus) + [
            self.ctx.bins["nbdraid-array"], "--config", conf, "--listen", "127.0.0.1:0",
            "--grpc-listen", "127.0.0.1:0", "--data-dir", self.array_dir,
            "--ready-file", ready] + self.ctx.array_args
        self.layer, info = start_with_ready_file(cmd, ready, self.log)
        self.port = int(info["nbd"].rsplit(":", 1)[1])
        self.grpc = info.get("grpc")
        self.metrics = info.get("metrics")

    def _start_quorum(self):
        children = [{"driver": "nbd", "export": n.volume,
                     "server": {"type": "inet", "host": "127.0.0.1", "port": str(n.port)}}
                    for n in self.nodes]
        blockdev = {"driver": "quorum", "node-name": "q", "vote-threshold": 1,
                    "read-pattern": "fifo", "children": children}
        cmd = taskset(self.ctx.server_cpus) + [
            "qemu-storage-daemon", "--blockdev", json.dumps(blockdev),
            "--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=0",
            "--export", f"type=nbd,id=e,node-name=q,name={self.cfg.name},writable=on"]
        self.layer = Proc(cmd, self.log)
        deadline = time.monotonic() + 30
        while (port := listening_port(self.layer.pid)) is None:
            if not self.layer.running():
                raise RuntimeError(f"qemu-storage-daemon exited: {log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError("qemu-storage-daemon did not listen within 30s")
            time.sleep(0.02)
        self.port = port

    def status(self):
        """`nbdraid array status NAME --json` (None if it fails)."""
        if self.cfg.kind != "array" or not self.grpc:
            return None
        try:
            r = subprocess.run([self.ctx.bins["nbdraid"], "array", "status", self.cfg.array,
                                "--array", self.grpc, "--json"],
                               capture_output=True, text=True, timeout=15)
            if r.returncode != 0:
                return {"error": (r.stderr or r.stdout).strip()[:300]}
            return json.loads(r.stdout)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            return {"error": str(e)}

    def throttle_show(self):
        """`nbdraid throttle show --array GRPC --json` (None if it fails)."""
        try:
            r = subprocess.run([self.ctx.bins["nbdraid"], "throttle", "show", "--array", self.grpc,
                                "--json"], capture_output=True, text=True, timeout=15)
            return json.loads(r.stdout) if r.returncode == 0 else None
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def wait_leases(self, timeout=60):
        """Waits until the array holds its lease (foreground and background)
        at every member that serves gRPC; returns `throttle show`'s JSON."""
        want = 2 * sum(1 for n in self.nodes if n.grpc)
        deadline = time.monotonic() + timeout
        while True:
            m = self.throttle_show() or {}
            held = [g for g in m.get("members", []) if g.get("lease_held")]
            if len(held) >= want:
                return m
            if time.monotonic() > deadline:
                raise RuntimeError(f"the array holds {len(held)} of {want} member leases after "
                                   f"{timeout}s: {json.dumps(m)[:400]}")
            time.sleep(0.1)

    def layer_waits(self):
        """{grant_waits, grant_wait_s, throttle_waits} so far, from the array
        daemon's metrics (None without a metrics endpoint, see --array-arg):
        requests that waited for member grants (and how long in total), and
        for the array's own throttle."""
        if not self.metrics or not self.layer or not self.layer.running():
            return None
        try:
            text = scrape_metrics(self.metrics)
        except OSError:
            return None
        return {"grant_waits": sum(v for _, v in prom_samples(text, "nbdraid_array_grant_waits")),
                "grant_wait_s": sum(v for _, v in prom_samples(
                    text, "nbdraid_array_grant_wait_seconds")),
                "throttle_waits": sum(v for _, v in prom_samples(
                    text, "nbdraid_throttle_waits_total"))}

    def member_states(self):
        """[state of each member slot] from `array status` (None if unknown)."""
        st = self.status() or {}
        by_slot = {m.get("slot"): m.get("state") for m in st.get("members", [])}
        return [by_slot.get(i) for i in range(self.cfg.members)]

    def _fail_member(self, i):
        """Kills member i's node (SIGKILL: a crash) and waits until the array
        has failed that member, nudging it with a short read if needed."""
        node = self.nodes[i]
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.stop(timeout=5)  # reaps it
        node.proc = None
        self.killed.append(node)
        deadline = time.monotonic() + 30
        nudged = False
        while True:
            st = self.status() or {}
            mem = [m for m in st.get("members", []) if m.get("slot") == i]
            if mem and mem[0].get("state") not in ("active", "recovering"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"array {self.cfg.name} did not fail member {i} within 30s "
                                   f"after its node was killed: {json.dumps(st)[:400]}")
            if not nudged and time.monotonic() > deadline - 28:
                # A request to the dead member makes the array notice at once.
                out = os.path.join(self.ctx.workdir, "nudge.json")
                cmd = taskset(self.ctx.client_cpus) + [
                    "fio", "--name=nudge", "--ioengine=nbd", f"--uri={self.uri}",
                    "--rw=randread", "--bs=4k", "--iodepth=8", "--time_based",
                    "--runtime=500ms", "--output-format=json", f"--output={out}"]
                run_child(cmd, 60)
                nudged = True
            time.sleep(0.1)

    def cpu_ticks(self):
        layer = tree_cpu_ticks(self.layer.pid) if self.layer else 0
        nodes = sum(tree_cpu_ticks(n.proc.pid) for n in self.live_nodes())
        return layer, nodes

    def requests(self):
        per = [n.requests() for n in self.live_nodes()]
        if any(p is None for p in per):
            return None
        out = {}
        for p in per:
            for op, v in p.items():
                out[op] = out.get(op, 0) + v
        return out

    def check_running(self):
        dead = []
        if self.layer is not None and not self.layer.running():
            dead.append(f"{self.cfg.name} layer: {log_tail(self.log, 8)}")
        for n in self.live_nodes():
            if not n.proc.running():
                dead.append(f"node{n.i}: {log_tail(n.log, 8)}")
        if dead:
            raise RuntimeError("died during the run: " + "; ".join(dead))

    def stop(self):
        # The layer first (the array daemon marks its array clean), then nodes.
        if self.layer is not None:
            self.layer.stop()
            self.layer = None
        for n in reversed(self.nodes):
            n.stop()


def fs_type(path):
    """The file system type of the mount holding path (from /proc/mounts)."""
    path, best, kind = os.path.realpath(path), "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


def log_marks(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def log_warnings(path, since, until=None, limit=5):
    """(count, first few) of the WARN/ERROR lines a daemon logged between byte
    offsets `since` and `until` (None: the end)."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            text = f.read(-1 if until is None else max(until - since, 0))
    except OSError:
        return 0, []
    lines = [ln.rstrip() for ln in text.decode(errors="replace").splitlines()
             if " WARN " in ln or " ERROR " in ln]
    return len(lines), lines[:limit]


# --------------------------------------------------------------------------
# Setup: volumes created and filled before anything is timed


def prepare(ctx, cfg):
    cell = Cell(ctx, cfg)
    t = time.monotonic()
    if cfg.kind in ("node", "quorum"):
        for n in cell.nodes:  # create the volume, then fill its file in place
            n.start()
            n.stop()
            if os.path.getsize(n.backing) != ctx.member_size:
                sys.exit(f"{n.backing} is {os.path.getsize(n.backing)} bytes, "
                         f"want {ctx.member_size}")
            fill_random(n.backing, ctx.member_size)
        log(f"  {cfg.name}: {cfg.members} volume(s) filled with random data "
            f"in {time.monotonic() - t:.1f}s")
        return None
    # Arrays: created over blank members (clean, no resync), then written
    # whole once through the array daemon (consistent parity and copies).
    try:
        size = cell.start(prefill=True)
        st = cell.status() or {}
        out = os.path.join(ctx.workdir, "prefill.json")
        cmd = taskset(ctx.client_cpus) + [
            "fio", "--name=prefill", "--ioengine=nbd", f"--uri={cell.uri}", "--rw=write",
            "--bs=1M", "--iodepth=8", f"--size={size}", "--output-format=json",
            f"--output={out}"]
        rc, _, text = run_child(cmd, 600)
        if rc != 0:
            raise RuntimeError(f"prefill of {cfg.name} failed (fio exit {rc}): {text[-400:]}")
        job = read_fio_job(out)
        if job.get("error") or job["write"]["io_bytes"] < size:
            raise RuntimeError(f"prefill of {cfg.name} wrote {job['write']['io_bytes']} "
                               f"of {size} bytes (error {job.get('error')})")
        st = cell.status() or st
    finally:
        cell.stop()
    log(f"  {cfg.name}: array of {size >> 20} MiB created ({st.get('state', '?')}) and "
        f"written whole through the daemon in {time.monotonic() - t:.1f}s")
    return size


# --------------------------------------------------------------------------
# One measurement


def fio_max_ms(path):
    try:
        job = read_fio_job(path)
    except (OSError, ValueError):
        return None
    vals = [job[d]["clat_ns"]["max"] / 1e6 for d in ("read", "write") if job[d]["total_ios"]]
    return max(vals) if vals else None


class Target:  # what peers.run_fio needs
    def __init__(self, uri):
        self.uri = uri


def measure(ctx, row, cell):
    req0, waits0 = cell.requests(), cell.layer_waits()
    (l0, n0), me0, sys0 = cell.cpu_ticks(), self_cpu(), sys_cpu()
    res = peers.run_fio(ctx, row, Target(cell.uri))
    sys1, (l1, n1), me1 = sys_cpu(), cell.cpu_ticks(), self_cpu()
    req1, waits1 = cell.requests(), cell.layer_waits()
    if waits0 is not None and waits1 is not None:
        res["layer_waits"] = {k: waits1[k] - waits0[k] for k in waits1}
    cell.check_running()
    res["max_lat_ms"] = fio_max_ms(os.path.join(ctx.workdir, "fio.json"))
    wall = sys1[0] - sys0[0]
    layer_s, nodes_s = (l1 - l0) / CLK_TCK, (n1 - n0) / CLK_TCK
    busy = busy_cores(sys0, sys1)
    me_s = me1 - me0
    other_s = busy["cpu"] * wall - layer_s - nodes_s - res["client_cpu_s"] - me_s
    ios = res["ios"]

    def per_io(s):
        return s * 1e6 / ios if ios else None

    res.update(
        wall_s=wall, layer_cpu_s=layer_s, nodes_cpu_s=nodes_s, self_cpu_s=me_s,
        busy_cores=busy["cpu"], servers_cores=(layer_s + nodes_s) / wall,
        client_cores=res["client_cpu_s"] / wall, other_cores=other_s / wall,
        steal_cores=busy["steal"],
        per_cpu_busy_cores={k: v for k, v in busy.items() if k not in ("cpu", "steal")},
        layer_us_per_io=per_io(layer_s) if cell.layer else None,
        nodes_us_per_io=per_io(nodes_s), total_us_per_io=per_io(layer_s + nodes_s),
        client_us_per_io=per_io(res["client_cpu_s"]),
    )
    res["read_frac"] = (res.get("read_iops", 0) / res["iops"]) if res["iops"] else 0.0
    if req0 is not None and req1 is not None and ios:
        d = {op: req1.get(op, 0) - req0.get(op, 0) for op in set(req0) | set(req1)}
        res["member_ops"] = {op: v for op, v in d.items() if v}
        res["member_ios_per_io"] = sum(d.values()) / ios
    res["disturbed"] = res["other_cores"] > ctx.max_other
    return res


def run_cell(ctx, row, cfg, pass_no):
    """Starts cfg's processes, measures row (retrying disturbed passes), stops them."""
    attempts = []
    cell = Cell(ctx, cfg)
    start_mark = mark = end_mark = log_marks(cell.log)
    tag = f"[{row.name} pass {pass_no + 1}] {cfg.name:<15}"
    try:
        cell.start()
        mark = log_marks(cell.log)
        st = cell.status()
        for attempt in range(ctx.retries + 1):
            waited = wait_quiet(ctx)
            r = measure(ctx, row, cell)
            r.update(attempt=attempt, quiet_wait_s=waited)
            if st is not None:
                r["array_status_before"] = {k: st.get(k) for k in ("state", "progress", "error")}
            attempts.append(r)
            lu = "-" if r["layer_us_per_io"] is None else f"{r['layer_us_per_io']:.2f}"
            log(f"  {tag} {fmt_k(r['iops']):>7} IOPS {r['bytes_per_s'] / 1e6:7.1f} MB/s  "
                f"layer {lu:>6} nodes {r['nodes_us_per_io']:6.2f} us/IO  "
                f"member IO/IO {r.get('member_ios_per_io', float('nan')):.2f}  "
                f"other {r['other_cores']:+.2f}" + ("  DISTURBED" if r["disturbed"] else ""))
            if not r["disturbed"]:
                break
        if st is not None and st.get("progress"):
            log(f"  {tag} note: a background operation ran: {st.get('progress')}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        log(f"  {tag} ERROR {e}")
        attempts.append({"error": str(e)})
    finally:
        end_mark = max(log_marks(cell.log), mark)
        cell.stop()
    # The layer's WARN/ERROR lines: at start (a degraded cell's start logs the
    # member it lost on purpose), while measured, and at shutdown.
    warn = {k: log_warnings(cell.log, a, b) for k, (a, b) in {
        "start": (start_mark, mark), "run": (mark, end_mark), "stop": (end_mark, None)}.items()}
    nwarn, sample = warn["run"]
    if nwarn:
        log(f"  {tag} the layer logged {nwarn} WARN/ERROR line(s) while measured, "
            f"e.g. {sample[0][:200]}")
    good = [a for a in attempts if "error" not in a]
    chosen = min(good, key=lambda a: a["other_cores"]) if good else attempts[-1]
    return {"chosen": chosen, "attempts": attempts, "layer_warnings": nwarn,
            "layer_log_warnings": {k: {"count": n, "sample": ls} for k, (n, ls) in warn.items()}}


# --------------------------------------------------------------------------
# Summaries and output


def summarize(passes):
    good = [p["chosen"] for p in passes if "error" not in p["chosen"]]
    if not good:
        return {"error": passes[-1]["chosen"]["error"] if passes else "not run"}
    m = {k: median_of(good, k) for k in (
        "iops", "bytes_per_s", "read_p99_us", "write_p99_us", "layer_us_per_io",
        "nodes_us_per_io", "total_us_per_io", "client_us_per_io", "servers_cores",
        "other_cores", "steal_cores", "member_ios_per_io", "read_frac", "max_lat_ms")}
    ops = {}
    for p in good:
        for op, v in (p.get("member_ops") or {}).items():
            ops.setdefault(op, []).append(v / p["ios"])
    m["member_ops_per_io"] = {op: statistics.median(v) for op, v in ops.items()}
    iops = [p["iops"] for p in good]
    m["iops_spread_pct"] = (max(iops) - min(iops)) / m["iops"] * 100 if m["iops"] else None
    m["max_other_cores"] = max(p["other_cores"] for p in good)
    m["worst_lat_ms"] = max((p["max_lat_ms"] or 0) for p in good)
    m["disturbed_passes"] = sum(p["disturbed"] for p in good)
    m["passes"] = len(good)
    m["errors"] = len(passes) - len(good)
    for k in ("run", "stop"):
        m[f"layer_warnings_{k}"] = sum(p.get("layer_log_warnings", {}).get(k, {}).get("count", 0)
                                       for p in passes)
    return m


def evaluate(ctx, row, summ, configs):
    """Per configuration: ratio to the direct node, the goal and verdict;
    RAID 1 against its quorum peer."""
    base = summ.get("direct", {})
    node_us = base.get("nodes_us_per_io") if "error" not in base else None
    out = {}
    for cfg in configs:
        m = summ.get(cfg.name)
        if m is None or "error" in m:
            continue
        model = row_model(cfg, ctx.chunk, row)
        e = {"model": {d: list(v) for d, v in model.items()}}
        e["k_text"] = " / ".join(f"{d[0]} {k_text(*v)}" for d, v in model.items()) \
            if len(model) > 1 else k_text(*next(iter(model.values())))
        if node_us and m.get("layer_us_per_io") is not None:
            e["layer_vs_node"] = m["layer_us_per_io"] / node_us
        if node_us and m.get("total_us_per_io") is not None:
            e["total_vs_node"] = m["total_us_per_io"] / node_us
        if base and "error" not in base and base.get("iops"):
            e["iops_vs_direct"] = m["iops"] / base["iops"]
        read_frac = m["read_frac"] if m.get("read_frac") is not None else 1.0
        g = goal_for(cfg, model, read_frac)
        if g is not None:
            e["goal"] = g
            if "layer_vs_node" in e:
                e["met"] = e["layer_vs_node"] <= g
        e["disturbed"] = bool(m["disturbed_passes"] or base.get("disturbed_passes"))
        peer = QUORUM_PEER.get(cfg.name)
        q = summ.get(peer) if peer else None
        if q and "error" not in q:
            vs = {"peer": peer, "iops_ratio": m["iops"] / q["iops"] if q["iops"] else None,
                  "iops_goal": "> 1", "cpu_goal": "<= 0.8"}
            vs["iops_met"] = vs["iops_ratio"] is not None and vs["iops_ratio"] > 1.0
            if m.get("layer_us_per_io") and q.get("layer_us_per_io"):
                vs["cpu_ratio"] = m["layer_us_per_io"] / q["layer_us_per_io"]
                vs["cpu_met"] = vs["cpu_ratio"] <= 0.8
            if m.get("total_us_per_io") and q.get("total_us_per_io"):
                vs["total_cpu_ratio"] = m["total_us_per_io"] / q["total_us_per_io"]
            vs["disturbed"] = bool(m["disturbed_passes"] or q["disturbed_passes"])
            e["vs_quorum"] = vs
        out[cfg.name] = e
    return out


def print_row_table(row, summ, ev, configs, passes):
    print(f"\n## {row.name}: {row.desc} (median of {passes} passes)")
    hdr = (f"{'config':<16}{'IOPS':>8}{'spread':>7}{'MB/s':>7}{'p99 us':>12}{'vs direct':>10}"
           f"{'layer':>8}{'nodes':>8}{'total':>8}{'mIO/IO':>8}  {'k (model)':<16}"
           f"{'layer/node':>10}{'goal':>7}  {'verdict':<7}{'other':>7}")
    print(f"{'':<60}{'------ us/IO -----':^24}")
    print(hdr)
    print("-" * len(hdr))
    for cfg in configs:
        m = summ.get(cfg.name)
        if m is None:
            continue
        if "error" in m:
            print(f"{cfg.name:<16}  ERROR: {m['error'].splitlines()[0][:100]}")
            continue
        e = ev.get(cfg.name, {})
        flag = "!" if m["disturbed_passes"] else " "
        sp = f2(m["iops_spread_pct"], "{:.0f}%")
        verdict = "-" if "met" not in e else ("MET" if e["met"] else "MISSED")
        if cfg.name == "direct":
            verdict = "(base)"
        print(f"{cfg.name:<16}{fmt_k(m['iops']):>8}{sp:>7}{m['bytes_per_s'] / 1e6:>7.0f}"
              f"{peers.p99_text(m):>12}{f2(e.get('iops_vs_direct'), 'x{:.2f}'):>10}"
              f"{f2(m['layer_us_per_io']):>8}"
              f"{f2(m['nodes_us_per_io']):>8}{f2(m['total_us_per_io']):>8}"
              f"{f2(m['member_ios_per_io']):>8}  {e.get('k_text', '-'):<16}"
              f"{f2(e.get('layer_vs_node'), 'x{:.2f}'):>10}{f2(e.get('goal'), 'x{:.2f}'):>7}  "
              f"{verdict:<7}{m['max_other_cores']:>6.2f}{flag}")
    for cfg in configs:
        vs = ev.get(cfg.name, {}).get("vs_quorum")
        if not vs:
            continue
        line = (f"  {cfg.name} vs {vs['peer']}: IOPS x{f2(vs['iops_ratio'])} (goal > 1: "
                f"{'MET' if vs['iops_met'] else 'MISSED'})")
        if "cpu_ratio" in vs:
            line += (f"; layer CPU/IO x{vs['cpu_ratio']:.2f} of qemu-storage-daemon's "
                     f"(goal <= 0.8: {'MET' if vs['cpu_met'] else 'MISSED'})")
        if "total_cpu_ratio" in vs:
            line += f"; all servers x{vs['total_cpu_ratio']:.2f}"
        if vs["disturbed"]:
            line += "  [! a compared cell had a disturbed pass]"
        print(line)
    for c in configs:
        m = summ.get(c.name, {})
        extra = {op: v for op, v in (m.get("member_ops_per_io") or {}).items()
                 if op not in ("read", "write") and v >= 0.01}
        if extra:
            print(f"  {c.name}: per I/O the nodes also served "
                  + ", ".join(f"{v:.2f} {op}" for op, v in sorted(extra.items()))
                  + (" (qemu's NBD server asks block status for every structured read, and "
                     "quorum asks each child)" if c.kind == "quorum" and "block_status" in extra
                     else ""))
    notes = []
    for c in configs:
        m = summ.get(c.name, {})
        if m.get("layer_warnings_run") or m.get("layer_warnings_stop"):
            notes.append(f"{c.name} {m['layer_warnings_run']} while measured, "
                         f"{m['layer_warnings_stop']} at shutdown")
    if notes:
        print("  layer WARN/ERROR log lines (all passes): " + "; ".join(notes))


def print_summary(results, configs):
    arrays = [c for c in configs if c.kind == "array" and not c.reads_only]
    vs = [c for c in configs if c.name in QUORUM_PEER
          and any(p.name == QUORUM_PEER[c.name] for p in configs)]
    if not arrays:
        return
    print("\n## Goals: array daemon CPU per I/O / direct node's (goal), MET or MISSED")
    print(f"{'row':<20}" + "".join(f"{c.name:>20}" for c in arrays)
          + "".join(f"{c.name + ' vs ' + QUORUM_PEER[c.name]:>28}" for c in vs))
    met = missed = 0
    for rowname, rr in results.items():
        cells = []
        for c in arrays:
            e = rr["eval"].get(c.name, {})
            if "met" not in e:
                cells.append(f"{'-':>20}")
                continue
            met, missed = met + e["met"], missed + (not e["met"])
            flag = "!" if e["disturbed"] else ""
            t = f"x{e['layer_vs_node']:.2f}/{e['goal']:.2f} {'MET' if e['met'] else 'MISS'}{flag}"
            cells.append(f"{t:>20}")
        for c in vs:
            q = rr["eval"].get(c.name, {}).get("vs_quorum")
            if not q or "cpu_ratio" not in q:
                cells.append(f"{'-':>28}")
                continue
            ok = q["iops_met"] and q["cpu_met"]
            met, missed = met + ok, missed + (not ok)
            flag = "!" if q["disturbed"] else ""
            t = (f"IOPS x{q['iops_ratio']:.2f} CPU x{q['cpu_ratio']:.2f} "
                 f"{'MET' if ok else 'MISS'}{flag}")
            cells.append(f"{t:>28}")
        print(f"{rowname:<20}" + "".join(cells))
    print(f"{met} goals met, {missed} missed")


def environment(ctx):
    env = {"kernel": platform.release(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
           "python": platform.python_version(), "fio": first_line(["fio", "--version"]),
           "qemu-storage-daemon": first_line(["qemu-storage-daemon", "--version"])}
    for b in BINARIES:
        env[b] = first_line([ctx.bins[b], "--version"])
        try:
            with open(ctx.bins[b], "rb") as f:
                env[b] += f" (sha256 {hashlib.sha256(f.read()).hexdigest()[:16]}, from " \
                          f"{ctx.bin_dir}, built " + time.strftime(
                              "%Y-%m-%d %H:%M:%S",
                              time.localtime(os.stat(os.path.join(ctx.bin_dir, b)).st_mtime)) + ")"
        except OSError:
            pass
    if os.path.realpath(ctx.bin_dir).startswith(os.path.realpath(ROOT) + os.sep):
        head, dirty = git_state(ROOT, ["nbd-server", "raid-layer", "client", "proto",
                                       "Cargo.toml", "Cargo.lock"])
        env["repo-head-at-run"] = head + (" + uncommitted changes" if dirty else "")
    return env


# --------------------------------------------------------------------------
# Main


class Ctx:
    """What nodes, cells and measurements read: the settings (defaults here,
    the command line's from make_ctx), the run's work dir and the private
    copies of the binaries (private_binaries)."""

    def __init__(self, **kw):
        self.runtime, self.passes, self.retries = 10.0, 3, 2
        self.quiet_timeout, self.quiet_sample, self.max_other = 120.0, 0.5, 0.15
        self.server_cpus, self.client_cpus = "1", "0"
        self.chunk_spec, self.member_size_spec = "512K", "256M"
        self.node_args, self.array_args = [], []
        self.workdir = self.bin_dir = None
        self.bins = {}
        self.__dict__.update(kw)
        self.chunk = parse_size(self.chunk_spec)
        self.member_size = parse_size(self.member_size_spec)

    def client_pin(self):
        return taskset(self.client_cpus)


def add_common_args(p, runtime=10.0, passes=3, chunk="512K", member_size="256M",
                    workdir="/dev/shm"):
    """The options array.sh shares with the benchmarks built on its cells
    (throttle.sh)."""
    p.add_argument("--bin-dir", required=True,
                   help="directory holding nbdraid-node, nbdraid-array and nbdraid")
    p.add_argument("--passes", type=int, default=passes, help=f"default {passes}")
    p.add_argument("--runtime", type=float, default=runtime,
                   help=f"seconds per pass (default {runtime:g})")
    p.add_argument("--chunk", default=chunk, help=f"array chunk size (default {chunk})")
    p.add_argument("--member-size", default=member_size,
                   help=f"size of every node volume (default {member_size})")
    p.add_argument("--server-cpus", default="1",
                   help="taskset list shared by ALL nodes and the array daemon / qemu "
                        "(default 1; '' = unpinned)")
    p.add_argument("--client-cpus", default="0", help="taskset list for fio (default 0)")
    p.add_argument("--max-other", type=float, default=0.15,
                   help="cores used by others above which a pass is disturbed (default 0.15)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed pass (default 2)")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="max seconds to wait for a quiet machine before a pass (default 120)")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every nbdraid-node (use --node-arg=--flag)")
    p.add_argument("--array-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for nbdraid-array (use --array-arg=--flag)")
    p.add_argument("--workdir", default=workdir, help=f"where the temporary dir goes "
                                                      f"(default {workdir})")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, data)")
    p.add_argument("--json", metavar="FILE", help="write all raw numbers here")


def make_ctx(a):
    """A Ctx from add_common_args' options; exits if a binary is missing."""
    ctx = Ctx(runtime=a.runtime, passes=a.passes, retries=a.retries,
              quiet_timeout=a.quiet_timeout, max_other=a.max_other,
              server_cpus=a.server_cpus, client_cpus=a.client_cpus, chunk_spec=a.chunk,
              member_size_spec=a.member_size, node_args=list(a.node_arg),
              array_args=list(a.array_arg), bin_dir=os.path.abspath(a.bin_dir))
    for b in BINARIES:
        if not os.access(os.path.join(ctx.bin_dir, b), os.X_OK):
            sys.exit(f"{b} not found in {ctx.bin_dir}; run via the .sh script or pass --bin-dir")
    return ctx


def private_binaries(ctx):
    """Copies the binaries into ctx.workdir and points ctx.bins at the
    copies: a rebuild during the run changes nothing under test."""
    ctx.bins = {}
    for b in BINARIES:
        ctx.bins[b] = os.path.join(ctx.workdir, b)
        shutil.copy2(os.path.join(ctx.bin_dir, b), ctx.bins[b])


def in_workdir(ctx, parent, prefix, keep, fn):
    """Runs fn() in a new temporary dir under `parent` (ctx.workdir, with
    logs/ and the private binaries); stops every process started (layers
    before their nodes) and removes the dir (unless `keep`) however fn ends.
    Returns fn's result, or 130 after Ctrl-C or SIGTERM."""
    raise_on_signals()
    ctx.workdir = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        os.makedirs(os.path.join(ctx.workdir, "logs"))
        private_binaries(ctx)
        return fn()
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping everything")
        return 130
    finally:
        for p in reversed(list(Proc.registry)):  # the layer before its nodes
            p.stop(timeout=5)
        Proc.stop_all()
        if keep:
            log(f"kept {ctx.workdir}")
        else:
            shutil.rmtree(ctx.workdir, ignore_errors=True)


def parse_args(argv):
    fio_rows = [r for r in peers.ROWS if r.kind == "fio"]
    p = argparse.ArgumentParser(
        description="nbdraid-array (RAID 0/1/5/6/10, degraded RAID 5) over local nbdraid-node "
                    "volumes against the node served directly and qemu's quorum driver: IOPS, "
                    "MB/s, p99 and CPU per I/O of the array daemon and of the nodes.",
        epilog="array.sh builds the release binaries first unless given --bin-dir or "
               "--no-build. Short check: array.sh --passes 1 --runtime 3 "
               "--rows randread-4k-qd32,randwrite-4k-qd32 --configs raid1,raid5")
    add_common_args(p)
    p.add_argument("--configs", default="all",
                   help="comma list of " + ", ".join(CONFIG_BY_NAME) + " or 'all' (direct, "
                        "the baseline, is always added; 'all' leaves out the -nolog ones)")
    p.add_argument("--rows", default="all", help="comma list of peers.py's fio rows, or 'all' "
                                                 "(see --list-rows)")
    p.add_argument("--list-rows", action="store_true")
    p.add_argument("--list-configs", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 s runtime, 1 pass, no retries, short quiet wait")
    a = p.parse_args(argv)
    if a.list_rows:
        for r in fio_rows:
            print(f"{r.name:<22} {r.desc}")
        sys.exit(0)
    if a.list_configs:
        for c in CONFIGS:
            print(f"{c.name:<16} {c.desc}")
        sys.exit(0)
    if a.quick:
        a.runtime, a.passes, a.retries, a.quiet_timeout = 1.0, 1, 0, 5.0
    return a, fio_rows


def main(argv):
    a, fio_rows = parse_args(argv)
    ctx = make_ctx(a)
    by_name = {r.name: r for r in fio_rows}
    rows = fio_rows if a.rows == "all" else []
    if a.rows != "all":
        for n in a.rows.split(","):
            if n not in by_name:
                sys.exit(f"unknown row {n!r}; rows: {', '.join(by_name)}")
            rows.append(by_name[n])
    # The log-off configurations measure one setting's cost: asked for by name.
    names = [n for n in CONFIG_BY_NAME if not n.endswith("-nolog")] if a.configs == "all" else \
        [n.strip() for n in a.configs.split(",") if n.strip()]
    for n in names:
        if n not in CONFIG_BY_NAME:
            sys.exit(f"unknown config {n!r}; configs: {', '.join(CONFIG_BY_NAME)}")
    if "direct" not in names:
        names.insert(0, "direct")
    configs = [c for c in CONFIGS if c.name in names]
    if any(c.kind == "quorum" for c in configs) and not shutil.which("qemu-storage-daemon"):
        sys.exit("qemu-storage-daemon not found (package qemu-utils)")
    need = sum(c.members for c in configs) * ctx.member_size
    free = shutil.disk_usage(a.workdir).free
    if need > free * 0.9:
        sys.exit(f"the volumes need {need >> 20} MiB in {a.workdir}, {free >> 20} MiB free: "
                 "use fewer --configs or a smaller --member-size")
    return in_workdir(ctx, a.workdir, "nbdraid-array-bench.", a.keep,
                      lambda: run(a, argv, ctx, rows, configs))


def run(a, argv, ctx, rows, configs):
    results = {}
    config = {
        "argv": argv, "configs": [c.name for c in configs], "rows": [r.name for r in rows],
        "passes": ctx.passes, "runtime_s": ctx.runtime, "chunk": ctx.chunk,
        "member_size": ctx.member_size, "server_cpus": ctx.server_cpus,
        "client_cpus": ctx.client_cpus, "max_other_cores": ctx.max_other,
        "retries": ctx.retries, "node_args": ctx.node_args, "array_args": ctx.array_args,
        "fio_commands": {r.name: peers.fio_cmd(ctx, r, "URI", "OUT") for r in rows},
        "config_desc": {c.name: c.desc for c in configs},
    }
    env = environment(ctx)
    try:
        print("# nbdraid array benchmark")
        print("command: " + command_line(argv, "ARRAY_SH_CMD"))
        for k, v in env.items():
            print(f"{k:>26}: {v}")
        print(f"{'settings':>26}: {ctx.passes} passes x {ctx.runtime:g}s, chunk {ctx.chunk_spec}, "
              f"every volume {ctx.member_size_spec} on {a.workdir} ({fs_type(a.workdir)}), "
              f"disturbed above {ctx.max_other} cores of other load, {ctx.retries} retries")
        print(f"{'pinning':>26}: ALL servers of a cell (its nodes AND the array daemon or "
              f"qemu-storage-daemon) share CPU(s) {ctx.server_cpus or 'any'}; "
              f"fio on CPU(s) {ctx.client_cpus or 'any'}")
        for c in configs:
            print(f"{'config ' + c.name:>26}: {c.desc}")
        sys.stdout.flush()
        log("preparing volumes (nothing is timed here)")
        sizes = {}
        for c in configs:
            sizes[c.name] = prepare(ctx, c)
        config["array_sizes"] = sizes
        t_start = time.monotonic()
        for row in rows:
            log(f"row {row.name}: {row.desc}")
            row_cfgs = [c for c in configs if not c.reads_only or is_read_row(row)]
            cells = {c.name: [] for c in row_cfgs}
            for pass_no in range(ctx.passes):
                k = pass_no % len(row_cfgs)
                for cfg in row_cfgs[k:] + row_cfgs[:k]:
                    cells[cfg.name].append(run_cell(ctx, row, cfg, pass_no))
            summ = {n: summarize(c) for n, c in cells.items()}
            ev = evaluate(ctx, row, summ, row_cfgs)
            results[row.name] = {"desc": row.desc, "summary": summ, "eval": ev, "passes": cells}
            print_row_table(row, summ, ev, row_cfgs, ctx.passes)
            sys.stdout.flush()
        print_summary(results, configs)
        print("\nColumns: IOPS, MB/s (10^6 bytes/s), p99 (fio completion latency, us; read/write "
              "for mixed rows) are medians over passes; spread = (max-min)/median of IOPS; vs direct "
              "= IOPS over the direct node's. "
              "us/IO = CPU time from /proc per I/O fio completed: layer = the array daemon "
              "(qemu-storage-daemon for quorum), nodes = all nodes of the configuration summed, "
              "total = both. mIO/IO = member requests the nodes counted per array I/O "
              "(includes bitmap and superblock writes); k (model) = member I/Os the daemon's "
              "plans issue per array I/O, r/w for mixed rows; layer/node = layer us/IO over the "
              "direct node's us/IO on the same row; goal = 1.5 for reads, 0.5 + 0.5 k for "
              "writes, weighted by the I/O mix for mixed rows; other = largest CPU (cores) used "
              "by everything else during a kept pass, '!' = still disturbed. IOPS against the "
              "direct node are reported, not targeted (2 shared cores).")
        print(f"total time {time.monotonic() - t_start:.0f}s")
    finally:
        if a.json:  # also what an interrupted run measured so far
            write_raw_json(a.json, {"environment": env, "config": config, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
