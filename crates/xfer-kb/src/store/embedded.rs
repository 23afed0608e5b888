//! The embedded store: the compact [`Index`] plus host records and snapshots under one
//! lock, persisted to one file (atomic replace) on [`EmbeddedStore::persist`].
//!
//! What is not yet persisted when the process dies is repaired by the hosts' next
//! full updates (central push) or pulls: the file is a warm start, not the truth.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use xfer_mobility::clock::Timestamp;
use xfer_store::Digest;

use super::{binding_verdict, check_seq, removes, Holdings, KbStore};
use crate::index::Index;
use crate::model::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, FullInventory, HostEvent, HostFacts,
    HostName, HostRecord, Snapshot, SnapshotQuery,
};
use crate::KbError;

const MAGIC: &[u8; 6] = b"XFKB1\n";

#[derive(Debug, Default)]
struct State {
    index: Index,
    records: HashMap<HostName, HostRecord>,
    snapshots: HashMap<HostName, BTreeMap<Digest, Snapshot>>,
    bindings: BTreeMap<Ipv4Addr, BindingRecord>,
}

/// In-memory knowledge base storage, optionally persisted to a file.
#[derive(Debug)]
pub struct EmbeddedStore {
    state: RwLock<State>,
    path: Option<PathBuf>,
    ttl: Option<Duration>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    hosts: Vec<(HostRecord, u64)>,
    snapshots: Vec<Snapshot>,
    /// Absent in files written before bindings were kept.
    #[serde(default)]
    bindings: Vec<BindingRecord>,
}

impl EmbeddedStore {
    /// An empty store, not persisted. `ttl`: hosts not heard of for this long are
    /// dropped by [`KbStore::expire`] (`None`: never).
    pub fn in_memory(ttl: Option<Duration>) -> Self {
        EmbeddedStore {
            state: RwLock::new(State::default()),
            path: None,
            ttl,
        }
    }

    /// A store persisted at `path`, loaded from it if the file exists.
    pub fn open(path: impl Into<PathBuf>, ttl: Option<Duration>) -> Result<Self, KbError> {
        let path = path.into();
        let state = if path.exists() {
            load(&path)?
        } else {
            State::default()
        };
        Ok(EmbeddedStore {
            state: RwLock::new(state),
            path: Some(path),
            ttl,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // Every write finishes its index update before it can panic, and a torn
        // update is repaired by the next full inventory: a poisoned lock is usable.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the whole state to the store's file (temp file, fsync, rename). No-op
    /// for an in-memory store.
    pub fn persist(&self) -> Result<(), KbError> {
        match &self.path {
            Some(path) => self.persist_to(path),
            None => Ok(()),
        }
    }

    /// Writes the whole state to `path` (temp file, fsync, rename), in the format
    /// [`EmbeddedStore::open`] reads.
    pub fn persist_to(&self, path: &Path) -> Result<(), KbError> {
        let err = |source| KbError::Persist {
            path: path.to_owned(),
            source,
        };
        let tmp = path.with_extension("tmp");
        {
            let st = self.read();
            let mut hosts = Vec::new();
            let mut ids = Vec::new();
            for rec in st.records.values() {
                let id = st.index.host_id(&rec.host);
                hosts.push((rec.clone(), id.map_or(0, |i| st.index.count_of(i))));
                ids.push(id);
            }
            let header = Header {
                hosts,
                snapshots: st
                    .snapshots
                    .values()
                    .flat_map(|m| m.values().cloned())
                    .collect(),
                bindings: st.bindings.values().cloned().collect(),
            };
            let json = serde_json::to_vec(&header).map_err(|source| KbError::Codec {
                what: "knowledge base header",
                source,
            })?;
            let f = File::create(&tmp).map_err(err)?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            w.write_all(MAGIC).map_err(err)?;
            w.write_all(&(json.len() as u64).to_le_bytes())
                .map_err(err)?;
            w.write_all(&json).map_err(err)?;
            for id in ids.into_iter().flatten() {
                for d in st.index.held_by(id) {
                    w.write_all(&d.0).map_err(err)?;
                }
            }
            let f = w.into_inner().map_err(|e| err(e.into_error()))?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// Number of (digest, host) entries.
    pub fn entries(&self) -> u64 {
        self.read().index.entries()
    }

    /// Heap bytes of the holdings index (its own accounting).
    pub fn index_bytes(&self) -> usize {
        self.read().index.heap_bytes()
    }

    /// Runs `f` on the index (the scale example fills it directly).
    pub fn with_index<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        f(&mut self.write().index)
    }

    /// Records `rec` for a host, keeping its holdings (the scale example).
    pub fn put_record(&self, rec: HostRecord) {
        self.write().records.insert(rec.host.clone(), rec);
    }
}

fn load(path: &Path) -> Result<State, KbError> {
    let io = |source| KbError::Load {
        path: path.to_owned(),
        source,
    };
    let bad = |what: String| KbError::Decode {
        path: path.to_owned(),
        what,
    };
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io)?);
    let mut magic = [0u8; 6];
    r.read_exact(&mut magic).map_err(io)?;
    if &magic != MAGIC {
        return Err(bad("not a knowledge base file (bad magic)".into()));
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 30 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json).map_err(io)?;
    let header: Header = serde_json::from_slice(&json).map_err(|e| bad(format!("header: {e}")))?;
    let mut st = State::default();
    let mut buf = [0u8; 32];
    for (rec, count) in header.hosts {
        let id = st.index.intern(&rec.host)?;
        let mut ds = Vec::with_capacity(count.min(1 << 24) as usize);
        for _ in 0..count {
            r.read_exact(&mut buf).map_err(io)?;
            ds.push(Digest(buf));
        }
        st.index.add(id, &ds);
        st.records.insert(rec.host.clone(), rec);
    }
    for s in header.snapshots {
        st.snapshots
            .entry(s.host.clone())
            .or_default()
            .insert(s.id, s);
    }
    st.bindings = header.bindings.into_iter().map(|b| (b.home, b)).collect();
    Ok(st)
}

fn facts(rec: &HostRecord) -> HostFacts {
    HostFacts {
        host: rec.host.clone(),
        as_of: rec.as_of,
        info: rec.info.clone(),
    }
}

#[async_trait]
impl KbStore for EmbeddedStore {
    async fn apply(&self, ev: &HostEvent, now: Timestamp) -> Result<Applied, KbError> {
        let mut st = self.write();
        let st = &mut *st;
        let verdict = check_seq(st.records.get(&ev.host).map(|r| r.seq), ev);
        if verdict != Applied::Applied {
            return Ok(verdict);
        }
        let id = st.index.intern(&ev.host)?;
        match &ev.change {
            Change::Add(ds) => {
                st.index.add(id, ds);
            }
            Change::Remove(ds) | Change::Evict(ds) => {
                st.index.remove(id, ds);
            }
            Change::SnapshotAdd(s) => {
                st.snapshots
                    .entry(ev.host.clone())
                    .or_default()
                    .insert(s.id, s.clone());
            }
            Change::SnapshotRemove(sid) => {
                if let Some(m) = st.snapshots.get_mut(&ev.host) {
                    m.remove(sid);
                }
            }
            Change::Info(_) | Change::Heartbeat => {}
        }
        if let Some(rec) = st.records.get_mut(&ev.host) {
            rec.seq = ev.seq;
            rec.as_of = rec.as_of.max(now);
            if let Change::Info(info) = &ev.change {
                rec.info = info.clone();
            }
        }
        Ok(Applied::Applied)
    }

    async fn replace(&self, inv: &FullInventory, now: Timestamp) -> Result<(), KbError> {
        let mut st = self.write();
        let st = &mut *st;
        let id = st.index.intern(&inv.host)?;
        st.index.replace(id, &inv.digests);
        st.snapshots.insert(
            inv.host.clone(),
            inv.snapshots.iter().map(|s| (s.id, s.clone())).collect(),
        );
        st.records.insert(
            inv.host.clone(),
            HostRecord {
                host: inv.host.clone(),
                seq: inv.seq,
                as_of: now,
                info: inv.info.clone(),
            },
        );
        Ok(())
    }

    async fn holders(&self, digests: &[Digest]) -> Result<Holdings, KbError> {
        let st = self.read();
        let mut out = Holdings {
            hosts: Vec::new(),
            holders: Vec::with_capacity(digests.len()),
        };
        // Host id -> position in `out.hosts` (UNSEEN: not yet; NO_RECORD: skip).
        const UNSEEN: u32 = u32::MAX;
        const NO_RECORD: u32 = u32::MAX - 1;
        let mut pos = vec![UNSEEN; st.index.host_slots()];
        for d in digests {
            let holders = st.index.holders(d);
            let mut v = Vec::with_capacity(holders.len());
            for &h in holders {
                let slot = &mut pos[h as usize];
                if *slot == UNSEEN {
                    *slot = match st.index.host_name(h).and_then(|n| st.records.get(n)) {
                        Some(rec) => {
                            out.hosts.push(facts(rec));
                            (out.hosts.len() - 1) as u32
                        }
                        None => NO_RECORD,
                    };
                }
                if *slot != NO_RECORD {
                    v.push(*slot);
                }
            }
            out.holders.push(v);
        }
        Ok(out)
    }

    async fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<(Snapshot, Timestamp)>, KbError> {
        let st = self.read();
        let mut v: Vec<(Snapshot, Timestamp)> = st
            .snapshots
            .iter()
            .flat_map(|(h, m)| {
                let as_of = st.records.get(h).map_or(Timestamp::EPOCH, |r| r.as_of);
                m.values()
                    .filter(|s| q.matches(s))
                    .map(move |s| (s.clone(), as_of))
            })
            .collect();
        v.sort_by(|a, b| b.0.taken.cmp(&a.0.taken).then(a.0.host.cmp(&b.0.host)));
        Ok(v)
    }

    async fn host(&self, host: &str) -> Result<Option<HostRecord>, KbError> {
        Ok(self.read().records.get(host).cloned())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, KbError> {
        let mut v: Vec<HostRecord> = self.read().records.values().cloned().collect();
        v.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(v)
    }

    async fn remove_host(&self, host: &str) -> Result<bool, KbError> {
        let mut st = self.write();
        st.index.drop_host(host);
        st.snapshots.remove(host);
        Ok(st.records.remove(host).is_some())
    }

    async fn expire(&self, now: Timestamp) -> Result<Vec<HostName>, KbError> {
        let mut st = self.write();
        st.bindings.retain(|home, b| {
            let live = b.is_live(now);
            if !live {
                tracing::info!(%home, home_agent = %b.home_agent, "knowledge base: binding expired");
            }
            live
        });
        let Some(ttl) = self.ttl else {
            return Ok(Vec::new());
        };
        let dead: Vec<HostName> = st
            .records
            .values()
            .filter(|r| now.saturating_since(r.as_of) > ttl)
            .map(|r| r.host.clone())
            .collect();
        for h in &dead {
            st.index.drop_host(h);
            st.snapshots.remove(h);
            st.records.remove(h);
            tracing::info!(host = %h, "knowledge base: host expired");
        }
        Ok(dead)
    }

    async fn put_binding(&self, b: &BindingRecord, now: Timestamp) -> Result<BindingPut, KbError> {
        let mut st = self.write();
        let verdict = binding_verdict(st.bindings.get(&b.home), b, now, false);
        if verdict == BindingPut::Stored {
            st.bindings.insert(b.home, b.clone());
        }
        Ok(verdict)
    }

    async fn remove_binding(
        &self,
        home: Ipv4Addr,
        home_agent: &str,
        seq: u16,
    ) -> Result<bool, KbError> {
        let mut st = self.write();
        match st.bindings.get(&home) {
            Some(b) if removes(b, home_agent, seq) => {
                st.bindings.remove(&home);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn replace_bindings(
        &self,
        home_agent: &str,
        bindings: &[BindingRecord],
        now: Timestamp,
    ) -> Result<(), KbError> {
        let mut st = self.write();
        st.bindings.retain(|home, b| {
            b.home_agent != home_agent || bindings.iter().any(|n| n.home == *home)
        });
        for b in bindings.iter().filter(|b| b.home_agent == home_agent) {
            if binding_verdict(st.bindings.get(&b.home), b, now, true) == BindingPut::Stored {
                st.bindings.insert(b.home, b.clone());
            } else if st
                .bindings
                .get(&b.home)
                .is_some_and(|s| s.home_agent == home_agent)
            {
                // Its own record, already expired in the new set: gone.
                st.bindings.remove(&b.home);
            }
        }
        Ok(())
    }

    async fn bindings(
        &self,
        q: &BindingQuery,
        now: Timestamp,
    ) -> Result<Vec<BindingRecord>, KbError> {
        Ok(self
            .read()
            .bindings
            .values()
            .filter(|b| b.is_live(now) && q.matches(b))
            .cloned()
            .collect())
    }
}
