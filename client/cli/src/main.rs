//! The `nbdraid` command-line tool: a thin dispatcher, one module per
//! subcommand.
//!
//! - `info URI`: what an export offers, and its allocation map ([`info`]).
//! - `cp SRC DST`: sparse, pipelined copy between files and exports ([`cp`]).
//! - `bench URI`: a load generator on the completion ring ([`bench`]).
//! - `volume ...`, `node info`: a storage node's admin service over gRPC
//!   ([`admin`]).
//! - `array ...`: an array daemon's admin service over gRPC ([`array`]).
//!
//! Every error ends the process with status 1 and one message on stderr;
//! usage errors exit with status 2 (clap's convention).

mod admin;
mod array;
mod bench;
mod cp;
mod info;
mod nbd;
mod throttle;
mod units;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// nbdraid: tools for NBD exports served by nbdraid nodes and arrays (and
/// any other NBD server).
#[derive(Debug, Parser)]
#[command(name = "nbdraid", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show an export's size, flags, block sizes and allocation summary.
    Info(info::Args),
    /// Copy between local files/devices and NBD exports, keeping holes.
    Cp(cp::Args),
    /// Generate load on an export and measure IOPS, latency and CPU per I/O.
    Bench(bench::Args),
    /// Create, list, grow, delete volumes on a storage node.
    Volume {
        #[command(flatten)]
        node: admin::NodeAddr,
        #[command(subcommand)]
        cmd: admin::VolumeCmd,
    },
    /// Show a storage node's identity, version and capacity.
    Node {
        #[command(flatten)]
        node: admin::NodeAddr,
        #[command(subcommand)]
        cmd: admin::NodeCmd,
    },
    /// Create, list, inspect, re-add members of and check RAID arrays on an
    /// array daemon.
    Array {
        #[command(flatten)]
        array: array::ArrayAddr,
        #[command(subcommand)]
        cmd: array::ArrayCmd,
    },
    /// Show a layer's writeout throttle (node or array daemon): capacity,
    /// use, shares, its published cost model and, for an array daemon, what
    /// it holds at each member against each member's grant.
    Throttle {
        #[command(subcommand)]
        cmd: throttle::ThrottleCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdraid: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let threads = match &cli.command {
        Command::Bench(a) => a.threads,
        _ => 0,
    };
    let runtime = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Info(a) => info::run(a).await,
            Command::Cp(a) => cp::run(a).await,
            Command::Bench(a) => bench::run(a).await,
            Command::Volume { node, cmd } => admin::volume(&node.node, cmd).await,
            Command::Node { node, cmd } => admin::node(&node.node, cmd).await,
            Command::Array { array, cmd } => array::run(&array.array, cmd).await,
            Command::Throttle { cmd } => throttle::run(cmd).await,
        }
    })
}
