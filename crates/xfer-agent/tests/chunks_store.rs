//! The chunk transport over the on-disk store (`xfer_store::Store`): served from
//! one store, fetched into another, corrupt files on the serving side reported
//! missing (the store verifies on read) and fetched from the fallback.

// Inside `mod chunks` so that `cargo test -p xfer-agent chunks` selects these tests.
mod chunks {
    use std::sync::Arc;

    use tokio_stream::wrappers::TcpListenerStream;
    use xfer_agent::chunks::{ChunkPeer, ChunkService, ChunkStore, Fetcher, GrpcPeer, Want};
    use xfer_store::{Digest, Store};

    fn data(i: u32, len: usize) -> Vec<u8> {
        let mut x = 0x51_7cc1_b727_220au64 ^ (u64::from(i) << 24) ^ u64::from(i);
        (0..len)
            .map(|k| {
                if k % 3 == 0 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    k as u8
                }
            })
            .collect()
    }

    /// Serves `store` on loopback; the server lives as long as the test's runtime.
    async fn serve<S: ChunkStore>(store: Arc<S>) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("http://{}", l.local_addr().expect("addr"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ChunkService::new(store).into_server())
                .serve_with_incoming(TcpListenerStream::new(l)),
        );
        addr
    }

    /// Flips a byte in the middle of chunk `id`'s frame in its pack file.
    fn rot(store: &Store, id: &Digest) {
        use std::os::unix::fs::FileExt;
        let (path, off, len) = store.locate(id).expect("chunk located");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open pack");
        let at = off + len as u64 / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        b[0] ^= 0xff;
        f.write_all_at(&b, at).expect("write");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_between_on_disk_stores() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (peer_dir, origin_dir, dest_dir) = (
            tmp.path().join("peer"),
            tmp.path().join("origin"),
            tmp.path().join("dest"),
        );
        let peer = Arc::new(Store::open(&peer_dir).expect("open peer"));
        let origin = Arc::new(Store::open(&origin_dir).expect("open origin"));
        let dest = Arc::new(Store::open(&dest_dir).expect("open dest"));
        let blobs: Vec<Vec<u8>> = (0..120).map(|i| data(i, 20_000)).collect();
        let mut ids = Vec::new();
        for b in &blobs {
            let id = peer.put(b).expect("put peer");
            assert_eq!(origin.put(b).expect("put origin"), id);
            ids.push(id);
        }
        // Two chunks rot on the peer's disk: it must not serve them.
        for id in &ids[10..12] {
            rot(&peer, id);
        }
        // dest already holds a few.
        for b in &blobs[..5] {
            dest.put(b).expect("put dest");
        }
        let peer_addr = serve(peer.clone()).await;
        let origin_addr = serve(origin.clone()).await;
        let p = |a: &str| -> Arc<dyn ChunkPeer> { Arc::new(GrpcPeer::lazy(a).expect("peer")) };
        let f = Fetcher::new(dest.clone(), "origin", p(&origin_addr))
            .with_source("peer", p(&peer_addr));
        let wants: Vec<Want> = ids
            .iter()
            .map(|id| Want {
                id: *id,
                sources: vec!["peer".into()],
            })
            .collect();
        let report = f.fetch(&wants).await.expect("fetch");
        assert_eq!(report.already_local, 5);
        assert_eq!(report.fetched, 115);
        let rp = &report.sources["peer"];
        assert!(rp.missing >= 2, "{rp:?}");
        assert!(report.sources["origin"].chunks >= 2);
        for (id, b) in ids.iter().zip(&blobs) {
            assert_eq!(&dest.get(id).expect("stored and verified"), b);
        }
        // A frame that lies about its content is refused by the store, as corrupt.
        let other = xfer_store::frame::encode(&blobs[0]).expect("encode");
        let e = ChunkStore::put_verified(&*dest, &Digest::of(b"x"), &other, 20_000)
            .expect_err("wrong digest");
        assert!(e.is_corrupt(), "{e}");
        let e = ChunkStore::put_verified(&*dest, &Digest::of(b"not held"), &[1, 2, 3], 20_000)
            .expect_err("garbage");
        assert!(e.is_corrupt(), "{e}");
    }

    #[test]
    fn a_batch_keeps_its_good_chunks_and_refuses_its_corrupt_ones() {
        let t = tempfile::tempdir().expect("tmp");
        let store = Store::open(t.path()).expect("store");
        let blobs: Vec<Vec<u8>> = (200..204).map(|i| data(i, 4096)).collect();
        let frames: Vec<Vec<u8>> = blobs
            .iter()
            .map(|b| xfer_store::frame::encode(b).expect("encode"))
            .collect();
        let ids: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        // The third chunk carries the second's frame: it must not be kept.
        let items = vec![
            (ids[0], &frames[0][..], 4096),
            (ids[1], &frames[1][..], 4096),
            (ids[2], &frames[1][..], 4096),
            (ids[3], &frames[3][..], 4096),
        ];
        let r = ChunkStore::put_verified_many(&store, &items);
        assert_eq!(r.len(), 4);
        assert!(r[0].is_ok() && r[1].is_ok() && r[3].is_ok(), "{r:?}");
        assert!(r[2].as_ref().is_err_and(|e| e.is_corrupt()), "{r:?}");
        assert_eq!(store.has_many(&ids), vec![true, true, false, true]);
        assert_eq!(store.get(&ids[3]).expect("verified"), blobs[3]);
    }
}
