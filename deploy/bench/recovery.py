#!/usr/bin/env python3
"""Recovery benchmark (issue 11): the RAID layer's rebuild and resync, side by
side in one run, on RAID 5 over 4 local nbdraid-node volumes served by
nbdraid-array (chunk --chunk, volumes --member-size on --workdir), a fifth
node holding the replacement volumes.  Three measurements, each --passes
times (medians reported):

1. rebuild   Rebuild throughput vs one member's sequential writes.  The
             member's own figure: fio --ioengine=nbd, 1 MiB sequential
             writes, QD8, --runtime seconds, to a spare volume of the same
             size on the fifth node, directly.  The rebuild: `nbdraid array
             replace r5 --member 3 --with <fresh volume on the fifth node>`,
             timed from the command until `nbdraid array status --json`
             shows member 3 active and no sync running (polled every
             --poll-ms).  Rebuild MB/s = member data size / seconds, and its
             ratio to the member's fio MB/s.
2. resync    A resync of ~--dirty-pct % of the bitmap regions vs the full
             rebuild.  Member 2's node is killed (SIGKILL by PID), one
             1 MiB write per chosen region goes through the array (qemu-io,
             regions spread evenly), the node is restarted (same data dir,
             same port, same arguments), `nbdraid array re-add r5 2`
             (the daemon may have re-added it on its own already: both are
             fine) and timed until member 2 is active and no sync runs.
             Bytes copied and the daemon's own duration come from its log
             line `recovery finished: member in sync ... copied= secs=`;
             compared with the full rebuild's.
3. latency   4 KiB random reads (fio, QD --lat-iodepth, --lat-runtime s)
             against the array, idle and while a replace-rebuild runs at
             the daemon's default rate (sync-rate 0 = unlimited): the
             replace is started, then fio at once.  p50/p99 from fio's JSON
             (clat_ns percentiles, the whole run), and, because a rebuild
             may end before fio does, also over the I/Os completed while
             the rebuild ran against those of the same first seconds of the
             idle run (both from fio's per-I/O latency logs).  The end of
             that rebuild is watched in the daemon's log (no status polling
             beside the reads).

Setup (nothing timed): the array is created over blank members and written
whole once through the daemon (arraybench.prepare), so a rebuild copies real
data; the fifth node's volumes (the fio target and two replacement volumes)
are created and filled in place with random data, so neither fio nor a
rebuild pays for first-touch tmpfs pages.  Then the four nodes, the fifth
and the array daemon start once and stay up for all passes.  Member 3 moves
to the replacement volume it is not on at every replace; one that was a
member before first gets its superblock area overwritten (qemu-io through
node 4, not timed), so the daemon takes it as a fresh volume.

Pinning as array.sh: every daemon (the array daemon and all five nodes) on
--server-cpus (default CPU 1), fio, qemu-io and the status CLI on
--client-cpus (default 0).  So a rebuild (array daemon + 4 nodes) runs on
one core while the member's fio write has a core for the node and one for
fio: the servers' CPU during each is reported next to the figures.  Other
load (/proc/stat busy time minus our processes) is reported per
measurement; above --max-other cores it is marked '!'.

Every process is started here and stopped by PID (the array daemon before
the nodes), on success, error, Ctrl-C or SIGTERM, every wait bounded.
Standard library only; helpers from benchlib.py, nodes and the array cell
from arraybench.py.

    deploy/bench/recovery.sh --quick                      # smoke test
    deploy/bench/recovery.sh --json /tmp/recovery.json    # full run
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

from benchlib import (CLK_TCK, MIB, Proc, busy_cores, command_line, fill_random, fio_nbd_cmd,
                      fio_stats, first_line, log, log_tail, median, read_fio_job, run_child,
                      run_fio_json, start_with_ready_file, sys_cpu, taskset, tree_cpu_ticks,
                      wait_quiet, write_raw_json)
import arraybench as ab

ARRAY = "r5"
REPLACED = 3  # the slot replace rebuilds (parts rebuild and latency)
KILLED = 2  # the slot whose node dies and is re-added (part resync)
PARTS = ("rebuild", "resync", "latency")
FINISHED = "recovery finished: member in sync"
WIPE = 1 << 20  # overwritten to reuse a replacement volume (superblocks: the first 64 KiB)
EXPECTED_WARNINGS = ("reason=replace",)  # a replace fails the old member out on purpose


# --------------------------------------------------------------------------
# Processes


class BenchNode(ab.Node):
    """arraybench's node, serving one or more volumes, restartable on the port
    it had (the array names its members by URI, port included)."""

    def __init__(self, ctx, cfg, i, volumes=None):
        super().__init__(ctx, cfg, i)
        self.volumes = volumes or [self.volume]

    def uri_of(self, volume):
        return f"nbd://127.0.0.1:{self.port}/{volume}"

    def backing_of(self, volume):
        return os.path.join(self.dir, "volumes", f"{volume}.img")

    def start(self, prefix=()):
        """Starts the node; on its old port when it had one (a restart)."""
        os.makedirs(self.dir, exist_ok=True)
        ready = os.path.join(self.dir, "ready.json")
        vols = [x for v in self.volumes for x in ("--volume", f"{v}:{self.ctx.member_size_spec}")]
        cmd = list(prefix) + taskset(self.ctx.server_cpus) + [
            self.ctx.bins["nbdraid-node"], "--listen", f"127.0.0.1:{self.port or 0}",
            "--metrics-listen", "127.0.0.1:0", "--data-dir", self.dir] + vols + [
            "--ready-file", ready] + self.ctx.node_args
        deadline = time.monotonic() + 20
        while True:
            try:
                self.proc, info = start_with_ready_file(cmd, ready, self.log)
                break
            except RuntimeError as e:
                # The old port may still be held for a moment after a kill.
                if not self.port or time.monotonic() > deadline:
                    raise
                log(f"  node{self.i}: restart on port {self.port} failed ({str(e)[:120]}); "
                    "retrying")
                time.sleep(0.5)
        port = int(info["nbd"].rsplit(":", 1)[1])
        if self.port and port != self.port:
            raise RuntimeError(f"node{self.i} came back on port {port}, not {self.port}")
        self.port, self.metrics, self.grpc = port, info.get("metrics"), info.get("grpc")


def my_cpu():
    """This script's CPU and its reaped children's (fio, qemu-io, the CLI)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Stack:
    """The running array: its cell (array daemon + nodes 0-3) and node 4,
    which holds the fio target and the fresh replacement volumes."""

    def __init__(self, a, ctx, cfg):
        self.a, self.ctx, self.cfg = a, ctx, cfg
        self.cell = ab.Cell(ctx, cfg)
        self.cell.nodes = [BenchNode(ctx, cfg, i) for i in range(cfg.members)]
        self.targets = ["t1", "t2"]
        self.spare = BenchNode(ctx, cfg, cfg.members, ["wbench"] + self.targets)
        self.member3 = None  # the target member 3 is on now
        self.used = set()  # targets that held member 3 once

    # -- life cycle

    def prepare_spare(self):
        """Creates node 4's volumes and fills them in place (node stopped)."""
        t = time.monotonic()
        self.spare.start()
        self.spare.stop()
        for v in self.spare.volumes:
            path = self.spare.backing_of(v)
            if os.path.getsize(path) != self.ctx.member_size:
                raise RuntimeError(f"{path} is {os.path.getsize(path)} bytes, want "
                                   f"{self.ctx.member_size}")
            fill_random(path, self.ctx.member_size)
        self.spare.port = None  # a fresh port when it starts for real
        log(f"  node4: {len(self.spare.volumes)} volumes of {self.ctx.member_size_spec} "
            f"filled with random data in {time.monotonic() - t:.1f}s")

    def start(self):
        self.spare.start()
        self.size = self.cell.start()
        st = self.status()
        if "error" in st:
            raise RuntimeError(f"array status: {st['error']}")
        self.geometry = {k: st.get(k) for k in (
            "level", "layout", "chunk", "size", "member_size", "bitmap_region", "sync_rate")}
        self.geometry["members"] = len(st.get("members", []))
        return st

    def stop(self):
        self.cell.stop()  # the array daemon first, then its nodes
        self.spare.stop()

    def next_target(self):
        """The replacement volume that is not member 3 now; one that was a
        member before gets its superblock area overwritten first (through
        node 4, not timed), so the daemon takes it as a fresh volume."""
        target = next(t for t in self.targets if t != self.member3)
        if target in self.used:
            cmd = self.ctx.client_pin() + ["qemu-io", "-f", "raw", "-c",
                                           f"write -P 0 0 {WIPE}", self.spare.uri_of(target)]
            rc, _, text = run_child(cmd, 120)
            if rc != 0 or "wrote " not in text:
                raise RuntimeError(f"cannot wipe node4/{target} (exit {rc}): {text[-300:]}")
        self.used.add(target)
        self.member3 = target
        return target

    def check_running(self):
        self.cell.check_running()
        if self.spare.proc is not None and not self.spare.proc.running():
            raise RuntimeError(f"node4 died: {log_tail(self.spare.log, 8)}")

    # -- the CLI

    def cli(self, *args, timeout=60):
        cmd = taskset(self.ctx.client_cpus) + [self.ctx.bins["nbdraid"], "array"] + list(args) + [
            "--array", self.cell.grpc]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, f"timed out after {timeout}s"
        return r.returncode, (r.stdout + r.stderr).strip()

    def status(self):
        rc, out = self.cli("status", ARRAY, "--json", timeout=15)
        if rc != 0:
            return {"error": out[:300]}
        try:
            return json.loads(out)
        except ValueError as e:
            return {"error": f"{e}: {out[:200]}"}

    @staticmethod
    def member(st, slot):
        for m in st.get("members", []):
            if m.get("slot") == slot:
                return m
        return {}

    def wait_in_sync(self, slot, timeout, what):
        """Polls status until member `slot` is active and no sync runs;
        returns (monotonic time of the poll that saw it, that status)."""
        deadline = time.monotonic() + timeout
        errors, last = 0, {}
        while True:
            st = self.status()
            now = time.monotonic()
            if "error" in st:
                errors += 1
                if errors > 20:
                    raise RuntimeError(f"{what}: array status keeps failing: {st['error']}")
            else:
                last = st
                state = self.member(st, slot).get("state")
                if state == "active" and st.get("sync") is None:
                    return now, st
                if state in ("faulty", "missing"):
                    raise RuntimeError(f"{what}: member {slot} is {state}: "
                                       f"{log_tail(self.cell.log, 5)}")
            if now > deadline:
                raise RuntimeError(f"{what}: not done after {timeout:.0f}s: "
                                   f"{json.dumps(last.get('sync'))}")
            self.check_running()
            time.sleep(self.a.poll_ms / 1000)

    def wait_bitmap_clean(self, timeout=60):
        """Waits (bounded) until no bitmap region is dirty; returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            dirty = st.get("bitmap_dirty")
            if dirty == 0 and st.get("sync") is None:
                return 0
            if time.monotonic() > deadline:
                log(f"  {dirty} bitmap region(s) still dirty after {timeout}s; going on")
                return dirty
            time.sleep(0.25)

    # -- the daemon's log

    def log_mark(self):
        return ab.log_marks(self.cell.log)

    def finished_line(self, mark, slot):
        """The key=value fields of the first `recovery finished` line for
        member `slot` logged after byte offset `mark` (None if none yet)."""
        try:
            with open(self.cell.log, "rb") as f:
                f.seek(mark)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in text.splitlines():
            if FINISHED in line:
                fields = dict(t.split("=", 1) for t in line.split() if "=" in t)
                if fields.get("member") == str(slot):
                    return fields
        return None

    def wait_finished_line(self, mark, slot, timeout=10):
        deadline = time.monotonic() + timeout
        while (f := self.finished_line(mark, slot)) is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return f

    def log_errors(self, mark):
        """WARN/ERROR lines logged since `mark`, the expected ones left out."""
        _, lines = ab.log_warnings(self.cell.log, mark, limit=10 ** 6)
        lines = [ln for ln in lines if not any(x in ln for x in EXPECTED_WARNINGS)]
        return {"count": len(lines), "sample": lines[:3]}

    # -- CPU accounting over a window

    def server_ticks(self):
        layer, nodes = self.cell.cpu_ticks()
        spare = tree_cpu_ticks(self.spare.proc.pid) if self.spare.proc else 0
        return layer, nodes + spare

    def window(self):
        return (sys_cpu(), self.server_ticks(), my_cpu())

    def window_end(self, w0):
        sys0, (l0, n0), me0 = w0
        sys1, (l1, n1), me1 = sys_cpu(), self.server_ticks(), my_cpu()
        wall = sys1[0] - sys0[0]
        layer_s, nodes_s = (l1 - l0) / CLK_TCK, (n1 - n0) / CLK_TCK
        busy = busy_cores(sys0, sys1)["cpu"]
        other = (busy * wall - layer_s - nodes_s - (me1 - me0)) / wall if wall > 0 else 0.0
        return {"wall_s": wall, "layer_cores": layer_s / wall if wall else 0.0,
                "nodes_cores": nodes_s / wall if wall else 0.0, "other_cores": other,
                "disturbed": other > self.ctx.max_other}


# --------------------------------------------------------------------------
# Measurements


def member_write(a, ctx, stack):
    """fio 1 MiB sequential writes, QD8, to node 4's spare volume directly."""
    wait_quiet(ctx)
    out = os.path.join(ctx.workdir, "member-write.json")
    cmd = ctx.client_pin() + fio_nbd_cmd("member-write", stack.spare.uri_of("wbench"), out,
                                         ctx.runtime, "write", "1M", 8)
    w0 = stack.window()
    job, fio_cpu, _ = run_fio_json(cmd, out, ctx.runtime + 120)
    r = stack.window_end(w0)
    s = fio_stats(job)["write"]
    r.update(mb_s=s["bytes_per_s"] / 1e6, iops=s["iops"], p99_us=s["p99_us"],
             fio_cores=fio_cpu / r["wall_s"])
    log(f"  member write (fio 1M QD8, node 4 directly): {r['mb_s']:.0f} MB/s, node "
        f"{r['nodes_cores']:.2f} cores, fio {r['fio_cores']:.2f}, other {r['other_cores']:+.2f}")
    return r


def replace(stack, target):
    """Starts `replace r5 --member 3 --with target`; returns (t_cmd, t_return)."""
    uri = stack.spare.uri_of(target)
    t_cmd = time.monotonic()
    rc, out = stack.cli("replace", ARRAY, "--member", str(REPLACED), "--with", uri)
    t_ret = time.monotonic()
    if rc != 0:
        raise RuntimeError(f"nbdraid array replace failed ({rc}): {out[:300]}")
    return t_cmd, t_ret


def rebuild(a, ctx, stack):
    """A full rebuild of member 3 onto a fresh volume, timed by status polls."""
    target = stack.next_target()
    wait_quiet(ctx)
    mark = stack.log_mark()
    w0 = stack.window()
    t_cmd, t_ret = replace(stack, target)
    t_done, st = stack.wait_in_sync(REPLACED, a.rebuild_timeout, "rebuild")
    r = stack.window_end(w0)
    fields = stack.wait_finished_line(mark, REPLACED) or {}
    size = stack.geometry["member_size"]
    secs = t_done - t_cmd
    r.update(target=target, member_data_bytes=size, secs=secs, replace_cmd_s=t_ret - t_cmd,
             mb_s=size / secs / 1e6, copied=int(fields["copied"]) if "copied" in fields else None,
             daemon_secs=float(fields["secs"]) if "secs" in fields else None,
             array_state=st.get("state"), log_errors=stack.log_errors(mark))
    if r["daemon_secs"]:
        r["daemon_mb_s"] = size / r["daemon_secs"] / 1e6
    log(f"  rebuild of member 3 onto node4/{target}: {secs:.2f}s ({r['mb_s']:.0f} MB/s; the "
        f"daemon says {r['daemon_secs']}s, copied {r['copied']}); array daemon "
        f"{r['layer_cores']:.2f} cores, nodes {r['nodes_cores']:.2f}, other "
        f"{r['other_cores']:+.2f}")
    return r


def dirty_writes(stack, pct):
    """[(array offset, length)]: one write of up to 1 MiB inside each of
    ~pct % of the bitmap regions, spread evenly (RAID 5: stripe s holds
    member rows s*chunk .. (s+1)*chunk on every member)."""
    g = stack.geometry
    region, chunk, size = g["bitmap_region"], g["chunk"], g["size"]
    data = g["members"] - 1
    total = -(-g["member_size"] // region)
    full = max(1, g["member_size"] // region)  # regions wholly inside the member data
    n = min(full, max(1, round(total * pct / 100)))
    regions = sorted({int((k + 0.5) * full / n) for k in range(n)})
    out = []
    for r in regions:
        row = r * region
        if region % chunk == 0:
            off, length = row * data, min(MIB, region * data)
        else:  # a chunk holds several regions: stay inside this one
            off, length = (row // chunk) * data * chunk + row % chunk, min(MIB, region)
        length = min(length, size - off)
        if length > 0:
            out.append((off, length))
    return regions, total, out


def resync(a, ctx, stack, pass_no):
    """Member 2's node killed, ~pct % of the regions written, node back,
    re-added: the resync of the dirty regions."""
    node = stack.cell.nodes[KILLED]
    r = {}
    r["dirty_before"] = stack.wait_bitmap_clean()
    wait_quiet(ctx)
    t_kill = time.monotonic()
    stack.cell._fail_member(KILLED)  # SIGKILL by PID, waits until the array fails it
    st = stack.status()
    r["failed_state"] = stack.member(st, KILLED).get("state")
    r["fail_detect_s"] = time.monotonic() - t_kill
    regions, total, writes = dirty_writes(stack, a.dirty_pct)
    cmd = ctx.client_pin() + ["qemu-io", "-f", "raw"]
    for off, length in writes:
        cmd += ["-c", f"write -P 0x{0x5a + pass_no:02x} {off} {length}"]
    cmd.append(stack.cell.uri)
    rc, _, text = run_child(cmd, 300)
    wrote = text.count("wrote ")
    if rc != 0 or wrote != len(writes):
        raise RuntimeError(f"qemu-io wrote {wrote} of {len(writes)} (exit {rc}): {text[-300:]}")
    st = stack.status()
    r.update(regions_total=total, regions_written=len(regions),
             bytes_written=sum(x for _, x in writes), bitmap_dirty=st.get("bitmap_dirty"),
             bitmap_region=stack.geometry["bitmap_region"])
    log(f"  node{KILLED} killed, member {KILLED} {r['failed_state']} after "
        f"{r['fail_detect_s']:.1f}s; wrote {len(writes)} x 1 MiB through the array into "
        f"{len(regions)} of {total} regions; the bitmap shows {r['bitmap_dirty']} dirty")
    mark = stack.log_mark()
    node.start(stack.cell.prefix)  # same data dir, same port, same arguments
    stack.cell.killed.remove(node)
    w0 = stack.window()
    t_cmd = time.monotonic()
    how, deadline = None, t_cmd + 30
    while how is None:
        rc, out = stack.cli("re-add", ARRAY, str(KILLED))
        if rc == 0:
            how = "re-add"
            break
        state = stack.member(stack.status(), KILLED).get("state")
        if state in ("recovering", "active"):
            how = "automatic"  # the daemon re-added it on its own first
        elif time.monotonic() > deadline:
            raise RuntimeError(f"re-add failed ({rc}), member {KILLED} {state}: {out[:300]}")
        else:
            time.sleep(0.2)
    t_done, st = stack.wait_in_sync(KILLED, a.rebuild_timeout, "resync")
    r.update(stack.window_end(w0))
    fields = stack.wait_finished_line(mark, KILLED) or {}
    r.update(readd=how, secs=t_done - t_cmd,
             copied=int(fields["copied"]) if "copied" in fields else None,
             daemon_secs=float(fields["secs"]) if "secs" in fields else None,
             log_errors=stack.log_errors(mark))
    if how == "automatic":
        r["readd_note"] = "the daemon re-added the member before the command: time from the command"
    log(f"  resync of member {KILLED} ({how}): {r['secs']:.2f}s by status polls, the daemon says "
        f"{r['daemon_secs']}s, copied {r['copied']} bytes")
    return r


def lat_log_stats(path, until_ms=None):
    """{ios, p50_us, p99_us} of fio's per-I/O completion latency log (lines
    `msec, nsec, dir, bs, offset, ...`), I/Os completed up to until_ms only."""
    vals = []
    with open(path) as f:
        for line in f:
            p = line.split(",")
            if len(p) < 2:
                continue
            if until_ms is not None and int(p[0]) > until_ms:
                continue
            vals.append(int(p[1]))
    if not vals:
        return {"ios": 0, "p50_us": None, "p99_us": None}
    vals.sort()

    def q(x):
        return vals[min(len(vals) - 1, max(0, math.ceil(x * len(vals)) - 1))] / 1e3

    return {"ios": len(vals), "p50_us": q(0.50), "p99_us": q(0.99)}


def fio_reads(a, ctx, stack, tag):
    """The probe's fio command and paths (JSON and latency log prefix)."""
    out = os.path.join(ctx.workdir, f"lat-{tag}.json")
    prefix = os.path.join(ctx.workdir, f"lat-{tag}")
    for p in (out, f"{prefix}_clat.1.log", f"{prefix}_lat.1.log", f"{prefix}_slat.1.log"):
        if os.path.exists(p):
            os.unlink(p)
    cmd = ctx.client_pin() + fio_nbd_cmd(
        f"reads-{tag}", stack.cell.uri, out, a.lat_runtime, "randread", "4k", a.lat_iodepth,
        extra=[f"--write_lat_log={prefix}", "--log_avg_msec=0"])
    return cmd, out, f"{prefix}_clat.1.log"


def read_stats(out):
    job = read_fio_job(out)
    if job.get("error"):
        raise RuntimeError(f"fio error {job['error']}")
    s = fio_stats(job)["read"]
    return {"iops": s["iops"], "p50_us": s["p50_us"], "p99_us": s["p99_us"],
            "max_us": s["max_us"]}


def latency(a, ctx, stack):
    """4 KiB random reads idle, then while a replace-rebuild runs."""
    r = {}
    wait_quiet(ctx)
    cmd, out, clat = fio_reads(a, ctx, stack, "idle")
    w0 = stack.window()
    run_fio_json(cmd, out, a.lat_runtime + 120)
    r["idle"] = stack.window_end(w0)
    r["idle"].update(read_stats(out), log=lat_log_stats(clat))
    idle_clat = clat
    log(f"  reads idle: {r['idle']['iops']:.0f} IOPS, p50 {r['idle']['p50_us']:.0f} us, p99 "
        f"{r['idle']['p99_us']:.0f} us")

    target = stack.next_target()
    wait_quiet(ctx)
    cmd, out, clat = fio_reads(a, ctx, stack, "rebuild")
    mark = stack.log_mark()
    w0 = stack.window()
    t_cmd, t_ret = replace(stack, target)
    t_fio = time.monotonic()
    fio = Proc(cmd, os.path.join(ctx.workdir, "logs", "fio-lat.log"))
    # The end of the rebuild from the daemon's log: no CLI beside the reads.
    deadline = t_fio + max(a.lat_runtime, 0) + a.rebuild_timeout
    fields, t_end = None, None
    fio_deadline = t_fio + a.lat_runtime + 120
    while True:
        now = time.monotonic()
        if fields is None:
            fields = stack.finished_line(mark, REPLACED)
            if fields is not None:
                t_end = now
        fio_running = fio.running()
        if fields is not None and not fio_running:
            break
        if fio_running and now > fio_deadline:
            raise RuntimeError(f"fio still running {a.lat_runtime + 120:.0f}s after its start")
        if now > deadline:
            raise RuntimeError(f"the rebuild did not finish within {a.rebuild_timeout:.0f}s "
                               "after fio")
        stack.check_running()
        time.sleep(0.02)
    fio.stop()
    rw = stack.window_end(w0)
    if fio.popen.returncode != 0:
        raise RuntimeError(f"fio exit {fio.popen.returncode}: "
                           f"{log_tail(os.path.join(ctx.workdir, 'logs', 'fio-lat.log'), 5)}")
    _, st = stack.wait_in_sync(REPLACED, 60, "rebuild under reads")
    rb = {"target": target, "secs": t_end - t_cmd, "daemon_secs": float(fields["secs"]),
          "copied": int(fields["copied"]), "sync_rate": st.get("sync_rate"),
          "log_errors": stack.log_errors(mark)}
    # The rebuild ran from before fio's start until about t_cmd + its secs.
    rb["end_in_fio_s"] = t_ret + rb["daemon_secs"] - t_fio
    rb["covered_fio"] = rb["end_in_fio_s"] >= a.lat_runtime
    rb["mb_s"] = stack.geometry["member_size"] / rb["daemon_secs"] / 1e6
    r["rebuild"] = rb
    d = rw
    d.update(read_stats(out), log=lat_log_stats(clat))
    if not rb["covered_fio"]:
        until = rb["end_in_fio_s"] * 1000
        d["window"] = lat_log_stats(clat, until_ms=until)
        r["idle"]["window"] = lat_log_stats(idle_clat, until_ms=until)
    if not a.keep:
        os.unlink(clat)
        os.unlink(idle_clat)
    r["during"] = d
    log(f"  reads during the rebuild onto node4/{target}: {d['iops']:.0f} IOPS, p50 "
        f"{d['p50_us']:.0f} us, p99 {d['p99_us']:.0f} us (whole run); the rebuild took "
        f"{rb['daemon_secs']:.2f}s" + ("" if rb["covered_fio"] else
                                       f", ended {rb['end_in_fio_s']:.1f}s into the "
                                       f"{a.lat_runtime:g}s fio run; over those "
                                       f"{d['window']['ios']} reads p50 "
                                       f"{d['window']['p50_us']:.0f} us, p99 "
                                       f"{d['window']['p99_us']:.0f} us"))
    # The comparison: the during-rebuild reads against the idle run, both
    # from fio's JSON when the rebuild covered the run, else both from the
    # latency logs over the same first seconds of each run.
    if rb["covered_fio"]:
        r["p99_ratio"] = d["p99_us"] / r["idle"]["p99_us"] if r["idle"]["p99_us"] else None
        r["p50_ratio"] = d["p50_us"] / r["idle"]["p50_us"] if r["idle"]["p50_us"] else None
        r["ratio_from"] = "fio JSON, whole runs"
    else:
        w, i = d["window"], r["idle"]["window"]
        r["p99_ratio"] = w["p99_us"] / i["p99_us"] if w["p99_us"] and i["p99_us"] else None
        r["p50_ratio"] = w["p50_us"] / i["p50_us"] if w["p50_us"] and i["p50_us"] else None
        r["ratio_from"] = "latency logs, the rebuild's window vs the same seconds of the idle run"
    return r


# --------------------------------------------------------------------------
# Output


def get(d, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ratio(x, y):
    return x / y if x is not None and y else None


def fmt(v, spec):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return spec.format(v)


def table(title, rows, passes, notes=()):
    """rows: (label, [value per pass], format, median or None)."""
    w = 46
    print(f"\n## {title}")
    c = 14
    hdr = f"{'':<{w}}" + "".join(f"{'pass ' + str(k + 1):>{c}}" for k in range(len(passes)))
    hdr += f"{'median':>{c}}"
    print(hdr)
    print("-" * len(hdr))
    for label, vals, spec, m in rows:
        print(f"{label:<{w}}" + "".join(f"{fmt(v, spec):>{c}}" for v in vals)
              + f"{fmt(m, spec):>{c}}")
    for n in notes:
        print(f"  {n}")


def mib(x):
    return None if x is None else x / MIB


def summarize_and_print(a, stack, passes):
    """Prints the three tables; returns the medians."""
    g = stack.geometry
    s = {}
    col = {p: [r.get(p, {}) for r in passes] for p in PARTS}

    def flag(rs, key="disturbed"):
        return ["!" if (x or {}).get(key) else "" for x in rs]

    if "rebuild" in a.parts:
        mw = [r.get("member_write") for r in passes]
        rb = col["rebuild"]
        ratios = [ratio(get(b, "mb_s"), get(m, "mb_s")) for b, m in zip(rb, mw)]
        s["member_write_mb_s"] = median([get(m, "mb_s") for m in mw])
        s["rebuild_mb_s"] = median([get(b, "mb_s") for b in rb])
        s["rebuild_vs_member_write"] = median(ratios)
        s["rebuild_s"] = median([get(b, "secs") for b in rb])
        s["rebuild_daemon_s"] = median([get(b, "daemon_secs") for b in rb])
        s["rebuild_copied"] = median([get(b, "copied") for b in rb])
        rows = [
            ("member write, fio 1M seq QD8, MB/s", [get(m, "mb_s") for m in mw], "{:.0f}",
             s["member_write_mb_s"]),
            ("rebuild (replace member 3), MB/s", [get(b, "mb_s") for b in rb], "{:.0f}",
             s["rebuild_mb_s"]),
            ("rebuild / member write", ratios, "x{:.2f}", s["rebuild_vs_member_write"]),
            ("rebuild s (command -> active, no sync)", [get(b, "secs") for b in rb], "{:.2f}",
             s["rebuild_s"]),
            ("rebuild s (the daemon's log)", [get(b, "daemon_secs") for b in rb], "{:.2f}",
             s["rebuild_daemon_s"]),
            ("  of which the replace command took, s", [get(b, "replace_cmd_s") for b in rb],
             "{:.3f}", median([get(b, "replace_cmd_s") for b in rb])),
            ("rebuild MB/s by the daemon's secs", [get(b, "daemon_mb_s") for b in rb], "{:.0f}",
             median([get(b, "daemon_mb_s") for b in rb])),
            ("rebuild copied MiB (member data)", [mib(get(b, "copied")) for b in rb], "{:.1f}",
             mib(s["rebuild_copied"])),
            ("during member write: node, fio cores",
             [f"{get(m, 'nodes_cores') or 0:.2f},{get(m, 'fio_cores') or 0:.2f}" for m in mw],
             "{}", None),
            ("during rebuild: array daemon, nodes cores",
             [f"{get(b, 'layer_cores') or 0:.2f},{get(b, 'nodes_cores') or 0:.2f}" for b in rb],
             "{}", None),
            ("other load, cores (write / rebuild)",
             [f"{get(m, 'other_cores') or 0:.2f}{f1}/{get(b, 'other_cores') or 0:.2f}{f2}"
              for m, b, f1, f2 in zip(mw, rb, flag(mw), flag(rb))], "{}", None),
        ]
        table(f"1. rebuild vs one member's sequential writes (member data "
              f"{g['member_size'] / MIB:.1f} MiB)", rows, passes,
              [f"pinning: every daemon on CPU(s) {stack.ctx.server_cpus or 'any'}, fio and "
               f"the CLI on {stack.ctx.client_cpus or 'any'}: the rebuild's array daemon and "
               "nodes share the server core(s); '!' = other load above "
               f"{stack.ctx.max_other} cores"])

    if "resync" in a.parts:
        rs = col["resync"]
        rb = col["rebuild"] if "rebuild" in a.parts else [{} for _ in passes]
        t_ratio = [ratio(get(x, "daemon_secs"), get(b, "daemon_secs")) for x, b in zip(rs, rb)]
        w_ratio = [ratio(get(x, "secs"), get(b, "secs")) for x, b in zip(rs, rb)]
        b_ratio = [ratio(get(x, "copied"), get(b, "copied")) for x, b in zip(rs, rb)]
        s.update(resync_s=median([get(x, "secs") for x in rs]),
                 resync_daemon_s=median([get(x, "daemon_secs") for x in rs]),
                 resync_copied=median([get(x, "copied") for x in rs]),
                 resync_vs_rebuild_time=median(t_ratio), resync_vs_rebuild_wall=median(w_ratio),
                 resync_vs_rebuild_bytes=median(b_ratio))
        rows = [
            ("dirty regions (bitmap) / regions",
             [f"{get(x, 'bitmap_dirty')}/{get(x, 'regions_total')}" if x else None for x in rs],
             "{}", None),
            ("regions written (1 MiB each) / array MiB",
             [f"{get(x, 'regions_written')}/{(get(x, 'bytes_written') or 0) / MIB:.0f}"
              if x else None for x in rs], "{}", None),
            ("re-add", [get(x, "readd") for x in rs], "{}", None),
            ("resync s (command -> active, no sync)", [get(x, "secs") for x in rs], "{:.2f}",
             s["resync_s"]),
            ("resync s (the daemon's log)", [get(x, "daemon_secs") for x in rs], "{:.3f}",
             s["resync_daemon_s"]),
            ("resync copied MiB", [mib(get(x, "copied")) for x in rs], "{:.1f}",
             mib(s["resync_copied"])),
            ("full rebuild copied MiB (part 1)", [mib(get(b, "copied")) for b in rb], "{:.1f}",
             mib(s.get("rebuild_copied"))),
            ("resync / rebuild: time (daemon's log)", t_ratio, "x{:.3f}",
             s["resync_vs_rebuild_time"]),
            ("resync / rebuild: time (status polls)", w_ratio, "x{:.3f}",
             s["resync_vs_rebuild_wall"]),
            ("resync / rebuild: bytes", b_ratio, "x{:.3f}", s["resync_vs_rebuild_bytes"]),
            ("other load, cores", [get(x, "other_cores") for x in rs], "{:.2f}", None),
        ]
        table(f"2. resync of ~{a.dirty_pct:g}% dirty regions vs the full rebuild (region "
              f"{g['bitmap_region'] / MIB:g} MiB)", rows, passes,
              [f"status polls every {a.poll_ms} ms: a resync this short is timed better by "
               "the daemon's own secs= (its log line); the polled time includes the poll "
               "interval and the CLI's start"])

    if "latency" in a.parts:
        lt = col["latency"]
        idle = [get(x, "idle") for x in lt]
        dur = [get(x, "during") for x in lt]
        rb = [get(x, "rebuild") for x in lt]
        s.update(idle_p50_us=median([get(i, "p50_us") for i in idle]),
                 idle_p99_us=median([get(i, "p99_us") for i in idle]),
                 during_p50_us=median([get(d, "p50_us") for d in dur]),
                 during_p99_us=median([get(d, "p99_us") for d in dur]),
                 window_p99_us=median([get(d, "window", "p99_us") for d in dur]),
                 idle_window_p99_us=median([get(i, "window", "p99_us") for i in idle]),
                 p99_ratio=median([get(x, "p99_ratio") for x in lt]),
                 p50_ratio=median([get(x, "p50_ratio") for x in lt]),
                 rebuild_under_reads_s=median([get(b, "daemon_secs") for b in rb]))
        rows = [
            ("idle: IOPS", [get(i, "iops") for i in idle], "{:.0f}",
             median([get(i, "iops") for i in idle])),
            ("idle: p50 / p99 us (fio)",
             [f"{get(i, 'p50_us'):.0f}/{get(i, 'p99_us'):.0f}" if i else None for i in idle],
             "{}", f"{s['idle_p50_us']:.0f}/{s['idle_p99_us']:.0f}"
             if s["idle_p99_us"] is not None else None),
            ("rebuild: IOPS (whole run)", [get(d, "iops") for d in dur], "{:.0f}",
             median([get(d, "iops") for d in dur])),
            ("rebuild: p50 / p99 us (fio, whole run)",
             [f"{get(d, 'p50_us'):.0f}/{get(d, 'p99_us'):.0f}" if d else None for d in dur],
             "{}", f"{s['during_p50_us']:.0f}/{s['during_p99_us']:.0f}"
             if s["during_p99_us"] is not None else None),
            ("rebuild s under reads / MB/s",
             [f"{get(b, 'daemon_secs'):.2f}/{get(b, 'mb_s'):.0f}" if b else None for b in rb],
             "{}", None),
            ("rebuild ended into the fio run, s",
             [get(b, "end_in_fio_s") if b and not b["covered_fio"] else
              ("covered" if b else None) for b in rb], "{:.2f}", None),
            ("in the rebuild's window: reads, p50/p99 us",
             [f"{get(d, 'window', 'ios')}, {get(d, 'window', 'p50_us'):.0f}/"
              f"{get(d, 'window', 'p99_us'):.0f}" if get(d, "window", "p99_us") else "-"
              for d in dur], "{}", None),
            ("idle, the same seconds: reads, p50/p99 us",
             [f"{get(i, 'window', 'ios')}, {get(i, 'window', 'p50_us'):.0f}/"
              f"{get(i, 'window', 'p99_us'):.0f}" if get(i, "window", "p99_us") else "-"
              for i in idle], "{}", None),
            ("p99 rebuild / idle", [get(x, "p99_ratio") for x in lt], "x{:.2f}", s["p99_ratio"]),
            ("p50 rebuild / idle", [get(x, "p50_ratio") for x in lt], "x{:.2f}", s["p50_ratio"]),
            ("other load, cores (idle / rebuild)",
             [f"{get(i, 'other_cores') or 0:.2f}{f1}/{get(d, 'other_cores') or 0:.2f}{f2}"
              if i and d else None
              for i, d, f1, f2 in zip(idle, dur, flag(idle), flag(dur))], "{}", None),
        ]
        rate = get(rb[0], "sync_rate") if rb and rb[0] else None
        table(f"3. 4 KiB random read QD{a.lat_iodepth}, {a.lat_runtime:g}s, during a rebuild "
              f"(sync-rate {rate if rate else '0 = unlimited'}) vs idle", rows, passes,
              ["the ratios compare fio's JSON of the whole runs when the rebuild outlasted fio; "
               "else, from fio's per-I/O latency logs, the reads completed while the rebuild "
               "ran (its window, the first seconds of the run, to a few ms) against those of "
               "the same first seconds of the idle run. For a longer window: a larger "
               "--member-size"])
    return s


# --------------------------------------------------------------------------
# Main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="RAID 5 recovery on 4 local nodes: rebuild throughput vs one member's "
                    "sequential writes, a resync of ~1% dirty regions vs a full rebuild, and "
                    "4 KiB random read latency during a rebuild vs idle.",
        epilog="recovery.sh builds the release binaries unless given --bin-dir or --no-build. "
               "Smoke test: recovery.sh --quick")
    ab.add_common_args(p, runtime=10.0, passes=3, chunk="512K", member_size="512M")
    for act in p._actions:  # shared with array.sh, not used here
        if act.dest == "retries":
            act.help = argparse.SUPPRESS
        elif act.dest == "runtime":
            act.help = "seconds of the member's fio write (default 10)"
    p.set_defaults(retries=0)
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma list of rebuild, resync, latency (default all)")
    p.add_argument("--lat-runtime", type=float, default=15.0,
                   help="seconds of each 4 KiB random read run (default 15)")
    p.add_argument("--lat-iodepth", type=int, default=1, help="their queue depth (default 1)")
    p.add_argument("--dirty-pct", type=float, default=1.0,
                   help="percent of the bitmap regions written while member 2 is out "
                        "(default 1)")
    p.add_argument("--poll-ms", type=int, default=50,
                   help="status poll period while a rebuild or resync runs (default 50)")
    p.add_argument("--rebuild-timeout", type=float, default=900.0,
                   help="seconds a rebuild or resync may take (default 900)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 64M volumes, 1 pass (unless --passes), 3 s writes, 5 s "
                        "reads, short quiet wait")
    a = p.parse_args(argv)
    if a.quick:
        a.runtime, a.lat_runtime, a.quiet_timeout = 3.0, 5.0, 5.0
        if a.passes == 3:
            a.passes = 1
        if a.member_size == "512M":
            a.member_size = "64M"
    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts: a comma list of {', '.join(PARTS)}, not {a.parts!r}")
    a.parts = [x for x in PARTS if x in parts]
    return a


def main(argv):
    a = parse_args(argv)
    ctx = ab.make_ctx(a)
    cfg = ab.Config(ARRAY, "array", 4, "raid5", desc="RAID 5 over 4 node volumes")
    need = (4 + 3) * ctx.member_size
    free = shutil.disk_usage(a.workdir).free
    if need > free * 0.9:
        sys.exit(f"the volumes need {need >> 20} MiB in {a.workdir}, {free >> 20} MiB free: "
                 "use a smaller --member-size or fewer --passes")
    for tool in ("fio", "qemu-io", "nbdinfo"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required")
    return ab.in_workdir(ctx, a.workdir, "nbdraid-recovery-bench.", a.keep,
                         lambda: run(a, argv, ctx, cfg))


def run(a, argv, ctx, cfg):
    env = ab.environment(ctx)
    env.pop("qemu-storage-daemon", None)
    env["qemu-io"] = first_line(["qemu-io", "--version"])
    passes, summary, geometry, stack = [], {}, {}, None
    config = {"argv": argv, "parts": a.parts, "passes": ctx.passes, "member_size": ctx.member_size,
              "chunk": ctx.chunk, "write_runtime_s": ctx.runtime, "lat_runtime_s": a.lat_runtime,
              "lat_iodepth": a.lat_iodepth, "dirty_pct": a.dirty_pct, "poll_ms": a.poll_ms,
              "server_cpus": ctx.server_cpus, "client_cpus": ctx.client_cpus,
              "max_other_cores": ctx.max_other, "node_args": ctx.node_args,
              "array_args": ctx.array_args}
    t_start = time.monotonic()
    try:
        print("# nbdraid recovery benchmark (issue 11)")
        print("command: " + command_line(argv, "RECOVERY_SH_CMD"))
        for k, v in env.items():
            print(f"{k:>22}: {v}")
        print(f"{'array':>22}: RAID 5 over 4 node volumes of {ctx.member_size_spec} on "
              f"{a.workdir} ({ab.fs_type(a.workdir)}), chunk {ctx.chunk_spec}; a 5th node "
              f"holds the fio target and 2 replacement volumes (used in turn)")
        print(f"{'pinning':>22}: the array daemon AND all nodes on CPU(s) "
              f"{ctx.server_cpus or 'any'}; fio, qemu-io and the CLI on "
              f"{ctx.client_cpus or 'any'}")
        print(f"{'settings':>22}: {ctx.passes} pass(es) of {', '.join(a.parts)}; member write "
              f"{ctx.runtime:g}s; reads {a.lat_runtime:g}s at QD{a.lat_iodepth}; "
              f"{a.dirty_pct:g}% of the regions dirtied")
        sys.stdout.flush()
        log("creating the array and writing it whole once (nothing is timed here)")
        ab.prepare(ctx, cfg)
        stack = Stack(a, ctx, cfg)
        stack.prepare_spare()
        st = stack.start()
        geometry = stack.geometry
        log(f"array up: {st.get('state')}, {geometry['size'] >> 20} MiB, member data "
            f"{geometry['member_size'] / MIB:.1f} MiB, bitmap region "
            f"{geometry['bitmap_region'] >> 10} KiB, sync-rate {geometry['sync_rate']}")
        for k in range(ctx.passes):
            r = {}
            passes.append(r)
            log(f"pass {k + 1} of {ctx.passes}")
            if "rebuild" in a.parts:
                r["member_write"] = member_write(a, ctx, stack)
                r["rebuild"] = rebuild(a, ctx, stack)
            if "resync" in a.parts:
                r["resync"] = resync(a, ctx, stack, k)
            if "latency" in a.parts:
                r["latency"] = latency(a, ctx, stack)
        summary = summarize_and_print(a, stack, passes)
        stack.stop()
        errs = [(p, x.get("log_errors", {})) for r in passes for p, x in r.items()
                if isinstance(x, dict)]
        errs += [("latency rebuild", r["latency"]["rebuild"].get("log_errors", {}))
                 for r in passes if "latency" in r]
        errs = [(p, e) for p, e in errs if e.get("count")]
        if errs:
            print("\nWARN/ERROR lines the array daemon logged while measured:")
            for p, e in errs:
                print(f"  {p}: {e['count']}, e.g. " + " | ".join(x[:200] for x in e["sample"]))
        print(f"\ntotal time {time.monotonic() - t_start:.0f}s")
    finally:
        if stack is not None:
            stack.stop()  # the array daemon before the nodes (in_workdir stops the rest)
        if a.json:  # also what an interrupted run measured so far
            write_raw_json(a.json, {"environment": env, "config": config, "geometry": geometry,
                                    "summary": summary, "passes": passes})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
