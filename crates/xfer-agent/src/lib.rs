//! `xfer-agent`: the node agent `xferd` and the API to embed or drive it.
//!
//! * [`node::Node`] is one node's agent; [`serve`] runs it as a gRPC server.
//! * [`client::Client`] is the embeddable client API: run containers, list them,
//!   and migrate one to another node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), xfer_agent::error::AgentError> {
//! use xfer_agent::client::{Client, Mode};
//! use xfer_agent::tls::TlsFiles;
//!
//! // The source node's agent drives the migration; the destination is another agent.
//! // The cluster CA, the operator's certificate and key (mutual TLS).
//! let tls = TlsFiles::in_dir(std::path::Path::new("/etc/xfer/tls"), "operator");
//! let mut src = Client::connect("https://10.77.0.1:7070", Some(&tls)).await?;
//! let report = src
//!     .migrate("redis", "https://10.77.0.2:7070", Mode::Cold, |phase| {
//!         println!("{} took {} us", phase.name, phase.micros);
//!     })
//!     .await?;
//! println!("downtime {} us, {} bytes", report.downtime_micros, report.bytes_sent);
//! # Ok(()) }
//! ```

pub mod chunks;
pub mod client;
pub mod error;
pub mod handover;
pub mod images;
pub mod kb;
pub mod layers;
pub mod migrate;
pub mod netctl;
pub mod node;
pub mod rebind;
pub mod snapshots;
pub mod sync;
pub mod tls;
pub mod transfer;
pub mod volumes;

use std::net::SocketAddr;

use xfer_proto::v1::agent_server::AgentServer;

/// HTTP/2 keep-alive between agents: how often to ping, and how long to wait for the
/// answer before the connection (and every call on it) fails.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(3);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest gRPC message the agents exchange (a chunk is at most 1 MiB compressed).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Serves `node` on `addr` until `shutdown` completes; with `tls`, only peers with a
/// certificate of the cluster CA get through the handshake.
pub async fn serve(
    node: node::Node,
    addr: SocketAddr,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(t) = tls {
        builder = builder.tls_config(t)?;
    }
    let chunks = chunks::ChunkService::new(node.store().clone());
    let kb = node.kb().cloned();
    let kb_service = kb.as_ref().map(|k| k.service().into_server());
    let meter = chunks.meter();
    // The chunk service's load becomes the host's published load.
    let _load = kb.map(|k| {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                let l = meter.load();
                k.report_load(l.fetch_streams, l.served_bytes_per_sec);
            }
        });
        AbortOnDrop(task.abort_handle())
    });
    builder
        .add_optional_service(kb_service)
        .add_service(chunks.into_server())
        .add_service(
            AgentServer::new(node)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_shutdown(addr, shutdown)
        .await
}

/// Aborts a task when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
