//! Measures FastCDC size choices: chunk counts and dedup of an edited copy.
//!
//! `cargo run --release -p xfer-store --example cdc_sizes -- ORIG.tar EDITED.tar`
//!
//! For each min/avg/max it chunks ORIG and EDITED and prints the chunk count, the
//! mean chunk size, the edited object's chunks (and bytes) that ORIG lacks (what a
//! destination holding ORIG must fetch), the dedup ratio of EDITED (share of its
//! bytes already present), the compressed size of the new chunks at zstd level 1 and
//! the cut-point search speed (one thread).

use std::collections::HashSet;
use std::time::Instant;

use xfer_store::chunk::{cdc_chunks, CdcParams};
use xfer_store::Digest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [orig, edited] = args.as_slice() else {
        return Err("usage: cdc_sizes ORIG EDITED".into());
    };
    let a = std::fs::read(orig)?;
    let b = std::fs::read(edited)?;
    println!("orig {} bytes, edited {} bytes", a.len(), b.len());
    println!(
        "| min/avg/max KiB | chunks (orig) | mean KiB | new chunks | new bytes | dedup of edited | new bytes zstd-1 | manifest bytes | orig as zstd-1 chunks | cut GB/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (min, avg, max) in [(8, 32, 128), (16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let p = CdcParams::new(min << 10, avg << 10, max << 10)?;
        let t = Instant::now();
        let cuts_a: Vec<_> = cdc_chunks(&a, &p).collect();
        let cut_secs = t.elapsed().as_secs_f64();
        let mut ids_a: HashSet<Digest> = HashSet::new();
        let mut full_z = 0usize;
        for r in &cuts_a {
            if ids_a.insert(Digest::of(&a[r.clone()])) {
                full_z += xfer_store::frame::encode(&a[r.clone()])?.len();
            }
        }
        let cuts_b: Vec<_> = cdc_chunks(&b, &p).collect();
        let mut new_chunks = 0usize;
        let mut new_bytes = 0usize;
        let mut new_z = 0usize;
        let mut seen = HashSet::new();
        for r in &cuts_b {
            let id = Digest::of(&b[r.clone()]);
            if !ids_a.contains(&id) && seen.insert(id) {
                new_chunks += 1;
                new_bytes += r.len();
                new_z += xfer_store::frame::encode(&b[r.clone()])?.len();
            }
        }
        // Manifest v1: 56-byte header + ~36 bytes per data entry.
        let manifest = 56 + cuts_b.len() * 36;
        println!(
            "| {min}/{avg}/{max} | {} | {:.1} | {new_chunks} | {new_bytes} | {:.4}% | {new_z} | {manifest} | {full_z} | {:.2} |",
            cuts_a.len(),
            a.len() as f64 / cuts_a.len() as f64 / 1024.0,
            100.0 * (1.0 - new_bytes as f64 / b.len() as f64),
            a.len() as f64 / cut_secs / 1e9,
        );
    }
    Ok(())
}
