//! Post-copy, hybrid and auto migrations (CRIU lazy pages): the container restarts at
//! the destination before its memory has arrived, then takes it from the source's
//! page server. Clients keep their connection and every acknowledged write; a failure
//! before the destination confirms leaves the source serving; nothing stays behind.

use std::time::Duration;

use xfer_agent::client::{Client, MigrateOptions, Mode};
use xfer_agent::volumes::parse_cli;
use xfer_tests::{chain, read_in, task_pid, wait_for, TestLab};

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// No CRIU process of this lab (lazy dump, lazy-pages daemon) may outlive a migration.
/// The lab's processes name its paths (`/var/lib/xfer-lab/PREFIX`, runc's root
/// `/run/containerd/runc/xfer-PREFIX-hN`); a dumping CRIU dies with its runc.
fn criu_processes(prefix: &str) -> Vec<String> {
    let mark = xfer_tests::lab_prefix(prefix);
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let lab_path =
                cmd.contains(&format!("/{mark}/")) || cmd.contains(&format!("xfer-{mark}-"));
            if lab_path && (cmd.starts_with("criu") || cmd.contains("--lazy-pages")) {
                out.push(cmd);
            }
        }
    }
    out
}

async fn wait_no_criu(prefix: &str) {
    wait_for(
        "every CRIU process of the migration to end",
        Duration::from_secs(20),
        || criu_processes(prefix).is_empty().then_some(()),
    )
    .await;
}

fn redis(lab: &TestLab, ip: &str, args: &[&str]) -> String {
    let mut a = vec!["redis-cli", "-h", ip];
    a.extend_from_slice(args);
    lab.client_exec(&a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_keeps_the_connection_and_every_acknowledged_write() {
    let lab = TestLab::up("tpc", 2).await;
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    assert!(
        h2.hello().lazy_pages,
        "the destination cannot restore lazily here (criu check --feature uffd-noncoop)"
    );
    let ip = lab
        .start_redis("h1", "redis", Some(&lab.lab.service_address(1)))
        .await;
    // ~80 MB of memory: enough that post-copy really moves memory lazily.
    redis(&lab, &ip, &["DEBUG", "POPULATE", "200000", "key", "256"]);

    let report = std::env::temp_dir().join(format!("xfer-load-pc-{}.json", std::process::id()));
    let load = xfer_tests::spawn_load(&lab.lab, &ip, 6, &report);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let rep = h1
        .migrate("redis", &dst, Mode::Postcopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate: {}", chain(&e)));
    assert_eq!(rep.mode, "postcopy");
    // No pre-copy round: only the cut-over's, and it carried no private memory.
    assert_eq!(rep.rounds.len(), 1, "{:?}", rep.rounds);
    assert!(
        rep.postcopy_bytes > 50_000_000,
        "the memory did not go lazily: {} bytes",
        rep.postcopy_bytes
    );
    assert!(
        rep.rounds[0].dump_bytes < rep.postcopy_bytes / 10,
        "the lazy dump wrote the memory anyway: {:?}",
        rep.rounds
    );
    let names: Vec<&str> = rep.phases.iter().map(|p| p.name.as_str()).collect();
    let at = |n: &str| names.iter().position(|x| *x == n);
    assert!(
        at("restore").is_some() && at("restore") < at("postcopy"),
        "{names:?}"
    );
    let (text, v) = xfer_tests::finish_load(load);
    eprintln!(
        "post-copy: load {text}; downtime {} us, {} B lazily in {} us",
        rep.downtime_micros, rep.postcopy_bytes, rep.postcopy_micros
    );
    assert_eq!(v["errors"], 0, "the client's connection broke: {text}");
    assert!(v["acked"].as_u64().unwrap_or(0) > 1000, "{text}");
    assert!(task_pid(&mut h1, "redis").await.is_none());
    assert!(task_pid(&mut h2, "redis").await.is_some());
    // Every key of the populated memory, and every acknowledged write.
    let n: u64 = redis(&lab, &ip, &["DBSIZE"]).parse().expect("dbsize");
    assert!(n >= 200_000, "keys lost: {n}");
    assert!(
        redis(&lab, &ip, &["GET", "key:199999"]).starts_with("value:199999"),
        "a populated value is wrong after the lazy restore"
    );
    xfer_tests::verify_writes(&lab.lab, &ip, &report, "k");
    wait_no_criu("tpc").await;
    let lazy = lab.lab.host("h2").expect("h2").work_dir().join("lazy");
    wait_for(
        "the destination to drop the lazy images",
        Duration::from_secs(10),
        || {
            std::fs::read_dir(&lazy)
                .map(|d| d.count() == 0)
                .unwrap_or(true)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcopy_failing_before_the_destination_confirms_leaves_the_source_serving() {
    let lab = TestLab::up("tpf", 2).await;
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    let ip = lab
        .start_redis("h1", "redis", Some(&lab.lab.service_address(1)))
        .await;
    redis(&lab, &ip, &["DEBUG", "POPULATE", "100000", "key", "256"]);
    let pid = xfer_tests::running_pid(&mut h1, "redis").await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let err = h1
        .migrate_with("redis", &dst, Mode::Postcopy, "restore", |_| {})
        .await
        .expect_err("the injected restore failure must fail the migration");
    assert!(chain(&err).contains("injected"), "{}", chain(&err));
    // The source resumed: same task, every key, answering.
    assert_eq!(xfer_tests::running_pid(&mut h1, "redis").await, pid);
    assert_eq!(redis(&lab, &ip, &["DBSIZE"]), "100000");
    assert_eq!(redis(&lab, &ip, &["SET", "after", "1"]), "OK");
    assert!(task_pid(&mut h2, "redis").await.is_none());
    wait_no_criu("tpf").await;
    // A second attempt works.
    let rep = h1
        .migrate("redis", &dst, Mode::Postcopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("second attempt: {}", chain(&e)));
    assert!(rep.postcopy_bytes > 0);
    assert_eq!(redis(&lab, &ip, &["GET", "after"]), "1");
    wait_no_criu("tpf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_moves_the_volume_in_rounds_and_the_memory_lazily() {
    let lab = TestLab::up("thy", 2).await;
    for h in ["h1", "h2"] {
        lab.import(h, "busybox").await;
    }
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    h1.set_volumes(vec![parse_cli("data:/data").expect("volume")]);
    h1.run(
        "app",
        "busybox",
        &sh("head -c 20000000 /dev/urandom > /data/blob && sync; i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run: {}", chain(&e)));
    let pid = xfer_tests::running_pid(&mut h1, "app").await;
    wait_for("the counter to start", Duration::from_secs(20), || {
        (xfer_tests::read_number(pid, "/data/count") > 2).then_some(())
    })
    .await;
    let blob = std::fs::read(format!("/proc/{pid}/root/data/blob")).expect("blob");
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let rep = h1
        .migrate("app", &dst, Mode::Hybrid, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate: {}", chain(&e)));
    assert_eq!(rep.mode, "hybrid");
    assert!(rep.rounds.len() >= 2, "{:?}", rep.rounds);
    let first = &rep.rounds[0];
    assert_eq!(first.dump_bytes, 0, "a hybrid round dumped memory");
    assert!(
        first.delta_raw_bytes > 15_000_000,
        "the volume did not travel in the first round: {first:?}"
    );
    let last = rep.rounds.last().expect("final");
    assert!(
        last.delta_raw_bytes < 5_000_000,
        "the volume travelled again during the cut-over: {last:?}"
    );
    assert!(rep.postcopy_micros > 0, "no lazy cut-over");
    let npid = xfer_tests::running_pid(&mut h2, "app").await;
    assert_eq!(
        std::fs::read(format!("/proc/{npid}/root/data/blob")).expect("blob at h2"),
        blob
    );
    let before = xfer_tests::read_number(npid, "/data/count");
    wait_for(
        "the counter to go on at h2",
        Duration::from_secs(10),
        || (xfer_tests::read_number(npid, "/data/count") > before + 3).then_some(()),
    )
    .await;
    assert!(read_in(npid, "/data/count").is_some());
    wait_no_criu("thy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_goes_lazy_only_when_a_full_cutover_would_exceed_the_budget() {
    let lab = TestLab::up("tau", 3).await;
    let mut h1 = lab.agent("h1").await;
    let ip = lab
        .start_redis("h1", "redis", Some(&lab.lab.service_address(1)))
        .await;
    redis(&lab, &ip, &["DEBUG", "POPULATE", "100000", "key", "256"]);
    let to = |h: &str| lab.lab.host(h).expect("host").endpoint.clone();
    let opts = |budget| MigrateOptions {
        mode: Mode::Auto,
        max_rounds: 2,
        downtime_budget_ms: budget,
        ..Default::default()
    };
    // A generous budget: the full cut-over fits, nothing goes lazily.
    let rep = h1
        .migrate_opts("redis", &to("h2"), &opts(60_000), |_| {})
        .await
        .unwrap_or_else(|e| panic!("auto, 60 s budget: {}", chain(&e)));
    assert!(rep.decision.contains("full cut-over"), "{}", rep.decision);
    assert_eq!(rep.postcopy_micros, 0);
    // A budget no full cut-over of this much memory can meet: lazy.
    let mut h2: Client = lab.agent("h2").await;
    let rep = h2
        .migrate_opts("redis", &to("h3"), &opts(1), |_| {})
        .await
        .unwrap_or_else(|e| panic!("auto, 1 ms budget: {}", chain(&e)));
    assert!(rep.decision.contains("lazy cut-over"), "{}", rep.decision);
    assert!(
        rep.decision.contains("dirty rate") && rep.decision.contains("link"),
        "{}",
        rep.decision
    );
    assert!(rep.postcopy_bytes > 20_000_000, "{}", rep.postcopy_bytes);
    assert_eq!(redis(&lab, &ip, &["DBSIZE"]), "100000");
    wait_no_criu("tau").await;
}
