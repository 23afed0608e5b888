//! Message authentication: HMAC-SHA256 with a cluster key.
//!
//! Every binding update and binding ack carries a one-byte key id and a
//! 32-byte HMAC-SHA256 tag computed over all the bytes before the tag (see
//! [`crate::wire`]). A [`Keyring`] holds the cluster keys a host accepts,
//! one of them active (used to sign): rotating the cluster key means adding
//! the new key everywhere, then making it active everywhere, then removing
//! the old one. Tags are checked in constant time.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of an HMAC-SHA256 tag in bytes.
pub const MAC_LEN: usize = 32;

/// Shortest accepted cluster key (128 bits); 32 random bytes are
/// recommended.
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// Why a key or keyring operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The secret is too short.
    #[error("cluster key {id} is {len} bytes long, at least {min} are needed")]
    TooShort {
        /// The key id.
        id: u8,
        /// Its length in bytes.
        len: usize,
        /// The minimum.
        min: usize,
    },
    /// The hex form of a key is not valid hex.
    #[error("cluster key {id} is not valid hex")]
    BadHex {
        /// The key id.
        id: u8,
    },
    /// A keyring already holds a key with this id.
    #[error("the keyring already holds cluster key {0}")]
    DuplicateId(u8),
    /// A keyring holds no key with this id.
    #[error("the keyring holds no cluster key {0}")]
    UnknownId(u8),
    /// The active key cannot be removed.
    #[error("cluster key {0} is the active one and cannot be removed")]
    ActiveKey(u8),
}

/// Why a message failed authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The message names a key id the keyring does not hold.
    #[error("signed with unknown cluster key {0}")]
    UnknownKey(u8),
    /// The tag does not match.
    #[error("the HMAC does not match (forged, corrupted, or signed with another key)")]
    BadMac,
}

/// A cluster key: an id (carried in every message) and a secret. `Debug`
/// shows the id only; the secret is overwritten with zeros on drop (best
/// effort).
#[derive(Clone)]
pub struct ClusterKey {
    id: u8,
    secret: Vec<u8>,
}

impl ClusterKey {
    /// A key with id `id`; the secret must be at least [`MIN_KEY_LEN`]
    /// bytes.
    pub fn new(id: u8, secret: impl Into<Vec<u8>>) -> Result<Self, KeyError> {
        let secret = secret.into();
        if secret.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                id,
                len: secret.len(),
                min: MIN_KEY_LEN,
            });
        }
        Ok(ClusterKey { id, secret })
    }

    /// A key from its hex form (e.g. the contents of a key file, surrounding
    /// whitespace ignored).
    pub fn from_hex(id: u8, hex_secret: &str) -> Result<Self, KeyError> {
        let secret = hex::decode(hex_secret.trim()).map_err(|_| KeyError::BadHex { id })?;
        ClusterKey::new(id, secret)
    }

    /// The key id.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn hmac(&self, data: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length (long ones are hashed first), so
        // this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.secret)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(data);
        mac
    }

    /// The HMAC-SHA256 tag of `data`.
    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        self.hmac(data).finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8; MAC_LEN]) -> bool {
        self.hmac(data).verify_slice(tag).is_ok()
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterKey {
    fn drop(&mut self) {
        self.secret.fill(0);
        std::hint::black_box(&self.secret);
    }
}

/// The cluster keys a host accepts; one is active and signs what the host
/// sends.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<ClusterKey>,
    active: u8,
}

impl Keyring {
    /// A keyring holding `active` only.
    pub fn new(active: ClusterKey) -> Self {
        let id = active.id;
        Keyring {
            keys: vec![active],
            active: id,
        }
    }

    /// Add another accepted key (for rotation).
    pub fn add(&mut self, key: ClusterKey) -> Result<(), KeyError> {
        if self.get(key.id).is_some() {
            return Err(KeyError::DuplicateId(key.id));
        }
        self.keys.push(key);
        Ok(())
    }

    /// Make key `id` the signing one.
    pub fn set_active(&mut self, id: u8) -> Result<(), KeyError> {
        if self.get(id).is_none() {
            return Err(KeyError::UnknownId(id));
        }
        self.active = id;
        Ok(())
    }

    /// Stop accepting key `id` (not the active one).
    pub fn remove(&mut self, id: u8) -> Result<(), KeyError> {
        if id == self.active {
            return Err(KeyError::ActiveKey(id));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        if self.keys.len() == before {
            return Err(KeyError::UnknownId(id));
        }
        Ok(())
    }

    /// The key with id `id`.
    pub fn get(&self, id: u8) -> Option<&ClusterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The signing key.
    pub fn active(&self) -> &ClusterKey {
        // The active id always names a key: `new` adds it, `set_active`
        // checks it, `remove` refuses it.
        self.get(self.active)
            .or_else(|| self.keys.first())
            .expect("a keyring always holds its active key")
    }

    /// Check `tag` over `data` with key `key_id`.
    pub fn verify(&self, key_id: u8, data: &[u8], tag: &[u8; MAC_LEN]) -> Result<(), AuthError> {
        let key = self.get(key_id).ok_or(AuthError::UnknownKey(key_id))?;
        if key.verify(data, tag) {
            Ok(())
        } else {
            Err(AuthError::BadMac)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8, byte: u8) -> ClusterKey {
        ClusterKey::new(id, vec![byte; 32]).expect("valid key")
    }

    #[test]
    fn sign_and_verify() {
        let k = key(1, 7);
        let tag = k.sign(b"hello");
        assert!(k.verify(b"hello", &tag));
        assert!(!k.verify(b"hellp", &tag));
        let mut bad = tag;
        bad[31] ^= 1;
        assert!(!k.verify(b"hello", &bad));
        assert!(!key(1, 8).verify(b"hello", &tag));
    }

    #[test]
    fn rfc4231_test_case_2() {
        // RFC 4231 4.3: key "Jefe" is too short for a cluster key, so check
        // the HMAC through a 16-byte-padded equivalent: HMAC pads short keys
        // with zeros to the block size, so "Jefe" + 12 zero bytes gives the
        // same tag.
        let mut secret = b"Jefe".to_vec();
        secret.resize(16, 0);
        let k = ClusterKey::new(0, secret).expect("16 bytes");
        let tag = k.sign(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn short_and_bad_keys_are_refused() {
        assert_eq!(
            ClusterKey::new(3, vec![0; 15]).expect_err("short"),
            KeyError::TooShort {
                id: 3,
                len: 15,
                min: 16
            }
        );
        assert_eq!(
            ClusterKey::from_hex(4, "zz").expect_err("hex"),
            KeyError::BadHex { id: 4 }
        );
        let k = ClusterKey::from_hex(5, &format!(" {}\n", "ab".repeat(32))).expect("hex key");
        assert_eq!(k.id(), 5);
        assert_eq!(format!("{k:?}"), "ClusterKey { id: 5, .. }");
    }

    #[test]
    fn keyring_rotation() {
        let mut ring = Keyring::new(key(1, 1));
        assert_eq!(ring.active().id(), 1);
        assert_eq!(ring.add(key(1, 9)), Err(KeyError::DuplicateId(1)));
        ring.add(key(2, 2)).expect("add");
        let old_tag = key(1, 1).sign(b"m");
        ring.set_active(2).expect("activate");
        assert_eq!(ring.active().id(), 2);
        assert_eq!(ring.verify(1, b"m", &old_tag), Ok(()));
        assert_eq!(ring.verify(2, b"m", &old_tag), Err(AuthError::BadMac));
        assert_eq!(ring.remove(2), Err(KeyError::ActiveKey(2)));
        ring.remove(1).expect("remove old");
        assert_eq!(
            ring.verify(1, b"m", &old_tag),
            Err(AuthError::UnknownKey(1))
        );
        assert_eq!(ring.remove(1), Err(KeyError::UnknownId(1)));
        assert_eq!(ring.set_active(9), Err(KeyError::UnknownId(9)));
    }
}
