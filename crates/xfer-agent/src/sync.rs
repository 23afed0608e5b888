//! Content-addressed state transfer between agents.
//!
//! The source turns every object of a round (each file of a CRIU image directory, and
//! in the final round the writable-layer diff) into chunks in its store: 4 KiB pages
//! for `pages-*.img` (zero pages carried without data), content-defined chunks for the
//! rest. It sends the destination only the manifests (`Sync`); the destination asks
//! its own store which chunks it lacks and fetches those from the source's `Chunks`
//! service (the fallback source; neighbours can be added as candidates). Chunks a
//! destination got in an earlier round are never sent again, which is what makes
//! pre-copy rounds shrink the cut-over: only pages that changed since the last round
//! travel while the task is frozen. In the final round the destination rebuilds each
//! file byte for byte from its manifest and checks the whole-object BLAKE3.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use xfer_proto::v1::{FileKind, ObjectManifest};
use xfer_store::manifest::{Manifest, ObjectKind};
use xfer_store::pipeline::Pipeline;
use xfer_store::{Digest, Store};

use tracing::{debug, warn};

use crate::error::AgentError;
use crate::transfer::OutFile;

/// How long chunks of an in-flight migration are leased (renewed every round).
pub const LEASE_TTL: Duration = Duration::from_secs(3600);

/// What publishing a round cost and produced.
#[derive(Debug, Default, Clone, Copy)]
pub struct Published {
    /// Bytes of the objects.
    pub raw_bytes: u64,
    /// Chunks new to this store, and their compressed bytes.
    pub new_chunks: u64,
    pub new_frame_bytes: u64,
}

/// Which chunking an object gets.
pub fn object_kind(kind: FileKind, name: &str) -> ObjectKind {
    if kind == FileKind::CriuImage && name.starts_with("pages-") && name.ends_with(".img") {
        ObjectKind::MemoryPages
    } else if kind == FileKind::RootfsDiff || kind == FileKind::Volume {
        ObjectKind::Tar
    } else {
        ObjectKind::File
    }
}

fn store_err(what: &str) -> impl FnOnce(xfer_store::StoreError) -> AgentError + '_ {
    move |source| AgentError::Store {
        what: what.to_string(),
        source,
    }
}

/// Chunks the tar of directory `dir` ([`crate::volumes::capture_into`]) as it is
/// written: a thread writes the tar into a bounded in-memory pipe that the pipeline
/// reads, so no copy of the directory lands on disk and the two run side by side.
fn publish_dir<F>(
    pipeline: &Pipeline,
    dir: &Path,
    kind: ObjectKind,
    store: &Store,
    sink: F,
) -> Result<xfer_store::pipeline::PipelineOutput, AgentError>
where
    F: FnMut(xfer_store::pipeline::CompressedChunk) -> Result<(), xfer_store::StoreError>,
{
    let (w, r) = pipe::pipe(4);
    std::thread::scope(|sc| {
        let writer = sc.spawn(move || crate::volumes::capture_into(dir, w)?.finish());
        let res = pipeline.run(kind, r, store, sink);
        // A failed tar ends the pipe early: that manifest is of a cut tar, so the
        // tar's own result decides first.
        let tar = writer
            .join()
            .map_err(|_| AgentError::Refused(format!("the tar of {} panicked", dir.display())))?;
        tar?;
        res.map_err(store_err("chunk a directory's tar"))
    })
}

/// Unpacks the volume tar `manifest` describes straight from the store's chunks into
/// the new directory `into` (a thread rebuilds the tar into an in-memory pipe that the
/// unpacker reads: no tar file is read or written). The chunks are immutable, so this
/// may run beside rounds that patch the tar file. The tar is verified (whole-object
/// digest) at its end; on any error `into` is removed. Returns where each regular
/// file lay in the tar.
pub fn stage_volume(
    store: &Store,
    manifest: &Manifest,
    into: &Path,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<crate::volumes::TarIndex, AgentError> {
    let werr = |source| AgentError::WriteFile {
        path: into.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into).map_err(werr)?;
    let (mut w, r) = pipe::pipe(4);
    let res = std::thread::scope(|sc| {
        let writer = sc.spawn(move || {
            manifest
                .rebuild(store, &mut w)
                .map_err(store_err("rebuild a volume's tar"))?;
            w.finish()
        });
        // The tar's end blocks (and what follows) are read too, so the writer ends
        // normally; an error drops the reader: a writer still sending sees a broken
        // pipe and ends.
        let mut r = Stoppable { inner: r, stop };
        let unpacked = crate::volumes::unpack_into_indexed(&mut r, into)
            .and_then(|index| std::io::copy(&mut r, &mut std::io::sink()).map(|_| index))
            .map_err(werr);
        drop(r);
        let built = writer
            .join()
            .map_err(|_| AgentError::Refused("the volume tar's rebuild panicked".into()))?;
        built?;
        unpacked
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(into);
    }
    res
}

/// A reader that fails once `stop` is set (a staging no longer wanted).
struct Stoppable<'a, R> {
    inner: R,
    stop: &'a std::sync::atomic::AtomicBool,
}

impl<R: std::io::Read> std::io::Read for Stoppable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::other("staging stopped"));
        }
        self.inner.read(buf)
    }
}

/// A bounded in-memory byte pipe between two threads (1 MiB blocks).
mod pipe {
    use std::io;
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

    const BLOCK: usize = 1 << 20;

    /// Makes a pipe holding at most `depth` blocks in flight.
    pub fn pipe(depth: usize) -> (Writer, Reader) {
        let (tx, rx) = sync_channel(depth);
        (
            Writer {
                tx,
                buf: Vec::with_capacity(BLOCK),
            },
            Reader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
        )
    }

    pub struct Writer {
        tx: SyncSender<Vec<u8>>,
        buf: Vec<u8>,
    }

    impl Writer {
        fn send(&mut self) -> io::Result<()> {
            let full = std::mem::replace(&mut self.buf, Vec::with_capacity(BLOCK));
            self.tx
                .send(full)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the chunker stopped"))
        }

        /// Sends what is buffered; the reader sees the end once this is dropped.
        pub fn finish(mut self) -> Result<(), crate::error::AgentError> {
            if !self.buf.is_empty() {
                self.send()
                    .map_err(|e| crate::error::AgentError::Refused(e.to_string()))?;
            }
            Ok(())
        }
    }

    impl io::Write for Writer {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let n = data.len().min(BLOCK - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            if self.buf.len() == BLOCK {
                self.send()?;
            }
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    pub struct Reader {
        rx: Receiver<Vec<u8>>,
        cur: Vec<u8>,
        pos: usize,
    }

    impl io::Read for Reader {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            while self.pos == self.cur.len() {
                match self.rx.recv() {
                    Ok(b) => {
                        self.cur = b;
                        self.pos = 0;
                    }
                    // The writer is gone: the end (its result says whether complete).
                    Err(_) => return Ok(0),
                }
            }
            let n = out.len().min(self.cur.len() - self.pos);
            out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[cfg(test)]
    mod tests {
        use std::io::{Read, Write};

        #[test]
        fn bytes_cross_in_order_and_end_when_the_writer_is_done() {
            let (mut w, mut r) = super::pipe(2);
            let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let d = data.clone();
            let t = std::thread::spawn(move || {
                for part in d.chunks(7777) {
                    w.write_all(part).expect("write");
                }
                w.finish().expect("finish");
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).expect("read");
            t.join().expect("writer");
            assert_eq!(got, data);
        }

        #[test]
        fn a_gone_reader_breaks_the_writer() {
            let (mut w, r) = super::pipe(1);
            drop(r);
            let err = w.write_all(&vec![0u8; 3 << 20]).expect_err("must fail");
            assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
        }
    }
}

/// Chunks `files` into `store` (blocking; call from a blocking thread) and leases
/// every chunk they reference under `lease`, in memory (a file whose path is a
/// directory is published as that directory's tar, streamed): persist the lease
/// ([`Store::persist_lease`]) before the round ends. Returns their manifests.
pub fn publish(
    store: &Store,
    lease: &str,
    files: &[OutFile],
) -> Result<(Vec<ObjectManifest>, Published), AgentError> {
    let pipeline = Pipeline::new();
    let mut out = Vec::with_capacity(files.len());
    let mut stats = Published::default();
    let mut ids: Vec<Digest> = Vec::new();
    // One batch for the whole round: one commit (and its fsyncs), not one per file
    // (a CRIU image directory has ~30 files).
    let mut batch = store.batch();
    for f in files {
        let kind = object_kind(f.kind, &f.name);
        let mode = match std::fs::metadata(&f.path) {
            // A directory goes as its tar: the mode a captured tar file has.
            Ok(m) if m.is_dir() => 0o644,
            Ok(m) => std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
            Err(_) => 0o600,
        };
        let t = std::time::Instant::now();
        let sink = |c: xfer_store::pipeline::CompressedChunk| {
            batch.put_compressed(c.id, &c.frame, c.raw_len)?;
            Ok::<_, xfer_store::StoreError>(())
        };
        let res = if f.path.is_dir() {
            publish_dir(&pipeline, &f.path, kind, store, sink)?
        } else {
            pipeline
                .run_file(&f.path, kind, store, sink)
                .map_err(store_err("chunk a file"))?
        };
        debug!(
            file = %f.name,
            bytes = res.manifest.length(),
            new_chunks = res.new_chunks,
            chunk_ms = t.elapsed().as_secs_f64() * 1000.0,
            "published"
        );
        stats.raw_bytes += res.manifest.length();
        stats.new_chunks += res.new_chunks;
        stats.new_frame_bytes += res.new_frame_bytes;
        ids.extend(res.manifest.chunk_ids());
        out.push(ObjectManifest {
            kind: f.kind as i32,
            name: f.name.clone(),
            manifest: res.manifest.encode(),
            mode,
        });
    }
    let t = std::time::Instant::now();
    batch.commit().map_err(store_err("commit chunks"))?;
    debug!(
        ms = t.elapsed().as_secs_f64() * 1000.0,
        "round's chunks committed"
    );
    let t = std::time::Instant::now();
    // In memory only: the caller persists it (`Store::persist_lease`) while the
    // destination fetches.
    store
        .lease_add_in_memory(lease, LEASE_TTL, &ids)
        .map_err(store_err("lease chunks"))?;
    debug!(
        ids = ids.len(),
        ms = t.elapsed().as_secs_f64() * 1000.0,
        "leased"
    );
    Ok((out, stats))
}

/// A decoded manifest with where its file goes.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: FileKind,
    pub name: String,
    pub manifest: Manifest,
    pub mode: u32,
}

/// Decodes and checks the manifests of a `Sync` request (bytes from the network).
pub fn decode_objects(objects: &[ObjectManifest]) -> Result<Vec<Incoming>, AgentError> {
    objects
        .iter()
        .map(|o| {
            let kind = xfer_proto::require_file_kind(o.kind).map_err(AgentError::Decode)?;
            crate::transfer::place(Path::new("/"), kind, &o.name)?;
            let manifest = Manifest::decode(&o.manifest)
                .map_err(|e| AgentError::BadChunk(format!("manifest of {}: {e}", o.name)))?;
            Ok(Incoming {
                kind,
                name: o.name.clone(),
                manifest,
                mode: o.mode,
            })
        })
        .collect()
}

/// The manifests of the files already rebuilt in a migration's directory, by name:
/// the next round patches them instead of writing them again.
pub type Rebuilt = std::collections::HashMap<String, Manifest>;

/// Rebuilds every object into `dir` (CRIU images under `criu/`, the diff as
/// `rootfs.tar`), verifying each whole-object digest. A file rebuilt in an earlier
/// round (`rebuilt`) is patched: only its changed chunks are written, which keeps the
/// final round's rebuild, inside the downtime, proportional to the delta. Blocking.
pub fn rebuild(
    store: &Store,
    dir: &Path,
    objects: &[Incoming],
    rebuilt: &mut Rebuilt,
) -> Result<Vec<(FileKind, PathBuf, u64)>, AgentError> {
    let mut out = Vec::new();
    for o in objects {
        let path = crate::transfer::place(dir, o.kind, &o.name)?;
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|source| AgentError::WriteFile {
                path: p.to_path_buf(),
                source,
            })?;
        }
        let t = std::time::Instant::now();
        let patched = match rebuilt.get(&o.name) {
            Some(prev) if path.exists() => {
                match xfer_store::patch::patch_file(prev, &o.manifest, &path, store, 2) {
                    Ok(st) => {
                        debug!(
                            file = %o.name,
                            ms = t.elapsed().as_secs_f64() * 1000.0,
                            kept = st.kept_chunks,
                            moved = st.moved_chunks,
                            fetched = st.fetched_chunks,
                            zero = st.zero_chunks,
                            fetch_ms = st.fetch_micros as f64 / 1000.0,
                            write_ms = st.write_micros as f64 / 1000.0,
                            verify_ms = st.verify_micros as f64 / 1000.0,
                            "patched"
                        );
                        true
                    }
                    Err(e) => {
                        warn!(file = %o.name, error = %e, "patch failed; rebuilding the whole file");
                        false
                    }
                }
            }
            _ => false,
        };
        let n = if patched {
            o.manifest.length()
        } else {
            // Migration scratch (CRIU images, tars installed from here): verified,
            // not fsynced; volumes get their own fsync when installed.
            let n = o
                .manifest
                .rebuild_scratch_file(store, &path)
                .map_err(store_err("rebuild a file"))?;
            debug!(file = %o.name, ms = t.elapsed().as_secs_f64() * 1000.0, bytes = n, "rebuilt");
            n
        };
        rebuilt.insert(o.name.clone(), o.manifest.clone());
        if o.mode != 0 {
            let _ = std::fs::set_permissions(
                &path,
                std::os::unix::fs::PermissionsExt::from_mode(o.mode & 0o777),
            );
        }
        out.push((o.kind, path, n));
    }
    Ok(out)
}

/// The distinct chunk ids the objects reference (zero pages excluded), in order of
/// first use.
pub fn chunk_ids(objects: &[Incoming]) -> Vec<Digest> {
    let mut seen = std::collections::HashSet::new();
    objects
        .iter()
        .flat_map(|o| o.manifest.chunk_ids())
        .filter(|id| seen.insert(*id))
        .collect()
}

/// A lease file being written on a blocking thread ([`write_lease`]).
#[derive(Debug)]
pub struct LeaseWrite(tokio::task::JoinHandle<Result<(), xfer_store::StoreError>>);

/// Starts writing lease `name`, already recorded in memory
/// ([`Store::lease_add_in_memory`]), while the round's other work goes on; await
/// [`LeaseWrite::done`] before the round ends.
pub fn write_lease(store: &Arc<Store>, name: &str) -> LeaseWrite {
    let (store, name) = (store.clone(), name.to_string());
    LeaseWrite(tokio::task::spawn_blocking(move || {
        store.persist_lease(&name)
    }))
}

impl LeaseWrite {
    /// Waits for the write.
    pub async fn done(self) -> Result<(), AgentError> {
        self.0
            .await
            .map_err(|e| AgentError::Refused(format!("lease task: {e}")))?
            .map_err(store_err("persist the lease"))
    }
}

/// Opens the store of a node.
pub fn open_store(dir: &Path) -> Result<Arc<Store>, AgentError> {
    Store::open(dir)
        .map(Arc::new)
        .map_err(store_err("open the chunk store"))
}

/// Publishes directory `dir` as the volume object `rw-0` under `lease`; its manifest
/// (tests).
#[cfg(test)]
pub(crate) fn publish_volume(store: &Store, dir: &Path, lease: &str) -> Manifest {
    let (m, _) = publish(
        store,
        lease,
        &[OutFile {
            kind: FileKind::Volume,
            name: "rw-0".into(),
            path: dir.to_path_buf(),
        }],
    )
    .expect("publish");
    decode_objects(&m).expect("decode").remove(0).manifest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_publishes_as_its_tar_would() {
        // Same manifest as the tar file of the same directory: snapshots and rounds
        // deduplicate against each other and against older agents' tars.
        let t = tempfile::tempdir().expect("tmp");
        let store = Store::open(t.path().join("s")).expect("store");
        let dir = t.path().join("vol");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        let big: Vec<u8> = (0..5_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        std::fs::write(dir.join("big"), &big).expect("write");
        std::fs::write(dir.join("sub/small"), b"hello").expect("write");
        let tar = t.path().join("vol.tar");
        crate::volumes::capture(&dir, &tar).expect("capture");
        let as_file = |path: PathBuf| OutFile {
            kind: FileKind::Volume,
            name: "rw-0".into(),
            path,
        };
        let (from_tar, _) = publish(&store, "a", &[as_file(tar)]).expect("publish tar");
        let (from_dir, p) = publish(&store, "b", &[as_file(dir.clone())]).expect("publish dir");
        assert_eq!(from_dir, from_tar);
        assert_eq!(p.new_chunks, 0, "every chunk was already there");
        // A directory that cannot be read is an error, not the manifest of a cut tar.
        let gone = publish(&store, "c", &[as_file(t.path().join("gone"))]);
        assert!(gone.is_err());
        // A tar that fails after its first megabytes (an entry tar cannot hold, here a
        // socket, sorted after the big file) is an error too.
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("z.sock")).expect("bind");
        let cut = publish(&store, "d", &[as_file(dir.clone())]);
        assert!(cut.is_err(), "a cut tar was published: {cut:?}");
    }

    #[test]
    fn a_staged_volume_is_what_its_tar_holds_and_a_broken_one_leaves_nothing() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().expect("tmp");
        let store = Store::open(t.path().join("s")).expect("store");
        let dir = t.path().join("vol");
        std::fs::create_dir_all(dir.join("sub/deeper")).expect("mkdir");
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        std::fs::write(dir.join("big"), &big).expect("write");
        std::fs::write(dir.join("sub/small"), b"hello").expect("write");
        std::fs::write(dir.join("sub/deeper/x"), b"").expect("write");
        std::fs::set_permissions(
            dir.join("sub/small"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("sub/small", dir.join("link")).expect("symlink");
        let m = publish_volume(&store, &dir, "a");
        let staged = t.path().join("staged/rw-0");
        let go = std::sync::atomic::AtomicBool::new(false);
        let index = stage_volume(&store, &m, &staged, &go).expect("stage");
        assert_eq!(index.len(), 3, "{index:?}");
        let f = index[Path::new("big")];
        assert_eq!(f.len, big.len() as u64);
        assert_eq!(f.data % 512, 0, "data after a header block");
        // Captured again, the staged copy is byte for byte the tar that was published.
        let (a, b) = (t.path().join("a.tar"), t.path().join("b.tar"));
        crate::volumes::capture(&dir, &a).expect("capture");
        crate::volumes::capture(&staged, &b).expect("capture");
        assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(std::fs::read(staged.join("big")).expect("big"), big);

        // Stopped: an error, and no half-unpacked directory.
        let again = t.path().join("staged/rw-0-again");
        let stop = std::sync::atomic::AtomicBool::new(true);
        let err = stage_volume(&store, &m, &again, &stop);
        assert!(err.is_err(), "{err:?}");
        assert!(!again.exists());
        // A chunk gone from the store: the same.
        let lost = m.chunk_ids().nth(1).expect("a second chunk");
        store.release("a").expect("release");
        assert!(store.remove(&lost).expect("remove"));
        let err = stage_volume(&store, &m, &again, &go);
        assert!(err.is_err(), "{err:?}");
        assert!(!again.exists());
    }

    #[test]
    fn objects_round_trip_through_two_stores() {
        let t = tempfile::tempdir().expect("tmp");
        let src = Store::open(t.path().join("a")).expect("store a");
        let dst = Store::open(t.path().join("b")).expect("store b");
        let files_dir = t.path().join("files");
        std::fs::create_dir_all(&files_dir).expect("mkdir");
        let mut pages = vec![0u8; 4096 * 64];
        for (i, b) in pages.iter_mut().enumerate().skip(4096 * 10) {
            *b = (i % 251) as u8;
        }
        std::fs::write(files_dir.join("pages-1.img"), &pages).expect("write");
        std::fs::write(files_dir.join("core-1.img"), b"core").expect("write");
        let files = vec![
            OutFile {
                kind: FileKind::CriuImage,
                name: "pages-1.img".into(),
                path: files_dir.join("pages-1.img"),
            },
            OutFile {
                kind: FileKind::CriuImage,
                name: "core-1.img".into(),
                path: files_dir.join("core-1.img"),
            },
        ];
        let (manifests, stats) = publish(&src, "m1", &files).expect("publish");
        assert_eq!(stats.raw_bytes, pages.len() as u64 + 4);
        let incoming = decode_objects(&manifests).expect("decode");
        let ids = chunk_ids(&incoming);
        // Copy what the destination lacks, as the fetcher would.
        for id in dst.missing(&ids) {
            let (frame, raw) = src.get_compressed(&id).expect("get");
            dst.put_compressed(id, &frame, raw).expect("put");
        }
        let out = t.path().join("out");
        let mut rebuilt = Rebuilt::new();
        rebuild(&dst, &out, &incoming, &mut rebuilt).expect("rebuild");
        assert_eq!(
            std::fs::read(out.join("criu/pages-1.img")).expect("read"),
            pages
        );
        assert_eq!(
            std::fs::read(out.join("criu/core-1.img")).expect("read"),
            b"core"
        );
        // A second round with one page changed publishes only that page.
        pages[4096 * 20] ^= 0xff;
        std::fs::write(files_dir.join("pages-1.img"), &pages).expect("write");
        let (m2, stats2) = publish(&src, "m1", &files[..1]).expect("publish 2");
        assert_eq!(stats2.new_chunks, 1);
        // The destination patches its file from the previous round: byte for byte.
        let incoming2 = decode_objects(&m2).expect("decode 2");
        for id in dst.missing(&chunk_ids(&incoming2)) {
            let (frame, raw) = src.get_compressed(&id).expect("get");
            dst.put_compressed(id, &frame, raw).expect("put");
        }
        rebuild(&dst, &out, &incoming2, &mut rebuilt).expect("patch");
        assert_eq!(
            std::fs::read(out.join("criu/pages-1.img")).expect("read"),
            pages
        );
        // A corrupted file is not trusted: the digest check makes it rebuilt whole.
        std::fs::write(out.join("criu/pages-1.img"), vec![1u8; pages.len()]).expect("spoil");
        rebuild(&dst, &out, &incoming2, &mut rebuilt).expect("rebuild after spoil");
        assert_eq!(
            std::fs::read(out.join("criu/pages-1.img")).expect("read"),
            pages
        );
    }

    #[test]
    fn malformed_manifests_are_refused() {
        let bad = vec![ObjectManifest {
            kind: FileKind::CriuImage as i32,
            name: "x.img".into(),
            manifest: vec![1, 2, 3],
            mode: 0,
        }];
        assert!(decode_objects(&bad).is_err());
        let unnamed = vec![ObjectManifest {
            kind: FileKind::CriuImage as i32,
            name: "../x".into(),
            manifest: Vec::new(),
            mode: 0,
        }];
        assert!(decode_objects(&unnamed).is_err());
        let unspecified = vec![ObjectManifest {
            kind: 0,
            name: "x".into(),
            manifest: Vec::new(),
            mode: 0,
        }];
        assert!(decode_objects(&unspecified).is_err());
    }
}
