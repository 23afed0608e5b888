//! The knowledge base's wire types (`proto/xfer/v1/kb.proto`) to and from
//! `xfer_kb`'s model. Decoding is fallible and never panics: packed digests must be
//! a multiple of 32 bytes, enums must not be UNSPECIFIED or unknown, a holder index
//! must name a host of the reply, and counts are bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use xfer_kb::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, FullInventory, HoldersAnswer,
    HostEvent, HostFacts, HostInfo, HostStatus, Link, ModeKind, Snapshot, SnapshotQuery,
    SnapshotsAnswer, Subject, Timestamp, TunnelKind,
};
use xfer_proto::v1 as pb;
use xfer_store::Digest;

use crate::chunks::wire::{decode_ids, encode_ids};
use crate::error::AgentError;

/// Most digests one message may carry (64 MiB of packed ids; the agents' message
/// limit is 64 MiB too).
pub const MAX_DIGESTS: usize = 2 << 20;
/// Most hosts, links or snapshots one message may carry.
pub const MAX_ITEMS: usize = 65_536;

fn bad(what: impl Into<String>) -> AgentError {
    AgentError::DecodeKb { what: what.into() }
}

/// Decodes `n × 32` packed bytes.
pub fn digests(packed: &[u8], field: &'static str) -> Result<Vec<Digest>, AgentError> {
    if packed.len() / 32 > MAX_DIGESTS {
        return Err(bad(format!("{field}: more than {MAX_DIGESTS} digests")));
    }
    decode_ids(packed).map_err(|e| bad(format!("{field}: {e}")))
}

fn digest(b: &[u8], field: &'static str) -> Result<Digest, AgentError> {
    Digest::from_slice(b).map_err(|e| bad(format!("{field}: {e}")))
}

fn items<T>(v: &[T], field: &'static str) -> Result<(), AgentError> {
    if v.len() > MAX_ITEMS {
        return Err(bad(format!("{field}: more than {MAX_ITEMS} entries")));
    }
    Ok(())
}

/// Checks a request's protocol version.
pub fn version(v: i32) -> Result<(), AgentError> {
    xfer_proto::check_version(v).map_err(AgentError::Decode)
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from_millis(ms)
}

pub fn info_to(i: &HostInfo) -> pb::KbHostInfo {
    pb::KbHostInfo {
        load: i.load,
        served_bps: i.served_bps,
        links: i
            .links
            .iter()
            .map(|(peer, l)| pb::KbLink {
                peer: peer.clone(),
                throughput_bps: l.throughput_bps,
                latency_micros: l.latency_micros,
            })
            .collect(),
    }
}

pub fn info_from(i: Option<&pb::KbHostInfo>) -> Result<HostInfo, AgentError> {
    let Some(i) = i else {
        return Ok(HostInfo::default());
    };
    items(&i.links, "links")?;
    if !i.load.is_finite() || i.load < 0.0 {
        return Err(bad(format!("load {} is not a non-negative number", i.load)));
    }
    let mut links = BTreeMap::new();
    for l in &i.links {
        if !l.throughput_bps.is_finite() || !l.latency_micros.is_finite() {
            return Err(bad(format!("link to {}: not a number", l.peer)));
        }
        links.insert(
            l.peer.clone(),
            Link {
                throughput_bps: l.throughput_bps.max(0.0),
                latency_micros: l.latency_micros.max(0.0),
            },
        );
    }
    Ok(HostInfo {
        load: i.load,
        served_bps: i.served_bps,
        links,
    })
}

pub fn snapshot_to(s: &Snapshot) -> pb::KbSnapshot {
    let (kind, subject) = match &s.subject {
        Subject::Volume(g) => (pb::KbSubjectKind::Volume, g.clone()),
        Subject::Container(c) => (pb::KbSubjectKind::Container, c.clone()),
    };
    pb::KbSnapshot {
        id: s.id.0.to_vec(),
        host: s.host.clone(),
        subject_kind: kind as i32,
        subject,
        service: s.service.clone().unwrap_or_default(),
        taken_millis: s.taken.as_millis(),
        objects: encode_ids(&s.objects),
        bytes: s.bytes,
    }
}

pub fn snapshot_from(s: &pb::KbSnapshot) -> Result<Snapshot, AgentError> {
    let subject = match pb::KbSubjectKind::try_from(s.subject_kind) {
        Ok(pb::KbSubjectKind::Volume) => Subject::Volume(s.subject.clone()),
        Ok(pb::KbSubjectKind::Container) => Subject::Container(s.subject.clone()),
        _ => return Err(bad(format!("snapshot subject kind {}", s.subject_kind))),
    };
    Ok(Snapshot {
        id: digest(&s.id, "snapshot id")?,
        host: s.host.clone(),
        subject,
        service: (!s.service.is_empty()).then(|| s.service.clone()),
        taken: ts(s.taken_millis),
        objects: digests(&s.objects, "snapshot objects")?,
        bytes: s.bytes,
    })
}

pub fn query_to(q: &SnapshotQuery) -> pb::KbSnapshotQuery {
    let (kind, key) = match q {
        SnapshotQuery::Volume(g) => (pb::KbQueryKind::Volume, g),
        SnapshotQuery::Container(c) => (pb::KbQueryKind::Container, c),
        SnapshotQuery::Service(s) => (pb::KbQueryKind::Service, s),
    };
    pb::KbSnapshotQuery {
        version: xfer_proto::PROTOCOL_VERSION as i32,
        kind: kind as i32,
        key: key.clone(),
    }
}

pub fn query_from(q: &pb::KbSnapshotQuery) -> Result<SnapshotQuery, AgentError> {
    version(q.version)?;
    match pb::KbQueryKind::try_from(q.kind) {
        Ok(pb::KbQueryKind::Volume) => Ok(SnapshotQuery::Volume(q.key.clone())),
        Ok(pb::KbQueryKind::Container) => Ok(SnapshotQuery::Container(q.key.clone())),
        Ok(pb::KbQueryKind::Service) => Ok(SnapshotQuery::Service(q.key.clone())),
        _ => Err(bad(format!("snapshot query kind {}", q.kind))),
    }
}

pub fn event_to(ev: &HostEvent) -> pb::KbEvent {
    let mut out = pb::KbEvent {
        host: ev.host.clone(),
        seq: ev.seq,
        at_millis: ev.at.as_millis(),
        ..Default::default()
    };
    let kind = match &ev.change {
        Change::Add(d) => {
            out.digests = encode_ids(d);
            pb::KbChangeKind::Add
        }
        Change::Remove(d) => {
            out.digests = encode_ids(d);
            pb::KbChangeKind::Remove
        }
        Change::Evict(d) => {
            out.digests = encode_ids(d);
            pb::KbChangeKind::Evict
        }
        Change::SnapshotAdd(s) => {
            out.snapshot = Some(snapshot_to(s));
            pb::KbChangeKind::SnapshotAdd
        }
        Change::SnapshotRemove(id) => {
            out.digests = id.0.to_vec();
            pb::KbChangeKind::SnapshotRemove
        }
        Change::Info(i) => {
            out.info = Some(info_to(i));
            pb::KbChangeKind::Info
        }
        Change::Heartbeat => pb::KbChangeKind::Heartbeat,
    };
    out.kind = kind as i32;
    out
}

pub fn event_from(ev: &pb::KbEvent) -> Result<HostEvent, AgentError> {
    if ev.host.is_empty() {
        return Err(bad("event without a host"));
    }
    let change = match pb::KbChangeKind::try_from(ev.kind) {
        Ok(pb::KbChangeKind::Add) => Change::Add(digests(&ev.digests, "add")?),
        Ok(pb::KbChangeKind::Remove) => Change::Remove(digests(&ev.digests, "remove")?),
        Ok(pb::KbChangeKind::Evict) => Change::Evict(digests(&ev.digests, "evict")?),
        Ok(pb::KbChangeKind::SnapshotAdd) => Change::SnapshotAdd(snapshot_from(
            ev.snapshot
                .as_ref()
                .ok_or_else(|| bad("snapshot-add without a snapshot"))?,
        )?),
        Ok(pb::KbChangeKind::SnapshotRemove) => {
            Change::SnapshotRemove(digest(&ev.digests, "snapshot-remove id")?)
        }
        Ok(pb::KbChangeKind::Info) => Change::Info(info_from(ev.info.as_ref())?),
        Ok(pb::KbChangeKind::Heartbeat) => Change::Heartbeat,
        _ => return Err(bad(format!("change kind {}", ev.kind))),
    };
    Ok(HostEvent {
        host: ev.host.clone(),
        seq: ev.seq,
        at: ts(ev.at_millis),
        change,
    })
}

pub fn full_to(f: &FullInventory) -> pb::KbFull {
    pb::KbFull {
        host: f.host.clone(),
        seq: f.seq,
        at_millis: f.at.as_millis(),
        digests: encode_ids(&f.digests),
        snapshots: f.snapshots.iter().map(snapshot_to).collect(),
        info: Some(info_to(&f.info)),
    }
}

pub fn full_from(f: &pb::KbFull) -> Result<FullInventory, AgentError> {
    if f.host.is_empty() {
        return Err(bad("inventory without a host"));
    }
    items(&f.snapshots, "snapshots")?;
    Ok(FullInventory {
        host: f.host.clone(),
        seq: f.seq,
        at: ts(f.at_millis),
        digests: digests(&f.digests, "inventory")?,
        snapshots: f
            .snapshots
            .iter()
            .map(snapshot_from)
            .collect::<Result<_, _>>()?,
        info: info_from(f.info.as_ref())?,
    })
}

pub fn status_to(s: &HostStatus) -> pb::KbStatus {
    pb::KbStatus {
        seq: s.seq,
        info: Some(info_to(&s.info)),
    }
}

pub fn status_from(s: &pb::KbStatus) -> Result<HostStatus, AgentError> {
    Ok(HostStatus {
        seq: s.seq,
        info: info_from(s.info.as_ref())?,
    })
}

pub fn applied_to(a: Applied) -> pb::KbPushEventReply {
    let (v, have, got) = match a {
        Applied::Applied => (pb::KbVerdict::Applied, 0, 0),
        Applied::Duplicate => (pb::KbVerdict::Duplicate, 0, 0),
        Applied::Gap { have, got } => (pb::KbVerdict::Gap, have, got),
        Applied::UnknownHost => (pb::KbVerdict::UnknownHost, 0, 0),
    };
    pb::KbPushEventReply {
        verdict: v as i32,
        have,
        got,
    }
}

pub fn applied_from(r: &pb::KbPushEventReply) -> Result<Applied, AgentError> {
    match pb::KbVerdict::try_from(r.verdict) {
        Ok(pb::KbVerdict::Applied) => Ok(Applied::Applied),
        Ok(pb::KbVerdict::Duplicate) => Ok(Applied::Duplicate),
        Ok(pb::KbVerdict::Gap) => Ok(Applied::Gap {
            have: r.have,
            got: r.got,
        }),
        Ok(pb::KbVerdict::UnknownHost) => Ok(Applied::UnknownHost),
        _ => Err(bad(format!("verdict {}", r.verdict))),
    }
}

pub fn mode_to(m: ModeKind) -> pb::KbMode {
    match m {
        ModeKind::CentralPull => pb::KbMode::CentralPull,
        ModeKind::CentralPush => pb::KbMode::CentralPush,
        ModeKind::OnlineQuery => pb::KbMode::OnlineQuery,
        ModeKind::NeighbourPull => pb::KbMode::NeighbourPull,
        ModeKind::NeighbourSubscribe => pb::KbMode::NeighbourSubscribe,
    }
}

pub fn mode_from(v: i32) -> Result<ModeKind, AgentError> {
    match pb::KbMode::try_from(v) {
        Ok(pb::KbMode::CentralPull) => Ok(ModeKind::CentralPull),
        Ok(pb::KbMode::CentralPush) => Ok(ModeKind::CentralPush),
        Ok(pb::KbMode::OnlineQuery) => Ok(ModeKind::OnlineQuery),
        Ok(pb::KbMode::NeighbourPull) => Ok(ModeKind::NeighbourPull),
        Ok(pb::KbMode::NeighbourSubscribe) => Ok(ModeKind::NeighbourSubscribe),
        _ => Err(bad(format!("mode {v}"))),
    }
}

fn facts_to(h: &HostFacts) -> pb::KbHostFacts {
    pb::KbHostFacts {
        host: h.host.clone(),
        as_of_millis: h.as_of.as_millis(),
        info: Some(info_to(&h.info)),
    }
}

pub fn holders_to(a: &HoldersAnswer) -> pb::KbHoldersReply {
    pb::KbHoldersReply {
        mode: mode_to(a.mode) as i32,
        at_millis: a.at.as_millis(),
        window_millis: a.window.as_millis() as u64,
        hosts: a.hosts.iter().map(facts_to).collect(),
        holders: a
            .holders
            .iter()
            .map(|h| pb::KbHolderList { hosts: h.clone() })
            .collect(),
    }
}

/// Decodes a holders reply to a query of `asked` digests.
pub fn holders_from(r: &pb::KbHoldersReply, asked: usize) -> Result<HoldersAnswer, AgentError> {
    items(&r.hosts, "hosts")?;
    if r.holders.len() != asked {
        return Err(bad(format!(
            "holders for {} digests, {asked} asked",
            r.holders.len()
        )));
    }
    let n = r.hosts.len() as u32;
    let mut holders = Vec::with_capacity(asked);
    for h in &r.holders {
        if let Some(i) = h.hosts.iter().find(|&&i| i >= n) {
            return Err(bad(format!("holder index {i} beyond {n} hosts")));
        }
        holders.push(h.hosts.clone());
    }
    Ok(HoldersAnswer {
        mode: mode_from(r.mode)?,
        at: ts(r.at_millis),
        window: Duration::from_millis(r.window_millis),
        hosts: r
            .hosts
            .iter()
            .map(|h| {
                Ok(HostFacts {
                    host: h.host.clone(),
                    as_of: ts(h.as_of_millis),
                    info: info_from(h.info.as_ref())?,
                })
            })
            .collect::<Result<_, AgentError>>()?,
        holders,
    })
}

pub fn snapshots_to(a: &SnapshotsAnswer) -> pb::KbSnapshotsReply {
    pb::KbSnapshotsReply {
        mode: mode_to(a.mode) as i32,
        at_millis: a.at.as_millis(),
        window_millis: a.window.as_millis() as u64,
        snapshots: a
            .snapshots
            .iter()
            .map(|(s, as_of)| pb::KbDatedSnapshot {
                snapshot: Some(snapshot_to(s)),
                as_of_millis: as_of.as_millis(),
            })
            .collect(),
    }
}

pub fn snapshots_from(r: &pb::KbSnapshotsReply) -> Result<SnapshotsAnswer, AgentError> {
    items(&r.snapshots, "snapshots")?;
    Ok(SnapshotsAnswer {
        mode: mode_from(r.mode)?,
        at: ts(r.at_millis),
        window: Duration::from_millis(r.window_millis),
        snapshots: r
            .snapshots
            .iter()
            .map(|d| {
                let s = d
                    .snapshot
                    .as_ref()
                    .ok_or_else(|| bad("dated snapshot without a snapshot"))?;
                Ok((snapshot_from(s)?, ts(d.as_of_millis)))
            })
            .collect::<Result<_, AgentError>>()?,
    })
}

fn addr(s: &str, field: &'static str) -> Result<std::net::Ipv4Addr, AgentError> {
    s.parse()
        .map_err(|_| bad(format!("{field}: {s:?} is not an IPv4 address")))
}

pub fn binding_to(b: &BindingRecord) -> pb::KbBinding {
    pb::KbBinding {
        home: b.home.to_string(),
        home_agent: b.home_agent.clone(),
        home_agent_address: b.home_agent_address.to_string(),
        care_of: b.care_of.to_string(),
        tunnel: match b.tunnel {
            TunnelKind::Vxlan => pb::KbTunnelKind::Vxlan,
            TunnelKind::Ipip => pb::KbTunnelKind::Ipip,
            TunnelKind::Gre => pb::KbTunnelKind::Gre,
        } as i32,
        reverse_tunnel: b.reverse_tunnel,
        seq: u32::from(b.seq),
        lifetime_secs: b.lifetime_secs,
        expires_millis: b.expires_at.as_millis(),
        updated_millis: b.updated_at.as_millis(),
    }
}

pub fn binding_from(b: &pb::KbBinding) -> Result<BindingRecord, AgentError> {
    let tunnel = match pb::KbTunnelKind::try_from(b.tunnel) {
        Ok(pb::KbTunnelKind::Vxlan) => TunnelKind::Vxlan,
        Ok(pb::KbTunnelKind::Ipip) => TunnelKind::Ipip,
        Ok(pb::KbTunnelKind::Gre) => TunnelKind::Gre,
        _ => return Err(bad(format!("tunnel kind {}", b.tunnel))),
    };
    if b.home_agent.is_empty() || b.home_agent.contains('/') {
        return Err(bad(format!("home agent {:?}", b.home_agent)));
    }
    Ok(BindingRecord {
        home: addr(&b.home, "home")?,
        home_agent: b.home_agent.clone(),
        home_agent_address: addr(&b.home_agent_address, "home_agent_address")?,
        care_of: addr(&b.care_of, "care_of")?,
        tunnel,
        reverse_tunnel: b.reverse_tunnel,
        seq: u16::try_from(b.seq).map_err(|_| bad(format!("sequence {} > 65535", b.seq)))?,
        lifetime_secs: b.lifetime_secs,
        expires_at: ts(b.expires_millis),
        updated_at: ts(b.updated_millis),
    })
}

/// A put or a remove of one binding, as a home agent publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingOp {
    Put(BindingRecord),
    /// The binding's home, home agent and sequence number name what to remove.
    Remove(BindingRecord),
}

pub fn binding_change_to(op: &BindingOp) -> pb::KbBindingChange {
    let (kind, b) = match op {
        BindingOp::Put(b) => (pb::KbBindingOp::Put, b),
        BindingOp::Remove(b) => (pb::KbBindingOp::Remove, b),
    };
    pb::KbBindingChange {
        version: xfer_proto::PROTOCOL_VERSION as i32,
        op: kind as i32,
        binding: Some(binding_to(b)),
    }
}

pub fn binding_change_from(c: &pb::KbBindingChange) -> Result<BindingOp, AgentError> {
    version(c.version)?;
    let b = binding_from(
        c.binding
            .as_ref()
            .ok_or_else(|| bad("binding change without a binding"))?,
    )?;
    match pb::KbBindingOp::try_from(c.op) {
        Ok(pb::KbBindingOp::Put) => Ok(BindingOp::Put(b)),
        Ok(pb::KbBindingOp::Remove) => Ok(BindingOp::Remove(b)),
        _ => Err(bad(format!("binding op {}", c.op))),
    }
}

/// What a binding change did: a put's verdict, or whether a remove removed.
pub fn binding_reply_to(r: Result<BindingPut, bool>) -> pb::KbBindingChangeReply {
    use pb::KbBindingVerdict as V;
    let (v, stored) = match r {
        Ok(BindingPut::Stored) => (V::Stored, 0),
        Ok(BindingPut::Stale { stored }) => (V::Stale, stored),
        Ok(BindingPut::Expired) => (V::Expired, 0),
        Err(true) => (V::Removed, 0),
        Err(false) => (V::NotRemoved, 0),
    };
    pb::KbBindingChangeReply {
        verdict: v as i32,
        stored_seq: u32::from(stored),
    }
}

pub fn binding_reply_from(
    r: &pb::KbBindingChangeReply,
) -> Result<Result<BindingPut, bool>, AgentError> {
    use pb::KbBindingVerdict as V;
    Ok(match V::try_from(r.verdict) {
        Ok(V::Stored) => Ok(BindingPut::Stored),
        Ok(V::Stale) => Ok(BindingPut::Stale {
            stored: u16::try_from(r.stored_seq)
                .map_err(|_| bad(format!("stored sequence {}", r.stored_seq)))?,
        }),
        Ok(V::Expired) => Ok(BindingPut::Expired),
        Ok(V::Removed) => Err(true),
        Ok(V::NotRemoved) => Err(false),
        _ => return Err(bad(format!("binding verdict {}", r.verdict))),
    })
}

pub fn bindings_query_to(q: &BindingQuery) -> pb::KbBindingsQuery {
    let (kind, key) = match q {
        BindingQuery::All => (pb::KbBindingQueryKind::All, String::new()),
        BindingQuery::Home(h) => (pb::KbBindingQueryKind::Home, h.to_string()),
        BindingQuery::HomeAgent(a) => (pb::KbBindingQueryKind::HomeAgent, a.clone()),
    };
    pb::KbBindingsQuery {
        version: xfer_proto::PROTOCOL_VERSION as i32,
        kind: kind as i32,
        key,
    }
}

pub fn bindings_query_from(q: &pb::KbBindingsQuery) -> Result<BindingQuery, AgentError> {
    version(q.version)?;
    match pb::KbBindingQueryKind::try_from(q.kind) {
        Ok(pb::KbBindingQueryKind::All) => Ok(BindingQuery::All),
        Ok(pb::KbBindingQueryKind::Home) => Ok(BindingQuery::Home(addr(&q.key, "key")?)),
        Ok(pb::KbBindingQueryKind::HomeAgent) => Ok(BindingQuery::HomeAgent(q.key.clone())),
        _ => Err(bad(format!("binding query kind {}", q.kind))),
    }
}

pub fn bindings_from(l: &pb::KbBindingList) -> Result<Vec<BindingRecord>, AgentError> {
    items(&l.bindings, "bindings")?;
    l.bindings.iter().map(binding_from).collect()
}

/// Decodes any Kb message from raw bytes, as the fuzz target does: every message a
/// node may receive, through the same checks. Returns whether it decoded.
pub fn decode_any(kind: u8, bytes: &[u8]) -> bool {
    use prost::Message;
    match kind % 11 {
        0 => pb::KbEvent::decode(bytes)
            .ok()
            .map(|m| event_from(&m).is_ok()),
        1 => pb::KbFull::decode(bytes)
            .ok()
            .map(|m| full_from(&m).is_ok()),
        2 => pb::KbStatus::decode(bytes)
            .ok()
            .map(|m| status_from(&m).is_ok()),
        3 => pb::KbHoldersReply::decode(bytes)
            .ok()
            .map(|m| holders_from(&m, m.holders.len()).is_ok()),
        4 => pb::KbSnapshotsReply::decode(bytes)
            .ok()
            .map(|m| snapshots_from(&m).is_ok()),
        5 => pb::KbSnapshotQuery::decode(bytes)
            .ok()
            .map(|m| query_from(&m).is_ok()),
        6 => pb::KbPushEventReply::decode(bytes)
            .ok()
            .map(|m| applied_from(&m).is_ok()),
        7 => pb::KbBindingChange::decode(bytes)
            .ok()
            .map(|m| binding_change_from(&m).is_ok()),
        8 => pb::KbBindingList::decode(bytes)
            .ok()
            .map(|m| bindings_from(&m).is_ok()),
        9 => pb::KbBindingsQuery::decode(bytes)
            .ok()
            .map(|m| bindings_query_from(&m).is_ok()),
        _ => pb::KbHoldersRequest::decode(bytes)
            .ok()
            .map(|m| version(m.version).is_ok() && digests(&m.digests, "digests").is_ok()),
    }
    .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> Digest {
        Digest([i; 32])
    }

    fn snap() -> Snapshot {
        Snapshot {
            id: d(9),
            host: "h2".into(),
            subject: Subject::Volume("guid-1".into()),
            service: Some("sha256:ab".into()),
            taken: Timestamp::from_millis(1234),
            objects: vec![d(1), d(2)],
            bytes: 77,
        }
    }

    #[test]
    fn events_round_trip() {
        let mut info = HostInfo {
            load: 1.5,
            served_bps: 10,
            ..Default::default()
        };
        info.links.insert(
            "h1".into(),
            Link {
                throughput_bps: 1e6,
                latency_micros: 300.0,
            },
        );
        for change in [
            Change::Add(vec![d(1), d(2)]),
            Change::Remove(vec![d(3)]),
            Change::Evict(vec![]),
            Change::SnapshotAdd(snap()),
            Change::SnapshotRemove(d(9)),
            Change::Info(info),
            Change::Heartbeat,
        ] {
            let ev = HostEvent {
                host: "h2".into(),
                seq: 7,
                at: Timestamp::from_millis(99),
                change,
            };
            assert_eq!(event_from(&event_to(&ev)).expect("decodes"), ev);
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        let mut ev = event_to(&HostEvent {
            host: "h".into(),
            seq: 1,
            at: Timestamp::from_millis(1),
            change: Change::Add(vec![d(1)]),
        });
        ev.digests.pop();
        assert!(event_from(&ev).is_err(), "31-byte digest");
        ev.digests.clear();
        ev.kind = 0;
        assert!(event_from(&ev).is_err(), "UNSPECIFIED kind");
        ev.kind = 99;
        assert!(event_from(&ev).is_err(), "unknown kind");
        let reply = pb::KbHoldersReply {
            mode: pb::KbMode::CentralPush as i32,
            hosts: vec![],
            holders: vec![pb::KbHolderList { hosts: vec![0] }],
            ..Default::default()
        };
        assert!(holders_from(&reply, 1).is_err(), "index beyond hosts");
        assert!(holders_from(&reply, 2).is_err(), "wrong count");
        let q = pb::KbSnapshotQuery {
            version: 0,
            kind: 1,
            key: "x".into(),
        };
        assert!(query_from(&q).is_err(), "version 0");
        assert!(applied_from(&pb::KbPushEventReply::default()).is_err());
        let nan = pb::KbHostInfo {
            load: f64::NAN,
            ..Default::default()
        };
        assert!(info_from(Some(&nan)).is_err());
    }

    #[test]
    fn answers_round_trip() {
        let a = HoldersAnswer {
            mode: ModeKind::OnlineQuery,
            at: Timestamp::from_millis(5),
            window: Duration::from_millis(1000),
            hosts: vec![HostFacts {
                host: "h3".into(),
                as_of: Timestamp::from_millis(4),
                info: HostInfo::default(),
            }],
            holders: vec![vec![0], vec![]],
        };
        assert_eq!(holders_from(&holders_to(&a), 2).expect("decodes"), a);
        let s = SnapshotsAnswer {
            mode: ModeKind::CentralPush,
            at: Timestamp::from_millis(5),
            window: Duration::from_millis(10_150),
            snapshots: vec![(snap(), Timestamp::from_millis(3))],
        };
        assert_eq!(snapshots_from(&snapshots_to(&s)).expect("decodes"), s);
        let f = FullInventory {
            host: "h2".into(),
            seq: 3,
            at: Timestamp::from_millis(8),
            digests: vec![d(1), d(4)],
            snapshots: vec![snap()],
            info: HostInfo::default(),
        };
        assert_eq!(full_from(&full_to(&f)).expect("decodes"), f);
        for a in [
            Applied::Applied,
            Applied::Duplicate,
            Applied::Gap { have: 2, got: 5 },
            Applied::UnknownHost,
        ] {
            assert_eq!(applied_from(&applied_to(a)).expect("decodes"), a);
        }
    }

    #[test]
    fn garbage_never_panics() {
        for k in 0..8u8 {
            assert!(!decode_any(k, &[0x0a, 0xff, 0xff]));
        }
    }

    #[test]
    fn bindings_round_trip_and_bad_ones_are_refused() {
        let b = BindingRecord {
            home: [10, 77, 0, 5].into(),
            home_agent: "h1".into(),
            home_agent_address: [10, 0, 0, 1].into(),
            care_of: [10, 0, 0, 2].into(),
            tunnel: TunnelKind::Gre,
            reverse_tunnel: true,
            seq: 65535,
            lifetime_secs: 60,
            expires_at: Timestamp::from_millis(70_000),
            updated_at: Timestamp::from_millis(10_000),
        };
        assert_eq!(binding_from(&binding_to(&b)).expect("round trip"), b);
        for op in [BindingOp::Put(b.clone()), BindingOp::Remove(b.clone())] {
            assert_eq!(
                binding_change_from(&binding_change_to(&op)).expect("op"),
                op
            );
        }
        for q in [
            BindingQuery::All,
            BindingQuery::Home(b.home),
            BindingQuery::HomeAgent("h1".into()),
        ] {
            assert_eq!(bindings_query_from(&bindings_query_to(&q)).expect("q"), q);
        }
        for r in [
            Ok(BindingPut::Stored),
            Ok(BindingPut::Stale { stored: 9 }),
            Ok(BindingPut::Expired),
            Err(true),
            Err(false),
        ] {
            assert_eq!(binding_reply_from(&binding_reply_to(r)).expect("reply"), r);
        }
        let ok = binding_to(&b);
        let bad = [
            pb::KbBinding {
                tunnel: 0,
                ..ok.clone()
            },
            pb::KbBinding {
                home: "10.77.0".into(),
                ..ok.clone()
            },
            pb::KbBinding {
                care_of: String::new(),
                ..ok.clone()
            },
            pb::KbBinding {
                seq: 65536,
                ..ok.clone()
            },
            pb::KbBinding {
                home_agent: String::new(),
                ..ok.clone()
            },
            pb::KbBinding {
                home_agent: "a/b".into(),
                ..ok.clone()
            },
        ];
        for m in bad {
            assert!(binding_from(&m).is_err(), "{m:?}");
        }
        let mut c = binding_change_to(&BindingOp::Put(b));
        c.op = 0;
        assert!(binding_change_from(&c).is_err());
        c.binding = None;
        assert!(binding_change_from(&c).is_err());
        let q = pb::KbBindingsQuery {
            kind: 2,
            key: "nope".into(),
            ..bindings_query_to(&BindingQuery::All)
        };
        assert!(bindings_query_from(&q).is_err());
        assert!(binding_reply_from(&pb::KbBindingChangeReply {
            verdict: 0,
            stored_seq: 0
        })
        .is_err());
    }
}
