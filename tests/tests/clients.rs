//! What clients see: a container with its own address keeps it across hosts, and an
//! established TCP connection (a redis client under a steady write load) survives a
//! live (pre-copy) migration without losing an acknowledged write.

use std::time::Duration;

use xfer_agent::client::Mode;
use xfer_tests::{chain, task_pid, TestLab};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_client_keeps_its_connection_and_every_acknowledged_write() {
    let lab = TestLab::up("tcc", 2).await;
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    let ip = lab
        .start_redis("h1", "redis", Some(&lab.lab.service_address(1)))
        .await;

    lab.client_exec(&[
        "redis-cli",
        "-h",
        &ip,
        "DEBUG",
        "POPULATE",
        "50000",
        "key",
        "128",
    ]);

    // A steady write load over one connection from the client namespace.
    let report = std::env::temp_dir().join(format!("xfer-load-{}.json", std::process::id()));
    let load = xfer_tests::spawn_load(&lab.lab, &ip, 6, &report);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    // Live (pre-copy) migration: rounds while the load runs, then a short cut-over.
    let rep = h1
        .migrate("redis", &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate: {}", chain(&e)));
    assert_eq!(rep.mode, "precopy");
    assert!(
        rep.rounds.len() >= 2,
        "at least one pre-copy round and the final one: {:?}",
        rep.rounds
    );
    let first = &rep.rounds[0];
    let last = rep.rounds.last().expect("final round");
    // Only what changed since the last round travels during the cut-over.
    assert!(
        last.delta_raw_bytes < first.delta_raw_bytes / 2,
        "the final delta is not smaller than the first round: {:?}",
        rep.rounds
    );
    let (text, v) = xfer_tests::finish_load(load);
    eprintln!(
        "load during migration: {text}; xfer downtime {} us",
        rep.downtime_micros
    );
    // The connection survived: not one error, and the client kept writing afterwards.
    assert_eq!(v["errors"], 0, "the client's connection broke: {text}");
    assert!(v["acked"].as_u64().unwrap_or(0) > 1000, "{text}");
    assert!(
        v["max_gap_at_ms"].as_f64().unwrap_or(0.0) > 1000.0,
        "the longest gap is not the migration: {text}"
    );
    // The service runs on h2 now, at the same address.
    assert!(task_pid(&mut h1, "redis").await.is_none());
    assert!(task_pid(&mut h2, "redis").await.is_some());
    // Not one acknowledged write lost.
    xfer_tests::verify_writes(&lab.lab, &ip, &report, "k");
    // The source's container namespace is gone; the destination's exists.
    let names = xfer_net::list_netns().expect("netns");
    let p = xfer_tests::lab_prefix("tcc");
    assert!(!names.contains(&format!("{p}-h1-c-redis")), "{names:?}");
    assert!(names.contains(&format!("{p}-h2-c-redis")), "{names:?}");
}
