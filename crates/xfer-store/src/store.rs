//! The on-disk chunk store: chunks appended to large pack files, an in-memory index.
//!
//! # Layout (`LAYOUT` = `xfer-store 2`)
//!
//! ```text
//! <dir>/LAYOUT                      "xfer-store 2\n"; open refuses anything else (a
//!                                   store of layout 1, one file per chunk, gives
//!                                   StoreError::Layout: remove it, nothing migrates)
//! <dir>/LOCK                        flock(LOCK_EX) while a Store has the directory open
//! <dir>/packs/<seq, 8 hex>.pack     append-only pack files; the highest seq is the
//!                                   active one, the others are sealed (never written)
//! <dir>/leases/<name>.lease         one lease (format below)
//! <dir>/quarantine/<hex>-<raw_len>.zst.<unix-ns>
//!                                   copies of frames that failed verification on read
//! ```
//!
//! # Pack format (version 1, little-endian)
//!
//! ```text
//! header   "XFPK" | version u32 = 1 | seq u32 (= the file name) | reserved u32 = 0
//! record   kind u8 | 3 reserved zero bytes | a u32 | b u32 | c u32 | d u64 | id [32]
//!   chunk      kind 1: a = decoded length, b = frame length, d = write time (unix
//!              ns), id = chunk id; followed by the b bytes of its zstd frame (exactly
//!              as sent on the wire)
//!   tombstone  kind 2: the chunk record of `id` whose frame is at offset d of pack c
//!              was removed (GC, remove, quarantine)
//!   commit     kind 3: ends a batch; a = records in the batch, d = offset of its
//!              first record, id = BLAKE3 of the batch's bytes (from d up to here)
//! ```
//!
//! A pack is written in batches: the records of a [`Batch`] (or of one
//! [`Store::put`], or of the tombstones of one GC run) are appended with one
//! `pwrite`, followed by their commit record, then the file is `fdatasync`ed; only then
//! does the index show them. A pack grows to [`PACK_MAX`] (256 MiB) and is then
//! sealed: the next batch goes to a new pack, created (header written and fsynced,
//! directory fsynced) only after the previous pack's last batch was fsynced.
//!
//! # Atomicity and index recovery
//!
//! The index (id -> pack, offset, lengths, last use) lives in memory and is rebuilt
//! at [`Store::open`] by reading the packs in sequence order, applying chunk records
//! and tombstones of committed batches in file order (a later record of an id
//! supersedes an earlier one; a tombstone removes the entry only if it still points
//! at the removed record). Sealed packs are read for their structure only (record
//! headers; frames are skipped). The active pack is read in full: each batch's
//! BLAKE3 must match its commit record, and the first batch that does not (a crash
//! before its fsync completed: torn, reordered or zero-filled writes) ends the pack,
//! which is truncated there. So a crash loses at most the batches not yet committed,
//! never part of a batch, and never indexes bytes that were not durable.
//!
//! # Reads and verification
//!
//! Every read ([`Store::get`], [`Store::get_compressed`]) `pread`s the frame,
//! decompresses it and checks its BLAKE3 digest (whatever the recovery trusted: bit
//! rot, a flipped byte). A chunk that fails is copied to `quarantine/`, a tombstone
//! is committed, it is dropped from the index and reported as
//! [`StoreError::Missing`] (with the quarantine path), never served; a later `put`
//! of the right bytes stores it again. Readers take the index lock only to look an
//! entry up; the `pread` and the verification run without locks (a pack file being
//! removed by compaction stays readable through its open descriptor).
//!
//! # Leases and garbage collection
//!
//! A lease names a set of chunk ids (present or not yet) and an expiry; while it is
//! live, [`Store::gc`] never removes those chunks. Leases are files, written
//! atomically, reloaded at open. A receiver leases a manifest's ids *before* asking
//! [`Store::has_many`] and fetching, so nothing it relies on can be collected. A lease
//! of a pre-copy migration names ~100 k ids (a 3 MB file): [`Store::lease_add_in_memory`]
//! protects the ids at once and [`Store::persist_lease`] writes the file afterwards,
//! so the write can run beside the fetch (writes of one lease are serialised and
//! always write its current state; a released lease is not written back).
//!
//! [`Store::gc`] first drops expired leases and (with
//! [`GcPolicy::collect_expired`]) removes the chunks they alone protected; then, while
//! the stored (compressed, live) bytes exceed [`GcPolicy::max_bytes`], it removes
//! unleased chunks least recently used first. "Used" = stored or read
//! ([`Store::put`], [`Store::put_compressed`] of a chunk already held, [`Store::get`],
//! [`Store::get_compressed`]); `has`/`has_many` do not count. The time of last use is
//! kept in memory; after a restart it is the chunk's write time (from its record).
//! Nothing used within [`GcPolicy::min_age`] is removed: that covers a writer that
//! found a chunk present and is about to lease it. Removals are committed as
//! tombstones (one batch per GC run). Finally GC compacts: a sealed pack whose live
//! frames fill less than half of it has them (and its tombstones that still matter)
//! copied into the active pack, committed, then the pack file is deleted; an active
//! pack of at least [`COMPACT_MIN`] that is more than half dead is sealed first so
//! that it can be compacted. Disk use is therefore at most about twice the live
//! bytes plus one active pack.
//!
//! # Costs (measured on this project's 2-core VM)
//!
//! - A [`Batch`] is appended with one `pwrite` and one `fdatasync`; 4 KiB page chunks
//!   go in at memory-copy speed plus the frame verification of
//!   [`Batch::put_compressed`] (decompress + BLAKE3).
//! - [`Store::open`] reads sealed packs' record headers and hashes the active pack.
//! - [`Store::has_many`]: one read lock, a foldhash map lookup per id (~20 ns).
//!
//! # Lease file format (version 1)
//!
//! ```text
//! "XFLS" | version u16 = 1 | reserved u16 = 0 | expiry, unix ms u64 | count u64 |
//! count x 32-byte ids | BLAKE3 of everything before (32 bytes)       (little-endian)
//! ```

mod pack;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{frame, Digest, FastMap, FastSet, StoreError, MAX_CHUNK};
use pack::{Found, Records, ScanError, HEADER_LEN, REC_LEN};

const LAYOUT: &str = "xfer-store 2";
const TMP_PREFIX: &str = ".tmp-";
const LEASE_MAGIC: &[u8; 4] = b"XFLS";
const LEASE_VERSION: u16 = 1;
const MAX_LEASE_NAME: usize = 200;

/// Size at which a pack is sealed and the next one started. Large enough that a
/// store of a few GB is a few dozen files (opening, fsync and directory costs stay
/// negligible), small enough that compacting one pack is a short copy.
pub const PACK_MAX: u64 = 256 << 20;
/// An active pack at least this large and more than half dead is sealed by GC so
/// that it can be compacted.
pub const COMPACT_MIN: u64 = 16 << 20;
/// A [`Batch`] holding this many bytes of records commits what it holds and goes on
/// (bounds its memory; chunks are independent, so earlier visibility is harmless).
const BATCH_FLUSH: usize = 8 << 20;

/// Size and content of a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Chunks held.
    pub chunks: u64,
    /// Bytes of their compressed frames.
    pub stored_bytes: u64,
    /// Bytes they decode to.
    pub raw_bytes: u64,
    /// Leases recorded (live or expired but not yet collected).
    pub leases: usize,
    /// Files in `quarantine/` (corrupt chunks found since the directory was last
    /// purged).
    pub quarantined: u64,
    /// Bytes of the pack files on disk (live frames, record headers, and the dead
    /// records GC has not compacted away yet).
    pub pack_bytes: u64,
}

/// What [`Store::gc`] may remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcPolicy {
    /// Cap on stored (compressed) bytes: while above it, unleased chunks are removed,
    /// least recently used first. `None`: no cap.
    pub max_bytes: Option<u64>,
    /// Chunks used more recently than this are never removed.
    pub min_age: Duration,
    /// Also remove chunks whose only protection was a lease that has expired, even
    /// under the cap.
    pub collect_expired: bool,
}

impl Default for GcPolicy {
    /// No size cap, `min_age` 5 minutes, expired leases' chunks collected.
    fn default() -> Self {
        GcPolicy {
            max_bytes: None,
            min_age: Duration::from_secs(300),
            collect_expired: true,
        }
    }
}

/// What [`Store::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks removed, in removal order.
    pub removed: Vec<Digest>,
    /// Stored bytes freed.
    pub freed_bytes: u64,
    /// Leases that had expired and were dropped.
    pub expired_leases: Vec<String>,
    /// Stored bytes after the run.
    pub stored_bytes: u64,
    /// Still above `max_bytes` (what is left is leased or too recently used).
    pub over_cap: bool,
    /// Pack files compacted (their live chunks copied) or dropped.
    pub packs_compacted: usize,
}

/// One lease, as listed by [`Store::leases`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Its name.
    pub name: String,
    /// When it stops protecting its chunks.
    pub expires: SystemTime,
    /// How many distinct chunk ids it names.
    pub chunks: usize,
}

struct Entry {
    pack: u32,
    raw_len: u32,
    stored_len: u32,
    /// Offset of the frame in the pack.
    offset: u64,
    /// Unix time of last use, nanoseconds.
    last_used: AtomicU64,
}

/// A tombstone kept in memory per pack, so compaction can carry the ones that still
/// matter (their target pack exists) without reading the pack again.
#[derive(Clone, Copy)]
struct Tomb {
    id: Digest,
    pack: u32,
    offset: u64,
}

struct PackMeta {
    file: Arc<File>,
    /// File length (committed bytes).
    len: u64,
    /// Bytes of the live frames (those the index points at) in it.
    live: u64,
    tombs: Vec<Tomb>,
}

impl PackMeta {
    /// A pack of `len` committed bytes, nothing indexed in it yet.
    fn new(file: &Arc<File>, len: u64) -> Self {
        PackMeta {
            file: Arc::clone(file),
            len,
            live: 0,
            tombs: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Index {
    map: FastMap<Digest, Entry>,
    stored: u64,
    raw: u64,
    packs: BTreeMap<u32, PackMeta>,
}

impl Index {
    /// Indexes a committed chunk record; a previous entry of the id becomes dead.
    fn insert(&mut self, id: Digest, e: Entry) {
        if let Some(p) = self.packs.get_mut(&e.pack) {
            p.live += e.stored_len as u64;
        }
        self.stored += e.stored_len as u64;
        self.raw += e.raw_len as u64;
        if let Some(old) = self.map.insert(id, e) {
            self.unaccount(&old);
        }
    }

    fn unaccount(&mut self, e: &Entry) {
        if let Some(p) = self.packs.get_mut(&e.pack) {
            p.live -= e.stored_len as u64;
        }
        self.stored -= e.stored_len as u64;
        self.raw -= e.raw_len as u64;
    }

    fn remove(&mut self, id: &Digest) -> Option<Entry> {
        let e = self.map.remove(id)?;
        self.unaccount(&e);
        Some(e)
    }

    /// Removes `id` if its entry is the record at (`pack`, `offset`).
    fn remove_at(&mut self, id: &Digest, pack: u32, offset: u64) -> Option<Entry> {
        match self.map.get(id) {
            Some(e) if e.pack == pack && e.offset == offset => self.remove(id),
            _ => None,
        }
    }

    /// Applies the records of a committed batch of pack `seq`.
    fn apply(&mut self, seq: u32, found: &[Found]) {
        for f in found {
            match *f {
                Found::Chunk {
                    id,
                    offset,
                    raw_len,
                    stored_len,
                    written_ns,
                } => self.insert(
                    id,
                    Entry {
                        pack: seq,
                        raw_len,
                        stored_len,
                        offset,
                        last_used: AtomicU64::new(written_ns),
                    },
                ),
                Found::Tombstone { id, pack, offset } => {
                    self.remove_at(&id, pack, offset);
                    if let Some(p) = self.packs.get_mut(&seq) {
                        p.tombs.push(Tomb { id, pack, offset });
                    }
                }
            }
        }
    }
}

struct Lease {
    expires_ms: u64,
    ids: FastSet<Digest>,
}

#[derive(Default)]
struct Leases {
    by_name: HashMap<String, Lease>,
    /// How many recorded leases (live or expired) name each id.
    refs: FastMap<Digest, u32>,
}

impl Leases {
    fn add_refs<'a>(&mut self, ids: impl IntoIterator<Item = &'a Digest>) {
        for id in ids {
            *self.refs.entry(*id).or_insert(0) += 1;
        }
    }

    fn drop_refs<'a>(&mut self, ids: impl IntoIterator<Item = &'a Digest>) {
        for id in ids {
            if let Some(n) = self.refs.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(id);
                }
            }
        }
    }
}

/// The pack batches are appended to.
struct Active {
    seq: u32,
    file: Arc<File>,
    len: u64,
}

/// A content-addressed chunk store in one directory. `Send + Sync`: share it with an
/// `Arc`; every method takes `&self`. One `Store` per directory (an exclusive `flock`
/// on `LOCK` refuses a second one, in this process or another).
///
/// Lock order: `lease_files`, `leases`, `active`, `index`.
pub struct Store {
    dir: PathBuf,
    packs_dir: PathBuf,
    leases_dir: PathBuf,
    quarantine_dir: PathBuf,
    /// Holds the flock.
    _lock: File,
    pack_max: u64,
    index: RwLock<Index>,
    /// The writer: appends and pack creation are serialised by it.
    active: Mutex<Active>,
    leases: Mutex<Leases>,
    /// Serialises writes and removals of lease files (taken before `leases`), so a
    /// lease file always holds a state the lease had, never an older one than
    /// already written, and a released lease is not written back.
    lease_files: Mutex<()>,
    quarantined: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("stats", &self.stats())
            .finish()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn check_raw_len(raw_len: usize) -> Result<u32, StoreError> {
    if raw_len == 0 || raw_len > MAX_CHUNK {
        return Err(StoreError::ChunkSize(raw_len));
    }
    Ok(raw_len as u32)
}

fn check_lease_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LEASE_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::LeaseName(name.to_string()))
    }
}

/// Parses `<8 lower-case hex>.pack`.
fn parse_pack_name(name: &str) -> Option<u32> {
    let hex = name.strip_suffix(".pack")?;
    if hex.len() != 8
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

fn pack_name(seq: u32) -> String {
    format!("{seq:08x}.pack")
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: takes the directory's lock,
    /// rebuilds the index from the packs (truncating a batch torn by a crash) and
    /// loads the leases.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(dir, PACK_MAX)
    }

    pub(crate) fn open_with(dir: impl AsRef<Path>, pack_max: u64) -> Result<Store, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create", &dir, e))?;

        let lock_path = dir.join("LOCK");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open", &lock_path, e))?;
        if !crate::sys::try_lock_exclusive(&lock)
            .map_err(|e| StoreError::io("lock", &lock_path, e))?
        {
            return Err(StoreError::Locked(dir));
        }

        let layout = dir.join("LAYOUT");
        match fs::read_to_string(&layout) {
            Ok(s) if s.trim_end() == LAYOUT => {}
            Ok(s) => {
                return Err(StoreError::Layout {
                    path: dir,
                    found: s.trim_end().chars().take(64).collect(),
                    expected: LAYOUT,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.join("chunks").exists() {
                    // A layout-1 store that lost its LAYOUT file: refuse it too.
                    return Err(StoreError::Layout {
                        path: dir,
                        found: "(none, chunks/ present)".into(),
                        expected: LAYOUT,
                    });
                }
                write_atomic(&dir, "LAYOUT", format!("{LAYOUT}\n").as_bytes())?;
            }
            Err(e) => return Err(StoreError::io("read", &layout, e)),
        }

        let packs_dir = dir.join("packs");
        let leases_dir = dir.join("leases");
        let quarantine_dir = dir.join("quarantine");
        let mut created = false;
        for d in [&packs_dir, &leases_dir, &quarantine_dir] {
            if !d.is_dir() {
                fs::create_dir(d).map_err(|e| StoreError::io("create", d, e))?;
                created = true;
            }
        }
        if created {
            crate::sys::fsync_dir(&dir)?;
        }

        let (index, active) = load_packs(&packs_dir, &quarantine_dir)?;
        let store = Store {
            index: RwLock::new(index),
            active: Mutex::new(active),
            leases: Mutex::new(Leases::default()),
            lease_files: Mutex::new(()),
            quarantined: AtomicU64::new(0),
            pack_max: pack_max.max(HEADER_LEN + 1),
            dir,
            packs_dir,
            leases_dir,
            quarantine_dir,
            _lock: lock,
        };
        store.load_leases()?;
        store.quarantined.store(
            fs::read_dir(&store.quarantine_dir)
                .map_err(|e| StoreError::io("read dir", &store.quarantine_dir, e))?
                .count() as u64,
            Ordering::Relaxed,
        );
        Ok(store)
    }

    fn load_leases(&self) -> Result<(), StoreError> {
        let mut leases = Leases::default();
        let rd = fs::read_dir(&self.leases_dir)
            .map_err(|e| StoreError::io("read dir", &self.leases_dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| StoreError::io("read dir", &self.leases_dir, e))?;
            let path = ent.path();
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with(TMP_PREFIX) {
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
                continue;
            }
            let Some(lease_name) = name.strip_suffix(".lease") else {
                continue;
            };
            if check_lease_name(lease_name).is_err() {
                continue;
            }
            let bytes = fs::read(&path).map_err(|e| StoreError::io("read", &path, e))?;
            let lease = decode_lease(&bytes).map_err(|reason| StoreError::LeaseFile {
                path: path.clone(),
                reason: reason.to_string(),
            })?;
            leases.add_refs(&lease.ids);
            leases.by_name.insert(lease_name.to_string(), lease);
        }
        *self.lock_leases() = leases;
        Ok(())
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        // A panic while holding the lock cannot leave the map half-updated in a way
        // that matters more than refusing all further work would.
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_active(&self) -> MutexGuard<'_, Active> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_lease_files(&self) -> MutexGuard<'_, ()> {
        self.lease_files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the store holds chunk `id` (per the index; a corrupt frame is found
    /// out on read).
    pub fn has(&self, id: &Digest) -> bool {
        self.read_index().map.contains_key(id)
    }

    /// [`Store::has`] for many ids under one read lock.
    pub fn has_many(&self, ids: &[Digest]) -> Vec<bool> {
        let idx = self.read_index();
        ids.iter().map(|id| idx.map.contains_key(id)).collect()
    }

    /// The ids among `ids` the store lacks, in order.
    pub fn missing(&self, ids: &[Digest]) -> Vec<Digest> {
        let idx = self.read_index();
        ids.iter()
            .filter(|id| !idx.map.contains_key(*id))
            .copied()
            .collect()
    }

    /// Every chunk id held (in no particular order), e.g. to advertise them.
    pub fn ids(&self) -> Vec<Digest> {
        self.read_index().map.keys().copied().collect()
    }

    /// The decoded length of chunk `id`, if held.
    pub fn raw_len(&self, id: &Digest) -> Option<usize> {
        self.read_index().map.get(id).map(|e| e.raw_len as usize)
    }

    /// Where chunk `id`'s frame lies: pack file, offset, length. For inspection and
    /// for tests that damage a chunk on disk.
    pub fn locate(&self, id: &Digest) -> Option<(PathBuf, u64, usize)> {
        let idx = self.read_index();
        let e = idx.map.get(id)?;
        Some((
            self.packs_dir.join(pack_name(e.pack)),
            e.offset,
            e.stored_len as usize,
        ))
    }

    /// Counts and sizes.
    pub fn stats(&self) -> Stats {
        let (chunks, stored_bytes, raw_bytes, pack_bytes) = {
            let idx = self.read_index();
            (
                idx.map.len() as u64,
                idx.stored,
                idx.raw,
                idx.packs.values().map(|p| p.len).sum(),
            )
        };
        Stats {
            chunks,
            stored_bytes,
            raw_bytes,
            leases: self.lock_leases().by_name.len(),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            pack_bytes,
        }
    }

    /// Marks `id` used if held; returns whether it is held.
    fn touch_if_present(&self, id: &Digest) -> bool {
        let idx = self.read_index();
        match idx.map.get(id) {
            Some(e) => {
                e.last_used.store(now_ns(), Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Stores `data` (1..=[`MAX_CHUNK`] bytes) as one chunk and returns its id.
    /// Durable when it returns (one batch of one chunk). A chunk already held is not
    /// rewritten (its last use is refreshed).
    pub fn put(&self, data: &[u8]) -> Result<Digest, StoreError> {
        let mut b = self.batch();
        let id = b.put(data)?;
        b.commit()?;
        Ok(id)
    }

    /// Stores a chunk received as a compressed frame (as [`Store::get_compressed`]
    /// and the pipeline produce it). The frame is decompressed (bounded by `raw_len`)
    /// and its digest checked against `id` before anything is written: a wrong frame
    /// gives [`StoreError::Verify`] (or a frame error) and leaves the store as it was.
    /// Returns true if the chunk was new, false if it was already held.
    pub fn put_compressed(
        &self,
        id: Digest,
        frame_bytes: &[u8],
        raw_len: usize,
    ) -> Result<bool, StoreError> {
        let mut b = self.batch();
        let new = b.put_compressed(id, frame_bytes, raw_len)?;
        b.commit()?;
        Ok(new)
    }

    /// Appends `recs` as one committed batch to the active pack (starting a new pack
    /// first if it would grow past the limit). Returns the pack and the batch's
    /// offset. The caller holds `active` and indexes the records afterwards.
    fn append(&self, active: &mut Active, recs: &mut Records) -> Result<(u32, u64), StoreError> {
        let grows = (recs.buf.len() + REC_LEN) as u64;
        if active.len > HEADER_LEN && active.len + grows > self.pack_max {
            self.roll(active)?;
        }
        let base = active.len;
        recs.finish(base);
        let path = self.packs_dir.join(pack_name(active.seq));
        let r = active
            .file
            .write_all_at(&recs.buf, base)
            .map_err(|e| StoreError::io("write", &path, e))
            .and_then(|()| {
                active
                    .file
                    .sync_data()
                    .map_err(|e| StoreError::io("fdatasync", &path, e))
            });
        if let Err(e) = r {
            // Nothing of it is committed: cut it off (a reopen would too).
            let _ = active.file.set_len(base);
            return Err(e);
        }
        active.len = base + recs.buf.len() as u64;
        Ok((active.seq, base))
    }

    /// Seals the active pack and starts the next one.
    fn roll(&self, active: &mut Active) -> Result<(), StoreError> {
        let seq = active.seq.checked_add(1).ok_or_else(|| {
            StoreError::io(
                "create",
                &self.packs_dir,
                std::io::Error::other("pack sequence exhausted"),
            )
        })?;
        let file = Arc::new(create_pack(&self.packs_dir, seq)?);
        self.write_index()
            .packs
            .insert(seq, PackMeta::new(&file, HEADER_LEN));
        *active = Active {
            seq,
            file,
            len: HEADER_LEN,
        };
        Ok(())
    }

    /// Commits tombstones for entries already dropped from the index: (id, pack,
    /// offset) of each removed record.
    fn commit_tombstones(&self, removed: &[(Digest, u32, u64)]) -> Result<(), StoreError> {
        if removed.is_empty() {
            return Ok(());
        }
        let mut recs = Records::default();
        for (id, pack, offset) in removed {
            recs.tombstone(*id, *pack, *offset);
        }
        let mut active = self.lock_active();
        let (seq, _) = self.append(&mut active, &mut recs)?;
        let mut idx = self.write_index();
        if let Some(p) = idx.packs.get_mut(&seq) {
            p.len = active.len;
            p.tombs.extend(
                removed
                    .iter()
                    .map(|&(id, pack, offset)| Tomb { id, pack, offset }),
            );
        }
        Ok(())
    }

    /// Reads chunk `id`, verified: its decoded bytes.
    pub fn get(&self, id: &Digest) -> Result<Vec<u8>, StoreError> {
        self.read_verified(id).map(|(_, data)| data)
    }

    /// Reads chunk `id`, verified: its compressed frame as stored (send it as is) and
    /// its decoded length.
    pub fn get_compressed(&self, id: &Digest) -> Result<(Vec<u8>, usize), StoreError> {
        self.read_verified(id).map(|(f, data)| (f, data.len()))
    }

    fn read_verified(&self, id: &Digest) -> Result<(Vec<u8>, Vec<u8>), StoreError> {
        // Two rounds at most: the second only if the entry moved (healed by a writer,
        // or compacted) between our read and our quarantine.
        for _ in 0..2 {
            let (file, pack, offset, raw_len, stored_len) = {
                let idx = self.read_index();
                let Some(e) = idx.map.get(id) else {
                    return Err(StoreError::Missing {
                        id: *id,
                        quarantined: None,
                    });
                };
                e.last_used.store(now_ns(), Ordering::Relaxed);
                let Some(p) = idx.packs.get(&e.pack) else {
                    return Err(StoreError::Missing {
                        id: *id,
                        quarantined: None,
                    });
                };
                (
                    Arc::clone(&p.file),
                    e.pack,
                    e.offset,
                    e.raw_len,
                    e.stored_len,
                )
            };
            let mut buf = vec![0u8; stored_len as usize];
            let read = file.read_exact_at(&mut buf, offset);
            match read {
                Ok(()) => {
                    if let Ok(data) = verify_frame(id, &buf, raw_len) {
                        return Ok((buf, data));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // The pack was cut short behind our back: as corrupt.
                    buf.clear();
                }
                Err(e) => {
                    return Err(StoreError::io(
                        "read",
                        self.packs_dir.join(pack_name(pack)),
                        e,
                    ))
                }
            }
            match self.quarantine(id, pack, offset, raw_len, &buf)? {
                Some(quarantined) => {
                    return Err(StoreError::Missing {
                        id: *id,
                        quarantined,
                    })
                }
                None => continue,
            }
        }
        Err(StoreError::Missing {
            id: *id,
            quarantined: None,
        })
    }

    /// Drops a chunk whose frame at (`pack`, `offset`) failed verification: keeps a
    /// copy of what was read (`bytes`) in `quarantine/`, unindexes it and commits a
    /// tombstone. Returns None if the entry no longer points there (the caller reads
    /// again); `Some(None)` if nothing was read to keep.
    fn quarantine(
        &self,
        id: &Digest,
        pack: u32,
        offset: u64,
        raw_len: u32,
        bytes: &[u8],
    ) -> Result<Option<Option<PathBuf>>, StoreError> {
        {
            let mut idx = self.write_index();
            if idx.remove_at(id, pack, offset).is_none() {
                return Ok(None);
            }
        }
        let q = if bytes.is_empty() {
            None
        } else {
            let name = format!("{}-{}.zst.{}", id.to_hex(), raw_len, now_ns());
            write_atomic(&self.quarantine_dir, &name, bytes)?;
            self.quarantined.fetch_add(1, Ordering::Relaxed);
            Some(self.quarantine_dir.join(name))
        };
        self.commit_tombstones(&[(*id, pack, offset)])?;
        Ok(Some(q))
    }

    /// Removes chunk `id` now. Refused with [`StoreError::Leased`] while a recorded
    /// lease (even an expired one not yet collected) names it. Returns whether it was
    /// held.
    pub fn remove(&self, id: &Digest) -> Result<bool, StoreError> {
        let leases = self.lock_leases();
        if leases.refs.contains_key(id) {
            return Err(StoreError::Leased(*id));
        }
        let removed = self.write_index().remove(id);
        drop(leases);
        match removed {
            Some(e) => {
                self.commit_tombstones(&[(*id, e.pack, e.offset)])?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A batch of writes made durable together by [`Batch::commit`]: one write and
    /// one fdatasync for all of them.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            recs: Records::default(),
            pending: Vec::new(),
            ids: FastSet::default(),
            committed: 0,
            flush_failed: false,
        }
    }

    /// Records lease `name` (replacing any lease of that name): until `ttl` from now,
    /// [`Store::gc`] keeps every chunk in `ids`, whether held now or stored later.
    /// Durable when it returns.
    pub fn lease(&self, name: &str, ttl: Duration, ids: &[Digest]) -> Result<(), StoreError> {
        self.set_lease(name, ttl, ids, false)
    }

    /// Adds `ids` to lease `name` (creating it if needed) and renews it to `ttl` from
    /// now.
    pub fn lease_add(&self, name: &str, ttl: Duration, ids: &[Digest]) -> Result<(), StoreError> {
        self.set_lease(name, ttl, ids, true)
    }

    /// The first half of [`Store::lease_add`], so that making the lease durable can
    /// run beside the work it protects: when this returns, [`Store::gc`] keeps
    /// `ids`; [`Store::persist_lease`] then writes the lease file (until it has, a
    /// restart loses the addition). A receiver leases with this before asking
    /// [`Store::has_many`], and persists while it fetches.
    pub fn lease_add_in_memory(
        &self,
        name: &str,
        ttl: Duration,
        ids: &[Digest],
    ) -> Result<(), StoreError> {
        self.set_lease_in_memory(name, ttl, ids, true)
    }

    fn set_lease(
        &self,
        name: &str,
        ttl: Duration,
        ids: &[Digest],
        add: bool,
    ) -> Result<(), StoreError> {
        self.set_lease_in_memory(name, ttl, ids, add)?;
        self.persist_lease(name)
    }

    fn set_lease_in_memory(
        &self,
        name: &str,
        ttl: Duration,
        ids: &[Digest],
        add: bool,
    ) -> Result<(), StoreError> {
        check_lease_name(name)?;
        let now_ms = now_ns() / 1_000_000;
        let expires_ms = now_ms.saturating_add(ttl.as_millis().min(u64::MAX as u128) as u64);
        let mut leases = self.lock_leases();
        let leases = &mut *leases;
        if add {
            if let Some(old) = leases.by_name.get_mut(name) {
                // Only the ids new to the lease change the reference counts.
                old.expires_ms = expires_ms;
                for id in ids {
                    if old.ids.insert(*id) {
                        *leases.refs.entry(*id).or_insert(0) += 1;
                    }
                }
                return Ok(());
            }
        }
        let mut set = FastSet::with_capacity_and_hasher(ids.len(), Default::default());
        set.extend(ids.iter().copied());
        let lease = Lease {
            expires_ms,
            ids: set,
        };
        if let Some(old) = leases.by_name.remove(name) {
            leases.drop_refs(&old.ids);
        }
        leases.add_refs(&lease.ids);
        leases.by_name.insert(name.to_string(), lease);
        Ok(())
    }

    /// Writes lease `name` as it is in memory now (atomically; durable when it
    /// returns). Nothing if it has been released.
    pub fn persist_lease(&self, name: &str) -> Result<(), StoreError> {
        check_lease_name(name)?;
        let _files = self.lock_lease_files();
        let bytes = match self.lock_leases().by_name.get(name) {
            Some(l) => encode_lease(l),
            None => return Ok(()),
        };
        write_atomic(&self.leases_dir, &format!("{name}.lease"), &bytes)
    }

    /// Drops lease `name`. Returns whether it existed.
    pub fn release(&self, name: &str) -> Result<bool, StoreError> {
        check_lease_name(name)?;
        let _files = self.lock_lease_files();
        let mut leases = self.lock_leases();
        if !leases.by_name.contains_key(name) {
            return Ok(false);
        }
        self.remove_lease_file(name)?;
        if let Some(old) = leases.by_name.remove(name) {
            leases.drop_refs(&old.ids);
        }
        Ok(true)
    }

    fn remove_lease_file(&self, name: &str) -> Result<(), StoreError> {
        let path = self.leases_dir.join(format!("{name}.lease"));
        match fs::remove_file(&path) {
            Ok(()) => crate::sys::fsync_dir(&self.leases_dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", &path, e)),
        }
    }

    /// The recorded leases, sorted by name.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        let leases = self.lock_leases();
        let mut v: Vec<_> = leases
            .by_name
            .iter()
            .map(|(name, l)| LeaseInfo {
                name: name.clone(),
                expires: UNIX_EPOCH + Duration::from_millis(l.expires_ms),
                chunks: l.ids.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Garbage collection; see the module docs for the order. Safe to run while other
    /// threads read and write.
    pub fn gc(&self, policy: &GcPolicy) -> Result<GcReport, StoreError> {
        let now = now_ns();
        let cutoff = now.saturating_sub(policy.min_age.as_nanos().min(u64::MAX as u128) as u64);
        let now_ms = now / 1_000_000;
        let mut report = GcReport::default();
        let mut tombs: Vec<(Digest, u32, u64)> = Vec::new();

        // 1. Drop expired leases; remember what they named.
        let mut orphaned: Vec<Digest> = Vec::new();
        {
            let _files = self.lock_lease_files();
            let mut leases = self.lock_leases();
            let mut expired: Vec<String> = leases
                .by_name
                .iter()
                .filter(|(_, l)| l.expires_ms <= now_ms)
                .map(|(n, _)| n.clone())
                .collect();
            expired.sort();
            for name in expired {
                self.remove_lease_file(&name)?;
                if let Some(l) = leases.by_name.remove(&name) {
                    leases.drop_refs(&l.ids);
                    orphaned.extend(l.ids);
                }
                report.expired_leases.push(name);
            }
        }

        let mut try_remove = |id: &Digest, report: &mut GcReport| {
            let leases = self.lock_leases();
            if leases.refs.contains_key(id) {
                return;
            }
            let mut idx = self.write_index();
            let Some(e) = idx.map.get(id) else { return };
            if e.last_used.load(Ordering::Relaxed) > cutoff {
                return;
            }
            if let Some(e) = idx.remove(id) {
                report.removed.push(*id);
                report.freed_bytes += e.stored_len as u64;
                tombs.push((*id, e.pack, e.offset));
            }
        };

        // 2. Chunks whose only protection was an expired lease.
        if policy.collect_expired {
            let mut seen = HashSet::new();
            for id in &orphaned {
                if seen.insert(*id) {
                    try_remove(id, &mut report);
                }
            }
        }

        // 3. Size cap: least recently used unleased chunks first.
        if let Some(cap) = policy.max_bytes {
            if self.read_index().stored > cap {
                let mut order: Vec<(u64, Digest)> = {
                    let idx = self.read_index();
                    idx.map
                        .iter()
                        .map(|(id, e)| (e.last_used.load(Ordering::Relaxed), *id))
                        .collect()
                };
                order.sort_unstable();
                for (_, id) in order {
                    if self.read_index().stored <= cap {
                        break;
                    }
                    try_remove(&id, &mut report);
                }
            }
        }
        self.commit_tombstones(&tombs)?;

        // 4. Compaction.
        report.packs_compacted = self.compact()?;
        report.stored_bytes = self.read_index().stored;
        report.over_cap = policy.max_bytes.is_some_and(|c| report.stored_bytes > c);
        Ok(report)
    }

    /// Compacts the packs that are more than half dead; returns how many.
    fn compact(&self) -> Result<usize, StoreError> {
        {
            // An active pack that is big enough and mostly dead is sealed first.
            let mut active = self.lock_active();
            let half_dead = {
                let idx = self.read_index();
                idx.packs
                    .get(&active.seq)
                    .is_some_and(|p| p.len >= COMPACT_MIN && p.live * 2 < p.len - HEADER_LEN)
            };
            if half_dead {
                self.roll(&mut active)?;
            }
        }
        let victims: Vec<u32> = {
            let active = self.lock_active().seq;
            let idx = self.read_index();
            idx.packs
                .iter()
                .filter(|(seq, p)| {
                    **seq != active && (p.live == 0 || p.live * 2 < p.len - HEADER_LEN)
                })
                .map(|(seq, _)| *seq)
                .collect()
        };
        for seq in &victims {
            self.compact_pack(*seq)?;
        }
        Ok(victims.len())
    }

    /// Copies the live chunks of sealed pack `seq`, and its tombstones whose target
    /// pack still exists, into the active pack; then deletes it.
    fn compact_pack(&self, seq: u32) -> Result<(), StoreError> {
        let path = self.packs_dir.join(pack_name(seq));
        let (file, live, tombs) = {
            let idx = self.read_index();
            let Some(p) = idx.packs.get(&seq) else {
                return Ok(());
            };
            let mut live: Vec<(Digest, u64, u32, u32, u64)> = idx
                .map
                .iter()
                .filter(|(_, e)| e.pack == seq)
                .map(|(id, e)| {
                    (
                        *id,
                        e.offset,
                        e.raw_len,
                        e.stored_len,
                        e.last_used.load(Ordering::Relaxed),
                    )
                })
                .collect();
            live.sort_unstable_by_key(|l| l.1);
            let tombs: Vec<Tomb> = p
                .tombs
                .iter()
                .filter(|t| t.pack != seq && idx.packs.contains_key(&t.pack))
                .copied()
                .collect();
            (Arc::clone(&p.file), live, tombs)
        };
        // Copy in slices of at most BATCH_FLUSH bytes.
        let mut i = 0;
        let mut tombs_left = Some(tombs);
        while i < live.len() || tombs_left.is_some() {
            let mut recs = Records::default();
            let mut moved = Vec::new();
            let carried = tombs_left.take().unwrap_or_default();
            for t in &carried {
                recs.tombstone(t.id, t.pack, t.offset);
            }
            let mut frame = Vec::new();
            while i < live.len() && recs.buf.len() < BATCH_FLUSH {
                let (id, offset, raw_len, stored_len, used) = live[i];
                i += 1;
                frame.resize(stored_len as usize, 0);
                file.read_exact_at(&mut frame, offset)
                    .map_err(|e| StoreError::io("read", &path, e))?;
                let at = recs.chunk(id, raw_len, &frame, used);
                moved.push((id, offset, at, raw_len, stored_len, used));
            }
            if recs.is_empty() {
                break;
            }
            let mut active = self.lock_active();
            let (to, base) = self.append(&mut active, &mut recs)?;
            let mut idx = self.write_index();
            for (id, old, at, raw_len, stored_len, used) in moved {
                // Only if nobody removed or replaced it meanwhile; otherwise the copy
                // is dead on arrival.
                if idx.remove_at(&id, seq, old).is_some() {
                    idx.insert(
                        id,
                        Entry {
                            pack: to,
                            raw_len,
                            stored_len,
                            offset: base + at,
                            last_used: AtomicU64::new(used),
                        },
                    );
                }
            }
            if let Some(p) = idx.packs.get_mut(&to) {
                p.len = active.len;
                p.tombs.extend(carried);
            }
        }
        // Everything live in it now lives elsewhere (committed): drop the file.
        {
            let _active = self.lock_active();
            let mut idx = self.write_index();
            if idx.map.values().any(|e| e.pack == seq) {
                // A writer cannot add to a sealed pack; only a racing compaction
                // could leave entries here. Keep the pack.
                return Ok(());
            }
            idx.packs.remove(&seq);
        }
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove", &path, e)),
        }
        crate::sys::fsync_dir(&self.packs_dir)
    }

    /// Deletes the files in `quarantine/`; returns how many.
    pub fn purge_quarantine(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        let rd = fs::read_dir(&self.quarantine_dir)
            .map_err(|e| StoreError::io("read dir", &self.quarantine_dir, e))?;
        for ent in rd {
            let p = ent
                .map_err(|e| StoreError::io("read dir", &self.quarantine_dir, e))?
                .path();
            fs::remove_file(&p).map_err(|e| StoreError::io("remove", &p, e))?;
            n += 1;
        }
        self.quarantined.store(0, Ordering::Relaxed);
        Ok(n)
    }
}

/// Creates pack `seq` durably: header written and fsynced, directory fsynced.
fn create_pack(packs_dir: &Path, seq: u32) -> Result<File, StoreError> {
    let path = packs_dir.join(pack_name(seq));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    f.write_all_at(&pack::encode_header(seq), 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| StoreError::io("write", &path, e))?;
    crate::sys::fsync_dir(packs_dir)?;
    Ok(f)
}

/// Reads every pack in sequence order into an index; returns it and the active
/// pack (the newest, its torn tail cut off; created if there is none).
fn load_packs(packs_dir: &Path, quarantine_dir: &Path) -> Result<(Index, Active), StoreError> {
    let mut seqs = Vec::new();
    let rd = fs::read_dir(packs_dir).map_err(|e| StoreError::io("read dir", packs_dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| StoreError::io("read dir", packs_dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = parse_pack_name(name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    let mut idx = Index::default();
    let mut active: Option<Active> = None;
    let newest = seqs.last().copied();
    for seq in seqs {
        let path = packs_dir.join(pack_name(seq));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        let is_newest = Some(seq) == newest;
        let scan = match pack::scan(&file, &path, seq, is_newest) {
            Ok(s) => s,
            Err(ScanError::Io(e)) => return Err(e),
            Err(ScanError::Header) => {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                if is_newest && len <= HEADER_LEN {
                    // Torn at creation: nothing was ever committed to it.
                    drop(file);
                    fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
                    crate::sys::fsync_dir(packs_dir)?;
                    continue;
                }
                // Not a pack this build can read: set aside, never served.
                let q = quarantine_dir.join(format!("{}.{}", pack_name(seq), now_ns()));
                fs::rename(&path, &q).map_err(|e| StoreError::io("quarantine", &path, e))?;
                crate::sys::fsync_dir(packs_dir)?;
                crate::sys::fsync_dir(quarantine_dir)?;
                continue;
            }
        };
        let file = Arc::new(file);
        if is_newest {
            let len = file
                .metadata()
                .map_err(|e| StoreError::io("stat", &path, e))?
                .len();
            if scan.valid_len < len {
                file.set_len(scan.valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| StoreError::io("truncate", &path, e))?;
            }
            active = Some(Active {
                seq,
                file: Arc::clone(&file),
                len: scan.valid_len,
            });
        }
        idx.packs.insert(seq, PackMeta::new(&file, scan.valid_len));
        idx.apply(seq, &scan.found);
    }
    let active = match active {
        Some(a) => a,
        None => {
            let seq = idx.packs.keys().next_back().map_or(1, |s| s + 1);
            let file = Arc::new(create_pack(packs_dir, seq)?);
            idx.packs.insert(seq, PackMeta::new(&file, HEADER_LEN));
            Active {
                seq,
                file,
                len: HEADER_LEN,
            }
        }
    };
    Ok((idx, active))
}

/// Decompresses `frame_bytes` (bounded by `raw_len`) and checks its digest.
fn verify_frame(id: &Digest, frame_bytes: &[u8], raw_len: u32) -> Result<Vec<u8>, StoreError> {
    // A frame is never larger than zstd's bound for its content: refuse padding
    // (e.g. appended skippable frames) before it reaches the disk.
    let bound = zstd::zstd_safe::compress_bound(raw_len as usize);
    if frame_bytes.len() > bound {
        return Err(StoreError::FrameSize {
            got: frame_bytes.len(),
            want: bound,
        });
    }
    let data = frame::decode(frame_bytes, raw_len as usize)?;
    let got = Digest::of(&data);
    if got != *id {
        return Err(StoreError::Verify { want: *id, got });
    }
    Ok(data)
}

fn write_file(path: &Path, bytes: &[u8], fsync: bool) -> Result<(), StoreError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| StoreError::io("create", path, e))?;
    f.write_all(bytes)
        .map_err(|e| StoreError::io("write", path, e))?;
    if fsync {
        f.sync_all().map_err(|e| StoreError::io("fsync", path, e))?;
    }
    Ok(())
}

/// Writes `dir/name` atomically and durably (temporary file, fsync, rename, fsync dir).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{TMP_PREFIX}{name}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let path = dir.join(name);
    let result = write_file(&tmp, bytes, true)
        .and_then(|()| fs::rename(&tmp, &path).map_err(|e| StoreError::io("rename", &path, e)))
        .and_then(|()| crate::sys::fsync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn encode_lease(l: &Lease) -> Vec<u8> {
    let mut v = Vec::with_capacity(24 + l.ids.len() * 32 + 32);
    v.extend_from_slice(LEASE_MAGIC);
    v.extend_from_slice(&LEASE_VERSION.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&l.expires_ms.to_le_bytes());
    v.extend_from_slice(&(l.ids.len() as u64).to_le_bytes());
    for id in &l.ids {
        v.extend_from_slice(&id.0);
    }
    let sum = Digest::of(&v);
    v.extend_from_slice(&sum.0);
    v
}

fn decode_lease(b: &[u8]) -> Result<Lease, &'static str> {
    if b.len() < 24 + 32 {
        return Err("truncated");
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Digest::of(body).0 != sum {
        return Err("checksum mismatch");
    }
    if &body[..4] != LEASE_MAGIC {
        return Err("bad magic");
    }
    if u16::from_le_bytes([body[4], body[5]]) != LEASE_VERSION {
        return Err("unknown version");
    }
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&body[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let expires_ms = u64_at(8);
    let count = u64_at(16);
    let ids_bytes = &body[24..];
    if ids_bytes.len() % 32 != 0 || (ids_bytes.len() / 32) as u64 != count {
        return Err("id count does not match length");
    }
    let ids: Vec<Digest> = ids_bytes
        .chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            Digest(a)
        })
        .collect();
    Ok(Lease {
        expires_ms,
        ids: ids.into_iter().collect(),
    })
}

/// Writes collected by [`Store::batch`]: each `put` verifies (or compresses) the chunk
/// and adds its record to a buffer in memory; [`Batch::commit`] appends them all to
/// the active pack with one write and one `fdatasync`, then indexes them. Chunks
/// become visible (`has`, `get`) at commit. A batch whose buffer reaches 8 MiB
/// commits what it holds and goes on (so chunks may become visible before
/// [`Batch::commit`]; a dropped batch keeps what it committed so far). Dropping a
/// batch discards what was not committed.
pub struct Batch<'a> {
    store: &'a Store,
    recs: Records,
    /// (id, frame offset in `recs`, raw_len, stored_len) of each chunk record.
    pending: Vec<(Digest, u64, u32, u32)>,
    ids: FastSet<Digest>,
    committed: usize,
    /// An automatic flush failed: the chunks it held are lost, so the batch must not
    /// report success at commit.
    flush_failed: bool,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Batch<'_> {
    /// Adds a chunk by its bytes; returns its id.
    pub fn put(&mut self, data: &[u8]) -> Result<Digest, StoreError> {
        check_raw_len(data.len())?;
        let id = Digest::of(data);
        if self.ids.contains(&id) || self.store.touch_if_present(&id) {
            return Ok(id);
        }
        let frame_bytes = frame::encode(data)?;
        self.add(id, &frame_bytes, data.len() as u32)?;
        Ok(id)
    }

    /// Adds a chunk received compressed; verified as in [`Store::put_compressed`].
    /// Returns true if it is new (to the store and to this batch).
    pub fn put_compressed(
        &mut self,
        id: Digest,
        frame_bytes: &[u8],
        raw_len: usize,
    ) -> Result<bool, StoreError> {
        let raw_len = check_raw_len(raw_len)?;
        if self.ids.contains(&id) || self.store.touch_if_present(&id) {
            return Ok(false);
        }
        verify_frame(&id, frame_bytes, raw_len)?;
        self.add(id, frame_bytes, raw_len)?;
        Ok(true)
    }

    fn add(&mut self, id: Digest, frame_bytes: &[u8], raw_len: u32) -> Result<(), StoreError> {
        let at = self.recs.chunk(id, raw_len, frame_bytes, now_ns());
        self.ids.insert(id);
        self.pending
            .push((id, at, raw_len, frame_bytes.len() as u32));
        if self.recs.buf.len() >= BATCH_FLUSH {
            if let Err(e) = self.flush() {
                self.flush_failed = true;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Chunks waiting for commit.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing waits for commit.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends and indexes what is pending.
    fn flush(&mut self) -> Result<(), StoreError> {
        if self.recs.is_empty() {
            return Ok(());
        }
        let mut recs = std::mem::take(&mut self.recs);
        let pending = std::mem::take(&mut self.pending);
        self.ids.clear();
        let store = self.store;
        let mut active = store.lock_active();
        let (seq, base) = store.append(&mut active, &mut recs)?;
        let mut idx = store.write_index();
        if let Some(p) = idx.packs.get_mut(&seq) {
            p.len = active.len;
        }
        let now = now_ns();
        for (id, at, raw_len, stored_len) in &pending {
            // Another writer may have committed the same chunk meanwhile: the later
            // record wins, the earlier one is dead (the scan at open agrees).
            idx.insert(
                *id,
                Entry {
                    pack: seq,
                    raw_len: *raw_len,
                    stored_len: *stored_len,
                    offset: base + at,
                    last_used: AtomicU64::new(now),
                },
            );
        }
        self.committed += pending.len();
        Ok(())
    }

    /// Makes every chunk of the batch durable and visible; returns how many were
    /// written (including those an 8 MiB flush committed earlier).
    /// If an automatic flush failed earlier, the chunks it held were not stored and
    /// this returns an error (after storing what is still pending).
    pub fn commit(mut self) -> Result<usize, StoreError> {
        self.flush()?;
        if self.flush_failed {
            return Err(StoreError::io(
                "commit",
                &self.store.packs_dir,
                std::io::Error::other("an earlier flush of this batch failed"),
            ));
        }
        Ok(self.committed)
    }
}

#[cfg(test)]
mod tests;
