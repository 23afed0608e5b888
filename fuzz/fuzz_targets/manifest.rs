//! Manifests arrive from the network in Sync requests: decoding never panics, and what
//! decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = xfer_store::Manifest::decode(data) {
        let again = m.encode();
        let back = xfer_store::Manifest::decode(&again).expect("re-encoded manifest decodes");
        assert_eq!(back, m);
    }
});
