//! Every mode, on the embedded store, with tokio's time paused (a fake clock that
//! jumps to the next timer): answers after add, remove and evict events, snapshots,
//! load, dead hosts; lost events repaired.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xfer_kb::{
    Clock, EmbeddedStore, KbStore, ModeConfig, PullConfig, PushConfig, QueryConfig,
    SubscribeConfig, Timestamp, TokioClock,
};

const DELAY: Duration = Duration::from_millis(5);

fn clock() -> Arc<dyn Clock> {
    Arc::new(TokioClock::starting_at(Timestamp::from_secs(1_800_000_000)))
}

/// Three hosts and mode `mode` deployed over them, on an unpersisted embedded store.
fn start(mode: &ModeConfig) -> (Cluster, xfer_kb::sim::Deployment) {
    let clock = clock();
    let c = Cluster::new(clock.clone(), DELAY);
    let store: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(None));
    let dep = xfer_kb::sim::deploy(
        mode,
        store,
        c.transport.clone(),
        &c.dyn_hosts(),
        c.names(),
        clock,
        DELAY,
    );
    (c, dep)
}

async fn run(cfg: ModeConfig) {
    let ttl = match &cfg {
        ModeConfig::CentralPush(p) => Some(p.host_ttl),
        _ => None,
    };
    let store: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(ttl));
    let settle = cfg.window() + Duration::from_millis(100);
    let gone = cfg.gone_window() + Duration::from_millis(100);
    mode_scenario(&cfg, store, clock(), DELAY, settle, gone).await;
}

#[tokio::test(start_paused = true)]
async fn embedded_store_contract() {
    store_contract(&EmbeddedStore::in_memory(None)).await;
}

#[tokio::test]
async fn embedded_store_binding_contract() {
    binding_contract(&EmbeddedStore::in_memory(None), 1_000_000).await;
}

/// Bindings survive a restart through the store's file, and `expire` drops the
/// expired ones (with or without a host TTL).
#[tokio::test]
async fn embedded_store_persists_and_expires_bindings() {
    let dir = tempfile::tempdir().expect("ok");
    let path = dir.path().join("kb.bin");
    let t = |s: u64| xfer_kb::Timestamp::from_secs(1_000 + s);
    {
        let s = EmbeddedStore::open(&path, None).expect("ok");
        let b1 = binding([10, 77, 0, 1], "h1", [10, 0, 0, 2], 5, 1_000, 60);
        let b2 = binding([10, 77, 0, 2], "h1", [10, 0, 0, 3], 6, 1_000, 10);
        s.put_binding(&b1, t(0)).await.expect("put");
        s.put_binding(&b2, t(0)).await.expect("put");
        s.persist().expect("ok");
    }
    let s = EmbeddedStore::open(&path, None).expect("ok");
    let all = s
        .bindings(&xfer_kb::BindingQuery::All, t(0))
        .await
        .expect("q");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].care_of, std::net::Ipv4Addr::new(10, 0, 0, 2));
    assert!(s.expire(t(11)).await.expect("expire").is_empty());
    // The 10 s binding is gone from the store itself, not only from answers.
    let left = s
        .bindings(&xfer_kb::BindingQuery::All, t(0))
        .await
        .expect("q");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].home, std::net::Ipv4Addr::new(10, 77, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn central_pull_answers_after_add_remove_evict() {
    run(ModeConfig::CentralPull(PullConfig::default())).await;
}

#[tokio::test(start_paused = true)]
async fn central_push_answers_after_add_remove_evict() {
    run(ModeConfig::CentralPush(PushConfig::default())).await;
}

#[tokio::test(start_paused = true)]
async fn online_query_answers_after_add_remove_evict() {
    run(ModeConfig::OnlineQuery(QueryConfig::default())).await;
}

#[tokio::test(start_paused = true)]
async fn neighbour_pull_answers_after_add_remove_evict() {
    run(ModeConfig::NeighbourPull(PullConfig::default())).await;
}

#[tokio::test(start_paused = true)]
async fn neighbour_subscribe_answers_after_add_remove_evict() {
    run(ModeConfig::NeighbourSubscribe(SubscribeConfig::default())).await;
}

/// Pull modes are stale until the next pull: a change made right after a pull is not
/// in the answer half a period later, and is after the period.
#[tokio::test(start_paused = true)]
async fn pull_is_stale_until_the_next_pull() {
    let cfg = ModeConfig::CentralPull(PullConfig::default());
    let (c, dep) = start(&cfg);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.hosts[0].add(&[d(1)]);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&[])]);
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&["h1"])]);
}

/// Central push: events lost on the way to the knowledge base. Heartbeats are off
/// (longer than the test), so only the periodic full update can repair them.
#[tokio::test(start_paused = true)]
async fn central_push_lost_events_repaired_by_periodic_full_update() {
    let cfg = PushConfig {
        heartbeat: Duration::from_secs(100_000),
        full_period: Duration::from_secs(300),
        host_ttl: Duration::from_secs(1_000_000),
        ..PushConfig::default()
    };
    let mode = ModeConfig::CentralPush(cfg);
    let (c, dep) = start(&mode);
    c.hosts[0].add(&[d(1), d(2)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&["h1"])]);
    let sink = dep.sink.clone().expect("push mode has a sink");
    // The last two events of h1 are lost: nothing follows them, so no gap shows.
    sink.faults().lose_next("h1", 2);
    c.hosts[0].evict(&[d(1)]);
    c.hosts[0].add(&[d(3)]);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(sink.faults().lost(), 2);
    assert_eq!(
        dir_names(&*dep.directory, &[d(1), d(3)]).await,
        vec![v(&["h1"]), v(&[])],
        "still stale: the events were lost"
    );
    // The full update at 300 s repairs it.
    tokio::time::sleep(Duration::from_secs(245)).await;
    assert_eq!(
        dir_names(&*dep.directory, &[d(1), d(3)]).await,
        vec![v(&[]), v(&["h1"])],
        "repaired by the periodic full update"
    );
}

/// Central push: a lost event is found by the next event's sequence number (gap),
/// which triggers a full update at once.
#[tokio::test(start_paused = true)]
async fn central_push_gap_triggers_full_update() {
    let cfg = PushConfig {
        heartbeat: Duration::from_secs(100_000),
        full_period: Duration::from_secs(100_000),
        host_ttl: Duration::from_secs(1_000_000),
        ..PushConfig::default()
    };
    let mode = ModeConfig::CentralPush(cfg);
    let (c, dep) = start(&mode);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sink = dep.sink.clone().expect("sink");
    sink.faults().lose_next("h2", 1);
    c.hosts[1].add(&[d(1)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&[])]);
    c.hosts[1].add(&[d(2)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dir_names(&*dep.directory, &[d(1), d(2)]).await,
        vec![v(&["h2"]), v(&["h2"])],
        "the gap at seq 2 made h2 push its full inventory"
    );
}

/// Central push: a lost last event is found by the next heartbeat.
#[tokio::test(start_paused = true)]
async fn central_push_heartbeat_finds_lost_last_event() {
    let mode = ModeConfig::CentralPush(PushConfig {
        full_period: Duration::from_secs(100_000),
        ..PushConfig::default()
    });
    let (c, dep) = start(&mode);
    tokio::time::sleep(Duration::from_secs(1)).await;
    dep.sink.as_ref().expect("sink").faults().lose_next("h3", 1);
    c.hosts[2].add(&[d(1)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&[])]);
    tokio::time::sleep(mode.window()).await;
    assert_eq!(dir_names(&*dep.directory, &[d(1)]).await, vec![v(&["h3"])]);
}

/// Neighbour subscribe: lost events repaired by the periodic full resync (probes off),
/// and found by the sequence probe.
#[tokio::test(start_paused = true)]
async fn neighbour_subscribe_lost_events_repaired() {
    for (probe, wait) in [(100_000, 305), (10, 11)] {
        let mode = ModeConfig::NeighbourSubscribe(SubscribeConfig {
            probe_period: Duration::from_secs(probe),
            full_period: Duration::from_secs(300),
            ..SubscribeConfig::default()
        });
        let (c, dep) = start(&mode);
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.transport.faults().lose_next("h1", 1);
        c.hosts[0].add(&[d(1)]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(c.transport.faults().lost(), 1);
        assert_eq!(
            dir_names(&*dep.directory, &[d(1)]).await,
            vec![v(&[])],
            "probe {probe}"
        );
        tokio::time::sleep(Duration::from_secs(wait)).await;
        assert_eq!(
            dir_names(&*dep.directory, &[d(1)]).await,
            vec![v(&["h1"])],
            "probe {probe}"
        );
    }
}

/// The embedded store survives a restart through its file.
#[tokio::test]
async fn embedded_store_persists() {
    let dir = tempfile::tempdir().expect("ok");
    let path = dir.path().join("kb.bin");
    {
        let s = EmbeddedStore::open(&path, None).expect("ok");
        store_contract(&s).await;
        s.persist().expect("ok");
    }
    let s = EmbeddedStore::open(&path, None).expect("ok");
    assert_eq!(names(&s, &[d(7), d(2)]).await, vec![v(&["a"]), v(&[])]);
    let rec = s.host("a").await.expect("store call").expect("ok");
    assert_eq!(rec.seq, 9);
    std::fs::write(&path, b"garbage").expect("ok");
    assert!(EmbeddedStore::open(&path, None).is_err());
}

/// A host's on-disk chunk store as its inventory, through central push: puts,
/// deletes and garbage collection reach the knowledge base; a put the host forgot to
/// report is repaired by the next full update, which reads the store.
#[tokio::test(start_paused = true)]
async fn store_inventory_through_central_push() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(xfer_store::Store::open(dir.path()).expect("store"));
    let clock = clock();
    let inv = Arc::new(xfer_kb::StoreInventory::new(
        "disk",
        store.clone(),
        clock.clone(),
    ));
    let transport = Arc::new(xfer_kb::LocalTransport::new(DELAY));
    transport.add(inv.clone());
    let mode = ModeConfig::CentralPush(PushConfig::default());
    let kb: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(None));
    let dep = xfer_kb::sim::deploy(
        &mode,
        kb,
        transport,
        &[inv.clone() as Arc<dyn xfer_kb::Inventory>],
        vec![],
        clock,
        DELAY,
    );
    let a = store.put(b"layer chunk").expect("put");
    let b = store.put(b"memory page").expect("put");
    inv.added(&[a, b]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dir_names(&*dep.directory, &[a, b]).await,
        vec![v(&["disk"]), v(&["disk"])]
    );
    store.remove(&a).expect("remove");
    inv.removed(&[a]);
    let report = store
        .gc(&xfer_store::GcPolicy {
            max_bytes: Some(0),
            min_age: Duration::ZERO,
            collect_expired: true,
        })
        .expect("gc");
    inv.collected(&report);
    // Not reported: only the full update can tell.
    let c = store.put(b"unreported").expect("put");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        dir_names(&*dep.directory, &[a, b, c]).await,
        vec![v(&[]), v(&[]), v(&[])]
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(dir_names(&*dep.directory, &[c]).await, vec![v(&["disk"])]);
}
