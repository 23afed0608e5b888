//! The binary encoding of binding updates and binding acks (version 1).
//!
//! Both messages are fixed-size, big-endian, and start with the same four
//! bytes: magic `"XM"` (0x58 0x4d), the format version (1), and the message
//! type. They end with a 32-byte HMAC-SHA256 tag computed, with the cluster
//! key named by the key id, over every byte before it (magic, version and
//! type included, so an ack can never pass for an update). They travel as
//! opaque bytes inside the agents' gRPC calls, or as one UDP datagram each.
//!
//! Binding update, type 1, [`UPDATE_LEN`] = 56 bytes:
//!
//! ```text
//!  0      2      3      4      5      6             8                     12
//!  +------+------+------+------+------+-------------+---------------------+
//!  | "XM" | ver  | type | flags|keyid |  sequence   |   lifetime (secs)   |
//!  +------+------+------+------+------+-------------+---------------------+
//! 12                    16                    20                    24
//!  +---------------------+---------------------+---------------------+
//!  |    home address     |   care-of address   | home agent address  |
//!  +---------------------+---------------------+---------------------+
//! 24                                                                 56
//!  +-----------------------------------------------------------------+
//!  |            HMAC-SHA256(key[keyid], bytes 0..24)                 |
//!  +-----------------------------------------------------------------+
//! ```
//!
//! * flags: bit 0 (0x01) = reverse tunnel requested (return traffic goes
//!   back through the home agent, for networks with ingress filtering);
//!   the other bits are reserved and must be zero.
//! * sequence: u16, compared modulo 2^16 ([`crate::serial`]).
//! * lifetime: u32 seconds; 0 deregisters (so does care-of == home).
//!
//! Binding ack, type 2, [`ACK_LEN`] = 48 bytes:
//!
//! ```text
//!  0      2      3      4      5      6             8                     12
//!  +------+------+------+------+------+-------------+---------------------+
//!  | "XM" | ver  | type |status|keyid |  sequence   |   lifetime (secs)   |
//!  +------+------+------+------+------+-------------+---------------------+
//! 12                    16                                               48
//!  +---------------------+-------------------------------------------------+
//!  |    home address     |       HMAC-SHA256(key[keyid], bytes 0..16)      |
//!  +---------------------+-------------------------------------------------+
//! ```
//!
//! * status: a [`BindingStatus`] code (0 is reserved as "unspecified" and
//!   refused; 1 accepted; 128 and above are rejections).
//! * sequence: the sequence of the update acknowledged, except for
//!   [`BindingStatus::StaleSequence`] and [`BindingStatus::Replayed`],
//!   where it is the last sequence the home agent accepted (so the mobile
//!   side can resynchronise).
//! * lifetime: the granted lifetime (accepted), the remaining lifetime
//!   (replayed), or the maximum the home agent allows
//!   ([`BindingStatus::LifetimeTooLong`]); 0 otherwise.
//!
//! Decoding ([`decode`]) is strict and never panics: the length must be
//! exactly that of the type, reserved flag bits must be zero, the status must
//! be known. So a decoded message re-encodes to the very same bytes, and the
//! tag can be checked over the re-encoded fields. An unknown version is
//! refused: a change of layout or meaning bumps [`VERSION`].

use std::fmt;
use std::net::Ipv4Addr;
use std::ops::BitOr;

use crate::auth::{AuthError, ClusterKey, Keyring, MAC_LEN};

/// The first two bytes of every message: `"XM"`.
pub const MAGIC: [u8; 2] = *b"XM";

/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;

/// Bytes of a binding update before its tag.
pub const UPDATE_SIGNED_LEN: usize = 24;

/// Bytes of an encoded binding update.
pub const UPDATE_LEN: usize = UPDATE_SIGNED_LEN + MAC_LEN;

/// Bytes of a binding ack before its tag.
pub const ACK_SIGNED_LEN: usize = 16;

/// Bytes of an encoded binding ack.
pub const ACK_LEN: usize = ACK_SIGNED_LEN + MAC_LEN;

/// The longest message: [`decode`] refuses anything longer at once.
pub const MAX_MESSAGE_LEN: usize = UPDATE_LEN;

/// Bytes every message starts with: magic, version, type.
const HEADER_LEN: usize = 4;

/// The message type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MessageType {
    /// A [`BindingUpdate`].
    BindingUpdate = 1,
    /// A [`BindingAck`].
    BindingAck = 2,
}

impl MessageType {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(MessageType::BindingUpdate),
            2 => Some(MessageType::BindingAck),
            _ => None,
        }
    }

    /// The encoded length of a message of this type.
    pub fn encoded_len(self) -> usize {
        match self {
            MessageType::BindingUpdate => UPDATE_LEN,
            MessageType::BindingAck => ACK_LEN,
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MessageType::BindingUpdate => "binding update",
            MessageType::BindingAck => "binding ack",
        })
    }
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("{len} bytes is too short for a binding message")]
    TooShort {
        /// The length received.
        len: usize,
    },
    /// More bytes than the longest message.
    #[error("{len} bytes is too long for a binding message (at most {MAX_MESSAGE_LEN})")]
    TooLong {
        /// The length received.
        len: usize,
    },
    /// The magic is not `"XM"`.
    #[error("bad magic {0:02x?}, not a binding message")]
    BadMagic([u8; 2]),
    /// A version this crate does not know.
    #[error("unsupported binding message version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// An unknown message type.
    #[error("unknown binding message type {0}")]
    UnknownType(u8),
    /// The length does not match the type.
    #[error("a {kind} is {expected} bytes, got {len}")]
    WrongLength {
        /// The type.
        kind: MessageType,
        /// The length received.
        len: usize,
        /// The length of that type.
        expected: usize,
    },
    /// Reserved flag bits are set.
    #[error("reserved flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// Status 0 or an unknown status code.
    #[error("invalid binding status code {0}")]
    BadStatus(u8),
    /// A message of the other type.
    #[error("expected a {expected}, got a {got}")]
    WrongType {
        /// What was expected.
        expected: MessageType,
        /// What came.
        got: MessageType,
    },
}

/// Binding update flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BindingFlags(u8);

impl BindingFlags {
    /// No flags.
    pub const NONE: BindingFlags = BindingFlags(0);

    /// Reverse tunnel requested: the care-of host sends the container's
    /// return traffic back through the home agent (RFC 5944's T bit), for
    /// networks that drop packets whose source address is not theirs.
    pub const REVERSE_TUNNEL: BindingFlags = BindingFlags(0x01);

    /// Every bit version 1 defines.
    pub const KNOWN_BITS: u8 = 0x01;

    /// The flags of `bits`, or `None` if a reserved bit is set.
    pub const fn from_bits(bits: u8) -> Option<Self> {
        if bits & !Self::KNOWN_BITS == 0 {
            Some(BindingFlags(bits))
        } else {
            None
        }
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: BindingFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether a reverse tunnel is requested.
    pub const fn reverse_tunnel(self) -> bool {
        self.contains(Self::REVERSE_TUNNEL)
    }
}

impl BitOr for BindingFlags {
    type Output = BindingFlags;

    fn bitor(self, rhs: BindingFlags) -> BindingFlags {
        BindingFlags(self.0 | rhs.0)
    }
}

/// The status of a binding ack. Code 0 is reserved ("unspecified") and is
/// never valid on the wire; codes below 128 mean accepted, 128 and above
/// rejected (as in RFC 6275).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum BindingStatus {
    /// The update was accepted (for lifetime 0: the binding is gone).
    Accepted = 1,
    /// The tag did not verify, or the key id is unknown.
    BadAuth = 129,
    /// The sequence number is not newer than the last accepted one (the ack
    /// carries that one).
    StaleSequence = 130,
    /// A byte-exact copy of the last accepted update (same sequence, same
    /// tag); nothing changed (the ack carries the remaining lifetime).
    Replayed = 131,
    /// The update is addressed to another home agent.
    NotHomeAgent = 132,
    /// This home agent does not serve that home address.
    UnknownHome = 133,
    /// The requested lifetime exceeds the home agent's maximum (the ack
    /// carries the maximum).
    LifetimeTooLong = 134,
    /// The bytes were not a valid binding update.
    Malformed = 135,
    /// The care-of address is unusable (unspecified, broadcast, multicast).
    InvalidCareOf = 136,
    /// The binding cache is full.
    InsufficientResources = 137,
}

impl BindingStatus {
    /// The status of wire code `code`; `None` for 0 and unknown codes.
    pub const fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => BindingStatus::Accepted,
            129 => BindingStatus::BadAuth,
            130 => BindingStatus::StaleSequence,
            131 => BindingStatus::Replayed,
            132 => BindingStatus::NotHomeAgent,
            133 => BindingStatus::UnknownHome,
            134 => BindingStatus::LifetimeTooLong,
            135 => BindingStatus::Malformed,
            136 => BindingStatus::InvalidCareOf,
            137 => BindingStatus::InsufficientResources,
            _ => return None,
        })
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// Whether the update was accepted.
    pub const fn is_accepted(self) -> bool {
        (self as u8) < 128
    }

    /// Every status, in code order.
    pub const ALL: [BindingStatus; 10] = [
        BindingStatus::Accepted,
        BindingStatus::BadAuth,
        BindingStatus::StaleSequence,
        BindingStatus::Replayed,
        BindingStatus::NotHomeAgent,
        BindingStatus::UnknownHome,
        BindingStatus::LifetimeTooLong,
        BindingStatus::Malformed,
        BindingStatus::InvalidCareOf,
        BindingStatus::InsufficientResources,
    ];
}

impl fmt::Display for BindingStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindingStatus::Accepted => "accepted",
            BindingStatus::BadAuth => "authentication failed",
            BindingStatus::StaleSequence => "stale sequence number",
            BindingStatus::Replayed => "replayed update",
            BindingStatus::NotHomeAgent => "not this home agent",
            BindingStatus::UnknownHome => "unknown home address",
            BindingStatus::LifetimeTooLong => "lifetime too long",
            BindingStatus::Malformed => "malformed update",
            BindingStatus::InvalidCareOf => "invalid care-of address",
            BindingStatus::InsufficientResources => "binding cache full",
        })
    }
}

/// A binding update: "reach `home_address` at `care_of` for
/// `lifetime_secs`", sent by the container's current host to its home agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BindingUpdate {
    /// The container's home address.
    pub home_address: Ipv4Addr,
    /// The address of the host the container runs on now.
    pub care_of: Ipv4Addr,
    /// The home agent the update is for.
    pub home_agent: Ipv4Addr,
    /// Sequence number, compared modulo 2^16.
    pub sequence: u16,
    /// Requested lifetime in seconds; 0 deregisters.
    pub lifetime_secs: u32,
    /// Flags.
    pub flags: BindingFlags,
    /// The id of the cluster key the tag was made with.
    pub key_id: u8,
    /// HMAC-SHA256 over the first [`UPDATE_SIGNED_LEN`] encoded bytes.
    pub mac: [u8; MAC_LEN],
}

impl BindingUpdate {
    /// An unsigned update (key id 0, zero tag): call [`BindingUpdate::sign`]
    /// before sending.
    pub fn new(
        home_address: Ipv4Addr,
        care_of: Ipv4Addr,
        home_agent: Ipv4Addr,
        sequence: u16,
        lifetime_secs: u32,
        flags: BindingFlags,
    ) -> Self {
        BindingUpdate {
            home_address,
            care_of,
            home_agent,
            sequence,
            lifetime_secs,
            flags,
            key_id: 0,
            mac: [0; MAC_LEN],
        }
    }

    /// Whether this removes the binding: lifetime 0, or a care-of address
    /// equal to the home address (the container is back home).
    pub fn is_deregistration(&self) -> bool {
        self.lifetime_secs == 0 || self.care_of == self.home_address
    }

    /// The bytes the tag covers.
    pub fn signed_bytes(&self) -> [u8; UPDATE_SIGNED_LEN] {
        let mut b = [0_u8; UPDATE_SIGNED_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = MessageType::BindingUpdate as u8;
        b[4] = self.flags.bits();
        b[5] = self.key_id;
        b[6..8].copy_from_slice(&self.sequence.to_be_bytes());
        b[8..12].copy_from_slice(&self.lifetime_secs.to_be_bytes());
        b[12..16].copy_from_slice(&self.home_address.octets());
        b[16..20].copy_from_slice(&self.care_of.octets());
        b[20..24].copy_from_slice(&self.home_agent.octets());
        b
    }

    /// Set the key id and the tag with `key`.
    pub fn sign(&mut self, key: &ClusterKey) {
        self.key_id = key.id();
        self.mac = key.sign(&self.signed_bytes());
    }

    /// This update signed with `key`.
    pub fn signed(mut self, key: &ClusterKey) -> Self {
        self.sign(key);
        self
    }

    /// Check the tag with the keyring (constant-time comparison).
    pub fn verify(&self, keys: &Keyring) -> Result<(), AuthError> {
        keys.verify(self.key_id, &self.signed_bytes(), &self.mac)
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; UPDATE_LEN] {
        let mut b = [0_u8; UPDATE_LEN];
        b[..UPDATE_SIGNED_LEN].copy_from_slice(&self.signed_bytes());
        b[UPDATE_SIGNED_LEN..].copy_from_slice(&self.mac);
        b
    }

    /// Decode a binding update (see [`decode`]); does not check the tag.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match decode(bytes)? {
            Message::Update(u) => Ok(u),
            Message::Ack(_) => Err(DecodeError::WrongType {
                expected: MessageType::BindingUpdate,
                got: MessageType::BindingAck,
            }),
        }
    }
}

/// A binding ack: the home agent's answer to a [`BindingUpdate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BindingAck {
    /// Accepted or why not.
    pub status: BindingStatus,
    /// The home address of the update (0.0.0.0 when the update was too
    /// malformed to tell).
    pub home_address: Ipv4Addr,
    /// See the module docs: the update's sequence, or the home agent's last
    /// accepted one for stale and replayed updates.
    pub sequence: u16,
    /// Granted, remaining or maximum lifetime in seconds (module docs).
    pub lifetime_secs: u32,
    /// The id of the cluster key the tag was made with.
    pub key_id: u8,
    /// HMAC-SHA256 over the first [`ACK_SIGNED_LEN`] encoded bytes.
    pub mac: [u8; MAC_LEN],
}

impl BindingAck {
    /// An unsigned ack (key id 0, zero tag).
    pub fn new(
        status: BindingStatus,
        home_address: Ipv4Addr,
        sequence: u16,
        lifetime_secs: u32,
    ) -> Self {
        BindingAck {
            status,
            home_address,
            sequence,
            lifetime_secs,
            key_id: 0,
            mac: [0; MAC_LEN],
        }
    }

    /// The bytes the tag covers.
    pub fn signed_bytes(&self) -> [u8; ACK_SIGNED_LEN] {
        let mut b = [0_u8; ACK_SIGNED_LEN];
        b[0..2].copy_from_slice(&MAGIC);
        b[2] = VERSION;
        b[3] = MessageType::BindingAck as u8;
        b[4] = self.status.code();
        b[5] = self.key_id;
        b[6..8].copy_from_slice(&self.sequence.to_be_bytes());
        b[8..12].copy_from_slice(&self.lifetime_secs.to_be_bytes());
        b[12..16].copy_from_slice(&self.home_address.octets());
        b
    }

    /// Set the key id and the tag with `key`.
    pub fn sign(&mut self, key: &ClusterKey) {
        self.key_id = key.id();
        self.mac = key.sign(&self.signed_bytes());
    }

    /// This ack signed with `key`.
    pub fn signed(mut self, key: &ClusterKey) -> Self {
        self.sign(key);
        self
    }

    /// Check the tag with the keyring (constant-time comparison).
    pub fn verify(&self, keys: &Keyring) -> Result<(), AuthError> {
        keys.verify(self.key_id, &self.signed_bytes(), &self.mac)
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut b = [0_u8; ACK_LEN];
        b[..ACK_SIGNED_LEN].copy_from_slice(&self.signed_bytes());
        b[ACK_SIGNED_LEN..].copy_from_slice(&self.mac);
        b
    }

    /// Decode a binding ack (see [`decode`]); does not check the tag.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match decode(bytes)? {
            Message::Ack(a) => Ok(a),
            Message::Update(_) => Err(DecodeError::WrongType {
                expected: MessageType::BindingAck,
                got: MessageType::BindingUpdate,
            }),
        }
    }
}

/// A decoded message of either type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// A binding update.
    Update(BindingUpdate),
    /// A binding ack.
    Ack(BindingAck),
}

impl Message {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Message::Update(u) => u.encode().to_vec(),
            Message::Ack(a) => a.encode().to_vec(),
        }
    }

    /// Check the tag with the keyring.
    pub fn verify(&self, keys: &Keyring) -> Result<(), AuthError> {
        match self {
            Message::Update(u) => u.verify(keys),
            Message::Ack(a) => a.verify(keys),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn addr_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn mac_at(b: &[u8], at: usize) -> [u8; MAC_LEN] {
    let mut mac = [0_u8; MAC_LEN];
    mac.copy_from_slice(&b[at..at + MAC_LEN]);
    mac
}

/// Decode one message from `bytes` (bytes received from the network; any
/// content is safe). Checks, in order: length bounds, magic, version, type,
/// exact length for the type, reserved flag bits / status code. Does not
/// check the tag: call [`Message::verify`] (the binding cache and the
/// binding update list do).
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let len = bytes.len();
    if len > MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLong { len });
    }
    if len < HEADER_LEN {
        return Err(DecodeError::TooShort { len });
    }
    if bytes[0..2] != MAGIC {
        return Err(DecodeError::BadMagic([bytes[0], bytes[1]]));
    }
    if bytes[2] != VERSION {
        return Err(DecodeError::UnsupportedVersion(bytes[2]));
    }
    let kind = MessageType::from_byte(bytes[3]).ok_or(DecodeError::UnknownType(bytes[3]))?;
    if len != kind.encoded_len() {
        return Err(DecodeError::WrongLength {
            kind,
            len,
            expected: kind.encoded_len(),
        });
    }
    Ok(match kind {
        MessageType::BindingUpdate => Message::Update(BindingUpdate {
            flags: BindingFlags::from_bits(bytes[4]).ok_or(DecodeError::ReservedFlags(bytes[4]))?,
            key_id: bytes[5],
            sequence: u16_at(bytes, 6),
            lifetime_secs: u32_at(bytes, 8),
            home_address: addr_at(bytes, 12),
            care_of: addr_at(bytes, 16),
            home_agent: addr_at(bytes, 20),
            mac: mac_at(bytes, UPDATE_SIGNED_LEN),
        }),
        MessageType::BindingAck => Message::Ack(BindingAck {
            status: BindingStatus::from_code(bytes[4]).ok_or(DecodeError::BadStatus(bytes[4]))?,
            key_id: bytes[5],
            sequence: u16_at(bytes, 6),
            lifetime_secs: u32_at(bytes, 8),
            home_address: addr_at(bytes, 12),
            mac: mac_at(bytes, ACK_SIGNED_LEN),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u8) -> ClusterKey {
        ClusterKey::new(id, vec![0x42; 32]).expect("valid key")
    }

    fn update() -> BindingUpdate {
        BindingUpdate::new(
            Ipv4Addr::new(10, 77, 0, 5),
            Ipv4Addr::new(192, 0, 2, 20),
            Ipv4Addr::new(192, 0, 2, 10),
            0xbeef,
            600,
            BindingFlags::REVERSE_TUNNEL,
        )
        .signed(&key(3))
    }

    #[test]
    fn update_layout_is_as_documented() {
        let u = update();
        let b = u.encode();
        assert_eq!(b.len(), 56);
        assert_eq!(
            hex::encode(&b[..24]),
            concat!(
                "584d", "01", "01", "01", "03", "beef", "00000258", "0a4d0005", "c0000214",
                "c000020a"
            )
        );
        assert_eq!(&b[24..], &key(3).sign(&b[..24]));
        assert_eq!(decode(&b), Ok(Message::Update(u.clone())));
        assert_eq!(BindingUpdate::decode(&b), Ok(u));
    }

    #[test]
    fn ack_layout_is_as_documented() {
        let a = BindingAck::new(
            BindingStatus::StaleSequence,
            Ipv4Addr::new(10, 77, 0, 5),
            7,
            0,
        )
        .signed(&key(9));
        let b = a.encode();
        assert_eq!(b.len(), 48);
        assert_eq!(
            hex::encode(&b[..16]),
            concat!("584d", "01", "02", "82", "09", "0007", "00000000", "0a4d0005")
        );
        assert_eq!(BindingAck::decode(&b), Ok(a));
        assert_eq!(
            BindingUpdate::decode(&b),
            Err(DecodeError::WrongType {
                expected: MessageType::BindingUpdate,
                got: MessageType::BindingAck
            })
        );
    }

    #[test]
    fn decode_refuses_bad_input() {
        let good = update().encode();
        assert_eq!(decode(&[]), Err(DecodeError::TooShort { len: 0 }));
        assert_eq!(decode(b"XM\x01"), Err(DecodeError::TooShort { len: 3 }));
        assert_eq!(
            decode(&[0; 57]),
            Err(DecodeError::TooLong { len: 57 }),
            "length is checked before anything else"
        );
        let mut b = good;
        b[0] = b'Y';
        assert_eq!(decode(&b), Err(DecodeError::BadMagic(*b"YM")));
        let mut b = good;
        b[2] = 2;
        assert_eq!(decode(&b), Err(DecodeError::UnsupportedVersion(2)));
        let mut b = good;
        b[3] = 0;
        assert_eq!(decode(&b), Err(DecodeError::UnknownType(0)));
        assert_eq!(
            decode(&good[..55]),
            Err(DecodeError::WrongLength {
                kind: MessageType::BindingUpdate,
                len: 55,
                expected: 56
            })
        );
        let mut b = good;
        b[4] = 0x03;
        assert_eq!(decode(&b), Err(DecodeError::ReservedFlags(0x03)));

        let ack = BindingAck::new(BindingStatus::Accepted, Ipv4Addr::LOCALHOST, 1, 1).encode();
        for code in [0_u8, 2, 127, 128, 138, 255] {
            let mut b = ack;
            b[4] = code;
            assert_eq!(decode(&b), Err(DecodeError::BadStatus(code)), "code {code}");
        }
    }

    #[test]
    fn status_codes() {
        for s in BindingStatus::ALL {
            assert_eq!(BindingStatus::from_code(s.code()), Some(s));
            assert_eq!(s.is_accepted(), s == BindingStatus::Accepted);
        }
        assert_eq!(BindingStatus::from_code(0), None);
        assert_eq!(BindingStatus::Accepted.code(), 1);
        assert_eq!(
            BindingStatus::StaleSequence.to_string(),
            "stale sequence number"
        );
    }

    #[test]
    fn tags_cover_every_signed_byte() {
        let u = update();
        let ring = Keyring::new(key(3));
        assert_eq!(u.verify(&ring), Ok(()));
        let good = u.encode();
        for i in 0..UPDATE_LEN {
            let mut b = good;
            b[i] ^= 0x01;
            if let Ok(m) = decode(&b) {
                assert!(m.verify(&ring).is_err(), "flipping byte {i} went unnoticed");
            }
        }
        // Unsigned or re-keyed messages fail.
        let mut unsigned = u.clone();
        unsigned.mac = [0; MAC_LEN];
        assert_eq!(unsigned.verify(&ring), Err(AuthError::BadMac));
        let other = u.clone().signed(&key(4));
        assert_eq!(other.verify(&ring), Err(AuthError::UnknownKey(4)));
    }

    #[test]
    fn flags() {
        assert_eq!(BindingFlags::from_bits(0), Some(BindingFlags::NONE));
        assert_eq!(BindingFlags::from_bits(2), None);
        assert!((BindingFlags::NONE | BindingFlags::REVERSE_TUNNEL).reverse_tunnel());
        assert!(!BindingFlags::NONE.reverse_tunnel());
    }

    #[test]
    fn deregistration_forms() {
        let mut u = update();
        assert!(!u.is_deregistration());
        u.lifetime_secs = 0;
        assert!(u.is_deregistration());
        let mut u = update();
        u.care_of = u.home_address;
        assert!(u.is_deregistration());
    }
}
