//! A host's own view of what it holds: the [`Inventory`] trait, [`StoreInventory`]
//! over a host's on-disk chunk store (what the agent will use), and [`MemInventory`],
//! an in-memory implementation for tests and simulations.

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

/// What every inventory keeps besides its holdings: the sequence number, snapshots,
/// load and links, and the broadcast of changes. Changes are published under its lock,
/// so subscribers see them in sequence order.
#[derive(Debug)]
struct ChangeLog {
    host: HostName,
    clock: Arc<dyn Clock>,
    state: Mutex<LogState>,
    tx: broadcast::Sender<HostEvent>,
}

#[derive(Debug, Default)]
struct LogState {
    snapshots: BTreeMap<Digest, Snapshot>,
    info: HostInfo,
    seq: u64,
}

impl ChangeLog {
    fn new(host: HostName, clock: Arc<dyn Clock>) -> Self {
        // Events buffered for slow subscribers: 4096 (a subscriber that falls further
        // behind sees `Lagged` and resyncs).
        let (tx, _) = broadcast::channel(4096);
        ChangeLog {
            host,
            clock,
            state: Mutex::new(LogState::default()),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `apply` (the holdings side of `change`), records the snapshot and info
    /// side, takes the next sequence number and publishes; returns the number.
    fn change(&self, change: Change, apply: impl FnOnce(&Change)) -> u64 {
        let mut st = self.lock();
        apply(&change);
        match &change {
            Change::SnapshotAdd(s) => {
                st.snapshots.insert(s.id, s.clone());
            }
            Change::SnapshotRemove(id) => {
                st.snapshots.remove(id);
            }
            Change::Info(i) => st.info = i.clone(),
            Change::Heartbeat => return st.seq,
            Change::Add(_) | Change::Remove(_) | Change::Evict(_) => {}
        }
        st.seq += 1;
        let ev = HostEvent {
            host: self.host.clone(),
            seq: st.seq,
            at: self.clock.now(),
            change,
        };
        // No subscriber is not an error.
        let _ = self.tx.send(ev);
        st.seq
    }

    /// A full inventory with `digests` (read under the log's lock, so `seq` matches).
    fn full(&self, digests: impl FnOnce() -> Vec<Digest>) -> FullInventory {
        let st = self.lock();
        FullInventory {
            host: self.host.clone(),
            seq: st.seq,
            at: self.clock.now(),
            digests: digests(),
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

    fn snapshots(&self, q: &SnapshotQuery) -> Vec<Snapshot> {
        self.lock()
            .snapshots
            .values()
            .filter(|s| q.matches(s))
            .cloned()
            .collect()
    }
}

/// Forwards the snapshot, info and subscription side of [`Inventory`] and the change
/// methods shared by both inventories to their [`ChangeLog`].
macro_rules! change_methods {
    () => {
        /// The host took a snapshot.
        pub fn add_snapshot(&self, s: Snapshot) -> u64 {
            self.log.change(Change::SnapshotAdd(s), |_| {})
        }

        /// The host discarded a snapshot.
        pub fn remove_snapshot(&self, id: Digest) -> u64 {
            self.log.change(Change::SnapshotRemove(id), |_| {})
        }

        /// The host's load or links changed.
        pub fn set_info(&self, info: HostInfo) -> u64 {
            self.log.change(Change::Info(info), |_| {})
        }
    };
}

/// An in-memory [`Inventory`] whose changes are made by calling its methods.
#[derive(Debug)]
pub struct MemInventory {
    log: ChangeLog,
    digests: Mutex<HashSet<Digest>>,
}

impl MemInventory {
    /// An empty inventory of `host`.
    pub fn new(host: impl Into<HostName>, clock: Arc<dyn Clock>) -> Self {
        MemInventory {
            log: ChangeLog::new(host.into(), clock),
            digests: Mutex::default(),
        }
    }

    fn set(&self) -> MutexGuard<'_, HashSet<Digest>> {
        self.digests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn held(&self, change: Change) -> u64 {
        self.log.change(change, |c| match c {
            Change::Add(ds) => self.set().extend(ds.iter().copied()),
            Change::Remove(ds) | Change::Evict(ds) => {
                let mut set = self.set();
                for d in ds {
                    set.remove(d);
                }
            }
            _ => {}
        })
    }

    /// The host now holds `ds`.
    pub fn add(&self, ds: &[Digest]) -> u64 {
        self.held(Change::Add(ds.to_vec()))
    }

    /// The host deleted `ds`.
    pub fn remove(&self, ds: &[Digest]) -> u64 {
        self.held(Change::Remove(ds.to_vec()))
    }

    /// The host's cache evicted `ds`.
    pub fn evict(&self, ds: &[Digest]) -> u64 {
        self.held(Change::Evict(ds.to_vec()))
    }

    change_methods!();

    /// Whether the host holds `d`.
    pub fn holds(&self, d: &Digest) -> bool {
        self.set().contains(d)
    }
}

impl Inventory for MemInventory {
    fn host(&self) -> &str {
        &self.log.host
    }

    fn full(&self) -> FullInventory {
        self.log.full(|| self.set().iter().copied().collect())
    }

    fn status(&self) -> HostStatus {
        self.log.status()
    }

    fn have(&self, digests: &[Digest]) -> Vec<bool> {
        let set = self.set();
        digests.iter().map(|d| set.contains(d)).collect()
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Vec<Snapshot> {
        self.log.snapshots(q)
    }

    fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.log.tx.subscribe()
    }
}

/// The [`Inventory`] of a host's on-disk chunk store ([`xfer_store::Store`]): its
/// holdings are what the store's index holds (`full` and `have` read the store). The
/// agent reports changes as it makes them: [`StoreInventory::added`] after puts (a
/// fetch, a pre-copy round: one event per batch), [`StoreInventory::removed`] after
/// deletes, [`StoreInventory::collected`] with each garbage collection's report
/// (evictions). A change the agent forgets to report is still repaired by the next
/// full update, which reads the store itself.
#[derive(Debug)]
pub struct StoreInventory {
    log: ChangeLog,
    store: Arc<xfer_store::Store>,
}

impl StoreInventory {
    /// The inventory of `store` on `host`.
    pub fn new(
        host: impl Into<HostName>,
        store: Arc<xfer_store::Store>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        StoreInventory {
            log: ChangeLog::new(host.into(), clock),
            store,
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<xfer_store::Store> {
        &self.store
    }

    /// The store now holds `ids` (publishes one `Add`); no event for an empty list.
    pub fn added(&self, ids: &[Digest]) -> Option<u64> {
        (!ids.is_empty()).then(|| self.log.change(Change::Add(ids.to_vec()), |_| {}))
    }

    /// `ids` were deleted from the store (publishes one `Remove`).
    pub fn removed(&self, ids: &[Digest]) -> Option<u64> {
        (!ids.is_empty()).then(|| self.log.change(Change::Remove(ids.to_vec()), |_| {}))
    }

    /// A garbage collection ran: its removed chunks are evictions.
    pub fn collected(&self, report: &xfer_store::GcReport) -> Option<u64> {
        (!report.removed.is_empty()).then(|| {
            self.log
                .change(Change::Evict(report.removed.clone()), |_| {})
        })
    }

    change_methods!();
}

impl Inventory for StoreInventory {
    fn host(&self) -> &str {
        &self.log.host
    }

    fn full(&self) -> FullInventory {
        self.log.full(|| self.store.ids())
    }

    fn status(&self) -> HostStatus {
        self.log.status()
    }

    fn have(&self, digests: &[Digest]) -> Vec<bool> {
        self.store.has_many(digests)
    }

    fn snapshots(&self, q: &SnapshotQuery) -> Vec<Snapshot> {
        self.log.snapshots(q)
    }

    fn subscribe(&self) -> broadcast::Receiver<HostEvent> {
        self.log.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{FakeClock, Timestamp};
    use std::time::Duration;

    #[test]
    fn store_inventory_reads_the_store_and_publishes_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(xfer_store::Store::open(dir.path()).expect("store"));
        let clock = Arc::new(FakeClock::new(Timestamp::from_secs(100)));
        let inv = StoreInventory::new("h1", store.clone(), clock.clone());
        let mut rx = inv.subscribe();
        let a = store.put(b"chunk a").expect("put");
        let b = store.put(b"chunk b").expect("put");
        assert_eq!(inv.added(&[a, b]), Some(1));
        assert_eq!(inv.added(&[]), None);
        let ev = rx.try_recv().expect("add event");
        assert_eq!((ev.seq, ev.change), (1, Change::Add(vec![a, b])));
        let mut full = inv.full();
        full.digests.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!((full.seq, full.digests), (1, want));
        assert_eq!(inv.have(&[a, Digest::of(b"other")]), vec![true, false]);
        // Deleted, then collected by GC (an eviction).
        assert!(store.remove(&a).expect("remove"));
        assert_eq!(inv.removed(&[a]), Some(2));
        clock.advance(Duration::from_secs(3600));
        let report = store
            .gc(&xfer_store::GcPolicy {
                max_bytes: Some(0),
                min_age: Duration::ZERO,
                collect_expired: true,
            })
            .expect("gc");
        assert_eq!(report.removed, vec![b]);
        assert_eq!(inv.collected(&report), Some(3));
        let evs: Vec<Change> = [rx.try_recv(), rx.try_recv()]
            .into_iter()
            .map(|e| e.expect("event").change)
            .collect();
        assert_eq!(evs, vec![Change::Remove(vec![a]), Change::Evict(vec![b])]);
        let full = inv.full();
        assert!(full.digests.is_empty());
        assert_eq!(full.seq, 3);
        assert_eq!(inv.status().seq, 3);
    }
}
