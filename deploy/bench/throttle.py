#!/usr/bin/env python3
"""Stacked writeout throttling (issue 10) on RAID 5 over 4 local nodes: what
the array daemon's accounting of its member grants costs, and what it does
when a member is slow. Every member URI carries `?grpc=`, so the array
leases a grant at each node; `[members] accounting = false` keeps the leases
and the counting but admits without waiting for the grants (measurements
only). Both parts run the same array (created once, written whole once).

Part `cost` (memory is not the limit): peers.py's rows randread-4k-qd32 and
randwrite-4k-qd32 (one connection, QD32), accounting on and off in the same
run, --passes passes alternating (on, off, off, on, on, off...: each pass
visits both, the order flips from pass to pass so a drift of the machine
weighs on both alike), nodes and array daemon started fresh per cell and
pinned as array.sh does. Medians of IOPS and of the array daemon's CPU per
I/O (/proc utime + stime over the fio run / I/Os); goal: accounting on
costs at most --cost-goal (1.05) x the array CPU per I/O of accounting off.
The requests that waited for member grants are counted (0 expected: with
4 KiB requests the grants are never the limit).

Part `slow` (a slow member is throttled, not failed): member 3's node slowed
with fault injection (`nbdraid node fault --bandwidth`, --slow-bandwidth)
or not, accounting on and off (--accounting), rows:

  flood-1m      1 MiB random writes, 4 connections x QD16
  flood-4k      4 KiB random writes, 4 connections x QD16
  reads-alone   4 KiB random reads, QD1, one connection, nothing else
  reads+flood   the same reads on their own connection, next to 1 MiB random
                writes on 3 other connections (QD16 each): head-of-line
                blocking across connections
  mixed+flood   one connection mixing 4 KiB random reads and 1 MiB random
                writes (fio rwmixread=50, QD16), next to the same 3 flood
                connections: what waiting for admission costs the reads
                that share a connection with writes

Throughput, p50/p99 latency per job, how long fio took to complete what it
had in flight after --runtime ("drain"), requests that waited for member
grants, the array's peak units held at member 3, and member 3's state
after the run (`nbdraid array status --json`): it must stay active.

    deploy/bench/throttle.sh --quick                       # smoke test
    deploy/bench/throttle.sh --json /tmp/throttle.json     # full run

Every process is started here and stopped by PID (the array daemon before
its nodes), on success, error, Ctrl-C or SIGTERM. Standard library only;
helpers from benchlib.py, nodes/array cells from arraybench.py (array.sh),
the cost rows from peers.py.
"""

import argparse
import os
import sys
import time

from benchlib import (CLK_TCK, busy_cores, command_line, f2, fio_nbd_jobs_cmd, fio_stats, fmt_k,
                      log, median, prom_samples, read_fio_jobs, run_child, scrape_metrics,
                      self_cpu, sys_cpu, wait_quiet, write_raw_json)
import arraybench as ab
import peers

ARRAY = "r5"
SLOW = 3  # the member slot whose node is slowed down
COST_ROWS = ("randread-4k-qd32", "randwrite-4k-qd32")


class FloodRow:
    """A fio run of one or more jobs on their own connections. `flood` names
    the job whose writes are the load, `probe` the job whose reads are
    watched (either may be None)."""

    def __init__(self, name, desc, jobs, flood=None, probe=None):
        self.name, self.desc, self.jobs, self.flood, self.probe = name, desc, jobs, flood, probe


def _flood(bs, numjobs):
    return {"name": "flood", "rw": "randwrite", "bs": bs, "iodepth": 16, "numjobs": numjobs}


_READS = {"name": "reads", "rw": "randread", "bs": "4k", "iodepth": 1}
SLOW_ROWS = [
    FloodRow("flood-1m", "1 MiB random write, 4 connections x QD16 (64 in flight)",
             [_flood("1M", 4)], flood="flood"),
    FloodRow("flood-4k", "4 KiB random write, 4 connections x QD16 (64 in flight)",
             [_flood("4k", 4)], flood="flood"),
    FloodRow("reads-alone", "4 KiB random read, QD1, one connection, no other load "
             "(the probe's baseline)", [_READS], probe="reads"),
    FloodRow("reads+flood", "4 KiB random read QD1 on its own connection, next to 1 MiB random "
             "writes on 3 connections x QD16", [_flood("1M", 3), _READS],
             flood="flood", probe="reads"),
    FloodRow("mixed+flood", "one connection mixing 4 KiB random reads and 1 MiB random writes "
             "(rwmixread=50, QD16), next to 1 MiB random writes on 3 connections x QD16",
             [_flood("1M", 3), {"name": "mixed", "rw": "randrw", "bs": "4k,1M", "iodepth": 16,
                                "extra": ["--rwmixread=50"]}],
             flood="flood", probe="mixed"),
]
SLOW_ROW_BY_NAME = {r.name: r for r in SLOW_ROWS}


def config(a, accounting):
    on = "on" if accounting else "off"
    toml = (f'[throttle]\ncapacity = "{a.array_capacity}"\n[members]\ngrant = "{a.grant}"\n'
            f'accounting = {"true" if accounting else "false"}\n')
    return ab.Config(f"acct-{on}", "array", 4, "raid5", base=ARRAY, toml=toml,
                     desc=f"RAID 5 over 4 nodes, grants leased, accounting {on}")


# --------------------------------------------------------------------------
# Part cost: accounting on vs off, memory not the limit


def run_cost(a, ctx, cfgs):
    by_name = {r.name: r for r in peers.ROWS}
    out = {}
    for rowname in COST_ROWS:
        row = by_name[rowname]
        log(f"cost {row.name}: {row.desc}")
        cells = {c.name: [] for c in cfgs}
        for pass_no in range(ctx.passes):
            order = cfgs if pass_no % 2 == 0 else cfgs[::-1]
            for cfg in order:
                cells[cfg.name].append(ab.run_cell(ctx, row, cfg, pass_no))
        summ = {n: ab.summarize(c) for n, c in cells.items()}
        for n, c in cells.items():
            waits = [p["chosen"].get("layer_waits") for p in c if "error" not in p["chosen"]]
            summ[n]["grant_waits"] = sum(w["grant_waits"] for w in waits if w) \
                if any(waits) else None
            summ[n]["throttle_waits"] = sum(w["throttle_waits"] for w in waits if w) \
                if any(waits) else None
        ev = cost_eval(a, summ, cfgs)
        out[row.name] = {"desc": row.desc, "summary": summ, "eval": ev, "passes": cells}
        print_cost_row(row, summ, ev, cfgs, ctx.passes)
        sys.stdout.flush()
    return out


def cost_eval(a, summ, cfgs):
    on, off = (summ.get(c.name, {}) for c in cfgs)
    if "error" in on or "error" in off:
        return {}
    e = {}
    for k in ("iops", "layer_us_per_io", "nodes_us_per_io", "total_us_per_io"):
        if on.get(k) and off.get(k):
            e[k + "_ratio"] = on[k] / off[k]
    if "layer_us_per_io_ratio" in e:
        e["goal"] = a.cost_goal
        e["met"] = e["layer_us_per_io_ratio"] <= a.cost_goal
    e["disturbed"] = bool(on["disturbed_passes"] or off["disturbed_passes"])
    return e


def print_cost_row(row, summ, ev, cfgs, passes):
    print(f"\n## cost {row.name}: {row.desc} (median of {passes} passes, on and off alternating)")
    hdr = (f"{'accounting':<12}{'IOPS':>8}{'spread':>8}{'p99 us':>8}{'array us/IO':>13}"
           f"{'nodes us/IO':>13}{'grant waits':>13}{'throttle waits':>16}{'other':>7}")
    print(hdr)
    print("-" * len(hdr))
    for cfg in cfgs:
        m = summ.get(cfg.name, {})
        label = cfg.name.replace("acct-", "")
        if "error" in m:
            print(f"{label:<12}ERROR: {m['error'].splitlines()[0][:100]}")
            continue
        flag = "!" if m["disturbed_passes"] else " "
        print(f"{label:<12}{fmt_k(m['iops']):>8}{f2(m['iops_spread_pct'], '{:.0f}%'):>8}"
              f"{peers.p99_text(m):>8}{f2(m['layer_us_per_io']):>13}{f2(m['nodes_us_per_io']):>13}"
              f"{f2(m.get('grant_waits'), '{:.0f}'):>13}{f2(m.get('throttle_waits'), '{:.0f}'):>16}"
              f"{m['max_other_cores']:>6.2f}{flag}")
    if ev:
        verdict = "-" if "met" not in ev else ("MET" if ev["met"] else "MISSED")
        print(f"{'on/off':<12}{f2(ev.get('iops_ratio'), 'x{:.3f}'):>8}{'':>8}{'':>8}"
              f"{f2(ev.get('layer_us_per_io_ratio'), 'x{:.3f}'):>13}"
              f"{f2(ev.get('nodes_us_per_io_ratio'), 'x{:.3f}'):>13}   array CPU/IO goal <= "
              f"x{ev.get('goal', 0):.2f}: {verdict}" + ("  [! disturbed pass]" if ev["disturbed"]
                                                        else ""))


# --------------------------------------------------------------------------
# Part slow: a slow member under a flood


class Variant:
    def __init__(self, cfg, slow, accounting):
        self.cfg, self.slow, self.accounting = cfg, slow, accounting
        self.name = f"{'slow' if slow else 'fast'} m3, acct {'on' if accounting else 'off'}"


def member_gauges(cell, metric):
    """{slot: value} of an array member gauge (foreground), None if unavailable."""
    try:
        text = scrape_metrics(cell.metrics)
    except OSError:
        return None
    return {int(lab["slot"]): v for lab, v in prom_samples(text, metric)
            if lab.get("class") == "foreground" and "slot" in lab}


def run_flood_cell(a, ctx, row, var, pass_no):
    tag = f"[{row.name} pass {pass_no + 1}] {var.name:<20}"
    cell = ab.Cell(ctx, var.cfg)
    r = {"variant": var.name, "slow": var.slow, "accounting": var.accounting}
    mark = ab.log_marks(cell.log)
    try:
        cell.start()
        mark = ab.log_marks(cell.log)
        if var.slow:
            cell.nodes[SLOW].set_fault("--bandwidth", a.slow_bandwidth)
        r["quiet_wait_s"] = wait_quiet(ctx)
        out = os.path.join(ctx.workdir, "fio.json")
        if os.path.exists(out):
            os.unlink(out)
        cmd = ctx.client_pin() + fio_nbd_jobs_cmd(cell.uri, out, ctx.runtime, row.jobs)
        waits0 = cell.layer_waits()
        (l0, n0), me0, sys0 = cell.cpu_ticks(), self_cpu(), sys_cpu()
        rc, client_s, text = run_child(cmd, ctx.runtime + a.drain_timeout)
        sys1, (l1, n1), me1 = sys_cpu(), cell.cpu_ticks(), self_cpu()
        waits1 = cell.layer_waits()
        wall = sys1[0] - sys0[0]
        cell.check_running()
        jobs = read_fio_jobs(out)
        if rc != 0 or any(j.get("error") for j in jobs):
            raise RuntimeError(f"fio exit {rc}, errors "
                               f"{[j.get('error') for j in jobs]}: {text[-400:]}")
        r["jobs"] = {j["jobname"]: fio_stats(j) for j in jobs}
        r["wall_s"], r["drain_s"] = wall, max(0.0, wall - ctx.runtime)
        busy = busy_cores(sys0, sys1)
        servers_s = (l1 - l0 + n1 - n0) / CLK_TCK
        r["other_cores"] = (busy["cpu"] * wall - servers_s - client_s - (me1 - me0)) / wall
        if waits0 is not None and waits1 is not None:
            r.update({k: waits1[k] - waits0[k] for k in waits1})
        r["held_peak"] = member_gauges(cell, "nbdraid_array_member_peak_held_units")
        r["grant"] = member_gauges(cell, "nbdraid_array_member_grant_units")
        r["member_states"] = cell.member_states()
        flood = r["jobs"].get(row.flood, {}).get("write", {})
        probe = r["jobs"].get(row.probe, {}).get("read", {})
        log(f"  {tag} flood {f2(flood.get('bytes_per_s') and flood['bytes_per_s'] / 1e6, '{:.1f}')}"
            f" MB/s p99 {f2(flood.get('p99_us') and flood['p99_us'] / 1e3, '{:.0f}')} ms; reads "
            f"{fmt_k(probe.get('iops'))} IOPS p99 "
            f"{f2(probe.get('p99_us') and probe['p99_us'] / 1e3, '{:.1f}')} ms; drain "
            f"{r['drain_s']:.1f}s; grant waits {f2(r.get('grant_waits'), '{:.0f}')}; member 3 "
            f"{r['member_states'][SLOW]}")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        log(f"  {tag} ERROR {e}")
        r["error"] = str(e)
        try:
            r["member_states"] = cell.member_states() if cell.layer else None
        except Exception:  # noqa: BLE001 (best effort, for the report)
            pass
    finally:
        end = ab.log_marks(cell.log)
        cell.stop()
    n, sample = ab.log_warnings(cell.log, mark, end)
    r["layer_warnings"], r["layer_warning_sample"] = n, sample
    if n:
        log(f"  {tag} the array daemon logged {n} WARN/ERROR line(s), e.g. {sample[0][:200]}")
    return r


def summarize_flood(row, passes):
    good = [p for p in passes if "error" not in p]
    m = {"passes": len(good), "errors": len(passes) - len(good),
         "member3_states": [(p.get("member_states") or [None] * 4)[SLOW] for p in passes],
         "layer_warnings": sum(p.get("layer_warnings", 0) for p in passes)}
    if not good:
        m["error"] = passes[-1].get("error", "not run") if passes else "not run"
        return m

    def job_med(job, d, k):
        return median([p["jobs"].get(job, {}).get(d, {}).get(k) for p in good])

    if row.flood:
        m["flood_mb_s"] = median([p["jobs"][row.flood].get("write", {}).get("bytes_per_s", 0) / 1e6
                                  for p in good])
        m["flood_iops"] = job_med(row.flood, "write", "iops")
        m["flood_p99_ms"] = (job_med(row.flood, "write", "p99_us") or 0) / 1e3
    if row.probe:
        m["probe_iops"] = job_med(row.probe, "read", "iops")
        m["probe_p50_ms"] = (job_med(row.probe, "read", "p50_us") or 0) / 1e3
        m["probe_p99_ms"] = (job_med(row.probe, "read", "p99_us") or 0) / 1e3
        m["probe_max_ms"] = max(p["jobs"][row.probe].get("read", {}).get("max_us", 0)
                                for p in good) / 1e3
        if row.probe == "mixed":
            m["mixed_write_p99_ms"] = (job_med("mixed", "write", "p99_us") or 0) / 1e3
    m["drain_s"] = median([p["drain_s"] for p in good])
    m["grant_waits"] = median([p.get("grant_waits") for p in good])
    m["grant_wait_s"] = median([p.get("grant_wait_s") for p in good])
    m["held_m3_mib"] = median([(p.get("held_peak") or {}).get(SLOW) for p in good])
    if m["held_m3_mib"] is not None:
        m["held_m3_mib"] /= 1 << 20
    m["max_other_cores"] = max(p["other_cores"] for p in good)
    return m


def print_flood_row(row, summ, variants, passes):
    print(f"\n## slow {row.name}: {row.desc} (median of {passes} passes)")
    hdr = f"{'variant':<22}"
    if row.flood:
        hdr += f"{'MB/s':>8}{'IOPS':>8}{'wr p99 ms':>11}"
    if row.probe:
        hdr += f"{'rd IOPS':>9}{'rd p50 ms':>11}{'rd p99 ms':>11}{'rd max ms':>11}"
    hdr += f"{'drain s':>9}{'waits':>8}{'held m3':>9}{'other':>7}  member 3"
    print(hdr)
    print("-" * len(hdr))
    for v in variants:
        m = summ.get(v.name, {})
        if "error" in m:
            print(f"{v.name:<22}ERROR: {m['error'].splitlines()[0][:100]}; member 3 "
                  f"{','.join(str(s) for s in m['member3_states'])}")
            continue
        line = f"{v.name:<22}"
        if row.flood:
            line += (f"{f2(m['flood_mb_s'], '{:.1f}'):>8}{fmt_k(m['flood_iops']):>8}"
                     f"{f2(m['flood_p99_ms'], '{:.1f}'):>11}")
        if row.probe:
            line += (f"{fmt_k(m['probe_iops']):>9}{f2(m['probe_p50_ms'], '{:.2f}'):>11}"
                     f"{f2(m['probe_p99_ms'], '{:.2f}'):>11}{f2(m['probe_max_ms'], '{:.0f}'):>11}")
        states = sorted({str(s) for s in m["member3_states"]})
        line += (f"{f2(m['drain_s'], '{:.1f}'):>9}{f2(m['grant_waits'], '{:.0f}'):>8}"
                 f"{f2(m['held_m3_mib'], '{:.1f}'):>9}{m['max_other_cores']:>7.2f}  "
                 f"{'/'.join(states)}")
        if m["errors"]:
            line += f"  ({m['errors']} pass(es) failed)"
        print(line)


def run_slow(a, ctx, cfgs, rows):
    accts = [x.strip() for x in a.accounting.split(",") if x.strip()]
    variants = [Variant(cfgs[acct == "off"], slow, acct == "on")
                for slow in (False, True) for acct in accts]
    out = {}
    for row in rows:
        log(f"slow {row.name}: {row.desc}")
        cells = {v.name: [] for v in variants}
        for pass_no in range(a.slow_passes):
            k = pass_no % len(variants)
            for v in variants[k:] + variants[:k]:
                cells[v.name].append(run_flood_cell(a, ctx, row, v, pass_no))
        summ = {n: summarize_flood(row, c) for n, c in cells.items()}
        out[row.name] = {"desc": row.desc, "jobs": row.jobs, "summary": summ, "passes": cells}
        print_flood_row(row, summ, variants, a.slow_passes)
        sys.stdout.flush()
    return out, variants


def print_slow_summary(a, results, variants):
    print("\n## slow member: verdicts")
    slow_states = [s for rr in results.values() for n, m in rr["summary"].items()
                   if n.startswith("slow") for s in m["member3_states"]]
    failed = [s for s in slow_states if s != "active"]
    if slow_states and not failed:
        verdict = f"active in all {len(slow_states)} runs: throttled, not failed"
    else:
        verdict = (f"NOT active after {len(failed)} of {len(slow_states)} runs: "
                   f"{sorted(set(map(str, failed)))}")
    print(f"  member 3 slowed to {a.slow_bandwidth}/s: state after every run: {verdict}")
    for rowname in ("flood-1m", "flood-4k"):
        rr = results.get(rowname)
        if not rr:
            continue
        for acct in ("on", "off"):
            f, s = (rr["summary"].get(f"{x} m3, acct {acct}", {}) for x in ("fast", "slow"))
            if f.get("flood_mb_s") and s.get("flood_mb_s"):
                print(f"  {rowname}, accounting {acct}: slow/fast throughput "
                      f"x{s['flood_mb_s'] / f['flood_mb_s']:.2f}, write p99 "
                      f"{f['flood_p99_ms']:.1f} -> {s['flood_p99_ms']:.1f} ms")
    for rowname in ("reads+flood", "mixed+flood"):
        rr = results.get(rowname)
        if not rr:
            continue
        for acct in ("on", "off"):
            f, s = (rr["summary"].get(f"{x} m3, acct {acct}", {}) for x in ("fast", "slow"))
            if f.get("probe_p99_ms") is not None and s.get("probe_p99_ms") is not None:
                print(f"  {rowname}, accounting {acct}: 4 KiB read p50 {f['probe_p50_ms']:.2f} -> "
                      f"{s['probe_p50_ms']:.2f} ms, p99 {f['probe_p99_ms']:.2f} -> "
                      f"{s['probe_p99_ms']:.2f} ms (fast -> slow member 3)")
    alone = results.get("reads-alone", {}).get("summary", {})
    if alone:
        base = ", ".join(f"{n}: p99 {m['probe_p99_ms']:.2f} ms" for n, m in alone.items()
                         if m.get("probe_p99_ms") is not None)
        print(f"  reads alone (no flood): {base}")


# --------------------------------------------------------------------------
# Main


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Stacked writeout throttling on RAID 5 over 4 local nodes: the array "
                    "daemon's CPU per I/O with member-grant accounting on vs off (part cost), "
                    "and a slow member under write floods: throughput, latency, head-of-line "
                    "blocking, and that it stays active (part slow).",
        epilog="throttle.sh builds the release binaries (the node with fault injection) unless "
               "given --bin-dir or --no-build. Smoke test: throttle.sh --quick")
    ab.add_common_args(p, runtime=10.0, passes=5, chunk="64K", member_size="256M")
    p.add_argument("--parts", default="cost,slow", help="cost, slow or both (default cost,slow)")
    p.add_argument("--rows", default="all", help="part slow's rows: comma list of "
                   + ", ".join(SLOW_ROW_BY_NAME) + " or 'all'")
    p.add_argument("--slow-passes", type=int, default=3,
                   help="passes of part slow (default 3; --passes is part cost's)")
    p.add_argument("--accounting", default="on,off",
                   help="part slow: accounting on, off or both (default on,off)")
    p.add_argument("--node-capacity", default="64M", help="each node's throttle capacity (64M)")
    p.add_argument("--node-max-payload", default="4M", help="each node's max payload (4M)")
    p.add_argument("--array-capacity", default="320M", help="array throttle capacity (320M)")
    p.add_argument("--grant", default="16M", help="units the array asks of each member (16M)")
    p.add_argument("--slow-bandwidth", default="8M", help="member 3's bandwidth when slowed (8M)")
    p.add_argument("--drain-timeout", type=float, default=180.0,
                   help="seconds fio may take beyond --runtime before the pass fails (180)")
    p.add_argument("--cost-goal", type=float, default=1.05,
                   help="part cost's goal: array CPU per I/O on/off at most this (1.05)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 s runtime, 1 pass of each part, no retries, short quiet "
                        "wait, rows flood-1m and reads+flood, member 3 at 32M/s")
    a = p.parse_args(argv)
    if a.quick:
        a.runtime, a.passes, a.slow_passes, a.retries, a.quiet_timeout = 2.0, 1, 1, 0, 5.0
        if a.rows == "all":
            a.rows = "flood-1m,reads+flood"
        if a.slow_bandwidth == "8M":
            a.slow_bandwidth = "32M"
    parts = {x.strip() for x in a.parts.split(",") if x.strip()}
    if not parts or parts - {"cost", "slow"}:
        p.error(f"--parts: cost, slow or both, not {a.parts!r}")
    a.parts = parts
    if a.rows == "all":
        a.row_list = list(SLOW_ROWS)
    else:
        a.row_list = []
        for n in a.rows.split(","):
            if n.strip() not in SLOW_ROW_BY_NAME:
                p.error(f"unknown row {n!r}; rows: {', '.join(SLOW_ROW_BY_NAME)}")
            a.row_list.append(SLOW_ROW_BY_NAME[n.strip()])
    accts = {x.strip() for x in a.accounting.split(",") if x.strip()}
    if not accts or accts - {"on", "off"}:
        p.error(f"--accounting: on, off or on,off, not {a.accounting!r}")
    return a


def main(argv):
    a = parse_args(argv)
    ctx = ab.make_ctx(a)
    # Leases need the nodes' gRPC; the array's metrics count the grant waits.
    ctx.node_args = ["--grpc-listen", "127.0.0.1:0", "--throttle-capacity", a.node_capacity,
                     "--max-payload", a.node_max_payload] + ctx.node_args
    ctx.array_args = ["--metrics-listen", "127.0.0.1:0"] + ctx.array_args
    cfgs = [config(a, True), config(a, False)]
    return ab.in_workdir(ctx, a.workdir, "nbdraid-throttle-bench.", a.keep,
                         lambda: run(a, argv, ctx, cfgs))


def run(a, argv, ctx, cfgs):
    results = {}
    env = ab.environment(ctx)
    config_out = {
        "argv": argv, "parts": sorted(a.parts), "passes": ctx.passes,
        "slow_passes": a.slow_passes, "runtime_s": ctx.runtime, "chunk": ctx.chunk_spec,
        "member_size": ctx.member_size_spec, "node_args": ctx.node_args,
        "array_args": ctx.array_args, "array_toml": {c.name: c.toml for c in cfgs},
        "slow_bandwidth": a.slow_bandwidth, "server_cpus": ctx.server_cpus,
        "client_cpus": ctx.client_cpus, "cost_goal": a.cost_goal,
        "slow_rows": {r.name: r.jobs for r in a.row_list},
    }
    try:
        print("# nbdraid stacked throttling benchmark")
        print("command: " + command_line(argv, "THROTTLE_SH_CMD"))
        for k, v in env.items():
            if k != "qemu-storage-daemon":
                print(f"{k:>22}: {v}")
        print(f"{'array':>22}: RAID 5 over 4 node volumes of {ctx.member_size_spec} on "
              f"{a.workdir} ({ab.fs_type(a.workdir)}), chunk {ctx.chunk_spec}; array capacity "
              f"{a.array_capacity}, grant {a.grant} per member (URIs with ?grpc=); nodes: "
              f"capacity {a.node_capacity}, max payload {a.node_max_payload}")
        print(f"{'pinning':>22}: the nodes AND the array daemon on CPU(s) "
              f"{ctx.server_cpus or 'any'}; fio on CPU(s) {ctx.client_cpus or 'any'}")
        print(f"{'settings':>22}: {ctx.runtime:g}s per run; part cost {ctx.passes} passes "
              f"(disturbed above {ctx.max_other} cores of other load, {ctx.retries} retries); "
              f"part slow {a.slow_passes} passes, member 3 slowed to {a.slow_bandwidth}/s")
        sys.stdout.flush()
        log("creating the array and writing it whole once (nothing is timed here)")
        ab.prepare(ctx, cfgs[0])
        t0 = time.monotonic()
        if "cost" in a.parts:
            results["cost"] = run_cost(a, ctx, cfgs)
        if "slow" in a.parts:
            results["slow"], variants = run_slow(a, ctx, cfgs, a.row_list)
            print_slow_summary(a, results["slow"], variants)
        if "cost" in a.parts:
            print("\n## cost: verdicts (array daemon CPU per I/O, accounting on / off; goal <= "
                  f"x{a.cost_goal:.2f})")
            for rowname, rr in results["cost"].items():
                ev = rr["eval"]
                if "met" in ev:
                    print(f"  {rowname:<20} x{ev['layer_us_per_io_ratio']:.3f} "
                          f"{'MET' if ev['met'] else 'MISSED'}"
                          + ("  [! a disturbed pass]" if ev["disturbed"] else ""))
                else:
                    print(f"  {rowname:<20} no verdict (a configuration failed)")
        legend = []
        if "cost" in a.parts:
            legend.append(
                "Columns (cost): IOPS, p99 (fio completion latency, us), array us/IO (the array "
                "daemon's CPU time from /proc per I/O fio completed) and nodes us/IO (the four "
                "nodes summed) are medians over passes; spread = (max-min)/median of IOPS; grant "
                "waits = requests that waited for member grants, throttle waits = for the "
                "array's own throttle (all passes); other = most CPU (cores) used by everything "
                "else during a kept pass, '!' = still disturbed.")
        if "slow" in a.parts:
            legend.append(
                "Columns (slow): MB/s, IOPS, wr p99 = the flood jobs' writes; rd * = the probe "
                "job's 4 KiB reads (rd max: the worst over passes); drain = seconds fio took "
                "after --runtime to complete what it had in flight; waits = requests that "
                "waited for member grants; held m3 = the most units (MiB) the array held at "
                "member 3 (with accounting on its grant is the limit); other = CPU (cores) used "
                "by everything else (not retried); member 3 = its state after each run "
                "('active': throttled, not failed).")
        legend.append("This host has 2 cores shared with other work: differences of a few "
                      "percent are within the noise; compare medians of full runs on a quiet "
                      "machine.")
        print("\n" + " ".join(legend))
        print(f"total time {time.monotonic() - t0:.0f}s")
    finally:
        if a.json:  # also what an interrupted run measured so far
            write_raw_json(a.json, {"environment": env, "config": config_out,
                                    "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
