use super::*;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    (dir, store)
}

fn chunk(i: u32, len: usize) -> Vec<u8> {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Compressible but distinct.
            (x % 16) as u8
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Applies `f` to the bytes of chunk `id`'s frame in its pack file; returns them.
fn damage(s: &Store, id: &Digest, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let (path, off, len) = s.locate(id).expect("located");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open pack");
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, off).expect("read frame");
    f(&mut bytes);
    file.write_all_at(&bytes, off).expect("write frame");
    bytes
}

/// Pack files of a store directory.
fn packs(dir: &Path) -> Vec<PathBuf> {
    let mut v = files_under(&dir.join("packs"));
    v.sort();
    v
}

/// Runs GC with a cap of 0 on another thread until the flag is set.
fn gc_in_a_loop(
    s: &Arc<Store>,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (s, flag) = (Arc::clone(s), Arc::clone(&stop));
    let gc = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            s.gc(&GcPolicy {
                max_bytes: Some(0),
                ..no_gc_age()
            })
            .expect("gc");
        }
    });
    (stop, gc)
}

fn no_gc_age() -> GcPolicy {
    GcPolicy {
        max_bytes: None,
        min_age: Duration::ZERO,
        collect_expired: true,
    }
}

#[test]
fn store_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Store>();
    shareable::<Arc<Store>>();
}

#[test]
fn put_get_round_trip_and_stats() {
    let (_d, s) = open();
    let a = chunk(1, 10_000);
    let id = s.put(&a).expect("put");
    assert_eq!(id, Digest::of(&a));
    assert!(s.has(&id));
    assert_eq!(s.get(&id).expect("get"), a);
    let (f, raw_len) = s.get_compressed(&id).expect("get_compressed");
    assert_eq!(raw_len, a.len());
    assert_eq!(crate::frame::decode(&f, raw_len).expect("decode"), a);
    // The pack holds exactly the frame where the index says.
    let (path, off, len) = s.locate(&id).expect("located");
    let pack = fs::read(&path).expect("read");
    assert_eq!(&pack[off as usize..off as usize + len], &f[..]);
    // Putting again changes nothing.
    assert_eq!(s.put(&a).expect("put"), id);
    assert!(!s.put_compressed(id, &f, raw_len).expect("put_compressed"));
    let st = s.stats();
    assert_eq!(
        (st.chunks, st.raw_bytes, st.stored_bytes),
        (1, 10_000, f.len() as u64)
    );
    assert!(st.stored_bytes < st.raw_bytes);

    let other = Digest::of(b"nope");
    assert_eq!(s.has_many(&[id, other]), vec![true, false]);
    assert_eq!(s.missing(&[id, other]), vec![other]);
    assert_eq!(
        s.get(&other).expect_err("absent").missing_chunk(),
        Some(other)
    );
    assert!(s.put(&[]).is_err());
}

#[test]
fn put_compressed_verifies_before_commit() {
    let (d, s) = open();
    let a = chunk(2, 5000);
    let b = chunk(3, 5000);
    let fa = crate::frame::encode(&a).expect("encode");
    // A frame of other bytes under a's id.
    let fb = crate::frame::encode(&b).expect("encode");
    let err = s
        .put_compressed(Digest::of(&a), &fb, b.len())
        .expect_err("wrong bytes");
    assert!(matches!(err, StoreError::Verify { .. }), "{err}");
    // A wrong length, garbage, and an oversized claim.
    assert!(s.put_compressed(Digest::of(&a), &fa, 4999).is_err());
    assert!(s.put_compressed(Digest::of(&a), b"garbage", 5000).is_err());
    assert!(s
        .put_compressed(Digest::of(&a), &fa, MAX_CHUNK + 1)
        .is_err());
    // A right frame padded with a skippable frame is refused too.
    let mut padded = fa.clone();
    padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    padded.extend_from_slice(&1000u32.to_le_bytes());
    padded.extend(std::iter::repeat_n(0u8, 1000));
    assert!(matches!(
        s.put_compressed(Digest::of(&a), &padded, a.len()),
        Err(StoreError::Decompress(_))
    ));
    // So is a frame beyond zstd's bound for its content.
    let mut huge = fa.clone();
    huge.resize(zstd::zstd_safe::compress_bound(a.len()) + 1, 0);
    assert!(matches!(
        s.put_compressed(Digest::of(&a), &huge, a.len()),
        Err(StoreError::FrameSize { .. })
    ));
    assert_eq!(s.stats().chunks, 0);
    assert_eq!(s.stats().pack_bytes, pack::HEADER_LEN, "nothing written");
    let _ = &d;
    assert!(s.put_compressed(Digest::of(&a), &fa, a.len()).expect("put"));
    assert_eq!(s.get(&Digest::of(&a)).expect("get"), a);
}

#[test]
fn a_flipped_byte_is_detected_quarantined_reported_missing_and_healed() {
    let (d, s) = open();
    let a = chunk(4, 20_000);
    let id = s.put(&a).expect("put");
    let bytes = damage(&s, &id, |b| {
        let mid = b.len() / 2;
        b[mid] ^= 0x01;
    });

    let err = s.get(&id).expect_err("corrupt chunk served");
    assert_eq!(err.missing_chunk(), Some(id));
    let StoreError::Missing {
        quarantined: Some(q),
        ..
    } = err
    else {
        panic!("not quarantined: {err}");
    };
    assert!(q.starts_with(d.path().join("quarantine")));
    assert_eq!(fs::read(&q).expect("quarantined copy"), bytes);
    assert!(!s.has(&id));
    assert_eq!(s.stats().chunks, 0);
    assert_eq!(s.stats().quarantined, 1);
    // Reported missing from now on, by every read path.
    assert_eq!(
        s.get_compressed(&id).expect_err("gone").missing_chunk(),
        Some(id)
    );

    // A later put of the right bytes heals it.
    assert_eq!(s.put(&a).expect("heal"), id);
    assert_eq!(s.get(&id).expect("healed"), a);
    assert_eq!(s.purge_quarantine().expect("purge"), 1);
    assert_eq!(s.stats().quarantined, 0);
    // The removal was committed: a reopen does not bring the corrupt record back.
    let b = chunk(5, 20_000);
    let ib = s.put(&b).expect("put");
    damage(&s, &ib, |x| x[0] ^= 0x80);
    assert!(s.get(&ib).is_err());
    drop(s);
    let s = Store::open(d.path()).expect("reopen");
    assert!(!s.has(&ib));
    assert_eq!(s.get(&id).expect("healed copy survives"), a);
}

#[test]
fn a_pack_cut_short_behind_the_stores_back_reports_missing() {
    let (_d, s) = open();
    let a = chunk(5, 9000);
    let ia = s.put(&a).expect("put");
    let (path, off, _) = s.locate(&ia).expect("located");
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(off + 10))
        .expect("truncate");
    let err = s.get(&ia).expect_err("truncated");
    assert!(matches!(
        err,
        StoreError::Missing {
            quarantined: None,
            ..
        }
    ));
    assert!(!s.has(&ia));
}

#[test]
fn leases_keep_chunks_through_gc_and_expired_ones_do_not() {
    let (_d, s) = open();
    let ids: Vec<Digest> = (0..6)
        .map(|i| s.put(&chunk(10 + i, 4096)).expect("put"))
        .collect();
    s.lease("keep", Duration::from_secs(3600), &ids[0..2])
        .expect("lease");
    s.lease("short", Duration::from_millis(1), &ids[2..4])
        .expect("lease");
    // A lease may name chunks not stored yet.
    let future = Digest::of(b"future");
    s.lease_add("keep", Duration::from_secs(3600), &[future])
        .expect("lease_add");
    std::thread::sleep(Duration::from_millis(20));

    // No cap: only what the expired lease alone protected goes.
    let r = s.gc(&no_gc_age()).expect("gc");
    assert_eq!(r.expired_leases, vec!["short".to_string()]);
    let mut removed = r.removed.clone();
    removed.sort();
    let mut want = ids[2..4].to_vec();
    want.sort();
    assert_eq!(removed, want);
    assert_eq!(s.has_many(&ids), vec![true, true, false, false, true, true]);

    // Cap 0: everything unleased goes; leased chunks stay.
    let r = s
        .gc(&GcPolicy {
            max_bytes: Some(0),
            ..no_gc_age()
        })
        .expect("gc");
    assert_eq!(r.removed.len(), 2);
    assert!(r.over_cap);
    assert_eq!(
        s.has_many(&ids),
        vec![true, true, false, false, false, false]
    );
    assert!(matches!(s.remove(&ids[0]), Err(StoreError::Leased(_))));

    // A chunk stored later under the lease is protected too.
    let fut_data = b"future".to_vec();
    assert_eq!(s.put(&fut_data).expect("put"), future);
    s.gc(&GcPolicy {
        max_bytes: Some(0),
        ..no_gc_age()
    })
    .expect("gc");
    assert!(s.has(&future));

    let infos = s.leases();
    assert_eq!(infos.len(), 1);
    assert_eq!((infos[0].name.as_str(), infos[0].chunks), ("keep", 3));
    assert!(s.release("keep").expect("release"));
    assert!(!s.release("keep").expect("release"));
    let r = s
        .gc(&GcPolicy {
            max_bytes: Some(0),
            ..no_gc_age()
        })
        .expect("gc");
    assert_eq!(r.removed.len(), 3);
    assert_eq!(
        Stats {
            pack_bytes: 0,
            ..s.stats()
        },
        Stats::default()
    );
}

#[test]
fn expired_lease_chunks_are_kept_when_collect_expired_is_off_or_recently_used() {
    let (_d, s) = open();
    let id = s.put(&chunk(20, 3000)).expect("put");
    s.lease("l", Duration::ZERO, &[id]).expect("lease");
    let r = s
        .gc(&GcPolicy {
            collect_expired: false,
            ..no_gc_age()
        })
        .expect("gc");
    assert_eq!(r.expired_leases, vec!["l".to_string()]);
    assert!(r.removed.is_empty() && s.has(&id));
    // min_age protects recently used chunks even over the cap.
    let r = s
        .gc(&GcPolicy {
            max_bytes: Some(0),
            min_age: Duration::from_secs(3600),
            collect_expired: true,
        })
        .expect("gc");
    assert!(r.removed.is_empty() && r.over_cap);
}

#[test]
fn size_cap_gc_removes_least_recently_used_first() {
    let (_d, s) = open();
    let ids: Vec<Digest> = (0..5)
        .map(|i| {
            let id = s.put(&chunk(30 + i, 8192)).expect("put");
            std::thread::sleep(Duration::from_millis(2));
            id
        })
        .collect();
    // Reading chunk 0 makes it the most recently used.
    s.get(&ids[0]).expect("get");
    let total = s.stats().stored_bytes;
    let per = total / 5;
    // Keep room for about 2 chunks.
    let r = s
        .gc(&GcPolicy {
            max_bytes: Some(total - 3 * per + per / 2),
            ..no_gc_age()
        })
        .expect("gc");
    assert_eq!(r.removed, vec![ids[1], ids[2], ids[3]]);
    assert!(!r.over_cap);
    assert_eq!(r.stored_bytes, s.stats().stored_bytes);
    assert_eq!(r.freed_bytes, total - r.stored_bytes);
    assert_eq!(s.has_many(&ids), vec![true, false, false, false, true]);
}

#[test]
fn reopen_keeps_index_and_leases_and_cleans_temporaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ids, stats) = {
        let s = Store::open(dir.path()).expect("open");
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Locked(_))
        ));
        let ids: Vec<Digest> = (0..20)
            .map(|i| s.put(&chunk(40 + i, 3000 + i as usize)).expect("put"))
            .collect();
        s.lease("mig-1", Duration::from_secs(3600), &ids[..5])
            .expect("lease");
        s.lease("mig-2", Duration::from_millis(1), &ids[5..7])
            .expect("lease");
        (ids, s.stats())
    };
    // A crash mid-write leaves temporaries; open removes them.
    let stray = dir.path().join("leases/.tmp-x.lease-1-1");
    fs::write(&stray, b"partial").expect("stray");

    let s = Store::open(dir.path()).expect("reopen");
    assert!(!stray.exists());
    assert_eq!(s.stats(), stats);
    assert_eq!(s.has_many(&ids), vec![true; 20]);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(s.get(id).expect("get"), chunk(40 + i as u32, 3000 + i));
    }
    let names: Vec<_> = s.leases().into_iter().map(|l| (l.name, l.chunks)).collect();
    assert_eq!(
        names,
        vec![("mig-1".to_string(), 5), ("mig-2".to_string(), 2)]
    );
    std::thread::sleep(Duration::from_millis(5));
    let r = s
        .gc(&GcPolicy {
            max_bytes: Some(0),
            ..no_gc_age()
        })
        .expect("gc");
    assert_eq!(r.removed.len(), 15);
    assert!(s.has_many(&ids[..5]).iter().all(|h| *h));
    drop(s);
    let s = Store::open(dir.path()).expect("reopen");
    assert_eq!(s.stats().chunks, 5);
    assert_eq!(s.leases().len(), 1);
}

#[test]
fn open_refuses_other_layouts_and_corrupt_leases() {
    // A store of layout 1 (one file per chunk) is refused with a clear error.
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("LAYOUT"), "xfer-store 1\n").expect("write");
    fs::create_dir_all(dir.path().join("chunks/ab")).expect("mkdir");
    let err = Store::open(dir.path()).expect_err("old layout");
    assert!(err.to_string().contains("xfer-store 1"), "{err}");
    fs::remove_file(dir.path().join("LAYOUT")).expect("rm");
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Layout { .. })
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("LAYOUT"), "xfer-store 99\n").expect("write");
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Layout { .. })
    ));

    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Store::open(dir.path()).expect("open");
        s.lease("l1", Duration::from_secs(60), &[Digest::of(b"a")])
            .expect("lease");
    }
    let p = dir.path().join("leases/l1.lease");
    let mut b = fs::read(&p).expect("read");
    b[20] ^= 0xff;
    fs::write(&p, b).expect("write");
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::LeaseFile { .. })
    ));
}

#[test]
fn lease_names_are_checked() {
    let (_d, s) = open();
    for bad in ["", ".hidden", "a/b", "../x", "sp ace", &"x".repeat(201)] {
        assert!(matches!(
            s.lease(bad, Duration::from_secs(1), &[]),
            Err(StoreError::LeaseName(_))
        ));
    }
    s.lease("migration-6f1c.round_2", Duration::from_secs(1), &[])
        .expect("lease");
}

#[test]
fn batches_commit_together_and_clean_up_when_dropped() {
    let (d, s) = open();
    let datas: Vec<Vec<u8>> = (0..50).map(|i| chunk(60 + i, 4096)).collect();
    {
        let mut b = s.batch();
        for x in &datas[..10] {
            b.put(x).expect("put");
        }
        assert_eq!(b.len(), 10);
        assert!(!s.has(&Digest::of(&datas[0])), "visible before commit");
    }
    assert_eq!(
        s.stats().pack_bytes,
        pack::HEADER_LEN,
        "dropped batch written"
    );
    assert_eq!(s.stats().chunks, 0);

    let mut b = s.batch();
    for x in &datas {
        let f = crate::frame::encode(x).expect("encode");
        assert!(b.put_compressed(Digest::of(x), &f, x.len()).expect("put"));
        assert!(!b.put_compressed(Digest::of(x), &f, x.len()).expect("again"));
    }
    assert!(b.put_compressed(Digest::of(b"x"), b"bad", 1).is_err());
    assert_eq!(b.commit().expect("commit"), 50);
    assert_eq!(s.stats().chunks, 50);
    for x in &datas {
        assert_eq!(&s.get(&Digest::of(x)).expect("get"), x);
    }
    assert_eq!(packs(d.path()).len(), 1);
}

#[test]
fn has_many_answers_thousands_of_ids_in_one_call() {
    // Correctness only: speed is the pipeline benchmark's business, not a timed test.
    let (_d, s) = open();
    let mut b = s.batch();
    let ids: Vec<Digest> = (0..5000)
        .map(|i| b.put(&chunk(1000 + i, 64)).expect("put"))
        .collect();
    b.commit().expect("commit");
    let mut query = ids.clone();
    query.extend((0..5000u32).map(|i| Digest::of(&i.to_le_bytes())));
    let r = s.has_many(&query);
    assert_eq!(r.len(), query.len());
    assert!(r[..5000].iter().all(|h| *h), "every stored id is there");
    assert!(r[5000..].iter().all(|h| !*h), "no unknown id is");
}

#[test]
fn concurrent_writers_of_same_and_different_chunks_leave_a_consistent_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(Store::open(dir.path()).expect("open"));
    let shared: Vec<Vec<u8>> = (0..8).map(|i| chunk(500 + i, 6000)).collect();
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let s = Arc::clone(&s);
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..shared.len() {
                    // Everyone writes the shared chunks, by both paths, in different orders.
                    let x = &shared[(i + t as usize) % shared.len()];
                    if t % 2 == 0 {
                        s.put(x).expect("put shared");
                    } else {
                        let f = crate::frame::encode(x).expect("encode");
                        s.put_compressed(Digest::of(x), &f, x.len())
                            .expect("put shared");
                    }
                    let own = chunk(600 + t * 100 + i as u32, 5000);
                    mine.push((s.put(&own).expect("put own"), own));
                    // Readers run meanwhile.
                    assert_eq!(&s.get(&Digest::of(x)).expect("get shared"), x);
                }
                let mut b = s.batch();
                for x in &shared {
                    b.put(x).expect("batch put");
                }
                b.commit().expect("commit");
                mine
            })
        })
        .collect();
    let mut own = Vec::new();
    for t in threads {
        own.extend(t.join().expect("writer thread"));
    }
    let check = |s: &Store| {
        assert_eq!(s.stats().chunks, (shared.len() + own.len()) as u64);
        for x in &shared {
            assert_eq!(&s.get(&Digest::of(x)).expect("shared"), x);
        }
        for (id, x) in &own {
            assert_eq!(&s.get(id).expect("own"), x);
        }
        let files = packs(dir.path());
        let on_disk: u64 = files
            .iter()
            .map(|p| fs::metadata(p).expect("stat").len())
            .sum();
        assert_eq!(s.stats().pack_bytes, on_disk);
        assert!(s.stats().stored_bytes < on_disk);
    };
    check(&s);
    drop(s);
    check(&Store::open(dir.path()).expect("reopen"));
}

#[test]
fn gc_concurrent_with_writers_never_indexes_a_missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(Store::open(dir.path()).expect("open"));
    let data: Vec<Vec<u8>> = (0..16).map(|i| chunk(900 + i, 2000)).collect();
    let (stop, gc) = gc_in_a_loop(&s);
    for round in 0..3 {
        let mut b = s.batch();
        for x in &data {
            b.put(x).expect("put");
        }
        b.commit().expect("commit");
        for x in data.iter().skip(round) {
            s.put(x).expect("put");
        }
    }
    stop.store(true, Ordering::Relaxed);
    gc.join().expect("gc thread");
    // Whatever survived is readable; everything indexed has its file.
    for id in s.ids() {
        s.get(&id).expect("indexed chunk readable");
    }
    let n = s.stats().chunks;
    drop(s);
    let s = Store::open(dir.path()).expect("reopen");
    assert_eq!(s.stats().chunks, n);
    for id in s.ids() {
        s.get(&id).expect("indexed chunk readable after reopen");
    }
}

#[test]
fn a_lease_in_memory_protects_at_once_and_is_durable_once_persisted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, c) = {
        let s = Store::open(dir.path()).expect("open");
        let a = s.put(&chunk(40, 3000)).expect("put");
        let b = s.put(&chunk(41, 3000)).expect("put");
        let c = s.put(&chunk(42, 3000)).expect("put");
        s.lease("m", Duration::from_secs(3600), &[a])
            .expect("lease");
        // Before the file is written, GC already keeps b.
        s.lease_add_in_memory("m", Duration::from_secs(3600), &[b])
            .expect("in memory");
        let r = s
            .gc(&GcPolicy {
                max_bytes: Some(0),
                ..no_gc_age()
            })
            .expect("gc");
        assert_eq!(r.removed, vec![c]);
        assert!(s.has(&a) && s.has(&b));
        s.persist_lease("m").expect("persist");
        // A lease released before its pending addition is persisted stays released.
        s.lease_add_in_memory("gone", Duration::from_secs(3600), &[a])
            .expect("in memory");
        assert!(s.release("gone").expect("release"));
        s.persist_lease("gone").expect("persist");
        (a, b, c)
    };
    let s = Store::open(dir.path()).expect("reopen");
    let leases = s.leases();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!((leases[0].name.as_str(), leases[0].chunks), ("m", 2));
    assert!(s.has(&a) && s.has(&b) && !s.has(&c));
}

/// Pack file of a single-pack store, and its length.
fn only_pack(dir: &Path) -> (PathBuf, u64) {
    let p = packs(dir);
    assert_eq!(p.len(), 1, "{p:?}");
    let len = fs::metadata(&p[0]).expect("stat").len();
    (p[0].clone(), len)
}

#[test]
fn a_crash_in_the_middle_of_a_batch_loses_nothing_committed_and_serves_nothing_torn() {
    // Three ways a batch can be left by a crash before its fdatasync completed: cut
    // short, its commit record lost, its bytes never written (zeros).
    for how in ["cut", "no-commit", "zeros"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let committed: Vec<Vec<u8>> = (0..20).map(|i| chunk(2000 + i, 4096)).collect();
        let torn: Vec<Vec<u8>> = (0..20).map(|i| chunk(3000 + i, 4096)).collect();
        let end_of_committed = {
            let s = Store::open(dir.path()).expect("open");
            let mut b = s.batch();
            for x in &committed {
                b.put(x).expect("put");
            }
            b.commit().expect("commit");
            let end = s.stats().pack_bytes;
            let mut b = s.batch();
            for x in &torn {
                b.put(x).expect("put");
            }
            b.commit().expect("commit");
            end
        };
        let (path, len) = only_pack(dir.path());
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open pack");
        match how {
            "cut" => f.set_len(end_of_committed + (len - end_of_committed) / 2),
            "no-commit" => f.set_len(len - REC_LEN as u64),
            _ => f.write_all_at(
                &vec![0u8; (len - end_of_committed - 100) as usize],
                end_of_committed + 50,
            ),
        }
        .expect("simulate the crash");
        drop(f);

        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.stats().chunks, 20, "{how}");
        for x in &committed {
            assert_eq!(&s.get(&Digest::of(x)).expect("committed chunk"), x, "{how}");
        }
        for x in &torn {
            assert!(!s.has(&Digest::of(x)), "{how}: torn chunk indexed");
        }
        // The torn tail was cut off and writing goes on after the last commit.
        assert_eq!(only_pack(dir.path()).1, end_of_committed, "{how}");
        let id = s.put(&torn[0]).expect("put again");
        drop(s);
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.get(&id).expect("rewritten"), torn[0]);
        assert_eq!(s.stats().chunks, 21, "{how}");
    }
}

#[test]
fn packs_roll_at_their_size_limit_and_gc_compacts_them_under_leases() {
    let dir = tempfile::tempdir().expect("tempdir");
    let datas: Vec<Vec<u8>> = (0..200).map(|i| chunk(4000 + i, 4096)).collect();
    let ids: Vec<Digest> = datas.iter().map(|x| Digest::of(x)).collect();
    {
        let s = Store::open_with(dir.path(), 64 << 10).expect("open");
        for part in datas.chunks(10) {
            let mut b = s.batch();
            for x in part {
                b.put(x).expect("put");
            }
            b.commit().expect("commit");
        }
        let n_packs = packs(dir.path()).len();
        assert!(n_packs >= 5, "{n_packs} packs");
        // Every other chunk is leased; the rest goes.
        let leased: Vec<Digest> = ids.iter().step_by(2).copied().collect();
        s.lease("mig", Duration::from_secs(3600), &leased)
            .expect("lease");
        let before = s.stats();
        let r = s
            .gc(&GcPolicy {
                max_bytes: Some(0),
                ..no_gc_age()
            })
            .expect("gc");
        assert_eq!(r.removed.len(), 100);
        assert!(r.over_cap);
        assert!(r.packs_compacted >= n_packs - 1, "{r:?}");
        let after = s.stats();
        assert_eq!(after.chunks, 100);
        assert!(
            after.pack_bytes < before.pack_bytes * 2 / 3,
            "{before:?} -> {after:?}"
        );
        for (i, x) in datas.iter().enumerate() {
            match s.get(&ids[i]) {
                Ok(got) => assert!(i % 2 == 0 && &got == x),
                Err(e) => assert!(i % 2 == 1, "{e}"),
            }
        }
    }
    let s = Store::open_with(dir.path(), 64 << 10).expect("reopen");
    assert_eq!(s.stats().chunks, 100);
    assert_eq!(
        s.has_many(&ids),
        (0..200).map(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    for i in (0..200).step_by(2) {
        assert_eq!(s.get(&ids[i]).expect("leased chunk"), datas[i]);
    }
    // Released: everything can go, and the packs with it.
    s.release("mig").expect("release");
    s.gc(&GcPolicy {
        max_bytes: Some(0),
        ..no_gc_age()
    })
    .expect("gc");
    assert_eq!(s.stats().chunks, 0);
    drop(s);
    let s = Store::open_with(dir.path(), 64 << 10).expect("reopen");
    assert_eq!(s.stats().chunks, 0);
    assert!(s.stats().pack_bytes < 128 << 10, "{:?}", s.stats());
}

#[test]
fn concurrent_readers_writers_and_compaction_agree_with_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(Store::open_with(dir.path(), 32 << 10).expect("open"));
    let keep: Vec<Vec<u8>> = (0..40).map(|i| chunk(5000 + i, 3000)).collect();
    let keep_ids: Vec<Digest> = keep.iter().map(|x| Digest::of(x)).collect();
    s.lease("keep", Duration::from_secs(3600), &keep_ids)
        .expect("lease");
    let (stop, gc) = gc_in_a_loop(&s);
    let writers: Vec<_> = (0..3u32)
        .map(|t| {
            let s = Arc::clone(&s);
            let keep = keep.clone();
            std::thread::spawn(move || {
                for round in 0..6u32 {
                    let mut b = s.batch();
                    for x in keep.iter().skip(t as usize) {
                        b.put(x).expect("put kept");
                    }
                    for j in 0..10 {
                        b.put(&chunk(6000 + t * 1000 + round * 10 + j, 2500))
                            .expect("put churn");
                    }
                    b.commit().expect("commit");
                    // Readers meanwhile: a leased chunk, once stored, stays readable.
                    for x in &keep[t as usize..] {
                        assert_eq!(&s.get(&Digest::of(x)).expect("kept"), x);
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    stop.store(true, Ordering::Relaxed);
    gc.join().expect("gc thread");
    let check = |s: &Store| {
        for (x, id) in keep.iter().zip(&keep_ids) {
            assert_eq!(&s.get(id).expect("kept"), x);
        }
        for id in s.ids() {
            s.get(&id).expect("every indexed chunk readable");
        }
    };
    check(&s);
    let ids = {
        let mut v = s.ids();
        v.sort();
        v
    };
    drop(s);
    let s = Store::open_with(dir.path(), 32 << 10).expect("reopen");
    let mut again = s.ids();
    again.sort();
    assert_eq!(again, ids);
    check(&s);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Batches of chunks, then the pack cut at any byte (a crash at any point of the
    /// last writes) and one byte anywhere flipped: a reopen keeps every batch that
    /// ended before the cut, nothing after it, and no read returns wrong bytes.
    #[test]
    fn any_cut_and_flip_keeps_committed_batches_and_serves_nothing_wrong(
        sizes in proptest::collection::vec(proptest::collection::vec(1usize..9000, 1..6), 1..6),
        cut_frac in 0.0f64..1.0,
        flip_frac in proptest::option::of(0.0f64..1.0),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ends = Vec::new();
        let mut all = Vec::new();
        {
            let s = Store::open(dir.path()).expect("open");
            let mut n = 0u32;
            for batch in &sizes {
                let mut b = s.batch();
                let mut these = Vec::new();
                for &len in batch {
                    n += 1;
                    let x = chunk(7000 + n, len);
                    b.put(&x).expect("put");
                    these.push(x);
                }
                b.commit().expect("commit");
                ends.push(s.stats().pack_bytes);
                all.push(these);
            }
        }
        let (path, len) = only_pack(dir.path());
        let cut = HEADER_LEN + ((len - HEADER_LEN) as f64 * cut_frac) as u64;
        let f = fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        f.set_len(cut).expect("cut");
        if let Some(ff) = flip_frac {
            let at = ((cut as f64) * ff) as u64;
            let mut byte = [0u8; 1];
            f.read_exact_at(&mut byte, at).expect("read");
            byte[0] ^= 0x10;
            f.write_all_at(&byte, at).expect("flip");
        }
        drop(f);
        match Store::open(dir.path()) {
            Ok(s) => {
                for (these, &end) in all.iter().zip(&ends) {
                    for x in these {
                        let id = Digest::of(x);
                        match s.get(&id) {
                            Ok(got) => proptest::prop_assert_eq!(&got, x),
                            Err(e) => {
                                proptest::prop_assert!(e.missing_chunk() == Some(id));
                                // Only a flip may cost a batch that ended before the cut.
                                proptest::prop_assert!(end > cut || flip_frac.is_some());
                            }
                        }
                    }
                }
            }
            // Only a flip in the pack header makes the directory unreadable... and
            // then the pack is set aside, not refused: open must succeed.
            Err(e) => proptest::prop_assert!(false, "open failed: {e}"),
        }
    }
}

#[test]
fn a_large_batch_commits_in_slices_and_counts_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let datas: Vec<Vec<u8>> = (0..2500).map(|i| chunk(9000 + i, 8192)).collect();
    {
        let s = Store::open(dir.path()).expect("open");
        let mut b = s.batch();
        for x in &datas {
            b.put(x).expect("put");
        }
        // More than BATCH_FLUSH of records: some are already committed.
        assert!(s.stats().chunks > 0 && (s.stats().chunks as usize) < datas.len());
        assert_eq!(b.commit().expect("commit"), datas.len());
        assert_eq!(s.stats().chunks as usize, datas.len());
    }
    let s = Store::open(dir.path()).expect("reopen");
    for x in datas.iter().step_by(97) {
        assert_eq!(&s.get(&Digest::of(x)).expect("get"), x);
    }
    assert_eq!(s.stats().chunks as usize, datas.len());
}
