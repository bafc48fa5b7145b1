//! `nbdraid throttle show --node ADDR | --array ADDR`: a layer's writeout
//! throttle as its `Throttle` service publishes it: capacity, units
//! available and in flight, its shares, its cost model, and for an array
//! daemon what it holds at each member against each member's grant.

use anyhow::{Result, bail};
use clap::Subcommand;
use nbdraid_proto::grpc::throttle_client::ThrottleClient;
use nbdraid_proto::grpc::{self, MetricModel};
use nbdraid_proto::units::format_size;

/// Throttle commands.
#[derive(Debug, Subcommand)]
pub enum ThrottleCmd {
    /// Show a layer's throttle: capacity, use, shares, cost model, grants.
    Show {
        /// A storage node's gRPC address.
        #[arg(long, value_name = "ADDR", conflicts_with = "array")]
        node: Option<String>,
        /// An array daemon's gRPC address.
        #[arg(long, value_name = "ADDR")]
        array: Option<String>,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a throttle command.
pub async fn run(cmd: ThrottleCmd) -> Result<()> {
    let ThrottleCmd::Show { node, array, json } = cmd;
    let (addr, what) = match (node, array) {
        (Some(a), None) => (a, "node"),
        (None, Some(a)) => (a, "array daemon"),
        _ => bail!("give --node ADDR or --array ADDR"),
    };
    let channel = crate::admin::channel(&addr, what).await?;
    let m = ThrottleClient::new(channel)
        .get_metric(grpc::GetMetricRequest {})
        .await
        .map_err(|e| anyhow::anyhow!("{what} {addr}: {}", e.message()))?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&to_json(&m))?);
    } else {
        print(&m);
    }
    Ok(())
}

fn to_json(m: &MetricModel) -> serde_json::Value {
    serde_json::json!({
        "layer": m.layer,
        "capacity": m.capacity,
        "available": m.available,
        "in_flight": m.in_flight,
        "enabled": m.enabled,
        "max_payload": m.max_payload,
        "max_request_cost": m.max_request_cost,
        "shares": m.shares.iter().map(|s| serde_json::json!({
            "name": s.name, "reserved": s.reserved, "used": s.used, "waiting": s.waiting,
        })).collect::<Vec<_>>(),
        "costs": m.costs.iter().map(|c| serde_json::json!({
            "op": c.op, "base": c.base, "per_byte": c.per_byte_fp as f64 / 65536.0,
            "per_byte_fp": c.per_byte_fp,
        })).collect::<Vec<_>>(),
        "members": m.members.iter().map(|g| serde_json::json!({
            "name": g.name, "uri": g.uri, "class": if g.background { "background" } else { "foreground" },
            "grant": g.grant, "held": g.held, "peak": g.peak,
            "lease_held": g.lease_held, "model_live": g.model_live,
        })).collect::<Vec<_>>(),
    })
}

fn size(n: u64) -> String {
    format_size(n)
}

fn print(m: &MetricModel) {
    println!(
        "layer {}: capacity {}, available {}, in flight {}{}",
        m.layer,
        size(m.capacity),
        size(m.available),
        size(m.in_flight),
        if m.enabled { "" } else { " (throttle OFF)" }
    );
    println!(
        "largest request {} (max payload {})",
        size(m.max_request_cost),
        size(m.max_payload)
    );
    println!();
    println!(
        "{:<32} {:>12} {:>12} {:>8}",
        "share", "reserved", "used", "waiting"
    );
    for s in &m.shares {
        println!(
            "{:<32} {:>12} {:>12} {:>8}",
            s.name,
            size(s.reserved),
            size(s.used),
            s.waiting
        );
    }
    println!();
    println!("{:<14} {:>12} {:>14}", "cost model", "base", "per byte");
    for c in &m.costs {
        println!(
            "{:<14} {:>12} {:>14.3}",
            c.op,
            c.base,
            c.per_byte_fp as f64 / 65536.0
        );
    }
    if !m.members.is_empty() {
        println!();
        println!(
            "{:<16} {:<10} {:>10} {:>10} {:>10} {:>6} {:>6}  uri",
            "member", "class", "grant", "held", "peak", "lease", "model"
        );
        for g in &m.members {
            println!(
                "{:<16} {:<10} {:>10} {:>10} {:>10} {:>6} {:>6}  {}",
                g.name,
                if g.background {
                    "background"
                } else {
                    "foreground"
                },
                size(g.grant),
                size(g.held),
                size(g.peak),
                if g.lease_held { "held" } else { "-" },
                if g.model_live { "live" } else { "dflt" },
                g.uri
            );
        }
    }
}
