//! `xfer-store`: content addressing for everything xfer moves.
//!
//! Everything that travels between agents becomes *chunks*: byte strings named by the
//! BLAKE3 [`Digest`] of their uncompressed bytes, carried and kept as one zstd
//! [`frame`] each. This crate is synchronous (no tokio): the network layer drives it
//! from blocking tasks.
//!
//! # Map
//!
//! | module | what |
//! | --- | --- |
//! | [`Digest`], [`Hasher`] | BLAKE3 of uncompressed bytes (chunk ids, whole-object digests) |
//! | [`frame`] | one bounded zstd frame (level [`ZSTD_LEVEL`], at most [`MAX_FRAME`] decoded) |
//! | [`chunk`] | splitting: 4 KiB pages with zero pages carried without data ([`chunk::PAGE_SIZE`]); FastCDC for files and tar streams ([`chunk::CdcParams`]) |
//! | [`manifest`] | an object = ordered chunk list + whole-object digest; versioned binary encoding; [`Manifest::rebuild`] |
//! | [`store`] | the on-disk store: frames appended to 256 MiB pack files in fsynced, hash-sealed batches; index rebuilt at open; verify on read, quarantine, leases, GC with pack compaction |
//! | [`patch`] | turning a file rebuilt earlier into the next version of its object, writing only what differs |
//! | [`pipeline`] | the sender's helper: file -> manifest + the compressed chunks a peer lacks, on 2 threads |
//!
//! # How the pieces fit (sender S, receiver D)
//!
//! ```no_run
//! # fn main() -> Result<(), xfer_store::StoreError> {
//! use std::collections::HashSet;
//! use std::time::Duration;
//! use xfer_store::{Manifest, ObjectKind, Pipeline, Store};
//!
//! // S: chunk a CRIU page image; keep what D (per its has-set) lacks.
//! let d_has: HashSet<xfer_store::Digest> = HashSet::new(); // from the have/want exchange
//! let mut to_send = Vec::new();
//! let out = Pipeline::new().run_file(
//!     "/tmp/dump/pages-1.img".as_ref(),
//!     ObjectKind::MemoryPages,
//!     &d_has,
//!     |c| -> Result<(), xfer_store::StoreError> { to_send.push(c); Ok(()) },
//! )?;
//! let manifest_bytes = out.manifest.encode();
//!
//! // D: protect the object's chunks first, then store what arrives, then rebuild.
//! let store = Store::open("/var/lib/xfer/store")?;
//! let manifest = Manifest::decode(&manifest_bytes)?;
//! let ids: Vec<_> = manifest.chunk_ids().collect();
//! store.lease("migration-42", Duration::from_secs(600), &ids)?;
//! let mut batch = store.batch();
//! for c in &to_send {
//!     batch.put_compressed(c.id, &c.frame, c.raw_len)?; // verified before it is kept
//! }
//! batch.commit()?;
//! manifest.rebuild_file(&store, "/tmp/restore/pages-1.img".as_ref())?;
//! store.release("migration-42")?;
//! # Ok(()) }
//! ```

use std::fmt;

pub mod chunk;
mod error;
pub mod frame;
pub mod manifest;
mod pagehash;
pub mod patch;
pub mod pipeline;
pub mod store;
mod sys;

pub use error::{ManifestError, StoreError};
pub use manifest::{ChunkRef, ChunkSource, Manifest, ObjectKind};
pub use pipeline::{ChunkSet, CompressedChunk, FnSet, Pipeline, PipelineOutput};
pub use store::{Batch, GcPolicy, GcReport, LeaseInfo, Stats, Store};

/// Maps and sets keyed by chunk ids: foldhash (seeded per process) instead of
/// SipHash, which costs ~4x as much per 32-byte id on the store's hot paths
/// (index lookups, lease reference counts: ~100 k ids per pre-copy round).
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Largest decoded size of one frame (8 MiB); frames are written at most this big.
pub const MAX_FRAME: usize = 8 << 20;

/// Largest chunk the store, manifests and the wire accept (= [`MAX_FRAME`]): every
/// chunk travels as one frame. The chunkers produce far smaller ones (4 KiB pages,
/// CDC at most [`chunk::CdcParams::DEFAULT`]`.max`).
pub const MAX_CHUNK: usize = MAX_FRAME;

/// zstd level used on the wire: fast (level 1 runs at >1 GB/s on page data here).
pub const ZSTD_LEVEL: i32 = 1;

/// BLAKE3 digest of uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Digest of `data` computed on `threads` threads: the same value as
    /// [`Digest::of`]. BLAKE3 is a tree, so the input is cut into subtrees of at most
    /// 8 MiB along the tree's own boundaries ([`subtree_pieces`]), the threads hash
    /// those to chaining values, and [`root_of_pieces`] merges them. Worth it above a
    /// few MiB (a 400 MB page image: ~120 ms on one thread here, ~60 ms on two).
    pub fn of_parallel(data: &[u8], threads: usize) -> Self {
        const PIECE: u64 = 8 << 20;
        let len = data.len() as u64;
        if threads <= 1 || len <= PIECE {
            return Digest::of(data);
        }
        let parts = subtree_pieces(len, PIECE);
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut cvs = vec![[0u8; 32]; parts.len()];
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(parts.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(off, n)) = parts.get(i) else { break };
                            let piece = &data[off as usize..(off + n) as usize];
                            done.push((i, subtree_cv(piece, off)));
                        }
                        done
                    })
                })
                .collect();
            for w in workers {
                // A worker only hashes; it cannot panic short of a bug in blake3.
                for (i, cv) in w.join().expect("hash worker") {
                    cvs[i] = cv;
                }
            }
        });
        root_of_pieces(len, PIECE, &cvs)
    }

    /// Parses 32 raw bytes, as carried on the wire.
    pub fn from_slice(b: &[u8]) -> Result<Self, StoreError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| StoreError::ParseDigest(b.len()))?;
        Ok(Digest(arr))
    }

    /// Parses 64 hex digits (either case), as in store file names.
    pub fn from_hex(s: &str) -> Result<Self, StoreError> {
        let mut arr = [0u8; 32];
        hex::decode_to_slice(s, &mut arr).map_err(|_| StoreError::ParseDigest(s.len() / 2))?;
        Ok(Digest(arr))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl AsRef<[u8]> for Digest {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

/// A BLAKE3 chaining value: the non-root hash of a subtree of an object.
pub type ChainingValue = [u8; 32];

/// How an object of `len` bytes (more than `piece`, a power of two of at least
/// 1 KiB) splits into BLAKE3 subtrees of at most `piece` bytes, as (offset, length),
/// left to right: every piece but the last is `piece` bytes long at a multiple of
/// `piece` (so batches of a power-of-two size are exactly these pieces).
pub fn subtree_pieces(len: u64, piece: u64) -> Vec<(u64, u64)> {
    fn walk(off: u64, len: u64, piece: u64, out: &mut Vec<(u64, u64)>) {
        if len <= piece {
            out.push((off, len));
        } else {
            let l = blake3::hazmat::left_subtree_len(len);
            walk(off, l, piece, out);
            walk(off + l, len - l, piece, out);
        }
    }
    let mut out = Vec::new();
    walk(0, len, piece, &mut out);
    out
}

/// The chaining value of one piece of [`subtree_pieces`] starting at `offset`.
pub fn subtree_cv(data: &[u8], offset: u64) -> ChainingValue {
    use blake3::hazmat::HasherExt;
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(data)
        .finalize_non_root()
}

/// The digest of an object of `len` bytes (more than `piece`) from the chaining
/// values of its [`subtree_pieces`], in order.
///
/// # Panics
/// If `cvs` has fewer values than the object has pieces.
pub fn root_of_pieces(len: u64, piece: u64, cvs: &[ChainingValue]) -> Digest {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn merge(len: u64, piece: u64, cvs: &mut std::slice::Iter<'_, ChainingValue>) -> ChainingValue {
        if len <= piece {
            return *cvs.next().expect("one chaining value per piece");
        }
        let l = left_subtree_len(len);
        let left = merge(l, piece, cvs);
        let right = merge(len - l, piece, cvs);
        merge_subtrees_non_root(&left, &right, Mode::Hash)
    }
    let mut it = cvs.iter();
    let l = left_subtree_len(len);
    let left = merge(l, piece, &mut it);
    let right = merge(len - l, piece, &mut it);
    Digest(*merge_subtrees_root(&left, &right, Mode::Hash).as_bytes())
}

/// An incremental BLAKE3 hasher over a whole object.
#[derive(Debug, Default, Clone)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    /// A new hasher.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything added.
    pub fn finish(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_digest_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(b"hello world"));
        assert_ne!(Digest::of(b"a"), Digest::of(b"b"));
        assert!(Digest::from_slice(&[0u8; 31]).is_err());
    }

    #[test]
    fn parallel_digest_matches_one_shot() {
        // Lengths around the 8 MiB piece size and the tree's power-of-two splits.
        let mut data = vec![0u8; (40 << 20) + 5000];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
        }
        for len in [
            0,
            1,
            1024,
            (8 << 20) - 1,
            8 << 20,
            (8 << 20) + 1,
            (16 << 20) + 4096,
            (32 << 20) + 1,
            data.len(),
        ] {
            let d = &data[..len];
            for threads in [1, 2, 3] {
                assert_eq!(Digest::of_parallel(d, threads), Digest::of(d), "len {len}");
            }
        }
    }

    #[test]
    fn hex_round_trip() {
        let d = Digest::of(b"x");
        assert_eq!(Digest::from_hex(&d.to_hex()).expect("hex"), d);
        assert!(Digest::from_hex("zz").is_err());
        assert!(Digest::from_hex(&d.to_hex()[..62]).is_err());
    }
}
