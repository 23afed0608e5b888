//! The chunk service over real gRPC on loopback TCP: Have with 100k ids, bounded
//! batches sent as stored, cancellation when the client drops a stream, version
//! checks, and multi-source fetches where a server is killed or serves corrupt bytes.

// Inside `mod chunks` so that `cargo test -p xfer-agent chunks` selects these tests.
mod chunks {

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;
    use tokio_stream::wrappers::TcpListenerStream;
    use xfer_agent::chunks::wire::encode_ids;
    use xfer_agent::chunks::{
        ChunkError, ChunkPeer, ChunkService, ChunkStore, FetchConfig, Fetcher, GrpcPeer, LoadMeter,
        MemStore, Want,
    };
    use xfer_proto::v1::chunks_client::ChunksClient;
    use xfer_proto::v1::{FetchRequest, HaveRequest};
    use xfer_store::Digest;

    fn data(i: u32, len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64 ^ (u64::from(i) << 20) ^ u64::from(i);
        (0..len)
            .map(|k| {
                if k < len / 2 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    (k % 199) as u8
                }
            })
            .collect()
    }

    /// A store wrapper that counts reads and can make them slow.
    #[derive(Debug)]
    struct Counting {
        inner: MemStore,
        reads: AtomicU64,
        delay: Duration,
    }

    impl Counting {
        fn new(inner: MemStore, delay: Duration) -> Arc<Self> {
            Arc::new(Counting {
                inner,
                reads: AtomicU64::new(0),
                delay,
            })
        }
        fn reads(&self) -> u64 {
            self.reads.load(Ordering::Relaxed)
        }
    }

    impl ChunkStore for Counting {
        fn has_many(&self, ids: &[Digest]) -> Vec<bool> {
            self.inner.has_many(ids)
        }
        fn get_compressed(&self, id: &Digest) -> Option<(Vec<u8>, u32)> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            if !self.delay.is_zero() {
                std::thread::sleep(self.delay);
            }
            self.inner.get_compressed(id)
        }
        fn put_verified(&self, id: &Digest, frame: &[u8], raw_len: u32) -> Result<(), ChunkError> {
            self.inner.put_verified(id, frame, raw_len)
        }
    }

    /// A chunk server on its own runtime (own thread), so that killing it drops every
    /// connection task at once, like a node that dies.
    struct Server {
        addr: String,
        meter: Arc<LoadMeter>,
        kill: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn spawn<S: ChunkStore>(store: Arc<S>) -> Server {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let addr = format!("http://{}", listener.local_addr().expect("addr"));
            let svc = ChunkService::new(store);
            let meter = svc.meter();
            let (kill, killed) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                    let serve = tonic::transport::Server::builder()
                        .add_service(svc.into_server())
                        .serve_with_incoming(TcpListenerStream::new(l));
                    tokio::select! {
                        r = serve => r.expect("serve"),
                        _ = killed => {}
                    }
                });
                // Drops every task of the server: listener and connections.
                rt.shutdown_background();
            });
            Server {
                addr,
                meter,
                kill: Some(kill),
                thread: Some(thread),
            }
        }

        fn kill(&mut self) {
            if let Some(k) = self.kill.take() {
                let _ = k.send(());
            }
            if let Some(t) = self.thread.take() {
                t.join().expect("server thread");
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.kill();
        }
    }

    async fn client(addr: &str) -> ChunksClient<tonic::transport::Channel> {
        ChunksClient::connect(addr.to_string())
            .await
            .expect("connect")
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn have_answers_100k_ids_in_one_call() {
        let store = MemStore::new();
        let ids: Vec<Digest> = (0..100_000u32)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            if i % 3 == 0 {
                store.insert_unchecked(*id, vec![0], 1);
            }
        }
        let server = Server::spawn(Arc::new(store));
        let mut c = client(&server.addr).await;
        let reply = c
            .have(HaveRequest {
                version: xfer_proto::PROTOCOL_VERSION as i32,
                ids: encode_ids(&ids),
            })
            .await
            .expect("have")
            .into_inner();
        assert_eq!(reply.bitmap.len(), 12_500);
        let (bits, load) =
            xfer_agent::chunks::wire::decode_have_reply(&reply, ids.len()).expect("bitmap");
        assert!(load.is_some());
        for (i, b) in bits.iter().enumerate() {
            assert_eq!(*b, i % 3 == 0, "id {i}");
        }
        // The same through the peer API.
        let peer = GrpcPeer::connect(&server.addr).await.expect("peer");
        let (bits2, _) = peer.have(ids.clone()).await.expect("have");
        assert_eq!(bits2, bits);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_version_and_ragged_ids_are_refused() {
        let server = Server::spawn(Arc::new(MemStore::new()));
        let mut c = client(&server.addr).await;
        let st = c
            .have(HaveRequest {
                version: 0,
                ids: Vec::new(),
            })
            .await
            .expect_err("version 0");
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(
            st.message().contains("protocol version 0"),
            "{}",
            st.message()
        );
        let st = c
            .fetch(FetchRequest {
                version: xfer_proto::PROTOCOL_VERSION as i32,
                ids: vec![1; 40],
                max_batch_bytes: 0,
            })
            .await
            .expect_err("ragged ids");
        assert_eq!(st.code(), tonic::Code::InvalidArgument);
        assert!(st.message().contains("multiple of 32"), "{}", st.message());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_sends_bounded_batches_as_stored() {
        let store = MemStore::new();
        let mut ids = Vec::new();
        for i in 0..300u32 {
            ids.push(store.insert(&data(i, 16 << 10)).expect("insert"));
        }
        let lacking = Digest::of(b"nobody has this");
        ids.insert(10, lacking);
        let store = Arc::new(store);
        let server = Server::spawn(store.clone());
        let peer = GrpcPeer::connect(&server.addr).await.expect("peer");
        let mut stream = peer.fetch(ids.clone(), 256 << 10).await.expect("fetch");
        let mut order = Vec::new();
        let mut missing: Vec<Digest> = Vec::new();
        let mut batches = 0;
        while let Some(b) = stream.next().await {
            let b = b.expect("batch");
            batches += 1;
            let bytes = b.frame_bytes();
            assert!(bytes <= 256 << 10, "batch of {bytes} bytes");
            assert!(b.load.is_some());
            for c in &b.chunks {
                let (stored, raw) = store.get_compressed(&c.id).expect("held");
                assert_eq!(c.frame, stored, "frames travel exactly as stored");
                assert_eq!(c.raw_len, raw);
                order.push(c.id);
            }
            missing.extend(&b.missing);
        }
        // ~2.5 MB of frames in batches of at most 256 KiB.
        assert!(batches >= 9, "{batches} batches");
        // Chunks in request order; the lacking id reported as missing.
        assert_eq!(missing, vec![lacking]);
        ids.remove(10);
        assert!(order == ids, "chunks arrive in request order");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_stream_stops_the_server_reading() {
        let inner = MemStore::new();
        let mut ids = Vec::new();
        for i in 0..3000u32 {
            ids.push(inner.insert(&data(i, 8 << 10)).expect("insert"));
        }
        let store = Counting::new(inner, Duration::from_micros(500));
        let server = Server::spawn(store.clone());
        let peer = GrpcPeer::connect(&server.addr).await.expect("peer");
        let mut stream = peer.fetch(ids.clone(), 64 << 10).await.expect("fetch");
        let first = stream.next().await.expect("a batch").expect("ok");
        assert!(!first.chunks.is_empty());
        // The client does not read: flow control and the bounded channel stop the reader.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let paused = store.reads();
        assert!(
            paused < 1500,
            "the server read {paused} chunks ahead of a stalled client"
        );
        assert_eq!(server.meter.load().fetch_streams, 1);
        // Abort: drop the stream.
        drop(stream);
        let mut stopped = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if server.meter.load().fetch_streams == 0 {
                stopped = true;
                break;
            }
        }
        assert!(stopped, "the server's reader did not end");
        let after = store.reads();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.reads(), after, "no reads after the reader ended");
        assert!(after < 3000, "read {after} of 3000");
    }

    struct Cluster {
        ids: Vec<Digest>,
        blobs: Vec<Vec<u8>>,
    }

    fn cluster(n: u32, len: usize) -> Cluster {
        let blobs: Vec<Vec<u8>> = (0..n).map(|i| data(i, len)).collect();
        Cluster {
            ids: blobs.iter().map(|b| Digest::of(b)).collect(),
            blobs,
        }
    }

    fn mem(c: &Cluster, keep: impl Fn(usize) -> bool) -> MemStore {
        let s = MemStore::new();
        for (i, b) in c.blobs.iter().enumerate() {
            if keep(i) {
                s.insert(b).expect("insert");
            }
        }
        s
    }

    fn verify_all(dest: &MemStore, c: &Cluster) {
        assert_eq!(dest.len(), c.ids.len());
        for (id, b) in c.ids.iter().zip(&c.blobs) {
            assert_eq!(&dest.read(id).expect("held").expect("verifies"), b);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_2000_chunks_from_3_sources_when_one_is_killed() {
        let c = cluster(2000, 6000);
        // a and b hold everything except: b lacks every 10th chunk; origin holds all.
        let a_store = Counting::new(mem(&c, |_| true), Duration::from_micros(300));
        let b_store = Counting::new(mem(&c, |i| i % 10 != 0), Duration::from_micros(300));
        let o_store = Counting::new(mem(&c, |_| true), Duration::ZERO);
        let mut a = Server::spawn(a_store.clone());
        let b = Server::spawn(b_store.clone());
        let o = Server::spawn(o_store.clone());
        let dest = Arc::new(MemStore::new());
        let peer =
            |addr: &str| -> Arc<dyn ChunkPeer> { Arc::new(GrpcPeer::lazy(addr).expect("peer")) };
        let f = Fetcher::new(dest.clone(), "origin", peer(&o.addr))
            .with_source("a", peer(&a.addr))
            .with_source("b", peer(&b.addr))
            .with_config(FetchConfig {
                error_backoff: Duration::from_millis(10),
                ..FetchConfig::default()
            });
        let wants: Vec<Want> = c
            .ids
            .iter()
            .map(|id| Want {
                id: *id,
                sources: vec!["a".into(), "b".into()],
            })
            .collect();
        let fetch = tokio::spawn(async move {
            let r = f.fetch(&wants).await;
            (r, f)
        });
        // Kill a once it has served 300 chunks.
        while a_store.reads() < 300 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a.kill();
        let (report, _f) = fetch.await.expect("join");
        let report = report.expect("fetch completes from the others");
        verify_all(&dest, &c);
        let ra = &report.sources["a"];
        assert!(ra.errors >= 1, "{ra:?}");
        assert!(ra.dropped, "a is dropped after repeated failures: {ra:?}");
        assert!(ra.chunks < 1500, "{ra:?}");
        let rb = &report.sources["b"];
        assert!(rb.chunks > 0 && rb.missing > 0, "{rb:?}");
        // What b lacked and a could no longer serve came from the fallback.
        assert!(report.sources["origin"].chunks > 0);
        assert_eq!(report.sources.values().map(|s| s.chunks).sum::<u64>(), 2000);
        assert_eq!(report.fetched, 2000);
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report json")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_corrupt_chunk_is_detected_and_fetched_elsewhere() {
        let c = cluster(200, 4000);
        let bad_store = mem(&c, |_| true);
        // Chunk 5: a valid frame of other bytes. Chunk 6: garbage.
        let other = xfer_store::frame::encode(&data(9999, 4000)).expect("encode");
        bad_store.insert_unchecked(c.ids[5], other, 4000);
        bad_store.insert_unchecked(c.ids[6], vec![0xde, 0xad, 0xbe, 0xef], 4000);
        let bad = Server::spawn(Arc::new(bad_store));
        let good = Server::spawn(Arc::new(mem(&c, |_| true)));
        let origin = Server::spawn(Arc::new(mem(&c, |_| true)));
        let dest = Arc::new(MemStore::new());
        let peer =
            |addr: &str| -> Arc<dyn ChunkPeer> { Arc::new(GrpcPeer::lazy(addr).expect("peer")) };
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin.addr))
            .with_source("bad", peer(&bad.addr))
            .with_source("good", peer(&good.addr));
        // The first 100 only at bad (and the fallback); the rest at good.
        let wants: Vec<Want> = c
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| Want {
                id: *id,
                sources: vec![if i < 100 { "bad" } else { "good" }.into()],
            })
            .collect();
        let report = f.fetch(&wants).await.expect("fetch");
        verify_all(&dest, &c);
        let rb = &report.sources["bad"];
        assert_eq!(rb.corrupt, 2, "{rb:?}");
        assert_eq!(rb.errors, 2, "{rb:?}");
        assert!(rb
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("verify chunk")));
        assert!(!rb.dropped);
        // The two corrupt chunks came from the fallback (the only other candidate);
        // the end game may have moved a few more of bad's chunks there too.
        let ro = &report.sources["origin"];
        assert!(ro.chunks >= 2, "{ro:?}");
        assert!(rb.chunks <= 98, "{rb:?}");
        assert_eq!(report.sources.values().map(|s| s.chunks).sum::<u64>(), 200);
        assert_eq!(report.fetched, 200);
    }
}
