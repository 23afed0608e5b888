//! The mobile side's binding update list: what the container's current
//! host (the care-of host) has told each home agent, and what it still has
//! to send.
//!
//! For each home address it keeps the request (care-of address, home agent,
//! lifetime, flags), the last sequence number used, the binding the home
//! agent acknowledged (if any) and, while an update is unacknowledged, a
//! *round*: the updates sent so far and when to retransmit.
//!
//! * Every transmission, retransmissions included, uses a new sequence
//!   number (RFC 6275 11.8). An ack for any update of the current round
//!   completes it; the lifetime is counted from when *that* update was sent,
//!   which is never later than when the home agent accepted it, so the
//!   mobile side's idea of the expiry is conservative.
//! * Retransmission: the first timeout is
//!   [`BulConfig::initial_timeout`] (1 s), each next one doubles, capped at
//!   [`BulConfig::max_timeout`] (32 s); after
//!   [`BulConfig::max_retransmissions`] retransmissions without an ack the
//!   round gives up ([`BulEvent::GaveUp`]).
//! * Refresh: a bound binding is re-registered at
//!   [`BulConfig::refresh_permille`] (800 = 80 %) of its granted lifetime.
//!   It stays bound (until its expiry) while the refresh is in progress; if
//!   it runs out first, [`BulEvent::Lapsed`] says so.
//! * Acks (which must carry a valid tag): `Accepted` binds (or, for a
//!   deregistration, removes the entry); `Replayed` for an update of the
//!   round means the home agent already holds it, treated like `Accepted`
//!   with the remaining lifetime the ack carries; `StaleSequence` resyncs
//!   the sequence past the home agent's last accepted one and retries at
//!   once (at most [`BulConfig::max_resyncs`] times per round);
//!   `LifetimeTooLong` retries once with the maximum the ack carries; any
//!   other rejection fails the entry.
//!
//! The list is driven from outside: call [`BindingUpdateList::poll`] at
//! [`BindingUpdateList::next_deadline`] (or periodically) and send what it
//! returns; feed received acks to [`BindingUpdateList::handle_ack_bytes`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::auth::{AuthError, Keyring};
use crate::clock::Timestamp;
use crate::serial;
use crate::wire::{
    decode, BindingAck, BindingFlags, BindingStatus, BindingUpdate, DecodeError, Message,
};

/// Timers and limits of the binding update list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulConfig {
    /// Wait for an ack after the first transmission (RFC 6275
    /// `INITIAL_BINDACK_TIMEOUT`: 1 s).
    pub initial_timeout: Duration,
    /// Longest wait between retransmissions (RFC 6275
    /// `MAX_BINDACK_TIMEOUT`: 32 s).
    pub max_timeout: Duration,
    /// Retransmissions after the first transmission before giving up.
    pub max_retransmissions: u32,
    /// Refresh a bound binding at this fraction (per mille) of its
    /// lifetime; clamped to 1..=1000.
    pub refresh_permille: u16,
    /// `StaleSequence` resyncs allowed per round (a second host still
    /// refreshing the same home address would otherwise ping-pong).
    pub max_resyncs: u32,
    /// The first sequence number used for a home address the list has no
    /// history for (use a random value in production, see
    /// [`BindingUpdateList::set_last_sequence`] for continuity across
    /// hosts).
    pub initial_sequence: u16,
}

impl Default for BulConfig {
    fn default() -> Self {
        BulConfig {
            initial_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(32),
            max_retransmissions: 7,
            refresh_permille: 800,
            max_resyncs: 3,
            initial_sequence: 0,
        }
    }
}

impl BulConfig {
    /// How long to wait for an ack after transmission number `n` of a
    /// round (0 = the first): `initial_timeout * 2^n`, capped at
    /// `max_timeout`.
    pub fn timeout(&self, n: u32) -> Duration {
        let factor = 1_u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.initial_timeout
            .checked_mul(factor)
            .unwrap_or(self.max_timeout)
            .min(self.max_timeout)
    }
}

/// What to register: the binding request of one home address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingRequest {
    /// The container's home address.
    pub home_address: Ipv4Addr,
    /// This host's address.
    pub care_of: Ipv4Addr,
    /// The container's home agent.
    pub home_agent: Ipv4Addr,
    /// Requested lifetime in seconds (more than 0; use
    /// [`BindingUpdateList::deregister`] to deregister).
    pub lifetime_secs: u32,
    /// Flags (reverse tunnel).
    pub flags: BindingFlags,
}

/// A binding the home agent acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The acknowledged sequence.
    pub sequence: u16,
    /// The granted lifetime in seconds.
    pub lifetime_secs: u32,
    /// When the acknowledged update was sent (the lifetime counts from
    /// there).
    pub since: Timestamp,
    /// When the binding ends at the latest unless refreshed.
    pub expires_at: Timestamp,
    /// When the refresh starts.
    pub refresh_at: Timestamp,
}

/// Why an entry failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No ack after this many transmissions.
    NoAck {
        /// Transmissions of the round.
        transmissions: u32,
    },
    /// The home agent refused the update.
    Rejected(BindingStatus),
    /// Too many `StaleSequence` answers in one round.
    TooManyResyncs,
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulState {
    /// A registration is unacknowledged (no binding yet).
    Registering,
    /// Bound, the refresh is unacknowledged.
    Refreshing,
    /// Bound, nothing to do until the refresh time.
    Bound,
    /// A deregistration is unacknowledged.
    Deregistering,
    /// The last round failed; [`BulEntry::bound`] may still show a binding
    /// that has not run out yet.
    Failed(Failure),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Round {
    /// Sequence and send time of each transmission of the round.
    sent: Vec<(u16, Timestamp)>,
    /// Transmissions since the backoff last restarted.
    transmissions: u32,
    retransmit_at: Timestamp,
    resyncs: u32,
    lifetime_reduced: bool,
}

/// One home address in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulEntry {
    request: BindingRequest,
    deregistering: bool,
    bound: Option<Bound>,
    failure: Option<Failure>,
    round: Option<Round>,
}

impl BulEntry {
    /// What is being registered.
    pub fn request(&self) -> &BindingRequest {
        &self.request
    }

    /// The acknowledged binding, if any (it may be past its expiry until
    /// the next [`BindingUpdateList::poll`]).
    pub fn bound(&self) -> Option<&Bound> {
        self.bound.as_ref()
    }

    /// The state.
    pub fn state(&self) -> BulState {
        match (&self.round, self.failure, &self.bound) {
            (Some(_), _, _) if self.deregistering => BulState::Deregistering,
            (Some(_), _, Some(_)) => BulState::Refreshing,
            (Some(_), _, None) => BulState::Registering,
            (None, Some(f), _) => BulState::Failed(f),
            (None, None, _) => BulState::Bound,
        }
    }

    /// When the current round retransmits next.
    pub fn retransmit_at(&self) -> Option<Timestamp> {
        self.round.as_ref().map(|r| r.retransmit_at)
    }

    /// Transmissions of the current round since its backoff (re)started.
    pub fn transmissions(&self) -> u32 {
        self.round.as_ref().map_or(0, |r| r.transmissions)
    }
}

/// Something [`BindingUpdateList::poll`] wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulEvent {
    /// Send this (signed) update to its home agent.
    Send(BindingUpdate),
    /// A round got no ack after the last retransmission.
    GaveUp {
        /// The home address.
        home_address: Ipv4Addr,
        /// Transmissions made.
        transmissions: u32,
    },
    /// A binding ran out before a refresh was acknowledged.
    Lapsed {
        /// The home address.
        home_address: Ipv4Addr,
    },
}

/// Why an ack was ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgnoredAck {
    /// The bytes are not a valid message.
    Malformed(DecodeError),
    /// The bytes are a binding update, not an ack.
    NotAnAck,
    /// The tag does not verify.
    BadAuth(AuthError),
    /// No entry for that home address.
    UnknownHome,
    /// Nothing is awaiting an ack for that home address (a duplicate or
    /// late ack).
    NotPending,
    /// The sequence matches no update of the current round.
    SequenceMismatch,
}

/// What an ack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// A registration or refresh was accepted.
    Bound {
        /// The home address.
        home_address: Ipv4Addr,
        /// The binding.
        bound: Bound,
    },
    /// A deregistration was accepted; the entry is gone.
    Deregistered {
        /// The home address.
        home_address: Ipv4Addr,
    },
    /// Send this update now (after a resync or a lifetime reduction).
    Retry(BindingUpdate),
    /// The home agent refused; the entry failed.
    Rejected {
        /// The home address.
        home_address: Ipv4Addr,
        /// Why.
        status: BindingStatus,
    },
    /// Nothing changed.
    Ignored(IgnoredAck),
}

/// The binding update list. See the module docs.
#[derive(Debug, Clone)]
pub struct BindingUpdateList {
    config: BulConfig,
    keys: Keyring,
    entries: BTreeMap<Ipv4Addr, BulEntry>,
    /// Last sequence used per home address; outlives entries so that a
    /// re-registration continues where the last one stopped.
    last_sequence: BTreeMap<Ipv4Addr, u16>,
}

impl BindingUpdateList {
    /// An empty list.
    pub fn new(config: BulConfig, keys: Keyring) -> Self {
        BindingUpdateList {
            config,
            keys,
            entries: BTreeMap::new(),
            last_sequence: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BulConfig {
        &self.config
    }

    /// The keyring (for rotation).
    pub fn keys_mut(&mut self) -> &mut Keyring {
        &mut self.keys
    }

    /// Seed the sequence of `home` (e.g. with the last one the previous
    /// care-of host used, carried along with the migration), so the next
    /// update uses `seq + 1` and the home agent need not answer
    /// `StaleSequence` first.
    pub fn set_last_sequence(&mut self, home: Ipv4Addr, seq: u16) {
        self.last_sequence.insert(home, seq);
    }

    /// The last sequence used for `home`.
    pub fn last_sequence(&self, home: Ipv4Addr) -> Option<u16> {
        self.last_sequence.get(&home).copied()
    }

    fn next_sequence(&mut self, home: Ipv4Addr) -> u16 {
        let seq = match self.last_sequence.get(&home) {
            Some(&last) => serial::next(last),
            None => self.config.initial_sequence,
        };
        self.last_sequence.insert(home, seq);
        seq
    }

    /// Start registering `request` at `now` (a new binding, or a new
    /// care-of address for an existing one: any round in progress is
    /// replaced). Returns the signed update to send now. A lifetime of 0,
    /// or a care-of address equal to the home address or to the home agent
    /// (the container is back home), is a deregistration, as with
    /// [`BindingUpdateList::deregister`].
    pub fn register(&mut self, now: Timestamp, request: BindingRequest) -> BindingUpdate {
        let home = request.home_address;
        // Lifetime 0, or back home (at the home address or on the home
        // agent's host): deregister.
        let deregistering = request.lifetime_secs == 0
            || request.care_of == home
            || request.care_of == request.home_agent;
        let bound = self.entries.get(&home).and_then(|e| e.bound);
        self.entries.insert(
            home,
            BulEntry {
                request,
                deregistering,
                bound,
                failure: None,
                round: None,
            },
        );
        self.start_round(now, home)
    }

    /// Start deregistering `home` (lifetime 0) at `now`; `None` if the list
    /// has no entry for it.
    pub fn deregister(&mut self, now: Timestamp, home: Ipv4Addr) -> Option<BindingUpdate> {
        let entry = self.entries.get_mut(&home)?;
        entry.deregistering = true;
        entry.failure = None;
        entry.round = None;
        Some(self.start_round(now, home))
    }

    /// Drop `home` without telling the home agent (the container left this
    /// host: its new host registers now). The sequence history is kept.
    pub fn forget(&mut self, home: Ipv4Addr) -> Option<BulEntry> {
        self.entries.remove(&home)
    }

    /// The entry of `home`.
    pub fn get(&self, home: Ipv4Addr) -> Option<&BulEntry> {
        self.entries.get(&home)
    }

    /// All entries by home address.
    pub fn iter(&self) -> impl Iterator<Item = (Ipv4Addr, &BulEntry)> + '_ {
        self.entries.iter().map(|(h, e)| (*h, e))
    }

    /// Build, sign and record the next transmission for `home` (whose
    /// entry exists), opening a round if none is open.
    fn transmit(&mut self, now: Timestamp, home: Ipv4Addr) -> BindingUpdate {
        let seq = self.next_sequence(home);
        let config = self.config.clone();
        let key = self.keys.active().clone();
        let Some(entry) = self.entries.get_mut(&home) else {
            // Callers only transmit for existing entries; an update for a
            // vanished one is harmless.
            return BindingUpdate::new(home, home, home, seq, 0, BindingFlags::NONE);
        };
        let r = &entry.request;
        let lifetime = if entry.deregistering {
            0
        } else {
            r.lifetime_secs
        };
        let update =
            BindingUpdate::new(home, r.care_of, r.home_agent, seq, lifetime, r.flags).signed(&key);
        let round = entry.round.get_or_insert_with(|| Round {
            sent: Vec::new(),
            transmissions: 0,
            retransmit_at: now,
            resyncs: 0,
            lifetime_reduced: false,
        });
        round.sent.push((seq, now));
        round.retransmit_at = now + config.timeout(round.transmissions);
        round.transmissions += 1;
        update
    }

    fn start_round(&mut self, now: Timestamp, home: Ipv4Addr) -> BindingUpdate {
        if let Some(e) = self.entries.get_mut(&home) {
            e.round = None;
            e.failure = None;
        }
        self.transmit(now, home)
    }

    /// Do what is due at `now`: retransmit unacknowledged updates whose
    /// timeout passed (or give up after the last one), start refreshes,
    /// report bindings that ran out.
    pub fn poll(&mut self, now: Timestamp) -> Vec<BulEvent> {
        let mut events = Vec::new();
        let homes: Vec<Ipv4Addr> = self.entries.keys().copied().collect();
        for home in homes {
            let Some(entry) = self.entries.get_mut(&home) else {
                continue;
            };
            if entry.bound.is_some_and(|b| now >= b.expires_at) {
                entry.bound = None;
                events.push(BulEvent::Lapsed { home_address: home });
            }
            match &entry.round {
                Some(round) if now >= round.retransmit_at => {
                    if round.transmissions > self.config.max_retransmissions {
                        let transmissions = round.transmissions;
                        entry.round = None;
                        if entry.deregistering {
                            // The binding runs out at the home agent anyway.
                            self.entries.remove(&home);
                        } else {
                            entry.failure = Some(Failure::NoAck { transmissions });
                        }
                        events.push(BulEvent::GaveUp {
                            home_address: home,
                            transmissions,
                        });
                    } else {
                        events.push(BulEvent::Send(self.transmit(now, home)));
                    }
                }
                Some(_) => {}
                None => {
                    let refresh_due = entry.failure.is_none()
                        && !entry.deregistering
                        && entry.bound.is_some_and(|b| now >= b.refresh_at);
                    if refresh_due {
                        events.push(BulEvent::Send(self.start_round(now, home)));
                    }
                }
            }
        }
        events
    }

    /// The earliest time [`BindingUpdateList::poll`] has something to do.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.entries
            .values()
            .flat_map(|e| {
                let timer = match (&e.round, e.failure) {
                    (Some(r), _) => Some(r.retransmit_at),
                    (None, None) if !e.deregistering => e.bound.map(|b| b.refresh_at),
                    _ => None,
                };
                [timer, e.bound.map(|b| b.expires_at)]
            })
            .flatten()
            .min()
    }

    /// Handle the bytes of a received ack.
    pub fn handle_ack_bytes(&mut self, now: Timestamp, bytes: &[u8]) -> AckOutcome {
        match decode(bytes) {
            Ok(Message::Ack(ack)) => self.handle_ack(now, &ack),
            Ok(Message::Update(_)) => AckOutcome::Ignored(IgnoredAck::NotAnAck),
            Err(e) => AckOutcome::Ignored(IgnoredAck::Malformed(e)),
        }
    }

    /// Handle a decoded ack (its tag is checked here).
    pub fn handle_ack(&mut self, now: Timestamp, ack: &BindingAck) -> AckOutcome {
        if let Err(e) = ack.verify(&self.keys) {
            return AckOutcome::Ignored(IgnoredAck::BadAuth(e));
        }
        let home = ack.home_address;
        let max_resyncs = self.config.max_resyncs;
        let permille = u64::from(self.config.refresh_permille.clamp(1, 1000));
        let Some(entry) = self.entries.get_mut(&home) else {
            return AckOutcome::Ignored(IgnoredAck::UnknownHome);
        };
        let Some(round) = entry.round.as_mut() else {
            return AckOutcome::Ignored(IgnoredAck::NotPending);
        };
        let sent_at = round
            .sent
            .iter()
            .find(|(seq, _)| *seq == ack.sequence)
            .map(|(_, at)| *at);
        match ack.status {
            BindingStatus::Accepted | BindingStatus::Replayed => {
                let Some(since) = sent_at else {
                    return AckOutcome::Ignored(IgnoredAck::SequenceMismatch);
                };
                entry.round = None;
                if entry.deregistering {
                    self.entries.remove(&home);
                    return AckOutcome::Deregistered { home_address: home };
                }
                if ack.lifetime_secs == 0 {
                    // A replay ack for a binding that has run out at the
                    // home agent: register afresh.
                    entry.bound = None;
                    return AckOutcome::Retry(self.start_round(now, home));
                }
                let lifetime_ms = u64::from(ack.lifetime_secs) * 1000;
                let bound = Bound {
                    sequence: ack.sequence,
                    lifetime_secs: ack.lifetime_secs,
                    since,
                    expires_at: Timestamp::from_millis(since.as_millis() + lifetime_ms),
                    refresh_at: Timestamp::from_millis(
                        since.as_millis() + lifetime_ms * permille / 1000,
                    ),
                };
                entry.bound = Some(bound);
                entry.failure = None;
                AckOutcome::Bound {
                    home_address: home,
                    bound,
                }
            }
            BindingStatus::StaleSequence => {
                // The ack carries the home agent's last accepted sequence; it
                // must not be older than what this round started with, or it
                // answers something else.
                let first = round.sent.first().map_or(ack.sequence, |(s, _)| *s);
                if serial::is_newer(first, ack.sequence) {
                    return AckOutcome::Ignored(IgnoredAck::SequenceMismatch);
                }
                if round.resyncs >= max_resyncs {
                    entry.round = None;
                    entry.failure = Some(Failure::TooManyResyncs);
                    return AckOutcome::Rejected {
                        home_address: home,
                        status: BindingStatus::StaleSequence,
                    };
                }
                let resyncs = round.resyncs + 1;
                let reduced = round.lifetime_reduced;
                self.last_sequence.insert(home, ack.sequence);
                let update = self.start_round(now, home);
                if let Some(r) = self.entries.get_mut(&home).and_then(|e| e.round.as_mut()) {
                    r.resyncs = resyncs;
                    r.lifetime_reduced = reduced;
                }
                AckOutcome::Retry(update)
            }
            BindingStatus::LifetimeTooLong
                if sent_at.is_some()
                    && !round.lifetime_reduced
                    && ack.lifetime_secs > 0
                    && ack.lifetime_secs < entry.request.lifetime_secs =>
            {
                entry.request.lifetime_secs = ack.lifetime_secs;
                let resyncs = round.resyncs;
                let update = self.start_round(now, home);
                if let Some(r) = self.entries.get_mut(&home).and_then(|e| e.round.as_mut()) {
                    r.resyncs = resyncs;
                    r.lifetime_reduced = true;
                }
                AckOutcome::Retry(update)
            }
            status => {
                if sent_at.is_none() {
                    return AckOutcome::Ignored(IgnoredAck::SequenceMismatch);
                }
                entry.round = None;
                entry.failure = Some(Failure::Rejected(status));
                AckOutcome::Rejected {
                    home_address: home,
                    status,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ClusterKey;
    use crate::cache::{BindingCache, HomeAgentConfig};
    use crate::clock::{Clock, FakeClock};

    const HA: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const HOME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

    fn key() -> ClusterKey {
        ClusterKey::new(1, vec![0x11; 32]).expect("key")
    }

    fn bul() -> BindingUpdateList {
        BindingUpdateList::new(BulConfig::default(), Keyring::new(key()))
    }

    fn request(lifetime: u32) -> BindingRequest {
        BindingRequest {
            home_address: HOME,
            care_of: B,
            home_agent: HA,
            lifetime_secs: lifetime,
            flags: BindingFlags::NONE,
        }
    }

    fn ack(status: BindingStatus, seq: u16, lifetime: u32) -> BindingAck {
        BindingAck::new(status, HOME, seq, lifetime).signed(&key())
    }

    fn start() -> Timestamp {
        Timestamp::from_secs(1_000_000)
    }

    fn sends(events: &[BulEvent]) -> Vec<u16> {
        events
            .iter()
            .filter_map(|e| match e {
                BulEvent::Send(u) => Some(u.sequence),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn backoff_schedule() {
        let c = BulConfig::default();
        let secs: Vec<u64> = (0..9).map(|n| c.timeout(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 32, 32, 32]);
        assert_eq!(c.timeout(1000), Duration::from_secs(32));
        let custom = BulConfig {
            initial_timeout: Duration::from_millis(250),
            max_timeout: Duration::from_secs(3),
            ..BulConfig::default()
        };
        let ms: Vec<u128> = (0..6).map(|n| custom.timeout(n).as_millis()).collect();
        assert_eq!(ms, [250, 500, 1000, 2000, 3000, 3000]);
    }

    #[test]
    fn retransmits_with_exponential_backoff_then_gives_up() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        let first = l.register(clock.now(), request(100));
        assert_eq!(first.sequence, 0);
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Registering)
        );
        first.verify(&Keyring::new(key())).expect("signed");

        // Record when each transmission happens, polling every 100 ms.
        let mut times = vec![0_u64];
        let mut seqs = vec![first.sequence];
        let mut gave_up = None;
        for _ in 0..4000 {
            clock.advance(Duration::from_millis(100));
            for e in l.poll(clock.now()) {
                match e {
                    BulEvent::Send(u) => {
                        times.push(clock.now().saturating_since(start()).as_millis() as u64);
                        seqs.push(u.sequence);
                    }
                    BulEvent::GaveUp { transmissions, .. } => {
                        gave_up = Some((clock.now().saturating_since(start()), transmissions));
                    }
                    BulEvent::Lapsed { .. } => panic!("nothing was bound"),
                }
            }
            if gave_up.is_some() {
                break;
            }
        }
        // 1, 2, 4, 8, 16, 32, 32 s apart: 7 retransmissions.
        assert_eq!(
            times,
            [0, 1_000, 3_000, 7_000, 15_000, 31_000, 63_000, 95_000]
        );
        // A new sequence number for each transmission.
        assert_eq!(seqs, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(gave_up, Some((Duration::from_secs(127), 8)));
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Failed(Failure::NoAck { transmissions: 8 }))
        );
        assert_eq!(l.next_deadline(), None);
        assert!(l.poll(clock.now() + Duration::from_secs(1000)).is_empty());
    }

    #[test]
    fn ack_binds_and_refresh_happens_at_80_percent() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        let u = l.register(clock.now(), request(100));
        assert_eq!(l.next_deadline(), Some(start() + Duration::from_secs(1)));
        clock.advance(Duration::from_millis(300));
        let out = l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, u.sequence, 100));
        let bound = match out {
            AckOutcome::Bound { bound, .. } => bound,
            other => panic!("{other:?}"),
        };
        // Counted from the send time, not the ack's arrival.
        assert_eq!(bound.since, start());
        assert_eq!(bound.expires_at, start() + Duration::from_secs(100));
        assert_eq!(bound.refresh_at, start() + Duration::from_secs(80));
        assert_eq!(l.get(HOME).map(BulEntry::state), Some(BulState::Bound));
        assert_eq!(l.next_deadline(), Some(bound.refresh_at));
        // A duplicate ack changes nothing.
        assert_eq!(
            l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, u.sequence, 100)),
            AckOutcome::Ignored(IgnoredAck::NotPending)
        );

        clock.set(start() + Duration::from_millis(79_999));
        assert!(l.poll(clock.now()).is_empty());
        clock.set(start() + Duration::from_secs(80));
        let events = l.poll(clock.now());
        assert_eq!(sends(&events), [1]);
        assert_eq!(l.get(HOME).map(BulEntry::state), Some(BulState::Refreshing));
        assert!(
            l.get(HOME).and_then(BulEntry::bound).is_some(),
            "still bound while refreshing"
        );
        clock.advance(Duration::from_millis(50));
        match l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, 1, 100)) {
            AckOutcome::Bound { bound, .. } => {
                assert_eq!(bound.refresh_at, start() + Duration::from_secs(160));
                assert_eq!(bound.sequence, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_late_ack_for_an_earlier_transmission_completes_the_round() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        l.register(clock.now(), request(100));
        clock.advance(Duration::from_secs(1));
        assert_eq!(sends(&l.poll(clock.now())), [1]);
        clock.advance(Duration::from_millis(500));
        match l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, 0, 100)) {
            AckOutcome::Bound { bound, .. } => assert_eq!(bound.since, start()),
            other => panic!("{other:?}"),
        }
        // Unknown sequence numbers are not acks for this round.
        l.register(clock.now(), request(100));
        assert_eq!(
            l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, 40, 100)),
            AckOutcome::Ignored(IgnoredAck::SequenceMismatch)
        );
    }

    #[test]
    fn refresh_that_never_gets_an_ack_lapses() {
        let clock = FakeClock::new(start());
        let cfg = BulConfig {
            max_retransmissions: 2,
            ..BulConfig::default()
        };
        let mut l = BindingUpdateList::new(cfg, Keyring::new(key()));
        let u = l.register(clock.now(), request(10));
        l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, u.sequence, 10));
        let mut lapsed_at = None;
        let mut gave_up_at = None;
        for _ in 0..200 {
            clock.advance(Duration::from_millis(100));
            for e in l.poll(clock.now()) {
                match e {
                    BulEvent::Lapsed { .. } => lapsed_at = Some(clock.now()),
                    BulEvent::GaveUp { .. } => gave_up_at = Some(clock.now()),
                    BulEvent::Send(_) => {}
                }
            }
        }
        // Refresh at 8 s, retransmissions at 9 s and 11 s, binding ends at
        // 10 s, round gives up at 15 s.
        assert_eq!(lapsed_at, Some(start() + Duration::from_secs(10)));
        assert_eq!(gave_up_at, Some(start() + Duration::from_secs(15)));
        assert!(l.get(HOME).and_then(BulEntry::bound).is_none());
    }

    #[test]
    fn stale_sequence_resyncs_and_retries() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        let u = l.register(clock.now(), request(100));
        assert_eq!(u.sequence, 0);
        // The home agent last accepted 500 (from the previous care-of host).
        match l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, 500, 0)) {
            AckOutcome::Retry(u) => assert_eq!(u.sequence, 501),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.last_sequence(HOME), Some(501));
        match l.handle_ack(clock.now(), &ack(BindingStatus::Accepted, 501, 100)) {
            AckOutcome::Bound { bound, .. } => assert_eq!(bound.sequence, 501),
            other => panic!("{other:?}"),
        }
        // A "stale" answer naming a sequence the update is newer than
        // (modulo 2^16: 502 is newer than 65535) does not answer it.
        let u = l.register(clock.now(), request(100));
        assert_eq!(u.sequence, 502);
        assert_eq!(
            l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, 65535, 0)),
            AckOutcome::Ignored(IgnoredAck::SequenceMismatch)
        );
        // Resync across the wrap: at 65001, the home agent is at 65535.
        l.set_last_sequence(HOME, 65000);
        let u = l.register(clock.now(), request(100));
        assert_eq!(u.sequence, 65001);
        match l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, 65535, 0)) {
            AckOutcome::Retry(u) => assert_eq!(u.sequence, 0),
            other => panic!("{other:?}"),
        }
        // A "stale" ack naming a sequence older than the round's first is
        // not an answer to this round.
        let u = l.register(clock.now(), request(100));
        assert_eq!(u.sequence, 1);
        assert_eq!(
            l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, 0, 0)),
            AckOutcome::Ignored(IgnoredAck::SequenceMismatch)
        );
    }

    #[test]
    fn resyncs_are_bounded() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        l.register(clock.now(), request(100));
        let mut ha_seq = 1000_u16;
        for _ in 0..3 {
            assert!(matches!(
                l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, ha_seq, 0)),
                AckOutcome::Retry(_)
            ));
            ha_seq += 10;
        }
        assert_eq!(
            l.handle_ack(clock.now(), &ack(BindingStatus::StaleSequence, ha_seq, 0)),
            AckOutcome::Rejected {
                home_address: HOME,
                status: BindingStatus::StaleSequence
            }
        );
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Failed(Failure::TooManyResyncs))
        );
    }

    #[test]
    fn lifetime_too_long_retries_once_with_the_maximum() {
        let clock = FakeClock::new(start());
        let mut l = bul();
        let u = l.register(clock.now(), request(7200));
        let retry = match l.handle_ack(
            clock.now(),
            &ack(BindingStatus::LifetimeTooLong, u.sequence, 3600),
        ) {
            AckOutcome::Retry(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!((retry.sequence, retry.lifetime_secs), (1, 3600));
        assert_eq!(
            l.handle_ack(
                clock.now(),
                &ack(BindingStatus::LifetimeTooLong, retry.sequence, 1800)
            ),
            AckOutcome::Rejected {
                home_address: HOME,
                status: BindingStatus::LifetimeTooLong
            }
        );
    }

    #[test]
    fn rejections_fail_the_entry() {
        for status in [
            BindingStatus::BadAuth,
            BindingStatus::NotHomeAgent,
            BindingStatus::UnknownHome,
            BindingStatus::Malformed,
            BindingStatus::InvalidCareOf,
            BindingStatus::InsufficientResources,
        ] {
            let mut l = bul();
            let u = l.register(start(), request(100));
            assert_eq!(
                l.handle_ack(start(), &ack(status, u.sequence, 0)),
                AckOutcome::Rejected {
                    home_address: HOME,
                    status
                }
            );
            assert_eq!(
                l.get(HOME).map(BulEntry::state),
                Some(BulState::Failed(Failure::Rejected(status)))
            );
            assert!(l.poll(start() + Duration::from_secs(500)).is_empty());
        }
    }

    #[test]
    fn forged_and_garbage_acks_are_ignored() {
        let mut l = bul();
        let u = l.register(start(), request(100));
        let forged = BindingAck::new(BindingStatus::Accepted, HOME, u.sequence, 100)
            .signed(&ClusterKey::new(1, vec![0x99; 32]).expect("key"));
        assert_eq!(
            l.handle_ack_bytes(start(), &forged.encode()),
            AckOutcome::Ignored(IgnoredAck::BadAuth(AuthError::BadMac))
        );
        assert!(matches!(
            l.handle_ack_bytes(start(), b"nonsense"),
            AckOutcome::Ignored(IgnoredAck::Malformed(_))
        ));
        assert_eq!(
            l.handle_ack_bytes(start(), &u.encode()),
            AckOutcome::Ignored(IgnoredAck::NotAnAck)
        );
        let stranger = BindingAck::new(BindingStatus::Accepted, C, u.sequence, 100).signed(&key());
        assert_eq!(
            l.handle_ack(start(), &stranger),
            AckOutcome::Ignored(IgnoredAck::UnknownHome)
        );
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Registering)
        );
    }

    #[test]
    fn replayed_ack_for_this_round_counts_as_accepted() {
        let mut l = bul();
        let u = l.register(start(), request(100));
        match l.handle_ack(start(), &ack(BindingStatus::Replayed, u.sequence, 60)) {
            AckOutcome::Bound { bound, .. } => {
                assert_eq!(bound.expires_at, start() + Duration::from_secs(60));
            }
            other => panic!("{other:?}"),
        }
        // Replayed with nothing left: register afresh.
        let u = l.register(start(), request(100));
        match l.handle_ack(start(), &ack(BindingStatus::Replayed, u.sequence, 0)) {
            AckOutcome::Retry(r) => assert_eq!(r.sequence, u.sequence.wrapping_add(1)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deregistration_removes_the_entry_once_acked() {
        let mut l = bul();
        let u = l.register(start(), request(100));
        l.handle_ack(start(), &ack(BindingStatus::Accepted, u.sequence, 100));
        let d = l.deregister(start(), HOME).expect("entry exists");
        assert_eq!((d.lifetime_secs, d.sequence), (0, 1));
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Deregistering)
        );
        assert_eq!(
            l.handle_ack(start(), &ack(BindingStatus::Accepted, 1, 0)),
            AckOutcome::Deregistered { home_address: HOME }
        );
        assert!(l.get(HOME).is_none());
        assert!(l.deregister(start(), HOME).is_none());
        // The history stays: a new registration continues the sequence.
        assert_eq!(l.register(start(), request(100)).sequence, 2);
        assert!(l.forget(HOME).is_some());
        assert_eq!(l.register(start(), request(100)).sequence, 3);
    }

    #[test]
    fn registering_at_the_home_agent_deregisters() {
        let mut l = bul();
        let mut req = request(100);
        req.care_of = HA;
        let u = l.register(start(), req);
        assert_eq!(u.lifetime_secs, 0);
        assert_eq!(
            l.get(HOME).map(BulEntry::state),
            Some(BulState::Deregistering)
        );
        assert_eq!(
            l.handle_ack(start(), &ack(BindingStatus::Accepted, u.sequence, 0)),
            AckOutcome::Deregistered { home_address: HOME }
        );
    }

    #[test]
    fn seeded_sequence_continues_across_hosts() {
        let mut l = bul();
        l.set_last_sequence(HOME, 65535);
        assert_eq!(l.register(start(), request(100)).sequence, 0);
        let mut l = BindingUpdateList::new(
            BulConfig {
                initial_sequence: 4242,
                ..BulConfig::default()
            },
            Keyring::new(key()),
        );
        assert_eq!(l.register(start(), request(100)).sequence, 4242);
    }

    /// The two sides together, messages carried as bytes, with a fake
    /// clock: registration, a lost ack, refresh, a move A -> B -> C with a
    /// fresh list at C (resync), expiry, deregistration.
    #[test]
    fn home_agent_and_mobile_side_together() {
        let clock = FakeClock::new(start());
        let ring = Keyring::new(key());
        let mut ha = BindingCache::new(HomeAgentConfig::new(HA), ring.clone());
        ha.add_home(HOME);
        let mut at_b = BindingUpdateList::new(BulConfig::default(), ring.clone());

        // B registers; the first ack is lost.
        let u = at_b.register(clock.now(), request(60));
        let lost = ha.process(clock.now(), &u.encode());
        assert!(lost.change.is_some());
        clock.advance(Duration::from_secs(1));
        let events = at_b.poll(clock.now());
        let BulEvent::Send(retry) = &events[0] else {
            panic!("{events:?}")
        };
        let d = ha.process(clock.now(), &retry.encode());
        assert_eq!(d.ack.status, BindingStatus::Accepted);
        let out = at_b.handle_ack_bytes(clock.now(), &d.ack_bytes());
        assert!(matches!(out, AckOutcome::Bound { .. }), "{out:?}");
        assert_eq!(ha.lookup(HOME, clock.now()).map(|b| b.care_of), Some(B));

        // The container moves to C, whose list knows nothing.
        at_b.forget(HOME);
        let mut at_c = BindingUpdateList::new(BulConfig::default(), ring.clone());
        let mut req = request(60);
        req.care_of = C;
        let u = at_c.register(clock.now(), req);
        let d = ha.process(clock.now(), &u.encode());
        assert_eq!(d.ack.status, BindingStatus::StaleSequence);
        let AckOutcome::Retry(u) = at_c.handle_ack_bytes(clock.now(), &d.ack_bytes()) else {
            panic!("expected a retry");
        };
        let d = ha.process(clock.now(), &u.encode());
        assert!(matches!(
            d.change,
            Some(crate::cache::BindingChange::Moved { .. })
        ));
        at_c.handle_ack_bytes(clock.now(), &d.ack_bytes());
        assert_eq!(ha.lookup(HOME, clock.now()).map(|b| b.care_of), Some(C));

        // A message replayed by an attacker is refused.
        assert_eq!(
            ha.process(clock.now(), &u.encode()).ack.status,
            BindingStatus::Replayed
        );

        // Refresh keeps it alive past the first lifetime.
        for _ in 0..100 {
            clock.advance(Duration::from_secs(1));
            for e in at_c.poll(clock.now()) {
                if let BulEvent::Send(u) = e {
                    let d = ha.process(clock.now(), &u.encode());
                    at_c.handle_ack_bytes(clock.now(), &d.ack_bytes());
                }
            }
            assert!(ha.expire(clock.now()).is_empty());
        }
        assert!(ha.lookup(HOME, clock.now()).is_some());

        // C stops refreshing (e.g. every client rebound): it expires.
        at_c.forget(HOME);
        clock.advance(Duration::from_secs(61));
        assert_eq!(ha.expire(clock.now()), [HOME]);

        // Registered again, then deregistered.
        let u = at_c.register(clock.now(), req_c());
        let d = ha.process(clock.now(), &u.encode());
        at_c.handle_ack_bytes(clock.now(), &d.ack_bytes());
        let u = at_c.deregister(clock.now(), HOME).expect("entry");
        let d = ha.process(clock.now(), &u.encode());
        assert_eq!(
            at_c.handle_ack_bytes(clock.now(), &d.ack_bytes()),
            AckOutcome::Deregistered { home_address: HOME }
        );
        assert!(ha.is_empty());
    }

    fn req_c() -> BindingRequest {
        BindingRequest {
            care_of: C,
            ..request(60)
        }
    }
}
