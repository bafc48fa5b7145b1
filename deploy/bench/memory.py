#!/usr/bin/env python3
"""Memory under a write flood: nbdraid-node with its throttle on and off
(and nbdkit for scale), storage slowed down, 4 fio connections flooding
random writes. Reports each server's peak RSS.

Runs without the throttle (and nbdkit) go inside a memory cgroup (v1) with
a limit, so they cannot take the machine down; a run that reaches the limit
is reported as "hit the limit".

    deploy/bench/memory.sh [--runtime 30] [--capacity 64M] [--limit 3G]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Proc, fio_nbd_cmd, log, parse_size, raise_on_signals,  # noqa: E402
                      read_fio_job, start_nbdkit, start_with_ready_file)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CG_ROOT = "/sys/fs/cgroup/memory"


def status_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Cgroup:
    """A v1 memory cgroup with a limit; processes are put in by PID."""

    def __init__(self, limit):
        self.path = os.path.join(CG_ROOT, f"nbdraid-bench-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        self.write("memory.limit_in_bytes", str(limit))
        # No swap here, but be explicit where the knob exists.
        if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
            self.write("memory.memsw.limit_in_bytes", str(limit))

    def write(self, name, value):
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def read(self, name):
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def wrap(self, argv):
        # The shell joins the cgroup, then becomes the server.
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"] + argv

    def peak(self):
        return int(self.read("memory.max_usage_in_bytes"))

    def failcnt(self):
        return int(self.read("memory.failcnt"))

    def oom_killed(self):
        try:
            for line in self.read("memory.oom_control").splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1]) > 0
        except OSError:
            pass
        return False

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def start_node(args, work, bs, throttle, cg):
    data = os.path.join(work, "node")
    ready = os.path.join(work, "ready.json")
    conf = os.path.join(work, "node.toml")
    with open(conf, "w") as f:
        f.write(f'''# benchmark only: fault injection slows the volume down
[throttle]
capacity = "{args.capacity}"
enabled = {"true" if throttle else "false"}
[[volume]]
name = "flood"
size = "{args.volume_size}"
[[fault]]
volume = "flood"
delay-us = {args.delay_ms * 1000}
''')
    argv = [args.node_bin, "--config", conf, "--data-dir", data, "--listen", "127.0.0.1:0",
            "--ready-file", ready, "--log", "warn"]
    if cg:
        argv = cg.wrap(argv)  # the wrapper execs the node: the PID stays the one we started
    proc, r = start_with_ready_file(argv, ready, os.path.join(work, "node.log"), timeout=30)
    return proc, int(r["nbd"].rsplit(":", 1)[1]), "flood"


def start_delayed_nbdkit(args, work, cg):
    path = os.path.join(work, "nbdkit.img")
    with open(path, "wb") as f:
        f.truncate(parse_size(args.volume_size))
    proc, port = start_nbdkit(cg.wrap([]) if cg else [],
                              ["-e", "flood", "--filter=delay", "file", f"file={path}",
                               f"wdelay={args.delay_ms}ms"],
                              os.path.join(work, "nbdkit.log"))
    return proc, port, "flood"


def server_pid(proc):
    """The server's own PID (the cgroup wrapper execs into it, so same PID)."""
    return proc.pid


def flood(args, port, export, bs, depth, work):
    """Starts fio in the background (the caller samples the server meanwhile)."""
    out = os.path.join(work, "fio.json")
    cmd = fio_nbd_cmd("flood", f"nbd://127.0.0.1:{port}/{export}", out, args.runtime,
                      "randwrite", bs, depth, numjobs=4, norandommap=False,
                      extra=[f"--size={args.volume_size}"])
    return Proc(cmd, os.path.join(work, "fio.log"))


def run_case(args, server, bs, depth, throttle):
    work = tempfile.mkdtemp(prefix="nbdraid-membench-", dir=args.workdir)
    cg = None
    if server != "nbdraid" or not throttle:
        cg = Cgroup(parse_size(args.limit))
    try:
        if server == "nbdraid":
            proc, port, export = start_node(args, work, bs, throttle, cg)
        else:
            proc, port, export = start_delayed_nbdkit(args, work, cg)
        pid = server_pid(proc)
        time.sleep(0.5)
        idle = status_kib(pid, "VmRSS:") or 0
        fio = flood(args, port, export, bs, depth, work)
        peak_rss = idle
        died = False
        deadline = time.time() + args.runtime + 120
        while fio.running() and time.time() < deadline:
            v = status_kib(pid, "VmHWM:")
            if v is None or not proc.running():
                died = True
                break
            peak_rss = max(peak_rss, v)
            time.sleep(0.1)
        fio.stop()
        if not proc.running():
            died = True
        ios = None
        try:
            ios = read_fio_job(os.path.join(work, "fio.json"))["write"]["total_ios"]
        except (OSError, ValueError, KeyError):
            pass
        result = {
            "server": server, "throttle": throttle if server == "nbdraid" else None,
            "bs": bs, "depth": depth, "idle_rss_mib": idle / 1024, "peak_rss_mib": peak_rss / 1024,
            "writes": ios, "died": died,
        }
        if cg:
            result["cgroup_peak_mib"] = cg.peak() / (1 << 20)
            result["hit_limit"] = cg.failcnt() > 0 or cg.oom_killed() or died
        proc.stop()
        return result
    finally:
        Proc.stop_all()
        if cg:
            cg.remove()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=30, help="seconds of flood per case")
    ap.add_argument("--capacity", default="72M", help="node throttle capacity (must hold two 32M requests)")
    ap.add_argument("--limit", default="3G", help="memory cgroup limit for unthrottled runs")
    ap.add_argument("--delay-ms", type=int, default=20, help="storage delay per write")
    ap.add_argument("--volume-size", default="4G")
    ap.add_argument("--node-bin", default=os.path.join(ROOT, "target", "release", "nbdraid-node"))
    ap.add_argument("--workdir", default="/tmp")
    ap.add_argument("--no-nbdkit", action="store_true")
    ap.add_argument("--json", help="write raw results here")
    args = ap.parse_args()
    if not os.path.isdir(CG_ROOT):
        sys.exit("memory.py: needs cgroup v1 memory controller at " + CG_ROOT)
    cases = []
    for bs, depth in [("1M", 128), ("32M", 16)]:
        cases.append(("nbdraid", bs, depth, True))
        cases.append(("nbdraid", bs, depth, False))
        if not args.no_nbdkit and shutil.which("nbdkit"):
            cases.append(("nbdkit", bs, depth, None))
    results = []
    print(f"flood: 4 fio connections, random writes, {args.runtime}s; storage delay {args.delay_ms} ms/write; "
          f"node throttle capacity {args.capacity}; cgroup limit {args.limit} for unthrottled runs", flush=True)
    raise_on_signals()  # run_case stops its processes and removes its cgroup on the way out
    try:
        for server, bs, depth, throttle in cases:
            r = run_case(args, server, bs, depth, throttle)
            results.append(r)
            label = server if server != "nbdraid" else f"nbdraid-node throttle {'on' if throttle else 'off'}"
            peak = f"{r['peak_rss_mib']:.0f} MiB"
            if r.get("hit_limit"):
                peak += f" (hit the {args.limit} limit)"
            print(f"  {label:<28} bs={bs:<4} QD{depth:<4} idle {r['idle_rss_mib']:.0f} MiB  peak RSS {peak:<28}"
                  f" writes {r['writes']}", flush=True)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); servers stopped")
        sys.exit(130)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
