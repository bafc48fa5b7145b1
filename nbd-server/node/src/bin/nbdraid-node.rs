//! `nbdraid-node`: the storage node daemon. Parses configuration and flags,
//! then hands over to [`nbdraid_node::node`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use nbdraid_engine::daemon::{MainSettings, run_main};
use nbdraid_node::config::{NodeConfig, VolumeSpec};
use nbdraid_node::node::Node;
use nbdraid_node::store::file::IoMode;
use nbdraid_proto::ByteSize;

/// Serve volumes over NBD.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags override its settings.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// NBD listen address (port 0 picks a free port) [default: 127.0.0.1:10809].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address [default: none, disabled].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// gRPC control plane listen address (admin, throttle) [default: none, disabled].
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Data directory (catalog and volume files) [default: /var/lib/nbdraid/node].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Volume to create if missing: NAME:SIZE or NAME:SIZE:ro (repeatable).
    #[arg(long = "volume", value_name = "NAME:SIZE[:ro]")]
    volumes: Vec<VolumeSpec>,
    /// Export served for the default name "" [default: the only volume, if there is one].
    #[arg(long)]
    default_export: Option<String>,
    /// Write the bound addresses as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Throttle capacity (request buffer memory budget) [default: 256M].
    #[arg(long)]
    throttle_capacity: Option<ByteSize>,
    /// Part of the throttle capacity reserved for background traffic
    /// [default: a quarter of the capacity, at least the largest request].
    #[arg(long)]
    background_reserve: Option<ByteSize>,
    /// Disable the throttle (measurements only: memory becomes unbounded).
    #[arg(long)]
    no_throttle: bool,
    /// How file I/O is issued: auto, inline or blocking [default: auto].
    #[arg(long, value_parser = parse_io_mode)]
    io_mode: Option<IoMode>,
    /// Largest READ/WRITE payload [default: 32M].
    #[arg(long)]
    max_payload: Option<ByteSize>,
    /// Runtime worker threads, 0 = one per usable CPU [default: 0].
    #[arg(long)]
    threads: Option<usize>,
    /// Log filter, e.g. debug or nbdraid_engine=trace [default: info].
    #[arg(long)]
    log: Option<String>,
    /// Check the configuration as a start would (data dir, volume sizes),
    /// print it, and exit.
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
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbdraid-node: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        if let Err(e) = config.check_environment() {
            eprintln!("nbdraid-node: {e}");
            return ExitCode::from(2);
        }
        match toml::to_string_pretty(&config) {
            Ok(t) => print!("{t}"),
            Err(e) => eprintln!("nbdraid-node: {e}"),
        }
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    let settings = MainSettings {
        name: "nbdraid-node",
        threads: config.threads,
        log: config.log.clone(),
        exit_grace: std::time::Duration::from_secs(2),
    };
    run_main(settings, |shutdown| async move {
        let node = Node::start(config).await?;
        node.run(shutdown).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The defaults `--help` states are the configuration's real defaults.
    #[test]
    fn help_states_the_real_defaults() {
        let help = Args::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let d = NodeConfig::default();
        for want in [
            format!("[default: {}]", d.listen),
            format!("[default: {}]", d.data_dir.display()),
            format!("[default: {}]", d.throttle.capacity),
            format!("[default: {}]", d.max_payload),
            format!("[default: {}]", d.threads),
            format!("[default: {}]", d.log),
            "[default: auto]".to_string(),
        ] {
            assert!(help.contains(&want), "--help lacks {want:?}:\n{help}");
        }
        assert_eq!(d.io_mode, IoMode::Auto);
        assert!(d.metrics_listen.is_none() && d.grpc_listen.is_none());
    }
}
