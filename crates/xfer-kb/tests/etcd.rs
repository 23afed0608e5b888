//! The etcd store against a real etcd-server that the test starts itself (temp data
//! dir, free loopback ports, killed and removed on drop, also when a test panics).
//! Needs the `etcd` binary (Debian package etcd-server, installed by `cargo xtask
//! setup`): the tests FAIL when it is missing.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xfer_kb::etcd_server::{etcd_binary, EtcdServer};
use xfer_kb::{
    Clock, EtcdConfig, EtcdStore, FullInventory, HostInfo, KbStore, ModeConfig, PullConfig,
    PushConfig, SystemClock, Timestamp,
};

/// A private etcd-server; the tests FAIL (loudly) when the binary is missing.
struct Etcd(EtcdServer);

impl Etcd {
    async fn start() -> Etcd {
        if etcd_binary().is_none() {
            panic!(
                "the `etcd` binary is missing: the etcd tests need etcd-server \
                 (`apt-get install etcd-server`, or `cargo xtask setup`)"
            );
        }
        Etcd(EtcdServer::start().await.expect("start etcd"))
    }

    async fn store(&self, prefix: &str, lease_ttl: Duration) -> Arc<EtcdStore> {
        let mut cfg = EtcdConfig::new(vec![self.0.url().to_owned()]);
        cfg.prefix = prefix.into();
        cfg.lease_ttl = lease_ttl;
        Arc::new(EtcdStore::connect(cfg).await.expect("connect to etcd"))
    }
}

#[tokio::test]
async fn etcd_store_contract() {
    let etcd = Etcd::start().await;
    let store = etcd.store("/t/contract", Duration::from_secs(60)).await;
    store_contract(&*store).await;
}

#[tokio::test]
async fn etcd_store_binding_contract() {
    let etcd = Etcd::start().await;
    let store = etcd.store("/t/bind", Duration::from_secs(60)).await;
    let now = SystemClock::new().now().as_millis() / 1000;
    binding_contract(&*store, now).await;
}

/// A binding's key lives under a lease of its remaining lifetime: it vanishes from
/// etcd by itself (nobody calls `expire`), while a refreshed one stays; concurrent
/// puts of one home address never let an older sequence number win.
#[tokio::test]
async fn etcd_bindings_expire_by_lease_and_stale_puts_never_win() {
    let etcd = Etcd::start().await;
    let store = etcd.store("/t/bindlease", Duration::from_secs(60)).await;
    let now_s = || SystemClock::new().now().as_millis() / 1000;
    let t0 = now_s();
    let short = binding([10, 77, 0, 1], "h1", [10, 0, 0, 2], 1, t0, 2);
    let long = binding([10, 77, 0, 2], "h1", [10, 0, 0, 3], 1, t0, 120);
    let now = SystemClock::new().now();
    assert_eq!(
        store.put_binding(&short, now).await.expect("put"),
        xfer_kb::BindingPut::Stored
    );
    assert_eq!(
        store.put_binding(&long, now).await.expect("put"),
        xfer_kb::BindingPut::Stored
    );
    // Look at etcd's keys directly (no expiry filter of ours in between).
    let keys = || async {
        let mut c = etcd_client::Client::connect([etcd.0.url()], None)
            .await
            .expect("connect");
        let r = c
            .get(
                "/t/bindlease/bind/",
                Some(
                    etcd_client::GetOptions::new()
                        .with_prefix()
                        .with_keys_only(),
                ),
            )
            .await
            .expect("get");
        let mut k: Vec<String> = r
            .kvs()
            .iter()
            .map(|kv| kv.key_str().expect("utf-8").to_owned())
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys().await.len(), 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys().await.len() == 2 {
        assert!(
            Instant::now() < deadline,
            "the 2 s binding's key is still in etcd after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        keys().await,
        vec!["/t/bindlease/bind/10.77.0.2".to_string()]
    );
    // Concurrent writers: every put of seq 2..=40 races; the stored number ends at
    // the newest, never an older one.
    let puts = (2..=40u16).rev().map(|seq| {
        let store = store.clone();
        let b = binding([10, 77, 0, 2], "h1", [10, 0, 0, 3], seq, now_s(), 120);
        async move {
            store
                .put_binding(&b, SystemClock::new().now())
                .await
                .expect("put")
        }
    });
    futures::future::join_all(puts).await;
    let got = store
        .bindings(
            &xfer_kb::BindingQuery::Home([10, 77, 0, 2].into()),
            SystemClock::new().now(),
        )
        .await
        .expect("q");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, 40);
}

/// More digests than one transaction holds: batched writes, the lease swap of a
/// full update deletes exactly what the new inventory dropped.
#[tokio::test]
async fn etcd_large_inventories_and_lease_swap() {
    let etcd = Etcd::start().await;
    let store = etcd.store("/t/large", Duration::from_secs(60)).await;
    let t = Timestamp::from_secs(10);
    let all: Vec<_> = (0..1000).map(d).collect();
    let inv = |digests: Vec<_>, seq| FullInventory {
        host: "big".into(),
        seq,
        at: t,
        digests,
        snapshots: vec![],
        info: HostInfo::default(),
    };
    store
        .replace(&inv(all[..600].to_vec(), 1), t)
        .await
        .expect("replace");
    let n = names(&*store, &all).await;
    assert_eq!(n.iter().filter(|h| !h.is_empty()).count(), 600);
    store
        .replace(&inv(all[400..].to_vec(), 2), t)
        .await
        .expect("replace");
    let n = names(&*store, &all).await;
    assert!(n[..400].iter().all(|h| h.is_empty()), "old lease revoked");
    assert!(
        n[400..].iter().all(|h| h == &v(&["big"])),
        "re-put keys moved to the new lease"
    );
}

/// A host whose lease is not refreshed disappears with all its keys.
#[tokio::test]
async fn etcd_lease_expiry_removes_a_silent_host() {
    let etcd = Etcd::start().await;
    let store = etcd.store("/t/lease", Duration::from_secs(2)).await;
    let t = Timestamp::from_secs(10);
    store
        .replace(
            &FullInventory {
                host: "short".into(),
                seq: 0,
                at: t,
                digests: vec![d(1), d(2)],
                snapshots: vec![],
                info: HostInfo::default(),
            },
            t,
        )
        .await
        .expect("replace");
    assert_eq!(names(&*store, &[d(1)]).await, vec![v(&["short"])]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !names(&*store, &[d(1), d(2)])
        .await
        .iter()
        .all(|h| h.is_empty())
    {
        assert!(Instant::now() < deadline, "lease did not expire");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(store.host("short").await.expect("host").is_none());
}

async fn etcd_mode(mode: ModeConfig, prefix: &str) {
    let etcd = Etcd::start().await;
    // Lease TTL = the dead-host bound of the mode, in real seconds.
    let ttl = Duration::from_secs(3);
    let store: Arc<dyn KbStore> = etcd.store(prefix, ttl).await;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
    let settle = mode.window() + Duration::from_millis(500);
    let gone = (mode.gone_window() + Duration::from_millis(500)).max(ttl * 2);
    mode_scenario(&mode, store, clock, Duration::from_millis(1), settle, gone).await;
}

/// Central push over etcd, real time, short periods.
#[tokio::test]
async fn etcd_central_push_answers_after_add_remove_evict() {
    etcd_mode(
        ModeConfig::CentralPush(PushConfig {
            heartbeat: Duration::from_millis(500),
            full_period: Duration::from_secs(30),
            transit: Duration::from_millis(50),
            host_ttl: Duration::from_secs(3),
        }),
        "/t/push",
    )
    .await;
}

/// Central pull over etcd, real time, short periods.
#[tokio::test]
async fn etcd_central_pull_answers_after_add_remove_evict() {
    etcd_mode(
        ModeConfig::CentralPull(PullConfig {
            period: Duration::from_millis(500),
            timeout: Duration::from_secs(1),
            concurrency: 4,
            drop_after: 2,
        }),
        "/t/pull",
    )
    .await;
}
