//! zstd frames with a bounded decoded size.
//!
//! A chunk is kept on disk and sent on the wire as exactly one frame produced here
//! (level [`ZSTD_LEVEL`], no zstd checksum: integrity is the BLAKE3
//! digest of the decoded bytes). Decoding needs the announced decoded length and never
//! allocates more than [`MAX_FRAME`], so a peer cannot make a receiver allocate
//! without limit.
//!
//! Incompressible input (random, encrypted or already compressed bytes: a flat byte
//! histogram) is not handed to zstd: it is wrapped in a standard zstd frame of raw
//! blocks, which is what zstd itself would emit for it, at memcpy speed instead of
//! ~1 GB/s. The test costs ~0.1 µs for a page of text or code (a 512-byte sample has
//! too few distinct bytes) and ~1 µs for a random page. Any zstd decoder reads these
//! frames.

use crate::{StoreError, MAX_FRAME, ZSTD_LEVEL};

/// Compresses `data` (at most [`MAX_FRAME`] bytes) into one zstd frame.
pub fn encode(data: &[u8]) -> Result<Vec<u8>, StoreError> {
    if data.len() > MAX_FRAME {
        return Err(StoreError::FrameSize {
            got: data.len(),
            want: MAX_FRAME,
        });
    }
    if looks_incompressible(data) {
        return Ok(raw_frame(data));
    }
    zstd::bulk::compress(data, ZSTD_LEVEL).map_err(StoreError::Compress)
}

/// Largest zstd block.
const MAX_BLOCK: usize = 128 << 10;

/// `data` as a zstd frame of raw (stored) blocks: magic, a single-segment frame header
/// with the content size, then blocks of at most 128 KiB (RFC 8878, 3.1.1).
pub(crate) fn raw_frame(data: &[u8]) -> Vec<u8> {
    let n = data.len();
    let mut out = Vec::with_capacity(n + 14 + 3 * (n / MAX_BLOCK + 1));
    out.extend_from_slice(&0xFD2F_B528u32.to_le_bytes());
    // Frame header descriptor: single segment (bit 5), content-size field size
    // (bits 6-7: 0 -> 1 byte, 1 -> 2 bytes holding size - 256, 2 -> 4 bytes,
    // 3 -> 8 bytes), no checksum, no dictionary.
    if n < 256 {
        out.push(0x20);
        out.push(n as u8);
    } else if n < 65536 + 256 {
        out.push(0x60);
        out.extend_from_slice(&((n - 256) as u16).to_le_bytes());
    } else if n <= u32::MAX as usize {
        out.push(0xA0);
        out.extend_from_slice(&(n as u32).to_le_bytes());
    } else {
        out.push(0xE0);
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    let mut blocks = data.chunks(MAX_BLOCK).peekable();
    if blocks.peek().is_none() {
        // An empty frame still needs one (empty, last) block.
        out.extend_from_slice(&[1, 0, 0]);
    }
    while let Some(b) = blocks.next() {
        let last = blocks.peek().is_none() as u32;
        // Block header: bit 0 last, bits 1-2 type (0 = raw), bits 3-23 size.
        let h = last | ((b.len() as u32) << 3);
        out.extend_from_slice(&h.to_le_bytes()[..3]);
        out.extend_from_slice(b);
    }
    out
}

/// Whether `data` has a byte histogram as flat as random bytes: then zstd could not
/// shrink its literals, and (barring long repeats inside it, which a flat histogram
/// makes unlikely) not the data either.
pub(crate) fn looks_incompressible(data: &[u8]) -> bool {
    const SAMPLE: usize = 512;
    if data.len() < 1024 {
        return false;
    }
    // Quick reject: 512 random bytes show ~221 distinct values; text or code far fewer.
    let mut seen = [false; 256];
    let mut distinct = 0u32;
    for &b in &data[..SAMPLE] {
        distinct += u32::from(!seen[b as usize]);
        seen[b as usize] = true;
    }
    if distinct < 180 {
        return false;
    }
    // Full histogram, four interleaved tables to avoid store-to-load stalls.
    let mut t = [[0u32; 256]; 4];
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        t[0][q[0] as usize] += 1;
        t[1][q[1] as usize] += 1;
        t[2][q[2] as usize] += 1;
        t[3][q[3] as usize] += 1;
    }
    for &b in quads.remainder() {
        t[0][b as usize] += 1;
    }
    let (mut distinct, mut max) = (0u32, 0u32);
    let [t0, t1, t2, t3] = &t;
    for (((a, b), c), d) in t0.iter().zip(t1).zip(t2).zip(t3) {
        let c = a + b + c + d;
        distinct += u32::from(c > 0);
        max = max.max(c);
    }
    // Random bytes: counts ~ Poisson(mean); expected distinct 256 (1 - e^-mean).
    let mean = data.len() as f64 / 256.0;
    let want_distinct = 256.0 * (1.0 - (-mean).exp()) - 8.0;
    let max_count = mean + 4.0 * mean.sqrt() + 8.0;
    distinct as f64 >= want_distinct && (max as f64) <= max_count
}

/// Decompresses `frame`, which must be exactly one zstd frame decoding to exactly
/// `raw_len` bytes.
pub fn decode(frame: &[u8], raw_len: usize) -> Result<Vec<u8>, StoreError> {
    if raw_len > MAX_FRAME {
        return Err(StoreError::FrameSize {
            got: raw_len,
            want: MAX_FRAME,
        });
    }
    // Exactly one frame: nothing (a skippable frame, a second frame) may follow it.
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(n) if n == frame.len() => {}
        _ => {
            return Err(StoreError::Decompress(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not exactly one zstd frame",
            )))
        }
    }
    // One decompression context per thread: creating one per call (what
    // `zstd::bulk::decompress` does) cost more than decoding a 4 KiB page.
    thread_local! {
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(d) => d.decompress(frame, raw_len),
            None => Err(std::io::Error::other("no zstd context")),
        }
    });
    let out = out.map_err(StoreError::Decompress)?;
    if out.len() != raw_len {
        return Err(StoreError::FrameSize {
            got: out.len(),
            want: raw_len,
        });
    }
    Ok(out)
}

/// A reusable compressor (one zstd context): the pipeline keeps one per thread,
/// which is much cheaper than a fresh context per 4 KiB page. It compresses into a
/// scratch buffer and returns an exact-size copy: `Compressor::compress` returns a
/// vector of zstd's worst-case size (4.2 KiB for a page that compresses to ~200
/// bytes), and a caller that keeps the frames (a pre-copy round's new chunks) then
/// holds and page-faults in ~20x the memory.
pub(crate) struct Encoder(zstd::bulk::Compressor<'static>, Vec<u8>);

impl Encoder {
    pub(crate) fn new() -> Result<Self, StoreError> {
        zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map(|c| Encoder(c, Vec::new()))
            .map_err(StoreError::Compress)
    }

    /// Same output format as [`encode`].
    pub(crate) fn encode(&mut self, data: &[u8]) -> Result<Vec<u8>, StoreError> {
        if data.len() > MAX_FRAME {
            return Err(StoreError::FrameSize {
                got: data.len(),
                want: MAX_FRAME,
            });
        }
        if looks_incompressible(data) {
            return Ok(raw_frame(data));
        }
        self.1.clear();
        self.1.reserve(zstd::zstd_safe::compress_bound(data.len()));
        self.0
            .compress_to_buffer(data, &mut self.1)
            .map_err(StoreError::Compress)?;
        Ok(self.1.as_slice().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frames_round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            let f = encode(&data).expect("encode");
            prop_assert_eq!(decode(&f, data.len()).expect("decode"), data.clone());
            let g = Encoder::new().expect("encoder").encode(&data).expect("encode");
            prop_assert_eq!(decode(&g, data.len()).expect("decode"), data);
        }

        #[test]
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512), n in 0usize..4096) {
            let _ = decode(&data, n);
        }
    }

    #[test]
    fn raw_frames_are_standard_zstd() {
        for n in [
            0usize, 1, 255, 256, 4096, 65791, 65792, 131072, 131073, 300_000,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 131 % 251) as u8).collect();
            let f = raw_frame(&data);
            assert_eq!(decode(&f, n).expect("decode"), data, "{n}");
            // zstd's own decoder, reading the content size from the header.
            assert_eq!(zstd::stream::decode_all(&f[..]).expect("zstd"), data, "{n}");
            assert_eq!(
                zstd::zstd_safe::get_frame_content_size(&f).ok(),
                Some(Some(n as u64))
            );
        }
    }

    #[test]
    fn incompressible_detection() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(looks_incompressible(&random));
        let f = encode(&random).expect("encode");
        assert_eq!(f.len(), 4096 + 10);
        let text: Vec<u8> = b"lorem ipsum dolor sit amet "
            .iter()
            .cycle()
            .take(4096)
            .copied()
            .collect();
        assert!(!looks_incompressible(&text));
        assert!(!looks_incompressible(&[0u8; 4096]));
        // Half random, half zero: compressible.
        let mut half = random.clone();
        half[2048..].fill(0);
        assert!(!looks_incompressible(&half));
        assert!(encode(&half).expect("encode").len() < 2200);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn raw_frames_round_trip(data in proptest::collection::vec(any::<u8>(), 0..300_000)) {
            prop_assert_eq!(decode(&raw_frame(&data), data.len()).expect("decode"), data);
        }
    }

    #[test]
    fn wrong_length_is_rejected() {
        let f = encode(b"hello world").expect("encode");
        assert!(decode(&f, 5).is_err());
        assert!(decode(&f, 50).is_err());
        assert!(decode(&f, MAX_FRAME + 1).is_err());
        // Trailing bytes or a second frame after the frame.
        let mut two = f.clone();
        two.extend_from_slice(&f);
        assert!(decode(&two, 11).is_err());
        let mut tail = f.clone();
        tail.push(0);
        assert!(decode(&tail, 11).is_err());
        assert!(decode(&[], 0).is_err());
    }
}
