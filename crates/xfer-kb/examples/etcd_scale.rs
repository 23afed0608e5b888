//! How the etcd store scales, measured on a private etcd-server: writes a cluster's
//! holdings through full updates, then times 10k-digest holder queries and single
//! events, and reads etcd's database size and RSS per entry. Extrapolates to 10M
//! entries against etcd's storage quota (2 GiB default, 8 GiB suggested maximum).
//!
//! `cargo run --release -p xfer-kb --example etcd_scale [hosts] [entries-per-host]`

use std::time::{Duration, Instant};

use xfer_kb::etcd_server::EtcdServer;
use xfer_kb::{
    Change, Digest, EtcdConfig, EtcdStore, FullInventory, HostEvent, HostInfo, KbStore, Timestamp,
};

fn digest(n: u64) -> Digest {
    Digest::of(&n.to_le_bytes())
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let hosts: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let per_host: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(2000);
    let etcd = EtcdServer::start().await?;
    let rss0 = etcd.rss().unwrap_or(0);
    let store = EtcdStore::connect(EtcdConfig::new(vec![etcd.url().to_owned()])).await?;
    let mut client = etcd_client::Client::connect([etcd.url()], None).await?;
    let db0 = client.status().await?.db_size() as u64;
    let t0 = Timestamp::from_secs(1);
    // Each host: half its digests shared with the next host (replication 2 on those).
    let start = Instant::now();
    for h in 0..hosts {
        let half = per_host / 2;
        let mut ds: Vec<Digest> = (0..half).map(|k| digest(h * per_host + k)).collect();
        let next = (h + 1) % hosts;
        ds.extend((0..half).map(|k| digest(next * per_host + k)));
        store
            .replace(
                &FullInventory {
                    host: format!("host-{h:04}"),
                    seq: 0,
                    at: t0,
                    digests: ds,
                    snapshots: vec![],
                    info: HostInfo::default(),
                },
                t0,
            )
            .await?;
    }
    let write = start.elapsed();
    let entries = hosts * per_host;
    // Let etcd settle (the backend commits every 100 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db1 = client.status().await?.db_size() as u64;
    let rss1 = etcd.rss().unwrap_or(0);
    println!(
        "etcd: {hosts} hosts x {per_host} = {entries} entries written by full updates in {:.1} s ({:.0} entries/s)",
        write.as_secs_f64(),
        entries as f64 / write.as_secs_f64()
    );
    let db_per = (db1 - db0) as f64 / entries as f64;
    let rss_per = rss1.saturating_sub(rss0) as f64 / entries as f64;
    println!(
        "etcd db size {} -> {} ({db_per:.0} bytes/entry); etcd RSS {} -> {} ({rss_per:.0} bytes/entry)",
        mib(db0),
        mib(db1),
        mib(rss0),
        mib(rss1)
    );
    let mut lat = Vec::new();
    for q in 0..20u64 {
        let ds: Vec<Digest> = (0..10_000u64)
            .map(|i| {
                // A held digest: the first half of some host's block.
                let x = (q * 7919 + i * 104_729) % entries;
                digest(x / per_host * per_host + x % (per_host / 2))
            })
            .collect();
        let t = Instant::now();
        let a = store.holders(&ds).await?;
        lat.push(t.elapsed());
        assert!(a.holders.iter().all(|h| !h.is_empty()));
    }
    println!(
        "holders(10k digests): median {:.0} ms, p99 {:.0} ms",
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3
    );
    let mut ev = Vec::new();
    for i in 0..200u64 {
        let t = Instant::now();
        store
            .apply(
                &HostEvent {
                    host: "host-0000".into(),
                    seq: i + 1,
                    at: t0,
                    change: Change::Add(vec![digest(u64::MAX - i)]),
                },
                t0,
            )
            .await?;
        ev.push(t.elapsed());
    }
    println!(
        "one add event: median {:.2} ms, p99 {:.2} ms",
        pct(&mut ev, 0.5).as_secs_f64() * 1e3,
        pct(&mut ev, 0.99).as_secs_f64() * 1e3
    );
    let ten_m = 10_000_000f64;
    println!(
        "extrapolated to 10M entries: db {:.1} GiB (quota 2 GiB default, 8 GiB suggested max), etcd RSS {:.1} GiB, full load at the write rate above {:.0} s",
        db_per * ten_m / (1u64 << 30) as f64,
        rss_per * ten_m / (1u64 << 30) as f64,
        ten_m / (entries as f64 / write.as_secs_f64())
    );
    Ok(())
}
