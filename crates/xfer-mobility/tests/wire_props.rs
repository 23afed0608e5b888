//! Property tests of the wire format and of the home agent on arbitrary
//! input: encode/decode round trips, decoding arbitrary bytes never panics,
//! anything that decodes re-encodes to the same bytes, and the binding
//! cache survives any byte string.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use xfer_mobility::wire::{ACK_LEN, MAX_MESSAGE_LEN, UPDATE_LEN};
use xfer_mobility::*;
use xfer_mobility::{serial, wire};

fn key() -> ClusterKey {
    ClusterKey::new(1, vec![0x5a; 32]).expect("key")
}

fn addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn update() -> impl Strategy<Value = BindingUpdate> {
    (
        addr(),
        addr(),
        addr(),
        any::<u16>(),
        any::<u32>(),
        any::<bool>(),
        any::<u8>(),
        any::<[u8; MAC_LEN]>(),
    )
        .prop_map(|(home, coa, ha, seq, lifetime, rt, key_id, mac)| {
            let flags = if rt {
                BindingFlags::REVERSE_TUNNEL
            } else {
                BindingFlags::NONE
            };
            let mut u = BindingUpdate::new(home, coa, ha, seq, lifetime, flags);
            u.key_id = key_id;
            u.mac = mac;
            u
        })
}

fn ack() -> impl Strategy<Value = BindingAck> {
    (
        proptest::sample::select(BindingStatus::ALL.to_vec()),
        addr(),
        any::<u16>(),
        any::<u32>(),
        any::<u8>(),
        any::<[u8; MAC_LEN]>(),
    )
        .prop_map(|(status, home, seq, lifetime, key_id, mac)| {
            let mut a = BindingAck::new(status, home, seq, lifetime);
            a.key_id = key_id;
            a.mac = mac;
            a
        })
}

/// Bytes that look like a message often enough to reach the deeper checks.
fn message_like_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..=80),
        (
            any::<u8>(),
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..=60)
        )
            .prop_map(|(version_noise, kind, rest)| {
                let mut b = b"XM".to_vec();
                b.push(if version_noise < 200 {
                    1
                } else {
                    version_noise
                });
                b.push(kind % 4);
                b.extend(rest);
                b
            }),
        (update(), 0..UPDATE_LEN, any::<u8>()).prop_map(|(u, at, x)| {
            let mut b = u.encode().to_vec();
            b[at] ^= x;
            b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn update_round_trips(u in update()) {
        let bytes = u.encode();
        prop_assert_eq!(bytes.len(), UPDATE_LEN);
        prop_assert_eq!(BindingUpdate::decode(&bytes), Ok(u.clone()));
        prop_assert_eq!(decode(&bytes), Ok(Message::Update(u)));
    }

    #[test]
    fn ack_round_trips(a in ack()) {
        let bytes = a.encode();
        prop_assert_eq!(bytes.len(), ACK_LEN);
        prop_assert_eq!(BindingAck::decode(&bytes), Ok(a));
    }

    #[test]
    fn signed_messages_verify_and_tampering_does_not(u in update(), at in 0..UPDATE_LEN, bit in 0..8_u8) {
        let ring = Keyring::new(key());
        let signed = u.signed(&key());
        prop_assert_eq!(signed.verify(&ring), Ok(()));
        let mut bytes = signed.encode();
        bytes[at] ^= 1 << bit;
        if let Ok(m) = decode(&bytes) {
            prop_assert!(m.verify(&ring).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decoded_messages_are_canonical(bytes in message_like_bytes()) {
        match decode(&bytes) {
            Ok(m) => prop_assert_eq!(m.encode(), bytes),
            // Every error describes the input truthfully.
            Err(e) => {
                let len = bytes.len();
                let truthful = match &e {
                    DecodeError::TooShort { len: l } => *l == len && len < 4,
                    DecodeError::TooLong { len: l } => *l == len && len > MAX_MESSAGE_LEN,
                    DecodeError::BadMagic(m) => m[..] == bytes[..2] && *m != wire::MAGIC,
                    DecodeError::UnsupportedVersion(v) => *v == bytes[2] && *v != wire::VERSION,
                    DecodeError::UnknownType(t) => *t == bytes[3] && !(1..=2).contains(t),
                    DecodeError::WrongLength { kind, len: l, expected } => {
                        *l == len && *expected != len && *kind as u8 == bytes[3]
                            && *expected == kind.encoded_len()
                    }
                    DecodeError::ReservedFlags(f) => {
                        *f == bytes[4] && bytes[3] == 1 && f & !BindingFlags::KNOWN_BITS != 0
                    }
                    DecodeError::BadStatus(c) => {
                        *c == bytes[4] && bytes[3] == 2 && BindingStatus::from_code(*c).is_none()
                    }
                    _ => false,
                };
                prop_assert!(truthful, "{:?} for {:02x?}", e, bytes);
            }
        }
    }

    #[test]
    fn home_agent_survives_arbitrary_bytes(bytes in message_like_bytes()) {
        let ha = Ipv4Addr::new(10, 1, 0, 1);
        let mut cache = BindingCache::new(HomeAgentConfig::new(ha), Keyring::new(key()));
        cache.add_home(Ipv4Addr::new(10, 77, 0, 5));
        let d = cache.process(Timestamp::from_secs(1), &bytes);
        // Unsigned garbage never installs a binding.
        prop_assert!(d.change.is_none());
        prop_assert!(cache.is_empty());
        prop_assert!(d.ack.verify(&Keyring::new(key())).is_ok());
    }

    #[test]
    fn mobile_side_survives_arbitrary_bytes(bytes in message_like_bytes()) {
        let mut bul = BindingUpdateList::new(BulConfig::default(), Keyring::new(key()));
        bul.register(Timestamp::from_secs(1), BindingRequest {
            home_address: Ipv4Addr::new(10, 77, 0, 5),
            care_of: Ipv4Addr::new(10, 1, 0, 2),
            home_agent: Ipv4Addr::new(10, 1, 0, 1),
            lifetime_secs: 60,
            flags: BindingFlags::NONE,
        });
        let out = bul.handle_ack_bytes(Timestamp::from_secs(1), &bytes);
        prop_assert!(matches!(out, AckOutcome::Ignored(_)), "{:?}", out);
    }

    #[test]
    fn serial_order_matches_rfc1982(a in any::<u16>(), d in 1..=u16::MAX) {
        // b is d steps after a: newer iff d < 2^15, undefined at 2^15.
        let b = a.wrapping_add(d);
        match d.cmp(&serial::HALF) {
            std::cmp::Ordering::Less => prop_assert!(serial::is_newer(b, a) && !serial::is_newer(a, b)),
            std::cmp::Ordering::Equal => prop_assert_eq!(serial::compare(a, b), None),
            std::cmp::Ordering::Greater => prop_assert!(serial::is_newer(a, b) && !serial::is_newer(b, a)),
        }
    }
}
