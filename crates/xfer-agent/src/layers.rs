//! Image blobs as chunks (issue 6): a container's image layers (and its config and
//! manifest) travel like every other object, as content-defined chunks the destination
//! fetches from whoever holds them, neighbours first when the knowledge base names
//! them, the source last.
//!
//! * **Index.** Every agent chunks the blobs of the images in its containerd into its
//!   chunk store once (FastCDC, `ObjectKind::File`), keeps each blob's manifest under
//!   `WORK/layers/` (by sha256 digest) and holds the chunks of the images it has with
//!   one store lease ([`LEASE`]), so they are served to peers and announced to the
//!   knowledge base (an `Add` of their chunk ids, like any other chunks). [`index_all`]
//!   runs at start and then periodically (`xferd`), so an image imported or received
//!   since becomes fetchable from this host.
//! * **Source.** [`send`] replaces the whole-blob stream: the blobs the destination
//!   lacks (from `Prepare`) are announced as manifests in a `Sync` of round 0, in the
//!   background ([`start`]) while the pre-copy rounds go on, and awaited before the
//!   cut-over; the destination fetches the chunks it lacks (its plan asks
//!   the knowledge base, so a neighbour holding the same layer serves it) and rebuilds
//!   each blob byte for byte (whole-object BLAKE3), then writes it into its content
//!   store (where containerd checks the sha256) and unpacks the image before the
//!   source freezes, as with streamed blobs.
//! * The bytes per source of that fetch are the report's `image_sources`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, info, warn};
use xfer_proto::v1::{FileKind, ObjectManifest, SyncReply, SyncRequest};
use xfer_store::manifest::Manifest;
use xfer_store::Digest;

use crate::error::AgentError;
use crate::migrate::Destination;
use crate::node::Node;
use crate::transfer::OutFile;

/// The store lease holding the chunks of this host's images.
pub const LEASE: &str = "image-layers";

/// How long [`LEASE`] lasts without a new index pass.
const LEASE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One index or migration chunks a blob at a time.
static CHUNKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn manifest_path(work: &Path, digest: &str) -> PathBuf {
    work.join("layers")
        .join(format!("{}.manifest", digest.replace(':', "_")))
}

fn object_of(digest: &str, m: &Manifest) -> ObjectManifest {
    ObjectManifest {
        kind: FileKind::ImageBlob as i32,
        name: digest.to_string(),
        manifest: m.encode(),
        mode: 0o644,
    }
}

/// A blob already chunked here: its manifest, if all its chunks are in the store.
fn indexed(node: &Node, digest: &str) -> Option<Manifest> {
    let bytes = std::fs::read(manifest_path(&node.cfg.work_dir, digest)).ok()?;
    let m = Manifest::decode(&bytes).ok()?;
    node.store
        .missing(&m.chunk_ids().collect::<Vec<_>>())
        .is_empty()
        .then_some(m)
}

/// The blob `digest` of this node's content store as chunks in its store: its
/// manifest (chunking it now unless done before) and whether it was chunked now.
pub async fn object(node: &Node, digest: &str) -> Result<(Manifest, bool), AgentError> {
    if let Some(m) = indexed(node, digest) {
        return Ok((m, false));
    }
    let _one = CHUNKING.lock().await;
    if let Some(m) = indexed(node, digest) {
        return Ok((m, false));
    }
    let t = std::time::Instant::now();
    let dir = node.cfg.work_dir.join("layers");
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AgentError::WriteFile { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(werr(&dir))?;
    let tmp = dir.join(format!("{}.blob", digest.replace(':', "_")));
    crate::images::read_blob_to_file(&node.rt, digest, &tmp)
        .await
        .map_err(|source| AgentError::Runtime {
            step: xfer_proto::v1::Step::Image,
            source,
        })?;
    let store = node.store.clone();
    let files = vec![OutFile {
        kind: FileKind::ImageBlob,
        name: digest.to_string(),
        path: tmp.clone(),
    }];
    let published =
        tokio::task::spawn_blocking(move || crate::sync::publish(&store, LEASE, &files))
            .await
            .map_err(|e| AgentError::Refused(format!("chunking task: {e}")));
    let _ = std::fs::remove_file(&tmp);
    let (manifests, stats) = published??;
    let m = manifests
        .first()
        .and_then(|o| Manifest::decode(&o.manifest).ok())
        .ok_or_else(|| AgentError::Refused(format!("no manifest for blob {digest}")))?;
    node.store
        .lease_add_in_memory(LEASE, LEASE_TTL, &[])
        .and_then(|()| node.store.persist_lease(LEASE))
        .map_err(|source| AgentError::Store {
            what: "lease image chunks".into(),
            source,
        })?;
    let path = manifest_path(&node.cfg.work_dir, digest);
    let part = path.with_extension("part");
    std::fs::write(&part, m.encode()).map_err(werr(&part))?;
    std::fs::rename(&part, &path).map_err(werr(&path))?;
    let ids: Vec<Digest> = m.chunk_ids().collect();
    if let Some(kb) = node.kb() {
        kb.inventory().added(&ids);
    }
    info!(
        blob = %digest,
        bytes = m.length(),
        chunks = ids.len(),
        new_chunks = stats.new_chunks,
        ms = t.elapsed().as_millis() as u64,
        "image blob chunked"
    );
    Ok((m, true))
}

/// Chunks every blob of every image of this node not chunked yet, and makes [`LEASE`]
/// hold exactly the chunks of the images present (those of removed images go at the
/// next garbage collection). Returns how many blobs were chunked now.
pub async fn index_all(node: &Node) -> Result<usize, AgentError> {
    let rt = &node.rt;
    let rt_err = |source| AgentError::Runtime {
        step: xfer_proto::v1::Step::Image,
        source,
    };
    let names = xfer_runtime::image::image_names(&rt.client(), &rt.config().namespace)
        .await
        .map_err(rt_err)?;
    let mut fresh = 0;
    let mut ids: Vec<Digest> = Vec::new();
    for name in names {
        let Some(img) = crate::images::info(rt, &name).await.map_err(rt_err)? else {
            continue;
        };
        for b in std::iter::once(&img.manifest).chain(&img.blobs) {
            match object(node, &b.digest).await {
                Ok((m, now)) => {
                    fresh += usize::from(now);
                    ids.extend(m.chunk_ids());
                }
                Err(e) => {
                    warn!(image = %name, blob = %b.digest, error = %e, "image blob not chunked")
                }
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    node.store
        .lease(LEASE, LEASE_TTL, &ids)
        .map_err(|source| AgentError::Store {
            what: "lease image chunks".into(),
            source,
        })?;
    debug!(
        blobs_chunked = fresh,
        chunks = ids.len(),
        "image index pass"
    );
    Ok(fresh)
}

/// Runs [`index_all`] now and every `period`.
pub fn spawn_index(node: Node, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = index_all(&node).await {
                warn!(error = %e, "image index pass failed");
            }
        }
    })
}

/// Source side of a migration: announces the blobs `missing` (sha256 digests) to the
/// destination as manifests (a `Sync` of round 0) and lets it fetch and install them.
/// Their chunks are leased under the migration `mid` too. `None` if nothing is missing.
pub async fn send<D: Destination>(
    node: &Node,
    dst: &mut D,
    mid: &str,
    missing: &[String],
) -> Result<Option<SyncReply>, AgentError> {
    if missing.is_empty() {
        return Ok(None);
    }
    let mut objects = Vec::with_capacity(missing.len());
    let mut ids = Vec::new();
    for d in missing {
        let (m, _) = object(node, d).await?;
        ids.extend(m.chunk_ids());
        objects.push(object_of(d, &m));
    }
    node.store
        .lease_add_in_memory(mid, crate::sync::LEASE_TTL, &ids)
        .map_err(|source| AgentError::Store {
            what: "lease image chunks".into(),
            source,
        })?;
    let persist = crate::sync::write_lease(&node.store, mid);
    let reply = dst
        .sync(SyncRequest {
            migration_id: mid.to_string(),
            round: 0,
            r#final: false,
            objects,
            chunk_endpoint: node.cfg.advertise.clone(),
            overlap_micros: 0,
        })
        .await;
    persist.done().await?;
    reply.map(Some)
}

/// [`send`] in the background, so the blobs travel while the pre-copy rounds go on
/// (the destination handles the two `Sync`s of the migration side by side); aborted
/// if dropped unfinished.
#[derive(Debug)]
pub struct Background {
    task: Option<tokio::task::JoinHandle<Result<Option<SyncReply>, AgentError>>>,
    started: std::time::Instant,
}

/// Starts [`send`] of `missing` to the destination `peer` in the background.
pub fn start(
    node: &Node,
    peer: &xfer_proto::v1::agent_client::AgentClient<tonic::transport::Channel>,
    mid: &str,
    missing: &[String],
) -> Background {
    let task = (!missing.is_empty()).then(|| {
        let (node, mut peer) = (node.clone(), peer.clone());
        let (mid, missing) = (mid.to_string(), missing.to_vec());
        tokio::spawn(async move { send(&node, &mut peer, &mid, &missing).await })
    });
    Background {
        task,
        started: std::time::Instant::now(),
    }
}

impl Background {
    /// When it started.
    pub fn started(&self) -> std::time::Instant {
        self.started
    }

    /// Waits for the blobs to be installed at the destination; the reply of their
    /// fetch (empty if nothing was missing).
    pub async fn finish(mut self) -> Result<SyncReply, AgentError> {
        match self.task.take() {
            None => Ok(SyncReply::default()),
            Some(t) => Ok(t
                .await
                .map_err(|e| AgentError::Refused(format!("image task: {e}")))??
                .unwrap_or_default()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The image blob files among rebuilt objects (destination side).
pub fn blob_files(
    built: &[(FileKind, PathBuf, u64)],
    objects: &[crate::sync::Incoming],
) -> Vec<crate::transfer::InFile> {
    built
        .iter()
        .zip(objects)
        .filter(|((kind, _, _), _)| *kind == FileKind::ImageBlob)
        .map(|((kind, path, size), o)| crate::transfer::InFile {
            kind: *kind,
            name: o.name.clone(),
            path: path.clone(),
            size: *size,
            digest: o.manifest.digest(),
        })
        .collect()
}
