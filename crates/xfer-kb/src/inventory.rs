//! A host's own view of what it holds: the [`Inventory`] trait (the agent implements
//! it over its chunk store and snapshot cache) and [`MemInventory`], an in-memory
//! implementation for tests and simulations.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;
use xfer_store::Digest;

use crate::clock::Clock;
use crate::model::{
    Change, FullInventory, HostEvent, HostInfo, HostName, HostStatus, Snapshot, SnapshotQuery,
};

/// What a host holds, and the stream of its changes. Synchronous (the chunk store
/// is); every change is published to [`Inventory::subscribe`]rs with the host's next
/// sequence number.
pub trait Inventory: Send + Sync + std::fmt::Debug {
    /// The host's name.
    fn host(&self) -> &str;
    /// Everything the host holds now, with the sequence number of the last change.
    fn full(&self) -> FullInventory;
    /// The sequence number of the last change, and the host's load and links.
    fn status(&self) -> HostStatus;
    /// For each digest, whether the host holds it.
    fn have(&self, digests: &[Digest]) -> Vec<bool>;
    /// The host's snapshots matching `q`.
    fn snapshots(&self, q: &SnapshotQuery) -> Vec<Snapshot>;
    /// Changes from now on. A receiver that falls behind loses events
    /// (`RecvError::Lagged`); receivers detect that from sequence numbers.
    fn subscribe(&self) -> broadcast::Receiver<HostEvent>;
}

#[derive(Debug, Default)]
struct MemState {
    digests: HashSet<Digest>,
    snapshots: BTreeMap<Digest, Snapshot>,
    info: HostInfo,
    seq: u64,
}

/// An in-memory [`Inventory`] whose changes are made by calling its methods.
#[derive(Debug)]
pub struct MemInventory {
    host: HostName,
    clock: Arc<dyn Clock>,
    state: Mutex<MemState>,
    tx: broadcast::Sender<HostEvent>,
}

impl MemInventory {
    /// An empty inventory of `host` (events buffered for slow subscribers: 4096).
    pub fn new(host: impl Into<HostName>, clock: Arc<dyn Clock>) -> Self {
        let (tx, _) = broadcast::channel(4096);
        MemInventory {
            host: host.into(),
            clock,
            state: Mutex::new(MemState::default()),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` and publishes it; returns its sequence number.
    fn change(&self, change: Change) -> u64 {
        let mut st = self.lock();
        match &change {
            Change::Add(ds) => st.digests.extend(ds.iter().copied()),
            Change::Remove(ds) | Change::Evict(ds) => {
                for d in ds {
                    st.digests.remove(d);
                }
            }
            Change::SnapshotAdd(s) => {
                st.snapshots.insert(s.id, s.clone());
            }
            Change::SnapshotRemove(id) => {
                st.snapshots.remove(id);
            }
            Change::Info(i) => st.info = i.clone(),
            Change::Heartbeat => return st.seq,
        }
        st.seq += 1;
        let ev = HostEvent {
            host: self.host.clone(),
            seq: st.seq,
            at: self.clock.now(),
            change,
        };
        // Published under the lock so subscribers see events in sequence order. No
        // subscriber is not an error.
        let _ = self.tx.send(ev);
        st.seq
    }

    /// The host now holds `ds`.
    pub fn add(&self, ds: &[Digest]) -> u64 {
        self.change(Change::Add(ds.to_vec()))
    }

    /// The host deleted `ds`.
    pub fn remove(&self, ds: &[Digest]) -> u64 {
        self.change(Change::Remove(ds.to_vec()))
    }

    /// The host's cache evicted `ds`.
    pub fn evict(&self, ds: &[Digest]) -> u64 {
        self.change(Change::Evict(ds.to_vec()))
    }

    /// The host took a snapshot.
    pub fn add_snapshot(&self, s: Snapshot) -> u64 {
        self.change(Change::SnapshotAdd(s))
    }

    /// The host discarded a snapshot.
    pub fn remove_snapshot(&self, id: Digest) -> u64 {
        self.change(Change::SnapshotRemove(id))
    }

    /// The host's load or links changed.
    pub fn set_info(&self, info: HostInfo) -> u64 {
        self.change(Change::Info(info))
    }

    /// Whether the host holds `d`.
    pub fn holds(&self, d: &Digest) -> bool {
        self.lock().digests.contains(d)
    }
}

impl Inventory for MemInventory {
    fn host(&self) -> &str {
        &self.host
    }

    fn full(&self) -> FullInventory {
        let st = self.lock();
        FullInventory {
            host: self.host.clone(),
            seq: st.seq,
            at: self.clock.now(),
            digests: st.digests.iter().copied().collect(),
            snapshots: st.snapshots.values().cloned().collect(),
            info: st.info.clone(),
        }
    }

    fn status(&self) -> HostStatus {
        let st = self.lock();
        HostStatus {
            seq: st.seq,
            info: st.info.clone(),
        }
    }

    fn have(&self, digests: &[Digest]) -> Vec<bool> {
        let st = self.lock();
        digests.iter().map(|d| st.digests.contains(d)).collect()
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Vec<Snapshot> {
        self.lock()
            .snapshots
            .values()
            .filter(|s| q.matches(s))
            .cloned()
            .collect()
    }

    fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.tx.subscribe()
    }
}
