//! The agent's side of the cluster knowledge base (`xfer-kb`, issue 6): the `Kb` gRPC
//! service ([`service`], `proto/xfer/v1/kb.proto`), thin gRPC implementations of
//! `xfer_kb`'s `Transport`, `KbSink` and `Directory` ([`client`]), the daemon's
//! configuration ([`KbConfig`], `xferd --kb-config FILE`), and [`Kb`]: what a running
//! agent keeps (its store's inventory, the mode's tasks, the directory a destination
//! asks) and how the destination turns an answer into the fetcher's candidates; and
//! where the home agent's bindings are published and recovered from ([`bindings`]).
//!
//! docs/knowledge-base.md describes the modes; docs/operations.md the configuration.

pub mod bindings;
pub mod client;
pub mod service;
pub mod wire;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use xfer_kb::{
    rank_candidates, CandidatePolicy, Central as CentralSink, Clock, Directory, EmbeddedStore,
    EtcdConfig, EtcdStore, HostInfo, HostScore, Inventory, KbSink, KbStore, Link, ModeConfig,
    ModeKind, Moving, OnlineQuery, Puller, Pusher, Snapshot, SnapshotQuery, StoreDirectory,
    StoreInventory, Subscriber, SystemClock,
};
use xfer_store::Digest;

use crate::chunks::{FetchReport, Fetcher, SourceStats, Want};
use crate::error::AgentError;
use crate::tls::TlsFiles;
use client::{GrpcSink, GrpcTransport, RemoteDirectory};

/// Where the knowledge base keeps its data (central modes on the KB host; modes d
/// and e on every destination, always embedded there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In the agent's memory, persisted to `WORK_DIR/kb.bin` every minute.
    #[default]
    Embedded,
    /// etcd (`etcd` lists the client URLs).
    Etcd,
}

/// The `--kb-config` file: one file for the whole cluster, every agent reads its own
/// role from it.
///
/// ```json
/// {"mode": "central_push", "kb": "h1",
///  "hosts": {"h1": "https://10.0.0.1:7070", "h2": "https://10.0.0.2:7070"}}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KbConfig {
    /// The dissemination mode (`central_pull`, `central_push`, `online_query`,
    /// `neighbour_pull`, `neighbour_subscribe`), with its default tuning.
    pub mode: ModeKind,
    /// The mode's tuning, replacing the defaults (its `mode` must match).
    #[serde(default)]
    pub tuning: Option<ModeConfig>,
    /// The host acting as the knowledge base (central modes).
    #[serde(default)]
    pub kb: Option<String>,
    /// The knowledge base's store (central modes).
    #[serde(default)]
    pub store: StoreKind,
    /// etcd client URLs (store `etcd`).
    #[serde(default)]
    pub etcd: Vec<String>,
    /// Every host's agent endpoint, by name.
    pub hosts: BTreeMap<String, String>,
    /// Each host's neighbours (modes c, d, e); a host not listed has every other host
    /// as a neighbour.
    #[serde(default)]
    pub neighbours: BTreeMap<String, Vec<String>>,
    /// How candidates are scored.
    #[serde(default)]
    pub policy: CandidatePolicy,
    /// Snapshot caching on every host (`xferd --snapshot-*` flags override it).
    #[serde(default)]
    pub snapshots: Option<crate::snapshots::SnapshotConfig>,
    /// The migration source shares the fetch with the neighbours (their rates add up)
    /// instead of serving only what no neighbour holds
    /// ([`crate::chunks::FetchConfig::fallback_shares`]).
    #[serde(default)]
    pub source_shares: bool,
    /// Seconds between full updates of a home agent's bindings to the knowledge base
    /// (default 30; 5 s after a failure).
    #[serde(default)]
    pub bindings_full_secs: Option<u64>,
}

impl KbConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, AgentError> {
        let text = std::fs::read_to_string(path).map_err(|source| AgentError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        let cfg: KbConfig = serde_json::from_str(&text).map_err(|e| {
            AgentError::Refused(format!("knowledge-base config {}: {e}", path.display()))
        })?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks the configuration for contradictions.
    pub fn check(&self) -> Result<(), AgentError> {
        let refuse = |m: String| Err(AgentError::Refused(format!("knowledge-base config: {m}")));
        if let Some(t) = &self.tuning {
            if t.kind() != self.mode {
                return refuse(format!(
                    "tuning is for {:?}, mode is {:?}",
                    t.kind(),
                    self.mode
                ));
            }
        }
        if matches!(self.mode, ModeKind::CentralPull | ModeKind::CentralPush) {
            match &self.kb {
                None => {
                    return refuse(
                        "a central mode needs \"kb\": the host acting as the knowledge base".into(),
                    )
                }
                Some(k) if !self.hosts.contains_key(k) => {
                    return refuse(format!("kb host {k} is not among the hosts"))
                }
                _ => {}
            }
        }
        if self.store == StoreKind::Etcd && self.etcd.is_empty() {
            return refuse("store etcd needs \"etcd\": client URLs".into());
        }
        for (h, ns) in &self.neighbours {
            for n in ns {
                if !self.hosts.contains_key(n) {
                    return refuse(format!("neighbour {n} of {h} is not among the hosts"));
                }
            }
        }
        Ok(())
    }

    /// The mode with its tuning.
    pub fn mode_config(&self) -> ModeConfig {
        self.tuning.clone().unwrap_or_else(|| {
            ModeConfig::all_defaults()
                .into_iter()
                .find(|m| m.kind() == self.mode)
                .unwrap_or(ModeConfig::OnlineQuery(Default::default()))
        })
    }

    /// `host`'s neighbours.
    pub fn neighbours_of(&self, host: &str) -> Vec<String> {
        match self.neighbours.get(host) {
            Some(v) => v.iter().filter(|n| *n != host).cloned().collect(),
            None => self.hosts.keys().filter(|n| *n != host).cloned().collect(),
        }
    }
}

/// The destination's plan for one fetch: per chunk its candidates, and why.
#[derive(Debug, Clone, Default)]
pub struct FetchPlan {
    pub wants: Vec<Want>,
    /// Every candidate host, best first, with its score and reason.
    pub hosts: Vec<HostScore>,
    /// Hosts named by the answer and left out, with why.
    pub excluded: BTreeMap<String, String>,
    /// Why the knowledge base could not help (the fetch then uses the source only).
    pub error: Option<String>,
    /// Time spent asking.
    pub ask_micros: u64,
    pub mode: Option<ModeKind>,
}

/// An agent's knowledge-base machinery.
pub struct Kb {
    name: String,
    mode: ModeKind,
    inventory: Arc<StoreInventory>,
    transport: Arc<GrpcTransport>,
    directory: Arc<dyn Directory>,
    central: Option<service::Central>,
    policy: CandidatePolicy,
    source_shares: bool,
    clock: Arc<dyn Clock>,
    /// This host's own measurements of its links (from its fetchers).
    links: Mutex<BTreeMap<String, Link>>,
    /// The load last published.
    published: Mutex<HostInfo>,
    /// The bindings other home agents publish to this host (the knowledge base host
    /// in modes a and b, every host in modes c-e), served by the `Kb` service.
    binding_store: Option<Arc<dyn KbStore>>,
    /// Where this host's bindings as home agent go (bindings::Place).
    binding_places: Vec<bindings::Place>,
    bindings_full: Duration,
    publisher: Mutex<Option<JoinHandle<()>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Kb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kb")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("central", &self.central.is_some())
            .finish()
    }
}

impl Drop for Kb {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(t) = self
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// Writes an embedded store to its file every minute (the file is a warm start).
fn spawn_persist(store: Arc<EmbeddedStore>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.tick().await;
        loop {
            tick.tick().await;
            let s = store.clone();
            match tokio::task::spawn_blocking(move || s.persist()).await {
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "persisting the knowledge base failed")
                }
                Err(e) => tracing::warn!(error = %e, "persist task failed"),
                Ok(Ok(())) => {}
            }
        }
    })
}

/// How often a store that keeps bindings drops the expired ones.
const BINDING_EXPIRY_PERIOD: Duration = Duration::from_secs(2);

fn kb_err(what: impl Into<String>) -> impl FnOnce(xfer_kb::KbError) -> AgentError {
    let what = what.into();
    move |source| AgentError::Kb { what, source }
}

impl Kb {
    /// Starts host `name`'s part of the mode in `cfg` over its chunk `store`: the
    /// knowledge base's store, puller or push target on the KB host, a pusher on every
    /// host (central push), the on-line querier, neighbour puller or subscriber on
    /// every host (modes c, d, e).
    pub async fn start(
        cfg: &KbConfig,
        name: &str,
        store: Arc<xfer_store::Store>,
        tls: Option<TlsFiles>,
        work_dir: &Path,
    ) -> Result<Kb, AgentError> {
        cfg.check()?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let inventory = Arc::new(StoreInventory::new(name, store, clock.clone()));
        let transport = Arc::new(GrpcTransport::new(cfg.hosts.clone(), tls));
        let mode = cfg.mode_config();
        let mut tasks = Vec::new();
        let mut central = None;
        let mut central_store: Option<Arc<dyn KbStore>> = None;
        let is_kb = cfg.kb.as_deref() == Some(name);
        let t: Arc<dyn xfer_kb::Transport> = Arc::new(client::SelfFirst {
            me: inventory.clone(),
            remote: transport.clone(),
        });
        let directory: Arc<dyn Directory> = match &mode {
            ModeConfig::CentralPull(_) | ModeConfig::CentralPush(_) if !is_kb => {
                let kb = cfg.kb.clone().unwrap_or_default();
                if let ModeConfig::CentralPush(p) = &mode {
                    let ch = transport.channel(&kb).map_err(kb_err("reach the KB"))?;
                    let sink: Arc<dyn KbSink> = Arc::new(GrpcSink::new(kb.clone(), ch));
                    let inv: Arc<dyn Inventory> = inventory.clone();
                    let pusher = Arc::new(Pusher::new(inv, sink, clock.clone(), p.clone()));
                    tasks.push(tokio::spawn(pusher.run()));
                }
                let ch = transport.channel(&kb).map_err(kb_err("reach the KB"))?;
                Arc::new(RemoteDirectory::new(kb, mode.kind(), ch))
            }
            ModeConfig::CentralPull(_) | ModeConfig::CentralPush(_) => {
                let kb_store: Arc<dyn KbStore> = match cfg.store {
                    StoreKind::Embedded => {
                        let ttl = match &mode {
                            ModeConfig::CentralPush(p) => Some(p.host_ttl),
                            _ => None,
                        };
                        let s = Arc::new(
                            EmbeddedStore::open(work_dir.join("kb.bin"), ttl)
                                .map_err(kb_err("open the embedded store"))?,
                        );
                        tasks.push(spawn_persist(s.clone()));
                        s
                    }
                    StoreKind::Etcd => {
                        let mut ec = EtcdConfig::new(cfg.etcd.clone());
                        if let ModeConfig::CentralPush(p) = &mode {
                            ec.lease_ttl = p.host_ttl;
                        }
                        Arc::new(
                            EtcdStore::connect(ec)
                                .await
                                .map_err(kb_err("connect to etcd"))?,
                        )
                    }
                };
                let dir: Arc<dyn Directory> =
                    Arc::new(StoreDirectory::new(kb_store.clone(), clock.clone(), &mode));
                let mut sink = None;
                match &mode {
                    ModeConfig::CentralPull(_) => {
                        let hosts: Vec<String> = cfg.hosts.keys().cloned().collect();
                        let puller = Arc::new(Puller::new(
                            t.clone(),
                            kb_store.clone(),
                            clock.clone(),
                            hosts,
                            p_of(&mode).unwrap_or_default(),
                        ));
                        tasks.push(tokio::spawn(puller.run()));
                    }
                    ModeConfig::CentralPush(p) => {
                        let s: Arc<dyn KbSink> = Arc::new(CentralSink {
                            store: kb_store.clone(),
                            clock: clock.clone(),
                        });
                        let inv: Arc<dyn Inventory> = inventory.clone();
                        let pusher =
                            Arc::new(Pusher::new(inv, s.clone(), clock.clone(), p.clone()));
                        tasks.push(tokio::spawn(pusher.run()));
                        tasks.push(xfer_kb::spawn_expiry(
                            kb_store.clone(),
                            clock.clone(),
                            p.heartbeat,
                        ));
                        sink = Some(s);
                    }
                    _ => {}
                }
                central_store = Some(kb_store.clone());
                central = Some(service::Central {
                    sink,
                    directory: dir.clone(),
                });
                dir
            }
            ModeConfig::OnlineQuery(q) => Arc::new(OnlineQuery::new(
                t.clone(),
                clock.clone(),
                cfg.neighbours_of(name),
                q.clone(),
            )),
            ModeConfig::NeighbourPull(p) => {
                let own: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(None));
                let puller = Arc::new(Puller::new(
                    t.clone(),
                    own.clone(),
                    clock.clone(),
                    cfg.neighbours_of(name),
                    p.clone(),
                ));
                tasks.push(tokio::spawn(puller.run()));
                Arc::new(StoreDirectory::new(own, clock.clone(), &mode))
            }
            ModeConfig::NeighbourSubscribe(s) => {
                let own: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(None));
                let sub = Arc::new(Subscriber::new(
                    t.clone(),
                    own.clone(),
                    clock.clone(),
                    s.clone(),
                ));
                for n in cfg.neighbours_of(name) {
                    tasks.push(tokio::spawn(sub.clone().follow(n)));
                }
                Arc::new(StoreDirectory::new(own, clock.clone(), &mode))
            }
        };
        let (binding_store, binding_places) = match (&mode, central_store) {
            // The knowledge base host: its own store.
            (ModeConfig::CentralPull(_) | ModeConfig::CentralPush(_), Some(s)) => {
                (Some(s.clone()), vec![bindings::Place::Local(s)])
            }
            (ModeConfig::CentralPull(_) | ModeConfig::CentralPush(_), None) => {
                let kb = cfg.kb.clone().unwrap_or_default();
                let ch = transport.channel(&kb).map_err(kb_err("reach the KB"))?;
                (None, vec![bindings::Place::remote(kb, ch)])
            }
            // No central store: every host keeps its neighbours' bindings.
            _ => {
                let s = Arc::new(
                    EmbeddedStore::open(work_dir.join("kb-bindings.bin"), None)
                        .map_err(kb_err("open the bindings store"))?,
                );
                tasks.push(spawn_persist(s.clone()));
                let mut places = Vec::new();
                for n in cfg.neighbours_of(name) {
                    let ch = transport.channel(&n).map_err(kb_err("reach a neighbour"))?;
                    places.push(bindings::Place::remote(n, ch));
                }
                let s: Arc<dyn KbStore> = s;
                (Some(s), places)
            }
        };
        if let Some(s) = &binding_store {
            let (s, clock) = (s.clone(), clock.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(BINDING_EXPIRY_PERIOD);
                loop {
                    tick.tick().await;
                    if let Err(e) = s.expire(clock.now()).await {
                        tracing::warn!(error = %e, "expiring bindings failed");
                    }
                }
            }));
        }
        tracing::info!(host = name, mode = ?mode.kind(), kb = is_kb, "knowledge base started");
        Ok(Kb {
            name: name.to_string(),
            mode: mode.kind(),
            inventory,
            transport,
            directory,
            central,
            policy: cfg.policy.clone(),
            source_shares: cfg.source_shares,
            clock,
            links: Mutex::default(),
            published: Mutex::default(),
            binding_store,
            binding_places,
            bindings_full: cfg
                .bindings_full_secs
                .map_or(bindings::DEFAULT_FULL_PERIOD, |s| {
                    Duration::from_secs(s.max(1))
                }),
            publisher: Mutex::default(),
            tasks,
        })
    }

    /// The mode.
    pub fn mode(&self) -> ModeKind {
        self.mode
    }

    /// This host's inventory (its chunk store), to report changes to.
    pub fn inventory(&self) -> &Arc<StoreInventory> {
        &self.inventory
    }

    /// What a destination asks.
    pub fn directory(&self) -> &Arc<dyn Directory> {
        &self.directory
    }

    /// The `Kb` gRPC service of this agent.
    pub fn service(&self) -> service::KbService {
        let inv: Arc<dyn Inventory> = self.inventory.clone();
        service::KbService::new(inv, self.central.clone())
            .with_bindings(self.binding_store.clone(), self.clock.clone())
    }

    /// Where this host's bindings as home agent are published.
    pub fn binding_places(&self) -> &[bindings::Place] {
        &self.binding_places
    }

    /// Makes this host's bindings as home agent (`mob`) live in the knowledge base:
    /// if `mob` lost its cache file, recovers them first (one attempt now, before
    /// the caller resumes the handover; retried by the publisher if it fails), then
    /// publishes every change and a periodic full update (module [`bindings`]).
    pub async fn serve_bindings(&self, mob: &crate::handover::Mobility) {
        let publisher = bindings::Publisher {
            me: bindings::HomeAgent::of(&self.name, mob),
            places: self.binding_places.clone(),
            clock: self.clock.clone(),
            full_period: self.bindings_full,
            retry: bindings::RETRY,
        };
        if self.binding_places.is_empty() {
            // Nowhere to recover from (modes c-e without neighbours): done.
            mob.restore(Vec::new()).await;
        } else if mob.needs_recovery() {
            publisher.try_recover(mob).await;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        mob.publish_to(tx);
        let task = tokio::spawn(publisher.run(Arc::new(mob.clone()), rx));
        if let Some(old) = self
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    /// The name of the host at `endpoint`, if configured.
    pub fn host_at(&self, endpoint: &str) -> Option<&str> {
        self.transport
            .endpoints()
            .iter()
            .find(|(_, e)| e.as_str() == endpoint)
            .map(|(n, _)| n.as_str())
    }

    /// Adds every configured host but this one and the migration's source (at
    /// `source_endpoint`) to a new fetcher as a named source (connected on first
    /// use: a host the plan never names is never contacted).
    pub fn add_sources<S: crate::chunks::ChunkStore>(
        &self,
        f: &mut Fetcher<S>,
        source_endpoint: &str,
    ) {
        for (host, ep) in self
            .transport
            .endpoints()
            .iter()
            .filter(|(h, e)| **h != self.name && e.as_str() != source_endpoint)
            .take(crate::chunks::fetch::MAX_SOURCES - 1)
        {
            match self.transport.chunk_peer(host) {
                Ok(p) => {
                    f.add_source(host.clone(), p);
                }
                Err(e) => tracing::warn!(%host, endpoint = %ep, error = %e, "not a source"),
            }
        }
    }

    /// The fetch configuration a destination uses with this knowledge base.
    pub fn fetch_config(&self, base: crate::chunks::FetchConfig) -> crate::chunks::FetchConfig {
        crate::chunks::FetchConfig {
            fallback_shares: self.source_shares,
            ..base
        }
    }

    /// Asks the knowledge base who holds `missing` (and which snapshots exist of the
    /// moving container and its service), and ranks the holders into per-chunk
    /// candidates. Never fails: without an answer every chunk comes from the source.
    pub async fn plan(
        &self,
        missing: &[Digest],
        moving: &Moving,
        source_endpoint: &str,
    ) -> FetchPlan {
        let t = Instant::now();
        let mut plan = FetchPlan {
            wants: missing.iter().map(|id| Want::from_fallback(*id)).collect(),
            mode: Some(self.mode),
            ..Default::default()
        };
        let source = self
            .host_at(source_endpoint)
            .unwrap_or("source")
            .to_string();
        let mut queries = Vec::new();
        if let Some(c) = &moving.container {
            queries.push(SnapshotQuery::Container(c.clone()));
        }
        if let Some(s) = &moving.service {
            queries.push(SnapshotQuery::Service(s.clone()));
        }
        queries.extend(moving.volumes.iter().cloned().map(SnapshotQuery::Volume));
        let snaps = futures::future::join_all(queries.iter().map(|q| self.directory.snapshots(q)));
        let (answer, snaps) = futures::join!(self.directory.holders(missing), snaps);
        let snapshots: Vec<Snapshot> = snaps
            .into_iter()
            .filter_map(|r| match r {
                Ok(a) => Some(a.snapshots.into_iter().map(|(s, _)| s)),
                Err(e) => {
                    tracing::info!(error = %e, "snapshot query failed");
                    None
                }
            })
            .flatten()
            .collect();
        for s in &snapshots {
            tracing::info!(host = %s.host, subject = ?s.subject, service = ?s.service, taken = %s.taken, "snapshot known");
        }
        plan.ask_micros = t.elapsed().as_micros() as u64;
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "knowledge base did not answer: fetching from the source only");
                plan.error = Some(e.to_string());
                return plan;
            }
        };
        let links = self.links.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let c = rank_candidates(
            &self.policy,
            &answer,
            missing,
            &self.name,
            &source,
            &links,
            moving,
            &snapshots,
            self.clock.now(),
        );
        let known: std::collections::BTreeSet<&str> = self
            .transport
            .endpoints()
            .keys()
            .map(String::as_str)
            .collect();
        for (w, cands) in plan.wants.iter_mut().zip(c.per_chunk) {
            w.sources = cands
                .into_iter()
                .filter(|h| known.contains(h.as_str()))
                .collect();
        }
        for h in &c.hosts {
            let n = plan
                .wants
                .iter()
                .filter(|w| w.sources.contains(&h.host))
                .count();
            tracing::info!(host = %h.host, chunks = n, score = h.score, why = %h.why, "candidate source");
        }
        for (h, why) in &c.excluded {
            tracing::info!(host = %h, why = %why, "source left out");
        }
        plan.hosts = c.hosts;
        plan.excluded = c.excluded;
        plan
    }

    /// Priors for a fetcher from a plan: each candidate host whose link figure is
    /// measured (by this host or reported by that host) starts at the rate the
    /// ranking computed, until the fetcher measures it ([`Fetcher::set_priors`]).
    pub fn priors(plan: &FetchPlan) -> Vec<(String, SourceStats)> {
        plan.hosts
            .iter()
            .filter(|h| h.measured_link && h.rate_bps > 0.0)
            .map(|h| {
                (
                    h.host.clone(),
                    SourceStats {
                        rate_bps: Some(h.rate_bps),
                        ..Default::default()
                    },
                )
            })
            .collect()
    }

    /// After a fetch: the store now holds `ids` (one `Add` event), and the fetcher's
    /// measurements become this host's links (published with its load).
    pub fn fetched(&self, ids: &[Digest], report: &FetchReport) {
        self.inventory.added(ids);
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for (name, s) in &report.sources {
            if s.fallback {
                continue;
            }
            if let Some(l) = link_of(&s.stats) {
                links.insert(name.clone(), l);
                changed = true;
            }
        }
        let links = links.clone();
        if changed {
            let mut info = self.published.lock().unwrap_or_else(|p| p.into_inner());
            info.links = links;
            self.inventory.set_info(info.clone());
        }
    }

    /// Publishes this host's load (the chunk service's meter) when it changed enough
    /// to matter to a ranking: one fetch stream, or a quarter of the served rate.
    pub fn report_load(&self, streams: u32, served_bps: u64) {
        let mut info = self.published.lock().unwrap_or_else(|p| p.into_inner());
        let load = f64::from(streams);
        let old = info.served_bps as f64;
        let moved = (served_bps as f64 - old).abs() > (old * 0.25).max(1e6);
        if (load - info.load).abs() >= 1.0 || moved {
            info.load = load;
            info.served_bps = served_bps;
            self.inventory.set_info(info.clone());
        }
    }
}

fn p_of(m: &ModeConfig) -> Option<xfer_kb::PullConfig> {
    match m {
        ModeConfig::CentralPull(p) | ModeConfig::NeighbourPull(p) => Some(p.clone()),
        _ => None,
    }
}

fn link_of(s: &SourceStats) -> Option<Link> {
    Some(Link {
        throughput_bps: s.rate_bps.filter(|r| *r > 0.0)?,
        latency_micros: s.latency_micros.unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests;
