#!/usr/bin/env python3
"""Memory under a write flood, two parts (--part node|stack|all):

node:  nbdraid-node with its throttle on and off (and nbdkit for scale),
       storage slowed down, 4 fio connections flooding random writes.
       Reports each server's peak RSS.
stack: RAID 5 over 4 nodes served by nbdraid-array, member 3's volume slowed
       down (fault injection, --slow-bandwidth), 4 fio connections flooding
       random writes (1 MiB at QD 128 each, then 32 MiB at QD 16 each), with
       the array's cross-layer accounting on and off ([members] accounting).
       Reports the peak RSS of the array daemon and of every node, the most
       units the array held at each member against that member's grant
       (metrics sampled every --sample-ms, and the daemon's exact peak),
       throughput, and whether anything hit a limit or failed.

Runs without the node throttle (and nbdkit), and every stack run (all five
daemons in one cgroup), go inside a memory cgroup (v1) with a limit
(--limit), so they cannot take the machine down; a run that reaches the
limit is reported as "hit the limit".

    deploy/bench/memory.sh [--part all] [--runtime 30] [--limit 3G] [--json out.json]
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (Proc, fio_nbd_cmd, log, parse_size, prom_samples,  # noqa: E402
                      raise_on_signals, read_fio_job, scrape_metrics, start_nbdkit,
                      start_with_ready_file, status_kib, taskset)
import arraybench as ab  # noqa: E402  (nodes, array daemons and their cells)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CG_ROOT = "/sys/fs/cgroup/memory"
MIB = 1 << 20


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


# --------------------------------------------------------------------------
# Stack part: RAID 5 over 4 nodes, member 3 slowed down


STACK_ARRAY = "flood"
STACK_CASES = [("1M", 128), ("32M", 16)]  # per fio connection; 4 connections
STACK_JOBS = 4
SLOW = 3  # the member slot whose node is slowed down


def stack_config(args, accounting):
    toml = (f'[throttle]\ncapacity = "{args.array_capacity}"\n[members]\n'
            f'grant = "{args.grant}"\naccounting = {"true" if accounting else "false"}\n')
    return ab.Config(f"stack-acct-{'on' if accounting else 'off'}", "array", 4, "raid5",
                     base=STACK_ARRAY, toml=toml,
                     desc=f"RAID 5 over 4 nodes, accounting {'on' if accounting else 'off'}")


def stack_ctx(args):
    node_args = ["--grpc-listen", "127.0.0.1:0", "--throttle-capacity", args.node_capacity,
                 "--max-payload", args.node_max_payload, "--log", "warn"]
    return ab.Ctx(runtime=args.runtime, server_cpus=args.server_cpus,
                  client_cpus=args.client_cpus, chunk_spec=args.chunk,
                  member_size_spec=args.member_size, node_args=node_args,
                  array_args=["--metrics-listen", "127.0.0.1:0"],
                  bin_dir=os.path.abspath(args.bin_dir))


def metric_by(text, metric, key, want=None):
    """{label `key`: value} of metric's samples (only those whose labels
    include `want`)."""
    out = {}
    for lab, v in prom_samples(text, metric):
        if want and any(lab.get(k) != x for k, x in want.items()):
            continue
        out[lab.get(key)] = v
    return out


class StackSampler:
    """Peak anonymous RSS of each daemon (/proc/PID/status RssAnon), and the
    most units the array held at each member (foreground) and each node had
    in flight for the array's share, sampled while fio runs."""

    def __init__(self, cell):
        self.cell = cell
        self.procs = [("array", cell.layer)] + [(f"node{n.i}", n.proc) for n in cell.nodes]
        self.peak_anon = {name: 0 for name, _ in self.procs}
        self.held = {}  # slot -> most units the array held there (foreground)
        self.share = {}  # node index -> most units in flight in the array's share
        self.samples = self.scrape_errors = 0
        self.died = []

    def sample(self):
        for name, p in self.procs:
            v = status_kib(p.pid, "RssAnon:") if p.running() else None
            if v is None:
                if name not in self.died:
                    self.died.append(name)
                continue
            self.peak_anon[name] = max(self.peak_anon[name], v)
        try:
            text = scrape_metrics(self.cell.metrics, timeout=2)
            for slot, v in metric_by(text, "nbdraid_array_member_held_units", "slot",
                                     {"class": "foreground"}).items():
                self.held[int(slot)] = max(self.held.get(int(slot), 0), v)
            for n in self.cell.nodes:
                text = scrape_metrics(n.metrics, timeout=2)
                for share, v in metric_by(text, "nbdraid_throttle_share_in_flight_units",
                                          "share").items():
                    if share.startswith("array ") and not share.endswith("(background)"):
                        self.share[n.i] = max(self.share.get(n.i, 0), v)
        except OSError:
            self.scrape_errors += 1
        self.samples += 1


def daemon_warnings(paths_marks, limit=3):
    """(count, first few) of WARN/ERROR lines the daemons logged since their
    marks, leaving out the one fault injection logs on purpose."""
    lines = []
    for path, mark in paths_marks:
        _, ls = ab.log_warnings(path, mark, limit=10 ** 6)
        lines += [f"{os.path.basename(path)}: {ln}" for ln in ls
                  if "fault injection changed" not in ln]
    return len(lines), lines[:limit]


def run_stack_case(args, ctx, bs, depth, accounting):
    cfg = stack_config(args, accounting)
    cg = Cgroup(parse_size(args.limit))
    cell = ab.Cell(ctx, cfg, prefix=cg.wrap([]))
    out = os.path.join(ctx.workdir, "fio.json")
    try:
        cell.start()  # waits until the array holds its lease at every member
        marks = [(p, ab.log_marks(p)) for p in [cell.log] + [n.log for n in cell.nodes]]
        cell.nodes[SLOW].set_fault("--bandwidth", args.slow_bandwidth)
        grants = {}
        text = scrape_metrics(cell.metrics)
        grants = {int(k): v for k, v in metric_by(
            text, "nbdraid_array_member_grant_units", "slot", {"class": "foreground"}).items()}
        idle = {"array": status_kib(cell.layer.pid, "VmRSS:") or 0}
        for n in cell.nodes:
            idle[f"node{n.i}"] = status_kib(n.proc.pid, "VmRSS:") or 0
        sampler = StackSampler(cell)
        cmd = taskset(ctx.client_cpus) + fio_nbd_cmd(
            "flood", cell.uri, out, args.runtime, "randwrite", bs, depth, numjobs=STACK_JOBS,
            norandommap=False)
        t0 = time.monotonic()
        fio = Proc(cmd, os.path.join(ctx.workdir, "logs", "fio-flood.log"))
        deadline = t0 + args.runtime + args.drain_timeout
        while fio.running() and time.monotonic() < deadline:
            sampler.sample()
            if sampler.died:
                break
            time.sleep(args.sample_ms / 1000)
        wall = time.monotonic() - t0
        timed_out = fio.running() and not sampler.died
        fio.stop()
        r = {"part": "stack", "accounting": accounting, "bs": bs, "depth": depth,
             "connections": STACK_JOBS, "runtime_s": args.runtime, "fio_wall_s": wall,
             "drain_s": max(0.0, wall - args.runtime), "fio_timed_out": timed_out,
             "samples": sampler.samples, "scrape_errors": sampler.scrape_errors,
             "died": list(sampler.died)}
        try:
            job = read_fio_job(out)
            w = job["write"]
            r["fio"] = {"writes": w["total_ios"], "bytes_per_s": w["bw_bytes"], "iops": w["iops"],
                        "p99_ms": w["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
                        "max_ms": w["clat_ns"]["max"] / 1e6, "error": job.get("error")}
        except (OSError, ValueError, KeyError) as e:
            r["fio"] = {"error": f"no fio report: {e}"}
        # Peaks: the kernel's (VmHWM) and the sampled anonymous memory.
        r["rss"] = {}
        for name, p in sampler.procs:
            r["rss"][name] = {"idle_mib": idle[name] / 1024,
                              "peak_mib": (status_kib(p.pid, "VmHWM:") or 0) / 1024,
                              "peak_anon_mib": sampler.peak_anon[name] / 1024}
        r["grant"] = grants
        r["held_sampled"] = sampler.held
        r["node_share_sampled"] = sampler.share
        if cell.layer.running():
            text = scrape_metrics(cell.metrics)
            r["held_peak"] = {int(k): v for k, v in metric_by(
                text, "nbdraid_array_member_peak_held_units", "slot",
                {"class": "foreground"}).items()}
            r["grant_waits"] = sum(v for _, v in prom_samples(text, "nbdraid_array_grant_waits"))
            r["grant_wait_s"] = sum(v for _, v in prom_samples(
                text, "nbdraid_array_grant_wait_seconds"))
            r["array_peak_in_flight"] = sum(v for _, v in prom_samples(
                text, "nbdraid_throttle_peak_in_flight_units"))
            r["member_states"] = cell.member_states()
        r["node_peak_in_flight"] = {}
        for n in cell.nodes:
            if n.proc.running():
                r["node_peak_in_flight"][n.i] = sum(v for _, v in prom_samples(
                    scrape_metrics(n.metrics), "nbdraid_throttle_peak_in_flight_units"))
        r["over_grant"] = [s for s, v in r.get("held_peak", sampler.held).items()
                           if grants.get(s) and v > grants[s]]
        r["cgroup_peak_mib"] = cg.peak() / MIB
        r["cgroup_failcnt"] = cg.failcnt()
        r["oom_killed"] = cg.oom_killed()
        r["hit_limit"] = r["cgroup_failcnt"] > 0 or r["oom_killed"] or bool(sampler.died)
        r["warnings"], r["warning_sample"] = daemon_warnings(marks)
        return r
    finally:
        cell.stop()
        cg.remove()


def mib(x):
    return "-" if x is None else f"{x / MIB:.1f}"


# fio's latency histogram ends near 2^34 ns: a percentile there means "at least".
FIO_LAT_CLAMP_MS = 17000


def secs(ms, percentile=True):
    if ms is None:
        return "-"
    if percentile and ms >= FIO_LAT_CLAMP_MS:
        return f">{FIO_LAT_CLAMP_MS / 1000:.0f}"
    return f"{ms / 1000:.1f}"


STACK_HEADER = (f"  {'acct':<5}{'bs':>3} {'conn x QD':<9}{'MB/s':>6}{'p99 s':>6}{'max s':>6}"
                f"{'drain':>6}{'array MiB':>11}{'inflt':>6}  {'nodes 0/1/2/3 MiB':<25}"
                f"{'held at members 0/1/2/3':>24}{'grant':>6}{'node3':>6}{'waits':>6}"
                f"{'cgroup':>7}  {'member 3':<9}limits")


def print_stack_result(args, r):
    acct = "on" if r["accounting"] else "off"
    f = r.get("fio", {})
    tput = f"{f['bytes_per_s'] / 1e6:.1f}" if "bytes_per_s" in f else "-"
    rss = r["rss"]
    nodes = " ".join(f"{rss[f'node{i}']['peak_mib']:.0f}({rss[f'node{i}']['peak_anon_mib']:.0f})"
                     for i in range(4))
    held = r.get("held_peak") or r["held_sampled"]
    held_t = "/".join(mib(held.get(i)) for i in range(4))
    grant = ",".join(sorted({mib(v) for v in r["grant"].values()})) or "?"
    states = r.get("member_states") or ["?"] * 4
    flags = []
    if r["hit_limit"]:
        flags.append(f"HIT the {args.limit} limit (failcnt {r['cgroup_failcnt']}"
                     + (", OOM kill" if r["oom_killed"] else "") + ")")
    if r["died"]:
        flags.append("DIED: " + ",".join(r["died"]))
    if r["over_grant"]:
        over = ",".join(map(str, sorted(r["over_grant"])))
        flags.append(f"OVER GRANT at member(s) {over}" if r["accounting"]
                     else "held > grant (not enforced)")
    if any(st != "active" for st in states):
        flags.append("member states " + ",".join(str(x) for x in states))
    if r["fio_timed_out"]:
        flags.append(f"fio still running after runtime + {args.drain_timeout}s: stopped")
    if f.get("error"):
        flags.append(f"fio error {f['error']}")
    print(f"  {acct:<5}{r['bs']:>3} {STACK_JOBS}x{r['depth']:<7}{tput:>6}{secs(f.get('p99_ms')):>6}"
          f"{secs(f.get('max_ms'), False):>6}{r['drain_s']:>6.0f}"
          f"{rss['array']['peak_mib']:>6.0f}({rss['array']['peak_anon_mib']:.0f})"
          f"{mib(r.get('array_peak_in_flight')).split('.')[0]:>6}  {nodes:<25}{held_t:>24}"
          f"{grant:>6}{mib(r['node_share_sampled'].get(SLOW)):>6}{r.get('grant_waits', 0):>6.0f}"
          f"{r['cgroup_peak_mib']:>7.0f}  {states[SLOW] or '?':<9}"
          + ("; ".join(flags) if flags else "ok"), flush=True)
    if r["warnings"]:
        print(f"       {r['warnings']} WARN/ERROR line(s) in the daemons' logs, e.g. "
              + " | ".join(x[:160] for x in r["warning_sample"]), flush=True)


def run_stack(args, results):
    ctx = stack_ctx(args)
    for b in ab.BINARIES:
        if not os.access(os.path.join(ctx.bin_dir, b), os.X_OK):
            sys.exit(f"{b} not found in {ctx.bin_dir}; run via memory.sh or pass --bin-dir")

    def body():
        env = ab.environment(ctx)
        print(f"\nstack: RAID 5 over 4 nbdraid-node volumes ({args.member_size} each, chunk "
              f"{args.chunk}, on {args.stack_workdir}), node {SLOW} slowed to "
              f"{args.slow_bandwidth}/s (fault injection); node throttle capacity "
              f"{args.node_capacity}, max payload {args.node_max_payload}; array capacity "
              f"{args.array_capacity}, grant {args.grant} per member; {STACK_JOBS} fio "
              f"connections of random writes for {args.runtime}s each run; all five daemons of "
              f"a run in one memory cgroup limited to {args.limit}", flush=True)
        for b in ab.BINARIES:
            print(f"  {b}: {env.get(b)}")
        log("stack: creating the array and writing it whole once (not measured)")
        ab.prepare(ctx, stack_config(args, True))
        print(STACK_HEADER, flush=True)
        for bs, depth in STACK_CASES:
            for accounting in (True, False):
                try:
                    r = run_stack_case(args, ctx, bs, depth, accounting)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as e:  # reported; the other cases still run
                    results.append({"part": "stack", "accounting": accounting, "bs": bs,
                                    "depth": depth, "error": str(e)})
                    print(f"  {'on' if accounting else 'off':<5}{bs:>3} {STACK_JOBS}x{depth:<7}"
                          f"ERROR: {str(e)[:300]}", flush=True)
                    continue
                results.append(r)
                print_stack_result(args, r)
        return 0

    rc = ab.in_workdir(ctx, args.stack_workdir, "nbdraid-memstack.", args.keep, body)
    if rc == 130:
        raise KeyboardInterrupt("stack part interrupted")
    print("  MB/s, p99 s, max s: fio's writes (throughput over the whole run, drain included; "
          "fio's latency histogram ends at 17 s, so a p99 of '>17' = at least that; max is exact). drain: seconds fio "
          "needed after --runtime to complete what it had in flight. array MiB / nodes MiB: "
          "peak RSS (VmHWM) and, in parentheses, the most anonymous memory sampled (RssAnon; a "
          "node's RSS also counts pages of its tmpfs volume mapped to serve reads). inflt: the "
          "array throttle's peak units in flight (MiB; its capacity is the array's budget). "
          "held at members: the most units (MiB) the array held at each member (foreground, "
          "the daemon's exact peak) against the grant each member gave it. node3: the most "
          "units sampled in flight in the array's share at node 3 (the slow one). waits: "
          "requests that waited for member grants. cgroup: peak of the run's cgroup (all five "
          "daemons). member 3: its state after the run (active = throttled, not failed).",
          flush=True)


# --------------------------------------------------------------------------


def run_node(args, results):
    cases = []
    for bs, depth in [("1M", 128), ("32M", 16)]:
        cases.append(("nbdraid", bs, depth, True))
        cases.append(("nbdraid", bs, depth, False))
        if not args.no_nbdkit and shutil.which("nbdkit"):
            cases.append(("nbdkit", bs, depth, None))
    print(f"node: 4 fio connections, random writes, {args.runtime}s; storage delay {args.delay_ms} ms/write; "
          f"node throttle capacity {args.capacity}; cgroup limit {args.limit} for unthrottled runs", flush=True)
    for server, bs, depth, throttle in cases:
        r = run_case(args, server, bs, depth, throttle)
        r["part"] = "node"
        results.append(r)
        label = server if server != "nbdraid" else f"nbdraid-node throttle {'on' if throttle else 'off'}"
        peak = f"{r['peak_rss_mib']:.0f} MiB"
        if r.get("hit_limit"):
            peak += f" (hit the {args.limit} limit)"
        print(f"  {label:<28} bs={bs:<4} QD{depth:<4} idle {r['idle_rss_mib']:.0f} MiB  peak RSS {peak:<28}"
              f" writes {r['writes']}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("node", "stack", "all"), default="all",
                    help="node: one nbdraid-node (and nbdkit); stack: RAID 5 array daemon over "
                         "4 nodes; all (default): both")
    ap.add_argument("--runtime", type=int, default=30, help="seconds of flood per case")
    ap.add_argument("--limit", default="3G", help="memory cgroup limit (node part: for unthrottled "
                                                  "runs; stack part: all five daemons of a run)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help="nbdraid-node (built with fault-injection), nbdraid-array, nbdraid")
    ap.add_argument("--keep", action="store_true", help="keep the stack part's temporary dir")
    ap.add_argument("--json", help="write raw results here")
    g = ap.add_argument_group("node part")
    g.add_argument("--capacity", default="72M", help="node throttle capacity (must hold two 32M requests)")
    g.add_argument("--delay-ms", type=int, default=20, help="storage delay per write")
    g.add_argument("--volume-size", default="4G")
    g.add_argument("--node-bin", help="default: BIN_DIR/nbdraid-node")
    g.add_argument("--workdir", default="/tmp")
    g.add_argument("--no-nbdkit", action="store_true")
    g = ap.add_argument_group("stack part")
    g.add_argument("--node-capacity", default="64M", help="each node's throttle capacity (default 64M)")
    g.add_argument("--node-max-payload", default="4M", help="each node's max payload (default 4M)")
    g.add_argument("--array-capacity", default="320M", help="the array daemon's throttle capacity "
                                                            "(default 320M)")
    g.add_argument("--grant", default="16M", help="units the array asks of each member (default 16M)")
    g.add_argument("--chunk", default="64K", help="RAID 5 chunk (default 64K)")
    g.add_argument("--member-size", default="256M", help="each node volume (default 256M)")
    g.add_argument("--slow-bandwidth", default="8M", help="member 3's storage bandwidth per second "
                                                          "(default 8M)")
    g.add_argument("--sample-ms", type=int, default=100, help="metrics and RSS sampling period "
                                                              "(default 100)")
    g.add_argument("--drain-timeout", type=int, default=300,
                   help="seconds fio may take after --runtime to finish (default 300)")
    g.add_argument("--stack-workdir", default="/dev/shm", help="where the volumes go (default /dev/shm)")
    g.add_argument("--server-cpus", default="", help="taskset list for the daemons (default: unpinned)")
    g.add_argument("--client-cpus", default="", help="taskset list for fio (default: unpinned)")
    args = ap.parse_args()
    if args.node_bin is None:
        args.node_bin = os.path.join(args.bin_dir, "nbdraid-node")
    if not os.path.isdir(CG_ROOT):
        sys.exit("memory.py: needs cgroup v1 memory controller at " + CG_ROOT)
    results = []
    raise_on_signals()  # each case stops its processes and removes its cgroup on the way out
    try:
        if args.part in ("node", "all"):
            run_node(args, results)
        if args.part in ("stack", "all"):
            run_stack(args, results)
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); servers stopped")
        sys.exit(130)
    finally:
        if args.json:  # also what an interrupted run measured so far
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
