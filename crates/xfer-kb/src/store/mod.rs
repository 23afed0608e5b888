//! Where the knowledge base keeps what it knows: the [`KbStore`] trait and its two
//! implementations, [`EmbeddedStore`] (in memory, persisted to one file) and
//! [`EtcdStore`] (an etcd cluster).

mod embedded;
mod etcd;

pub use embedded::EmbeddedStore;
pub use etcd::{EtcdConfig, EtcdStore};

use async_trait::async_trait;
use xfer_mobility::clock::Timestamp;
use xfer_store::Digest;

use crate::model::{
    Applied, Change, FullInventory, HostEvent, HostFacts, HostName, HostRecord, Snapshot,
    SnapshotQuery,
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
/// * every write takes `now` from the caller's clock, so tests drive time.
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
