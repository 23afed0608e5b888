//! Scale simulation of the knowledge base (issue 6 item 6): 1000 simulated hosts and
//! 10M (digest, host) entries in process, no network. Prints query latency (median
//! and p99 of a 10k-digest holder query), the cost of a full update and of a host
//! leaving, and memory (RSS before and after, bytes per entry), for two holdings
//! shapes:
//!
//! * `replicated`: each host holds 5000 of 50 000 popular digests (image-layer
//!   chunks: each held by ~100 hosts) and 5000 private ones shared with one neighbour
//!   (snapshots cached next door): 2.55M distinct digests;
//! * `unique`: every entry a different digest (10M distinct), the worst case.
//!
//! `cargo run --release -p xfer-kb --example scale [replicated|unique|both]`

use std::time::{Duration, Instant};

use xfer_kb::{Digest, EmbeddedStore, HostInfo, HostRecord, KbStore, Timestamp};

const HOSTS: u64 = 1000;
const PER_HOST: u64 = 10_000;
const POPULAR: u64 = 50_000;
const BATCH: usize = 10_000;

fn digest(pool: u8, n: u64) -> Digest {
    let mut b = [0u8; 9];
    b[0] = pool;
    b[1..].copy_from_slice(&n.to_le_bytes());
    Digest::of(&b)
}

/// Resident set size of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Host `h`'s digests in shape `shape`.
fn holdings(shape: &str, h: u64) -> Vec<Digest> {
    match shape {
        "unique" => (0..PER_HOST).map(|k| digest(2, h * PER_HOST + k)).collect(),
        _ => {
            let half = PER_HOST / 2;
            let mut v: Vec<Digest> = (0..half)
                .map(|k| digest(0, (h * 37 + k * 7919) % POPULAR))
                .collect();
            let share = half / 2;
            let next = (h + 1) % HOSTS;
            v.extend((0..share).map(|k| digest(1, h * share + k)));
            v.extend((0..share).map(|k| digest(1, next * share + k)));
            v
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run(shape: &str, rt: &tokio::runtime::Runtime) {
    println!("== shape: {shape} ==");
    let rss0 = rss();
    let store = EmbeddedStore::in_memory(None);
    let t = Instant::now();
    for h in 0..HOSTS {
        let name = format!("host-{h:04}");
        let ds = holdings(shape, h);
        store.with_index(|ix| {
            let id = ix.intern(&name).expect("host id");
            ix.add(id, &ds);
        });
        store.put_record(HostRecord {
            host: name,
            seq: 0,
            as_of: Timestamp::from_secs(1),
            info: HostInfo::default(),
        });
    }
    let build = t.elapsed();
    let rss1 = rss();
    let (entries, distinct) = store.with_index(|ix| (ix.entries(), ix.digests()));
    let own = store.index_bytes() as u64;
    let delta = rss1.saturating_sub(rss0);
    println!(
        "hosts {HOSTS}, entries {entries}, distinct digests {distinct}, built in {:.2} s",
        build.as_secs_f64()
    );
    println!(
        "RSS before {} after {} (+{}): {:.1} bytes/entry, {:.1} bytes/distinct digest; index's own accounting {} ({:.1} bytes/entry)",
        mib(rss0),
        mib(rss1),
        mib(delta),
        delta as f64 / entries as f64,
        delta as f64 / distinct as f64,
        mib(own),
        own as f64 / entries as f64
    );

    // 10k-digest batches: 90% held digests of random hosts, 10% unknown.
    let mut lat = Vec::new();
    let mut named = 0usize;
    for q in 0..200u64 {
        let mut ds = Vec::with_capacity(BATCH);
        for i in 0..BATCH as u64 {
            let x = q * BATCH as u64 + i;
            if i % 10 == 9 {
                ds.push(digest(9, x));
            } else {
                let h = (x * 2654435761) % HOSTS;
                let all = holdings_one(shape, h, x % PER_HOST);
                ds.push(all);
            }
        }
        let t = Instant::now();
        let a = rt.block_on(store.holders(&ds)).expect("holders");
        lat.push(t.elapsed());
        named += a.holders.iter().filter(|v| !v.is_empty()).count();
        assert_eq!(a.holders.len(), BATCH);
    }
    assert_eq!(
        named,
        200 * BATCH * 9 / 10,
        "every held digest found, no unknown one"
    );
    let median = pct(&mut lat, 0.5);
    let p99 = pct(&mut lat, 0.99);
    println!(
        "holders(10k digests): median {:.2} ms, p99 {:.2} ms ({:.0} ns/digest)",
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        median.as_nanos() as f64 / BATCH as f64
    );
    let mut one = Vec::new();
    for x in 0..10_000u64 {
        let d = holdings_one(shape, x % HOSTS, x % PER_HOST);
        let t = Instant::now();
        let _ = rt.block_on(store.holders(&[d])).expect("holders");
        one.push(t.elapsed());
    }
    println!(
        "holders(1 digest): median {:.1} us, p99 {:.1} us",
        pct(&mut one, 0.5).as_secs_f64() * 1e6,
        pct(&mut one, 0.99).as_secs_f64() * 1e6
    );

    // A full update of one host with 10% of its holdings changed, and a host leaving.
    let mut fu = Vec::new();
    for h in 0..50u64 {
        let mut ds = holdings(shape, h);
        for (k, d) in ds.iter_mut().enumerate().take(PER_HOST as usize / 10) {
            *d = digest(3, h * PER_HOST + k as u64);
        }
        let t = Instant::now();
        store.with_index(|ix| {
            let id = ix.host_id(&format!("host-{h:04}")).expect("host");
            ix.replace(id, &ds);
        });
        fu.push(t.elapsed());
    }
    println!(
        "full update of a 10k-entry host (10% changed): median {:.2} ms, p99 {:.2} ms",
        pct(&mut fu, 0.5).as_secs_f64() * 1e3,
        pct(&mut fu, 0.99).as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let gone = store.with_index(|ix| ix.drop_host("host-0999"));
    println!(
        "host leaving ({gone} entries): {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    // Persistence: the whole index to one file and back.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kb.bin");
    let t = Instant::now();
    store.persist_to(&path).expect("persist");
    let wrote = t.elapsed();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    let loaded = EmbeddedStore::open(&path, None).expect("load");
    let read = t.elapsed();
    assert_eq!(loaded.entries(), store.entries());
    println!(
        "persist: {} written in {:.2} s, loaded in {:.2} s",
        mib(size),
        wrote.as_secs_f64(),
        read.as_secs_f64()
    );
    drop(loaded);
    println!();
}

/// Digest number `k` of host `h`'s holdings without building them all.
fn holdings_one(shape: &str, h: u64, k: u64) -> Digest {
    match shape {
        "unique" => digest(2, h * PER_HOST + k),
        _ => {
            let half = PER_HOST / 2;
            let share = half / 2;
            if k < half {
                digest(0, (h * 37 + k * 7919) % POPULAR)
            } else if k < half + share {
                digest(1, h * share + (k - half))
            } else {
                digest(1, ((h + 1) % HOSTS) * share + (k - half - share))
            }
        }
    }
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_else(|| "both".into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for shape in ["replicated", "unique"] {
        if which == "both" || which == shape {
            run(shape, &rt);
        }
    }
}
