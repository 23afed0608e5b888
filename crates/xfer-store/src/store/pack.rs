//! The pack file format: records appended in batches, each batch sealed by a commit
//! record that carries the BLAKE3 of the batch's bytes. See the `store` module docs.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use crate::{Digest, StoreError, MAX_CHUNK};

pub(super) const PACK_MAGIC: &[u8; 4] = b"XFPK";
pub(super) const PACK_VERSION: u32 = 1;
/// Pack header: magic, version u32, sequence number u32, reserved u32.
pub(super) const HEADER_LEN: u64 = 16;
/// Record header: kind u8, 3 reserved bytes, a u32, b u32, c u32, d u64, id 32 bytes.
pub(super) const REC_LEN: usize = 56;

pub(super) const KIND_CHUNK: u8 = 1;
pub(super) const KIND_TOMBSTONE: u8 = 2;
pub(super) const KIND_COMMIT: u8 = 3;

/// One record header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rec {
    pub kind: u8,
    /// Chunk: decoded length. Commit: number of records in the batch.
    pub a: u32,
    /// Chunk: frame length (the frame follows the header).
    pub b: u32,
    /// Tombstone: pack of the removed record.
    pub c: u32,
    /// Chunk: write time (unix ns). Tombstone: offset of the removed frame.
    /// Commit: offset of the batch's first record.
    pub d: u64,
    /// Chunk and tombstone: chunk id. Commit: BLAKE3 of the batch's records.
    pub id: Digest,
}

impl Rec {
    pub fn encode(&self) -> [u8; REC_LEN] {
        let mut h = [0u8; REC_LEN];
        h[0] = self.kind;
        h[4..8].copy_from_slice(&self.a.to_le_bytes());
        h[8..12].copy_from_slice(&self.b.to_le_bytes());
        h[12..16].copy_from_slice(&self.c.to_le_bytes());
        h[16..24].copy_from_slice(&self.d.to_le_bytes());
        h[24..56].copy_from_slice(&self.id.0);
        h
    }

    pub fn decode(h: &[u8; REC_LEN]) -> Rec {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut d = [0u8; 8];
        d.copy_from_slice(&h[16..24]);
        let mut id = [0u8; 32];
        id.copy_from_slice(&h[24..56]);
        Rec {
            kind: h[0],
            a: u32_at(4),
            b: u32_at(8),
            c: u32_at(12),
            d: u64::from_le_bytes(d),
            id: Digest(id),
        }
    }

    /// Header bytes that are well formed for their kind (reserved bytes zero,
    /// lengths in range).
    fn plausible(&self, raw: &[u8; REC_LEN]) -> bool {
        if raw[1..4] != [0, 0, 0] {
            return false;
        }
        match self.kind {
            KIND_CHUNK => {
                let raw_len = self.a as usize;
                raw_len > 0
                    && raw_len <= MAX_CHUNK
                    && self.b > 0
                    && (self.b as usize) <= zstd::zstd_safe::compress_bound(raw_len)
                    && self.c == 0
            }
            KIND_TOMBSTONE => self.a == 0 && self.b == 0,
            KIND_COMMIT => self.b == 0 && self.c == 0,
            _ => false,
        }
    }
}

pub(super) fn encode_header(seq: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(PACK_MAGIC);
    h[4..8].copy_from_slice(&PACK_VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    h
}

/// A chunk or tombstone record found in a committed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// A chunk whose frame starts at `offset`.
    Chunk {
        id: Digest,
        offset: u64,
        raw_len: u32,
        stored_len: u32,
        written_ns: u64,
    },
    /// The record of `id` at (`pack`, `offset`) was removed.
    Tombstone { id: Digest, pack: u32, offset: u64 },
}

/// What [`scan`] found in one pack.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Records of committed batches, in file order.
    pub found: Vec<Found>,
    /// Length of the file up to the end of the last committed batch.
    pub valid_len: u64,
}

/// Why a pack cannot be read at all.
#[derive(Debug)]
pub(super) enum ScanError {
    /// The header is missing or wrong (a pack torn at creation, or not a pack).
    Header,
    Io(StoreError),
}

/// Reads the records of the committed batches of a pack. With `verify`, each batch's
/// bytes are hashed and compared to its commit record, and the pack ends after the
/// last batch that matches: batches after it are a tail torn by a crash before its
/// fsync completed. A batch that fails *before* a matching one was durable when
/// that one was written (each commit is fsynced before the next batch is written),
/// so it has rotted since: it is kept, and its chunks are verified on read like any
/// other. Without `verify`, only the structure is checked (packs older than the
/// newest were complete and fsynced before a newer pack was created).
pub(super) fn scan(file: &File, path: &Path, seq: u32, verify: bool) -> Result<Scan, ScanError> {
    let io = |op: &'static str| move |e| ScanError::Io(StoreError::io(op, path, e));
    let len = file.metadata().map_err(io("stat"))?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    r.rewind().map_err(io("seek"))?;
    let mut h = [0u8; HEADER_LEN as usize];
    if len < HEADER_LEN || r.read_exact(&mut h).is_err() || h != encode_header(seq) {
        return Err(ScanError::Header);
    }
    let mut out = Scan::default();
    let mut pos = HEADER_LEN;
    let mut pending: Vec<Found> = Vec::new();
    let mut hasher = blake3::Hasher::new();
    let mut frame = Vec::new();
    // Records and length up to the last batch whose hash matched.
    let mut good = (0usize, HEADER_LEN);
    let mut end = HEADER_LEN;
    loop {
        if pos + REC_LEN as u64 > len {
            break;
        }
        let mut raw = [0u8; REC_LEN];
        if r.read_exact(&mut raw).is_err() {
            break;
        }
        let rec = Rec::decode(&raw);
        if !rec.plausible(&raw) {
            break;
        }
        let at = pos;
        pos += REC_LEN as u64;
        match rec.kind {
            KIND_CHUNK => {
                let n = rec.b as u64;
                if pos + n > len {
                    break;
                }
                if verify {
                    frame.resize(n as usize, 0);
                    if r.read_exact(&mut frame).is_err() {
                        break;
                    }
                    hasher.update(&raw);
                    hasher.update(&frame);
                } else {
                    r.seek_relative(n as i64).map_err(io("seek"))?;
                }
                pending.push(Found::Chunk {
                    id: rec.id,
                    offset: pos,
                    raw_len: rec.a,
                    stored_len: rec.b,
                    written_ns: rec.d,
                });
                pos += n;
            }
            KIND_TOMBSTONE => {
                if verify {
                    hasher.update(&raw);
                }
                pending.push(Found::Tombstone {
                    id: rec.id,
                    pack: rec.c,
                    offset: rec.d,
                });
            }
            _ => {
                // Commit.
                if rec.d != end || rec.a as usize != pending.len() {
                    let _ = at;
                    break;
                }
                let matches = !verify || Digest(*hasher.finalize().as_bytes()) == rec.id;
                out.found.append(&mut pending);
                end = pos;
                if matches {
                    good = (out.found.len(), end);
                }
                hasher.reset();
            }
        }
    }
    out.found.truncate(good.0);
    out.valid_len = good.1;
    Ok(out)
}

/// Builds the records of one batch in memory; [`Records::finish`] appends the commit
/// record for a batch that will start at file offset `base`.
#[derive(Default)]
pub(super) struct Records {
    pub buf: Vec<u8>,
    pub count: u32,
}

impl Records {
    /// Appends a chunk record; returns the frame's offset relative to the batch start.
    pub fn chunk(&mut self, id: Digest, raw_len: u32, frame: &[u8], now_ns: u64) -> u64 {
        let h = Rec {
            kind: KIND_CHUNK,
            a: raw_len,
            b: frame.len() as u32,
            c: 0,
            d: now_ns,
            id,
        };
        self.buf.extend_from_slice(&h.encode());
        let at = self.buf.len() as u64;
        self.buf.extend_from_slice(frame);
        self.count += 1;
        at
    }

    pub fn tombstone(&mut self, id: Digest, pack: u32, offset: u64) {
        let h = Rec {
            kind: KIND_TOMBSTONE,
            a: 0,
            b: 0,
            c: pack,
            d: offset,
            id,
        };
        self.buf.extend_from_slice(&h.encode());
        self.count += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends the commit record for a batch written at `base`.
    pub fn finish(&mut self, base: u64) {
        let h = Rec {
            kind: KIND_COMMIT,
            a: self.count,
            b: 0,
            c: 0,
            d: base,
            id: Digest::of(&self.buf),
        };
        self.buf.extend_from_slice(&h.encode());
    }
}
