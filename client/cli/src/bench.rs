//! `nbdraid bench URI`: a load generator built on the completion ring.
//!
//! One task keeps `--queue-depth` operations in flight: it submits with
//! [`CompletionRing::indirect`] (no await), waits with
//! [`CompletionRing::ring_wait`], pops every completion that landed,
//! records its latency and resubmits on the same slot. `caller_data` is the
//! slot number; each slot owns its read buffer, which the ring hands back
//! in the completion, so the steady state allocates nothing per read.
//! Writes without `--verify` all send one shared random block (a reference
//! count, no copy).
//!
//! Connections: `--connections N` opens N clients of one connection each
//! (like fio's `numjobs=N`; works whatever the server says about
//! multi-conn) and spreads requests over them round-robin; with
//! `--multi-conn` it opens one client with N connections instead, which the
//! server must allow.
//!
//! `--verify`: see [`verify`]. No operation is issued on a block that has
//! one in flight, so every read has exactly one right answer; after the
//! timed run every block written is read back and checked.
//!
//! The runtime is current-thread by default (the ring is sync submit +
//! async wait, so one thread runs the connections and the loop with the
//! least overhead); `--threads N` uses N worker threads for the
//! connections' tasks instead.

mod report;
mod verify;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::{Args as ClapArgs, ValueEnum};
use nbdraid_client::{Client, CompletionRing, Indirect, Request, RingEntry};

use crate::nbd;
use crate::units::{parse_duration, parse_size};
use report::{Cpu, CpuReport, Latencies, LatencySummary, Report, VerifyReport};
use verify::{Rng, Tracker};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Uniformly random blocks.
    Rand,
    /// Consecutive blocks, wrapping at the end of the region.
    Seq,
}

/// Operation mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Reads and writes, `--mix-read` percent reads.
    Mix,
}

/// Arguments of `nbdraid bench`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The export, as nbd://HOST[:PORT][/EXPORT].
    uri: String,
    /// Access pattern.
    #[arg(long, value_enum, default_value = "rand")]
    pattern: Pattern,
    /// Operation mix.
    #[arg(long, value_enum, default_value = "read")]
    rw: Rw,
    /// Percentage of reads with --rw mix.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u32).range(0..=100))]
    mix_read: u32,
    /// Size of each operation.
    #[arg(long, short = 'b', default_value = "4k", value_parser = parse_size)]
    block_size: u64,
    /// Operations in flight.
    #[arg(long, default_value_t = 32)]
    queue_depth: usize,
    /// Refill the queue only once at most this many operations are in
    /// flight (like fio's iodepth_low); default: --queue-depth, which keeps
    /// the queue full. Lower values batch submissions.
    #[arg(long)]
    queue_low: Option<usize>,
    /// NBD connections (one client each, unless --multi-conn).
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Open one client with --connections connections (the server must
    /// advertise multi-conn) instead of one client per connection.
    #[arg(long)]
    multi_conn: bool,
    /// How long to run (default 10s, unless --ops is given).
    #[arg(long, short = 'd', value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many operations.
    #[arg(long)]
    ops: Option<u64>,
    /// Start of the region to use.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Size of the region to use (default: to the end of the export).
    #[arg(long, alias = "range", value_parser = parse_size)]
    size: Option<u64>,
    /// Write self-checking blocks and check every read (see the docs).
    #[arg(long)]
    verify: bool,
    /// Runtime worker threads; 0 runs everything on one thread.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Seed of the offset and data generator.
    #[arg(long, default_value_t = 0x6e62_6472_6169_6400)]
    seed: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `nbdraid bench`.
pub async fn run(args: Args) -> Result<()> {
    check_args(&args)?;
    let clients = connect(&args).await?;
    let info = clients[0].info();
    let bs = args.block_size;
    if args.rw != Rw::Read && info.read_only() {
        bail!("{} is read-only: only --rw read works on it", args.uri);
    }
    if args.offset >= info.size {
        bail!(
            "--offset {} is beyond the end of the export ({} bytes)",
            args.offset,
            info.size
        );
    }
    let region = args.size.unwrap_or(info.size - args.offset);
    if args
        .offset
        .checked_add(region)
        .is_none_or(|end| end > info.size)
    {
        bail!(
            "the region {}+{region} is beyond the end of the export ({} bytes)",
            args.offset,
            info.size
        );
    }
    let blocks = region / bs;
    if blocks == 0 {
        bail!("the region ({region} bytes) holds no block of {bs} bytes");
    }
    if args.verify && (blocks > 1 << 26 || blocks < args.queue_depth as u64) {
        bail!(
            "--verify needs between --queue-depth ({}) and {} blocks in the region, not {blocks}: use --size",
            args.queue_depth,
            1u64 << 26
        );
    }

    let clients: Arc<[Client]> = clients.into();
    let mut b = Bench::new(&args, clients.clone(), blocks)?;
    let verify = args.verify;
    // The loop runs as a task of its own, not as the runtime's block_on
    // future: a current-thread runtime polls its block_on future only after
    // parking (one more epoll_wait per wake-up), while a task woken by a
    // completion runs right after the connection task that completed it.
    let (b, elapsed, cpu) = tokio::spawn(async move {
        let start = Instant::now();
        let cpu0 = Cpu::now();
        b.run_timed(start).await?;
        let elapsed = start.elapsed();
        let cpu = Cpu::now().since(cpu0);
        if verify {
            b.run_final_check().await?;
        }
        anyhow::Ok((b, elapsed, cpu))
    })
    .await
    .context("the bench task failed")??;
    for c in clients.iter() {
        c.close(Duration::from_secs(5)).await;
    }
    let report = b.report(&args, &clients, region, elapsed, cpu)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_text();
    }
    if let Some(v) = &report.verify
        && v.errors > 0
    {
        bail!("--verify found {} bad block(s)", v.errors);
    }
    Ok(())
}

fn check_args(args: &Args) -> Result<()> {
    if args.queue_depth == 0 || args.queue_depth > 1 << 16 {
        bail!("--queue-depth must be between 1 and 65536");
    }
    if args.connections == 0 || args.connections > 1024 {
        bail!("--connections must be between 1 and 1024");
    }
    if args.block_size == 0 || args.block_size > 1 << 30 {
        bail!("--block-size must be between 1 byte and 1 GiB");
    }
    if args.verify {
        if args.rw == Rw::Read {
            bail!("--verify checks what this run writes: use --rw write or --rw mix");
        }
        if args.block_size < verify::MIN_BLOCK as u64 {
            bail!(
                "--verify needs --block-size of at least {}",
                verify::MIN_BLOCK
            );
        }
    }
    if args.queue_low.is_some_and(|l| l >= args.queue_depth) {
        bail!("--queue-low must be below --queue-depth");
    }
    if args.ops == Some(0) {
        bail!("--ops must be at least 1");
    }
    Ok(())
}

async fn connect(args: &Args) -> Result<Vec<Client>> {
    if args.multi_conn {
        let c = nbd::connect(&args.uri, args.connections).await?;
        if c.connections() < args.connections {
            bail!(
                "{} does not advertise multi-conn, so one client can't open {} connections; drop --multi-conn",
                args.uri,
                args.connections
            );
        }
        return Ok(vec![c]);
    }
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(nbd::connect(&args.uri, 1).await?);
    }
    Ok(clients)
}

/// An operation in flight on a slot.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    write: bool,
    block: u64,
    /// `--verify`: the generation written, or expected by a read (0: unknown).
    generation: u32,
    start: Instant,
}

#[derive(Debug, Default)]
struct Slot {
    /// The read buffer, while no read is in flight.
    rbuf: Option<Vec<u8>>,
    /// `--verify`: the write buffer, while no write is in flight.
    wbuf: Option<Vec<u8>>,
    /// `--verify`: our reference to the write in flight, to reclaim its buffer.
    wsent: Option<Bytes>,
    op: Option<InFlight>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The measured run.
    Timed,
    /// `--verify`: reading back every block written.
    FinalCheck,
}

struct Bench {
    ring: CompletionRing,
    clients: Arc<[Client]>,
    region_start: u64,
    blocks: u64,
    bs: u64,
    pattern: Pattern,
    rw: Rw,
    mix_read: u32,
    duration: Option<Duration>,
    ops_limit: u64,
    rng: Rng,
    seq_next: u64,
    next_client: usize,
    slots: Vec<Slot>,
    tracker: Option<Tracker>,
    /// Refill when at most this many operations are in flight.
    queue_low: usize,
    /// Slots with nothing in flight.
    free: Vec<usize>,
    /// Shared content of writes without --verify.
    wdata: Bytes,
    lat: Latencies,
    submitted: u64,
    reads: u64,
    writes: u64,
    vrep: VerifyReport,
    /// Completions that finished at submission (`Indirect::Done`).
    immediate: Vec<RingEntry>,
    phase: Phase,
}

impl Bench {
    fn new(args: &Args, clients: Arc<[Client]>, blocks: u64) -> Result<Self> {
        let ring = CompletionRing::new(args.queue_depth.next_power_of_two())?;
        let mut rng = Rng::new(args.seed);
        let mut wdata = vec![0u8; args.block_size as usize];
        rng.fill(&mut wdata);
        let slots = (0..args.queue_depth).map(|_| Slot::default()).collect();
        Ok(Self {
            ring,
            clients,
            region_start: args.offset,
            blocks,
            bs: args.block_size,
            pattern: args.pattern,
            rw: args.rw,
            mix_read: args.mix_read,
            duration: match (args.duration, args.ops) {
                (Some(d), _) => Some(d),
                (None, Some(_)) => None,
                (None, None) => Some(Duration::from_secs(10)),
            },
            ops_limit: args.ops.unwrap_or(u64::MAX),
            rng,
            seq_next: 0,
            next_client: 0,
            queue_low: args.queue_low.unwrap_or(args.queue_depth),
            free: (0..args.queue_depth).rev().collect(),
            slots,
            tracker: args.verify.then(|| Tracker::new(blocks as usize)),
            wdata: Bytes::from(wdata),
            lat: Latencies::new()?,
            submitted: 0,
            reads: 0,
            writes: 0,
            vrep: VerifyReport::default(),
            immediate: Vec::new(),
            phase: Phase::Timed,
        })
    }

    /// The measured run: keeps the slots busy (refilling once at most
    /// `queue_low` operations are in flight) until the time or the
    /// operation count is up, then drains.
    async fn run_timed(&mut self, start: Instant) -> Result<()> {
        let deadline = self.duration.map(|d| start + d);
        let mut now = start;
        loop {
            while let Some(e) = self.next_completion() {
                let slot = self.complete(e, now)?;
                self.free.push(slot);
            }
            let in_flight = self.slots.len() - self.free.len();
            let go_on = deadline.is_none_or(|d| now < d);
            if go_on && in_flight <= self.queue_low {
                while self.submitted < self.ops_limit {
                    let Some(slot) = self.free.pop() else { break };
                    let (write, block) = self.choose();
                    self.issue(slot, write, block, now)?;
                }
            }
            if self.ring.outstanding() == 0 && self.immediate.is_empty() {
                return Ok(());
            }
            if self.immediate.is_empty() {
                self.ring.ring_wait(self.ring.user_tail()).await;
            }
            now = Instant::now();
        }
    }

    /// `--verify`: reads back every block written and checks it.
    async fn run_final_check(&mut self) -> Result<()> {
        self.phase = Phase::FinalCheck;
        let todo: Vec<u64> = self
            .tracker
            .as_ref()
            .map(|t| t.written().map(|(b, _)| b).collect())
            .unwrap_or_default();
        let mut todo = todo.into_iter();
        loop {
            let now = Instant::now();
            while let Some(e) = self.next_completion() {
                let slot = self.complete(e, now)?;
                self.free.push(slot);
            }
            while let Some(&slot) = self.free.last() {
                let Some(block) = todo.next() else { break };
                self.free.pop();
                self.issue(slot, false, block, now)?;
            }
            if self.ring.outstanding() == 0 && self.immediate.is_empty() {
                return Ok(());
            }
            if self.immediate.is_empty() {
                self.ring.ring_wait(self.ring.user_tail()).await;
            }
        }
    }

    fn next_completion(&mut self) -> Option<RingEntry> {
        self.immediate.pop().or_else(|| self.ring.pop())
    }

    /// Picks the next operation: read or write, and which block.
    fn choose(&mut self) -> (bool, u64) {
        let write = match self.rw {
            Rw::Read => false,
            Rw::Write => true,
            Rw::Mix => self.rng.below(100) >= self.mix_read as u64,
        };
        (write, self.pick_block())
    }

    fn pick_block(&mut self) -> u64 {
        let mut b = match self.pattern {
            Pattern::Rand => self.rng.below(self.blocks),
            Pattern::Seq => {
                let b = self.seq_next;
                self.seq_next = (b + 1) % self.blocks;
                b
            }
        };
        let Some(t) = &self.tracker else { return b };
        // --verify: never a block with an operation in flight. There are
        // at least queue-depth blocks, and this slot's block is free, so
        // the scan ends.
        let mut tries = 0;
        while t.is_busy(b) {
            tries += 1;
            b = if self.pattern == Pattern::Rand && tries < 8 {
                self.rng.below(self.blocks)
            } else {
                (b + 1) % self.blocks
            };
        }
        if self.pattern == Pattern::Seq {
            self.seq_next = (b + 1) % self.blocks;
        }
        b
    }

    /// Submits one operation on `slot`.
    fn issue(&mut self, slot: usize, write: bool, block: u64, now: Instant) -> Result<()> {
        let offset = self.region_start + block * self.bs;
        let generation = self.tracker.as_mut().map_or(0, |t| t.start(block, write));
        let bs = self.bs as usize;
        let s = &mut self.slots[slot];
        let request = if write {
            let data = if self.tracker.is_some() {
                let mut v = s.wbuf.take().unwrap_or_default();
                v.resize(bs, 0);
                verify::fill(&mut v, offset, generation);
                let data = Bytes::from(v);
                s.wsent = Some(data.clone());
                data
            } else {
                self.wdata.clone()
            };
            Request::Write {
                offset,
                data,
                fua: false,
            }
        } else {
            let buf = s.rbuf.take().unwrap_or_else(|| vec![0u8; bs]);
            Request::Read {
                offset,
                buf: buf.into(),
            }
        };
        s.op = Some(InFlight {
            write,
            block,
            generation,
            start: now,
        });
        let n = self.clients.len();
        let client = if self.tracker.is_some() {
            // Each block always on the same connection: strict even
            // without multi-conn.
            &self.clients[(block % n as u64) as usize]
        } else {
            self.next_client = (self.next_client + 1) % n;
            &self.clients[self.next_client]
        };
        if self.phase == Phase::Timed {
            self.submitted += 1;
        }
        match self.ring.indirect(client, request, slot as u64) {
            Ok(Indirect::Pending) => Ok(()),
            Ok(Indirect::Done(entry)) => {
                self.immediate.push(entry);
                Ok(())
            }
            Err(refused) => {
                Err(anyhow!(refused.error).context("the completion ring refused a request"))
            }
        }
    }

    /// Accounts for one completion; returns its slot, free again.
    fn complete(&mut self, e: RingEntry, now: Instant) -> Result<usize> {
        let slot = e.caller_data as usize;
        let op = self
            .slots
            .get_mut(slot)
            .and_then(|s| s.op.take())
            .with_context(|| {
                format!("a completion for slot {slot}, which has nothing in flight")
            })?;
        let offset = self.region_start + op.block * self.bs;
        if let Err(err) = e.status {
            let what = if op.write { "write" } else { "read" };
            return Err(nbd::op_error(err, what, offset, self.bs));
        }
        let timed = self.phase == Phase::Timed;
        if timed {
            self.lat
                .record(op.write, now.saturating_duration_since(op.start));
        }
        let s = &mut self.slots[slot];
        if op.write {
            self.writes += 1;
            if let Some(sent) = s.wsent.take() {
                s.wbuf = sent.try_into_mut().ok().map(Vec::from);
            }
            if let Some(t) = &mut self.tracker {
                t.finish(op.block, Some(op.generation));
            }
            return Ok(slot);
        }
        let buf = e
            .buffer
            .context("a read completed without its buffer (client library bug)")?;
        if timed {
            self.reads += 1;
        }
        if let Some(t) = &mut self.tracker {
            t.finish(op.block, None);
            if op.generation == 0 {
                self.vrep.unverified_reads += 1;
            } else {
                if timed {
                    self.vrep.verified_reads += 1;
                } else {
                    self.vrep.final_checked += 1;
                }
                if let Err(m) = verify::check(&buf, offset, op.generation) {
                    self.vrep.errors += 1;
                    if self.vrep.errors <= 10 {
                        eprintln!(
                            "nbdraid: verify: block at offset {offset}: expected generation {}, {m}",
                            op.generation
                        );
                    }
                }
            }
        }
        self.slots[slot].rbuf = Some(buf.into_vec());
        Ok(slot)
    }

    fn report(
        &self,
        args: &Args,
        clients: &[Client],
        region: u64,
        elapsed: Duration,
        cpu: Cpu,
    ) -> Result<Report> {
        let ops = self.reads + self.writes;
        let secs = elapsed.as_secs_f64().max(1e-9);
        let total = cpu.user + cpu.sys;
        let all = report::merged(&self.lat)?;
        Ok(Report {
            uri: args.uri.clone(),
            pattern: match args.pattern {
                Pattern::Rand => "rand",
                Pattern::Seq => "seq",
            },
            rw: match args.rw {
                Rw::Read => "read",
                Rw::Write => "write",
                Rw::Mix => "mix",
            },
            mix_read: match args.rw {
                Rw::Read => 100,
                Rw::Write => 0,
                Rw::Mix => args.mix_read,
            },
            block_size: self.bs,
            queue_depth: args.queue_depth,
            queue_low: self.queue_low,
            connections: clients.iter().map(Client::connections).sum(),
            connection_mode: if args.multi_conn {
                "multi-conn"
            } else {
                "clients"
            },
            threads: args.threads,
            region_offset: args.offset,
            region_size: region,
            seconds: secs,
            ops,
            reads: self.reads,
            writes: self.writes,
            bytes: ops * self.bs,
            iops: ops as f64 / secs,
            mib_per_s: (ops * self.bs) as f64 / secs / (1 << 20) as f64,
            latency_us: LatencySummary::of(&all),
            read_latency_us: LatencySummary::of(&self.lat.read),
            write_latency_us: LatencySummary::of(&self.lat.write),
            cpu: CpuReport {
                user_s: cpu.user,
                sys_s: cpu.sys,
                total_s: total,
                cores: total / secs,
                us_per_io: if ops == 0 {
                    0.0
                } else {
                    total * 1e6 / ops as f64
                },
            },
            verify: args.verify.then(|| self.vrep.clone()),
        })
    }
}
