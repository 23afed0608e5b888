//! Failures during a live migration leave the source serving: the destination agent
//! killed during pre-copy, and the link cut during the transfer. The client's
//! connection and data survive, and a later migration works.

use std::time::Duration;

use xfer_agent::client::{MigrateOptions, Mode};
use xfer_tests::{chain, task_pid, wait_for, TestLab};

async fn redis_with_data(lab: &TestLab) -> String {
    let ip = lab
        .start_redis("h1", "redis", Some(&lab.lab.service_address(2)))
        .await;
    lab.client_exec(&[
        "redis-cli",
        "-h",
        &ip,
        "DEBUG",
        "POPULATE",
        "200000",
        "key",
        "256",
    ]);
    lab.client_exec(&["redis-cli", "-h", &ip, "SET", "marker", "kept"]);
    ip
}

/// Starts a migration and runs `strike` as soon as the image phase is done, i.e. when
/// pre-copy begins. Returns the migration's result.
async fn migrate_and_strike(
    lab: &TestLab,
    strike: impl FnOnce() + Send + 'static,
) -> Result<xfer_agent::client::MigrationReport, xfer_agent::error::AgentError> {
    let mut h1 = lab.agent("h1").await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let striker = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(60)).is_ok() {
            strike();
        }
    });
    let opts = MigrateOptions {
        mode: Mode::Precopy,
        max_rounds: 6,
        downtime_budget_ms: 1,
        ..Default::default()
    };
    let res = h1
        .migrate_opts("redis", &dst, &opts, move |p| {
            if p.name == "image" {
                let _ = tx.send(());
            }
        })
        .await;
    let _ = striker.join();
    res
}

async fn assert_source_serves(lab: &TestLab, ip: &str) {
    let mut h1 = lab.agent("h1").await;
    let (_, status) = task_pid(&mut h1, "redis")
        .await
        .expect("the source container must remain");
    assert_eq!(status, "running", "the source must run, not stay frozen");
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", ip, "GET", "marker"]),
        "kept"
    );
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", ip, "DBSIZE"]),
        "200001"
    );
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", ip, "INCR", "after"]),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_agent_killed_during_precopy() {
    let lab = TestLab::up("trk", 2).await;
    let ip = redis_with_data(&lab).await;
    let victim = lab.lab.host("h2").expect("h2").xferd_pid;
    let err = migrate_and_strike(&lab, move || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(victim as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    })
    .await
    .expect_err("the migration must fail when the destination dies");
    eprintln!("destination killed: {}", chain(&err));
    assert_source_serves(&lab, &ip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_during_transfer() {
    let lab = TestLab::up("trl", 2).await;
    let ip = redis_with_data(&lab).await;
    let link = format!("{}-h2", lab.lab.prefix);
    let l2 = link.clone();
    let err = migrate_and_strike(&lab, move || {
        let ok = std::process::Command::new("ip")
            .args(["link", "set", "dev", &l2, "down"])
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "cut the link");
    })
    .await
    .expect_err("the migration must fail when the link is cut");
    eprintln!("link cut: {}", chain(&err));
    assert_source_serves(&lab, &ip).await;
    // The link comes back: the destination drops the abandoned migration (the source
    // retries its abort) and a new migration goes through.
    let up = std::process::Command::new("ip")
        .args(["link", "set", "dev", &link, "up"])
        .status();
    assert!(up.is_ok_and(|s| s.success()));
    let inbound = std::path::Path::new(xfer_lab::LAB_SCRATCH)
        .join(&lab.lab.prefix)
        .join("h2/in");
    wait_for(
        "the destination to drop the aborted migration",
        Duration::from_secs(30),
        || {
            let n = std::fs::read_dir(&inbound).map(|d| d.count()).unwrap_or(0);
            (n == 0).then_some(())
        },
    )
    .await;
    let mut h1 = lab.agent("h1").await;
    let dst = lab.lab.host("h2").expect("h2").endpoint.clone();
    h1.migrate("redis", &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("second attempt: {}", chain(&e)));
    assert_eq!(
        lab.client_exec(&["redis-cli", "-h", &ip, "GET", "marker"]),
        "kept"
    );
}
