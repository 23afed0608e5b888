//! Volumes move with their container: named and anonymous volumes and their content,
//! read-write ones with what changed up to the freeze, read-only ones once (skipped by
//! a destination that holds the same content), with their mode, mount options and
//! labels.

use std::time::Duration;

use xfer_agent::client::{Client, Mode};
use xfer_agent::volumes::parse_cli;
use xfer_runtime::containerd::{Containerd, Runtime};
use xfer_tests::{chain, read_in, wait_for, TestLab};

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

/// The options of the mount at `point` in the container of `pid`.
fn mount_options(pid: u32, point: &str) -> String {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    info.lines()
        .find(|l| l.split_whitespace().nth(4) == Some(point))
        .and_then(|l| l.split_whitespace().nth(5).map(str::to_string))
        .unwrap_or_else(|| panic!("no mount at {point}: {info}"))
}

async fn migrate(lab: &TestLab, from: &str, to: &str) -> Vec<(String, u64)> {
    let dst = lab.lab.host(to).expect("host").endpoint.clone();
    let rep = lab
        .agent(from)
        .await
        .migrate("app", &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate {from} -> {to}: {}", chain(&e)));
    rep.phases.into_iter().map(|p| (p.name, p.bytes)).collect()
}

async fn running_pid(c: &mut Client) -> u32 {
    xfer_tests::running_pid(c, "app").await
}

fn count(pid: u32) -> u64 {
    xfer_tests::read_number(pid, "/data/count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_move_with_content_mode_options_and_labels() {
    let lab = TestLab::up("tvo", 2).await;
    for h in ["h1", "h2"] {
        lab.import(h, "busybox").await;
    }
    let mut h1 = lab.agent("h1").await;
    // Fill the named volume `conf` with a first container, then remove that one: the
    // named volume stays.
    h1.set_volumes(vec![parse_cli("conf:/conf").expect("volume")]);
    h1.run(
        "seed",
        "busybox",
        &sh("mkdir -p /conf/d && echo hello > /conf/greeting && echo x > /conf/d/f && touch /conf/done && sleep 1000"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run seed: {}", chain(&e)));
    let conf_dir = lab
        .lab
        .host("h1")
        .expect("h1")
        .work_dir()
        .join("volumes/conf");
    wait_for("the seed to fill conf", Duration::from_secs(10), || {
        conf_dir.join("done").exists().then_some(())
    })
    .await;
    h1.remove("seed").await.expect("remove seed");

    h1.set_volumes(
        [
            "data:/data:rw,nosuid,label.tier=gold",
            "conf:/conf:ro,nodev",
            "/scratch",
        ]
        .iter()
        .map(|v| parse_cli(v).expect("volume"))
        .collect(),
    );
    h1.run(
        "app",
        "busybox",
        &sh("echo s > /scratch/s; i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run app: {}", chain(&e)));
    let pid1 = running_pid(&mut h1).await;
    wait_for("the counter", Duration::from_secs(10), || {
        (count(pid1) > 10).then_some(())
    })
    .await;
    assert!(
        std::fs::write(format!("/proc/{pid1}/root/conf/x"), b"no").is_err(),
        "conf is read-only"
    );

    // h1 -> h2: everything arrives; the read-write volume up to the freeze.
    let before = count(pid1);
    let phases = migrate(&lab, "h1", "h2").await;
    let installed = |name: &str| {
        phases
            .iter()
            .find(|(n, _)| {
                n == &format!("dst.volume.{name}") || n == &format!("dst.volume.staged.{name}")
            })
            .map(|(_, b)| *b)
    };
    assert!(installed("rw-0").is_some_and(|b| b > 0), "{phases:?}");
    assert!(installed("ro-conf").is_some_and(|b| b > 0), "{phases:?}");
    assert!(installed("rw-2").is_some(), "{phases:?}");
    // Both read-write volumes come from the copies staged after the pre-copy round:
    // /scratch as it was, /data patched with the counter written since (its content
    // is checked below: the counter goes on from where it was at the freeze).
    let named = |n: &str| phases.iter().any(|(p, _)| p == n);
    assert!(named("dst.volume.staged.rw-0"), "{phases:?}");
    assert!(named("dst.volume.staged.rw-2"), "{phases:?}");
    let mut h2 = lab.agent("h2").await;
    let pid2 = running_pid(&mut h2).await;
    assert!(count(pid2) >= before, "the counter went back");
    wait_for(
        "the counter to go on at h2",
        Duration::from_secs(10),
        || (count(pid2) > before + 5).then_some(()),
    )
    .await;
    assert_eq!(read_in(pid2, "/conf/greeting").as_deref(), Some("hello"));
    assert_eq!(read_in(pid2, "/conf/d/f").as_deref(), Some("x"));
    assert_eq!(read_in(pid2, "/scratch/s").as_deref(), Some("s"));
    // Mode and options preserved.
    let conf = mount_options(pid2, "/conf");
    assert!(conf.split(',').any(|o| o == "ro"), "/conf: {conf}");
    assert!(conf.split(',').any(|o| o == "nodev"), "/conf: {conf}");
    let data = mount_options(pid2, "/data");
    assert!(data.split(',').any(|o| o == "rw"), "/data: {data}");
    assert!(data.split(',').any(|o| o == "nosuid"), "/data: {data}");
    // Labels preserved, and the mounts point at h2's own directories.
    let rt = Containerd::connect(lab.lab.host("h2").expect("h2").host_config())
        .await
        .expect("containerd of h2");
    let rec = rt.container("app").await.expect("record");
    let vols = xfer_agent::volumes::from_labels(&rec.labels).expect("volumes label");
    assert_eq!(vols.len(), 3);
    assert_eq!(vols[0].labels.get("tier").map(String::as_str), Some("gold"));
    let spec = String::from_utf8_lossy(&rec.spec_json).to_string();
    let h2_work = lab.lab.host("h2").expect("h2").work_dir();
    assert!(
        spec.contains(&h2_work.join("volumes/data").display().to_string()),
        "{spec}"
    );
    // The source's anonymous volume went with its container; named ones stay.
    let h1_work = lab.lab.host("h1").expect("h1").work_dir();
    assert!(!h1_work.join("volumes/_anon/app").exists());
    assert!(h1_work.join("volumes/conf/greeting").exists());

    // h2 -> h1 -> h2: h2 installed conf with this content on the first hop, so the
    // third hop skips it; the read-write volume keeps counting across every hop.
    let back = migrate(&lab, "h2", "h1").await;
    assert!(
        back.iter().any(|(n, _)| n == "dst.volume.ro-conf"),
        "h1 never installed conf, so it receives it: {back:?}"
    );
    let c1 = count(running_pid(&mut h1).await);
    let again = migrate(&lab, "h1", "h2").await;
    assert!(
        again.iter().any(|(n, _)| n == "dst.volume.skipped.conf"),
        "h2 already holds conf: {again:?}"
    );
    assert!(!again.iter().any(|(n, _)| n == "dst.volume.ro-conf"));
    let pid2 = running_pid(&mut h2).await;
    assert!(count(pid2) >= c1);
    assert_eq!(read_in(pid2, "/conf/greeting").as_deref(), Some("hello"));
}
