"""What the benchmarks in deploy/bench share (peers.py, client.py, memory.py,
arraybench.py, throttle.py, recovery.py).

* Processes: `Proc` starts a process in its own session and stops it only
  by its PID (SIGTERM, bounded wait, SIGKILL, then any descendants left);
  `Proc.stop_all()` in a `finally` plus `raise_on_signals()` leave nothing
  running on success, error or signal.  `run_child` runs a load generator
  to completion and returns its rusage CPU.
* Servers: `start_with_ready_file` (nbdraid-node's --ready-file, checked
  against the PID we started) and `start_nbdkit` (nbdkit on port 0, the
  port read back from /proc, so no port race); `free_port` for servers that
  can do neither.  `taskset` builds the pinning prefix.
* CPU accounting from /proc: a process tree's CPU ticks
  (`tree_cpu_ticks`), the machine's busy cores (`sys_cpu`, `busy_cores`),
  this script's own CPU (`self_cpu`), and `wait_quiet` before a run.
  Memory: `status_kib` (a /proc/PID/status field: VmHWM, RssAnon...).
* Metrics: `scrape_metrics` (a daemon's Prometheus endpoint) and
  `prom_samples` (one metric's samples with their labels).
* fio: `fio_nbd_cmd` (the --ioengine=nbd command line, one job),
  `fio_nbd_jobs_cmd` (several jobs, one report per job), `run_fio_json`,
  `read_fio_job` and `read_fio_jobs` (its JSON output), `fio_stats`
  (throughput and latency percentiles of one job).
* Reports: `median` and `median_of` (over passes, skipping missing values),
  `f2` (a number or '-'), `cpu_model`, `command_line` (the command as
  typed) and `write_raw_json` (the --json file).

Standard library only; every wait is bounded.
"""

import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def parse_size(text):
    """Parses '1G', '512M', '4096' (binary suffixes) into bytes."""
    text = text.strip()
    mult = {"K": KIB, "M": MIB, "G": GIB, "T": GIB * 1024}
    if text[-1:].upper() in mult:
        return int(float(text[:-1]) * mult[text[-1].upper()])
    return int(text)


def fmt_k(x):
    if x is None:
        return "-"
    return f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


def f2(x, fmt="{:.2f}"):
    """`x` formatted by `fmt` (two decimals by default), '-' for None."""
    return "-" if x is None else fmt.format(x)


def median(vals):
    """The median of the values that are not None; None if there are none
    (a pass that failed or did not measure it)."""
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def median_of(passes, key):
    """The median of `key` over the passes (dicts) that have a value for it."""
    return median([p.get(key) for p in passes])


def log_tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def first_line(cmd):
    """The first line a command prints (a version string), or why there is none."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return f"unknown ({' '.join(cmd)} exited {r.returncode})"
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unavailable"


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, "unknown" if it names none."""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def command_line(argv, env_var=None):
    """The command as typed, for a report: the .sh wrapper exports it in
    `env_var` (its own name, --no-build included, without the binaries it
    adds); run directly, this script and `argv`."""
    direct = " ".join(shlex.quote(x) for x in [sys.argv[0]] + argv)
    return os.environ.get(env_var, direct) if env_var else direct


def write_raw_json(path, doc):
    """Writes a run's raw numbers `doc` to `path` as JSON (what JSON has no
    type for as its str()) and says where on stderr."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    log(f"raw numbers in {path}")


def git_state(root, paths):
    """(short HEAD of the repository at root, whether `paths` have local edits)."""
    head = first_line(["git", "-C", root, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--"] + list(paths),
                           capture_output=True, text=True).stdout.strip()
    return head, bool(dirty)


def taskset(cpus):
    """The command prefix that pins to a taskset CPU list ('' = unpinned)."""
    return ["taskset", "-c", cpus] if cpus else []


def fill_random(path, size):
    """Writes `size` random bytes over the start of `path` in place (created if
    missing; never truncated), so a file's size and identity stay as they were."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        off = 0
        while off < size:
            n = min(16 * MIB, size - off)
            os.pwrite(fd, os.urandom(n), off)
            off += n
    finally:
        os.close(fd)


def raise_on_signals():
    """Turns SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so `finally`
    blocks stop what the script started.  SIGINT too: a shell starts
    background jobs with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler of its own."""
    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


# --------------------------------------------------------------------------
# /proc


def proc_stat(pid):
    """Returns the fields of /proc/PID/stat after the comm, or None if gone.

    Index 0 is field 3 (state); field N of proc(5) is index N - 3."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return s[s.rindex(")") + 2:].split()


def proc_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def start_time(pid):
    st = proc_stat(pid)
    return int(st[19]) if st else None


def alive(pid, starttime):
    st = proc_stat(pid)
    return st is not None and int(st[19]) == starttime and st[0] not in ("Z", "X")


def descendants(pid):
    """PIDs of all live descendants of pid (zombies included)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = proc_stat(d)
            if st:
                children.setdefault(int(st[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree_cpu_ticks(pid):
    """utime+stime+cutime+cstime summed over pid and its live descendants.

    A reaped child's time sits in its parent's cutime/cstime, a live one's
    in its own fields: the sum is the whole tree's CPU, counted once, as
    long as no child is reaped between the reads (callers sample only when
    the server has no children)."""
    total = 0
    for p in [pid] + descendants(pid):
        st = proc_stat(p)
        if st:
            total += sum(int(x) for x in st[11:15])
    return total


def wait_no_children(pid, timeout):
    deadline = time.monotonic() + timeout
    while descendants(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def sys_cpu():
    """(monotonic time, {cpu name: (idle+iowait ticks, steal ticks)}).

    Busy time is derived from idle time: with tick-based accounting and
    NO_HZ (this kernel) the idle/iowait fields are exact while user/system
    are sampled at the tick, which under-counts processes that sleep and
    wake thousands of times a second (at QD1 by ~0.2 cores here)."""
    out = {}
    with open("/proc/stat") as f:
        t = time.monotonic()
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *v = line.split()
            out[name] = (int(v[3]) + int(v[4]), int(v[7]))
    return t, out


def busy_cores(a, b):
    """Average busy cores per CPU name between two sys_cpu() samples."""
    (ta, sa), (tb, sb) = a, b
    wall = tb - ta
    ncpu = sum(1 for k in sa if k != "cpu")
    out = {}
    for k in sb:
        n = ncpu if k == "cpu" else 1
        out[k] = n - (sb[k][0] - sa[k][0]) / CLK_TCK / wall
    out["steal"] = (sb["cpu"][1] - sa["cpu"][1]) / CLK_TCK / wall
    return out


def status_kib(pid, field):
    """A /proc/PID/status field in KiB ("VmHWM:", "RssAnon:"...), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait_quiet(ctx):
    """Waits (bounded by ctx.quiet_timeout) until the machine's busy CPU is
    below ctx.max_other, sampling over ctx.quiet_sample seconds."""
    deadline = time.monotonic() + ctx.quiet_timeout
    waited, next_log = 0.0, 10.0
    while True:
        a = sys_cpu()
        time.sleep(ctx.quiet_sample)
        b = sys_cpu()
        cores, t1 = busy_cores(a, b)["cpu"], b[0]
        if cores <= ctx.max_other:
            return waited
        if t1 > deadline:
            log(f"  machine still busy ({cores:.2f} cores) after {waited:.0f}s; measuring anyway")
            return waited
        waited += t1 - a[0]
        if waited >= next_log:
            log(f"  waiting {waited:.0f}s for a quiet machine ({cores:.2f} cores busy)")
            next_log += 10


# --------------------------------------------------------------------------
# Processes we start


class Proc:
    """A process this script started, stopped only by its PID."""

    registry = []

    def __init__(self, cmd, logpath, popen=None):
        self.cmd, self.logpath = cmd, logpath
        if popen is None:
            with open(logpath, "ab") as logf:
                popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.popen = popen
        self.pid = popen.pid
        self.starttime = start_time(self.pid)
        Proc.registry.append(self)

    @classmethod
    def adopt(cls, pid, cmd, logpath):
        """Tracks a process that daemonized (not our child)."""
        self = cls.__new__(cls)
        self.cmd, self.logpath, self.popen, self.pid = cmd, logpath, None, pid
        self.starttime = start_time(pid)
        cls.registry.append(self)
        return self

    def running(self):
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.starttime is not None and alive(self.pid, self.starttime)

    def stop(self, timeout=15.0):
        """SIGTERM, bounded wait, SIGKILL; also kills descendants left over."""
        if self in Proc.registry:
            Proc.registry.remove(self)
        if self.starttime is None:
            return
        kids = [(k, start_time(k)) for k in descendants(self.pid)]
        if self.running():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.running():
                log(f"  {self.cmd[0]} pid {self.pid} ignored SIGTERM; SIGKILL")
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.popen is not None:
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log(f"  pid {self.pid} not reaped after SIGKILL")
        for k, st in kids:
            if st is not None and alive(k, st):
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @classmethod
    def stop_all(cls):
        for p in list(cls.registry):
            p.stop(timeout=5)


def run_child(cmd, timeout):
    """Runs cmd to completion; returns (exit status, its rusage CPU seconds
    including its reaped children, e.g. fio's job processes, its output)."""
    out = tempfile.TemporaryFile()  # a file, not a pipe: a chatty child can't block
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                         stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc(cmd, None, popen=p)
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                out.seek(0)
                return p.returncode, ru.ru_utime + ru.ru_stime, out.read().decode(errors="replace")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} still running after {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        out.close()
        if p.returncode is None:
            proc.stop(timeout=5)
        elif proc in Proc.registry:
            Proc.registry.remove(proc)


# --------------------------------------------------------------------------
# Servers


def free_port():
    """A port that is free now (bound and released; servers that can't bind
    it fail to start and are retried on another one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_port(pid):
    """The TCP port pid listens on (its socket inodes in /proc/net/tcp)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        return None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            p = line.split()
            if len(p) > 9 and p[3] == "0A" and p[9] in inodes:
                return int(p[1].rsplit(":", 1)[1], 16)
    return None


def wait_ready_file(proc, ready, logpath, timeout=60):
    """Waits for nbdraid-node's --ready-file and checks it names the process we started."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.running():
            raise RuntimeError(f"nbdraid-node exited: {log_tail(logpath)}")
        try:
            with open(ready) as f:
                info = json.load(f)
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdraid-node wrote no ready file in {timeout}s")
            time.sleep(0.02)
    if int(info["pid"]) != proc.pid:
        raise RuntimeError(f"ready file pid {info['pid']} != started pid {proc.pid}")
    return info


def start_with_ready_file(cmd, ready, logpath, timeout=60):
    """Starts nbdraid-node (`cmd` passes --ready-file READY) and waits until it
    listens; returns (Proc, the ready file's contents)."""
    if os.path.exists(ready):
        os.unlink(ready)
    proc = Proc(cmd, logpath)
    return proc, wait_ready_file(proc, ready, logpath, timeout)


def start_nbdkit(prefix, args, logpath, timeout=30):
    """Starts `PREFIX nbdkit -f -i 127.0.0.1 -p 0 ARGS...` and waits until it
    listens; returns (Proc, port).  Port 0 and the port read back from /proc:
    no race with anyone else for a port.  `prefix` must exec nbdkit (taskset
    does), so the PID we started is nbdkit's."""
    cmd = prefix + ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "0"] + args
    proc = Proc(cmd, logpath)  # start_new_session = setsid
    deadline = time.monotonic() + timeout
    while (port := listening_port(proc.pid)) is None:
        err = None
        if not proc.running():
            err = f"nbdkit exited: {log_tail(logpath)}"
        elif time.monotonic() > deadline:
            err = f"nbdkit did not listen within {timeout}s"
        if err:
            proc.stop()
            raise RuntimeError(err)
        time.sleep(0.02)
    return proc, port


# --------------------------------------------------------------------------
# Metrics


def scrape_metrics(addr, timeout=5):
    """The Prometheus text of the daemon whose metrics endpoint is `addr`."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as r:
        return r.read().decode()


def prom_samples(text, metric):
    """[(labels dict, value)] of `metric` (exactly that name) in Prometheus text."""
    out = []
    for line in text.splitlines():
        if not line.startswith(metric):
            continue
        rest = line[len(metric):]
        if rest[:1] == "{":
            close = rest.rfind("}")
            labels, value = rest[1:close], rest[close + 1:]
            lab = {}
            for kv in labels.split('",'):
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    lab[k.strip().lstrip(",")] = v.strip().strip('"')
        elif rest[:1] == " ":
            lab, value = {}, rest
        else:
            continue  # a longer name with the same prefix
        try:
            out.append((lab, float(value.split()[0])))
        except (ValueError, IndexError):
            pass
    return out


# --------------------------------------------------------------------------
# fio


def fio_nbd_cmd(name, uri, out, runtime, rw, bs, iodepth, numjobs=1, norandommap=True,
                extra=()):
    """fio --ioengine=nbd against `uri`, time based (`runtime` seconds), one
    group report written as JSON to `out`, then `extra` options."""
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--numjobs={numjobs}", "--group_reporting",
           "--time_based", f"--runtime={int(runtime * 1000)}ms"]
    if norandommap:
        cmd.append("--norandommap")
    return cmd + ["--output-format=json", f"--output={out}"] + list(extra)


def fio_nbd_jobs_cmd(uri, out, runtime, jobs, norandommap=True, extra=()):
    """fio --ioengine=nbd against `uri` running several jobs at once, time
    based (`runtime` seconds), each job its own group (so its own report in
    the JSON written to `out`).  A job is a dict: name, rw, bs, iodepth and
    optionally numjobs (connections, reported together) and extra (a list of
    fio options for that job only); `extra` applies to all jobs."""
    cmd = ["fio", "--ioengine=nbd", f"--uri={uri}", "--group_reporting", "--time_based",
           f"--runtime={int(runtime * 1000)}ms"]
    if norandommap:
        cmd.append("--norandommap")
    cmd += ["--output-format=json", f"--output={out}"] + list(extra)
    for k, j in enumerate(jobs):
        cmd += [f"--name={j['name']}"] + (["--new_group"] if k else []) + [
            f"--rw={j['rw']}", f"--bs={j['bs']}", f"--iodepth={j['iodepth']}",
            f"--numjobs={j.get('numjobs', 1)}"] + list(j.get("extra", ()))
    return cmd


def read_fio_jobs(path):
    """Every job (group, with group_reporting) of fio's JSON in `path` (fio
    may print a line before the JSON).  Raises OSError or ValueError when
    there is none."""
    with open(path) as f:
        raw = f.read()
    try:
        jobs = json.loads(raw[raw.index("{"):])["jobs"]
        jobs[0]  # noqa: B018 (at least one)
        return jobs
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"no job in fio's JSON: {e!r}")


def read_fio_job(path):
    """The first job of fio's JSON in `path`.  Raises OSError or ValueError
    when there is none."""
    return read_fio_jobs(path)[0]


def fio_stats(job):
    """Per direction that did I/O ("read", "write"): I/Os, IOPS, bytes/s and
    completion latency percentiles (us) of one fio job from its JSON."""
    out = {}
    for d in ("read", "write"):
        s = job[d]
        if s["total_ios"] == 0:
            continue
        pct = s["clat_ns"].get("percentile", {})
        out[d] = {"ios": s["total_ios"], "iops": s["iops"], "bytes_per_s": s["bw_bytes"],
                  "p50_us": pct.get("50.000000", 0) / 1e3,
                  "p99_us": pct.get("99.000000", 0) / 1e3,
                  "p999_us": pct.get("99.900000", 0) / 1e3,
                  "max_us": s["clat_ns"]["max"] / 1e3, "mean_us": s["clat_ns"]["mean"] / 1e3}
    return out


def run_fio_json(cmd, out, timeout):
    """Runs a fio command that writes its JSON to `out`; returns (first job,
    fio's CPU seconds from rusage, wall seconds).  Raises RuntimeError, with
    fio's output, when fio fails or writes no JSON."""
    if os.path.exists(out):
        os.unlink(out)
    t = time.monotonic()
    rc, cpu, text = run_child(cmd, timeout)
    wall = time.monotonic() - t
    try:
        job = read_fio_job(out)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"fio exit {rc}, no JSON ({e}): {text[-500:]}")
    if rc != 0 or job.get("error"):
        raise RuntimeError(f"fio exit {rc}, error {job.get('error')}: {text[-500:]}")
    return job, cpu, wall

