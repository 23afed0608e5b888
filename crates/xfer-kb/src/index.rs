//! The compact in-memory holdings index: digest -> the hosts holding it.
//!
//! Layout (chosen for 10M entries over 1000 hosts; figures in docs/knowledge-base.md):
//!
//! * Hosts are interned to `u16` ids (at most 65 535 hosts per index).
//! * Every distinct digest held by at least one host has a *slot*: the 32-byte digest
//!   and its holder set, 48 bytes in one `Vec`. A holder set keeps up to
//!   [`INLINE_HOLDERS`] host ids inline (sorted) and spills larger sets (popular
//!   image-layer chunks) to a sorted heap vector.
//! * A `hashbrown::HashTable<u32>` maps a digest to its slot number: 4 bytes + 1
//!   control byte per bucket, the digest itself is stored once, in the slot. Digests
//!   are uniform, so their first 8 bytes are the hash.
//! * Per host, a roaring bitmap of the slot numbers it holds, so a full update or a
//!   departing host costs what that host holds, not what the cluster holds.
//! * Slots whose last holder goes are recycled.

use std::collections::HashMap;

use hashbrown::HashTable;
use roaring::RoaringBitmap;
use xfer_store::Digest;

use crate::KbError;

/// Host ids kept inline in a slot before the set spills to the heap.
pub const INLINE_HOLDERS: usize = 7;

/// Most hosts one index can number.
pub const MAX_HOSTS: usize = u16::MAX as usize;

/// A sorted set of host ids.
#[derive(Debug, Clone)]
enum Holders {
    Inline {
        len: u8,
        ids: [u16; INLINE_HOLDERS],
    },
    // Boxed so the enum stays 16 bytes (a bare Vec would make every slot 8 bytes
    // bigger, for the few digests held by more than 7 hosts).
    #[allow(clippy::box_collection)]
    Spill(Box<Vec<u16>>),
}

impl Holders {
    const EMPTY: Holders = Holders::Inline {
        len: 0,
        ids: [0; INLINE_HOLDERS],
    };

    fn as_slice(&self) -> &[u16] {
        match self {
            Holders::Inline { len, ids } => &ids[..*len as usize],
            Holders::Spill(v) => v,
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }

    /// Adds `h`; false if present.
    fn insert(&mut self, h: u16) -> bool {
        let pos = match self.as_slice().binary_search(&h) {
            Ok(_) => return false,
            Err(p) => p,
        };
        match self {
            Holders::Inline { len, ids } if (*len as usize) < INLINE_HOLDERS => {
                let n = *len as usize;
                ids.copy_within(pos..n, pos + 1);
                ids[pos] = h;
                *len += 1;
            }
            Holders::Inline { ids, .. } => {
                let mut v = Vec::with_capacity(INLINE_HOLDERS * 2);
                v.extend_from_slice(&ids[..]);
                v.insert(pos, h);
                *self = Holders::Spill(Box::new(v));
            }
            Holders::Spill(v) => v.insert(pos, h),
        }
        true
    }

    /// Removes `h`; false if absent.
    fn remove(&mut self, h: u16) -> bool {
        let pos = match self.as_slice().binary_search(&h) {
            Ok(p) => p,
            Err(_) => return false,
        };
        match self {
            Holders::Inline { len, ids } => {
                let n = *len as usize;
                ids.copy_within(pos + 1..n, pos);
                *len -= 1;
            }
            Holders::Spill(v) => {
                v.remove(pos);
                if v.len() <= INLINE_HOLDERS {
                    let mut ids = [0; INLINE_HOLDERS];
                    ids[..v.len()].copy_from_slice(v);
                    *self = Holders::Inline {
                        len: v.len() as u8,
                        ids,
                    };
                }
            }
        }
        true
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Holders::Inline { .. } => 0,
            Holders::Spill(v) => std::mem::size_of::<Vec<u16>>() + v.capacity() * 2,
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    digest: Digest,
    holders: Holders,
}

fn hash(d: &Digest) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.0[..8]);
    u64::from_le_bytes(b)
}

/// The holdings of many hosts. Not synchronised: wrap it in a lock.
#[derive(Debug, Default)]
pub struct Index {
    names: Vec<Option<String>>,
    ids: HashMap<String, u16>,
    free_hosts: Vec<u16>,
    slots: Vec<Slot>,
    table: HashTable<u32>,
    free_slots: Vec<u32>,
    by_host: Vec<RoaringBitmap>,
    entries: u64,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty index with room for `digests` distinct digests.
    pub fn with_capacity(digests: usize) -> Self {
        Index {
            slots: Vec::with_capacity(digests),
            table: HashTable::with_capacity(digests),
            ..Self::default()
        }
    }

    /// The id of `host`, numbering it if new.
    pub fn intern(&mut self, host: &str) -> Result<u16, KbError> {
        if let Some(&id) = self.ids.get(host) {
            return Ok(id);
        }
        let id = match self.free_hosts.pop() {
            Some(id) => {
                self.names[id as usize] = Some(host.to_owned());
                id
            }
            None => {
                if self.names.len() >= MAX_HOSTS {
                    return Err(KbError::InternHost { max: MAX_HOSTS });
                }
                self.names.push(Some(host.to_owned()));
                self.by_host.push(RoaringBitmap::new());
                (self.names.len() - 1) as u16
            }
        };
        self.ids.insert(host.to_owned(), id);
        Ok(id)
    }

    /// The id of `host`, if numbered.
    pub fn host_id(&self, host: &str) -> Option<u16> {
        self.ids.get(host).copied()
    }

    /// One more than the largest host id handed out (for tables indexed by host id).
    pub fn host_slots(&self) -> usize {
        self.names.len()
    }

    /// The name of host `id`.
    pub fn host_name(&self, id: u16) -> Option<&str> {
        self.names.get(id as usize)?.as_deref()
    }

    fn find(&self, d: &Digest) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash(d), |&s| slots[s as usize].digest == *d)
            .copied()
    }

    fn find_or_insert(&mut self, d: &Digest) -> u32 {
        if let Some(s) = self.find(d) {
            return s;
        }
        let slot = Slot {
            digest: *d,
            holders: Holders::EMPTY,
        };
        let s = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s as usize] = slot;
                s
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.table
            .insert_unique(hash(d), s, |&o| hash(&slots[o as usize].digest));
        s
    }

    fn release_if_empty(&mut self, s: u32) {
        if !self.slots[s as usize].holders.is_empty() {
            return;
        }
        let d = self.slots[s as usize].digest;
        if let Ok(e) = self.table.find_entry(hash(&d), |&o| o == s) {
            e.remove();
        }
        self.free_slots.push(s);
    }

    /// Records that `host` holds `digests`; returns how many entries are new.
    pub fn add(&mut self, host: u16, digests: &[Digest]) -> usize {
        let mut n = 0;
        for d in digests {
            let s = self.find_or_insert(d);
            if self.slots[s as usize].holders.insert(host) {
                self.by_host[host as usize].insert(s);
                n += 1;
            }
        }
        self.entries += n as u64;
        n
    }

    /// Records that `host` no longer holds `digests`; returns how many entries went.
    pub fn remove(&mut self, host: u16, digests: &[Digest]) -> usize {
        let mut n = 0;
        for d in digests {
            let Some(s) = self.find(d) else { continue };
            if self.slots[s as usize].holders.remove(host) {
                self.by_host[host as usize].remove(s);
                self.release_if_empty(s);
                n += 1;
            }
        }
        self.entries -= n as u64;
        n
    }

    /// Makes `digests` exactly what `host` holds; returns (added, removed).
    pub fn replace(&mut self, host: u16, digests: &[Digest]) -> (usize, usize) {
        let mut new = RoaringBitmap::new();
        for d in digests {
            new.insert(self.find_or_insert(d));
        }
        let old = std::mem::take(&mut self.by_host[host as usize]);
        let gone = &old - &new;
        let came = &new - &old;
        for s in &came {
            self.slots[s as usize].holders.insert(host);
        }
        for s in &gone {
            self.slots[s as usize].holders.remove(host);
            self.release_if_empty(s);
        }
        // Digests interned for `new` that were already held by nobody but are in
        // `new` are held by `host` now; none is left empty.
        self.entries = self.entries + came.len() - gone.len();
        self.by_host[host as usize] = new;
        (came.len() as usize, gone.len() as usize)
    }

    /// Forgets everything `host` holds and the host itself; returns the entries removed.
    pub fn drop_host(&mut self, host: &str) -> usize {
        let Some(id) = self.ids.remove(host) else {
            return 0;
        };
        let held = std::mem::take(&mut self.by_host[id as usize]);
        for s in &held {
            self.slots[s as usize].holders.remove(id);
            self.release_if_empty(s);
        }
        self.entries -= held.len();
        self.names[id as usize] = None;
        self.free_hosts.push(id);
        held.len() as usize
    }

    /// The ids of the hosts holding `d` (sorted).
    pub fn holders(&self, d: &Digest) -> &[u16] {
        match self.find(d) {
            Some(s) => self.slots[s as usize].holders.as_slice(),
            None => &[],
        }
    }

    /// Whether `host` holds `d`.
    pub fn holds(&self, host: u16, d: &Digest) -> bool {
        self.holders(d).binary_search(&host).is_ok()
    }

    /// Everything `host` holds.
    pub fn held_by(&self, host: u16) -> Vec<Digest> {
        self.by_host
            .get(host as usize)
            .map(|b| b.iter().map(|s| self.slots[s as usize].digest).collect())
            .unwrap_or_default()
    }

    /// Number of digests `host` holds.
    pub fn count_of(&self, host: u16) -> u64 {
        self.by_host.get(host as usize).map_or(0, |b| b.len())
    }

    /// Numbered hosts: (id, name).
    pub fn hosts(&self) -> impl Iterator<Item = (u16, &str)> + '_ {
        self.names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| Some((i as u16, n.as_deref()?)))
    }

    /// (digest, host) entries.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Distinct digests held by at least one host.
    pub fn digests(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Heap bytes the index uses, by its own accounting (capacities, not allocator
    /// overhead; the scale example measures RSS beside it).
    pub fn heap_bytes(&self) -> usize {
        let slots = self.slots.capacity() * std::mem::size_of::<Slot>();
        let spill: usize = self.slots.iter().map(|s| s.holders.heap_bytes()).sum();
        let table = self.table.capacity() * (std::mem::size_of::<u32>() + 1);
        let bitmaps: usize = self.by_host.iter().map(|b| b.serialized_size()).sum();
        let free = self.free_slots.capacity() * 4;
        slots + spill + table + bitmaps + free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    #[test]
    fn slot_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Holders>(), 16);
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    #[test]
    fn add_remove_replace_drop() {
        let mut ix = Index::new();
        let a = ix.intern("a").expect("intern");
        let b = ix.intern("b").expect("intern");
        assert_eq!(ix.intern("a").expect("intern"), a);
        assert_eq!(ix.add(a, &[d(1), d(2), d(3)]), 3);
        assert_eq!(ix.add(a, &[d(1)]), 0);
        assert_eq!(ix.add(b, &[d(2)]), 1);
        assert_eq!(ix.holders(&d(2)), &[a, b]);
        assert_eq!(ix.entries(), 4);
        assert_eq!(ix.digests(), 3);
        assert_eq!(ix.remove(a, &[d(2), d(9)]), 1);
        assert_eq!(ix.holders(&d(2)), &[b]);
        assert_eq!(ix.replace(a, &[d(3), d(4)]), (1, 1));
        assert!(ix.holders(&d(1)).is_empty());
        assert_eq!(ix.holders(&d(4)), &[a]);
        assert_eq!(ix.digests(), 3, "d1's slot was released");
        assert_eq!(ix.drop_host("b"), 1);
        assert!(ix.holders(&d(2)).is_empty());
        assert_eq!(ix.entries(), 2);
        assert_eq!(ix.host_id("b"), None);
        // The freed host id and slots are reused.
        let c = ix.intern("c").expect("intern");
        assert_eq!(c, b);
        ix.add(c, &[d(5), d(6)]);
        assert_eq!(ix.digests(), 4);
        let mut held = ix.held_by(c);
        held.sort();
        let mut want = vec![d(5), d(6)];
        want.sort();
        assert_eq!(held, want);
    }

    #[test]
    fn holder_sets_spill_and_come_back() {
        let mut ix = Index::new();
        let ids: Vec<u16> = (0..20)
            .map(|i| ix.intern(&format!("h{i}")).expect("intern"))
            .collect();
        for &h in ids.iter().rev() {
            ix.add(h, &[d(7)]);
        }
        assert_eq!(ix.holders(&d(7)), &ids[..]);
        for &h in &ids[..15] {
            ix.remove(h, &[d(7)]);
        }
        assert_eq!(ix.holders(&d(7)), &ids[15..]);
        for &h in &ids[15..] {
            assert!(ix.holds(h, &d(7)));
            ix.remove(h, &[d(7)]);
        }
        assert_eq!(ix.digests(), 0);
        assert_eq!(ix.entries(), 0);
    }
}
