//! `nbdraid volume ...` and `nbdraid node ...`: a storage node's gRPC
//! admin service (and, on testing builds, its fault injection).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use nbdraid_proto::ByteSize;
use nbdraid_proto::grpc::fault_client::FaultClient;
use nbdraid_proto::grpc::node_client::NodeClient;
use nbdraid_proto::grpc::{self};
use nbdraid_proto::units::format_size;
use tonic::transport::Channel;

/// Volume administration.
/// Which storage node to talk to (`--node`, for every admin subcommand).
#[derive(Debug, clap::Args)]
pub struct NodeAddr {
    /// The node's gRPC address (its --grpc-listen), host:port.
    #[arg(
        long,
        global = true,
        value_name = "ADDR",
        default_value = "127.0.0.1:10810"
    )]
    pub node: String,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (a sparse file reading as zeroes).
    Create {
        /// Volume name: letters, digits, `.`, `_`, `-`.
        name: String,
        /// Size, e.g. 10G.
        size: ByteSize,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
    },
    /// List volumes.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume (shrinking is refused).
    Resize {
        /// Volume name.
        name: String,
        /// New size, e.g. 20G.
        size: ByteSize,
    },
    /// Delete a volume and its data (refused while clients are connected).
    Delete {
        /// Volume name.
        name: String,
    },
    /// Show a volume's request counters.
    Stats {
        /// Volume name.
        name: String,
    },
}

/// Node administration.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Show the node's identity, version, capacity and uptime.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// FOR TESTING ONLY: inject a storage fault into a volume (nodes built
    /// with the `fault-injection` feature). Each call replaces the volume's
    /// faults: what is not given is off.
    Fault(FaultArgs),
}

/// `nbdraid node fault`: the volume's complete fault settings.
#[derive(Debug, clap::Args)]
pub struct FaultArgs {
    /// Volume name.
    pub volume: String,
    /// Microseconds added to every storage operation.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub delay_us: u64,
    /// Storage bandwidth limit per second, e.g. 10M (0: none).
    #[arg(long, value_name = "SIZE", default_value = "0")]
    pub bandwidth: ByteSize,
    /// Reads (and cache, block status) fail with EIO.
    #[arg(long)]
    pub fail_reads: bool,
    /// Writes (and trim, write zeroes) fail with EIO.
    #[arg(long)]
    pub fail_writes: bool,
    /// Flushes fail with EIO.
    #[arg(long)]
    pub fail_flush: bool,
    /// Every operation waits until a later call clears this (a stopped disk).
    #[arg(long)]
    pub hang: bool,
    /// Clear every fault of the volume.
    #[arg(long, conflicts_with_all = ["delay_us", "bandwidth", "fail_reads", "fail_writes", "fail_flush", "hang"])]
    pub clear: bool,
}

impl FaultArgs {
    /// Returns the request, and a description of what it sets.
    fn request(&self) -> (grpc::SetFaultRequest, String) {
        let mut what = Vec::new();
        if self.delay_us > 0 {
            what.push(format!("delay {}us", self.delay_us));
        }
        if self.bandwidth.0 > 0 {
            what.push(format!("bandwidth {}/s", self.bandwidth));
        }
        for (on, name) in [
            (self.fail_reads, "failing reads"),
            (self.fail_writes, "failing writes"),
            (self.fail_flush, "failing flushes"),
            (self.hang, "hanging"),
        ] {
            if on {
                what.push(name.to_string());
            }
        }
        let what = if what.is_empty() {
            "no faults".to_string()
        } else {
            what.join(", ")
        };
        let req = grpc::SetFaultRequest {
            volume: self.volume.clone(),
            delay_us: self.delay_us,
            bandwidth: self.bandwidth.0,
            fail_reads: self.fail_reads,
            fail_writes: self.fail_writes,
            fail_flush: self.fail_flush,
            hang: self.hang,
        };
        (req, what)
    }
}

/// Opens a gRPC channel to a daemon's control plane at `addr` (`host:port`
/// or a URL); `what` names the daemon in errors ("node", "array daemon").
pub async fn channel(addr: &str, what: &str) -> Result<Channel> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    tonic::transport::Endpoint::from_shared(url)
        .with_context(|| format!("bad {what} address {addr:?}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach {what} at {addr} (is --grpc-listen set on the {what}?)")
        })
}

async fn connect(node: &str) -> Result<NodeClient<Channel>> {
    Ok(NodeClient::new(channel(node, "node").await?))
}

/// Turns a gRPC status into an error carrying the daemon's own message.
pub fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
}

fn print_volume(v: &grpc::Volume) {
    println!(
        "{:<24} {:>8} {:<3} {}",
        v.name,
        format_size(v.size),
        if v.read_only { "ro" } else { "rw" },
        v.uuid
    );
}

fn volume_json(v: &grpc::Volume) -> serde_json::Value {
    serde_json::json!({
        "name": v.name, "size": v.size, "uuid": v.uuid,
        "read_only": v.read_only, "created_unix": v.created_unix,
    })
}

/// Runs a `volume` subcommand against the node at `node`.
pub async fn volume(node: &str, cmd: VolumeCmd) -> Result<()> {
    let mut c = connect(node).await?;
    match cmd {
        VolumeCmd::Create {
            name,
            size,
            read_only,
        } => {
            if size.0 == 0 {
                bail!("size must be greater than 0");
            }
            let v = c
                .create_volume(grpc::CreateVolumeRequest {
                    name,
                    size: size.0,
                    read_only,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_volume(&v);
        }
        VolumeCmd::List { json } => {
            let vs = c
                .list_volumes(grpc::ListVolumesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .volumes;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(vs.iter().map(volume_json).collect())
                );
            } else {
                for v in &vs {
                    print_volume(v);
                }
            }
        }
        VolumeCmd::Resize { name, size } => {
            let v = c
                .resize_volume(grpc::ResizeVolumeRequest {
                    name,
                    new_size: size.0,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_volume(&v);
        }
        VolumeCmd::Delete { name } => {
            c.delete_volume(grpc::DeleteVolumeRequest { name: name.clone() })
                .await
                .map_err(status)?;
            println!("deleted {name}");
        }
        VolumeCmd::Stats { name } => {
            let s = c
                .volume_stats(grpc::VolumeStatsRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "{}: connections {} reads {} ({}) writes {} ({}) other {} errors {} throttle-waits {}",
                s.name,
                s.connections,
                s.reads,
                format_size(s.read_bytes),
                s.writes,
                format_size(s.written_bytes),
                s.other_ops,
                s.errors,
                s.throttle_waits
            );
        }
    }
    Ok(())
}

/// Runs a `node` subcommand against the node at `node`.
pub async fn node(node: &str, cmd: NodeCmd) -> Result<()> {
    match cmd {
        NodeCmd::Info { json } => info(node, json).await,
        NodeCmd::Fault(args) => fault(node, &args).await,
    }
}

/// Prints the node's identity, version, capacity and uptime.
async fn info(node: &str, json: bool) -> Result<()> {
    let mut c = connect(node).await?;
    let i = c
        .node_info(grpc::NodeInfoRequest {})
        .await
        .map_err(status)?
        .into_inner();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "uuid": i.uuid, "version": i.version, "capacity": i.capacity,
                "available": i.available, "uptime_secs": i.uptime_secs,
                "nbd_addr": i.nbd_addr, "volumes": i.volumes,
                "created_unix": i.created_unix, "fault_injection": i.fault_injection,
            })
        );
    } else {
        println!("node      {}", i.uuid);
        println!("version   {}", i.version);
        println!("nbd       {}", i.nbd_addr);
        println!("volumes   {}", i.volumes);
        println!(
            "throttle  {} capacity, {} available",
            format_size(i.capacity),
            format_size(i.available)
        );
        println!("uptime    {}s", i.uptime_secs);
        if i.fault_injection {
            println!("WARNING   built with fault injection (testing only)");
        }
    }
    Ok(())
}

/// Sets the faults of a volume on a node built with fault injection.
async fn fault(node: &str, args: &FaultArgs) -> Result<()> {
    let (req, what) = args.request();
    let mut c = FaultClient::new(channel(node, "node").await?);
    c.set_fault(req).await.map_err(|e| {
        if e.code() == tonic::Code::Unimplemented {
            anyhow::anyhow!(
                "the node at {node} was not built with fault injection (the `fault-injection` feature)"
            )
        } else {
            status(e)
        }
    })?;
    println!("{}: {what}", args.volume);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    fn parse(argv: &[&str]) -> Result<(String, NodeCmd), clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("nbdraid").chain(argv.iter().copied()))?;
        match cli.command {
            Command::Node { node, cmd } => Ok((node.node, cmd)),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn fault(argv: &[&str]) -> (String, grpc::SetFaultRequest, String) {
        match parse(argv).unwrap() {
            (node, NodeCmd::Fault(a)) => {
                let (req, what) = a.request();
                (node, req, what)
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn fault_sets_every_field_and_the_rest_off() {
        let (node, req, what) = fault(&[
            "node",
            "fault",
            "vol",
            "--delay-us",
            "250",
            "--bandwidth",
            "10M",
            "--fail-writes",
            "--hang",
            "--node",
            "10.0.0.1:7000",
        ]);
        assert_eq!(node, "10.0.0.1:7000");
        assert_eq!(
            req,
            grpc::SetFaultRequest {
                volume: "vol".into(),
                delay_us: 250,
                bandwidth: 10 << 20,
                fail_reads: false,
                fail_writes: true,
                fail_flush: false,
                hang: true,
            }
        );
        assert_eq!(
            what,
            "delay 250us, bandwidth 10M/s, failing writes, hanging"
        );
        let (_, req, what) = fault(&["node", "fault", "vol", "--clear"]);
        assert_eq!(
            req,
            grpc::SetFaultRequest {
                volume: "vol".into(),
                ..Default::default()
            }
        );
        assert_eq!(what, "no faults");
    }

    #[test]
    fn fault_clear_conflicts_with_a_fault() {
        let e = parse(&["node", "fault", "vol", "--clear", "--fail-reads"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{e}");
        assert!(
            parse(&["node", "fault", "--fail-reads"]).is_err(),
            "a volume is required"
        );
    }
}
