//! A container's volumes and bind mounts, and how their content moves.
//!
//! A volume is a host directory bind-mounted into the container: a *named* volume
//! lives under the node's work directory (`WORK/volumes/NAME`) and outlives the
//! container; an *anonymous* one (`WORK/volumes/_anon/ID/INDEX`) goes with it; a
//! *bind* mount names a host path. Their kind, name, destination, read-only flag,
//! mount options and labels are kept as one container label ([`LABEL`]), so they
//! travel with the container's record and are recreated the same at the destination.
//!
//! Content moves as a tar of the directory (entries sorted, modes, owners and times
//! kept), chunked with content-defined chunking like every other object:
//! * a read-write volume is sent in every pre-copy round and again after the freeze,
//!   so only what changed since the last round travels during the downtime;
//! * a read-only volume is sent once; a destination that already holds a named
//!   read-only volume with the same digest (it records the digest of what it
//!   installed) skips it entirely.
//!
//! At the destination each tar is unpacked next to the target directory and swapped
//! in by rename, so a failed unpack leaves the old content.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use xfer_proto::v1::{Volume as VolumeMsg, VolumeKind};

use crate::error::AgentError;

/// The container label holding the volumes (JSON).
pub const LABEL: &str = "io.xfer.volumes";

/// One volume of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub kind: Kind,
    /// Named volumes: the name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Bind mounts: the host path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    pub destination: String,
    pub read_only: bool,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The kinds of volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Named,
    Anonymous,
    Bind,
}

fn refuse(msg: impl Into<String>) -> AgentError {
    AgentError::Refused(msg.into())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '_', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Mount options a volume may carry (what runc passes to mount(2)); `ro`/`rw` come
/// from the read-only flag.
const OPTIONS: &[&str] = &[
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "noatime",
    "atime",
    "nodiratime",
    "relatime",
    "strictatime",
    "rprivate",
    "private",
    "rslave",
    "slave",
];

impl Volume {
    /// Checks a volume request and turns it into a volume.
    pub fn from_msg(m: &VolumeMsg) -> Result<Volume, AgentError> {
        let kind = match VolumeKind::try_from(m.kind) {
            Ok(VolumeKind::Named) => Kind::Named,
            Ok(VolumeKind::Anonymous) => Kind::Anonymous,
            Ok(VolumeKind::Bind) => Kind::Bind,
            _ => {
                return Err(refuse(format!(
                    "volume for {:?}: kind {} is not named, anonymous or bind",
                    m.destination, m.kind
                )))
            }
        };
        if !m.destination.starts_with('/') || m.destination.split('/').any(|c| c == "..") {
            return Err(refuse(format!(
                "volume destination {:?} must be an absolute path without ..",
                m.destination
            )));
        }
        if kind == Kind::Named && !valid_name(&m.name) {
            return Err(refuse(format!(
                "volume name {:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.', '_' or '-'",
                m.name
            )));
        }
        let source = if kind == Kind::Bind {
            let p = PathBuf::from(&m.source);
            if !p.is_absolute() || !p.is_dir() {
                return Err(refuse(format!(
                    "bind mount source {:?} must be an existing directory (absolute path)",
                    m.source
                )));
            }
            Some(p)
        } else {
            None
        };
        for o in &m.options {
            if !OPTIONS.contains(&o.as_str()) {
                return Err(refuse(format!(
                    "volume option {o:?} is not supported; use ro/rw (--read-only) or one of {}",
                    OPTIONS.join(", ")
                )));
            }
        }
        Ok(Volume {
            kind,
            name: if kind == Kind::Named {
                m.name.clone()
            } else {
                String::new()
            },
            source,
            destination: m.destination.clone(),
            read_only: m.read_only,
            options: m.options.clone(),
            labels: m.labels.clone().into_iter().collect(),
        })
    }

    /// Where its content lives on a node with work directory `work`, for container
    /// `id` (the volume's position is `index`).
    pub fn host_path(&self, work: &Path, id: &str, index: usize) -> PathBuf {
        match self.kind {
            Kind::Named => work.join("volumes").join(&self.name),
            Kind::Anonymous => work
                .join("volumes")
                .join("_anon")
                .join(id)
                .join(index.to_string()),
            Kind::Bind => self.source.clone().unwrap_or_default(),
        }
    }

    /// The OCI spec mount for it, from host path `source`.
    pub fn spec_mount(&self, source: &Path) -> Value {
        let mut options = vec![
            "rbind".to_string(),
            if self.read_only { "ro" } else { "rw" }.to_string(),
        ];
        options.extend(self.options.iter().cloned());
        json!({
            "destination": self.destination,
            "type": "bind",
            "source": source.display().to_string(),
            "options": options,
        })
    }

    /// The name of its object in a migration.
    pub fn object_name(&self, index: usize) -> String {
        match (self.read_only, self.kind) {
            (false, _) => format!("rw-{index}"),
            (true, Kind::Named) => format!("ro-{}", self.name),
            (true, _) => format!("ro-{index}"),
        }
    }
}

/// Parses a command-line volume: `NAME:DST[:OPTS]` (named), `/HOST/PATH:DST[:OPTS]`
/// (bind mount) or `DST[::OPTS]` (anonymous); OPTS is a comma list of `ro`, `rw`, mount
/// options and `label.KEY=VALUE`.
pub fn parse_cli(s: &str) -> Result<VolumeMsg, String> {
    let parts: Vec<&str> = s.splitn(3, ':').collect();
    let (kind, name, source, dst, opts) = match parts.as_slice() {
        [dst] => (VolumeKind::Anonymous, "", "", *dst, ""),
        [dst, "", opts] => (VolumeKind::Anonymous, "", "", *dst, *opts),
        [src, dst] | [src, dst, _] => {
            let opts = parts.get(2).copied().unwrap_or("");
            if src.starts_with('/') {
                (VolumeKind::Bind, "", *src, *dst, opts)
            } else {
                (VolumeKind::Named, *src, "", *dst, opts)
            }
        }
        _ => {
            return Err(format!(
                "volume {s:?}: expected NAME:DST[:OPTS], /PATH:DST[:OPTS] or DST"
            ))
        }
    };
    let mut m = VolumeMsg {
        kind: kind as i32,
        name: name.to_string(),
        source: source.to_string(),
        destination: dst.to_string(),
        ..Default::default()
    };
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => m.read_only = true,
            "rw" => m.read_only = false,
            _ => match o.strip_prefix("label.").and_then(|kv| kv.split_once('=')) {
                Some((k, v)) => {
                    m.labels.insert(k.to_string(), v.to_string());
                }
                None => m.options.push(o.to_string()),
            },
        }
    }
    Ok(m)
}

/// The volumes of a container, from its labels (none without the label).
pub fn from_labels(labels: &HashMap<String, String>) -> Result<Vec<Volume>, AgentError> {
    match labels.get(LABEL) {
        None => Ok(Vec::new()),
        Some(v) => serde_json::from_str(v)
            .map_err(|e| refuse(format!("label {LABEL} is not a volume list: {e}"))),
    }
}

/// The label value for `vols`.
pub fn to_label(vols: &[Volume]) -> String {
    serde_json::to_string(vols).unwrap_or_else(|_| "[]".into())
}

/// Creates the host directories of named and anonymous volumes (bind sources must
/// exist) and returns their paths, in order.
pub fn prepare_dirs(vols: &[Volume], work: &Path, id: &str) -> Result<Vec<PathBuf>, AgentError> {
    let mut out = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let p = v.host_path(work, id, i);
        if v.kind != Kind::Bind {
            fs::create_dir_all(&p).map_err(|source| AgentError::WriteFile {
                path: p.clone(),
                source,
            })?;
        }
        out.push(p);
    }
    Ok(out)
}

/// Removes anonymous volumes of container `id` (named volumes and bind sources stay).
pub fn remove_anonymous(work: &Path, id: &str) {
    let _ = fs::remove_dir_all(work.join("volumes").join("_anon").join(id));
}

fn digest_marker(work: &Path, name: &str) -> PathBuf {
    work.join("volumes").join(format!(".{name}.xfer-digest"))
}

/// The digest of the content a named read-only volume was installed with here.
pub fn installed_digest(work: &Path, name: &str) -> Option<String> {
    fs::read_to_string(digest_marker(work, name))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Writes a tar of directory `dir`'s content to `out`: entries in sorted order, with
/// modes, owners, times; symlinks as links. The same content gives the same bytes, so
/// rounds deduplicate. Not synced: it is scratch (what is published is verified by
/// digest, and a crash fails the migration anyway).
pub fn capture(dir: &Path, out: &Path) -> Result<u64, AgentError> {
    let werr = |source| AgentError::WriteFile {
        path: out.to_path_buf(),
        source,
    };
    let f = fs::File::create(out).map_err(werr)?;
    let w = capture_into(dir, io::BufWriter::new(f))?;
    let f = w.into_inner().map_err(|e| werr(e.into_error()))?;
    Ok(f.metadata().map(|m| m.len()).unwrap_or(0))
}

/// The tar of [`capture`], written to `w` (returned once the tar is complete).
pub fn capture_into<W: io::Write>(dir: &Path, w: W) -> Result<W, AgentError> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    fn walk<W: io::Write>(b: &mut tar::Builder<W>, root: &Path, rel: &Path) -> io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let r = rel.join(e.file_name());
            let ft = e.file_type()?;
            b.append_path_with_name(e.path(), &r)?;
            if ft.is_dir() {
                walk(b, root, &r)?;
            }
        }
        Ok(())
    }
    let rerr = |source| AgentError::ReadFile {
        path: dir.to_path_buf(),
        source,
    };
    walk(&mut b, dir, Path::new("")).map_err(rerr)?;
    b.into_inner().map_err(rerr)
}

/// A regular file of a tar: its header's BLAKE3 (the header holds its metadata), where
/// its data starts in the tar, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarFile {
    pub header: xfer_store::Digest,
    pub data: u64,
    pub len: u64,
}

/// The regular files of a tar, by path.
pub type TarIndex = std::collections::HashMap<std::path::PathBuf, TarFile>;

/// Unpacks the tar read from `r` into the (existing, empty) directory `into`, the way
/// [`install`] does: permissions, owners and times kept, directories' times set after
/// their content (so the same content captures to the same tar again).
pub fn unpack_into<R: io::Read>(r: R, into: &Path) -> io::Result<()> {
    unpack_into_indexed(r, into).map(drop)
}

/// [`unpack_into`], returning where each regular file lay in the tar.
pub fn unpack_into_indexed<R: io::Read>(r: R, into: &Path) -> io::Result<TarIndex> {
    let mut a = archive(r);
    let mut dirs = Vec::new();
    let mut index = TarIndex::new();
    for e in a.entries()? {
        let mut e = e?;
        let kind = e.header().entry_type();
        let mtime = e.header().mtime().ok();
        let rel = e.path()?.into_owned();
        if kind.is_file() {
            let f = TarFile {
                header: xfer_store::Digest::of(e.header().as_bytes()),
                data: e.raw_file_position(),
                len: e.size(),
            };
            index.insert(rel.clone(), f);
        }
        e.unpack_in(into)?;
        if let (true, Some(t)) = (kind.is_dir(), mtime) {
            dirs.push((into.join(rel), t));
        }
    }
    set_dir_times(&dirs)?;
    Ok(index)
}

fn archive<R: io::Read>(r: R) -> tar::Archive<R> {
    let mut a = tar::Archive::new(r);
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a
}

/// Directories' times, deepest last in `dirs`, set deepest first.
fn set_dir_times(dirs: &[(std::path::PathBuf, u64)]) -> io::Result<()> {
    for (d, t) in dirs.iter().rev() {
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(*t);
        fs::File::open(d)?.set_modified(when)?;
    }
    Ok(())
}

/// What [`patch_unpacked`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Patched {
    /// Regular files left as they were, and their bytes.
    pub kept: u64,
    pub kept_bytes: u64,
    /// Entries written from the tar, and their bytes.
    pub written: u64,
    pub written_bytes: u64,
    /// Paths removed (not in the tar).
    pub removed: u64,
}

/// Turns `dir`, an unpacked copy of an earlier tar, into an unpacked copy of the tar
/// at `tar_path`: a regular file for which `unchanged(path, its header, where its data
/// starts in the tar)` says it is the same file (header and data) as the same path in
/// the earlier tar is left alone (its data is not read here); every other entry is
/// unpacked over it; what the tar no longer has is removed; directories get their
/// times back. On error `dir` is in between: discard it.
pub fn patch_unpacked(
    dir: &Path,
    tar_path: &Path,
    mut unchanged: impl FnMut(&Path, &tar::Header, u64) -> bool,
) -> io::Result<Patched> {
    let mut a = archive(fs::File::open(tar_path)?);
    let mut st = Patched::default();
    let mut seen = std::collections::HashSet::new();
    let mut dirs = Vec::new();
    for e in a.entries_with_seek()? {
        let mut e = e?;
        let kind = e.header().entry_type();
        let mtime = e.header().mtime().ok();
        let rel = e.path()?.into_owned();
        seen.insert(rel.clone());
        let here = dir.join(&rel);
        if kind.is_file() {
            let is_file = here.symlink_metadata().is_ok_and(|m| m.is_file());
            if is_file && unchanged(&rel, e.header(), e.raw_file_position()) {
                st.kept += 1;
                st.kept_bytes += e.size();
                continue;
            }
        }
        // Another kind of entry now at this path: make room (unpacking a file does
        // not replace a directory, nor a directory a file).
        if let Ok(m) = here.symlink_metadata() {
            if m.is_dir() && !kind.is_dir() {
                fs::remove_dir_all(&here)?;
            } else if !m.is_dir() && kind.is_dir() {
                fs::remove_file(&here)?;
            }
        }
        st.written += 1;
        st.written_bytes += e.size();
        e.unpack_in(dir)?;
        if let (true, Some(t)) = (kind.is_dir(), mtime) {
            dirs.push((here, t));
        }
    }
    fn prune(
        root: &Path,
        rel: &Path,
        seen: &std::collections::HashSet<std::path::PathBuf>,
        removed: &mut u64,
    ) -> io::Result<()> {
        for e in fs::read_dir(root.join(rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            let is_dir = e.file_type()?.is_dir();
            if !seen.contains(&r) {
                *removed += 1;
                if is_dir {
                    fs::remove_dir_all(e.path())?;
                } else {
                    fs::remove_file(e.path())?;
                }
            } else if is_dir {
                prune(root, &r, seen, removed)?;
            }
        }
        Ok(())
    }
    prune(dir, Path::new(""), &seen, &mut st.removed)?;
    set_dir_times(&dirs)?;
    Ok(st)
}

/// Replaces directory `target`'s content with tar `tar_path` (unpacked beside it,
/// swapped in by rename). For a named read-only volume, `digest` is recorded so a
/// later migration of the same content skips it.
pub fn install(
    tar_path: &Path,
    target: &Path,
    marker: Option<(&Path, &str, &str)>,
) -> Result<(), AgentError> {
    let fresh = fresh_dir(target)?;
    fs::create_dir_all(&fresh).map_err(werr(&fresh))?;
    let f = fs::File::open(tar_path).map_err(|source| AgentError::ReadFile {
        path: tar_path.to_path_buf(),
        source,
    })?;
    if let Err(e) = unpack_into(io::BufReader::with_capacity(1 << 20, f), &fresh) {
        let _ = fs::remove_dir_all(&fresh);
        return Err(werr(&fresh)(e));
    }
    swap_in(&fresh, target, marker)
}

/// Installs a directory already unpacked elsewhere on the same file system (a
/// staged copy, see `node::stage`) as `target`, by rename, like [`install`].
pub fn install_unpacked(
    unpacked: &Path,
    target: &Path,
    marker: Option<(&Path, &str, &str)>,
) -> Result<(), AgentError> {
    let fresh = fresh_dir(target)?;
    fs::rename(unpacked, &fresh).map_err(|source| AgentError::WriteFile {
        path: fresh.clone(),
        source,
    })?;
    swap_in(&fresh, target, marker)
}

/// The directory beside `target` that a new content is unpacked into (made empty:
/// what a crash left there goes), its parent created.
fn fresh_dir(target: &Path) -> Result<std::path::PathBuf, AgentError> {
    let parent = target
        .parent()
        .ok_or_else(|| refuse(format!("volume path {} has no parent", target.display())))?;
    fs::create_dir_all(parent).map_err(|source| AgentError::WriteFile {
        path: parent.to_path_buf(),
        source,
    })?;
    let base = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fresh = parent.join(format!(".{base}.xfer-new"));
    let _ = fs::remove_dir_all(&fresh);
    let _ = fs::remove_dir_all(parent.join(format!(".{base}.xfer-old")));
    Ok(fresh)
}

/// A write error at `path`.
fn werr(path: &Path) -> impl FnOnce(io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::WriteFile { path, source }
}

/// Swaps `fresh` (beside `target`, see [`fresh_dir`]) in for `target`, keeping the
/// directory's own mode and owner; records the read-only digest `marker`.
fn swap_in(
    fresh: &Path,
    target: &Path,
    marker: Option<(&Path, &str, &str)>,
) -> Result<(), AgentError> {
    let old = fresh.with_file_name(
        fresh
            .file_name()
            .map(|n| n.to_string_lossy().replace(".xfer-new", ".xfer-old"))
            .unwrap_or_default(),
    );
    // Keep the directory's own mode and owner.
    if let Ok(m) = fs::metadata(target) {
        let _ = fs::set_permissions(fresh, m.permissions());
        let _ = std::os::unix::fs::chown(
            fresh,
            Some(std::os::unix::fs::MetadataExt::uid(&m)),
            Some(std::os::unix::fs::MetadataExt::gid(&m)),
        );
        fs::rename(target, &old).map_err(werr(target))?;
    }
    fs::rename(fresh, target).map_err(werr(target))?;
    let _ = fs::remove_dir_all(&old);
    if let Some((work, name, digest)) = marker {
        let m = digest_marker(work, name);
        fs::write(&m, digest).map_err(werr(&m))?;
    }
    Ok(())
}

/// Points the spec's bind mounts at this node's paths: each mount whose destination
/// is a volume's gets that volume's `sources` entry.
pub fn rewrite_mounts(
    spec_json: &[u8],
    vols: &[Volume],
    sources: &[PathBuf],
) -> Result<Vec<u8>, AgentError> {
    if vols.is_empty() {
        return Ok(spec_json.to_vec());
    }
    let mut spec: Value = serde_json::from_slice(spec_json)
        .map_err(|e| refuse(format!("the container's spec is not JSON: {e}")))?;
    let mounts = spec
        .get_mut("mounts")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| refuse("the container's spec has no mounts"))?;
    for (v, src) in vols.iter().zip(sources) {
        let m = mounts
            .iter_mut()
            .find(|m| m.get("destination").and_then(Value::as_str) == Some(&v.destination))
            .ok_or_else(|| refuse(format!("the spec has no mount at {}", v.destination)))?;
        m["source"] = Value::String(src.display().to_string());
    }
    serde_json::to_vec(&spec).map_err(|e| refuse(format!("encode the spec: {e}")))
}

/// The source side of a migration's volumes: which objects each round carries.
#[derive(Debug, Default)]
pub struct Moves {
    /// (object name, path on this node, read-only)
    items: Vec<(String, PathBuf, bool)>,
    /// Manifests of read-only volumes, once published (re-offered in the final round).
    ro_published: Vec<xfer_proto::v1::ObjectManifest>,
    /// When the last round's tars began (what changed after it is the next delta).
    scanned_at: Option<std::time::SystemTime>,
}

impl Moves {
    /// The volumes of container `id` on a node with work directory `work`.
    pub fn new(vols: &[Volume], work: &Path, id: &str) -> Moves {
        Moves {
            items: vols
                .iter()
                .enumerate()
                .map(|(i, v)| (v.object_name(i), v.host_path(work, id, i), v.read_only))
                .collect(),
            ro_published: Vec::new(),
            scanned_at: None,
        }
    }

    /// Moves of the given (object name, directory, read-only) items (tests).
    #[cfg(test)]
    pub(crate) fn of_dirs(items: Vec<(String, PathBuf, bool)>) -> Moves {
        Moves {
            items,
            ..Default::default()
        }
    }

    /// An upper bound of what the read-write volumes changed since the last round's
    /// tars began: the sizes of the entries modified (content or metadata) since then,
    /// each entry at least one tar header. `None` before any round.
    pub fn changed_since_scan(&self) -> Option<u64> {
        let since = self.scanned_at?;
        fn walk(dir: &Path, since: std::time::SystemTime, total: &mut u64) {
            let Ok(rd) = fs::read_dir(dir) else {
                // Gone or unreadable: the next round's tar says what it is.
                *total += 512;
                return;
            };
            for e in rd.flatten() {
                let Ok(md) = e.path().symlink_metadata() else {
                    continue;
                };
                let changed =
                    |t: std::io::Result<std::time::SystemTime>| t.is_ok_and(|t| t >= since);
                let ctime = std::time::UNIX_EPOCH
                    + std::time::Duration::new(
                        std::os::unix::fs::MetadataExt::ctime(&md).max(0) as u64,
                        std::os::unix::fs::MetadataExt::ctime_nsec(&md).clamp(0, 999_999_999)
                            as u32,
                    );
                if changed(md.modified()) || ctime >= since {
                    *total += 512 + if md.is_file() { md.len() } else { 0 };
                }
                if md.is_dir() {
                    walk(&e.path(), since, total);
                }
            }
        }
        let mut total = 0;
        for (_, dir, ro) in &self.items {
            if !*ro {
                walk(dir, since, &mut total);
            }
        }
        Some(total)
    }

    /// Whether the container has no volumes at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// This round's objects: every read-write volume, and the read-only ones until
    /// they were published once; each names the volume's directory, whose tar
    /// ([`capture_into`]) publishing streams into the chunker.
    pub fn round_files(&mut self) -> Vec<crate::transfer::OutFile> {
        let mut out = Vec::new();
        // Before the first tar, less the file clock's coarseness (it lags the precise
        // clock by up to a tick): a change racing the walk counts as changed after it.
        self.scanned_at = Some(std::time::SystemTime::now() - std::time::Duration::from_millis(50));
        for (name, src, ro) in &self.items {
            if *ro && !self.ro_published.is_empty() {
                continue;
            }
            out.push(crate::transfer::OutFile {
                kind: xfer_proto::v1::FileKind::Volume,
                name: name.clone(),
                path: src.clone(),
            });
        }
        out
    }

    /// Notes what a round published; returns the read-only manifests that round did
    /// not carry (a final round re-offers them, so the destination installs them).
    pub fn published(
        &mut self,
        manifests: &[xfer_proto::v1::ObjectManifest],
    ) -> Vec<xfer_proto::v1::ObjectManifest> {
        let ro: Vec<_> = manifests
            .iter()
            .filter(|m| {
                m.kind == xfer_proto::v1::FileKind::Volume as i32 && m.name.starts_with("ro-")
            })
            .cloned()
            .collect();
        if !ro.is_empty() {
            self.ro_published = ro;
            return Vec::new();
        }
        self.ro_published.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn msg(kind: VolumeKind, name: &str, dst: &str) -> VolumeMsg {
        VolumeMsg {
            kind: kind as i32,
            name: name.into(),
            destination: dst.into(),
            ..Default::default()
        }
    }

    #[test]
    fn command_line_forms() {
        let m = parse_cli("data:/data:ro,nosuid,label.tier=gold").expect("named");
        assert_eq!(m.kind, VolumeKind::Named as i32);
        assert_eq!((m.name.as_str(), m.destination.as_str()), ("data", "/data"));
        assert!(m.read_only);
        assert_eq!(m.options, vec!["nosuid".to_string()]);
        assert_eq!(m.labels.get("tier").map(String::as_str), Some("gold"));
        let b = parse_cli("/srv/x:/x").expect("bind");
        assert_eq!(b.kind, VolumeKind::Bind as i32);
        assert_eq!(b.source, "/srv/x");
        let a = parse_cli("/scratch").expect("anonymous");
        assert_eq!(a.kind, VolumeKind::Anonymous as i32);
        assert_eq!(a.destination, "/scratch");
        let a = parse_cli("/scratch::ro").expect("anonymous with options");
        assert!(a.read_only);
    }

    #[test]
    fn requests_are_checked() {
        assert!(Volume::from_msg(&msg(VolumeKind::Named, "data", "/data")).is_ok());
        assert!(Volume::from_msg(&msg(VolumeKind::Named, "../x", "/data")).is_err());
        assert!(Volume::from_msg(&msg(VolumeKind::Named, "data", "data")).is_err());
        assert!(Volume::from_msg(&msg(VolumeKind::Named, "data", "/a/../b")).is_err());
        assert!(Volume::from_msg(&msg(VolumeKind::Unspecified, "data", "/d")).is_err());
        let mut b = msg(VolumeKind::Bind, "", "/d");
        b.source = "/definitely/not/here".into();
        assert!(Volume::from_msg(&b).is_err());
        let mut o = msg(VolumeKind::Anonymous, "", "/d");
        o.options = vec!["nosuid".into(), "bogus".into()];
        let e = Volume::from_msg(&o).expect_err("bad option");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn labels_round_trip_and_names() {
        let mut m = msg(VolumeKind::Named, "conf", "/conf");
        m.read_only = true;
        m.options = vec!["nodev".into()];
        m.labels.insert("tier".into(), "gold".into());
        let v = Volume::from_msg(&m).expect("ok");
        let a = Volume::from_msg(&msg(VolumeKind::Anonymous, "", "/tmp/x")).expect("ok");
        let labels: HashMap<String, String> =
            [(LABEL.to_string(), to_label(&[v.clone(), a.clone()]))].into();
        assert_eq!(
            from_labels(&labels).expect("parse"),
            vec![v.clone(), a.clone()]
        );
        assert_eq!(v.object_name(0), "ro-conf");
        assert_eq!(a.object_name(1), "rw-1");
        let mount = v.spec_mount(Path::new("/w/volumes/conf"));
        assert_eq!(mount["options"], json!(["rbind", "ro", "nodev"]));
        assert_eq!(
            a.host_path(Path::new("/w"), "c1", 1),
            PathBuf::from("/w/volumes/_anon/c1/1")
        );
    }

    #[test]
    fn capture_is_deterministic_and_install_restores_it() {
        let t = tempfile::tempdir().expect("tmp");
        let src = t.path().join("src");
        fs::create_dir_all(src.join("sub")).expect("mkdir");
        fs::write(src.join("b.txt"), b"bee").expect("write");
        fs::write(src.join("sub/a.txt"), b"ay").expect("write");
        fs::set_permissions(src.join("b.txt"), fs::Permissions::from_mode(0o640)).expect("chmod");
        std::os::unix::fs::symlink("b.txt", src.join("link")).expect("symlink");
        // An old directory time, which unpacking its content would otherwise change.
        fs::File::open(src.join("sub"))
            .and_then(|f| {
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            })
            .expect("set mtime");
        let (t1, t2) = (t.path().join("1.tar"), t.path().join("2.tar"));
        capture(&src, &t1).expect("capture");
        capture(&src, &t2).expect("capture");
        assert_eq!(fs::read(&t1).expect("read"), fs::read(&t2).expect("read"));

        let dst = t.path().join("work/volumes/conf");
        fs::create_dir_all(&dst).expect("mkdir");
        fs::write(dst.join("stale"), b"old").expect("write");
        let work = t.path().join("work");
        install(&t1, &dst, Some((&work, "conf", "abc"))).expect("install");
        assert_eq!(fs::read(dst.join("b.txt")).expect("b"), b"bee");
        assert_eq!(fs::read(dst.join("sub/a.txt")).expect("a"), b"ay");
        assert!(!dst.join("stale").exists(), "old content replaced");
        let mode = fs::metadata(dst.join("b.txt"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
        assert_eq!(
            fs::read_link(dst.join("link")).expect("link"),
            Path::new("b.txt")
        );
        assert_eq!(installed_digest(&work, "conf").as_deref(), Some("abc"));
        // What was installed captures to the same bytes (directory times included).
        let t3 = t.path().join("3.tar");
        capture(&dst, &t3).expect("capture the installed copy");
        assert_eq!(fs::read(&t3).expect("read"), fs::read(&t1).expect("read"));
    }

    #[test]
    fn an_unpacked_copy_is_installed_by_rename_keeping_the_targets_mode() {
        let t = tempfile::tempdir().expect("tmp");
        let staged = t.path().join("inbound/staged/rw-0-x");
        fs::create_dir_all(staged.join("sub")).expect("mkdir");
        fs::write(staged.join("sub/f"), b"new").expect("write");
        let dst = t.path().join("work/volumes/app-0");
        fs::create_dir_all(&dst).expect("mkdir");
        fs::write(dst.join("stale"), b"old").expect("write");
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o750)).expect("chmod");
        install_unpacked(&staged, &dst, None).expect("install");
        assert_eq!(fs::read(dst.join("sub/f")).expect("f"), b"new");
        assert!(!dst.join("stale").exists(), "old content replaced");
        assert!(!staged.exists(), "moved, not copied");
        let mode = fs::metadata(&dst).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o750);
        let leftovers: Vec<_> = fs::read_dir(dst.parent().expect("parent"))
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("app-0")]);
        // Nothing to move: an error, the target untouched.
        assert!(install_unpacked(&staged, &dst, None).is_err());
        assert_eq!(fs::read(dst.join("sub/f")).expect("f"), b"new");
    }

    #[test]
    fn spec_mounts_are_pointed_at_this_node() {
        let v = Volume::from_msg(&msg(VolumeKind::Named, "data", "/data")).expect("ok");
        let spec = json!({"mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                                     v.spec_mount(Path::new("/h1/volumes/data"))]});
        let out = rewrite_mounts(
            &serde_json::to_vec(&spec).expect("json"),
            std::slice::from_ref(&v),
            &[PathBuf::from("/h2/volumes/data")],
        )
        .expect("rewrite");
        let out: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(out["mounts"][1]["source"], "/h2/volumes/data");
        assert_eq!(out["mounts"][0]["source"], "proc");
        assert_eq!(out["mounts"][1]["options"], json!(["rbind", "rw"]));
    }
}
