//! Streaming files between agents: each file travels as a sequence of [`FileChunk`]s,
//! every chunk one zstd frame of at most [`CHUNK`] bytes, the last one carrying the
//! file's size and BLAKE3 digest, which the receiver checks before it accepts the file.
//!
//! The sender reads and compresses on a blocking thread that feeds a bounded channel,
//! so the gRPC stream's flow control paces the disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;
use xfer_proto::v1::{FileChunk, FileKind};
use xfer_store::{frame, Digest, Hasher};

use crate::error::AgentError;

/// Bytes of file data per chunk (before compression).
pub const CHUNK: usize = 1 << 20;

/// A file to send.
#[derive(Debug, Clone)]
pub struct OutFile {
    pub kind: FileKind,
    pub name: String,
    pub path: PathBuf,
}

/// Counters of a transfer.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub files: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Streams `files` as chunks into `tx`; returns the counters. Runs on a blocking thread.
pub fn produce(
    migration_id: String,
    files: Vec<OutFile>,
    tx: mpsc::Sender<FileChunk>,
) -> Result<Sent, AgentError> {
    let mut sent = Sent::default();
    let mut buf = vec![0u8; CHUNK];
    for f in files {
        let io = |source| AgentError::ReadFile {
            path: f.path.clone(),
            source,
        };
        let mut file = File::open(&f.path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777;
        let mut hasher = Hasher::new();
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(io)?;
            hasher.update(&buf[..n]);
            let last = n < CHUNK;
            let data = frame::encode(&buf[..n]).map_err(AgentError::Frame)?;
            sent.wire_bytes += data.len() as u64;
            let chunk = FileChunk {
                migration_id: migration_id.clone(),
                kind: f.kind as i32,
                name: f.name.clone(),
                offset,
                zstd_data: data,
                raw_len: n as u64,
                last,
                total_size: if last { offset + n as u64 } else { 0 },
                blake3: if last {
                    hasher.finish().0.to_vec()
                } else {
                    Vec::new()
                },
                mode,
            };
            offset += n as u64;
            if tx.blocking_send(chunk).is_err() {
                return Err(AgentError::StreamClosed);
            }
            if last {
                break;
            }
        }
        sent.files += 1;
        sent.raw_bytes += offset;
    }
    Ok(sent)
}

/// A file received and verified.
#[derive(Debug, Clone)]
pub struct InFile {
    pub kind: FileKind,
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub digest: Digest,
}

struct Current {
    kind: FileKind,
    name: String,
    path: PathBuf,
    file: File,
    hasher: Hasher,
    written: u64,
}

/// Receives chunks into a directory: CRIU images under `criu/`, the writable-layer
/// diff as `rootfs.tar`, image blobs under `blobs/`.
#[derive(Default)]
pub struct Receiver {
    dir: PathBuf,
    current: Option<Current>,
    done: BTreeMap<(i32, String), InFile>,
    pub wire_bytes: u64,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver").field("dir", &self.dir).finish()
    }
}

/// Where a received file of `kind` named `name` is stored under `dir`.
pub fn place(dir: &Path, kind: FileKind, name: &str) -> Result<PathBuf, AgentError> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.contains('/')
        || name.contains('\0')
        || name == "."
        || name == "..";
    if bad {
        return Err(AgentError::BadChunk(format!(
            "file name {name:?} is not a plain file name"
        )));
    }
    Ok(match kind {
        FileKind::CriuImage => dir.join("criu").join(name),
        FileKind::RootfsDiff => dir.join("rootfs.tar"),
        FileKind::ImageBlob => dir.join("blobs").join(name.replace(':', "_")),
        FileKind::Volume => dir.join("volumes").join(format!("{name}.tar")),
        FileKind::Unspecified => {
            return Err(AgentError::BadChunk("file kind UNSPECIFIED".into()));
        }
    })
}

impl Receiver {
    /// A receiver writing under `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            ..Default::default()
        }
    }

    /// Takes one chunk: decompress, write, hash; on the last chunk of a file, verify.
    pub fn accept(&mut self, c: FileChunk) -> Result<(), AgentError> {
        let kind = xfer_proto::require_file_kind(c.kind).map_err(AgentError::Decode)?;
        self.wire_bytes += c.zstd_data.len() as u64;
        let same = self
            .current
            .as_ref()
            .is_some_and(|cur| cur.kind == kind && cur.name == c.name);
        if !same {
            if let Some(cur) = &self.current {
                return Err(AgentError::BadChunk(format!(
                    "file {} ended without its last chunk",
                    cur.name
                )));
            }
            if c.offset != 0 {
                return Err(AgentError::BadChunk(format!(
                    "file {} starts at offset {}",
                    c.name, c.offset
                )));
            }
            let path = place(&self.dir, kind, &c.name)?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| AgentError::WriteFile {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
            let file = File::create(&path).map_err(|source| AgentError::WriteFile {
                path: path.clone(),
                source,
            })?;
            if c.mode != 0 {
                let _ = std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(c.mode & 0o777),
                );
            }
            self.current = Some(Current {
                kind,
                name: c.name.clone(),
                path,
                file,
                hasher: Hasher::new(),
                written: 0,
            });
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(AgentError::BadChunk("no file open".into()));
        };
        if c.offset != cur.written {
            return Err(AgentError::BadChunk(format!(
                "file {}: chunk at offset {}, expected {}",
                cur.name, c.offset, cur.written
            )));
        }
        let raw_len = usize::try_from(c.raw_len)
            .map_err(|_| AgentError::BadChunk(format!("chunk length {} too large", c.raw_len)))?;
        let data = frame::decode(&c.zstd_data, raw_len).map_err(AgentError::Frame)?;
        cur.file
            .write_all(&data)
            .map_err(|source| AgentError::WriteFile {
                path: cur.path.clone(),
                source,
            })?;
        cur.hasher.update(&data);
        cur.written += data.len() as u64;
        if c.last {
            let digest = cur.hasher.finish();
            let want = Digest::from_slice(&c.blake3).map_err(AgentError::Frame)?;
            if c.total_size != cur.written || digest != want {
                return Err(AgentError::Verify {
                    name: cur.name.clone(),
                    detail: format!(
                        "got {} bytes {digest}, sender announced {} bytes {want}",
                        cur.written, c.total_size
                    ),
                });
            }
            cur.file
                .sync_all()
                .map_err(|source| AgentError::WriteFile {
                    path: cur.path.clone(),
                    source,
                })?;
            let Some(cur) = self.current.take() else {
                return Err(AgentError::BadChunk("no file open".into()));
            };
            self.done.insert(
                (kind as i32, cur.name.clone()),
                InFile {
                    kind,
                    name: cur.name,
                    path: cur.path,
                    size: cur.written,
                    digest,
                },
            );
        }
        Ok(())
    }

    /// Ends the stream: every file must be complete.
    pub fn finish(self) -> Result<Vec<InFile>, AgentError> {
        if let Some(cur) = self.current {
            return Err(AgentError::BadChunk(format!(
                "stream ended inside file {} at {} bytes",
                cur.name, cur.written
            )));
        }
        Ok(self.done.into_values().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(sizes: &[usize]) -> (Vec<FileChunk>, tempfile::TempDir) {
        let src = tempfile::tempdir().expect("tmp");
        let mut files = Vec::new();
        for (i, s) in sizes.iter().enumerate() {
            let p = src.path().join(format!("f{i}"));
            let data: Vec<u8> = (0..*s).map(|k| (k * 7 + i) as u8).collect();
            std::fs::write(&p, data).expect("write");
            files.push(OutFile {
                kind: FileKind::CriuImage,
                name: format!("f{i}.img"),
                path: p,
            });
        }
        let (tx, mut rx) = mpsc::channel(1024);
        let sent = std::thread::spawn(move || produce("m".into(), files, tx));
        let mut chunks = Vec::new();
        while let Some(c) = rx.blocking_recv() {
            chunks.push(c);
        }
        sent.join().expect("join").expect("produce");
        (chunks, src)
    }

    #[test]
    fn files_arrive_verified() {
        let (chunks, src) = roundtrip(&[0, 10, CHUNK, CHUNK * 2 + 5]);
        let dst = tempfile::tempdir().expect("tmp");
        let mut r = Receiver::new(dst.path().to_path_buf());
        for c in chunks {
            r.accept(c).expect("accept");
        }
        let got = r.finish().expect("finish");
        assert_eq!(got.len(), 4);
        for (i, _) in [0, 10, CHUNK, CHUNK * 2 + 5].iter().enumerate() {
            let a = std::fs::read(src.path().join(format!("f{i}"))).expect("read");
            let b = std::fs::read(dst.path().join("criu").join(format!("f{i}.img"))).expect("read");
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_flipped_byte_is_refused() {
        let (mut chunks, _src) = roundtrip(&[5000]);
        let c = &mut chunks[0];
        let mut raw = frame::decode(&c.zstd_data, c.raw_len as usize).expect("decode");
        raw[17] ^= 1;
        c.zstd_data = frame::encode(&raw).expect("encode");
        let dst = tempfile::tempdir().expect("tmp");
        let mut r = Receiver::new(dst.path().to_path_buf());
        let err = chunks
            .into_iter()
            .try_for_each(|c| r.accept(c))
            .expect_err("must fail");
        assert!(matches!(err, AgentError::Verify { .. }), "{err}");
    }

    #[test]
    fn truncated_stream_and_bad_names_are_refused() {
        let (chunks, _src) = roundtrip(&[CHUNK * 2]);
        let dst = tempfile::tempdir().expect("tmp");
        let mut r = Receiver::new(dst.path().to_path_buf());
        r.accept(chunks[0].clone()).expect("first");
        assert!(r.finish().is_err());
        assert!(place(dst.path(), FileKind::CriuImage, "../etc/passwd").is_err());
        assert!(place(dst.path(), FileKind::Unspecified, "x").is_err());
        let mut r = Receiver::new(dst.path().to_path_buf());
        let mut c = chunks[1].clone();
        c.offset = 0;
        c.name = "other".into();
        c.offset = 5;
        assert!(r.accept(c).is_err());
    }
}
