//! xfer-kb: the cluster knowledge base of cooperative migration. It answers, for a
//! destination rebuilding a container, "which hosts hold these chunk or object
//! digests", "which snapshots exist of this volume, container or service", and how
//! loaded each host is and how good its links are, so the fetcher can take chunks
//! from neighbours instead of the source.
//!
//! * [`model`]: holdings, snapshots, host load and links, change events with
//!   per-host sequence numbers, full inventories, answers with their freshness; the
//!   home agents' bindings ([`BindingRecord`]), which every store keeps too.
//! * [`index`]: the compact in-memory index (digest -> holders), 1000 hosts and 10M
//!   entries in a few hundred MB (see the `scale` example).
//! * [`store`]: the [`KbStore`] trait, with [`EmbeddedStore`] (in memory, persisted)
//!   and [`EtcdStore`] (etcd, one lease per host).
//! * [`modes`]: the five dissemination modes ([`ModeConfig`]): central pull, central
//!   push (events + heartbeats + periodic full updates), on-line queries, neighbour
//!   pull, neighbour subscribe; all answer through [`Directory`].
//! * [`inventory`] and [`transport`]: how hosts' holdings come in ([`Inventory`]) and
//!   how modes reach hosts and the knowledge base ([`Transport`], [`KbSink`]); the
//!   agent implements them over its store and gRPC. In-process implementations with
//!   fault injection are here for tests.
//! * [`candidates`]: ranked candidate sources per chunk for the fetcher, from an
//!   answer (link, load, freshness, snapshot affinity; the source is the fallback).
//! * [`sim`]: runs a mode in one process; measures staleness.
//! * [`etcd_server`]: a private etcd-server for tests and benchmarks.
//!
//! Answers can be wrong: a host went away or evicted a chunk after the knowledge base
//! last heard of it. Every answer carries, per host, `as_of` (until when the
//! knowledge base knew that host completely) and the mode's staleness `window`, so
//! the fetcher ranks fresher holders first and treats a "missing" reply as the normal
//! case it fails over from. docs/knowledge-base.md has the measured windows.

pub mod candidates;
pub mod clock;
mod error;
pub mod etcd_server;
pub mod index;
pub mod inventory;
pub mod model;
pub mod modes;
pub mod sim;
pub mod store;
pub mod transport;

pub use candidates::{rank_candidates, CandidatePolicy, Candidates, HostScore, Moving};
pub use clock::{Clock, FakeClock, SystemClock, Timestamp, TokioClock};
pub use error::KbError;
pub use index::Index;
pub use inventory::{Inventory, MemInventory, StoreInventory};
pub use model::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, FullInventory, HoldersAnswer,
    HostEvent, HostFacts, HostInfo, HostName, HostRecord, HostStatus, Link, ModeKind, Snapshot,
    SnapshotQuery, SnapshotsAnswer, Subject, TunnelKind,
};
pub use modes::{
    spawn_expiry, Central, Directory, ModeConfig, OnlineQuery, PullConfig, PullReport, Puller,
    PushConfig, Pusher, QueryConfig, StoreDirectory, SubscribeConfig, Subscriber,
};
pub use store::{EmbeddedStore, EtcdConfig, EtcdStore, Holdings, KbStore};
pub use transport::{Faults, KbSink, LocalTransport, LossySink, Transport};
pub use xfer_store::Digest;
