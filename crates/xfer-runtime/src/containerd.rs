//! Container operations through containerd's API: create and start a container from an
//! imported image, pause/resume, checkpoint with the runc shim's options, read the
//! container's writable layer, and restore a container from a CRIU image directory.
//!
//! [`Runtime`] is the small trait the migration logic is written against, so that logic
//! can be unit-tested with a fake; [`Containerd`] is the real implementation, exercised
//! by the root integration tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::container::Runtime as ContainerRuntimeSpec;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CheckpointTaskRequest, Container, CreateContainerRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetContainerRequest, GetRequest, KillRequest,
    ListContainersRequest, PauseTaskRequest, ResumeTaskRequest, StartRequest, WaitRequest,
};
use containerd_client::types::{Descriptor, Mount};
use containerd_client::{to_any, Client};
use prost_types::Any;
use serde_json::{json, Value};
use tonic::{Code, Request, Status};
use xfer_proto::runc;

use crate::error::RuntimeError;

/// Type URL containerd uses for an OCI runtime spec carried in an `Any`.
pub const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The runc shim (containerd's default runtime).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Label on containers created by xfer.
pub const MANAGED_LABEL: &str = "io.xfer.managed";

fn status(op: impl Into<String>) -> impl FnOnce(Status) -> RuntimeError {
    let op = op.into();
    move |source| RuntimeError::Containerd { op, source }
}

fn with_ns<T>(msg: T, ns: &str) -> Result<Request<T>, RuntimeError> {
    let mut req = Request::new(msg);
    let value = ns.parse().map_err(|_| {
        RuntimeError::Invalid(format!(
            "containerd namespace {ns:?} is not a valid header value"
        ))
    })?;
    req.metadata_mut().insert("containerd-namespace", value);
    Ok(req)
}

/// A host's view of its containerd: which namespace, snapshotter and network
/// namespace its containers use, and where container logs go.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// containerd socket.
    pub socket: PathBuf,
    /// containerd namespace of this host's containers. Must differ between hosts
    /// sharing one machine: runc keeps state in `/run/containerd/runc/<namespace>`.
    pub namespace: String,
    /// Snapshotter (overlayfs).
    pub snapshotter: String,
    /// Network namespace the host's containers join (`/run/netns/NAME`), if any.
    /// CRIU treats a joined namespace as external, which is what lets a container
    /// restore into the destination host's namespace.
    pub netns: Option<PathBuf>,
    /// Directory for container stdout/stderr logs.
    pub log_dir: PathBuf,
    /// CRIU configuration file that runc passes to CRIU for this host's containers
    /// (spec annotation `org.criu.config`). containerd 1.6's runc shim restores without
    /// `--tcp-established`; the file carries it (see [`write_criu_config_with`]).
    pub criu_config: Option<PathBuf>,
}

impl HostConfig {
    /// Where containerd's runc shim keeps this host's runc state.
    pub fn runc_root(&self) -> PathBuf {
        Path::new("/run/containerd/runc").join(&self.namespace)
    }
}

/// The spec annotation through which runc hands CRIU a configuration file.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// What xfer's CRIU configuration file says, for dump and restore alike: keep
/// established TCP connections (the dump options alone do not reach a restore run by
/// containerd 1.6's shim), and skip connections still in the handshake (SYN received,
/// not yet accepted): without it a service that clients keep connecting to cannot be
/// dumped at all ("In-flight connection"); with it those clients retransmit their SYN
/// and reach the restored listener.
pub const CRIU_CONFIG: &str = "tcp-established\nskip-in-flight\n";

/// Where CRIU has it (`criu check --network-lock nftables`), it locks the network with
/// nftables in its own process instead of running iptables: dump and restore are each
/// ~150 ms shorter here. [`crate::criu::CriuFacts::config_extras`] adds it.
pub const NFTABLES_LOCK: &str = "network-lock nftables";

/// Writes [`CRIU_CONFIG`] plus `extra` options (one per line, e.g. `lazy-pages` for a
/// post-copy restore) to `path`.
pub fn write_criu_config_with(path: &Path, extra: &[&str]) -> Result<(), RuntimeError> {
    let mut text = CRIU_CONFIG.to_string();
    for o in extra {
        text.push_str(o);
        text.push('\n');
    }
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|source| RuntimeError::Io {
            op: "create directory",
            path: d.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| RuntimeError::Io {
        op: "write CRIU configuration",
        path: path.to_path_buf(),
        source,
    })
}

/// What a container is, as needed to move it.
#[derive(Debug, Clone)]
pub struct ContainerRecord {
    pub id: String,
    pub image: String,
    pub snapshotter: String,
    pub snapshot_key: String,
    pub labels: HashMap<String, String>,
    /// The OCI runtime spec, JSON.
    pub spec_json: Vec<u8>,
}

/// A task's state, as containerd reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
    Unknown,
}

impl TaskState {
    fn from_i32(v: i32) -> Self {
        match v {
            1 => TaskState::Created,
            2 => TaskState::Running,
            3 => TaskState::Stopped,
            4 => TaskState::Paused,
            5 => TaskState::Pausing,
            _ => TaskState::Unknown,
        }
    }

    /// Lower-case name, as shown to operators.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Stopped => "stopped",
            TaskState::Paused => "paused",
            TaskState::Pausing => "pausing",
            TaskState::Unknown => "unknown",
        }
    }
}

/// A container with its task state.
#[derive(Debug, Clone)]
pub struct ContainerStatus {
    pub id: String,
    pub image: String,
    pub state: Option<TaskState>,
    pub pid: u32,
}

/// What the migration logic needs from a container runtime.
#[allow(async_fn_in_trait)]
pub trait Runtime {
    /// The container's record (spec, image, snapshot).
    async fn container(&self, id: &str) -> Result<ContainerRecord, RuntimeError>;
    /// The task's state and pid.
    async fn task_state(&self, id: &str) -> Result<(TaskState, u32), RuntimeError>;
    /// Freeze the task (cgroup freezer).
    async fn pause(&self, id: &str) -> Result<(), RuntimeError>;
    /// Thaw the task.
    async fn resume(&self, id: &str) -> Result<(), RuntimeError>;
    /// Dump the task's process tree into `image_dir` with CRIU, leaving it in place
    /// (still frozen if it was paused).
    async fn checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
    ) -> Result<(), RuntimeError>;
    /// The directory holding the container's writable layer (overlay upperdir).
    async fn upper_dir(&self, record: &ContainerRecord) -> Result<PathBuf, RuntimeError>;
    /// Kill and delete the task, the container and its snapshot.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// A lazy dump in progress (post-copy).
    type Lazy: LazyTransfer;
    /// Dumps everything but the task's private memory into `image_dir` and serves that
    /// memory on `listen` (CRIU page server) until a destination took it all; returns
    /// once CRIU is ready. The task stays in place (still frozen if it was paused).
    async fn lazy_checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
        listen: std::net::SocketAddr,
    ) -> Result<Self::Lazy, RuntimeError>;
}

/// The source's side of a post-copy transfer, once its dump is ready.
#[allow(async_fn_in_trait)]
pub trait LazyTransfer {
    /// Waits until the destination has taken every page.
    async fn finish(self) -> Result<(), RuntimeError>;
    /// Stops serving pages; the task carries on where it was, memory intact.
    async fn abort(self);
}

impl LazyTransfer for crate::lazy::LazyDump {
    async fn finish(self) -> Result<(), RuntimeError> {
        crate::lazy::LazyDump::finish(self).await
    }
    async fn abort(self) {
        crate::lazy::LazyDump::abort(self).await
    }
}

/// containerd, through containerd-client.
#[derive(Debug, Clone)]
pub struct Containerd {
    client_channel: tonic::transport::Channel,
    cfg: HostConfig,
}

impl Containerd {
    /// Connects to the host's containerd.
    pub async fn connect(cfg: HostConfig) -> Result<Self, RuntimeError> {
        let channel = containerd_client::connect(&cfg.socket)
            .await
            .map_err(|source| RuntimeError::Connect {
                path: cfg.socket.clone(),
                source,
            })?;
        Ok(Self {
            client_channel: channel,
            cfg,
        })
    }

    /// The host configuration.
    pub fn config(&self) -> &HostConfig {
        &self.cfg
    }

    /// A containerd-client [`Client`] on the shared channel.
    pub fn client(&self) -> Client {
        Client::from(self.client_channel.clone())
    }

    fn req<T>(&self, msg: T) -> Result<Request<T>, RuntimeError> {
        with_ns(msg, &self.cfg.namespace)
    }

    fn log_uri(&self, id: &str) -> String {
        format!("file://{}", self.log_path(id).display())
    }

    /// Where the container's stdout and stderr go.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.cfg.log_dir.join(format!("{id}.log"))
    }

    /// Lists the containers of this host's namespace with their task state.
    pub async fn list(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        let resp = self
            .client()
            .containers()
            .list(self.req(ListContainersRequest::default())?)
            .await
            .map_err(status("list containers"))?
            .into_inner();
        let mut out = Vec::new();
        for c in resp.containers {
            let (state, pid) = match self.task_state(&c.id).await {
                Ok((s, p)) => (Some(s), p),
                Err(_) => (None, 0),
            };
            out.push(ContainerStatus {
                id: c.id,
                image: c.image,
                state,
                pid,
            });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Creates a container from an imported image (top layer chain id `parent`) and
    /// starts its task. Returns the task's pid.
    /// `netns`: the network namespace to join (default: the host's); `labels` are added
    /// to the container record and travel with it when it migrates; `mounts` are OCI
    /// mounts added to the spec (volumes, bind mounts).
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        &self,
        id: &str,
        image: &str,
        parent_chain_id: &str,
        args: &[String],
        env: &[String],
        netns: Option<&Path>,
        labels: HashMap<String, String>,
        mounts: &[Value],
    ) -> Result<u32, RuntimeError> {
        validate_id(id)?;
        if args.is_empty() {
            return Err(RuntimeError::Invalid(
                "no command given: pass the program to run and its arguments".into(),
            ));
        }
        let mut spec = default_spec(
            id,
            args,
            env,
            &self.cfg.namespace,
            netns.or(self.cfg.netns.as_deref()),
        );
        if let Some(c) = &self.cfg.criu_config {
            spec["annotations"] = json!({ CRIU_CONFIG_ANNOTATION: c.display().to_string() });
        }
        if let Some(m) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            m.extend(mounts.iter().cloned());
        }
        let spec_json = serde_json::to_vec(&spec)
            .map_err(|e| RuntimeError::Invalid(format!("encode spec: {e}")))?;
        let record = ContainerRecord {
            id: id.to_string(),
            image: image.to_string(),
            snapshotter: self.cfg.snapshotter.clone(),
            snapshot_key: id.to_string(),
            labels: {
                let mut l = labels;
                l.insert(MANAGED_LABEL.to_string(), "true".to_string());
                l
            },
            spec_json,
        };
        // The record first: it references the snapshot, which keeps the snapshot from
        // containerd's garbage collector from the moment it exists.
        self.create_container(&record).await?;
        let mounts = match self.prepare_snapshot(id, parent_chain_id, None).await {
            Ok(m) => m,
            Err(e) => {
                let _ = self.remove(id).await;
                return Err(e);
            }
        };
        match self.create_and_start_task(id, mounts, None).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let _ = self.remove(id).await;
                Err(e)
            }
        }
    }

    /// Prepares the container's active snapshot on top of `parent`; returns its mounts.
    /// Until a container record references it, an active snapshot is only safe from
    /// containerd's garbage collector under a `lease`.
    pub async fn prepare_snapshot(
        &self,
        key: &str,
        parent: &str,
        lease: Option<&str>,
    ) -> Result<Vec<Mount>, RuntimeError> {
        let mut req = self.req(PrepareSnapshotRequest {
            snapshotter: self.cfg.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            labels: HashMap::new(),
        })?;
        if let Some(l) = lease {
            let v = l.parse().map_err(|_| {
                RuntimeError::Invalid(format!("lease id {l:?} is not a valid header value"))
            })?;
            req.metadata_mut().insert("containerd-lease", v);
        }
        let resp = self
            .client()
            .snapshots()
            .prepare(req)
            .await
            .map_err(status(format!("prepare snapshot {key} on {parent}")))?;
        Ok(resp.into_inner().mounts)
    }

    async fn snapshot_mounts(&self, key: &str) -> Result<Vec<Mount>, RuntimeError> {
        let resp = self
            .client()
            .snapshots()
            .mounts(self.req(MountsRequest {
                snapshotter: self.cfg.snapshotter.clone(),
                key: key.to_string(),
            })?)
            .await
            .map_err(status(format!("mounts of snapshot {key}")))?;
        Ok(resp.into_inner().mounts)
    }

    /// Removes a snapshot; a missing one is not an error.
    pub async fn remove_snapshot(&self, key: &str) -> Result<(), RuntimeError> {
        match self
            .client()
            .snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.cfg.snapshotter.clone(),
                key: key.to_string(),
            })?)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(status(format!("remove snapshot {key}"))(s)),
        }
    }

    /// Creates the container record (spec, image, snapshot, runtime).
    pub async fn create_container(&self, record: &ContainerRecord) -> Result<(), RuntimeError> {
        let container = Container {
            id: record.id.clone(),
            labels: record.labels.clone(),
            image: record.image.clone(),
            runtime: Some(ContainerRuntimeSpec {
                name: RUNC_RUNTIME.to_string(),
                options: None,
            }),
            spec: Some(Any {
                type_url: SPEC_TYPE_URL.to_string(),
                value: record.spec_json.clone(),
            }),
            snapshotter: record.snapshotter.clone(),
            snapshot_key: record.snapshot_key.clone(),
            ..Default::default()
        };
        self.client()
            .containers()
            .create(self.req(CreateContainerRequest {
                container: Some(container),
            })?)
            .await
            .map_err(status(format!("create container {}", record.id)))?;
        Ok(())
    }

    /// Creates the task (restoring it from `criu_image_dir` if given) and starts it.
    pub async fn create_and_start_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        restore_from: Option<(&Path, &Path)>,
    ) -> Result<u32, RuntimeError> {
        std::fs::create_dir_all(&self.cfg.log_dir).map_err(|source| RuntimeError::Io {
            op: "create log directory",
            path: self.cfg.log_dir.clone(),
            source,
        })?;
        let options = restore_from.map(|(image, work)| {
            to_any(&runc::Options {
                criu_image_path: image.display().to_string(),
                criu_work_path: work.display().to_string(),
                ..Default::default()
            })
        });
        let log = self.log_uri(id);
        let what = if restore_from.is_some() {
            "restore"
        } else {
            "create"
        };
        self.client()
            .tasks()
            .create(self.req(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdout: log.clone(),
                stderr: log,
                options,
                ..Default::default()
            })?)
            .await
            .map_err(status(format!("{what} task {id}")))?;
        let started = self
            .client()
            .tasks()
            .start(self.req(StartRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })?)
            .await;
        match started {
            Ok(resp) => Ok(resp.into_inner().pid),
            Err(s) => {
                let _ = self.delete_task(id).await;
                Err(status(format!("{what}: start task {id}"))(s))
            }
        }
    }

    /// Applies an OCI layer tar already in the content store to the snapshot `key`.
    pub async fn apply_layer(&self, key: &str, layer: Descriptor) -> Result<(), RuntimeError> {
        let mounts = self.snapshot_mounts(key).await?;
        self.client()
            .diff()
            .apply(self.req(ApplyRequest {
                diff: Some(layer),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            })?)
            .await
            .map_err(status(format!("apply writable-layer diff to {key}")))?;
        Ok(())
    }

    /// Mounts of the container's active snapshot (for Tasks.Create).
    pub async fn rootfs_mounts(&self, key: &str) -> Result<Vec<Mount>, RuntimeError> {
        self.snapshot_mounts(key).await
    }

    async fn delete_task(&self, id: &str) -> Result<(), RuntimeError> {
        match self
            .client()
            .tasks()
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_string(),
            })?)
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(status(format!("delete task {id}"))(s)),
        }
    }

    async fn kill_and_wait(&self, id: &str) -> Result<(), RuntimeError> {
        let state = match self.task_state(id).await {
            Ok((s, _)) => s,
            Err(RuntimeError::Containerd { source, .. }) if source.code() == Code::NotFound => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if state == TaskState::Stopped {
            return Ok(());
        }
        let mut tasks = self.client().tasks();
        // Start waiting before the kill, so the exit is not missed.
        let wait = tasks.wait(self.req(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        })?);
        let mut killer = self.client().tasks();
        let kill = killer.kill(self.req(KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: libc::SIGKILL as u32,
            all: true,
        })?);
        // A paused task cannot exit: thaw it (after the kill, so it never runs on) so
        // the SIGKILL lands, while the wait is already under way.
        let paused = state == TaskState::Paused || state == TaskState::Pausing;
        let kill_then_thaw = async {
            let k = kill.await;
            if paused {
                let _ = self.resume(id).await;
            }
            k
        };
        let (w, k) = futures::join!(
            tokio::time::timeout(Duration::from_secs(10), wait),
            kill_then_thaw
        );
        if let Err(s) = k {
            if s.code() != Code::NotFound {
                return Err(status(format!("kill task {id}"))(s));
            }
        }
        match w {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) if s.code() == Code::NotFound => Ok(()),
            Ok(Err(s)) => Err(status(format!("wait for task {id}"))(s)),
            Err(_) => Err(RuntimeError::Invalid(format!(
                "task {id} did not exit within 10 s of SIGKILL"
            ))),
        }
    }
}

impl Runtime for Containerd {
    async fn container(&self, id: &str) -> Result<ContainerRecord, RuntimeError> {
        let resp = self
            .client()
            .containers()
            .get(self.req(GetContainerRequest { id: id.to_string() })?)
            .await
            .map_err(|s| {
                if s.code() == Code::NotFound {
                    RuntimeError::Invalid(format!(
                        "no container {id:?} in containerd namespace {}: check the name with `xfer ps`",
                        self.cfg.namespace
                    ))
                } else {
                    status(format!("get container {id}"))(s)
                }
            })?;
        let c = resp.into_inner().container.ok_or_else(|| {
            RuntimeError::Invalid(format!("containerd returned no record for {id}"))
        })?;
        let spec = c
            .spec
            .ok_or_else(|| RuntimeError::Invalid(format!("container {id} has no spec")))?;
        Ok(ContainerRecord {
            id: c.id,
            image: c.image,
            snapshotter: c.snapshotter,
            snapshot_key: c.snapshot_key,
            labels: c.labels,
            spec_json: spec.value,
        })
    }

    async fn task_state(&self, id: &str) -> Result<(TaskState, u32), RuntimeError> {
        let resp = self
            .client()
            .tasks()
            .get(self.req(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            })?)
            .await
            .map_err(status(format!("get task {id}")))?;
        let p = resp
            .into_inner()
            .process
            .ok_or_else(|| RuntimeError::Invalid(format!("task {id} has no process")))?;
        Ok((TaskState::from_i32(p.status), p.pid))
    }

    async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.client()
            .tasks()
            .pause(self.req(PauseTaskRequest {
                container_id: id.to_string(),
            })?)
            .await
            .map_err(status(format!("pause task {id}")))?;
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.client()
            .tasks()
            .resume(self.req(ResumeTaskRequest {
                container_id: id.to_string(),
            })?)
            .await
            .map_err(status(format!("resume task {id}")))?;
        Ok(())
    }

    async fn checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
    ) -> Result<(), RuntimeError> {
        create_checkpoint_dirs(image_dir, work_dir)?;
        let opts = runc::CheckpointOptions {
            exit: false,
            open_tcp: true,
            file_locks: true,
            image_path: image_dir.display().to_string(),
            work_path: work_dir.display().to_string(),
            ..Default::default()
        };
        self.client()
            .tasks()
            .checkpoint(self.req(CheckpointTaskRequest {
                container_id: id.to_string(),
                parent_checkpoint: String::new(),
                options: Some(to_any(&opts)),
            })?)
            .await
            .map_err(|s| {
                let hint = criu_log_tail(work_dir);
                RuntimeError::Checkpoint {
                    id: id.to_string(),
                    criu_log: hint,
                    source: s,
                }
            })?;
        Ok(())
    }

    async fn upper_dir(&self, record: &ContainerRecord) -> Result<PathBuf, RuntimeError> {
        let mounts = self.snapshot_mounts(&record.snapshot_key).await?;
        upper_dir_of(&mounts).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "snapshot {} of {} is not an overlay with an upperdir (mounts: {mounts:?})",
                record.snapshot_key, record.id
            ))
        })
    }

    type Lazy = crate::lazy::LazyDump;

    async fn lazy_checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
        listen: std::net::SocketAddr,
    ) -> Result<Self::Lazy, RuntimeError> {
        crate::lazy::LazyDump::start(&self.cfg.runc_root(), id, image_dir, work_dir, listen).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let t = std::time::Instant::now();
        self.kill_and_wait(id).await?;
        let killed = t.elapsed();
        self.delete_task(id).await?;
        let deleted = t.elapsed();
        let key = match self.container(id).await {
            Ok(r) => Some(r.snapshot_key),
            Err(_) => None,
        };
        tracing::debug!(
            container = id,
            kill_ms = killed.as_secs_f64() * 1000.0,
            delete_task_ms = (deleted - killed).as_secs_f64() * 1000.0,
            "removing: task gone"
        );
        match self
            .client()
            .containers()
            .delete(self.req(DeleteContainerRequest { id: id.to_string() })?)
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(status(format!("delete container {id}"))(s)),
        }
        let dropped = t.elapsed();
        let r = self.remove_snapshot(key.as_deref().unwrap_or(id)).await;
        tracing::debug!(
            container = id,
            delete_container_ms = (dropped - deleted).as_secs_f64() * 1000.0,
            remove_snapshot_ms = (t.elapsed() - dropped).as_secs_f64() * 1000.0,
            "removed"
        );
        r
    }
}

/// Creates a checkpoint's image and work directories.
pub(crate) fn create_checkpoint_dirs(
    image_dir: &Path,
    work_dir: &Path,
) -> Result<(), RuntimeError> {
    for d in [image_dir, work_dir] {
        std::fs::create_dir_all(d).map_err(|source| RuntimeError::Io {
            op: "create checkpoint directory",
            path: d.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

/// The last lines of CRIU's dump log in `work_dir`, to explain a failed checkpoint.
pub fn criu_log_tail(work_dir: &Path) -> String {
    for name in ["dump.log", "restore.log"] {
        if let Ok(text) = std::fs::read_to_string(work_dir.join(name)) {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("Error") || l.contains("err"))
                .collect();
            let pick = if lines.is_empty() {
                text.lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect()
            } else {
                lines
                    .into_iter()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
            };
            return format!("{}: {}", work_dir.join(name).display(), pick.join(" | "));
        }
    }
    format!("no CRIU log in {}", work_dir.display())
}

/// The upperdir of an overlay mount list, or the source of a single bind mount
/// (a snapshot without parents).
pub fn upper_dir_of(mounts: &[Mount]) -> Option<PathBuf> {
    let m = mounts.first()?;
    if m.r#type == "overlay" {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
    } else if m.r#type == "bind" {
        Some(PathBuf::from(&m.source))
    } else {
        None
    }
}

/// Checks a container id: what containerd and runc accept, and short enough for paths.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!(
            "container id {id:?} is not valid: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn cgroups_path(namespace: &str, id: &str) -> String {
    format!("/{namespace}/{id}")
}

/// An OCI runtime spec like containerd's default: own pid/ipc/uts/mount namespaces,
/// the host's network namespace joined by path (so CRIU treats it as external), the
/// default capabilities and device rules.
pub fn default_spec(
    id: &str,
    args: &[String],
    env: &[String],
    namespace: &str,
    netns: Option<&Path>,
) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ]);
    let mut envs: Vec<String> =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    envs.extend(env.iter().cloned());
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match netns {
        Some(p) => namespaces.push(json!({"type": "network", "path": p.display().to_string()})),
        None => namespaces.push(json!({"type": "network"})),
    }
    json!({
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": envs,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "cgroupsPath": cgroups_path(namespace, id),
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// Rewrites a migrated container's spec for the destination host: its network
/// namespace path and its cgroup path. Everything else stays as on the source.
pub fn rewrite_spec_for_host(
    spec_json: &[u8],
    id: &str,
    namespace: &str,
    netns: Option<&Path>,
    criu_config: Option<&Path>,
) -> Result<Vec<u8>, RuntimeError> {
    let mut spec: Value = serde_json::from_slice(spec_json).map_err(|e| {
        RuntimeError::Invalid(format!("the container's spec is not valid JSON: {e}"))
    })?;
    if let (Some(c), Some(obj)) = (criu_config, spec.as_object_mut()) {
        let ann = obj.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = ann.as_object_mut() {
            a.insert(
                CRIU_CONFIG_ANNOTATION.into(),
                Value::String(c.display().to_string()),
            );
        }
    }
    let linux = spec
        .get_mut("linux")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| RuntimeError::Invalid("the container's spec has no linux section".into()))?;
    linux.insert(
        "cgroupsPath".into(),
        Value::String(cgroups_path(namespace, id)),
    );
    if let Some(nss) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
        for ns in nss.iter_mut() {
            if ns.get("type").and_then(Value::as_str) == Some("network") {
                if let Some(obj) = ns.as_object_mut() {
                    match netns {
                        Some(p) => {
                            obj.insert("path".into(), Value::String(p.display().to_string()));
                        }
                        None => {
                            obj.remove("path");
                        }
                    }
                }
            }
        }
    }
    serde_json::to_vec(&spec).map_err(|e| RuntimeError::Invalid(format!("encode spec: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("redis-1").is_ok());
        assert!(validate_id("a.b_c").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("-x").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"x".repeat(65)).is_err());
    }

    #[test]
    fn upperdir_is_found_in_overlay_options() {
        let m = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "index=off".into(),
                "workdir=/s/2/work".into(),
                "upperdir=/s/2/fs".into(),
                "lowerdir=/s/1/fs".into(),
            ],
        };
        assert_eq!(upper_dir_of(&[m]), Some(PathBuf::from("/s/2/fs")));
        assert_eq!(upper_dir_of(&[]), None);
    }

    #[test]
    fn spec_is_rewritten_for_the_destination() {
        let spec = default_spec(
            "c1",
            &["sh".into()],
            &[],
            "ns-a",
            Some(Path::new("/run/netns/a")),
        );
        let bytes = serde_json::to_vec(&spec).expect("encode");
        let out = rewrite_spec_for_host(
            &bytes,
            "c1",
            "ns-b",
            Some(Path::new("/run/netns/b")),
            Some(Path::new("/b/criu.conf")),
        )
        .expect("rewrite");
        let v: Value = serde_json::from_slice(&out).expect("decode");
        assert_eq!(v["linux"]["cgroupsPath"], "/ns-b/c1");
        let net = v["linux"]["namespaces"]
            .as_array()
            .expect("namespaces")
            .iter()
            .find(|n| n["type"] == "network")
            .expect("network ns")
            .clone();
        assert_eq!(net["path"], "/run/netns/b");
        // the rest is untouched
        assert_eq!(v["process"]["args"][0], "sh");
        assert_eq!(v["annotations"][CRIU_CONFIG_ANNOTATION], "/b/criu.conf");
        assert!(rewrite_spec_for_host(b"not json", "c1", "n", None, None).is_err());
    }
}
