//! BLAKE3 of many 4 KiB pages at once, each as its own message (a chunk id).
//!
//! `blake3::hash` of one 4 KiB page runs its four 1 KiB BLAKE3 chunks side by side in
//! SIMD lanes, so AVX-512 (16 lanes) or AVX2 (8) is mostly idle: per-page hashing
//! cost the pipeline ~2.5x what hashing the same bytes as one long input costs. Here
//! the lanes take chunk `j` of up to 16 *different* pages (all at counter `j`, the
//! same for every page), then the pages' parent nodes and roots likewise. The result
//! is bit for bit `blake3::hash(page)` (tested below, and by the pipeline's tests).
//!
//! It uses `blake3::platform::Platform::hash_many`, which the blake3 crate marks
//! "undocumented and unstable, for benchmarks only": the lock file pins blake3, and
//! the tests compare with `blake3::hash` on every build, so an incompatible change
//! fails the build or the tests, never silently.

use crate::Digest;

/// Page size handled here.
pub(crate) const PAGE: usize = 4096;
/// Pages hashed together (the widest SIMD degree, AVX-512).
const GROUP: usize = 16;

// BLAKE3 constants (from the specification).
const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 2;
const PARENT: u8 = 4;
const ROOT: u8 = 8;

/// Hashes pages with the SIMD implementation detected once per process.
pub(crate) struct PageHasher {
    platform: blake3::platform::Platform,
}

impl PageHasher {
    pub(crate) fn new() -> Self {
        PageHasher {
            platform: blake3::platform::Platform::detect(),
        }
    }

    /// `out[i] = Digest::of(pages[i])` for every page.
    pub(crate) fn hash(&self, pages: &[&[u8; PAGE]], out: &mut Vec<Digest>) {
        for group in pages.chunks(GROUP) {
            self.hash_group(group, out);
        }
    }

    fn hash_group(&self, pages: &[&[u8; PAGE]], out: &mut Vec<Digest>) {
        let n = pages.len();
        // Chunk CVs: cvs[j][k] = CV of chunk j of page k (counter j).
        let mut cvs = [[0u8; 32 * GROUP]; 4];
        for (j, cv) in cvs.iter_mut().enumerate() {
            let mut inputs: [&[u8; 1024]; GROUP] = [&[0u8; 1024]; GROUP];
            for (k, p) in pages.iter().enumerate() {
                inputs[k] = p[j * 1024..(j + 1) * 1024]
                    .try_into()
                    .unwrap_or(&[0u8; 1024]);
            }
            self.platform.hash_many(
                &inputs[..n],
                &IV,
                j as u64,
                blake3::IncrementCounter::No,
                0,
                CHUNK_START,
                CHUNK_END,
                &mut cv[..32 * n],
            );
        }
        // Parents of chunks (0, 1) and (2, 3), then the root of those two.
        let mut blocks = [[0u8; 64]; 2 * GROUP];
        for k in 0..n {
            for half in 0..2 {
                let b = &mut blocks[2 * k + half];
                b[..32].copy_from_slice(&cvs[2 * half][32 * k..32 * k + 32]);
                b[32..].copy_from_slice(&cvs[2 * half + 1][32 * k..32 * k + 32]);
            }
        }
        let mut parents = [0u8; 64 * GROUP];
        {
            let inputs: Vec<&[u8; 64]> = blocks[..2 * n].iter().collect();
            self.platform.hash_many(
                &inputs,
                &IV,
                0,
                blake3::IncrementCounter::No,
                PARENT,
                0,
                0,
                &mut parents[..64 * n],
            );
        }
        let mut roots = [0u8; 32 * GROUP];
        {
            let root_blocks: Vec<&[u8; 64]> = (0..n)
                .map(|k| <&[u8; 64]>::try_from(&parents[64 * k..64 * k + 64]).unwrap_or(&[0u8; 64]))
                .collect();
            self.platform.hash_many(
                &root_blocks,
                &IV,
                0,
                blake3::IncrementCounter::No,
                PARENT | ROOT,
                0,
                0,
                &mut roots[..32 * n],
            );
        }
        out.extend(roots[..32 * n].chunks_exact(32).map(|r| {
            let mut d = [0u8; 32];
            d.copy_from_slice(r);
            Digest(d)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(seed: u64) -> [u8; PAGE] {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut p = [0u8; PAGE];
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p
    }

    #[test]
    fn every_group_size_matches_blake3() {
        let h = PageHasher::new();
        let pages: Vec<[u8; PAGE]> = (0..40).map(page).collect();
        for n in 0..pages.len() {
            let refs: Vec<&[u8; PAGE]> = pages[..n].iter().collect();
            let mut out = Vec::new();
            h.hash(&refs, &mut out);
            let want: Vec<Digest> = pages[..n].iter().map(|p| Digest::of(p)).collect();
            assert_eq!(out, want, "{n} pages");
        }
    }

    proptest! {
        #[test]
        fn matches_blake3_on_any_pages(seeds in proptest::collection::vec(any::<u64>(), 0..40), zero in any::<bool>()) {
            let mut pages: Vec<[u8; PAGE]> = seeds.iter().map(|s| page(*s)).collect();
            if zero && !pages.is_empty() {
                pages[0] = [0u8; PAGE];
            }
            let refs: Vec<&[u8; PAGE]> = pages.iter().collect();
            let mut out = Vec::new();
            PageHasher::new().hash(&refs, &mut out);
            let want: Vec<Digest> = pages.iter().map(|p| Digest::of(p)).collect();
            prop_assert_eq!(out, want);
        }
    }
}
