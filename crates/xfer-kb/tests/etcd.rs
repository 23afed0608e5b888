//! The etcd store against a real etcd-server that the test starts itself (temp data
//! dir, free loopback ports, killed and removed on drop, also when a test panics).
//! Needs the `etcd` binary (Debian package etcd-server, installed by `cargo xtask
//! setup`): the tests FAIL when it is missing.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xfer_kb::{
    Clock, EtcdConfig, EtcdStore, FullInventory, HostInfo, KbStore, ModeConfig, PullConfig,
    PushConfig, SystemClock, Timestamp,
};

/// A private etcd-server.
struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn etcd_binary() -> String {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p.display().to_string(),
        None => panic!(
            "the `etcd` binary is missing: the etcd tests need etcd-server \
             (`apt-get install etcd-server`, or `cargo xtask setup`)"
        ),
    }
}

impl Etcd {
    async fn start() -> Etcd {
        let bin = etcd_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new(bin)
            .arg("--name=kbtest")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=kbtest={peer_url}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = Etcd {
            child,
            _dir: dir,
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&etcd.url], None).await {
                if c.get("probe", None).await.is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up at {}",
                etcd.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        etcd
    }

    async fn store(&self, prefix: &str, lease_ttl: Duration) -> Arc<EtcdStore> {
        let mut cfg = EtcdConfig::new(vec![self.url.clone()]);
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
