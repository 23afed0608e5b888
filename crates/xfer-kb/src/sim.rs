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
            let (st, ck, period) = (store.clone(), clock.clone(), p.heartbeat);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if let Err(e) = st.expire(ck.now()).await {
                        tracing::error!(error = %e, "expiring hosts failed");
                    }
                }
            }));
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
