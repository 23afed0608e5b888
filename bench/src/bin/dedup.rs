//! `xfer-dedup`: bytes sent for a second transfer of a memory image with some of its
//! pages changed (the chunk issue's benchmark (c)).
//!
//! It builds an image of SIZE MiB of page data (a quarter zero pages, half
//! incompressible, a quarter text), chunks it into an empty store (what a first
//! transfer sends: every new chunk, compressed), changes PERCENT% of the pages at
//! random, and chunks it again against the same store (what a second transfer sends).
//! Prints both, their ratio, and the pipeline rate.

use std::io::Cursor;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use xfer_store::{ObjectKind, Pipeline, Store};

#[derive(Debug, Parser)]
struct Args {
    /// Image size in MiB.
    #[arg(long, default_value_t = 512)]
    mib: usize,
    /// Percentage of pages changed between the transfers.
    #[arg(long, default_value_t = 10)]
    percent: usize,
    /// Store directory (default: a fresh one under /dev/shm).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const PAGE: usize = 4096;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let pages = a.mib * 1024 * 1024 / PAGE;
    let mut img = vec![0u8; pages * PAGE];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let text = b"the quick brown fox jumps over the lazy dog; key:000123 value:abcdef\n";
    for (i, p) in img.chunks_mut(PAGE).enumerate() {
        match i % 4 {
            0 => {}
            1 | 2 => rng.fill(p),
            _ => {
                for (j, b) in p.iter_mut().enumerate() {
                    *b = text[(j + i) % text.len()];
                }
                p[..8].copy_from_slice(&(i as u64).to_le_bytes());
            }
        }
    }
    let dir = match a.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("xfer-dedup-{}", std::process::id())),
    };
    let dir = if std::path::Path::new("/dev/shm").exists() && !dir.starts_with("/dev/shm") {
        std::path::Path::new("/dev/shm").join(dir.file_name().context("dir name")?)
    } else {
        dir
    };
    let store = Store::open(&dir).with_context(|| format!("open store {}", dir.display()))?;
    let pipeline = Pipeline::new();
    let run = |data: &[u8]| -> anyhow::Result<(u64, u64, f64)> {
        let t = Instant::now();
        let mut batch = store.batch();
        let out = pipeline.run(ObjectKind::MemoryPages, Cursor::new(data), &store, |c| {
            batch.put_compressed(c.id, &c.frame, c.raw_len)?;
            Ok::<_, xfer_store::StoreError>(())
        })?;
        batch.commit()?;
        Ok((
            out.new_frame_bytes,
            out.new_raw_bytes,
            t.elapsed().as_secs_f64(),
        ))
    };
    let (first, first_raw, t1) = run(&img)?;
    let changed = pages * a.percent / 100;
    for _ in 0..changed {
        let i = (rng.next() as usize) % pages;
        let p = &mut img[i * PAGE..(i + 1) * PAGE];
        rng.fill(&mut p[..64]);
    }
    let (second, second_raw, t2) = run(&img)?;
    let _ = std::fs::remove_dir_all(&dir);
    let mb = (pages * PAGE) as f64 / 1e6;
    println!(
        "{{\"image_mib\": {}, \"changed_pages\": {changed}, \"changed_percent\": {}, \"first_transfer_bytes\": {first}, \"first_raw_bytes\": {first_raw}, \"second_transfer_bytes\": {second}, \"second_raw_bytes\": {second_raw}, \"ratio\": {:.4}, \"first_pipeline_mb_s\": {:.0}, \"second_pipeline_mb_s\": {:.0}}}",
        a.mib,
        a.percent,
        second as f64 / first as f64,
        mb / t1,
        mb / t2
    );
    Ok(())
}
