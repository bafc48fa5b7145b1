//! `nbdraid info URI`: what the server says about an export, and a summary
//! of its allocation map.
//!
//! The allocation map walk is bounded (`--map-time`, `--map-requests`): a
//! huge, fragmented export is summarized as far as the walk got, and the
//! output says that it is partial.

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args as ClapArgs;
use nbdraid_client::{Client, ExportInfo};
use nbdraid_proto::consts::transmission_flags as tf;
use serde::Serialize;

use crate::nbd::{self, ExtentWalker};
use crate::units::{human, parse_duration};

/// Arguments of `nbdraid info`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The export, as nbd://HOST[:PORT][/EXPORT].
    uri: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Skip the allocation map walk.
    #[arg(long)]
    no_map: bool,
    /// Stop the allocation map walk after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    map_time: Duration,
    /// Stop the allocation map walk after this many block status requests.
    #[arg(long, default_value_t = 100_000)]
    map_requests: u64,
}

/// Transmission flags, in the order they are printed, with their names.
const FLAGS: [(u16, &str); 11] = [
    (tf::READ_ONLY, "read-only"),
    (tf::SEND_FLUSH, "flush"),
    (tf::SEND_FUA, "fua"),
    (tf::ROTATIONAL, "rotational"),
    (tf::SEND_TRIM, "trim"),
    (tf::SEND_WRITE_ZEROES, "zeroes"),
    (tf::SEND_FAST_ZERO, "fast-zero"),
    (tf::SEND_CACHE, "cache"),
    (tf::CAN_MULTI_CONN, "multi-conn"),
    (tf::SEND_DF, "df"),
    (tf::SEND_RESIZE, "resize"),
];

#[derive(Debug, Serialize)]
struct Report {
    uri: String,
    export: String,
    canonical_name: Option<String>,
    description: Option<String>,
    size: u64,
    flags_raw: u16,
    /// Every known flag with whether it is set.
    flags: serde_json::Map<String, serde_json::Value>,
    block_size: BlockSizes,
    structured_replies: bool,
    meta_contexts: Vec<String>,
    /// The server only spoke NBD_OPT_EXPORT_NAME (no GO).
    export_name_fallback: bool,
    allocation: Option<Allocation>,
}

#[derive(Debug, Serialize)]
struct BlockSizes {
    minimum: u32,
    preferred: u32,
    maximum: u32,
}

/// Summary of a `base:allocation` walk.
#[derive(Debug, Default, Serialize)]
struct Allocation {
    /// Bytes walked (the whole export when `complete`).
    scanned: u64,
    /// Bytes that hold data (not flagged ZERO).
    data: u64,
    /// Bytes that read as zeroes (ZERO), holes included.
    zero: u64,
    /// Bytes that are unallocated (HOLE); usually also ZERO.
    hole: u64,
    /// Extents as the server reported them.
    extents: u64,
    /// Block status requests sent.
    requests: u64,
    /// The walk covered the whole export.
    complete: bool,
    /// Why the walk stopped early, if it did.
    stopped: Option<String>,
    seconds: f64,
}

/// Runs `nbdraid info`.
pub async fn run(args: Args) -> Result<()> {
    let client = nbd::connect(&args.uri, 1).await?;
    let info = client.info();
    let allocation = if args.no_map || info.allocation_context.is_none() {
        None
    } else {
        Some(walk(&client, &info, &args).await?)
    };
    client.close(Duration::from_secs(5)).await;
    let report = build(&args.uri, &info, allocation);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report, args.no_map);
    }
    Ok(())
}

fn build(uri: &str, info: &ExportInfo, allocation: Option<Allocation>) -> Report {
    let flags = FLAGS
        .iter()
        .map(|(bit, name)| (name.to_string(), info.has(*bit).into()))
        .collect();
    Report {
        uri: uri.to_string(),
        export: info.name.clone(),
        canonical_name: info.canonical_name.clone(),
        description: info.description.clone(),
        size: info.size,
        flags_raw: info.flags,
        flags,
        block_size: BlockSizes {
            minimum: info.min_block,
            preferred: info.preferred_block,
            maximum: info.max_payload,
        },
        structured_replies: info.structured,
        meta_contexts: info
            .allocation_context
            .map(|_| nbdraid_proto::consts::BASE_ALLOCATION.to_string())
            .into_iter()
            .collect(),
        export_name_fallback: info.used_export_name,
        allocation,
    }
}

async fn walk(client: &Client, info: &ExportInfo, args: &Args) -> Result<Allocation> {
    let start = Instant::now();
    let mut a = Allocation::default();
    let mut w = ExtentWalker::new(client, 0, info.size);
    while let Some(e) = w.next().await? {
        a.extents += 1;
        a.scanned += e.len;
        if nbd::is_zero(&e) {
            a.zero += e.len;
        } else {
            a.data += e.len;
        }
        if nbd::is_hole(&e) {
            a.hole += e.len;
        }
        // Checked only between requests, so that `scanned` ends on a reply's end.
        if a.scanned == w.fetched_to() && a.scanned < info.size {
            if start.elapsed() >= args.map_time {
                a.stopped = Some(format!("time limit of {:?} reached", args.map_time));
                break;
            }
            if w.requests >= args.map_requests {
                a.stopped = Some(format!("request limit of {} reached", args.map_requests));
                break;
            }
        }
    }
    a.requests = w.requests;
    a.complete = a.scanned >= info.size;
    a.seconds = start.elapsed().as_secs_f64();
    Ok(a)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn print_text(r: &Report, no_map: bool) {
    println!("uri:                {}", r.uri);
    println!("export:             {:?}", r.export);
    if let Some(n) = &r.canonical_name {
        println!("canonical name:     {n:?}");
    }
    if let Some(d) = &r.description {
        println!("description:        {d}");
    }
    println!("size:               {} ({})", r.size, human(r.size));
    let set: Vec<&str> = FLAGS
        .iter()
        .filter(|(bit, _)| r.flags_raw & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    let unset: Vec<&str> = FLAGS
        .iter()
        .filter(|(bit, _)| r.flags_raw & bit == 0)
        .map(|(_, n)| *n)
        .collect();
    println!(
        "flags:              {} (0x{:04x})",
        set.join(" "),
        r.flags_raw
    );
    println!("not set:            {}", unset.join(" "));
    println!(
        "block size:         minimum {}, preferred {}, maximum {}",
        r.block_size.minimum, r.block_size.preferred, r.block_size.maximum
    );
    println!(
        "structured replies: {}",
        if r.structured_replies { "yes" } else { "no" }
    );
    let contexts = if r.meta_contexts.is_empty() {
        "none".to_string()
    } else {
        r.meta_contexts.join(" ")
    };
    println!("meta contexts:      {contexts}");
    if r.export_name_fallback {
        println!("handshake:          NBD_OPT_EXPORT_NAME (the server does not know NBD_OPT_GO)");
    }
    match &r.allocation {
        Some(a) => {
            let scope = if a.complete {
                "whole export"
            } else {
                "partial"
            };
            println!(
                "allocation:         {} extents in {} requests, {:.2} s ({scope})",
                a.extents, a.requests, a.seconds
            );
            println!(
                "  data:             {} ({:.1}%)",
                human(a.data),
                pct(a.data, a.scanned)
            );
            println!(
                "  zero:             {} ({:.1}%)",
                human(a.zero),
                pct(a.zero, a.scanned)
            );
            println!(
                "  of which holes:   {} ({:.1}%)",
                human(a.hole),
                pct(a.hole, a.scanned)
            );
            if let Some(why) = &a.stopped {
                println!(
                    "  walk stopped:     {why}, after {} of {}",
                    human(a.scanned),
                    human(r.size)
                );
            }
        }
        None if no_map => {}
        None => println!("allocation:         unavailable (base:allocation was not negotiated)"),
    }
}
