//! `nbdraid array ...`: an array daemon's `Array` admin service over gRPC
//! (`--array ADDR`, the daemon's `--grpc-listen`).
//!
//! The CLI checks only what clap can (a known level, sizes that parse);
//! every rule of an array spec is the daemon's, so `create` is refused
//! with the daemon's own words, the same ones its configuration gets.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nbdraid_proto::ByteSize;
use nbdraid_proto::grpc::array_client::ArrayClient;
use nbdraid_proto::grpc::{self};
use nbdraid_proto::units::format_size;
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::admin::{channel, status};
use crate::units::human;

/// Which array daemon to talk to (`--array`, for every `array` subcommand).
#[derive(Debug, clap::Args)]
pub struct ArrayAddr {
    /// The array daemon's gRPC address (its --grpc-listen), host:port.
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:10820"
    )]
    pub array: String,
}

/// The levels `--level` accepts (the daemon's spelling).
const LEVELS: [&str; 5] = ["raid0", "raid1", "raid5", "raid6", "raid10"];

/// Array administration.
#[derive(Debug, Subcommand)]
pub enum ArrayCmd {
    /// Create an array from member volumes and serve it as an export of the
    /// same name (members that carry its superblocks are assembled instead).
    Create(CreateArgs),
    /// List the daemon's arrays.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show an array in detail: geometry, state, bitmap, sync and check
    /// progress, and its members.
    Status {
        /// Array name.
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Follow the running rebuild, resync, check or repair until none
        /// runs: progress bars on a terminal, a plain line per operation
        /// every --interval when piped; then print the status.
        #[arg(long)]
        watch: bool,
        /// How often --watch polls (and writes lines when piped), seconds.
        #[arg(long, default_value_t = 2.0, value_name = "SECS")]
        interval: f64,
    },
    /// Re-add a failed member and resync it from the write-intent bitmap.
    ReAdd {
        /// Array name.
        name: String,
        /// The member's slot (see `status`).
        slot: u32,
    },
    /// Give a member's slot to another volume and rebuild it there while
    /// the array serves (the member still in the slot is failed out first,
    /// if the array survives that).
    Replace {
        /// Array name.
        name: String,
        /// The slot to replace (see `status`).
        #[arg(long = "member", value_name = "SLOT")]
        slot: u32,
        /// The new member volume, nbd://host:port/export.
        #[arg(long = "with", value_name = "URI")]
        uri: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add a hot spare: it takes the slot of a member that fails, and is
    /// rebuilt there.
    AddSpare {
        /// Array name.
        name: String,
        /// The spare volume, nbd://host:port/export.
        uri: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a spare, or fail a member out of the array (the array goes on
    /// degraded; a spare takes the slot if there is one).
    Remove {
        /// Array name.
        name: String,
        /// The member's slot.
        #[arg(
            long = "member",
            value_name = "SLOT",
            conflicts_with = "spare",
            required_unless_present = "spare"
        )]
        slot: Option<u32>,
        /// The spare's URI.
        #[arg(long, value_name = "URI")]
        spare: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set the resync, rebuild and check rate limit (e.g. 50M per second,
    /// 0 for none), in force at once for the passes running.
    SetRate {
        /// Array name.
        name: String,
        /// Bytes of member data per second; 0 = no limit.
        rate: ByteSize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check an array: read every stripe and verify its parity or copies.
    /// Exits with status 1 if any mismatch is found (a check) or remains
    /// unrepaired (a repair).
    Check {
        /// Array name.
        name: String,
        /// Repair what disagrees: RAID 1/10 from the copy most copies hold,
        /// RAID 5 by rewriting parity, RAID 6 by rewriting the one chunk
        /// the P and Q syndromes point at.
        #[arg(long)]
        repair: bool,
        /// Start the check and return at once (follow it with `status`).
        #[arg(long)]
        no_wait: bool,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
        /// Draw no progress.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// `nbdraid array create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Array (and export) name: letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// RAID level.
    #[arg(long, value_parser = LEVELS)]
    pub level: String,
    /// Chunk size (levels that stripe), a power of two of at least 4K.
    #[arg(long, default_value = "512K")]
    pub chunk: ByteSize,
    /// Member volume, nbd://host:port/export; repeat in slot order.
    #[arg(long = "member", value_name = "URI", required = true)]
    pub members: Vec<String>,
    /// Copies of each chunk (raid10).
    #[arg(long, default_value_t = 2)]
    pub copies: u32,
    /// Write-intent bitmap region, bytes of member data per bit [default:
    /// chosen by the daemon].
    #[arg(long, value_name = "SIZE")]
    pub bitmap_region: Option<ByteSize>,
    /// Take members that hold another array's superblock (destroys that
    /// array's data).
    #[arg(long)]
    pub overwrite: bool,
    /// Hot spare, nbd://host:port/export: takes the slot of a member that
    /// fails; repeat for more.
    #[arg(long = "spare", value_name = "URI")]
    pub spares: Vec<String>,
    /// Start even if dirty and degraded: stripes written at the crash may
    /// be wrong (RAID 5/6 write hole).
    #[arg(long)]
    pub force: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl CreateArgs {
    /// Returns the request this asks for.
    fn spec(&self) -> grpc::ArraySpec {
        grpc::ArraySpec {
            name: self.name.clone(),
            level: self.level.clone(),
            chunk: self.chunk.0,
            copies: self.copies,
            members: self.members.clone(),
            bitmap_region: self.bitmap_region.map_or(0, |b| b.0),
            force: self.force,
            overwrite: self.overwrite,
            spares: self.spares.clone(),
        }
    }
}

async fn connect(addr: &str) -> Result<ArrayClient<Channel>> {
    Ok(ArrayClient::new(channel(addr, "array daemon").await?))
}

/// How often `check` asks for progress.
const POLL: Duration = Duration::from_millis(500);

/// Runs an `array` subcommand against the array daemon at `addr`.
pub async fn run(addr: &str, cmd: ArrayCmd) -> Result<()> {
    let mut c = connect(addr).await?;
    match cmd {
        ArrayCmd::Create(args) => {
            let s = c
                .create_array(args.spec())
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, args.json);
        }
        ArrayCmd::List { json } => {
            let arrays = c
                .list_arrays(grpc::ListArraysRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .arrays;
            if json {
                println!("{}", Value::Array(arrays.iter().map(status_json).collect()));
            } else {
                for a in &arrays {
                    println!("{}", summary_line(a));
                }
            }
        }
        ArrayCmd::Status {
            name,
            json,
            watch,
            interval,
        } => {
            if watch {
                watch_status(&mut c, &name, interval).await?;
            }
            let s = get_status(&mut c, &name).await?;
            if json {
                println!("{}", status_json(&s));
            } else {
                print!("{}", render_status(&s));
            }
        }
        ArrayCmd::ReAdd { name, slot } => {
            let s = c
                .re_add(grpc::ReAddRequest { name, slot })
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, false);
        }
        ArrayCmd::Replace {
            name,
            slot,
            uri,
            json,
        } => {
            let s = c
                .replace(grpc::ReplaceRequest { name, slot, uri })
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, json);
        }
        ArrayCmd::AddSpare { name, uri, json } => {
            let s = c
                .add_spare(grpc::SpareRequest { name, uri })
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, json);
        }
        ArrayCmd::Remove {
            name,
            slot,
            spare,
            json,
        } => {
            let what = match (slot, spare) {
                (Some(slot), _) => grpc::remove_request::What::Slot(slot),
                (None, Some(uri)) => grpc::remove_request::What::Spare(uri),
                (None, None) => bail!("remove what? give --member SLOT or --spare URI"),
            };
            let s = c
                .remove(grpc::RemoveRequest {
                    name,
                    what: Some(what),
                })
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, json);
        }
        ArrayCmd::SetRate { name, rate, json } => {
            let s = c
                .set_rate(grpc::SetRateRequest { name, rate: rate.0 })
                .await
                .map_err(status)?
                .into_inner();
            print_one(&s, json);
        }
        ArrayCmd::Check {
            name,
            repair,
            no_wait,
            json,
            quiet,
        } => check(&mut c, &name, repair, no_wait, json, quiet).await?,
    }
    Ok(())
}

/// Follows `name`'s running operations until none runs.
async fn watch_status(c: &mut ArrayClient<Channel>, name: &str, interval: f64) -> Result<()> {
    if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
        bail!("--interval must be between 0 and 3600 seconds, got {interval}");
    }
    let every = Duration::from_secs_f64(interval);
    let mut view = ProgressView::new(false, every);
    loop {
        let s = get_status(c, name).await?;
        let mut running = Vec::new();
        if let Some(p) = &s.sync {
            let label = format!("{} of {name}", p.kind);
            view.show(&label, p, "");
            running.push(label);
        }
        if let Some(check) = s.check.as_ref().filter(|c| c.running)
            && let Some(p) = &check.progress
        {
            let label = format!("{} of {name}", p.kind);
            view.show(&label, p, &format!(", {} mismatches", check.mismatches));
            running.push(label);
        }
        view.retain(&running);
        if running.is_empty() {
            break;
        }
        tokio::time::sleep(every.min(POLL)).await;
    }
    view.finish();
    Ok(())
}

async fn get_status(c: &mut ArrayClient<Channel>, name: &str) -> Result<grpc::ArrayStatus> {
    Ok(c.get_array_status(grpc::ArrayStatusRequest {
        name: name.to_string(),
    })
    .await
    .map_err(status)?
    .into_inner())
}

fn print_one(s: &grpc::ArrayStatus, json: bool) {
    if json {
        println!("{}", status_json(s));
    } else {
        println!("{}", summary_line(s));
    }
}

/// Starts a check and, unless `no_wait`, follows it to the end; fails if it
/// found mismatches.
async fn check(
    c: &mut ArrayClient<Channel>,
    name: &str,
    repair: bool,
    no_wait: bool,
    json: bool,
    quiet: bool,
) -> Result<()> {
    let mut report = c
        .check(grpc::CheckRequest {
            name: name.to_string(),
            repair,
        })
        .await
        .map_err(status)?
        .into_inner();
    let what = if repair { "repair" } else { "check" };
    if no_wait {
        println!("{what} of {name} started; follow it with: nbdraid array status {name}");
        return Ok(());
    }
    let mut progress = ProgressView::new(quiet, PLAIN_EVERY);
    let label = format!("{what} of {name}");
    while report.running {
        if let Some(p) = &report.progress {
            progress.show(
                &label,
                p,
                &format!(", {} mismatches so far", report.mismatches),
            );
        }
        tokio::time::sleep(POLL).await;
        report = get_status(c, name)
            .await?
            .check
            .with_context(|| format!("the array daemon no longer reports a check of {name}"))?;
    }
    progress.finish();
    if json {
        println!("{}", check_json(&report));
    } else {
        println!("{what} of {name}: {}", check_summary(&report, None));
    }
    if report.mismatches > report.repaired {
        if repair {
            bail!(
                "repair of {name} found {} mismatches and repaired {}",
                report.mismatches,
                report.repaired
            );
        }
        bail!(
            "check of {name} found {} mismatch{}",
            report.mismatches,
            if report.mismatches == 1 { "" } else { "es" }
        );
    }
    Ok(())
}

/// How often progress is written when stderr is not a terminal (check).
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Progress of running operations (a check, a rebuild, a resync) on
/// stderr: a bar each on a terminal; on a pipe or file, a plain line per
/// operation every `every` (a log gets no cursor movement and no flood of
/// redraws).
struct ProgressView {
    mode: ViewMode,
    every: Duration,
}

enum ViewMode {
    Hidden,
    Bars {
        multi: indicatif::MultiProgress,
        bars: Vec<(String, ProgressBar)>,
    },
    Lines {
        last: Vec<(String, Instant)>,
    },
}

impl ProgressView {
    fn new(quiet: bool, every: Duration) -> Self {
        let mode = if quiet {
            ViewMode::Hidden
        } else if std::io::stderr().is_terminal() {
            ViewMode::Bars {
                multi: indicatif::MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                bars: Vec::new(),
            }
        } else {
            ViewMode::Lines { last: Vec::new() }
        };
        Self { mode, every }
    }

    /// Shows operation `label` at `p`, with `extra` after the rate.
    fn show(&mut self, label: &str, p: &grpc::Progress, extra: &str) {
        let every = self.every;
        match &mut self.mode {
            ViewMode::Hidden => {}
            ViewMode::Bars { multi, bars } => {
                let bar = match bars.iter().find(|(l, _)| l == label) {
                    Some((_, b)) => b.clone(),
                    None => {
                        let b = multi.add(ProgressBar::new(p.total));
                        if let Ok(style) = ProgressStyle::with_template(&format!(
                            "{label:<18} {{bytes:>10}}/{{total_bytes}} [{{wide_bar}}] {{percent:>3}}% {{msg}}"
                        )) {
                            b.set_style(style.progress_chars("=> "));
                        }
                        bars.push((label.to_string(), b.clone()));
                        b
                    }
                };
                bar.set_length(p.total);
                bar.set_position(p.done);
                bar.set_message(format!("{}{extra}", rate_eta(p)));
            }
            ViewMode::Lines { last } => {
                let due = last
                    .iter()
                    .find(|(l, _)| l == label)
                    .is_none_or(|(_, t)| t.elapsed() >= every);
                if due {
                    eprintln!("{label}: {}{extra}", progress_line(p));
                    last.retain(|(l, _)| l != label);
                    last.push((label.to_string(), Instant::now()));
                }
            }
        }
    }

    /// Clears the bars of operations not in `running`.
    fn retain(&mut self, running: &[String]) {
        if let ViewMode::Bars { bars, .. } = &mut self.mode {
            bars.retain(|(l, b)| {
                let keep = running.contains(l);
                if !keep {
                    b.finish_and_clear();
                }
                keep
            });
        }
    }

    fn finish(mut self) {
        self.retain(&[]);
    }
}

/// Formats seconds as `1h02m03s`, `2m03s` or `12s`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

fn percent(p: &grpc::Progress) -> f64 {
    if p.total == 0 {
        100.0
    } else {
        p.done as f64 * 100.0 / p.total as f64
    }
}

fn rate_eta(p: &grpc::Progress) -> String {
    let eta = p.eta_secs.map_or_else(|| "unknown".to_string(), duration);
    format!("{}/s, eta {eta}", human(p.rate.max(0.0) as u64))
}

/// `45.0% (1.2 GiB of 2.7 GiB) at 117.7 MiB/s, eta 12s`.
fn progress_line(p: &grpc::Progress) -> String {
    format!(
        "{:.1}% ({} of {}) at {}",
        percent(p),
        human(p.done),
        human(p.total),
        rate_eta(p)
    )
}

/// What a check found, in one line; `unit` names what its numbers count
/// (stripes or chunks).
fn check_summary(c: &grpc::CheckReport, unit: Option<&str>) -> String {
    let mut out = if c.running {
        match &c.progress {
            Some(p) => format!("running, {}, ", progress_line(p)),
            None => "running, ".to_string(),
        }
    } else {
        "done, ".to_string()
    };
    out += &format!(
        "{} mismatch{}",
        c.mismatches,
        if c.mismatches == 1 { "" } else { "es" }
    );
    if !c.first_mismatches.is_empty() {
        let list: Vec<String> = c.first_mismatches.iter().map(u64::to_string).collect();
        let more = if (c.first_mismatches.len() as u64) < c.mismatches {
            ", ..."
        } else {
            ""
        };
        let label = unit.unwrap_or("at");
        out += &format!(" ({label} {}{more})", list.join(", "));
    }
    if c.repair {
        out += &format!(", {} repaired", c.repaired);
    }
    if c.errors > 0 {
        out += &format!(
            ", {} read error{} (member failed)",
            c.errors,
            if c.errors == 1 { "" } else { "s" }
        );
    }
    out
}

fn active_members(s: &grpc::ArrayStatus) -> usize {
    s.members.iter().filter(|m| m.state == "active").count()
}

/// One line per array, for `list`, `create` and `re-add`.
fn summary_line(s: &grpc::ArrayStatus) -> String {
    let mut line = format!(
        "{:<20} {:<6} {:>10} {:<9} {}/{} members active",
        s.name,
        s.level,
        human(s.size),
        s.state,
        active_members(s),
        s.members.len()
    );
    if let Some(p) = &s.sync {
        line += &format!(", {} {:.1}%", p.kind, percent(p));
    }
    if let Some(c) = &s.check
        && c.running
    {
        line += &format!(", check {:.1}%", c.progress.as_ref().map_or(0.0, percent));
    }
    line
}

fn size_line(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", human(bytes))
}

/// The `status` block, shaped like `mdadm --detail`.
fn render_status(s: &grpc::ArrayStatus) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
    row("Uuid", s.uuid.clone());
    row("Level", s.level.clone());
    if !s.layout.is_empty() {
        row("Layout", s.layout.clone());
    }
    if s.level != "raid1" {
        row("Chunk Size", format_size(s.chunk));
    }
    if s.level == "raid10" {
        row("Copies", s.copies.to_string());
    }
    row("Array Size", size_line(s.size));
    row("Member Size", size_line(s.member_size));
    row(
        "Members",
        format!("{} ({} active)", s.members.len(), active_members(s)),
    );
    row("State", s.state.clone());
    row("Events", s.events.to_string());
    row(
        "Bitmap",
        if s.bitmap_region == 0 {
            "none".to_string()
        } else {
            format!(
                "{} regions, {} dirty",
                format_size(s.bitmap_region),
                s.bitmap_dirty
            )
        },
    );
    row("Export", s.export.clone());
    row(
        "Sync Rate",
        if s.sync_rate == 0 {
            "unlimited".to_string()
        } else {
            format!("{}/s", format_size(s.sync_rate))
        },
    );
    if !s.spares.is_empty() {
        row("Spares", s.spares.join(", "));
    }
    if let Some(p) = &s.sync {
        let mut kind = p.kind.clone();
        if let Some(first) = kind.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        row(&format!("{kind} Status"), progress_line(p));
    }
    if let Some(c) = &s.check {
        let unit = if matches!(s.level.as_str(), "raid5" | "raid6") {
            "stripes"
        } else {
            "chunks"
        };
        row("Check", check_summary(c, Some(unit)));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    let mut out = format!("{}:\n", s.name);
    for (k, v) in &rows {
        out += &format!("{k:>width$} : {v}\n");
    }
    out += &format!(
        "\n{:>6}  {:<11} {:>8} {:>12} {:>12} {:>9}  {:<36}  {}\n",
        "Slot", "State", "Errors", "Reads", "Writes", "Latency", "Uuid", "Uri"
    );
    for m in &s.members {
        out += &format!(
            "{:>6}  {:<11} {:>8} {:>12} {:>12} {:>7}us  {:<36}  {}\n",
            m.slot, m.state, m.errors, m.reads, m.writes, m.latency_us, m.uuid, m.uri
        );
    }
    out
}

fn progress_json(p: &grpc::Progress) -> Value {
    json!({
        "kind": p.kind, "done": p.done, "total": p.total,
        "rate": p.rate, "eta_secs": p.eta_secs,
    })
}

fn check_json(c: &grpc::CheckReport) -> Value {
    json!({
        "running": c.running,
        "progress": c.progress.as_ref().map(progress_json),
        "mismatches": c.mismatches,
        "first_mismatches": c.first_mismatches,
        "repair": c.repair,
        "repaired": c.repaired,
        "errors": c.errors,
    })
}

fn status_json(s: &grpc::ArrayStatus) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "slot": m.slot, "uri": m.uri, "uuid": m.uuid, "state": m.state,
                "errors": m.errors, "reads": m.reads, "writes": m.writes,
                "latency_us": m.latency_us,
            })
        })
        .collect();
    json!({
        "name": s.name, "uuid": s.uuid, "level": s.level, "layout": s.layout,
        "chunk": s.chunk, "copies": s.copies, "size": s.size,
        "member_size": s.member_size, "state": s.state, "events": s.events,
        "bitmap_region": s.bitmap_region, "bitmap_dirty": s.bitmap_dirty,
        "members": members,
        "sync": s.sync.as_ref().map(progress_json),
        "check": s.check.as_ref().map(check_json),
        "export": s.export,
        "spares": s.spares,
        "sync_rate": s.sync_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<(String, ArrayCmd), clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("nbdraid").chain(argv.iter().copied()))?;
        match cli.command {
            Command::Array { array, cmd } => Ok((array.array, cmd)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn create_parses_every_option() {
        let (addr, cmd) = parse(&[
            "array",
            "--array",
            "10.0.0.9:7000",
            "create",
            "r10",
            "--level",
            "raid10",
            "--chunk",
            "64K",
            "--member",
            "nbd://a/x",
            "--member",
            "nbd://b/x",
            "--member",
            "nbd://c/x",
            "--copies",
            "3",
            "--bitmap-region",
            "16M",
            "--overwrite",
            "--force",
        ])
        .unwrap();
        assert_eq!(addr, "10.0.0.9:7000");
        let ArrayCmd::Create(args) = cmd else {
            panic!("{cmd:?}");
        };
        let spec = args.spec();
        assert_eq!(spec.level, "raid10");
        assert_eq!(spec.chunk, 64 << 10);
        assert_eq!(spec.copies, 3);
        assert_eq!(spec.members, ["nbd://a/x", "nbd://b/x", "nbd://c/x"]);
        assert_eq!(spec.bitmap_region, 16 << 20);
        assert!(spec.overwrite && spec.force);
    }

    #[test]
    fn create_defaults_and_refusals() {
        let (addr, cmd) = parse(&[
            "array",
            "create",
            "r5",
            "--level",
            "raid5",
            "--member",
            "nbd://a/x",
        ])
        .unwrap();
        assert_eq!(addr, "127.0.0.1:10820");
        let ArrayCmd::Create(args) = cmd else {
            panic!("{cmd:?}");
        };
        let spec = args.spec();
        assert_eq!(
            (spec.chunk, spec.copies, spec.bitmap_region),
            (512 << 10, 2, 0)
        );
        assert!(!spec.force && !spec.overwrite);
        // The daemon judges the member count; clap only the level and sizes.
        let e = parse(&[
            "array",
            "create",
            "r",
            "--level",
            "raid4",
            "--member",
            "nbd://a/x",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("raid4"), "{e}");
        assert!(parse(&["array", "create", "r", "--level", "raid5"]).is_err());
        assert!(
            parse(&[
                "array", "create", "r", "--level", "raid5", "--chunk", "12Q", "--member", "x"
            ])
            .is_err()
        );
    }

    #[test]
    fn other_subcommands_parse() {
        let (addr, cmd) = parse(&["array", "status", "r5", "--json", "--array", "h:1"]).unwrap();
        assert_eq!(addr, "h:1");
        assert!(
            matches!(cmd, ArrayCmd::Status { name, json: true, watch: false, .. } if name == "r5")
        );
        let (_, cmd) = parse(&["array", "status", "r5", "--watch", "--interval", "0.5"]).unwrap();
        assert!(matches!(cmd, ArrayCmd::Status { watch: true, interval, .. } if interval == 0.5));
        let (_, cmd) = parse(&[
            "array",
            "replace",
            "r5",
            "--member",
            "2",
            "--with",
            "nbd://h:1/v",
        ])
        .unwrap();
        assert!(
            matches!(cmd, ArrayCmd::Replace { name, slot: 2, uri, .. } if name == "r5" && uri == "nbd://h:1/v")
        );
        let (_, cmd) = parse(&["array", "remove", "r5", "--spare", "nbd://h:1/s"]).unwrap();
        assert!(matches!(
            cmd,
            ArrayCmd::Remove {
                slot: None,
                spare: Some(_),
                ..
            }
        ));
        assert!(parse(&["array", "remove", "r5"]).is_err(), "remove what?");
        assert!(
            parse(&[
                "array",
                "remove",
                "r5",
                "--member",
                "1",
                "--spare",
                "nbd://h:1/s"
            ])
            .is_err(),
            "one or the other"
        );
        let (_, cmd) = parse(&["array", "set-rate", "r5", "50M"]).unwrap();
        assert!(matches!(cmd, ArrayCmd::SetRate { rate, .. } if rate.0 == 50 << 20));
        let (_, cmd) = parse(&["array", "check", "r5", "--repair"]).unwrap();
        assert!(matches!(cmd, ArrayCmd::Check { repair: true, .. }));
        let (_, cmd) = parse(&["array", "re-add", "r5", "2"]).unwrap();
        assert!(matches!(cmd, ArrayCmd::ReAdd { name, slot: 2 } if name == "r5"));
        let (_, cmd) = parse(&["array", "check", "r5", "--no-wait"]).unwrap();
        assert!(matches!(
            cmd,
            ArrayCmd::Check {
                no_wait: true,
                json: false,
                quiet: false,
                ..
            }
        ));
        let (_, cmd) = parse(&["array", "list"]).unwrap();
        assert!(matches!(cmd, ArrayCmd::List { json: false }));
        assert!(parse(&["array", "re-add", "r5", "-1"]).is_err());
    }

    fn fixture() -> grpc::ArrayStatus {
        let progress = |kind: &str, done: u64| grpc::Progress {
            kind: kind.into(),
            done,
            total: 10 << 30,
            rate: 120.0 * (1 << 20) as f64,
            eta_secs: Some(3725.0),
        };
        grpc::ArrayStatus {
            name: "r6".into(),
            uuid: "0f0e0d0c-0000-4000-8000-000000000001".into(),
            level: "raid6".into(),
            layout: "left-symmetric".into(),
            chunk: 512 << 10,
            copies: 2,
            size: 20 << 30,
            member_size: 10 << 30,
            state: "degraded".into(),
            events: 42,
            bitmap_region: 64 << 20,
            bitmap_dirty: 7,
            members: (0..4)
                .map(|slot| grpc::MemberStatus {
                    slot,
                    uri: format!("nbd://n{slot}:10809/v"),
                    uuid: format!("member-{slot}"),
                    state: if slot == 2 { "recovering" } else { "active" }.into(),
                    errors: u64::from(slot),
                    reads: 1000,
                    writes: 2000,
                    latency_us: 250,
                })
                .collect(),
            sync: Some(progress("recovery", 3 << 30)),
            check: Some(grpc::CheckReport {
                running: false,
                progress: Some(progress("check", 10 << 30)),
                mismatches: 3,
                first_mismatches: vec![17, 99],
                errors: 1,
                repaired: 0,
                repair: false,
            }),
            export: "r6".into(),
            spares: vec!["nbd://n9:10809/v".into()],
            sync_rate: 0,
        }
    }

    #[test]
    fn status_reads_like_mdadm_detail() {
        let text = render_status(&fixture());
        for want in [
            "r6:\n",
            "Level : raid6\n",
            "Layout : left-symmetric\n",
            "Chunk Size : 512K\n",
            "Array Size : 20.0 GiB (21474836480 bytes)\n",
            "Member Size : 10.0 GiB (10737418240 bytes)\n",
            "Members : 4 (3 active)\n",
            "State : degraded\n",
            "Events : 42\n",
            "Bitmap : 64M regions, 7 dirty\n",
            "Recovery Status : 30.0% (3.0 GiB of 10.0 GiB) at 120.0 MiB/s, eta 1h02m05s\n",
            "Check : done, 3 mismatches (stripes 17, 99, ...), 1 read error (member failed)\n",
            "recovering",
            "nbd://n3:10809/v",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("Copies"), "{text}");
        // Labels are right-aligned to one column.
        let colons: Vec<usize> = text.lines().filter_map(|l| l.find(" : ")).collect();
        assert!(colons.windows(2).all(|w| w[0] == w[1]), "{text}");
        let line = summary_line(&fixture());
        assert!(
            line.contains("raid6") && line.contains("3/4 members active"),
            "{line}"
        );
        assert!(line.contains("recovery 30.0%"), "{line}");
    }

    #[test]
    fn raid1_has_no_chunk_and_json_has_everything() {
        let mut s = fixture();
        s.level = "raid1".into();
        s.layout.clear();
        s.sync = None;
        s.check = None;
        let text = render_status(&s);
        assert!(
            !text.contains("Chunk") && !text.contains("Layout"),
            "{text}"
        );
        assert!(
            !text.contains("Status") && !text.contains("Check"),
            "{text}"
        );
        let j = status_json(&fixture());
        assert_eq!(j["members"][2]["state"], "recovering");
        assert_eq!(j["check"]["first_mismatches"][1], 99);
        assert_eq!(j["sync"]["eta_secs"], 3725.0);
        assert_eq!(status_json(&s)["sync"], Value::Null);
    }

    #[test]
    fn durations_and_running_checks() {
        assert_eq!(duration(0.4), "0s");
        assert_eq!(duration(59.6), "1m00s");
        assert_eq!(duration(3725.0), "1h02m05s");
        let mut c = fixture().check.unwrap();
        c.running = true;
        c.mismatches = 1;
        c.first_mismatches = vec![5];
        c.errors = 0;
        assert_eq!(
            check_summary(&c, None),
            "running, 100.0% (10.0 GiB of 10.0 GiB) at 120.0 MiB/s, eta 1h02m05s, 1 mismatch (at 5)"
        );
    }
}
