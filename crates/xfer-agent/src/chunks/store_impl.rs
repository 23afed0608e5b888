//! [`ChunkStore`] for the on-disk store, [`xfer_store::Store`].
//!
//! The store verifies on read (a corrupt file is quarantined and reported missing)
//! and on `put_compressed` (decompress bounded by `raw_len`, BLAKE3 against the id)
//! before anything is written; its verification errors become
//! [`ChunkError::is_corrupt`] errors here, anything else (I/O, lock) a
//! [`ChunkError::PutChunk`] that stops a fetch.

use tracing::{debug, warn};
use xfer_store::{Digest, Store, StoreError};

use super::{ChunkError, ChunkStore};

/// Maps a store error on `put` to the transport's error: the peer's fault
/// (corrupt) or ours (fatal).
fn put_error(id: &Digest, e: StoreError) -> ChunkError {
    match e {
        StoreError::Verify { got, .. } => ChunkError::VerifyDigest { id: *id, got },
        e @ (StoreError::Decompress(_)
        | StoreError::FrameSize { .. }
        | StoreError::ChunkSize(_)) => ChunkError::VerifyFrame { id: *id, source: e },
        e => ChunkError::PutChunk {
            id: *id,
            source: Box::new(e),
        },
    }
}

impl ChunkStore for Store {
    fn has_many(&self, ids: &[Digest]) -> Vec<bool> {
        Store::has_many(self, ids)
    }

    fn get_compressed(&self, id: &Digest) -> Option<(Vec<u8>, u32)> {
        match Store::get_compressed(self, id) {
            Ok((frame, raw_len)) => match u32::try_from(raw_len) {
                Ok(n) => Some((frame, n)),
                Err(_) => {
                    warn!(%id, raw_len, "stored chunk too large to serve");
                    None
                }
            },
            Err(e @ StoreError::Missing { .. }) => {
                debug!(%id, "not served: {e}");
                None
            }
            Err(e) => {
                warn!(%id, "not served: {e}");
                None
            }
        }
    }

    fn put_verified(&self, id: &Digest, frame: &[u8], raw_len: u32) -> Result<(), ChunkError> {
        Store::put_compressed(self, *id, frame, raw_len as usize)
            .map(|_| ())
            .map_err(|e| put_error(id, e))
    }

    /// One [`xfer_store::Batch`]: the chunks are appended to the store's pack with one
    /// write and one fdatasync at commit (a received batch of 4 KiB pages is ~256
    /// chunks; one fsync per chunk would cost more than the rest of storing them).
    fn put_verified_many(&self, chunks: &[(Digest, &[u8], u32)]) -> Vec<Result<(), ChunkError>> {
        let mut batch = self.batch();
        let mut out: Vec<Result<(), ChunkError>> = chunks
            .iter()
            .map(|(id, frame, raw_len)| {
                batch
                    .put_compressed(*id, frame, *raw_len as usize)
                    .map(|_| ())
                    .map_err(|e| put_error(id, e))
            })
            .collect();
        if let Err(e) = batch.commit() {
            // Nothing of the batch was kept: every chunk that had verified fails.
            let why = format!("commit a batch of chunks: {e}");
            for (r, (id, _, _)) in out.iter_mut().zip(chunks) {
                if r.is_ok() {
                    *r = Err(ChunkError::PutChunk {
                        id: *id,
                        source: why.clone().into(),
                    });
                }
            }
        }
        out
    }
}
