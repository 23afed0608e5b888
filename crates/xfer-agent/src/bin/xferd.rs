//! `xferd`: the xfer node agent. Serves the agent protocol on one address, drives
//! this node's containerd and CRIU.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use xfer_agent::node::{Node, NodeConfig};
use xfer_runtime::containerd::HostConfig;

#[derive(Debug, Parser)]
#[command(name = "xferd", about = "xfer node agent", version)]
struct Args {
    /// This node's name (e.g. h1).
    #[arg(long)]
    node: String,
    /// Address to serve the agent protocol on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// containerd namespace for this node's containers.
    #[arg(long, default_value = "xfer")]
    namespace: String,
    /// Snapshotter.
    #[arg(long, default_value = "overlayfs")]
    snapshotter: String,
    /// Network namespace the node's containers join (e.g. /run/netns/NAME).
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Working directory for checkpoints and incoming migrations.
    #[arg(long, default_value = "/var/lib/xfer")]
    work_dir: PathBuf,
    /// Directory for container logs.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Directory with ca.pem and this node's NAME.pem / NAME.key (mutual TLS).
    #[arg(long, required_unless_present = "insecure")]
    tls_dir: Option<PathBuf>,
    /// Name of this node's certificate files in --tls-dir (default: the node name).
    #[arg(long)]
    tls_name: Option<String>,
    /// The endpoint peers use to reach this agent (they fetch chunks from it).
    /// Default: https://LISTEN (http:// with --insecure).
    #[arg(long)]
    advertise: Option<String>,
    /// Bridge in the host's network namespace (--netns) that containers with their own
    /// address are attached to.
    #[arg(long, requires = "netns")]
    bridge: Option<String>,
    /// This host's address between hosts: enables the handover (routed containers,
    /// home agent and care-of roles). Needs --cluster-key and --bridge.
    #[arg(long, requires_all = ["cluster_key", "bridge"])]
    mobility_address: Option<std::net::Ipv4Addr>,
    /// File with the cluster key binding updates are signed with (64 hex digits).
    #[arg(long)]
    cluster_key: Option<PathBuf>,
    /// UDP port for binding updates and acks (the same on every node).
    #[arg(long, default_value_t = xfer_agent::handover::DEFAULT_PORT)]
    mobility_port: u16,
    /// Binding lifetime this node asks for as a care-of host, seconds (refreshed at 80%).
    #[arg(long, default_value_t = 60)]
    binding_lifetime: u32,
    /// Longest binding lifetime this node grants as a home agent, seconds.
    #[arg(long, default_value_t = 3600)]
    max_binding_lifetime: u32,
    /// Remove a home agent tunnel no packet crossed for this many seconds (0: never).
    #[arg(long, default_value_t = 300)]
    tunnel_idle: u64,
    /// MTU of the network between hosts (tunnels get this less their encapsulation).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=65535))]
    underlay_mtu: u32,
    /// Tunnel kind: vxlan, ipip or gre (default: probe the kernel, lightest that works).
    #[arg(long)]
    tunnel_kind: Option<String>,
    /// Cap on the chunk store's compressed bytes (e.g. 8G, 512M): garbage collection
    /// removes unleased chunks, least recently used first, while above it. Default: no
    /// cap (only chunks of expired leases are collected).
    #[arg(long, value_parser = parse_size)]
    store_cap: Option<u64>,
    /// Seconds between garbage collections of the chunk store.
    #[arg(long, default_value_t = 300)]
    gc_interval: u64,
    /// The cluster knowledge base's configuration (JSON, one file for the cluster; see
    /// docs/operations.md): mode, the host acting as the knowledge base, every host's
    /// endpoint, neighbours. Without it, a destination fetches from the source only.
    #[arg(long, env = "XFER_KB_CONFIG")]
    kb_config: Option<PathBuf>,
    /// Seconds between snapshots of the read-write volumes (and, with
    /// --snapshot-memory, the memory) of the containers running here, kept in the chunk
    /// store and announced to the knowledge base; 0: none. Default: the --kb-config
    /// file's "snapshots", else none.
    #[arg(long)]
    snapshot_period: Option<u64>,
    /// Discard snapshots older than this many seconds (default 3600).
    #[arg(long)]
    snapshot_max_age: Option<u64>,
    /// Keep at most this many bytes of snapshots (e.g. 4G), oldest discarded first.
    #[arg(long, value_parser = parse_size)]
    snapshot_max_bytes: Option<u64>,
    /// Also snapshot the memory of running containers (CRIU dump, left running).
    #[arg(long)]
    snapshot_memory: bool,
    /// Seconds between passes that chunk the blobs of this node's images into its
    /// chunk store (so peers can fetch layers from it; 0: never, a migration then
    /// chunks the blobs it sends).
    #[arg(long, default_value_t = 15)]
    layer_index_period: u64,
    /// Serve without TLS: any peer that reaches the port can drive this node.
    /// For development only.
    #[arg(long)]
    insecure: bool,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("xferd: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error")
            }),
        )
        .init();
    let args = Args::parse();
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| args.work_dir.join("logs"));
    let cfg = NodeConfig {
        name: args.node.clone(),
        host: HostConfig {
            socket: args.containerd.clone(),
            namespace: args.namespace.clone(),
            snapshotter: args.snapshotter.clone(),
            netns: args.netns.clone(),
            log_dir,
            criu_config: Some(args.work_dir.join("criu-runc.conf")),
        },
        work_dir: args.work_dir.clone(),
        container_net: None,
        mobility: None,
        advertise: args.advertise.clone().unwrap_or_else(|| {
            let scheme = if args.insecure { "http" } else { "https" };
            format!("{scheme}://{}", args.listen)
        }),
        tls: args.tls_dir.as_ref().map(|d| {
            xfer_agent::tls::TlsFiles::in_dir(d, args.tls_name.as_deref().unwrap_or(&args.node))
        }),
    };
    let mut cfg = cfg;
    let kcfg = match &args.kb_config {
        Some(path) => Some(xfer_agent::kb::KbConfig::load(path)?),
        None => None,
    };
    if let (Some(bridge), Some(netns)) = (&args.bridge, &args.netns) {
        let host_ns = netns
            .file_name()
            .and_then(|n| n.to_str())
            .context("--netns must be a /run/netns/NAME path")?
            .to_string();
        cfg.container_net = Some(xfer_agent::netctl::ContainerNet {
            host_ns,
            bridge: bridge.clone(),
        });
    }
    if let (Some(address), Some(cn)) = (args.mobility_address, &cfg.container_net) {
        let key = args
            .cluster_key
            .as_deref()
            .context("--cluster-key is required")?;
        let keys = xfer_agent::handover::load_key(key)?;
        let tunnel_kind = match args.tunnel_kind.as_deref() {
            None => None,
            Some(k) => Some(
                xfer_net::TunnelKind::ALL
                    .into_iter()
                    .find(|t| t.as_str() == k)
                    .with_context(|| format!("--tunnel-kind {k:?}: expected vxlan, ipip or gre"))?,
            ),
        };
        let mob = xfer_agent::handover::Mobility::start(xfer_agent::handover::MobilityConfig {
            address,
            port: args.mobility_port,
            host_ns: cn.host_ns.clone(),
            keys,
            lifetime_secs: args.binding_lifetime,
            max_lifetime_secs: args.max_binding_lifetime,
            idle: (args.tunnel_idle > 0).then(|| std::time::Duration::from_secs(args.tunnel_idle)),
            state_path: args.work_dir.join("bindings.json"),
            tunnel_kind,
            underlay_mtu: args.underlay_mtu,
            kb_recovery: kcfg.is_some(),
        })
        .await
        .context("start the handover")?;
        tracing::info!(tunnel = %mob.tunnel_kind(), "handover enabled");
        cfg.mobility = Some(mob);
    }
    let server_tls = match &cfg.tls {
        Some(t) if !args.insecure => Some(t.server_config().context("load TLS files")?),
        _ => None,
    };
    let criu_config = cfg.host.criu_config.clone();
    let mobility = cfg.mobility.clone();
    let node = Node::new(cfg).await.with_context(|| {
        format!(
            "start node {} on containerd {}",
            args.node,
            args.containerd.display()
        )
    })?;
    if let Some(c) = &criu_config {
        let extras = node.criu().config_extras(&[]);
        xfer_runtime::containerd::write_criu_config_with(c, &extras)
            .context("write the CRIU configuration")?;
        tracing::info!(options = ?extras, "CRIU configuration written");
    }
    let node = match &kcfg {
        Some(kcfg) => {
            let kb = xfer_agent::kb::Kb::start(
                kcfg,
                &args.node,
                node.store().clone(),
                args.tls_dir.as_ref().map(|d| {
                    xfer_agent::tls::TlsFiles::in_dir(
                        d,
                        args.tls_name.as_deref().unwrap_or(&args.node),
                    )
                }),
                &args.work_dir,
            )
            .await
            .context("start the knowledge base")?;
            node.with_kb(std::sync::Arc::new(kb))
        }
        None => node,
    };
    let mut snap = kcfg
        .as_ref()
        .and_then(|k| k.snapshots.clone())
        .unwrap_or_default();
    if let Some(p) = args.snapshot_period {
        snap.period_secs = p;
    }
    if let Some(a) = args.snapshot_max_age {
        snap.max_age_secs = a;
    }
    if let Some(b) = args.snapshot_max_bytes {
        snap.max_bytes = b;
    }
    snap.memory |= args.snapshot_memory;
    let node = if snap.enabled() {
        let keeper = std::sync::Arc::new(
            xfer_agent::snapshots::Keeper::open(
                &args.node,
                snap.clone(),
                node.store().clone(),
                args.work_dir.join("snapshots"),
                node.kb().map(|k| k.inventory().clone()),
                std::sync::Arc::new(xfer_kb::SystemClock::new()),
            )
            .context("open the snapshot cache")?,
        );
        tracing::info!(?snap, "snapshot caching on");
        let node = node.with_snapshots(keeper.clone());
        xfer_agent::snapshots::spawn(node.clone(), keeper);
        node
    } else {
        node
    };
    if args.layer_index_period > 0 {
        xfer_agent::layers::spawn_index(
            node.clone(),
            std::time::Duration::from_secs(args.layer_index_period),
        );
    }
    // Bindings: the local file was loaded by the handover's start; if it was missing
    // or unreadable they are recovered from the knowledge base now, before the
    // routed containers re-register.
    if let (Some(mob), Some(kb)) = (&mobility, node.kb()) {
        kb.serve_bindings(mob).await;
    }
    node.resume_handover()
        .await
        .context("resume the handover of routed containers")?;
    tracing::info!(node = %args.node, listen = %args.listen, "xferd serving");
    let gc_node = node.clone();
    let policy = xfer_store::GcPolicy {
        max_bytes: args.store_cap,
        ..Default::default()
    };
    let gc_every = std::time::Duration::from_secs(args.gc_interval.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(gc_every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let store = gc_node.store().clone();
            let policy = policy.clone();
            match tokio::task::spawn_blocking(move || store.gc(&policy)).await {
                Ok(Ok(r)) => {
                    tracing::info!(
                        removed = r.removed.len(),
                        freed = r.freed_bytes,
                        stored = r.stored_bytes,
                        over_cap = r.over_cap,
                        "chunk store garbage collection"
                    );
                    // The knowledge base hears of evictions, so it stops naming us.
                    if let Some(kb) = gc_node.kb() {
                        kb.inventory().collected(&r);
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "chunk store garbage collection failed"),
                Err(e) => tracing::warn!(error = %e, "chunk store garbage collection task"),
            }
        }
    });
    let reaper = node.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            reaper.expire_inbound().await;
        }
    });
    xfer_agent::serve(node, args.listen, server_tls, shutdown())
        .await
        .with_context(|| format!("serve on {}", args.listen))?;
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        Some('T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size: use e.g. 8G, 512M or a number of bytes"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse() {
        assert_eq!(super::parse_size("512M"), Ok(512 << 20));
        assert_eq!(super::parse_size("8g"), Ok(8 << 30));
        assert_eq!(super::parse_size("1000"), Ok(1000));
        assert!(super::parse_size("lots").is_err());
        assert!(super::parse_size("99999999999T").is_err());
    }
}
