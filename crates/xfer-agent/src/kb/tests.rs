//! The wiring of the knowledge base over real gRPC on loopback, with on-disk stores:
//! on-line queries (mode c) and central push (mode b) answer through the `Kb`
//! service; a destination's plan names the neighbour; the fetch takes the
//! neighbour's chunks; a neighbour that dies mid-fetch does not fail the fetch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use xfer_kb::{ModeKind, Moving};
use xfer_store::{Digest, Store};

use super::{Kb, KbConfig, StoreKind};
use crate::chunks::{ChunkService, Fetcher};

struct Host {
    store: Arc<Store>,
    kb: Option<Arc<Kb>>,
    server: Option<JoinHandle<()>>,
    /// Peers reach the host through this proxy; killing it cuts every connection.
    proxy: Proxy,
    _dir: tempfile::TempDir,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
        self.proxy.kill();
    }
}

/// A TCP forwarder whose connections all die at once (a host crashing).
#[derive(Clone)]
struct Proxy {
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    fn start(front: tokio::net::TcpListener, back: std::net::SocketAddr) -> Proxy {
        let tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let t2 = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut a, _)) = front.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(back).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
                t2.lock().expect("lock").push(conn);
            }
        });
        tasks.lock().expect("lock").push(accept);
        Proxy { tasks }
    }

    fn kill(&self) {
        for t in self.tasks.lock().expect("lock").drain(..) {
            t.abort();
        }
    }
}

async fn listeners(n: usize) -> Vec<(tokio::net::TcpListener, String)> {
    let mut v = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let ep = format!("http://{}", l.local_addr().expect("addr"));
        v.push((l, ep));
    }
    v
}

/// Starts hosts h1..hN, each serving Chunks and Kb with `mode` (h1 the KB).
async fn cluster(n: usize, mode: ModeKind) -> (Vec<Host>, KbConfig) {
    cluster_with(n, mode, None).await
}

/// [`cluster`] with the mode's tuning.
async fn cluster_with(
    n: usize,
    mode: ModeKind,
    tuning: Option<xfer_kb::ModeConfig>,
) -> (Vec<Host>, KbConfig) {
    let ls = listeners(n).await;
    let backs = listeners(n).await;
    let hosts: BTreeMap<String, String> = ls
        .iter()
        .enumerate()
        .map(|(i, (_, ep))| (format!("h{}", i + 1), ep.clone()))
        .collect();
    let cfg = KbConfig {
        mode,
        tuning,
        kb: Some("h1".into()),
        store: StoreKind::Embedded,
        etcd: vec![],
        hosts,
        neighbours: BTreeMap::new(),
        policy: Default::default(),
        snapshots: None,
        source_shares: false,
        bindings_full_secs: None,
    };
    let mut out = Vec::new();
    for (i, ((front, _), (l, _))) in ls.into_iter().zip(backs).enumerate() {
        let name = format!("h{}", i + 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path().join("store")).expect("store"));
        let kb = Arc::new(
            Kb::start(&cfg, &name, store.clone(), None, dir.path())
                .await
                .expect("kb start"),
        );
        let chunks = ChunkService::new(store.clone()).into_server();
        let svc = kb.service().into_server();
        let proxy = Proxy::start(front, l.local_addr().expect("addr"));
        let incoming = tonic::transport::server::TcpIncoming::from(l);
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(chunks)
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        out.push(Host {
            store,
            proxy,
            kb: Some(kb),
            server: Some(server),
            _dir: dir,
        });
    }
    (out, cfg)
}

fn random_chunks(store: &Store, n: usize, size: usize, seed: u64) -> Vec<Digest> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            let data: Vec<u8> = (0..size)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            store.put(&data).expect("put")
        })
        .collect()
}

fn copy(from: &Store, to: &Store, ids: &[Digest]) {
    for id in ids {
        to.put(&from.get(id).expect("get")).expect("put");
    }
}

fn kb(h: &Host) -> &Arc<Kb> {
    h.kb.as_ref().expect("kb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_query_names_the_neighbour_and_the_fetch_uses_it() {
    let (hosts, cfg) = cluster(3, ModeKind::OnlineQuery).await;
    let (src, nb, dst) = (&hosts[0], &hosts[1], &hosts[2]);
    let ids = random_chunks(&src.store, 40, 64 << 10, 1);
    // The neighbour holds the first 30.
    copy(&src.store, &nb.store, &ids[..30]);
    let src_ep = &cfg.hosts["h1"];
    let plan = kb(dst).plan(&ids, &Moving::default(), src_ep).await;
    assert_eq!(plan.error, None);
    assert_eq!(plan.mode, Some(ModeKind::OnlineQuery));
    for (i, w) in plan.wants.iter().enumerate() {
        let want: Vec<String> = if i < 30 { vec!["h2".into()] } else { vec![] };
        assert_eq!(w.sources, want, "chunk {i}");
    }
    assert_eq!(plan.hosts.len(), 1, "the source is never a candidate");
    assert!(!plan.hosts[0].why.is_empty());

    let peer = Arc::new(crate::chunks::GrpcPeer::lazy(src_ep).expect("peer"));
    let mut f = Fetcher::new(dst.store.clone(), "source", peer);
    kb(dst).add_sources(&mut f, src_ep);
    let report = f.fetch(&plan.wants).await.expect("fetch");
    assert!(dst.store.has_many(&ids).iter().all(|b| *b));
    let from_nb = report.sources.get("h2").map(|s| s.chunks).unwrap_or(0);
    let from_src = report.sources.get("source").map(|s| s.chunks).unwrap_or(0);
    assert_eq!(from_nb + from_src, 40);
    assert!(from_nb >= 25, "neighbour served {from_nb} of 30 it holds");
    assert!(report.sources["h2"].wire_bytes > 0);
    // The destination reports what it now holds and what it measured.
    kb(dst).fetched(&ids, &report);
    let st = xfer_kb::Inventory::status(kb(dst).inventory().as_ref());
    assert!(st.seq >= 1);
    assert!(st.info.links.contains_key("h2"), "{:?}", st.info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_push_reaches_the_kb_and_answers_remote_destinations() {
    let (hosts, _cfg) = cluster(3, ModeKind::CentralPush).await;
    let nb = &hosts[1];
    let ids = random_chunks(&nb.store, 5, 4096, 2);
    // Reported through the pusher (h2 -> h1) as an Add event.
    kb(nb).inventory().added(&ids);
    let dir = kb(&hosts[2]).directory().clone();
    assert_eq!(dir.mode(), ModeKind::CentralPush);
    let mut names = Vec::new();
    for _ in 0..100 {
        let a = dir.holders(&ids).await.expect("holders");
        names = (0..ids.len())
            .map(|i| a.names_of(i).join(","))
            .collect::<Vec<_>>();
        if names.iter().all(|n| n == "h2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(names.iter().all(|n| n == "h2"), "{names:?}");
    // A delete reaches it too.
    for id in &ids[..2] {
        nb.store.remove(id).expect("remove");
    }
    kb(nb).inventory().removed(&ids[..2]);
    let mut ok = false;
    for _ in 0..100 {
        let a = dir.holders(&ids).await.expect("holders");
        if a.names_of(0).is_empty() && a.names_of(1).is_empty() && a.names_of(2) == ["h2"] {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "remove reflected");
    // A host that is not the KB refuses KB calls.
    let t = super::client::GrpcTransport::new(
        [("h3".to_string(), _cfg.hosts["h3"].clone())].into(),
        None,
    );
    let ch = t.channel("h3").expect("channel");
    let remote = super::client::RemoteDirectory::new("h3", ModeKind::CentralPush, ch);
    assert!(xfer_kb::Directory::holders(&remote, &ids).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_killed_mid_fetch_does_not_fail_it() {
    let (mut hosts, cfg) = cluster(3, ModeKind::OnlineQuery).await;
    let ids = random_chunks(&hosts[0].store, 300, 128 << 10, 3);
    copy(&hosts[0].store, &hosts[1].store, &ids);
    let src_ep = cfg.hosts["h1"].clone();
    let dst_store = hosts[2].store.clone();
    let plan = kb(&hosts[2]).plan(&ids, &Moving::default(), &src_ep).await;
    assert!(plan.wants.iter().all(|w| w.sources == ["h2"]));
    let peer = Arc::new(crate::chunks::GrpcPeer::lazy(&src_ep).expect("peer"));
    let mut f = Fetcher::new(dst_store.clone(), "source", peer);
    kb(&hosts[2]).add_sources(&mut f, &src_ep);
    // Kill the neighbour's server (connections cut) once a tenth has arrived.
    let killer = hosts[1].proxy.clone();
    let watch = dst_store.clone();
    let ids2 = ids.clone();
    let killed = tokio::spawn(async move {
        loop {
            let n = watch.has_many(&ids2).iter().filter(|b| **b).count();
            if n >= 30 {
                killer.kill();
                return n;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let report = f.fetch(&plan.wants).await.expect("the fetch survives");
    let at = killed.await.expect("killer");
    assert!(at < 300, "killed mid-fetch (at {at})");
    assert!(dst_store.has_many(&ids).iter().all(|b| *b));
    let nb = &report.sources["h2"];
    let src = &report.sources["source"];
    assert!(nb.chunks >= 30, "neighbour served {}", nb.chunks);
    assert!(src.chunks > 0, "the source took over");
    assert_eq!(nb.chunks + src.chunks, 300);
    assert!(nb.errors > 0 || nb.dropped, "{nb:?}");
    drop(hosts.remove(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_pull_includes_the_kb_itself_and_the_other_hosts() {
    let tuning = xfer_kb::ModeConfig::CentralPull(xfer_kb::PullConfig {
        period: Duration::from_millis(200),
        ..Default::default()
    });
    let (hosts, _cfg) = cluster_with(3, ModeKind::CentralPull, Some(tuning)).await;
    let mine = random_chunks(&hosts[0].store, 3, 4096, 4);
    let theirs = random_chunks(&hosts[1].store, 3, 4096, 5);
    let all: Vec<Digest> = mine.iter().chain(&theirs).copied().collect();
    let dir = kb(&hosts[2]).directory().clone();
    let mut names = Vec::new();
    for _ in 0..100 {
        let a = dir.holders(&all).await.expect("holders");
        names = (0..all.len()).map(|i| a.names_of(i).join(",")).collect();
        if names[..3].iter().all(|n| n == "h1") && names[3..].iter().all(|n| n == "h2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names, ["h1", "h1", "h1", "h2", "h2", "h2"]);
}

#[test]
fn config_is_checked() {
    let ok = r#"{"mode": "central_push", "kb": "h1",
        "hosts": {"h1": "https://10.0.0.1:7070", "h2": "https://10.0.0.2:7070"}}"#;
    let c: KbConfig = serde_json::from_str(ok).expect("parses");
    c.check().expect("valid");
    assert_eq!(c.mode_config().kind(), ModeKind::CentralPush);
    assert_eq!(c.neighbours_of("h1"), ["h2"]);
    let no_kb = r#"{"mode": "central_pull", "hosts": {"h1": "x"}}"#;
    let c: KbConfig = serde_json::from_str(no_kb).expect("parses");
    assert!(c.check().is_err());
    let bad_nb = r#"{"mode": "online_query", "hosts": {"h1": "x"}, "neighbours": {"h1": ["h9"]}}"#;
    let c: KbConfig = serde_json::from_str(bad_nb).expect("parses");
    assert!(c.check().is_err());
    let partial = r#"{"mode": "online_query", "hosts": {}, "policy": {"per_chunk": 2}}"#;
    let c: KbConfig = serde_json::from_str(partial).expect("a partial policy parses");
    assert_eq!(c.policy.per_chunk, 2);
    assert_eq!(c.policy.max_sources, 63);
    let unknown = r#"{"mode": "online_query", "hosts": {}, "nope": 1}"#;
    assert!(serde_json::from_str::<KbConfig>(unknown).is_err());
    let wrong_tuning = r#"{"mode": "online_query", "hosts": {}, "tuning": {"mode": "central_pull", "period": {"secs": 1, "nanos": 0}, "timeout": {"secs": 1, "nanos": 0}, "concurrency": 1, "drop_after": 1}}"#;
    let c: KbConfig = serde_json::from_str(wrong_tuning).expect("parses");
    assert!(c.check().is_err());
}

fn record(home: [u8; 4], ha: &str, care_of: [u8; 4], seq: u16) -> xfer_kb::BindingRecord {
    let now = xfer_kb::SystemClock::new();
    let now = xfer_kb::Clock::now(&now);
    xfer_kb::BindingRecord {
        home: home.into(),
        home_agent: ha.into(),
        home_agent_address: [127, 0, 0, 1].into(),
        care_of: care_of.into(),
        tunnel: xfer_kb::TunnelKind::Vxlan,
        reverse_tunnel: false,
        seq,
        lifetime_secs: 60,
        expires_at: now.add_secs(60),
        updated_at: now,
    }
}

/// Central push: a home agent (h2) publishes to the knowledge base (h1) over gRPC;
/// puts, a stale put, a remove and a full update land in h1's store; h1's own
/// bindings go straight into it; a query and the recovery of h2's bindings answer
/// from it; a host that is not the knowledge base keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_reach_the_kb_and_are_recovered_from_it() {
    use super::bindings::{recover, Place};
    use super::wire::BindingOp;
    use xfer_kb::{BindingPut, BindingQuery};
    let (hosts, cfg) = cluster(3, ModeKind::CentralPush).await;
    let now = || xfer_kb::Clock::now(&xfer_kb::SystemClock::new());
    let places = kb(&hosts[1]).binding_places().to_vec();
    assert_eq!(places.len(), 1);
    assert_eq!(places[0].name(), "h1");
    let put = |b| BindingOp::Put(b);
    let p = &places[0];
    assert_eq!(
        p.change(&put(record([10, 77, 0, 1], "h2", [10, 0, 0, 3], 5)), now())
            .await
            .expect("put"),
        Ok(BindingPut::Stored)
    );
    assert_eq!(
        p.change(&put(record([10, 77, 0, 1], "h2", [10, 0, 0, 9], 4)), now())
            .await
            .expect("put"),
        Ok(BindingPut::Stale { stored: 5 })
    );
    p.change(&put(record([10, 77, 0, 2], "h2", [10, 0, 0, 3], 1)), now())
        .await
        .expect("put")
        .expect("stored");
    assert_eq!(
        p.change(
            &BindingOp::Remove(record([10, 77, 0, 2], "h2", [10, 0, 0, 3], 2)),
            now()
        )
        .await
        .expect("remove"),
        Err(true)
    );
    // The knowledge base host publishes into its own store.
    let own = kb(&hosts[0]).binding_places().to_vec();
    assert!(matches!(own[0], Place::Local(_)));
    own[0]
        .change(&put(record([10, 77, 0, 9], "h1", [10, 0, 0, 2], 1)), now())
        .await
        .expect("put")
        .expect("stored");
    let all = p.query(&BindingQuery::All, now()).await.expect("query");
    let homes: Vec<String> = all.iter().map(|b| b.home.to_string()).collect();
    assert_eq!(homes, ["10.77.0.1", "10.77.0.9"]);
    assert_eq!(all[0].care_of, std::net::Ipv4Addr::new(10, 0, 0, 3));
    // Recovery asks for h2's own.
    let got = recover(&places, "h2", now()).await.expect("recover");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, 5);
    // A full update replaces h2's set.
    p.replace(
        "h2",
        &[record([10, 77, 0, 3], "h2", [10, 0, 0, 4], 8)],
        now(),
    )
    .await
    .expect("replace");
    let got = recover(&places, "h2", now()).await.expect("recover");
    let homes: Vec<String> = got.iter().map(|b| b.home.to_string()).collect();
    assert_eq!(homes, ["10.77.0.3"]);
    // h3 is not the knowledge base: it keeps no bindings and says so.
    let e = crate::client::Client::kb_bindings(&cfg.hosts["h3"], None, &BindingQuery::All)
        .await
        .expect_err("h3 keeps none");
    assert!(format!("{e:?}").contains("keeps no bindings"), "{e:?}");
    // A knowledge base that does not answer: recovery fails (so the home agent
    // retries instead of publishing an empty set), publishing fails fast.
    hosts[0].proxy.kill();
    drop(hosts);
    let t = std::time::Instant::now();
    assert!(recover(&places, "h2", now()).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// Modes c-e: every host keeps its neighbours' bindings; a home agent publishes to
/// each neighbour and recovers from whichever answers (the newest wins).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_central_store_neighbours_keep_the_bindings() {
    use super::bindings::recover;
    use super::wire::BindingOp;
    let (hosts, _cfg) = cluster(3, ModeKind::OnlineQuery).await;
    let now = || xfer_kb::Clock::now(&xfer_kb::SystemClock::new());
    let places = kb(&hosts[0]).binding_places().to_vec();
    let names: Vec<&str> = places.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["h2", "h3"]);
    // h3 missed the refresh to seq 6.
    places[0]
        .change(
            &BindingOp::Put(record([10, 77, 0, 1], "h1", [10, 0, 0, 2], 6)),
            now(),
        )
        .await
        .expect("put")
        .expect("stored");
    places[1]
        .change(
            &BindingOp::Put(record([10, 77, 0, 1], "h1", [10, 0, 0, 2], 5)),
            now(),
        )
        .await
        .expect("put")
        .expect("stored");
    let got = recover(&places, "h1", now()).await.expect("recover");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].seq, 6);
    // One neighbour down: the other still answers.
    hosts[1].proxy.kill();
    let got = recover(&places, "h1", now()).await.expect("recover");
    assert_eq!(got.len(), 1);
}

/// A store whose binding calls fail while `down` (a knowledge base that is away).
#[derive(Debug)]
struct Flaky {
    inner: xfer_kb::EmbeddedStore,
    down: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<(), xfer_kb::KbError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(xfer_kb::KbError::Reach {
                host: "kb".into(),
                what: "down".into(),
            });
        }
        Ok(())
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl xfer_kb::KbStore for Flaky {
    async fn apply(
        &self,
        ev: &xfer_kb::HostEvent,
        now: xfer_kb::Timestamp,
    ) -> Result<xfer_kb::Applied, xfer_kb::KbError> {
        self.inner.apply(ev, now).await
    }
    async fn replace(
        &self,
        inv: &xfer_kb::FullInventory,
        now: xfer_kb::Timestamp,
    ) -> Result<(), xfer_kb::KbError> {
        self.inner.replace(inv, now).await
    }
    async fn holders(&self, d: &[Digest]) -> Result<xfer_kb::Holdings, xfer_kb::KbError> {
        self.inner.holders(d).await
    }
    async fn snapshots(
        &self,
        q: &xfer_kb::SnapshotQuery,
    ) -> Result<Vec<(xfer_kb::Snapshot, xfer_kb::Timestamp)>, xfer_kb::KbError> {
        self.inner.snapshots(q).await
    }
    async fn host(&self, h: &str) -> Result<Option<xfer_kb::HostRecord>, xfer_kb::KbError> {
        self.inner.host(h).await
    }
    async fn hosts(&self) -> Result<Vec<xfer_kb::HostRecord>, xfer_kb::KbError> {
        self.inner.hosts().await
    }
    async fn remove_host(&self, h: &str) -> Result<bool, xfer_kb::KbError> {
        self.inner.remove_host(h).await
    }
    async fn expire(&self, now: xfer_kb::Timestamp) -> Result<Vec<String>, xfer_kb::KbError> {
        self.inner.expire(now).await
    }
    async fn put_binding(
        &self,
        b: &xfer_kb::BindingRecord,
        now: xfer_kb::Timestamp,
    ) -> Result<xfer_kb::BindingPut, xfer_kb::KbError> {
        self.check()?;
        self.inner.put_binding(b, now).await
    }
    async fn remove_binding(
        &self,
        home: std::net::Ipv4Addr,
        ha: &str,
        seq: u16,
    ) -> Result<bool, xfer_kb::KbError> {
        self.check()?;
        self.inner.remove_binding(home, ha, seq).await
    }
    async fn replace_bindings(
        &self,
        ha: &str,
        list: &[xfer_kb::BindingRecord],
        now: xfer_kb::Timestamp,
    ) -> Result<(), xfer_kb::KbError> {
        self.check()?;
        self.inner.replace_bindings(ha, list, now).await
    }
    async fn bindings(
        &self,
        q: &xfer_kb::BindingQuery,
        now: xfer_kb::Timestamp,
    ) -> Result<Vec<xfer_kb::BindingRecord>, xfer_kb::KbError> {
        self.check()?;
        self.inner.bindings(q, now).await
    }
}

/// A home agent without the network: its bindings, and whether it lost its file.
#[derive(Default)]
struct FakeHomeAgent {
    bindings: std::sync::Mutex<Vec<xfer_mobility::Binding>>,
    needs_recovery: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl super::bindings::HomeBindings for FakeHomeAgent {
    fn needs_recovery(&self) -> bool {
        self.needs_recovery
            .load(std::sync::atomic::Ordering::SeqCst)
    }
    async fn home_bindings(&self) -> Vec<xfer_mobility::Binding> {
        self.bindings.lock().expect("lock").clone()
    }
    async fn restore(&self, list: Vec<xfer_mobility::Binding>) -> usize {
        let n = list.len();
        self.bindings.lock().expect("lock").extend(list);
        self.needs_recovery
            .store(false, std::sync::atomic::Ordering::SeqCst);
        n
    }
}

/// The publisher: a home agent that lost its file recovers from the knowledge base
/// once it answers and never erases it with an empty full update meanwhile; changes
/// go out as they happen; changes lost while the knowledge base was away are
/// repaired by the full update once it is back.
#[tokio::test]
async fn the_publisher_recovers_then_repairs_lost_changes() {
    use super::bindings::{binding_of, HomeAgent, Place, Publisher};
    use crate::handover::Published;
    use xfer_kb::{BindingQuery, KbStore};
    let now = || xfer_kb::Clock::now(&xfer_kb::SystemClock::new());
    let store = Arc::new(Flaky {
        inner: xfer_kb::EmbeddedStore::in_memory(None),
        down: true.into(),
    });
    let me = HomeAgent {
        name: "h2".into(),
        address: [127, 0, 0, 1].into(),
        tunnel: xfer_kb::TunnelKind::Vxlan,
    };
    // What the knowledge base held before the home agent lost its file.
    let r1 = record([10, 77, 0, 1], "h2", [10, 0, 0, 3], 5);
    store.inner.put_binding(&r1, now()).await.expect("put");
    let ha = Arc::new(FakeHomeAgent::default());
    ha.needs_recovery
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let publisher = Publisher {
        me: me.clone(),
        places: vec![Place::Local(store.clone())],
        clock: Arc::new(xfer_kb::SystemClock::new()),
        full_period: Duration::from_millis(300),
        retry: Duration::from_millis(100),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(publisher.run(ha.clone(), rx));
    let homes = || async {
        let mut v: Vec<String> = store
            .inner
            .bindings(&BindingQuery::HomeAgent("h2".into()), now())
            .await
            .expect("q")
            .iter()
            .map(|b| format!("{}@{}", b.home, b.seq))
            .collect();
        v.sort();
        v
    };
    let settle = || tokio::time::sleep(Duration::from_millis(700));
    // Polls until `homes()` is `want` (5 s at most: a loaded CI machine).
    let until = |want: &'static [&'static str]| {
        let homes = &homes;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = homes().await;
                if got == want {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{got:?}, not {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The knowledge base is away: no recovery, and nothing erased.
    settle().await;
    assert!(ha.needs_recovery.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(homes().await, ["10.77.0.1@5"]);
    // It is back: recovered.
    store.set_down(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ha.needs_recovery.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "not recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*ha.bindings.lock().expect("lock"), vec![binding_of(&r1)]);
    // A change goes out at once.
    let b2 = binding_of(&record([10, 77, 0, 2], "h2", [10, 0, 0, 3], 1));
    ha.bindings.lock().expect("lock").push(b2.clone());
    tx.send(Published::Put(b2)).expect("send");
    until(&["10.77.0.1@5", "10.77.0.2@1"]).await;
    // Away again: a removal and a new binding are lost...
    store.set_down(true);
    let b3 = binding_of(&record([10, 77, 0, 3], "h2", [10, 0, 0, 4], 9));
    {
        let mut v = ha.bindings.lock().expect("lock");
        v.retain(|b| b.home_address != r1.home);
        v.push(b3.clone());
    }
    tx.send(Published::Remove {
        home: r1.home,
        seq: 6,
    })
    .expect("send");
    tx.send(Published::Put(b3)).expect("send");
    settle().await;
    assert_eq!(homes().await, ["10.77.0.1@5", "10.77.0.2@1"]);
    // ...and repaired by the full update once it is back.
    store.set_down(false);
    until(&["10.77.0.2@1", "10.77.0.3@9"]).await;
    task.abort();
}
