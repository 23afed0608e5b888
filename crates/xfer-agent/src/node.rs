//! The agent of one node: serves the [`Agent`](xfer_proto::v1::agent_server::Agent)
//! service. As a source it drives a migration (see [`crate::migrate`]); as a
//! destination it prepares, receives files, restores, and cleans up on abort.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, info_span, warn, Instrument};
use xfer_proto::v1::agent_server::Agent;
use xfer_proto::v1::*;
use xfer_runtime::containerd::{rewrite_spec_for_host, Containerd, HostConfig, Runtime};
use xfer_runtime::criu::CriuFacts;

use crate::error::AgentError;
use crate::images;
use crate::transfer::{InFile, Receiver};

mod stage;
mod tail;

/// How a node is set up.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name, as operators call it (e.g. `h1`).
    pub name: String,
    /// This node's containerd, namespace, snapshotter and container network namespace.
    pub host: HostConfig,
    /// Working directory for checkpoints and received files.
    pub work_dir: PathBuf,
    /// This node's TLS files, used as a client when it calls other agents.
    pub tls: Option<crate::tls::TlsFiles>,
    /// This node's agent endpoint as peers reach it (they fetch chunks from it).
    pub advertise: String,
    /// Where containers with their own address get their namespace (host namespace
    /// and bridge); `None`: such containers are refused here.
    pub container_net: Option<crate::netctl::ContainerNet>,
    /// The handover (home agent and care-of roles) for routed containers; `None`:
    /// routed containers are refused here.
    pub mobility: Option<crate::handover::Mobility>,
}

/// A migration this node receives.
#[derive(Debug)]
struct Inbound {
    container_id: String,
    dir: PathBuf,
    image_name: String,
    manifest: Option<BlobDescriptor>,
    blobs: Vec<BlobDescriptor>,
    files: Vec<InFile>,
    inject_failure: String,
    lease: Option<xfer_runtime::image::Lease>,
    /// Top chain id once the image is unpacked here (before the source freezes).
    chain_id: Option<String>,
    /// The fetcher of this migration: one connection to the source, and what it
    /// measured of it, kept across rounds.
    fetcher: Option<Arc<crate::chunks::Fetcher<xfer_store::Store>>>,
    /// When the source last talked to us about it.
    touched: Instant,
    /// Files rebuilt by earlier rounds (patched, not rewritten, by the next).
    rebuilt: Arc<std::sync::Mutex<crate::sync::Rebuilt>>,
    /// A pre-copy round's rebuild still running, after its fetch if it replied early
    /// (the next round awaits it).
    pending: Option<tail::Pending>,
    /// Read-write volumes unpacked ahead of the restore.
    stages: Arc<stage::Stages>,
    /// Read-only named volumes this node already holds with the digest the source
    /// offered: not fetched, not installed.
    present_volumes: std::collections::BTreeSet<String>,
}

/// An inbound migration the source has not touched for this long is dropped (its
/// source died or lost the link before it could abort).
pub const INBOUND_EXPIRY: std::time::Duration = std::time::Duration::from_secs(600);

/// One node's agent.
#[derive(Debug, Clone)]
pub struct Node {
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) rt: Containerd,
    pub(crate) criu: Arc<CriuFacts>,
    /// This node's chunk store (served to peers through the Chunks service).
    pub(crate) store: Arc<xfer_store::Store>,
    inbound: Arc<Mutex<HashMap<String, Inbound>>>,
    /// The cluster knowledge base (issue 6): neighbours as sources of a fetch.
    kb: Option<Arc<crate::kb::Kb>>,
    /// The snapshot cache (issue 6), if snapshots are taken here.
    snapshots: Option<Arc<crate::snapshots::Keeper>>,
}

/// The CRIU configuration file of a container restored lazily on this node.
pub fn lazy_conf_path(work_dir: &Path, id: &str) -> PathBuf {
    work_dir.join("criu").join(format!("{id}.conf"))
}

fn refuse(msg: impl Into<String>) -> Status {
    AgentError::Refused(msg.into()).to_status()
}

fn rt_err(step: Step) -> impl FnOnce(xfer_runtime::RuntimeError) -> Status {
    move |source| AgentError::Runtime { step, source }.to_status()
}

/// Errors of the destination-side steps: the source's error names the step.
fn dst_err(source: xfer_runtime::RuntimeError) -> Status {
    AgentError::AtDestination { source }.to_status()
}

impl Node {
    /// Connects to the node's containerd and probes its CRIU.
    pub async fn new(cfg: NodeConfig) -> Result<Self, AgentError> {
        let rt = Containerd::connect(cfg.host.clone())
            .await
            .map_err(|source| AgentError::Runtime {
                step: Step::Validate,
                source,
            })?;
        let criu = tokio::task::spawn_blocking(xfer_runtime::criu::probe)
            .await
            .map_err(|e| AgentError::Refused(format!("probe criu: {e}")))?
            .map_err(|source| AgentError::Runtime {
                step: Step::Validate,
                source,
            })?;
        std::fs::create_dir_all(&cfg.work_dir).map_err(|source| AgentError::WriteFile {
            path: cfg.work_dir.clone(),
            source,
        })?;
        // Checkpoint and inbound directories of migrations that a crash interrupted.
        for sub in ["in", "out"] {
            let _ = std::fs::remove_dir_all(cfg.work_dir.join(sub));
        }
        let store = crate::sync::open_store(&cfg.work_dir.join("store"))?;
        Ok(Self {
            cfg: Arc::new(cfg),
            rt,
            criu: Arc::new(criu),
            store,
            inbound: Arc::new(Mutex::new(HashMap::new())),
            kb: None,
            snapshots: None,
        })
    }

    /// This node with the knowledge base `kb`: as a destination it asks it for the
    /// holders of what it fetches and takes chunks from them; its store's changes are
    /// reported to it.
    pub fn with_kb(mut self, kb: Arc<crate::kb::Kb>) -> Self {
        self.kb = Some(kb);
        self
    }

    /// The knowledge base, if configured.
    pub fn kb(&self) -> Option<&Arc<crate::kb::Kb>> {
        self.kb.as_ref()
    }

    /// This node with the snapshot cache `keeper` (its passes run through
    /// [`crate::snapshots::spawn`]).
    pub fn with_snapshots(mut self, keeper: Arc<crate::snapshots::Keeper>) -> Self {
        self.snapshots = Some(keeper);
        self
    }

    /// The snapshot cache, if any.
    pub fn snapshots(&self) -> Option<&Arc<crate::snapshots::Keeper>> {
        self.snapshots.as_ref()
    }

    /// Keeps the snapshot cache from dumping container `id` while the guard lives.
    pub(crate) async fn quiet_snapshots(&self, id: &str) -> Option<crate::snapshots::QuietGuard> {
        match &self.snapshots {
            Some(k) => Some(k.quiet(id).await),
            None => None,
        }
    }

    /// Drops inbound migrations whose source went silent (see [`INBOUND_EXPIRY`]);
    /// run periodically by the daemon.
    pub async fn expire_inbound(&self) -> usize {
        let stale: Vec<String> = self
            .inbound
            .lock()
            .await
            .iter()
            .filter(|(_, i)| i.touched.elapsed() > INBOUND_EXPIRY)
            .map(|(k, _)| k.clone())
            .collect();
        for mid in &stale {
            warn!(migration = %mid, "dropping an inbound migration its source abandoned");
            let id = self
                .inbound
                .lock()
                .await
                .get(mid)
                .map(|i| i.container_id.clone());
            if let Some(id) = id {
                if self.rt.container(&id).await.is_ok() {
                    self.discard(&id).await;
                }
            }
            self.cleanup_inbound(mid).await;
        }
        stale.len()
    }

    /// After an agent restart: the routed containers still running here take up
    /// their handover again (served as home agent, or re-registered with their home
    /// agent in the background).
    pub async fn resume_handover(&self) -> Result<(), AgentError> {
        let Some(mob) = self.cfg.mobility.clone() else {
            return Ok(());
        };
        let list = self.rt.list().await.map_err(|source| AgentError::Runtime {
            step: Step::Validate,
            source,
        })?;
        for c in list {
            let Ok(rec) = self.rt.container(&c.id).await else {
                continue;
            };
            let Ok(Some(crate::netctl::Attachment::Routed {
                home,
                home_agent,
                reverse_tunnel,
            })) = crate::netctl::from_labels(&rec.labels)
            else {
                continue;
            };
            let hif = crate::netctl::host_if(&c.id);
            if home_agent == mob.address() {
                mob.serve_home(home, &hif).await?;
            } else {
                let mob = mob.clone();
                tokio::spawn(async move {
                    if let Err(e) = mob.arrived(home, home_agent, reverse_tunnel, &hif).await {
                        warn!(%home, error = %e, "re-registering after a restart failed");
                    }
                });
            }
        }
        Ok(())
    }

    /// The node's containerd.
    pub fn runtime(&self) -> &Containerd {
        &self.rt
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    async fn cleanup_inbound(&self, migration_id: &str) {
        let Some(inb) = self.inbound.lock().await.remove(migration_id) else {
            return;
        };
        self.drop_inbound(migration_id, inb).await;
    }

    /// Removes what an inbound migration (already out of the map) holds.
    async fn drop_inbound(&self, migration_id: &str, mut inb: Inbound) {
        // A round's tail fetch stops, and a deferred rebuild still writing into the
        // directory ends, before it goes.
        if let Some(p) = inb.pending.take() {
            p.cancel.notify_one();
            let _ = p.task.await;
        }
        inb.stages.stop_all().await;
        if let Some(l) = inb.lease {
            images::end_lease(&self.rt, l).await;
        }
        let _ = self.store.release(migration_id);
        let _ = std::fs::remove_dir_all(&inb.dir);
    }

    /// What this node's CRIU can do.
    pub fn criu(&self) -> &CriuFacts {
        &self.criu
    }

    /// The chunk store.
    pub fn store(&self) -> &Arc<xfer_store::Store> {
        &self.store
    }

    /// A chunk peer for another agent's endpoint, over mutual TLS when configured.
    async fn chunk_peer(
        &self,
        endpoint: &str,
    ) -> Result<Arc<dyn crate::chunks::ChunkPeer>, AgentError> {
        let ch = crate::migrate::open_channel(endpoint, self.cfg.tls.as_ref()).await?;
        Ok(Arc::new(crate::chunks::GrpcPeer::new(endpoint, ch)))
    }

    /// The migration's fetcher (`existing`, or a new one from the request's source
    /// and, with a knowledge base, every neighbour), kept for its later rounds.
    async fn fetcher_for(
        &self,
        r: &SyncRequest,
        existing: Option<Arc<crate::chunks::Fetcher<xfer_store::Store>>>,
    ) -> Result<Arc<crate::chunks::Fetcher<xfer_store::Store>>, AgentError> {
        if let Some(f) = existing {
            return Ok(f);
        }
        if let Some(f) = self
            .inbound
            .lock()
            .await
            .get(&r.migration_id)
            .and_then(|i| i.fetcher.clone())
        {
            return Ok(f);
        }
        let peer = self.chunk_peer(&r.chunk_endpoint).await?;
        let mut f =
            crate::chunks::Fetcher::new(self.store.clone(), crate::chunks::FALLBACK_NAME, peer);
        if let Some(kb) = &self.kb {
            kb.add_sources(&mut f, &r.chunk_endpoint);
            let cfg = kb.fetch_config(f.config().clone());
            f = f.with_config(cfg);
        }
        let f = Arc::new(f);
        if let Some(inb) = self.inbound.lock().await.get_mut(&r.migration_id) {
            inb.fetcher = Some(f.clone());
        }
        Ok(f)
    }

    /// Each of `missing` with its candidate sources: the knowledge base's plan (which
    /// also primes the fetcher's view of the sources), or the source alone.
    async fn wants_for(
        &self,
        r: &SyncRequest,
        missing: &[xfer_store::Digest],
        moving: &xfer_kb::Moving,
        fetcher: &crate::chunks::Fetcher<xfer_store::Store>,
    ) -> Vec<crate::chunks::Want> {
        match &self.kb {
            Some(kb) => {
                let plan = kb.plan(missing, moving, &r.chunk_endpoint).await;
                info!(
                    migration = %r.migration_id,
                    round = r.round,
                    chunks = missing.len(),
                    from_neighbours = plan.wants.iter().filter(|w| !w.sources.is_empty()).count(),
                    ask_micros = plan.ask_micros,
                    "knowledge base asked"
                );
                fetcher.set_priors(crate::kb::Kb::priors(&plan));
                plan.wants
            }
            None => missing
                .iter()
                .map(|id| crate::chunks::Want::from_fallback(*id))
                .collect(),
        }
    }

    /// Fetches `wants` to the end and tells the knowledge base what is here now.
    async fn fetch_all(
        &self,
        fetcher: &crate::chunks::Fetcher<xfer_store::Store>,
        wants: &[crate::chunks::Want],
        missing: &[xfer_store::Digest],
    ) -> Result<crate::chunks::FetchReport, AgentError> {
        let report = fetcher.fetch(wants).await.map_err(AgentError::Fetch)?;
        self.fetched(missing, &report);
        Ok(report)
    }

    /// After a fetch of `ids`: the knowledge base (if any) learns they are here and
    /// what the fetch measured of the sources.
    pub(crate) fn fetched(&self, ids: &[xfer_store::Digest], report: &crate::chunks::FetchReport) {
        if let Some(kb) = &self.kb {
            kb.fetched(ids, report);
        }
    }

    /// Drops from `objects` the read-only named volumes (`ro-NAME`) this node already
    /// installed with the same digest; returns their names.
    fn skip_present_volumes(&self, objects: &mut Vec<ObjectManifest>) -> Vec<String> {
        let mut present = Vec::new();
        objects.retain(|o| {
            let Some(name) = o.name.strip_prefix("ro-") else {
                return true;
            };
            if o.kind != FileKind::Volume as i32 || name.parse::<usize>().is_ok() {
                return true;
            }
            let digest = xfer_store::manifest::Manifest::decode(&o.manifest)
                .map(|m| m.digest().to_hex())
                .ok();
            let held = crate::volumes::installed_digest(&self.cfg.work_dir, name);
            if digest.is_some() && digest == held {
                info!(
                    volume = name,
                    "read-only volume already here with that digest: skipped"
                );
                present.push(name.to_string());
                false
            } else {
                true
            }
        });
        present
    }

    /// A round's fetch and rebuild; returns the reply and the image blobs it rebuilt
    /// (for [`Node::accept_blobs`]).
    async fn sync_inner(&self, r: SyncRequest) -> Result<(SyncReply, Vec<InFile>), AgentError> {
        if let Some(i) = self.inbound.lock().await.get_mut(&r.migration_id) {
            i.touched = Instant::now();
        }
        let (dir, fetcher, rebuilt, moving, stages) = {
            let map = self.inbound.lock().await;
            let inb = map.get(&r.migration_id).ok_or_else(|| {
                AgentError::Refused(format!("no migration {} prepared here", r.migration_id))
            })?;
            if r.r#final && inb.inject_failure == "transfer" {
                return Err(AgentError::Refused(
                    "injected failure at the transfer step (test hook)".into(),
                ));
            }
            let moving = xfer_kb::Moving {
                container: Some(inb.container_id.clone()),
                service: inb.manifest.as_ref().map(|m| m.digest.clone()),
                volumes: r
                    .objects
                    .iter()
                    .filter(|o| o.kind == FileKind::Volume as i32 && o.name.starts_with("rw-"))
                    .map(|o| crate::snapshots::volume_guid(&inb.container_id, &o.name))
                    .collect(),
            };
            (
                inb.dir.clone(),
                inb.fetcher.clone(),
                inb.rebuilt.clone(),
                moving,
                inb.stages.clone(),
            )
        };
        let mut r = r;
        let present = self.skip_present_volumes(&mut r.objects);
        if !present.is_empty() {
            if let Some(inb) = self.inbound.lock().await.get_mut(&r.migration_id) {
                inb.present_volumes.extend(present);
            }
        }
        let t = Instant::now();
        let objects = crate::sync::decode_objects(&r.objects)?;
        let ids = crate::sync::chunk_ids(&objects);
        let store = self.store.clone();
        // Leased in memory before the lookup; the file is written during the fetch.
        store
            .lease_add_in_memory(&r.migration_id, crate::sync::LEASE_TTL, &ids)
            .map_err(|source| AgentError::Store {
                what: "lease chunks".into(),
                source,
            })?;
        let persist = crate::sync::write_lease(&store, &r.migration_id);
        let missing = store.missing(&ids);
        debug!(
            ids = ids.len(),
            missing = missing.len(),
            ms = t.elapsed().as_secs_f64() * 1000.0,
            "decoded, leased, looked up"
        );
        // Ids an earlier round is still fetching (it replied early) are not asked for
        // again: this round awaits that fetch below, after fetching the rest.
        let mut missing = missing;
        let earlier_ids = self
            .inbound
            .lock()
            .await
            .get(&r.migration_id)
            .and_then(|i| i.pending.as_ref().map(|p| p.ids.clone()));
        if let Some(ids) = &earlier_ids {
            missing.retain(|id| !ids.contains(id));
        }
        let has_blobs = objects.iter().any(|o| o.kind == FileKind::ImageBlob);
        // A pre-copy round's files are only the base the next round patches: the reply
        // goes as soon as the chunks are here (or, asked to overlap, once what is left
        // is short), and the rebuild runs while the source goes on (into its cut-over:
        // freeze and dump take longer than a rebuild). Image blobs (installed from the
        // rebuilt files) and the final round wait.
        let defer = !r.r#final && r.round >= 1 && !has_blobs;
        let overlap = (defer && r.overlap_micros > 0)
            .then(|| std::time::Duration::from_micros(r.overlap_micros).min(tail::MAX_OVERLAP));
        let t = Instant::now();
        let mut early: Option<tail::Early> = None;
        let mut report = if missing.is_empty() {
            crate::chunks::FetchReport::default()
        } else {
            let fetcher = self.fetcher_for(&r, fetcher).await?;
            let wants = self.wants_for(&r, &missing, &moving, &fetcher).await;
            match overlap {
                None => self.fetch_all(&fetcher, &wants, &missing).await?,
                Some(overlap) => {
                    let progress = Arc::new(crate::chunks::Progress::default());
                    let (f, p) = (fetcher.clone(), progress.clone());
                    let mut task = tokio::spawn(async move { f.fetch_observed(&wants, p).await });
                    match tail::watch(&fetcher, &mut task, overlap).await {
                        tail::Watched::Done(res) => {
                            let rep = res.map_err(AgentError::Fetch)?;
                            self.fetched(&missing, &rep);
                            rep
                        }
                        tail::Watched::Early { eta } => {
                            let now = progress.get();
                            info!(
                                migration = %r.migration_id,
                                round = r.round,
                                left = now.remaining,
                                eta_ms = eta.as_secs_f64() * 1000.0,
                                overlap_ms = overlap.as_secs_f64() * 1000.0,
                                "replying before the fetch ends: the source's next step overlaps the tail"
                            );
                            let rep = tail::partial(&now);
                            early = Some(tail::Early {
                                task,
                                progress,
                                ids: missing.clone(),
                                started: t,
                            });
                            rep
                        }
                    }
                }
            }
        };
        let mut fetch_micros = t.elapsed().as_micros() as u64;
        // Rebuilds patch in round order: the previous round's, if it was deferred,
        // ends first (and, if it replied early, its fetch: its figures go back in
        // this reply).
        let prev = self
            .inbound
            .lock()
            .await
            .get_mut(&r.migration_id)
            .and_then(|i| i.pending.take());
        let mut round_tail = None;
        if let Some(p) = prev {
            let waited = Instant::now();
            let refetch = match p.task.await {
                Ok(Ok(t)) => {
                    round_tail = t;
                    false
                }
                Ok(Err(e)) => {
                    warn!(migration = %r.migration_id, error = %e, "an earlier round's tail failed; fetching what it left");
                    true
                }
                Err(e) => {
                    warn!(migration = %r.migration_id, error = %e, "an earlier round's tail task failed; fetching what it left");
                    true
                }
            };
            if refetch {
                let again = store.missing(&ids);
                if !again.is_empty() {
                    let fetcher = self.fetcher_for(&r, None).await?;
                    let wants = self.wants_for(&r, &again, &moving, &fetcher).await;
                    let more = self.fetch_all(&fetcher, &wants, &again).await?;
                    tail::absorb(&mut report, &more);
                }
            }
            debug!(
                ms = waited.elapsed().as_secs_f64() * 1000.0,
                "earlier round's tail awaited"
            );
            fetch_micros = t.elapsed().as_micros() as u64;
        }
        let t = Instant::now();
        let (st, d, objs) = (store.clone(), dir.clone(), objects.clone());
        let rebuild = move || {
            let mut done = rebuilt
                .lock()
                .map_err(|_| AgentError::Refused("rebuild state poisoned".into()))?;
            crate::sync::rebuild(&st, &d, &objs, &mut done)
        };
        let pending_chunks = early.as_ref().map_or(0, |e| e.progress.get().remaining);
        let built = if defer {
            // The round's volumes, once all their chunks are here, are unpacked ahead
            // of the restore.
            let stage_objects = objects.clone();
            if early.is_none() {
                stages.start(&store, &dir, &stage_objects);
            }
            let (stage_store, stage_dir) = (store.clone(), dir.clone());
            let mid = r.migration_id.clone();
            let round = r.round;
            let node = self.clone();
            let cancel = Arc::new(tokio::sync::Notify::new());
            let ids: Arc<std::collections::HashSet<xfer_store::Digest>> = Arc::new(
                early
                    .as_ref()
                    .map(|e| e.ids.iter().copied().collect())
                    .unwrap_or_default(),
            );
            let stop = cancel.clone();
            let h = tokio::spawn(async move {
                let round_tail = match early {
                    None => None,
                    Some(e) => {
                        let t = tail::finish(&node, round, e, &stop).await?;
                        stages.start(&stage_store, &stage_dir, &stage_objects);
                        Some(t)
                    }
                };
                match tokio::task::spawn_blocking(rebuild).await {
                    Ok(Ok(_)) => {}
                    // The next round rebuilds what this one did not (and verifies).
                    Ok(Err(e)) => warn!(migration = %mid, error = %e, "deferred rebuild failed"),
                    Err(e) => warn!(migration = %mid, error = %e, "deferred rebuild task failed"),
                }
                Ok(round_tail)
            });
            if let Some(i) = self.inbound.lock().await.get_mut(&r.migration_id) {
                i.pending = Some(tail::Pending {
                    ids,
                    cancel,
                    task: h,
                });
            }
            Vec::new()
        } else {
            tokio::task::spawn_blocking(rebuild)
                .await
                .map_err(|e| AgentError::Refused(format!("rebuild task: {e}")))??
        };
        let rebuild_micros = t.elapsed().as_micros() as u64;
        persist.done().await?;
        let blobs = crate::layers::blob_files(&built, &objects);
        if r.r#final {
            // Files of earlier rounds that the final dump does not have must not be
            // restored.
            let keep: std::collections::HashSet<PathBuf> =
                built.iter().map(|(_, p, _)| p.clone()).collect();
            if let Ok(rd) = std::fs::read_dir(dir.join("criu")) {
                for e in rd.flatten() {
                    if !keep.contains(&e.path()) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            let files: Vec<InFile> = built
                .into_iter()
                .zip(&objects)
                .map(|((kind, path, size), o)| InFile {
                    kind,
                    name: o.name.clone(),
                    path,
                    size,
                    digest: o.manifest.digest(),
                })
                .collect();
            if let Some(inb) = self.inbound.lock().await.get_mut(&r.migration_id) {
                inb.files.retain(|f| f.kind == FileKind::ImageBlob);
                inb.files.extend(files);
            }
        }
        let reply = SyncReply {
            pending_chunks,
            tail: round_tail,
            chunks: report.fetched,
            wire_bytes: report.wire_bytes,
            raw_bytes: report.raw_bytes,
            fetch_micros,
            rebuild_micros,
            report_json: serde_json::to_string(&report).unwrap_or_default(),
            sources: tail::source_bytes(&report),
        };
        Ok((reply, blobs))
    }

    /// Writes received image blobs into the content store (containerd checks their
    /// digests; each must have been announced in `Prepare`) and unpacks the image, so
    /// that `Restore` only creates the container.
    async fn accept_blobs(&self, mid: &str, files: Vec<InFile>) -> Result<(), Status> {
        let (blob_descs, lease) = {
            let map = self.inbound.lock().await;
            let inb = map
                .get(mid)
                .ok_or_else(|| refuse(format!("no migration {mid} prepared here")))?;
            let mut v = inb.blobs.clone();
            v.extend(inb.manifest.clone());
            let lease = inb
                .lease
                .as_ref()
                .map(|l| l.id().to_string())
                .unwrap_or_default();
            (v, lease)
        };
        for f in files.iter().filter(|f| f.kind == FileKind::ImageBlob) {
            let desc = blob_descs
                .iter()
                .find(|d| d.digest == f.name)
                .ok_or_else(|| refuse(format!("blob {} was not announced in prepare", f.name)))?;
            images::write_blob_file(&self.rt, &lease, desc, &f.path)
                .await
                .map_err(dst_err)?;
        }
        let got_blobs = files.iter().any(|f| f.kind == FileKind::ImageBlob);
        {
            let mut map = self.inbound.lock().await;
            if let Some(inb) = map.get_mut(mid) {
                inb.files.extend(files);
            }
        }
        if got_blobs {
            // The image is complete: unpack it now, before the source freezes.
            self.unpack_inbound(mid).await?;
        }
        Ok(())
    }

    async fn unpack_inbound(&self, mid: &str) -> Result<(), Status> {
        let (name, manifest) = {
            let map = self.inbound.lock().await;
            let inb = map
                .get(mid)
                .ok_or_else(|| refuse(format!("no migration {mid} prepared here")))?;
            (inb.image_name.clone(), inb.manifest.clone())
        };
        let manifest = manifest.ok_or_else(|| refuse("prepare carried no image manifest"))?;
        let chain = images::ensure_image(&self.rt, &name, &manifest)
            .await
            .map_err(dst_err)?;
        if let Some(inb) = self.inbound.lock().await.get_mut(mid) {
            inb.chain_id = Some(chain);
        }
        Ok(())
    }

    async fn restore_inner(
        &self,
        req: &RestoreRequest,
        phases: &mut Vec<PhaseTiming>,
    ) -> Result<u32, Status> {
        let (dir, image_name, manifest, files, inject, lease, chain_id, present, stages, rebuilt) = {
            let map = self.inbound.lock().await;
            let inb = map.get(&req.migration_id).ok_or_else(|| {
                refuse(format!("no migration {} prepared here", req.migration_id))
            })?;
            if inb.container_id != req.container_id {
                return Err(refuse("container id differs from the prepared one"));
            }
            (
                inb.dir.clone(),
                inb.image_name.clone(),
                inb.manifest.clone(),
                inb.files.clone(),
                inb.inject_failure.clone(),
                inb.lease
                    .as_ref()
                    .map(|l| l.id().to_string())
                    .unwrap_or_default(),
                inb.chain_id.clone(),
                inb.present_volumes.clone(),
                inb.stages.clone(),
                inb.rebuilt.clone(),
            )
        };
        let id = req.container_id.as_str();
        // A lazy restore's page daemon starts while the container is prepared (it
        // only needs the images, complete since the final sync).
        let lazy_dir = req
            .lazy
            .as_ref()
            .map(|_| self.cfg.work_dir.join("lazy").join(&req.migration_id));
        let lazy_start = async {
            match (&req.lazy, &lazy_dir) {
                (Some(l), Some(ld)) => {
                    let t = Instant::now();
                    Some((
                        self.start_lazy_daemon(l, &dir.join("criu"), ld).await,
                        t.elapsed(),
                    ))
                }
                _ => None,
            }
        };
        let prepare = async {
            let t = Instant::now();
            let chain = match chain_id {
                Some(c) => c,
                None => {
                    let manifest =
                        manifest.ok_or_else(|| refuse("prepare carried no image manifest"))?;
                    images::ensure_image(&self.rt, &image_name, &manifest)
                        .await
                        .map_err(dst_err)?
                }
            };
            phases.push(phase("dst.image", t, 0));

            let t = Instant::now();
            self.rt
                .prepare_snapshot(id, &chain, Some(&lease))
                .await
                .map_err(dst_err)?;
            let cleanup_all = |node: Node, id: String| async move {
                node.discard(&id).await;
            };
            if req.has_rootfs_diff {
                let diff = files
                    .iter()
                    .find(|f| f.kind == FileKind::RootfsDiff)
                    .ok_or_else(|| {
                        refuse("restore wants a writable-layer diff that was not sent")
                    })?;
                if let Err(e) = images::apply_diff(&self.rt, &lease, id, &diff.path).await {
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(dst_err(e));
                }
            }
            phases.push(phase("dst.rootfs", t, 0));

            let finals: HashMap<String, xfer_store::Digest> = files
                .iter()
                .filter(|f| f.kind == FileKind::Volume)
                .map(|f| (f.name.clone(), f.digest))
                .collect();
            let staged: HashMap<String, (stage::Ready, Option<xfer_store::manifest::Manifest>)> = {
                let ready = stages.ready_for(&finals).await;
                // The final manifests of those volumes only (not every rebuilt file's).
                let rebuilt = rebuilt.lock().unwrap_or_else(|p| p.into_inner());
                ready
                    .into_iter()
                    .map(|(n, r)| {
                        let m = rebuilt.get(&n).cloned();
                        (n, (r, m))
                    })
                    .collect()
            };
            let volume_sources =
                match self.install_volumes(id, &req.labels, &files, &present, &staged, phases) {
                    Ok(v) => v,
                    Err(e) => {
                        cleanup_all(self.clone(), id.to_string()).await;
                        return Err(e.to_status());
                    }
                };

            let t = Instant::now();
            // A container with its own address gets the same namespace and address here.
            let (netns, attachment) = match self.attach_from_labels(id, &req.labels).await {
                Ok(Some((p, a))) => (Some(p), Some(a)),
                Ok(None) => (None, None),
                Err(e) => {
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(e.to_status());
                }
            };
            phases.push(phase("dst.network", t, 0));
            // A lazy restore gets its own CRIU configuration (with `lazy-pages`), put back
            // to the host's options once the restore is done (later dumps read it too).
            let lazy_conf = lazy_conf_path(&self.cfg.work_dir, id);
            let criu_conf = if req.lazy.is_some() {
                if let Err(e) = xfer_runtime::containerd::write_criu_config_with(
                    &lazy_conf,
                    &self.criu.config_extras(&["lazy-pages"]),
                ) {
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(dst_err(e));
                }
                Some(lazy_conf.as_path())
            } else {
                self.cfg.host.criu_config.as_deref()
            };
            let spec = match rewrite_spec_for_host(
                &req.spec_json,
                id,
                &self.cfg.host.namespace,
                netns.as_deref().or(self.cfg.host.netns.as_deref()),
                criu_conf,
            ) {
                Ok(s) => s,
                Err(e) => {
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(dst_err(e));
                }
            };
            let spec =
                match crate::volumes::rewrite_mounts(&spec, &volume_sources.0, &volume_sources.1) {
                    Ok(s) => s,
                    Err(e) => {
                        cleanup_all(self.clone(), id.to_string()).await;
                        return Err(e.to_status());
                    }
                };
            let record = xfer_runtime::containerd::ContainerRecord {
                id: id.to_string(),
                image: image_name.clone(),
                snapshotter: self.cfg.host.snapshotter.clone(),
                snapshot_key: id.to_string(),
                labels: req.labels.clone(),
                spec_json: spec,
            };
            if let Err(e) = self.rt.create_container(&record).await {
                cleanup_all(self.clone(), id.to_string()).await;
                return Err(dst_err(e));
            }
            if inject == "restore" {
                cleanup_all(self.clone(), id.to_string()).await;
                return Err(refuse("injected failure at the restore step (test hook)"));
            }
            let mounts = match self.rt.rootfs_mounts(id).await {
                Ok(m) => m,
                Err(e) => {
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(dst_err(e));
                }
            };
            Ok::<_, Status>((mounts, attachment, lazy_conf))
        };
        let (prepared, lazy_started) = tokio::join!(prepare, lazy_start);
        let daemon_failed = |ld: &Option<PathBuf>| {
            if let Some(ld) = ld {
                let _ = std::fs::remove_dir_all(ld);
            }
        };
        let (mounts, attachment, lazy_conf) = match prepared {
            Ok(v) => v,
            Err(e) => {
                if let Some((Ok(d), _)) = lazy_started {
                    d.abort().await;
                }
                daemon_failed(&lazy_dir);
                return Err(e);
            }
        };
        let cleanup_all = |node: Node, id: String| async move {
            node.discard(&id).await;
        };
        let t = Instant::now();
        let mut criu_dir = dir.join("criu");
        let mut work = dir.join("restore-work");
        let mut daemon = None;
        if let (Some((started, took)), Some(ld)) = (lazy_started, &lazy_dir) {
            // The images must outlive this migration's inbound directory: the daemon
            // reads them until the last page is across.
            match started {
                Ok(d) => daemon = Some(d),
                Err(e) => {
                    daemon_failed(&lazy_dir);
                    cleanup_all(self.clone(), id.to_string()).await;
                    return Err(dst_err(e));
                }
            }
            criu_dir = ld.join("criu");
            work = ld.join("work");
            phases.push(PhaseTiming {
                name: "dst.lazy_daemon (beside the above)".into(),
                micros: took.as_micros() as u64,
                bytes: 0,
            });
        }
        let _ = std::fs::create_dir_all(&work);
        let pid = match self
            .rt
            .create_and_start_task(id, mounts, Some((&criu_dir, &work)))
            .await
        {
            Ok(pid) => pid,
            Err(e) => {
                let log = xfer_runtime::containerd::criu_log_tail(&work);
                if let Some(d) = daemon.take() {
                    d.abort().await;
                }
                if let Some(ld) = &lazy_dir {
                    let _ = std::fs::remove_dir_all(ld);
                }
                cleanup_all(self.clone(), id.to_string()).await;
                return Err(dst_err(xfer_runtime::RuntimeError::Invalid(format!(
                    "{e} ({log})"
                ))));
            }
        };
        phases.push(phase("dst.criu_restore", t, 0));
        if let (Some(d), Some(ld)) = (daemon, lazy_dir) {
            let base = self.criu.config_extras(&[]);
            if let Err(e) = xfer_runtime::containerd::write_criu_config_with(&lazy_conf, &base) {
                warn!(error = %e, "could not put the container's CRIU configuration back");
            }
            self.watch_lazy_transfer(id, d, ld);
        }
        if let Some(crate::netctl::Attachment::Routed {
            home,
            home_agent,
            reverse_tunnel,
        }) = attachment
        {
            // The home agent must forward to us before we call the restore done.
            let t = Instant::now();
            let mob = self.cfg.mobility.as_ref().expect("checked by attach");
            let hif = crate::netctl::host_if(id);
            if let Err(e) = mob.arrived(home, home_agent, reverse_tunnel, &hif).await {
                cleanup_all(self.clone(), id.to_string()).await;
                return Err(e.to_status());
            }
            phases.push(phase("dst.binding", t, 0));
        }
        // Tell the link where the address lives now (the same L2 segment as before).
        if let (Some(cn), Some(crate::netctl::Attachment::Bridged { address, .. })) =
            (&self.cfg.container_net, attachment)
        {
            let ns = cn.netns_name(id);
            let ip = address.addr();
            let sent = tokio::task::spawn_blocking(move || {
                xfer_net::send_gratuitous_arp(xfer_net::Ns::Named(&ns), "eth0", ip, None)
            })
            .await;
            if !matches!(sent, Ok(Ok(()))) {
                warn!(?sent, "gratuitous ARP for the restored container failed");
            }
        }
        Ok(pid)
    }

    /// Starts the lazy-pages daemon for a post-copy restore, on images moved to
    /// `lazy_dir` (kept until the last page is across).
    async fn start_lazy_daemon(
        &self,
        l: &LazyPages,
        criu_dir: &Path,
        lazy_dir: &Path,
    ) -> Result<xfer_runtime::lazy::LazyPagesDaemon, xfer_runtime::RuntimeError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| xfer_runtime::RuntimeError::Io { op, path, source }
        };
        let ip: std::net::IpAddr = l.address.parse().map_err(|_| {
            xfer_runtime::RuntimeError::Invalid(format!(
                "the source's page server address {:?} is not an IP address",
                l.address
            ))
        })?;
        let port = u16::try_from(l.port).map_err(|_| {
            xfer_runtime::RuntimeError::Invalid(format!(
                "page server port {} is out of range",
                l.port
            ))
        })?;
        tokio::task::spawn_blocking(xfer_runtime::lazy::ensure_pipe_max_size)
            .await
            .map_err(|e| xfer_runtime::RuntimeError::Invalid(format!("sysctl task: {e}")))??;
        std::fs::create_dir_all(lazy_dir).map_err(io("create", lazy_dir))?;
        let dst = lazy_dir.join("criu");
        std::fs::rename(criu_dir, &dst).map_err(io("move images to", &dst))?;
        xfer_runtime::lazy::LazyPagesDaemon::start(
            &dst,
            &lazy_dir.join("work"),
            std::net::SocketAddr::new(ip, port),
        )
        .await
    }

    /// Follows a post-copy transfer in the background: once the daemon is done, its
    /// images go; if it failed, the container lacks memory it can never get, so it is
    /// removed (the source resumes its own copy).
    fn watch_lazy_transfer(
        &self,
        id: &str,
        daemon: xfer_runtime::lazy::LazyPagesDaemon,
        lazy_dir: PathBuf,
    ) {
        let node = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            match daemon.finish().await {
                Ok(took) => {
                    info!(container = %id, ms = took.as_millis() as u64, "post-copy: every page arrived");
                }
                Err(e) => {
                    warn!(container = %id, error = %e, "post-copy failed: removing the container, whose memory cannot arrive");
                    node.discard(&id).await;
                }
            }
            let _ = std::fs::remove_dir_all(&lazy_dir);
        });
    }

    /// Installs the volumes a restore brings (named, anonymous, bind), skipping those
    /// already here; returns the volumes and their paths on this node.
    fn install_volumes(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
        files: &[InFile],
        present: &std::collections::BTreeSet<String>,
        staged: &HashMap<String, (stage::Ready, Option<xfer_store::manifest::Manifest>)>,
        phases: &mut Vec<PhaseTiming>,
    ) -> Result<(Vec<crate::volumes::Volume>, Vec<PathBuf>), AgentError> {
        use crate::volumes::Kind;
        let vols = crate::volumes::from_labels(labels)?;
        let work = &self.cfg.work_dir;
        let mut sources = Vec::with_capacity(vols.len());
        for (i, v) in vols.iter().enumerate() {
            let t = Instant::now();
            let path = v.host_path(work, id, i);
            let obj = v.object_name(i);
            if v.read_only && v.kind == Kind::Named && present.contains(&v.name) {
                phases.push(phase(&format!("dst.volume.skipped.{}", v.name), t, 0));
                sources.push(path);
                continue;
            }
            let f = files
                .iter()
                .find(|f| f.kind == FileKind::Volume && f.name == obj)
                .ok_or_else(|| {
                    AgentError::Refused(format!("volume {} ({obj}) was not sent", v.destination))
                })?;
            let size = std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
            // A bind source that already has this content (a shared file system, or
            // an earlier migration) is left alone.
            let same = v.kind == Kind::Bind && path.is_dir() && {
                let probe = f.path.with_extension("here.tar");
                let same = crate::volumes::capture(&path, &probe).is_ok()
                    && std::fs::read(&probe).ok() == std::fs::read(&f.path).ok();
                let _ = std::fs::remove_file(&probe);
                same
            };
            let ahead = staged.get(&obj).filter(|_| !v.read_only);
            if same {
                phases.push(phase(&format!("dst.volume.unchanged.{obj}"), t, 0));
            } else if let Some(how) =
                ahead.and_then(|(r, m)| install_ahead(&obj, r, m.as_ref(), &f.path, &path))
            {
                info!(volume = %obj, how, "volume installed from its staged copy");
                phases.push(phase(&format!("dst.volume.staged.{obj}"), t, size));
            } else {
                let digest = v.read_only.then(|| {
                    xfer_store::Digest::of(&std::fs::read(&f.path).unwrap_or_default()).to_hex()
                });
                let marker = match (&digest, v.kind) {
                    (Some(d), Kind::Named) => Some((work.as_path(), v.name.as_str(), d.as_str())),
                    _ => None,
                };
                crate::volumes::install(&f.path, &path, marker)?;
                phases.push(phase(&format!("dst.volume.{obj}"), t, size));
            }
            sources.push(path);
        }
        Ok((vols, sources))
    }

    /// Creates the container's own namespace if its labels give it an address.
    async fn attach_from_labels(
        &self,
        id: &str,
        labels: &HashMap<String, String>,
    ) -> Result<Option<(PathBuf, crate::netctl::Attachment)>, AgentError> {
        let Some(how) = crate::netctl::from_labels(labels)? else {
            return Ok(None);
        };
        let cn = self.cfg.container_net.as_ref().ok_or_else(|| {
            AgentError::Refused(format!(
                "node {} has no bridge for containers with their own address (xferd --bridge)",
                self.cfg.name
            ))
        })?;
        if matches!(how, crate::netctl::Attachment::Routed { .. }) && self.cfg.mobility.is_none() {
            return Err(AgentError::Refused(format!(
                "node {} takes no routed containers: start xferd with --mobility-address and --cluster-key",
                self.cfg.name
            )));
        }
        Ok(Some((cn.attach(id, &how).await?, how)))
    }

    /// A routed container is leaving this node (migrated on, or discarded): the
    /// handover forgets it here.
    pub(crate) async fn net_departed(&self, labels: &HashMap<String, String>) {
        if let (Some(mob), Ok(Some(crate::netctl::Attachment::Routed { home, .. }))) =
            (&self.cfg.mobility, crate::netctl::from_labels(labels))
        {
            mob.departed(home).await;
        }
    }

    /// Removes a container, its task, snapshot and own network namespace.
    pub async fn discard(&self, id: &str) {
        if let Ok(rec) = self.rt.container(id).await {
            self.net_departed(&rec.labels).await;
        }
        if let Err(e) = self.rt.remove(id).await {
            warn!(container = id, error = %e, "remove container");
        }
        crate::volumes::remove_anonymous(&self.cfg.work_dir, id);
        let _ = std::fs::remove_file(lazy_conf_path(&self.cfg.work_dir, id));
        if let Some(cn) = &self.cfg.container_net {
            if let Err(e) = cn.detach(id).await {
                warn!(container = id, error = %e, "remove container namespace");
            }
        }
    }
}

/// Installs volume `obj` at `target` from its staged copy `r`: as is if its tar is
/// the final one, else patched to the final tar `final_tar` (manifest `now`) first.
/// Returns how, or None if the caller must unpack the final tar (the staged copy is
/// then gone).
fn install_ahead(
    obj: &str,
    r: &stage::Ready,
    now: Option<&xfer_store::manifest::Manifest>,
    final_tar: &Path,
    target: &Path,
) -> Option<String> {
    let how = if r.exact {
        "same digest as the final tar".to_string()
    } else {
        let now = now?;
        let patched = stage::SameFiles::new(&r.manifest, &r.index, now, final_tar, &r.dir)
            .and_then(|mut cmp| {
                crate::volumes::patch_unpacked(&r.dir, final_tar, |p, h, d| cmp.same(p, h, d))
            });
        match patched {
            Ok(p) => format!(
                "patched: {} files ({} bytes) kept, {} entries ({} bytes) written, {} removed",
                p.kept, p.kept_bytes, p.written, p.written_bytes, p.removed
            ),
            Err(e) => {
                warn!(volume = %obj, error = %e, "patching the staged copy failed; unpacking the final tar");
                let _ = std::fs::remove_dir_all(&r.dir);
                return None;
            }
        }
    };
    match crate::volumes::install_unpacked(&r.dir, target, None) {
        Ok(()) => Some(how),
        Err(e) => {
            warn!(volume = %obj, error = %e, "installing the staged copy failed; unpacking the final tar");
            let _ = std::fs::remove_dir_all(&r.dir);
            None
        }
    }
}

pub(crate) fn phase(name: &str, since: Instant, bytes: u64) -> PhaseTiming {
    PhaseTiming {
        name: name.to_string(),
        micros: since.elapsed().as_micros() as u64,
        bytes,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<MigrateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for Node {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        xfer_proto::check_version(req.get_ref().version)
            .map_err(|e| AgentError::Decode(e).to_status())?;
        Ok(Response::new(HelloReply {
            version: xfer_proto::PROTOCOL_VERSION as i32,
            node: self.cfg.name.clone(),
            criu_version: self.criu.version.clone(),
            criu_ok: self.criu.usable(),
            mem_dirty_track: self.criu.mem_dirty_track,
            lazy_pages: self.criu.usable() && self.criu.lazy_pages,
            handover: self.cfg.mobility.is_some(),
            tunnel_kind: self
                .cfg
                .mobility
                .as_ref()
                .map(|m| m.tunnel_kind().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn run_container(
        &self,
        req: Request<RunContainerRequest>,
    ) -> Result<Response<RunContainerReply>, Status> {
        let r = req.into_inner();
        let info = images::info(&self.rt, &r.image)
            .await
            .map_err(rt_err(Step::Validate))?
            .ok_or_else(|| {
                refuse(format!(
                    "image {:?} is not on node {}: import it first (xfer image import)",
                    r.image, self.cfg.name
                ))
            })?;
        let mut labels = HashMap::new();
        let routed = r.network == NetworkMode::Routed as i32;
        if !r.address.is_empty() {
            let address: xfer_net::Ipv4Cidr = r.address.parse().map_err(|_| {
                refuse(format!(
                    "--address {:?} is not an IPv4 address with a prefix (e.g. 10.1.2.200/24)",
                    r.address
                ))
            })?;
            let how = if routed {
                let mob = self.cfg.mobility.as_ref().ok_or_else(|| {
                    refuse(format!(
                        "node {} takes no routed containers: start xferd with --mobility-address and --cluster-key",
                        self.cfg.name
                    ))
                })?;
                crate::netctl::Attachment::Routed {
                    home: address.addr(),
                    home_agent: mob.address(),
                    reverse_tunnel: r.reverse_tunnel,
                }
            } else {
                let gateway = r.gateway.parse().map_err(|_| {
                    refuse(format!(
                        "--gateway {:?} is not an IPv4 address (a bridged container needs one)",
                        r.gateway
                    ))
                })?;
                crate::netctl::Attachment::Bridged { address, gateway }
            };
            labels.extend(how.labels());
        } else if routed {
            return Err(refuse("a routed container needs an address (--address)"));
        }
        xfer_runtime::containerd::validate_id(&r.id).map_err(rt_err(Step::Validate))?;
        if self.rt.container(&r.id).await.is_ok() {
            return Err(refuse(format!(
                "node {} already has a container {:?}",
                self.cfg.name, r.id
            )));
        }
        let vols = r
            .volumes
            .iter()
            .map(crate::volumes::Volume::from_msg)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_status())?;
        let mut seen = std::collections::HashSet::new();
        if let Some(v) = vols.iter().find(|v| !seen.insert(v.destination.clone())) {
            return Err(refuse(format!("two volumes at {}", v.destination)));
        }
        let paths = crate::volumes::prepare_dirs(&vols, &self.cfg.work_dir, &r.id)
            .map_err(|e| e.to_status())?;
        let mounts: Vec<serde_json::Value> = vols
            .iter()
            .zip(&paths)
            .map(|(v, p)| v.spec_mount(p))
            .collect();
        if !vols.is_empty() {
            labels.insert(
                crate::volumes::LABEL.to_string(),
                crate::volumes::to_label(&vols),
            );
        }
        let attached = self
            .attach_from_labels(&r.id, &labels)
            .await
            .map_err(|e| e.to_status())?;
        if let (Some((_, crate::netctl::Attachment::Routed { home, .. })), Some(mob)) =
            (&attached, &self.cfg.mobility)
        {
            if let Err(e) = mob.serve_home(*home, &crate::netctl::host_if(&r.id)).await {
                if let Some(cn) = &self.cfg.container_net {
                    let _ = cn.detach(&r.id).await;
                }
                return Err(e.to_status());
            }
        }
        let netns = attached.map(|(p, _)| p);
        let pid = match self
            .rt
            .run(
                &r.id,
                &r.image,
                &info.chain_id,
                &r.args,
                &r.env,
                netns.as_deref(),
                labels,
                &mounts,
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                if let Some(cn) = &self.cfg.container_net {
                    let _ = cn.detach(&r.id).await;
                }
                crate::volumes::remove_anonymous(&self.cfg.work_dir, &r.id);
                return Err(rt_err(Step::Validate)(e));
            }
        };
        info!(container = %r.id, pid, "container started");
        Ok(Response::new(RunContainerReply { pid }))
    }

    async fn list_containers(
        &self,
        _req: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersReply>, Status> {
        let list = self.rt.list().await.map_err(rt_err(Step::Validate))?;
        Ok(Response::new(ListContainersReply {
            containers: list
                .into_iter()
                .map(|c| ContainerInfo {
                    id: c.id,
                    image: c.image,
                    status: c.state.map(|s| s.as_str()).unwrap_or("no task").to_string(),
                    pid: c.pid,
                })
                .collect(),
        }))
    }

    async fn remove_container(
        &self,
        req: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerReply>, Status> {
        let id = req.into_inner().id;
        let rec = self
            .rt
            .container(&id)
            .await
            .map_err(rt_err(Step::Validate))?;
        if let (Some(mob), Ok(Some(crate::netctl::Attachment::Routed { home, .. }))) =
            (&self.cfg.mobility, crate::netctl::from_labels(&rec.labels))
        {
            mob.retire(home).await;
        }
        self.rt
            .remove(&id)
            .await
            .map_err(rt_err(Step::CleanupSource))?;
        crate::volumes::remove_anonymous(&self.cfg.work_dir, &id);
        let _ = std::fs::remove_file(lazy_conf_path(&self.cfg.work_dir, &id));
        if let Some(cn) = &self.cfg.container_net {
            cn.detach(&id).await.map_err(|e| e.to_status())?;
        }
        Ok(Response::new(RemoveContainerReply {}))
    }

    type MigrateStream = EventStream;

    async fn migrate(
        &self,
        req: Request<MigrateRequest>,
    ) -> Result<Response<Self::MigrateStream>, Status> {
        let r = req.into_inner();
        xfer_proto::check_version(r.version).map_err(|e| AgentError::Decode(e).to_status())?;
        let mode =
            xfer_proto::require_mode(r.mode).map_err(|e| AgentError::Decode(e).to_status())?;
        let _ = mode;
        let (tx, rx) = tokio::sync::mpsc::channel(32);
        let node = self.clone();
        let mid = uuid::Uuid::new_v4().to_string();
        let span =
            info_span!("migration", id = %mid, container = %r.container_id, to = %r.destination);
        tokio::spawn(
            async move {
                let res = crate::migrate::run(&node, &mid, &r, tx.clone()).await;
                match res {
                    Ok(report) => {
                        let _ = tx
                            .send(Ok(MigrateEvent {
                                event: Some(migrate_event::Event::Report(report)),
                            }))
                            .await;
                    }
                    Err(e) => {
                        warn!(error = %e, "migration failed");
                        let _ = tx.send(Err(e.to_status())).await;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareReply>, Status> {
        let r = req.into_inner();
        xfer_proto::check_version(r.version).map_err(|e| AgentError::Decode(e).to_status())?;
        xfer_proto::require_mode(r.mode).map_err(|e| AgentError::Decode(e).to_status())?;
        xfer_runtime::containerd::validate_id(&r.container_id).map_err(dst_err)?;
        if !self.criu.usable() {
            return Err(refuse(format!(
                "node {} cannot restore: criu {} (need >= 4.2 and a passing `criu check`); run `cargo xtask setup` there",
                self.cfg.name, self.criu.version
            )));
        }
        if self.rt.container(&r.container_id).await.is_ok() {
            return Err(refuse(format!(
                "node {} already has a container {:?}; remove it or pick another destination",
                self.cfg.name, r.container_id
            )));
        }
        if r.inject_failure == "prepare" {
            return Err(refuse("injected failure at the prepare step (test hook)"));
        }
        let mut digests = Vec::new();
        if let Some(m) = &r.manifest {
            digests.push(m.digest.clone());
        }
        digests.extend(r.blobs.iter().map(|b| b.digest.clone()));
        let have = images::has_blobs(&self.rt, &digests)
            .await
            .map_err(dst_err)?;
        let missing: Vec<String> = digests
            .into_iter()
            .zip(have)
            .filter(|(_, h)| !h)
            .map(|(d, _)| d)
            .collect();
        let dir = self.cfg.work_dir.join("in").join(&r.migration_id);
        std::fs::create_dir_all(&dir).map_err(|source| {
            AgentError::WriteFile {
                path: dir.clone(),
                source,
            }
            .to_status()
        })?;
        let lease = images::lease(&self.rt).await.map_err(dst_err)?;
        self.inbound.lock().await.insert(
            r.migration_id.clone(),
            Inbound {
                container_id: r.container_id.clone(),
                dir,
                image_name: r.image_name,
                manifest: r.manifest,
                blobs: r.blobs,
                files: Vec::new(),
                inject_failure: r.inject_failure,
                lease: Some(lease),
                chain_id: None,
                fetcher: None,
                touched: Instant::now(),
                rebuilt: Arc::default(),
                pending: None,
                stages: Arc::default(),
                present_volumes: Default::default(),
            },
        );
        if missing.is_empty() {
            // Every blob is here already: unpack now, while the source still runs.
            self.unpack_inbound(&r.migration_id).await?;
        }
        info!(migration = %r.migration_id, container = %r.container_id, missing = missing.len(), "prepared");
        Ok(Response::new(PrepareReply { missing }))
    }

    async fn put_files(
        &self,
        req: Request<Streaming<FileChunk>>,
    ) -> Result<Response<PutFilesReply>, Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.next().await else {
            return Err(refuse("empty file stream"));
        };
        let first = first?;
        let mid = first.migration_id.clone();
        let (dir, inject) = {
            let map = self.inbound.lock().await;
            let inb = map
                .get(&mid)
                .ok_or_else(|| refuse(format!("no migration {mid} prepared here")))?;
            (inb.dir.clone(), inb.inject_failure.clone())
        };
        let mut rx = Receiver::new(dir);
        rx.accept(first).map_err(|e| e.to_status())?;
        while let Some(c) = stream.next().await {
            let c = c?;
            if c.migration_id != mid {
                return Err(
                    AgentError::BadChunk("chunks of two migrations in one stream".into())
                        .to_status(),
                );
            }
            rx.accept(c).map_err(|e| e.to_status())?;
        }
        let wire = rx.wire_bytes;
        let files = rx.finish().map_err(|e| e.to_status())?;
        if inject == "transfer" {
            return Err(refuse("injected failure at the transfer step (test hook)"));
        }
        let n = files.len() as u64;
        // Image blobs go into the content store now, so Restore only unpacks.
        self.accept_blobs(&mid, files).await?;
        Ok(Response::new(PutFilesReply {
            files: n,
            bytes: wire,
        }))
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        let r = req.into_inner();
        let mid = r.migration_id.clone();
        let span =
            info_span!("sync", migration = %r.migration_id, round = r.round, last = r.r#final);
        let reply = self
            .sync_inner(r)
            .instrument(span)
            .await
            .map_err(|e| e.to_status())?;
        let (reply, blobs) = reply;
        if !blobs.is_empty() {
            self.accept_blobs(&mid, blobs).await?;
        }
        info!(
            chunks = reply.chunks,
            wire = reply.wire_bytes,
            fetch_ms = reply.fetch_micros as f64 / 1000.0,
            rebuild_ms = reply.rebuild_micros as f64 / 1000.0,
            "round synced"
        );
        Ok(Response::new(reply))
    }

    async fn restore(
        &self,
        req: Request<RestoreRequest>,
    ) -> Result<Response<RestoreReply>, Status> {
        let r = req.into_inner();
        let span = info_span!("restore", migration = %r.migration_id, container = %r.container_id);
        let mut phases = Vec::new();
        let res = self.restore_inner(&r, &mut phases).instrument(span).await;
        match res {
            Ok(pid) => {
                // The migration's files go after the reply: the source is waiting for
                // it to let go of its copy (the entry leaves the map now, so nothing
                // else uses them).
                let inb = self.inbound.lock().await.remove(&r.migration_id);
                if let Some(inb) = inb {
                    let (node, mid) = (self.clone(), r.migration_id.clone());
                    tokio::spawn(async move {
                        let t = Instant::now();
                        node.drop_inbound(&mid, inb).await;
                        debug!(migration = %mid, ms = t.elapsed().as_secs_f64() * 1000.0, "inbound files removed");
                    });
                }
                info!(container = %r.container_id, pid, "restored");
                Ok(Response::new(RestoreReply { pid, phases }))
            }
            Err(s) => {
                self.cleanup_inbound(&r.migration_id).await;
                Err(s)
            }
        }
    }

    type WatchBindingsStream = Pin<Box<dyn Stream<Item = Result<BindingEvent, Status>> + Send>>;

    async fn watch_bindings(
        &self,
        req: Request<WatchBindingsRequest>,
    ) -> Result<Response<Self::WatchBindingsStream>, Status> {
        xfer_proto::check_version(req.get_ref().version)
            .map_err(|e| AgentError::Decode(e).to_status())?;
        let mob = self.cfg.mobility.clone().ok_or_else(|| {
            refuse(format!(
                "node {} runs no handover (xferd --mobility-address, --cluster-key)",
                self.cfg.name
            ))
        })?;
        let (current, mut rx) = mob.subscribe().await;
        let (tx, out) = tokio::sync::mpsc::channel(64);
        let kind = mob.tunnel_kind().to_string();
        let ha = mob.address().to_string();
        let event = move |n: &crate::handover::Notice| crate::rebind::to_event(n, &kind, &ha);
        tokio::spawn(async move {
            for n in &current {
                if tx.send(Ok(event(n))).await.is_err() {
                    return;
                }
            }
            let synced = BindingEvent {
                kind: BindingEventKind::Synced as i32,
                ..Default::default()
            };
            if tx.send(Ok(synced)).await.is_err() {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(n) => {
                        if tx.send(Ok(event(&n))).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "the watcher fell {k} binding events behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn abort(&self, req: Request<AbortRequest>) -> Result<Response<AbortReply>, Status> {
        let r = req.into_inner();
        let step =
            xfer_proto::require_step(r.step).map_err(|e| AgentError::Decode(e).to_status())?;
        warn!(migration = %r.migration_id, ?step, reason = %r.reason, "migration aborted by the source");
        let container = self
            .inbound
            .lock()
            .await
            .get(&r.migration_id)
            .map(|i| i.container_id.clone());
        if let Some(id) = container {
            // Remove only what this migration made: a container of that id with a
            // restored task is removed too, since the source keeps running.
            if self.rt.container(&id).await.is_ok() {
                self.discard(&id).await;
            } else if let Some(cn) = &self.cfg.container_net {
                let _ = cn.detach(&id).await;
            }
        }
        self.cleanup_inbound(&r.migration_id).await;
        Ok(Response::new(AbortReply {}))
    }
}
