//! The `Kb` gRPC service: a host's side (status, inventory, its snapshots, its event
//! stream) on every agent, and the knowledge base's side (push targets, holder and
//! snapshot queries) on the agent acting as the knowledge base; bindings published by
//! home agents and queries of them on every agent that keeps them.

use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status};
use xfer_kb::{Clock, Directory, Inventory, KbSink, KbStore};
use xfer_proto::v1 as pb;
use xfer_proto::v1::kb_server::{Kb, KbServer};

use super::wire;
use crate::error::AgentError;

/// The knowledge base's side, present on the agent acting as it (modes a and b).
#[derive(Debug, Clone)]
pub struct Central {
    /// Where pushed events and full updates go (mode b; `None` in mode a).
    pub sink: Option<Arc<dyn KbSink>>,
    /// What destinations ask.
    pub directory: Arc<dyn Directory>,
}

/// The service.
#[derive(Debug, Clone)]
pub struct KbService {
    inventory: Arc<dyn Inventory>,
    central: Option<Central>,
    /// Where home agents' bindings published to this host are kept.
    bindings: Option<(Arc<dyn KbStore>, Arc<dyn Clock>)>,
}

fn status(e: AgentError) -> Status {
    match e {
        AgentError::DecodeKb { .. } => Status::invalid_argument(e.to_string()),
        e => e.to_status(),
    }
}

fn kb_status(e: xfer_kb::KbError) -> Status {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Status::unavailable(msg)
}

impl KbService {
    pub fn new(inventory: Arc<dyn Inventory>, central: Option<Central>) -> Self {
        KbService {
            inventory,
            central,
            bindings: None,
        }
    }

    /// This service keeping home agents' bindings in `store` (`None`: it keeps none).
    pub fn with_bindings(mut self, store: Option<Arc<dyn KbStore>>, clock: Arc<dyn Clock>) -> Self {
        self.bindings = store.map(|s| (s, clock));
        self
    }

    fn bindings(&self) -> Result<(&Arc<dyn KbStore>, xfer_kb::Timestamp), Status> {
        let (s, c) = self.bindings.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "host {} keeps no bindings (in the central modes the knowledge base host does)",
                self.inventory.host()
            ))
        })?;
        Ok((s, c.now()))
    }

    pub fn into_server(self) -> KbServer<Self> {
        KbServer::new(self)
            .max_decoding_message_size(crate::MAX_MESSAGE)
            .max_encoding_message_size(crate::MAX_MESSAGE)
    }

    fn central(&self) -> Result<&Central, Status> {
        self.central.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "host {} is not the knowledge base",
                self.inventory.host()
            ))
        })
    }
}

#[tonic::async_trait]
impl Kb for KbService {
    async fn status(&self, req: Request<pb::KbRequest>) -> Result<Response<pb::KbStatus>, Status> {
        wire::version(req.get_ref().version).map_err(status)?;
        Ok(Response::new(wire::status_to(&self.inventory.status())))
    }

    async fn inventory(&self, req: Request<pb::KbRequest>) -> Result<Response<pb::KbFull>, Status> {
        wire::version(req.get_ref().version).map_err(status)?;
        let inv = self.inventory.clone();
        let full = tokio::task::spawn_blocking(move || inv.full())
            .await
            .map_err(|e| Status::internal(format!("inventory task: {e}")))?;
        Ok(Response::new(wire::full_to(&full)))
    }

    async fn host_snapshots(
        &self,
        req: Request<pb::KbSnapshotQuery>,
    ) -> Result<Response<pb::KbSnapshotList>, Status> {
        let q = wire::query_from(req.get_ref()).map_err(status)?;
        Ok(Response::new(pb::KbSnapshotList {
            snapshots: self
                .inventory
                .snapshots(&q)
                .iter()
                .map(wire::snapshot_to)
                .collect(),
        }))
    }

    type SubscribeStream = futures::stream::BoxStream<'static, Result<pb::KbEvent, Status>>;

    async fn subscribe(
        &self,
        req: Request<pb::KbRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        wire::version(req.get_ref().version).map_err(status)?;
        let rx = self.inventory.subscribe();
        // A subscriber that lags behind loses events: the stream ends, and the
        // subscriber resynchronises (full inventory) when it subscribes again.
        let s = futures::stream::unfold(rx, |mut rx| async move {
            let ev = rx.recv().await.ok()?;
            Some((Ok(wire::event_to(&ev)), rx))
        });
        Ok(Response::new(s.boxed()))
    }

    async fn push_event(
        &self,
        req: Request<pb::KbPushEvent>,
    ) -> Result<Response<pb::KbPushEventReply>, Status> {
        let r = req.get_ref();
        wire::version(r.version).map_err(status)?;
        let sink = self.central()?.sink.clone().ok_or_else(|| {
            Status::failed_precondition("the knowledge base does not take pushes in this mode")
        })?;
        let ev = wire::event_from(
            r.event
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("push without an event"))?,
        )
        .map_err(status)?;
        let applied = sink.push_event(&ev).await.map_err(kb_status)?;
        Ok(Response::new(wire::applied_to(applied)))
    }

    async fn push_full(
        &self,
        req: Request<pb::KbPushFull>,
    ) -> Result<Response<pb::KbPushFullReply>, Status> {
        let r = req.get_ref();
        wire::version(r.version).map_err(status)?;
        let sink = self.central()?.sink.clone().ok_or_else(|| {
            Status::failed_precondition("the knowledge base does not take pushes in this mode")
        })?;
        let full = wire::full_from(
            r.full
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("push without an inventory"))?,
        )
        .map_err(status)?;
        sink.push_full(&full).await.map_err(kb_status)?;
        Ok(Response::new(pb::KbPushFullReply {}))
    }

    async fn holders(
        &self,
        req: Request<pb::KbHoldersRequest>,
    ) -> Result<Response<pb::KbHoldersReply>, Status> {
        let r = req.get_ref();
        wire::version(r.version).map_err(status)?;
        let ids = wire::digests(&r.digests, "digests").map_err(status)?;
        let a = self
            .central()?
            .directory
            .holders(&ids)
            .await
            .map_err(kb_status)?;
        Ok(Response::new(wire::holders_to(&a)))
    }

    async fn find_snapshots(
        &self,
        req: Request<pb::KbSnapshotQuery>,
    ) -> Result<Response<pb::KbSnapshotsReply>, Status> {
        let q = wire::query_from(req.get_ref()).map_err(status)?;
        let a = self
            .central()?
            .directory
            .snapshots(&q)
            .await
            .map_err(kb_status)?;
        Ok(Response::new(wire::snapshots_to(&a)))
    }

    async fn change_binding(
        &self,
        req: Request<pb::KbBindingChange>,
    ) -> Result<Response<pb::KbBindingChangeReply>, Status> {
        let op = wire::binding_change_from(req.get_ref()).map_err(status)?;
        let (store, now) = self.bindings()?;
        let r = super::bindings::apply_local(&**store, &op, now)
            .await
            .map_err(kb_status)?;
        tracing::debug!(?op, outcome = ?r, "binding change");
        Ok(Response::new(wire::binding_reply_to(r)))
    }

    async fn replace_bindings(
        &self,
        req: Request<pb::KbReplaceBindings>,
    ) -> Result<Response<pb::KbReplaceBindingsReply>, Status> {
        let r = req.get_ref();
        wire::version(r.version).map_err(status)?;
        if r.bindings.len() > wire::MAX_ITEMS {
            return Err(Status::invalid_argument("too many bindings"));
        }
        let list = r
            .bindings
            .iter()
            .map(wire::binding_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(status)?;
        if let Some(b) = list.iter().find(|b| b.home_agent != r.home_agent) {
            return Err(Status::invalid_argument(format!(
                "a full update of {}'s bindings names home agent {} for {}",
                r.home_agent, b.home_agent, b.home
            )));
        }
        let (store, now) = self.bindings()?;
        store
            .replace_bindings(&r.home_agent, &list, now)
            .await
            .map_err(kb_status)?;
        tracing::debug!(home_agent = %r.home_agent, bindings = list.len(), "bindings replaced");
        Ok(Response::new(pb::KbReplaceBindingsReply {}))
    }

    async fn bindings(
        &self,
        req: Request<pb::KbBindingsQuery>,
    ) -> Result<Response<pb::KbBindingList>, Status> {
        let q = wire::bindings_query_from(req.get_ref()).map_err(status)?;
        let (store, now) = self.bindings()?;
        let list = store.bindings(&q, now).await.map_err(kb_status)?;
        Ok(Response::new(pb::KbBindingList {
            at_millis: now.as_millis(),
            bindings: list.iter().map(wire::binding_to).collect(),
        }))
    }
}
