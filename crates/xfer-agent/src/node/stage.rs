//! Read-write volumes unpacked ahead of the restore (destination side).
//!
//! Once a pre-copy round's chunks are all here, each read-write volume of the round
//! is unpacked from the store's chunks into `DIR/staged/` on a blocking thread
//! (`sync::stage_volume`), while the source goes on into its cut-over. At the restore,
//! a volume whose final tar has the same whole-object digest as a staged one is
//! installed by rename instead of being unpacked inside the downtime; any other (the
//! task wrote to it since) is unpacked from the final tar as before. The digest
//! covers every byte of the tar (content, names, modes, owners, times), so a staged
//! copy is used only when it is exactly what the final round carries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tracing::{info, warn};
use xfer_proto::v1::FileKind;
use xfer_store::{Digest, Store};

use crate::sync::Incoming;

/// Nice value of a staging thread: it yields the CPU to the fetch, the rebuilds and
/// the restore, which are on the migration's path; staging only saves work later.
const NICE: i32 = 10;

#[derive(Debug)]
struct Staged {
    digest: Digest,
    dir: PathBuf,
    /// Whether it succeeded, once it ended.
    done: Option<oneshot::Receiver<bool>>,
    ok: bool,
}

/// The staged volumes of one inbound migration.
#[derive(Debug, Default)]
pub(super) struct Stages {
    by_name: Mutex<HashMap<String, Staged>>,
    /// Set to stop every staging (clean-up).
    stop: Arc<AtomicBool>,
    /// Every staging thread's end, awaited before clean-up removes their directory.
    ends: Mutex<Vec<oneshot::Receiver<bool>>>,
}

/// Lowers the calling thread's CPU priority.
fn lower_priority() {
    // SAFETY: setpriority with PRIO_PROCESS and this thread's id changes only this
    // thread's nice value (Linux: nice is per thread); it reads no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if r != 0 {
        warn!(error = %std::io::Error::last_os_error(), "could not lower a staging thread's priority");
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
            let (end_tx, end_rx) = oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name("xfer-stage".into())
                .spawn(move || {
                    lower_priority();
                    let t = std::time::Instant::now();
                    let ok = match crate::sync::stage_volume(&st, &m, &d, &stop) {
                        Ok(()) => {
                            info!(
                                volume = %name,
                                bytes = m.length(),
                                ms = t.elapsed().as_secs_f64() * 1000.0,
                                "volume staged"
                            );
                            true
                        }
                        Err(e) => {
                            info!(volume = %name, error = %e, "volume not staged; the restore unpacks it");
                            false
                        }
                    };
                    let _ = tx.send(ok);
                    let _ = end_tx.send(ok);
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
                    dir,
                    done: Some(rx),
                    ok: false,
                },
            );
        }
    }

    /// The staged copies of `wanted` (volume name -> the digest of its final tar):
    /// waits for a staging of that very digest still running, never for the others.
    pub async fn ready_for(&self, wanted: &HashMap<String, Digest>) -> HashMap<String, PathBuf> {
        let waits: Vec<(String, oneshot::Receiver<bool>)> = {
            let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
            map.iter_mut()
                .filter(|(n, s)| wanted.get(*n) == Some(&s.digest))
                .filter_map(|(n, s)| s.done.take().map(|d| (n.clone(), d)))
                .collect()
        };
        for (name, done) in waits {
            let ok = done.await.unwrap_or(false);
            if let Some(s) = self
                .by_name
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&name)
            {
                s.ok = ok;
            }
        }
        let map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter(|(n, s)| s.ok && wanted.get(*n) == Some(&s.digest))
            .map(|(n, s)| (n.clone(), s.dir.clone()))
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
