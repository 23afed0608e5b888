//! xfer-mobility: Mobile-IP-style bindings (after RFC 5944 and RFC 6275)
//! for xfer's handover. Synchronous, pure logic: no sockets, no tokio, no
//! clock reads (every operation takes `now`), so the whole state machine is
//! tested with a [`FakeClock`].
//!
//! A container keeps its *home address* when it migrates. The host it
//! started on becomes its *home agent*: it keeps intercepting traffic for
//! the home address and tunnels it to the *care-of address*, the host the
//! container runs on now. The care-of host tells the home agent where the
//! container is with authenticated *binding updates*; the home agent answers
//! each with a *binding ack*.
//!
//! * [`wire`]: the two messages and their versioned binary encoding
//!   ([`decode`] is a plain function over untrusted bytes, for fuzzing).
//! * [`auth`]: HMAC-SHA256 with a cluster key ([`ClusterKey`], [`Keyring`]).
//! * [`serial`]: 16-bit sequence numbers compared modulo 2^16 (RFC 1982).
//! * [`cache`]: the home agent's [`BindingCache`] (accept/reject, expiry,
//!   lookups, persistence).
//! * [`bul`]: the care-of host's [`BindingUpdateList`] (retransmission with
//!   backoff, refresh, ack handling).
//! * [`clock`]: [`Timestamp`], [`Clock`], [`SystemClock`], [`FakeClock`].
//!
//! # Message flow
//!
//! A container with home address H migrates from A (its home agent) to B,
//! then on to C. Keys: every host holds the cluster key; every message is
//! signed.
//!
//! ```text
//!  care-of host B                 home agent A                  care-of host C
//!  (BindingUpdateList)            (BindingCache)                (BindingUpdateList)
//!        |                              |                               |
//!        | migration A -> B commits     |                               |
//!        |-- BU(H, coa=B, seq=s, L) --->| verify tag, policy, seq       |
//!        |                              | cache: H -> B until now+L     |
//!        |                              | forwarding: tunnel H to B     |
//!        |<-- BAck(Accepted, s, L) -----|                               |
//!        | bound; refresh at 0.8 L      |                               |
//!        |                              |                               |
//!        |-- BU(H, B, s+1, L) --------->| (ack lost)                    |
//!        |   ... 1 s, no ack ...        |                               |
//!        |-- BU(H, B, s+2, L) --------->| newer: refresh                |
//!        |<-- BAck(Accepted, s+2, L) ---|                               |
//!        |                              |                               |
//!        | migration B -> C commits     |                               |
//!        | forget(H)                    |<-- BU(H, coa=C, seq=t, L) ----|  t from the
//!        |                              | t not newer than s+2:         |  migration or
//!        |                              |-- BAck(StaleSequence, s+2) -->|  a fresh list
//!        |                              |<-- BU(H, C, s+3, L) ----------|  resync
//!        |                              | cache: H -> C (Moved): the    |
//!        |                              | tunnel now ends at C, no chain|
//!        |                              |-- BAck(Accepted, s+3, L) ---->|
//!        |                              |                               |
//!        |                              |   ... clients rebind ...      |
//!        |                              |<-- BU(H, C, s+4, 0) ----------|  deregister
//!        |                              | cache: tombstone (seq kept)   |  (or stop
//!        |                              | forwarding: remove tunnel     |  refreshing:
//!        |                              |-- BAck(Accepted, s+4, 0) ---->|  expiry)
//! ```
//!
//! Migrating back home (to A) ends the binding too: A calls
//! [`BindingCache::remove`] itself, or an update whose care-of address is
//! the home address or the home agent's own address arrives; both are
//! deregistrations (a home agent never tunnels to itself).
//!
//! # State machines
//!
//! Binding cache entry, per home address, at the home agent (only an
//! accepted update moves it; every rejection leaves it as it was):
//!
//! ```text
//!                  BU accepted, L > 0
//!   (no entry) ----------------------------+
//!       |                                  v
//!       | BU accepted,              +---> LIVE ---+  BU accepted, newer seq, L > 0:
//!       | deregistration            |      ^      |  Refreshed (same care-of) or
//!       v                           |      +------+  Moved (new care-of)
//!   TOMBSTONE ----------------------+      |
//!       ^    BU accepted, newer seq, L > 0 |
//!       |                                  |
//!       +----------------------------------+
//!         BU accepted, deregistration (L = 0, care-of = home address or
//!         = home agent), remove(), or now >= expires_at (expire)
//!
//!   TOMBSTONE --- tombstone_secs after it was made (expire) ---> (no entry)
//!
//!   Checks for every BU, in order: tag (BadAuth), home agent address
//!   (NotHomeAgent), served home (UnknownHome), usable care-of
//!   (InvalidCareOf), against the entry's last accepted update: identical
//!   sequence and tag (Replayed) or a sequence not newer modulo 2^16
//!   (StaleSequence), lifetime <= max (LifetimeTooLong), cache room
//!   (InsufficientResources).
//! ```
//!
//! "Replayed" versus "stale": *Replayed* is a byte-exact copy of the last
//! accepted update (same sequence, same tag): a duplicate delivered twice by
//! the network, or an attacker replaying a captured message. It changes
//! nothing (it never extends the lifetime) and the ack reports the
//! remaining lifetime, so a genuine sender learns that its update is in
//! place. *Stale* is any other update whose sequence is not newer than the
//! last accepted one (older, equal with different content, or exactly 2^15
//! away): the ack carries the last accepted sequence so a genuine sender can
//! resynchronise.
//!
//! Binding update list entry, per home address, at the care-of host:
//!
//! ```text
//!                register(L > 0)                   ack Accepted / Replayed
//!   (none) -------------------------> REGISTERING --------------------------> BOUND
//!                                      |   ^                                   |  ^
//!   retransmit timer: resend with a    +---+                now >= refresh_at  |  | ack Accepted
//!   new seq after 1, 2, 4, ... 32 s;   ack StaleSequence: resync, resend      v  | / Replayed
//!   ack LifetimeTooLong: resend once with the maximum                     REFRESHING
//!   (REFRESHING follows the same rules)                                  (still bound)
//!
//!   REGISTERING / REFRESHING --- no ack after max retransmissions (GaveUp),
//!       too many resyncs, or another rejection ---> FAILED (a binding still held
//!       is kept until it runs out: Lapsed)
//!
//!   any --- deregister(), or register() with L = 0 or care-of = home address
//!       or = home agent ---> DEREGISTERING
//!   DEREGISTERING --- ack Accepted / Replayed ---> (entry removed)
//!   DEREGISTERING --- no ack after max retransmissions ---> (entry removed,
//!       GaveUp; the binding runs out at the home agent)
//!   any --- forget() ---> (entry removed, nothing sent; the new host registers)
//! ```
//!
//! # Example
//!
//! ```
//! use std::net::Ipv4Addr;
//! use std::time::Duration;
//! use xfer_mobility::*;
//!
//! let key = ClusterKey::new(1, [7_u8; 32]).expect("32-byte key");
//! let home = Ipv4Addr::new(10, 77, 0, 5);
//! let (ha_addr, coa) = (Ipv4Addr::new(10, 1, 0, 1), Ipv4Addr::new(10, 1, 0, 2));
//! let clock = FakeClock::new(Timestamp::from_secs(1_700_000_000));
//!
//! let mut ha = BindingCache::new(HomeAgentConfig::new(ha_addr), Keyring::new(key.clone()));
//! ha.add_home(home);
//! let mut bul = BindingUpdateList::new(BulConfig::default(), Keyring::new(key));
//!
//! let update = bul.register(clock.now(), BindingRequest {
//!     home_address: home,
//!     care_of: coa,
//!     home_agent: ha_addr,
//!     lifetime_secs: 300,
//!     flags: BindingFlags::NONE,
//! });
//! let decision = ha.process(clock.now(), &update.encode()); // bytes over gRPC/UDP
//! assert!(matches!(decision.change, Some(BindingChange::Created(_))));
//! let outcome = bul.handle_ack_bytes(clock.now(), &decision.ack_bytes());
//! assert!(matches!(outcome, AckOutcome::Bound { .. }));
//!
//! clock.advance(Duration::from_secs(301));
//! assert_eq!(ha.expire(clock.now()), [home]);
//! ```

pub mod auth;
pub mod bul;
pub mod cache;
pub mod clock;
pub mod serial;
pub mod wire;

pub use auth::{AuthError, ClusterKey, KeyError, Keyring, MAC_LEN, MIN_KEY_LEN};
pub use bul::{
    AckOutcome, BindingRequest, BindingUpdateList, Bound, BulConfig, BulEntry, BulEvent, BulState,
    Failure, IgnoredAck,
};
pub use cache::{
    Binding, BindingCache, BindingChange, CacheSnapshot, Decision, HomeAgentConfig, PersistError,
    SnapshotEntry, SNAPSHOT_FORMAT, SNAPSHOT_VERSION,
};
pub use clock::{Clock, FakeClock, SystemClock, Timestamp};
pub use wire::{
    decode, BindingAck, BindingFlags, BindingStatus, BindingUpdate, DecodeError, Message,
    MessageType,
};
