//! Where the knowledge base keeps what it knows: the [`KbStore`] trait and its two
//! implementations, [`EmbeddedStore`] (in memory, persisted to one file) and
//! [`EtcdStore`] (an etcd cluster).

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};

use std::net::Ipv4Addr;

use async_trait::async_trait;
use xfer_mobility::clock::Timestamp;
use xfer_store::Digest;

use crate::model::{
    Applied, BindingPut, BindingQuery, BindingRecord, Change, FullInventory, HostEvent, HostFacts,
    HostName, HostRecord, Snapshot, SnapshotQuery,
};
use crate::KbError;

/// Holders of a batch of digests, as a store returns them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Holdings {
    /// The hosts named in `holders`.
    pub hosts: Vec<HostFacts>,
    /// Per asked digest (same order), indices into `hosts`.
    pub holders: Vec<Vec<u32>>,
}

/// The knowledge base's storage. Both implementations keep the same model:
///
/// * per host a [`HostRecord`] (last applied sequence number, `as_of`, load and links),
///   its holdings (digests) and its snapshots;
/// * an event applies only if it is the host's next one ([`Applied`]); a full
///   inventory replaces everything known of its host;
/// * every write takes `now` from the caller's clock, so tests drive time;
/// * besides, the home agents' bindings: one [`BindingRecord`] per home address, a
///   put older (modulo 2^16) than the stored sequence number is refused
///   ([`binding_verdict`]), an expired binding is never answered and is dropped by
///   `expire` (etcd: by the lease of its remaining lifetime).
#[async_trait]
pub trait KbStore: Send + Sync + std::fmt::Debug {
    /// Applies one change event of a host if it is the next in sequence.
    async fn apply(&self, ev: &HostEvent, now: Timestamp) -> Result<Applied, KbError>;

    /// Replaces everything known of `inv.host` with `inv`.
    async fn replace(&self, inv: &FullInventory, now: Timestamp) -> Result<(), KbError>;

    /// The hosts holding each of `digests`.
    async fn holders(&self, digests: &[Digest]) -> Result<Holdings, KbError>;

    /// Snapshots matching `q`, newest first, each with its host's `as_of`.
    async fn snapshots(&self, q: &SnapshotQuery) -> Result<Vec<(Snapshot, Timestamp)>, KbError>;

    /// The record of one host.
    async fn host(&self, host: &str) -> Result<Option<HostRecord>, KbError>;

    /// Every host's record.
    async fn hosts(&self) -> Result<Vec<HostRecord>, KbError>;

    /// Forgets a host and everything it holds; false if unknown.
    async fn remove_host(&self, host: &str) -> Result<bool, KbError>;

    /// Forgets the hosts not heard of within the store's liveness TTL (embedded; etcd
    /// does this itself with leases); returns their names.
    async fn expire(&self, now: Timestamp) -> Result<Vec<HostName>, KbError>;

    /// Stores a home agent's binding (created, refreshed or moved) unless the store
    /// holds a newer update of the same home address.
    async fn put_binding(&self, b: &BindingRecord, now: Timestamp) -> Result<BindingPut, KbError>;

    /// Removes the binding of `home` if it is `home_agent`'s and not newer than `seq`
    /// (a deregistration, an expiry, the container came home or was removed); false if
    /// nothing was removed.
    async fn remove_binding(
        &self,
        home: Ipv4Addr,
        home_agent: &str,
        seq: u16,
    ) -> Result<bool, KbError>;

    /// A home agent's full set of bindings: replaces every binding the store holds
    /// for `home_agent` (its own records are overwritten whatever their sequence
    /// number: the home agent is their authority; records of other home agents are
    /// subject to the sequence rule). Repairs lost puts and removes.
    async fn replace_bindings(
        &self,
        home_agent: &str,
        bindings: &[BindingRecord],
        now: Timestamp,
    ) -> Result<(), KbError>;

    /// The live bindings matching `q` at `now`, by home address.
    async fn bindings(
        &self,
        q: &BindingQuery,
        now: Timestamp,
    ) -> Result<Vec<BindingRecord>, KbError>;
}

/// Whether a put of `new` may replace `stored` (`None`: nothing stored). The same
/// sequence number is accepted again (a retried put, a full update); an older one
/// is [`BindingPut::Stale`]. `own`: `new` comes from the stored record's home agent
/// in a full update, which wins whatever the numbers.
pub(crate) fn binding_verdict(
    stored: Option<&BindingRecord>,
    new: &BindingRecord,
    now: Timestamp,
    own: bool,
) -> BindingPut {
    if !new.is_live(now) {
        return BindingPut::Expired;
    }
    match stored {
        Some(s)
            if !(own && s.home_agent == new.home_agent)
                && s.is_live(now)
                && s.seq != new.seq
                && !xfer_mobility::serial::is_newer(new.seq, s.seq) =>
        {
            BindingPut::Stale { stored: s.seq }
        }
        _ => BindingPut::Stored,
    }
}

/// Whether a removal by `home_agent` at sequence `seq` applies to `stored`.
pub(crate) fn removes(stored: &BindingRecord, home_agent: &str, seq: u16) -> bool {
    stored.home_agent == home_agent
        && (stored.seq == seq || xfer_mobility::serial::is_newer(seq, stored.seq))
}

/// What an event does given the host's current sequence number (`None`: unknown host).
pub(crate) fn check_seq(cur: Option<u64>, ev: &HostEvent) -> Applied {
    let Some(cur) = cur else {
        return Applied::UnknownHost;
    };
    let next = if matches!(ev.change, Change::Heartbeat) {
        cur
    } else {
        cur + 1
    };
    if ev.seq < next {
        Applied::Duplicate
    } else if ev.seq == next {
        Applied::Applied
    } else {
        Applied::Gap {
            have: cur,
            got: ev.seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, change: Change) -> HostEvent {
        HostEvent {
            host: "h".into(),
            seq,
            at: Timestamp::EPOCH,
            change,
        }
    }

    #[test]
    fn sequence_rules() {
        let add = || Change::Add(vec![]);
        assert_eq!(check_seq(None, &ev(1, add())), Applied::UnknownHost);
        assert_eq!(check_seq(Some(4), &ev(5, add())), Applied::Applied);
        assert_eq!(check_seq(Some(4), &ev(4, add())), Applied::Duplicate);
        assert_eq!(
            check_seq(Some(4), &ev(7, add())),
            Applied::Gap { have: 4, got: 7 }
        );
        assert_eq!(
            check_seq(Some(4), &ev(4, Change::Heartbeat)),
            Applied::Applied
        );
        assert_eq!(
            check_seq(Some(4), &ev(3, Change::Heartbeat)),
            Applied::Duplicate
        );
        assert_eq!(
            check_seq(Some(4), &ev(5, Change::Heartbeat)),
            Applied::Gap { have: 4, got: 5 }
        );
    }
}
