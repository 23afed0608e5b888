//! Cooperative migration (issue 6): a destination asks the knowledge base (here mode
//! (c), on-line queries to its neighbours over the `Kb` and `Chunks` services) who
//! holds the chunks it lacks, and fetches them from a neighbour instead of the
//! source; a neighbour killed mid-fetch does not fail the migration.
//!
//! Four hosts, each link shaped to 40 Mbit/s. A container with a 16 MB read-write
//! volume of random bytes starts on h1 and moves h1 -> h2 (h1 keeps the chunks in
//! its store), then h2 -> h3 (h3 takes the volume's chunks from h1), then h3 -> h4
//! with h1 as h4's only neighbour, and h1's agent is killed once h4 has received a
//! few megabytes (the source serves the rest).

use std::path::Path;
use std::time::Duration;

use xfer_agent::client::{Client, Mode};
use xfer_agent::volumes::parse_cli;
use xfer_lab::LabSpec;
use xfer_proto::v1::MigrationReport;
use xfer_tests::{chain, lab_prefix, wait_for, xferd_path, TestLab};

const BLOB: u64 = 16_000_000;

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Wire bytes per source over every round of a migration report.
fn by_source(r: &MigrationReport) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for round in &r.rounds {
        for s in &round.sources {
            *m.entry(s.source.clone()).or_insert(0) += s.wire_bytes;
        }
    }
    m
}

async fn migrate(lab: &TestLab, from: &str, to: &str) -> MigrationReport {
    let dst = lab.lab.host(to).expect("host").endpoint.clone();
    lab.agent(from)
        .await
        .migrate("app", &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate {from} -> {to}: {}", chain(&e)))
}

async fn running_pid(c: &mut Client) -> u32 {
    xfer_tests::running_pid(c, "app").await
}

fn count(pid: u32) -> u64 {
    xfer_tests::read_number(pid, "/data/count")
}

fn blob_of(pid: u32) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/root/data/blob")).expect("read the blob")
}

/// A lab of `hosts` (every link 40 Mbit/s) whose agents run the knowledge base of
/// on-line queries, `extra` merged into its configuration, and have busybox.
async fn kb_lab(tag: &str, hosts: &[&str], extra: serde_json::Value) -> TestLab {
    let mut lab = shaped_lab(tag, hosts).await;
    configure_kb(&mut lab, hosts, extra).await;
    lab
}

/// A lab of `hosts`, every link 40 Mbit/s.
async fn shaped_lab(tag: &str, hosts: &[&str]) -> TestLab {
    xfer_tests::require_root_stack();
    xfer_tests::become_subreaper();
    let prefix = lab_prefix(tag);
    let lab = xfer_lab::up(&LabSpec {
        prefix: prefix.clone(),
        nodes: hosts.len(),
        rates: hosts.iter().map(|h| (h.to_string(), 40_000_000)).collect(),
        xferd: xferd_path(),
        handover: Default::default(),
    })
    .await
    .unwrap_or_else(|e| panic!("lab up {prefix}: {}", chain(&e)));
    TestLab { lab }
}

/// Restarts the agents of `hosts` with the knowledge base of on-line queries, `extra`
/// merged into its configuration, and imports busybox.
async fn configure_kb(lab: &mut TestLab, hosts: &[&str], extra: serde_json::Value) {
    let (_dir, cfg_path) = lab.kb_config(hosts, serde_json::json!({"mode": "online_query"}), extra);
    for h in hosts {
        lab.restart_with_kb(h, &cfg_path).await;
    }
    for h in hosts {
        lab.import(h, "busybox").await;
    }
}

/// Starts `app` on h1: a BLOB of random bytes in its volume `data`, then a counter;
/// returns the blob once the counter runs.
async fn start_app_with_blob(lab: &TestLab) -> Vec<u8> {
    let mut h1 = lab.agent("h1").await;
    h1.set_volumes(vec![parse_cli("data:/data").expect("volume")]);
    h1.run(
        "app",
        "busybox",
        &sh(&format!(
            "head -c {BLOB} /dev/urandom > /data/blob && touch /data/ready; \
             i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"
        )),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run app: {}", chain(&e)));
    let pid1 = running_pid(&mut h1).await;
    wait_for("the blob and the counter", Duration::from_secs(30), || {
        (count(pid1) > 5).then_some(())
    })
    .await;
    blob_of(pid1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_fetches_from_a_neighbour_and_survives_its_death() {
    // Every agent gets the knowledge base: on-line queries; h4 asks h1 only.
    let lab = kb_lab(
        "tco",
        &["h1", "h2", "h3", "h4"],
        serde_json::json!({"neighbours": {"h4": ["h1"]}}),
    )
    .await;

    let blob = start_app_with_blob(&lab).await;
    assert_eq!(blob.len() as u64, BLOB);

    // h1 -> h2: from the source (nobody else holds anything).
    let r = migrate(&lab, "h1", "h2").await;
    let src = by_source(&r);
    eprintln!("h1 -> h2 wire bytes per source: {src:?}");
    assert!(
        src.get("source").copied().unwrap_or(0) > BLOB / 2,
        "h1 -> h2 came from the source: {src:?}"
    );
    assert!(src.keys().all(|k| k == "source"), "{src:?}");
    // 16 MB at 40 Mbit/s: the pre-copy round was answered before its last chunks
    // (the cut-over's dump overlapped them), and its report holds the whole round.
    assert!(
        r.rounds.iter().any(|x| x.pending_chunks > 0),
        "an early reply: {:?}",
        r.rounds
    );
    assert!(
        src.get("source").copied().unwrap_or(0) > BLOB,
        "the whole volume counted once its tail arrived: {src:?}"
    );

    // h2 -> h3: h1 still holds the volume's chunks (and the unchanged pages).
    let r = migrate(&lab, "h2", "h3").await;
    let src = by_source(&r);
    eprintln!("h2 -> h3 wire bytes per source: {src:?}");
    let from_h1 = src.get("h1").copied().unwrap_or(0);
    assert!(
        from_h1 > BLOB / 2,
        "h3 took most of the volume from the neighbour h1: {src:?}"
    );
    let mut h3 = lab.agent("h3").await;
    let pid3 = running_pid(&mut h3).await;
    assert!(blob_of(pid3) == blob, "the volume arrived intact at h3");
    let c3 = count(pid3);
    wait_for("the counter on h3", Duration::from_secs(10), || {
        (count(pid3) > c3).then_some(())
    })
    .await;

    // h3 -> h4 with h1 killed mid-fetch: the source serves what h1 did not.
    let h1_pid = lab.lab.host("h1").expect("h1").xferd_pid;
    let h4_store = lab.lab.host("h4").expect("h4").work_dir().join("store");
    let base = dir_bytes(&h4_store);
    let killer = tokio::spawn(async move {
        for _ in 0..6000 {
            if dir_bytes(&h4_store) > base + 3_000_000 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(h1_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    });
    let r = migrate(&lab, "h3", "h4").await;
    assert!(
        killer.await.expect("killer"),
        "h1 was killed during the fetch"
    );
    let src = by_source(&r);
    eprintln!("h3 -> h4 (h1 killed) wire bytes per source: {src:?}");
    assert!(
        src.get("h1").copied().unwrap_or(0) > 0,
        "h1 served before it died: {src:?}"
    );
    assert!(
        src.get("source").copied().unwrap_or(0) > BLOB / 8,
        "the source served the rest: {src:?}"
    );
    let mut h4 = lab.agent("h4").await;
    let pid4 = running_pid(&mut h4).await;
    assert!(blob_of(pid4) == blob, "the volume arrived intact at h4");
    let c4 = count(pid4);
    wait_for("the counter on h4", Duration::from_secs(10), || {
        (count(pid4) > c4).then_some(())
    })
    .await;
}

/// Snapshot caching (issue 6, deliverable 2): h3 merely runs `twin`, a container of
/// the same service whose volume holds the same data as `app`'s on h1; h3's agent
/// snapshots that volume into its store and announces it. When `app` later moves
/// h1 -> h2, h2 takes most of the volume from h3, which never took part in a
/// migration. Memory snapshots are on too (CRIU dumps leaving the tasks running,
/// every 2 s on every host, `app` on h1 included while it migrates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_that_only_snapshotted_serves_a_later_migration() {
    let lab = kb_lab(
        "tsn",
        &["h1", "h2", "h3"],
        serde_json::json!({
            "snapshots": {"period_secs": 2, "max_age_secs": 600, "memory": true},
        }),
    )
    .await;

    // The same data in the named volume `data` on h1 and on h3.
    let mut blob = vec![0u8; BLOB as usize];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for b in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for h in ["h1", "h3"] {
        let dir = lab
            .lab
            .host(h)
            .expect("host")
            .work_dir()
            .join("volumes/data");
        std::fs::create_dir_all(&dir).expect("mkdir volume");
        std::fs::write(dir.join("blob"), &blob).expect("write blob");
        std::fs::File::options()
            .write(true)
            .open(dir.join("blob"))
            .and_then(|f| f.set_modified(when))
            .expect("mtime");
    }
    let h3_store = lab.lab.host("h3").expect("h3").work_dir().join("store");
    let h3_before = dir_bytes(&h3_store);

    let mut h3 = lab.agent("h3").await;
    h3.set_volumes(vec![parse_cli("data:/data").expect("volume")]);
    h3.run("twin", "busybox", &sh("while true; do sleep 1; done"), &[])
        .await
        .unwrap_or_else(|e| panic!("run twin: {}", chain(&e)));
    let mut h1 = lab.agent("h1").await;
    h1.set_volumes(vec![parse_cli("data:/data").expect("volume")]);
    h1.run(
        "app",
        "busybox",
        &sh("i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.05; done"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run app: {}", chain(&e)));
    let pid1 = running_pid(&mut h1).await;

    // h3's agent snapshots twin's volume and memory: its store fills, its index names
    // both.
    let index = lab
        .lab
        .host("h3")
        .expect("h3")
        .work_dir()
        .join("snapshots/index.json");
    let held: serde_json::Value =
        wait_for("h3's snapshots of twin", Duration::from_secs(60), || {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&index).ok()?).ok()?;
            let has = |subject: serde_json::Value| {
                v.as_array()
                    .is_some_and(|a| a.iter().any(|h| h["snapshot"]["subject"] == subject))
            };
            let volume = has(serde_json::json!({"kind": "volume", "id": "twin/rw-0"}));
            let memory = has(serde_json::json!({"kind": "container", "id": "twin"}));
            (volume && memory).then_some(v)
        })
        .await;
    let subjects: Vec<&serde_json::Value> = held
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| &h["snapshot"]["subject"])
        .collect();
    eprintln!("h3 holds snapshots of {subjects:?}");
    let h3_after = dir_bytes(&h3_store);
    assert!(
        h3_after > h3_before + BLOB / 2,
        "h3's store holds the snapshot's chunks ({h3_before} -> {h3_after} bytes)"
    );
    wait_for("app's counter", Duration::from_secs(30), || {
        (count(pid1) > 5).then_some(())
    })
    .await;

    // app h1 -> h2: most of the volume comes from h3's snapshot.
    let r = migrate(&lab, "h1", "h2").await;
    let src = by_source(&r);
    eprintln!("h1 -> h2 wire bytes per source: {src:?}");
    let from_h3 = src.get("h3").copied().unwrap_or(0);
    let from_source = src.get("source").copied().unwrap_or(0);
    assert!(
        from_h3 > BLOB * 3 / 4,
        "h2 took most of the volume from h3's snapshot: {src:?}"
    );
    assert!(
        from_source < BLOB / 4,
        "the source served little of the volume: {src:?}"
    );
    let mut h2 = lab.agent("h2").await;
    let pid2 = running_pid(&mut h2).await;
    assert!(blob_of(pid2) == blob, "the volume arrived intact at h2");
    let c2 = count(pid2);
    wait_for("the counter on h2", Duration::from_secs(10), || {
        (count(pid2) > c2).then_some(())
    })
    .await;
}

/// Image layers as chunks: h1 and h3 have the `bulky` image (a 40 MB layer), h2 does
/// not. Each agent chunks its images' blobs into its store and announces them; when
/// a container of that image moves h1 -> h2, h2 takes the layer's chunks from h3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_layers_come_from_a_neighbour_that_holds_the_image() {
    let lab = kb_lab("tly", &["h1", "h2", "h3"], serde_json::json!({})).await;
    lab.import("h1", "bulky").await;
    lab.import("h3", "bulky").await;
    let bulk = xfer_lab::BULKY_BYTES as u64;
    let h3_store = lab.lab.host("h3").expect("h3").work_dir().join("store");
    wait_for("h3 chunks its bulky image", Duration::from_secs(90), || {
        (dir_bytes(&h3_store) > bulk * 9 / 10).then_some(())
    })
    .await;

    let mut h1 = lab.agent("h1").await;
    h1.run(
        "app",
        "bulky",
        &sh("i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.05; done"),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("run app: {}", chain(&e)));
    running_pid(&mut h1).await;
    let r = migrate(&lab, "h1", "h2").await;
    let mut img = std::collections::BTreeMap::new();
    for s in &r.image_sources {
        *img.entry(s.source.clone()).or_insert(0u64) += s.wire_bytes;
    }
    eprintln!(
        "h1 -> h2: {} image blobs sent, {} skipped; image bytes per source {img:?}",
        r.image_blobs_sent, r.image_blobs_skipped
    );
    assert!(r.image_blobs_sent >= 2, "h2 lacked the image: {r:?}");
    assert!(
        img.get("h3").copied().unwrap_or(0) > bulk * 3 / 4,
        "h2 took the layer from the neighbour h3: {img:?}"
    );
    assert!(
        img.get("source").copied().unwrap_or(0) < bulk / 4,
        "the source served little of the image: {img:?}"
    );
    let mut h2 = lab.agent("h2").await;
    let pid2 = running_pid(&mut h2).await;
    let data =
        std::fs::read(format!("/proc/{pid2}/root/opt/bulk/data")).expect("read the layer's file");
    assert!(
        data == xfer_lab::bulk_bytes(xfer_lab::BULKY_BYTES),
        "the layer arrived intact"
    );
    let c = xfer_tests::read_number(pid2, "/count");
    wait_for("the counter on h2", Duration::from_secs(10), || {
        (xfer_tests::read_number(pid2, "/count") > c).then_some(())
    })
    .await;
}

/// The knowledge base's etcd store through `xferd`: a real etcd-server (started by the
/// test on the lab's bridge address, which every host namespace reaches), central
/// push with h3 as the knowledge base storing into etcd. After `app` moved h1 -> h2,
/// etcd names every host, and the next move h2 -> h3 takes the volume from h1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_through_the_etcd_knowledge_base() {
    let hosts = ["h1", "h2", "h3"];
    let mut lab = shaped_lab("tet", &hosts).await;
    // On the lab's bridge address: the host namespaces reach it, nothing outside.
    let etcd = xfer_kb::etcd_server::EtcdServer::start_on(lab.lab.gateway)
        .await
        .unwrap_or_else(|e| panic!("etcd-server: {}", chain(&e)));
    configure_kb(
        &mut lab,
        &hosts,
        serde_json::json!({
            "mode": "central_push",
            "kb": "h3",
            "store": "etcd",
            "etcd": [etcd.url()],
        }),
    )
    .await;

    let blob = start_app_with_blob(&lab).await;
    migrate(&lab, "h1", "h2").await;

    // Every host's pusher reached the knowledge base, which wrote to etcd.
    let store = xfer_kb::EtcdStore::connect(xfer_kb::EtcdConfig::new(vec![etcd.url().to_string()]))
        .await
        .unwrap_or_else(|e| panic!("connect to etcd: {}", chain(&e)));
    let named = {
        use xfer_kb::KbStore;
        let mut named = Vec::new();
        for _ in 0..100 {
            named = store
                .hosts()
                .await
                .unwrap_or_else(|e| panic!("hosts in etcd: {}", chain(&e)))
                .into_iter()
                .map(|h| h.host)
                .collect::<Vec<_>>();
            if hosts.iter().all(|h| named.iter().any(|n| n == h)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        named
    };
    eprintln!("hosts in etcd: {named:?}");
    assert!(
        hosts.iter().all(|h| named.iter().any(|n| n == h)),
        "etcd names every host: {named:?}"
    );

    // h2 -> h3: h3 asks its own (etcd-backed) knowledge base and takes the volume
    // from h1, which kept its chunks.
    let r = migrate(&lab, "h2", "h3").await;
    let src = by_source(&r);
    eprintln!("h2 -> h3 wire bytes per source: {src:?}");
    assert!(
        src.get("h1").copied().unwrap_or(0) > BLOB / 2,
        "h3 took most of the volume from h1, named by etcd: {src:?}"
    );
    let mut h3 = lab.agent("h3").await;
    let pid3 = running_pid(&mut h3).await;
    assert!(blob_of(pid3) == blob, "the volume arrived intact at h3");
    drop(lab);
    drop(etcd);
}
