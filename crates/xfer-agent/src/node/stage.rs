//! Read-write volumes unpacked ahead of the restore (destination side).
//!
//! Once a pre-copy round's chunks are all here, each read-write volume of the round
//! is unpacked from the store's chunks into `DIR/staged/` on a low-priority thread
//! (`sync::stage_volume`), while the source goes on into its cut-over. At the restore:
//!
//! * a volume whose final tar has the same whole-object digest as its staged copy is
//!   installed by rename (the digest covers every byte of the tar: content, names,
//!   modes, owners, times);
//! * otherwise (the task wrote to it since) the staged copy is *patched*: a regular
//!   file whose header and data bytes in the final tar are provably those of the same
//!   path in the staged tar ([`same_bytes`]: every chunk covering them is the same
//!   chunk at the same offset from the entry) is kept without reading it; every other
//!   entry is unpacked from the final tar, what the final tar lacks is removed
//!   (`volumes::patch_unpacked`), then it is installed by rename;
//! * a staging still running for another digest is not waited for, and anything that
//!   fails falls back to unpacking the whole final tar, as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::{info, warn};
use xfer_proto::v1::FileKind;
use xfer_store::{Digest, Store};

use xfer_store::manifest::{ChunkRef, Manifest};

use crate::sync::Incoming;
use crate::volumes::TarIndex;

/// Nice value of a staging thread: it yields the CPU to the fetch, the rebuilds and
/// the restore, which are on the migration's path; staging only saves work later.
const NICE: i32 = 10;

#[derive(Debug)]
struct Staged {
    digest: Digest,
    manifest: Manifest,
    dir: PathBuf,
    /// Its tar's index if it succeeded, once it ended.
    done: Option<oneshot::Receiver<Option<TarIndex>>>,
    /// Its thread's id (0 until it started).
    tid: Arc<std::sync::atomic::AtomicI32>,
    index: Option<Arc<TarIndex>>,
}

/// A staged copy the restore may use.
#[derive(Debug, Clone)]
pub(super) struct Ready {
    pub dir: PathBuf,
    /// Its tar is the final one (install as is); else patch it first.
    pub exact: bool,
    pub manifest: Manifest,
    pub index: Arc<TarIndex>,
}

/// The staged volumes of one inbound migration.
#[derive(Debug, Default)]
pub(super) struct Stages {
    by_name: Mutex<HashMap<String, Staged>>,
    /// Set to stop every staging (clean-up).
    stop: Arc<AtomicBool>,
    /// Every staging thread's end, awaited before clean-up removes their directory.
    ends: Mutex<Vec<oneshot::Receiver<()>>>,
}

/// Sets thread `tid`'s nice value (Linux: nice is per thread).
fn set_nice(tid: libc::pid_t, nice: i32) {
    // SAFETY: setpriority with PRIO_PROCESS and a thread id changes only that
    // thread's nice value; it reads no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        warn!(tid, nice, error = %std::io::Error::last_os_error(), "could not change a staging thread's priority");
    }
}

impl Stages {
    /// Starts staging the read-write volumes among `objects` (all their chunks in
    /// `store`) not staged with the same digest already, under `root/staged/`, each
    /// on its own low-priority thread.
    pub fn start(&self, store: &Arc<Store>, root: &Path, objects: &[Incoming]) {
        let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        for o in objects {
            if o.kind != FileKind::Volume || !o.name.starts_with("rw-") {
                continue;
            }
            let digest = o.manifest.digest();
            if map.get(&o.name).is_some_and(|s| s.digest == digest) {
                continue;
            }
            let hex = digest.to_hex();
            let dir = root
                .join("staged")
                .join(format!("{}-{}", o.name, &hex[..16]));
            let (st, m, d, name, stop) = (
                store.clone(),
                o.manifest.clone(),
                dir.clone(),
                o.name.clone(),
                self.stop.clone(),
            );
            let (tx, rx) = oneshot::channel();
            let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
            let my_tid = tid.clone();
            let (end_tx, end_rx) = oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("xfer-stage".into())
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let me = unsafe { libc::gettid() };
                    my_tid.store(me, Ordering::Relaxed);
                    set_nice(me, NICE);
                    let t = std::time::Instant::now();
                    let index = match crate::sync::stage_volume(&st, &m, &d, &stop) {
                        Ok(index) => {
                            info!(
                                volume = %name,
                                bytes = m.length(),
                                ms = t.elapsed().as_secs_f64() * 1000.0,
                                "volume staged"
                            );
                            Some(index)
                        }
                        Err(e) => {
                            info!(volume = %name, error = %e, "volume not staged; the restore unpacks it");
                            None
                        }
                    };
                    let _ = tx.send(index);
                    let _ = end_tx.send(());
                });
            if let Err(e) = spawned {
                warn!(error = %e, "could not start a staging thread");
                continue;
            }
            self.ends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(end_rx);
            map.insert(
                o.name.clone(),
                Staged {
                    digest,
                    manifest: o.manifest.clone(),
                    dir,
                    done: Some(rx),
                    tid,
                    index: None,
                },
            );
        }
    }

    /// The staged copies usable for `wanted` (volume name -> the digest of its final
    /// tar): waits for their stagings still running, back at normal priority (the
    /// restore needs them now; one of another digest is patched after).
    pub async fn ready_for(&self, wanted: &HashMap<String, Digest>) -> HashMap<String, Ready> {
        let waits: Vec<(String, oneshot::Receiver<Option<TarIndex>>)> = {
            let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
            let mut waits = Vec::new();
            for (n, s) in map.iter_mut() {
                if !wanted.contains_key(n) {
                    continue;
                }
                let Some(mut done) = s.done.take() else {
                    continue;
                };
                match done.try_recv() {
                    Ok(index) => s.index = index.map(Arc::new),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        let tid = s.tid.load(Ordering::Relaxed);
                        if tid != 0 {
                            set_nice(tid, 0);
                        }
                        waits.push((n.clone(), done));
                    }
                    Err(oneshot::error::TryRecvError::Closed) => {}
                }
            }
            waits
        };
        for (name, done) in waits {
            let index = done.await.ok().flatten().map(Arc::new);
            if let Some(s) = self
                .by_name
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&name)
            {
                s.index = index;
            }
        }
        let map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(n, s)| {
                let want = wanted.get(n)?;
                let index = s.index.clone()?;
                Some((
                    n.clone(),
                    Ready {
                        dir: s.dir.clone(),
                        exact: *want == s.digest,
                        manifest: s.manifest.clone(),
                        index,
                    },
                ))
            })
            .collect()
    }

    /// Stops every staging and waits for their threads (they write under the
    /// migration's directory).
    pub async fn stop_all(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let ends = std::mem::take(&mut *self.ends.lock().unwrap_or_else(|p| p.into_inner()));
        for e in ends {
            let _ = e.await;
        }
    }
}

/// Tells whether a regular file of a final tar is the same file as the same path in
/// an earlier tar whose unpacked copy is staged, reading next to nothing: the header
/// bytes by digest (name, size, mode, owner, times), then the data by chunks: every
/// chunk of the final tar lying wholly inside the file's data must be, at the same
/// distance from the data's start, the same chunk of the earlier tar (BLAKE3 ids: the
/// same bytes), or else have the same bytes; the parts of chunks straddling the data's
/// ends are compared byte for byte (final tar file against the staged file). Any
/// doubt or error: not the same.
pub(super) struct SameFiles<'a> {
    index: &'a TarIndex,
    before_at: std::collections::HashSet<(u64, ChunkRef)>,
    now_at: Vec<(u64, ChunkRef)>,
    final_tar: std::fs::File,
    staged: &'a Path,
}

fn offsets(m: &Manifest) -> impl Iterator<Item = (u64, ChunkRef)> + '_ {
    m.chunks().iter().scan(0u64, |at, c| {
        let k = (*at, *c);
        *at += c.len() as u64;
        Some(k)
    })
}

impl<'a> SameFiles<'a> {
    /// `before` and `index`: the staged tar's manifest and files; `now`: the final
    /// tar's manifest, rebuilt at `final_tar`; `staged`: the unpacked earlier tar.
    pub fn new(
        before: &Manifest,
        index: &'a TarIndex,
        now: &Manifest,
        final_tar: &Path,
        staged: &'a Path,
    ) -> std::io::Result<Self> {
        Ok(SameFiles {
            index,
            before_at: offsets(before).collect(),
            now_at: offsets(now).collect(),
            final_tar: std::fs::File::open(final_tar)?,
            staged,
        })
    }

    /// Whether `path`, with `header` and its data at `data` in the final tar, is the
    /// same file as in the staged copy.
    pub fn same(&mut self, path: &Path, header: &tar::Header, data: u64) -> bool {
        let Some(f1) = self.index.get(path) else {
            return false;
        };
        if Digest::of(header.as_bytes()) != f1.header || header.size().ok() != Some(f1.len) {
            return false;
        }
        let end = data + f1.len;
        let first = self
            .now_at
            .partition_point(|(off, c)| off + c.len() as u64 <= data);
        for &(off, c) in self.now_at[first..]
            .iter()
            .take_while(|(off, _)| *off < end)
        {
            let c_end = off + c.len() as u64;
            if off >= data && c_end <= end {
                // Not the same chunk there: maybe still the same bytes (the chunker's
                // cut points take a few chunks to fall in step again after a change
                // earlier in the tar), compared then, stopping at the first difference.
                if !self.before_at.contains(&(off - data + f1.data, c))
                    && !self.same_range(path, off - data, off, c.len())
                {
                    return false;
                }
            } else {
                let (a, b) = (off.max(data), c_end.min(end));
                if !self.same_range(path, a - data, a, (b - a) as usize) {
                    return false;
                }
            }
        }
        true
    }

    /// Bytes `[at, at + n)` of the staged `path` against `[tar_at, tar_at + n)` of
    /// the final tar.
    fn same_range(&self, path: &Path, at: u64, tar_at: u64, n: usize) -> bool {
        use std::os::unix::fs::FileExt;
        let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
        let Ok(f) = std::fs::File::open(self.staged.join(path)) else {
            return false;
        };
        f.read_exact_at(&mut x, at).is_ok()
            && self.final_tar.read_exact_at(&mut y, tar_at).is_ok()
            && x == y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    use crate::sync::publish_volume as publish;

    fn noise(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32)
            .map(|i| ((i ^ seed).wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn a_staged_copy_patched_to_a_later_tar_is_that_tar_and_keeps_what_did_not_change() {
        let t = tempfile::tempdir().expect("tmp");
        let store = Store::open(t.path().join("s")).expect("store");
        let vol = t.path().join("vol");
        std::fs::create_dir_all(vol.join("d/e")).expect("mkdir");
        let big = noise(4_000_000, 1);
        std::fs::write(vol.join("base"), &big).expect("write");
        std::fs::write(vol.join("count"), b"1\n").expect("write");
        std::fs::write(vol.join("d/gone"), b"bye").expect("write");
        std::fs::write(vol.join("d/e/kept"), noise(300_000, 2)).expect("write");
        std::fs::write(vol.join("zz-tail"), noise(2_000_000, 3)).expect("write");
        let m1 = publish(&store, &vol, "a");
        let staged = t.path().join("staged/rw-0");
        let index = crate::sync::stage_volume(&store, &m1, &staged, &AtomicBool::new(false))
            .expect("stage");

        // The task writes on: a counter, a deleted file, a new one, a new directory.
        std::fs::write(vol.join("count"), b"2\n").expect("write");
        std::fs::remove_file(vol.join("d/gone")).expect("rm");
        std::fs::write(vol.join("d/new"), b"hi").expect("write");
        std::fs::create_dir_all(vol.join("n")).expect("mkdir");
        std::fs::write(vol.join("n/x"), b"x").expect("write");
        let m2 = publish(&store, &vol, "b");
        assert_ne!(m1.digest(), m2.digest());
        let tar2 = t.path().join("final.tar");
        m2.rebuild_file(&store, &tar2)
            .expect("rebuild the final tar");

        let mut cmp = SameFiles::new(&m1, &index, &m2, &tar2, &staged).expect("compare");
        let p = crate::volumes::patch_unpacked(&staged, &tar2, |p, h, d| cmp.same(p, h, d))
            .expect("patch");
        // The staged copy is now the final tar, byte for byte once captured again.
        let again = t.path().join("again.tar");
        crate::volumes::capture(&staged, &again).expect("capture");
        assert_eq!(
            std::fs::read(&again).expect("again"),
            std::fs::read(&tar2).expect("final")
        );
        assert!(!staged.join("d/gone").exists());
        assert_eq!(p.removed, 1, "{p:?}");
        // The big files were kept, not rewritten; what changed was written.
        assert!(p.kept >= 2 && p.kept_bytes >= 4_000_000, "{p:?}");
        assert!(p.written_bytes < 1_000_000, "{p:?}");
    }

    #[test]
    fn a_file_is_the_same_only_with_the_same_header_and_bytes() {
        let t = tempfile::tempdir().expect("tmp");
        let store = Store::open(t.path().join("s")).expect("store");
        let vol = t.path().join("vol");
        std::fs::create_dir_all(&vol).expect("mkdir");
        std::fs::write(vol.join("a"), noise(1_500_000, 4)).expect("write");
        std::fs::write(vol.join("b"), noise(1_500_000, 5)).expect("write");
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let age_b = || {
            std::fs::File::options()
                .write(true)
                .open(vol.join("b"))
                .and_then(|f| f.set_modified(old))
                .expect("mtime")
        };
        age_b();
        let m1 = publish(&store, &vol, "a");
        let st = t.path().join("st");
        let index =
            crate::sync::stage_volume(&store, &m1, &st, &AtomicBool::new(false)).expect("stage");
        // `b` rewritten with other bytes of the same size and the same time: its
        // header is the same, its data not.
        std::fs::write(vol.join("b"), noise(1_500_000, 6)).expect("write");
        age_b();
        let m2 = publish(&store, &vol, "b");
        let tar2 = t.path().join("final.tar");
        m2.rebuild_file(&store, &tar2).expect("rebuild");
        let mut cmp = SameFiles::new(&m1, &index, &m2, &tar2, &st).expect("compare");
        let mut a = tar::Archive::new(std::fs::File::open(&tar2).expect("open"));
        let mut verdicts = std::collections::BTreeMap::new();
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            let p = e.path().expect("path").into_owned();
            verdicts.insert(p.clone(), cmp.same(&p, e.header(), e.raw_file_position()));
        }
        assert_eq!(verdicts.get(Path::new("a")), Some(&true), "{verdicts:?}");
        assert_eq!(verdicts.get(Path::new("b")), Some(&false), "{verdicts:?}");
        // A path the staged tar did not have.
        let h = tar::Header::new_gnu();
        assert!(!cmp.same(Path::new("nope"), &h, 0));
    }
}
