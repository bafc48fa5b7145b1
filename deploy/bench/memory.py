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
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CG_ROOT = "/sys/fs/cgroup/memory"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def parse_size(s):
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


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


def wait_port(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start_node(args, work, bs, throttle, cg):
    data = os.path.join(work, "node")
    ready = os.path.join(work, "ready.json")
    if os.path.exists(ready):
        os.unlink(ready)
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
        argv = cg.wrap(argv)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "node.log"), "a"),
                            start_new_session=True)
    end = time.time() + 30
    while time.time() < end and not os.path.exists(ready):
        if proc.poll() is not None:
            raise RuntimeError("node exited at start; see " + os.path.join(work, "node.log"))
        time.sleep(0.05)
    with open(ready) as f:
        r = json.load(f)
    return proc, int(r["nbd"].rsplit(":", 1)[1]), "flood"


def start_nbdkit(args, work, cg):
    path = os.path.join(work, "nbdkit.img")
    with open(path, "wb") as f:
        f.truncate(parse_size(args.volume_size))
    port = free_port()
    argv = ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-e", "flood", "--filter=delay",
            "file", f"file={path}", f"wdelay={args.delay_ms}ms"]
    if cg:
        argv = cg.wrap(argv)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    if not wait_port(port):
        raise RuntimeError("nbdkit did not start")
    return proc, port, "flood"


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def server_pid(proc):
    """The server's own PID (the cgroup wrapper execs into it, so same PID)."""
    return proc.pid


def flood(args, port, export, bs, depth, work):
    out = os.path.join(work, "fio.json")
    cmd = ["fio", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/{export}", "--name=flood",
           "--rw=randwrite", f"--bs={bs}", f"--iodepth={depth}", "--numjobs=4", "--group_reporting",
           "--time_based", f"--runtime={args.runtime}", f"--size={args.volume_size}",
           "--output-format=json", f"--output={out}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work)


def run_case(args, server, bs, depth, throttle):
    work = tempfile.mkdtemp(prefix="nbdraid-membench-", dir=args.workdir)
    cg = None
    if server != "nbdraid" or not throttle:
        cg = Cgroup(parse_size(args.limit))
    try:
        if server == "nbdraid":
            proc, port, export = start_node(args, work, bs, throttle, cg)
        else:
            proc, port, export = start_nbdkit(args, work, cg)
        pid = server_pid(proc)
        time.sleep(0.5)
        idle = status_kib(pid, "VmRSS:") or 0
        fio = flood(args, port, export, bs, depth, work)
        peak_rss = idle
        died = False
        deadline = time.time() + args.runtime + 120
        while fio.poll() is None and time.time() < deadline:
            v = status_kib(pid, "VmHWM:")
            if v is None or proc.poll() is not None:
                died = True
                break
            peak_rss = max(peak_rss, v)
            time.sleep(0.1)
        if fio.poll() is None:
            fio.kill()
        fio.wait()
        if proc.poll() is not None:
            died = True
        ios = None
        try:
            with open(os.path.join(work, "fio.json")) as f:
                text = f.read()
            j = json.loads(text[text.index("{"):])
            ios = j["jobs"][0]["write"]["total_ios"]
        except (OSError, ValueError, KeyError, IndexError):
            pass
        result = {
            "server": server, "throttle": throttle if server == "nbdraid" else None,
            "bs": bs, "depth": depth, "idle_rss_mib": idle / 1024, "peak_rss_mib": peak_rss / 1024,
            "writes": ios, "died": died,
        }
        if cg:
            result["cgroup_peak_mib"] = cg.peak() / (1 << 20)
            result["hit_limit"] = cg.failcnt() > 0 or cg.oom_killed() or died
        stop(proc)
        return result
    finally:
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
    for server, bs, depth, throttle in cases:
        r = run_case(args, server, bs, depth, throttle)
        results.append(r)
        label = server if server != "nbdraid" else f"nbdraid-node throttle {'on' if throttle else 'off'}"
        peak = f"{r['peak_rss_mib']:.0f} MiB"
        if r.get("hit_limit"):
            peak += f" (hit the {args.limit} limit)"
        print(f"  {label:<28} bs={bs:<4} QD{depth:<4} idle {r['idle_rss_mib']:.0f} MiB  peak RSS {peak:<28}"
              f" writes {r['writes']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
