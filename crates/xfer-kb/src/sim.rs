//! Running a mode in one process: [`deploy`] starts the pieces a mode needs (pullers,
//! pushers, subscribers) as tokio tasks over a [`LocalTransport`], and returns the
//! [`Directory`] a destination would ask. The tests and the staleness measurement use
//! it; the agent wires the same pieces over gRPC instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::inventory::Inventory;
use crate::model::HostName;
use crate::modes::{
    Central, Directory, ModeConfig, OnlineQuery, Puller, Pusher, StoreDirectory, Subscriber,
};
use crate::store::KbStore;
use crate::transport::{KbSink, LocalTransport, LossySink, Transport};

/// A running mode. Dropping it stops its tasks.
#[derive(Debug)]
pub struct Deployment {
    /// What the destination asks.
    pub directory: Arc<dyn Directory>,
    /// The hosts' path to the knowledge base (central push only), for fault injection.
    pub sink: Option<Arc<LossySink>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts mode `cfg`.
///
/// * `store`: the knowledge base's store (central modes) or the destination's own
///   store (neighbour pull and subscribe); unused by on-line queries.
/// * `hosts`: every host's inventory (central push runs a pusher on each).
/// * `peers`: the hosts the knowledge base (central pull) or the destination
///   (modes c, d, e) reaches through `transport`.
/// * `delay`: one-way delay between a host and the knowledge base (central push).
pub fn deploy(
    cfg: &ModeConfig,
    store: Arc<dyn KbStore>,
    transport: Arc<LocalTransport>,
    hosts: &[Arc<dyn Inventory>],
    peers: Vec<HostName>,
    clock: Arc<dyn Clock>,
    delay: Duration,
) -> Deployment {
    let t: Arc<dyn Transport> = transport;
    let mut tasks = Vec::new();
    let mut sink = None;
    let directory: Arc<dyn Directory> = match cfg {
        ModeConfig::CentralPull(p) | ModeConfig::NeighbourPull(p) => {
            let puller = Arc::new(Puller::new(
                t,
                store.clone(),
                clock.clone(),
                peers,
                p.clone(),
            ));
            tasks.push(tokio::spawn(puller.run()));
            Arc::new(StoreDirectory::new(store, clock, cfg))
        }
        ModeConfig::CentralPush(p) => {
            let central: Arc<dyn KbSink> = Arc::new(Central {
                store: store.clone(),
                clock: clock.clone(),
            });
            let lossy = Arc::new(LossySink::new(central, delay));
            for h in hosts {
                let pusher = Arc::new(Pusher::new(
                    h.clone(),
                    lossy.clone(),
                    clock.clone(),
                    p.clone(),
                ));
                tasks.push(tokio::spawn(pusher.run()));
            }
            tasks.push(crate::modes::spawn_expiry(
                store.clone(),
                clock.clone(),
                p.heartbeat,
            ));
            sink = Some(lossy);
            Arc::new(StoreDirectory::new(store, clock, cfg))
        }
        ModeConfig::OnlineQuery(q) => Arc::new(OnlineQuery::new(t, clock, peers, q.clone())),
        ModeConfig::NeighbourSubscribe(s) => {
            let sub = Arc::new(Subscriber::new(t, store.clone(), clock.clone(), s.clone()));
            for n in peers {
                tasks.push(tokio::spawn(sub.clone().follow(n)));
            }
            Arc::new(StoreDirectory::new(store, clock, cfg))
        }
    };
    Deployment {
        directory,
        sink,
        tasks,
    }
}

/// How [`measure_staleness`] runs.
#[derive(Debug, Clone)]
pub struct StalenessOpts {
    /// Hosts (all of them the destination's neighbours).
    pub hosts: usize,
    /// Changes measured.
    pub samples: usize,
    /// Hosts killed one after the other at the end (dead-host window).
    pub kills: usize,
    /// Fraction of change events lost (push and subscribe streams).
    pub loss_rate: f64,
    /// One-way delay of every message.
    pub delay: Duration,
    /// Time between two changes: uniform in `0..max_gap`. A multiple of the modes'
    /// periods, so that changes fall at uniformly random phases of them.
    pub max_gap: Duration,
    pub seed: u64,
}

impl Default for StalenessOpts {
    fn default() -> Self {
        StalenessOpts {
            hosts: 20,
            samples: 200,
            kills: 5,
            loss_rate: 0.0,
            delay: Duration::from_millis(5),
            max_gap: Duration::from_secs(60),
            seed: 1,
        }
    }
}

/// Distribution of measured delays.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delays {
    pub count: usize,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Delays {
    fn of(mut v: Vec<Duration>) -> Delays {
        if v.is_empty() {
            return Delays::default();
        }
        v.sort();
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Delays {
            count: v.len(),
            mean: v.iter().sum::<Duration>() / v.len() as u32,
            p50: q(0.5),
            p99: q(0.99),
            max: q(1.0),
        }
    }
}

/// What [`measure_staleness`] found for one mode.
#[derive(Debug, Clone)]
pub struct StalenessReport {
    pub mode: crate::model::ModeKind,
    /// The mode's bound, [`ModeConfig::window`].
    pub window: Duration,
    /// The mode's dead-host bound, [`ModeConfig::gone_window`].
    pub gone_window: Duration,
    /// From a change on a host (add, remove or evict, in turn) until the directory's
    /// answer reflects it.
    pub change: Delays,
    /// From a host's death until the directory stops naming it.
    pub gone: Delays,
    /// Changes or deaths not reflected within 4 × the bound (should be 0).
    pub timeouts: usize,
    /// Events the fault injection lost.
    pub lost_events: u64,
}

/// Reproducible pseudo-random numbers: BLAKE3 of (seed, counter).
#[derive(Debug, Clone)]
struct Rng {
    seed: u64,
    n: u64,
}

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.n += 1;
        let mut h = blake3::Hasher::new();
        h.update(&self.seed.to_le_bytes());
        h.update(&self.n.to_le_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(b) % n.max(1)
    }
}

/// Polls `dir` from now until it names `host` as a holder of `digest` (`present`) or
/// no longer does (`!present`), starting fine (1 ms) and backing off (10 ms after
/// 100 ms, 100 ms after 1 s); returns the delay, or `None` past `limit`. Error of the
/// figure: at most 10% of it (1 ms below 10 ms).
async fn time_until(
    limit: Duration,
    dir: &dyn Directory,
    digest: xfer_store::Digest,
    host: &str,
    present: bool,
) -> Option<Duration> {
    let t0 = tokio::time::Instant::now();
    loop {
        if let Ok(a) = dir.holders(&[digest]).await {
            if a.names_of(0).contains(&host) == present {
                return Some(t0.elapsed());
            }
        }
        let e = t0.elapsed();
        if e > limit {
            return None;
        }
        let step = if e < Duration::from_millis(100) {
            Duration::from_millis(1)
        } else if e < Duration::from_secs(1) {
            Duration::from_millis(10)
        } else {
            Duration::from_millis(100)
        };
        tokio::time::sleep(step).await;
    }
}

/// Measures mode `cfg`'s staleness on a simulated cluster: random changes at random
/// times on random hosts, each timed until the destination's answer reflects it;
/// then hosts killed one by one. Run it on a runtime with paused time
/// (`start_paused`): the periods are the real ones, the run takes milliseconds.
pub async fn measure_staleness(cfg: &ModeConfig, opts: &StalenessOpts) -> StalenessReport {
    use crate::clock::TokioClock;
    use crate::inventory::MemInventory;
    use crate::store::EmbeddedStore;
    use crate::Timestamp;
    use xfer_store::Digest;

    let clock: Arc<dyn Clock> =
        Arc::new(TokioClock::starting_at(Timestamp::from_secs(1_800_000_000)));
    let transport = Arc::new(LocalTransport::new(opts.delay));
    let mut rng = Rng {
        seed: opts.seed,
        n: 0,
    };
    let mut next_digest = 0u64;
    let mut fresh = || {
        next_digest += 1;
        Digest::of(&next_digest.to_le_bytes())
    };
    let mut invs = Vec::new();
    let mut held: Vec<Vec<Digest>> = Vec::new();
    for i in 0..opts.hosts {
        let inv = Arc::new(MemInventory::new(format!("n{i}"), clock.clone()));
        let ds: Vec<Digest> = (0..100).map(|_| fresh()).collect();
        inv.add(&ds);
        transport.add(inv.clone());
        invs.push(inv);
        held.push(ds);
    }
    let ttl = match cfg {
        ModeConfig::CentralPush(p) => Some(p.host_ttl),
        _ => None,
    };
    let store: Arc<dyn KbStore> = Arc::new(EmbeddedStore::in_memory(ttl));
    let dyn_hosts: Vec<Arc<dyn Inventory>> = invs
        .iter()
        .map(|i| i.clone() as Arc<dyn Inventory>)
        .collect();
    let names: Vec<HostName> = invs.iter().map(|i| i.host().to_owned()).collect();
    let dep = deploy(
        cfg,
        store,
        transport.clone(),
        &dyn_hosts,
        names.clone(),
        clock,
        opts.delay,
    );
    transport.faults().set_loss_rate(opts.loss_rate);
    if let Some(s) = &dep.sink {
        s.faults().set_loss_rate(opts.loss_rate);
    }
    let dir = dep.directory.clone();
    tokio::time::sleep(cfg.window() + Duration::from_secs(1)).await;

    let limit = 4 * cfg.window().max(cfg.gone_window());
    let mut timeouts = 0;
    let mut changes = Vec::new();
    for k in 0..opts.samples {
        let gap = rng.below(opts.max_gap.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let h = rng.below(opts.hosts as u64) as usize;
        let (digest, present) = match k % 3 {
            0 => {
                let dg = fresh();
                invs[h].add(&[dg]);
                held[h].push(dg);
                (dg, true)
            }
            r => {
                if held[h].is_empty() {
                    continue;
                }
                let i = rng.below(held[h].len() as u64) as usize;
                let dg = held[h].swap_remove(i);
                if r == 1 {
                    invs[h].remove(&[dg]);
                } else {
                    invs[h].evict(&[dg]);
                }
                (dg, false)
            }
        };
        let t = time_until(limit, &*dir, digest, &names[h], present).await;
        match t {
            Some(t) => changes.push(t),
            None => timeouts += 1,
        }
    }
    let mut gone = Vec::new();
    for h in 0..opts.kills.min(opts.hosts) {
        let gap = rng.below(opts.max_gap.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let Some(&probe_digest) = held[h].first() else {
            continue;
        };
        transport.set_down(&names[h], true);
        if let Some(s) = &dep.sink {
            s.faults().silence(&names[h], true);
        }
        let t = time_until(limit, &*dir, probe_digest, &names[h], false).await;
        match t {
            Some(t) => gone.push(t),
            None => timeouts += 1,
        }
    }
    let lost_events =
        transport.faults().lost() + dep.sink.as_ref().map_or(0, |s| s.faults().lost());
    StalenessReport {
        mode: cfg.kind(),
        window: cfg.window(),
        gone_window: cfg.gone_window(),
        change: Delays::of(changes),
        gone: Delays::of(gone),
        timeouts,
        lost_events,
    }
}
