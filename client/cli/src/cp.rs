//! `nbdraid cp SRC DST`: copy between local files / devices and NBD
//! exports, in either direction (NBD to NBD too), pipelined and sparse.
//!
//! How it keeps holes and never loses data:
//! - The source is planned into data and zero ranges (see [`plan`]).
//!   Zero ranges are never read. Data blocks that turn out to be all
//!   zeroes are treated as zero ranges too (unless `--no-detect-zeroes`).
//! - A local destination file is truncated to the source's size first, so
//!   every zero range is already a hole and is skipped. Any other
//!   destination (an export, a block device) is not known to read as
//!   zeroes, so zero ranges get WRITE_ZEROES (a punched hole or zeroed
//!   range locally), unless `--dest-is-zero` says it already reads as zeroes.
//! - Up to `--queue-depth` jobs run at once; every job's status is checked
//!   and the first failure stops the copy with an error. At the end the
//!   destination is flushed (NBD FLUSH, or fsync) and only then does the
//!   command succeed.

mod endpoint;
mod plan;

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

use crate::units::{human, parse_size};
use endpoint::Endpoint;
use plan::{Chunker, Segment, Source};

/// Arguments of `nbdraid cp`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Source: a local file or device, or nbd://HOST[:PORT][/EXPORT].
    src: String,
    /// Destination: a local file (created if missing) or device, or an NBD URI.
    dst: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    queue_depth: usize,
    /// Size of each read and write.
    #[arg(long, short = 'b', default_value = "1M", value_parser = parse_size)]
    block_size: u64,
    /// Connections per NBD export (used when the server allows multi-conn).
    #[arg(long, short = 'c', default_value_t = 1)]
    connections: usize,
    /// Copy every byte: no block status, no SEEK_DATA, no zero detection.
    #[arg(long)]
    no_sparse: bool,
    /// Write all-zero data blocks as data instead of as zero ranges.
    #[arg(long)]
    no_detect_zeroes: bool,
    /// The destination already reads as zeroes: skip zero ranges on it.
    #[arg(long)]
    dest_is_zero: bool,
    /// Show a progress bar even when stderr is not a terminal.
    #[arg(long, conflicts_with = "quiet")]
    progress: bool,
    /// No progress bar and no summary.
    #[arg(long)]
    quiet: bool,
}

/// What was done, for the summary.
#[derive(Debug, Default)]
struct Totals {
    /// Bytes read and written as data.
    data: u64,
    /// Bytes of zero ranges (skipped or zeroed on the destination).
    zero: u64,
    /// Of `zero`, bytes that were read as data and found to be zeroes.
    detected: u64,
}

/// What one job did.
enum Outcome {
    Data(u64),
    Zero(u64),
    Detected(u64),
}

/// Runs `nbdraid cp`.
pub async fn run(args: Args) -> Result<()> {
    if args.queue_depth == 0 {
        bail!("--queue-depth must be at least 1");
    }
    if args.block_size == 0 || args.block_size > 1 << 30 {
        bail!("--block-size must be between 1 byte and 1 GiB");
    }
    let src = Endpoint::open_source(&args.src, args.connections).await?;
    let dst = Endpoint::open_dest(&args.dst, args.connections).await?;
    if let (Some(a), Some(b)) = (src.file(), dst.file()) {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (a.metadata()?, b.metadata()?);
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            bail!("the source and the destination are the same file");
        }
    }
    let size = src.size()?.with_context(|| {
        format!(
            "the source {} has no size (not a file, device or export)",
            src.name()
        )
    })?;
    let dest_zeroed = dst.prepare_dest(size, args.dest_is_zero)?;
    if let Some(d) = dst.size()?
        && d > size
        && !args.quiet
    {
        eprintln!(
            "nbdraid: note: the destination is larger ({}) than the source ({}); the rest is left as it was",
            human(d),
            human(size)
        );
    }

    let bar = progress_bar(&args, size);
    let start = Instant::now();
    let totals = copy(&args, &src, &dst, size, dest_zeroed, &bar).await;
    if std::io::stderr().is_terminal() {
        bar.finish_and_clear();
    } else {
        // A log gets the final state even when the copy beat the 1 Hz redraw.
        bar.finish();
    }
    let totals = totals?;
    dst.flush().await?;
    src.close().await;
    dst.close().await;

    if !args.quiet {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "copied {} in {:.2} s ({:.1} MiB/s): {} data, {} zero ({} of it detected in data)",
            human(size),
            secs,
            size as f64 / (1 << 20) as f64 / secs.max(1e-9),
            human(totals.data),
            human(totals.zero + totals.detected),
            human(totals.detected),
        );
    }
    Ok(())
}

/// Progress on a stderr that is not a terminal (`--progress` into a log):
/// one plain line per redraw, no cursor movement.
#[derive(Debug)]
struct LineLog;

impl TermLike for LineLog {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        writeln!(std::io::stderr(), "{s}")
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        if s.is_empty() {
            Ok(())
        } else {
            self.write_line(s)
        }
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn progress_bar(args: &Args, size: u64) -> ProgressBar {
    let tty = std::io::stderr().is_terminal();
    if args.quiet || !(args.progress || tty) {
        return ProgressBar::hidden();
    }
    let target = if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::term_like_with_hz(Box::new(LineLog), 1)
    };
    let bar = ProgressBar::with_draw_target(Some(size), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{bytes:>10}/{total_bytes} [{wide_bar}] {binary_bytes_per_sec:>12} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.enable_steady_tick(Duration::from_millis(if tty { 200 } else { 1000 }));
    bar
}

/// Runs the pipeline: plans jobs, keeps up to `queue_depth` of them in
/// flight, and stops at the first error.
async fn copy(
    args: &Args,
    src: &Endpoint,
    dst: &Endpoint,
    size: u64,
    dest_zeroed: bool,
    bar: &ProgressBar,
) -> Result<Totals> {
    let sparse = !args.no_sparse;
    let mut source = match (src.client(), src.file()) {
        (Some(c), _) => Source::nbd(c, size, sparse),
        (None, Some(f)) => Source::file(f, size, sparse),
        (None, None) => bail!("unsupported source"),
    };
    let mut chunker = Chunker::new(args.block_size, dst.zero_chunk(args.block_size));
    let detect = sparse && !args.no_detect_zeroes;
    let mut buffers: Vec<Vec<u8>> = Vec::with_capacity(args.queue_depth);
    let mut running = FuturesUnordered::new();
    let mut totals = Totals::default();
    let mut planned_all = false;
    loop {
        while !planned_all && running.len() < args.queue_depth {
            if chunker.is_empty() {
                match source.next().await? {
                    Some(seg) => chunker.push(seg),
                    None => {
                        planned_all = true;
                        break;
                    }
                }
            }
            let Some(job) = chunker.next_job() else {
                continue;
            };
            let buf = if job.zero {
                None
            } else {
                Some(buffers.pop().unwrap_or_default())
            };
            running.push(run_job(src, dst, job, buf, dest_zeroed, detect));
        }
        let Some(result) = running.next().await else {
            break;
        };
        let (buf, outcome) = result?;
        if let Some(b) = buf {
            buffers.push(b);
        }
        let n = match outcome {
            Outcome::Data(n) => {
                totals.data += n;
                n
            }
            Outcome::Zero(n) => {
                totals.zero += n;
                n
            }
            Outcome::Detected(n) => {
                totals.detected += n;
                n
            }
        };
        bar.inc(n);
    }
    Ok(totals)
}

/// Copies one job; hands its buffer back for reuse.
async fn run_job(
    src: &Endpoint,
    dst: &Endpoint,
    job: Segment,
    buf: Option<Vec<u8>>,
    dest_zeroed: bool,
    detect: bool,
) -> Result<(Option<Vec<u8>>, Outcome)> {
    let Some(mut buf) = buf else {
        if !dest_zeroed {
            dst.zero(job.offset, job.len).await?;
        }
        return Ok((None, Outcome::Zero(job.len)));
    };
    buf.resize(job.len as usize, 0);
    let buf = src.read(job.offset, buf).await?;
    if detect && endpoint::is_zero(&buf) {
        if !dest_zeroed {
            dst.zero(job.offset, job.len).await?;
        }
        return Ok((Some(buf), Outcome::Detected(job.len)));
    }
    let buf = dst.write(job.offset, buf).await?;
    Ok((Some(buf), Outcome::Data(job.len)))
}
