//! `xfer-lab`: several edge hosts on one machine, for demos, tests and benchmarks.
//!
//! `up` makes, for a lab named by a short prefix `P`:
//! * a bridge `P-br` in the root namespace with the subnet's `.254` address;
//! * per host `hN`: a network namespace `P-hN`, a veth pair (`P-hN` on the bridge,
//!   `eth0` inside) with address `.N`, its own containerd (own root, state and socket
//!   under `/var/lib/xfer-lab/P/hN`, containerd namespace `xfer-P-hN` so runc's state
//!   directories do not collide), and its own `xferd` listening on `.N:7070`;
//! * a client namespace `P-client` with address `.100`;
//! * a cluster CA with a certificate per host and one for the operator (mutual TLS
//!   between agents and from the CLI);
//! * optional rate limits (tc htb) on both directions of a host's link.
//!
//! `down` removes every process, mount, cgroup, runc state directory, namespace, link
//! and directory of the lab. `up` runs `down` first, so it also clears what a crashed
//! run left behind. Labs with different prefixes (and subnets) coexist.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use xfer_net::{NetOps, Netlink, Ns};
use xfer_runtime::containerd::HostConfig;
use xfer_runtime::daemon::DaemonConfig;

/// Where labs keep their files.
pub const LAB_ROOT: &str = "/var/lib/xfer-lab";
/// The bridge inside each host's namespace (its address, eth0 and container veths).
pub const HOST_BRIDGE: &str = "br0";
/// Port of each host's xferd.
pub const AGENT_PORT: u16 = 7070;

/// What went wrong in the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("lab prefix {0:?} is not valid: use 1-6 lower-case letters or digits, starting with a letter")]
    ParsePrefix(String),
    #[error("lab {0} is not up (no {1}): run `xfer lab up --prefix {0}`")]
    Load(String, PathBuf),
    #[error("lab {prefix} has no host {host:?}; hosts are {hosts}")]
    FindHost {
        prefix: String,
        host: String,
        hosts: String,
    },
    #[error("network set-up of {what}")]
    Net {
        what: String,
        #[source]
        source: xfer_net::NetError,
    },
    #[error("{what}")]
    Runtime {
        what: String,
        #[source]
        source: xfer_runtime::RuntimeError,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("start {what}: {detail}")]
    Start { what: String, detail: String },
    #[error("the lab needs root (network namespaces, containerd, CRIU); run it as root")]
    NotRoot,
    #[error("rate {0:?} is not valid: use HOST=RATE with RATE like 100mbit, 1gbit or 500kbit")]
    ParseRate(String),
}

/// One lab host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub dir: PathBuf,
    pub containerd_socket: PathBuf,
    pub containerd_namespace: String,
    pub containerd_pid: u32,
    pub xferd_pid: u32,
    pub endpoint: String,
    pub rate_bits: Option<u64>,
}

impl LabHost {
    /// This host's agent work directory (volumes, checkpoints, chunk store).
    pub fn work_dir(&self) -> PathBuf {
        work_dir(&self.dir, &self.name)
    }

    /// The runtime view of this host, for code that drives its containerd directly.
    pub fn host_config(&self) -> HostConfig {
        HostConfig {
            socket: self.containerd_socket.clone(),
            namespace: self.containerd_namespace.clone(),
            snapshotter: "overlayfs".into(),
            netns: Some(xfer_net::netns_path(&self.netns)),
            log_dir: self.dir.join("logs"),
            criu_config: Some(work_dir(&self.dir, &self.name).join("criu-runc.conf")),
        }
    }
}

/// The client namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabClient {
    pub netns: String,
    pub address: Ipv4Addr,
}

/// A lab that is up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub prefix: String,
    /// Cluster CA and certificates (`ca.pem`, `hN.pem/key`, `operator.pem/key`).
    pub tls_dir: PathBuf,
    pub subnet: Ipv4Addr,
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub hosts: Vec<LabHost>,
    pub client: LabClient,
    /// The /24 the hosts' home networks for routed containers come from: host `hN`
    /// owns the /28 at `.16*N` ([`Lab::home_address`]).
    #[serde(default)]
    pub home_base: Option<Ipv4Addr>,
    /// How the agents were started.
    #[serde(default)]
    pub agent: Option<AgentArgs>,
}

/// How to bring a lab up.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub prefix: String,
    pub nodes: usize,
    /// (host, bits per second) rate limits, both directions of the host's link.
    pub rates: Vec<(String, u64)>,
    /// The xferd binary.
    pub xferd: PathBuf,
    /// The agents' handover settings.
    pub handover: HandoverSpec,
}

/// The agents' handover settings in a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverSpec {
    /// Binding lifetime care-of hosts ask for, seconds.
    pub binding_lifetime_secs: u32,
    /// Idle time after which a home agent removes a tunnel, seconds (0: never).
    pub tunnel_idle_secs: u64,
}

impl Default for HandoverSpec {
    fn default() -> Self {
        HandoverSpec {
            binding_lifetime_secs: 60,
            tunnel_idle_secs: 300,
        }
    }
}

/// The /24 of a lab's home networks: 10.(200..=255).Y.0 for the lab subnet 10.X.Y.0.
pub fn home_base_for(subnet: Ipv4Addr) -> Ipv4Addr {
    let o = subnet.octets();
    Ipv4Addr::new(10, 200 + (o[1].saturating_sub(100) % 56), o[2], 0)
}

/// Host `n`'s home network (a /28) in a lab with home base `base`.
pub fn home_network(base: Ipv4Addr, n: u8) -> xfer_net::Ipv4Cidr {
    let o = base.octets();
    xfer_net::Ipv4Cidr::new(Ipv4Addr::new(o[0], o[1], o[2], n.saturating_mul(16)), 28)
        .unwrap_or_else(|_| unreachable!("28 is a valid prefix length"))
}

/// Checks a lab prefix: short enough that `P-client` fits an interface name.
pub fn validate_prefix(p: &str) -> Result<(), LabError> {
    let ok = (1..=6).contains(&p.len())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars().next().is_some_and(|c| c.is_ascii_lowercase());
    if ok {
        Ok(())
    } else {
        Err(LabError::ParsePrefix(p.to_string()))
    }
}

/// The lab's /24: 10.X.Y.0 from a hash of the prefix (X in 100..=199), so two labs
/// with different prefixes get different subnets.
pub fn subnet_for(prefix: &str) -> Ipv4Addr {
    let mut h: u32 = 2166136261;
    for b in prefix.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(16777619);
    }
    Ipv4Addr::new(10, 100 + (h % 100) as u8, ((h >> 8) % 250) as u8, 0)
}

/// Parses `HOST=RATE` with RATE in bit/s units: `100mbit`, `1gbit`, `500kbit`, `1000000`.
pub fn parse_rate(s: &str) -> Result<(String, u64), LabError> {
    let bad = || LabError::ParseRate(s.to_string());
    let (host, rate) = s.split_once('=').ok_or_else(bad)?;
    let rate = rate.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = rate.strip_suffix("gbit") {
        (n, 1_000_000_000)
    } else if let Some(n) = rate.strip_suffix("mbit") {
        (n, 1_000_000)
    } else if let Some(n) = rate.strip_suffix("kbit") {
        (n, 1_000)
    } else if let Some(n) = rate.strip_suffix("bit") {
        (n, 1)
    } else {
        (rate.as_str(), 1)
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    if n == 0 || host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_string(), n * mult))
}

fn host_addr(subnet: Ipv4Addr, last: u8) -> Ipv4Addr {
    let o = subnet.octets();
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

fn lab_dir(prefix: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(prefix)
}

/// Where labs keep what must be fast: checkpoints and chunk stores (tmpfs).
pub const LAB_SCRATCH: &str = "/dev/shm/xfer-lab";

fn scratch_dir(prefix: &str) -> PathBuf {
    Path::new(LAB_SCRATCH).join(prefix)
}

/// A host's agent work directory (checkpoints, incoming state, chunk store): on tmpfs,
/// so dumps and restores are not slowed by the disk. `host_dir` is
/// `/var/lib/xfer-lab/P/hN`.
fn work_dir(host_dir: &Path, host: &str) -> PathBuf {
    let prefix = host_dir
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    scratch_dir(&prefix).join(host)
}

fn state_file(prefix: &str) -> PathBuf {
    lab_dir(prefix).join("lab.json")
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn net_err(what: impl Into<String>) -> impl FnOnce(xfer_net::NetError) -> LabError {
    let what = what.into();
    move |source| LabError::Net { what, source }
}

impl Lab {
    /// Reads the state of a lab that is up.
    pub fn load(prefix: &str) -> Result<Lab, LabError> {
        validate_prefix(prefix)?;
        let p = state_file(prefix);
        let text = std::fs::read_to_string(&p)
            .map_err(|_| LabError::Load(prefix.to_string(), p.clone()))?;
        serde_json::from_str(&text).map_err(|e| LabError::Io {
            op: "parse lab state",
            path: p,
            source: std::io::Error::other(e),
        })
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Result<&LabHost, LabError> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::FindHost {
                prefix: self.prefix.clone(),
                host: name.to_string(),
                hosts: self
                    .hosts
                    .iter()
                    .map(|h| h.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Whether a pid is alive.
    pub fn alive(pid: u32) -> bool {
        pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
    }

    /// Home address number `k` (1..=14) of host `host` (`hN`): an address of the
    /// host's home network, for a routed container started there.
    pub fn home_address(&self, host: &str, k: u8) -> Result<Ipv4Addr, LabError> {
        let n: u8 = host
            .strip_prefix('h')
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=15).contains(n))
            .ok_or_else(|| LabError::Start {
                what: "home address".into(),
                detail: format!("host {host:?}: home networks exist for h1..h15"),
            })?;
        if !(1..=14).contains(&k) {
            return Err(LabError::Start {
                what: "home address".into(),
                detail: format!("address number {k}: use 1..=14"),
            });
        }
        let base = self.home_base.unwrap_or_else(|| home_base_for(self.subnet));
        let o = home_network(base, n).network().octets();
        Ok(Ipv4Addr::new(o[0], o[1], o[2], o[3] + k))
    }

    /// The `n`-th address for containers with their own address (`.200 + n`), as CIDR.
    pub fn service_address(&self, n: u8) -> String {
        format!("{}/24", host_addr(self.subnet, 200u8.saturating_add(n)))
    }

    /// The operator's TLS files (for the CLI and tests).
    pub fn operator_tls(&self) -> xfer_agent::tls::TlsFiles {
        xfer_agent::tls::TlsFiles::in_dir(&self.tls_dir, "operator")
    }

    /// Runs a program in a lab namespace (`client` or a host name) and waits for it.
    pub fn exec(&self, node: &str, args: &[String]) -> Result<std::process::Output, LabError> {
        let ns = if node == "client" {
            self.client.netns.clone()
        } else {
            self.host(node)?.netns.clone()
        };
        let (prog, rest) = args.split_first().ok_or_else(|| LabError::Start {
            what: "lab exec".into(),
            detail: "no program given".into(),
        })?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        xfer_net::command_in_netns(&mut cmd, &ns).map_err(net_err(format!("enter {ns}")))?;
        cmd.output().map_err(|source| LabError::Io {
            op: "run",
            path: PathBuf::from(prog),
            source,
        })
    }
}

async fn wait_for_port(
    addr: Ipv4Addr,
    port: u16,
    pid: u32,
    log: &Path,
    what: &str,
) -> Result<(), LabError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect((addr, port)).await.is_ok() {
            return Ok(());
        }
        if !Lab::alive(pid) || Instant::now() > deadline {
            return Err(LabError::Start {
                what: what.to_string(),
                detail: format!(
                    "not answering on {addr}:{port}; log {}: {}",
                    log.display(),
                    xfer_runtime::daemon::log_tail(log, 10)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn_daemon(netns: &str, mut cmd: Command, log: &Path, what: &str) -> Result<u32, LabError> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| LabError::Io {
            op: "open log",
            path: log.to_path_buf(),
            source,
        })?;
    let f2 = f.try_clone().map_err(|source| LabError::Io {
        op: "open log",
        path: log.to_path_buf(),
        source,
    })?;
    cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
    // Own process group: a Ctrl-C at the terminal that ran `lab up` does not reach it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.env(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let mut child =
        xfer_net::spawn_in_netns(netns, cmd).map_err(net_err(format!("start {what}")))?;
    let pid = child.id();
    // Reap it when it exits, so a long-lived process that ran `up` (a test, an
    // embedding program) does not keep zombies; a CLI that exits hands it to init.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(pid)
}

/// How a lab starts its agents (kept in the lab state, so an agent can be restarted).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentArgs {
    pub xferd: PathBuf,
    #[serde(default)]
    pub handover: HandoverSpec,
}

/// Starts the agent of host `name` and waits until it serves.
#[allow(clippy::too_many_arguments)]
async fn start_agent(
    agent: &AgentArgs,
    name: &str,
    netns: &str,
    address: Ipv4Addr,
    containerd_socket: &Path,
    containerd_namespace: &str,
    hdir: &Path,
    tls_dir: &Path,
) -> Result<u32, LabError> {
    let logs = hdir.join("logs");
    let xlog = logs.join("xferd.log");
    let mut cmd = Command::new(&agent.xferd);
    cmd.args(["--node", name])
        .arg("--listen")
        .arg(format!("{address}:{AGENT_PORT}"))
        .arg("--containerd")
        .arg(containerd_socket)
        .args(["--namespace", containerd_namespace])
        .arg("--netns")
        .arg(xfer_net::netns_path(netns))
        .arg("--work-dir")
        .arg(work_dir(hdir, name))
        .arg("--log-dir")
        .arg(&logs)
        .arg("--tls-dir")
        .arg(tls_dir)
        .args(["--bridge", HOST_BRIDGE])
        .arg("--mobility-address")
        .arg(address.to_string())
        .arg("--cluster-key")
        .arg(tls_dir.join("cluster.key"))
        .arg("--binding-lifetime")
        .arg(agent.handover.binding_lifetime_secs.to_string())
        .arg("--tunnel-idle")
        .arg(agent.handover.tunnel_idle_secs.to_string());
    let pid = spawn_daemon(netns, cmd, &xlog, &format!("xferd of {name}"))?;
    wait_for_port(address, AGENT_PORT, pid, &xlog, &format!("xferd of {name}")).await?;
    Ok(pid)
}

/// Kills host `host`'s agent (SIGKILL, as a crash) and starts it again with the same
/// arguments; the lab state records the new pid. Its containers keep running.
pub async fn restart_agent(lab: &mut Lab, host: &str) -> Result<u32, LabError> {
    let agent = lab.agent.clone().ok_or_else(|| LabError::Start {
        what: format!("agent of {host}"),
        detail: "this lab's state predates agent restarts; bring it up again".into(),
    })?;
    let h = lab.host(host)?.clone();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(h.xferd_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    // The leader turns zombie while its other threads may still hold the sockets: wait
    // until the old agent's port refuses, or the new one would fail to bind (and a
    // connection to the dying one would look like the new one answering).
    let deadline = Instant::now() + Duration::from_secs(10);
    while (Lab::alive(h.xferd_pid) && !is_zombie(h.xferd_pid))
        || tokio::net::TcpStream::connect((h.address, AGENT_PORT))
            .await
            .is_ok()
    {
        if Instant::now() > deadline {
            return Err(LabError::Start {
                what: format!("agent of {host}"),
                detail: format!(
                    "the killed agent (pid {}) still holds its port",
                    h.xferd_pid
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = start_agent(
        &agent,
        &h.name,
        &h.netns,
        h.address,
        &h.containerd_socket,
        &h.containerd_namespace,
        &h.dir,
        &lab.tls_dir,
    )
    .await?;
    if let Some(x) = lab.hosts.iter_mut().find(|x| x.name == host) {
        x.xferd_pid = pid;
    }
    save_state(lab)?;
    Ok(pid)
}

fn save_state(lab: &Lab) -> Result<(), LabError> {
    let p = &lab.prefix;
    let text = serde_json::to_string_pretty(lab).map_err(|e| LabError::Io {
        op: "encode",
        path: state_file(p),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(state_file(p), text).map_err(|source| LabError::Io {
        op: "write",
        path: state_file(p),
        source,
    })
}

/// Brings a lab up (after clearing any earlier one of the same prefix).
pub async fn up(spec: &LabSpec) -> Result<Lab, LabError> {
    validate_prefix(&spec.prefix)?;
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    if spec.nodes == 0 || spec.nodes > 50 {
        return Err(LabError::Start {
            what: "lab".into(),
            detail: format!("{} nodes asked; use 1 to 50", spec.nodes),
        });
    }
    if !spec.xferd.exists() {
        return Err(LabError::Start {
            what: "lab".into(),
            detail: format!(
                "no xferd binary at {}: build it with `cargo build --bins`",
                spec.xferd.display()
            ),
        });
    }
    let p = &spec.prefix;
    down(p).await?;
    let dir = lab_dir(p);
    std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
        op: "create",
        path: dir.clone(),
        source,
    })?;
    let subnet = subnet_for(p);
    let gateway = host_addr(subnet, 254);
    let bridge = format!("{p}-br");
    let net = Netlink::new().map_err(net_err("open rtnetlink"))?;
    net.create_bridge(Ns::Root, &bridge)
        .await
        .map_err(net_err(bridge.clone()))?;
    net.add_address(Ns::Root, &bridge, cidr(gateway))
        .await
        .map_err(net_err(bridge.clone()))?;
    net.set_link_up(Ns::Root, &bridge)
        .await
        .map_err(net_err(bridge.clone()))?;

    // A host gets a bridge `br0` holding its address, with `eth0` (its link) and
    // later its containers' veths on it, so a container with its own address sits
    // on the lab's link and keeps that address on whichever host it runs.
    let attach = |ns: String, addr: Ipv4Addr, host_bridge: bool| {
        let net = &net;
        let bridge = bridge.clone();
        async move {
            let outer = ns.clone();
            net.create_netns(&ns).await.map_err(net_err(ns.clone()))?;
            net.create_veth(Ns::Root, &outer, "eth0", Ns::Named(&ns))
                .await
                .map_err(net_err(outer.clone()))?;
            net.set_master(Ns::Root, &outer, &bridge)
                .await
                .map_err(net_err(outer.clone()))?;
            net.set_link_up(Ns::Root, &outer)
                .await
                .map_err(net_err(outer.clone()))?;
            net.loopback_up(&ns).await.map_err(net_err(ns.clone()))?;
            net.set_link_up(Ns::Named(&ns), "eth0")
                .await
                .map_err(net_err(ns.clone()))?;
            let addr_dev = if host_bridge {
                net.create_bridge(Ns::Named(&ns), HOST_BRIDGE)
                    .await
                    .map_err(net_err(format!("{ns}/{HOST_BRIDGE}")))?;
                net.set_master(Ns::Named(&ns), "eth0", HOST_BRIDGE)
                    .await
                    .map_err(net_err(format!("{ns}/eth0")))?;
                // Pin the bridge's MAC to eth0's: otherwise it follows the lowest MAC
                // of its ports and changes as container veths come and go, leaving
                // the other hosts with a stale ARP entry for this host.
                let mac = net
                    .link_mac(Ns::Named(&ns), "eth0")
                    .await
                    .map_err(net_err(format!("{ns}/eth0")))?;
                net.set_mac(Ns::Named(&ns), HOST_BRIDGE, mac)
                    .await
                    .map_err(net_err(format!("{ns}/{HOST_BRIDGE}")))?;
                net.set_link_up(Ns::Named(&ns), HOST_BRIDGE)
                    .await
                    .map_err(net_err(format!("{ns}/{HOST_BRIDGE}")))?;
                HOST_BRIDGE
            } else {
                "eth0"
            };
            net.add_address(Ns::Named(&ns), addr_dev, cidr(addr))
                .await
                .map_err(net_err(ns.clone()))?;
            net.add_default_route(Ns::Named(&ns), gateway)
                .await
                .map_err(net_err(ns.clone()))?;
            Ok::<_, LabError>(())
        }
    };

    // The cluster CA and a certificate per host and for the operator.
    let tls_dir = dir.join("tls");
    let node_ids: Vec<(String, std::net::IpAddr)> = (1..=spec.nodes)
        .map(|i| {
            (
                format!("h{i}"),
                std::net::IpAddr::V4(host_addr(subnet, i as u8)),
            )
        })
        .collect();
    xfer_agent::tls::issue(&tls_dir, &node_ids, &["operator".to_string()]).map_err(|e| {
        LabError::Start {
            what: "certificates".into(),
            detail: e.to_string(),
        }
    })?;

    // The cluster key binding updates are signed with.
    let cluster_key = tls_dir.join("cluster.key");
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
        .map_err(|source| LabError::Io {
            op: "read",
            path: "/dev/urandom".into(),
            source,
        })?;
    std::fs::write(&cluster_key, hex::encode(secret)).map_err(|source| LabError::Io {
        op: "write",
        path: cluster_key.clone(),
        source,
    })?;

    let client = LabClient {
        netns: format!("{p}-client"),
        address: host_addr(subnet, 100),
    };
    attach(client.netns.clone(), client.address, false).await?;
    // `--rate client=...`: the client's link, both directions.
    if let Some((_, r)) = spec.rates.iter().find(|(h, _)| h == "client") {
        net.shape(Ns::Root, &client.netns, *r)
            .await
            .map_err(net_err(format!("shape {}", client.netns)))?;
        net.shape(Ns::Named(&client.netns), "eth0", *r)
            .await
            .map_err(net_err(format!("shape {}/eth0", client.netns)))?;
    }

    let mut hosts = Vec::new();
    for i in 1..=spec.nodes {
        let name = format!("h{i}");
        let netns = format!("{p}-{name}");
        let address = host_addr(subnet, i as u8);
        attach(netns.clone(), address, true).await?;
        let rate = spec.rates.iter().find(|(h, _)| *h == name).map(|(_, r)| *r);
        if let Some(r) = rate {
            net.shape(Ns::Root, &netns, r)
                .await
                .map_err(net_err(format!("shape {netns}")))?;
            net.shape(Ns::Named(&netns), "eth0", r)
                .await
                .map_err(net_err(format!("shape {netns}/eth0")))?;
        }
        let hdir = dir.join(&name);
        let logs = hdir.join("logs");
        std::fs::create_dir_all(&logs).map_err(|source| LabError::Io {
            op: "create",
            path: logs.clone(),
            source,
        })?;
        // containerd
        let dcfg = DaemonConfig::in_dir(hdir.join("containerd"));
        let config_text = dcfg.render_config().map_err(|source| LabError::Runtime {
            what: format!("containerd config of {name}"),
            source,
        })?;
        std::fs::create_dir_all(&dcfg.state).map_err(|source| LabError::Io {
            op: "create",
            path: dcfg.state.clone(),
            source,
        })?;
        std::fs::write(dcfg.config_file(), config_text).map_err(|source| LabError::Io {
            op: "write",
            path: dcfg.config_file(),
            source,
        })?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(dcfg.config_file());
        let containerd_pid = spawn_daemon(
            &netns,
            cmd,
            &dcfg.log_file,
            &format!("containerd of {name}"),
        )?;
        wait_containerd(&dcfg.socket, containerd_pid, &dcfg.log_file, &name).await?;
        // xferd
        let containerd_namespace = format!("xfer-{p}-{name}");
        let agent = AgentArgs {
            xferd: spec.xferd.clone(),
            handover: spec.handover,
        };
        let xferd_pid = start_agent(
            &agent,
            &name,
            &netns,
            address,
            &dcfg.socket,
            &containerd_namespace,
            &hdir,
            &tls_dir,
        )
        .await?;
        info!(host = %name, %address, "lab host up");
        hosts.push(LabHost {
            name,
            netns,
            address,
            dir: hdir,
            containerd_socket: dcfg.socket.clone(),
            containerd_namespace,
            containerd_pid,
            xferd_pid,
            endpoint: format!("https://{address}:{AGENT_PORT}"),
            rate_bits: rate,
        });
    }
    // Home networks: every other namespace routes host hN's /28 to hN.
    let home_base = home_base_for(subnet);
    for (i, h) in hosts.iter().enumerate() {
        let home_net = home_network(home_base, (i + 1) as u8);
        let route = xfer_net::RouteSpec {
            destination: home_net,
            via: xfer_net::RouteVia::Gateway {
                gateway: h.address,
                dev: None,
                onlink: false,
            },
            table: xfer_net::TABLE_MAIN,
            metric: None,
            source: None,
        };
        let others = hosts
            .iter()
            .filter(|o| o.name != h.name)
            .map(|o| o.netns.clone())
            .chain([client.netns.clone()]);
        for ns in others {
            net.add_route(Ns::Named(&ns), &route)
                .await
                .map_err(net_err(format!("route {home_net} in {ns}")))?;
        }
    }
    let lab = Lab {
        prefix: p.clone(),
        tls_dir,
        subnet,
        bridge,
        gateway,
        hosts,
        client,
        home_base: Some(home_base),
        agent: Some(AgentArgs {
            xferd: spec.xferd.clone(),
            handover: spec.handover,
        }),
    };
    save_state(&lab)?;
    Ok(lab)
}

fn cidr(a: Ipv4Addr) -> xfer_net::Ipv4Cidr {
    xfer_net::Ipv4Cidr::new(a, 24).unwrap_or_else(|_| unreachable!("24 is a valid prefix length"))
}

async fn wait_containerd(socket: &Path, pid: u32, log: &Path, host: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if socket.exists() && xfer_runtime::daemon::version(socket).await.is_ok() {
            return Ok(());
        }
        if !Lab::alive(pid) || Instant::now() > deadline {
            return Err(LabError::Start {
                what: format!("containerd of {host}"),
                detail: format!(
                    "not answering on {}; log {}: {}",
                    socket.display(),
                    log.display(),
                    xfer_runtime::daemon::log_tail(log, 10)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `down` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DownReport {
    pub killed: Vec<u32>,
    pub namespaces: Vec<String>,
    pub links: Vec<String>,
    pub mounts: usize,
    pub dirs: Vec<PathBuf>,
}

fn kill_all(pids: &[u32]) {
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        for &p in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), sig);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while pids.iter().any(|p| Lab::alive(*p) && !is_zombie(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Removes everything of lab `prefix`, whether it is up, half up or crashed.
pub async fn down(prefix: &str) -> Result<DownReport, LabError> {
    validate_prefix(prefix)?;
    if !is_root() {
        return Err(LabError::NotRoot);
    }
    let mut rep = DownReport::default();
    let ns_prefix = format!("{prefix}-");
    let namespaces: Vec<String> = xfer_net::list_netns()
        .map_err(net_err("list namespaces"))?
        .into_iter()
        .filter(|n| n.starts_with(&ns_prefix))
        .collect();
    // Every process in the lab's namespaces: xferd, containerd, shims, containers.
    let mut pids = Vec::new();
    for ns in &namespaces {
        pids.extend(xfer_net::pids_in_netns(ns).map_err(net_err(format!("processes of {ns}")))?);
    }
    // Daemons recorded in the state file (in case their namespace went first).
    if let Ok(lab) = Lab::load(prefix) {
        for h in &lab.hosts {
            for p in [h.xferd_pid, h.containerd_pid] {
                if Lab::alive(p) && !pids.contains(&p) {
                    pids.push(p);
                }
            }
        }
    }
    // A frozen process takes no signal until thawed (thawed again after the kill, in
    // case a dying CRIU froze it meanwhile).
    let ctr_prefix = format!("xfer-{prefix}-");
    thaw_cgroups(&ctr_prefix);
    kill_all(&pids);
    thaw_cgroups(&ctr_prefix);
    for _ in 0..50 {
        if !pids.iter().any(|p| Lab::alive(*p) && !is_zombie(*p)) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        thaw_cgroups(&ctr_prefix);
    }
    rep.killed = pids;
    // Mounts (container rootfs, shm) and directories.
    let dir = lab_dir(prefix);
    let scratch = scratch_dir(prefix);
    match xfer_runtime::daemon::cleanup_paths(&[&dir, &scratch]) {
        Ok(r) => rep.mounts = r.unmounted.len(),
        Err(e) => warn!(error = %e, "cleaning lab directories"),
    }
    for d in [dir, scratch] {
        if d.exists() {
            let _ = std::fs::remove_dir_all(&d);
        }
        rep.dirs.push(d);
    }
    // runc state and cgroups of the lab's containerd namespaces.
    if let Ok(rd) = std::fs::read_dir("/run/containerd/runc") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&ctr_prefix) {
                let _ = std::fs::remove_dir_all(e.path());
                rep.dirs.push(e.path());
            }
        }
    }
    remove_cgroups(&ctr_prefix);
    // Links and namespaces.
    let net = Netlink::new().map_err(net_err("open rtnetlink"))?;
    for ns in &namespaces {
        net.delete_netns(ns).await.map_err(net_err(ns.clone()))?;
        rep.namespaces.push(ns.clone());
    }
    for link in net
        .list_links(Ns::Root)
        .await
        .map_err(net_err("list links"))?
    {
        if link.starts_with(&ns_prefix) {
            match net.delete_link(Ns::Root, &link).await {
                Ok(()) => rep.links.push(link),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(net_err(link)(e)),
            }
        }
    }
    Ok(rep)
}

/// Removes cgroups named `/<ns>/...` for containerd namespaces starting with `prefix`,
/// in every mounted hierarchy (cgroup v1 controllers and the v2 tree), deepest first.
fn remove_cgroups(prefix: &str) {
    for_lab_cgroups(prefix, rmdir_tree);
}

/// Thaws every frozen cgroup of the lab (a CRIU dump killed half way leaves its
/// container frozen, and a frozen process does not die of SIGKILL until thawed).
fn thaw_cgroups(prefix: &str) {
    fn thaw(p: &Path) {
        // cgroup v1 freezer, cgroup v2.
        let _ = std::fs::write(p.join("freezer.state"), "THAWED");
        let _ = std::fs::write(p.join("cgroup.freeze"), "0");
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    thaw(&e.path());
                }
            }
        }
    }
    for_lab_cgroups(prefix, thaw);
}

/// Runs `f` on every top cgroup of the lab's containerd namespaces (`prefix`...) in
/// every mounted hierarchy.
fn for_lab_cgroups(prefix: &str, each: fn(&Path)) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (_, Some(mp), Some(fs)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if fs != "cgroup" && fs != "cgroup2" {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(mp) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(prefix) {
                each(&e.path());
            }
        }
    }
}

fn rmdir_tree(p: &Path) {
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(p);
}

/// The images the lab knows how to build from this machine's binaries.
pub const IMAGE_KINDS: &[&str] = &["busybox", "redis", "bulky"];

/// Builds a lab image: `busybox` (busybox-static) or `redis` (the host's redis-server
/// and redis-cli with their shared libraries, plus busybox for a shell).
pub fn build_image(kind: &str) -> Result<xfer_runtime::image::BuiltImage, LabError> {
    use xfer_runtime::image::ImageBuilder;
    let what = |source| LabError::Runtime {
        what: format!("build image {kind}"),
        source,
    };
    let mut b = match kind {
        "busybox" => ImageBuilder::busybox("/bin/busybox").map_err(what)?,
        // busybox with a large layer: BULKY_BYTES of incompressible bytes at
        // /opt/bulk/data, the same on every host (a fixed generator), for the
        // cooperative benchmark and the layer tests.
        "bulky" => {
            let mut b = ImageBuilder::busybox("/bin/busybox").map_err(what)?;
            b.add_dir("/opt/bulk", 0o755).map_err(what)?;
            b.add_file("/opt/bulk/data", bulk_bytes(BULKY_BYTES), 0o644)
                .map_err(what)?;
            b
        }
        "redis" => {
            let mut b =
                ImageBuilder::host_binaries(&["/usr/bin/redis-server", "/usr/bin/redis-cli"])
                    .map_err(what)?;
            b.add_busybox("/bin/busybox").map_err(what)?;
            b
        }
        other => {
            return Err(LabError::Start {
                what: "image".into(),
                detail: format!(
                    "unknown image kind {other:?}: use one of {}",
                    IMAGE_KINDS.join(", ")
                ),
            })
        }
    };
    b.created_by("xfer-lab");
    b.build().map_err(what)
}

/// Size of the large file in the `bulky` image's layer.
pub const BULKY_BYTES: usize = 40_000_000;

/// `n` pseudo-random (incompressible) bytes, the same on every call.
pub fn bulk_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Builds image `kind` and imports it, named `kind`, into a host's containerd.
pub async fn import_image(
    host: &LabHost,
    kind: &str,
) -> Result<xfer_runtime::image::ImportedImage, LabError> {
    let built = build_image(kind)?;
    let client = xfer_runtime::daemon::connect(&host.containerd_socket)
        .await
        .map_err(|source| LabError::Runtime {
            what: format!("connect to containerd of {}", host.name),
            source,
        })?;
    xfer_runtime::image::import(
        &client,
        &host.containerd_namespace,
        kind,
        &built,
        "overlayfs",
    )
    .await
    .map_err(|source| LabError::Runtime {
        what: format!("import {kind} into {}", host.name),
        source,
    })
}

/// Deletes image `name` from a host's containerd (blobs and unpacked layers with it).
pub async fn remove_image(host: &LabHost, name: &str) -> Result<bool, LabError> {
    let what = |source| LabError::Runtime {
        what: format!("remove image {name} from {}", host.name),
        source,
    };
    let client = xfer_runtime::daemon::connect(&host.containerd_socket)
        .await
        .map_err(what)?;
    xfer_runtime::image::delete_image(&client, &host.containerd_namespace, name)
        .await
        .map_err(what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("xl").is_ok());
        assert!(validate_prefix("a12345").is_ok());
        assert!(validate_prefix("a123456").is_err());
        assert!(validate_prefix("1a").is_err());
        assert!(validate_prefix("X").is_err());
        assert!(validate_prefix("").is_err());
    }

    #[test]
    fn subnets_differ_by_prefix() {
        assert_ne!(subnet_for("xa"), subnet_for("xb"));
        assert_eq!(subnet_for("xa"), subnet_for("xa"));
        let o = subnet_for("demo").octets();
        assert_eq!(o[0], 10);
        assert!((100..200).contains(&o[1]));
        assert_eq!(o[3], 0);
    }

    #[test]
    fn rates_parse() {
        assert_eq!(
            parse_rate("h2=100mbit").ok(),
            Some(("h2".into(), 100_000_000))
        );
        assert_eq!(
            parse_rate("h1=1gbit").ok(),
            Some(("h1".into(), 1_000_000_000))
        );
        assert_eq!(parse_rate("h1=5000").ok(), Some(("h1".into(), 5000)));
        assert!(parse_rate("h1").is_err());
        assert!(parse_rate("h1=fast").is_err());
        assert!(parse_rate("h1=0mbit").is_err());
    }
}
