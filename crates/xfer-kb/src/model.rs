//! What the knowledge base knows: holdings (host -> chunk and object digests),
//! snapshots, each host's load and links, and the events and full inventories
//! through which hosts report them; and the home agents' bindings.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xfer_mobility::clock::Timestamp;
use xfer_store::Digest;

/// A host's name, as the cluster knows it (the agent's name, `h1`, `edge-17`).
pub type HostName = String;

/// Serde for [`Digest`] as lower-case hex.
pub mod digest_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    use xfer_store::Digest;

    pub fn serialize<S: Serializer>(d: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_hex())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// Serde for `Vec<Digest>` as a list of hex strings.
pub mod digests_hex {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use xfer_store::Digest;

    pub fn serialize<S: Serializer>(v: &[Digest], s: S) -> Result<S::Ok, S::Error> {
        v.iter()
            .map(|d| d.to_hex())
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Digest>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|s| Digest::from_hex(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A measured link from the reporting host to a named peer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Goodput seen on the link, bytes per second.
    pub throughput_bps: f64,
    /// Round-trip latency, microseconds.
    pub latency_micros: f64,
}

/// A host's load and links, as it reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Chunk fetch streams the host is serving (the chunk service's `PeerLoad`).
    pub load: f64,
    /// Bytes per second the host is serving.
    pub served_bps: u64,
    /// Links to named peers.
    pub links: BTreeMap<HostName, Link>,
}

/// What a snapshot is a snapshot of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Subject {
    /// A volume, by its GUID.
    Volume(String),
    /// A container's memory checkpoint (and writable layer), by container id.
    Container(String),
}

/// A cached snapshot a host holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Digest of the snapshot's root manifest (its identity).
    #[serde(with = "digest_hex")]
    pub id: Digest,
    /// The host holding it.
    pub host: HostName,
    pub subject: Subject,
    /// The service: digest of the container's image (`sha256:…`), if known.
    pub service: Option<String>,
    /// When it was taken.
    pub taken: Timestamp,
    /// Manifests of the objects it consists of (memory images, volume trees).
    #[serde(with = "digests_hex")]
    pub objects: Vec<Digest>,
    /// Logical size in bytes.
    pub bytes: u64,
}

/// Which snapshots a query wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotQuery {
    /// Snapshots of the volume with this GUID.
    Volume(String),
    /// Snapshots of this container.
    Container(String),
    /// Snapshots of any container of this service (image digest).
    Service(String),
}

impl SnapshotQuery {
    /// Whether `s` answers this query.
    pub fn matches(&self, s: &Snapshot) -> bool {
        match self {
            SnapshotQuery::Volume(g) => matches!(&s.subject, Subject::Volume(v) if v == g),
            SnapshotQuery::Container(c) => {
                matches!(&s.subject, Subject::Container(v) if v == c)
            }
            SnapshotQuery::Service(svc) => s.service.as_deref() == Some(svc.as_str()),
        }
    }
}

/// One change on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    /// The host now holds these digests.
    Add(#[serde(with = "digests_hex")] Vec<Digest>),
    /// The host deleted these digests (a finished migration's chunks, an explicit delete).
    Remove(#[serde(with = "digests_hex")] Vec<Digest>),
    /// The host's cache evicted these digests (size cap, lease expiry).
    Evict(#[serde(with = "digests_hex")] Vec<Digest>),
    /// The host took (or received) a snapshot.
    SnapshotAdd(Snapshot),
    /// The host discarded a snapshot.
    SnapshotRemove(#[serde(with = "digest_hex")] Digest),
    /// The host's load or links changed.
    Info(HostInfo),
    /// Nothing changed: "I am at `seq`". Does not consume a sequence number; lets the
    /// receiver detect a lost last event without waiting for a full update.
    Heartbeat,
}

impl Change {
    /// Short name for logs and reports.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Add(_) => "add",
            Change::Remove(_) => "remove",
            Change::Evict(_) => "evict",
            Change::SnapshotAdd(_) => "snapshot-add",
            Change::SnapshotRemove(_) => "snapshot-remove",
            Change::Info(_) => "info",
            Change::Heartbeat => "heartbeat",
        }
    }
}

/// A change event of one host. Every change but a heartbeat carries the next sequence
/// number of its host (1, 2, 3, …), so a receiver detects a lost event as a gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostEvent {
    pub host: HostName,
    pub seq: u64,
    /// When the change happened on the host.
    pub at: Timestamp,
    pub change: Change,
}

/// A host's complete state at sequence number `seq`: what a periodic full update or
/// a pull carries. Applying it replaces everything known of the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullInventory {
    pub host: HostName,
    /// The sequence number of the last change included.
    pub seq: u64,
    /// When the host took this inventory.
    pub at: Timestamp,
    #[serde(with = "digests_hex")]
    pub digests: Vec<Digest>,
    pub snapshots: Vec<Snapshot>,
    pub info: HostInfo,
}

/// A host's sequence number and load: the cheap status call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub seq: u64,
    pub info: HostInfo,
}

/// What the knowledge base keeps per host besides its holdings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host: HostName,
    /// Last change applied.
    pub seq: u64,
    /// The last time the knowledge base knew this host's state completely: a full
    /// update or pull, or a gap-free event or heartbeat. Changes on the host after
    /// this are not reflected yet.
    pub as_of: Timestamp,
    pub info: HostInfo,
}

/// Result of applying one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    /// The event was the next one and is applied (or a heartbeat at the current seq).
    Applied,
    /// Already applied (seq not newer): ignored.
    Duplicate,
    /// Events were lost between `have` and `got`: nothing applied; the sender must
    /// send a full inventory.
    Gap { have: u64, got: u64 },
    /// No full inventory of this host yet: nothing applied; send a full inventory.
    UnknownHost,
}

impl Applied {
    /// Whether the receiver needs a full inventory to catch up.
    pub fn needs_full(self) -> bool {
        matches!(self, Applied::Gap { .. } | Applied::UnknownHost)
    }
}

/// The dissemination mode an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModeKind {
    /// (a) the knowledge base pulls every host's inventory periodically.
    CentralPull,
    /// (b) hosts push change events, heartbeats and periodic full updates.
    CentralPush,
    /// (c) the destination asks its neighbours at migration time.
    OnlineQuery,
    /// (d) the destination pulls its neighbours' inventories periodically.
    NeighbourPull,
    /// (e) the destination subscribes to its neighbours' change events.
    NeighbourSubscribe,
}

/// A host as an answer reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    pub host: HostName,
    /// Until when the answer is known to reflect this host (see [`HostRecord::as_of`]).
    pub as_of: Timestamp,
    pub info: HostInfo,
}

/// Answer to "which hosts hold these digests".
#[derive(Debug, Clone, PartialEq)]
pub struct HoldersAnswer {
    pub mode: ModeKind,
    /// When the answer was produced.
    pub at: Timestamp,
    /// The mode's staleness bound with its configuration: a change on a host may be
    /// missing from the answer for up to this long after `as_of` of that host (events
    /// lost on the way included). See docs/knowledge-base.md.
    pub window: Duration,
    /// The hosts named below.
    pub hosts: Vec<HostFacts>,
    /// Per asked digest (same order), indices into `hosts`.
    pub holders: Vec<Vec<u32>>,
}

impl HoldersAnswer {
    /// The hosts said to hold digest number `i` of the query.
    pub fn hosts_of(&self, i: usize) -> impl Iterator<Item = &HostFacts> + '_ {
        self.holders
            .get(i)
            .into_iter()
            .flatten()
            .filter_map(|&h| self.hosts.get(h as usize))
    }

    /// The names of the hosts said to hold digest number `i`, sorted.
    pub fn names_of(&self, i: usize) -> Vec<&str> {
        let mut v: Vec<&str> = self.hosts_of(i).map(|h| h.host.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// How old the information about `host` is at `now` (`None`: not in the answer).
    pub fn age(&self, host: &str, now: Timestamp) -> Option<Duration> {
        self.hosts
            .iter()
            .find(|h| h.host == host)
            .map(|h| now.saturating_since(h.as_of))
    }
}

/// Answer to a snapshot query.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotsAnswer {
    pub mode: ModeKind,
    pub at: Timestamp,
    pub window: Duration,
    /// Matching snapshots, newest first, each with how current its host's record is.
    pub snapshots: Vec<(Snapshot, Timestamp)>,
}

/// The tunnel kind a home agent forwards a binding's traffic through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelKind {
    Vxlan,
    Ipip,
    Gre,
}

impl TunnelKind {
    /// The kind's name (`vxlan`, `ipip`, `gre`).
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::Vxlan => "vxlan",
            TunnelKind::Ipip => "ipip",
            TunnelKind::Gre => "gre",
        }
    }
}

/// A home agent's binding as the knowledge base keeps it: one per home address
/// (docs/handover.md, docs/knowledge-base.md "Bindings").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingRecord {
    /// The container's home address (the record's key).
    pub home: Ipv4Addr,
    /// The host acting as home agent, by name.
    pub home_agent: HostName,
    /// The home agent's address (where care-of hosts send binding updates).
    pub home_agent_address: Ipv4Addr,
    /// Where the container runs now.
    pub care_of: Ipv4Addr,
    /// The tunnel the home agent forwards through.
    pub tunnel: TunnelKind,
    /// Whether the care-of host asked for a reverse tunnel.
    pub reverse_tunnel: bool,
    /// Sequence number of the binding update that installed or last refreshed it
    /// (compared modulo 2^16, RFC 1982).
    pub seq: u16,
    /// The granted lifetime, seconds.
    pub lifetime_secs: u32,
    /// When the binding ends unless refreshed.
    pub expires_at: Timestamp,
    /// When the home agent last accepted an update of it.
    pub updated_at: Timestamp,
}

impl BindingRecord {
    /// Whether the binding is still live at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at
    }

    /// Whole seconds of lifetime left at `now`, rounded up (0 once expired).
    pub fn remaining_secs(&self, now: Timestamp) -> u64 {
        self.expires_at
            .as_millis()
            .saturating_sub(now.as_millis())
            .div_ceil(1000)
    }
}

/// Which bindings a query wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindingQuery {
    /// Every binding.
    All,
    /// The binding of one home address.
    Home(Ipv4Addr),
    /// The bindings of one home agent (by host name).
    HomeAgent(HostName),
}

impl BindingQuery {
    /// Whether `b` answers this query.
    pub fn matches(&self, b: &BindingRecord) -> bool {
        match self {
            BindingQuery::All => true,
            BindingQuery::Home(h) => b.home == *h,
            BindingQuery::HomeAgent(a) => b.home_agent == *a,
        }
    }
}

/// What a binding put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindingPut {
    /// Stored (new, refreshed or moved).
    Stored,
    /// The store holds a newer update of this home address (sequence `stored`):
    /// nothing changed.
    Stale { stored: u16 },
    /// The binding had already expired: nothing stored.
    Expired,
}
