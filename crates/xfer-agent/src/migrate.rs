//! The source side of a cold migration.
//!
//! ```text
//! validate -> prepare -> image blobs -> FREEZE -> checkpoint -> rootfs diff
//!          -> transfer -> restore (destination) -> remove source copy
//! ```
//! The source task is frozen (cgroup freezer) from the freeze until the destination
//! reports the restored task running; CRIU dumps it leaving it in place. If any step
//! after the freeze fails, the source task is thawed and the destination told to
//! abort, so the container keeps running where it was.

use std::path::PathBuf;
use std::time::Instant;

use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Status;
use tracing::{info, warn};
use xfer_proto::v1::agent_client::AgentClient;
use xfer_proto::v1::*;
use xfer_runtime::containerd::{LazyTransfer, Runtime, TaskState};

use crate::error::AgentError;
use crate::images;
use crate::node::{phase, Node};
use crate::tls::TlsFiles;
use crate::transfer::{produce, OutFile, Sent};

type Events = mpsc::Sender<Result<MigrateEvent, Status>>;

async fn emit(tx: &Events, p: &PhaseTiming, phases: &mut Vec<PhaseTiming>) {
    info!(phase = %p.name, ms = p.micros as f64 / 1000.0, bytes = p.bytes, "phase done");
    phases.push(p.clone());
    let _ = tx
        .send(Ok(MigrateEvent {
            event: Some(migrate_event::Event::Phase(p.clone())),
        }))
        .await;
}

/// A channel to another agent: mutual TLS when `tls` is given (an `https` endpoint
/// without it is refused), and HTTP/2 keep-alive so that a cut link or a dead peer
/// fails a call within seconds instead of hanging it.
pub async fn open_channel(endpoint: &str, tls: Option<&TlsFiles>) -> Result<Channel, AgentError> {
    agent_endpoint(endpoint, tls)?
        .connect()
        .await
        .map_err(|source| AgentError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// How agents reach each other: keep-alive, connect timeout, mutual TLS when given
/// (an https endpoint without TLS files is refused).
pub fn agent_endpoint(
    endpoint: &str,
    tls: Option<&TlsFiles>,
) -> Result<tonic::transport::Endpoint, AgentError> {
    let conn_err = |source| AgentError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(conn_err)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(crate::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(crate::KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    match tls {
        Some(t) => ep.tls_config(t.client_config()?).map_err(conn_err),
        None if endpoint.starts_with("https") => Err(AgentError::Refused(format!(
            "{endpoint} needs TLS: give the cluster CA and a certificate (--tls-dir)"
        ))),
        None => Ok(ep),
    }
}

/// Opens a channel to a peer agent (with mutual TLS when `tls` is given) and checks
/// its protocol version.
pub async fn connect_peer(
    endpoint: &str,
    tls: Option<&TlsFiles>,
) -> Result<(AgentClient<Channel>, HelloReply), AgentError> {
    let ch = open_channel(endpoint, tls).await?;
    let mut c = AgentClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let hello = c
        .hello(HelloRequest {
            version: xfer_proto::PROTOCOL_VERSION as i32,
            node: String::new(),
        })
        .await
        .map_err(|status| AgentError::Peer {
            step: Step::Validate,
            status,
        })?
        .into_inner();
    xfer_proto::check_version(hello.version).map_err(AgentError::Decode)?;
    Ok((c, hello))
}

/// Streams whole files to the destination (PutFiles): a lazy cut-over's few small
/// CRIU images.
async fn send_files(
    peer: &mut AgentClient<Channel>,
    mid: &str,
    files: Vec<OutFile>,
) -> Result<Sent, AgentError> {
    let (tx, rx) = mpsc::channel(8);
    let mid_owned = mid.to_string();
    let producer = tokio::task::spawn_blocking(move || produce(mid_owned, files, tx));
    let call = peer.put_files(tokio_stream::wrappers::ReceiverStream::new(rx));
    let res = call.await;
    let sent = producer
        .await
        .map_err(|e| AgentError::Refused(format!("file producer panicked: {e}")))?;
    res.map_err(|status| AgentError::Peer {
        step: Step::Transfer,
        status,
    })?;
    sent
}

/// Runs one migration; on failure after the freeze, the source resumes.
pub async fn run(
    node: &Node,
    mid: &str,
    req: &MigrateRequest,
    tx: Events,
) -> Result<MigrationReport, AgentError> {
    let start = Instant::now();
    let mut phases = Vec::new();
    let id = req.container_id.as_str();
    let mode = xfer_proto::require_mode(req.mode).map_err(AgentError::Decode)?;
    let policy = RoundPolicy::from_request(mode, req);
    let rt = &node.rt;
    let rt_err = |step: Step| move |source| AgentError::Runtime { step, source };
    // No snapshot dump of the container while it moves (crate::snapshots).
    let _quiet = node.quiet_snapshots(id).await;

    // Validate: refuse bad input before anything is frozen.
    let t = Instant::now();
    let record = rt.container(id).await.map_err(rt_err(Step::Validate))?;
    let (state, task_pid) = rt.task_state(id).await.map_err(rt_err(Step::Validate))?;
    if state != TaskState::Running {
        return Err(AgentError::Refused(format!(
            "container {id} is {}, not running: only a running task can be migrated",
            state.as_str()
        )));
    }
    // State CRIU cannot move is refused here, before anything is frozen.
    let external = tokio::task::spawn_blocking(move || {
        xfer_runtime::unixsock::external_unix_sockets(task_pid)
    })
    .await
    .map_err(|e| AgentError::Refused(format!("inspect unix sockets: {e}")))?
    .map_err(rt_err(Step::Validate))?;
    if !external.is_empty() {
        let list: Vec<String> = external.iter().map(|e| e.to_string()).collect();
        return Err(AgentError::Refused(format!(
            "container {id} holds unix sockets connected to processes outside it, which CRIU cannot checkpoint: {}; close those connections (or run the peer inside the container) and try again",
            list.join("; ")
        )));
    }
    if !node.criu.usable() {
        return Err(AgentError::Refused(format!(
            "this node's criu {} cannot checkpoint (need >= 4.2 and a passing `criu check`)",
            node.criu.version
        )));
    }
    let (mut peer, hello) = connect_peer(&req.destination, node.cfg.tls.as_ref()).await?;
    if hello.node == node.cfg.name {
        return Err(AgentError::Refused(format!(
            "the destination {} is this node; pick another host",
            req.destination
        )));
    }
    if !hello.criu_ok {
        return Err(AgentError::Refused(format!(
            "destination {} has criu {}, which cannot restore here (need >= 4.2 and a passing `criu check`)",
            hello.node, hello.criu_version
        )));
    }
    if matches!(mode, MigrationMode::Postcopy | MigrationMode::Hybrid) && !hello.lazy_pages {
        return Err(AgentError::Refused(format!(
            "destination {} cannot restore lazily (its CRIU lacks userfaultfd: `criu check --feature uffd-noncoop` fails there); use --mode precopy",
            hello.node
        )));
    }
    let attachment = crate::netctl::from_labels(&record.labels)?;
    let volumes = crate::volumes::from_labels(&record.labels)?;
    for (i, v) in volumes.iter().enumerate() {
        let p = v.host_path(&node.cfg.work_dir, id, i);
        if !p.is_dir() {
            return Err(AgentError::Refused(format!(
                "volume {} of {id}: its directory {} is missing here",
                v.destination,
                p.display()
            )));
        }
    }
    if matches!(attachment, Some(crate::netctl::Attachment::Routed { .. })) && !hello.handover {
        return Err(AgentError::Refused(format!(
            "container {id} has a routed home address, but destination {} runs no handover (xferd --mobility-address, --cluster-key)",
            hello.node
        )));
    }
    let image = images::info(rt, &record.image)
        .await
        .map_err(rt_err(Step::Validate))?
        .ok_or_else(|| {
            AgentError::Refused(format!(
                "image {} of {id} is not in this node's content store",
                record.image
            ))
        })?;
    emit(&tx, &phase("validate", t, 0), &mut phases).await;

    // Prepare: the destination says which image blobs it lacks.
    let t = Instant::now();
    let plan = PrepareRequest {
        version: xfer_proto::PROTOCOL_VERSION as i32,
        migration_id: mid.to_string(),
        container_id: id.to_string(),
        mode: mode as i32,
        image_name: record.image.clone(),
        manifest: Some(image.manifest.clone()),
        blobs: image.blobs.clone(),
        inject_failure: req.inject_failure.clone(),
    };
    let missing = peer
        .prepare(plan)
        .await
        .map_err(|status| AgentError::Peer {
            step: Step::Prepare,
            status,
        })?
        .into_inner()
        .missing;
    emit(&tx, &phase("prepare", t, 0), &mut phases).await;

    let out_dir = node.cfg.work_dir.join("out").join(mid);
    let mut rounds = Vec::new();
    let mut image_sources = Vec::new();
    let result = run_after_prepare(
        node,
        mid,
        &record,
        &missing,
        &policy,
        Strategy::new(mode, hello.lazy_pages),
        &mut peer,
        &tx,
        &mut phases,
        &mut rounds,
        &out_dir,
        &mut image_sources,
    )
    .await;
    let _ = std::fs::remove_dir_all(&out_dir);
    let _ = node.store.release(mid);
    let outcome = match result {
        Ok(v) => {
            // The source copy is gone; so go its own network namespace and its
            // anonymous volumes (named volumes stay, as volumes do).
            node.net_departed(&record.labels).await;
            crate::volumes::remove_anonymous(&node.cfg.work_dir, id);
            let _ = std::fs::remove_file(crate::node::lazy_conf_path(&node.cfg.work_dir, id));
            if let Some(cn) = &node.cfg.container_net {
                if let Err(e) = cn.detach(id).await {
                    warn!(error = %e, "could not remove the source container's namespace");
                }
            }
            v
        }
        Err((step, e)) => {
            warn!(?step, error = %e, "aborting migration");
            // A routed container stays here: make sure its home agent forwards here
            // (the destination may have registered before the failure).
            if let (
                Some(mob),
                Some(crate::netctl::Attachment::Routed {
                    home,
                    home_agent,
                    reverse_tunnel,
                }),
            ) = (&node.cfg.mobility, attachment)
            {
                if let Err(e) = mob
                    .arrived(
                        home,
                        home_agent,
                        reverse_tunnel,
                        &crate::netctl::host_if(id),
                    )
                    .await
                {
                    warn!(error = %e, "re-registering the resumed container's binding failed");
                }
            }
            // Tell the destination to drop what it made; retried with backoff in the
            // background, since the failure may be the link itself.
            let mut abort_peer = peer.clone();
            let req = AbortRequest {
                migration_id: mid.to_string(),
                step: step as i32,
                reason: e.to_string(),
            };
            let first = abort_peer.abort(req.clone()).await;
            if first.is_err() {
                tokio::spawn(async move {
                    let mut wait = std::time::Duration::from_millis(500);
                    for _ in 0..8 {
                        tokio::time::sleep(wait).await;
                        if abort_peer.abort(req.clone()).await.is_ok() {
                            return;
                        }
                        wait = (wait * 2).min(std::time::Duration::from_secs(4));
                    }
                    warn!("the destination never acknowledged the abort; it expires the migration itself");
                });
            }
            return Err(e);
        }
    };
    let total = all_blobs(&image);
    Ok(MigrationReport {
        migration_id: mid.to_string(),
        container_id: id.to_string(),
        source: node.cfg.name.clone(),
        destination: hello.node,
        phases,
        total_micros: start.elapsed().as_micros() as u64,
        downtime_micros: outcome.downtime_us,
        bytes_sent: outcome.bytes_sent,
        postcopy_bytes: outcome.postcopy_bytes,
        postcopy_micros: outcome.postcopy_micros,
        decision: outcome.decision,
        restored_pid: outcome.pid,
        image_blobs_sent: missing.len() as u32,
        image_blobs_skipped: (total - missing.len()) as u32,
        rounds,
        mode: format!("{mode:?}").to_lowercase(),
        image_sources,
    })
}

/// When pre-copy stops and the cut-over starts.
///
/// Each round dumps the running task (CRIU, leave running), chunks the images and lets
/// the destination fetch what it lacks. After a round the policy stops when:
/// 1. the round's delta would be fetched within the downtime budget at the rate the
///    round achieved (the final delta is expected to be no larger), or
/// 2. the delta stopped shrinking (at least 90% of the previous one: the task
///    dirties memory as fast as the link carries it), or
/// 3. the round limit is reached.
///
/// Cold mode runs no rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundPolicy {
    pub max_rounds: u32,
    pub budget: std::time::Duration,
    /// Auto mode: stop as soon as a full cut-over cannot fit the budget whatever the
    /// delta (the dump alone, written then read back, takes longer): the cut-over
    /// goes lazy, and more memory rounds would only stall the task again.
    pub lazy_fallback: bool,
}

impl RoundPolicy {
    /// Default round limit.
    pub const MAX_ROUNDS: u32 = 4;
    /// Default downtime budget for the final delta's transfer.
    pub const BUDGET_MS: u32 = 100;

    /// The policy a request asks for.
    pub fn from_request(mode: MigrationMode, req: &MigrateRequest) -> Self {
        let max_rounds = match mode {
            MigrationMode::Cold | MigrationMode::Postcopy => 0,
            _ if req.max_rounds > 0 => req.max_rounds,
            _ => Self::MAX_ROUNDS,
        };
        let ms = if req.downtime_budget_ms > 0 {
            req.downtime_budget_ms
        } else {
            Self::BUDGET_MS
        };
        RoundPolicy {
            max_rounds,
            budget: std::time::Duration::from_millis(u64::from(ms)),
            lazy_fallback: false,
        }
    }

    /// Whether a round whose dump took `dump` shows that no full cut-over can fit the
    /// budget (see [`RoundPolicy::lazy_fallback`]).
    pub fn full_cutover_hopeless(&self, dump: std::time::Duration) -> bool {
        self.lazy_fallback && 2 * dump > self.budget
    }

    /// Whether to stop after a round whose delta was `delta` bytes fetched at
    /// `rate` bytes/s, the previous round's delta being `prev` (None for round 1).
    pub fn stop_after(
        &self,
        round: u32,
        delta: u64,
        rate: f64,
        prev: Option<u64>,
    ) -> Option<&'static str> {
        if round >= self.max_rounds {
            return Some("round limit");
        }
        if rate > 0.0 && (delta as f64 / rate) <= self.budget.as_secs_f64() {
            return Some("delta fits the downtime budget");
        }
        if let Some(p) = prev {
            if delta as f64 >= 0.9 * p as f64 {
                return Some("delta stopped shrinking");
            }
        }
        None
    }

    /// Whether a cut-over right now fits the budget, though the last round's delta did
    /// not: what the next delta can hold at most (`bound` bytes: the whole memory dump
    /// and the volume files changed since the round's scan) at the rate the source
    /// alone delivered (`source_rate`, bytes/s: new bytes only it holds). Spares a
    /// round that would only re-send what the cut-over sends anyway (a first round
    /// that was large because it carried a volume, not because the task is busy).
    pub fn next_fits(&self, bound: u64, source_rate: f64) -> bool {
        source_rate > 0.0 && (bound as f64 / source_rate) <= self.budget.as_secs_f64()
    }
}

/// How a mode moves memory: in pre-copy rounds, lazily after the restore, or decided
/// from the measured rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strategy {
    /// Pre-copy rounds dump memory (hybrid's rounds carry only volumes: without
    /// kernel dirty-page tracking a lazy restore cannot reuse pre-copied memory).
    pub memory_rounds: bool,
    pub cutover: Cutover,
}

/// The cut-over's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutover {
    /// Dump everything, move it, restore (the source can resume until the end).
    Full,
    /// Dump all but the private memory, restore, then let the destination take the
    /// memory from the source's page server (post-copy).
    Lazy,
    /// Full if its estimated downtime fits the budget, else lazy ([`auto_cutover`]).
    Auto,
}

impl Strategy {
    /// The strategy of `mode`, given whether the destination restores lazily.
    pub fn new(mode: MigrationMode, lazy_ok: bool) -> Self {
        let (memory_rounds, cutover) = match mode {
            MigrationMode::Postcopy => (false, Cutover::Lazy),
            MigrationMode::Hybrid => (false, Cutover::Lazy),
            MigrationMode::Auto if lazy_ok => (true, Cutover::Auto),
            _ => (true, Cutover::Full),
        };
        Strategy {
            memory_rounds,
            cutover,
        }
    }
}

/// Auto mode's choice after the pre-copy rounds: a full cut-over when its estimated
/// downtime fits `budget` (the source can then be resumed until the very end), a lazy
/// one otherwise. The estimate comes from the last round: its dump time (the final
/// dump writes as much), its delta at the rate the link gave it, and a restore taken
/// as long as the dump (CRIU reads back what it wrote). The reason names the measured
/// dirty rate and link rate. Returns (lazy, reason).
pub fn auto_cutover(rounds: &[RoundReport], budget: std::time::Duration) -> (bool, String) {
    let Some(last) = rounds.last() else {
        return (true, "no pre-copy round to measure: lazy cut-over".into());
    };
    let secs = |us: u64| us as f64 / 1e6;
    let link = if last.sync_micros > 0 {
        last.delta_wire_bytes as f64 / secs(last.sync_micros)
    } else {
        f64::INFINITY
    };
    // Memory dirtied between the last two dumps.
    let dirty = match rounds.len() {
        n if n >= 2 => {
            let prev = &rounds[n - 2];
            let between = secs(prev.dump_micros + prev.chunk_micros + prev.sync_micros);
            if between > 0.0 {
                last.delta_raw_bytes as f64 / between
            } else {
                0.0
            }
        }
        _ => 0.0,
    };
    let transfer = if link.is_finite() && link > 0.0 {
        last.delta_wire_bytes as f64 / link
    } else {
        0.0
    };
    let est = 2.0 * secs(last.dump_micros) + transfer;
    let mb = |b: f64| b / 1e6;
    let dirty_txt = if rounds.len() >= 2 {
        format!("dirty rate {:.1} MB/s", mb(dirty))
    } else {
        "dirty rate not measured (one round)".to_string()
    };
    let facts = format!(
        "{dirty_txt}, link {:.1} MB/s, estimated full cut-over {:.0} ms, budget {} ms",
        if link.is_finite() { mb(link) } else { 0.0 },
        est * 1000.0,
        budget.as_millis()
    );
    if est <= budget.as_secs_f64() {
        (false, format!("auto: full cut-over ({facts})"))
    } else if link.is_finite() && dirty >= 0.9 * link {
        (
            true,
            format!("auto: lazy cut-over, pre-copy cannot converge ({facts})"),
        )
    } else {
        (true, format!("auto: lazy cut-over ({facts})"))
    }
}

/// The page server address a lazy dump listens on: this node's advertised address and
/// a port free right now.
fn page_server_address(advertise: &str) -> Result<std::net::SocketAddr, AgentError> {
    let host = advertise
        .split("://")
        .nth(1)
        .unwrap_or(advertise)
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(advertise)
        .trim_matches(['[', ']']);
    let ip: std::net::IpAddr = host.parse().map_err(|_| {
        AgentError::Refused(format!(
            "post-copy needs this node's IP address for CRIU's page server; the advertised endpoint {advertise} has none"
        ))
    })?;
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| {
        AgentError::Refused(format!("no free port on {ip} for CRIU's page server: {e}"))
    })?;
    let addr = l
        .local_addr()
        .map_err(|e| AgentError::Refused(format!("page server address on {ip}: {e}")))?;
    Ok(addr)
}

/// What a migration's rounds and cut-over came to.
#[derive(Debug, Default)]
struct Outcome {
    downtime_us: u64,
    bytes_sent: u64,
    pid: u32,
    postcopy_bytes: u64,
    postcopy_micros: u64,
    decision: String,
}

fn all_blobs(image: &images::ImageBlobs) -> usize {
    image.blobs.len() + 1
}

/// What the source needs from a destination during the cut-over. The gRPC client is the
/// real one; tests use a fake that fails at a chosen step.
#[allow(async_fn_in_trait)]
pub trait Destination {
    /// Announces a round's manifests; the destination fetches the chunks it lacks.
    async fn sync(&mut self, req: SyncRequest) -> Result<SyncReply, AgentError>;
    /// Asks the destination to restore; returns its reply (pid, phases).
    async fn restore(&mut self, req: RestoreRequest) -> Result<RestoreReply, AgentError>;
    /// Streams whole files (no chunking): for a lazy cut-over's few small images.
    async fn put_files(&mut self, mid: &str, files: Vec<OutFile>) -> Result<Sent, AgentError>;
}

impl Destination for AgentClient<Channel> {
    async fn sync(&mut self, req: SyncRequest) -> Result<SyncReply, AgentError> {
        AgentClient::sync(self, req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| AgentError::Peer {
                step: Step::Transfer,
                status,
            })
    }

    async fn put_files(&mut self, mid: &str, files: Vec<OutFile>) -> Result<Sent, AgentError> {
        send_files(self, mid, files).await
    }

    async fn restore(&mut self, req: RestoreRequest) -> Result<RestoreReply, AgentError> {
        AgentClient::restore(self, req)
            .await
            .map(|r| r.into_inner())
            .map_err(|status| AgentError::Peer {
                step: Step::Restore,
                status,
            })
    }
}

/// Where a round's chunks come from and go: this node's store and the endpoint the
/// destination fetches them from.
pub struct ChunkSide<'a> {
    pub store: &'a std::sync::Arc<xfer_store::Store>,
    pub endpoint: &'a str,
    /// The container's volumes (their tars ride along with every round).
    pub volumes: &'a tokio::sync::Mutex<crate::volumes::Moves>,
    /// The container's own network, cut before the source copy is killed: a killed
    /// task's kernel sockets would otherwise send FIN/RST for connections that now
    /// live at the destination, and the clients would take them.
    pub source_net: Option<&'a crate::netctl::ContainerNet>,
    /// The knowledge base, told of every round's chunks (the source holds them now).
    pub kb: Option<&'a crate::kb::Kb>,
}

impl std::fmt::Debug for ChunkSide<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkSide")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// A round's volumes being published (their tars chunked on a blocking thread): the
/// cut-over starts this at the freeze, beside the dump (a frozen task's volumes do not
/// change), instead of after it.
struct VolumesAhead(
    tokio::task::JoinHandle<
        Result<(Vec<xfer_proto::v1::ObjectManifest>, crate::sync::Published), AgentError>,
    >,
);

impl VolumesAhead {
    async fn start(chunks: &ChunkSide<'_>, mid: &str) -> VolumesAhead {
        let files = chunks.volumes.lock().await.round_files();
        let (store, lease) = (chunks.store.clone(), mid.to_string());
        VolumesAhead(tokio::task::spawn_blocking(move || {
            if files.is_empty() {
                return Ok((Vec::new(), crate::sync::Published::default()));
            }
            crate::sync::publish(&store, &lease, &files)
        }))
    }

    async fn finish(
        self,
    ) -> Result<(Vec<xfer_proto::v1::ObjectManifest>, crate::sync::Published), AgentError> {
        self.0
            .await
            .map_err(|e| AgentError::Refused(format!("volume chunking task: {e}")))?
    }
}

/// Chunks `files` and the volumes (`volumes`, if already started; else now) into the
/// store (on blocking threads) and has the destination fetch what it lacks; a
/// pre-copy round may be answered once what is left would take at most `overlap`
/// (see `SyncRequest.overlap_micros`). Returns (publish time, the destination's
/// reply).
#[allow(clippy::too_many_arguments)]
async fn publish_and_sync<D: Destination>(
    chunks: &ChunkSide<'_>,
    dst: &mut D,
    mid: &str,
    round: u32,
    last: bool,
    files: Vec<OutFile>,
    volumes: Option<VolumesAhead>,
    overlap: std::time::Duration,
) -> Result<(std::time::Duration, crate::sync::Published, SyncReply), AgentError> {
    let t = Instant::now();
    let volumes = match volumes {
        Some(v) => v,
        None => VolumesAhead::start(chunks, mid).await,
    };
    let store = chunks.store.clone();
    let lease = mid.to_string();
    let mut vols = chunks.volumes.lock().await;
    let (mut manifests, mut published) =
        tokio::task::spawn_blocking(move || crate::sync::publish(&store, &lease, &files))
            .await
            .map_err(|e| AgentError::Refused(format!("chunking task: {e}")))??;
    let (vol_manifests, vol_published) = volumes.finish().await?;
    manifests.extend(vol_manifests);
    published.raw_bytes += vol_published.raw_bytes;
    published.new_chunks += vol_published.new_chunks;
    published.new_frame_bytes += vol_published.new_frame_bytes;
    if let Some(kb) = chunks.kb {
        if let Ok(objs) = crate::sync::decode_objects(&manifests) {
            kb.inventory().added(&crate::sync::chunk_ids(&objs));
        }
    }
    let earlier = vols.published(&manifests);
    if last {
        manifests.extend(earlier);
    }
    drop(vols);
    let chunk_time = t.elapsed();
    // The lease file is written while the destination fetches (the lease already
    // protects the chunks in memory).
    let persist = crate::sync::write_lease(chunks.store, mid);
    let reply = dst
        .sync(SyncRequest {
            migration_id: mid.to_string(),
            round,
            r#final: last,
            objects: manifests,
            chunk_endpoint: chunks.endpoint.to_string(),
            overlap_micros: if last { 0 } else { overlap.as_micros() as u64 },
        })
        .await;
    persist.done().await?;
    Ok((chunk_time, published, reply?))
}

#[allow(clippy::too_many_arguments)]
async fn run_after_prepare(
    node: &Node,
    mid: &str,
    record: &xfer_runtime::containerd::ContainerRecord,
    missing: &[String],
    policy: &RoundPolicy,
    strategy: Strategy,
    peer: &mut AgentClient<Channel>,
    tx: &Events,
    phases: &mut Vec<PhaseTiming>,
    rounds: &mut Vec<RoundReport>,
    out_dir: &std::path::Path,
    image_sources: &mut Vec<xfer_proto::v1::SourceBytes>,
) -> Result<Outcome, (Step, AgentError)> {
    let rt = &node.rt;
    let mut bytes_sent = 0u64;

    // Image blobs the destination lacks, while the container still runs and beside
    // the pre-copy rounds: as chunks (crate::layers), from neighbours that hold them
    // where the knowledge base says so; installed before the cut-over.
    let image = crate::layers::start(node, peer, mid, missing);

    let vols = crate::volumes::from_labels(&record.labels).map_err(|e| (Step::Validate, e))?;
    let moves = tokio::sync::Mutex::new(crate::volumes::Moves::new(
        &vols,
        &node.cfg.work_dir,
        &record.id,
    ));
    let chunks = ChunkSide {
        store: &node.store,
        endpoint: &node.cfg.advertise,
        kb: node.kb().map(|k| k.as_ref()),
        volumes: &moves,
        source_net: node.cfg.container_net.as_ref(),
    };
    let mut round_policy = *policy;
    round_policy.lazy_fallback = strategy.cutover == Cutover::Auto;
    if !strategy.memory_rounds && moves.lock().await.is_empty() {
        // Nothing to pre-copy but memory, which goes lazily.
        round_policy.max_rounds = 0;
    }
    let stop = precopy(
        rt,
        peer,
        &chunks,
        mid,
        record,
        &round_policy,
        strategy.memory_rounds,
        out_dir,
        tx,
        phases,
        rounds,
    )
    .await?;
    bytes_sent += stop.wire;
    let since = image.started();
    let image = image.finish().await.map_err(|e| (Step::Image, e))?;
    bytes_sent += image.wire_bytes;
    image_sources.extend(image.sources);
    emit(tx, &phase("image", since, image.wire_bytes), phases).await;
    let (lazy, mut decision) = match strategy.cutover {
        Cutover::Full => (false, String::new()),
        Cutover::Lazy => (true, String::new()),
        Cutover::Auto => auto_cutover(rounds, policy.budget),
    };
    if let Some(why) = stop.why {
        decision = if decision.is_empty() {
            format!("pre-copy stopped: {why}")
        } else {
            format!("pre-copy stopped: {why}; {decision}")
        };
    }
    if !decision.is_empty() {
        info!(%decision, "cut-over");
    }
    let lazy_at = if lazy {
        Some(page_server_address(&node.cfg.advertise).map_err(|e| (Step::Checkpoint, e))?)
    } else {
        None
    };
    let cut = cutover(
        rt, peer, &chunks, mid, record, lazy_at, out_dir, tx, phases, rounds,
    )
    .await?;
    Ok(Outcome {
        downtime_us: cut.downtime_us,
        // Lazy memory crosses the link too (raw, from the page server).
        bytes_sent: bytes_sent + cut.wire + cut.postcopy_bytes,
        pid: cut.pid,
        postcopy_bytes: cut.postcopy_bytes,
        postcopy_micros: cut.postcopy_micros,
        decision,
    })
}

/// Where pre-copy ended.
#[derive(Debug, Default)]
pub struct PrecopyEnd {
    /// Bytes the destination fetched during the rounds.
    pub wire: u64,
    /// Why the rounds stopped (None: no rounds).
    pub why: Option<&'static str>,
}

/// Pre-copy rounds while the task runs; returns the bytes the destination fetched.
#[allow(clippy::too_many_arguments)]
pub async fn precopy<R: Runtime, D: Destination>(
    rt: &R,
    dst: &mut D,
    chunks: &ChunkSide<'_>,
    mid: &str,
    record: &xfer_runtime::containerd::ContainerRecord,
    policy: &RoundPolicy,
    memory: bool,
    out_dir: &std::path::Path,
    tx: &Events,
    phases: &mut Vec<PhaseTiming>,
    rounds: &mut Vec<RoundReport>,
) -> Result<PrecopyEnd, (Step, AgentError)> {
    let rt_step = |step: Step| move |source| (step, AgentError::Runtime { step, source });
    let mut prev: Option<u64> = None;
    let mut end = PrecopyEnd::default();
    for round in 1..=policy.max_rounds {
        let dir = out_dir.join(format!("round-{round}"));
        let t = Instant::now();
        let (dump_bytes, files) = if memory {
            rt.checkpoint(&record.id, &dir.join("criu"), &dir.join("work"))
                .await
                .map_err(rt_step(Step::Checkpoint))?;
            (
                dir_size(&dir.join("criu")),
                criu_files(&dir.join("criu")).map_err(|e| (Step::Transfer, e))?,
            )
        } else {
            (0, Vec::new())
        };
        let dump_time = t.elapsed();
        // The destination may answer before the last chunks are in, so that the next
        // round's (or the cut-over's) dump runs while they arrive: about as long as
        // this round's dump took, plus the downtime budget of the final transfer (the
        // tail may run into the final Sync by that much).
        let overlap = if memory {
            dump_time + policy.budget
        } else {
            std::time::Duration::ZERO
        };
        let (chunk_time, _, reply) =
            publish_and_sync(chunks, dst, mid, round, false, files, None, overlap)
                .await
                .map_err(|e| (Step::Transfer, e))?;
        let _ = std::fs::remove_dir_all(&dir);
        end.wire += reply.wire_bytes + apply_tail(rounds, reply.tail.as_ref());
        if reply.pending_chunks > 0 {
            info!(
                round,
                pending_chunks = reply.pending_chunks,
                "the destination answered before its last chunks: they arrive during the next step"
            );
        }
        let rep = RoundReport {
            round,
            dump_micros: dump_time.as_micros() as u64,
            chunk_micros: chunk_time.as_micros() as u64,
            sync_micros: reply.fetch_micros,
            dump_bytes,
            delta_raw_bytes: reply.raw_bytes,
            delta_wire_bytes: reply.wire_bytes,
            sources: reply.sources.clone(),
            pending_chunks: reply.pending_chunks,
        };
        emit(
            tx,
            &phase(&format!("precopy.{round}"), t, reply.wire_bytes),
            phases,
        )
        .await;
        let rate = if reply.fetch_micros > 0 {
            reply.wire_bytes as f64 / (reply.fetch_micros as f64 / 1e6)
        } else {
            f64::INFINITY
        };
        rounds.push(rep);
        if memory && policy.full_cutover_hopeless(dump_time) {
            let why = "a full cut-over cannot fit the budget (its dump alone takes longer)";
            info!(round, why, "pre-copy done");
            end.why = Some(why);
            break;
        }
        if let Some(why) = policy.stop_after(round, reply.wire_bytes, rate, prev) {
            info!(round, delta = reply.wire_bytes, why, "pre-copy done");
            end.why = Some(why);
            break;
        }
        let vol_changed = chunks
            .volumes
            .lock()
            .await
            .changed_since_scan()
            .unwrap_or(0);
        let bound = if memory { dump_bytes } else { 0 } + vol_changed;
        if policy.next_fits(bound, source_rate(&reply, rate)) {
            let why = "the next delta fits the downtime budget (at most the memory dump and the volume files changed since the round)";
            info!(round, bound, dump_bytes, vol_changed, why, "pre-copy done");
            end.why = Some(why);
            break;
        }
        prev = Some(reply.wire_bytes);
    }
    Ok(end)
}

/// Completes the report of the round that `tail` finishes (it had answered before
/// its fetch ended) with its whole figures; returns the bytes that adds.
pub fn apply_tail(rounds: &mut [RoundReport], tail: Option<&xfer_proto::v1::RoundTail>) -> u64 {
    let Some(t) = tail else { return 0 };
    let Some(r) = rounds.iter_mut().find(|r| r.round == t.round) else {
        warn!(round = t.round, "a round's tail for a round not reported");
        return 0;
    };
    let extra = t.wire_bytes.saturating_sub(r.delta_wire_bytes);
    r.delta_wire_bytes = r.delta_wire_bytes.max(t.wire_bytes);
    r.delta_raw_bytes = r.delta_raw_bytes.max(t.raw_bytes);
    r.sync_micros = r.sync_micros.max(t.fetch_micros);
    r.sources = t.sources.clone();
    extra
}

/// The rate the migration source alone delivered in a round (its bytes over the
/// round's fetch time), or `overall` if it served too little to tell.
fn source_rate(reply: &SyncReply, overall: f64) -> f64 {
    let own: u64 = reply
        .sources
        .iter()
        .filter(|s| s.source == crate::chunks::FALLBACK_NAME)
        .map(|s| s.wire_bytes)
        .sum();
    if own >= 1 << 20 && reply.fetch_micros > 0 {
        own as f64 / (reply.fetch_micros as f64 / 1e6)
    } else {
        overall
    }
}

/// A lazy cut-over's writable-layer diff up to this size goes whole with the images.
const DIRECT_DIFF_MAX: u64 = 4 << 20;

/// What the cut-over came to.
#[derive(Debug, Default)]
pub struct CutoverEnd {
    /// Freeze -> restored task running at the destination.
    pub downtime_us: u64,
    /// Bytes the destination fetched in the final round (and the rest of the last
    /// pre-copy round, if that answered before its fetch ended).
    pub wire: u64,
    pub pid: u32,
    /// Post-copy: memory the destination took from the page server, and how long from
    /// the restore until the last page was across.
    pub postcopy_bytes: u64,
    pub postcopy_micros: u64,
}

/// The cut-over: freeze, dump, writable-layer diff, final sync (the destination fetches
/// the chunks it lacks and rebuilds the image directory), restore at the destination,
/// then remove the source copy. On any failure after the freeze the source task is
/// thawed; the caller sends `Abort`. Returns (downtime in us, bytes on the wire,
/// restored pid).
#[allow(clippy::too_many_arguments)]
pub async fn cutover<R: Runtime, D: Destination>(
    rt: &R,
    dst: &mut D,
    chunks: &ChunkSide<'_>,
    mid: &str,
    record: &xfer_runtime::containerd::ContainerRecord,
    lazy_at: Option<std::net::SocketAddr>,
    out_dir: &std::path::Path,
    tx: &Events,
    phases: &mut Vec<PhaseTiming>,
    rounds: &mut Vec<RoundReport>,
) -> Result<CutoverEnd, (Step, AgentError)> {
    let id = record.id.as_str();
    let rt_step = |step: Step| move |source| (step, AgentError::Runtime { step, source });
    // Freeze: downtime starts.
    let frozen_at = Instant::now();
    rt.pause(id).await.map_err(rt_step(Step::Freeze))?;
    emit(tx, &phase("freeze", frozen_at, 0), phases).await;

    // A lazy dump keeps serving the task's memory until the destination took it; it
    // lives outside the block below so a failure can stop it before the resume.
    let mut lazy_dump: Option<R::Lazy> = None;
    let mut lazy_bytes = 0u64;
    let after_freeze = async {
        let t = Instant::now();
        // The volumes' final tars are chunked while CRIU dumps.
        let volumes = VolumesAhead::start(chunks, mid).await;
        let criu_dir = out_dir.join("final").join("criu");
        let work_dir = out_dir.join("final").join("work");
        if let Some(addr) = lazy_at {
            tokio::task::spawn_blocking(xfer_runtime::lazy::ensure_pipe_max_size)
                .await
                .map_err(|e| {
                    (
                        Step::Checkpoint,
                        AgentError::Refused(format!("sysctl task: {e}")),
                    )
                })?
                .map_err(rt_step(Step::Checkpoint))?;
            lazy_dump = Some(
                rt.lazy_checkpoint(id, &criu_dir, &work_dir, addr)
                    .await
                    .map_err(rt_step(Step::Checkpoint))?,
            );
            lazy_bytes = xfer_runtime::lazy::lazy_bytes(&criu_dir).unwrap_or_else(|e| {
                warn!(error = %e, "could not count the lazy pages");
                0
            });
        } else {
            rt.checkpoint(id, &criu_dir, &work_dir)
                .await
                .map_err(rt_step(Step::Checkpoint))?;
        }
        // Invariant: the task stays frozen from the freeze to the end; if the dump had
        // thawed it, the source would diverge from the copy being moved.
        let (st, _) = rt.task_state(id).await.map_err(rt_step(Step::Checkpoint))?;
        if st != TaskState::Paused {
            return Err((
                Step::Checkpoint,
                AgentError::Refused(format!(
                    "the task is {} after the dump, not paused",
                    st.as_str()
                )),
            ));
        }
        let dump_time = t.elapsed();
        let dump_bytes = dir_size(&criu_dir);
        emit(tx, &phase("checkpoint", t, dump_bytes), phases).await;

        let t = Instant::now();
        let upper = rt
            .upper_dir(record)
            .await
            .map_err(rt_step(Step::RootfsDiff))?;
        let diff_path = out_dir.join("final").join("rootfs.tar");
        let summary = {
            let (u, p) = (upper.clone(), diff_path.clone());
            tokio::task::spawn_blocking(move || xfer_runtime::rootfs::capture(&u, &p))
                .await
                .map_err(|e| {
                    (
                        Step::RootfsDiff,
                        AgentError::Refused(format!("diff task: {e}")),
                    )
                })?
                .map_err(rt_step(Step::RootfsDiff))?
        };
        info!(
            changed = summary.changed.len(),
            deleted = summary.deleted.len(),
            "writable-layer diff captured"
        );
        emit(tx, &phase("rootfs_diff", t, summary.tar_bytes), phases).await;

        let t = Instant::now();
        let mut files = criu_files(&criu_dir).map_err(|e| (Step::Transfer, e))?;
        let diff = OutFile {
            kind: FileKind::RootfsDiff,
            name: "rootfs.tar".into(),
            path: diff_path,
        };
        let round = rounds.len() as u32 + 1;
        let mut report = RoundReport {
            round,
            dump_micros: dump_time.as_micros() as u64,
            dump_bytes,
            ..Default::default()
        };
        // A lazy dump leaves a few small images (no private memory): they go whole in
        // one stream, cheaper than chunking, announcing and fetching ~30 files. The
        // chunked sync remains for what can be large: the volumes' final delta and a
        // big writable-layer diff.
        // The final sync comes first, also when it carries nothing: it is where the
        // destination drops files of earlier rounds that this dump does not have.
        let mut direct = Vec::new();
        let mut sync_files = Vec::new();
        if lazy_at.is_some() {
            if summary.tar_bytes <= DIRECT_DIFF_MAX {
                files.push(diff);
            } else {
                sync_files.push(diff);
            }
            direct = files;
        } else {
            files.push(diff);
            sync_files = files;
        }
        let (chunk_time, _, reply) = publish_and_sync(
            chunks,
            dst,
            mid,
            round,
            true,
            sync_files,
            Some(volumes),
            std::time::Duration::ZERO,
        )
        .await
        .map_err(|e| (Step::Transfer, e))?;
        // The rest of the last pre-copy round, if it answered early.
        let earlier_wire = apply_tail(rounds, reply.tail.as_ref());
        report.chunk_micros += chunk_time.as_micros() as u64;
        report.sync_micros += reply.fetch_micros + reply.rebuild_micros;
        report.delta_raw_bytes += reply.raw_bytes;
        report.delta_wire_bytes += reply.wire_bytes;
        report.sources.extend(reply.sources.clone());
        if !direct.is_empty() {
            let direct_bytes: u64 = direct
                .iter()
                .filter_map(|f| std::fs::metadata(&f.path).ok())
                .map(|m| m.len())
                .sum();
            let ts = Instant::now();
            let sent = dst
                .put_files(mid, direct)
                .await
                .map_err(|e| (Step::Transfer, e))?;
            report.sync_micros += ts.elapsed().as_micros() as u64;
            report.delta_raw_bytes += direct_bytes;
            report.delta_wire_bytes += sent.wire_bytes;
            report.sources.push(SourceBytes {
                source: "source (whole files)".into(),
                chunks: 0,
                wire_bytes: sent.wire_bytes,
            });
        }
        let final_wire = report.delta_wire_bytes;
        rounds.push(report);
        emit(tx, &phase("transfer", t, final_wire), phases).await;

        let t = Instant::now();
        let restored = dst
            .restore(RestoreRequest {
                migration_id: mid.to_string(),
                container_id: id.to_string(),
                spec_json: record.spec_json.clone(),
                image_name: record.image.clone(),
                snapshotter: record.snapshotter.clone(),
                labels: record.labels.clone(),
                has_rootfs_diff: true,
                lazy: lazy_at.map(|a| LazyPages {
                    address: a.ip().to_string(),
                    port: u32::from(a.port()),
                }),
            })
            .await
            .map_err(|e| (Step::Restore, e))?;
        emit(tx, &phase("restore", t, 0), phases).await;
        for p in &restored.phases {
            emit(tx, p, phases).await;
        }
        Ok::<_, (Step, AgentError)>((final_wire + earlier_wire, restored.pid))
    }
    .await;

    match after_freeze {
        Ok((wire, pid)) => {
            let downtime = frozen_at.elapsed().as_micros() as u64;
            let mut end = CutoverEnd {
                downtime_us: downtime,
                wire,
                pid,
                ..Default::default()
            };
            if let Some(dump) = lazy_dump {
                // Post-copy: the destination runs and takes the memory it lacks from
                // our page server. The source copy must stay until the last page is
                // across; if the transfer breaks now, the moved container cannot get
                // its memory (CRIU's lazy restore has no way back).
                let t = Instant::now();
                let res = dump.finish().await;
                end.postcopy_bytes = lazy_bytes;
                end.postcopy_micros = t.elapsed().as_micros() as u64;
                emit(tx, &phase("postcopy", t, lazy_bytes), phases).await;
                if let Err(e) = res {
                    // The destination's copy lacks memory and its agent removes it;
                    // the source copy is consistent as of the freeze: it carries on.
                    warn!(error = %e, "the post-copy transfer failed after the destination resumed; resuming the source");
                    if let Err(re) = rt.resume(id).await {
                        warn!(error = %re, "could not resume the source task");
                    }
                    return Err((
                        Step::Transfer,
                        AgentError::Refused(format!(
                            "post-copy transfer failed after the destination resumed the container: {e}; the source copy resumed from the freeze, so what the destination did since is lost"
                        )),
                    ));
                }
            }
            // The destination runs the container: only now does the source let go.
            let t = Instant::now();
            if let Some(cn) = chunks.source_net {
                cn.cut(id).await;
            }
            tracing::debug!(
                ms = t.elapsed().as_secs_f64() * 1000.0,
                "source copy cut off the network"
            );
            if let Err(e) = rt.remove(id).await {
                // The migration succeeded; a leftover source copy is reported, not fatal.
                warn!(error = %e, "could not remove the source copy");
            }
            emit(tx, &phase("cleanup_source", t, 0), phases).await;
            Ok(end)
        }
        Err((step, e)) => {
            if let Some(dump) = lazy_dump {
                // Stop serving pages: CRIU lets go of the task, which stays frozen.
                dump.abort().await;
            }
            if let Err(re) = rt.resume(id).await {
                warn!(error = %re, "could not resume the source task after a failed migration");
            } else {
                info!("source task resumed after failed {step:?} step");
            }
            Err((step, e))
        }
    }
}

pub(crate) fn criu_files(dir: &std::path::Path) -> Result<Vec<OutFile>, AgentError> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|source| AgentError::ReadFile {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd {
        let e = e.map_err(|source| AgentError::ReadFile {
            path: dir.to_path_buf(),
            source,
        })?;
        let path: PathBuf = e.path();
        if path.is_file() {
            out.push(OutFile {
                kind: FileKind::CriuImage,
                name: e.file_name().to_string_lossy().into_owned(),
                path,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Mutex;
    use xfer_runtime::containerd::ContainerRecord;
    use xfer_runtime::RuntimeError;

    /// A runtime that records calls and can fail at one of them.
    #[derive(Default)]
    struct FakeRuntime {
        calls: std::sync::Arc<Mutex<Vec<String>>>,
        fail: Option<&'static str>,
        thaw_on_dump: bool,
        paused: Mutex<bool>,
        upper: PathBuf,
    }

    impl FakeRuntime {
        fn call(&self, name: &str) -> Result<(), RuntimeError> {
            self.calls.lock().expect("lock").push(name.to_string());
            if self.fail == Some(name) {
                Err(RuntimeError::Invalid(format!("injected {name} failure")))
            } else {
                Ok(())
            }
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl Runtime for FakeRuntime {
        async fn container(&self, _id: &str) -> Result<ContainerRecord, RuntimeError> {
            unreachable!("the cut-over gets the record from its caller")
        }
        async fn task_state(&self, _id: &str) -> Result<(TaskState, u32), RuntimeError> {
            self.call("state")?;
            let p = *self.paused.lock().expect("lock");
            Ok((
                if p {
                    TaskState::Paused
                } else {
                    TaskState::Running
                },
                42,
            ))
        }
        async fn pause(&self, _id: &str) -> Result<(), RuntimeError> {
            self.call("pause")?;
            *self.paused.lock().expect("lock") = true;
            Ok(())
        }
        async fn resume(&self, _id: &str) -> Result<(), RuntimeError> {
            self.call("resume")?;
            *self.paused.lock().expect("lock") = false;
            Ok(())
        }
        async fn checkpoint(
            &self,
            _id: &str,
            image_dir: &Path,
            _work: &Path,
        ) -> Result<(), RuntimeError> {
            self.call("checkpoint")?;
            std::fs::create_dir_all(image_dir).expect("mkdir");
            std::fs::write(image_dir.join("pages-1.img"), vec![7u8; 10_000]).expect("write");
            if self.thaw_on_dump {
                *self.paused.lock().expect("lock") = false;
            }
            Ok(())
        }
        async fn upper_dir(&self, _r: &ContainerRecord) -> Result<PathBuf, RuntimeError> {
            self.call("upper")?;
            Ok(self.upper.clone())
        }
        async fn remove(&self, _id: &str) -> Result<(), RuntimeError> {
            self.call("remove")
        }
        type Lazy = FakeLazy;
        async fn lazy_checkpoint(
            &self,
            _id: &str,
            image_dir: &Path,
            _work: &Path,
            _listen: std::net::SocketAddr,
        ) -> Result<FakeLazy, RuntimeError> {
            self.call("lazy_checkpoint")?;
            std::fs::create_dir_all(image_dir).expect("mkdir");
            std::fs::write(image_dir.join("core-1.img"), vec![1u8; 100]).expect("write");
            Ok(FakeLazy {
                calls: self.calls.clone(),
                fail: self.fail,
            })
        }
    }

    /// A lazy dump that records how it ended.
    struct FakeLazy {
        calls: std::sync::Arc<Mutex<Vec<String>>>,
        fail: Option<&'static str>,
    }

    impl LazyTransfer for FakeLazy {
        async fn finish(self) -> Result<(), RuntimeError> {
            self.calls.lock().expect("lock").push("lazy_finish".into());
            if self.fail == Some("lazy_finish") {
                return Err(RuntimeError::Invalid("page server connection lost".into()));
            }
            Ok(())
        }
        async fn abort(self) {
            self.calls.lock().expect("lock").push("lazy_abort".into());
        }
    }

    #[derive(Default)]
    struct FakeDest {
        fail: Option<&'static str>,
        files: Vec<String>,
        restored: bool,
        lazy: Option<LazyPages>,
        /// Files streamed whole (a lazy cut-over's images).
        direct: Vec<String>,
        /// Each round's delta as the reply gives it, all from the source, taking 1 s
        /// (default: 1 byte).
        delta: Option<u64>,
        /// While each round's fetch runs, this file is rewritten with this many bytes
        /// (the task writes to its volume meanwhile).
        write_during: Option<(PathBuf, usize)>,
        rounds: u32,
        /// Each sync's `overlap_micros`.
        overlaps: Vec<u64>,
        /// Pre-copy rounds answer early: half their delta, the rest in the next
        /// reply's tail.
        early: bool,
        /// (round, whole delta) of the last round that answered early.
        owed: Option<(u32, u64)>,
    }

    impl Destination for FakeDest {
        async fn sync(&mut self, req: SyncRequest) -> Result<SyncReply, AgentError> {
            if self.fail == Some("transfer") {
                return Err(AgentError::Refused("link cut".into()));
            }
            let objects = crate::sync::decode_objects(&req.objects)?;
            self.files.extend(objects.iter().map(|o| o.name.clone()));
            self.rounds += 1;
            self.overlaps.push(req.overlap_micros);
            if let Some((path, n)) = &self.write_during {
                std::fs::write(path, vec![self.rounds as u8; *n]).expect("write");
            }
            let whole = self.delta.unwrap_or(1);
            let tail = self
                .owed
                .take()
                .map(|(round, wire_bytes)| xfer_proto::v1::RoundTail {
                    round,
                    chunks: 2,
                    wire_bytes,
                    raw_bytes: wire_bytes,
                    fetch_micros: 1_200_000,
                    sources: vec![xfer_proto::v1::SourceBytes {
                        source: "h3".into(),
                        chunks: 2,
                        wire_bytes,
                    }],
                });
            let early = self.early && !req.r#final;
            let wire = if early { whole / 2 } else { whole };
            if early {
                self.owed = Some((req.round, whole));
            }
            Ok(SyncReply {
                chunks: 1,
                wire_bytes: wire,
                fetch_micros: 1_000_000,
                sources: vec![xfer_proto::v1::SourceBytes {
                    source: crate::chunks::FALLBACK_NAME.into(),
                    chunks: 1,
                    wire_bytes: wire,
                }],
                pending_chunks: u64::from(early),
                tail,
                ..Default::default()
            })
        }
        async fn put_files(&mut self, _mid: &str, files: Vec<OutFile>) -> Result<Sent, AgentError> {
            if self.fail == Some("transfer") {
                return Err(AgentError::Refused("link cut".into()));
            }
            self.direct.extend(files.iter().map(|f| f.name.clone()));
            Ok(Sent {
                files: files.len() as u64,
                raw_bytes: 1,
                wire_bytes: 1,
            })
        }

        async fn restore(&mut self, req: RestoreRequest) -> Result<RestoreReply, AgentError> {
            self.lazy = req.lazy;
            if self.fail == Some("restore") {
                return Err(AgentError::Refused("restore failed".into()));
            }
            self.restored = true;
            Ok(RestoreReply {
                pid: 7,
                phases: vec![],
            })
        }
    }

    fn record() -> ContainerRecord {
        ContainerRecord {
            id: "c1".into(),
            image: "busybox".into(),
            snapshotter: "overlayfs".into(),
            snapshot_key: "c1".into(),
            labels: Default::default(),
            spec_json: b"{}".to_vec(),
        }
    }

    /// A chunk side over `store` and `moves`, no network, no knowledge base.
    fn test_side<'a>(
        store: &'a std::sync::Arc<xfer_store::Store>,
        moves: &'a tokio::sync::Mutex<crate::volumes::Moves>,
    ) -> ChunkSide<'a> {
        ChunkSide {
            store,
            endpoint: "http://127.0.0.1:1",
            volumes: moves,
            source_net: None,
            kb: None,
        }
    }

    async fn run_cutover(
        rt: &FakeRuntime,
        dst: &mut FakeDest,
    ) -> Result<CutoverEnd, (Step, AgentError)> {
        run_cutover_at(rt, dst, None).await
    }

    async fn run_cutover_at(
        rt: &FakeRuntime,
        dst: &mut FakeDest,
        lazy_at: Option<std::net::SocketAddr>,
    ) -> Result<CutoverEnd, (Step, AgentError)> {
        run_cutover_with(rt, dst, lazy_at, &mut Vec::new()).await
    }

    async fn run_cutover_with(
        rt: &FakeRuntime,
        dst: &mut FakeDest,
        lazy_at: Option<std::net::SocketAddr>,
        rounds: &mut Vec<RoundReport>,
    ) -> Result<CutoverEnd, (Step, AgentError)> {
        let out = tempfile::tempdir().expect("tmp");
        let store =
            std::sync::Arc::new(xfer_store::Store::open(out.path().join("store")).expect("store"));
        let moves = tokio::sync::Mutex::default();
        let chunks = test_side(&store, &moves);
        let (tx, _rx) = mpsc::channel(64);
        let mut phases = Vec::new();
        cutover(
            rt,
            dst,
            &chunks,
            "m1",
            &record(),
            lazy_at,
            out.path(),
            &tx,
            &mut phases,
            rounds,
        )
        .await
    }

    fn fake_rt(fail: Option<&'static str>) -> (FakeRuntime, tempfile::TempDir) {
        let upper = tempfile::tempdir().expect("tmp");
        std::fs::write(upper.path().join("new-file"), b"x").expect("write");
        let rt = FakeRuntime {
            fail,
            upper: upper.path().to_path_buf(),
            ..Default::default()
        };
        (rt, upper)
    }

    #[tokio::test]
    async fn success_removes_the_source_only_after_restore() {
        let (rt, _u) = fake_rt(None);
        let mut dst = FakeDest::default();
        let end = run_cutover(&rt, &mut dst).await.expect("cutover");
        assert_eq!(end.pid, 7);
        assert!(dst.lazy.is_none());
        assert!(dst.restored);
        assert!(dst.files.contains(&"pages-1.img".to_string()));
        assert!(dst.files.contains(&"rootfs.tar".to_string()));
        let calls = rt.calls();
        assert_eq!(calls.first().map(String::as_str), Some("pause"));
        assert_eq!(calls.last().map(String::as_str), Some("remove"));
        assert!(!calls.contains(&"resume".to_string()));
    }

    #[tokio::test]
    async fn failures_after_the_freeze_resume_the_source_and_never_remove_it() {
        for (rt_fail, dst_fail, step) in [
            (Some("checkpoint"), None, Step::Checkpoint),
            (Some("upper"), None, Step::RootfsDiff),
            (None, Some("transfer"), Step::Transfer),
            (None, Some("restore"), Step::Restore),
        ] {
            let (rt, _u) = fake_rt(rt_fail);
            let mut dst = FakeDest {
                fail: dst_fail,
                ..Default::default()
            };
            let (got, _) = run_cutover(&rt, &mut dst).await.expect_err("must fail");
            assert_eq!(got, step);
            let calls = rt.calls();
            assert_eq!(
                calls.last().map(String::as_str),
                Some("resume"),
                "{step:?}: {calls:?}"
            );
            assert!(
                !calls.contains(&"remove".to_string()),
                "{step:?}: source removed"
            );
            assert!(!dst.restored || dst_fail.is_some());
        }
    }

    fn page_server() -> Option<std::net::SocketAddr> {
        Some("10.1.2.3:27000".parse().expect("addr"))
    }

    #[tokio::test]
    async fn a_lazy_cutover_restores_first_and_removes_the_source_after_the_last_page() {
        let (rt, _u) = fake_rt(None);
        let mut dst = FakeDest::default();
        run_cutover_at(&rt, &mut dst, page_server())
            .await
            .expect("cutover");
        let l = dst.lazy.clone().expect("the restore was asked to be lazy");
        assert_eq!((l.address.as_str(), l.port), ("10.1.2.3", 27000));
        // The few small images and the small diff go whole; the (empty) final sync
        // carries nothing.
        assert!(dst.direct.contains(&"core-1.img".to_string()));
        assert!(dst.direct.contains(&"rootfs.tar".to_string()));
        assert!(dst.files.is_empty(), "{:?}", dst.files);
        let calls = rt.calls();
        let at = |n: &str| calls.iter().position(|c| c == n);
        assert!(at("checkpoint").is_none(), "{calls:?}");
        assert!(at("lazy_checkpoint") < at("lazy_finish"), "{calls:?}");
        assert!(at("lazy_finish") < at("remove"), "{calls:?}");
        assert!(
            at("resume").is_none() && at("lazy_abort").is_none(),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_lazy_cutover_failing_before_the_restore_stops_the_page_server_then_resumes() {
        for (dst_fail, step) in [
            (Some("transfer"), Step::Transfer),
            (Some("restore"), Step::Restore),
        ] {
            let (rt, _u) = fake_rt(None);
            let mut dst = FakeDest {
                fail: dst_fail,
                ..Default::default()
            };
            let (got, _) = run_cutover_at(&rt, &mut dst, page_server())
                .await
                .expect_err("must fail");
            assert_eq!(got, step);
            let calls = rt.calls();
            let at = |n: &str| calls.iter().position(|c| c == n);
            assert!(
                at("lazy_abort").is_some() && at("lazy_abort") < at("resume"),
                "{calls:?}"
            );
            assert!(
                at("remove").is_none() && at("lazy_finish").is_none(),
                "{calls:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_broken_postcopy_transfer_resumes_the_source_and_keeps_it() {
        let (rt, _u) = fake_rt(Some("lazy_finish"));
        let mut dst = FakeDest::default();
        let (step, e) = run_cutover_at(&rt, &mut dst, page_server())
            .await
            .expect_err("must fail");
        assert_eq!(step, Step::Transfer);
        assert!(e.to_string().contains("post-copy"), "{e}");
        let calls = rt.calls();
        assert_eq!(
            calls.last().map(String::as_str),
            Some("resume"),
            "{calls:?}"
        );
        assert!(!calls.contains(&"remove".to_string()));
    }

    #[tokio::test]
    async fn a_dump_that_thaws_the_task_aborts() {
        let (mut rt, _u) = fake_rt(None);
        rt.thaw_on_dump = true;
        let mut dst = FakeDest::default();
        let (step, e) = run_cutover(&rt, &mut dst).await.expect_err("must fail");
        assert_eq!(step, Step::Checkpoint);
        assert!(e.to_string().contains("not paused"), "{e}");
        assert!(
            dst.files.is_empty(),
            "nothing may be sent from a diverged source"
        );
    }

    #[tokio::test]
    async fn a_failed_freeze_changes_nothing() {
        let (rt, _u) = fake_rt(Some("pause"));
        let mut dst = FakeDest::default();
        let (step, _) = run_cutover(&rt, &mut dst).await.expect_err("must fail");
        assert_eq!(step, Step::Freeze);
        assert_eq!(rt.calls(), vec!["pause".to_string()]);
    }

    /// Pre-copy rounds of the fake task with one read-write volume `vol` (holding a
    /// 1 MB file) against `dst`, budget 100 ms.
    async fn run_precopy(dst: &mut FakeDest, vol: &Path) -> (Vec<RoundReport>, PrecopyEnd) {
        let (rt, _u) = fake_rt(None);
        let out = tempfile::tempdir().expect("tmp");
        let store =
            std::sync::Arc::new(xfer_store::Store::open(out.path().join("store")).expect("store"));
        std::fs::write(vol.join("base"), vec![1u8; 1_000_000]).expect("write");
        let moves = tokio::sync::Mutex::new(crate::volumes::Moves::of_dirs(vec![(
            "rw-0".into(),
            vol.to_path_buf(),
            false,
        )]));
        let chunks = test_side(&store, &moves);
        let (tx, _rx) = mpsc::channel(64);
        let (mut phases, mut rounds) = (Vec::new(), Vec::new());
        let policy =
            RoundPolicy::from_request(MigrationMode::Precopy, &super::policy_tests::req(4, 100));
        let end = precopy(
            &rt,
            dst,
            &chunks,
            "m1",
            &record(),
            &policy,
            true,
            out.path(),
            &tx,
            &mut phases,
            &mut rounds,
        )
        .await
        .expect("precopy");
        (rounds, end)
    }

    #[tokio::test]
    async fn the_cutover_sends_the_volumes_chunked_beside_the_dump_in_one_final_sync() {
        let (rt, _u) = fake_rt(None);
        let vol = tempfile::tempdir().expect("tmp");
        std::fs::write(vol.path().join("data"), vec![3u8; 300_000]).expect("write");
        let out = tempfile::tempdir().expect("tmp");
        let store =
            std::sync::Arc::new(xfer_store::Store::open(out.path().join("store")).expect("store"));
        let moves = tokio::sync::Mutex::new(crate::volumes::Moves::of_dirs(vec![(
            "rw-0".into(),
            vol.path().to_path_buf(),
            false,
        )]));
        let chunks = test_side(&store, &moves);
        let (tx, _rx) = mpsc::channel(64);
        let (mut phases, mut rounds) = (Vec::new(), Vec::new());
        let mut dst = FakeDest::default();
        cutover(
            &rt,
            &mut dst,
            &chunks,
            "m1",
            &record(),
            None,
            out.path(),
            &tx,
            &mut phases,
            &mut rounds,
        )
        .await
        .expect("cutover");
        assert_eq!(dst.rounds, 1, "one final sync");
        for f in ["pages-1.img", "rootfs.tar", "rw-0"] {
            assert!(
                dst.files.iter().any(|x| x == f),
                "{f} missing: {:?}",
                dst.files
            );
        }
        assert!(dst.restored);
    }

    #[tokio::test]
    async fn a_large_first_round_of_a_quiet_task_is_the_last() {
        // 100 MB in 1 s: the delta alone does not fit 100 ms. But the dump is 10 kB
        // and nothing in the volume changed since its scan: a second round would only
        // re-send what the cut-over sends anyway.
        let vol = tempfile::tempdir().expect("tmp");
        let mut dst = FakeDest {
            delta: Some(100_000_000),
            ..Default::default()
        };
        let (rounds, end) = run_precopy(&mut dst, vol.path()).await;
        assert_eq!(rounds.len(), 1);
        assert!(
            end.why
                .is_some_and(|w| w.starts_with("the next delta fits")),
            "{:?}",
            end.why
        );
    }

    #[tokio::test]
    async fn a_volume_written_during_the_round_gets_another_round() {
        // The task rewrote 20 MB of its volume while round 1 went: at the source's
        // 100 MB/s that is 200 ms, more than the budget, so round 2 runs (and then
        // stops: its delta stopped shrinking).
        let vol = tempfile::tempdir().expect("tmp");
        let mut dst = FakeDest {
            delta: Some(100_000_000),
            write_during: Some((vol.path().join("hot"), 20_000_000)),
            ..Default::default()
        };
        let (rounds, end) = run_precopy(&mut dst, vol.path()).await;
        assert!(rounds.len() >= 2, "{:?}", end.why);
    }

    #[tokio::test]
    async fn rounds_ask_to_overlap_their_dump_and_early_answers_are_completed() {
        // Every pre-copy round answers with half its delta and the rest comes with
        // the next reply: the reports and the byte count end up whole.
        let vol = tempfile::tempdir().expect("tmp");
        let mut dst = FakeDest {
            delta: Some(100_000_000),
            write_during: Some((vol.path().join("hot"), 20_000_000)),
            early: true,
            ..Default::default()
        };
        let (rounds, end) = run_precopy(&mut dst, vol.path()).await;
        let n = rounds.len();
        assert!(n >= 2, "{:?}", end.why);
        // Each round asked for its own dump time plus the budget (100 ms) as the
        // overlap.
        let asked: Vec<u64> = rounds.iter().map(|r| r.dump_micros + 100_000).collect();
        assert_eq!(dst.overlaps, asked);
        // Rounds 1..n-1 were completed by the next round's reply; the last one is
        // still owed (the cut-over's reply completes it, below).
        for r in &rounds[..n - 1] {
            assert_eq!(r.delta_wire_bytes, 100_000_000, "round {}", r.round);
            assert_eq!(r.sync_micros, 1_200_000);
            assert_eq!(r.sources[0].source, "h3");
        }
        assert_eq!(rounds[n - 1].delta_wire_bytes, 50_000_000);
        assert_eq!(end.wire, 100_000_000 * (n as u64 - 1) + 50_000_000);
        let mut rounds = rounds;
        let owed = dst
            .owed
            .map(|(round, wire_bytes)| xfer_proto::v1::RoundTail {
                round,
                wire_bytes,
                ..Default::default()
            });
        assert_eq!(apply_tail(&mut rounds, owed.as_ref()), 50_000_000);
        assert_eq!(rounds[n - 1].delta_wire_bytes, 100_000_000);
        // A tail for a round never reported adds nothing.
        let stray = xfer_proto::v1::RoundTail {
            round: 99,
            wire_bytes: 5,
            ..Default::default()
        };
        assert_eq!(apply_tail(&mut rounds, Some(&stray)), 0);
    }

    #[tokio::test]
    async fn the_cutover_asks_no_overlap_and_completes_the_last_round() {
        let vol = tempfile::tempdir().expect("tmp");
        let mut dst = FakeDest {
            delta: Some(1_000),
            early: true,
            ..Default::default()
        };
        let (mut rounds, _) = run_precopy(&mut dst, vol.path()).await;
        let last = rounds.len() - 1;
        assert_eq!(rounds[last].delta_wire_bytes, 500);
        let (rt, _u) = fake_rt(None);
        let end = run_cutover_with(&rt, &mut dst, None, &mut rounds)
            .await
            .expect("cut-over");
        assert_eq!(
            dst.overlaps.last(),
            Some(&0),
            "the final sync asks no overlap"
        );
        assert_eq!(rounds[last].delta_wire_bytes, 1_000);
        // The final round's 1000 bytes plus the 500 the last round still owed.
        assert_eq!(end.wire, 1_000 + 500);
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    pub(super) fn req(rounds: u32, budget: u32) -> MigrateRequest {
        MigrateRequest {
            max_rounds: rounds,
            downtime_budget_ms: budget,
            ..Default::default()
        }
    }

    #[test]
    fn cold_runs_no_rounds_and_precopy_has_defaults() {
        assert_eq!(
            RoundPolicy::from_request(MigrationMode::Cold, &req(9, 0)).max_rounds,
            0
        );
        let p = RoundPolicy::from_request(MigrationMode::Precopy, &req(0, 0));
        assert_eq!(p.max_rounds, RoundPolicy::MAX_ROUNDS);
        assert_eq!(p.budget.as_millis(), u128::from(RoundPolicy::BUDGET_MS));
        assert_eq!(
            RoundPolicy::from_request(MigrationMode::Precopy, &req(2, 50)).max_rounds,
            2
        );
    }

    #[test]
    fn modes_map_to_strategies() {
        let st = |m, ok| Strategy::new(m, ok);
        assert_eq!(st(MigrationMode::Precopy, true).cutover, Cutover::Full);
        assert_eq!(st(MigrationMode::Cold, true).cutover, Cutover::Full);
        let p = st(MigrationMode::Postcopy, true);
        assert_eq!((p.memory_rounds, p.cutover), (false, Cutover::Lazy));
        let h = st(MigrationMode::Hybrid, true);
        assert_eq!((h.memory_rounds, h.cutover), (false, Cutover::Lazy));
        assert_eq!(st(MigrationMode::Auto, true).cutover, Cutover::Auto);
        // Auto never goes lazy to a destination that cannot restore lazily.
        assert_eq!(st(MigrationMode::Auto, false).cutover, Cutover::Full);
        assert_eq!(
            RoundPolicy::from_request(MigrationMode::Postcopy, &req(9, 0)).max_rounds,
            0
        );
    }

    fn round(dump_ms: u64, sync_ms: u64, delta: u64) -> RoundReport {
        RoundReport {
            dump_micros: dump_ms * 1000,
            sync_micros: sync_ms * 1000,
            delta_raw_bytes: delta,
            delta_wire_bytes: delta,
            ..Default::default()
        }
    }

    #[test]
    fn auto_goes_lazy_only_when_a_full_cutover_would_not_fit_the_budget() {
        let budget = std::time::Duration::from_millis(100);
        // A small task: dumps in 20 ms, 1 MB delta at 100 MB/s -> 2*20 + 10 = 50 ms.
        let small = [round(20, 100, 10_000_000), round(20, 10, 1_000_000)];
        let (lazy, why) = auto_cutover(&small, budget);
        assert!(!lazy, "{why}");
        assert!(why.contains("full cut-over"), "{why}");
        // A big one: 400 ms dumps -> never fits 100 ms.
        let big = [round(400, 1000, 100_000_000), round(400, 500, 50_000_000)];
        let (lazy, why) = auto_cutover(&big, budget);
        assert!(lazy, "{why}");
        assert!(why.contains("dirty rate") && why.contains("link"), "{why}");
        // Dirtying as fast as the link carries: named as not converging.
        let hot = [round(50, 1000, 100_000_000), round(50, 1000, 100_000_000)];
        let (lazy, why) = auto_cutover(&hot, budget);
        assert!(lazy && why.contains("cannot converge"), "{why}");
        assert!(auto_cutover(&[], budget).0);
    }

    #[test]
    fn auto_stops_rounds_once_a_full_cutover_cannot_fit() {
        let mut p = RoundPolicy::from_request(MigrationMode::Auto, &req(4, 100));
        let ms = std::time::Duration::from_millis;
        assert!(!p.full_cutover_hopeless(ms(400)), "only auto stops early");
        p.lazy_fallback = true;
        assert!(p.full_cutover_hopeless(ms(60)));
        assert!(!p.full_cutover_hopeless(ms(40)));
    }

    #[test]
    fn rounds_stop_for_the_documented_reasons() {
        let p = RoundPolicy::from_request(MigrationMode::Precopy, &req(4, 100));
        // 10 MB at 100 MB/s = 100 ms: fits.
        assert_eq!(
            p.stop_after(1, 10_000_000, 100e6, None),
            Some("delta fits the downtime budget")
        );
        // 100 MB at 100 MB/s = 1 s, first round: go on.
        assert_eq!(p.stop_after(1, 100_000_000, 100e6, None), None);
        // Shrinking well: go on; not shrinking: stop.
        assert_eq!(p.stop_after(2, 50_000_000, 100e6, Some(100_000_000)), None);
        assert_eq!(
            p.stop_after(2, 95_000_000, 100e6, Some(100_000_000)),
            Some("delta stopped shrinking")
        );
        assert_eq!(
            p.stop_after(4, 50_000_000, 100e6, Some(100_000_000)),
            Some("round limit")
        );
    }
}
