//! A Sync request's objects, from raw bytes: kinds, names and manifests are checked.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;
use xfer_proto::v1::SyncRequest;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = SyncRequest::decode(data) {
        let _ = xfer_agent::sync::decode_objects(&r.objects);
    }
});
