//! The home agent's bindings in the knowledge base (docs/knowledge-base.md,
//! "Bindings"; docs/handover.md, "Persistence and recovery").
//!
//! * **Where they go** ([`Place`]): in the central modes (a, b) to the knowledge base
//!   host (over the `Kb` service's `ChangeBinding`/`ReplaceBindings`, or straight into
//!   its store on the knowledge base host itself); in modes (c)-(e), which have no
//!   central store, to each of the home agent's neighbours, which keep them in an
//!   embedded store of their own (`WORK_DIR/kb-bindings.bin`). Bindings are always
//!   pushed, also in central pull: a home agent's state must not wait for a pull.
//! * **Publishing** ([`Publisher`]) is best-effort and never blocks the handover: the
//!   home agent hands every change to an unbounded queue ([`Mobility::publish_to`]);
//!   this task sends it on with a timeout. A place that fails is logged (warn) and
//!   skipped until the next full update of this home agent's bindings (every
//!   `bindings_full_secs`, 5 s after a failure), which replaces what the place holds
//!   for it and so repairs every lost change.
//! * **Recovery** ([`recover`]): a home agent whose cache file was missing or
//!   unreadable asks its places for the bindings where it is the home agent (the
//!   newest sequence number per home address wins) and installs them
//!   ([`Mobility::restore`]), re-creating their tunnels and routes. Until a recovery
//!   succeeded it sends no full update, so an empty cache never erases the only copy.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use xfer_kb::{BindingPut, BindingQuery, BindingRecord, Clock, KbError, KbStore, TunnelKind};
use xfer_proto::v1 as pb;
use xfer_proto::v1::kb_client::KbClient;

use super::wire::{self, BindingOp};
use crate::handover::{Mobility, Published};

/// How long one call to a place may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Default period of the full update of a home agent's bindings.
pub const DEFAULT_FULL_PERIOD: Duration = Duration::from_secs(30);
/// How soon a full update (or a recovery) is tried again after a failure.
pub const RETRY: Duration = Duration::from_secs(5);

/// What a binding change did: a put's verdict, or whether a remove removed.
pub type ChangeOutcome = Result<BindingPut, bool>;

/// Where a home agent's bindings are kept.
#[derive(Debug, Clone)]
pub enum Place {
    /// This host's own store (the knowledge base host).
    Local(Arc<dyn KbStore>),
    /// Another host's `Kb` service.
    Remote {
        host: String,
        client: KbClient<Channel>,
    },
}

fn remote(host: &str, what: impl std::fmt::Display) -> KbError {
    KbError::Reach {
        host: host.to_string(),
        what: what.to_string(),
    }
}

async fn timed<T>(
    host: &str,
    op: &'static str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, KbError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Err(_) => Err(KbError::Timeout {
            op,
            host: host.to_string(),
        }),
        Ok(Err(s)) => Err(remote(host, format!("{}: {}", s.code(), s.message()))),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

impl Place {
    /// A remote place over `channel`.
    pub fn remote(host: impl Into<String>, channel: Channel) -> Self {
        Place::Remote {
            host: host.into(),
            client: super::client::kb_client(channel),
        }
    }

    /// The place's name for logs.
    pub fn name(&self) -> &str {
        match self {
            Place::Local(_) => "local store",
            Place::Remote { host, .. } => host,
        }
    }

    /// Applies one put or remove.
    pub async fn change(
        &self,
        op: &BindingOp,
        now: xfer_kb::Timestamp,
    ) -> Result<ChangeOutcome, KbError> {
        match self {
            Place::Local(store) => apply_local(&**store, op, now).await,
            Place::Remote { host, client } => {
                let r = timed(
                    host,
                    "change binding",
                    client.clone().change_binding(wire::binding_change_to(op)),
                )
                .await?;
                wire::binding_reply_from(&r).map_err(|e| remote(host, e))
            }
        }
    }

    /// Replaces what the place holds for `home_agent` with `bindings`.
    pub async fn replace(
        &self,
        home_agent: &str,
        bindings: &[BindingRecord],
        now: xfer_kb::Timestamp,
    ) -> Result<(), KbError> {
        match self {
            Place::Local(store) => store.replace_bindings(home_agent, bindings, now).await,
            Place::Remote { host, client } => {
                timed(
                    host,
                    "replace bindings",
                    client.clone().replace_bindings(pb::KbReplaceBindings {
                        version: xfer_proto::PROTOCOL_VERSION as i32,
                        home_agent: home_agent.to_string(),
                        bindings: bindings.iter().map(wire::binding_to).collect(),
                    }),
                )
                .await?;
                Ok(())
            }
        }
    }

    /// The live bindings matching `q`.
    pub async fn query(
        &self,
        q: &BindingQuery,
        now: xfer_kb::Timestamp,
    ) -> Result<Vec<BindingRecord>, KbError> {
        match self {
            Place::Local(store) => store.bindings(q, now).await,
            Place::Remote { host, client } => {
                let r = timed(
                    host,
                    "bindings",
                    client.clone().bindings(wire::bindings_query_to(q)),
                )
                .await?;
                wire::bindings_from(&r).map_err(|e| remote(host, e))
            }
        }
    }
}

/// Applies a put or a remove to a store (the `Kb` service and [`Place::Local`]).
pub async fn apply_local(
    store: &dyn KbStore,
    op: &BindingOp,
    now: xfer_kb::Timestamp,
) -> Result<ChangeOutcome, KbError> {
    match op {
        BindingOp::Put(b) => Ok(Ok(store.put_binding(b, now).await?)),
        BindingOp::Remove(b) => Ok(Err(store
            .remove_binding(b.home, &b.home_agent, b.seq)
            .await?)),
    }
}

/// The tunnel kind as the knowledge base names it.
pub fn tunnel_kind(k: xfer_net::TunnelKind) -> TunnelKind {
    match k {
        xfer_net::TunnelKind::Vxlan => TunnelKind::Vxlan,
        xfer_net::TunnelKind::Ipip => TunnelKind::Ipip,
        xfer_net::TunnelKind::Gre => TunnelKind::Gre,
    }
}

/// Who this home agent is, for its records.
#[derive(Debug, Clone)]
pub struct HomeAgent {
    pub name: String,
    pub address: Ipv4Addr,
    pub tunnel: TunnelKind,
}

impl HomeAgent {
    /// The home agent of `mob`, named `name`.
    pub fn of(name: &str, mob: &Mobility) -> Self {
        HomeAgent {
            name: name.to_string(),
            address: mob.address(),
            tunnel: tunnel_kind(mob.tunnel_kind()),
        }
    }

    /// The knowledge base's record of one of this home agent's bindings.
    pub fn record(&self, b: &xfer_mobility::Binding) -> BindingRecord {
        BindingRecord {
            home: b.home_address,
            home_agent: self.name.clone(),
            home_agent_address: self.address,
            care_of: b.care_of,
            tunnel: self.tunnel,
            reverse_tunnel: b.reverse_tunnel,
            seq: b.sequence,
            lifetime_secs: b.lifetime_secs,
            expires_at: b.expires_at,
            updated_at: b.registered_at,
        }
    }

    /// The removal of `home` at sequence `seq` (only home, home agent and seq count).
    fn removal(&self, home: Ipv4Addr, seq: u16, now: xfer_kb::Timestamp) -> BindingRecord {
        BindingRecord {
            home,
            home_agent: self.name.clone(),
            home_agent_address: self.address,
            care_of: self.address,
            tunnel: self.tunnel,
            reverse_tunnel: false,
            seq,
            lifetime_secs: 0,
            expires_at: now,
            updated_at: now,
        }
    }
}

/// The cache's binding of a recovered record.
pub fn binding_of(r: &BindingRecord) -> xfer_mobility::Binding {
    xfer_mobility::Binding {
        home_address: r.home,
        care_of: r.care_of,
        sequence: r.seq,
        lifetime_secs: r.lifetime_secs,
        registered_at: r.updated_at,
        expires_at: r.expires_at,
        reverse_tunnel: r.reverse_tunnel,
    }
}

/// The bindings where `home_agent` is the home agent, from every place that answers
/// (the newest sequence number per home address wins). Fails only if no place
/// answered.
pub async fn recover(
    places: &[Place],
    home_agent: &str,
    now: xfer_kb::Timestamp,
) -> Result<Vec<BindingRecord>, String> {
    let q = BindingQuery::HomeAgent(home_agent.to_string());
    let answers = futures::future::join_all(places.iter().map(|p| p.query(&q, now))).await;
    let mut best: BTreeMap<Ipv4Addr, BindingRecord> = BTreeMap::new();
    let mut errors = Vec::new();
    let mut answered = false;
    for (p, a) in places.iter().zip(answers) {
        match a {
            Ok(list) => {
                answered = true;
                for b in list.into_iter().filter(|b| b.home_agent == home_agent) {
                    let newer = best
                        .get(&b.home)
                        .is_none_or(|o| xfer_mobility::serial::is_newer(b.seq, o.seq));
                    if newer {
                        best.insert(b.home, b);
                    }
                }
            }
            Err(e) => errors.push(format!("{}: {e}", p.name())),
        }
    }
    if !answered {
        return Err(if errors.is_empty() {
            "no place keeps bindings".to_string()
        } else {
            errors.join("; ")
        });
    }
    Ok(best.into_values().collect())
}

/// What the publisher needs of a home agent ([`Mobility`]; a fake in tests).
#[async_trait::async_trait]
pub trait HomeBindings: Send + Sync {
    /// Whether its cache file was lost and the bindings are not recovered yet.
    fn needs_recovery(&self) -> bool;
    /// Its live bindings.
    async fn home_bindings(&self) -> Vec<xfer_mobility::Binding>;
    /// Installs recovered bindings (marks the recovery done); how many were new.
    async fn restore(&self, bindings: Vec<xfer_mobility::Binding>) -> usize;
}

#[async_trait::async_trait]
impl HomeBindings for Mobility {
    fn needs_recovery(&self) -> bool {
        Mobility::needs_recovery(self)
    }
    async fn home_bindings(&self) -> Vec<xfer_mobility::Binding> {
        Mobility::home_bindings(self).await
    }
    async fn restore(&self, bindings: Vec<xfer_mobility::Binding>) -> usize {
        Mobility::restore(self, bindings).await
    }
}

/// Carries a home agent's binding changes to its places (see the module docs).
#[derive(Debug)]
pub struct Publisher {
    pub me: HomeAgent,
    pub places: Vec<Place>,
    pub clock: Arc<dyn Clock>,
    /// Between full updates.
    pub full_period: Duration,
    /// Before a failed full update or recovery is tried again ([`RETRY`]).
    pub retry: Duration,
}

impl Publisher {
    /// Recovers `mob`'s bindings if its cache file was lost, then runs until `mob`'s
    /// queue closes.
    pub async fn run(self, mob: Arc<dyn HomeBindings>, mut rx: mpsc::UnboundedReceiver<Published>) {
        if self.places.is_empty() {
            debug!("no place keeps bindings: not publishing");
            return;
        }
        self.try_recover(&*mob).await;
        // A place that failed is skipped until a full update reaches it again.
        let mut down = vec![false; self.places.len()];
        let mut next_full = Instant::now();
        loop {
            tokio::select! {
                p = rx.recv() => {
                    let Some(p) = p else { return };
                    let now = self.clock.now();
                    let op = match p {
                        Published::Put(b) => BindingOp::Put(self.me.record(&b)),
                        Published::Remove { home, seq } => {
                            BindingOp::Remove(self.me.removal(home, seq, now))
                        }
                    };
                    for (i, place) in self.places.iter().enumerate() {
                        if down[i] {
                            continue;
                        }
                        match place.change(&op, now).await {
                            Ok(r) => debug!(place = place.name(), ?op, outcome = ?r, "binding published"),
                            Err(e) => {
                                warn!(place = place.name(), error = %e, "publishing a binding change failed: repaired by the next full update");
                                down[i] = true;
                                next_full = next_full.min(Instant::now() + self.retry);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_full) => {
                    if mob.needs_recovery() && !self.try_recover(&*mob).await {
                        next_full = Instant::now() + self.retry;
                        continue;
                    }
                    let now = self.clock.now();
                    let list: Vec<BindingRecord> =
                        mob.home_bindings().await.iter().map(|b| self.me.record(b)).collect();
                    for (i, place) in self.places.iter().enumerate() {
                        match place.replace(&self.me.name, &list, now).await {
                            Ok(()) => {
                                if down[i] {
                                    info!(place = place.name(), bindings = list.len(), "bindings repaired by a full update");
                                }
                                down[i] = false;
                            }
                            Err(e) => {
                                warn!(place = place.name(), error = %e, "full update of the bindings failed");
                                down[i] = true;
                            }
                        }
                    }
                    let wait = if down.iter().any(|d| *d) {
                        self.retry
                    } else {
                        self.full_period
                    };
                    next_full = Instant::now() + wait;
                }
            }
        }
    }

    /// Recovers the bindings from the places if `mob` lost its cache file; true when
    /// nothing (more) is to be recovered.
    pub async fn try_recover(&self, mob: &dyn HomeBindings) -> bool {
        if !mob.needs_recovery() {
            return true;
        }
        match recover(&self.places, &self.me.name, self.clock.now()).await {
            Ok(list) => {
                let n = mob.restore(list.iter().map(binding_of).collect()).await;
                info!(
                    found = list.len(),
                    installed = n,
                    "bindings recovered from the knowledge base"
                );
                true
            }
            Err(e) => {
                warn!(error = %e, "recovering the bindings from the knowledge base failed: retrying");
                false
            }
        }
    }
}
