//! The five dissemination modes, each a configuration ([`ModeConfig`]) plus the
//! pieces that run it:
//!
//! | mode | who learns | runs where | pieces |
//! |------|-----------|-----------|--------|
//! | (a) [`ModeKind::CentralPull`] | the knowledge base pulls every host's full inventory every `period` | KB | [`Puller`] into the KB's store, [`StoreDirectory`] |
//! | (b) [`ModeKind::CentralPush`] | hosts push each change, a heartbeat every `heartbeat`, a full inventory every `full_period` and whenever the KB reports a gap | hosts + KB | [`Pusher`] per host, [`Central`] (the sink), [`StoreDirectory`] |
//! | (c) [`ModeKind::OnlineQuery`] | nobody in advance: at migration time the destination asks each neighbour | destination | [`OnlineQuery`] |
//! | (d) [`ModeKind::NeighbourPull`] | the destination pulls its neighbours' inventories every `period` | destination | [`Puller`] into the destination's own store, [`StoreDirectory`] |
//! | (e) [`ModeKind::NeighbourSubscribe`] | the destination subscribes to its neighbours' events, probes their sequence number every `probe_period`, resyncs on a gap and every `full_period` | destination | [`Subscriber`], [`StoreDirectory`] |
//!
//! Every mode answers through the [`Directory`] trait, with the time each host's
//! information was last known complete (`as_of`) and the mode's staleness bound
//! ([`ModeConfig::window`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::time::{interval, timeout, MissedTickBehavior};
use xfer_store::Digest;

use crate::clock::Clock;
use crate::inventory::Inventory;
use crate::model::{
    Applied, Change, FullInventory, HoldersAnswer, HostEvent, HostFacts, HostName, ModeKind,
    SnapshotQuery, SnapshotsAnswer,
};
use crate::store::KbStore;
use crate::transport::{KbSink, Transport};
use crate::KbError;

/// Periodic pulls (modes a and d).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullConfig {
    /// Time between two pulls of every host.
    pub period: Duration,
    /// Longest a pull of one host may take.
    pub timeout: Duration,
    /// Hosts pulled at once.
    pub concurrency: usize,
    /// Consecutive failed pulls after which a host is forgotten.
    pub drop_after: u32,
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            period: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            concurrency: 32,
            drop_after: 2,
        }
    }
}

/// Pushed events (mode b).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushConfig {
    /// Time between heartbeats ("I am at seq N") when nothing changes.
    pub heartbeat: Duration,
    /// Time between unconditional full updates.
    pub full_period: Duration,
    /// Bound on one message's one-way delay (for the staleness bound only).
    pub transit: Duration,
    /// Hosts not heard of for this long are forgotten (embedded store; the etcd
    /// store's lease TTL plays this role there).
    pub host_ttl: Duration,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            heartbeat: Duration::from_secs(10),
            full_period: Duration::from_secs(300),
            transit: Duration::from_millis(50),
            host_ttl: Duration::from_secs(35),
        }
    }
}

/// On-line queries (mode c).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryConfig {
    /// Longest the destination waits for one neighbour's answer.
    pub timeout: Duration,
}

impl Default for QueryConfig {
    fn default() -> Self {
        QueryConfig {
            timeout: Duration::from_secs(1),
        }
    }
}

/// Subscriptions (mode e).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubscribeConfig {
    /// Time between sequence-number probes of each neighbour (finds lost events
    /// when nothing else arrives, and dead neighbours).
    pub probe_period: Duration,
    /// Time between unconditional resyncs.
    pub full_period: Duration,
    /// Longest one call may take.
    pub timeout: Duration,
    /// Bound on one message's one-way delay (for the staleness bound only).
    pub transit: Duration,
    /// Consecutive failed probes after which a neighbour is forgotten.
    pub drop_after: u32,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        SubscribeConfig {
            probe_period: Duration::from_secs(10),
            full_period: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            transit: Duration::from_millis(50),
            drop_after: 2,
        }
    }
}

/// Which mode, with its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ModeConfig {
    CentralPull(PullConfig),
    CentralPush(PushConfig),
    OnlineQuery(QueryConfig),
    NeighbourPull(PullConfig),
    NeighbourSubscribe(SubscribeConfig),
}

impl ModeConfig {
    /// All five modes with their default configurations.
    pub fn all_defaults() -> Vec<ModeConfig> {
        vec![
            ModeConfig::CentralPull(PullConfig::default()),
            ModeConfig::CentralPush(PushConfig::default()),
            ModeConfig::OnlineQuery(QueryConfig::default()),
            ModeConfig::NeighbourPull(PullConfig::default()),
            ModeConfig::NeighbourSubscribe(SubscribeConfig::default()),
        ]
    }

    /// The mode.
    pub fn kind(&self) -> ModeKind {
        match self {
            ModeConfig::CentralPull(_) => ModeKind::CentralPull,
            ModeConfig::CentralPush(_) => ModeKind::CentralPush,
            ModeConfig::OnlineQuery(_) => ModeKind::OnlineQuery,
            ModeConfig::NeighbourPull(_) => ModeKind::NeighbourPull,
            ModeConfig::NeighbourSubscribe(_) => ModeKind::NeighbourSubscribe,
        }
    }

    /// The staleness bound: how long after a change on a host an answer may still
    /// not reflect it, with at most one event lost in a row (docs/knowledge-base.md):
    ///
    /// * pull (a, d): `period + timeout` (the change just missed a pull);
    /// * push (b): `heartbeat + 3 × transit` (a lost event is found by the next
    ///   heartbeat, which the KB answers with "gap", and the full update travels);
    /// * on-line query (c): `timeout` (the answer is as old as the query);
    /// * subscribe (e): `probe_period + timeout + 2 × transit`.
    ///
    /// Without loss, push and subscribe lag by one `transit`. With k events lost in a
    /// row the push bound is `min(k × heartbeat, full_period)`.
    pub fn window(&self) -> Duration {
        match self {
            ModeConfig::CentralPull(p) | ModeConfig::NeighbourPull(p) => p.period + p.timeout,
            ModeConfig::CentralPush(p) => p.heartbeat + 3 * p.transit,
            ModeConfig::OnlineQuery(q) => q.timeout,
            ModeConfig::NeighbourSubscribe(s) => s.probe_period + s.timeout + 2 * s.transit,
        }
    }

    /// How long a host that died may still be named in answers:
    ///
    /// * pull (a, d): `drop_after × period + timeout` (that many pulls must fail);
    /// * push (b): `host_ttl + heartbeat` (the store's TTL, checked every heartbeat);
    /// * on-line query (c): `timeout` (a dead neighbour does not answer);
    /// * subscribe (e): `drop_after × probe_period + timeout`.
    pub fn gone_window(&self) -> Duration {
        match self {
            ModeConfig::CentralPull(p) | ModeConfig::NeighbourPull(p) => {
                p.period * p.drop_after + p.timeout
            }
            ModeConfig::CentralPush(p) => p.host_ttl + p.heartbeat,
            ModeConfig::OnlineQuery(q) => q.timeout,
            ModeConfig::NeighbourSubscribe(s) => s.probe_period * s.drop_after + s.timeout,
        }
    }

    /// Whether the mode is kept by the knowledge base (a, b) rather than by each
    /// destination (c, d, e).
    pub fn is_central(&self) -> bool {
        matches!(
            self,
            ModeConfig::CentralPull(_) | ModeConfig::CentralPush(_)
        )
    }
}

/// What a destination asks, whatever the mode.
#[async_trait]
pub trait Directory: Send + Sync + std::fmt::Debug {
    /// The mode answering.
    fn mode(&self) -> ModeKind;
    /// Which hosts hold each digest.
    async fn holders(&self, digests: &[Digest]) -> Result<HoldersAnswer, KbError>;
    /// Which snapshots match `q`.
    async fn snapshots(&self, q: &SnapshotQuery) -> Result<SnapshotsAnswer, KbError>;
}

/// A [`Directory`] over a store (modes a, b, d, e).
#[derive(Debug, Clone)]
pub struct StoreDirectory {
    pub store: Arc<dyn KbStore>,
    pub clock: Arc<dyn Clock>,
    pub mode: ModeKind,
    pub window: Duration,
}

impl StoreDirectory {
    /// A directory answering from `store` for the mode of `cfg`.
    pub fn new(store: Arc<dyn KbStore>, clock: Arc<dyn Clock>, cfg: &ModeConfig) -> Self {
        StoreDirectory {
            store,
            clock,
            mode: cfg.kind(),
            window: cfg.window(),
        }
    }
}

#[async_trait]
impl Directory for StoreDirectory {
    fn mode(&self) -> ModeKind {
        self.mode
    }

    async fn holders(&self, digests: &[Digest]) -> Result<HoldersAnswer, KbError> {
        let h = self.store.holders(digests).await?;
        Ok(HoldersAnswer {
            mode: self.mode,
            at: self.clock.now(),
            window: self.window,
            hosts: h.hosts,
            holders: h.holders,
        })
    }

    async fn snapshots(&self, q: &SnapshotQuery) -> Result<SnapshotsAnswer, KbError> {
        Ok(SnapshotsAnswer {
            mode: self.mode,
            at: self.clock.now(),
            window: self.window,
            snapshots: self.store.snapshots(q).await?,
        })
    }
}

/// The knowledge base as a push target (mode b): applies events and full updates
/// to its store with its clock's time.
#[derive(Debug, Clone)]
pub struct Central {
    pub store: Arc<dyn KbStore>,
    pub clock: Arc<dyn Clock>,
}

#[async_trait]
impl KbSink for Central {
    async fn push_event(&self, ev: &HostEvent) -> Result<Applied, KbError> {
        let r = self.store.apply(ev, self.clock.now()).await?;
        if r.needs_full() {
            tracing::info!(host = %ev.host, seq = ev.seq, verdict = ?r, "event not applicable: full update needed");
        }
        Ok(r)
    }

    async fn push_full(&self, inv: &FullInventory) -> Result<(), KbError> {
        self.store.replace(inv, self.clock.now()).await
    }
}

/// The knowledge base's expiry of silent hosts (mode b): every `period`, forgets the
/// hosts the store's TTL has run out for.
pub fn spawn_expiry(
    store: Arc<dyn KbStore>,
    clock: Arc<dyn Clock>,
    period: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = store.expire(clock.now()).await {
                tracing::error!(error = %e, "expiring hosts failed");
            }
        }
    })
}

/// Pulls full inventories of a set of hosts into a store (modes a and d).
#[derive(Debug)]
pub struct Puller {
    transport: Arc<dyn Transport>,
    store: Arc<dyn KbStore>,
    clock: Arc<dyn Clock>,
    hosts: Vec<HostName>,
    cfg: PullConfig,
    failures: Mutex<HashMap<HostName, u32>>,
}

/// What one round of pulls did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullReport {
    pub pulled: usize,
    pub failed: usize,
    /// Hosts forgotten after `drop_after` failed pulls.
    pub dropped: Vec<HostName>,
}

impl Puller {
    /// A puller of `hosts`.
    pub fn new(
        transport: Arc<dyn Transport>,
        store: Arc<dyn KbStore>,
        clock: Arc<dyn Clock>,
        hosts: Vec<HostName>,
        cfg: PullConfig,
    ) -> Self {
        Puller {
            transport,
            store,
            clock,
            hosts,
            cfg,
            failures: Mutex::default(),
        }
    }

    /// Pulls every host once.
    pub async fn pull_once(&self) -> Result<PullReport, KbError> {
        let mut report = PullReport::default();
        for chunk in self.hosts.chunks(self.cfg.concurrency.max(1)) {
            let results = join_all(chunk.iter().map(|h| async move {
                match timeout(self.cfg.timeout, self.transport.full(h)).await {
                    Ok(r) => r,
                    Err(_) => Err(KbError::Timeout {
                        op: "pull",
                        host: h.clone(),
                    }),
                }
            }))
            .await;
            for (h, r) in chunk.iter().zip(results) {
                match r {
                    Ok(inv) => {
                        self.store.replace(&inv, self.clock.now()).await?;
                        self.failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(h);
                        report.pulled += 1;
                    }
                    Err(e) => {
                        report.failed += 1;
                        let n = {
                            let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
                            let n = f.entry(h.clone()).or_default();
                            *n += 1;
                            *n
                        };
                        tracing::warn!(host = %h, failures = n, error = %e, "pull failed");
                        if n >= self.cfg.drop_after && self.store.remove_host(h).await? {
                            report.dropped.push(h.clone());
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    /// Pulls every `period` until the task is aborted.
    pub async fn run(self: Arc<Self>) {
        let mut tick = interval(self.cfg.period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.pull_once().await {
                tracing::error!(error = %e, "pull round failed");
            }
        }
    }
}

/// A host's side of central push (mode b): pushes its inventory's events, heartbeats
/// and full updates to the knowledge base.
#[derive(Debug)]
pub struct Pusher {
    inventory: Arc<dyn Inventory>,
    sink: Arc<dyn KbSink>,
    clock: Arc<dyn Clock>,
    cfg: PushConfig,
}

impl Pusher {
    pub fn new(
        inventory: Arc<dyn Inventory>,
        sink: Arc<dyn KbSink>,
        clock: Arc<dyn Clock>,
        cfg: PushConfig,
    ) -> Self {
        Pusher {
            inventory,
            sink,
            clock,
            cfg,
        }
    }

    async fn full(&self, why: &'static str) -> Result<u64, KbError> {
        let inv = self.inventory.full();
        tracing::debug!(host = %inv.host, seq = inv.seq, why, "pushing full inventory");
        self.sink.push_full(&inv).await.map_err(|e| KbError::Push {
            host: inv.host.clone(),
            what: "full inventory",
            source: Box::new(e),
        })?;
        Ok(inv.seq)
    }

    /// Pushes until the task is aborted (or the inventory closes its stream).
    pub async fn run(self: Arc<Self>) {
        let host = self.inventory.host().to_owned();
        // Subscribe before the first full update so no change falls in between.
        let mut rx = self.inventory.subscribe();
        let mut pushed = 0u64;
        let mut need_full = true;
        let mut hb = interval(self.cfg.heartbeat);
        hb.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut full = interval(self.cfg.full_period);
        full.set_missed_tick_behavior(MissedTickBehavior::Delay);
        hb.tick().await;
        full.tick().await;
        loop {
            if need_full {
                match self.full("gap or start").await {
                    Ok(seq) => {
                        pushed = seq;
                        need_full = false;
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "full update failed; retrying at the next heartbeat");
                        hb.tick().await;
                        continue;
                    }
                }
            }
            let ev = tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) if ev.seq <= pushed => continue,
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        need_full = true;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = hb.tick() => HostEvent {
                    host: host.clone(),
                    seq: pushed,
                    at: self.clock.now(),
                    change: Change::Heartbeat,
                },
                _ = full.tick() => {
                    need_full = true;
                    continue;
                }
            };
            let seq = ev.seq;
            let heartbeat = matches!(ev.change, Change::Heartbeat);
            match self.sink.push_event(&ev).await {
                Ok(r) if r.needs_full() => need_full = true,
                Ok(_) => {
                    if !heartbeat {
                        pushed = seq;
                    }
                }
                Err(e) => {
                    tracing::warn!(%host, seq, error = %e, "push failed; full update next");
                    need_full = true;
                }
            }
        }
    }
}

/// Destination-side on-line queries (mode c).
#[derive(Debug)]
pub struct OnlineQuery {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    neighbours: Vec<HostName>,
    cfg: QueryConfig,
}

impl OnlineQuery {
    pub fn new(
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        neighbours: Vec<HostName>,
        cfg: QueryConfig,
    ) -> Self {
        OnlineQuery {
            transport,
            clock,
            neighbours,
            cfg,
        }
    }

    async fn ask<T>(
        &self,
        host: &str,
        op: &'static str,
        f: impl std::future::Future<Output = Result<T, KbError>>,
    ) -> Option<T> {
        match timeout(self.cfg.timeout, f).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::info!(%host, op, error = %e, "neighbour did not answer");
                None
            }
            Err(_) => {
                tracing::info!(%host, op, "neighbour timed out");
                None
            }
        }
    }
}

#[async_trait]
impl Directory for OnlineQuery {
    fn mode(&self) -> ModeKind {
        ModeKind::OnlineQuery
    }

    async fn holders(&self, digests: &[Digest]) -> Result<HoldersAnswer, KbError> {
        let answers = join_all(self.neighbours.iter().map(|n| async move {
            let have = self.ask(n, "have", self.transport.have(n, digests));
            let status = self.ask(n, "status", self.transport.status(n));
            let (have, status) = futures::join!(have, status);
            (n, have, status, self.clock.now())
        }))
        .await;
        let mut out = HoldersAnswer {
            mode: ModeKind::OnlineQuery,
            at: self.clock.now(),
            window: self.cfg.timeout,
            hosts: Vec::new(),
            holders: vec![Vec::new(); digests.len()],
        };
        for (n, have, status, at) in answers {
            let Some(have) = have else { continue };
            if have.len() != digests.len() {
                tracing::warn!(host = %n, "neighbour answered for the wrong number of digests");
                continue;
            }
            let idx = out.hosts.len() as u32;
            out.hosts.push(HostFacts {
                host: n.clone(),
                as_of: at,
                info: status.map(|s| s.info).unwrap_or_default(),
            });
            for (i, held) in have.into_iter().enumerate() {
                if held {
                    out.holders[i].push(idx);
                }
            }
        }
        Ok(out)
    }

    async fn snapshots(&self, q: &SnapshotQuery) -> Result<SnapshotsAnswer, KbError> {
        let answers = join_all(self.neighbours.iter().map(|n| async move {
            let v = self
                .ask(n, "snapshots", self.transport.snapshots(n, q))
                .await;
            (v, self.clock.now())
        }))
        .await;
        let mut snapshots: Vec<_> = answers
            .into_iter()
            .filter_map(|(v, at)| Some(v?.into_iter().map(move |s| (s, at))))
            .flatten()
            .collect();
        snapshots.sort_by(|a, b| b.0.taken.cmp(&a.0.taken).then(a.0.host.cmp(&b.0.host)));
        Ok(SnapshotsAnswer {
            mode: ModeKind::OnlineQuery,
            at: self.clock.now(),
            window: self.cfg.timeout,
            snapshots,
        })
    }
}

/// Destination-side subscriptions to neighbours' events (mode e).
#[derive(Debug)]
pub struct Subscriber {
    transport: Arc<dyn Transport>,
    store: Arc<dyn KbStore>,
    clock: Arc<dyn Clock>,
    cfg: SubscribeConfig,
}

impl Subscriber {
    pub fn new(
        transport: Arc<dyn Transport>,
        store: Arc<dyn KbStore>,
        clock: Arc<dyn Clock>,
        cfg: SubscribeConfig,
    ) -> Self {
        Subscriber {
            transport,
            store,
            clock,
            cfg,
        }
    }

    async fn resync(&self, host: &str) -> Result<(), KbError> {
        let inv = timeout(self.cfg.timeout, self.transport.full(host))
            .await
            .map_err(|_| KbError::Timeout {
                op: "full",
                host: host.to_owned(),
            })??;
        self.store.replace(&inv, self.clock.now()).await
    }

    /// Follows one neighbour until the task is aborted.
    pub async fn follow(self: Arc<Self>, host: HostName) {
        let mut failures = 0u32;
        let mut probe = interval(self.cfg.probe_period);
        probe.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut full = interval(self.cfg.full_period);
        full.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // (Re)subscribe, then resync, so no change falls in between.
            let sub = timeout(self.cfg.timeout, self.transport.subscribe(&host)).await;
            let mut rx = match sub {
                Ok(Ok(rx)) => rx,
                other => {
                    let e = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".into(),
                    };
                    self.failed(&host, &mut failures, &e).await;
                    probe.tick().await;
                    continue;
                }
            };
            if let Err(e) = self.resync(&host).await {
                self.failed(&host, &mut failures, &e.to_string()).await;
                probe.tick().await;
                continue;
            }
            failures = 0;
            probe.reset();
            full.reset();
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => match ev {
                        Some(ev) => ev,
                        None => break,
                    },
                    _ = probe.tick() => {
                        match timeout(self.cfg.timeout, self.transport.status(&host)).await {
                            Ok(Ok(st)) => {
                                failures = 0;
                                HostEvent { host: host.clone(), seq: st.seq, at: self.clock.now(), change: Change::Heartbeat }
                            }
                            other => {
                                let e = match other { Ok(Err(e)) => e.to_string(), _ => "timed out".into() };
                                if self.failed(&host, &mut failures, &e).await { break; }
                                continue;
                            }
                        }
                    },
                    _ = full.tick() => {
                        if let Err(e) = self.resync(&host).await {
                            tracing::warn!(%host, error = %e, "periodic resync failed");
                        }
                        continue;
                    }
                };
                match self.store.apply(&ev, self.clock.now()).await {
                    Ok(r) if r.needs_full() => {
                        tracing::info!(%host, verdict = ?r, "gap in neighbour's events: resync");
                        if let Err(e) = self.resync(&host).await {
                            tracing::warn!(%host, error = %e, "resync failed");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(%host, error = %e, "applying event failed"),
                }
            }
            tracing::info!(%host, "subscription ended; resubscribing");
            probe.tick().await;
        }
    }

    /// Counts a failure; forgets the host after `drop_after` in a row. Returns true
    /// when it was forgotten.
    async fn failed(&self, host: &str, failures: &mut u32, error: &str) -> bool {
        *failures += 1;
        tracing::warn!(%host, failures = *failures, error, "neighbour unreachable");
        if *failures >= self.cfg.drop_after {
            match self.store.remove_host(host).await {
                Ok(true) => {
                    tracing::info!(%host, "neighbour forgotten");
                    return true;
                }
                Ok(false) => {}
                Err(e) => tracing::error!(%host, error = %e, "forgetting neighbour failed"),
            }
        }
        false
    }
}
