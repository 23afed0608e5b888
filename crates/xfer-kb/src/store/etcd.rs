//! The etcd store: the same model in an etcd cluster (v3 API, etcd >= 3.4).
//!
//! # Key layout (`P` = the configured prefix, default `/xfer/kb`)
//!
//! ```text
//! P/host/<host>              JSON {record: HostRecord, lease}   lease of <host>
//! P/seq/<host>               last applied sequence number      lease of <host>
//! P/hold/<digest hex>/<host> ""  (host holds digest)           lease of <host>
//! P/snap/<host>/<id hex>     JSON Snapshot                     lease of <host>
//! P/bind/<home address>      JSON {record: BindingRecord, lease} its own lease
//! ```
//!
//! * **Digest first** for holdings: "who holds D" is one prefix range
//!   (`P/hold/<D>/`), and a batch of digests is a few transactions of
//!   `max_txn_ops` ranges each, sent concurrently.
//! * **One lease per host** carries every key of the host: a host that stops being
//!   refreshed (heartbeats, full updates) disappears with all its keys when the lease
//!   runs out, without anyone scanning for it.
//! * **A full update swaps leases**: grant a new lease, put every key of the new
//!   inventory under it (keys that were already there move to the new lease), write
//!   the record, then revoke the old lease, which deletes exactly the keys the new
//!   inventory no longer has. Readers never see the host empty in between.
//! * **Events are sequence-checked in etcd**: the last transaction of an event
//!   compares `P/seq/<host>` with the sequence number read before, so two writers
//!   cannot both apply the same host's next event; the earlier transactions of a large
//!   event are idempotent puts and deletes.
//! * **Bindings**: one key per home address, each under a lease of the binding's
//!   remaining lifetime (granted at every put), so an expired binding vanishes by
//!   itself. A put reads the key, checks the sequence rule ([`super::binding_verdict`])
//!   and writes in a transaction that compares the key's `mod_revision` with the one
//!   read (absent: `version == 0`); when another writer got there first it reads
//!   again, so a put with an older sequence number never wins.
//! * Host names must not contain `/`.
//!
//! Where it stops: see docs/knowledge-base.md (every holding is one etcd key with its
//! revision history and an in-memory index entry in every etcd member).

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use xfer_mobility::clock::Timestamp;
use xfer_store::Digest;

use super::{binding_verdict, check_seq, removes, Holdings, KbStore};
use crate::model::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, FullInventory, HostEvent, HostFacts,
    HostName, HostRecord, Snapshot, SnapshotQuery,
};
use crate::KbError;

/// How to reach etcd and lay the keys out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdConfig {
    /// Client URLs, `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix (no trailing `/`).
    pub prefix: String,
    /// TTL of a host's lease: its keys vanish this long after its last heartbeat or
    /// full update. Should be a few heartbeat (or pull) periods.
    pub lease_ttl: Duration,
    /// Operations per transaction (etcd's `--max-txn-ops`, 128 by default).
    pub max_txn_ops: usize,
    /// Transactions in flight at once for one batch.
    pub concurrency: usize,
}

impl EtcdConfig {
    /// Defaults for `endpoints`: prefix `/xfer/kb`, lease 90 s, 128 ops, 8 in flight.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: "/xfer/kb".into(),
            lease_ttl: Duration::from_secs(90),
            max_txn_ops: 128,
            concurrency: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    record: HostRecord,
    lease: i64,
}

/// Knowledge base storage in etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    cfg: EtcdConfig,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("cfg", &self.cfg).finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBinding {
    record: BindingRecord,
    lease: i64,
}

/// How often a binding write is retried when another writer changed the key
/// between our read and our transaction.
const BINDING_RETRIES: usize = 8;

fn etcd(op: &'static str) -> impl Fn(etcd_client::Error) -> KbError {
    move |source| KbError::Etcd { op, source }
}

fn leased(lease: i64) -> Option<PutOptions> {
    Some(PutOptions::new().with_lease(lease))
}

fn codec(what: &'static str) -> impl Fn(serde_json::Error) -> KbError {
    move |source| KbError::Codec { what, source }
}

impl EtcdStore {
    /// A new lease of `ttl` seconds; its id.
    async fn grant(&self, ttl: i64) -> Result<i64, KbError> {
        Ok(self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(etcd("lease grant"))?
            .id())
    }

    /// Connects to etcd.
    pub async fn connect(cfg: EtcdConfig) -> Result<Self, KbError> {
        let client = Client::connect(&cfg.endpoints, None)
            .await
            .map_err(|source| KbError::EtcdConnect {
                endpoints: cfg.endpoints.clone(),
                source,
            })?;
        Ok(EtcdStore { client, cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &EtcdConfig {
        &self.cfg
    }

    fn k_host(&self, host: &str) -> String {
        format!("{}/host/{host}", self.cfg.prefix)
    }
    fn k_seq(&self, host: &str) -> String {
        format!("{}/seq/{host}", self.cfg.prefix)
    }
    fn k_hold_prefix(&self, d: &Digest) -> String {
        format!("{}/hold/{}/", self.cfg.prefix, d.to_hex())
    }
    fn k_hold(&self, d: &Digest, host: &str) -> String {
        format!("{}/hold/{}/{host}", self.cfg.prefix, d.to_hex())
    }
    fn k_snap(&self, host: &str, id: &Digest) -> String {
        format!("{}/snap/{host}/{}", self.cfg.prefix, id.to_hex())
    }

    fn k_bind_prefix(&self) -> String {
        format!("{}/bind/", self.cfg.prefix)
    }
    fn k_bind(&self, home: Ipv4Addr) -> String {
        format!("{}/bind/{home}", self.cfg.prefix)
    }

    /// The JSON value at `key` and the key's `mod_revision`, if present.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
        op: &'static str,
        what: &'static str,
    ) -> Result<Option<(T, i64)>, KbError> {
        let resp = self.client.clone().get(key, None).await.map_err(etcd(op))?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some((
                serde_json::from_slice(kv.value()).map_err(codec(what))?,
                kv.mod_revision(),
            ))),
            None => Ok(None),
        }
    }

    /// The binding of `home` and the key's `mod_revision` (0: absent).
    async fn stored_binding(
        &self,
        home: Ipv4Addr,
    ) -> Result<(Option<StoredBinding>, i64), KbError> {
        Ok(
            match self
                .get_json(self.k_bind(home), "get binding", "binding")
                .await?
            {
                Some((b, rev)) => (Some(b), rev),
                None => (None, 0),
            },
        )
    }

    /// Every stored binding with its key's `mod_revision`.
    async fn all_bindings(&self) -> Result<Vec<(StoredBinding, i64)>, KbError> {
        let resp = self
            .client
            .clone()
            .get(self.k_bind_prefix(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("get bindings"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let b: StoredBinding =
                    serde_json::from_slice(kv.value()).map_err(codec("binding"))?;
                Ok((b, kv.mod_revision()))
            })
            .collect()
    }

    /// The key of `home` is still at revision `rev` (0: absent).
    fn unchanged(&self, home: Ipv4Addr, rev: i64) -> Compare {
        if rev == 0 {
            Compare::version(self.k_bind(home), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(self.k_bind(home), CompareOp::Equal, rev)
        }
    }

    async fn revoke_quietly(&self, lease: i64) {
        // A lease that already ran out took its key with it: nothing to do.
        if let Err(e) = self.client.clone().lease_revoke(lease).await {
            tracing::debug!(lease, error = %e, "binding lease already gone");
        }
    }

    /// Puts `b` under a new lease of its remaining lifetime if the sequence rule
    /// allows it, compare-and-swap on the key's revision (retried on a conflict).
    async fn put_binding_checked(
        &self,
        b: &BindingRecord,
        now: Timestamp,
        own: bool,
    ) -> Result<BindingPut, KbError> {
        for _ in 0..BINDING_RETRIES {
            let (old, rev) = self.stored_binding(b.home).await?;
            let verdict = binding_verdict(old.as_ref().map(|o| &o.record), b, now, own);
            if verdict != BindingPut::Stored {
                return Ok(verdict);
            }
            let ttl = i64::try_from(b.remaining_secs(now).max(1)).unwrap_or(i64::MAX);
            let lease = self.grant(ttl).await?;
            let json = serde_json::to_vec(&StoredBinding {
                record: b.clone(),
                lease,
            })
            .map_err(codec("binding"))?;
            let resp = self
                .client
                .clone()
                .txn(
                    Txn::new()
                        .when(vec![self.unchanged(b.home, rev)])
                        .and_then(vec![TxnOp::put(self.k_bind(b.home), json, leased(lease))]),
                )
                .await
                .map_err(etcd("put binding"))?;
            if resp.succeeded() {
                if let Some(old) = old {
                    self.revoke_quietly(old.lease).await;
                }
                return Ok(BindingPut::Stored);
            }
            self.revoke_quietly(lease).await;
        }
        Err(KbError::BindingConflict { home: b.home })
    }

    /// Deletes the key of `home` if it is still at revision `rev`; false if it moved.
    async fn delete_binding_at(
        &self,
        home: Ipv4Addr,
        rev: i64,
        lease: i64,
    ) -> Result<bool, KbError> {
        let resp = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when(vec![self.unchanged(home, rev)])
                    .and_then(vec![TxnOp::delete(self.k_bind(home), None)]),
            )
            .await
            .map_err(etcd("delete binding"))?;
        if resp.succeeded() {
            self.revoke_quietly(lease).await;
        }
        Ok(resp.succeeded())
    }

    async fn stored(&self, host: &str) -> Result<Option<Stored>, KbError> {
        Ok(self
            .get_json(self.k_host(host), "get host record", "host")
            .await?
            .map(|(s, _)| s))
    }

    /// Runs `ops` as transactions of at most `max_txn_ops`, `concurrency` at a time.
    async fn run_batches(&self, ops: Vec<TxnOp>) -> Result<(), KbError> {
        let n = self.cfg.max_txn_ops.max(1);
        let mut batches = Vec::new();
        let mut it = ops.into_iter().peekable();
        while it.peek().is_some() {
            batches.push(it.by_ref().take(n).collect::<Vec<_>>());
        }
        stream::iter(batches)
            .map(|b| {
                let mut c = self.client.clone();
                async move { c.txn(Txn::new().and_then(b)).await }
            })
            .buffer_unordered(self.cfg.concurrency.max(1))
            .map_err(etcd("txn"))
            .try_for_each(|_| async { Ok(()) })
            .await
    }

    fn record_ops(&self, st: &Stored) -> Result<Vec<TxnOp>, KbError> {
        let json = serde_json::to_vec(st).map_err(codec("host"))?;
        Ok(vec![
            TxnOp::put(
                self.k_seq(&st.record.host),
                st.record.seq.to_string(),
                leased(st.lease),
            ),
            TxnOp::put(self.k_host(&st.record.host), json, leased(st.lease)),
        ])
    }

    async fn keep_alive(&self, lease: i64) -> Result<(), KbError> {
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(etcd("lease keep-alive"))?;
        keeper
            .keep_alive()
            .await
            .map_err(etcd("lease keep-alive"))?;
        stream.message().await.map_err(etcd("lease keep-alive"))?;
        Ok(())
    }

    async fn records(&self, hosts: &BTreeSet<&str>) -> Result<HashMap<String, Stored>, KbError> {
        let mut out = HashMap::new();
        let gets: Vec<TxnOp> = hosts
            .iter()
            .map(|h| TxnOp::get(self.k_host(h), None))
            .collect();
        for batch in gets.chunks(self.cfg.max_txn_ops.max(1)) {
            let resp = self
                .client
                .clone()
                .txn(Txn::new().and_then(batch.to_vec()))
                .await
                .map_err(etcd("get host records"))?;
            for r in resp.op_responses() {
                if let TxnOpResponse::Get(g) = r {
                    for kv in g.kvs() {
                        let st: Stored =
                            serde_json::from_slice(kv.value()).map_err(codec("host"))?;
                        out.insert(st.record.host.clone(), st);
                    }
                }
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl KbStore for EtcdStore {
    async fn apply(&self, ev: &HostEvent, now: Timestamp) -> Result<Applied, KbError> {
        let Some(mut st) = self.stored(&ev.host).await? else {
            return Ok(Applied::UnknownHost);
        };
        let verdict = check_seq(Some(st.record.seq), ev);
        if verdict != Applied::Applied {
            return Ok(verdict);
        }
        let expected = st.record.seq;
        let lease = st.lease;
        let mut ops: Vec<TxnOp> = match &ev.change {
            Change::Add(ds) => ds
                .iter()
                .map(|d| TxnOp::put(self.k_hold(d, &ev.host), "", leased(lease)))
                .collect(),
            Change::Remove(ds) | Change::Evict(ds) => ds
                .iter()
                .map(|d| TxnOp::delete(self.k_hold(d, &ev.host), None))
                .collect(),
            Change::SnapshotAdd(s) => vec![TxnOp::put(
                self.k_snap(&ev.host, &s.id),
                serde_json::to_vec(s).map_err(codec("snapshot"))?,
                leased(lease),
            )],
            Change::SnapshotRemove(id) => vec![TxnOp::delete(self.k_snap(&ev.host, id), None)],
            Change::Info(_) | Change::Heartbeat => Vec::new(),
        };
        if let Change::Heartbeat = ev.change {
            self.keep_alive(st.lease).await?;
        }
        st.record.seq = ev.seq;
        st.record.as_of = st.record.as_of.max(now);
        if let Change::Info(info) = &ev.change {
            st.record.info = info.clone();
        }
        // All but the last few operations go first (idempotent); the last
        // transaction checks the sequence number and moves it.
        let room = self.cfg.max_txn_ops.saturating_sub(2).max(1);
        let tail = ops.split_off(ops.len().saturating_sub(room));
        self.run_batches(ops).await?;
        let mut last = tail;
        last.extend(self.record_ops(&st)?);
        let resp = self
            .client
            .clone()
            .txn(
                Txn::new()
                    .when(vec![Compare::value(
                        self.k_seq(&ev.host),
                        CompareOp::Equal,
                        expected.to_string(),
                    )])
                    .and_then(last),
            )
            .await
            .map_err(etcd("apply event"))?;
        if !resp.succeeded() {
            return Err(KbError::ApplyConflict {
                host: ev.host.clone(),
                expected,
            });
        }
        Ok(Applied::Applied)
    }

    async fn replace(&self, inv: &FullInventory, now: Timestamp) -> Result<(), KbError> {
        let old = self.stored(&inv.host).await?;
        let ttl = self.cfg.lease_ttl.as_secs().max(1) as i64;
        let lease = self.grant(ttl).await?;
        let mut ops: Vec<TxnOp> = inv
            .digests
            .iter()
            .map(|d| TxnOp::put(self.k_hold(d, &inv.host), "", leased(lease)))
            .collect();
        for s in &inv.snapshots {
            ops.push(TxnOp::put(
                self.k_snap(&inv.host, &s.id),
                serde_json::to_vec(s).map_err(codec("snapshot"))?,
                leased(lease),
            ));
        }
        self.run_batches(ops).await?;
        let st = Stored {
            record: HostRecord {
                host: inv.host.clone(),
                seq: inv.seq,
                as_of: now,
                info: inv.info.clone(),
            },
            lease,
        };
        self.run_batches(self.record_ops(&st)?).await?;
        if let Some(old) = old {
            if old.lease != lease {
                // Deletes exactly the keys the new inventory did not re-put. A lease
                // that already ran out took its keys with it: nothing to do.
                if let Err(e) = self.client.clone().lease_revoke(old.lease).await {
                    tracing::debug!(host = %inv.host, error = %e, "old lease already gone");
                }
            }
        }
        Ok(())
    }

    async fn holders(&self, digests: &[Digest]) -> Result<Holdings, KbError> {
        let n = self.cfg.max_txn_ops.max(1);
        let batches: Vec<Vec<TxnOp>> = digests
            .chunks(n)
            .map(|c| {
                c.iter()
                    .map(|d| {
                        TxnOp::get(
                            self.k_hold_prefix(d),
                            Some(GetOptions::new().with_prefix().with_keys_only()),
                        )
                    })
                    .collect()
            })
            .collect();
        let replies: Vec<_> = stream::iter(batches)
            .map(|b| {
                let mut c = self.client.clone();
                async move { c.txn(Txn::new().and_then(b)).await }
            })
            .buffered(self.cfg.concurrency.max(1))
            .map_err(etcd("get holders"))
            .try_collect()
            .await?;
        let mut per_digest: Vec<Vec<String>> = Vec::with_capacity(digests.len());
        for resp in &replies {
            for r in resp.op_responses() {
                let TxnOpResponse::Get(g) = r else { continue };
                per_digest.push(
                    g.kvs()
                        .iter()
                        .filter_map(|kv| {
                            let k = kv.key_str().ok()?;
                            Some(k.rsplit('/').next()?.to_owned())
                        })
                        .collect(),
                );
            }
        }
        let names: BTreeSet<&str> = per_digest.iter().flatten().map(|s| s.as_str()).collect();
        let recs = self.records(&names).await?;
        let mut out = Holdings::default();
        let mut pos: HashMap<&str, u32> = HashMap::new();
        for (name, st) in &recs {
            out.hosts.push(HostFacts {
                host: name.clone(),
                as_of: st.record.as_of,
                info: st.record.info.clone(),
            });
            pos.insert(name.as_str(), (out.hosts.len() - 1) as u32);
        }
        out.holders = per_digest
            .iter()
            .map(|hs| {
                hs.iter()
                    .filter_map(|h| pos.get(h.as_str()).copied())
                    .collect()
            })
            .collect();
        Ok(out)
    }

    async fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<(Snapshot, Timestamp)>, KbError> {
        let resp = self
            .client
            .clone()
            .get(
                format!("{}/snap/", self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(etcd("get snapshots"))?;
        let mut snaps = Vec::new();
        for kv in resp.kvs() {
            let s: Snapshot = serde_json::from_slice(kv.value()).map_err(codec("snapshot"))?;
            if q.matches(&s) {
                snaps.push(s);
            }
        }
        let names: BTreeSet<&str> = snaps.iter().map(|s| s.host.as_str()).collect();
        let recs = self.records(&names).await?;
        let mut v: Vec<(Snapshot, Timestamp)> = snaps
            .into_iter()
            .filter_map(|s| {
                let as_of = recs.get(&s.host)?.record.as_of;
                Some((s, as_of))
            })
            .collect();
        v.sort_by(|a, b| b.0.taken.cmp(&a.0.taken).then(a.0.host.cmp(&b.0.host)));
        Ok(v)
    }

    async fn host(&self, host: &str) -> Result<Option<HostRecord>, KbError> {
        Ok(self.stored(host).await?.map(|s| s.record))
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, KbError> {
        let resp = self
            .client
            .clone()
            .get(
                format!("{}/host/", self.cfg.prefix),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(etcd("get host records"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<Stored>(kv.value())
                    .map(|s| s.record)
                    .map_err(codec("host"))
            })
            .collect()
    }

    async fn remove_host(&self, host: &str) -> Result<bool, KbError> {
        let Some(st) = self.stored(host).await? else {
            return Ok(false);
        };
        self.client
            .clone()
            .lease_revoke(st.lease)
            .await
            .map_err(etcd("lease revoke"))?;
        Ok(true)
    }

    async fn expire(&self, _now: Timestamp) -> Result<Vec<HostName>, KbError> {
        // Leases expire in etcd itself.
        Ok(Vec::new())
    }

    async fn put_binding(&self, b: &BindingRecord, now: Timestamp) -> Result<BindingPut, KbError> {
        self.put_binding_checked(b, now, false).await
    }

    async fn remove_binding(
        &self,
        home: Ipv4Addr,
        home_agent: &str,
        seq: u16,
    ) -> Result<bool, KbError> {
        for _ in 0..BINDING_RETRIES {
            let (Some(old), rev) = self.stored_binding(home).await? else {
                return Ok(false);
            };
            if !removes(&old.record, home_agent, seq) {
                return Ok(false);
            }
            if self.delete_binding_at(home, rev, old.lease).await? {
                return Ok(true);
            }
        }
        Err(KbError::BindingConflict { home })
    }

    async fn replace_bindings(
        &self,
        home_agent: &str,
        bindings: &[BindingRecord],
        now: Timestamp,
    ) -> Result<(), KbError> {
        for (old, rev) in self.all_bindings().await? {
            let home = old.record.home;
            if old.record.home_agent == home_agent && !bindings.iter().any(|b| b.home == home) {
                // Changed since the read: its new writer decides.
                self.delete_binding_at(home, rev, old.lease).await?;
            }
        }
        for b in bindings.iter().filter(|b| b.home_agent == home_agent) {
            if self.put_binding_checked(b, now, true).await? == BindingPut::Expired {
                let (old, rev) = self.stored_binding(b.home).await?;
                if let Some(old) = old.filter(|o| o.record.home_agent == home_agent) {
                    self.delete_binding_at(b.home, rev, old.lease).await?;
                }
            }
        }
        Ok(())
    }

    async fn bindings(
        &self,
        q: &BindingQuery,
        now: Timestamp,
    ) -> Result<Vec<BindingRecord>, KbError> {
        let mut v: Vec<BindingRecord> = self
            .all_bindings()
            .await?
            .into_iter()
            .map(|(s, _)| s.record)
            .filter(|b| b.is_live(now) && q.matches(b))
            .collect();
        v.sort_by_key(|b| b.home);
        Ok(v)
    }
}
