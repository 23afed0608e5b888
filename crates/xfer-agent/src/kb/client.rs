//! Thin gRPC clients of the `Kb` service: [`GrpcTransport`] (a destination or the
//! knowledge base calling hosts; `have` is the chunk service's `Have`), [`GrpcSink`]
//! (a host pushing to the knowledge base) and [`RemoteDirectory`] (a destination
//! asking the knowledge base).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use xfer_kb::{
    Applied, Directory, FullInventory, HoldersAnswer, HostEvent, HostStatus, KbError, KbSink,
    ModeKind, Snapshot, SnapshotQuery, SnapshotsAnswer, Transport,
};
use xfer_proto::v1 as pb;
use xfer_proto::v1::kb_client::KbClient;
use xfer_store::Digest;

use super::wire;
use crate::chunks::ChunkPeer;
use crate::error::AgentError;
use crate::tls::TlsFiles;

/// A channel to `endpoint` that connects on first use and reconnects after failures
/// (so a neighbour that is down now is tried again at the next call).
pub fn lazy_channel(endpoint: &str, tls: Option<&TlsFiles>) -> Result<Channel, AgentError> {
    Ok(crate::migrate::agent_endpoint(endpoint, tls)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy())
}

fn reach(host: &str, what: impl std::fmt::Display) -> KbError {
    KbError::Reach {
        host: host.to_string(),
        what: what.to_string(),
    }
}

fn call(host: &str) -> impl Fn(tonic::Status) -> KbError + '_ {
    move |s| reach(host, format!("{}: {}", s.code(), s.message()))
}

fn decode(host: &str) -> impl Fn(AgentError) -> KbError + '_ {
    move |e| reach(host, e)
}

fn req() -> pb::KbRequest {
    pb::KbRequest {
        version: xfer_proto::PROTOCOL_VERSION as i32,
    }
}

/// A `Kb` client over `ch` with the agents' message limits.
pub fn kb_client(ch: Channel) -> KbClient<Channel> {
    KbClient::new(ch)
        .max_decoding_message_size(crate::MAX_MESSAGE)
        .max_encoding_message_size(crate::MAX_MESSAGE)
}

/// Hosts by name, reached over gRPC (mutual TLS when configured); channels are made
/// once per host and kept.
#[derive(Debug)]
pub struct GrpcTransport {
    endpoints: BTreeMap<String, String>,
    tls: Option<TlsFiles>,
    channels: Mutex<BTreeMap<String, Channel>>,
}

impl GrpcTransport {
    /// A transport to the hosts of `endpoints` (name -> `https://ADDR:PORT`).
    pub fn new(endpoints: BTreeMap<String, String>, tls: Option<TlsFiles>) -> Self {
        GrpcTransport {
            endpoints,
            tls,
            channels: Mutex::default(),
        }
    }

    /// The endpoint of `host`, if known.
    pub fn endpoint(&self, host: &str) -> Option<&str> {
        self.endpoints.get(host).map(String::as_str)
    }

    /// The hosts this transport knows.
    pub fn endpoints(&self) -> &BTreeMap<String, String> {
        &self.endpoints
    }

    /// The (lazy) channel to `host`.
    pub fn channel(&self, host: &str) -> Result<Channel, KbError> {
        let mut chans = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = chans.get(host) {
            return Ok(c.clone());
        }
        let ep = self
            .endpoints
            .get(host)
            .ok_or_else(|| reach(host, "no endpoint configured for this host"))?;
        let ch = lazy_channel(ep, self.tls.as_ref()).map_err(|e| reach(host, e))?;
        chans.insert(host.to_string(), ch.clone());
        Ok(ch)
    }

    /// A chunk peer for `host` over the same channel.
    pub fn chunk_peer(&self, host: &str) -> Result<Arc<dyn ChunkPeer>, KbError> {
        let ch = self.channel(host)?;
        Ok(Arc::new(crate::chunks::GrpcPeer::new(
            self.endpoints.get(host).cloned().unwrap_or_default(),
            ch,
        )))
    }

    fn kb(&self, host: &str) -> Result<KbClient<Channel>, KbError> {
        Ok(kb_client(self.channel(host)?))
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    async fn full(&self, host: &str) -> Result<FullInventory, KbError> {
        let r = self
            .kb(host)?
            .inventory(req())
            .await
            .map_err(call(host))?
            .into_inner();
        let full = wire::full_from(&r).map_err(decode(host))?;
        if full.host != host {
            return Err(reach(host, format!("answered as host {}", full.host)));
        }
        Ok(full)
    }

    async fn status(&self, host: &str) -> Result<HostStatus, KbError> {
        let r = self
            .kb(host)?
            .status(req())
            .await
            .map_err(call(host))?
            .into_inner();
        wire::status_from(&r).map_err(decode(host))
    }

    async fn have(&self, host: &str, digests: &[Digest]) -> Result<Vec<bool>, KbError> {
        let peer = self.chunk_peer(host)?;
        let (bits, _load) = peer
            .have(digests.to_vec())
            .await
            .map_err(|e| reach(host, e))?;
        Ok(bits)
    }

    async fn snapshots(&self, host: &str, q: &SnapshotQuery) -> Result<Vec<Snapshot>, KbError> {
        let r = self
            .kb(host)?
            .host_snapshots(wire::query_to(q))
            .await
            .map_err(call(host))?
            .into_inner();
        r.snapshots
            .iter()
            .map(|s| wire::snapshot_from(s).map_err(decode(host)))
            .collect()
    }

    async fn subscribe(&self, host: &str) -> Result<mpsc::Receiver<HostEvent>, KbError> {
        let mut stream = self
            .kb(host)?
            .subscribe(req())
            .await
            .map_err(call(host))?
            .into_inner();
        let (tx, rx) = mpsc::channel(1024);
        let host = host.to_string();
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                match wire::event_from(&m) {
                    Ok(ev) if ev.host == host => {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                    Ok(ev) => {
                        tracing::warn!(%host, other = %ev.host, "event of another host on a subscription: closing it");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(%host, error = %e, "malformed event: closing the subscription");
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// [`GrpcTransport`] that answers calls about its own host from that host's
/// inventory, without the network: the knowledge base pulling every host (mode a)
/// includes itself, also before its own server serves.
#[derive(Debug)]
pub struct SelfFirst {
    pub me: Arc<dyn xfer_kb::Inventory>,
    pub remote: Arc<GrpcTransport>,
}

#[async_trait]
impl Transport for SelfFirst {
    async fn full(&self, host: &str) -> Result<FullInventory, KbError> {
        if host != self.me.host() {
            return self.remote.full(host).await;
        }
        let me = self.me.clone();
        tokio::task::spawn_blocking(move || me.full())
            .await
            .map_err(|e| reach(host, format!("inventory task: {e}")))
    }

    async fn status(&self, host: &str) -> Result<HostStatus, KbError> {
        if host != self.me.host() {
            return self.remote.status(host).await;
        }
        Ok(self.me.status())
    }

    async fn have(&self, host: &str, digests: &[Digest]) -> Result<Vec<bool>, KbError> {
        if host != self.me.host() {
            return self.remote.have(host, digests).await;
        }
        Ok(self.me.have(digests))
    }

    async fn snapshots(&self, host: &str, q: &SnapshotQuery) -> Result<Vec<Snapshot>, KbError> {
        if host != self.me.host() {
            return self.remote.snapshots(host, q).await;
        }
        Ok(self.me.snapshots(q))
    }

    async fn subscribe(&self, host: &str) -> Result<mpsc::Receiver<HostEvent>, KbError> {
        if host != self.me.host() {
            return self.remote.subscribe(host).await;
        }
        let mut rx = self.me.subscribe();
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(ev) = rx.recv().await {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        });
        Ok(out)
    }
}

/// A host's path to the knowledge base (central push).
#[derive(Debug, Clone)]
pub struct GrpcSink {
    kb_host: String,
    client: KbClient<Channel>,
}

impl GrpcSink {
    pub fn new(kb_host: impl Into<String>, channel: Channel) -> Self {
        GrpcSink {
            kb_host: kb_host.into(),
            client: kb_client(channel),
        }
    }
}

#[async_trait]
impl KbSink for GrpcSink {
    async fn push_event(&self, ev: &HostEvent) -> Result<Applied, KbError> {
        let r = self
            .client
            .clone()
            .push_event(pb::KbPushEvent {
                version: xfer_proto::PROTOCOL_VERSION as i32,
                event: Some(wire::event_to(ev)),
            })
            .await
            .map_err(call(&self.kb_host))?
            .into_inner();
        wire::applied_from(&r).map_err(decode(&self.kb_host))
    }

    async fn push_full(&self, inv: &FullInventory) -> Result<(), KbError> {
        self.client
            .clone()
            .push_full(pb::KbPushFull {
                version: xfer_proto::PROTOCOL_VERSION as i32,
                full: Some(wire::full_to(inv)),
            })
            .await
            .map_err(call(&self.kb_host))?;
        Ok(())
    }
}

/// The knowledge base as a destination asks it (modes a and b, on hosts other than
/// the knowledge base).
#[derive(Debug, Clone)]
pub struct RemoteDirectory {
    kb_host: String,
    mode: ModeKind,
    client: KbClient<Channel>,
    timeout: Duration,
}

impl RemoteDirectory {
    pub fn new(kb_host: impl Into<String>, mode: ModeKind, channel: Channel) -> Self {
        RemoteDirectory {
            kb_host: kb_host.into(),
            mode,
            client: kb_client(channel),
            timeout: Duration::from_secs(5),
        }
    }
}

#[async_trait]
impl Directory for RemoteDirectory {
    fn mode(&self) -> ModeKind {
        self.mode
    }

    async fn holders(&self, digests: &[Digest]) -> Result<HoldersAnswer, KbError> {
        let mut c = self.client.clone();
        let call_ = c.holders(pb::KbHoldersRequest {
            version: xfer_proto::PROTOCOL_VERSION as i32,
            digests: crate::chunks::wire::encode_ids(digests),
        });
        let r = tokio::time::timeout(self.timeout, call_)
            .await
            .map_err(|_| KbError::Timeout {
                op: "holders",
                host: self.kb_host.clone(),
            })?
            .map_err(call(&self.kb_host))?
            .into_inner();
        wire::holders_from(&r, digests.len()).map_err(decode(&self.kb_host))
    }

    async fn snapshots(&self, q: &SnapshotQuery) -> Result<SnapshotsAnswer, KbError> {
        let mut c = self.client.clone();
        let call_ = c.find_snapshots(wire::query_to(q));
        let r = tokio::time::timeout(self.timeout, call_)
            .await
            .map_err(|_| KbError::Timeout {
                op: "snapshots",
                host: self.kb_host.clone(),
            })?
            .map_err(call(&self.kb_host))?
            .into_inner();
        wire::snapshots_from(&r).map_err(decode(&self.kb_host))
    }
}
