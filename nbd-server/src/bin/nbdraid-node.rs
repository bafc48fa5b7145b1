//! `nbdraid-node`: the storage node daemon. Parses configuration and flags,
//! then hands over to [`nbd_server::node`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nbd_server::config::{NodeConfig, VolumeSpec};
use nbd_server::store::file::IoMode;
use nbdraid_proto::ByteSize;
use tokio_util::sync::CancellationToken;

/// Serve volumes over NBD.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags override its settings.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// NBD listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// gRPC control plane listen address (admin, throttle).
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Data directory (catalog and volume files).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Volume to create if missing: NAME:SIZE or NAME:SIZE:ro (repeatable).
    #[arg(long = "volume", value_name = "NAME:SIZE[:ro]")]
    volumes: Vec<VolumeSpec>,
    /// Export served for the default name "".
    #[arg(long)]
    default_export: Option<String>,
    /// Write the bound addresses as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Throttle capacity (request buffer memory budget), e.g. 256M.
    #[arg(long)]
    throttle_capacity: Option<ByteSize>,
    /// Part of the throttle capacity reserved for background traffic, e.g. 64M.
    #[arg(long)]
    background_reserve: Option<ByteSize>,
    /// Disable the throttle (measurements only: memory becomes unbounded).
    #[arg(long)]
    no_throttle: bool,
    /// How file I/O is issued: auto, inline or blocking.
    #[arg(long, value_parser = parse_io_mode)]
    io_mode: Option<IoMode>,
    /// Largest READ/WRITE payload, e.g. 32M.
    #[arg(long)]
    max_payload: Option<ByteSize>,
    /// Runtime worker threads (0 = one per usable CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Log filter, e.g. info, debug, nbd_server=trace.
    #[arg(long)]
    log: Option<String>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_io_mode(s: &str) -> Result<IoMode, String> {
    match s {
        "auto" => Ok(IoMode::Auto),
        "inline" => Ok(IoMode::Inline),
        "blocking" => Ok(IoMode::Blocking),
        _ => Err(format!("unknown io mode {s:?} (auto, inline, blocking)")),
    }
}

fn build_config(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut c = match &args.config {
        Some(p) => NodeConfig::load(p)?,
        None => NodeConfig::default(),
    };
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = args.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = args.grpc_listen {
        c.grpc_listen = Some(v);
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    for v in &args.volumes {
        c.volumes.retain(|x| x.name != v.name);
        c.volumes.push(v.clone());
    }
    if let Some(v) = &args.default_export {
        c.default_export = Some(v.clone());
    }
    if let Some(v) = &args.ready_file {
        c.ready_file = Some(v.clone());
    }
    if let Some(v) = args.throttle_capacity {
        c.throttle.capacity = v;
    }
    if let Some(v) = args.background_reserve {
        c.throttle.background_reserve = Some(v);
    }
    if args.no_throttle {
        c.throttle.enabled = false;
    }
    if let Some(v) = args.io_mode {
        c.io_mode = v;
    }
    if let Some(v) = args.max_payload {
        c.max_payload = v;
    }
    if let Some(v) = args.threads {
        c.threads = v;
    }
    if let Some(v) = &args.log {
        c.log = v.clone();
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    nbd_server::buffer::pin_malloc_behaviour();
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbdraid-node: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        match toml::to_string_pretty(&config) {
            Ok(t) => print!("{t}"),
            Err(e) => eprintln!("nbdraid-node: {e}"),
        }
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.threads > 0 {
        rt.worker_threads(config.threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nbdraid-node: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        let node = nbd_server::node::Node::start(config).await?;
        let shutdown = CancellationToken::new();
        tokio::spawn(wait_for_signal(shutdown.clone()));
        node.run(shutdown).await
    });
    // Blocking-pool threads still finishing requests must not hold up exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node failed");
            eprintln!("nbdraid-node: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
