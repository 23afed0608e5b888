//! Manifests: what an object is made of.
//!
//! An object (a CRIU page image, a file, a tar stream) is an ordered list of chunk
//! references ([`ChunkRef`]: id, length, zero flag) plus the whole object's length and
//! BLAKE3 digest, its [`ObjectKind`], and (in the encoding) a format version. A
//! receiver that holds every referenced chunk rebuilds the object byte for byte with
//! [`Manifest::rebuild`], which checks the whole-object digest.
//!
//! # Encoding, format version 1
//!
//! All integers little-endian; `varint` = unsigned LEB128, at most 10 bytes, no
//! overflow.
//!
//! ```text
//! offset size  field
//!      0    4  magic "XFMF"
//!      4    2  version (u16) = 1; a reader refuses any other with ManifestError::Version
//!      6    1  kind: 1 memory pages, 2 file, 3 tar (0 = unspecified, refused)
//!      7    1  flags, reserved, must be 0
//!      8    8  object length in bytes (u64)
//!     16   32  object digest (BLAKE3 of all object bytes)
//!     48    8  entry count N (u64)
//!     56       N entries, in object order:
//!                tag u8 = 1 (data chunk): varint length, then the 32-byte chunk id
//!                tag u8 = 2 (zero chunk): varint length (no id: it is BLAKE3 of
//!                                         `length` zero bytes, see chunk::zero_digest)
//!              nothing may follow the last entry
//! ```
//!
//! Rules checked by [`Manifest::decode`]: chunk lengths are 1..=[`MAX_CHUNK`] (and at
//! most [`PAGE_SIZE`] for memory objects); they add up to the object length; N is at
//! most (input bytes after the header) / 2, so the entry vector is never allocated
//! beyond what the input can hold (an entry is at least 2 bytes, 40 in memory).
//! A 300 MB memory image with half its pages zero encodes to ~1.5 MB.

use std::io::Write;
use std::path::Path;

use crate::chunk::{zero_digest, PAGE_SIZE};
use crate::{CompressedChunk, Digest, Hasher, ManifestError, Store, StoreError, MAX_CHUNK};

const MAGIC: &[u8; 4] = b"XFMF";
const HEADER_LEN: usize = 56;
const TAG_DATA: u8 = 1;
const TAG_ZERO: u8 = 2;

/// What an object is; decides how it is chunked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ObjectKind {
    /// Memory pages (CRIU `pages-*.img`): 4 KiB page chunks.
    MemoryPages = 1,
    /// A file: content-defined chunks.
    File = 2,
    /// A tar stream (a writable-layer diff, an image layer): content-defined chunks.
    Tar = 3,
}

impl ObjectKind {
    /// The kind for its wire byte; 0 and unknown values are refused.
    pub fn from_u8(b: u8) -> Result<Self, ManifestError> {
        match b {
            1 => Ok(ObjectKind::MemoryPages),
            2 => Ok(ObjectKind::File),
            3 => Ok(ObjectKind::Tar),
            other => Err(ManifestError::Kind(other)),
        }
    }

    /// Whether objects of this kind are chunked in pages (else with CDC).
    pub fn is_paged(self) -> bool {
        self == ObjectKind::MemoryPages
    }
}

/// One entry of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkRef {
    id: Digest,
    len: u32,
    zero: bool,
}

impl ChunkRef {
    /// A chunk with data, `len` bytes (1..=[`MAX_CHUNK`]).
    pub fn data(id: Digest, len: usize) -> Result<Self, StoreError> {
        Ok(ChunkRef {
            id,
            len: check_len(len)?,
            zero: false,
        })
    }

    /// A chunk of `len` zero bytes, carried without data.
    pub fn zero(len: usize) -> Result<Self, StoreError> {
        Ok(ChunkRef {
            id: zero_digest(len),
            len: check_len(len)?,
            zero: true,
        })
    }

    /// A zero chunk whose id the caller already computed (`zero_digest(len)`); `len`
    /// comes from a chunker (1..=MAX_CHUNK).
    pub(crate) fn zero_with_id(id: Digest, len: usize) -> Self {
        ChunkRef {
            id,
            len: len as u32,
            zero: true,
        }
    }

    /// Chunk id: BLAKE3 of the bytes (for a zero chunk, of `len` zero bytes).
    pub fn id(&self) -> Digest {
        self.id
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Always false: chunks are never empty (kept for the `len`/`is_empty` pair).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether this chunk is all zero bytes (never stored nor sent).
    pub fn is_zero(&self) -> bool {
        self.zero
    }
}

fn check_len(len: usize) -> Result<u32, StoreError> {
    if len == 0 || len > MAX_CHUNK {
        return Err(StoreError::ChunkSize(len));
    }
    u32::try_from(len).map_err(|_| StoreError::ChunkSize(len))
}

/// An object: its kind, length, digest and chunks in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    kind: ObjectKind,
    length: u64,
    digest: Digest,
    chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// The encoding version this build writes and reads.
    pub const VERSION: u16 = 1;

    /// A manifest from its parts; the length is the sum of the chunk lengths.
    /// `digest` is the BLAKE3 of the whole object (not checked here: rebuild checks it).
    pub fn new(
        kind: ObjectKind,
        digest: Digest,
        chunks: Vec<ChunkRef>,
    ) -> Result<Self, StoreError> {
        if kind.is_paged() {
            if let Some(c) = chunks.iter().find(|c| c.len() > PAGE_SIZE) {
                return Err(StoreError::ChunkSize(c.len()));
            }
        }
        let length = chunks.iter().map(|c| c.len as u64).sum();
        Ok(Manifest {
            kind,
            length,
            digest,
            chunks,
        })
    }

    /// Chunks `data` in one thread (pages for memory, FastCDC with default sizes
    /// otherwise). Returns the manifest and the data chunks as (id, bytes), in order,
    /// repeats included. For large files use [`Pipeline`](crate::Pipeline).
    pub fn from_bytes(kind: ObjectKind, data: &[u8]) -> (Manifest, Vec<(Digest, &[u8])>) {
        let ranges: Vec<_> = if kind.is_paged() {
            crate::chunk::pages(data.len()).collect()
        } else {
            crate::chunk::cdc_chunks(data, &crate::chunk::CdcParams::DEFAULT).collect()
        };
        let mut chunks = Vec::with_capacity(ranges.len());
        let mut datas = Vec::new();
        for r in ranges {
            let bytes = &data[r];
            // Lengths come from the chunkers: 1..=max, within MAX_CHUNK.
            let len = bytes.len() as u32;
            if crate::chunk::is_zero(bytes) {
                chunks.push(ChunkRef {
                    id: zero_digest(bytes.len()),
                    len,
                    zero: true,
                });
            } else {
                let id = Digest::of(bytes);
                chunks.push(ChunkRef {
                    id,
                    len,
                    zero: false,
                });
                datas.push((id, bytes));
            }
        }
        let m = Manifest {
            kind,
            length: data.len() as u64,
            digest: Digest::of(data),
            chunks,
        };
        (m, datas)
    }

    /// Object kind.
    pub fn kind(&self) -> ObjectKind {
        self.kind
    }

    /// Object length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// BLAKE3 of the whole object.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The entries, in object order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Ids of the data (non-zero) chunks, each once, in order of first use: what a
    /// receiver must hold (and lease) to rebuild the object.
    pub fn chunk_ids(&self) -> impl Iterator<Item = Digest> + '_ {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .filter(|c| !c.zero)
            .map(|c| c.id)
            .filter(move |id| seen.insert(*id))
    }

    /// Ids of the data chunks that `has` lacks, each once.
    pub fn missing<S: crate::ChunkSet + ?Sized>(&self, has: &S) -> Vec<Digest> {
        self.chunk_ids().filter(|id| !has.contains(id)).collect()
    }

    /// Bytes of data chunks (each distinct chunk once) and of zero chunks.
    pub fn sizes(&self) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut data, mut zero) = (0u64, 0u64);
        for c in &self.chunks {
            if c.zero {
                zero += c.len as u64;
            } else if seen.insert(c.id) {
                data += c.len as u64;
            }
        }
        (data, zero)
    }

    /// The binary encoding (format version [`Manifest::VERSION`], see the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * 36);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&Self::VERSION.to_le_bytes());
        out.push(self.kind as u8);
        out.push(0);
        out.extend_from_slice(&self.length.to_le_bytes());
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            out.push(if c.zero { TAG_ZERO } else { TAG_DATA });
            put_varint(&mut out, c.len as u64);
            if !c.zero {
                out.extend_from_slice(&c.id.0);
            }
        }
        out
    }

    /// Decodes [`Manifest::encode`]'s output. Fallible and bounded: any input gives a
    /// manifest or an error, never a panic, and memory in proportion to the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let mut r = Reader { b: bytes };
        if r.take(4, "magic")? != MAGIC {
            return Err(ManifestError::Magic);
        }
        let version = u16::from_le_bytes(r.array("version")?);
        if version != Self::VERSION {
            return Err(ManifestError::Version {
                found: version,
                supported: Self::VERSION,
            });
        }
        let kind = ObjectKind::from_u8(r.byte("kind")?)?;
        let flags = r.byte("flags")?;
        if flags != 0 {
            return Err(ManifestError::Flags(flags));
        }
        let length = u64::from_le_bytes(r.array("length")?);
        let digest = Digest(r.array("digest")?);
        let count = u64::from_le_bytes(r.array("entry count")?);
        // Every entry takes at least 2 bytes (tag + 1-byte varint).
        if count > (r.b.len() / 2) as u64 {
            return Err(ManifestError::Count {
                count,
                bytes: r.b.len(),
            });
        }
        let max_len = if kind.is_paged() {
            PAGE_SIZE
        } else {
            MAX_CHUNK
        } as u64;
        let mut chunks = Vec::with_capacity(count as usize);
        let mut zero_ids: Vec<(u32, Digest)> = Vec::new();
        let mut sum = 0u64;
        for index in 0..count {
            let tag = r.byte("entry tag")?;
            let len = r.varint(index)?;
            if len == 0 || len > max_len {
                return Err(ManifestError::ChunkLen { index, len });
            }
            let len32 = len as u32;
            sum = sum.saturating_add(len);
            match tag {
                TAG_DATA => {
                    let id = Digest(r.array("chunk id")?);
                    chunks.push(ChunkRef {
                        id,
                        len: len32,
                        zero: false,
                    });
                }
                TAG_ZERO => {
                    // Few distinct zero lengths occur (pages; CDC max-size runs).
                    let id = match zero_ids.iter().find(|(l, _)| *l == len32) {
                        Some((_, id)) => *id,
                        None => {
                            let id = zero_digest(len as usize);
                            if zero_ids.len() < 64 {
                                zero_ids.push((len32, id));
                            }
                            id
                        }
                    };
                    chunks.push(ChunkRef {
                        id,
                        len: len32,
                        zero: true,
                    });
                }
                tag => return Err(ManifestError::Tag { index, tag }),
            }
        }
        if !r.b.is_empty() {
            return Err(ManifestError::Trailing(r.b.len()));
        }
        if sum != length {
            return Err(ManifestError::Length { sum, length });
        }
        Ok(Manifest {
            kind,
            length,
            digest,
            chunks,
        })
    }

    /// Writes the object to `w` from the chunks of `src` (a [`Store`], or any
    /// [`ChunkSource`]), in order, and checks the whole-object length and digest.
    /// Returns the number of bytes written.
    ///
    /// On error `w` has received a prefix (possibly all) of the bytes: write to a
    /// temporary place and keep it only on success ([`Manifest::rebuild_file`] does).
    /// A missing or corrupt chunk is reported as [`StoreError::Missing`].
    pub fn rebuild<S: ChunkSource + ?Sized, W: Write + ?Sized>(
        &self,
        src: &S,
        w: &mut W,
    ) -> Result<u64, StoreError> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut h = Hasher::new();
        let mut n = 0u64;
        for c in &self.chunks {
            if c.zero {
                let mut left = c.len();
                while left > 0 {
                    let k = left.min(ZEROS.len());
                    h.update(&ZEROS[..k]);
                    w.write_all(&ZEROS[..k]).map_err(StoreError::Write)?;
                    left -= k;
                }
            } else {
                let data = src.fetch(&c.id, c.len())?;
                if data.len() != c.len() {
                    // Same id, other length: impossible short of a BLAKE3 collision,
                    // but never write a wrong object.
                    return Err(StoreError::ChunkSize(data.len()));
                }
                h.update(&data);
                w.write_all(&data).map_err(StoreError::Write)?;
            }
            n += c.len as u64;
        }
        w.flush().map_err(StoreError::Write)?;
        let got = h.finish();
        if got != self.digest || n != self.length {
            return Err(StoreError::ObjectDigest {
                want: self.digest,
                got,
                want_len: self.length,
                got_len: n,
            });
        }
        Ok(n)
    }

    /// Rebuilds the object into `path`: writes a temporary file beside it, verifies,
    /// fsyncs and renames it into place; on any error nothing appears at `path`.
    pub fn rebuild_file<S: ChunkSource + ?Sized>(
        &self,
        src: &S,
        path: &Path,
    ) -> Result<u64, StoreError> {
        self.rebuild_file_with(src, path, true)
    }

    /// [`Manifest::rebuild_file`] for scratch files that need not survive a crash
    /// (a migration's CRIU images: a crash fails the migration anyway): verified and
    /// renamed into place the same way, without the two fsyncs (~2-6 ms each here).
    pub fn rebuild_scratch_file<S: ChunkSource + ?Sized>(
        &self,
        src: &S,
        path: &Path,
    ) -> Result<u64, StoreError> {
        self.rebuild_file_with(src, path, false)
    }

    fn rebuild_file_with<S: ChunkSource + ?Sized>(
        &self,
        src: &S,
        path: &Path,
        durable: bool,
    ) -> Result<u64, StoreError> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(
            ".{}.xfer-tmp-{}",
            name.unwrap_or_default(),
            std::process::id()
        ));
        let result = (|| {
            let f = std::fs::File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            let n = self.rebuild(src, &mut w)?;
            let f = w
                .into_inner()
                .map_err(|e| StoreError::Write(e.into_error()))?;
            if durable {
                f.sync_all().map_err(|e| StoreError::io("fsync", &tmp, e))?;
            }
            std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename", path, e))?;
            if durable {
                crate::sys::fsync_dir(dir)?;
            }
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Where [`Manifest::rebuild`] takes chunks from: the [`Store`], chunks received
/// but not stored (a map of [`CompressedChunk`]s, e.g. the last round of a migration,
/// rebuilt without writing one file per chunk first), or both (a pair: the first
/// source, then the second for what the first lacks).
pub trait ChunkSource {
    /// The verified bytes of chunk `id` (`len` bytes long), or
    /// [`StoreError::Missing`] if this source does not have it.
    fn fetch(&self, id: &Digest, len: usize) -> Result<Vec<u8>, StoreError>;
}

impl ChunkSource for Store {
    fn fetch(&self, id: &Digest, _len: usize) -> Result<Vec<u8>, StoreError> {
        self.get(id)
    }
}

/// Received frames, decoded and verified on use.
impl<H: std::hash::BuildHasher> ChunkSource
    for std::collections::HashMap<Digest, CompressedChunk, H>
{
    fn fetch(&self, id: &Digest, len: usize) -> Result<Vec<u8>, StoreError> {
        let c = self.get(id).ok_or(StoreError::Missing {
            id: *id,
            quarantined: None,
        })?;
        if c.raw_len != len {
            return Err(StoreError::ChunkSize(c.raw_len));
        }
        let data = crate::frame::decode(&c.frame, c.raw_len)?;
        let got = Digest::of(&data);
        if got != *id {
            return Err(StoreError::Verify { want: *id, got });
        }
        Ok(data)
    }
}

/// The first source, then the second for chunks the first is missing.
impl<A: ChunkSource, B: ChunkSource> ChunkSource for (A, B) {
    fn fetch(&self, id: &Digest, len: usize) -> Result<Vec<u8>, StoreError> {
        match self.0.fetch(id, len) {
            Err(e) if e.missing_chunk().is_some() => self.1.fetch(id, len),
            r => r,
        }
    }
}

impl<T: ChunkSource + ?Sized> ChunkSource for &T {
    fn fetch(&self, id: &Digest, len: usize) -> Result<Vec<u8>, StoreError> {
        (**self).fetch(id, len)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ManifestError> {
        if self.b.len() < n {
            return Err(ManifestError::Truncated { what });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], ManifestError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn byte(&mut self, what: &'static str) -> Result<u8, ManifestError> {
        Ok(self.take(1, what)?[0])
    }

    fn varint(&mut self, index: u64) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte("chunk length")?;
            let bits = (b & 0x7f) as u64;
            if i == 9 && bits > 1 {
                return Err(ManifestError::Varint { index });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                // Refuse overlong encodings (a trailing 0x00 group) so each manifest
                // has exactly one encoding.
                if i > 0 && bits == 0 {
                    return Err(ManifestError::Varint { index });
                }
                return Ok(v);
            }
        }
        Err(ManifestError::Varint { index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        let mut data = vec![0u8; 3 * PAGE_SIZE + 100];
        data[PAGE_SIZE..2 * PAGE_SIZE].fill(7);
        Manifest::from_bytes(ObjectKind::MemoryPages, &data).0
    }

    #[test]
    fn encoding_is_as_documented() {
        let m = sample();
        let e = m.encode();
        assert_eq!(&e[..4], b"XFMF");
        assert_eq!(u16::from_le_bytes([e[4], e[5]]), 1);
        assert_eq!(e[6], 1);
        assert_eq!(e[7], 0);
        assert_eq!(
            u64::from_le_bytes(e[8..16].try_into().expect("8")),
            m.length()
        );
        assert_eq!(&e[16..48], m.digest().as_bytes());
        assert_eq!(u64::from_le_bytes(e[48..56].try_into().expect("8")), 4);
        // zero page, data page, zero page, 100-byte zero tail
        assert_eq!(e.len(), 56 + 3 + (3 + 32) + 3 + 2);
        assert_eq!(Manifest::decode(&e).expect("decode"), m);
        assert_eq!(m.chunk_ids().count(), 1);
        assert_eq!(m.sizes(), (4096, 2 * 4096 + 100));
    }

    #[test]
    fn unknown_version_and_kind_are_refused() {
        let mut e = sample().encode();
        e[4] = 2;
        assert_eq!(
            Manifest::decode(&e),
            Err(ManifestError::Version {
                found: 2,
                supported: 1
            })
        );
        let mut e = sample().encode();
        e[6] = 0;
        assert_eq!(Manifest::decode(&e), Err(ManifestError::Kind(0)));
        let mut e = sample().encode();
        e[7] = 1;
        assert_eq!(Manifest::decode(&e), Err(ManifestError::Flags(1)));
        let mut e = sample().encode();
        e.push(0);
        assert_eq!(Manifest::decode(&e), Err(ManifestError::Trailing(1)));
        let mut e = sample().encode();
        e[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&e),
            Err(ManifestError::Count { .. })
        ));
        assert_eq!(
            Manifest::decode(b"XFM"),
            Err(ManifestError::Truncated { what: "magic" })
        );
    }

    #[test]
    fn memory_chunks_are_at_most_a_page() {
        let c = ChunkRef::data(Digest::of(b"x"), 8192).expect("chunk");
        assert!(Manifest::new(ObjectKind::MemoryPages, Digest::of(b""), vec![c]).is_err());
        assert!(Manifest::new(ObjectKind::File, Digest::of(b""), vec![c]).is_ok());
        assert!(ChunkRef::zero(0).is_err());
        assert!(ChunkRef::zero(MAX_CHUNK + 1).is_err());
    }

    #[test]
    fn varints_are_strict() {
        let mut v = Vec::new();
        for x in [0u64, 1, 127, 128, 4096, 1 << 35, u64::MAX] {
            v.clear();
            put_varint(&mut v, x);
            assert_eq!(Reader { b: &v }.varint(0), Ok(x));
        }
        assert!(Reader { b: &[0x80, 0x00] }.varint(0).is_err());
        assert!(Reader { b: &[0xff; 11] }.varint(0).is_err());
        assert!(Reader {
            b: &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]
        }
        .varint(0)
        .is_err());
    }

    fn arb_kind() -> impl Strategy<Value = ObjectKind> {
        prop_oneof![
            Just(ObjectKind::MemoryPages),
            Just(ObjectKind::File),
            Just(ObjectKind::Tar)
        ]
    }

    fn arb_chunk(max: usize) -> impl Strategy<Value = ChunkRef> {
        (any::<[u8; 32]>(), 1..=max, any::<bool>()).prop_map(|(id, len, zero)| {
            if zero {
                ChunkRef::zero(len).expect("len")
            } else {
                ChunkRef::data(Digest(id), len).expect("len")
            }
        })
    }

    proptest! {
        #[test]
        fn manifests_round_trip(
            kind in arb_kind(),
            digest in any::<[u8; 32]>(),
            chunks in proptest::collection::vec(arb_chunk(PAGE_SIZE), 0..200),
        ) {
            let m = Manifest::new(kind, Digest(digest), chunks).expect("manifest");
            let e = m.encode();
            prop_assert_eq!(Manifest::decode(&e).expect("decode"), m);
            // Every strict prefix fails cleanly.
            for cut in [0, 1, 7, 55, 56, e.len() / 2, e.len().saturating_sub(1)] {
                if cut < e.len() {
                    prop_assert!(Manifest::decode(&e[..cut]).is_err());
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Manifest::decode(&data);
        }

        #[test]
        fn corrupted_manifests_never_panic(
            chunks in proptest::collection::vec(arb_chunk(70_000), 0..50),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let m = Manifest::new(ObjectKind::File, Digest::of(b"x"), chunks).expect("manifest");
            let mut e = m.encode();
            for (i, b) in flips {
                let i = i.index(e.len());
                e[i] = b;
            }
            if let Ok(d) = Manifest::decode(&e) {
                // Whatever decodes is self-consistent.
                prop_assert_eq!(d.chunks().iter().map(|c| c.len() as u64).sum::<u64>(), d.length());
            }
        }

    }

    proptest! {
        // Each case opens a store on disk (fsyncs): fewer cases.
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn rebuild_equals_input(
            kind in arb_kind(),
            // Pages of zeros, a repeated pattern and noise, so every entry type occurs.
            parts in proptest::collection::vec((0u8..3, 1usize..9000, any::<u64>()), 0..12),
        ) {
            let mut data = Vec::new();
            for (what, len, seed) in parts {
                match what {
                    0 => data.extend(std::iter::repeat_n(0u8, len)),
                    1 => data.extend((0..len).map(|i| (i % 251) as u8)),
                    _ => {
                        let mut x = seed | 1;
                        data.extend((0..len).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }));
                    }
                }
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let store = Store::open(dir.path()).expect("open");
            let (m, chunks) = Manifest::from_bytes(kind, &data);
            let mut batch = store.batch();
            for (id, bytes) in &chunks {
                prop_assert_eq!(batch.put(bytes).expect("put"), *id);
            }
            batch.commit().expect("commit");
            let m = Manifest::decode(&m.encode()).expect("decode");
            let mut out = Vec::new();
            prop_assert_eq!(m.rebuild(&store, &mut out).expect("rebuild"), data.len() as u64);
            prop_assert_eq!(out, data);
        }
    }

    #[test]
    fn rebuild_from_received_frames_and_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let data: Vec<u8> = (0..20 * PAGE_SIZE as u32)
            .map(|i| (i / 4096 * 7 + i % 13) as u8)
            .collect();
        let (m, chunks) = Manifest::from_bytes(ObjectKind::MemoryPages, &data);
        // Half the chunks in the store, half only received.
        let mut received = std::collections::HashMap::new();
        for (i, (id, bytes)) in chunks.iter().enumerate() {
            if i % 2 == 0 {
                store.put(bytes).expect("put");
            } else {
                let frame = crate::frame::encode(bytes).expect("encode");
                received.insert(
                    *id,
                    CompressedChunk {
                        id: *id,
                        raw_len: bytes.len(),
                        frame,
                    },
                );
            }
        }
        let mut out = Vec::new();
        m.rebuild(&(&received, &store), &mut out).expect("rebuild");
        assert_eq!(out, data);
        assert!(m
            .rebuild(&received, &mut Vec::new())
            .expect_err("half")
            .missing_chunk()
            .is_some());
        // A received frame of the wrong bytes is refused.
        let (bad_id, _) = chunks[1];
        let other = crate::frame::encode(&[9u8; PAGE_SIZE]).expect("encode");
        received.insert(
            bad_id,
            CompressedChunk {
                id: bad_id,
                raw_len: PAGE_SIZE,
                frame: other,
            },
        );
        assert!(matches!(
            m.rebuild(&(&received, &store), &mut Vec::new()),
            Err(StoreError::Verify { .. })
        ));
    }

    #[test]
    fn rebuild_refuses_a_wrong_digest_and_missing_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let (m, chunks) = Manifest::from_bytes(ObjectKind::File, &data);
        let mut out = Vec::new();
        let err = m.rebuild(&store, &mut out).expect_err("nothing stored");
        assert_eq!(err.missing_chunk(), Some(chunks[0].0));
        for (_, b) in &chunks {
            store.put(b).expect("put");
        }
        let wrong = Manifest::new(m.kind(), Digest::of(b"other"), m.chunks().to_vec()).expect("m");
        assert!(matches!(
            wrong.rebuild(&store, &mut Vec::new()),
            Err(StoreError::ObjectDigest { .. })
        ));
        let target = dir.path().join("out.bin");
        assert!(wrong.rebuild_file(&store, &target).is_err());
        assert!(!target.exists());
        assert_eq!(m.rebuild_file(&store, &target).expect("rebuild"), 50_000);
        assert_eq!(std::fs::read(&target).expect("read"), data);
    }
}
