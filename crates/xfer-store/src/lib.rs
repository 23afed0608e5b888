//! `xfer-store`: content addressing for everything xfer moves.
//!
//! Today it holds the two primitives every transfer uses: a BLAKE3 [`Digest`] of
//! uncompressed bytes, and zstd [`frame`]s with a bounded decoded size, so a peer
//! cannot make a receiver allocate without limit. Synchronous; no tokio.

use std::fmt;

/// Largest decoded size of one frame (8 MiB); frames are written at most this big.
pub const MAX_FRAME: usize = 8 << 20;

/// zstd level used on the wire: fast (level 1 runs at >1 GB/s on page data here).
pub const ZSTD_LEVEL: i32 = 1;

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
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
}

/// BLAKE3 digest of uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Parses 32 raw bytes, as carried on the wire.
    pub fn from_slice(b: &[u8]) -> Result<Self, StoreError> {
        let arr: [u8; 32] = b.try_into().map_err(|_| StoreError::ParseDigest(b.len()))?;
        Ok(Digest(arr))
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blake3:{}", self.to_hex())
    }
}

/// An incremental BLAKE3 hasher over a whole object.
#[derive(Debug, Default, Clone)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    /// A new hasher.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// The digest of everything added.
    pub fn finish(&self) -> Digest {
        Digest(*self.0.finalize().as_bytes())
    }
}

/// zstd frames with a bounded decoded size.
pub mod frame {
    use super::*;

    /// Compresses `data` (at most [`MAX_FRAME`] bytes) into one zstd frame.
    pub fn encode(data: &[u8]) -> Result<Vec<u8>, StoreError> {
        if data.len() > MAX_FRAME {
            return Err(StoreError::FrameSize {
                got: data.len(),
                want: MAX_FRAME,
            });
        }
        zstd::bulk::compress(data, ZSTD_LEVEL).map_err(StoreError::Compress)
    }

    /// Decompresses a frame that must decode to exactly `raw_len` bytes.
    pub fn decode(frame: &[u8], raw_len: usize) -> Result<Vec<u8>, StoreError> {
        if raw_len > MAX_FRAME {
            return Err(StoreError::FrameSize {
                got: raw_len,
                want: MAX_FRAME,
            });
        }
        let out = zstd::bulk::decompress(frame, raw_len).map_err(StoreError::Decompress)?;
        if out.len() != raw_len {
            return Err(StoreError::FrameSize {
                got: out.len(),
                want: raw_len,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            let f = frame::encode(&data).expect("encode");
            prop_assert_eq!(frame::decode(&f, data.len()).expect("decode"), data);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), n in 0usize..4096) {
            let _ = frame::decode(&data, n);
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        let f = frame::encode(b"hello world").expect("encode");
        assert!(frame::decode(&f, 5).is_err());
        assert!(frame::decode(&f, MAX_FRAME + 1).is_err());
    }

    #[test]
    fn incremental_digest_matches_one_shot() {
        let mut h = Hasher::new();
        h.update(b"hello ");
        h.update(b"world");
        assert_eq!(h.finish(), Digest::of(b"hello world"));
        assert_ne!(Digest::of(b"a"), Digest::of(b"b"));
        assert!(Digest::from_slice(&[0u8; 31]).is_err());
    }
}
