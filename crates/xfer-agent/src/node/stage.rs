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
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tracing::{info, warn};
use xfer_proto::v1::FileKind;
use xfer_store::{Digest, Store};

use crate::sync::Incoming;

#[derive(Debug)]
struct Staged {
    digest: Digest,
    dir: PathBuf,
    task: Option<JoinHandle<bool>>,
    ok: bool,
}

/// The staged volumes of one inbound migration.
#[derive(Debug, Default)]
pub(super) struct Stages {
    by_name: Mutex<HashMap<String, Staged>>,
    /// Stagings replaced by a newer content, still to be awaited before clean-up.
    retired: Mutex<Vec<JoinHandle<bool>>>,
}

impl Stages {
    /// Starts staging the read-write volumes among `objects` (all their chunks in
    /// `store`) not staged with the same digest already, under `root/staged/`.
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
            let (st, m, d, name) = (
                store.clone(),
                o.manifest.clone(),
                dir.clone(),
                o.name.clone(),
            );
            let task = tokio::task::spawn_blocking(move || {
                let t = std::time::Instant::now();
                match crate::sync::stage_volume(&st, &m, &d) {
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
                        warn!(volume = %name, error = %e, "staging a volume failed; the restore unpacks it");
                        false
                    }
                }
            });
            let new = Staged {
                digest,
                dir,
                task: Some(task),
                ok: false,
            };
            if let Some(mut old) = map.insert(o.name.clone(), new) {
                if let Some(t) = old.task.take() {
                    self.retired
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(t);
                }
            }
        }
    }

    /// Waits for the stagings running; returns the staged volumes: name -> (digest,
    /// directory).
    pub async fn ready(&self) -> HashMap<String, (Digest, PathBuf)> {
        let tasks: Vec<(String, JoinHandle<bool>)> = {
            let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
            map.iter_mut()
                .filter_map(|(n, s)| s.task.take().map(|t| (n.clone(), t)))
                .collect()
        };
        for (name, t) in tasks {
            let ok = t.await.unwrap_or(false);
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
            .filter(|(_, s)| s.ok && s.task.is_none())
            .map(|(n, s)| (n.clone(), (s.digest, s.dir.clone())))
            .collect()
    }

    /// Waits for every staging (they write under the migration's directory).
    pub async fn wait_all(&self) {
        let _ = self.ready().await;
        let retired = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|p| p.into_inner()));
        for t in retired {
            let _ = t.await;
        }
    }
}
