//! The Mobile-IP-style handover, wired into the agent (see docs/handover.md).
//!
//! Every node plays two roles for containers in *routed* mode (a home address, /32,
//! routed by the host to the container's veth):
//!
//! * **home agent** for the addresses of containers it started: it keeps the
//!   binding cache ([`xfer_mobility::BindingCache`], persisted as JSON in the work
//!   directory so a restart keeps it), and while a binding is live it routes the home
//!   address into a tunnel to the care-of host (VXLAN, IPIP or GRE: the kernel is
//!   probed and the lightest kind that works is used). A tunnel no flow used for the
//!   idle time is removed (link counters), and so is one whose bindings expired.
//! * **care-of host** for containers restored here from elsewhere: it creates its
//!   end of the tunnel (and, if asked, a reverse tunnel for the container's outbound
//!   traffic), registers the binding with the home agent over UDP (authenticated
//!   updates, retransmitted with backoff, refreshed before they expire:
//!   [`xfer_mobility::BindingUpdateList`]), and forgets it when the container leaves.
//!
//! A restore only reports success once the home agent acknowledged the binding, so a
//! migration whose clients could not follow is rolled back like any other failure.
//! Clients learn bindings from [`Mobility::subscribe`] (the agent's `WatchBindings`
//! stream) and rebind with a direct route (`xfer rebind`, [`crate::rebind`]).
//!
//! With a knowledge base, the home agent also publishes every change of its bindings
//! ([`Mobility::publish_to`], [`Published`]; `crate::kb::bindings` carries them) and,
//! when its cache file is missing or unreadable at start, recovers its bindings from
//! the knowledge base ([`Mobility::restore`]): local file first, knowledge base second.

pub mod plan;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot, Mutex};
use tracing::{debug, info, warn};
use xfer_mobility::{
    AckOutcome, BindingCache, BindingChange, BindingFlags, BindingRequest, BindingUpdateList,
    BulConfig, BulEvent, Clock, HomeAgentConfig, Keyring, Message, SystemClock,
};
use xfer_net::{
    Ipv4Cidr, Ipv4Setting, NetOps, Netlink, Ns, RouteSpec, RouteVia, RuleSpec, TunnelKind,
    TunnelSpec,
};

use crate::error::AgentError;
use plan::{
    reverse_table, tunnel_key, Action, Role, Tunnels, INNER_CARE_OF, INNER_HOME_AGENT,
    REVERSE_RULE_PRIORITY,
};

/// The UDP port binding updates and acks use by default.
pub const DEFAULT_PORT: u16 = 4434;
/// How long a restore waits for the home agent's ack (retransmissions included).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node takes part in the handover.
#[derive(Debug, Clone)]
pub struct MobilityConfig {
    /// This host's address on the network between hosts: its care-of address, and
    /// its address as a home agent.
    pub address: Ipv4Addr,
    /// UDP port for binding updates and acks (the same on every node).
    pub port: u16,
    /// The host's network namespace (tunnels, routes and rules live there).
    pub host_ns: String,
    /// The cluster key(s) updates are signed with.
    pub keys: Keyring,
    /// Lifetime this node asks for as a care-of host (refreshed at 80 %).
    pub lifetime_secs: u32,
    /// Longest lifetime this node grants as a home agent.
    pub max_lifetime_secs: u32,
    /// Remove a home agent's tunnel no packet crossed for this long (`None`: never).
    pub idle: Option<Duration>,
    /// Where the binding cache is kept.
    pub state_path: PathBuf,
    /// Use this tunnel kind instead of probing.
    pub tunnel_kind: Option<TunnelKind>,
    /// MTU of the network between hosts: tunnels get this less their encapsulation.
    pub underlay_mtu: u32,
    /// A knowledge base keeps this home agent's bindings: an unreadable cache file is
    /// moved aside (`.unreadable`) and the bindings recovered from the knowledge base
    /// instead of refusing to start.
    pub kb_recovery: bool,
}

/// A change of a binding this node holds as home agent, for the knowledge base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Created, refreshed or moved.
    Put(xfer_mobility::Binding),
    /// Deregistered, expired, back home or retired; `seq`: the last sequence number.
    Remove { home: Ipv4Addr, seq: u16 },
}

/// What happened to a binding, for watchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    Current,
    Created,
    Moved,
    Refreshed,
    Removed,
    TunnelIdle,
}

/// A binding change as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: NoticeKind,
    pub home: Ipv4Addr,
    /// `None` once removed.
    pub care_of: Option<Ipv4Addr>,
    pub sequence: u16,
    pub lifetime_secs: u32,
    pub reverse_tunnel: bool,
    /// The home agent's tunnel device, if one carries the address.
    pub tunnel: Option<String>,
}

#[derive(Debug)]
struct State {
    cache: BindingCache,
    bul: BindingUpdateList,
    tunnels: Tunnels,
    /// Home addresses of the routed containers running here -> host-side interface.
    local: HashMap<Ipv4Addr, String>,
    /// Restores waiting for the ack of their registration.
    waiters: HashMap<Ipv4Addr, Vec<oneshot::Sender<Result<(), String>>>>,
    /// Home agent tunnels: counters when they last moved.
    activity: HashMap<Ipv4Addr, (xfer_net::LinkStats, Instant)>,
}

#[derive(Debug)]
struct Inner {
    cfg: MobilityConfig,
    kind: TunnelKind,
    clock: SystemClock,
    net: Netlink,
    socket: UdpSocket,
    state: Mutex<State>,
    events: broadcast::Sender<Notice>,
    /// The cache file was missing or unreadable at start, and no recovery from the
    /// knowledge base succeeded yet.
    needs_recovery: AtomicBool,
    publish: std::sync::Mutex<Option<mpsc::UnboundedSender<Published>>>,
}

/// The handover of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Mobility {
    inner: Arc<Inner>,
}

fn net_err(what: impl Into<String>) -> impl FnOnce(xfer_net::NetError) -> AgentError {
    let what = what.into();
    move |source| AgentError::Net {
        what,
        source: Box::new(source),
    }
}

fn notice(kind: NoticeKind, b: &xfer_mobility::Binding, tunnel: Option<String>) -> Notice {
    Notice {
        kind,
        home: b.home_address,
        care_of: Some(b.care_of),
        sequence: b.sequence,
        lifetime_secs: b.lifetime_secs,
        reverse_tunnel: b.reverse_tunnel,
        tunnel,
    }
}

impl Mobility {
    /// Probes the tunnel kinds, clears tunnels and rules a crashed run left, loads the
    /// binding cache and re-creates the tunnels of its live bindings, enables
    /// forwarding, and starts serving binding updates on UDP `port`.
    pub async fn start(cfg: MobilityConfig) -> Result<Mobility, AgentError> {
        let net = Netlink::new().map_err(net_err("open rtnetlink"))?;
        let ns = Ns::Named(&cfg.host_ns);
        let kind = match cfg.tunnel_kind {
            Some(k) => k,
            None => {
                let scratch = format!("{}-probe", cfg.host_ns);
                let _ = net.delete_netns(&scratch).await;
                let kinds = net
                    .probe_tunnel_kinds_in_scratch(&scratch)
                    .await
                    .map_err(net_err("probe the kernel's tunnel kinds"))?;
                TunnelKind::pick(&kinds).ok_or_else(|| {
                    AgentError::Refused(
                        "this kernel can create no tunnel (vxlan, ipip, gre): the handover cannot forward"
                            .into(),
                    )
                })?
            }
        };
        // Leftovers of a crashed run: tunnels and reverse rules (re-created below
        // from the persisted cache, or by the containers as they re-register).
        for link in net.list_links(ns).await.map_err(net_err("list links"))? {
            if link.starts_with("xh") || link.starts_with("xc") {
                let _ = net.delete_link(ns, &link).await;
            }
        }
        for rule in net.list_rules(ns).await.map_err(net_err("list rules"))? {
            if rule.priority == REVERSE_RULE_PRIORITY {
                let spec = RuleSpec {
                    from: rule.from,
                    to: rule.to,
                    iif: rule.iif.clone(),
                    table: rule.table,
                    priority: Some(rule.priority),
                };
                let _ = net.delete_rule(ns, &spec).await;
            }
        }
        let host_ns = cfg.host_ns.clone();
        tokio::task::spawn_blocking(move || {
            xfer_net::set_ipv4(Ns::Named(&host_ns), &Ipv4Setting::Forwarding, 1)
        })
        .await
        .map_err(|e| AgentError::Refused(format!("set forwarding: {e}")))?
        .map_err(net_err("enable IPv4 forwarding"))?;

        let mut ha_cfg = HomeAgentConfig::new(cfg.address);
        ha_cfg.max_lifetime_secs = cfg.max_lifetime_secs;
        let loaded = if cfg.state_path.exists() {
            match BindingCache::load(&cfg.state_path, cfg.keys.clone()) {
                Ok(mut c) => {
                    c.set_config(ha_cfg.clone());
                    Some(c)
                }
                Err(e) if cfg.kb_recovery => {
                    let aside = cfg.state_path.with_extension("json.unreadable");
                    warn!(error = %e, moved_to = %aside.display(), "the binding cache file is unreadable: recovering the bindings from the knowledge base");
                    let _ = std::fs::rename(&cfg.state_path, &aside);
                    None
                }
                Err(e) => {
                    return Err(AgentError::Refused(format!(
                        "load the binding cache {}: {e}; move it away to start with none",
                        cfg.state_path.display()
                    )))
                }
            }
        } else {
            None
        };
        let needs_recovery = loaded.is_none() && cfg.kb_recovery;
        let cache = loaded.unwrap_or_else(|| BindingCache::new(ha_cfg, cfg.keys.clone()));
        let bul_cfg = BulConfig {
            initial_timeout: Duration::from_millis(250),
            max_timeout: Duration::from_secs(8),
            initial_sequence: (std::process::id() as u16)
                .wrapping_mul(40_503)
                .wrapping_add(SystemClock::new().now().as_millis() as u16),
            ..BulConfig::default()
        };
        let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], cfg.port)))
            .await
            .map_err(|e| {
                AgentError::Refused(format!(
                    "bind UDP port {} for binding updates: {e}",
                    cfg.port
                ))
            })?;
        let (events, _) = broadcast::channel(256);
        let state = State {
            bul: BindingUpdateList::new(bul_cfg, cfg.keys.clone()),
            cache,
            tunnels: Tunnels::default(),
            local: HashMap::new(),
            waiters: HashMap::new(),
            activity: HashMap::new(),
        };
        let m = Mobility {
            inner: Arc::new(Inner {
                cfg,
                kind,
                clock: SystemClock::new(),
                net,
                socket,
                state: Mutex::new(state),
                events,
                needs_recovery: AtomicBool::new(needs_recovery),
                publish: std::sync::Mutex::new(None),
            }),
        };
        // Re-create the forwarding of the bindings that survived a restart.
        {
            let mut st = m.inner.state.lock().await;
            let live: Vec<_> = st.cache.iter().cloned().collect();
            m.forward(&mut st, live).await;
        }
        info!(
            address = %m.inner.cfg.address,
            port = m.inner.cfg.port,
            tunnel = %m.inner.kind,
            "handover ready"
        );
        let rx = m.clone();
        tokio::spawn(async move { rx.receive_loop().await });
        let tick = m.clone();
        tokio::spawn(async move { tick.timer_loop().await });
        Ok(m)
    }

    /// Re-creates the tunnels and routes of `bindings` (those live now) as if they
    /// had just been created: after a restart, from the cache file or the knowledge
    /// base.
    async fn forward(&self, st: &mut State, bindings: Vec<xfer_mobility::Binding>) {
        let now = self.inner.clock.now();
        for b in bindings.into_iter().filter(|b| b.is_live(now)) {
            let local = st.local.clone();
            let actions = st.tunnels.on_change(&BindingChange::Created(b), &local);
            if let Err(e) = self.apply(&actions).await {
                warn!(error = %e, "re-creating a persisted binding's tunnel failed");
            }
        }
    }

    /// Whether the binding cache file was missing or unreadable at start and the
    /// bindings have not been recovered from the knowledge base yet.
    pub fn needs_recovery(&self) -> bool {
        self.inner.needs_recovery.load(Ordering::SeqCst)
    }

    /// Installs bindings recovered from the knowledge base (where this node is the
    /// home agent; see [`BindingCache::restore`]), re-creates their tunnels and routes
    /// and saves the cache. Returns how many were installed; marks the recovery done.
    pub async fn restore(&self, bindings: Vec<xfer_mobility::Binding>) -> usize {
        let now = self.inner.clock.now();
        let mut st = self.inner.state.lock().await;
        let mut installed = Vec::new();
        for b in bindings {
            let home = b.home_address;
            if st.cache.restore(b.clone(), now) {
                info!(%home, care_of = %b.care_of, seq = b.sequence, "binding recovered from the knowledge base");
                installed.push(b);
            } else {
                debug!(%home, "recovered binding not installed (expired, or the cache knows a newer one)");
            }
        }
        let n = installed.len();
        for b in &installed {
            self.notify(notice(NoticeKind::Created, b, None));
        }
        self.forward(&mut st, installed).await;
        if let Err(e) = self.persist(&st) {
            warn!(error = %e, "saving the recovered binding cache failed");
        }
        self.inner.needs_recovery.store(false, Ordering::SeqCst);
        n
    }

    /// The bindings this node holds as home agent, live now.
    pub async fn home_bindings(&self) -> Vec<xfer_mobility::Binding> {
        let now = self.inner.clock.now();
        let st = self.inner.state.lock().await;
        st.cache
            .iter()
            .filter(|b| b.is_live(now))
            .cloned()
            .collect()
    }

    /// Sends every later change of this node's bindings as home agent to `tx`
    /// (replacing an earlier receiver). Never blocks: the receiver keeps up or not.
    pub fn publish_to(&self, tx: mpsc::UnboundedSender<Published>) {
        *self.inner.publish.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn publish(&self, p: Published) {
        let guard = self.inner.publish.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.as_ref() {
            if tx.send(p).is_err() {
                debug!("binding publisher gone");
            }
        }
    }

    /// This node's address as home agent and care-of host.
    pub fn address(&self) -> Ipv4Addr {
        self.inner.cfg.address
    }

    /// The tunnel kind in use.
    pub fn tunnel_kind(&self) -> TunnelKind {
        self.inner.kind
    }

    /// This node starts a routed container with home address `home` behind
    /// `host_if`: it becomes the address's home agent.
    pub async fn serve_home(&self, home: Ipv4Addr, host_if: &str) -> Result<(), AgentError> {
        let mut st = self.inner.state.lock().await;
        st.cache.add_home(home);
        st.local.insert(home, host_if.to_string());
        self.persist(&st)
    }

    /// A routed container with home address `home` (home agent `home_agent`) was
    /// restored here behind `host_if`. Back home: the binding is removed and the
    /// local route restored. Elsewhere: this end of the tunnel is made and the
    /// binding registered; returns once the home agent accepted it.
    pub async fn arrived(
        &self,
        home: Ipv4Addr,
        home_agent: Ipv4Addr,
        reverse: bool,
        host_if: &str,
    ) -> Result<(), AgentError> {
        let now = self.inner.clock.now();
        let rx = {
            let mut st = self.inner.state.lock().await;
            st.local.insert(home, host_if.to_string());
            if home_agent == self.inner.cfg.address {
                st.cache.add_home(home);
                if let Some(b) = st.cache.remove(home, now) {
                    let local = st.local.clone();
                    let actions = st.tunnels.removed(home, b.care_of, &local);
                    self.apply(&actions).await?;
                    self.persist(&st)?;
                    self.publish(Published::Remove {
                        home,
                        seq: b.sequence,
                    });
                    self.notify(Notice {
                        kind: NoticeKind::Removed,
                        care_of: None,
                        tunnel: None,
                        ..notice(NoticeKind::Removed, &b, None)
                    });
                    info!(%home, "container back home: binding removed");
                }
                return Ok(());
            }
            let actions = st.tunnels.arrive(home, home_agent, reverse);
            self.apply(&actions).await?;
            let mut flags = BindingFlags::NONE;
            if reverse {
                flags = BindingFlags::REVERSE_TUNNEL;
            }
            let update = st.bul.register(
                now,
                BindingRequest {
                    home_address: home,
                    care_of: self.inner.cfg.address,
                    home_agent,
                    lifetime_secs: self.inner.cfg.lifetime_secs,
                    flags,
                },
            );
            let (tx, rx) = oneshot::channel();
            st.waiters.entry(home).or_default().push(tx);
            self.send_to(home_agent, &update.encode()).await;
            rx
        };
        let outcome = tokio::time::timeout(REGISTER_TIMEOUT, rx).await;
        let err = match outcome {
            Ok(Ok(Ok(()))) => {
                info!(%home, %home_agent, "binding registered with the home agent");
                return Ok(());
            }
            Ok(Ok(Err(why))) => why,
            Ok(Err(_)) => "the registration was abandoned".to_string(),
            Err(_) => format!(
                "no acknowledgement within {} s (is the home agent's UDP port {} reachable?)",
                REGISTER_TIMEOUT.as_secs(),
                self.inner.cfg.port
            ),
        };
        self.departed(home).await;
        Err(AgentError::Refused(format!(
            "home agent {home_agent} did not accept the binding of {home}: {err}"
        )))
    }

    /// The routed container with home address `home` left this host (migrated on,
    /// removed, or its restore failed): this end forgets it without telling the home
    /// agent (the next host registers).
    pub async fn departed(&self, home: Ipv4Addr) {
        let mut st = self.inner.state.lock().await;
        st.local.remove(&home);
        st.bul.forget(home);
        st.waiters.remove(&home);
        let actions = st.tunnels.depart(home);
        if let Err(e) = self.apply(&actions).await {
            warn!(%home, error = %e, "removing the care-of tunnel end failed");
        }
    }

    /// The container with home address `home` is removed for good: a care-of host
    /// deregisters it (lifetime 0), a home agent stops serving it.
    pub async fn retire(&self, home: Ipv4Addr) {
        let now = self.inner.clock.now();
        let (dereg, ha) = {
            let mut st = self.inner.state.lock().await;
            let ha = st.bul.get(home).map(|e| e.request().home_agent);
            let dereg = st.bul.deregister(now, home);
            if st.cache.serves(home) {
                if let Some(b) = st.cache.remove_home(home, now) {
                    let local = HashMap::new();
                    let actions = st.tunnels.removed(home, b.care_of, &local);
                    let _ = self.apply(&actions).await;
                    self.publish(Published::Remove {
                        home,
                        seq: b.sequence,
                    });
                    self.notify(Notice {
                        care_of: None,
                        tunnel: None,
                        ..notice(NoticeKind::Removed, &b, None)
                    });
                }
                let _ = self.persist(&st);
            }
            (dereg, ha)
        };
        if let (Some(u), Some(ha)) = (dereg, ha) {
            self.send_to(ha, &u.encode()).await;
            // Give the ack a moment; retransmissions continue in the background.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.departed(home).await;
    }

    /// The bindings this node holds as home agent now, and a receiver of every change
    /// after (subscribed before the snapshot is taken, so nothing falls between).
    pub async fn subscribe(&self) -> (Vec<Notice>, broadcast::Receiver<Notice>) {
        let rx = self.inner.events.subscribe();
        let st = self.inner.state.lock().await;
        let now = self.inner.clock.now();
        let current = st
            .cache
            .iter()
            .filter(|b| b.is_live(now))
            .map(|b| {
                let tunnel = st
                    .tunnels
                    .ha
                    .get(&b.care_of)
                    .filter(|t| !t.idle_removed)
                    .map(|t| t.name.clone());
                notice(NoticeKind::Current, b, tunnel)
            })
            .collect();
        (current, rx)
    }

    fn notify(&self, n: Notice) {
        debug!(?n, "binding notice");
        let _ = self.inner.events.send(n);
    }

    fn persist(&self, st: &State) -> Result<(), AgentError> {
        st.cache
            .save(&self.inner.cfg.state_path)
            .map_err(|e| AgentError::WriteFile {
                path: self.inner.cfg.state_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })
    }

    async fn send_to(&self, peer: Ipv4Addr, bytes: &[u8]) {
        let to = SocketAddr::from((peer, self.inner.cfg.port));
        if let Err(e) = self.inner.socket.send_to(bytes, to).await {
            warn!(%to, error = %e, "sending a binding message failed");
        }
    }

    async fn receive_loop(&self) {
        let mut buf = [0u8; 512];
        loop {
            let (n, from) = match self.inner.socket.recv_from(&mut buf).await {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "binding socket");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.handle(&buf[..n], from).await;
        }
    }

    async fn handle(&self, bytes: &[u8], from: SocketAddr) {
        let now = self.inner.clock.now();
        match xfer_mobility::decode(bytes) {
            Ok(Message::Ack(ack)) => {
                let mut st = self.inner.state.lock().await;
                match st.bul.handle_ack(now, &ack) {
                    AckOutcome::Bound { home_address, .. }
                    | AckOutcome::Deregistered { home_address } => {
                        for w in st.waiters.remove(&home_address).unwrap_or_default() {
                            let _ = w.send(Ok(()));
                        }
                    }
                    AckOutcome::Retry(u) => {
                        let ha = u.home_agent;
                        drop(st);
                        self.send_to(ha, &u.encode()).await;
                    }
                    AckOutcome::Rejected {
                        home_address,
                        status,
                    } => {
                        warn!(home = %home_address, %status, "the home agent refused a binding");
                        for w in st.waiters.remove(&home_address).unwrap_or_default() {
                            let _ = w.send(Err(status.to_string()));
                        }
                    }
                    AckOutcome::Ignored(why) => debug!(?why, %from, "ignored an ack"),
                }
            }
            _ => {
                // An update (or garbage): the home agent decides, and always answers
                // with a signed status so the sender learns why.
                let mut st = self.inner.state.lock().await;
                if self.needs_recovery() {
                    if let Ok(Message::Update(u)) = xfer_mobility::decode(bytes) {
                        if !st.cache.serves(u.home_address) {
                            // Refusing it (unknown home) would make the care-of host
                            // give up; silent, it retransmits (about 30 s) while the
                            // bindings are recovered from the knowledge base.
                            debug!(home = %u.home_address, %from, "binding update held back until the bindings are recovered");
                            return;
                        }
                    }
                }
                let decision = st.cache.process(now, bytes);
                if let Some(change) = &decision.change {
                    let local = st.local.clone();
                    let actions = st.tunnels.on_change(change, &local);
                    if let Err(e) = self.apply(&actions).await {
                        warn!(error = %e, ?change, "forwarding for a binding change failed");
                    }
                    if let Err(e) = self.persist(&st) {
                        warn!(error = %e, "saving the binding cache failed");
                    }
                    self.publish(match change {
                        BindingChange::Created(b)
                        | BindingChange::Refreshed(b)
                        | BindingChange::Moved { binding: b, .. } => Published::Put(b.clone()),
                        BindingChange::Removed { home_address, .. } => Published::Remove {
                            home: *home_address,
                            seq: decision.ack.sequence,
                        },
                    });
                    let tunnel = |c: Ipv4Addr| st.tunnels.ha.get(&c).map(|t| t.name.clone());
                    let n = match change {
                        BindingChange::Created(b) => {
                            notice(NoticeKind::Created, b, tunnel(b.care_of))
                        }
                        BindingChange::Moved { binding, .. } => {
                            notice(NoticeKind::Moved, binding, tunnel(binding.care_of))
                        }
                        BindingChange::Refreshed(b) => {
                            notice(NoticeKind::Refreshed, b, tunnel(b.care_of))
                        }
                        BindingChange::Removed { home_address, .. } => Notice {
                            kind: NoticeKind::Removed,
                            home: *home_address,
                            care_of: None,
                            sequence: decision.ack.sequence,
                            lifetime_secs: 0,
                            reverse_tunnel: false,
                            tunnel: None,
                        },
                    };
                    info!(home = %n.home, kind = ?n.kind, care_of = ?n.care_of, "binding changed");
                    self.notify(n);
                } else {
                    debug!(status = %decision.ack.status, %from, "binding update without change");
                }
                drop(st);
                if let Err(e) = self.inner.socket.send_to(&decision.ack_bytes(), from).await {
                    warn!(%from, error = %e, "sending a binding ack failed");
                }
            }
        }
    }

    async fn timer_loop(&self) {
        let mut last_idle_check = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.inner.clock.now();
            let mut sends = Vec::new();
            {
                let mut st = self.inner.state.lock().await;
                for ev in st.bul.poll(now) {
                    match ev {
                        BulEvent::Send(u) => sends.push(u),
                        BulEvent::GaveUp {
                            home_address,
                            transmissions,
                        } => {
                            warn!(home = %home_address, transmissions, "the home agent never answered");
                            for w in st.waiters.remove(&home_address).unwrap_or_default() {
                                let _ = w.send(Err(format!(
                                    "no answer after {transmissions} transmissions"
                                )));
                            }
                        }
                        BulEvent::Lapsed { home_address } => {
                            warn!(home = %home_address, "a binding lapsed before its refresh was acknowledged");
                        }
                    }
                }
                let expired = st.cache.expire(now);
                for home in expired {
                    if let Some(care_of) = st.tunnels.care_of_of(home) {
                        let local = st.local.clone();
                        let actions = st.tunnels.removed(home, care_of, &local);
                        if let Err(e) = self.apply(&actions).await {
                            warn!(%home, error = %e, "removing an expired binding's tunnel");
                        }
                    }
                    info!(%home, "binding expired");
                    let seq = st.cache.last_sequence(home).unwrap_or(0);
                    self.publish(Published::Remove { home, seq });
                    self.notify(Notice {
                        kind: NoticeKind::Removed,
                        home,
                        care_of: None,
                        sequence: seq,
                        lifetime_secs: 0,
                        reverse_tunnel: false,
                        tunnel: None,
                    });
                    let _ = self.persist(&st);
                }
                if last_idle_check.elapsed() >= Duration::from_secs(1) {
                    last_idle_check = Instant::now();
                    self.check_idle(&mut st).await;
                }
            }
            for u in sends {
                self.send_to(u.home_agent, &u.encode()).await;
            }
        }
    }

    /// Removes home agent tunnels whose counters did not move for the idle time.
    async fn check_idle(&self, st: &mut State) {
        let Some(idle) = self.inner.cfg.idle else {
            return;
        };
        let ns = Ns::Named(&self.inner.cfg.host_ns);
        let live: Vec<(Ipv4Addr, String)> = st
            .tunnels
            .ha
            .iter()
            .filter(|(_, t)| !t.idle_removed)
            .map(|(c, t)| (*c, t.name.clone()))
            .collect();
        st.activity.retain(|c, _| live.iter().any(|(l, _)| l == c));
        for (care_of, name) in live {
            let Ok(stats) = self.inner.net.link_stats(ns, &name).await else {
                continue;
            };
            let now = Instant::now();
            let entry = st.activity.entry(care_of).or_insert((stats, now));
            if stats.moved_since(&entry.0) {
                *entry = (stats, now);
            } else if now.duration_since(entry.1) >= idle {
                let homes: Vec<Ipv4Addr> = st.tunnels.ha[&care_of].homes.iter().copied().collect();
                let actions = st.tunnels.idle(care_of);
                if let Err(e) = self.apply(&actions).await {
                    warn!(tunnel = %name, error = %e, "removing an idle tunnel");
                }
                st.activity.remove(&care_of);
                info!(tunnel = %name, %care_of, idle_secs = idle.as_secs(), "idle tunnel removed");
                for home in homes {
                    self.notify(Notice {
                        kind: NoticeKind::TunnelIdle,
                        home,
                        care_of: Some(care_of),
                        sequence: st.cache.last_sequence(home).unwrap_or(0),
                        lifetime_secs: 0,
                        reverse_tunnel: false,
                        tunnel: Some(name.clone()),
                    });
                }
            }
        }
    }

    fn home_route(&self, home: Ipv4Addr, tunnel: &str) -> RouteSpec {
        RouteSpec::host(home, self.via(INNER_CARE_OF, tunnel))
    }

    /// How to reach the far end's inner address through `tunnel`: L2 tunnels resolve
    /// it by ARP, L3 tunnels need only the device.
    fn via(&self, inner: Ipv4Addr, tunnel: &str) -> RouteVia {
        match self.inner.kind {
            TunnelKind::Vxlan => RouteVia::Gateway {
                gateway: inner,
                dev: Some(tunnel.to_string()),
                onlink: true,
            },
            _ => RouteVia::Device(tunnel.to_string()),
        }
    }

    /// Applies `actions` in order; runs them all and returns the first error.
    async fn apply(&self, actions: &[Action]) -> Result<(), AgentError> {
        let mut first = None;
        for a in actions {
            if let Err(e) = self.apply_one(a).await {
                warn!(action = ?a, error = %e, "network change failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn apply_one(&self, a: &Action) -> Result<(), AgentError> {
        let net = &self.inner.net;
        let host_ns = self.inner.cfg.host_ns.clone();
        let ns = Ns::Named(&host_ns);
        let me = self.inner.cfg.address;
        let ignore_missing = |r: Result<(), xfer_net::NetError>| match r {
            Err(e) if e.is_not_found() => Ok(()),
            other => other,
        };
        match a {
            Action::CreateTunnel { role, peer, name } => {
                let _ = net.delete_link(ns, name).await;
                let key = match role {
                    Role::HomeAgent => tunnel_key(me, *peer),
                    Role::CareOf => tunnel_key(*peer, me),
                };
                let spec = TunnelSpec::point_to_point(self.inner.kind, name, me, *peer, key, None);
                net.create_tunnel(ns, &spec)
                    .await
                    .map_err(net_err(format!("create tunnel {name} to {peer}")))?;
                let inner = Ipv4Cidr::new(role.inner(), 32).expect("/32 is valid");
                net.add_address(ns, name, inner)
                    .await
                    .map_err(net_err(format!("address {name}")))?;
                let dev = name.clone();
                let hn = host_ns.clone();
                tokio::task::spawn_blocking(move || {
                    xfer_net::set_ipv4(Ns::Named(&hn), &Ipv4Setting::RpFilter(dev), 2)
                })
                .await
                .map_err(|e| AgentError::Refused(format!("rp_filter: {e}")))?
                .map_err(net_err(format!("loose reverse-path filter on {name}")))?;
                if self.inner.kind == TunnelKind::Vxlan {
                    // A re-created end (after an agent restart) keeps its MAC, so the
                    // far end's neighbour entry stays right (else traffic stalls
                    // until that entry ages out, minutes with TCP's backoff).
                    net.set_mac(ns, name, plan::tunnel_mac(*role, me, *peer))
                        .await
                        .map_err(net_err(format!("MAC of {name}")))?;
                }
                let mtu = self.inner.cfg.underlay_mtu - self.inner.kind.overhead();
                net.set_mtu(ns, name, mtu)
                    .await
                    .map_err(net_err(format!("MTU of {name}")))?;
                net.set_link_up(ns, name)
                    .await
                    .map_err(net_err(format!("set {name} up")))?;
                info!(tunnel = %name, kind = %self.inner.kind, %peer, ?role, "tunnel created");
            }
            Action::DeleteTunnel { name } => {
                ignore_missing(net.delete_link(ns, name).await)
                    .map_err(net_err(format!("delete tunnel {name}")))?;
                info!(tunnel = %name, "tunnel removed");
            }
            Action::RouteHome { home, tunnel } => {
                net.replace_route(ns, &self.home_route(*home, tunnel))
                    .await
                    .map_err(net_err(format!("route {home} into {tunnel}")))?;
            }
            Action::UnrouteHome { home, tunnel } => {
                ignore_missing(net.delete_route(ns, &self.home_route(*home, tunnel)).await)
                    .map_err(net_err(format!("unroute {home} from {tunnel}")))?;
            }
            Action::RouteLocal { home, host_if } => {
                net.replace_route(
                    ns,
                    &RouteSpec::host(*home, RouteVia::Device(host_if.clone())),
                )
                .await
                .map_err(net_err(format!("route {home} to {host_if}")))?;
            }
            Action::AddReverse { home, tunnel } => {
                let table = reverse_table(*home);
                let default = RouteSpec {
                    destination: Ipv4Cidr::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"),
                    via: self.via(INNER_HOME_AGENT, tunnel),
                    table,
                    metric: None,
                    source: None,
                };
                net.replace_route(ns, &default)
                    .await
                    .map_err(net_err(format!("reverse tunnel route for {home}")))?;
                net.add_rule(ns, &reverse_rule(*home))
                    .await
                    .map_err(net_err(format!("reverse tunnel rule for {home}")))?;
            }
            Action::DeleteReverse { home } => {
                ignore_missing(net.delete_rule(ns, &reverse_rule(*home)).await)
                    .map_err(net_err(format!("delete the reverse rule of {home}")))?;
            }
        }
        Ok(())
    }
}

fn reverse_rule(home: Ipv4Addr) -> RuleSpec {
    RuleSpec {
        from: Some(Ipv4Cidr::new(home, 32).expect("/32 is valid")),
        to: None,
        iif: None,
        table: reverse_table(home),
        priority: Some(REVERSE_RULE_PRIORITY),
    }
}

/// Reads a cluster key file: hex, at least 32 bytes of secret; key id 1.
pub fn load_key(path: &std::path::Path) -> Result<Keyring, AgentError> {
    let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    let key = xfer_mobility::ClusterKey::from_hex(1, text.trim()).map_err(|e| {
        AgentError::Refused(format!(
            "{} is not a cluster key ({e}); write 64 hex digits, e.g. `openssl rand -hex 32`",
            path.display()
        ))
    })?;
    Ok(Keyring::new(key))
}
