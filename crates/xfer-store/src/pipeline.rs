//! The sender's chunk pipeline: an object in, its [`Manifest`] and the compressed
//! chunks a peer lacks out.
//!
//! For every chunk it detects zero chunks, hashes the rest (BLAKE3), looks the id up in
//! the caller's has-set (what the destination already holds, the previous round's
//! chunks, ...) and in the ids already emitted for this object, and compresses only
//! chunks that are new. The calling thread reads the input and cuts it (pages or
//! FastCDC); `threads` workers (default 2: this project's machines have 2 cores) do the
//! per-chunk work on 4 MiB batches. The whole-object digest of a paged object is
//! hashed by the workers too: a power-of-two batch of a page image is exactly one
//! subtree of the object's BLAKE3 tree ([`crate::subtree_pieces`]), so each worker
//! hashes its batch to a chaining value and the calling thread merges them at the end
//! ([`crate::root_of_pieces`]); for files and tar streams (FastCDC batches are not
//! aligned) the calling thread hashes the object as it reads. New chunks reach the sink in
//! object order, on the calling thread, as they are ready, so the network layer can
//! stream them while the rest of the object is still being chunked.
//!
//! Incompressible chunks skip zstd (see [`crate::frame`]); zero chunks are neither
//! hashed (their id is a constant) nor compressed. The full pages of a batch are
//! hashed 16 at a time, one page per SIMD lane (`crate::pagehash`): hashing pages
//! one by one left most lanes idle. [`Pipeline::run_file`] maps a page image instead
//! of reading it (no copy through the reading thread).
//!
//! # Throughput (`examples/bench_pipeline.rs`, 2026-11-22, this project's 2-core VM)
//!
//! Latest (branch `pack`, bench/results/chunks.md): on the same kind of 400 MB redis
//! dump the pipeline does 690-727 MB per CPU-second (500 before the 16-page hashing,
//! the mapping and exact-size frames), i.e. ~1.3-1.4 GB/s if both cores are its own;
//! measured wall rates were 498-956 MB/s under a load average of 3-7. The figures
//! below are the earlier ones.
//!
//! A 400.4 MB CRIU page image of redis-server holding 1M keys of 256 B (ratio 18.8 at
//! zstd level 1), after the workers took over the whole-object hash (wall figures on a
//! machine shared with another engineer's builds, load average 3-4):
//!
//! | input | pipeline, 2 workers, nothing held | pipeline, everything held (a round with no change) | `zstd -1 -T2` CLI | `b3sum --num-threads 2` |
//! | --- | --- | --- | --- | --- |
//! | redis dump, 400.4 MB | 805 MB/s wall; 445 /CPU-s | 2,309; 1,335 /CPU-s | 1,046; 817 /CPU-s | 4,262; 2,860 /CPU-s |
//! | same, before (reading thread hashed the object) | 443; 435 /CPU-s | 1,255; 1,251 /CPU-s | 915; 852 /CPU-s | 5,299; 2,860 /CPU-s |
//!
//! On these pages one thread compresses 4 KiB pages at ~960 MB/s (level 1; level -1:
//! ~1,210 MB/s for ratio 17.9, level -5 ~1,210 for 9.9) and hashes them at ~2,080 MB/s;
//! with the whole-object hash that is ~0.85 CPU-s per 400 MB, so 2 idle cores would
//! reach ~0.9 GB/s. Level 1 stays: -1 would save ~10 % of the CPU for 5 % more bytes,
//! and costs much more ratio on text pages (below).
//!
//! The figures of 2026-11-21 (before the workers hashed the whole object):
//!
//! Medians of 5 runs, input from the page cache, MB = 10^6 bytes of input. The VM ran
//! other engineers' builds meanwhile (load average 3-4 on 2 cores), so wall-clock
//! figures vary by up to 2x between runs; "per CPU-s" (input bytes per second of
//! user + system time) does not depend on that load, and a contender that keeps both
//! cores busy approaches twice it on an idle machine.
//!
//! | input | pipeline, 2 workers | pipeline, 1 worker | pipeline, nothing new (has-set = all) | `zstd -1 -T2` CLI | BLAKE3 alone, 1 thread |
//! | --- | --- | --- | --- | --- | --- |
//! | real CRIU dump, 301.6 MB (python3: 80 MB zero, 100 MB random, 100 MB text, 20 MB repeated pages) | 442 MB/s wall; 347 /CPU-s | 326; 368 /CPU-s | 1,441; 1,508 /CPU-s | 563; 457 /CPU-s | 2,203; 2,320 /CPU-s |
//! | synthetic pages, 300 MB (1/2 zero, 1/4 random, 1/4 text) | 994; 517 /CPU-s | 675; 517 /CPU-s | 1,354; 1,364 /CPU-s | 703; 462 /CPU-s | 2,495; 2,500 /CPU-s |
//! | random, 256 MB, as pages | 1,054; 569 /CPU-s | 903; 640 /CPU-s | 2,355; 1,280 /CPU-s | 1,144; 1,164 /CPU-s | 2,415; 2,327 /CPU-s |
//! | random, 256 MB, FastCDC 16/64/256 KiB | 563; 569 /CPU-s | 566; 582 /CPU-s | 893; 853 /CPU-s | 1,566; 1,067 /CPU-s | 2,424; 2,327 /CPU-s |
//! | tar of /usr/lib/x86_64-linux-gnu, 713.7 MB, FastCDC | 520; 294 /CPU-s | 299; 288 /CPU-s | 845; 952 /CPU-s | 228; 321 /CPU-s | 2,075; 2,855 /CPU-s |
//!
//! (b3sum is not installed here, so the BLAKE3 baseline is the `blake3` crate in one
//! pass, one thread. The tar row is from a second, busier run.)
//!
//! What bounds it:
//! - Pages that are zero, repeated, already held by the peer or incompressible run
//!   at 1.3-2.4 GB/s (hashing: per page plus the whole object).
//! - Compressible pages cost what zstd level 1 costs on 4 KiB inputs: ~210-230 MB per
//!   CPU-second on the text pages of the real dump (~280 for the same text as one
//!   stream, so per-page framing costs ~20 %). On the real dump that caps the
//!   pipeline at ~700 MB/s on 2 idle cores; it reaches ~1 GB/s on the synthetic and
//!   random page files. Negative zstd levels were measured at only +20-30 % speed on
//!   that text for a much worse ratio (2.9 -> 2.2), so level 1 stays.
//! - Files and tar streams: the reading thread's FastCDC cut search (1.2-1.5 GB/s)
//!   plus the whole-object hash bound it at ~600-800 MB/s; compression of tar chunks
//!   (ratio 2.8) costs more than that.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::BuildHasher;
use std::io::Read;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::chunk::{cdc_cut, is_zero, zero_digest, CdcParams, PAGE_SIZE};
use crate::frame::Encoder;
use crate::{ChunkRef, Digest, Hasher, Manifest, ObjectKind, Store, StoreError};

/// A set of chunk ids the pipeline may skip ("the peer has these").
pub trait ChunkSet: Sync {
    /// Whether `id` is in the set.
    fn contains(&self, id: &Digest) -> bool;
}

impl<S: BuildHasher + Sync> ChunkSet for HashSet<Digest, S> {
    fn contains(&self, id: &Digest) -> bool {
        HashSet::contains(self, id)
    }
}

impl ChunkSet for BTreeSet<Digest> {
    fn contains(&self, id: &Digest) -> bool {
        BTreeSet::contains(self, id)
    }
}

/// The store's index: skip what this store holds.
impl ChunkSet for Store {
    fn contains(&self, id: &Digest) -> bool {
        self.has(id)
    }
}

/// The empty set: every chunk is new.
impl ChunkSet for () {
    fn contains(&self, _: &Digest) -> bool {
        false
    }
}

/// The union of two sets.
impl<A: ChunkSet, B: ChunkSet> ChunkSet for (A, B) {
    fn contains(&self, id: &Digest) -> bool {
        self.0.contains(id) || self.1.contains(id)
    }
}

impl<T: ChunkSet + ?Sized> ChunkSet for &T {
    fn contains(&self, id: &Digest) -> bool {
        (**self).contains(id)
    }
}

/// A predicate as a [`ChunkSet`].
#[derive(Debug, Clone, Copy)]
pub struct FnSet<F>(pub F);

impl<F: Fn(&Digest) -> bool + Sync> ChunkSet for FnSet<F> {
    fn contains(&self, id: &Digest) -> bool {
        (self.0)(id)
    }
}

/// One chunk, compressed as it is stored and sent: a zstd frame that decodes to
/// `raw_len` bytes hashing to `id`. [`Store::put_compressed`] takes it as is.
#[derive(Clone, PartialEq, Eq)]
pub struct CompressedChunk {
    /// BLAKE3 of the decoded bytes.
    pub id: Digest,
    /// Decoded length.
    pub raw_len: usize,
    /// One zstd frame.
    pub frame: Vec<u8>,
}

impl std::fmt::Debug for CompressedChunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressedChunk")
            .field("id", &self.id)
            .field("raw_len", &self.raw_len)
            .field("frame_len", &self.frame.len())
            .finish()
    }
}

/// What a pipeline run produced besides the chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineOutput {
    /// The object's manifest.
    pub manifest: Manifest,
    /// Chunks handed to the sink.
    pub new_chunks: u64,
    /// Their decoded bytes.
    pub new_raw_bytes: u64,
    /// Their compressed bytes.
    pub new_frame_bytes: u64,
    /// Bytes in zero chunks (carried without data).
    pub zero_bytes: u64,
    /// Bytes in chunks the has-set had or that occurred earlier in the object.
    pub dup_bytes: u64,
}

/// Configuration of the chunk pipeline. `Pipeline::new()` = 2 worker threads, 4 MiB
/// batches, [`CdcParams::DEFAULT`].
#[derive(Debug, Clone)]
pub struct Pipeline {
    threads: usize,
    batch_bytes: usize,
    cdc: CdcParams,
}

impl Default for Pipeline {
    fn default() -> Self {
        Pipeline {
            threads: 2,
            batch_bytes: 4 << 20,
            cdc: CdcParams::DEFAULT,
        }
    }
}

/// A batch's bytes: read into a pooled buffer, or a range of a mapped file.
enum JobBuf {
    Owned(Vec<u8>),
    Mapped(Arc<crate::sys::Mmap>, usize, usize),
}

impl JobBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            JobBuf::Owned(v) => v,
            JobBuf::Mapped(m, start, end) => &m.bytes()[*start..*end],
        }
    }
}

impl Default for JobBuf {
    fn default() -> Self {
        JobBuf::Owned(Vec::new())
    }
}

struct Job {
    seq: u64,
    buf: JobBuf,
    /// Chunk end offsets in `buf`; chunks start at 0 and follow each other.
    cuts: Vec<usize>,
    /// Where the batch starts in the object when the worker hashes it as a subtree
    /// of the whole-object digest (paged objects in power-of-two batches); `None`:
    /// the reading thread hashes the object.
    tree_offset: Option<u64>,
}

#[derive(Default)]
struct Done {
    seq: u64,
    buf: JobBuf,
    entries: Vec<ChunkRef>,
    chunks: Vec<CompressedChunk>,
    zero_bytes: u64,
    dup_bytes: u64,
    /// The batch's chaining value in the whole-object tree, and for the first batch
    /// also its plain digest (the object's, if it is the only batch).
    cv: Option<crate::ChainingValue>,
    first_digest: Option<Digest>,
}

const SHARDS: usize = 16;

impl Pipeline {
    /// The default configuration.
    pub fn new() -> Self {
        Self::default()
    }

    /// Worker threads for hashing and compression (at least 1).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Bytes per batch handed to a worker (rounded up to whole pages; at least 64 KiB).
    pub fn batch_bytes(mut self, n: usize) -> Self {
        self.batch_bytes = n.max(64 << 10).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        self
    }

    /// FastCDC sizes for files and tar streams.
    pub fn cdc(mut self, p: CdcParams) -> Self {
        self.cdc = p;
        self
    }

    /// Chunks the file at `path`; see [`Pipeline::run`].
    pub fn run_file<S, E, F>(
        &self,
        path: &Path,
        kind: ObjectKind,
        has: &S,
        sink: F,
    ) -> Result<PipelineOutput, E>
    where
        S: ChunkSet + ?Sized,
        E: From<StoreError>,
        F: FnMut(CompressedChunk) -> Result<(), E>,
    {
        let f = std::fs::File::open(path).map_err(|e| E::from(StoreError::io("open", path, e)))?;
        if kind.is_paged() && self.batch_bytes.is_power_of_two() {
            // Page images (CRIU's, which the agent alone writes) are mapped rather
            // than read: the workers hash and compress the page cache in place, and
            // the 4 KiB-page copy `read` costs (~9% of the pipeline's CPU on a 400 MB
            // dump) goes away.
            let len = f
                .metadata()
                .map_err(|e| E::from(StoreError::io("stat", path, e)))?
                .len();
            if len > 0 {
                let len = usize::try_from(len).map_err(|_| {
                    E::from(StoreError::io(
                        "map",
                        path,
                        std::io::Error::other("too large"),
                    ))
                })?;
                let map = crate::sys::Mmap::map(&f, len, path).map_err(E::from)?;
                return self.run_inner(kind, std::io::empty(), Some(Arc::new(map)), has, sink);
            }
        }
        self.run(kind, f, has, sink)
    }

    /// Chunks `input` as `kind` (4 KiB pages for memory, FastCDC otherwise), hands
    /// every data chunk that `has` lacks and that did not occur earlier in the object
    /// to `sink` (compressed, in object order, on this thread), and returns the
    /// manifest. A sink error stops the run and is returned.
    pub fn run<R, S, E, F>(
        &self,
        kind: ObjectKind,
        input: R,
        has: &S,
        sink: F,
    ) -> Result<PipelineOutput, E>
    where
        R: Read,
        S: ChunkSet + ?Sized,
        E: From<StoreError>,
        F: FnMut(CompressedChunk) -> Result<(), E>,
    {
        self.run_inner(kind, input, None, has, sink)
    }

    fn run_inner<R, S, E, F>(
        &self,
        kind: ObjectKind,
        mut input: R,
        mapped: Option<Arc<crate::sys::Mmap>>,
        has: &S,
        mut sink: F,
    ) -> Result<PipelineOutput, E>
    where
        R: Read,
        S: ChunkSet + ?Sized,
        E: From<StoreError>,
        F: FnMut(CompressedChunk) -> Result<(), E>,
    {
        let seen: [Mutex<crate::FastSet<Digest>>; SHARDS] =
            std::array::from_fn(|_| Mutex::new(crate::FastSet::default()));
        let (job_tx, job_rx) = mpsc::sync_channel::<Job>(self.threads * 2);
        // Only the workers own the receiving end: if they all stop (even by a panic),
        // sends fail instead of blocking forever, and the scope re-raises the panic.
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Result<Done, StoreError>>();

        std::thread::scope(|s| {
            for i in 0..self.threads {
                let done_tx = done_tx.clone();
                let (job_rx, seen) = (Arc::clone(&job_rx), &seen);
                std::thread::Builder::new()
                    .name(format!("xfer-chunk-{i}"))
                    .spawn_scoped(s, move || worker(&job_rx, done_tx, has, seen))
                    .map_err(|e| E::from(StoreError::Spawn(e)))?;
            }
            drop(job_rx);
            drop(done_tx);
            // Dropping `job_tx` (on return, error or not) stops the workers.
            self.feed(kind, &mut input, mapped, job_tx, &done_rx, &mut sink)
        })
    }

    /// The calling thread's part: read, cut, hash the whole object, dispatch batches,
    /// and assemble results in order.
    fn feed<R, E, F>(
        &self,
        kind: ObjectKind,
        input: &mut R,
        mapped: Option<Arc<crate::sys::Mmap>>,
        job_tx: mpsc::SyncSender<Job>,
        done_rx: &mpsc::Receiver<Result<Done, StoreError>>,
        sink: &mut F,
    ) -> Result<PipelineOutput, E>
    where
        R: Read,
        E: From<StoreError>,
        F: FnMut(CompressedChunk) -> Result<(), E>,
    {
        let paged = kind.is_paged();
        // A CDC buffer holds a batch plus the lookahead a cut needs.
        let buf_len = if paged {
            self.batch_bytes
        } else {
            self.batch_bytes + 2 * self.cdc.max
        };
        let mut pool: Vec<Vec<u8>> = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        let mut whole = Hasher::new();
        // Paged objects in power-of-two batches: the batches are exactly the pieces
        // of the whole-object BLAKE3 tree (see `crate::subtree_pieces`), so the
        // workers hash them and this thread only reads.
        let tree = paged && self.batch_bytes.is_power_of_two();
        let mut offset = 0u64;
        let mut asm = Assembler::default();
        let mut sent = 0u64;
        let mut eof = false;

        while !eof {
            if let Some(m) = &mapped {
                // A mapped page image: batches are ranges of the mapping, no copy.
                let total = m.bytes().len();
                let start = offset as usize;
                let end = (start + self.batch_bytes).min(total);
                eof = end == total;
                if start == end {
                    continue;
                }
                let tree_offset = tree.then_some(offset);
                if !tree {
                    whole.update(&m.bytes()[start..end]);
                }
                offset = end as u64;
                let job = Job {
                    seq: sent,
                    buf: JobBuf::Mapped(Arc::clone(m), start, end),
                    cuts: crate::chunk::pages(end - start).map(|r| r.end).collect(),
                    tree_offset,
                };
                if job_tx.send(job).is_err() {
                    break;
                }
                sent += 1;
                while let Ok(done) = done_rx.try_recv() {
                    asm.accept(done?, sink)?;
                }
                continue;
            }
            let mut buf = pool.pop().unwrap_or_else(|| vec![0u8; buf_len]);
            buf[..carry.len()].copy_from_slice(&carry);
            let mut filled = carry.len();
            carry.clear();
            let fresh = filled;
            while filled < buf_len {
                match input.read(&mut buf[filled..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(E::from(StoreError::Read(e))),
                }
            }
            let tree_offset = tree.then_some(offset);
            if !tree {
                whole.update(&buf[fresh..filled]);
            }
            offset += (filled - fresh) as u64;

            let mut cuts = Vec::new();
            if paged {
                cuts.extend(crate::chunk::pages(filled).map(|r| r.end));
            } else {
                let mut pos = 0;
                while let Some(n) = cdc_cut(&buf[pos..filled], &self.cdc, eof) {
                    pos += n;
                    cuts.push(pos);
                }
                carry.extend_from_slice(&buf[pos..filled]);
            }
            if cuts.is_empty() {
                pool.push(buf);
                continue;
            }
            let job = Job {
                seq: sent,
                buf: JobBuf::Owned(buf),
                cuts,
                tree_offset,
            };
            // Blocks while the workers are busy (bounded queue); results keep arriving
            // on the unbounded channel meanwhile.
            if job_tx.send(job).is_err() {
                // Every worker has gone: one of them reported why (below).
                break;
            }
            sent += 1;
            while let Ok(done) = done_rx.try_recv() {
                pool.extend(asm.accept(done?, sink)?);
            }
        }
        drop(job_tx);
        while asm.next < sent {
            let Ok(done) = done_rx.recv() else {
                break;
            };
            asm.accept(done?, sink)?;
        }
        while let Ok(done) = done_rx.try_recv() {
            // A worker's error after the input ended or a send failed.
            done?;
        }
        if asm.next < sent || !eof {
            // Unreachable unless a worker died without reporting.
            return Err(E::from(StoreError::Spawn(std::io::Error::other(
                "a pipeline worker stopped early",
            ))));
        }
        let digest = if !tree {
            whole.finish()
        } else if offset <= self.batch_bytes as u64 {
            // One batch (or none): its plain digest is the object's.
            asm.first_digest.unwrap_or_else(|| Digest::of(&[]))
        } else {
            crate::root_of_pieces(offset, self.batch_bytes as u64, &asm.cvs)
        };
        let manifest = Manifest::new(kind, digest, std::mem::take(&mut asm.entries))?;
        Ok(PipelineOutput {
            manifest,
            new_chunks: asm.new_chunks,
            new_raw_bytes: asm.new_raw_bytes,
            new_frame_bytes: asm.new_frame_bytes,
            zero_bytes: asm.zero_bytes,
            dup_bytes: asm.dup_bytes,
        })
    }

    /// Runs the pipeline and collects the new chunks in a vector.
    pub fn collect<R: Read, S: ChunkSet + ?Sized>(
        &self,
        kind: ObjectKind,
        input: R,
        has: &S,
    ) -> Result<(PipelineOutput, Vec<CompressedChunk>), StoreError> {
        let mut chunks = Vec::new();
        let out = self.run(kind, input, has, |c| -> Result<(), StoreError> {
            chunks.push(c);
            Ok(())
        })?;
        Ok((out, chunks))
    }
}

/// Puts finished batches back in order.
#[derive(Default)]
struct Assembler {
    next: u64,
    waiting: BTreeMap<u64, Done>,
    entries: Vec<ChunkRef>,
    new_chunks: u64,
    new_raw_bytes: u64,
    new_frame_bytes: u64,
    zero_bytes: u64,
    dup_bytes: u64,
    /// Chaining values of the batches, in order (tree mode).
    cvs: Vec<crate::ChainingValue>,
    first_digest: Option<Digest>,
}

impl Assembler {
    /// Takes a finished batch; emits every batch now in order. Returns the buffers
    /// to reuse.
    fn accept<E, F>(&mut self, done: Done, sink: &mut F) -> Result<Vec<Vec<u8>>, E>
    where
        F: FnMut(CompressedChunk) -> Result<(), E>,
    {
        self.waiting.insert(done.seq, done);
        let mut bufs = Vec::new();
        while let Some(mut d) = self.waiting.remove(&self.next) {
            self.next += 1;
            self.entries.append(&mut d.entries);
            self.zero_bytes += d.zero_bytes;
            self.dup_bytes += d.dup_bytes;
            self.cvs.extend(d.cv);
            if d.first_digest.is_some() {
                self.first_digest = d.first_digest;
            }
            if let JobBuf::Owned(b) = std::mem::take(&mut d.buf) {
                bufs.push(b);
            }
            for c in d.chunks {
                self.new_chunks += 1;
                self.new_raw_bytes += c.raw_len as u64;
                self.new_frame_bytes += c.frame.len() as u64;
                sink(c)?;
            }
        }
        Ok(bufs)
    }
}

fn worker<S: ChunkSet + ?Sized>(
    jobs: &Mutex<mpsc::Receiver<Job>>,
    done: mpsc::Sender<Result<Done, StoreError>>,
    has: &S,
    seen: &[Mutex<crate::FastSet<Digest>>; SHARDS],
) {
    let mut enc = match Encoder::new() {
        Ok(e) => e,
        Err(e) => {
            let _ = done.send(Err(e));
            return;
        }
    };
    let zero_page = zero_digest(PAGE_SIZE);
    let hasher = crate::pagehash::PageHasher::new();
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let r = process(job, &mut enc, &hasher, has, seen, zero_page);
        let failed = r.is_err();
        if done.send(r).is_err() || failed {
            return;
        }
    }
}

fn process<S: ChunkSet + ?Sized>(
    job: Job,
    enc: &mut Encoder,
    hasher: &crate::pagehash::PageHasher,
    has: &S,
    seen: &[Mutex<crate::FastSet<Digest>>; SHARDS],
    zero_page: Digest,
) -> Result<Done, StoreError> {
    let mut d = Done {
        seq: job.seq,
        entries: Vec::with_capacity(job.cuts.len()),
        ..Done::default()
    };
    let buf = job.buf.bytes();
    if let Some(off) = job.tree_offset {
        let end = job.cuts.last().copied().unwrap_or(0);
        let data = &buf[..end];
        if off == 0 {
            d.first_digest = Some(Digest::of(data));
        }
        d.cv = Some(crate::subtree_cv(data, off));
    }
    // Full non-zero pages are hashed together, 16 at a time (see `crate::pagehash`).
    let mut zero = Vec::with_capacity(job.cuts.len());
    let mut pages: Vec<&[u8; crate::pagehash::PAGE]> = Vec::with_capacity(job.cuts.len());
    let mut start = 0;
    for &end in &job.cuts {
        let data = &buf[start..end];
        start = end;
        let z = is_zero(data);
        zero.push(z);
        if !z {
            if let Ok(p) = <&[u8; crate::pagehash::PAGE]>::try_from(data) {
                pages.push(p);
            }
        }
    }
    let mut page_ids = Vec::with_capacity(pages.len());
    hasher.hash(&pages, &mut page_ids);
    let mut page_ids = page_ids.into_iter();
    let mut start = 0;
    for (&end, &z) in job.cuts.iter().zip(&zero) {
        let data = &buf[start..end];
        start = end;
        if z {
            let id = if data.len() == PAGE_SIZE {
                zero_page
            } else {
                zero_digest(data.len())
            };
            d.entries.push(ChunkRef::zero_with_id(id, data.len()));
            d.zero_bytes += data.len() as u64;
            continue;
        }
        let id = match (data.len() == crate::pagehash::PAGE)
            .then(|| page_ids.next())
            .flatten()
        {
            Some(id) => id,
            None => Digest::of(data),
        };
        d.entries.push(ChunkRef::data(id, data.len())?);
        let new = !has.contains(&id)
            && seen[id.0[0] as usize % SHARDS]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        if new {
            d.chunks.push(CompressedChunk {
                id,
                raw_len: data.len(),
                frame: enc.encode(data)?,
            });
        } else {
            d.dup_bytes += data.len() as u64;
        }
    }
    d.buf = job.buf;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(len: usize, seed: u64) -> Vec<u8> {
        // Pages: zero, noise, text, and a repeat of an earlier page.
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(len);
        let text = b"the quick brown fox jumps over the lazy dog 0123456789 ";
        while v.len() < len {
            let page = v.len() / PAGE_SIZE;
            match page % 5 {
                0 => v.extend(std::iter::repeat_n(0u8, PAGE_SIZE)),
                1 => v.extend((0..PAGE_SIZE).map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })),
                2 | 3 => v.extend(text.iter().cycle().take(PAGE_SIZE)),
                _ => {
                    let first = v[PAGE_SIZE..2 * PAGE_SIZE].to_vec();
                    v.extend(first)
                }
            }
        }
        v.truncate(len);
        v
    }

    #[test]
    fn pipeline_matches_single_threaded_manifest_and_rebuilds() {
        let data = sample(3 << 20, 7);
        for kind in [ObjectKind::MemoryPages, ObjectKind::Tar] {
            let p = Pipeline::new().batch_bytes(256 << 10);
            let (out, chunks) = p.collect(kind, &data[..], &()).expect("pipeline");
            let (m, _) = Manifest::from_bytes(kind, &data);
            assert_eq!(out.manifest, m, "{kind:?}");
            // Every distinct data chunk exactly once (with 2 workers, the order in
            // which repeated pages are first emitted depends on timing).
            let mut ids: Vec<_> = chunks.iter().map(|c| c.id).collect();
            let mut want: Vec<_> = m.chunk_ids().collect();
            ids.sort_unstable_by_key(|d| *d.as_bytes());
            want.sort_unstable_by_key(|d| *d.as_bytes());
            assert_eq!(ids, want);
            assert_eq!(
                out.zero_bytes + out.dup_bytes + out.new_raw_bytes,
                data.len() as u64
            );

            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            let mut b = store.batch();
            for c in &chunks {
                assert!(b.put_compressed(c.id, &c.frame, c.raw_len).expect("put"));
            }
            b.commit().expect("commit");
            let mut rebuilt = Vec::new();
            out.manifest.rebuild(&store, &mut rebuilt).expect("rebuild");
            assert!(rebuilt == data);

            // A second run against the store sends nothing.
            let (again, none) = p.collect(kind, &data[..], &store).expect("pipeline");
            assert!(none.is_empty());
            assert_eq!(again.manifest, m);
        }
    }

    #[test]
    fn sink_errors_stop_the_run() {
        let data = sample(2 << 20, 3);
        let r = Pipeline::new().batch_bytes(64 << 10).run(
            ObjectKind::MemoryPages,
            &data[..],
            &(),
            |_| Err(StoreError::ChunkSize(0)),
        );
        assert!(matches!(r, Err(StoreError::ChunkSize(0))));
    }

    #[test]
    fn a_panicking_worker_fails_the_run_instead_of_hanging() {
        let data = sample(4 << 20, 5);
        let r = std::panic::catch_unwind(|| {
            let boom = FnSet(|_: &Digest| -> bool { panic!("has-set failed") });
            Pipeline::new()
                .batch_bytes(64 << 10)
                .collect(ObjectKind::MemoryPages, &data[..], &boom)
        });
        assert!(r.is_err());
    }

    #[test]
    fn empty_input() {
        let (out, chunks) = Pipeline::new()
            .collect(ObjectKind::File, &[][..], &())
            .expect("pipeline");
        assert!(chunks.is_empty());
        assert_eq!(out.manifest.length(), 0);
        assert_eq!(out.manifest.digest(), Digest::of(b""));
    }

    #[test]
    fn a_mapped_page_file_gives_what_reading_it_gives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = 64 << 10;
        for len in [0usize, 1, 4096, b, 3 * b + 4096 + 17] {
            let mut data = sample(len, len as u64 + 7);
            // Some zero pages and a repeated page.
            if len >= 3 * b {
                data[4096..8192].fill(0);
                let (a, rest) = data.split_at_mut(b);
                rest[..4096].copy_from_slice(&a[8192..12288]);
            }
            let path = dir.path().join(format!("pages-{len}.img"));
            std::fs::write(&path, &data).expect("write");
            for threads in [1, 2] {
                let p = Pipeline::new().threads(threads).batch_bytes(b);
                let (want, want_chunks) = p
                    .collect(ObjectKind::MemoryPages, &data[..], &())
                    .expect("read");
                let mut got_chunks = Vec::new();
                let got = p
                    .run_file(&path, ObjectKind::MemoryPages, &(), |c| {
                        got_chunks.push(c);
                        Ok::<_, StoreError>(())
                    })
                    .expect("mapped");
                assert_eq!(got.manifest.encode(), want.manifest.encode(), "len {len}");
                assert_eq!(got.manifest.digest(), Digest::of(&data), "len {len}");
                // As sets: with 2 workers, which occurrence of a repeated page is
                // emitted (so the order) depends on which worker saw it first.
                let ids = |v: &[CompressedChunk]| {
                    let mut v: Vec<_> = v.iter().map(|c| (c.id, c.frame.clone())).collect();
                    v.sort();
                    v
                };
                assert_eq!(ids(&got_chunks), ids(&want_chunks), "len {len}");
            }
        }
    }

    #[test]
    fn workers_hash_page_batches_as_subtrees_of_the_object_digest() {
        // Batch boundaries: none, one partial, exactly one, exact multiples, a tail.
        let b = 64 << 10;
        for len in [
            1,
            4096,
            b - 1,
            b,
            b + 1,
            2 * b,
            3 * b,
            4 * b + 4096 + 17,
            9 * b,
        ] {
            let data = sample(len, len as u64);
            for threads in [1, 2] {
                let p = Pipeline::new().threads(threads).batch_bytes(b);
                let (out, _) = p
                    .collect(ObjectKind::MemoryPages, &data[..], &())
                    .expect("pipeline");
                assert_eq!(out.manifest.digest(), Digest::of(&data), "len {len}");
            }
        }
        // Not a power of two: the reading thread hashes, same digest.
        let data = sample(1 << 20, 3);
        let p = Pipeline::new().batch_bytes(96 << 10);
        let (out, _) = p
            .collect(ObjectKind::MemoryPages, &data[..], &())
            .expect("pipeline");
        assert_eq!(out.manifest.digest(), Digest::of(&data));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn pipeline_round_trips(
            len in 0usize..300_000,
            seed in any::<u64>(),
            threads in 1usize..4,
            paged in any::<bool>(),
        ) {
            let data = sample(len, seed);
            let kind = if paged { ObjectKind::MemoryPages } else { ObjectKind::File };
            let p = Pipeline::new()
                .threads(threads)
                .batch_bytes(64 << 10)
                .cdc(CdcParams::new(1024, 4096, 16384).expect("params"));
            let (out, chunks) = p.collect(kind, &data[..], &()).expect("pipeline");
            prop_assert_eq!(out.manifest.length(), len as u64);
            let by_id: std::collections::HashMap<_, _> = chunks
                .iter()
                .map(|c| (c.id, crate::frame::decode(&c.frame, c.raw_len).expect("frame")))
                .collect();
            let mut rebuilt = Vec::new();
            for c in out.manifest.chunks() {
                if c.is_zero() {
                    rebuilt.extend(std::iter::repeat_n(0u8, c.len()));
                } else {
                    rebuilt.extend_from_slice(&by_id[&c.id()]);
                }
            }
            prop_assert!(rebuilt == data);
            prop_assert_eq!(Digest::of(&rebuilt), out.manifest.digest());
        }
    }
}
