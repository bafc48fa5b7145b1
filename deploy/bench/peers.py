#!/usr/bin/env python3
"""Side-by-side benchmark of NBD servers serving the same file.

Serves ONE backing file (prefilled with random data, on /dev/shm) from
nbdraid-node, nbd-server, nbdkit (file plugin) and qemu-nbd on 127.0.0.1,
one server at a time, and runs the same fio (ioengine=nbd) and nbdcopy
matrix against each.  Standard library only.

What is measured, and why (see /work/shared/benchmarking.md):

* Throughput, IOPS and p99 completion latency come from fio's JSON
  (--output=FILE, because fio prints a line before its JSON on stdout).
* Server CPU time per I/O is the honest efficiency figure.  It is taken
  from /proc/PID/stat of the server over the measured window: utime +
  stime (fields 14, 15) cover all of its threads, including threads that
  have exited (nbdkit's per-connection threads); cutime + cstime (fields
  16, 17) cover children it has reaped (nbd-server forks one child per
  connection).  The script samples the sum of all four over the server's
  whole process tree, and only when the server has no child left (it waits,
  bounded, for the per-connection children to exit and be reaped), so a
  child's time is counted exactly once.
* The CPU used by everything else during the window = busy time from
  /proc/stat (wall x CPUs minus idle and iowait, which are exact here,
  unlike the tick-sampled user/system fields) minus the server tree,
  minus the load generator (rusage from wait4, which includes fio's
  per-job processes) and minus this script.  A pass where that exceeds
  --max-other cores is flagged as disturbed and repeated (--retries); the
  least disturbed attempt is kept and a cell still disturbed is marked "!".
  Before every pass the script also waits (bounded) for the machine to be
  quiet.
* Server pinned to --server-cpus, load generator to --client-cpus.
* Order: for each row, for each pass, every server in turn (the order
  rotates from pass to pass), each started fresh and stopped afterwards.
  Rows are therefore compared within a few minutes of each other.
  Medians over passes are reported.

Every process this script starts is stopped by PID (SIGTERM, bounded wait,
then SIGKILL), on success, error or signal.
"""

import argparse
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import (CLK_TCK, KIB, Proc, busy_cores, command_line, cpu_model,  # noqa: E402
                      fill_random, fio_nbd_cmd, first_line, fmt_k, free_port, git_state, log,
                      log_tail, median_of, parse_size, proc_comm, raise_on_signals, run_child,
                      run_fio_json, self_cpu, start_nbdkit, start_with_ready_file, sys_cpu,
                      taskset, tree_cpu_ticks, wait_no_children, wait_quiet, write_raw_json)

EXPORT = "bench"
PEERS = ("nbd-server", "nbdkit", "qemu-nbd")
NBDRAID = "nbdraid"


# --------------------------------------------------------------------------
# The matrix


class Row:
    """One line of the matrix: a fio job or an nbdcopy run."""

    def __init__(self, name, desc, kind="fio", ratio="iops", **fio):
        self.name, self.desc, self.kind, self.ratio, self.fio = name, desc, kind, ratio, fio

    @property
    def connections(self):
        return self.fio.get("numjobs", 1)


ROWS = [
    Row("randread-4k-qd1", "4 KiB random read, QD1, 1 connection",
        rw="randread", bs="4k", iodepth=1),
    Row("randread-4k-qd32", "4 KiB random read, QD32, 1 connection",
        rw="randread", bs="4k", iodepth=32),
    Row("randwrite-4k-qd32", "4 KiB random write, QD32, 1 connection",
        rw="randwrite", bs="4k", iodepth=32),
    Row("randrw70-64k-qd16", "64 KiB random 70% read / 30% write, QD16, 1 connection",
        rw="randrw", rwmixread=70, bs="64k", iodepth=16),
    Row("read-1m-qd8", "1 MiB sequential read, QD8, 1 connection", ratio="tput",
        rw="read", bs="1M", iodepth=8),
    Row("write-1m-qd8", "1 MiB sequential write, QD8, 1 connection", ratio="tput",
        rw="write", bs="1M", iodepth=8),
    Row("randread-4k-4conn", "4 KiB random read, 4 connections (numjobs=4) x QD8 each = 32 in flight",
        rw="randread", bs="4k", iodepth=8, numjobs=4),
    Row("nbdcopy", "nbdcopy of the whole export to null: (repeated for --runtime)",
        kind="nbdcopy", ratio="tput"),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


def probe_size(uri, timeout):
    """Waits until nbdinfo can connect; returns the export size."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True,
                               timeout=5)
            if r.returncode == 0:
                return int(r.stdout.strip())
            last = r.stderr.strip()
        except subprocess.TimeoutExpired:
            last = "nbdinfo timed out"
        time.sleep(0.05)
    raise RuntimeError(f"{uri} not serving after {timeout}s: {last}")


# --------------------------------------------------------------------------
# Servers


class Server:
    """One server configuration: start() serves the backing file, stop()."""

    base = None

    def __init__(self, name, ctx):
        self.name, self.ctx = name, ctx
        self.proc, self.port = None, None

    @property
    def uri(self):
        return f"nbd://127.0.0.1:{self.port}/{EXPORT}"

    @property
    def pid(self):
        return self.proc.pid

    def logpath(self):
        return os.path.join(self.ctx.workdir, f"{self.name.replace(':', '_')}.log")

    def pin(self):
        return taskset(self.ctx.server_cpus)

    def start(self):
        err = None
        for _ in range(3):
            try:
                self._start()
                size = probe_size(self.uri, 15)
                if size != self.ctx.size:
                    raise RuntimeError(f"{self.name} serves {size} bytes, want {self.ctx.size}")
                return
            except Exception as e:  # retried on another port, then reported
                err = e
                if self.proc is not None:
                    self.proc.stop()
                    self.proc = None
        raise RuntimeError(f"{self.name} failed to start: {err}\n{log_tail(self.logpath())}")

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def affinity(self):
        try:
            return sorted(os.sched_getaffinity(self.pid))
        except OSError:
            return None


class Nbdkit(Server):
    base = "nbdkit"

    def _start(self):
        self.proc, self.port = start_nbdkit(
            self.pin(), ["-e", EXPORT, "file", f"file={self.ctx.backing}"], self.logpath())


class QemuNbd(Server):
    base = "qemu-nbd"

    def _start(self):
        self.port = free_port()
        shared = max(8, self.ctx.max_connections + 2)
        cmd = self.pin() + ["qemu-nbd", "--persistent", f"--shared={shared}", "-f", "raw",
                            "-b", "127.0.0.1", "-p", str(self.port), "-x", EXPORT,
                            self.ctx.backing]
        self.proc = Proc(cmd, self.logpath())


class NbdServer(Server):
    """nbd-server daemonizes (the PID comes from its pidfile), forks one
    child per connection and logs only to syslog."""

    base = "nbd-server"

    def _start(self):
        self.port = free_port()
        conf = os.path.join(self.ctx.workdir, "nbd-server.conf")
        pidfile = os.path.join(self.ctx.workdir, "nbd-server.pid")
        with open(conf, "w") as f:
            f.write(f"[generic]\nport = {self.port}\nlistenaddr = 127.0.0.1\n"
                    f"allowlist = true\n[{EXPORT}]\nexportname = {self.ctx.backing}\n")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        cmd = self.pin() + ["nbd-server", "-C", conf, "-p", pidfile]
        with open(self.logpath(), "ab") as logf:
            fg = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            fg.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fg.kill()
            fg.wait(timeout=5)
            raise RuntimeError("nbd-server did not daemonize")
        deadline = time.monotonic() + 10
        pid = None
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.02)
        if pid is None or proc_comm(pid) != "nbd-server":
            raise RuntimeError(f"nbd-server wrote no usable pidfile (exit {fg.returncode})")
        self.proc = Proc.adopt(pid, cmd, self.logpath())


class Nbdraid(Server):
    base = NBDRAID

    def __init__(self, name, ctx, extra):
        super().__init__(name, ctx)
        # A variant's first word `@PATH` names another nbdraid-node binary
        # (an older build, to compare versions side by side).
        self.bin = ctx.node_bin
        if extra and extra[0].startswith("@"):
            self.bin, extra = extra[0][1:], extra[1:]
        self.extra = extra

    def _start(self):
        ready = os.path.join(self.ctx.workdir, "node.ready")
        cmd = self.pin() + [self.bin, "--listen", "127.0.0.1:0",
                            "--data-dir", self.ctx.data_dir,
                            "--volume", f"{EXPORT}:{self.ctx.size_spec}",
                            "--ready-file", ready] + self.ctx.node_args + self.extra
        self.proc, info = start_with_ready_file(cmd, ready, self.logpath())
        host, port = info["nbd"].rsplit(":", 1)
        if host != "127.0.0.1":
            raise RuntimeError(f"nbdraid-node listens on {info['nbd']}")
        self.port = int(port)


def make_servers(ctx, names, variants):
    servers = []
    for name in names:
        if name == NBDRAID:
            servers.append(Nbdraid(name, ctx, []))
        elif name.startswith(NBDRAID + ":"):
            var = name.split(":", 1)[1]
            if var not in variants:
                sys.exit(f"server {name}: no --variant {var}=... defined")
            servers.append(Nbdraid(name, ctx, variants[var]))
        elif name == "nbd-server":
            servers.append(NbdServer(name, ctx))
        elif name == "nbdkit":
            servers.append(Nbdkit(name, ctx))
        elif name == "qemu-nbd":
            servers.append(QemuNbd(name, ctx))
        else:
            sys.exit(f"unknown server {name!r}: use nbdraid, nbdraid:VARIANT, {', '.join(PEERS)}")
    return servers


# --------------------------------------------------------------------------
# Loads


def fio_cmd(ctx, row, uri, out):
    f = row.fio
    extra = [f"--rwmixread={f['rwmixread']}"] if "rwmixread" in f else []
    return fio_nbd_cmd(row.name, uri, out, ctx.runtime, f["rw"], f["bs"], f["iodepth"],
                       numjobs=f.get("numjobs", 1), extra=extra)


def run_fio(ctx, row, srv):
    out = os.path.join(ctx.workdir, "fio.json")
    cmd = ctx.client_pin() + fio_cmd(ctx, row, srv.uri, out)
    job, cpu, _ = run_fio_json(cmd, out, ctx.runtime + 60)
    res = {"ios": 0, "iops": 0.0, "bytes_per_s": 0.0, "client_cpu_s": cpu, "cmd": cmd}
    for d in ("read", "write"):
        s = job[d]
        if s["total_ios"] == 0:
            continue
        res["ios"] += s["total_ios"]
        res["iops"] += s["iops"]
        res["bytes_per_s"] += s["bw_bytes"]
        pct = s["clat_ns"].get("percentile", {})
        res[f"{d}_p50_us"] = pct.get("50.000000", 0) / 1e3
        res[f"{d}_p99_us"] = pct.get("99.000000", 0) / 1e3
        res[f"{d}_p999_us"] = pct.get("99.900000", 0) / 1e3
        res[f"{d}_mean_us"] = s["clat_ns"]["mean"] / 1e3
        res[f"{d}_iops"] = s["iops"]
    res["fio_usr_cpu_pct"], res["fio_sys_cpu_pct"] = job["usr_cpu"], job["sys_cpu"]
    return res


def run_nbdcopy(ctx, row, srv):
    cmd = ctx.client_pin() + ["nbdcopy"] + ctx.nbdcopy_args + [srv.uri, "null:"]
    copies, busy, cpu = 0, 0.0, 0.0
    while copies == 0 or busy < ctx.runtime:
        t = time.monotonic()
        rc, c, text = run_child(cmd, 120)
        busy += time.monotonic() - t
        if rc != 0:
            raise RuntimeError(f"nbdcopy exit {rc}: {text[-500:]}")
        copies += 1
        cpu += c
    per_copy = -(-ctx.size // ctx.nbdcopy_request_size)
    return {"ios": copies * per_copy, "iops": copies * per_copy / busy,
            "bytes_per_s": copies * ctx.size / busy, "copies": copies,
            "copy_s": busy / copies, "client_cpu_s": cpu, "cmd": cmd}


# --------------------------------------------------------------------------
# One measurement


def measure(ctx, row, srv):
    pid = srv.pid
    if not wait_no_children(pid, 10):
        raise RuntimeError(f"{srv.name} still has children before the run")
    cpu0, me0, sys0 = tree_cpu_ticks(pid), self_cpu(), sys_cpu()
    res = run_fio(ctx, row, srv) if row.kind == "fio" else run_nbdcopy(ctx, row, srv)
    settled = wait_no_children(pid, 10)
    sys1, cpu1, me1 = sys_cpu(), tree_cpu_ticks(pid), self_cpu()
    if not srv.proc.running():
        raise RuntimeError(f"{srv.name} died during the run: {log_tail(srv.logpath())}")
    wall = sys1[0] - sys0[0]
    server_s = (cpu1 - cpu0) / CLK_TCK
    busy = busy_cores(sys0, sys1)
    me_s = me1 - me0
    other_s = busy["cpu"] * wall - server_s - res["client_cpu_s"] - me_s
    res.update(
        wall_s=wall, server_cpu_s=server_s, self_cpu_s=me_s, busy_cores=busy["cpu"],
        server_cores=server_s / wall, client_cores=res["client_cpu_s"] / wall,
        other_cores=other_s / wall, steal_cores=busy["steal"],
        per_cpu_busy_cores={k: v for k, v in busy.items() if k not in ("cpu", "steal")},
        server_us_per_io=server_s * 1e6 / res["ios"] if res["ios"] else None,
        client_us_per_io=res["client_cpu_s"] * 1e6 / res["ios"] if res["ios"] else None,
        children_settled=settled,
    )
    res["disturbed"] = res["other_cores"] > ctx.max_other
    return res


def run_cell(ctx, row, srv, pass_no):
    """Starts srv, measures row (retrying disturbed passes), stops srv."""
    attempts = []
    try:
        srv.start()
        aff = srv.affinity()
        for attempt in range(ctx.retries + 1):
            waited = wait_quiet(ctx)
            r = measure(ctx, row, srv)
            r.update(attempt=attempt, quiet_wait_s=waited, server_affinity=aff)
            attempts.append(r)
            log(f"  [{row.name} pass {pass_no + 1}] {srv.name:<20} {fmt_k(r['iops']):>7} IOPS "
                f"{r['bytes_per_s'] / 1e6:8.1f} MB/s  srv {r['server_us_per_io']:8.2f} us/IO "
                f"({r['server_cores']:.2f} cores)  other {r['other_cores']:+.2f} cores"
                + ("  DISTURBED" if r["disturbed"] else ""))
            if not r["disturbed"]:
                break
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        log(f"  [{row.name} pass {pass_no + 1}] {srv.name}: ERROR {e}")
        attempts.append({"error": str(e)})
    finally:
        srv.stop()
    good = [a for a in attempts if "error" not in a]
    chosen = min(good, key=lambda a: a["other_cores"]) if good else attempts[-1]
    return {"chosen": chosen, "attempts": attempts}


# --------------------------------------------------------------------------
# Summaries and output


def summarize(passes):
    good = [p["chosen"] for p in passes if "error" not in p["chosen"]]
    if not good:
        return {"error": passes[-1]["chosen"]["error"] if passes else "not run"}
    m = {k: median_of(good, k) for k in (
        "iops", "bytes_per_s", "read_p99_us", "write_p99_us", "server_us_per_io",
        "client_us_per_io", "server_cores", "client_cores", "other_cores", "steal_cores")}
    iops = [p["iops"] for p in good]
    m["iops_spread_pct"] = (max(iops) - min(iops)) / m["iops"] * 100 if m["iops"] else None
    m["max_other_cores"] = max(p["other_cores"] for p in good)
    m["disturbed_passes"] = sum(p["disturbed"] for p in good)
    m["passes"] = len(good)
    m["errors"] = len(passes) - len(good)
    return m


def ratios(row, summ, servers):
    """nbdraid variants against the best peer: IOPS (or MB/s) and CPU/IO."""
    peers = [s.name for s in servers if s.base != NBDRAID and "error" not in summ[s.name]]
    out = {}
    if not peers:
        return out
    key = "iops" if row.ratio == "iops" else "bytes_per_s"
    best_perf = max(peers, key=lambda n: summ[n][key])
    cpu_peers = [n for n in peers if summ[n]["server_us_per_io"]]
    best_cpu = min(cpu_peers, key=lambda n: summ[n]["server_us_per_io"]) if cpu_peers else None
    for s in servers:
        if s.base != NBDRAID or "error" in summ[s.name]:
            continue
        me = summ[s.name]
        r = {"metric": key, "best_peer": best_perf,
             "perf_ratio": me[key] / summ[best_perf][key] if summ[best_perf][key] else None}
        if best_cpu and me["server_us_per_io"]:
            r["cpu_best_peer"] = best_cpu
            r["cpu_ratio"] = me["server_us_per_io"] / summ[best_cpu]["server_us_per_io"]
        involved = {s.name, best_perf, best_cpu} - {None}
        r["disturbed"] = any(summ[n]["disturbed_passes"] for n in involved)
        out[s.name] = r
    return out


def p99_text(m):
    r, w = m.get("read_p99_us"), m.get("write_p99_us")
    if r is not None and w is not None:
        return f"{r:.0f}/{w:.0f}"
    v = r if r is not None else w
    return "-" if v is None else f"{v:.0f}"


def print_row_table(row, summ, rat, servers, passes):
    print(f"\n## {row.name}: {row.desc} (median of {passes} passes)")
    hdr = (f"{'server':<22}{'IOPS':>9}{'spread':>8}{'MB/s':>9}{'p99 us':>14}"
           f"{'srv us/IO':>11}{'srv cores':>10}{'fio us/IO':>10}{'other':>8}")
    print(hdr)
    print("-" * len(hdr))
    for s in servers:
        m = summ[s.name]
        if "error" in m:
            print(f"{s.name:<22}  ERROR: {m['error'].splitlines()[0][:90]}")
            continue
        flag = "!" if m["disturbed_passes"] else " "
        sp = "-" if m["iops_spread_pct"] is None else f"{m['iops_spread_pct']:.0f}%"
        su = "-" if m["server_us_per_io"] is None else f"{m['server_us_per_io']:.2f}"
        cu = "-" if m["client_us_per_io"] is None else f"{m['client_us_per_io']:.2f}"
        print(f"{s.name:<22}{fmt_k(m['iops']):>9}{sp:>8}{m['bytes_per_s'] / 1e6:>9.0f}"
              f"{p99_text(m):>14}{su:>11}{m['server_cores']:>10.2f}{cu:>10}"
              f"{m['max_other_cores']:>7.2f}{flag}")
    for name, r in rat.items():
        what = "IOPS" if r["metric"] == "iops" else "throughput"
        line = f"  {name} vs best peer: {what} x{r['perf_ratio']:.2f} (best {r['best_peer']})"
        if "cpu_ratio" in r:
            line += (f"; server CPU/IO x{r['cpu_ratio']:.2f} (best {r['cpu_best_peer']};"
                     " <1 = nbdraid cheaper)")
        if r["disturbed"]:
            line += "  [! a compared cell had a disturbed pass]"
        print(line)


def print_summary(results, servers):
    mine = [s.name for s in servers if s.base == NBDRAID]
    if not mine:
        return
    print("\n## Summary: nbdraid vs best peer per row "
          "(IOPS or throughput ratio, higher better / server CPU per I/O ratio, lower better)")
    print(f"{'row':<22}" + "".join(f"{n:>26}" for n in mine))
    for rowname, rr in results.items():
        cells = []
        for n in mine:
            r = rr["ratios"].get(n)
            if not r:
                cells.append(f"{'-':>26}")
                continue
            c = f"x{r['cpu_ratio']:.2f}" if "cpu_ratio" in r else "-"
            flag = "!" if r["disturbed"] else " "
            cells.append(f"{'x%.2f / %s' % (r['perf_ratio'], c):>25}{flag}")
        print(f"{rowname:<22}" + "".join(cells))


def environment(ctx, servers):
    env = {
        "kernel": platform.release(), "cpu_model": cpu_model(), "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "fio": first_line(["fio", "--version"]),
        "nbdcopy": first_line(["nbdcopy", "--version"]),
        "nbd-server": first_line(["nbd-server", "-V"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
    }
    if any(s.base == NBDRAID for s in servers):
        env["nbdraid-node"] = f"{first_line([ctx.node_bin, '--version'])} ({ctx.node_bin_source})"
        try:
            with open(ctx.node_bin, "rb") as f:
                env["nbdraid-node-sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
            env["nbdraid-node-mtime"] = time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(os.stat(ctx.node_bin_source).st_mtime))
        except OSError:
            pass
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if os.path.realpath(ctx.node_bin_source).startswith(os.path.realpath(root) + os.sep):
            # Built from this tree: the commit checked out now (the binary may be older:
            # compare its mtime), and whether the node sources have local edits.
            head, dirty = git_state(root, ["nbd-server", "proto", "Cargo.toml", "Cargo.lock"])
            env["repo-head-at-run"] = head + (" + uncommitted node changes" if dirty else "")
    return env


# --------------------------------------------------------------------------
# Backing file


def prepare_backing(ctx, servers):
    """Creates the node's volume (by starting nbdraid-node once, so its
    catalog knows it), then fills that same file with random data in place."""
    os.makedirs(os.path.join(ctx.data_dir, "volumes"), exist_ok=True)
    if any(s.base == NBDRAID for s in servers):
        node = Nbdraid("nbdraid-create", ctx, [])  # --node-arg only, no variant args
        log(f"creating volume {EXPORT}:{ctx.size_spec} with nbdraid-node")
        try:
            node.start()
        except RuntimeError as e:
            sys.exit(f"cannot create the volume: {e}")
        finally:
            node.stop()
        if not os.path.exists(ctx.backing):
            sys.exit(f"nbdraid-node did not create {ctx.backing}")
    else:
        with open(ctx.backing, "wb") as f:
            f.truncate(ctx.size)
    if os.path.getsize(ctx.backing) != ctx.size:
        sys.exit(f"{ctx.backing} is {os.path.getsize(ctx.backing)} bytes, want {ctx.size}")
    log(f"filling {ctx.backing} with {ctx.size >> 20} MiB of random data")
    t = time.monotonic()
    fill_random(ctx.backing, ctx.size)  # in place: size and file unchanged
    assert os.path.getsize(ctx.backing) == ctx.size
    log(f"  filled in {time.monotonic() - t:.1f}s")


# --------------------------------------------------------------------------
# Main


class Ctx:
    def client_pin(self):
        return taskset(self.client_cpus)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Side-by-side benchmark of nbdraid-node and peer NBD servers "
                    "(nbd-server, nbdkit file, qemu-nbd) serving the same file.",
        epilog="peers.sh builds nbdraid-node first unless given --no-build. Example: "
               "peers.sh --variant nothrottle='--no-throttle' "
               "--servers nbdraid,nbdraid:nothrottle,nbdkit --rows randwrite-4k-qd32")
    p.add_argument("--servers", default=",".join((NBDRAID,) + PEERS),
                   help="comma list of nbdraid, nbdraid:VARIANT, nbd-server, nbdkit, qemu-nbd "
                        "(default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME='ARGS'",
                   help="defines nbdraid:NAME, nbdraid-node with these extra arguments; "
                        "a first word @PATH runs that nbdraid-node binary instead")
    p.add_argument("--node-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every nbdraid-node (use --node-arg=--flag)")
    p.add_argument("--node-bin", default=None, help="nbdraid-node binary (peers.sh sets it)")
    p.add_argument("--rows", default="all", help="comma list of rows, or 'all' (see --list-rows)")
    p.add_argument("--list-rows", action="store_true")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--runtime", type=float, default=10.0, help="seconds per pass (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 1 s runtime, 1 pass, no retries, short quiet wait")
    p.add_argument("--size", default="1G", help="export size (default 1G)")
    p.add_argument("--server-cpus", default="1", help="taskset list for servers ('' = unpinned)")
    p.add_argument("--client-cpus", default="0", help="taskset list for fio/nbdcopy ('' = unpinned)")
    p.add_argument("--max-other", type=float, default=0.15,
                   help="cores used by others above which a pass is disturbed (default 0.15; "
                        "a quiet machine shows 0.02-0.08 here)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a disturbed pass (default 2)")
    p.add_argument("--quiet-timeout", type=float, default=120.0,
                   help="max seconds to wait for a quiet machine before a pass (default 120)")
    p.add_argument("--nbdcopy-args", default="--no-extents --connections=1 --request-size=262144",
                   help="nbdcopy options (default: %(default)s)")
    p.add_argument("--workdir", default="/dev/shm", help="where the temporary dir goes")
    p.add_argument("--keep", action="store_true", help="keep the temporary dir (logs, data)")
    p.add_argument("--json", metavar="FILE", help="write all raw numbers here")
    a = p.parse_args(argv)
    if a.list_rows:
        for r in ROWS:
            print(f"{r.name:<22} {r.desc}")
        sys.exit(0)
    if a.quick:
        a.runtime, a.passes, a.retries, a.quiet_timeout = 1.0, 1, 0, 5.0
    return a


def main(argv):
    a = parse_args(argv)
    ctx = Ctx()
    ctx.runtime, ctx.passes, ctx.retries = a.runtime, a.passes, a.retries
    ctx.quiet_timeout, ctx.quiet_sample, ctx.max_other = a.quiet_timeout, 0.5, a.max_other
    ctx.server_cpus, ctx.client_cpus = a.server_cpus, a.client_cpus
    ctx.size_spec, ctx.size = a.size, parse_size(a.size)
    ctx.node_args = a.node_arg
    ctx.nbdcopy_args = shlex.split(a.nbdcopy_args)
    ctx.nbdcopy_request_size = 256 * KIB
    for x in ctx.nbdcopy_args:
        if x.startswith("--request-size="):
            ctx.nbdcopy_request_size = parse_size(x.split("=", 1)[1])
    variants = {}
    for v in a.variant:
        name, sep, args = v.partition("=")
        if not sep or not name:
            sys.exit(f"--variant wants NAME='ARGS', got {v!r}")
        variants[name] = shlex.split(args)
    rows = ROWS if a.rows == "all" else []
    if a.rows != "all":
        for n in a.rows.split(","):
            if n not in ROW_BY_NAME:
                sys.exit(f"unknown row {n!r}; rows: {', '.join(ROW_BY_NAME)}")
            rows.append(ROW_BY_NAME[n])
    names = [n.strip() for n in a.servers.split(",") if n.strip()]
    if len(set(names)) != len(names):
        sys.exit("--servers lists a server twice; define a --variant instead")
    ctx.max_connections = max(r.connections for r in rows)
    ctx.node_bin = a.node_bin
    if any(n.split(":")[0] == NBDRAID for n in names):
        if not ctx.node_bin or not os.access(ctx.node_bin, os.X_OK):
            sys.exit(f"nbdraid-node binary not found ({ctx.node_bin}); run via peers.sh "
                     "or pass --node-bin")
    servers = make_servers(ctx, names, variants)
    ctx.workdir = tempfile.mkdtemp(prefix="nbdraid-bench.", dir=a.workdir)
    ctx.data_dir = os.path.join(ctx.workdir, "node")
    ctx.backing = os.path.join(ctx.data_dir, "volumes", f"{EXPORT}.img")
    ctx.node_bin_source = ctx.node_bin
    if any(s.base == NBDRAID for s in servers):
        # Run a private copy: a rebuild during the run must not change the
        # binary under test between cells.
        ctx.node_bin = os.path.join(ctx.workdir, "nbdraid-node")
        shutil.copy2(ctx.node_bin_source, ctx.node_bin)

    raise_on_signals()

    results = {}
    config = {
        "argv": argv, "servers": names, "variants": variants, "node_args": ctx.node_args,
        "rows": [r.name for r in rows], "passes": ctx.passes, "runtime_s": ctx.runtime,
        "size": ctx.size, "server_cpus": ctx.server_cpus, "client_cpus": ctx.client_cpus,
        "max_other_cores": ctx.max_other, "retries": ctx.retries,
        "nbdcopy_args": ctx.nbdcopy_args, "backing_file": ctx.backing,
        "fio_commands": {r.name: fio_cmd(ctx, r, "URI", "OUT") for r in rows if r.kind == "fio"},
    }
    env = environment(ctx, servers)
    try:
        print("# NBD server side-by-side benchmark")
        print("command: " + command_line(argv))
        for k, v in env.items():
            print(f"{k:>26}: {v}")
        print(f"{'settings':>26}: {ctx.passes} passes x {ctx.runtime:g}s, size {ctx.size_spec}, "
              f"server CPUs {ctx.server_cpus or 'any'}, client CPUs {ctx.client_cpus or 'any'}, "
              f"disturbed above {ctx.max_other} cores of other load, {ctx.retries} retries")
        print(f"{'backing file':>26}: {ctx.backing} (tmpfs, random data)")
        print(f"{'nbdcopy':>26}: nbdcopy {' '.join(ctx.nbdcopy_args)} URI null:")
        sys.stdout.flush()
        prepare_backing(ctx, servers)
        t_start = time.monotonic()
        for row in rows:
            log(f"row {row.name}: {row.desc}")
            cells = {s.name: [] for s in servers}
            for pass_no in range(ctx.passes):
                k = pass_no % len(servers)
                for srv in servers[k:] + servers[:k]:
                    cells[srv.name].append(run_cell(ctx, row, srv, pass_no))
            summ = {n: summarize(c) for n, c in cells.items()}
            rat = ratios(row, summ, servers)
            results[row.name] = {"desc": row.desc, "summary": summ, "ratios": rat,
                                 "passes": cells}
            print_row_table(row, summ, rat, servers, ctx.passes)
            sys.stdout.flush()
        print_summary(results, servers)
        print("\nColumns: IOPS and MB/s (10^6 bytes/s) are medians over passes; spread = "
              "(max-min)/median of IOPS; p99 = fio completion-latency p99 in us (read/write "
              "for mixed rows); srv us/IO = server process-tree CPU time / I/Os completed; "
              "srv cores = server CPU / wall time; fio us/IO = load generator CPU / I/O; "
              "other = largest CPU use (cores) by everything else during a kept pass, "
              "'!' = a kept pass was still disturbed (in the summary: a compared cell was). nbdcopy: one I/O = one "
              f"{ctx.nbdcopy_request_size >> 10} KiB request.")
        print(f"total time {time.monotonic() - t_start:.0f}s")
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); stopping servers")
        return 130
    finally:
        Proc.stop_all()
        if a.json:
            write_raw_json(a.json, {"environment": env, "config": config, "results": results})
        if a.keep:
            log(f"kept {ctx.workdir}")
        else:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
