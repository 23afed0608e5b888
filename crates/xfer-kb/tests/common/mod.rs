//! Shared by the mode tests (embedded store, fake tokio time) and the etcd tests
//! (real etcd-server, real time).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use xfer_kb::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, Clock, Digest, FullInventory,
    HostEvent, HostInfo, Inventory, KbStore, LocalTransport, MemInventory, ModeConfig, Snapshot,
    SnapshotQuery, Subject, Timestamp, TunnelKind,
};

pub fn d(i: u32) -> Digest {
    Digest::of(&i.to_le_bytes())
}

pub fn snapshot(id: u32, host: &str, subject: Subject, service: &str, taken_s: u64) -> Snapshot {
    Snapshot {
        id: d(1_000_000 + id),
        host: host.into(),
        subject,
        service: Some(service.into()),
        taken: Timestamp::from_secs(taken_s),
        objects: vec![d(2_000_000 + id)],
        bytes: 100 << 20,
    }
}

fn ev(host: &str, seq: u64, change: Change) -> HostEvent {
    HostEvent {
        host: host.into(),
        seq,
        at: Timestamp::from_secs(1),
        change,
    }
}

fn inv(host: &str, seq: u64, digests: Vec<Digest>, snaps: Vec<Snapshot>) -> FullInventory {
    FullInventory {
        host: host.into(),
        seq,
        at: Timestamp::from_secs(1),
        digests,
        snapshots: snaps,
        info: HostInfo::default(),
    }
}

/// Names of the holders of each digest, sorted.
pub async fn names(store: &dyn KbStore, ds: &[Digest]) -> Vec<Vec<String>> {
    let h = store.holders(ds).await.expect("holders");
    assert_eq!(h.holders.len(), ds.len());
    h.holders
        .iter()
        .map(|v| {
            let mut n: Vec<String> = v
                .iter()
                .map(|&i| h.hosts[i as usize].host.clone())
                .collect();
            n.sort();
            n
        })
        .collect()
}

/// The storage contract, for any [`KbStore`].
pub async fn store_contract(store: &dyn KbStore) {
    let t = Timestamp::from_secs(100);
    let s_vol = snapshot(1, "a", Subject::Volume("g1".into()), "svc", 50);
    // Unknown host: events are refused until a full inventory arrives.
    assert_eq!(
        store
            .apply(&ev("a", 1, Change::Add(vec![d(1)])), t)
            .await
            .expect("ok"),
        Applied::UnknownHost
    );
    store
        .replace(&inv("a", 3, vec![d(1), d(2)], vec![s_vol.clone()]), t)
        .await
        .expect("ok");
    store
        .replace(&inv("b", 0, vec![d(2), d(3)], vec![]), t)
        .await
        .expect("ok");
    assert_eq!(
        names(store, &[d(1), d(2), d(3), d(4)]).await,
        vec![vec!["a"], vec!["a", "b"], vec!["b"], vec![]]
    );
    // Next event applies; add, remove, evict.
    let t2 = Timestamp::from_secs(110);
    assert_eq!(
        store
            .apply(&ev("a", 4, Change::Add(vec![d(4), d(3)])), t2)
            .await
            .expect("ok"),
        Applied::Applied
    );
    assert_eq!(
        store
            .apply(&ev("a", 5, Change::Remove(vec![d(2)])), t2)
            .await
            .expect("ok"),
        Applied::Applied
    );
    assert_eq!(
        store
            .apply(&ev("b", 1, Change::Evict(vec![d(3)])), t2)
            .await
            .expect("ok"),
        Applied::Applied
    );
    assert_eq!(
        names(store, &[d(1), d(2), d(3), d(4)]).await,
        vec![vec!["a"], vec!["b"], vec!["a"], vec!["a"]]
    );
    // Duplicates are ignored, gaps refused (nothing applied).
    assert_eq!(
        store
            .apply(&ev("a", 5, Change::Add(vec![d(9)])), t2)
            .await
            .expect("ok"),
        Applied::Duplicate
    );
    assert_eq!(
        store
            .apply(&ev("a", 7, Change::Add(vec![d(9)])), t2)
            .await
            .expect("ok"),
        Applied::Gap { have: 5, got: 7 }
    );
    assert_eq!(names(store, &[d(9)]).await, vec![Vec::<String>::new()]);
    let rec = store
        .host("a")
        .await
        .expect("store call")
        .expect("record of a");
    assert_eq!(rec.seq, 5);
    assert_eq!(rec.as_of, t2);
    // A heartbeat at the current sequence refreshes as_of; one ahead is a gap.
    let t3 = Timestamp::from_secs(120);
    assert_eq!(
        store
            .apply(&ev("a", 5, Change::Heartbeat), t3)
            .await
            .expect("ok"),
        Applied::Applied
    );
    assert_eq!(
        store
            .host("a")
            .await
            .expect("store call")
            .expect("ok")
            .as_of,
        t3
    );
    assert!(store
        .apply(&ev("a", 6, Change::Heartbeat), t3)
        .await
        .expect("ok")
        .needs_full());
    // Info.
    let info = HostInfo {
        load: 2.5,
        ..Default::default()
    };
    store
        .apply(&ev("b", 2, Change::Info(info.clone())), t3)
        .await
        .expect("ok");
    let h = store.holders(&[d(2)]).await.expect("store call");
    assert_eq!(h.hosts[h.holders[0][0] as usize].info, info);
    // Snapshots: by volume, container, service; add and remove by event.
    let s_ctr = snapshot(2, "b", Subject::Container("c1".into()), "svc", 60);
    store
        .apply(&ev("b", 3, Change::SnapshotAdd(s_ctr.clone())), t3)
        .await
        .expect("ok");
    let got = store
        .snapshots(&SnapshotQuery::Service("svc".into()))
        .await
        .expect("ok");
    let ids: Vec<_> = got.iter().map(|(s, _)| s.id).collect();
    assert_eq!(ids, vec![s_ctr.id, s_vol.id], "newest first");
    assert_eq!(got[0].1, t3, "with the host's as_of");
    let got = store
        .snapshots(&SnapshotQuery::Volume("g1".into()))
        .await
        .expect("ok");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, s_vol);
    assert_eq!(
        store
            .snapshots(&SnapshotQuery::Container("c1".into()))
            .await
            .expect("ok")
            .len(),
        1
    );
    store
        .apply(&ev("b", 4, Change::SnapshotRemove(s_ctr.id)), t3)
        .await
        .expect("ok");
    assert!(store
        .snapshots(&SnapshotQuery::Container("c1".into()))
        .await
        .expect("ok")
        .is_empty());
    // A full inventory replaces everything of its host (holdings and snapshots).
    store
        .replace(&inv("a", 9, vec![d(7)], vec![]), t3)
        .await
        .expect("ok");
    assert_eq!(
        names(store, &[d(1), d(3), d(4), d(7)]).await,
        vec![v(&[]), v(&[]), v(&[]), v(&["a"])]
    );
    assert!(store
        .snapshots(&SnapshotQuery::Volume("g1".into()))
        .await
        .expect("ok")
        .is_empty());
    assert_eq!(
        store.host("a").await.expect("store call").expect("ok").seq,
        9
    );
    // Removing a host removes its holdings.
    assert!(store.remove_host("b").await.expect("store call"));
    assert!(!store.remove_host("b").await.expect("store call"));
    assert_eq!(names(store, &[d(2)]).await, vec![Vec::<String>::new()]);
    let hosts: Vec<String> = store
        .hosts()
        .await
        .expect("ok")
        .into_iter()
        .map(|r| r.host)
        .collect();
    assert_eq!(hosts, vec!["a"]);
}

/// A small cluster: hosts h1..h3 (the destination's neighbours), reachable through
/// a transport with `delay` one-way.
pub struct Cluster {
    pub hosts: Vec<Arc<MemInventory>>,
    pub transport: Arc<LocalTransport>,
}

impl Cluster {
    pub fn new(clock: Arc<dyn Clock>, delay: Duration) -> Self {
        let transport = Arc::new(LocalTransport::new(delay));
        let hosts: Vec<Arc<MemInventory>> = (1..=3)
            .map(|i| Arc::new(MemInventory::new(format!("h{i}"), clock.clone())))
            .collect();
        for h in &hosts {
            transport.add(h.clone());
        }
        Cluster { hosts, transport }
    }

    pub fn names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.host().to_owned()).collect()
    }

    pub fn dyn_hosts(&self) -> Vec<Arc<dyn Inventory>> {
        self.hosts
            .iter()
            .map(|h| h.clone() as Arc<dyn Inventory>)
            .collect()
    }
}

/// Names of the holders of each digest per the directory, sorted.
pub async fn dir_names(dir: &dyn xfer_kb::Directory, ds: &[Digest]) -> Vec<Vec<String>> {
    let a = dir.holders(ds).await.expect("holders");
    (0..ds.len())
        .map(|i| a.names_of(i).into_iter().map(str::to_owned).collect())
        .collect()
}

pub fn v(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Add, remove, evict, snapshots, load and a dead host, through mode `cfg`; after each
/// step waits `settle` (real or fake time) and checks the answer.
pub async fn mode_scenario(
    cfg: &ModeConfig,
    store: Arc<dyn KbStore>,
    clock: Arc<dyn Clock>,
    delay: Duration,
    settle: Duration,
    gone: Duration,
) {
    let c = Cluster::new(clock.clone(), delay);
    let (h1, h2, h3) = (&c.hosts[0], &c.hosts[1], &c.hosts[2]);
    h1.add(&[d(1), d(2)]);
    h2.add(&[d(2), d(3)]);
    h3.add(&[d(4)]);
    let dep = xfer_kb::sim::deploy(
        cfg,
        store,
        c.transport.clone(),
        &c.dyn_hosts(),
        c.names(),
        clock.clone(),
        delay,
    );
    let dir = dep.directory.clone();
    assert_eq!(dir.mode(), cfg.kind());
    let ds = [d(1), d(2), d(3), d(4), d(5)];
    tokio::time::sleep(settle).await;
    assert_eq!(
        dir_names(&*dir, &ds).await,
        vec![v(&["h1"]), v(&["h1", "h2"]), v(&["h2"]), v(&["h3"]), v(&[])],
        "{:?}: initial state",
        cfg.kind()
    );
    // add
    h3.add(&[d(5)]);
    h1.add(&[d(3)]);
    tokio::time::sleep(settle).await;
    assert_eq!(
        dir_names(&*dir, &ds).await,
        vec![
            v(&["h1"]),
            v(&["h1", "h2"]),
            v(&["h1", "h2"]),
            v(&["h3"]),
            v(&["h3"])
        ],
        "{:?}: after add",
        cfg.kind()
    );
    // remove and evict
    h2.remove(&[d(2)]);
    h1.evict(&[d(1), d(3)]);
    tokio::time::sleep(settle).await;
    assert_eq!(
        dir_names(&*dir, &ds).await,
        vec![v(&[]), v(&["h1"]), v(&["h2"]), v(&["h3"]), v(&["h3"])],
        "{:?}: after remove and evict",
        cfg.kind()
    );
    // load and freshness
    h2.set_info(HostInfo {
        load: 4.0,
        ..Default::default()
    });
    let s = snapshot(7, "h2", Subject::Volume("vol-1".into()), "sha256:svc", 10);
    h2.add_snapshot(s.clone());
    tokio::time::sleep(settle).await;
    let a = dir.holders(&ds).await.expect("store call");
    let f = a.hosts_of(2).next().expect("h2 holds d3");
    assert_eq!(f.host, "h2");
    assert_eq!(f.info.load, 4.0, "{:?}: load", cfg.kind());
    let now = clock.now();
    for h in &a.hosts {
        let age = now.saturating_since(h.as_of);
        assert!(
            age <= cfg.window(),
            "{:?}: {} is {age:?} old, window {:?}",
            cfg.kind(),
            h.host,
            cfg.window()
        );
    }
    assert_eq!(a.window, cfg.window());
    // snapshots
    let snaps = dir
        .snapshots(&SnapshotQuery::Volume("vol-1".into()))
        .await
        .expect("ok");
    assert_eq!(snaps.snapshots.len(), 1, "{:?}: snapshot", cfg.kind());
    assert_eq!(snaps.snapshots[0].0, s);
    let snaps = dir
        .snapshots(&SnapshotQuery::Service("sha256:svc".into()))
        .await
        .expect("ok");
    assert_eq!(snaps.snapshots.len(), 1);
    h2.remove_snapshot(s.id);
    tokio::time::sleep(settle).await;
    assert!(dir
        .snapshots(&SnapshotQuery::Volume("vol-1".into()))
        .await
        .expect("ok")
        .snapshots
        .is_empty());
    // a dead host disappears
    c.transport.set_down("h3", true);
    if let Some(sink) = &dep.sink {
        sink.faults().silence("h3", true);
    }
    tokio::time::sleep(gone).await;
    assert_eq!(
        dir_names(&*dir, &ds).await,
        vec![v(&[]), v(&["h1"]), v(&["h2"]), v(&[]), v(&[])],
        "{:?}: after h3 died",
        cfg.kind()
    );
}

pub fn binding(
    home: [u8; 4],
    ha: &str,
    care_of: [u8; 4],
    seq: u16,
    at_s: u64,
    life: u32,
) -> BindingRecord {
    BindingRecord {
        home: home.into(),
        home_agent: ha.into(),
        home_agent_address: [10, 0, 0, 1].into(),
        care_of: care_of.into(),
        tunnel: TunnelKind::Vxlan,
        reverse_tunnel: false,
        seq,
        lifetime_secs: life,
        expires_at: Timestamp::from_secs(at_s + u64::from(life)),
        updated_at: Timestamp::from_secs(at_s),
    }
}

fn homes(v: &[BindingRecord]) -> Vec<(String, String, u16)> {
    v.iter()
        .map(|b| (b.home.to_string(), b.care_of.to_string(), b.seq))
        .collect()
}

/// The binding semantics every store must have: put, refresh, move, a stale
/// sequence number refused (also across the 2^16 wrap), removal by the owner only
/// and not by an older sequence, queries by home address and home agent, a full
/// set replacing a home agent's bindings, expired bindings never answered. Times
/// are relative to `t0` (seconds since the epoch) so a real-time store (etcd,
/// whose leases run in real time) gets bindings that are live now.
pub async fn binding_contract(store: &dyn KbStore, t0: u64) {
    let at = |s: u64| Timestamp::from_secs(t0 + s);
    let q_all = BindingQuery::All;
    let h1 = [10, 77, 0, 1];
    let h2 = [10, 77, 0, 2];
    let b = |home, ha: &str, coa, seq, s: u64, life| binding(home, ha, coa, seq, t0 + s, life);
    assert!(store.bindings(&q_all, at(0)).await.expect("q").is_empty());
    // (binding, now, expected verdict), in order: put; a refresh with a newer
    // sequence number; a stale one does not win, the same one is accepted again;
    // moved to another care-of host; sequence numbers wrap (2 is newer than 65535);
    // an already expired binding is not stored.
    let stale = |stored| BindingPut::Stale { stored };
    let steps = [
        (
            b(h1, "ha", [10, 0, 0, 2], 10, 0, 600),
            0,
            BindingPut::Stored,
        ),
        (
            b(h1, "ha", [10, 0, 0, 2], 11, 1, 600),
            1,
            BindingPut::Stored,
        ),
        (b(h1, "ha", [10, 0, 0, 9], 9, 2, 600), 2, stale(11)),
        (
            b(h1, "ha", [10, 0, 0, 2], 11, 1, 600),
            2,
            BindingPut::Stored,
        ),
        (
            b(h1, "ha", [10, 0, 0, 3], 12, 3, 600),
            3,
            BindingPut::Stored,
        ),
        (
            b(h2, "hb", [10, 0, 0, 4], 65535, 3, 600),
            3,
            BindingPut::Stored,
        ),
        (b(h2, "hb", [10, 0, 0, 4], 2, 4, 600), 4, BindingPut::Stored),
        (b(h2, "hb", [10, 0, 0, 4], 65000, 4, 600), 4, stale(2)),
        (
            b([10, 77, 0, 3], "ha", [10, 0, 0, 2], 1, 0, 1),
            5,
            BindingPut::Expired,
        ),
    ];
    for (i, (r, now, want)) in steps.into_iter().enumerate() {
        let got = store.put_binding(&r, at(now)).await.expect("put");
        assert_eq!(got, want, "step {i}: {r:?}");
    }
    let got = store
        .bindings(&BindingQuery::Home(h1.into()), at(5))
        .await
        .expect("q");
    assert_eq!(got, vec![b(h1, "ha", [10, 0, 0, 3], 12, 3, 600)]);
    // Queries.
    assert_eq!(store.bindings(&q_all, at(5)).await.expect("q").len(), 2);
    let of_hb = store
        .bindings(&BindingQuery::HomeAgent("hb".into()), at(5))
        .await
        .expect("q");
    assert_eq!(
        homes(&of_hb),
        vec![("10.77.0.2".into(), "10.0.0.4".into(), 2)]
    );
    // Removal: only by the owner, not with an older sequence number.
    assert!(!store.remove_binding(h1.into(), "hb", 12).await.expect("rm"));
    assert!(!store.remove_binding(h1.into(), "ha", 11).await.expect("rm"));
    assert!(store.remove_binding(h1.into(), "ha", 13).await.expect("rm"));
    assert!(!store.remove_binding(h1.into(), "ha", 13).await.expect("rm"));
    assert_eq!(store.bindings(&q_all, at(5)).await.expect("q").len(), 1);
    // A full set replaces the home agent's bindings, also over a "newer" number of
    // its own (the home agent is the authority), and leaves other home agents'.
    let own = b(h1, "ha", [10, 0, 0, 2], 500, 5, 600);
    store.put_binding(&own, at(5)).await.expect("put");
    let h3 = [10, 77, 0, 3];
    store
        .replace_bindings(
            "ha",
            &[
                b(h3, "ha", [10, 0, 0, 5], 7, 6, 600),
                b(h1, "ha", [10, 0, 0, 6], 3, 6, 600),
            ],
            at(6),
        )
        .await
        .expect("replace");
    let got = store.bindings(&q_all, at(6)).await.expect("q");
    assert_eq!(
        homes(&got),
        vec![
            ("10.77.0.1".into(), "10.0.0.6".into(), 3),
            ("10.77.0.2".into(), "10.0.0.4".into(), 2),
            ("10.77.0.3".into(), "10.0.0.5".into(), 7),
        ]
    );
    store
        .replace_bindings("ha", &[b(h3, "ha", [10, 0, 0, 5], 8, 7, 600)], at(7))
        .await
        .expect("replace");
    let got = store.bindings(&q_all, at(7)).await.expect("q");
    assert_eq!(
        homes(&got),
        vec![
            ("10.77.0.2".into(), "10.0.0.4".into(), 2),
            ("10.77.0.3".into(), "10.0.0.5".into(), 8)
        ]
    );
    // Expiry: never answered past its lifetime; `expire` drops it.
    let late = at(7 + 600 + 1);
    assert!(store.bindings(&q_all, late).await.expect("q").is_empty());
    store.expire(late).await.expect("expire");
    assert!(store.bindings(&q_all, at(7)).await.expect("q").len() <= 2);
    // Clean up (real-time stores share their server between tests).
    store
        .replace_bindings("ha", &[], at(8))
        .await
        .expect("replace");
    store
        .replace_bindings("hb", &[], at(8))
        .await
        .expect("replace");
    assert!(store.bindings(&q_all, at(8)).await.expect("q").is_empty());
}
