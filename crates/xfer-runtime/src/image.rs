//! OCI images without a registry.
//!
//! # Building
//!
//! [`ImageBuilder`] assembles one layer in memory from
//!
//! * busybox ([`ImageBuilder::busybox`]): `/bin/busybox` plus a symlink per applet,
//! * real host binaries with their shared libraries ([`ImageBuilder::host_binaries`]):
//!   the libraries come from `ldd` (which, like any `ldd`, may run the binary's loader;
//!   use it on trusted binaries only), the dynamic loader is included, and symlinks on the
//!   way to each file are recreated as symlinks (e.g. `/lib -> usr/lib`,
//!   `/usr/bin/redis-server -> redis-check-rdb`) with the real file stored once,
//!
//! plus the minimal `/etc/passwd`, `/etc/group`, `/etc/hosts` and a `/tmp` with mode 1777.
//!
//! Layers are **uncompressed** tars (`application/vnd.oci.image.layer.v1.tar`) by
//! default, so a layer's digest is its diffID; gzip is available through
//! [`LayerCompression::Gzip`]. Output is deterministic: entries sorted by path, mtime 0,
//! uid/gid 0, no user/group names, a config without timestamps; the same inputs give the
//! same layer, config and manifest digests. [`ImageBuilder::build_on`] stacks a new layer
//! on an existing image (e.g. redis on busybox) so layers can be shared.
//!
//! # Importing
//!
//! [`BuiltImage::write_layout`] writes an OCI image layout directory. [`import`] puts the
//! image straight into containerd through its API (Content, Images, Snapshots, Diff and
//! Leases services), the way `ctr images import` + unpack does, inside a lease so the
//! garbage collector cannot take anything half-way:
//!
//! 1. every blob is written through `Content.Write` (stat/write/commit with expected
//!    digest and size), unless `Content.Info` already knows it; labels are set as
//!    containerd's own client does: `containerd.io/gc.ref.content.config` and
//!    `containerd.io/gc.ref.content.l.<i>` on the manifest, `containerd.io/uncompressed`
//!    (the diffID) on each layer;
//! 2. each layer is unpacked into the snapshotter unless the snapshot named by its chainID
//!    exists: `Snapshots.Prepare` (parent = the previous chainID), `Diff.Apply`,
//!    `Snapshots.Commit(name = chainID)`; then the config blob gets
//!    `containerd.io/gc.ref.snapshot.<snapshotter>` = the top chainID;
//! 3. the image record is created (or updated) with the manifest as its target.
//!
//! [`image_info`], [`has_blobs`], [`read_blob`], [`write_blob`] and
//! [`import_from_content`] are the pieces migration uses to send only the blobs a
//! destination lacks and to recreate the image there.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Kind as SnapshotKind, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteImageRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, Info as ContentInfo, InfoRequest,
    ListImagesRequest, ReadContentRequest, UpdateImageRequest,
    UpdateRequest as UpdateContentRequest, WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor;
use containerd_client::Client;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tonic::{Code, Request, Status};

use crate::error::RuntimeError;

/// Media type of an uncompressed OCI layer.
pub const MEDIA_TYPE_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of a gzip-compressed OCI layer.
pub const MEDIA_TYPE_LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema-2 manifest (accepted when reading images back).
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (accepted when reading images back).
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";

/// Label on a layer blob: its uncompressed digest (diffID).
pub const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Prefix of the labels by which a blob keeps other blobs alive.
pub const LABEL_GC_REF_CONTENT: &str = "containerd.io/gc.ref.content.";
/// Prefix of the label by which the config blob keeps the unpacked snapshot alive; the
/// snapshotter name follows.
pub const LABEL_GC_REF_SNAPSHOT: &str = "containerd.io/gc.ref.snapshot.";
/// Lease label: when the lease expires.
pub const LABEL_GC_EXPIRE: &str = "containerd.io/gc.expire";
/// gRPC metadata key naming the containerd namespace.
pub const HEADER_NAMESPACE: &str = "containerd-namespace";
/// gRPC metadata key naming the lease a request works under.
pub const HEADER_LEASE: &str = "containerd-lease";

/// `PATH` put into image configs.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Applets that every busybox image links, whatever `busybox --list` says.
pub const REQUIRED_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "sleep", "date", "seq", "rm", "mkdir", "nc", "wc", "head", "tail",
    "grep",
];
/// How long an import lease lives if the importer dies before deleting it.
pub const IMPORT_LEASE_TTL: Duration = Duration::from_secs(3600);
/// Size of one `Content.Write` data message.
const WRITE_CHUNK: usize = 1 << 20;

const ETC_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
const ETC_GROUP: &str = "root:x:0:\nnogroup:x:65534:\n";
const ETC_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

// ---------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain IDs of a layer stack: `chain[0] = diff[0]`,
/// `chain[n] = sha256(chain[n-1] + " " + diff[n])`, all as `sha256:<hex>`.
pub fn chain_ids<S: AsRef<str>>(diff_ids: &[S]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.as_ref().to_string(),
            Some(prev) => sha256_digest(format!("{prev} {}", d.as_ref()).as_bytes()),
        };
        out.push(next);
    }
    out
}

/// The chain ID of the whole stack (the name of the top snapshot); `None` if empty.
pub fn chain_id<S: AsRef<str>>(diff_ids: &[S]) -> Option<String> {
    chain_ids(diff_ids).pop()
}

fn check_digest(d: &str) -> Result<(), RuntimeError> {
    let ok = d
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::Invalid(format!("not a sha256 digest: {d:?}")))
    }
}

// ---------------------------------------------------------------------------------------
// Descriptors and OCI JSON
// ---------------------------------------------------------------------------------------

/// An OCI content descriptor (media type, digest, size), also used on the wire between
/// hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobDescriptor {
    /// e.g. [`MEDIA_TYPE_LAYER_TAR`].
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
}

impl BlobDescriptor {
    /// The descriptor of `bytes` with the given media type.
    pub fn of(media_type: &str, bytes: &[u8]) -> Self {
        Self {
            media_type: media_type.to_string(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
        }
    }

    /// As containerd's protobuf descriptor.
    pub fn to_containerd(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size as i64,
            annotations: HashMap::new(),
        }
    }

    /// From containerd's protobuf descriptor.
    pub fn from_containerd(d: &Descriptor) -> Self {
        Self {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size: d.size.max(0) as u64,
        }
    }

    /// Whether `bytes` match this descriptor's digest and size.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), RuntimeError> {
        let got = sha256_digest(bytes);
        if got != self.digest || bytes.len() as u64 != self.size {
            return Err(RuntimeError::Invalid(format!(
                "blob mismatch: expected {} ({} bytes), got {got} ({} bytes)",
                self.digest,
                self.size,
                bytes.len()
            )));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct OciManifest<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    config: &'a BlobDescriptor,
    layers: &'a [BlobDescriptor],
}

#[derive(Deserialize)]
struct ManifestIn {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    config: BlobDescriptor,
    #[serde(default)]
    layers: Vec<BlobDescriptor>,
}

#[derive(Deserialize)]
struct IndexIn {
    #[serde(default)]
    manifests: Vec<IndexEntryIn>,
}

#[derive(Deserialize)]
struct IndexEntryIn {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<PlatformIn>,
}

#[derive(Deserialize)]
struct PlatformIn {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Serialize)]
struct OciConfig<'a> {
    architecture: &'a str,
    os: &'a str,
    config: ContainerConfig<'a>,
    rootfs: RootFs<'a>,
    history: Vec<History>,
}

#[derive(Serialize)]
struct ContainerConfig<'a> {
    #[serde(rename = "Env")]
    env: &'a [String],
    #[serde(rename = "Entrypoint", skip_serializing_if = "<[String]>::is_empty")]
    entrypoint: &'a [String],
    #[serde(rename = "Cmd", skip_serializing_if = "<[String]>::is_empty")]
    cmd: &'a [String],
    #[serde(rename = "WorkingDir")]
    working_dir: &'a str,
}

#[derive(Serialize)]
struct RootFs<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    diff_ids: &'a [String],
}

#[derive(Serialize)]
struct History {
    created_by: String,
}

#[derive(Deserialize)]
struct ConfigIn {
    rootfs: RootFsIn,
}

#[derive(Deserialize)]
struct RootFsIn {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
struct OciIndex {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: Vec<IndexEntry>,
}

#[derive(Serialize)]
struct IndexEntry {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> RuntimeError + '_ {
    move |e| RuntimeError::Invalid(format!("{what}: {e}"))
}

// ---------------------------------------------------------------------------------------
// Builder
// ---------------------------------------------------------------------------------------

/// How layers are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LayerCompression {
    /// Plain tar ([`MEDIA_TYPE_LAYER_TAR`]); digest = diffID. The default.
    #[default]
    None,
    /// gzip ([`MEDIA_TYPE_LAYER_TAR_GZIP`]), deterministic header (no name, mtime 0).
    Gzip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: PathBuf },
}

/// Assembles one deterministic image layer plus its config. See the module docs.
#[derive(Clone)]
pub struct ImageBuilder {
    /// Paths relative to the image root ("bin/sh"), sorted.
    entries: BTreeMap<PathBuf, Node>,
    env: Vec<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    working_dir: String,
    compression: LayerCompression,
    created_by: String,
}

impl std::fmt::Debug for ImageBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageBuilder")
            .field("entries", &self.entries.len())
            .field("env", &self.env)
            .field("entrypoint", &self.entrypoint)
            .field("cmd", &self.cmd)
            .field("compression", &self.compression)
            .finish()
    }
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the entry for a path lives in the image tree.
fn image_rel(path: &Path) -> Result<PathBuf, RuntimeError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::Prefix(_) => {
                return Err(RuntimeError::Invalid(format!(
                    "unsupported path {}",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Lexically normalised absolute path (`..` pops, `.` vanishes).
fn normalize_abs(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let path = path.to_path_buf();
    move |source| RuntimeError::Io { op, path, source }
}

impl ImageBuilder {
    /// An empty layer; config defaults: `Env = [PATH=…]`, `Cmd = ["/bin/sh"]`,
    /// `WorkingDir = /`.
    pub fn new() -> Self {
        Self {
            entries: BTreeMap::new(),
            env: vec![DEFAULT_PATH.to_string()],
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".to_string()],
            working_dir: "/".to_string(),
            compression: LayerCompression::None,
            created_by: "xfer-runtime ImageBuilder".to_string(),
        }
    }

    /// A busybox image: [`add_base_files`](Self::add_base_files) +
    /// [`add_busybox`](Self::add_busybox). `busybox` is usually `/bin/busybox` from
    /// Debian's busybox-static.
    pub fn busybox(busybox: impl AsRef<Path>) -> Result<Self, RuntimeError> {
        let mut b = Self::new();
        b.add_base_files()?;
        b.add_busybox(busybox)?;
        Ok(b)
    }

    /// An image of host binaries: [`add_base_files`](Self::add_base_files), a `/data`
    /// directory and [`add_host_binary`](Self::add_host_binary) for each path. `Cmd` is
    /// the first binary.
    pub fn host_binaries<P: AsRef<Path>>(binaries: &[P]) -> Result<Self, RuntimeError> {
        let mut b = Self::new();
        b.add_base_files()?;
        b.add_dir("/data", 0o755)?;
        for p in binaries {
            b.add_host_binary(p.as_ref())?;
        }
        if let Some(first) = binaries.first() {
            b.cmd = vec![first.as_ref().display().to_string()];
        }
        Ok(b)
    }

    /// Set the config's `Env` (replaces the default `PATH`).
    pub fn env(&mut self, env: Vec<String>) -> &mut Self {
        self.env = env;
        self
    }

    /// Set the config's `Entrypoint`.
    pub fn entrypoint(&mut self, entrypoint: Vec<String>) -> &mut Self {
        self.entrypoint = entrypoint;
        self
    }

    /// Set the config's `Cmd`.
    pub fn cmd(&mut self, cmd: Vec<String>) -> &mut Self {
        self.cmd = cmd;
        self
    }

    /// Set the config's `WorkingDir`.
    pub fn working_dir(&mut self, dir: &str) -> &mut Self {
        self.working_dir = dir.to_string();
        self
    }

    /// Layer compression (default: none).
    pub fn compression(&mut self, c: LayerCompression) -> &mut Self {
        self.compression = c;
        self
    }

    /// The history entry's `created_by` text.
    pub fn created_by(&mut self, text: &str) -> &mut Self {
        self.created_by = text.to_string();
        self
    }

    /// Number of entries (files, directories, symlinks) in the layer.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the layer has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Paths in the layer (absolute, sorted).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.entries
            .keys()
            .map(|p| Path::new("/").join(p))
            .collect()
    }

    /// `/etc/passwd`, `/etc/group`, `/etc/hosts` (root and nobody), `/tmp` (1777) and
    /// `/root` (0700).
    pub fn add_base_files(&mut self) -> Result<&mut Self, RuntimeError> {
        self.add_dir("/etc", 0o755)?;
        self.add_file("/etc/passwd", ETC_PASSWD.as_bytes().to_vec(), 0o644)?;
        self.add_file("/etc/group", ETC_GROUP.as_bytes().to_vec(), 0o644)?;
        self.add_file("/etc/hosts", ETC_HOSTS.as_bytes().to_vec(), 0o644)?;
        self.add_dir("/tmp", 0o1777)?;
        self.add_dir("/root", 0o700)?;
        Ok(self)
    }

    /// `/bin/busybox` (the content of `busybox`, mode 0755) plus a `/bin/<applet>` symlink
    /// to `busybox` for every applet `busybox --list` names and every one of
    /// [`REQUIRED_APPLETS`]. A dynamically linked busybox brings its libraries.
    pub fn add_busybox(&mut self, busybox: impl AsRef<Path>) -> Result<&mut Self, RuntimeError> {
        let busybox = busybox.as_ref();
        let data = fs::read(busybox).map_err(io_err("read", busybox))?;
        self.add_file("/bin/busybox", data, 0o755)?;
        for lib in ldd_dependencies(busybox)? {
            self.add_host_path(&lib)?;
        }
        let mut applets: Vec<String> = REQUIRED_APPLETS.iter().map(|s| s.to_string()).collect();
        match Command::new(busybox).arg("--list").output() {
            Ok(out) if out.status.success() => applets.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string),
            ),
            Ok(out) => {
                tracing::warn!(status = %out.status, "busybox --list failed; linking the required applets only")
            }
            Err(e) => {
                tracing::warn!(error = %e, "busybox --list failed; linking the required applets only")
            }
        }
        applets.sort();
        applets.dedup();
        for a in applets {
            let a = a.trim();
            if a.is_empty() || a == "busybox" || a.contains('/') || a == "." || a == ".." {
                continue;
            }
            self.add_symlink(format!("/bin/{a}"), "busybox")?;
        }
        Ok(self)
    }

    /// A host binary at its own path, its shared libraries (from `ldd`) and the dynamic
    /// loader, each through [`add_host_path`](Self::add_host_path).
    pub fn add_host_binary(&mut self, binary: impl AsRef<Path>) -> Result<&mut Self, RuntimeError> {
        let binary = binary.as_ref();
        self.add_host_path(binary)?;
        for lib in ldd_dependencies(binary)? {
            self.add_host_path(&lib)?;
        }
        Ok(self)
    }

    /// Copy a host file (or directory, without its content) into the image at the same
    /// path, recreating every symlink met on the way (in a directory component or as the
    /// file itself) as a symlink and storing the real file once. Where the image already
    /// has a real directory and the host a symlink (e.g. the image's `/bin` and a
    /// merged-usr host's `/bin -> usr/bin`), the real file is stored at its canonical path
    /// and the requested path becomes a symlink to it.
    pub fn add_host_path(&mut self, path: impl AsRef<Path>) -> Result<&mut Self, RuntimeError> {
        let path = path.as_ref();
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(io_err("current dir", path))?
                .join(path)
        };
        self.mirror(&normalize_abs(&abs), 0)?;
        Ok(self)
    }

    fn mirror(&mut self, host: &Path, depth: u32) -> Result<(), RuntimeError> {
        if depth > 40 {
            return Err(RuntimeError::Invalid(format!(
                "too many levels of symbolic links at {}",
                host.display()
            )));
        }
        let comps: Vec<OsString> = host
            .components()
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.to_os_string()),
                _ => None,
            })
            .collect();
        let mut real = PathBuf::from("/");
        for (i, name) in comps.iter().enumerate() {
            let cand = real.join(name);
            let last = i + 1 == comps.len();
            let md = fs::symlink_metadata(&cand).map_err(io_err("stat", &cand))?;
            let rel = image_rel(&cand)?;
            if md.file_type().is_symlink() {
                let target = fs::read_link(&cand).map_err(io_err("readlink", &cand))?;
                if matches!(self.entries.get(&rel), Some(Node::Dir { .. })) {
                    let canonical = fs::canonicalize(host).map_err(io_err("canonicalize", host))?;
                    self.mirror(&canonical, depth + 1)?;
                    if canonical != host {
                        self.add_symlink(host, canonical)?;
                    }
                    return Ok(());
                }
                self.insert(
                    rel,
                    Node::Symlink {
                        target: target.clone(),
                    },
                )?;
                let rest: PathBuf = comps[i + 1..].iter().collect();
                let next = if target.is_absolute() {
                    target.join(rest)
                } else {
                    real.join(target).join(rest)
                };
                return self.mirror(&normalize_abs(&next), depth + 1);
            } else if md.is_dir() {
                match self.entries.get(&rel) {
                    Some(Node::Dir { .. }) => {}
                    None => {
                        self.entries.insert(
                            rel,
                            Node::Dir {
                                mode: md.mode() & 0o7777,
                            },
                        );
                    }
                    Some(_) => {
                        return Err(RuntimeError::Invalid(format!(
                            "image has a non-directory at {} where the host has a directory",
                            cand.display()
                        )))
                    }
                }
                real = cand;
            } else if md.is_file() {
                if !last {
                    return Err(RuntimeError::Invalid(format!(
                        "{} is not a directory",
                        cand.display()
                    )));
                }
                let data = fs::read(&cand).map_err(io_err("read", &cand))?;
                self.insert(
                    rel,
                    Node::File {
                        data,
                        mode: md.permissions().mode() & 0o7777,
                    },
                )?;
            } else {
                return Err(RuntimeError::Invalid(format!(
                    "{} is neither file, directory nor symlink",
                    cand.display()
                )));
            }
        }
        Ok(())
    }

    /// Resolve `path`'s directories inside the image (following the image's own
    /// symlinks, creating missing directories with mode 0755) and return where an entry
    /// named `path` goes.
    fn place(&mut self, path: &Path) -> Result<PathBuf, RuntimeError> {
        let rel = image_rel(path)?;
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return Err(RuntimeError::Invalid(format!(
                "cannot place an entry at {}",
                path.display()
            )));
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = self.resolve_dir(parent, 0)?;
        Ok(dir.join(name))
    }

    fn resolve_dir(&mut self, rel: &Path, depth: u32) -> Result<PathBuf, RuntimeError> {
        if depth > 40 {
            return Err(RuntimeError::Invalid(format!(
                "too many levels of symbolic links in the image at /{}",
                rel.display()
            )));
        }
        let mut cur = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else { continue };
            let next = cur.join(name);
            match self.entries.get(&next) {
                Some(Node::Dir { .. }) => cur = next,
                Some(Node::Symlink { target }) => {
                    let t = if target.is_absolute() {
                        image_rel(target)?
                    } else {
                        image_rel(&Path::new("/").join(&cur).join(target))?
                    };
                    cur = self.resolve_dir(&t, depth + 1)?;
                }
                Some(Node::File { .. }) => {
                    return Err(RuntimeError::Invalid(format!(
                        "/{} is a file, not a directory",
                        next.display()
                    )))
                }
                None => {
                    self.entries.insert(next.clone(), Node::Dir { mode: 0o755 });
                    cur = next;
                }
            }
        }
        Ok(cur)
    }

    fn insert(&mut self, rel: PathBuf, node: Node) -> Result<(), RuntimeError> {
        if rel.as_os_str().is_empty() {
            return Err(RuntimeError::Invalid(
                "cannot replace the image root".into(),
            ));
        }
        match (self.entries.get_mut(&rel), node) {
            (Some(Node::Dir { mode }), Node::Dir { mode: m }) => *mode = m,
            (Some(Node::Dir { .. }), _) | (Some(_), Node::Dir { .. }) => {
                return Err(RuntimeError::Invalid(format!(
                    "/{} already exists with another type",
                    rel.display()
                )))
            }
            (_, node) => {
                self.entries.insert(rel, node);
            }
        }
        Ok(())
    }

    /// A directory (parents are created with mode 0755; a later call sets the mode).
    pub fn add_dir(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
    ) -> Result<&mut Self, RuntimeError> {
        let at = self.place(path.as_ref())?;
        self.insert(
            at,
            Node::Dir {
                mode: mode & 0o7777,
            },
        )?;
        Ok(self)
    }

    /// A regular file with the given content and mode (replaces an existing non-directory).
    pub fn add_file(
        &mut self,
        path: impl AsRef<Path>,
        data: Vec<u8>,
        mode: u32,
    ) -> Result<&mut Self, RuntimeError> {
        let at = self.place(path.as_ref())?;
        self.insert(
            at,
            Node::File {
                data,
                mode: mode & 0o7777,
            },
        )?;
        Ok(self)
    }

    /// A symlink `path -> target` (target stored verbatim).
    pub fn add_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl AsRef<Path>,
    ) -> Result<&mut Self, RuntimeError> {
        let at = self.place(path.as_ref())?;
        self.insert(
            at,
            Node::Symlink {
                target: target.as_ref().to_path_buf(),
            },
        )?;
        Ok(self)
    }

    /// The uncompressed layer tar: entries sorted by path, uid/gid 0, mtime 0.
    pub fn layer_tar(&self) -> Result<Vec<u8>, RuntimeError> {
        let tar_err = |e: std::io::Error| RuntimeError::Io {
            op: "build layer tar",
            path: PathBuf::from("<memory>"),
            source: e,
        };
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        for (path, node) in &self.entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match node {
                Node::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    builder
                        .append_data(&mut h, path, std::io::empty())
                        .map_err(tar_err)?;
                }
                Node::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    builder
                        .append_data(&mut h, path, data.as_slice())
                        .map_err(tar_err)?;
                }
                Node::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    builder.append_link(&mut h, path, target).map_err(tar_err)?;
                }
            }
        }
        builder.into_inner().map_err(tar_err)
    }

    /// Build a one-layer image.
    pub fn build(&self) -> Result<BuiltImage, RuntimeError> {
        self.build_layers(Vec::new())
    }

    /// Build an image whose layers are `base`'s layers plus this builder's layer; the
    /// config (Env, Cmd, …) is this builder's.
    pub fn build_on(&self, base: &BuiltImage) -> Result<BuiltImage, RuntimeError> {
        self.build_layers(base.layers.clone())
    }

    fn build_layers(&self, mut layers: Vec<BuiltLayer>) -> Result<BuiltImage, RuntimeError> {
        let tar = self.layer_tar()?;
        let diff_id = sha256_digest(&tar);
        let (media_type, bytes) = match self.compression {
            LayerCompression::None => (MEDIA_TYPE_LAYER_TAR, tar),
            LayerCompression::Gzip => {
                let mut enc = flate2::GzBuilder::new()
                    .mtime(0)
                    .write(Vec::new(), flate2::Compression::default());
                let gz_err = |e: std::io::Error| RuntimeError::Io {
                    op: "gzip layer",
                    path: PathBuf::from("<memory>"),
                    source: e,
                };
                enc.write_all(&tar).map_err(gz_err)?;
                (MEDIA_TYPE_LAYER_TAR_GZIP, enc.finish().map_err(gz_err)?)
            }
        };
        layers.push(BuiltLayer {
            descriptor: BlobDescriptor::of(media_type, &bytes),
            diff_id,
            bytes,
        });
        let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
        let history = layers
            .iter()
            .enumerate()
            .map(|(i, _)| History {
                created_by: if i + 1 == layers.len() {
                    self.created_by.clone()
                } else {
                    format!("base layer {i}")
                },
            })
            .collect();
        let config = OciConfig {
            architecture: "amd64",
            os: "linux",
            config: ContainerConfig {
                env: &self.env,
                entrypoint: &self.entrypoint,
                cmd: &self.cmd,
                working_dir: &self.working_dir,
            },
            rootfs: RootFs {
                kind: "layers",
                diff_ids: &diff_ids,
            },
            history,
        };
        let config_bytes = serde_json::to_vec(&config).map_err(json_err("encode config"))?;
        let config_desc = BlobDescriptor::of(MEDIA_TYPE_CONFIG, &config_bytes);
        let layer_descs: Vec<BlobDescriptor> =
            layers.iter().map(|l| l.descriptor.clone()).collect();
        let manifest = OciManifest {
            schema_version: 2,
            media_type: MEDIA_TYPE_MANIFEST,
            config: &config_desc,
            layers: &layer_descs,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(json_err("encode manifest"))?;
        Ok(BuiltImage {
            manifest: BlobDescriptor::of(MEDIA_TYPE_MANIFEST, &manifest_bytes),
            manifest_bytes,
            config: config_desc,
            config_bytes,
            layers,
        })
    }
}

// ---------------------------------------------------------------------------------------
// ldd
// ---------------------------------------------------------------------------------------

/// Shared libraries (and the dynamic loader) `binary` needs, from `ldd`. A static binary
/// gives an empty list; a library `ldd` cannot find is an error.
pub fn ldd_dependencies(binary: &Path) -> Result<Vec<PathBuf>, RuntimeError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| RuntimeError::Spawn {
            program: "ldd".into(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let text = format!("{stdout}{stderr}");
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        return Err(RuntimeError::Invalid(format!(
            "ldd {} failed ({}): {}",
            binary.display(),
            out.status,
            text.trim()
        )));
    }
    parse_ldd_output(&stdout)
        .map_err(|e| RuntimeError::Invalid(format!("ldd {}: {e}", binary.display())))
}

/// Parse `ldd` output into library paths, in order, without duplicates. Lines without a
/// path (the vDSO, "statically linked") are skipped; `=> not found` is an error.
pub fn parse_ldd_output(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut out: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let path = if let Some((name, rest)) = line.split_once("=>") {
            let rest = rest.trim();
            if rest.starts_with("not found") {
                return Err(format!("library {} not found", name.trim()));
            }
            rest.split_whitespace().next().unwrap_or("")
        } else {
            line.split_whitespace().next().unwrap_or("")
        };
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Built images and the OCI layout
// ---------------------------------------------------------------------------------------

/// One layer of a [`BuiltImage`].
#[derive(Clone)]
pub struct BuiltLayer {
    /// The blob's descriptor (compressed or not).
    pub descriptor: BlobDescriptor,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// The blob.
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for BuiltLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltLayer")
            .field("descriptor", &self.descriptor)
            .field("diff_id", &self.diff_id)
            .finish_non_exhaustive()
    }
}

/// An image held in memory: manifest, config and layer blobs.
#[derive(Clone)]
pub struct BuiltImage {
    /// Descriptor of the manifest (the image's identity).
    pub manifest: BlobDescriptor,
    /// The manifest JSON.
    pub manifest_bytes: Vec<u8>,
    /// Descriptor of the config.
    pub config: BlobDescriptor,
    /// The config JSON.
    pub config_bytes: Vec<u8>,
    /// Layers, bottom first.
    pub layers: Vec<BuiltLayer>,
}

impl std::fmt::Debug for BuiltImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuiltImage")
            .field("manifest", &self.manifest)
            .field("config", &self.config)
            .field("layers", &self.layers)
            .finish()
    }
}

impl BuiltImage {
    /// The layers' diffIDs, bottom first.
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }

    /// The chain ID of the top layer (name of the unpacked snapshot).
    pub fn chain_id(&self) -> String {
        chain_id(&self.diff_ids()).unwrap_or_default()
    }

    /// Every blob with its descriptor: layers, config, manifest (children before parents).
    pub fn blobs(&self) -> Vec<(&BlobDescriptor, &[u8])> {
        let mut v: Vec<(&BlobDescriptor, &[u8])> = self
            .layers
            .iter()
            .map(|l| (&l.descriptor, l.bytes.as_slice()))
            .collect();
        v.push((&self.config, &self.config_bytes));
        v.push((&self.manifest, &self.manifest_bytes));
        v
    }

    /// Total size of all blobs.
    pub fn total_size(&self) -> u64 {
        self.blobs().iter().map(|(d, _)| d.size).sum()
    }

    /// Write an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/…`) into
    /// `dir` (created if missing; existing blobs are kept). The index entry has no name.
    pub fn write_layout(&self, dir: impl AsRef<Path>) -> Result<(), RuntimeError> {
        self.write_layout_inner(dir.as_ref(), None)
    }

    /// [`write_layout`](Self::write_layout) with the index entry annotated with
    /// `io.containerd.image.name` = `name` and `org.opencontainers.image.ref.name` = its
    /// tag, so `ctr images import` names the image.
    pub fn write_layout_named(
        &self,
        dir: impl AsRef<Path>,
        name: &str,
    ) -> Result<(), RuntimeError> {
        self.write_layout_inner(dir.as_ref(), Some(name))
    }

    fn write_layout_inner(&self, dir: &Path, name: Option<&str>) -> Result<(), RuntimeError> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err("create directory", &blobs))?;
        for (desc, bytes) in self.blobs() {
            let hexpart = desc.digest.trim_start_matches("sha256:");
            let path = blobs.join(hexpart);
            if fs::metadata(&path)
                .map(|m| m.len() == desc.size)
                .unwrap_or(false)
            {
                continue;
            }
            let tmp = blobs.join(format!(".{hexpart}.tmp"));
            fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
        }
        let layout = dir.join("oci-layout");
        fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io_err("write", &layout))?;
        let mut annotations = BTreeMap::new();
        if let Some(name) = name {
            annotations.insert("io.containerd.image.name".to_string(), name.to_string());
            let tag = name
                .rsplit_once(':')
                .filter(|(_, t)| !t.contains('/'))
                .map(|(_, t)| t)
                .unwrap_or("latest");
            annotations.insert(
                "org.opencontainers.image.ref.name".to_string(),
                tag.to_string(),
            );
        }
        let index = OciIndex {
            schema_version: 2,
            media_type: MEDIA_TYPE_INDEX,
            manifests: vec![IndexEntry {
                media_type: self.manifest.media_type.clone(),
                digest: self.manifest.digest.clone(),
                size: self.manifest.size,
                annotations,
            }],
        };
        let index_path = dir.join("index.json");
        let bytes = serde_json::to_vec(&index).map_err(json_err("encode index"))?;
        fs::write(&index_path, bytes).map_err(io_err("write", &index_path))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// containerd: requests, leases, content
// ---------------------------------------------------------------------------------------

fn cd_err(op: impl Into<String>) -> impl FnOnce(Status) -> RuntimeError {
    let op = op.into();
    move |source| RuntimeError::Containerd { op, source }
}

fn request<T>(msg: T, ns: &str, lease: Option<&str>) -> Result<Request<T>, RuntimeError> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    md.insert(
        HEADER_NAMESPACE,
        ns.parse()
            .map_err(|_| RuntimeError::Invalid(format!("bad containerd namespace {ns:?}")))?,
    );
    if let Some(lease) = lease {
        md.insert(
            HEADER_LEASE,
            lease
                .parse()
                .map_err(|_| RuntimeError::Invalid(format!("bad lease id {lease:?}")))?,
        );
    }
    Ok(req)
}

/// A process-unique, time-based token for lease ids and extraction keys.
fn unique_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// RFC 3339 UTC timestamp (`2026-11-21T22:45:00Z`) of `t`.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A containerd lease: resources created by requests that carry its id (content, active
/// snapshots) are kept from garbage collection until it is deleted or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    namespace: String,
    id: String,
}

impl Lease {
    /// Create a lease in `namespace` that expires after `ttl`
    /// (`containerd.io/gc.expire`).
    pub async fn create(
        client: &Client,
        namespace: &str,
        ttl: Duration,
    ) -> Result<Self, RuntimeError> {
        let id = format!("xfer-{}", unique_token());
        let labels = HashMap::from([(
            LABEL_GC_EXPIRE.to_string(),
            rfc3339(SystemTime::now() + ttl),
        )]);
        client
            .leases()
            .create(request(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                namespace,
                None,
            )?)
            .await
            .map_err(cd_err(format!("create lease {id}")))?;
        Ok(Self {
            namespace: namespace.to_string(),
            id,
        })
    }

    /// The lease id (send it as the `containerd-lease` header).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace the lease lives in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Delete the lease; what it protected is now kept alive by references only.
    pub async fn delete(self, client: &Client) -> Result<(), RuntimeError> {
        let req = request(
            DeleteLeaseRequest {
                id: self.id.clone(),
                sync: false,
            },
            &self.namespace,
            None,
        )?;
        match client.leases().delete(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(cd_err(format!("delete lease {}", self.id))(s)),
        }
    }
}

async fn content_info(
    client: &Client,
    ns: &str,
    digest: &str,
) -> Result<Option<ContentInfo>, RuntimeError> {
    let req = request(
        InfoRequest {
            digest: digest.to_string(),
        },
        ns,
        None,
    )?;
    match client.content().info(req).await {
        Ok(resp) => Ok(resp.into_inner().info),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(cd_err(format!("content info {digest}"))(s)),
    }
}

/// For each digest, whether containerd's content store (in namespace `ns`) has the blob.
pub async fn has_blobs<S: AsRef<str>>(
    client: &Client,
    ns: &str,
    digests: &[S],
) -> Result<Vec<bool>, RuntimeError> {
    let mut out = Vec::with_capacity(digests.len());
    for d in digests {
        out.push(content_info(client, ns, d.as_ref()).await?.is_some());
    }
    Ok(out)
}

/// Read a whole blob (`Content.Read`) and check its digest.
pub async fn read_blob(client: &Client, ns: &str, digest: &str) -> Result<Vec<u8>, RuntimeError> {
    check_digest(digest)?;
    let req = request(
        ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        },
        ns,
        None,
    )?;
    let op = || format!("read blob {digest}");
    let mut stream = client
        .content()
        .read(req)
        .await
        .map_err(cd_err(op()))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(msg) = stream.message().await.map_err(cd_err(op()))? {
        if msg.offset as usize != data.len() {
            return Err(RuntimeError::Invalid(format!(
                "read blob {digest}: chunk at offset {} after {} bytes",
                msg.offset,
                data.len()
            )));
        }
        data.extend_from_slice(&msg.data);
    }
    let got = sha256_digest(&data);
    if got != digest {
        return Err(RuntimeError::Invalid(format!(
            "read blob {digest}: content hashes to {got}"
        )));
    }
    Ok(data)
}

/// Set labels on a blob (only those missing or different from `have`).
async fn ensure_labels(
    client: &Client,
    ns: &str,
    lease: Option<&str>,
    digest: &str,
    have: &HashMap<String, String>,
    want: &BTreeMap<String, String>,
) -> Result<(), RuntimeError> {
    let missing: HashMap<String, String> = want
        .iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let paths = missing.keys().map(|k| format!("labels.{k}")).collect();
    let req = request(
        UpdateContentRequest {
            info: Some(ContentInfo {
                digest: digest.to_string(),
                labels: missing,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        },
        ns,
        lease,
    )?;
    client
        .content()
        .update(req)
        .await
        .map_err(cd_err(format!("label blob {digest}")))?;
    Ok(())
}

/// Write one blob into containerd's content store (`Content.Write`: stat, write, commit
/// with the expected digest and size) with `labels`. If the store already has the blob,
/// only the labels missing on it are set and `Ok(false)` is returned; `Ok(true)` means
/// the blob was written. The bytes are checked against the descriptor first. Pass a
/// lease (see [`Lease`]) unless the blob is referenced right away: an unreferenced blob
/// may be garbage collected.
pub async fn write_blob(
    client: &Client,
    ns: &str,
    lease: Option<&str>,
    desc: &BlobDescriptor,
    bytes: &[u8],
    labels: &BTreeMap<String, String>,
) -> Result<bool, RuntimeError> {
    check_digest(&desc.digest)?;
    desc.verify(bytes)?;
    write_blob_unverified(client, ns, lease, desc, bytes, labels).await
}

/// [`write_blob`] without hashing `bytes` locally first (containerd still checks the
/// digest at commit); [`import`] uses it for blobs the builder has just hashed.
async fn write_blob_unverified(
    client: &Client,
    ns: &str,
    lease: Option<&str>,
    desc: &BlobDescriptor,
    bytes: &[u8],
    labels: &BTreeMap<String, String>,
) -> Result<bool, RuntimeError> {
    check_digest(&desc.digest)?;
    // Another writer of the same blob holds the ref lock: wait for it.
    for attempt in 0..100u32 {
        if let Some(info) = content_info(client, ns, &desc.digest).await? {
            ensure_labels(client, ns, lease, &desc.digest, &info.labels, labels).await?;
            return Ok(false);
        }
        match write_blob_once(client, ns, lease, desc, bytes, labels).await {
            Ok(()) => return Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Committed by someone else meanwhile (or by us, racing): label it.
                continue;
            }
            Err(s) if s.code() == Code::Unavailable && s.message().contains("locked") => {
                tracing::debug!(digest = %desc.digest, attempt, "content ref locked; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Err(cd_err(format!("write blob {}", desc.digest))(s)),
        }
    }
    Err(RuntimeError::Invalid(format!(
        "write blob {}: ref stayed locked",
        desc.digest
    )))
}

async fn write_blob_once(
    client: &Client,
    ns: &str,
    lease: Option<&str>,
    desc: &BlobDescriptor,
    bytes: &[u8],
    labels: &BTreeMap<String, String>,
) -> Result<(), Status> {
    let r#ref = format!("xfer-{}", desc.digest);
    let total = desc.size as i64;
    let mut msgs = Vec::with_capacity(bytes.len() / WRITE_CHUNK + 3);
    // The first message names the ref and the expected digest/size: the server checks the
    // commit against those.
    msgs.push(WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: r#ref.clone(),
        total,
        expected: desc.digest.clone(),
        ..Default::default()
    });
    let mut offset = 0usize;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: r#ref.clone(),
            offset: offset as i64,
            data: chunk.to_vec(),
            ..Default::default()
        });
        offset += chunk.len();
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: r#ref.clone(),
        total,
        offset: offset as i64,
        expected: desc.digest.clone(),
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ..Default::default()
    });
    let n = msgs.len();
    let req = request(futures::stream::iter(msgs), ns, lease)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut responses = client.content().write(req).await?.into_inner();
    // One response per request; containerd 1.6 repeats the last (commit) response once
    // more when the stream ends successfully, 2.x does not: accept both.
    let mut seen = 0usize;
    let mut committed = None;
    while let Some(resp) = responses.message().await? {
        seen += 1;
        if resp.action == WriteAction::Commit as i32 {
            committed = Some(resp.digest);
        }
    }
    match committed {
        Some(digest) if digest == desc.digest => Ok(()),
        Some(digest) => Err(Status::data_loss(format!(
            "committed digest {digest} != expected {}",
            desc.digest
        ))),
        None => Err(Status::internal(format!(
            "content write of {} ended after {seen} of {n} responses without a commit",
            desc.digest
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// containerd: import
// ---------------------------------------------------------------------------------------

/// Counters of one import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Blobs written through Content.Write.
    pub blobs_written: usize,
    /// Blobs the store already had.
    pub blobs_skipped: usize,
    /// Bytes written.
    pub bytes_written: u64,
    /// Layers unpacked (Prepare, Apply, Commit).
    pub layers_unpacked: usize,
    /// Layers whose snapshot already existed.
    pub layers_skipped: usize,
    /// Whether the image record was created (false: it existed and was updated).
    pub image_created: bool,
}

/// An image as containerd knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    /// The image name (e.g. `xfer.local/busybox:latest`).
    pub name: String,
    /// The image target: its manifest.
    pub manifest: BlobDescriptor,
    /// The config blob.
    pub config: BlobDescriptor,
    /// Layer blobs, bottom first.
    pub layers: Vec<BlobDescriptor>,
    /// Layer diffIDs, bottom first.
    pub diff_ids: Vec<String>,
    /// Chain ID of the top layer: the committed snapshot to create containers from.
    pub chain_id: String,
    /// What the import did (all zero when read back by [`image_info`]).
    pub stats: ImportStats,
}

impl ImportedImage {
    /// The layers' digests, bottom first.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }

    /// Digests of every blob of the image: layers, config, manifest.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut v = self.layer_digests();
        v.push(self.config.digest.clone());
        v.push(self.manifest.digest.clone());
        v
    }

    /// Chain IDs of every layer, bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        chain_ids(&self.diff_ids)
    }
}

fn manifest_labels(config: &BlobDescriptor, layers: &[BlobDescriptor]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    labels.insert(
        format!("{LABEL_GC_REF_CONTENT}config"),
        config.digest.clone(),
    );
    for (i, l) in layers.iter().enumerate() {
        labels.insert(format!("{LABEL_GC_REF_CONTENT}l.{i}"), l.digest.clone());
    }
    labels
}

/// Import `img` into containerd as `image_name` in `namespace` and unpack it into
/// `snapshotter` (see the module docs for the steps). Idempotent: blobs and snapshots
/// that exist are skipped, an existing image record is updated.
pub async fn import(
    client: &Client,
    namespace: &str,
    image_name: &str,
    img: &BuiltImage,
    snapshotter: &str,
) -> Result<ImportedImage, RuntimeError> {
    let lease = Lease::create(client, namespace, IMPORT_LEASE_TTL).await?;
    let result = import_in_lease(client, namespace, lease.id(), image_name, img, snapshotter).await;
    let deleted = lease.delete(client).await;
    let imported = result?;
    deleted?;
    Ok(imported)
}

async fn import_in_lease(
    client: &Client,
    ns: &str,
    lease: &str,
    name: &str,
    img: &BuiltImage,
    snapshotter: &str,
) -> Result<ImportedImage, RuntimeError> {
    let mut stats = ImportStats::default();
    let layers: Vec<BlobDescriptor> = img.layers.iter().map(|l| l.descriptor.clone()).collect();
    // Children before parents: layers, config, then the manifest that references them.
    let mut blobs: Vec<(&BlobDescriptor, &[u8], BTreeMap<String, String>)> = img
        .layers
        .iter()
        .map(|l| {
            let labels = BTreeMap::from([(LABEL_UNCOMPRESSED.to_string(), l.diff_id.clone())]);
            (&l.descriptor, l.bytes.as_slice(), labels)
        })
        .collect();
    blobs.push((&img.config, &img.config_bytes, BTreeMap::new()));
    blobs.push((
        &img.manifest,
        &img.manifest_bytes,
        manifest_labels(&img.config, &layers),
    ));
    for (desc, bytes, labels) in blobs {
        let written = write_blob_unverified(client, ns, Some(lease), desc, bytes, &labels).await?;
        if written {
            stats.blobs_written += 1;
            stats.bytes_written += desc.size;
        } else {
            stats.blobs_skipped += 1;
        }
    }
    let mut imported = ImportedImage {
        name: name.to_string(),
        manifest: img.manifest.clone(),
        config: img.config.clone(),
        layers,
        diff_ids: img.diff_ids(),
        chain_id: img.chain_id(),
        stats,
    };
    finish_import(client, ns, lease, &mut imported, snapshotter).await?;
    Ok(imported)
}

/// Recreate an image whose blobs (manifest, config, layers) are already in the content
/// store, e.g. after [`write_blob`] of the blobs [`has_blobs`] reported missing: label the
/// blobs for the garbage collector, unpack into `snapshotter`, and create or update the
/// image record `image_name` with target `manifest`.
pub async fn import_from_content(
    client: &Client,
    namespace: &str,
    image_name: &str,
    manifest: &BlobDescriptor,
    snapshotter: &str,
) -> Result<ImportedImage, RuntimeError> {
    let lease = Lease::create(client, namespace, IMPORT_LEASE_TTL).await?;
    let result = async {
        let mut imported = resolve_manifest(client, namespace, image_name, manifest).await?;
        for (layer, diff_id) in imported.layers.iter().zip(&imported.diff_ids) {
            let info = content_info(client, namespace, &layer.digest)
                .await?
                .ok_or_else(|| {
                    RuntimeError::Invalid(format!("layer {} is missing", layer.digest))
                })?;
            let want = BTreeMap::from([(LABEL_UNCOMPRESSED.to_string(), diff_id.clone())]);
            ensure_labels(
                client,
                namespace,
                Some(lease.id()),
                &layer.digest,
                &info.labels,
                &want,
            )
            .await?;
        }
        let info = content_info(client, namespace, &imported.manifest.digest)
            .await?
            .ok_or_else(|| RuntimeError::Invalid("manifest vanished".into()))?;
        let want = manifest_labels(&imported.config, &imported.layers);
        ensure_labels(
            client,
            namespace,
            Some(lease.id()),
            &imported.manifest.digest,
            &info.labels,
            &want,
        )
        .await?;
        imported.stats.blobs_skipped = imported.layers.len() + 2;
        finish_import(client, namespace, lease.id(), &mut imported, snapshotter).await?;
        Ok(imported)
    }
    .await;
    let deleted = lease.delete(client).await;
    let imported = result?;
    deleted?;
    Ok(imported)
}

/// Unpack, label the config with the snapshot, create/update the image record.
async fn finish_import(
    client: &Client,
    ns: &str,
    lease: &str,
    img: &mut ImportedImage,
    snapshotter: &str,
) -> Result<(), RuntimeError> {
    let (unpacked, skipped) = Unpacker {
        client,
        ns,
        lease,
        snapshotter,
    }
    .unpack(&img.layers, &img.diff_ids)
    .await?;
    img.stats.layers_unpacked = unpacked;
    img.stats.layers_skipped = skipped;

    if !img.chain_id.is_empty() {
        let info = content_info(client, ns, &img.config.digest)
            .await?
            .ok_or_else(|| {
                RuntimeError::Invalid(format!("config {} is missing", img.config.digest))
            })?;
        let want = BTreeMap::from([(
            format!("{LABEL_GC_REF_SNAPSHOT}{snapshotter}"),
            img.chain_id.clone(),
        )]);
        ensure_labels(
            client,
            ns,
            Some(lease),
            &img.config.digest,
            &info.labels,
            &want,
        )
        .await?;
    }

    let image = Image {
        name: img.name.clone(),
        labels: HashMap::new(),
        target: Some(img.manifest.to_containerd()),
        created_at: None,
        updated_at: None,
    };
    let create = request(
        CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        },
        ns,
        Some(lease),
    )?;
    match client.images().create(create).await {
        Ok(_) => img.stats.image_created = true,
        Err(s) if s.code() == Code::AlreadyExists => {
            let update = request(
                UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                },
                ns,
                Some(lease),
            )?;
            client
                .images()
                .update(update)
                .await
                .map_err(cd_err(format!("update image {}", img.name)))?;
        }
        Err(s) => return Err(cd_err(format!("create image {}", img.name))(s)),
    }
    Ok(())
}

/// Whether the snapshot `key` exists; Err if it exists but is not committed.
async fn snapshot_committed(
    client: &Client,
    ns: &str,
    snapshotter: &str,
    key: &str,
) -> Result<bool, RuntimeError> {
    let req = request(
        StatSnapshotRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        },
        ns,
        None,
    )?;
    match client.snapshots().stat(req).await {
        Ok(resp) => {
            let kind = resp.into_inner().info.map(|i| i.kind).unwrap_or_default();
            if kind == SnapshotKind::Committed as i32 {
                Ok(true)
            } else {
                Err(RuntimeError::Invalid(format!(
                    "snapshot {key} exists but is not committed (kind {kind})"
                )))
            }
        }
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(cd_err(format!("stat snapshot {key}"))(s)),
    }
}

/// Unpacks layers into one snapshotter, under a lease.
struct Unpacker<'a> {
    client: &'a Client,
    ns: &'a str,
    lease: &'a str,
    snapshotter: &'a str,
}

impl Unpacker<'_> {
    /// Unpack the layers whose snapshots are missing; returns (unpacked, skipped).
    async fn unpack(
        &self,
        layers: &[BlobDescriptor],
        diff_ids: &[String],
    ) -> Result<(usize, usize), RuntimeError> {
        if layers.len() != diff_ids.len() {
            return Err(RuntimeError::Invalid(format!(
                "{} layers but {} diffIDs",
                layers.len(),
                diff_ids.len()
            )));
        }
        let chains = chain_ids(diff_ids);
        let (mut unpacked, mut skipped) = (0, 0);
        let mut parent = String::new();
        for ((layer, diff_id), chain) in layers.iter().zip(diff_ids).zip(&chains) {
            if snapshot_committed(self.client, self.ns, self.snapshotter, chain).await? {
                skipped += 1;
                parent = chain.clone();
                continue;
            }
            // containerd's own format for extraction keys: "extract-<unique> <chainID>".
            let key = format!("extract-{} {chain}", unique_token());
            let prep = request(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter.to_string(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: HashMap::new(),
                },
                self.ns,
                Some(self.lease),
            )?;
            let mounts = self
                .client
                .snapshots()
                .prepare(prep)
                .await
                .map_err(cd_err(format!("prepare snapshot {key}")))?
                .into_inner()
                .mounts;
            if let Err(e) = self
                .apply_and_commit(layer, diff_id, chain, &key, mounts)
                .await
            {
                self.remove(&key).await;
                return Err(e);
            }
            unpacked += 1;
            parent = chain.clone();
        }
        Ok((unpacked, skipped))
    }

    /// Apply one layer onto the prepared snapshot `key`, check its diffID, commit it as
    /// `chain`.
    async fn apply_and_commit(
        &self,
        layer: &BlobDescriptor,
        diff_id: &str,
        chain: &str,
        key: &str,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<(), RuntimeError> {
        let apply = request(
            ApplyRequest {
                diff: Some(layer.to_containerd()),
                mounts,
                payloads: HashMap::new(),
                sync_fs: false,
            },
            self.ns,
            Some(self.lease),
        )?;
        let applied = self
            .client
            .diff()
            .apply(apply)
            .await
            .map_err(cd_err(format!("apply layer {}", layer.digest)))?
            .into_inner()
            .applied
            .ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "apply layer {}: no descriptor returned",
                    layer.digest
                ))
            })?;
        if applied.digest != diff_id {
            return Err(RuntimeError::Invalid(format!(
                "layer {} unpacked to diffID {}, expected {diff_id}",
                layer.digest, applied.digest
            )));
        }
        let commit = request(
            CommitSnapshotRequest {
                snapshotter: self.snapshotter.to_string(),
                name: chain.to_string(),
                key: key.to_string(),
                labels: HashMap::new(),
            },
            self.ns,
            Some(self.lease),
        )?;
        match self.client.snapshots().commit(commit).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                // A concurrent import committed the same chain first: drop ours.
                self.remove(key).await;
                Ok(())
            }
            Err(s) => Err(cd_err(format!("commit snapshot {chain}"))(s)),
        }
    }

    /// Best-effort removal of an extraction snapshot.
    async fn remove(&self, key: &str) {
        let Ok(rm) = request(
            RemoveSnapshotRequest {
                snapshotter: self.snapshotter.to_string(),
                key: key.to_string(),
            },
            self.ns,
            Some(self.lease),
        ) else {
            return;
        };
        if let Err(e) = self.client.snapshots().remove(rm).await {
            tracing::warn!(key, error = %e, "could not remove extraction snapshot");
        }
    }
}

// ---------------------------------------------------------------------------------------
// containerd: reading images back
// ---------------------------------------------------------------------------------------

/// The names of the images in `namespace`.
pub async fn image_names(client: &Client, namespace: &str) -> Result<Vec<String>, RuntimeError> {
    let req = request(ListImagesRequest::default(), namespace, None)?;
    let resp = client
        .images()
        .list(req)
        .await
        .map_err(cd_err("list images".to_string()))?;
    let mut names: Vec<String> = resp
        .into_inner()
        .images
        .into_iter()
        .map(|i| i.name)
        .collect();
    names.sort();
    Ok(names)
}

/// Deletes image `name` and waits for containerd's garbage collection, so its blobs
/// and unpacked layers go unless something else references them. Missing: `Ok(false)`.
pub async fn delete_image(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<bool, RuntimeError> {
    let req = request(
        DeleteImageRequest {
            name: name.to_string(),
            sync: true,
            target: None,
        },
        namespace,
        None,
    )?;
    match client.images().delete(req).await {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(cd_err(format!("delete image {name}"))(s)),
    }
}

/// Read an image record back: its manifest (for an index: the linux/amd64 entry), config,
/// layers, diffIDs and top chain ID. `Ok(None)` if there is no image of that name.
pub async fn image_info(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<ImportedImage>, RuntimeError> {
    let req = request(
        GetImageRequest {
            name: name.to_string(),
        },
        namespace,
        None,
    )?;
    let image = match client.images().get(req).await {
        Ok(resp) => resp.into_inner().image,
        Err(s) if s.code() == Code::NotFound => return Ok(None),
        Err(s) => return Err(cd_err(format!("get image {name}"))(s)),
    };
    let Some(target) = image.and_then(|i| i.target) else {
        return Err(RuntimeError::Invalid(format!("image {name} has no target")));
    };
    let target = BlobDescriptor::from_containerd(&target);
    resolve_manifest(client, namespace, name, &target)
        .await
        .map(Some)
}

async fn resolve_manifest(
    client: &Client,
    ns: &str,
    name: &str,
    target: &BlobDescriptor,
) -> Result<ImportedImage, RuntimeError> {
    let mut manifest_desc = target.clone();
    let mut bytes = read_blob(client, ns, &target.digest).await?;
    if target.media_type == MEDIA_TYPE_INDEX || target.media_type == MEDIA_TYPE_DOCKER_MANIFEST_LIST
    {
        let index: IndexIn = serde_json::from_slice(&bytes).map_err(json_err("decode index"))?;
        let pick = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .or_else(|| index.manifests.first())
            .ok_or_else(|| RuntimeError::Invalid(format!("index of {name} is empty")))?;
        manifest_desc = BlobDescriptor {
            media_type: pick.media_type.clone(),
            digest: pick.digest.clone(),
            size: pick.size,
        };
        bytes = read_blob(client, ns, &manifest_desc.digest).await?;
    }
    let manifest: ManifestIn =
        serde_json::from_slice(&bytes).map_err(json_err("decode manifest"))?;
    if let Some(mt) = &manifest.media_type {
        if mt != MEDIA_TYPE_MANIFEST && mt != MEDIA_TYPE_DOCKER_MANIFEST {
            return Err(RuntimeError::Invalid(format!(
                "{name}: unsupported manifest type {mt}"
            )));
        }
    }
    let config_bytes = read_blob(client, ns, &manifest.config.digest).await?;
    let config: ConfigIn =
        serde_json::from_slice(&config_bytes).map_err(json_err("decode config"))?;
    let diff_ids = config.rootfs.diff_ids;
    if diff_ids.len() != manifest.layers.len() {
        return Err(RuntimeError::Invalid(format!(
            "{name}: {} layers but {} diffIDs",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    Ok(ImportedImage {
        name: name.to_string(),
        manifest: manifest_desc,
        config: manifest.config,
        layers: manifest.layers,
        chain_id: chain_id(&diff_ids).unwrap_or_default(),
        diff_ids,
        stats: ImportStats::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_known_vector() {
        // Computed by hand:
        //   A=sha256:aaaa…(64 a), B=sha256:bbbb…, C=sha256:cccc…
        //   printf '%s %s' $A $B | sha256sum
        //     -> ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c
        //   printf '%s %s' sha256:ccd7…146c $C | sha256sum
        //     -> c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = format!("sha256:{}", "c".repeat(64));
        let chains = chain_ids(&[&a, &b, &c]);
        assert_eq!(chains[0], a);
        assert_eq!(
            chains[1],
            "sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c"
        );
        assert_eq!(
            chains[2],
            "sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588"
        );
        assert_eq!(chain_id(&[&a, &b, &c]).as_deref(), Some(chains[2].as_str()));
        assert_eq!(chain_id::<&str>(&[]), None);
    }

    #[test]
    fn ldd_parsing() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd5c9f0000)\n\
            \tlibatomic.so.1 => /lib/x86_64-linux-gnu/libatomic.so.1 (0x00007f47c3d3b000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f47c2e1e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f47c3d58000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f47c2e1e000)\n";
        assert_eq!(
            parse_ldd_output(text).expect("parse"),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libatomic.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd_output("\tstatically linked\n")
            .expect("static")
            .is_empty());
        let err = parse_ldd_output("\tlibfoo.so.1 => not found\n").expect_err("missing lib");
        assert!(err.contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_795_300_000)),
            "2026-11-21T22:26:40Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    fn synthetic() -> ImageBuilder {
        let mut b = ImageBuilder::new();
        b.add_base_files().expect("base");
        b.add_file("/usr/bin/tool", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .expect("file");
        b.add_symlink("/bin", "usr/bin").expect("link");
        b.add_symlink("/bin/t", "tool").expect("link in linked dir");
        b
    }

    #[test]
    fn builder_resolves_image_symlinks() {
        let b = synthetic();
        let paths = b.paths();
        // /bin/t went through the /bin -> usr/bin symlink.
        assert!(paths.contains(&PathBuf::from("/usr/bin/t")), "{paths:?}");
        assert!(!paths.contains(&PathBuf::from("/bin/t")));
        assert!(paths.contains(&PathBuf::from("/tmp")));
    }

    #[test]
    fn deterministic_layer_digest() {
        let one = synthetic().build().expect("build");
        let two = synthetic().build().expect("build");
        assert_eq!(one.layers[0].descriptor, two.layers[0].descriptor);
        assert_eq!(one.manifest, two.manifest);
        assert_eq!(one.layers[0].descriptor.digest, one.layers[0].diff_id);
        // Insertion order does not matter.
        let mut b = ImageBuilder::new();
        b.add_symlink("/bin", "usr/bin").expect("link");
        b.add_file("/usr/bin/tool", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .expect("file");
        b.add_symlink("/usr/bin/t", "tool").expect("link");
        b.add_base_files().expect("base");
        let three = b.build().expect("build");
        assert_eq!(one.layers[0].diff_id, three.layers[0].diff_id);
        // Content matters.
        let mut c = synthetic();
        c.add_file("/etc/extra", b"x".to_vec(), 0o644)
            .expect("file");
        assert_ne!(
            c.build().expect("build").layers[0].diff_id,
            one.layers[0].diff_id
        );
        // gzip is deterministic too and keeps the diffID.
        let mut g1 = synthetic();
        g1.compression(LayerCompression::Gzip);
        let g1 = g1.build().expect("gzip");
        let mut g2 = synthetic();
        g2.compression(LayerCompression::Gzip);
        let g2 = g2.build().expect("gzip");
        assert_eq!(g1.layers[0].descriptor, g2.layers[0].descriptor);
        assert_eq!(g1.layers[0].diff_id, one.layers[0].diff_id);
        assert_ne!(g1.layers[0].descriptor.digest, g1.layers[0].diff_id);
        assert_eq!(
            g1.layers[0].descriptor.media_type,
            MEDIA_TYPE_LAYER_TAR_GZIP
        );
    }

    #[test]
    fn layer_tar_entries() {
        let tar = synthetic().layer_tar().expect("tar");
        let mut ar = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for e in ar.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!(h.uid().expect("uid"), 0);
            assert_eq!(h.gid().expect("gid"), 0);
            assert_eq!(h.mtime().expect("mtime"), 0);
            if e.path().expect("path").as_ref() == Path::new("tmp") {
                assert_eq!(h.mode().expect("mode"), 0o1777);
            }
            names.push(e.path().expect("path").display().to_string());
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.contains(&"etc/passwd".to_string()));
    }

    #[test]
    fn config_and_manifest_json() {
        let img = synthetic().build().expect("build");
        let cfg: serde_json::Value = serde_json::from_slice(&img.config_bytes).expect("config");
        assert_eq!(cfg["architecture"], "amd64");
        assert_eq!(cfg["os"], "linux");
        assert_eq!(cfg["rootfs"]["type"], "layers");
        assert_eq!(cfg["rootfs"]["diff_ids"][0], img.layers[0].diff_id.as_str());
        assert_eq!(cfg["config"]["Env"][0], DEFAULT_PATH);
        let m: serde_json::Value = serde_json::from_slice(&img.manifest_bytes).expect("manifest");
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(m["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(m["config"]["digest"], img.config.digest.as_str());
        assert_eq!(m["layers"][0]["mediaType"], MEDIA_TYPE_LAYER_TAR);
        assert_eq!(img.chain_id(), img.layers[0].diff_id);
        let stacked = synthetic().build_on(&img).expect("stack");
        assert_eq!(stacked.layers.len(), 2);
        assert_eq!(
            stacked.chain_id(),
            chain_id(&stacked.diff_ids()).expect("chain")
        );
    }
}
