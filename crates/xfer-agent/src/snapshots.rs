//! Snapshot caching (issue 6, deliverable 2): every `period` the agent snapshots the
//! read-write volumes (and, when enabled, the memory) of the containers it runs into
//! its chunk store, announces them to the cluster knowledge base, and discards the
//! snapshots that fall out of the retention (age, total size).
//!
//! * **Volumes**: the same deterministic tar as a migration ([`volumes::capture`]),
//!   chunked with content-defined chunking ([`crate::sync::publish`]), so an unchanged
//!   file costs nothing and a snapshot shares its chunks with earlier snapshots and
//!   with migrations of the same data. Subject: the volume's GUID ([`volume_guid`]).
//! * **Memory** (`memory: true`): a CRIU dump that leaves the task running (what a
//!   pre-copy round does: the task is frozen for the dump), its image files chunked
//!   like a migration's (4 KiB pages). Subject: the container.
//! * Every snapshot's chunks are held by a store lease (`snap-...`), so garbage
//!   collection keeps them; discarding a snapshot releases its lease (the chunks go at
//!   the next collection unless something else holds them, and the collection reports
//!   the evictions to the knowledge base).
//! * A snapshot whose content equals the newest one of the same subject is not kept
//!   twice: the existing one is re-announced with the new time (its content is still
//!   current).
//! * Announcements: the chunks (`Add`) and the snapshot (`SnapshotAdd`) on taking,
//!   `SnapshotRemove` on discarding, through the host's inventory, whatever the
//!   knowledge base's mode.
//! * The list of held snapshots survives restarts (`WORK/snapshots/index.json`); a
//!   snapshot whose chunks are no longer all in the store is dropped when it is loaded.
//!
//! Every decision (taken, unchanged, skipped, discarded and why) is logged.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use xfer_kb::{Clock, Snapshot, StoreInventory, Subject, Timestamp};
use xfer_proto::v1::FileKind;
use xfer_store::{Digest, Store};

use crate::error::AgentError;
use crate::transfer::OutFile;
use crate::volumes;

/// How snapshots are taken and kept (`xferd --snapshot-*`, or `"snapshots"` in the
/// `--kb-config` file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Seconds between two snapshot passes; 0 turns snapshot caching off.
    pub period_secs: u64,
    /// Snapshots older than this are discarded (seconds).
    pub max_age_secs: u64,
    /// The logical bytes of all kept snapshots stay under this; the oldest go first.
    pub max_bytes: u64,
    /// Also snapshot the memory of running containers (a CRIU dump leaving them
    /// running: the task is frozen for the dump).
    pub memory: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            period_secs: 0,
            max_age_secs: 3600,
            max_bytes: 4 << 30,
            memory: false,
        }
    }
}

impl SnapshotConfig {
    /// Whether snapshots are taken at all.
    pub fn enabled(&self) -> bool {
        self.period_secs > 0
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_secs(self.period_secs.max(1))
    }

    /// The maximum age.
    pub fn max_age(&self) -> Duration {
        Duration::from_secs(self.max_age_secs)
    }
}

/// The GUID of volume `object` (`rw-N`, its migration object name) of container
/// `container`: stable across migrations, since both keep their names.
pub fn volume_guid(container: &str, object: &str) -> String {
    format!("{container}/{object}")
}

/// Which of `held` (taken time, logical bytes) the retention discards: every one older
/// than `max_age`, then the oldest until the rest fit in `max_bytes`. Returns indexes
/// into `held`, oldest first.
pub fn to_discard(
    held: &[(Timestamp, u64)],
    now: Timestamp,
    max_age: Duration,
    max_bytes: u64,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..held.len()).collect();
    order.sort_by_key(|&i| held[i].0);
    let mut total: u64 = held.iter().map(|h| h.1).sum();
    let mut out = Vec::new();
    for i in order {
        let (taken, bytes) = held[i];
        if now.saturating_since(taken) > max_age || total > max_bytes {
            total -= bytes;
            out.push(i);
        }
    }
    out
}

/// A snapshot this host holds, as kept in its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub snapshot: Snapshot,
    /// The store lease holding its chunks.
    pub lease: String,
    /// Its distinct chunk ids (hex).
    pub chunks: Vec<String>,
}

impl Held {
    fn chunk_ids(&self) -> Vec<Digest> {
        self.chunks
            .iter()
            .filter_map(|h| Digest::from_hex(h).ok())
            .collect()
    }
}

/// What a snapshot attempt did.
#[derive(Debug, Clone, PartialEq)]
pub enum Taken {
    /// A new snapshot.
    New(Snapshot),
    /// The content equals the newest snapshot of the subject: that one, re-dated.
    Unchanged(Snapshot),
}

impl Taken {
    /// The snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        match self {
            Taken::New(s) | Taken::Unchanged(s) => s,
        }
    }
}

/// A host's snapshot cache: takes, keeps, announces and discards snapshots.
#[derive(Debug)]
pub struct Keeper {
    host: String,
    cfg: SnapshotConfig,
    store: Arc<Store>,
    dir: PathBuf,
    inventory: Option<Arc<StoreInventory>>,
    clock: Arc<dyn Clock>,
    held: Mutex<Vec<Held>>,
    /// Containers not to dump now (being migrated), and the dump in progress.
    quiet: Mutex<BTreeSet<String>>,
    dumping: tokio::sync::Mutex<()>,
}

fn store_err(what: &str) -> impl FnOnce(xfer_store::StoreError) -> AgentError + '_ {
    move |source| AgentError::Store {
        what: what.to_string(),
        source,
    }
}

impl Keeper {
    /// The cache of host `host` in directory `dir` (index and scratch) over `store`;
    /// announces to `inventory` when the host has a knowledge base. Loads the index
    /// (dropping snapshots whose chunks are gone) and announces what it holds.
    pub fn open(
        host: &str,
        cfg: SnapshotConfig,
        store: Arc<Store>,
        dir: PathBuf,
        inventory: Option<Arc<StoreInventory>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Keeper, AgentError> {
        std::fs::create_dir_all(&dir).map_err(|source| AgentError::WriteFile {
            path: dir.clone(),
            source,
        })?;
        let _ = std::fs::remove_dir_all(dir.join("scratch"));
        let k = Keeper {
            host: host.to_string(),
            cfg,
            store,
            dir,
            inventory,
            clock,
            held: Mutex::default(),
            quiet: Mutex::default(),
            dumping: tokio::sync::Mutex::new(()),
        };
        let loaded: Vec<Held> = match std::fs::read(k.index_path()) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                warn!(error = %e, "snapshot index unreadable: starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let mut kept = Vec::new();
        for h in loaded {
            let ids = h.chunk_ids();
            let missing = k.store.missing(&ids).len();
            if missing > 0 || ids.len() != h.chunks.len() {
                info!(snapshot = %h.snapshot.id, missing, "snapshot dropped at load: chunks gone");
                let _ = k.store.release(&h.lease);
                continue;
            }
            if let Some(inv) = &k.inventory {
                inv.added(&ids);
                inv.add_snapshot(h.snapshot.clone());
            }
            kept.push(h);
        }
        info!(snapshots = kept.len(), "snapshot cache loaded");
        *k.lock() = kept;
        k.save()?;
        Ok(k)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join("index.json")
    }

    /// The configuration.
    pub fn config(&self) -> &SnapshotConfig {
        &self.cfg
    }

    /// Where a pass writes its tars and dumps (removed after each snapshot).
    pub fn scratch(&self) -> PathBuf {
        self.dir.join("scratch")
    }

    fn save(&self) -> Result<(), AgentError> {
        let held = self.lock().clone();
        let path = self.index_path();
        let tmp = self.dir.join("index.json.tmp");
        let werr = |source| AgentError::WriteFile {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&held)
            .map_err(|e| AgentError::Refused(format!("encode the snapshot index: {e}")))?;
        std::fs::write(&tmp, bytes).map_err(werr)?;
        std::fs::rename(&tmp, &path).map_err(werr)
    }

    /// The snapshots held, oldest first.
    pub fn held(&self) -> Vec<Held> {
        let mut v = self.lock().clone();
        v.sort_by_key(|h| h.snapshot.taken);
        v
    }

    /// Snapshots `files` (the objects of one subject) into the store under a new
    /// lease, and announces it; blocking (chunking). Content equal to the newest
    /// snapshot of the same subject re-dates that one instead.
    pub fn take(
        &self,
        subject: Subject,
        service: Option<String>,
        files: &[OutFile],
    ) -> Result<Taken, AgentError> {
        let now = self.clock.now();
        let lease = format!("snap-{}-{}", now.as_millis(), self.lock().len());
        let (manifests, published) = crate::sync::publish(&self.store, &lease, files)?;
        let objects = crate::sync::decode_objects(&manifests)?;
        let contents: Vec<Digest> = objects.iter().map(|o| o.manifest.digest()).collect();
        let ids = crate::sync::chunk_ids(&objects);
        let mut key = serde_json::to_vec(&subject).unwrap_or_default();
        for c in &contents {
            key.extend_from_slice(c.as_bytes());
        }
        let id = Digest::of(&key);
        let mut held = self.lock();
        if let Some(h) = held.iter_mut().find(|h| h.snapshot.id == id) {
            let _ = self.store.release(&lease);
            h.snapshot.taken = now;
            let s = h.snapshot.clone();
            drop(held);
            info!(snapshot = %id, subject = ?s.subject, "snapshot unchanged: re-dated");
            if let Some(inv) = &self.inventory {
                inv.add_snapshot(s.clone());
            }
            self.save()?;
            return Ok(Taken::Unchanged(s));
        }
        // Held until the retention discards it (an hour past its maximum age, in
        // case this agent is down when it should).
        let ttl = self.cfg.max_age() + self.cfg.period() + Duration::from_secs(3600);
        self.store
            .lease_add_in_memory(&lease, ttl, &[])
            .map_err(store_err("renew a snapshot lease"))?;
        self.store
            .persist_lease(&lease)
            .map_err(store_err("persist a snapshot lease"))?;
        let s = Snapshot {
            id,
            host: self.host.clone(),
            subject,
            service,
            taken: now,
            objects: contents,
            bytes: published.raw_bytes,
        };
        held.push(Held {
            snapshot: s.clone(),
            lease,
            chunks: ids.iter().map(Digest::to_hex).collect(),
        });
        drop(held);
        info!(
            snapshot = %id,
            subject = ?s.subject,
            bytes = s.bytes,
            chunks = ids.len(),
            new_chunks = published.new_chunks,
            new_bytes = published.new_frame_bytes,
            "snapshot taken"
        );
        if let Some(inv) = &self.inventory {
            inv.added(&ids);
            inv.add_snapshot(s.clone());
        }
        self.save()?;
        Ok(Taken::New(s))
    }

    /// Discards the snapshots the retention no longer allows: releases their leases
    /// and announces their removal. Returns them.
    pub fn retain(&self) -> Result<Vec<Snapshot>, AgentError> {
        let now = self.clock.now();
        let mut held = self.lock();
        let facts: Vec<(Timestamp, u64)> = held
            .iter()
            .map(|h| (h.snapshot.taken, h.snapshot.bytes))
            .collect();
        let mut drop_idx = to_discard(&facts, now, self.cfg.max_age(), self.cfg.max_bytes);
        if drop_idx.is_empty() {
            return Ok(Vec::new());
        }
        let total: u64 = facts.iter().map(|f| f.1).sum();
        drop_idx.sort_unstable();
        let mut gone = Vec::new();
        for i in drop_idx.into_iter().rev() {
            let h = held.remove(i);
            let age = now.saturating_since(h.snapshot.taken);
            let why = if age > self.cfg.max_age() {
                format!("{}s old, over {}s", age.as_secs(), self.cfg.max_age_secs)
            } else {
                format!(
                    "total {total} bytes over {} (oldest first)",
                    self.cfg.max_bytes
                )
            };
            info!(snapshot = %h.snapshot.id, subject = ?h.snapshot.subject, why, "snapshot discarded");
            if let Err(e) = self.store.release(&h.lease) {
                warn!(lease = %h.lease, error = %e, "releasing a snapshot lease failed");
            }
            if let Some(inv) = &self.inventory {
                inv.remove_snapshot(h.snapshot.id);
            }
            gone.push(h.snapshot);
        }
        drop(held);
        self.save()?;
        Ok(gone)
    }

    /// Keeps the keeper from dumping container `id` until the guard is dropped (a
    /// migration of it is under way), and waits for a dump in progress to finish.
    pub async fn quiet(self: &Arc<Self>, id: &str) -> QuietGuard {
        self.quiet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string());
        drop(self.dumping.lock().await);
        QuietGuard {
            keeper: self.clone(),
            id: id.to_string(),
        }
    }

    fn is_quiet(&self, id: &str) -> bool {
        self.quiet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

/// While alive, the keeper does not dump its container ([`Keeper::quiet`]).
#[derive(Debug)]
pub struct QuietGuard {
    keeper: Arc<Keeper>,
    id: String,
}

impl Drop for QuietGuard {
    fn drop(&mut self) {
        self.keeper
            .quiet
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pass {
    pub taken: Vec<Snapshot>,
    pub unchanged: usize,
    pub discarded: Vec<Snapshot>,
    /// (container, why) of what was not snapshotted.
    pub skipped: Vec<(String, String)>,
}

/// Snapshots one object directory or tar under the keeper on a blocking thread.
async fn take_blocking(
    keeper: &Arc<Keeper>,
    subject: Subject,
    service: Option<String>,
    files: Vec<OutFile>,
) -> Result<Taken, AgentError> {
    let k = keeper.clone();
    tokio::task::spawn_blocking(move || k.take(subject, service, &files))
        .await
        .map_err(|e| AgentError::Refused(format!("snapshot task: {e}")))?
}

/// One pass over the running containers of `node`: a snapshot of every read-write
/// volume (and of the memory, if configured), then the retention.
pub async fn pass(node: &crate::node::Node, keeper: &Arc<Keeper>) -> Pass {
    use xfer_runtime::containerd::{Runtime, TaskState};
    let mut out = Pass::default();
    let rt = node.runtime();
    let list = match rt.list().await {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "snapshot pass: listing containers failed");
            return out;
        }
    };
    let scratch = keeper.scratch();
    for c in list {
        if c.state != Some(TaskState::Running) {
            continue;
        }
        let id = c.id;
        let record = match rt.container(&id).await {
            Ok(r) => r,
            Err(e) => {
                out.skipped.push((id, format!("no record: {e}")));
                continue;
            }
        };
        let vols = match volumes::from_labels(&record.labels) {
            Ok(v) => v,
            Err(e) => {
                out.skipped.push((id, e.to_string()));
                continue;
            }
        };
        let service = match crate::images::info(rt, &record.image).await {
            Ok(Some(i)) => Some(i.manifest.digest),
            _ => None,
        };
        for (i, v) in vols.iter().enumerate() {
            if v.read_only {
                continue;
            }
            let object = v.object_name(i);
            let src = v.host_path(&node.cfg.work_dir, &id, i);
            // The directory itself: publishing streams its tar into the chunker.
            let files = vec![OutFile {
                kind: FileKind::Volume,
                name: object.clone(),
                path: src,
            }];
            let guid = volume_guid(&id, &object);
            let res = take_blocking(keeper, Subject::Volume(guid), service.clone(), files).await;
            match res {
                Ok(Taken::New(s)) => out.taken.push(s),
                Ok(Taken::Unchanged(_)) => out.unchanged += 1,
                Err(e) => {
                    warn!(container = %id, volume = %object, error = %e, "volume snapshot failed");
                    out.skipped.push((id.clone(), format!("{object}: {e}")));
                }
            }
        }
        if keeper.config().memory {
            if keeper.is_quiet(&id) {
                info!(container = %id, "memory snapshot skipped: a migration of it is under way");
                out.skipped.push((id, "being migrated".into()));
                continue;
            }
            let res = {
                let _dumping = keeper.dumping.lock().await;
                if keeper.is_quiet(&id) {
                    Err(AgentError::Refused("being migrated".into()))
                } else {
                    let dir = scratch.join(format!("{id}-memory"));
                    let r = match rt
                        .checkpoint(&id, &dir.join("criu"), &dir.join("work"))
                        .await
                    {
                        Ok(()) => match crate::migrate::criu_files(&dir.join("criu")) {
                            Ok(files) => {
                                take_blocking(
                                    keeper,
                                    Subject::Container(id.clone()),
                                    service.clone(),
                                    files,
                                )
                                .await
                            }
                            Err(e) => Err(e),
                        },
                        Err(source) => Err(AgentError::Runtime {
                            step: xfer_proto::v1::Step::Checkpoint,
                            source,
                        }),
                    };
                    let _ = std::fs::remove_dir_all(&dir);
                    r
                }
            };
            match res {
                Ok(Taken::New(s)) => out.taken.push(s),
                Ok(Taken::Unchanged(_)) => out.unchanged += 1,
                Err(e) => {
                    warn!(container = %id, error = %e, "memory snapshot failed");
                    out.skipped.push((id.clone(), format!("memory: {e}")));
                }
            }
        }
    }
    match keeper.retain() {
        Ok(gone) => out.discarded = gone,
        Err(e) => warn!(error = %e, "snapshot retention failed"),
    }
    out
}

/// Runs [`pass`] every period until the task is aborted.
pub fn spawn(node: crate::node::Node, keeper: Arc<Keeper>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(keeper.config().period());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let p = pass(&node, &keeper).await;
            info!(
                taken = p.taken.len(),
                unchanged = p.unchanged,
                discarded = p.discarded.len(),
                skipped = p.skipped.len(),
                held = keeper.lock().len(),
                "snapshot pass"
            );
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfer_kb::{Change, FakeClock, Inventory, SnapshotQuery};

    const SVC: &str = "sha256:svc";

    struct Fixture {
        _t: tempfile::TempDir,
        root: PathBuf,
        store: Arc<Store>,
        inv: Arc<StoreInventory>,
        clock: Arc<FakeClock>,
    }

    fn fixture() -> Fixture {
        let t = tempfile::tempdir().expect("tmp");
        let root = t.path().to_path_buf();
        let store = Arc::new(Store::open(root.join("store")).expect("store"));
        let clock = Arc::new(FakeClock::new(Timestamp::from_secs(1_000_000)));
        let inv = Arc::new(StoreInventory::new("h3", store.clone(), clock.clone()));
        Fixture {
            _t: t,
            root,
            store,
            inv,
            clock,
        }
    }

    fn keeper(f: &Fixture, cfg: SnapshotConfig) -> Keeper {
        Keeper::open(
            "h3",
            cfg,
            f.store.clone(),
            f.root.join("snapshots"),
            Some(f.inv.clone()),
            f.clock.clone(),
        )
        .expect("keeper")
    }

    fn cfg(max_age_secs: u64, max_bytes: u64) -> SnapshotConfig {
        SnapshotConfig {
            period_secs: 10,
            max_age_secs,
            max_bytes,
            memory: false,
        }
    }

    /// Snapshots volume directory `dir` as volume `guid`, through the migration's tar.
    fn snap_dir(k: &Keeper, f: &Fixture, dir: &Path, guid: &str) -> Taken {
        let tar = f.root.join("v.tar");
        volumes::capture(dir, &tar).expect("capture");
        let files = vec![OutFile {
            kind: FileKind::Volume,
            name: "rw-0".into(),
            path: tar,
        }];
        k.take(Subject::Volume(guid.into()), Some(SVC.into()), &files)
            .expect("take")
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    use std::path::Path;

    #[test]
    fn retention_drops_old_then_oldest_over_size() {
        let t = |s| Timestamp::from_secs(s);
        let now = t(10_000);
        let held = [
            (t(9_000), 10),
            (t(5_000), 10),
            (t(9_900), 10),
            (t(9_500), 10),
        ];
        // Age alone: the one 5000 s old.
        assert_eq!(
            to_discard(&held, now, Duration::from_secs(3600), 100),
            vec![1]
        );
        // Then size: 30 left over 25 -> the oldest of the rest (9000).
        assert_eq!(
            to_discard(&held, now, Duration::from_secs(3600), 25),
            vec![1, 0]
        );
        // Nothing fits: all go, oldest first.
        assert_eq!(
            to_discard(&held, now, Duration::from_secs(3600), 0),
            vec![1, 0, 3, 2]
        );
        // Within both limits: nothing.
        assert!(to_discard(&held, now, Duration::from_secs(6000), 40).is_empty());
    }

    #[test]
    fn snapshots_are_announced_deduplicated_and_discarded() {
        let f = fixture();
        let mut events = f.inv.subscribe();
        let vol = f.root.join("vol");
        std::fs::create_dir_all(&vol).expect("mkdir");
        std::fs::write(vol.join("blob"), random(2_000_000, 1)).expect("write");
        let k = keeper(&f, cfg(3600, 1 << 40));

        // Taken: chunks in the store under a lease, held by the inventory, announced.
        let s1 = match snap_dir(&k, &f, &vol, "c1/rw-0") {
            Taken::New(s) => s,
            other => panic!("expected a new snapshot, got {other:?}"),
        };
        assert!(s1.bytes > 2_000_000, "{}", s1.bytes);
        assert_eq!(s1.host, "h3");
        let held = k.held();
        assert_eq!(held.len(), 1);
        let ids = held[0].chunk_ids();
        assert!(ids.len() > 4, "CDC split the volume: {}", ids.len());
        assert!(
            f.inv.have(&ids).iter().all(|h| *h),
            "the inventory holds the chunks"
        );
        let lease = f
            .store
            .leases()
            .into_iter()
            .find(|l| l.name == held[0].lease);
        assert_eq!(lease.map(|l| l.chunks), Some(ids.len()));
        let q = |q: SnapshotQuery| f.inv.snapshots(&q);
        assert_eq!(q(SnapshotQuery::Volume("c1/rw-0".into())), vec![s1.clone()]);
        assert_eq!(q(SnapshotQuery::Service(SVC.into())).len(), 1);
        assert!(q(SnapshotQuery::Volume("c2/rw-0".into())).is_empty());
        let mut seen = Vec::new();
        while let Ok(e) = events.try_recv() {
            seen.push(e.change);
        }
        assert!(seen
            .iter()
            .any(|c| matches!(c, Change::Add(d) if d.len() == ids.len())));
        assert!(seen
            .iter()
            .any(|c| matches!(c, Change::SnapshotAdd(s) if s.id == s1.id)));

        // The same content again: re-dated, not kept twice.
        f.clock.advance(Duration::from_secs(100));
        match snap_dir(&k, &f, &vol, "c1/rw-0") {
            Taken::Unchanged(s) => {
                assert_eq!(s.id, s1.id);
                assert_eq!(s.taken, s1.taken + Duration::from_secs(100));
            }
            other => panic!("expected unchanged, got {other:?}"),
        }
        assert_eq!(k.held().len(), 1);
        assert_eq!(f.store.leases().len(), 1, "the second lease was released");

        // Changed content: a second snapshot, sharing most chunks with the first.
        let mut data = random(2_000_000, 1);
        data[1_000_000..1_010_000].fill(7);
        std::fs::write(vol.join("blob"), &data).expect("write");
        f.clock.advance(Duration::from_secs(100));
        let before = f.store.ids().len();
        let s2 = snap_dir(&k, &f, &vol, "c1/rw-0").snapshot().clone();
        assert_ne!(s2.id, s1.id);
        let added = f.store.ids().len() - before;
        assert!(
            added * 4 < ids.len(),
            "deduplicated: {added} new of {}",
            ids.len()
        );
        assert_eq!(k.held().len(), 2);
        assert_eq!(q(SnapshotQuery::Volume("c1/rw-0".into())).len(), 2);

        // Age: s1 (re-dated at +100 s) goes once older than the maximum; s2 stays.
        f.clock.advance(Duration::from_secs(3550));
        let gone = k.retain().expect("retain");
        assert_eq!(gone.iter().map(|s| s.id).collect::<Vec<_>>(), vec![s1.id]);
        assert_eq!(q(SnapshotQuery::Volume("c1/rw-0".into())), vec![s2.clone()]);
        assert!(
            f.store.leases().iter().all(|l| l.name != held[0].lease),
            "s1's lease released"
        );
        let mut removed = false;
        while let Ok(e) = events.try_recv() {
            removed |= matches!(e.change, Change::SnapshotRemove(id) if id == s1.id);
        }
        assert!(removed, "the removal was announced");
    }

    #[test]
    fn size_cap_discards_oldest_and_the_index_survives_a_restart() {
        let f = fixture();
        let a = f.root.join("a");
        let b = f.root.join("b");
        for (d, seed) in [(&a, 2), (&b, 3)] {
            std::fs::create_dir_all(d).expect("mkdir");
            std::fs::write(d.join("blob"), random(500_000, seed)).expect("write");
        }
        let k = keeper(&f, cfg(3600, 700_000));
        let sa = snap_dir(&k, &f, &a, "c1/rw-0").snapshot().clone();
        f.clock.advance(Duration::from_secs(1));
        let sb = snap_dir(&k, &f, &b, "c2/rw-0").snapshot().clone();
        let gone = k.retain().expect("retain");
        assert_eq!(gone.iter().map(|s| s.id).collect::<Vec<_>>(), vec![sa.id]);
        drop(k);

        // A restart: the index is loaded and re-announced to a fresh inventory.
        let inv2 = Arc::new(StoreInventory::new("h3", f.store.clone(), f.clock.clone()));
        let k2 = Keeper::open(
            "h3",
            cfg(3600, 700_000),
            f.store.clone(),
            f.root.join("snapshots"),
            Some(inv2.clone()),
            f.clock.clone(),
        )
        .expect("reopen");
        assert_eq!(k2.held().len(), 1);
        assert_eq!(
            inv2.snapshots(&SnapshotQuery::Volume("c2/rw-0".into())),
            vec![sb.clone()]
        );
        // Its chunks gone (collected while the agent was down): dropped at load.
        let ids = k2.held()[0].chunk_ids();
        let lease = k2.held()[0].lease.clone();
        drop(k2);
        f.store.release(&lease).expect("release");
        f.store.remove(&ids[0]).expect("remove a chunk");
        f.store
            .lease("snap-kept", Duration::from_secs(60), &ids[1..])
            .expect("lease");
        let k3 = keeper(&f, cfg(3600, 700_000));
        assert!(
            k3.held().is_empty(),
            "a snapshot with missing chunks is dropped"
        );
        assert_eq!(
            f.store
                .leases()
                .into_iter()
                .map(|l| l.name)
                .collect::<Vec<_>>(),
            vec!["snap-kept".to_string()]
        );
    }
}
