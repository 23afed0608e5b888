//! Content-addressed chunk transfer: the `Chunks` service (have/want and streamed
//! fetch, `proto/xfer/v1/chunks.proto`) and the multi-source [`Fetcher`].
//!
//! Every byte xfer moves is a *chunk*: its id is the BLAKE3 digest (32 bytes) of the
//! uncompressed bytes; it is stored and sent as one zstd frame of at most
//! [`xfer_store::MAX_FRAME`] decoded bytes. Any node that holds a chunk can serve it,
//! and the receiver verifies every chunk before it keeps it, so a chunk's origin does
//! not matter.
//!
//! # Protocol
//!
//! Service `xfer.v1.Chunks`, gRPC over HTTP/2 (the agent's port and channel):
//!
//! * `Have(HaveRequest{version, ids})` → `HaveReply{bitmap, load}`. `ids` is n × 32
//!   bytes packed (at most 262 144 per call: 8 MiB; clients split larger sets);
//!   `bitmap` has ceil(n / 8) bytes, bit i = byte i / 8, bit i % 8 (LSB first), set
//!   when the node holds id i; padding bits are 0. One round trip for 100 000 ids.
//! * `Fetch(FetchRequest{version, ids, max_batch_bytes})` → stream of
//!   `ChunkBatch{chunks: [Chunk{id, zstd, raw_len}], missing, load}`. At most 65 536
//!   ids per request. Batches follow request order; every requested id comes back
//!   exactly once, either as a chunk or in `missing` (the node lacks it, or its store
//!   found it corrupt). A batch holds at most `max_batch_bytes` of frames (0 = 1 MiB;
//!   clamped to 64 KiB..4 MiB; a larger chunk travels alone). Frames are sent exactly
//!   as stored, never recompressed.
//! * Both replies carry the serving node's `PeerLoad{fetch_streams,
//!   served_bytes_per_sec}` for ranking.
//! * The server reads its store on a blocking thread into a channel two batches deep;
//!   HTTP/2 flow control therefore paces the disk. A client aborts a fetch by dropping
//!   the stream (RST_STREAM): the channel closes and the reader stops before its next
//!   chunk. A server already serving `max_streams` (64) fetches refuses more with
//!   RESOURCE_EXHAUSTED.
//! * Decoding is fallible and never panics ([`wire`]): the version must be one the
//!   node speaks (else FAILED_PRECONDITION, like the agent protocol); packed ids must
//!   be a multiple of 32 bytes; `raw_len` at most 8 MiB; a frame at most zstd's bound
//!   for 8 MiB; too many ids per message, a bitmap of the wrong size or with padding
//!   bits set are errors (INVALID_ARGUMENT). Chunks are verified (decompress to
//!   exactly `raw_len` bytes, BLAKE3 equals the id) before they are stored.
//!
//! # Fetching from several sources
//!
//! [`Fetcher::fetch`] takes the wanted ids, each with its candidate sources (from the
//! knowledge base); the migration source is the *fallback*, always a candidate, and
//! holds everything. Ids already in the local store are skipped (so a fetch that was
//! cancelled resumes where it stopped).
//!
//! **Ranking.** A [`RankPolicy`] scores sources. The default, [`ThroughputRank`],
//! scores the effective rate of a reference 1 MiB request, `R / (latency + R /
//! throughput)`, divided by `1 + load`, where throughput is an EWMA of the bytes a
//! source delivered per second of time it was busy with our requests (so pipelined
//! streams add up), latency an EWMA of the time to the first batch of a request, and
//! load the fetch streams it reports serving to others (its report minus ours).
//! Unmeasured sources get a neutral prior: the mean of the measured sources (32 MiB/s
//! and 5 ms while none is measured), load 0. A `Fetcher` keeps what it measured
//! across fetches (pre-copy rounds).
//!
//! **Scheduling.** Every wanted id sits in the queue of each usable candidate, rarest
//! first (ids with fewer candidates ahead, wanted order kept within a group: what only
//! one source holds goes first, so the end of a fetch is work any source can take
//! over). In rank
//! order each source takes work from its queue while it has a free request slot:
//! the best source has `max_inflight_per_source` (4) slots, others slots in
//! proportion to their score (at least 1), and at most `max_inflight_total` (16)
//! requests are in flight. A request asks for about `request_time` (250 ms) of the
//! source's rate (256 KiB..8 MiB, at most 4096 ids) and at most the work left divided
//! by 4 × the total slots, so the work is cut finer as it runs out and the tail is
//! spread over every source. An idle source with an empty queue takes queued ids it
//! may serve from sources scoring at least 2× lower (work stealing).
//!
//! **Failover rules.**
//! * The fallback is tried last: it gets only ids that no other usable source may
//!   hold (only it holds them, or every other candidate lacked them, served them
//!   corrupt, was too slow with them, or was dropped); it steals work only from
//!   sources the slowness rule has caught. With `FetchConfig::fallback_shares` (the
//!   knowledge base's `source_shares`) it is instead queued every id beside the other
//!   candidates and steals like them: its rate adds to theirs.
//! * A chunk a source reports missing, leaves out of a finished stream, or serves
//!   corrupt (the store's verification fails; it is never stored) is never asked of
//!   that source again in this fetch and goes to the next candidate. A corrupt chunk
//!   counts as an error of that source.
//! * A failed request (stream cut, call refused, protocol violation such as a chunk
//!   not asked for) counts one error and hands back only the ids not yet received
//!   (resumption); the source pauses 100 ms × 2^(k-1) after its k-th consecutive
//!   failure and is dropped for the rest of the fetch after 3 (a good batch resets the
//!   count); its queued ids go to the other candidates, or the fallback.
//! * Slowness: a request whose next batch is late by more than 4 × its expected time
//!   (latency + one batch at the source's measured per-stream rate, floored at
//!   256 KiB/s; at least 250 ms; 2 s while the source is unmeasured) is hedged: its
//!   remaining ids are also queued at other usable sources (the fallback if no peer
//!   is left). End game: once no work is left to hand out, the requests of a source
//!   scoring 2× lower than an idle source are hedged the same way. The first copy
//!   stored wins; a request whose every remaining id was stored elsewhere is
//!   cancelled (its stream dropped). A request without progress for 30 s fails.
//! * A failure of the local store itself (I/O, not verification) stops the fetch: no
//!   source can fix it.
//!
//! The fetch succeeds only when every wanted chunk is stored; otherwise
//! [`ChunkError::Incomplete`] lists the ids nobody could deliver, with the
//! [`FetchReport`] (per source: requests, ids asked, chunks, wire bytes, busy time,
//! errors, corrupt, missing, slow, duplicates).

pub mod error;
pub mod fake;
pub mod fetch;
pub mod peer;
pub mod rank;
pub mod server;
pub mod store;
mod store_impl;
pub mod wire;

/// The name a destination gives the migration source (the fetcher's fallback) in its
/// fetches and reports.
pub const FALLBACK_NAME: &str = "source";

pub use error::ChunkError;
pub use fetch::{FetchConfig, FetchReport, Fetcher, Outstanding, Progress, SourceReport, Want};
pub use peer::{BatchStream, ChunkPeer, GrpcPeer};
pub use rank::{RankPolicy, SourceStats, SourceView, ThroughputRank};
pub use server::{ChunkService, LoadMeter, ServiceConfig};
pub use store::{verify_frame, ChunkStore, MemStore};
pub use wire::{
    decode_batch, decode_bitmap, decode_fetch_request, decode_have_request, decode_ids, Load,
};
