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
use xfer_runtime::containerd::{Runtime, TaskState};

use crate::error::AgentError;
use crate::images;
use crate::node::{phase, Node};
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

/// Opens a channel to a peer agent and checks its protocol version.
pub async fn connect_peer(
    endpoint: &str,
) -> Result<(AgentClient<Channel>, HelloReply), AgentError> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|source| AgentError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .map_err(|source| AgentError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
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
    let rt = &node.rt;
    let rt_err = |step: Step| move |source| AgentError::Runtime { step, source };

    // Validate: refuse bad input before anything is frozen.
    let t = Instant::now();
    let record = rt.container(id).await.map_err(rt_err(Step::Validate))?;
    let (state, _) = rt.task_state(id).await.map_err(rt_err(Step::Validate))?;
    if state != TaskState::Running {
        return Err(AgentError::Refused(format!(
            "container {id} is {}, not running: only a running task can be migrated",
            state.as_str()
        )));
    }
    if !node.criu.usable() {
        return Err(AgentError::Refused(format!(
            "this node's criu {} cannot checkpoint (need >= 4.2 and a passing `criu check`)",
            node.criu.version
        )));
    }
    let (mut peer, hello) = connect_peer(&req.destination).await?;
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
        mode: MigrationMode::Cold as i32,
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
    let result = run_after_prepare(
        node,
        mid,
        req,
        &record,
        &image,
        &missing,
        &mut peer,
        &tx,
        &mut phases,
        &out_dir,
    )
    .await;
    let _ = std::fs::remove_dir_all(&out_dir);
    let (downtime_us, bytes_sent, pid) = match result {
        Ok(v) => v,
        Err((step, e)) => {
            warn!(?step, error = %e, "aborting migration");
            let _ = peer
                .abort(AbortRequest {
                    migration_id: mid.to_string(),
                    step: step as i32,
                    reason: e.to_string(),
                })
                .await;
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
        downtime_micros: downtime_us,
        bytes_sent,
        restored_pid: pid,
        image_blobs_sent: missing.len() as u32,
        image_blobs_skipped: (total - missing.len()) as u32,
    })
}

fn all_blobs(image: &images::ImageBlobs) -> usize {
    image.blobs.len() + 1
}

#[allow(clippy::too_many_arguments)]
async fn run_after_prepare(
    node: &Node,
    mid: &str,
    req: &MigrateRequest,
    record: &xfer_runtime::containerd::ContainerRecord,
    _image: &images::ImageBlobs,
    missing: &[String],
    peer: &mut AgentClient<Channel>,
    tx: &Events,
    phases: &mut Vec<PhaseTiming>,
    out_dir: &std::path::Path,
) -> Result<(u64, u64, u32), (Step, AgentError)> {
    let rt = &node.rt;
    let id = record.id.as_str();
    let mut bytes_sent = 0u64;

    // Image blobs the destination lacks, while the container still runs.
    let t = Instant::now();
    if !missing.is_empty() {
        let blob_dir = out_dir.join("blobs");
        std::fs::create_dir_all(&blob_dir).map_err(|source| {
            (
                Step::Image,
                AgentError::WriteFile {
                    path: blob_dir.clone(),
                    source,
                },
            )
        })?;
        let mut files = Vec::new();
        for d in missing {
            let path = blob_dir.join(d.replace(':', "_"));
            images::read_blob_to_file(rt, d, &path)
                .await
                .map_err(|source| {
                    (
                        Step::Image,
                        AgentError::Runtime {
                            step: Step::Image,
                            source,
                        },
                    )
                })?;
            files.push(OutFile {
                kind: FileKind::ImageBlob,
                name: d.clone(),
                path,
            });
        }
        let sent = send_files(peer, mid, files)
            .await
            .map_err(|e| (Step::Image, e))?;
        bytes_sent += sent.wire_bytes;
        emit(tx, &phase("image", t, sent.wire_bytes), phases).await;
    } else {
        emit(tx, &phase("image", t, 0), phases).await;
    }

    // Freeze: downtime starts.
    let frozen_at = Instant::now();
    rt.pause(id).await.map_err(|source| {
        (
            Step::Freeze,
            AgentError::Runtime {
                step: Step::Freeze,
                source,
            },
        )
    })?;
    emit(tx, &phase("freeze", frozen_at, 0), phases).await;

    let after_freeze = async {
        let t = Instant::now();
        let criu_dir = out_dir.join("criu");
        let work_dir = out_dir.join("work");
        rt.checkpoint(id, &criu_dir, &work_dir)
            .await
            .map_err(|source| {
                (
                    Step::Checkpoint,
                    AgentError::Runtime {
                        step: Step::Checkpoint,
                        source,
                    },
                )
            })?;
        // Invariant: the task stays frozen from the freeze to the end; if the dump had
        // thawed it, the source would diverge from the copy being moved.
        let (st, _) = rt.task_state(id).await.map_err(|source| {
            (
                Step::Checkpoint,
                AgentError::Runtime {
                    step: Step::Checkpoint,
                    source,
                },
            )
        })?;
        if st != TaskState::Paused {
            return Err((
                Step::Checkpoint,
                AgentError::Refused(format!(
                    "the task is {} after the dump, not paused",
                    st.as_str()
                )),
            ));
        }
        let criu_bytes = dir_size(&criu_dir);
        emit(tx, &phase("checkpoint", t, criu_bytes), phases).await;

        let t = Instant::now();
        let upper = rt.upper_dir(record).await.map_err(|source| {
            (
                Step::RootfsDiff,
                AgentError::Runtime {
                    step: Step::RootfsDiff,
                    source,
                },
            )
        })?;
        let diff_path = out_dir.join("rootfs.tar");
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
                .map_err(|source| {
                    (
                        Step::RootfsDiff,
                        AgentError::Runtime {
                            step: Step::RootfsDiff,
                            source,
                        },
                    )
                })?
        };
        info!(
            changed = summary.changed.len(),
            deleted = summary.deleted.len(),
            "writable-layer diff captured"
        );
        emit(tx, &phase("rootfs_diff", t, summary.tar_bytes), phases).await;

        let t = Instant::now();
        let mut files = criu_files(&criu_dir).map_err(|e| (Step::Transfer, e))?;
        files.push(OutFile {
            kind: FileKind::RootfsDiff,
            name: "rootfs.tar".into(),
            path: diff_path,
        });
        let sent = send_files(peer, mid, files)
            .await
            .map_err(|e| (Step::Transfer, e))?;
        emit(tx, &phase("transfer", t, sent.wire_bytes), phases).await;

        let t = Instant::now();
        let reply = peer
            .restore(RestoreRequest {
                migration_id: mid.to_string(),
                container_id: id.to_string(),
                spec_json: record.spec_json.clone(),
                image_name: record.image.clone(),
                snapshotter: record.snapshotter.clone(),
                labels: record.labels.clone(),
                has_rootfs_diff: true,
            })
            .await
            .map_err(|status| {
                (
                    Step::Restore,
                    AgentError::Peer {
                        step: Step::Restore,
                        status,
                    },
                )
            })?
            .into_inner();
        emit(tx, &phase("restore", t, 0), phases).await;
        for p in &reply.phases {
            emit(tx, p, phases).await;
        }
        Ok::<_, (Step, AgentError)>((sent.wire_bytes, reply.pid))
    }
    .await;

    match after_freeze {
        Ok((wire, pid)) => {
            let downtime = frozen_at.elapsed().as_micros() as u64;
            bytes_sent += wire;
            // The destination runs the container: only now does the source let go.
            let t = Instant::now();
            if let Err(e) = rt.remove(id).await {
                // The migration succeeded; a leftover source copy is reported, not fatal.
                warn!(error = %e, "could not remove the source copy");
            }
            emit(tx, &phase("cleanup_source", t, 0), phases).await;
            let _ = req;
            Ok((downtime, bytes_sent, pid))
        }
        Err((step, e)) => {
            if let Err(re) = rt.resume(id).await {
                warn!(error = %re, "could not resume the source task after a failed migration");
            } else {
                info!("source task resumed after failed {step:?} step");
            }
            Err((step, e))
        }
    }
}

fn criu_files(dir: &std::path::Path) -> Result<Vec<OutFile>, AgentError> {
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
