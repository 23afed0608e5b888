//! Throughput of the sender's chunk pipeline beside `zstd -1 -T2` and BLAKE3 alone.
//!
//! ```text
//! cargo run --release -p xfer-store --example bench_pipeline -- \
//!     [--pages-dir DIR] [--tar FILE] [--synthetic-mb 300] [--random-mb 256] \
//!     [--runs 5] [--threads 2]
//! ```
//!
//! Datasets: (i) memory pages: the `pages-*.img` files of a CRIU image directory
//! (`--pages-dir`, e.g. from `criu dump --leave-running -t PID -D DIR --shell-job`)
//! when given, and always a synthetic page file (half zero pages, a quarter random, a
//! quarter log-like text); (ii) random bytes, chunked as pages and as a file (FastCDC);
//! (iii) with `--tar`, a real tar stream (FastCDC).
//! Files are written under a fresh directory in /tmp (removed at exit) and read once
//! before timing, so every contender reads from the page cache.
//!
//! Rows, each over `--runs` runs: median, min and max of MB/s of wall time (MB =
//! 10^6 bytes of input), and the median of MB per CPU-second (user + system time of
//! the process, or of the child for the CLIs): that figure does not depend on other
//! load on the machine; a CPU-bound contender on 2 idle cores approaches twice it.
//! - pipeline, empty has-set: zero detection + BLAKE3 per chunk + dedup lookup +
//!   compression of every new chunk + whole-object BLAKE3 (`--threads` workers, plus
//!   the reading thread), and the same with 1 worker;
//! - pipeline, has-set = all chunks (a pre-copy round in which nothing changed);
//! - store ingest: the new chunks of the first row into a fresh [`xfer_store::Store`]
//!   through a `Batch` (verify = decompress + hash, write, one commit per 4,096 chunks);
//! - `zstd -1 -T2 -c FILE > /dev/null` (the zstd CLI, 2 threads);
//! - `b3sum --num-threads 2` if installed, else the `blake3` crate single-pass (one
//!   thread, 4 MiB reads).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use xfer_store::{CompressedChunk, Digest, ObjectKind, Pipeline, Store, StoreError};

struct Args {
    pages_dir: Option<PathBuf>,
    tar: Option<PathBuf>,
    synthetic_mb: usize,
    random_mb: usize,
    runs: usize,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        pages_dir: None,
        tar: None,
        synthetic_mb: 300,
        random_mb: 256,
        runs: 5,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--pages-dir" => a.pages_dir = Some(PathBuf::from(val()?)),
            "--tar" => a.tar = Some(PathBuf::from(val()?)),
            "--synthetic-mb" => a.synthetic_mb = val()?.parse().map_err(|e| format!("{e}"))?,
            "--random-mb" => a.random_mb = val()?.parse().map_err(|e| format!("{e}"))?,
            "--runs" => a.runs = val()?.parse().map_err(|e| format!("{e}"))?,
            "--threads" => a.threads = val()?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// xorshift64*: fast, good enough for incompressible bytes.
fn fill_random(buf: &mut [u8], state: &mut u64) {
    for c in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
}

fn write_synthetic_pages(path: &Path, mb: usize) -> std::io::Result<()> {
    let pages = mb * 1_000_000 / 4096;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let words = [
        "migration",
        "container",
        "checkpoint",
        "restore",
        "page",
        "digest",
        "chunk",
        "zstd",
        "edge",
        "host",
        "tunnel",
        "binding",
        "lease",
        "manifest",
        "store",
    ];
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut page = vec![0u8; 4096];
    for i in 0..pages {
        // Pattern per 8 pages: Z R Z T Z R Z T -> half zero, a quarter each random/text.
        match i % 4 {
            0 | 2 => page.fill(0),
            1 => fill_random(&mut page, &mut state),
            _ => {
                // Log-like text: words picked pseudo-randomly, so pages differ.
                let mut s = String::with_capacity(4200);
                while s.len() < 4096 {
                    fill_random(&mut page[..8], &mut state);
                    let w = words[page[0] as usize % words.len()];
                    s.push_str(&format!(
                        "{w} id={} ok\n",
                        u16::from_le_bytes([page[1], page[2]])
                    ));
                }
                page.copy_from_slice(&s.as_bytes()[..4096]);
            }
        }
        w.write_all(&page)?;
    }
    w.flush()
}

fn write_random(path: &Path, mb: usize) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = mb * 1_000_000;
    while left > 0 {
        let n = left.min(buf.len());
        fill_random(&mut buf[..n], &mut state);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    w.flush()
}

/// CPU seconds (user + system) of this process and of its waited-for children, from
/// /proc/self/stat (10 ms ticks).
fn cpu_times() -> (f64, f64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<f64> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = 100.0;
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / tick;
    // Fields after the command: state=0, ..., utime=11, stime=12, cutime=13, cstime=14.
    (get(11) + get(12), get(13) + get(14))
}

/// Wall and CPU seconds of one timed run.
#[derive(Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
}

fn timed<T>(children: bool, f: impl FnOnce() -> T) -> (T, Sample) {
    let c0 = cpu_times();
    let t = Instant::now();
    let r = f();
    let wall = t.elapsed().as_secs_f64();
    let c1 = cpu_times();
    let cpu = if children { c1.1 - c0.1 } else { c1.0 - c0.0 };
    (r, Sample { wall, cpu })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn total_len(files: &[PathBuf]) -> u64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn warm(files: &[PathBuf]) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    for f in files {
        let mut r = std::fs::File::open(f)?;
        while r.read(&mut buf)? > 0 {}
    }
    Ok(())
}

struct PipelineRun {
    chunks: Vec<CompressedChunk>,
    ids: HashSet<Digest>,
    zero: u64,
    frame_bytes: u64,
    raw_new: u64,
}

fn run_pipeline(
    p: &Pipeline,
    files: &[PathBuf],
    kind: ObjectKind,
    has: &HashSet<Digest>,
    keep: bool,
) -> Result<PipelineRun, StoreError> {
    let mut r = PipelineRun {
        chunks: Vec::new(),
        ids: HashSet::new(),
        zero: 0,
        frame_bytes: 0,
        raw_new: 0,
    };
    for f in files {
        let out = p.run_file(f, kind, has, |c| -> Result<(), StoreError> {
            if keep {
                r.chunks.push(c);
            }
            Ok(())
        })?;
        r.zero += out.zero_bytes;
        r.frame_bytes += out.new_frame_bytes;
        r.raw_new += out.new_raw_bytes;
        if keep {
            r.ids.extend(out.manifest.chunk_ids());
        }
    }
    Ok(r)
}

fn time_command(cmd: &str, args: &[&str], file: &Path) -> Option<f64> {
    let t = Instant::now();
    let status = Command::new(cmd)
        .args(args)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then(|| t.elapsed().as_secs_f64())
}

fn has_b3sum() -> bool {
    Command::new("b3sum")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn blake3_single(file: &Path) -> std::io::Result<f64> {
    let t = Instant::now();
    let mut r = std::fs::File::open(file)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    std::hint::black_box(h.finalize());
    Ok(t.elapsed().as_secs_f64())
}

fn bench(
    name: &str,
    files: &[PathBuf],
    kind: ObjectKind,
    args: &Args,
    tmp: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = total_len(files) as f64;
    warm(files)?;
    let p = Pipeline::new().threads(args.threads);
    let empty = HashSet::new();
    let mb_s = |secs: f64| bytes / secs / 1e6;

    let mut cold = Vec::new();
    let mut first: Option<PipelineRun> = None;
    for i in 0..args.runs {
        let (r, t) = timed(false, || run_pipeline(&p, files, kind, &empty, i == 0));
        let r = r?;
        cold.push(t);
        if i == 0 {
            first = Some(r);
        }
    }
    let first = first.ok_or("no runs")?;
    let p1 = Pipeline::new().threads(1);
    let mut one = Vec::new();
    for _ in 0..args.runs {
        let (r, t) = timed(false, || run_pipeline(&p1, files, kind, &empty, false));
        r?;
        one.push(t);
    }
    let mut warm_rows = Vec::new();
    for _ in 0..args.runs {
        let (r, t) = timed(false, || run_pipeline(&p, files, kind, &first.ids, false));
        r?;
        warm_rows.push(t);
    }
    let mut ingest = Vec::new();
    let mut reopen = Vec::new();
    let mut has_ns = Vec::new();
    for _ in 0..args.runs {
        let dir = tmp.join("ingest-store");
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir)?;
        let (r, t) = timed(false, || -> Result<(), StoreError> {
            for group in first.chunks.chunks(4096) {
                let mut b = store.batch();
                for c in group {
                    b.put_compressed(c.id, &c.frame, c.raw_len)?;
                }
                b.commit()?;
            }
            Ok(())
        });
        r?;
        ingest.push(t);
        // has_many over every stored id and as many absent ones.
        let mut query: Vec<Digest> = first.chunks.iter().map(|c| c.id).collect();
        let n = query.len();
        query.extend((0..n as u64).map(|i| Digest::of(&i.to_le_bytes())));
        let t = Instant::now();
        let hits = store.has_many(&query).iter().filter(|h| **h).count();
        has_ns.push(t.elapsed().as_secs_f64() * 1e9 / query.len().max(1) as f64);
        assert_eq!(hits, n);
        drop(store);
        let t = Instant::now();
        let store = Store::open(&dir)?;
        reopen.push((t.elapsed().as_secs_f64(), store.stats().chunks));
        drop(store);
        std::fs::remove_dir_all(&dir)?;
    }
    let mut zstd = Vec::new();
    let mut b3 = Vec::new();
    let b3sum = has_b3sum();
    for _ in 0..args.runs {
        let mut z = Sample {
            wall: 0.0,
            cpu: 0.0,
        };
        let mut b = Sample {
            wall: 0.0,
            cpu: 0.0,
        };
        for f in files {
            let (r, t) = timed(true, || time_command("zstd", &["-1", "-T2", "-q", "-c"], f));
            r.ok_or("zstd failed")?;
            z.wall += t.wall;
            z.cpu += t.cpu;
            let (r, t) = if b3sum {
                let (r, t) = timed(true, || time_command("b3sum", &["--num-threads", "2"], f));
                (r.ok_or("b3sum failed").map(|_| ()), t)
            } else {
                let (r, t) = timed(false, || blake3_single(f));
                (r.map(|_| ()).map_err(|_| "blake3 failed"), t)
            };
            r?;
            b.wall += t.wall;
            b.cpu += t.cpu;
        }
        zstd.push(z);
        b3.push(b);
    }

    println!("\n### {name}: {} files, {:.1} MB", files.len(), bytes / 1e6);
    println!(
        "zero pages/chunks {:.1}%, new chunks {} ({:.1} MB raw -> {:.1} MB zstd-1, ratio {:.2})",
        100.0 * first.zero as f64 / bytes,
        first.chunks.len(),
        first.raw_new as f64 / 1e6,
        first.frame_bytes as f64 / 1e6,
        first.raw_new as f64 / first.frame_bytes.max(1) as f64,
    );
    println!(
        "| contender ({} runs) | median MB/s (wall) | min | max | MB per CPU-second (median) |",
        args.runs
    );
    println!("| --- | --- | --- | --- | --- |");
    let row = |label: &str, v: &[Sample]| {
        let w: Vec<f64> = v.iter().map(|s| mb_s(s.wall)).collect();
        let c: Vec<f64> = v
            .iter()
            .filter(|s| s.cpu > 0.0)
            .map(|s| mb_s(s.cpu))
            .collect();
        let min = w.iter().copied().fold(f64::INFINITY, f64::min);
        let max = w.iter().copied().fold(0.0, f64::max);
        println!(
            "| {label} | {:.0} | {min:.0} | {max:.0} | {:.0} |",
            median(w),
            median(c)
        );
    };
    row(
        &format!("pipeline, {} threads, empty has-set", args.threads),
        &cold,
    );
    row("pipeline, 1 thread, empty has-set", &one);
    row(
        &format!("pipeline, {} threads, has-set = all chunks", args.threads),
        &warm_rows,
    );
    row("store ingest (Batch put_compressed + commit)", &ingest);
    row("zstd -1 -T2 (CLI)", &zstd);
    if b3sum {
        row("b3sum --num-threads 2", &b3);
    } else {
        row(
            "blake3 crate single-pass, 1 thread (b3sum not installed)",
            &b3,
        );
    }
    let chunks = reopen.first().map(|r| r.1).unwrap_or(0);
    println!(
        "store reopen (index rebuilt from the packs, {chunks} chunks): median {:.0} ms",
        1000.0 * median(reopen.iter().map(|r| r.0).collect())
    );
    println!(
        "has_many over {} ids (half present): median {:.0} ns per id",
        2 * first.chunks.len(),
        median(has_ns)
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let tmp = std::env::temp_dir().join(format!("xfer-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let synthetic = tmp.join("synthetic-pages.img");
        write_synthetic_pages(&synthetic, args.synthetic_mb)?;
        let pages: Option<Vec<PathBuf>> = match &args.pages_dir {
            Some(dir) => {
                let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("pages-") && n.ends_with(".img"))
                    })
                    .collect();
                v.sort();
                if v.is_empty() {
                    return Err(format!("no pages-*.img in {}", dir.display()).into());
                }
                Some(v)
            }
            None => None,
        };
        let random = tmp.join("random.bin");
        write_random(&random, args.random_mb)?;
        println!(
            "machine: {} cores; pipeline threads: {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            args.threads
        );
        if let (Some(pages), Some(dir)) = (&pages, &args.pages_dir) {
            bench(
                &format!("REAL CRIU page images from {}", dir.display()),
                pages,
                ObjectKind::MemoryPages,
                &args,
                &tmp,
            )?;
        } else {
            println!("(no --pages-dir: real CRIU page images not measured)");
        }
        bench(
            &format!(
                "SYNTHETIC page file, {} MB (1/2 zero, 1/4 random, 1/4 text pages)",
                args.synthetic_mb
            ),
            &[synthetic],
            ObjectKind::MemoryPages,
            &args,
            &tmp,
        )?;
        bench(
            "random data as memory pages",
            std::slice::from_ref(&random),
            ObjectKind::MemoryPages,
            &args,
            &tmp,
        )?;
        bench(
            "random data as a file (FastCDC 16/64/256 KiB)",
            &[random],
            ObjectKind::File,
            &args,
            &tmp,
        )?;
        if let Some(tar) = &args.tar {
            bench(
                &format!("tar stream {} (FastCDC 16/64/256 KiB)", tar.display()),
                std::slice::from_ref(tar),
                ObjectKind::Tar,
                &args,
                &tmp,
            )?;
        }
        Ok(())
    })();
    std::fs::remove_dir_all(&tmp)?;
    result
}
