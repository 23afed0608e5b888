//! The Kb service's messages (events, inventories, status, answers, queries, push
//! verdicts, holder requests), from raw bytes through prost to the fallible decoders.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xfer_agent::kb::wire;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let _ = wire::decode_any(sel, rest);
});
