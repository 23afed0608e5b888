//! How the modes reach hosts and the knowledge base: [`Transport`] (a destination or
//! the knowledge base calling a host) and [`KbSink`] (a host pushing to the knowledge
//! base). The agent implements both over gRPC; [`LocalTransport`] and [`LossySink`]
//! are in-process implementations with fault injection (hosts down, events lost,
//! one-way delay) for tests and simulations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};
use xfer_store::Digest;

use crate::inventory::Inventory;
use crate::model::{Applied, FullInventory, HostEvent, HostStatus, Snapshot, SnapshotQuery};
use crate::KbError;

/// Calls on a host (pull, query, subscribe).
#[async_trait]
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// The host's full inventory.
    async fn full(&self, host: &str) -> Result<FullInventory, KbError>;
    /// The host's sequence number, load and links.
    async fn status(&self, host: &str) -> Result<HostStatus, KbError>;
    /// Whether the host holds each digest (the chunk service's `Have`).
    async fn have(&self, host: &str, digests: &[Digest]) -> Result<Vec<bool>, KbError>;
    /// The host's snapshots matching `q`.
    async fn snapshots(&self, host: &str, q: &SnapshotQuery) -> Result<Vec<Snapshot>, KbError>;
    /// The host's change events from now on; the channel closes when the host goes.
    async fn subscribe(&self, host: &str) -> Result<mpsc::Receiver<HostEvent>, KbError>;
}

/// Where a host pushes its changes (central push mode).
#[async_trait]
pub trait KbSink: Send + Sync + std::fmt::Debug {
    /// One change event (or heartbeat); the answer says whether a full inventory is
    /// needed. A push is one-way as far as loss goes: a lost event is not reported,
    /// the next event or heartbeat finds the gap.
    async fn push_event(&self, ev: &HostEvent) -> Result<Applied, KbError>;
    /// A full inventory.
    async fn push_full(&self, inv: &FullInventory) -> Result<(), KbError>;
}

/// Which messages get lost: a deterministic pseudo-random fraction of events
/// (`loss_rate`), and the next `n` events of a host on demand.
#[derive(Debug, Default)]
pub struct Faults {
    inner: Mutex<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    rate: f64,
    silenced: HashSet<String>,
    next: HashMap<String, u32>,
    lost: u64,
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loses this fraction of events (0..=1), heartbeats included.
    pub fn set_loss_rate(&self, rate: f64) {
        self.lock().rate = rate.clamp(0.0, 1.0);
    }

    /// Loses the next `n` events of `host`.
    pub fn lose_next(&self, host: &str, n: u32) {
        *self.lock().next.entry(host.to_owned()).or_default() += n;
    }

    /// Loses everything from `host` (full inventories too): the host is dead as far
    /// as the knowledge base can tell. `false` undoes it.
    pub fn silence(&self, host: &str, silent: bool) {
        let mut st = self.lock();
        if silent {
            st.silenced.insert(host.to_owned());
        } else {
            st.silenced.remove(host);
        }
    }

    /// Whether `host` is silenced.
    pub fn is_silenced(&self, host: &str) -> bool {
        self.lock().silenced.contains(host)
    }

    /// Events lost so far (not counting silenced hosts).
    pub fn lost(&self) -> u64 {
        self.lock().lost
    }

    /// Whether `ev` is lost (counts it if so).
    pub fn lose(&self, ev: &HostEvent) -> bool {
        let mut st = self.lock();
        if st.silenced.contains(&ev.host) {
            return true;
        }
        if let Some(n) = st.next.get_mut(&ev.host) {
            if *n > 0 {
                *n -= 1;
                st.lost += 1;
                return true;
            }
        }
        if st.rate <= 0.0 {
            return false;
        }
        let h = blake3::hash(
            format!("{}/{}/{}/{:?}", ev.host, ev.seq, ev.at, ev.change.name()).as_bytes(),
        );
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        let x = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
        let lost = x < st.rate;
        if lost {
            st.lost += 1;
        }
        lost
    }
}

/// An in-process [`Transport`] over [`Inventory`]s, with a one-way delay, hosts that
/// can be taken down, and lossy event streams.
#[derive(Debug)]
pub struct LocalTransport {
    hosts: RwLock<HashMap<String, Arc<dyn Inventory>>>,
    down: Arc<RwLock<HashSet<String>>>,
    delay: Duration,
    faults: Arc<Faults>,
}

impl LocalTransport {
    /// A transport whose every message takes `delay` (a call: 2 × `delay`).
    pub fn new(delay: Duration) -> Self {
        LocalTransport {
            hosts: RwLock::default(),
            down: Arc::default(),
            delay,
            faults: Arc::new(Faults::default()),
        }
    }

    /// Makes `inv` reachable under its host name.
    pub fn add(&self, inv: Arc<dyn Inventory>) {
        self.hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(inv.host().to_owned(), inv);
    }

    /// Takes a host down (calls fail, its event streams close) or brings it back.
    pub fn set_down(&self, host: &str, down: bool) {
        let mut d = self.down.write().unwrap_or_else(|p| p.into_inner());
        if down {
            d.insert(host.to_owned());
        } else {
            d.remove(host);
        }
    }

    /// Loss applied to event streams.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// The inventory of `host` if it is up (no delay).
    fn reach_now(&self, host: &str) -> Result<Arc<dyn Inventory>, KbError> {
        if is_down(&self.down, host) {
            return Err(KbError::Reach {
                host: host.to_owned(),
                what: "host is down".into(),
            });
        }
        let inv = self
            .hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .cloned();
        inv.ok_or_else(|| KbError::Reach {
            host: host.to_owned(),
            what: "unknown host".into(),
        })
    }
}

fn is_down(down: &RwLock<HashSet<String>>, host: &str) -> bool {
    down.read()
        .unwrap_or_else(|p| p.into_inner())
        .contains(host)
}

#[async_trait]
impl Transport for LocalTransport {
    async fn full(&self, host: &str) -> Result<FullInventory, KbError> {
        // The inventory is taken when the request arrives, then travels back.
        tokio::time::sleep(self.delay).await;
        let inv = self.reach_now(host)?.full();
        tokio::time::sleep(self.delay).await;
        Ok(inv)
    }

    async fn status(&self, host: &str) -> Result<HostStatus, KbError> {
        tokio::time::sleep(self.delay).await;
        let st = self.reach_now(host)?.status();
        tokio::time::sleep(self.delay).await;
        Ok(st)
    }

    async fn have(&self, host: &str, digests: &[Digest]) -> Result<Vec<bool>, KbError> {
        tokio::time::sleep(self.delay).await;
        let v = self.reach_now(host)?.have(digests);
        tokio::time::sleep(self.delay).await;
        Ok(v)
    }

    async fn snapshots(&self, host: &str, q: &SnapshotQuery) -> Result<Vec<Snapshot>, KbError> {
        tokio::time::sleep(self.delay).await;
        let v = self.reach_now(host)?.snapshots(q);
        tokio::time::sleep(self.delay).await;
        Ok(v)
    }

    async fn subscribe(&self, host: &str) -> Result<mpsc::Receiver<HostEvent>, KbError> {
        tokio::time::sleep(self.delay).await;
        let mut rx = self.reach_now(host)?.subscribe();
        tokio::time::sleep(self.delay).await;
        let (tx, out) = mpsc::channel(1024);
        let faults = self.faults.clone();
        let delay = self.delay;
        let host = host.to_owned();
        let down = self.down.clone();
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(%host, lost = n, "subscriber lagged");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if is_down(&down, &host) {
                    break;
                }
                if faults.lose(&ev) {
                    continue;
                }
                tokio::time::sleep(delay).await;
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
        });
        Ok(out)
    }
}

/// A [`KbSink`] that delays every push by a one-way `delay` and loses events as its
/// [`Faults`] say (full inventories always arrive: they are the repair).
#[derive(Debug)]
pub struct LossySink {
    inner: Arc<dyn KbSink>,
    delay: Duration,
    faults: Arc<Faults>,
}

impl LossySink {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn KbSink>, delay: Duration) -> Self {
        LossySink {
            inner,
            delay,
            faults: Arc::new(Faults::default()),
        }
    }

    /// The loss applied to events.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }
}

#[async_trait]
impl KbSink for LossySink {
    async fn push_event(&self, ev: &HostEvent) -> Result<Applied, KbError> {
        tokio::time::sleep(self.delay).await;
        if self.faults.lose(ev) {
            // One-way loss: the host hears nothing wrong.
            return Ok(Applied::Applied);
        }
        let r = self.inner.push_event(ev).await;
        tokio::time::sleep(self.delay).await;
        r
    }

    async fn push_full(&self, inv: &FullInventory) -> Result<(), KbError> {
        tokio::time::sleep(self.delay).await;
        if self.faults.is_silenced(&inv.host) {
            return Err(KbError::Reach {
                host: inv.host.clone(),
                what: "knowledge base unreachable".into(),
            });
        }
        let r = self.inner.push_full(inv).await;
        tokio::time::sleep(self.delay).await;
        r
    }
}
