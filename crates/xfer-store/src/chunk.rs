//! Splitting objects into chunks.
//!
//! Two chunkers, chosen by [`ObjectKind`](crate::ObjectKind):
//!
//! - **Memory** (CRIU `pages-*.img` and any page-aligned data): fixed 4 KiB pages
//!   ([`PAGE_SIZE`]), the unit in which the kernel dirties memory, so a page that did
//!   not change between two dumps keeps its id. An all-zero page is carried without
//!   data: its manifest entry is marked zero ([`is_zero`] tests a page in a few
//!   nanoseconds when it is not zero, and at memory bandwidth when it is).
//! - **Files and tar streams**: content-defined chunking with FastCDC (the 2020
//!   algorithm of the `fastcdc` crate, normalisation level 1), so an insertion or
//!   deletion moves only the chunk boundaries next to it. All-zero CDC chunks (holes,
//!   tar padding) are marked zero too.
//!
//! A chunk's id is the BLAKE3 digest of its uncompressed bytes
//! ([`Digest::of`](crate::Digest::of)).
//!
//! # Choice of the CDC sizes (measured 2026-11-21 on this project's machine)
//!
//! Input: `tar --sort=name -cf` of `/usr/lib/x86_64-linux-gnu` (713.7 MB, 2,355
//! files) and of a copy with a small edit: 16 bytes overwritten in place in 3 files
//! (libz, libLLVM-15 at 30 MB, libicudata at 12 MB), 1 KiB inserted in the middle of
//! an 11 MB library, one 50 KB file added, one 1 MB file removed (the edited files'
//! mtimes change in their tar headers too). "New" = chunks of the edited tar that the
//! original's chunks do not include: what a destination holding the original fetches.
//! Produced by `cargo run --release -p xfer-store --example cdc_sizes -- ORIG EDITED`.
//!
//! | min / avg / max KiB | chunks of orig | mean chunk | new chunks | new bytes (raw / zstd-1) | dedup of edited tar | manifest | orig as zstd-1 chunks | cut speed, 1 thread |
//! | --- | --- | --- | --- | --- | --- | --- | --- | --- |
//! | 8 / 32 / 128    | 16,660 | 41.8 KiB  | 13 | 490 KB / 221 KB   | 99.931 % | 599 KB | 246.9 MB | 1.2 GB/s |
//! | **16 / 64 / 256** | **8,370** | **83.3 KiB** | **13** | **1.05 MB / 415 KB** | **99.852 %** | **301 KB** | **243.8 MB** | **1.3 GB/s** |
//! | 32 / 128 / 512  | 4,141  | 168.3 KiB | 11 | 2.11 MB / 741 KB  | 99.704 % | 149 KB | 239.9 MB | 1.5 GB/s |
//! | 64 / 256 / 1024 | 2,089  | 333.6 KiB | 12 | 4.25 MB / 1.47 MB | 99.403 % | 75 KB  | 240.7 MB | 1.3 GB/s |
//!
//! (Whole-stream `zstd -1 -T2` of the original: 251.9 MB. Mean chunks exceed `avg`
//! because runs of zeros and padding in libraries end at `max`.)
//!
//! [`CdcParams::DEFAULT`] is **16 / 64 / 256 KiB**: against 32 / 128 / 512 it halves
//! what a small edit costs to re-send (1.05 vs 2.11 MB raw, 415 vs 741 KB compressed),
//! for twice the chunks (8.4 k per 714 MB: a 301 KB manifest, 8.4 k chunk files) and
//! 1.6 % more compressed bytes on a first, dedup-less transfer. The writable-layer
//! diffs and read-write volumes that move in every pre-copy round are where small
//! edits happen, so re-send cost weighs most; going down to 8 / 32 / 128 halves it
//! again but doubles the chunk count and per-chunk costs once more (one file, one
//! manifest entry and one has/want id per chunk) for a few hundred KB. The 256 KiB
//! maximum also keeps every chunk well under one frame ([`MAX_FRAME`](crate::MAX_FRAME))
//! and one 2 MiB-ish network message.

use std::ops::Range;

use crate::StoreError;

/// Size of a memory page chunk.
pub const PAGE_SIZE: usize = 4096;

/// Whether `data` is all zero bytes.
///
/// OR-folds 256-byte blocks (the compiler vectorises the fold) and stops at the first
/// block that is not zero, so a non-zero page usually costs one block.
#[inline]
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(256);
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&x| x == 0)
}

/// BLAKE3 digest of `len` zero bytes: the id recorded for a zero chunk of that
/// length. The 4 KiB page's is computed once.
pub fn zero_digest(len: usize) -> crate::Digest {
    static PAGE: std::sync::OnceLock<crate::Digest> = std::sync::OnceLock::new();
    if len == PAGE_SIZE {
        return *PAGE.get_or_init(|| zero_digest_uncached(PAGE_SIZE));
    }
    zero_digest_uncached(len)
}

fn zero_digest_uncached(len: usize) -> crate::Digest {
    static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];
    let mut h = crate::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        left -= n;
    }
    h.finish()
}

/// Page boundaries of `len` bytes of memory: 4 KiB ranges, the last one shorter if
/// `len` is not a multiple of [`PAGE_SIZE`].
pub fn pages(len: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len.div_ceil(PAGE_SIZE)).map(move |i| i * PAGE_SIZE..((i + 1) * PAGE_SIZE).min(len))
}

/// FastCDC chunk sizes (bytes).
///
/// Limits of the algorithm: `min` 64 B..1 MiB, `avg` 256 B..4 MiB, `max` 1 KiB..16 MiB,
/// all even, `min <= avg <= max`; `max` is further capped at [`MAX_CHUNK`](crate::MAX_CHUNK).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CdcParams {
    /// No chunk is shorter (except the last of an object).
    pub min: usize,
    /// Target mean size.
    pub avg: usize,
    /// No chunk is longer.
    pub max: usize,
}

impl CdcParams {
    /// 16 / 64 / 256 KiB, chosen by measurement (see the [module docs](self)).
    pub const DEFAULT: CdcParams = CdcParams {
        min: 16 * 1024,
        avg: 64 * 1024,
        max: 256 * 1024,
    };

    /// Checked constructor.
    pub fn new(min: usize, avg: usize, max: usize) -> Result<Self, StoreError> {
        use fastcdc::v2020 as f;
        let p = CdcParams { min, avg, max };
        let ok = (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&min)
            && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&avg)
            && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX.min(crate::MAX_CHUNK)).contains(&max)
            && min <= avg
            && avg <= max
            && min % 2 == 0
            && avg % 2 == 0
            && max % 2 == 0;
        if ok {
            Ok(p)
        } else {
            Err(StoreError::ChunkSize(max))
        }
    }
}

impl Default for CdcParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where the next content-defined chunk of `data` ends, `data` starting at a chunk
/// boundary. `eof` says whether `data` reaches the end of the object; when it does
/// not, `None` means "give me more bytes" (fewer than `max` are available, so the
/// boundary could still move).
///
/// Cutting a stream piecewise with this gives exactly the cuts of
/// [`cdc_chunks`] over the whole object.
pub fn cdc_cut(data: &[u8], p: &CdcParams, eof: bool) -> Option<usize> {
    if data.is_empty() || (!eof && data.len() < p.max) {
        return None;
    }
    let c = fastcdc::v2020::FastCDC::new(data, p.min, p.avg, p.max);
    let (_, end) = c.cut(0, data.len().min(p.max));
    Some(end)
}

/// The content-defined chunks of a whole in-memory object.
pub fn cdc_chunks<'a>(data: &'a [u8], p: &CdcParams) -> impl Iterator<Item = Range<usize>> + 'a {
    let p = *p;
    let mut pos = 0;
    std::iter::from_fn(move || {
        let end = pos + cdc_cut(&data[pos..], &p, true)?;
        let r = pos..end;
        pos = end;
        Some(r)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        assert!(is_zero(&[0; 4097]));
        for i in [0, 1, 255, 256, 4000, 4095, 4096] {
            let mut p = vec![0u8; 4097];
            p[i] = 1;
            assert!(!is_zero(&p), "byte {i}");
        }
        assert_eq!(zero_digest(4096), crate::Digest::of(&[0; 4096]));
        assert_eq!(zero_digest(100_000), crate::Digest::of(&vec![0; 100_000]));
        assert_eq!(zero_digest(0), crate::Digest::of(&[]));
    }

    #[test]
    fn params_are_checked() {
        assert!(CdcParams::new(16384, 65536, 262144).is_ok());
        assert!(CdcParams::new(16384, 8192, 262144).is_err());
        assert!(CdcParams::new(3, 65536, 262144).is_err());
        assert!(CdcParams::new(16384, 65536, 64 << 20).is_err());
    }

    fn small() -> CdcParams {
        CdcParams::new(256, 1024, 4096).expect("params")
    }

    proptest! {
        #[test]
        fn pages_cover_input(len in 0usize..50_000) {
            let mut next = 0;
            for r in pages(len) {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.end - r.start <= PAGE_SIZE && r.end > r.start);
                next = r.end;
            }
            prop_assert_eq!(next, len);
        }

        #[test]
        fn cdc_covers_input_within_bounds(data in proptest::collection::vec(any::<u8>(), 0..40_000)) {
            let p = small();
            let mut next = 0;
            let chunks: Vec<_> = cdc_chunks(&data, &p).collect();
            for (i, r) in chunks.iter().enumerate() {
                prop_assert_eq!(r.start, next);
                prop_assert!(r.len() <= p.max);
                if i + 1 < chunks.len() { prop_assert!(r.len() >= p.min); }
                next = r.end;
            }
            prop_assert_eq!(next, data.len());
        }

        #[test]
        fn streamed_cuts_equal_whole_cuts(
            data in proptest::collection::vec(any::<u8>(), 0..40_000),
            feed in 1usize..9000,
        ) {
            // Feed the chunker `feed` bytes at a time, as the pipeline does.
            let p = small();
            let whole: Vec<_> = cdc_chunks(&data, &p).collect();
            let mut got = Vec::new();
            let (mut start, mut avail) = (0usize, 0usize);
            loop {
                let eof = avail == data.len();
                match cdc_cut(&data[start..avail], &p, eof) {
                    Some(n) => { got.push(start..start + n); start += n; }
                    None if eof => break,
                    None => avail = (avail + feed).min(data.len()),
                }
            }
            prop_assert_eq!(got, whole);
        }
    }

    #[test]
    fn insertions_change_few_chunks() {
        // 200 edits of 1..64 bytes inserted into 200 KB of noise (~200 chunks each):
        // FastCDC re-synchronises within a few chunks of the edit.
        let p = small();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let data: Vec<u8> = (0..200_000).map(|_| next() as u8).collect();
        let ids = |d: &[u8]| {
            cdc_chunks(d, &p)
                .map(|r| crate::Digest::of(&d[r]))
                .collect::<std::collections::HashSet<_>>()
        };
        let base = ids(&data);
        let (mut total, mut worst) = (0usize, 0usize);
        for _ in 0..200 {
            let at = next() as usize % data.len();
            let len = 1 + next() as usize % 64;
            let mut edited = data.clone();
            edited.splice(at..at, (0..len).map(|_| next() as u8));
            let changed = ids(&edited).difference(&base).count();
            total += changed;
            worst = worst.max(changed);
        }
        let mean = total as f64 / 200.0;
        assert!(mean <= 3.0 && worst <= 12, "mean {mean} worst {worst}");
    }
}
