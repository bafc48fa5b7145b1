//! `nbdraid-array`: the array daemon. Parses configuration and flags, then
//! hands over to [`nbdraid_raid::daemon`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Parser;
use nbdraid_engine::daemon::{MainSettings, run_main};
use nbdraid_proto::ByteSize;
use nbdraid_raid::config::ArrayDaemonConfig;
use nbdraid_raid::daemon::ArrayDaemon;

/// Serve RAID arrays of node volumes over NBD.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; flags override its settings.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// NBD listen address (port 0 picks a free port) [default: 127.0.0.1:10819].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// gRPC control plane listen address (array admin, throttle) [default: none, disabled].
    #[arg(long)]
    grpc_listen: Option<SocketAddr>,
    /// Prometheus metrics listen address [default: none, disabled].
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Data directory (the array state store) [default: /var/lib/nbdraid/array].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Write the bound addresses as JSON to this file once listening.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Throttle capacity (request buffer memory budget) [default: 512M].
    #[arg(long)]
    throttle_capacity: Option<ByteSize>,
    /// Runtime worker threads, 0 = one per usable CPU [default: 0].
    #[arg(long)]
    threads: Option<usize>,
    /// Log filter, e.g. debug or nbdraid_raid=trace [default: info].
    #[arg(long)]
    log: Option<String>,
    /// Check the configuration as a start would (data dir, every member
    /// reachable), print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// Start the configured array NAME even if it is dirty and degraded:
    /// stripes written at the crash may be wrong (repeatable).
    #[arg(long, value_name = "NAME")]
    force_assemble: Vec<String>,
}

fn build_config(args: &Args) -> anyhow::Result<ArrayDaemonConfig> {
    let mut c = match &args.config {
        Some(p) => ArrayDaemonConfig::load(p)?,
        None => ArrayDaemonConfig::default(),
    };
    if let Some(v) = args.listen {
        c.listen = v;
    }
    if let Some(v) = args.grpc_listen {
        c.grpc_listen = Some(v);
    }
    if let Some(v) = args.metrics_listen {
        c.metrics_listen = Some(v);
    }
    if let Some(v) = &args.data_dir {
        c.data_dir = v.clone();
    }
    if let Some(v) = &args.ready_file {
        c.ready_file = Some(v.clone());
    }
    if let Some(v) = args.throttle_capacity {
        c.throttle.capacity = v;
    }
    if let Some(v) = args.threads {
        c.threads = v;
    }
    if let Some(v) = &args.log {
        c.log = v.clone();
    }
    for name in &args.force_assemble {
        match c.arrays.iter_mut().find(|a| &a.name == name) {
            Some(a) => a.force = true,
            None => {
                bail!("--force-assemble {name}: no [[array]] named {name:?} in the configuration")
            }
        }
    }
    c.validate()?;
    Ok(c)
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match build_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nbdraid-array: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        if let Err(e) = config.check_environment() {
            eprintln!("nbdraid-array: {e}");
            return ExitCode::from(2);
        }
        match toml::to_string_pretty(&config) {
            Ok(t) => print!("{t}"),
            Err(e) => eprintln!("nbdraid-array: {e}"),
        }
        println!("# configuration is valid");
        return ExitCode::SUCCESS;
    }
    let settings = MainSettings {
        name: "nbdraid-array",
        threads: config.threads,
        log: config.log.clone(),
        exit_grace: std::time::Duration::from_secs(2),
    };
    run_main(settings, |shutdown| async move {
        let daemon = ArrayDaemon::start(config).await?;
        daemon.run(shutdown).await
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
        let d = ArrayDaemonConfig::default();
        for want in [
            format!("[default: {}]", d.listen),
            format!("[default: {}]", d.data_dir.display()),
            format!("[default: {}]", d.throttle.capacity),
            format!("[default: {}]", d.threads),
            format!("[default: {}]", d.log),
        ] {
            assert!(help.contains(&want), "--help lacks {want:?}:\n{help}");
        }
        assert!(d.metrics_listen.is_none() && d.grpc_listen.is_none());
    }

    fn args(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("nbdraid-array").chain(argv.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.toml");
        std::fs::write(
            &path,
            r#"
            listen = "0.0.0.0:1"
            [[array]]
            name = "m"
            level = "raid1"
            members = ["nbd://a/x", "nbd://b/x"]
            "#,
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = build_config(&args(&[
            "--config",
            p,
            "--listen",
            "127.0.0.1:0",
            "--throttle-capacity",
            "1G",
            "--force-assemble",
            "m",
        ]))
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.throttle.capacity, ByteSize(1 << 30));
        assert!(c.arrays[0].force);
        let e = build_config(&args(&["--config", p, "--force-assemble", "nope"])).unwrap_err();
        assert!(e.to_string().contains("no [[array]] named \"nope\""), "{e}");
        let e = build_config(&args(&["--throttle-capacity", "64M"])).unwrap_err();
        assert!(e.to_string().contains("throttle.capacity"), "{e}");
    }
}
