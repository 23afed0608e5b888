//! Cold migrations through real containerd, runc and CRIU between lab hosts.
//! Root only; each test has its own lab, torn down even when it fails.

use std::time::Duration;

use xfer_agent::client::Mode;
use xfer_tests::{chain, read_in, task_pid, wait_for, TestLab};

const COUNTER: &str = "rm /bin/wc; echo kept > /written; i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done";

/// Starts the busybox counter as `counter`; returns its pid.
async fn start_counter(agent: &mut xfer_agent::client::Client) -> u32 {
    let args: Vec<String> = vec!["sh".into(), "-c".into(), COUNTER.into()];
    agent
        .run("counter", "busybox", &args, &[])
        .await
        .unwrap_or_else(|e| panic!("run: {}", chain(&e)))
}

fn count(pid: u32) -> Option<u64> {
    read_in(pid, "/count").and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_busybox_counter_keeps_counting_and_its_writable_layer() {
    let lab = TestLab::up("tcb", 2).await;
    lab.import("h1", "busybox").await;
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    let pid = start_counter(&mut h1).await;
    // Let it count for a while.
    let before = wait_for("counter >= 20", Duration::from_secs(20), || {
        count(pid).filter(|c| *c >= 20)
    })
    .await;
    assert_eq!(read_in(pid, "/written").as_deref(), Some("kept"));
    assert!(std::fs::symlink_metadata(format!("/proc/{pid}/root/bin/wc")).is_err());

    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let report = h1
        .migrate("counter", &dst, Mode::Cold, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate: {}", chain(&e)));
    assert!(report.restored_pid > 0);
    assert!(report.downtime_micros > 0 && report.downtime_micros <= report.total_micros);
    assert_eq!(
        report.image_blobs_skipped, 0,
        "h2 had no image: every blob must be sent"
    );

    // Gone from h1, running on h2.
    assert!(
        task_pid(&mut h1, "counter").await.is_none(),
        "the source copy must be removed"
    );
    let (npid, status) = task_pid(&mut h2, "counter").await.expect("counter on h2");
    assert_eq!(status, "running");
    // It continues from its checkpointed value (a fresh start would count from 1).
    let after = wait_for("counter readable on h2", Duration::from_secs(10), || {
        count(npid)
    })
    .await;
    assert!(after >= before, "counter restarted: {after} < {before}");
    let later = wait_for("counter advancing on h2", Duration::from_secs(10), || {
        count(npid).filter(|c| *c > after)
    })
    .await;
    assert!(later > after);
    // The writable layer came along: the written file is there, the deleted one is not.
    assert_eq!(read_in(npid, "/written").as_deref(), Some("kept"));
    assert!(
        std::fs::symlink_metadata(format!("/proc/{npid}/root/bin/wc")).is_err(),
        "a path deleted in the writable layer reappeared"
    );
    assert!(std::fs::symlink_metadata(format!("/proc/{npid}/root/bin/ls")).is_ok());

    // A second migration back skips every image blob: h1 still has them.
    let back = lab.lab.host("h1").expect("h1").endpoint.clone();
    let report = h2
        .migrate("counter", &back, Mode::Cold, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate back: {}", chain(&e)));
    assert_eq!(report.image_blobs_sent, 0);
    let (bpid, _) = task_pid(&mut h1, "counter")
        .await
        .expect("counter back on h1");
    let back_count = wait_for("counter on h1 again", Duration::from_secs(10), || {
        count(bpid)
    })
    .await;
    assert!(back_count >= later);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_redis_keeps_every_key() {
    let lab = TestLab::up("tcr", 2).await;
    let mut h1 = lab.agent("h1").await;
    let a1 = lab.start_redis("h1", "redis", None).await;
    let a2 = lab.lab.host("h2").expect("h2").address.to_string();
    lab.client_exec(&[
        "redis-cli",
        "-h",
        &a1,
        "DEBUG",
        "POPULATE",
        "100000",
        "key",
        "64",
    ]);
    lab.client_exec(&["redis-cli", "-h", &a1, "SET", "marker", "before-migration"]);
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a1, "DBSIZE"]),
        "100001"
    );
    let digest_before = lab.client_exec(&["redis-cli", "-h", &a1, "DEBUG", "DIGEST"]);

    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let mut phases = Vec::new();
    let report = h1
        .migrate("redis", &dst, Mode::Cold, |p| {
            phases.push((p.name.clone(), p.micros))
        })
        .await
        .unwrap_or_else(|e| panic!("migrate: {}", chain(&e)));
    eprintln!(
        "cold redis 100k keys: {phases:?}; total {} us, downtime {} us, {} bytes",
        report.total_micros, report.downtime_micros, report.bytes_sent
    );
    for want in ["checkpoint", "transfer", "restore"] {
        assert!(
            phases.iter().any(|(n, _)| n == want),
            "phase {want} missing from {phases:?}"
        );
    }
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a2, "DBSIZE"]),
        "100001"
    );
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a2, "GET", "marker"]),
        "before-migration"
    );
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a2, "GET", "key:99999"])
            .len(),
        64
    );
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a2, "DEBUG", "DIGEST"]),
        digest_before,
        "dataset changed in flight"
    );
    // And it still takes writes.
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &a2, "INCR", "after"]),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_at_restore_leaves_the_source_running() {
    let lab = TestLab::up("tcf", 2).await;
    lab.import("h1", "busybox").await;
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    let pid = start_counter(&mut h1).await;
    let before = wait_for("counter >= 10", Duration::from_secs(20), || {
        count(pid).filter(|c| *c >= 10)
    })
    .await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    for step in ["restore", "transfer"] {
        let err = h1
            .migrate_with("counter", &dst, Mode::Cold, step, |_| {})
            .await
            .expect_err("the injected failure must fail the migration");
        let msg = chain(&err);
        assert!(
            msg.contains(step),
            "error does not name the {step} step: {msg}"
        );
        // The source runs on, same process, not frozen, still counting, data intact.
        let (spid, status) = task_pid(&mut h1, "counter")
            .await
            .expect("source container must remain");
        assert_eq!(spid, pid, "the source task must be the same process");
        assert_eq!(status, "running");
        let now = count(pid).expect("count");
        assert!(now >= before);
        wait_for("source counting again", Duration::from_secs(5), || {
            count(pid).filter(|c| *c > now)
        })
        .await;
        assert_eq!(read_in(pid, "/written").as_deref(), Some("kept"));
        // Nothing at the destination.
        assert!(
            task_pid(&mut h2, "counter").await.is_none(),
            "destination leftover after failed {step}"
        );
    }
    // A second attempt after the failures works.
    h1.migrate("counter", &dst, Mode::Cold, |_| {})
        .await
        .unwrap_or_else(|e| panic!("retry: {}", chain(&e)));
    assert!(task_pid(&mut h2, "counter").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_before_anything_freezes() {
    let lab = TestLab::up("tcv", 2).await;
    lab.import("h1", "busybox").await;
    let mut h1 = lab.agent("h1").await;
    start_counter(&mut h1).await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let me = lab.lab.host("h1").expect("h1").endpoint.clone();
    let unknown = h1
        .migrate("nope", &dst, Mode::Cold, |_| {})
        .await
        .expect_err("unknown container");
    assert!(
        chain(&unknown).contains("no container \"nope\""),
        "{}",
        chain(&unknown)
    );
    let unreachable = h1
        .migrate("counter", "http://127.0.0.1:1", Mode::Cold, |_| {})
        .await
        .expect_err("unreachable destination");
    assert!(
        chain(&unreachable).contains("connect to agent"),
        "{}",
        chain(&unreachable)
    );
    let to_self = h1
        .migrate("counter", &me, Mode::Cold, |_| {})
        .await
        .expect_err("to itself");
    assert!(
        chain(&to_self).contains("is this node"),
        "{}",
        chain(&to_self)
    );
    let (_, status) = task_pid(&mut h1, "counter").await.expect("still there");
    assert_eq!(status, "running");
}
