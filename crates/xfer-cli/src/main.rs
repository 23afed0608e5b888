//! `xfer`: the command line. A thin layer over `xfer-agent`'s client API and
//! `xfer-lab`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use xfer_agent::client::{Client, Mode};
use xfer_agent::tls::TlsFiles;
use xfer_lab::{Lab, LabSpec};

#[derive(Debug, Parser)]
#[command(
    name = "xfer",
    version,
    about = "Live-migrate containerd containers between edge hosts"
)]
struct Cli {
    /// Lab whose hosts names like `h1` refer to.
    #[arg(long, global = true, env = "XFER_LAB", default_value = "xl")]
    prefix: String,
    /// Directory with the cluster CA (ca.pem) and the operator's certificate
    /// (NAME.pem, NAME.key), for agents given by endpoint. Default: the lab's.
    #[arg(long, global = true, env = "XFER_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Name of the certificate files in --tls-dir.
    #[arg(long, global = true, default_value = "operator")]
    tls_name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The local multi-host lab.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Registry-free images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Start a container on a host.
    Run {
        /// Host name in the lab (h1) or agent endpoint (http://ADDR:PORT).
        #[arg(long)]
        host: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        name: String,
        /// Environment variables (KEY=VALUE).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Give the container its own address (CIDR, e.g. 10.1.2.200/24) that moves
        /// with it (in a lab, use the subnet's .200-.250).
        #[arg(long)]
        address: Option<String>,
        /// Default gateway for --address (default: the lab's gateway).
        #[arg(long)]
        gateway: Option<String>,
        /// Routed home address instead of a bridged one: the host routes --address
        /// (an IPv4 address; in a lab `home:K` picks the host's K-th home address),
        /// becomes its home agent, and tunnels its traffic wherever it migrates.
        #[arg(long, requires = "address")]
        routed: bool,
        /// With --routed: after a migration, send the container's outbound traffic
        /// back through the home agent (networks with ingress filtering).
        #[arg(long, requires = "routed")]
        reverse_tunnel: bool,
        /// A volume: NAME:DST[:OPTS] (named), /HOST/PATH:DST[:OPTS] (bind mount) or
        /// DST (anonymous); OPTS: ro, rw, mount options (nosuid, nodev, noexec, ...),
        /// label.KEY=VALUE. Repeatable.
        #[arg(long = "volume", short = 'v')]
        volumes: Vec<String>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// List the containers of a host.
    Ps {
        #[arg(long)]
        host: String,
    },
    /// Kill and remove a container.
    Rm {
        #[arg(long)]
        host: String,
        name: String,
    },
    /// The bindings a host holds as home agent (its routed containers that run
    /// elsewhere, and where).
    Bindings {
        /// The home agent (lab name or endpoint).
        #[arg(long)]
        on: String,
        /// Keep printing changes.
        #[arg(long)]
        watch: bool,
    },
    /// The home agents' bindings as the knowledge base holds them (home address, home
    /// agent, care-of address, tunnel kind, sequence number, expires in).
    KbBindings {
        /// The host to ask (lab name or endpoint): the knowledge base host in the
        /// central modes; in modes c-e any neighbour of the home agent.
        #[arg(long)]
        on: String,
        /// Only the bindings of this home agent (host name).
        #[arg(long, conflicts_with = "home")]
        home_agent: Option<String>,
        /// Only the binding of this home address.
        #[arg(long)]
        home: Option<std::net::Ipv4Addr>,
        /// One JSON object per line instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Route optimisation: route the home agent's home addresses straight to their
    /// care-of hosts, so this client's traffic stops crossing the home agent.
    Rebind {
        /// The home agent (lab name or endpoint).
        #[arg(long)]
        home_agent: String,
        /// Only this home address.
        #[arg(long)]
        home: Option<std::net::Ipv4Addr>,
        /// Install the routes in this network namespace (default: this process's;
        /// `client` means the lab's client namespace).
        #[arg(long)]
        netns: Option<String>,
        /// Keep following binding changes (rebinding again when a container moves on,
        /// removing the route when it comes home) until interrupted.
        #[arg(long)]
        follow: bool,
    },
    /// Migrate a running container to another host.
    Migrate {
        /// The container.
        container: String,
        /// Source host (lab name or endpoint).
        #[arg(long)]
        from: String,
        /// Destination host (lab name or endpoint).
        #[arg(long)]
        to: String,
        /// precopy (live: rounds while it runs, then a short cut-over) | cold
        /// (stop-and-copy) | postcopy (restore first, memory follows lazily from the
        /// source) | hybrid (volumes in rounds, memory lazily) | auto (pre-copy rounds,
        /// then a full cut-over if it fits the budget, else a lazy one).
        #[arg(long, default_value = "precopy")]
        mode: Mode,
        /// Most pre-copy rounds (default 4).
        #[arg(long, default_value_t = 0)]
        max_rounds: u32,
        /// Cut over once a round's delta would travel within this many ms (default 100).
        #[arg(long, default_value_t = 0)]
        budget_ms: u32,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Test hook: make a destination step fail (prepare, transfer, restore).
        #[arg(long, hide = true, default_value = "")]
        inject_failure: String,
    },
}

#[derive(Debug, Subcommand)]
enum LabCmd {
    /// Create the lab (clearing a crashed earlier one of the same prefix first).
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Rate limit of a host's link, both directions: HOST=RATE (e.g. h2=100mbit).
        #[arg(long = "rate")]
        rates: Vec<String>,
        /// The xferd binary (default: next to this binary).
        #[arg(long)]
        xferd: Option<PathBuf>,
        /// Binding lifetime the agents ask for as care-of hosts, seconds.
        #[arg(long, default_value_t = 60)]
        binding_lifetime: u32,
        /// Seconds after which a home agent removes a tunnel nothing crossed (0: never).
        #[arg(long, default_value_t = 300)]
        tunnel_idle: u64,
    },
    /// Remove everything the lab made.
    Down,
    /// Hosts, addresses and daemons.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Kill a host's agent (as a crash) and start it again; its containers keep running.
    RestartAgent {
        #[arg(long)]
        node: String,
    },
    /// Run a program inside a lab namespace (a host or `client`).
    Exec {
        #[arg(long)]
        node: String,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build an image (busybox or redis, from this machine's binaries) and import it
    /// into a host's containerd.
    Import {
        #[arg(long)]
        host: String,
        /// busybox | redis | bulky (busybox with a 40 MB layer)
        kind: String,
    },
    /// Delete an image from a host's containerd (its blobs and layers go with it).
    Rm {
        #[arg(long)]
        host: String,
        name: String,
    },
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XFER_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,netlink_packet_route=error")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("xfer: error: {e:#}");
        std::process::exit(1);
    }
}

/// Where to reach a host (a lab name or an endpoint) and with which certificate.
struct Target {
    endpoint: String,
    tls: Option<TlsFiles>,
}

fn target(cli: &Globals, host: &str) -> anyhow::Result<Target> {
    let given = cli
        .tls_dir
        .as_ref()
        .map(|d| TlsFiles::in_dir(d, &cli.tls_name));
    if host.contains("://") {
        return Ok(Target {
            endpoint: host.to_string(),
            tls: given,
        });
    }
    let lab = Lab::load(&cli.prefix)?;
    Ok(Target {
        endpoint: lab.host(host)?.endpoint.clone(),
        tls: given.or_else(|| Some(lab.operator_tls())),
    })
}

async fn connect(g: &Globals, host: &str) -> anyhow::Result<Client> {
    let t = target(g, host)?;
    Client::connect(&t.endpoint, t.tls.as_ref())
        .await
        .with_context(|| format!("connect to {host} ({})", t.endpoint))
}

/// What a migration looks like while it runs: each phase as a line, and on a
/// terminal a live line with the elapsed time, the current round, the bytes on the
/// wire so far and their rate.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: std::time::Instant,
    wire: u64,
    round: u32,
    frozen: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stdout().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(std::time::Duration::from_millis(100));
            b.set_message("validating");
            b
        });
        Progress {
            bar,
            started: std::time::Instant::now(),
            wire: 0,
            round: 0,
            frozen: false,
        }
    }

    fn phase(&mut self, p: &xfer_proto::v1::PhaseTiming) {
        let line = format!(
            "  {:<16} {:>9.1} ms {:>12} bytes",
            p.name,
            p.micros as f64 / 1000.0,
            p.bytes
        );
        if !p.name.starts_with("dst.") && p.name != "checkpoint" && p.name != "rootfs_diff" {
            self.wire += p.bytes;
        }
        if p.name.starts_with("precopy.") {
            self.round += 1;
        }
        self.frozen |= p.name == "freeze";
        match &self.bar {
            Some(b) => {
                b.println(line);
                let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                let next = if self.frozen {
                    "cut-over (frozen)".to_string()
                } else {
                    format!("pre-copy round {}", self.round + 1)
                };
                b.set_message(format!(
                    "{next} | {} on the wire | {}/s",
                    indicatif::HumanBytes(self.wire),
                    indicatif::HumanBytes((self.wire as f64 / secs) as u64)
                ));
            }
            None => println!("{line}"),
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}

#[derive(Debug, Clone)]
struct Globals {
    prefix: String,
    tls_dir: Option<PathBuf>,
    tls_name: String,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let prefix = cli.prefix.clone();
    let g = Globals {
        prefix: cli.prefix.clone(),
        tls_dir: cli.tls_dir.clone(),
        tls_name: cli.tls_name.clone(),
    };
    match cli.cmd {
        Cmd::Lab { cmd } => lab(&prefix, cmd).await,
        Cmd::Image {
            cmd: ImageCmd::Import { host, kind },
        } => {
            let lab = Lab::load(&prefix)?;
            let h = lab.host(&host)?;
            let t = std::time::Instant::now();
            let imported = xfer_lab::import_image(h, &kind).await?;
            println!(
                "imported {kind} into {host}: manifest {} ({} layers) in {:.0} ms",
                imported.manifest.digest,
                imported.layers.len(),
                t.elapsed().as_secs_f64() * 1000.0
            );
            Ok(())
        }
        Cmd::Image {
            cmd: ImageCmd::Rm { host, name },
        } => {
            let lab = Lab::load(&prefix)?;
            let removed = xfer_lab::remove_image(lab.host(&host)?, &name).await?;
            println!(
                "{name} {} {host}",
                if removed {
                    "removed from"
                } else {
                    "was not on"
                }
            );
            Ok(())
        }
        Cmd::Run {
            host,
            image,
            name,
            env,
            address,
            gateway,
            routed,
            reverse_tunnel,
            volumes,
            args,
        } => {
            let volumes = volumes
                .iter()
                .map(|v| xfer_agent::volumes::parse_cli(v).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut c = connect(&g, &host).await?;
            c.set_volumes(volumes);
            let pid = match address {
                Some(a) if routed => {
                    let home = match a.strip_prefix("home:") {
                        Some(k) => Lab::load(&g.prefix)
                            .context("--address home:K needs a lab")?
                            .home_address(&host, k.parse().context("home:K wants a number")?)?,
                        None => a
                            .trim_end_matches("/32")
                            .parse()
                            .with_context(|| format!("--address {a:?} is not an IPv4 address"))?,
                    };
                    let pid = c
                        .run_routed(&name, &image, &args, &env, home, reverse_tunnel)
                        .await?;
                    println!("{name} has home address {home}, home agent {host}");
                    pid
                }
                Some(a) => {
                    let gw = match gateway {
                        Some(gw) => gw,
                        None => Lab::load(&g.prefix)
                            .context("--address without --gateway needs a lab for its gateway")?
                            .gateway
                            .to_string(),
                    };
                    c.run_with_address(&name, &image, &args, &env, &a, &gw)
                        .await?
                }
                None => c.run(&name, &image, &args, &env).await?,
            };
            println!("started {name} on {host} (pid {pid})");
            Ok(())
        }
        Cmd::Ps { host } => {
            let mut c = connect(&g, &host).await?;
            println!("{:<24} {:<12} {:<10} PID", "CONTAINER", "IMAGE", "STATUS");
            for ci in c.list().await? {
                println!(
                    "{:<24} {:<12} {:<10} {}",
                    ci.id, ci.image, ci.status, ci.pid
                );
            }
            Ok(())
        }
        Cmd::Rm { host, name } => {
            let mut c = connect(&g, &host).await?;
            c.remove(&name).await?;
            println!("removed {name} from {host}");
            Ok(())
        }
        Cmd::Bindings { on, watch } => {
            let mut c = connect(&g, &on).await?;
            let mut stream = c.watch_bindings().await?;
            println!(
                "{:<10} {:<16} {:<16} {:>5} {:>9} TUNNEL",
                "EVENT", "HOME", "CARE-OF", "SEQ", "LIFETIME"
            );
            while let Some(ev) = stream.message().await? {
                let kind = xfer_proto::v1::BindingEventKind::try_from(ev.kind)
                    .map(|k| {
                        k.as_str_name()
                            .trim_start_matches("BINDING_EVENT_KIND_")
                            .to_lowercase()
                    })
                    .unwrap_or_else(|_| format!("kind {}", ev.kind));
                if ev.kind == xfer_proto::v1::BindingEventKind::Synced as i32 {
                    if !watch {
                        break;
                    }
                    continue;
                }
                println!(
                    "{:<10} {:<16} {:<16} {:>5} {:>8}s {} {}",
                    kind,
                    ev.home_address,
                    ev.care_of,
                    ev.sequence,
                    ev.lifetime_secs,
                    ev.tunnel,
                    ev.tunnel_kind
                );
            }
            Ok(())
        }
        Cmd::KbBindings {
            on,
            home_agent,
            home,
            json,
        } => {
            let t = target(&g, &on)?;
            let q = match (home_agent, home) {
                (Some(a), _) => xfer_kb::BindingQuery::HomeAgent(a),
                (None, Some(h)) => xfer_kb::BindingQuery::Home(h),
                (None, None) => xfer_kb::BindingQuery::All,
            };
            let (at, list) = Client::kb_bindings(&t.endpoint, t.tls.as_ref(), &q)
                .await
                .with_context(|| format!("ask {on} ({}) for bindings", t.endpoint))?;
            if !json {
                println!(
                    "{:<16} {:<12} {:<16} {:<6} {:>5} EXPIRES-IN",
                    "HOME", "HOME-AGENT", "CARE-OF", "KIND", "SEQ"
                );
            }
            for b in list {
                let expires = b.remaining_secs(at);
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "home": b.home.to_string(),
                            "home_agent": b.home_agent,
                            "home_agent_address": b.home_agent_address.to_string(),
                            "care_of": b.care_of.to_string(),
                            "kind": b.tunnel.as_str(),
                            "reverse_tunnel": b.reverse_tunnel,
                            "seq": b.seq,
                            "lifetime_secs": b.lifetime_secs,
                            "expires_in_secs": expires,
                        })
                    );
                } else {
                    println!(
                        "{:<16} {:<12} {:<16} {:<6} {:>5} {}s",
                        b.home.to_string(),
                        b.home_agent,
                        b.care_of.to_string(),
                        b.tunnel.as_str(),
                        b.seq,
                        expires
                    );
                }
            }
            Ok(())
        }
        Cmd::Rebind {
            home_agent,
            home,
            netns,
            follow,
        } => {
            let netns = match netns.as_deref() {
                Some("client") => Some(Lab::load(&g.prefix)?.client.netns),
                other => other.map(str::to_string),
            };
            let mut c = connect(&g, &home_agent).await?;
            let mut stream = c.watch_bindings().await?;
            let mut rb = xfer_agent::rebind::Rebinder::new(netns, home)?;
            xfer_agent::rebind::run(&mut stream, &mut rb, follow, |ev, r| match r {
                xfer_agent::rebind::Rebound::Direct { home, care_of } => {
                    println!("{home}: direct via {care_of}")
                }
                xfer_agent::rebind::Rebound::Home { home } => {
                    println!("{home}: direct route removed (home agent forwards again)")
                }
                xfer_agent::rebind::Rebound::Unchanged => {
                    let _ = ev;
                }
            })
            .await?;
            Ok(())
        }
        Cmd::Migrate {
            container,
            from,
            to,
            mode,
            max_rounds,
            budget_ms,
            json,
            inject_failure,
        } => {
            let opts = xfer_agent::client::MigrateOptions {
                mode,
                max_rounds,
                downtime_budget_ms: budget_ms,
                inject_failure,
            };
            let dst = target(&g, &to)?.endpoint;
            let mut c = connect(&g, &from).await?;
            if !json {
                println!("migrating {container}: {from} -> {to} ({mode:?})");
            }
            let mut progress = (!json).then(Progress::new);
            let report = c
                .migrate_opts(&container, &dst, &opts, |p| {
                    if let Some(pr) = progress.as_mut() {
                        pr.phase(p);
                    }
                })
                .await
                .with_context(|| format!("migrate {container} from {from} to {to}"));
            if let Some(pr) = progress.take() {
                pr.finish();
            }
            let report = report?;
            if json {
                let phases: Vec<_> = report
                    .phases
                    .iter()
                    .map(|p| serde_json::json!({"name": p.name, "ms": p.micros as f64 / 1000.0, "bytes": p.bytes}))
                    .collect();
                let v = serde_json::json!({
                    "migration_id": report.migration_id,
                    "container": report.container_id,
                    "source": report.source,
                    "destination": report.destination,
                    "mode": format!("{mode:?}").to_lowercase(),
                    "decision": report.decision,
                    "postcopy_bytes": report.postcopy_bytes,
                    "postcopy_ms": report.postcopy_micros as f64 / 1000.0,
                    "phases": phases,
                    "total_ms": report.total_micros as f64 / 1000.0,
                    "downtime_ms": report.downtime_micros as f64 / 1000.0,
                    "bytes_sent": report.bytes_sent,
                    "restored_pid": report.restored_pid,
                    "image_blobs_sent": report.image_blobs_sent,
                    "image_blobs_skipped": report.image_blobs_skipped,
                    "image_sources": report.image_sources.iter().map(|s| serde_json::json!({
                        "source": s.source,
                        "chunks": s.chunks,
                        "wire_bytes": s.wire_bytes,
                    })).collect::<Vec<_>>(),
                    "rounds": report.rounds.iter().map(|r| serde_json::json!({
                        "round": r.round,
                        "dump_ms": r.dump_micros as f64 / 1000.0,
                        "chunk_ms": r.chunk_micros as f64 / 1000.0,
                        "sync_ms": r.sync_micros as f64 / 1000.0,
                        "dump_bytes": r.dump_bytes,
                        "delta_raw_bytes": r.delta_raw_bytes,
                        "delta_wire_bytes": r.delta_wire_bytes,
                        "pending_chunks": r.pending_chunks,
                        "sources": r.sources.iter().map(|s| serde_json::json!({
                            "source": s.source,
                            "chunks": s.chunks,
                            "wire_bytes": s.wire_bytes,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for r in &report.rounds {
                    println!(
                        "  round {:<2} dump {:>7.1} ms ({:>10} B)  chunk {:>7.1} ms  fetch {:>7.1} ms  delta {:>10} B raw, {:>10} B on the wire",
                        r.round,
                        r.dump_micros as f64 / 1000.0,
                        r.dump_bytes,
                        r.chunk_micros as f64 / 1000.0,
                        r.sync_micros as f64 / 1000.0,
                        r.delta_raw_bytes,
                        r.delta_wire_bytes
                    );
                    if r.pending_chunks > 0 {
                        println!(
                            "           answered with {} chunks still arriving (they came during the next step)",
                            r.pending_chunks
                        );
                    }
                    for src in &r.sources {
                        println!(
                            "           from {:<12} {:>8} chunks {:>12} B on the wire",
                            src.source, src.chunks, src.wire_bytes
                        );
                    }
                }
                if !report.decision.is_empty() {
                    println!("  cut-over: {}", report.decision);
                }
                if report.postcopy_micros > 0 {
                    println!(
                        "  post-copy: {} B of memory taken lazily in {:.1} ms after the restore",
                        report.postcopy_bytes,
                        report.postcopy_micros as f64 / 1000.0
                    );
                }
                println!(
                    "done: total {:.1} ms, downtime {:.1} ms, {} bytes on the wire, image blobs sent {} / skipped {}, restored pid {}",
                    report.total_micros as f64 / 1000.0,
                    report.downtime_micros as f64 / 1000.0,
                    report.bytes_sent,
                    report.image_blobs_sent,
                    report.image_blobs_skipped,
                    report.restored_pid
                );
            }
            Ok(())
        }
    }
}

async fn lab(prefix: &str, cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            nodes,
            rates,
            xferd,
            binding_lifetime,
            tunnel_idle,
        } => {
            let xferd = match xferd {
                Some(p) => p,
                None => std::env::current_exe()?
                    .parent()
                    .context("locate this binary's directory")?
                    .join("xferd"),
            };
            let rates = rates
                .iter()
                .map(|r| xfer_lab::parse_rate(r))
                .collect::<Result<Vec<_>, _>>()?;
            let t = std::time::Instant::now();
            let lab = xfer_lab::up(&LabSpec {
                prefix: prefix.to_string(),
                nodes,
                rates,
                xferd,
                handover: xfer_lab::HandoverSpec {
                    binding_lifetime_secs: binding_lifetime,
                    tunnel_idle_secs: tunnel_idle,
                },
            })
            .await?;
            println!(
                "lab {} up in {:.1} s",
                lab.prefix,
                t.elapsed().as_secs_f64()
            );
            print_status(&lab);
            Ok(())
        }
        LabCmd::Down => {
            let rep = xfer_lab::down(prefix).await?;
            println!(
                "lab {prefix} down: killed {} processes, removed {} namespaces, {} links, {} mounts",
                rep.killed.len(),
                rep.namespaces.len(),
                rep.links.len(),
                rep.mounts
            );
            Ok(())
        }
        LabCmd::Status { json } => {
            let lab = Lab::load(prefix)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lab)?);
            } else {
                print_status(&lab);
            }
            Ok(())
        }
        LabCmd::RestartAgent { node } => {
            let mut lab = Lab::load(prefix)?;
            let pid = xfer_lab::restart_agent(&mut lab, &node).await?;
            println!("agent of {node} restarted (pid {pid})");
            Ok(())
        }
        LabCmd::Exec { node, args } => {
            let lab = Lab::load(prefix)?;
            let out = lab.exec(&node, &args)?;
            use std::io::Write;
            std::io::stdout().write_all(&out.stdout)?;
            std::io::stderr().write_all(&out.stderr)?;
            std::process::exit(out.status.code().unwrap_or(1));
        }
    }
}

fn print_status(lab: &Lab) {
    println!(
        "lab {} subnet {}/24 bridge {} gateway {}",
        lab.prefix, lab.subnet, lab.bridge, lab.gateway
    );
    println!(
        "  {:<8} {:<15} {:<26} {:<18} {:<14} RATE",
        "HOST", "ADDRESS", "AGENT", "CONTAINERD", "XFERD"
    );
    for h in &lab.hosts {
        let st = |pid: u32| {
            if Lab::alive(pid) {
                format!("pid {pid}")
            } else {
                format!("DEAD ({pid})")
            }
        };
        println!(
            "  {:<8} {:<15} {:<26} {:<18} {:<14} {}",
            h.name,
            h.address.to_string(),
            h.endpoint,
            st(h.containerd_pid),
            st(h.xferd_pid),
            h.rate_bits
                .map(|r| format!("{} Mbit/s", r / 1_000_000))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!("  {:<8} {:<15}", "client", lab.client.address.to_string());
}
