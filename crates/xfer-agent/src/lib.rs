//! `xfer-agent`: the node agent `xferd` and the API to embed or drive it.
//!
//! * [`node::Node`] is one node's agent; [`serve`] runs it as a gRPC server.
//! * [`client::Client`] is the embeddable client API: run containers, list them,
//!   and migrate one to another node.
//!
//! ```no_run
//! # async fn demo() -> Result<(), xfer_agent::error::AgentError> {
//! use xfer_agent::client::{Client, Mode};
//!
//! // The source node's agent drives the migration; the destination is another agent.
//! let mut src = Client::connect("http://10.77.0.1:7070").await?;
//! let report = src
//!     .migrate("redis", "http://10.77.0.2:7070", Mode::Cold, |phase| {
//!         println!("{} took {} us", phase.name, phase.micros);
//!     })
//!     .await?;
//! println!("downtime {} us, {} bytes", report.downtime_micros, report.bytes_sent);
//! # Ok(()) }
//! ```

pub mod client;
pub mod error;
pub mod images;
pub mod migrate;
pub mod node;
pub mod transfer;

use std::net::SocketAddr;

use xfer_proto::v1::agent_server::AgentServer;

/// Largest gRPC message the agents exchange (a chunk is at most 1 MiB compressed).
pub const MAX_MESSAGE: usize = 64 << 20;

/// Serves `node` on `addr` until `shutdown` completes.
pub async fn serve(
    node: node::Node,
    addr: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(
            AgentServer::new(node)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_shutdown(addr, shutdown)
        .await
}
