//! The home agent's binding cache.
//!
//! One entry per home address the home agent has heard about: the live
//! binding (care-of address, expiry) if any, and always the sequence number
//! and tag of the last accepted update, so that stale and replayed updates
//! are recognised after the binding itself has gone. An entry whose binding
//! expired or was deregistered stays as a *tombstone* for
//! [`HomeAgentConfig::tombstone_secs`], then is pruned.
//!
//! [`BindingCache::process`] takes an update's bytes and returns the signed
//! ack to send back plus what changed for the forwarding layer;
//! [`BindingCache::expire`] ends bindings whose lifetime has run out; the
//! forwarding layer reads the live bindings with [`BindingCache::iter`] and
//! [`BindingCache::lookup`]. [`BindingCache::save`] and
//! [`BindingCache::load`] persist everything but the keys, as JSON written
//! atomically, so an agent restart keeps its bindings and another host can
//! take the home agent role over.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::{Keyring, MAC_LEN};
use crate::clock::Timestamp;
use crate::serial;
use crate::wire::{decode, BindingAck, BindingStatus, BindingUpdate, Message, ACK_LEN};

/// The home agent's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeAgentConfig {
    /// This home agent's address: updates naming another one are refused
    /// ([`BindingStatus::NotHomeAgent`]).
    pub address: Ipv4Addr,
    /// Longest lifetime granted; longer requests are refused
    /// ([`BindingStatus::LifetimeTooLong`], the ack carries this value).
    pub max_lifetime_secs: u32,
    /// Most live bindings at once ([`BindingStatus::InsufficientResources`]
    /// beyond).
    pub max_bindings: usize,
    /// How long the sequence number of a binding that expired or was
    /// deregistered is remembered (to refuse replays of older updates).
    pub tombstone_secs: u32,
}

impl HomeAgentConfig {
    /// Default maximum lifetime: one hour.
    pub const DEFAULT_MAX_LIFETIME_SECS: u32 = 3600;
    /// Default cache size.
    pub const DEFAULT_MAX_BINDINGS: usize = 4096;
    /// Default tombstone retention: one day.
    pub const DEFAULT_TOMBSTONE_SECS: u32 = 86_400;

    /// The defaults for a home agent at `address`.
    pub fn new(address: Ipv4Addr) -> Self {
        HomeAgentConfig {
            address,
            max_lifetime_secs: Self::DEFAULT_MAX_LIFETIME_SECS,
            max_bindings: Self::DEFAULT_MAX_BINDINGS,
            tombstone_secs: Self::DEFAULT_TOMBSTONE_SECS,
        }
    }
}

/// A live binding: traffic for `home_address` goes to `care_of` until
/// `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The container's home address.
    pub home_address: Ipv4Addr,
    /// Where the container is now.
    pub care_of: Ipv4Addr,
    /// The sequence of the update that installed or last refreshed it.
    pub sequence: u16,
    /// The granted lifetime in seconds.
    pub lifetime_secs: u32,
    /// When that update was accepted.
    pub registered_at: Timestamp,
    /// When the binding ends unless refreshed.
    pub expires_at: Timestamp,
    /// Whether the care-of host asked for a reverse tunnel.
    pub reverse_tunnel: bool,
}

impl Binding {
    /// Whether the binding is still live at `now`.
    pub fn is_live(&self, now: Timestamp) -> bool {
        now < self.expires_at
    }

    /// Whole seconds of lifetime left at `now` (rounded up, so a live
    /// binding never reports 0).
    pub fn remaining_secs(&self, now: Timestamp) -> u32 {
        let ms = self.expires_at.as_millis().saturating_sub(now.as_millis());
        u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
    }
}

/// What an accepted update changed, for the forwarding layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingChange {
    /// A new binding: start intercepting and tunnelling.
    Created(Binding),
    /// The container moved on (A -> B -> C): re-point the tunnel from
    /// `previous_care_of` to the binding's care-of address.
    Moved {
        /// The care-of address before.
        previous_care_of: Ipv4Addr,
        /// The binding now.
        binding: Binding,
    },
    /// Same care-of address, new lifetime (a refresh).
    Refreshed(Binding),
    /// The binding is gone (deregistration, or the container came home):
    /// stop forwarding.
    Removed {
        /// The home address.
        home_address: Ipv4Addr,
        /// The care-of address it had.
        care_of: Ipv4Addr,
    },
}

/// The outcome of [`BindingCache::process`]: the ack to send back, and what
/// changed (nothing unless the update was accepted and did something).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The signed ack.
    pub ack: BindingAck,
    /// The change to apply to forwarding.
    pub change: Option<BindingChange>,
}

impl Decision {
    /// The ack's wire form.
    pub fn ack_bytes(&self) -> [u8; ACK_LEN] {
        self.ack.encode()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    last_sequence: u16,
    last_mac: [u8; MAC_LEN],
    /// When the last accepted update (or the expiry) changed this entry.
    updated_at: Timestamp,
    binding: Option<Binding>,
}

/// The binding cache. See the module docs.
#[derive(Debug, Clone)]
pub struct BindingCache {
    config: HomeAgentConfig,
    keys: Keyring,
    homes: BTreeSet<Ipv4Addr>,
    entries: BTreeMap<Ipv4Addr, Entry>,
}

impl BindingCache {
    /// An empty cache serving no home address yet.
    pub fn new(config: HomeAgentConfig, keys: Keyring) -> Self {
        BindingCache {
            config,
            keys,
            homes: BTreeSet::new(),
            entries: BTreeMap::new(),
        }
    }

    /// The policy.
    pub fn config(&self) -> &HomeAgentConfig {
        &self.config
    }

    /// Change the policy (e.g. after taking over another host's cache).
    /// Existing bindings keep their lifetimes.
    pub fn set_config(&mut self, config: HomeAgentConfig) {
        self.config = config;
    }

    /// The keyring (for rotation).
    pub fn keys_mut(&mut self) -> &mut Keyring {
        &mut self.keys
    }

    /// Serve `home`: accept bindings for it. Returns false if it already
    /// was served.
    pub fn add_home(&mut self, home: Ipv4Addr) -> bool {
        self.homes.insert(home)
    }

    /// Stop serving `home`; its binding, if any, is removed (and returned),
    /// its sequence number is remembered as for a deregistration.
    pub fn remove_home(&mut self, home: Ipv4Addr, now: Timestamp) -> Option<Binding> {
        self.homes.remove(&home);
        self.remove(home, now)
    }

    /// Whether `home` is served.
    pub fn serves(&self, home: Ipv4Addr) -> bool {
        self.homes.contains(&home)
    }

    /// The served home addresses, sorted.
    pub fn homes(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.homes.iter().copied()
    }

    /// Handle the bytes of a binding update received at `now`: decode,
    /// authenticate, apply the policy and the sequence rules, update the
    /// cache. Always returns an ack signed with the active key (the caller
    /// may choose not to answer unauthenticated or malformed updates).
    pub fn process(&mut self, now: Timestamp, bytes: &[u8]) -> Decision {
        match decode(bytes) {
            Ok(Message::Update(update)) => self.process_update(now, &update),
            Ok(Message::Ack(_)) | Err(_) => self.reply(
                BindingAck::new(BindingStatus::Malformed, Ipv4Addr::UNSPECIFIED, 0, 0),
                None,
            ),
        }
    }

    /// Handle a decoded (not yet authenticated) binding update. The rules,
    /// in order:
    ///
    /// 1. the tag must verify with a known key, else `BadAuth`;
    /// 2. the update must name this home agent, else `NotHomeAgent`;
    /// 3. the home address must be served, else `UnknownHome`;
    /// 4. a registration's care-of address must be usable, else
    ///    `InvalidCareOf`;
    /// 5. against the entry's last accepted update: same sequence and same
    ///    tag is `Replayed` (nothing changes: in particular a replay never
    ///    extends a lifetime); a sequence that is not newer modulo 2^16 is
    ///    `StaleSequence`; both acks carry the last accepted sequence;
    /// 6. a lifetime above the maximum is `LifetimeTooLong`;
    /// 7. lifetime 0, or a care-of address equal to the home address or to
    ///    this home agent's address (the container is back home), deregisters
    ///    (accepted even without a live binding: deregistration is
    ///    idempotent);
    /// 8. a new binding beyond `max_bindings` is `InsufficientResources`;
    /// 9. otherwise the binding is installed or refreshed and `Accepted`
    ///    carries the granted lifetime.
    ///
    /// Only accepted updates change the cache.
    pub fn process_update(&mut self, now: Timestamp, update: &BindingUpdate) -> Decision {
        let home = update.home_address;
        let deregistration = update.is_deregistration() || update.care_of == self.config.address;
        let reject = |status, sequence, lifetime| {
            (
                BindingAck::new(status, home, sequence, lifetime),
                None::<BindingChange>,
            )
        };
        let (ack, change) = if update.verify(&self.keys).is_err() {
            reject(BindingStatus::BadAuth, update.sequence, 0)
        } else if update.home_agent != self.config.address {
            reject(BindingStatus::NotHomeAgent, update.sequence, 0)
        } else if !self.homes.contains(&home) {
            reject(BindingStatus::UnknownHome, update.sequence, 0)
        } else if !deregistration && !usable_care_of(update.care_of) {
            reject(BindingStatus::InvalidCareOf, update.sequence, 0)
        } else if let Some((status, last, lifetime)) = self.sequence_problem(now, update) {
            reject(status, last, lifetime)
        } else if update.lifetime_secs > self.config.max_lifetime_secs {
            reject(
                BindingStatus::LifetimeTooLong,
                update.sequence,
                self.config.max_lifetime_secs,
            )
        } else if deregistration {
            let change = self.accept(now, update, None);
            (
                BindingAck::new(BindingStatus::Accepted, home, update.sequence, 0),
                change,
            )
        } else if !self.live_binding_exists(home) && self.live_count() >= self.config.max_bindings {
            reject(BindingStatus::InsufficientResources, update.sequence, 0)
        } else {
            let binding = Binding {
                home_address: home,
                care_of: update.care_of,
                sequence: update.sequence,
                lifetime_secs: update.lifetime_secs,
                registered_at: now,
                expires_at: now.add_secs(update.lifetime_secs),
                reverse_tunnel: update.flags.reverse_tunnel(),
            };
            let change = self.accept(now, update, Some(binding));
            (
                BindingAck::new(
                    BindingStatus::Accepted,
                    home,
                    update.sequence,
                    update.lifetime_secs,
                ),
                change,
            )
        };
        self.reply(ack, change)
    }

    fn reply(&self, ack: BindingAck, change: Option<BindingChange>) -> Decision {
        Decision {
            ack: ack.signed(self.keys.active()),
            change,
        }
    }

    /// Rule 5: `Some((status, last accepted sequence, lifetime for the
    /// ack))` if the update's sequence is refused.
    fn sequence_problem(
        &self,
        now: Timestamp,
        update: &BindingUpdate,
    ) -> Option<(BindingStatus, u16, u32)> {
        let entry = self.entries.get(&update.home_address)?;
        if update.sequence == entry.last_sequence && update.mac == entry.last_mac {
            let remaining = entry.binding.as_ref().map_or(0, |b| b.remaining_secs(now));
            return Some((BindingStatus::Replayed, entry.last_sequence, remaining));
        }
        if !serial::is_newer(update.sequence, entry.last_sequence) {
            return Some((BindingStatus::StaleSequence, entry.last_sequence, 0));
        }
        None
    }

    fn accept(
        &mut self,
        now: Timestamp,
        update: &BindingUpdate,
        binding: Option<Binding>,
    ) -> Option<BindingChange> {
        let home = update.home_address;
        let previous = self.entries.get(&home).and_then(|e| e.binding.clone());
        let change = match (&previous, &binding) {
            (None, None) => None,
            (Some(old), None) => Some(BindingChange::Removed {
                home_address: home,
                care_of: old.care_of,
            }),
            (None, Some(new)) => Some(BindingChange::Created(new.clone())),
            (Some(old), Some(new)) if old.care_of == new.care_of => {
                Some(BindingChange::Refreshed(new.clone()))
            }
            (Some(old), Some(new)) => Some(BindingChange::Moved {
                previous_care_of: old.care_of,
                binding: new.clone(),
            }),
        };
        self.entries.insert(
            home,
            Entry {
                last_sequence: update.sequence,
                last_mac: update.mac,
                updated_at: now,
                binding,
            },
        );
        change
    }

    fn live_binding_exists(&self, home: Ipv4Addr) -> bool {
        self.entries.get(&home).is_some_and(|e| e.binding.is_some())
    }

    fn live_count(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.binding.is_some())
            .count()
    }

    /// End every binding whose lifetime has run out at `now` and return
    /// their home addresses (sorted); prune tombstones older than the
    /// retention. Call it at [`BindingCache::next_expiry`] or periodically.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Ipv4Addr> {
        let mut expired = Vec::new();
        for (home, entry) in &mut self.entries {
            if entry.binding.as_ref().is_some_and(|b| !b.is_live(now)) {
                let end = entry.binding.take().map_or(now, |b| b.expires_at.min(now));
                entry.updated_at = end;
                expired.push(*home);
            }
        }
        let retention = self.config.tombstone_secs;
        self.entries
            .retain(|_, e| e.binding.is_some() || now < e.updated_at.add_secs(retention));
        expired
    }

    /// Remove the binding of `home` locally (the container came back to
    /// this host, or the operator said so), keeping its sequence number.
    pub fn remove(&mut self, home: Ipv4Addr, now: Timestamp) -> Option<Binding> {
        let entry = self.entries.get_mut(&home)?;
        let binding = entry.binding.take()?;
        entry.updated_at = now;
        Some(binding)
    }

    /// Install a binding learnt elsewhere (recovered from the cluster's
    /// knowledge base after this home agent lost its cache file) and serve
    /// its home address. Refused (false) when the binding has expired at
    /// `now` or the cache already knows a sequence number for `home` that is
    /// not older. The tag of the update that made the binding is unknown:
    /// a byte-exact replay of it is then refused as stale instead of
    /// acknowledged as replayed, which changes nothing either way.
    pub fn restore(&mut self, binding: Binding, now: Timestamp) -> bool {
        let home = binding.home_address;
        if !binding.is_live(now)
            || !usable_care_of(binding.care_of)
            || self
                .entries
                .get(&home)
                .is_some_and(|e| !serial::is_newer(binding.sequence, e.last_sequence))
        {
            return false;
        }
        self.homes.insert(home);
        self.entries.insert(
            home,
            Entry {
                last_sequence: binding.sequence,
                last_mac: [0; MAC_LEN],
                updated_at: binding.registered_at,
                binding: Some(binding),
            },
        );
        true
    }

    /// The binding of `home`, even if its lifetime has run out but
    /// [`BindingCache::expire`] has not run yet.
    pub fn get(&self, home: Ipv4Addr) -> Option<&Binding> {
        self.entries.get(&home)?.binding.as_ref()
    }

    /// The binding of `home` if it is live at `now`.
    pub fn lookup(&self, home: Ipv4Addr, now: Timestamp) -> Option<&Binding> {
        self.get(home).filter(|b| b.is_live(now))
    }

    /// The bindings, by home address (including any past their expiry that
    /// [`BindingCache::expire`] has not removed yet).
    pub fn iter(&self) -> impl Iterator<Item = &Binding> + '_ {
        self.entries.values().filter_map(|e| e.binding.as_ref())
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        self.live_count()
    }

    /// Whether there is no binding.
    pub fn is_empty(&self) -> bool {
        self.live_count() == 0
    }

    /// When the next binding runs out.
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.iter().map(|b| b.expires_at).min()
    }

    /// The last accepted sequence number for `home` (live or tombstone).
    pub fn last_sequence(&self, home: Ipv4Addr) -> Option<u16> {
        self.entries.get(&home).map(|e| e.last_sequence)
    }

    /// Everything but the keys, in the persisted form.
    pub fn snapshot(&self) -> CacheSnapshot {
        CacheSnapshot {
            format: SNAPSHOT_FORMAT.to_owned(),
            version: SNAPSHOT_VERSION,
            config: self.config.clone(),
            homes: self.homes.iter().copied().collect(),
            entries: self
                .entries
                .iter()
                .map(|(home, e)| SnapshotEntry {
                    home_address: *home,
                    last_sequence: e.last_sequence,
                    last_mac: hex::encode(e.last_mac),
                    updated_at: e.updated_at,
                    binding: e.binding.clone(),
                })
                .collect(),
        }
    }

    /// A cache from a snapshot (validated) and keys.
    pub fn from_snapshot(snapshot: CacheSnapshot, keys: Keyring) -> Result<Self, String> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(format!(
                "format is {:?}, not {SNAPSHOT_FORMAT:?}",
                snapshot.format
            ));
        }
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(format!(
                "version {} is not supported (this side reads {SNAPSHOT_VERSION})",
                snapshot.version
            ));
        }
        let mut entries = BTreeMap::new();
        for e in snapshot.entries {
            let mut last_mac = [0_u8; MAC_LEN];
            hex::decode_to_slice(&e.last_mac, &mut last_mac)
                .map_err(|_| format!("entry {}: bad last_mac", e.home_address))?;
            if let Some(b) = &e.binding {
                if b.home_address != e.home_address {
                    return Err(format!(
                        "entry {}: binding for {}",
                        e.home_address, b.home_address
                    ));
                }
            }
            let entry = Entry {
                last_sequence: e.last_sequence,
                last_mac,
                updated_at: e.updated_at,
                binding: e.binding,
            };
            if entries.insert(e.home_address, entry).is_some() {
                return Err(format!("entry {} appears twice", e.home_address));
            }
        }
        Ok(BindingCache {
            config: snapshot.config,
            keys,
            homes: snapshot.homes.into_iter().collect(),
            entries,
        })
    }

    /// Write the cache (not the keys) to `path` as JSON, atomically: a
    /// temporary file in the same directory, fsync, rename over `path`,
    /// fsync of the directory. A crash leaves either the old or the new
    /// file, never a torn one.
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        let json = serde_json::to_vec_pretty(&self.snapshot()).map_err(|e| PersistError::Json {
            path: path.to_owned(),
            source: e,
        })?;
        write_atomically(path, &json).map_err(|source| PersistError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Read a cache written by [`BindingCache::save`] (on this host after a
    /// restart, or on another one taking the home agent role over).
    /// Bindings past their expiry are kept until [`BindingCache::expire`].
    pub fn load(path: &Path, keys: Keyring) -> Result<Self, PersistError> {
        let bytes = fs::read(path).map_err(|source| PersistError::Io {
            path: path.to_owned(),
            source,
        })?;
        let snapshot: CacheSnapshot =
            serde_json::from_slice(&bytes).map_err(|source| PersistError::Json {
                path: path.to_owned(),
                source,
            })?;
        BindingCache::from_snapshot(snapshot, keys).map_err(|reason| PersistError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }
}

/// A care-of address traffic can be tunnelled to.
fn usable_care_of(addr: Ipv4Addr) -> bool {
    !(addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast())
}

/// The `format` field of a persisted cache.
pub const SNAPSHOT_FORMAT: &str = "xfer-binding-cache";

/// The `version` field this crate writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The persisted form of a [`BindingCache`] (JSON). Timestamps are
/// milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSnapshot {
    /// Always [`SNAPSHOT_FORMAT`].
    pub format: String,
    /// [`SNAPSHOT_VERSION`].
    pub version: u32,
    /// The policy.
    pub config: HomeAgentConfig,
    /// Served home addresses.
    pub homes: Vec<Ipv4Addr>,
    /// One per home address with a binding or a tombstone.
    pub entries: Vec<SnapshotEntry>,
}

/// One persisted cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotEntry {
    /// The home address.
    pub home_address: Ipv4Addr,
    /// Sequence of the last accepted update.
    pub last_sequence: u16,
    /// Its tag, hex.
    pub last_mac: String,
    /// When the entry last changed.
    pub updated_at: Timestamp,
    /// The live binding, or none (tombstone).
    pub binding: Option<Binding>,
}

/// Why saving or loading a cache failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// Reading or writing the file failed.
    #[error("binding cache file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("binding cache file {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The JSON is well-formed but inconsistent.
    #[error("binding cache file {}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Write `bytes` to `path` through a temporary file, fsync and rename, then
/// fsync the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::ClusterKey;
    use crate::clock::{Clock, FakeClock};
    use crate::wire::BindingFlags;

    const HA: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
    const HOME: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
    const B: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
    const C: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);

    fn key() -> ClusterKey {
        ClusterKey::new(1, vec![0x11; 32]).expect("key")
    }

    fn ring() -> Keyring {
        Keyring::new(key())
    }

    fn cache() -> BindingCache {
        let mut c = BindingCache::new(HomeAgentConfig::new(HA), ring());
        assert!(c.add_home(HOME));
        c
    }

    fn bu(seq: u16, care_of: Ipv4Addr, lifetime: u32) -> BindingUpdate {
        BindingUpdate::new(HOME, care_of, HA, seq, lifetime, BindingFlags::NONE).signed(&key())
    }

    fn send(c: &mut BindingCache, now: Timestamp, u: &BindingUpdate) -> Decision {
        let d = c.process(now, &u.encode());
        // Every ack is signed with the cluster key and decodes.
        let back = BindingAck::decode(&d.ack_bytes()).expect("ack decodes");
        back.verify(&ring()).expect("ack is signed");
        d
    }

    fn t(secs: u64) -> Timestamp {
        Timestamp::from_secs(1_000_000 + secs)
    }

    #[test]
    fn accept_refresh_move_and_deregister() {
        let mut c = cache();
        let d = send(&mut c, t(0), &bu(10, B, 100));
        assert_eq!(d.ack.status, BindingStatus::Accepted);
        assert_eq!((d.ack.sequence, d.ack.lifetime_secs), (10, 100));
        let b = match d.change {
            Some(BindingChange::Created(b)) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!((b.care_of, b.expires_at), (B, t(100)));
        assert_eq!(c.lookup(HOME, t(50)), Some(&b));
        assert_eq!(c.len(), 1);

        let d = send(&mut c, t(50), &bu(11, B, 100));
        assert!(
            matches!(d.change, Some(BindingChange::Refreshed(ref b)) if b.expires_at == t(150))
        );

        // A -> B -> C: the same home agent re-points the binding.
        let d = send(&mut c, t(60), &bu(12, C, 100));
        match d.change {
            Some(BindingChange::Moved {
                previous_care_of,
                binding,
            }) => {
                assert_eq!(previous_care_of, B);
                assert_eq!(binding.care_of, C);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(c.iter().map(|b| b.care_of).collect::<Vec<_>>(), [C]);

        // Lifetime 0 deregisters.
        let d = send(&mut c, t(70), &bu(13, C, 0));
        assert_eq!(d.ack.status, BindingStatus::Accepted);
        assert_eq!(d.ack.lifetime_secs, 0);
        assert_eq!(
            d.change,
            Some(BindingChange::Removed {
                home_address: HOME,
                care_of: C
            })
        );
        assert!(c.is_empty());
        assert_eq!(c.last_sequence(HOME), Some(13));
        // Deregistering again is accepted and changes nothing.
        let d = send(&mut c, t(71), &bu(14, C, 0));
        assert_eq!((d.ack.status, d.change), (BindingStatus::Accepted, None));
    }

    #[test]
    fn care_of_equal_to_home_deregisters() {
        let mut c = cache();
        send(&mut c, t(0), &bu(1, B, 100));
        // The container came home: lifetime is ignored.
        let d = send(&mut c, t(1), &bu(2, HOME, 100));
        assert_eq!(d.ack.status, BindingStatus::Accepted);
        assert_eq!(d.ack.lifetime_secs, 0);
        assert!(matches!(d.change, Some(BindingChange::Removed { .. })));
        assert!(c.get(HOME).is_none());
    }

    #[test]
    fn care_of_equal_to_the_home_agent_deregisters() {
        // Migrated back to the home agent's own host: no tunnel to itself.
        let mut c = cache();
        send(&mut c, t(0), &bu(1, B, 100));
        let d = send(&mut c, t(1), &bu(2, HA, 100));
        assert_eq!(
            (d.ack.status, d.ack.lifetime_secs),
            (BindingStatus::Accepted, 0)
        );
        assert_eq!(
            d.change,
            Some(BindingChange::Removed {
                home_address: HOME,
                care_of: B
            })
        );
        assert!(c.iter().all(|b| b.care_of != HA));
        assert!(c.is_empty());
    }

    #[test]
    fn forged_updates_are_rejected() {
        let mut c = cache();
        let forged = BindingUpdate::new(HOME, B, HA, 1, 100, BindingFlags::NONE)
            .signed(&ClusterKey::new(1, vec![0x22; 32]).expect("key"));
        let d = send(&mut c, t(0), &forged);
        assert_eq!(d.ack.status, BindingStatus::BadAuth);
        assert_eq!(d.change, None);
        // A valid update tampered with after signing.
        let mut tampered = bu(2, B, 100);
        tampered.care_of = C;
        assert_eq!(
            send(&mut c, t(0), &tampered).ack.status,
            BindingStatus::BadAuth
        );
        // An unknown key id.
        let other = bu(3, B, 100).signed(&ClusterKey::new(2, vec![0x11; 32]).expect("key"));
        assert_eq!(
            send(&mut c, t(0), &other).ack.status,
            BindingStatus::BadAuth
        );
        assert!(c.is_empty());
        assert_eq!(c.last_sequence(HOME), None, "rejections change nothing");
    }

    #[test]
    fn replayed_and_stale_updates_are_rejected() {
        let mut c = cache();
        let first = bu(100, B, 100);
        send(&mut c, t(0), &first);
        // The exact same message again: replayed, and it does not extend
        // the binding.
        let d = send(&mut c, t(30), &first);
        assert_eq!(d.ack.status, BindingStatus::Replayed);
        assert_eq!((d.ack.sequence, d.ack.lifetime_secs), (100, 70));
        assert_eq!(d.change, None);
        assert_eq!(c.get(HOME).map(|b| b.expires_at), Some(t(100)));
        // Same sequence, different content: stale.
        let d = send(&mut c, t(31), &bu(100, C, 100));
        assert_eq!(d.ack.status, BindingStatus::StaleSequence);
        assert_eq!(d.ack.sequence, 100);
        // Older sequence: stale, the ack carries the last accepted one.
        let d = send(&mut c, t(31), &bu(99, C, 100));
        assert_eq!(
            (d.ack.status, d.ack.sequence),
            (BindingStatus::StaleSequence, 100)
        );
        // 2^15 away is not comparable: stale too.
        let d = send(&mut c, t(31), &bu(100 + 32768, C, 100));
        assert_eq!(d.ack.status, BindingStatus::StaleSequence);
        assert_eq!(c.get(HOME).map(|b| b.care_of), Some(B));
        // An old update replayed after a newer one was accepted: stale.
        send(&mut c, t(40), &bu(101, B, 100));
        assert_eq!(
            send(&mut c, t(41), &first).ack.status,
            BindingStatus::StaleSequence
        );
    }

    #[test]
    fn sequence_wraps_around() {
        let mut c = cache();
        send(&mut c, t(0), &bu(65534, B, 100));
        assert_eq!(
            send(&mut c, t(1), &bu(65535, B, 100)).ack.status,
            BindingStatus::Accepted
        );
        let d = send(&mut c, t(2), &bu(0, C, 100));
        assert_eq!(d.ack.status, BindingStatus::Accepted, "0 follows 65535");
        assert_eq!(c.get(HOME).map(|b| b.care_of), Some(C));
        assert_eq!(
            send(&mut c, t(3), &bu(65535, B, 100)).ack.status,
            BindingStatus::StaleSequence
        );
        assert_eq!(
            send(&mut c, t(4), &bu(1, B, 100)).ack.status,
            BindingStatus::Accepted
        );
    }

    #[test]
    fn policy_rejections() {
        let mut c = cache();
        let wrong_ha = BindingUpdate::new(HOME, B, C, 1, 100, BindingFlags::NONE).signed(&key());
        assert_eq!(
            send(&mut c, t(0), &wrong_ha).ack.status,
            BindingStatus::NotHomeAgent
        );
        let stranger = BindingUpdate::new(
            Ipv4Addr::new(10, 77, 0, 6),
            B,
            HA,
            1,
            100,
            BindingFlags::NONE,
        )
        .signed(&key());
        let d = send(&mut c, t(0), &stranger);
        assert_eq!(d.ack.status, BindingStatus::UnknownHome);
        assert_eq!(d.ack.home_address, Ipv4Addr::new(10, 77, 0, 6));
        let d = send(&mut c, t(0), &bu(1, B, 3601));
        assert_eq!(
            (d.ack.status, d.ack.lifetime_secs),
            (BindingStatus::LifetimeTooLong, 3600)
        );
        assert_eq!(
            send(&mut c, t(0), &bu(1, B, 3600)).ack.status,
            BindingStatus::Accepted
        );
        for bad in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            assert_eq!(
                send(&mut c, t(0), &bu(2, bad, 100)).ack.status,
                BindingStatus::InvalidCareOf
            );
        }
        // Garbage and acks are malformed updates.
        let d = c.process(t(0), b"hello");
        assert_eq!(d.ack.status, BindingStatus::Malformed);
        assert_eq!(d.ack.home_address, Ipv4Addr::UNSPECIFIED);
        let ack = BindingAck::new(BindingStatus::Accepted, HOME, 1, 1).signed(&key());
        assert_eq!(
            c.process(t(0), &ack.encode()).ack.status,
            BindingStatus::Malformed
        );
    }

    #[test]
    fn cache_size_is_bounded() {
        let mut cfg = HomeAgentConfig::new(HA);
        cfg.max_bindings = 1;
        let mut c = BindingCache::new(cfg, ring());
        let other = Ipv4Addr::new(10, 77, 0, 6);
        c.add_home(HOME);
        c.add_home(other);
        assert_eq!(
            send(&mut c, t(0), &bu(1, B, 100)).ack.status,
            BindingStatus::Accepted
        );
        let u = BindingUpdate::new(other, B, HA, 1, 100, BindingFlags::NONE).signed(&key());
        assert_eq!(
            send(&mut c, t(0), &u).ack.status,
            BindingStatus::InsufficientResources
        );
        // Refreshing an existing binding is still possible.
        assert_eq!(
            send(&mut c, t(1), &bu(2, C, 100)).ack.status,
            BindingStatus::Accepted
        );
    }

    #[test]
    fn expiry_follows_the_clock() {
        let clock = FakeClock::new(t(0));
        let mut c = cache();
        let other = Ipv4Addr::new(10, 77, 0, 6);
        c.add_home(other);
        send(&mut c, clock.now(), &bu(1, B, 10));
        let u = BindingUpdate::new(other, C, HA, 1, 20, BindingFlags::NONE).signed(&key());
        send(&mut c, clock.now(), &u);
        assert_eq!(c.next_expiry(), Some(t(10)));

        clock.advance(Duration::from_millis(9_999));
        assert!(c.expire(clock.now()).is_empty());
        assert!(c.lookup(HOME, clock.now()).is_some());
        assert_eq!(c.get(HOME).map(|b| b.remaining_secs(clock.now())), Some(1));
        clock.advance(Duration::from_millis(1));
        assert!(
            c.lookup(HOME, clock.now()).is_none(),
            "expired, not yet removed"
        );
        assert!(c.get(HOME).is_some());
        assert_eq!(c.expire(clock.now()), [HOME]);
        assert!(c.get(HOME).is_none());
        assert_eq!(c.next_expiry(), Some(t(20)));
        clock.advance(Duration::from_secs(30));
        assert_eq!(c.expire(clock.now()), [other]);
        assert!(c.is_empty());
        assert_eq!(c.next_expiry(), None);

        // The expired binding's sequence is remembered: an old update
        // replayed later is refused.
        assert_eq!(
            send(&mut c, clock.now(), &bu(1, B, 10)).ack.status,
            BindingStatus::Replayed
        );
        assert_eq!(
            send(&mut c, clock.now(), &bu(0, B, 10)).ack.status,
            BindingStatus::StaleSequence
        );
        // Until the tombstone is pruned.
        clock.advance(Duration::from_secs(u64::from(
            HomeAgentConfig::DEFAULT_TOMBSTONE_SECS,
        )));
        assert!(c.expire(clock.now()).is_empty());
        assert_eq!(c.last_sequence(HOME), None);
    }

    #[test]
    fn local_removal_keeps_the_sequence() {
        let mut c = cache();
        send(&mut c, t(0), &bu(5, B, 100));
        assert_eq!(c.remove(HOME, t(1)).map(|b| b.care_of), Some(B));
        assert_eq!(c.remove(HOME, t(1)), None);
        assert_eq!(c.last_sequence(HOME), Some(5));
        assert_eq!(
            send(&mut c, t(2), &bu(5, B, 100)).ack.status,
            BindingStatus::Replayed
        );
        assert_eq!(
            send(&mut c, t(2), &bu(6, B, 100)).ack.status,
            BindingStatus::Accepted
        );
        assert!(c.remove_home(HOME, t(3)).is_some());
        assert!(!c.serves(HOME));
        assert_eq!(
            send(&mut c, t(4), &bu(7, B, 100)).ack.status,
            BindingStatus::UnknownHome
        );
    }

    #[test]
    fn persistence_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bindings.json");
        let mut c = cache();
        let other = Ipv4Addr::new(10, 77, 0, 6);
        c.add_home(other);
        send(&mut c, t(0), &bu(7, B, 100));
        let u = BindingUpdate::new(other, C, HA, 3, 0, BindingFlags::REVERSE_TUNNEL).signed(&key());
        send(&mut c, t(0), &u); // a tombstone for `other`
        c.save(&path).expect("save");
        // Saved again over the old file: no temporary file stays behind.
        c.save(&path).expect("save again");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["bindings.json"]);

        let mut loaded = BindingCache::load(&path, ring()).expect("load");
        assert_eq!(loaded.snapshot(), c.snapshot());
        assert_eq!(loaded.get(HOME), c.get(HOME));
        assert!(loaded.serves(other));
        // The loaded cache still refuses a replay and accepts the next one.
        assert_eq!(
            send(&mut loaded, t(1), &bu(7, B, 100)).ack.status,
            BindingStatus::Replayed
        );
        assert_eq!(
            send(&mut loaded, t(1), &u).ack.status,
            BindingStatus::Replayed,
            "tombstones survive a restart"
        );
        assert_eq!(
            send(&mut loaded, t(1), &bu(8, C, 100)).ack.status,
            BindingStatus::Accepted
        );
    }

    #[test]
    fn load_refuses_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.json");
        assert!(matches!(
            BindingCache::load(&path, ring()),
            Err(PersistError::Io { .. })
        ));
        fs::write(&path, b"{not json").expect("write");
        assert!(matches!(
            BindingCache::load(&path, ring()),
            Err(PersistError::Json { .. })
        ));
        let mut snap = cache().snapshot();
        snap.version = 2;
        fs::write(&path, serde_json::to_vec(&snap).expect("json")).expect("write");
        let e = BindingCache::load(&path, ring()).expect_err("version 2");
        assert!(e.to_string().contains("version 2 is not supported"), "{e}");
        let mut c = cache();
        send(&mut c, t(0), &bu(1, B, 100));
        let mut snap = c.snapshot();
        snap.entries[0].last_mac = "xyz".into();
        fs::write(&path, serde_json::to_vec(&snap).expect("json")).expect("write");
        assert!(matches!(
            BindingCache::load(&path, ring()),
            Err(PersistError::Invalid { .. })
        ));
        let e = c
            .save(Path::new("/nonexistent-dir-xfer/b.json"))
            .expect_err("no dir");
        assert!(matches!(e, PersistError::Io { .. }), "{e}");
    }

    #[test]
    fn restore_installs_a_recovered_binding_once() {
        let mut c = BindingCache::new(HomeAgentConfig::new(HA), ring());
        let b = Binding {
            home_address: HOME,
            care_of: B,
            sequence: 40,
            lifetime_secs: 100,
            registered_at: t(0),
            expires_at: t(100),
            reverse_tunnel: false,
        };
        // Expired, or an unusable care-of address: refused.
        assert!(!c.restore(b.clone(), t(100)));
        let unusable = Binding {
            care_of: Ipv4Addr::UNSPECIFIED,
            ..b.clone()
        };
        assert!(!c.restore(unusable, t(1)));
        assert!(c.restore(b.clone(), t(1)));
        assert!(c.serves(HOME));
        assert_eq!(c.lookup(HOME, t(1)), Some(&b));
        // Not older than what is there: refused.
        assert!(!c.restore(b.clone(), t(2)));
        // The care-of host's next refresh is accepted, an older update is stale.
        assert_eq!(
            send(&mut c, t(2), &bu(39, B, 100)).ack.status,
            BindingStatus::StaleSequence
        );
        let d = send(&mut c, t(2), &bu(41, B, 100));
        assert_eq!(d.ack.status, BindingStatus::Accepted);
        assert!(matches!(d.change, Some(BindingChange::Refreshed(_))));
    }
}
