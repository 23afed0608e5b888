//! The Chunks service's messages, from raw bytes through prost to the fallible decoders.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use xfer_agent::chunks::wire;
use xfer_proto::v1::{ChunkBatch, FetchRequest, HaveReply, HaveRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    match sel % 5 {
        0 => {
            if let Ok(b) = ChunkBatch::decode(rest) {
                let _ = wire::decode_batch(b);
            }
        }
        1 => {
            if let Ok(r) = FetchRequest::decode(rest) {
                let _ = wire::decode_fetch_request(&r);
            }
        }
        2 => {
            if let Ok(r) = HaveRequest::decode(rest) {
                let _ = wire::decode_have_request(&r);
            }
        }
        3 => {
            if let Ok(r) = HaveReply::decode(rest) {
                let n = rest.len() % 4096;
                let _ = wire::decode_have_reply(&r, n);
            }
        }
        _ => {
            let _ = wire::decode_ids(rest);
        }
    }
});
