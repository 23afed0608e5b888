//! Sequence numbers compared modulo 2^16: RFC 1982 serial number
//! arithmetic with `SERIAL_BITS = 16`, as RFC 6275 section 9.5.1 uses for
//! binding update sequence numbers.
//!
//! `a` is newer than `b` when `b - a` (mod 2^16) lies in `0x8001..=0xffff`,
//! i.e. when `a` is at most 32767 steps ahead of `b`: 0 is newer than
//! 65535, 100 is newer than 65000. Two numbers exactly 32768 apart are
//! incomparable (RFC 1982 leaves that case undefined); [`compare`] returns
//! `None` for them and [`is_newer`] says "not newer", so such an update is
//! rejected as stale rather than guessed at.

use std::cmp::Ordering;

/// Half the sequence space: numbers this far apart are incomparable.
pub const HALF: u16 = 0x8000;

/// Compare two sequence numbers modulo 2^16 (RFC 1982): `Some(Less)` when
/// `a` is older than `b`, `Some(Greater)` when newer, `Some(Equal)` when
/// equal, `None` when they are exactly 2^15 apart.
pub fn compare(a: u16, b: u16) -> Option<Ordering> {
    match b.wrapping_sub(a) {
        0 => Some(Ordering::Equal),
        d if d < HALF => Some(Ordering::Less),
        HALF => None,
        _ => Some(Ordering::Greater),
    }
}

/// Whether `a` is strictly newer than `b` modulo 2^16.
pub fn is_newer(a: u16, b: u16) -> bool {
    compare(a, b) == Some(Ordering::Greater)
}

/// The sequence number after `a` (65535 is followed by 0).
pub fn next(a: u16) -> u16 {
    a.wrapping_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        assert!(is_newer(0, 65535));
        assert!(!is_newer(65535, 0));
        assert!(is_newer(100, 65000));
        assert_eq!(next(65535), 0);
        assert_eq!(compare(7, 7), Some(Ordering::Equal));
        assert_eq!(compare(1, 2), Some(Ordering::Less));
        assert_eq!(compare(2, 1), Some(Ordering::Greater));
    }

    #[test]
    fn window_edges() {
        // 32767 ahead is newer, 32768 is undefined, 32769 ahead is older.
        assert!(is_newer(32767, 0));
        assert_eq!(compare(32768, 0), None);
        assert_eq!(compare(0, 32768), None);
        assert!(!is_newer(32768, 0));
        assert!(!is_newer(0, 32768));
        assert!(is_newer(0, 32769));
        assert_eq!(compare(32769, 0), Some(Ordering::Less));
    }

    #[test]
    fn antisymmetric_everywhere() {
        for a in (0..=u16::MAX).step_by(251) {
            for b in (0..=u16::MAX).step_by(257) {
                let ab = compare(a, b);
                let ba = compare(b, a);
                assert_eq!(ab.map(Ordering::reverse), ba, "{a} {b}");
                assert!(!(is_newer(a, b) && is_newer(b, a)), "{a} {b}");
            }
        }
    }
}
