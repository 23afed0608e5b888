//! Encoding and fallible decoding of the chunk messages.
//!
//! Every decoder is a plain function over the generated message (or raw bytes) that
//! returns a [`ChunkError`] on malformed input and never panics, so each can be fuzzed
//! on its own.

use serde::{Deserialize, Serialize};
use xfer_proto::v1::{Chunk, ChunkBatch, FetchRequest, HaveReply, HaveRequest, PeerLoad};
use xfer_store::{Digest, MAX_FRAME};

use super::ChunkError;

/// Bytes of one packed id.
pub const ID_LEN: usize = 32;

/// Most ids in one `Have` call (8 MiB of ids); clients split larger sets.
pub const MAX_HAVE_IDS: usize = 1 << 18;

/// Most ids in one `Fetch` request (2 MiB of ids).
pub const MAX_FETCH_IDS: usize = 1 << 16;

/// Default bound of the zstd bytes in one batch.
pub const DEFAULT_BATCH_BYTES: usize = 1 << 20;

/// Smallest batch bound a server accepts (smaller requests are raised to it).
pub const MIN_BATCH_BYTES: usize = 64 << 10;

/// Largest batch bound a server accepts (larger requests are lowered to it).
pub const MAX_BATCH_BYTES: usize = 4 << 20;

/// Largest zstd frame of a chunk: zstd's compress bound of [`MAX_FRAME`] bytes, with
/// room for the frame header.
pub const MAX_WIRE_FRAME: usize = MAX_FRAME + (MAX_FRAME >> 8) + 4096;

/// A peer's reported load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Fetch streams it serves now (all clients).
    pub fetch_streams: u32,
    /// Wire bytes per second it served recently.
    pub served_bytes_per_sec: u64,
}

impl From<&PeerLoad> for Load {
    fn from(p: &PeerLoad) -> Self {
        Load {
            fetch_streams: p.fetch_streams,
            served_bytes_per_sec: p.served_bytes_per_sec,
        }
    }
}

impl From<Load> for PeerLoad {
    fn from(l: Load) -> Self {
        PeerLoad {
            fetch_streams: l.fetch_streams,
            served_bytes_per_sec: l.served_bytes_per_sec,
        }
    }
}

/// One chunk as received: not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireChunk {
    pub id: Digest,
    /// The zstd frame, as the peer stores it.
    pub frame: Vec<u8>,
    /// Its decoded size (at most [`MAX_FRAME`]).
    pub raw_len: u32,
}

/// A decoded [`ChunkBatch`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub chunks: Vec<WireChunk>,
    /// Ids the peer lacks or found corrupt.
    pub missing: Vec<Digest>,
    pub load: Option<Load>,
}

impl Batch {
    /// Wire bytes of the batch's frames.
    pub fn frame_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.frame.len()).sum()
    }
}

/// A decoded [`FetchRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchOrder {
    pub ids: Vec<Digest>,
    /// The batch bound, clamped to [[`MIN_BATCH_BYTES`], [`MAX_BATCH_BYTES`]].
    pub max_batch_bytes: usize,
}

/// Packs ids, 32 bytes each, in order.
pub fn encode_ids(ids: &[Digest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ids.len() * ID_LEN);
    for id in ids {
        out.extend_from_slice(&id.0);
    }
    out
}

/// Unpacks ids; the length must be a multiple of 32.
pub fn decode_ids(packed: &[u8]) -> Result<Vec<Digest>, ChunkError> {
    if packed.len() % ID_LEN != 0 {
        return Err(ChunkError::DecodeIds { len: packed.len() });
    }
    Ok(packed
        .chunks_exact(ID_LEN)
        .map(|c| {
            let mut a = [0u8; ID_LEN];
            a.copy_from_slice(c);
            Digest(a)
        })
        .collect())
}

fn decode_ids_max(packed: &[u8], limit: usize) -> Result<Vec<Digest>, ChunkError> {
    let count = packed.len() / ID_LEN;
    if count > limit {
        return Err(ChunkError::TooManyIds { count, limit });
    }
    decode_ids(packed)
}

/// Packs flags into a bitmap: bit i is byte i / 8, bit i % 8 (least significant first).
pub fn encode_bitmap(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
        out[i / 8] |= 1 << (i % 8);
    }
    out
}

/// Unpacks a bitmap of exactly `n` flags: ceil(n / 8) bytes, padding bits 0.
pub fn decode_bitmap(bitmap: &[u8], n: usize) -> Result<Vec<bool>, ChunkError> {
    let want = n.div_ceil(8);
    let bad = ChunkError::DecodeBitmap {
        got: bitmap.len(),
        ids: n,
        want,
    };
    if bitmap.len() != want {
        return Err(bad);
    }
    if n % 8 != 0 {
        if let Some(last) = bitmap.last() {
            if last >> (n % 8) != 0 {
                return Err(bad);
            }
        }
    }
    Ok((0..n)
        .map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// Checks a `Have` request: version, packed ids, count.
pub fn decode_have_request(req: &HaveRequest) -> Result<Vec<Digest>, ChunkError> {
    xfer_proto::check_version(req.version).map_err(ChunkError::CheckVersion)?;
    decode_ids_max(&req.ids, MAX_HAVE_IDS)
}

/// Decodes a `Have` reply to a request of `n` ids: one flag per id, and the load.
pub fn decode_have_reply(
    reply: &HaveReply,
    n: usize,
) -> Result<(Vec<bool>, Option<Load>), ChunkError> {
    let bits = decode_bitmap(&reply.bitmap, n)?;
    Ok((bits, reply.load.as_ref().map(Load::from)))
}

/// Checks a `Fetch` request: version, packed ids, count; clamps the batch bound.
pub fn decode_fetch_request(req: &FetchRequest) -> Result<FetchOrder, ChunkError> {
    xfer_proto::check_version(req.version).map_err(ChunkError::CheckVersion)?;
    let ids = decode_ids_max(&req.ids, MAX_FETCH_IDS)?;
    let max_batch_bytes = match req.max_batch_bytes as usize {
        0 => DEFAULT_BATCH_BYTES,
        n => n.clamp(MIN_BATCH_BYTES, MAX_BATCH_BYTES),
    };
    Ok(FetchOrder {
        ids,
        max_batch_bytes,
    })
}

/// Decodes one batch: 32-byte ids, `raw_len` at most [`MAX_FRAME`], frames at most
/// [`MAX_WIRE_FRAME`], packed missing ids. The chunks are not verified here.
pub fn decode_batch(batch: ChunkBatch) -> Result<Batch, ChunkError> {
    let missing = decode_ids(&batch.missing)?;
    let mut chunks = Vec::with_capacity(batch.chunks.len());
    for (index, c) in batch.chunks.into_iter().enumerate() {
        let bad = |detail: String| ChunkError::DecodeChunk { index, detail };
        let id = Digest::from_slice(&c.id)
            .map_err(|_| bad(format!("id has {} bytes, expected {ID_LEN}", c.id.len())))?;
        if c.raw_len as usize > MAX_FRAME {
            return Err(bad(format!(
                "raw_len {} exceeds the frame limit {MAX_FRAME}",
                c.raw_len
            )));
        }
        if c.zstd.len() > MAX_WIRE_FRAME {
            return Err(bad(format!(
                "frame of {} bytes exceeds the limit {MAX_WIRE_FRAME}",
                c.zstd.len()
            )));
        }
        chunks.push(WireChunk {
            id,
            frame: c.zstd,
            raw_len: c.raw_len,
        });
    }
    Ok(Batch {
        chunks,
        missing,
        load: batch.load.as_ref().map(Load::from),
    })
}

/// Builds bounded batches in request order (used by the server and the test fake).
#[derive(Debug)]
pub struct Batcher {
    max_bytes: usize,
    cur: ChunkBatch,
    bytes: usize,
}

impl Batcher {
    /// A batcher cutting batches at `max_bytes` (frames plus 32 bytes per id).
    pub fn new(max_bytes: usize) -> Self {
        Batcher {
            max_bytes,
            cur: ChunkBatch::default(),
            bytes: 0,
        }
    }

    /// Adds a chunk; returns the batch to send first if it would not fit.
    pub fn push_chunk(&mut self, id: &Digest, frame: Vec<u8>, raw_len: u32) -> Option<ChunkBatch> {
        let size = frame.len() + ID_LEN;
        let out = if self.bytes > 0 && self.bytes + size > self.max_bytes {
            self.take()
        } else {
            None
        };
        self.bytes += size;
        self.cur.chunks.push(Chunk {
            id: id.0.to_vec(),
            zstd: frame,
            raw_len,
        });
        out
    }

    /// Adds a missing id; returns the batch to send first if it would not fit.
    pub fn push_missing(&mut self, id: &Digest) -> Option<ChunkBatch> {
        let out = if self.bytes > 0 && self.bytes + ID_LEN > self.max_bytes {
            self.take()
        } else {
            None
        };
        self.bytes += ID_LEN;
        self.cur.missing.extend_from_slice(&id.0);
        out
    }

    /// Whether the current batch reached the bound (send it now).
    pub fn full(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    /// The current batch, if it holds anything.
    pub fn take(&mut self) -> Option<ChunkBatch> {
        if self.bytes == 0 {
            return None;
        }
        self.bytes = 0;
        Some(std::mem::take(&mut self.cur))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trips_and_rejects_padding() {
        for n in [0usize, 1, 7, 8, 9, 100] {
            let bits: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
            let enc = encode_bitmap(&bits);
            assert_eq!(decode_bitmap(&enc, n).expect("decode"), bits);
        }
        assert!(decode_bitmap(&[0b1000_0000], 7).is_err());
        assert!(decode_bitmap(&[0, 0], 8).is_err());
    }

    #[test]
    fn batcher_bounds_batches() {
        let mut b = Batcher::new(100);
        let id = Digest::of(b"x");
        assert!(b.push_chunk(&id, vec![0; 50], 50).is_none());
        // 82 + 82 > 100: the first goes out alone.
        let first = b.push_chunk(&id, vec![0; 50], 50).expect("cut");
        assert_eq!(first.chunks.len(), 1);
        // A chunk larger than the bound travels alone.
        let second = b.push_chunk(&id, vec![0; 500], 500).expect("cut");
        assert_eq!(second.chunks.len(), 1);
        assert!(b.full());
        assert_eq!(b.take().map(|x| x.chunks.len()), Some(1));
        assert!(b.take().is_none());
    }
}
