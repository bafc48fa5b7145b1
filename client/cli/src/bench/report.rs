//! Measurements of a bench run and how they are shown: latency histograms
//! (HdrHistogram, nanoseconds, 3 significant digits), the process's own
//! CPU time (getrusage: every thread, user and system), and the report as
//! text or JSON.

use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency histograms of reads and writes.
pub struct Latencies {
    /// Read completion latency, ns.
    pub read: Histogram<u64>,
    /// Write completion latency, ns.
    pub write: Histogram<u64>,
}

impl Latencies {
    /// Returns empty histograms covering 1 ns to 1 hour.
    pub fn new() -> Result<Self> {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000_000, 3).context("histogram");
        Ok(Self {
            read: h()?,
            write: h()?,
        })
    }

    /// Records one latency (saturating at the histogram's top).
    #[inline]
    pub fn record(&mut self, write: bool, latency: Duration) {
        let ns = (latency.as_nanos() as u64).max(1);
        let h = if write {
            &mut self.write
        } else {
            &mut self.read
        };
        h.saturating_record(ns);
    }
}

/// Process CPU time, from getrusage(RUSAGE_SELF).
#[derive(Debug, Clone, Copy)]
pub struct Cpu {
    /// User seconds.
    pub user: f64,
    /// System seconds.
    pub sys: f64,
}

impl Cpu {
    /// Returns the CPU time this process has used so far (all threads).
    pub fn now() -> Self {
        // SAFETY: getrusage fills the struct we pass; zeroed is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a rusage we own.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        Self {
            user: secs(ru.ru_utime),
            sys: secs(ru.ru_stime),
        }
    }

    /// Returns the CPU used since `earlier`.
    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            user: self.user - earlier.user,
            sys: self.sys - earlier.sys,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    /// Operations counted.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

impl LatencySummary {
    /// Summarizes `h` (ns); `None` when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Some(Self {
            count: h.len(),
            mean: h.mean() / 1e3,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// CPU time of the run.
#[derive(Debug, Serialize)]
pub struct CpuReport {
    /// User seconds.
    pub user_s: f64,
    /// System seconds.
    pub sys_s: f64,
    /// User + system.
    pub total_s: f64,
    /// Average cores busy (total / wall time).
    pub cores: f64,
    /// CPU microseconds per completed I/O.
    pub us_per_io: f64,
}

/// What `--verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Reads during the run whose block had a known content, all checked.
    pub verified_reads: u64,
    /// Reads during the run of blocks this run had not written (unchecked).
    pub unverified_reads: u64,
    /// Blocks read back and checked after the run.
    pub final_checked: u64,
    /// Blocks whose content was wrong.
    pub errors: u64,
}

/// The result of a bench run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub uri: String,
    pub pattern: &'static str,
    pub rw: &'static str,
    /// Percentage of reads (100 for --rw read, 0 for --rw write).
    pub mix_read: u32,
    pub block_size: u64,
    pub queue_depth: usize,
    /// The queue is refilled once at most this many are in flight.
    pub queue_low: usize,
    /// NBD connections in use.
    pub connections: usize,
    /// "clients": one Client per connection; "multi-conn": one Client.
    pub connection_mode: &'static str,
    /// Runtime worker threads (0: current-thread runtime).
    pub threads: usize,
    pub region_offset: u64,
    pub region_size: u64,
    pub seconds: f64,
    pub ops: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub latency_us: Option<LatencySummary>,
    pub read_latency_us: Option<LatencySummary>,
    pub write_latency_us: Option<LatencySummary>,
    pub cpu: CpuReport,
    pub verify: Option<VerifyReport>,
}

impl Report {
    /// Prints the report as text.
    pub fn print_text(&self) {
        let rw = match self.rw {
            "mix" => format!("mix {}% read", self.mix_read),
            other => other.to_string(),
        };
        println!(
            "{}: {} {}, {} B blocks, QD {}{}, {} connection(s) ({}), {:.2} s",
            self.uri,
            self.pattern,
            rw,
            self.block_size,
            self.queue_depth,
            if self.queue_low < self.queue_depth {
                format!(" (refilled at {})", self.queue_low)
            } else {
                String::new()
            },
            self.connections,
            self.connection_mode,
            self.seconds
        );
        println!(
            "  ops         {} (reads {}, writes {})",
            self.ops, self.reads, self.writes
        );
        println!("  IOPS        {:.0}", self.iops);
        println!("  throughput  {:.1} MiB/s", self.mib_per_s);
        for (name, l) in [
            ("latency", &self.latency_us),
            ("  read", &self.read_latency_us),
            ("  write", &self.write_latency_us),
        ] {
            if let Some(l) = l {
                println!(
                    "  {name:<10}  p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us, mean {:.1} us",
                    l.p50, l.p99, l.p99_9, l.max, l.mean
                );
            }
        }
        let c = &self.cpu;
        println!(
            "  cpu         user {:.3} s, sys {:.3} s = {:.2} cores; {:.2} us per I/O",
            c.user_s, c.sys_s, c.cores, c.us_per_io
        );
        if let Some(v) = &self.verify {
            println!(
                "  verify      {} reads checked, {} unchecked (not yet written), {} blocks checked after the run, {} errors",
                v.verified_reads, v.unverified_reads, v.final_checked, v.errors
            );
        }
    }
}

/// Merges read and write histograms into one.
pub fn merged(l: &Latencies) -> Result<Histogram<u64>> {
    let mut all = l.read.clone();
    all.add(&l.write).context("merge histograms")?;
    Ok(all)
}
