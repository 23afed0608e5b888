//! The crate's error types.

use std::path::PathBuf;

use crate::{Digest, MAX_FRAME};

/// What went wrong in the store.
///
/// The variant a transfer acts on is [`StoreError::Missing`]: the chunk is not here
/// (never stored, collected, or found corrupt and quarantined) and must be fetched
/// again; [`StoreError::missing_chunk`] extracts its id.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A frame did not decompress.
    #[error("decompress frame")]
    Decompress(#[source] std::io::Error),
    /// A frame decoded to another size than announced, or too large.
    #[error("frame decodes to {got} bytes, expected {want} (limit {MAX_FRAME})")]
    FrameSize { got: usize, want: usize },
    /// A frame did not compress.
    #[error("compress frame")]
    Compress(#[source] std::io::Error),
    /// A digest was not 32 bytes.
    #[error("digest has {0} bytes, expected 32")]
    ParseDigest(usize),

    /// The chunk is not in the store (never stored, collected, or found corrupt on
    /// read and moved to `quarantined`). Fetch it again and `put` it: that heals it.
    #[error("chunk {id} missing{}", quarantined.as_ref().map(|p| format!(" (corrupt copy quarantined at {})", p.display())).unwrap_or_default())]
    Missing {
        id: Digest,
        quarantined: Option<PathBuf>,
    },
    /// Bytes offered as chunk `want` hash to `got` (a peer sent the wrong data).
    #[error("chunk verification: bytes hash to {got}, expected {want}")]
    Verify { want: Digest, got: Digest },
    /// A chunk is larger than [`MAX_CHUNK`](crate::MAX_CHUNK), or empty.
    #[error("chunk of {0} bytes (must be 1..={MAX_FRAME})")]
    ChunkSize(usize),
    /// A file-system operation of the store failed.
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another `Store`) has this directory open.
    #[error("store {} is in use by another process", .0.display())]
    Locked(PathBuf),
    /// The directory holds a store of another layout version.
    #[error("store {} has layout {found:?}, this build reads {expected:?}", path.display())]
    Layout {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    /// A lease name is empty, too long, or has characters outside `[A-Za-z0-9._-]`
    /// (or starts with `.`).
    #[error("invalid lease name {0:?}")]
    LeaseName(String),
    /// A lease file on disk does not parse.
    #[error("lease file {}: {reason}", path.display())]
    LeaseFile { path: PathBuf, reason: String },
    /// `remove` of a chunk that a live lease protects.
    #[error("chunk {0} is leased")]
    Leased(Digest),
    /// A manifest did not decode.
    #[error("decode manifest")]
    Manifest(#[from] ManifestError),
    /// A rebuilt object does not match its manifest.
    #[error("rebuilt object: {got_len} bytes {got}, manifest says {want_len} bytes {want}")]
    ObjectDigest {
        want: Digest,
        got: Digest,
        want_len: u64,
        got_len: u64,
    },
    /// Writing a rebuilt object failed.
    #[error("write rebuilt object")]
    Write(#[source] std::io::Error),
    /// Reading the input of the pipeline failed.
    #[error("read pipeline input")]
    Read(#[source] std::io::Error),
    /// A worker thread of the pipeline could not be started.
    #[error("start pipeline worker")]
    Spawn(#[source] std::io::Error),
}

impl StoreError {
    /// The id of the chunk to fetch again, if this error says a chunk is missing.
    pub fn missing_chunk(&self) -> Option<Digest> {
        match self {
            StoreError::Missing { id, .. } => Some(*id),
            _ => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Why a manifest did not decode. Decoding never panics and allocates at most in
/// proportion to the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The input does not start with the manifest magic `XFMF`.
    #[error("not a manifest (bad magic)")]
    Magic,
    /// The manifest was written by a format version this build does not read.
    #[error("manifest format version {found}, this build reads version {supported}")]
    Version { found: u16, supported: u16 },
    /// The object kind byte is 0 (unspecified) or unknown.
    #[error("unknown object kind {0}")]
    Kind(u8),
    /// Reserved header flags are set.
    #[error("unknown manifest flags {0:#04x}")]
    Flags(u8),
    /// The input ended inside `what`.
    #[error("manifest truncated in {what}")]
    Truncated { what: &'static str },
    /// An entry tag is neither data (1) nor zero (2).
    #[error("entry {index}: unknown tag {tag}")]
    Tag { index: u64, tag: u8 },
    /// A varint is longer than 10 bytes or overflows.
    #[error("entry {index}: bad varint")]
    Varint { index: u64 },
    /// A chunk length is 0, above the limit, or above a page for memory objects.
    #[error("entry {index}: chunk length {len} out of range")]
    ChunkLen { index: u64, len: u64 },
    /// The entry count cannot fit in the input.
    #[error("{count} entries cannot fit in {bytes} bytes")]
    Count { count: u64, bytes: usize },
    /// Chunk lengths do not add up to the object length.
    #[error("chunk lengths add up to {sum}, object length is {length}")]
    Length { sum: u64, length: u64 },
    /// Bytes follow the last entry.
    #[error("{0} trailing bytes after the last entry")]
    Trailing(usize),
}
