//! The embeddable client API: what the `xfer` CLI uses, and what a runtime engineer
//! calls to drive agents from their own code.

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use xfer_proto::v1::agent_client::AgentClient;
use xfer_proto::v1::*;

use crate::error::AgentError;

pub use xfer_proto::v1::{ContainerInfo, MigrationReport, PhaseTiming, RoundReport};

/// Migration strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Stop-and-copy: freeze, dump, transfer, restore.
    Cold,
    /// Pre-copy rounds while the task runs (only changed pages travel), then a short
    /// cut-over.
    Precopy,
    /// Restore first, fetch memory on demand (not implemented yet).
    Postcopy,
    /// Pre-copy rounds, then post-copy (not implemented yet).
    Hybrid,
    /// Pick from the measured dirty rate and link rate (not implemented yet).
    Auto,
}

impl Mode {
    fn wire(self) -> MigrationMode {
        match self {
            Mode::Cold => MigrationMode::Cold,
            Mode::Precopy => MigrationMode::Precopy,
            Mode::Postcopy => MigrationMode::Postcopy,
            Mode::Hybrid => MigrationMode::Hybrid,
            Mode::Auto => MigrationMode::Auto,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "cold" => Mode::Cold,
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            "hybrid" => Mode::Hybrid,
            "auto" => Mode::Auto,
            _ => {
                return Err(format!(
                    "unknown mode {s:?}: use cold, precopy, postcopy, hybrid or auto"
                ))
            }
        })
    }
}

/// How to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    pub mode: Mode,
    /// Most pre-copy rounds (0 = the default, 4).
    pub max_rounds: u32,
    /// Start the cut-over once a round's delta would be fetched within this many ms
    /// (0 = the default, 100).
    pub downtime_budget_ms: u32,
    /// Test hook: fail a destination step (prepare, transfer, restore).
    pub inject_failure: String,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Precopy,
            max_rounds: 0,
            downtime_budget_ms: 0,
            inject_failure: String::new(),
        }
    }
}

/// A connection to one node's agent.
#[derive(Debug, Clone)]
pub struct Client {
    inner: AgentClient<Channel>,
    hello: HelloReply,
    volumes: Vec<Volume>,
}

impl Client {
    /// Connects to the agent at `endpoint` (e.g. `https://10.77.0.1:7070`) with mutual
    /// TLS (`tls`: the cluster CA and the operator's certificate), and checks that it
    /// speaks this build's protocol version.
    pub async fn connect(
        endpoint: &str,
        tls: Option<&crate::tls::TlsFiles>,
    ) -> Result<Self, AgentError> {
        let (inner, hello) = crate::migrate::connect_peer(endpoint, tls).await?;
        Ok(Self {
            inner,
            hello,
            volumes: Vec::new(),
        })
    }

    /// The node's name and CRIU facts, from the handshake.
    pub fn hello(&self) -> &HelloReply {
        &self.hello
    }

    /// Starts a container from an image already on the node, in the node's network
    /// namespace.
    pub async fn run(
        &mut self,
        id: &str,
        image: &str,
        args: &[String],
        env: &[String],
    ) -> Result<u32, AgentError> {
        self.run_with_address(id, image, args, env, "", "").await
    }

    /// Starts a container with its own address (`address` as CIDR, default route via
    /// `gateway`) in its own network namespace on the node's link; the address moves
    /// with the container.
    pub async fn run_with_address(
        &mut self,
        id: &str,
        image: &str,
        args: &[String],
        env: &[String],
        address: &str,
        gateway: &str,
    ) -> Result<u32, AgentError> {
        self.run_request(RunContainerRequest {
            address: address.to_string(),
            gateway: gateway.to_string(),
            network: if address.is_empty() {
                NetworkMode::Unspecified as i32
            } else {
                NetworkMode::Bridged as i32
            },
            ..run_request(id, image, args, env)
        })
        .await
    }

    /// Starts a container with a routed home address (`home`, an IPv4 address): this
    /// node becomes its home agent and forwards its traffic wherever it migrates.
    /// `reverse_tunnel`: after a migration its outbound traffic goes back through the
    /// home agent too.
    pub async fn run_routed(
        &mut self,
        id: &str,
        image: &str,
        args: &[String],
        env: &[String],
        home: std::net::Ipv4Addr,
        reverse_tunnel: bool,
    ) -> Result<u32, AgentError> {
        self.run_request(RunContainerRequest {
            address: format!("{home}/32"),
            network: NetworkMode::Routed as i32,
            reverse_tunnel,
            ..run_request(id, image, args, env)
        })
        .await
    }

    /// Volumes for the next container this client starts (then cleared).
    pub fn set_volumes(&mut self, volumes: Vec<Volume>) {
        self.volumes = volumes;
    }

    /// Starts a container as `req` says (with the volumes of [`Client::set_volumes`]).
    pub async fn run_request(&mut self, mut req: RunContainerRequest) -> Result<u32, AgentError> {
        if req.volumes.is_empty() {
            req.volumes = std::mem::take(&mut self.volumes);
        }
        let r = self
            .inner
            .run_container(req)
            .await
            .map_err(|status| AgentError::Peer {
                step: Step::Validate,
                status,
            })?;
        Ok(r.into_inner().pid)
    }

    /// The bindings this node holds as home agent, then every change (see
    /// [`crate::rebind`]).
    pub async fn watch_bindings(&mut self) -> Result<tonic::Streaming<BindingEvent>, AgentError> {
        let r = self
            .inner
            .watch_bindings(WatchBindingsRequest {
                version: xfer_proto::PROTOCOL_VERSION as i32,
            })
            .await
            .map_err(|status| AgentError::Remote { status })?;
        Ok(r.into_inner())
    }

    /// The home agents' bindings kept by the agent at `endpoint` (the knowledge base
    /// host in the central modes; in modes c-e every host keeps its neighbours'),
    /// with that agent's clock (for "expires in").
    pub async fn kb_bindings(
        endpoint: &str,
        tls: Option<&crate::tls::TlsFiles>,
        query: &xfer_kb::BindingQuery,
    ) -> Result<(xfer_kb::Timestamp, Vec<xfer_kb::BindingRecord>), AgentError> {
        let ch = crate::kb::client::lazy_channel(endpoint, tls)?;
        let r = crate::kb::client::kb_client(ch)
            .bindings(crate::kb::wire::bindings_query_to(query))
            .await
            .map_err(|status| AgentError::Remote { status })?
            .into_inner();
        Ok((
            xfer_kb::Timestamp::from_millis(r.at_millis),
            crate::kb::wire::bindings_from(&r)?,
        ))
    }

    /// Lists the node's containers.
    pub async fn list(&mut self) -> Result<Vec<ContainerInfo>, AgentError> {
        let r = self
            .inner
            .list_containers(ListContainersRequest {})
            .await
            .map_err(|status| AgentError::Peer {
                step: Step::Validate,
                status,
            })?;
        Ok(r.into_inner().containers)
    }

    /// Kills and removes a container.
    pub async fn remove(&mut self, id: &str) -> Result<(), AgentError> {
        self.inner
            .remove_container(RemoveContainerRequest { id: id.to_string() })
            .await
            .map_err(|status| AgentError::Peer {
                step: Step::CleanupSource,
                status,
            })?;
        Ok(())
    }

    /// Migrates container `id` from this node to the agent at `destination`,
    /// calling `on_phase` as each phase completes.
    pub async fn migrate(
        &mut self,
        id: &str,
        destination: &str,
        mode: Mode,
        on_phase: impl FnMut(&PhaseTiming),
    ) -> Result<MigrationReport, AgentError> {
        self.migrate_with(id, destination, mode, "", on_phase).await
    }

    /// [`Client::migrate`] with a failure injected at a destination step
    /// (`prepare`, `transfer` or `restore`); for tests of rollback.
    pub async fn migrate_with(
        &mut self,
        id: &str,
        destination: &str,
        mode: Mode,
        inject_failure: &str,
        on_phase: impl FnMut(&PhaseTiming),
    ) -> Result<MigrationReport, AgentError> {
        let opts = MigrateOptions {
            mode,
            inject_failure: inject_failure.to_string(),
            ..Default::default()
        };
        self.migrate_opts(id, destination, &opts, on_phase).await
    }

    /// [`Client::migrate`] with every option.
    pub async fn migrate_opts(
        &mut self,
        id: &str,
        destination: &str,
        opts: &MigrateOptions,
        mut on_phase: impl FnMut(&PhaseTiming),
    ) -> Result<MigrationReport, AgentError> {
        let mut stream = self
            .inner
            .migrate(MigrateRequest {
                version: xfer_proto::PROTOCOL_VERSION as i32,
                container_id: id.to_string(),
                destination: destination.to_string(),
                mode: opts.mode.wire() as i32,
                inject_failure: opts.inject_failure.clone(),
                max_rounds: opts.max_rounds,
                downtime_budget_ms: opts.downtime_budget_ms,
            })
            .await
            .map_err(|status| AgentError::Peer {
                step: Step::Validate,
                status,
            })?
            .into_inner();
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(|status| AgentError::Remote { status })?;
            match ev.event {
                Some(migrate_event::Event::Phase(p)) => on_phase(&p),
                Some(migrate_event::Event::Report(r)) => return Ok(r),
                None => {}
            }
        }
        Err(AgentError::StreamClosed)
    }
}

/// A request to run `args` from `image` as container `id`, in the host's namespace.
fn run_request(id: &str, image: &str, args: &[String], env: &[String]) -> RunContainerRequest {
    RunContainerRequest {
        id: id.to_string(),
        image: image.to_string(),
        args: args.to_vec(),
        env: env.to_vec(),
        ..Default::default()
    }
}
