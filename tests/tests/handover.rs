//! The Mobile-IP-style handover on the real stack: a routed container's home agent
//! tunnels its traffic to wherever it migrates, clients keep their connections and
//! can rebind, tunnels go when bindings expire, go idle or the container comes home,
//! and forged or replayed binding updates change nothing.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use xfer_agent::client::{Client, Mode};
use xfer_lab::HandoverSpec;
use xfer_mobility::{BindingAck, BindingFlags, BindingStatus, BindingUpdate, ClusterKey};
use xfer_net::{LinkStats, NetOps, Netlink, Ns};
use xfer_proto::v1::{BindingEvent, BindingEventKind};
use xfer_tests::{chain, loadgen_path, task_pid, TestLab};

/// The tunnel devices (`xh…` home agent ends, `xc…` care-of ends) on `host`.
async fn tunnels(lab: &TestLab, host: &str) -> Vec<String> {
    let ns = &lab.lab.host(host).expect("host").netns;
    let net = Netlink::new().expect("netlink");
    net.list_links(Ns::Named(ns))
        .await
        .expect("links")
        .into_iter()
        .filter(|l| l.starts_with("xh") || l.starts_with("xc"))
        .collect()
}

async fn stats(lab: &TestLab, host: &str, link: &str) -> LinkStats {
    let ns = &lab.lab.host(host).expect("host").netns;
    Netlink::new()
        .expect("netlink")
        .link_stats(Ns::Named(ns), link)
        .await
        .expect("link stats")
}

/// The home agent's tunnel on `host` (exactly one expected).
async fn the_home_tunnel(lab: &TestLab, host: &str) -> String {
    let t: Vec<String> = tunnels(lab, host)
        .await
        .into_iter()
        .filter(|l| l.starts_with("xh"))
        .collect();
    assert_eq!(t.len(), 1, "one home agent tunnel on {host}: {t:?}");
    t[0].clone()
}

/// The live bindings a home agent reports (its watch stream up to SYNCED).
async fn bindings(c: &mut Client) -> Vec<BindingEvent> {
    let mut s = c
        .watch_bindings()
        .await
        .unwrap_or_else(|e| panic!("watch: {}", chain(&e)));
    let mut out = Vec::new();
    while let Some(ev) = s.message().await.expect("watch stream") {
        if ev.kind == BindingEventKind::Synced as i32 {
            return out;
        }
        assert_eq!(ev.kind, BindingEventKind::Current as i32, "{ev:?}");
        out.push(ev);
    }
    panic!("the watch stream ended before SYNCED");
}

fn redis_in_client(lab: &TestLab, ip: Ipv4Addr, cmd: &[&str]) -> String {
    let mut args = vec!["redis-cli", "-h"];
    let ip = ip.to_string();
    args.push(&ip);
    args.extend_from_slice(cmd);
    lab.client_exec(&args).trim().to_string()
}

/// Runs the load generator in the client namespace on a thread.
fn spawn_load(
    lab: &TestLab,
    ip: Ipv4Addr,
    seconds: u32,
    extra: &[&str],
    report: &Path,
) -> std::thread::JoinHandle<serde_json::Value> {
    let lab = lab.lab.clone();
    let mut args = vec![
        loadgen_path().display().to_string(),
        "run".into(),
        "--addr".into(),
        format!("{ip}:6379"),
        "--seconds".into(),
        seconds.to_string(),
        "--out".into(),
        report.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    std::thread::spawn(move || {
        let out = lab.exec("client", &args).expect("run loadgen");
        assert!(
            out.status.success(),
            "loadgen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("loadgen report")
    })
}

fn verify(lab: &TestLab, ip: Ipv4Addr, report: &Path, key_prefix: &str) {
    xfer_tests::verify_writes(&lab.lab, &ip.to_string(), report, key_prefix);
}

async fn migrate(lab: &TestLab, id: &str, from: &str, to: &str) -> u64 {
    let dst = lab.lab.host(to).expect("host").endpoint.clone();
    let rep = lab
        .agent(from)
        .await
        .migrate(id, &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate {from} -> {to}: {}", chain(&e)));
    assert!(
        rep.phases.iter().any(|p| p.name == "dst.binding") || to == "h1",
        "the restore registered no binding: {:?}",
        rep.phases
    );
    rep.downtime_micros
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_new_connections_survive_a_migration_through_the_home_agent() {
    let lab = TestLab::up("tho", 2).await;
    let home = lab.start_routed_redis("h1", "redis", 1, false).await;
    lab.import("h2", "redis").await;
    redis_in_client(&lab, home, &["DEBUG", "POPULATE", "20000", "key", "128"]);
    let tmp = std::env::temp_dir();
    let r_open = tmp.join(format!("xfer-ho-open-{}.json", std::process::id()));
    let r_new = tmp.join(format!("xfer-ho-new-{}.json", std::process::id()));
    // One long-lived connection, and a client that opens a new one per request.
    let open = spawn_load(&lab, home, 7, &["--pace-us", "500"], &r_open);
    let new = spawn_load(
        &lab,
        home,
        7,
        &[
            "--pace-us",
            "2000",
            "--new-connection-each",
            "--timeout-ms",
            "1000",
            "--key-prefix",
            "n",
        ],
        &r_new,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let downtime_us = migrate(&lab, "redis", "h1", "h2").await;
    let open = open.join().expect("open load");
    let new = new.join().expect("new-connection load");
    eprintln!(
        "handover: open stream {open}; new connections {new}; xfer downtime {} ms",
        downtime_us / 1000
    );
    // The open connection survived the move: not one error, and writes went on
    // after the cut-over (the longest gap is the migration, not the start).
    assert_eq!(open["errors"], 0, "the open connection broke: {open}");
    assert!(open["acked"].as_u64().unwrap_or(0) > 1000, "{open}");
    assert!(
        open["max_gap_at_ms"].as_f64().unwrap_or(0.0) > 1000.0,
        "{open}"
    );
    // New connections kept succeeding: no request waited long, whatever failed was
    // retried at once.
    assert!(new["acked"].as_u64().unwrap_or(0) > 300, "{new}");
    assert!(
        new["max_gap_ms"].as_f64().unwrap_or(f64::MAX) < 5000.0,
        "new connections failed for too long: {new}"
    );
    verify(&lab, home, &r_open, "k");
    verify(&lab, home, &r_new, "n");
    let mut h1 = lab.agent("h1").await;
    let mut h2 = lab.agent("h2").await;
    assert!(task_pid(&mut h1, "redis").await.is_none());
    assert!(task_pid(&mut h2, "redis").await.is_some());
    // The traffic crossed the home agent: its tunnel to h2 carried it.
    let t = the_home_tunnel(&lab, "h1").await;
    let s = stats(&lab, "h1", &t).await;
    assert!(
        s.tx_packets > 100,
        "the home agent tunnel carried nothing: {s:?}"
    );
    assert_eq!(tunnels(&lab, "h2").await.len(), 1, "h2's end of the tunnel");
    let b = bindings(&mut h1).await;
    let h2_addr = lab.lab.host("h2").expect("h2").address.to_string();
    assert_eq!(b.len(), 1, "{b:?}");
    assert_eq!(b[0].home_address, home.to_string());
    assert_eq!(b[0].care_of, h2_addr);
    assert_eq!(b[0].tunnel, t);
    assert!(!b[0].tunnel_kind.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_takes_traffic_off_the_home_agent_and_the_idle_tunnel_goes() {
    let lab = TestLab::up_with(
        "thr",
        2,
        HandoverSpec {
            binding_lifetime_secs: 60,
            tunnel_idle_secs: 3,
        },
    )
    .await;
    let home = lab.start_routed_redis("h1", "redis", 2, false).await;
    lab.import("h2", "redis").await;
    redis_in_client(&lab, home, &["SET", "x", "1"]);
    migrate(&lab, "redis", "h1", "h2").await;
    let t = the_home_tunnel(&lab, "h1").await;
    // Control: without rebinding, requests cross the home agent's tunnel.
    let before = stats(&lab, "h1", &t).await;
    for _ in 0..10 {
        assert!(!redis_in_client(&lab, home, &["INCR", "n"]).is_empty());
    }
    let after = stats(&lab, "h1", &t).await;
    assert!(
        after.tx_packets >= before.tx_packets + 10,
        "requests did not cross the home agent: {before:?} -> {after:?}"
    );

    // Rebind the client namespace through the library call `xfer rebind` uses.
    let mut h1 = lab.agent("h1").await;
    let mut stream = h1.watch_bindings().await.expect("watch");
    let mut rb = xfer_agent::rebind::Rebinder::new(Some(lab.lab.client.netns.clone()), Some(home))
        .expect("rebinder");
    let mut direct = Vec::new();
    xfer_agent::rebind::run(&mut stream, &mut rb, false, |_, r| direct.push(r.clone()))
        .await
        .unwrap_or_else(|e| panic!("rebind: {}", chain(&e)));
    let h2_addr = lab.lab.host("h2").expect("h2").address;
    assert!(
        direct.contains(&xfer_agent::rebind::Rebound::Direct {
            home,
            care_of: h2_addr
        }),
        "{direct:?}"
    );
    // After rebinding, the same requests no longer cross the home agent.
    let before = stats(&lab, "h1", &t).await;
    for i in 0..20 {
        assert_eq!(
            redis_in_client(&lab, home, &["INCR", "n"]),
            (11 + i).to_string()
        );
    }
    let after = stats(&lab, "h1", &t).await;
    assert!(
        after.tx_packets <= before.tx_packets + 2,
        "rebound traffic still crosses the home agent: {before:?} -> {after:?}"
    );
    // Nothing uses the tunnel now: it goes after the idle time, and watchers hear.
    let deadline = Instant::now() + Duration::from_secs(12);
    let mut idle_seen = false;
    while Instant::now() < deadline && !idle_seen {
        match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
            Ok(Ok(Some(ev))) => idle_seen = ev.kind == BindingEventKind::TunnelIdle as i32,
            Ok(other) => panic!("watch stream ended: {other:?}"),
            Err(_) => {}
        }
    }
    assert!(idle_seen, "no TUNNEL_IDLE event");
    assert!(
        tunnels(&lab, "h1").await.is_empty(),
        "the idle tunnel is still there"
    );
    // The binding stays; the rebound client still reaches the container.
    assert_eq!(bindings(&mut h1).await.len(), 1);
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "1");
    rb.clear().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_nobody_refreshes_expires_and_takes_its_tunnel_along() {
    let lab = TestLab::up_with(
        "tex",
        2,
        HandoverSpec {
            binding_lifetime_secs: 3,
            tunnel_idle_secs: 0,
        },
    )
    .await;
    let home = lab.start_routed_redis("h1", "redis", 3, false).await;
    lab.import("h2", "redis").await;
    migrate(&lab, "redis", "h1", "h2").await;
    the_home_tunnel(&lab, "h1").await;
    // Refreshes keep a 3 s binding alive well past 3 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    the_home_tunnel(&lab, "h1").await;
    assert_eq!(redis_in_client(&lab, home, &["PING"]), "PONG");
    // The care-of host's agent dies: nobody refreshes; the binding expires.
    let pid = lab.lab.host("h2").expect("h2").xferd_pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill h2's agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tunnels(&lab, "h1").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the expired binding's tunnel is still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut h1 = lab.agent("h1").await;
    assert!(
        bindings(&mut h1).await.is_empty(),
        "the binding outlived its lifetime"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_and_replayed_binding_updates_change_nothing() {
    let lab = TestLab::up("tfr", 2).await;
    let home = lab.start_routed_redis("h1", "redis", 4, false).await;
    let ha = lab.lab.host("h1").expect("h1").address;
    let coa = lab.lab.host("h2").expect("h2").address;
    let key_hex = std::fs::read_to_string(lab.lab.tls_dir.join("cluster.key")).expect("key");
    let key = ClusterKey::from_hex(1, key_hex.trim()).expect("cluster key");
    let forger = ClusterKey::new(1, vec![7u8; 32]).expect("key");
    let sock = xfer_net::run_in_netns(&lab.lab.client.netns, || UdpSocket::bind("0.0.0.0:0"))
        .expect("enter client netns")
        .expect("udp socket");
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let send = |bytes: &[u8]| -> BindingAck {
        sock.send_to(bytes, (ha, xfer_agent::handover::DEFAULT_PORT))
            .expect("send");
        let mut buf = [0u8; 128];
        let n = sock.recv(&mut buf).expect("the home agent answers");
        BindingAck::decode(&buf[..n]).expect("ack")
    };
    let update = |seq: u16, lifetime: u32, k: &ClusterKey| {
        BindingUpdate::new(home, coa, ha, seq, lifetime, BindingFlags::NONE).signed(k)
    };
    let mut h1 = lab.agent("h1").await;

    // Forged: signed with a key that is not the cluster's.
    let ack = send(&update(100, 30, &forger).encode());
    assert_eq!(ack.status, BindingStatus::BadAuth);
    assert!(bindings(&mut h1).await.is_empty());
    assert!(tunnels(&lab, "h1").await.is_empty());
    // Tampered: a genuine update with the care-of address changed after signing.
    let mut tampered = update(100, 30, &key).encode();
    tampered[20] ^= 1;
    assert_eq!(send(&tampered).status, BindingStatus::BadAuth);
    assert!(bindings(&mut h1).await.is_empty());

    // Genuine: accepted, the tunnel appears.
    let good = update(100, 30, &key).encode();
    let ack = send(&good);
    assert_eq!(ack.status, BindingStatus::Accepted);
    ack.verify(&xfer_mobility::Keyring::new(key.clone()))
        .expect("the ack is signed with the cluster key");
    let b = bindings(&mut h1).await;
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].care_of, coa.to_string());
    let t = the_home_tunnel(&lab, "h1").await;
    // Replayed: the same bytes again change nothing (no lifetime extension).
    let ack = send(&good);
    assert_eq!(ack.status, BindingStatus::Replayed);
    // Stale: an older sequence, properly signed.
    let ack = send(&update(99, 30, &key).encode());
    assert_eq!(ack.status, BindingStatus::StaleSequence);
    assert_eq!(
        ack.sequence, 100,
        "the ack names the last accepted sequence"
    );
    let b2 = bindings(&mut h1).await;
    assert_eq!(b2, b, "a rejected update changed the binding");
    assert_eq!(the_home_tunnel(&lab, "h1").await, t);
    // Deregistration (lifetime 0, newer sequence): the binding and tunnel go, and the
    // home agent routes the address to its local container again.
    let ack = send(&update(101, 0, &key).encode());
    assert_eq!(ack.status, BindingStatus::Accepted);
    assert!(bindings(&mut h1).await.is_empty());
    assert!(tunnels(&lab, "h1").await.is_empty());
    assert_eq!(redis_in_client(&lab, home, &["PING"]), "PONG");
    // And the old registration replayed after that is still refused.
    assert_eq!(send(&good).status, BindingStatus::StaleSequence);
    assert!(tunnels(&lab, "h1").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_keeps_one_home_agent_and_coming_home_leaves_no_tunnel() {
    let lab = TestLab::up("tch", 3).await;
    // With a reverse tunnel: replies go back through the home agent too.
    let home = lab.start_routed_redis("h1", "redis", 5, true).await;
    for h in ["h2", "h3"] {
        lab.import(h, "redis").await;
    }
    redis_in_client(&lab, home, &["SET", "x", "42"]);
    migrate(&lab, "redis", "h1", "h2").await;
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "42");
    let t2 = the_home_tunnel(&lab, "h1").await;
    // The care-of end sends the container's traffic back through the tunnel.
    let h2ns = lab.lab.host("h2").expect("h2").netns.clone();
    let net = Netlink::new().expect("netlink");
    let rules = net.list_rules(Ns::Named(&h2ns)).await.expect("rules");
    assert!(
        rules
            .iter()
            .any(|r| r.priority == xfer_agent::handover::plan::REVERSE_RULE_PRIORITY),
        "no reverse-tunnel rule on h2: {rules:?}"
    );
    let xc = tunnels(&lab, "h2").await;
    assert_eq!(xc.len(), 1);
    let rx_before = stats(&lab, "h1", &t2).await.rx_packets;
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "42");
    assert!(
        stats(&lab, "h1", &t2).await.rx_packets > rx_before,
        "replies did not come back through the reverse tunnel"
    );

    // A -> B -> C: the home agent re-points its one tunnel; B keeps nothing.
    migrate(&lab, "redis", "h2", "h3").await;
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "42");
    let t3 = the_home_tunnel(&lab, "h1").await;
    assert_ne!(t3, t2, "the tunnel should now lead to h3");
    assert!(tunnels(&lab, "h2").await.is_empty(), "h2 kept a tunnel");
    let rules = net.list_rules(Ns::Named(&h2ns)).await.expect("rules");
    assert!(
        !rules
            .iter()
            .any(|r| r.priority == xfer_agent::handover::plan::REVERSE_RULE_PRIORITY),
        "h2 kept its reverse-tunnel rule"
    );
    let mut h1 = lab.agent("h1").await;
    let b = bindings(&mut h1).await;
    assert_eq!(b.len(), 1);
    assert_eq!(
        b[0].care_of,
        lab.lab.host("h3").expect("h3").address.to_string()
    );

    // Home again: no binding, no tunnel anywhere, the address served locally.
    migrate(&lab, "redis", "h3", "h1").await;
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "42");
    for h in ["h1", "h2", "h3"] {
        assert!(tunnels(&lab, h).await.is_empty(), "{h} kept a tunnel");
        let ns = lab.lab.host(h).expect("host").netns.clone();
        let rules = net.list_rules(Ns::Named(&ns)).await.expect("rules");
        assert!(
            !rules
                .iter()
                .any(|r| r.priority == xfer_agent::handover::plan::REVERSE_RULE_PRIORITY),
            "{h} kept a reverse-tunnel rule"
        );
    }
    assert!(bindings(&mut h1).await.is_empty());
    assert!(task_pid(&mut h1, "redis").await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_and_tunnels_survive_agent_crashes_on_both_ends() {
    let mut lab = TestLab::up("tar", 2).await;
    let home = lab.start_routed_redis("h1", "redis", 6, false).await;
    lab.import("h2", "redis").await;
    redis_in_client(&lab, home, &["SET", "x", "7"]);
    migrate(&lab, "redis", "h1", "h2").await;
    let mut h1 = lab.agent("h1").await;
    let before = bindings(&mut h1).await;
    assert_eq!(before.len(), 1);

    // The home agent crashes and comes back: the binding is read back from disk, the
    // tunnel re-created, the container reachable again through it.
    xfer_lab::restart_agent(&mut lab.lab, "h1")
        .await
        .unwrap_or_else(|e| panic!("restart h1's agent: {}", chain(&e)));
    let mut h1 = lab.agent("h1").await;
    let after = bindings(&mut h1).await;
    assert_eq!(after.len(), 1, "the binding did not survive the restart");
    assert_eq!(after[0].care_of, before[0].care_of);
    the_home_tunnel(&lab, "h1").await;
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "7");

    // The care-of host's agent crashes and comes back: its running container
    // registers again (a newer sequence), its tunnel end is back.
    xfer_lab::restart_agent(&mut lab.lab, "h2")
        .await
        .unwrap_or_else(|e| panic!("restart h2's agent: {}", chain(&e)));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = bindings(&mut h1).await;
        if b.len() == 1 && b[0].sequence != after[0].sequence {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "h2 did not register again after its restart: {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(tunnels(&lab, "h2").await.len(), 1);
    // Promptly: the re-created tunnel end keeps its MAC, so the home agent's
    // neighbour entry for it stays valid.
    let t = Instant::now();
    assert_eq!(redis_in_client(&lab, home, &["GET", "x"]), "7");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the container was unreachable for {:?} after the care-of agent's restart",
        t.elapsed()
    );
}
