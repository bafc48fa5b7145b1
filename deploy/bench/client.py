#!/usr/bin/env python3
"""Client-side benchmark: `nbdraid bench` (the completion-ring client)
against fio's nbd engine (libnbd), side by side, on the same servers.

Servers (each pinned to --server-cpus, started fresh for every pass,
prefilled with nbdcopy from a random file so reads hit data):
  nbdkit   nbdkit memory size=1G         (a protocol-only ceiling)
  nbdraid  nbdraid-node, one 1 GiB volume, data dir on /dev/shm

Rows (every row runs both clients, pinned to --client-cpus):
  randread-4k-qd32-1conn   4 KiB random read,  1 connection,  32 in flight
  randwrite-4k-qd32-1conn  4 KiB random write, 1 connection,  32 in flight
  randread-4k-qd32-4conn   4 KiB random read,  4 connections, 32 in flight each
  randwrite-4k-qd32-4conn  4 KiB random write, 4 connections, 32 in flight each

  fio:     --ioengine=nbd --numjobs=N --iodepth=32 (one libnbd connection
           per job, so N jobs = N connections, N x 32 in flight)
  nbdraid: nbdraid bench --connections N --queue-depth N*32 (N clients of
           one connection each sharing one completion ring; same total in
           flight as fio)

With --queue-low L, every row also runs as ROW-lowL: the queue is refilled
only once at most L (per connection) are in flight (fio --iodepth_low=L,
nbdraid bench --queue-low N*L), which batches submissions.

What is measured, per (server, row, client, pass):
* IOPS: from the client's own JSON (fio: read+write total_ios / runtime;
  nbdraid bench: ops / seconds).
* Client CPU: rusage of the client process from wait4 (user + system, all
  threads, plus reaped children, i.e. fio's job processes), over the whole
  process life (startup included, the same for both), reported as CPU
  seconds per million I/Os (= microseconds per I/O).
* Server CPU per I/O: /proc/PID/stat of the server tree over the run.
* Other load: machine busy time (/proc/stat) minus server, client and this
  script; a run above --max-other cores is repeated (--retries) and the
  least disturbed kept; '!' marks a cell still disturbed.
Medians over passes; the order of the two clients alternates by pass.

Helpers (process handling, /proc sampling, quiet-wait, fio) come from
benchlib.py next to this file.  Standard library only.
"""

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (CLK_TCK, Proc, busy_cores, descendants, fill_random,  # noqa: E402
                      fio_nbd_cmd, first_line, fmt_k, git_state, log, log_tail, median, parse_size,
                      proc_comm, proc_stat, raise_on_signals, run_child, run_fio_json, self_cpu,
                      start_nbdkit, start_with_ready_file, sys_cpu, taskset, tree_cpu_ticks,
                      wait_no_children, wait_quiet)

EXPORT = "bench"
CLIENTS = ("fio", "nbdraid")


class Row:
    def __init__(self, name, rw, conns, bs="4k", qd=32, low=None):
        self.name, self.rw, self.conns, self.bs, self.qd = name, rw, conns, bs, qd
        self.low = low  # refill at this depth (per connection); None = keep full

    def with_low(self, low):
        return Row(f"{self.name}-low{low}", self.rw, self.conns, self.bs, self.qd, low)


ROWS = [
    Row("randread-4k-qd32-1conn", "randread", 1),
    Row("randwrite-4k-qd32-1conn", "randwrite", 1),
    Row("randread-4k-qd32-4conn", "randread", 4),
    Row("randwrite-4k-qd32-4conn", "randwrite", 4),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


# --------------------------------------------------------------------------
# Servers


class Server:
    def __init__(self, name, ctx):
        self.name, self.ctx, self.proc, self.uri = name, ctx, None, None

    def pin(self):
        return taskset(self.ctx.server_cpus)

    def logpath(self):
        return os.path.join(self.ctx.workdir, f"{self.name}.log")

    @property
    def pid(self):
        return self.proc.pid

    def start(self):
        self._start()
        log(f"  {self.name}: serving {self.uri} (pid {self.pid}); prefilling with nbdcopy")
        t = time.monotonic()
        rc, _, text = run_child(["nbdcopy", self.ctx.random_file, self.uri], 300)
        if rc != 0:
            raise RuntimeError(f"nbdcopy prefill of {self.name} failed: {text[-500:]}")
        log(f"  prefilled in {time.monotonic() - t:.1f}s")

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


class Nbdkit(Server):
    def _start(self):
        self.proc, port = start_nbdkit(
            self.pin(), ["-e", EXPORT, "memory", f"size={self.ctx.size}"], self.logpath())
        self.uri = f"nbd://127.0.0.1:{port}/{EXPORT}"


class Node(Server):
    def _start(self):
        data = os.path.join(self.ctx.workdir, "node-data")
        shutil.rmtree(data, ignore_errors=True)
        ready = os.path.join(self.ctx.workdir, "node.ready")
        cmd = self.pin() + [self.ctx.node_bin, "--listen", "127.0.0.1:0", "--data-dir", data,
                            "--volume", f"{EXPORT}:{self.ctx.size}", "--ready-file", ready]
        self.proc, info = start_with_ready_file(cmd, ready, self.logpath())
        self.uri = f"nbd://{info['nbd']}/{EXPORT}"


SERVERS = {"nbdkit": Nbdkit, "nbdraid": Node}


# --------------------------------------------------------------------------
# Clients


def fio_cmd(ctx, row, uri, out):
    extra = [f"--iodepth_low={row.low}"] if row.low is not None else []
    return fio_nbd_cmd(row.name, uri, out, ctx.runtime, row.rw, row.bs, row.qd,
                       numjobs=row.conns, extra=extra)


def nbdraid_cmd(ctx, row, uri):
    rw = {"randread": "read", "randwrite": "write"}[row.rw]
    return [ctx.nbdraid_bin, "bench", "--json", "--pattern", "rand", "--rw", rw,
            "--block-size", row.bs, "--queue-depth", str(row.qd * row.conns),
            "--connections", str(row.conns), "--duration", f"{ctx.runtime}s", uri] + (
                ["--queue-low", str(row.low * row.conns)] if row.low is not None else [])


def run_fio(ctx, row, uri):
    out = os.path.join(ctx.workdir, "fio.json")
    cmd = taskset(ctx.client_cpus) + fio_cmd(ctx, row, uri, out)
    job, cpu, wall = run_fio_json(cmd, out, ctx.runtime + 60)
    ios = sum(job[d]["total_ios"] for d in ("read", "write"))
    iops = sum(job[d]["iops"] for d in ("read", "write"))
    d = job["read"] if row.rw == "randread" else job["write"]
    pct = d["clat_ns"].get("percentile", {})
    return {"ios": ios, "iops": iops, "client_cpu_s": cpu, "process_wall_s": wall,
            "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
            "own_cpu_s": (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["elapsed"] * row.conns,
            "cmd": cmd}


def run_nbdraid(ctx, row, uri):
    cmd = taskset(ctx.client_cpus) + nbdraid_cmd(ctx, row, uri)
    t = time.monotonic()
    rc, cpu, text = run_child(cmd, ctx.runtime + 60)
    wall = time.monotonic() - t
    if rc != 0:
        raise RuntimeError(f"nbdraid bench exit {rc}: {text[-800:]}")
    try:
        r = json.loads(text[text.index("{"):])
    except ValueError as e:
        raise RuntimeError(f"nbdraid bench printed no JSON ({e}): {text[-500:]}")
    lat = r["latency_us"] or {}
    return {"ios": r["ops"], "iops": r["iops"], "client_cpu_s": cpu, "process_wall_s": wall,
            "p50_us": lat.get("p50", 0), "p99_us": lat.get("p99", 0),
            "own_cpu_s": r["cpu"]["total_s"], "cmd": cmd}


def all_ticks():
    """{pid: (comm, utime+stime ticks)} of every process now."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(d)
            if st:
                out[int(d)] = (proc_comm(d) or "?", int(st[11]) + int(st[12]))
    return out


def others(before, after, exclude):
    """CPU seconds of processes other than `exclude` between two all_ticks(),
    by name: the softirq threads separately (loopback traffic the benchmark
    itself causes can be processed there), and the top others."""
    by_name = {}
    for pid, (comm, t1) in after.items():
        if pid in exclude or pid not in before:
            continue
        d = t1 - before[pid][1]
        if d > 0:
            name = comm.split("/")[0]
            by_name[name] = by_name.get(name, 0) + d / CLK_TCK
    softirq = by_name.pop("ksoftirqd", 0.0)
    top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:3])
    return softirq, top


def measure(ctx, srv, row, client):
    if not wait_no_children(srv.pid, 10):
        raise RuntimeError(f"{srv.name} still has children before the run")
    exclude = {srv.pid, os.getpid(), *descendants(srv.pid)}
    snap0 = all_ticks()
    cpu0, me0, sys0 = tree_cpu_ticks(srv.pid), self_cpu(), sys_cpu()
    res = (run_fio if client == "fio" else run_nbdraid)(ctx, row, srv.uri)
    sys1, cpu1, me1 = sys_cpu(), tree_cpu_ticks(srv.pid), self_cpu()
    softirq_s, top_others = others(snap0, all_ticks(), exclude)
    if not srv.proc.running():
        raise RuntimeError(f"{srv.name} died during the run: {log_tail(srv.logpath())}")
    wall = sys1[0] - sys0[0]
    server_s = (cpu1 - cpu0) / CLK_TCK
    busy = busy_cores(sys0, sys1)
    other = busy["cpu"] * wall - server_s - res["client_cpu_s"] - (me1 - me0) - softirq_s
    ios = res["ios"]
    res.update(wall_s=wall, server_cpu_s=server_s, other_cores=other / wall,
               softirq_cpu_s=softirq_s, softirq_us_per_io=softirq_s * 1e6 / ios if ios else None,
               client_cpus_busy_us_per_io=(sum(busy.get(f"cpu{c}", 0.0) for c in ctx.client_cpu_list)
                                           * wall * 1e6 / ios) if ios and ctx.client_cpu_list
               else None,
               top_other_processes_s=top_others,
               client_us_per_io=res["client_cpu_s"] * 1e6 / ios if ios else None,
               server_us_per_io=server_s * 1e6 / ios if ios else None,
               client_cores=res["client_cpu_s"] / wall, server_cores=server_s / wall)
    res["disturbed"] = res["other_cores"] > ctx.max_other
    return res


def run_cell(ctx, srv, row, client, pass_no):
    attempts = []
    for attempt in range(ctx.retries + 1):
        wait_quiet(ctx)
        try:
            r = measure(ctx, srv, row, client)
        except RuntimeError as e:
            log(f"  [{row.name} pass {pass_no + 1}] {srv.name}/{client}: ERROR {e}")
            attempts.append({"error": str(e)})
            break
        r["attempt"] = attempt
        attempts.append(r)
        log(f"  [{row.name} pass {pass_no + 1}] {srv.name:<8} {client:<8} {r['iops']:>9.0f} IOPS"
            f"  client {r['client_us_per_io']:6.2f} us/IO ({r['client_cores']:.2f} cores)"
            f"  server {r['server_us_per_io']:6.2f} us/IO  client CPU busy "
            f"{r['client_cpus_busy_us_per_io'] or 0:5.2f} us/IO  other {r['other_cores']:+.2f}"
            + ("  DISTURBED" if r["disturbed"] else ""))
        if not r["disturbed"]:
            break
    good = [a for a in attempts if "error" not in a]
    return min(good, key=lambda a: a["other_cores"]) if good else attempts[-1]


# --------------------------------------------------------------------------
# Summary


def summarize(cells):
    good = [c for c in cells if "error" not in c]
    if not good:
        return {"error": cells[-1]["error"] if cells else "not run"}
    keys = ("iops", "client_us_per_io", "server_us_per_io", "client_cores", "p50_us", "p99_us",
            "own_cpu_s", "softirq_us_per_io", "client_cpus_busy_us_per_io")
    s = {k: median([c.get(k) for c in good]) for k in keys}
    s["passes"] = len(good)
    s["disturbed"] = any(c["disturbed"] for c in good)
    iops = [c["iops"] for c in good]
    s["iops_spread_pct"] = (max(iops) - min(iops)) / s["iops"] * 100 if s["iops"] else None
    return s


def busy_text(f, o):
    fb, ob = f.get("client_cpus_busy_us_per_io"), o.get("client_cpus_busy_us_per_io")
    if not fb or ob is None:
        return f"{'-':>9}{'-':>10}{'-':>7}"
    return f"{fb:>9.2f}{ob:>10.2f}{ob / fb:>7.2f}"


def print_table(ctx, servers, rows, summary):
    print(f"\n## Results (median of {ctx.passes} passes x {ctx.runtime:g} s; "
          "client CPU = CPU seconds per million I/Os = us per I/O)")
    hdr = (f"{'server':<8} {'row':<30}{'fio IOPS':>10}{'ours IOPS':>11}{'x IOPS':>8}"
           f"{'fio CPU':>9}{'ours CPU':>10}{'x CPU':>7}{'srv fio':>9}{'srv ours':>9}"
           f"{'cpu0 fio':>9}{'cpu0 ours':>10}{'x cpu0':>7}  goal")
    print(hdr)
    print("-" * len(hdr))
    verdicts = []
    for s in servers:
        for row in rows:
            f, o = summary[s][row.name]["fio"], summary[s][row.name]["nbdraid"]
            if "error" in f or "error" in o:
                err = f.get("error") or o.get("error")
                print(f"{s:<8} {row.name:<30}  ERROR: {err.splitlines()[0][:80]}")
                verdicts.append(False)
                continue
            ri = o["iops"] / f["iops"] if f["iops"] else None
            rc = o["client_us_per_io"] / f["client_us_per_io"] if f["client_us_per_io"] else None
            ok = ri is not None and rc is not None and ri >= 1.0 and rc <= 0.7
            verdicts.append(ok)
            flag = "!" if f["disturbed"] or o["disturbed"] else " "
            print(f"{s:<8} {row.name:<30}{fmt_k(f['iops']):>10}{fmt_k(o['iops']):>11}"
                  f"{ri:>8.2f}{f['client_us_per_io']:>9.2f}{o['client_us_per_io']:>10.2f}"
                  f"{rc:>7.2f}{f['server_us_per_io']:>9.2f}{o['server_us_per_io']:>9.2f}"
                  f"{busy_text(f, o)}"
                  f"  {'met' if ok else 'MISSED'}{flag}")
    print("\nx IOPS = ours / fio (goal >= 1.00); x CPU = ours / fio client CPU per I/O "
          "(goal <= 0.70); srv = server CPU us per I/O under each client; cpu0 = busy time of "
          "the client's CPU(s) per I/O from /proc/stat (the client process plus interrupts, "
          "softirqs and idle exits on that CPU, which no process is charged for; anything else "
          "that ran there too); "
          "'!' = a kept pass was disturbed by other load.")
    return verdicts


# --------------------------------------------------------------------------
# Main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default="nbdkit,nbdraid", help="comma list of nbdkit, nbdraid")
    p.add_argument("--rows", default="all", help="comma list of rows: " + ", ".join(ROW_BY_NAME))
    p.add_argument("--queue-low", type=int, metavar="L",
                   help="also run every row refilling the queue at L in flight per connection")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--runtime", type=float, default=10.0, help="seconds per run (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s runs, 1 pass, no retries")
    p.add_argument("--size", default="1G", help="export size (default 1G)")
    p.add_argument("--server-cpus", default="1", help="taskset list for servers ('' = unpinned)")
    p.add_argument("--client-cpus", default="0", help="taskset list for clients ('' = unpinned)")
    p.add_argument("--max-other", type=float, default=0.15,
                   help="cores used by others above which a run is disturbed (default 0.15)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed run")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="max seconds to wait for a quiet machine before a run")
    p.add_argument("--nbdraid-bin", required=True, help="the nbdraid CLI (client.sh sets it)")
    p.add_argument("--node-bin", required=True, help="nbdraid-node (client.sh sets it)")
    p.add_argument("--workdir", default="/dev/shm", help="where the temporary dir goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir")
    p.add_argument("--json", metavar="FILE", help="write all raw numbers here")
    a = p.parse_args(argv)
    if a.quick:
        a.runtime, a.passes, a.retries, a.quiet_timeout = 2.0, 1, 0, 5.0
    return a


def cpu_list(text):
    """CPU numbers of a taskset list such as '0', '0,2' or '0-1'."""
    out = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def make_random_file(path, size):
    log(f"writing {size >> 20} MiB of random data to {path} (the prefill source)")
    fill_random(path, size)


def main(argv):
    a = parse_args(argv)

    class Ctx:
        pass
    ctx = Ctx()
    ctx.runtime, ctx.passes, ctx.retries = a.runtime, a.passes, a.retries
    ctx.quiet_timeout, ctx.quiet_sample, ctx.max_other = a.quiet_timeout, 0.5, a.max_other
    ctx.server_cpus, ctx.client_cpus = a.server_cpus, a.client_cpus
    ctx.size = parse_size(a.size)
    ctx.client_cpu_list = cpu_list(a.client_cpus)
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    for n in names:
        if n not in SERVERS:
            sys.exit(f"unknown server {n!r}: use {', '.join(SERVERS)}")
    rows = ROWS if a.rows == "all" else []
    if a.rows != "all":
        for n in a.rows.split(","):
            if n not in ROW_BY_NAME:
                sys.exit(f"unknown row {n!r}; rows: {', '.join(ROW_BY_NAME)}")
            rows.append(ROW_BY_NAME[n])
    if a.queue_low is not None:
        if not 0 <= a.queue_low < 32:
            sys.exit("--queue-low must be between 0 and 31")
        rows = [r for base in rows for r in (base, base.with_low(a.queue_low))]
    ctx.workdir = tempfile.mkdtemp(prefix="nbdraid-clientbench.", dir=a.workdir)
    # Private copies: a rebuild during the run can't change what is measured.
    ctx.nbdraid_bin = os.path.join(ctx.workdir, "nbdraid")
    ctx.node_bin = os.path.join(ctx.workdir, "nbdraid-node")
    shutil.copy2(a.nbdraid_bin, ctx.nbdraid_bin)
    shutil.copy2(a.node_bin, ctx.node_bin)
    ctx.random_file = os.path.join(ctx.workdir, "random.img")

    raise_on_signals()

    servers = {n: SERVERS[n](n, ctx) for n in names}
    raw = {n: {r.name: {c: [] for c in CLIENTS} for r in rows} for n in names}
    try:
        print("# Client benchmark: nbdraid bench (completion ring) vs fio --ioengine=nbd (libnbd)")
        shown = [os.environ.get("CLIENT_SH", sys.argv[0])]
        skip = False
        for x in argv:  # the binaries client.sh passes are shown below
            if skip or x in ("--nbdraid-bin", "--node-bin"):
                skip = not skip
                continue
            shown.append(x)
        print("command: " + " ".join(shlex.quote(x) for x in shown))
        print(f"{'fio':>12}: {first_line(['fio', '--version'])}")
        print(f"{'nbdkit':>12}: {first_line(['nbdkit', '--version'])}")
        print(f"{'nbdraid':>12}: {first_line([ctx.nbdraid_bin, '--version'])} ({a.nbdraid_bin})")
        git, dirty = git_state(os.path.dirname(os.path.abspath(__file__)),
                               ["../../client", "../../proto", "../../nbd-server",
                                "../../Cargo.lock"])
        print(f"{'git':>12}: {git}" + (" + uncommitted changes in the built crates" if dirty else ""))
        print(f"{'settings':>12}: {ctx.passes} passes x {ctx.runtime:g} s, export {a.size}, "
              f"server CPUs {ctx.server_cpus or 'any'}, client CPUs {ctx.client_cpus or 'any'}")
        for row in rows:
            print(f"{row.name:>30}: fio " + " ".join(fio_cmd(ctx, row, "URI", "OUT")[1:]))
            print(f"{'':>30}  nbdraid " + " ".join(nbdraid_cmd(ctx, row, "URI")[1:]))
        sys.stdout.flush()
        make_random_file(ctx.random_file, ctx.size)
        t0 = time.monotonic()
        for pass_no in range(ctx.passes):
            order = names[pass_no % len(names):] + names[:pass_no % len(names)]
            clients = CLIENTS if pass_no % 2 == 0 else CLIENTS[::-1]
            for n in order:
                srv = servers[n]
                log(f"pass {pass_no + 1}/{ctx.passes}: {n}")
                try:
                    srv.start()
                    for row in rows:
                        for c in clients:
                            raw[n][row.name][c].append(run_cell(ctx, srv, row, c, pass_no))
                except RuntimeError as e:
                    log(f"  {n}: ERROR {e}")
                    for row in rows:
                        for c in CLIENTS:
                            if len(raw[n][row.name][c]) <= pass_no:
                                raw[n][row.name][c].append({"error": str(e)})
                finally:
                    srv.stop()
        summary = {n: {r: {c: summarize(raw[n][r][c]) for c in CLIENTS} for r in raw[n]}
                   for n in names}
        verdicts = print_table(ctx, names, rows, summary)
        met = sum(verdicts)
        print(f"goal met on {met} of {len(verdicts)} rows; total time {time.monotonic() - t0:.0f}s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"argv": argv, "rows": [r.name for r in rows], "servers": names,
                           "summary": summary, "raw": raw}, f, indent=1, default=str)
            print(f"raw numbers: {a.json}")
        return 0
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping servers")
        return 130
    finally:
        Proc.stop_all()
        if a.keep:
            log(f"kept {ctx.workdir}")
        else:
            shutil.rmtree(ctx.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
