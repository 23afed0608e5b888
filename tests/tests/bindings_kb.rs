//! The home agent's bindings in the knowledge base, on the real stack: after a
//! routed migration h1 -> h2 the knowledge base (h3, central push) lists the binding
//! (home agent h1, care-of h2); a home agent restarted without its binding cache file
//! recovers the binding from the knowledge base, so a client's traffic to the home
//! address still reaches the container at h2 and h2's refreshes are accepted (also
//! when the file is there but unreadable); when
//! the container is removed the binding leaves the knowledge base.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use xfer_agent::client::{Client, Mode};
use xfer_kb::{BindingQuery, BindingRecord};
use xfer_lab::HandoverSpec;
use xfer_proto::v1::BindingEventKind;
use xfer_tests::{chain, xferd_path, TestLab};

/// The bindings of `home` the knowledge base host `kb` lists.
async fn kb_bindings(lab: &TestLab, kb: &str, home: Ipv4Addr) -> Vec<BindingRecord> {
    let ep = &lab.lab.host(kb).expect("host").endpoint;
    let (_, list) =
        Client::kb_bindings(ep, Some(&lab.lab.operator_tls()), &BindingQuery::Home(home))
            .await
            .unwrap_or_else(|e| panic!("ask {kb} for bindings: {}", chain(&e)));
    list
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`.
async fn until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The care-of address and sequence number of `home`'s binding at home agent `ha`.
async fn ha_binding(lab: &TestLab, ha: &str, home: Ipv4Addr) -> Option<(String, u32)> {
    let mut c = lab.agent(ha).await;
    let mut s = c
        .watch_bindings()
        .await
        .unwrap_or_else(|e| panic!("watch: {}", chain(&e)));
    while let Some(ev) = s.message().await.expect("watch stream") {
        if ev.kind == BindingEventKind::Synced as i32 {
            return None;
        }
        if ev.home_address == home.to_string() {
            return Some((ev.care_of, ev.sequence));
        }
    }
    None
}

fn redis(lab: &TestLab, home: Ipv4Addr, cmd: &[&str]) -> String {
    let ip = home.to_string();
    let mut args = vec!["redis-cli", "-h", ip.as_str()];
    args.extend_from_slice(cmd);
    lab.client_exec(&args).trim().to_string()
}

fn log_count(lab: &TestLab, host: &str, needle: &str) -> usize {
    let dir = &lab.lab.host(host).expect("host").dir;
    std::fs::read_to_string(dir.join("logs/xferd.log"))
        .unwrap_or_default()
        .matches(needle)
        .count()
}

/// Refreshes every 24 s (80% of 30 s): long enough for a restart, short enough to
/// see one accepted by the recovered home agent.
async fn lab(prefix: &str) -> TestLab {
    TestLab::up_with(
        prefix,
        3,
        HandoverSpec {
            binding_lifetime_secs: 30,
            ..HandoverSpec::default()
        },
    )
    .await
}

/// The knowledge base's embedded store (h3's memory, `kb.bin`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_agent_recovers_its_binding_from_the_knowledge_base() {
    let mut lab = lab("kb").await;
    scenario(&mut lab, serde_json::json!({})).await;
}

/// The same with the knowledge base storing into etcd (an etcd-server the test
/// starts on the lab's bridge address; the test FAILS if `etcd` is missing): the
/// binding's key is in etcd under a lease no longer than the binding's lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_agent_recovers_its_binding_from_etcd() {
    let mut lab = lab("ke").await;
    assert!(
        xfer_kb::etcd_server::etcd_binary().is_some(),
        "the `etcd` binary is missing: this test needs etcd-server (`cargo xtask setup`)"
    );
    let etcd = xfer_kb::etcd_server::EtcdServer::start_on(lab.lab.gateway)
        .await
        .unwrap_or_else(|e| panic!("etcd-server: {}", chain(&e)));
    let url = etcd.url().to_string();
    let extra = serde_json::json!({"store": "etcd", "etcd": [url.clone()]});
    let check = move |home: Ipv4Addr| {
        let url = url.clone();
        async move {
            let mut c = etcd_client::Client::connect([url], None)
                .await
                .expect("connect to etcd");
            let key = format!("/xfer/kb/bind/{home}");
            let r = c.get(key.as_str(), None).await.expect("get");
            let kv = r
                .kvs()
                .first()
                .unwrap_or_else(|| panic!("{key} not in etcd"));
            let ttl = c
                .lease_time_to_live(kv.lease(), None)
                .await
                .expect("lease ttl")
                .ttl();
            assert!((1..=30).contains(&ttl), "lease TTL {ttl} s");
        }
    };
    scenario_checked(&mut lab, extra, Some(&check)).await;
    drop(etcd);
}

async fn scenario(lab: &mut TestLab, extra: serde_json::Value) {
    scenario_checked::<std::future::Ready<()>>(lab, extra, None).await;
}

/// h3 is the knowledge base (central push, `extra` merged into the configuration);
/// `in_store` checks the store itself once the binding is listed.
async fn scenario_checked<F: std::future::Future<Output = ()>>(
    lab: &mut TestLab,
    extra: serde_json::Value,
    in_store: Option<&dyn Fn(Ipv4Addr) -> F>,
) {
    let (_cfg_dir, cfg_path) = lab.kb_config(
        &["h1", "h2", "h3"],
        serde_json::json!({"mode": "central_push", "kb": "h3", "bindings_full_secs": 5}),
        extra,
    );
    for h in ["h3", "h1", "h2"] {
        lab.restart_with_kb(h, &cfg_path).await;
    }

    let home = lab.start_routed_redis("h1", "redis", 1, false).await;
    lab.import("h2", "redis").await;
    assert_eq!(redis(&*lab, home, &["SET", "before", "kept"]), "OK");
    assert!(
        kb_bindings(&*lab, "h3", home).await.is_empty(),
        "no binding while the container is at home"
    );
    let h1_addr = lab.lab.host("h1").expect("host").address;
    let h2_addr = lab.lab.host("h2").expect("host").address;
    let dst = lab.lab.host("h2").expect("host").endpoint.clone();
    lab.agent("h1")
        .await
        .migrate("redis", &dst, Mode::Precopy, |_| {})
        .await
        .unwrap_or_else(|e| panic!("migrate h1 -> h2: {}", chain(&e)));

    // The knowledge base lists the binding: home agent h1, care-of h2.
    let b = until(
        "the binding in the knowledge base",
        Duration::from_secs(10),
        || async { kb_bindings(&*lab, "h3", home).await.into_iter().next() },
    )
    .await;
    assert_eq!(b.home_agent, "h1");
    assert_eq!(b.home_agent_address, h1_addr);
    assert_eq!(b.care_of, h2_addr);
    assert_eq!(b.lifetime_secs, 30);
    if let Some(check) = in_store {
        check(home).await;
    }
    // And `xfer kb-bindings` shows it.
    let out = std::process::Command::new(xferd_path().with_file_name("xfer"))
        .args([
            "--prefix",
            &lab.lab.prefix,
            "kb-bindings",
            "--on",
            "h3",
            "--json",
        ])
        .output()
        .expect("run xfer kb-bindings");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON binding");
    assert_eq!(line["home"], home.to_string());
    assert_eq!(line["home_agent"], "h1");
    assert_eq!(line["care_of"], h2_addr.to_string());
    assert!(line["expires_in_secs"].as_u64().expect("expires in") <= 30);

    // The home agent restarts without its binding cache file.
    let state = lab
        .lab
        .host("h1")
        .expect("host")
        .work_dir()
        .join("bindings.json");
    assert!(state.exists(), "{} is missing", state.display());
    let recovered_before = log_count(&*lab, "h1", "binding recovered from the knowledge base");
    std::fs::remove_file(&state).expect("delete the binding cache file");
    lab.restart_with_kb("h1", &cfg_path).await;
    assert_eq!(
        log_count(&*lab, "h1", "binding recovered from the knowledge base"),
        recovered_before + 1,
        "h1 did not recover the binding from the knowledge base"
    );
    let (care_of, seq) = ha_binding(&*lab, "h1", home)
        .await
        .expect("the restarted home agent holds the binding");
    assert_eq!(care_of, h2_addr.to_string());
    // A client's traffic to the home address reaches the container at h2.
    lab.wait_redis(&home.to_string()).await;
    assert_eq!(redis(&*lab, home, &["GET", "before"]), "kept");
    assert_eq!(redis(&*lab, home, &["SET", "after", "1"]), "OK");
    // h2's next refresh is accepted by the recovered home agent (not refused as an
    // unknown home), and the knowledge base follows it.
    let refreshed = until(
        "a refresh accepted by h1",
        Duration::from_secs(40),
        || async {
            ha_binding(&*lab, "h1", home)
                .await
                .filter(|(_, s)| *s != seq)
        },
    )
    .await;
    until(
        "the refresh in the knowledge base",
        Duration::from_secs(10),
        || async {
            kb_bindings(&*lab, "h3", home)
                .await
                .into_iter()
                .find(|b| u32::from(b.seq) == refreshed.1)
        },
    )
    .await;
    assert_eq!(redis(&*lab, home, &["GET", "after"]), "1");

    // Again with an unreadable file: moved aside, the binding recovered again.
    std::fs::write(&state, b"{not json").expect("corrupt the binding cache file");
    lab.restart_with_kb("h1", &cfg_path).await;
    assert_eq!(
        log_count(&*lab, "h1", "binding recovered from the knowledge base"),
        recovered_before + 2,
        "h1 did not recover the binding after finding its file unreadable"
    );
    assert!(state.with_extension("json.unreadable").exists());
    assert_eq!(
        ha_binding(&*lab, "h1", home).await.map(|(c, _)| c),
        Some(h2_addr.to_string())
    );
    lab.wait_redis(&home.to_string()).await;
    assert_eq!(redis(&*lab, home, &["GET", "after"]), "1");

    // The container is removed at h2: deregistered, and gone from the knowledge base.
    lab.agent("h2")
        .await
        .remove("redis")
        .await
        .unwrap_or_else(|e| panic!("remove at h2: {}", chain(&e)));
    until(
        "the binding gone from the knowledge base",
        Duration::from_secs(10),
        || async {
            kb_bindings(&*lab, "h3", home)
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
    assert!(ha_binding(&*lab, "h1", home).await.is_none());
}
