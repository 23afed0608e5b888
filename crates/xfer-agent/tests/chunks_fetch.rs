//! The multi-source fetcher against in-process fake peers: ranking, failover on
//! missing and corrupt chunks and on slowness, resumption after a cut or a cancel.

// Inside `mod chunks` so that `cargo test -p xfer-agent chunks` selects these tests.
mod chunks {

    use std::sync::Arc;
    use std::time::Duration;

    use xfer_agent::chunks::fake::FakePeer;
    use xfer_agent::chunks::{
        ChunkError, ChunkPeer, FetchConfig, Fetcher, MemStore, Progress, Want,
    };
    use xfer_store::Digest;

    /// Deterministic chunk contents: half pseudo-random, half a repeated pattern.
    fn data(i: u32, len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (u64::from(i) << 17) ^ u64::from(i);
        (0..len)
            .map(|k| {
                if k < len / 2 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                } else {
                    (k % 251) as u8 ^ i as u8
                }
            })
            .collect()
    }

    struct Set {
        ids: Vec<Digest>,
        blobs: Vec<Vec<u8>>,
    }

    fn chunks(n: u32, len: usize) -> Set {
        chunks_in(0..n, len)
    }

    /// The chunks `data(i, len)` for `i` in `range`.
    fn chunks_in(range: std::ops::Range<u32>, len: usize) -> Set {
        let blobs: Vec<Vec<u8>> = range.map(|i| data(i, len)).collect();
        Set {
            ids: blobs.iter().map(|b| Digest::of(b)).collect(),
            blobs,
        }
    }

    /// A store holding the chunks of `set` for which `keep(i)`.
    fn store(set: &Set, keep: impl Fn(usize) -> bool) -> Arc<MemStore> {
        let s = MemStore::new();
        for (i, b) in set.blobs.iter().enumerate() {
            if keep(i) {
                s.insert(b).expect("insert");
            }
        }
        Arc::new(s)
    }

    fn wants(set: &Set, sources: &[&str]) -> Vec<Want> {
        set.ids
            .iter()
            .map(|id| Want {
                id: *id,
                sources: sources.iter().map(|s| s.to_string()).collect(),
            })
            .collect()
    }

    fn assert_all_verified(dest: &MemStore, set: &Set) {
        assert_eq!(dest.len(), set.ids.len());
        for (id, blob) in set.ids.iter().zip(&set.blobs) {
            let got = dest.read(id).expect("held").expect("verifies");
            assert_eq!(&got, blob);
        }
    }

    /// Runs a fetch of `w` and drops it once `dest` holds `n` chunks.
    async fn cut_short(f: &Fetcher<MemStore>, w: &[Want], dest: &MemStore, n: usize) {
        tokio::select! {
            r = f.fetch(w) => panic!("the fetch was not cut short: {r:?}"),
            _ = async {
                while dest.len() < n {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            } => {}
        }
    }

    fn peer(p: &FakePeer) -> Arc<dyn ChunkPeer> {
        Arc::new(p.clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_source_gets_fewer_chunks_than_a_fast_one() {
        let set = chunks(1000, 4096);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        let fast = FakePeer::new("fast", store(&set, |_| true))
            .with(|b| b.per_chunk = Duration::from_micros(100));
        let slow = FakePeer::new("slow", store(&set, |_| true))
            .with(|b| b.per_chunk = Duration::from_millis(4));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("fast", peer(&fast))
            .with_source("slow", peer(&slow));
        let report = f
            .fetch(&wants(&set, &["slow", "fast"]))
            .await
            .expect("fetch");
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        assert_all_verified(&dest, &set);
        let (rf, rs) = (&report.sources["fast"], &report.sources["slow"]);
        assert!(
            rf.chunks > 2 * rs.chunks,
            "fast {} vs slow {} chunks",
            rf.chunks,
            rs.chunks
        );
        assert_eq!(report.fetched, 1000);
        assert_eq!(
            report.sources.values().map(|s| s.chunks).sum::<u64>(),
            1000,
            "each chunk is counted once, for the source that delivered it first"
        );
        // The fallback is tried last: both peers hold everything.
        assert_eq!(report.sources["origin"].requests, 0);
        let stats = f.stats();
        assert!(stats["fast"].rate_bps > stats["slow"].rate_bps);
        // The report serializes for the CLI.
        let json = serde_json::to_string(&report).expect("json");
        assert!(json.contains("\"busy_micros\""));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sharing_fallback_works_beside_the_peers() {
        let set = chunks(600, 4096);
        let paced = |name: &str| {
            FakePeer::new(name, store(&set, |_| true))
                .with(|b| b.per_chunk = Duration::from_millis(1))
        };
        let (origin, a, b) = (paced("origin"), paced("a"), paced("b"));
        let set = &set;
        let fetch = |shares: bool| {
            let dest = Arc::new(MemStore::new());
            let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
                .with_source("a", peer(&a))
                .with_source("b", peer(&b))
                .with_config(FetchConfig {
                    fallback_shares: shares,
                    ..FetchConfig::default()
                });
            let w = wants(set, &["a", "b"]);
            async move {
                let r = f.fetch(&w).await.expect("fetch");
                assert_all_verified(&dest, set);
                r
            }
        };
        // Default: the peers hold everything, so the fallback serves nothing.
        let spared = fetch(false).await;
        assert_eq!(spared.sources["origin"].chunks, 0);
        // Sharing: the fallback takes a fair part beside the two equally fast peers.
        let shared = fetch(true).await;
        let n = |s: &str| shared.sources[s].chunks;
        println!("shared: origin {} a {} b {}", n("origin"), n("a"), n("b"));
        assert_eq!(n("origin") + n("a") + n("b"), 600);
        assert!(
            n("origin") > 100,
            "the fallback served {} of 600",
            n("origin")
        );
        assert!(n("a") > 100 && n("b") > 100, "the peers still serve");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_only_the_fallback_holds_goes_first() {
        // 400 chunks both peers and the fallback hold, then 100 only the fallback
        // holds (a volume's rewritten tail): the fallback's first request must be the
        // exclusive ones, so the fetch does not end waiting for them alone.
        let set = chunks(500, 4096);
        let exclusive = |i: usize| i >= 400;
        let paced = |name: &str, keep: &dyn Fn(usize) -> bool| {
            FakePeer::new(name, store(&set, keep)).with(|b| b.per_chunk = Duration::from_millis(1))
        };
        let origin = paced("origin", &|_| true);
        let (a, b) = (
            paced("a", &|i| !exclusive(i)),
            paced("b", &|i| !exclusive(i)),
        );
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("a", peer(&a))
            .with_source("b", peer(&b))
            .with_config(FetchConfig {
                fallback_shares: true,
                ..FetchConfig::default()
            });
        let w: Vec<Want> = set
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| Want {
                id: *id,
                sources: if exclusive(i) {
                    vec![]
                } else {
                    vec!["a".into(), "b".into()]
                },
            })
            .collect();
        let r = f.fetch(&w).await.expect("fetch");
        assert_all_verified(&dest, &set);
        let reqs = origin.requests();
        let first = reqs.first().expect("the fallback was asked");
        let excl: std::collections::HashSet<Digest> = set.ids[400..].iter().copied().collect();
        assert!(
            first.iter().all(|id| excl.contains(id)),
            "the fallback's first request holds {} shared ids of {}",
            first.iter().filter(|id| !excl.contains(id)).count(),
            first.len()
        );
        assert!(r.sources["origin"].chunks >= 100);
        assert!(a.requests().iter().flatten().all(|id| !excl.contains(id)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn priors_rank_sources_before_they_are_measured() {
        let set = chunks(64, 4096);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        let (a, b) = (
            FakePeer::new("a", store(&set, |_| true)),
            FakePeer::new("b", store(&set, |_| true)),
        );
        let prior = |mbps: f64| xfer_agent::chunks::SourceStats {
            rate_bps: Some(mbps * 1e6),
            latency_micros: Some(1000.0),
            ..Default::default()
        };
        // One request slot: the first request goes to the best-ranked source and,
        // sized by its rate, takes the whole fetch.
        for (fast, slow) in [("a", "b"), ("b", "a")] {
            let dest = Arc::new(MemStore::new());
            let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
                .with_source("a", peer(&a))
                .with_source("b", peer(&b))
                .with_config(FetchConfig {
                    max_inflight_per_source: 1,
                    max_inflight_total: 1,
                    split: 1,
                    ..FetchConfig::default()
                })
                .with_priors([
                    (fast.to_string(), prior(100.0)),
                    (slow.to_string(), prior(0.1)),
                ]);
            let r = f.fetch(&wants(&set, &["a", "b"])).await.expect("fetch");
            assert_all_verified(&dest, &set);
            assert_eq!(
                r.sources[fast].chunks, 64,
                "{fast} ranked first by its prior"
            );
            assert_eq!(r.sources[slow].requests, 0);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_stream_resumes_with_only_the_rest() {
        let set = chunks(2000, 2048);
        let origin =
            FakePeer::new("origin", store(&set, |_| true)).with(|b| b.fail_after = Some(1000));
        let dest = Arc::new(MemStore::new());
        let cfg = FetchConfig {
            max_inflight_per_source: 1,
            max_inflight_total: 1,
            split: 1,
            min_request_bytes: 1 << 30,
            max_request_ids: 4096,
            error_backoff: Duration::from_millis(1),
            ..FetchConfig::default()
        };
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin)).with_config(cfg);
        let report = f.fetch(&wants(&set, &[])).await.expect("fetch");
        assert_all_verified(&dest, &set);
        let reqs = origin.requests();
        assert_eq!(reqs.len(), 2, "one request, cut, then one for the rest");
        assert!(
            reqs[0] == set.ids,
            "the first asks for everything, in order"
        );
        assert!(
            reqs[1] == set.ids[1000..],
            "the second asks only for what was not received, in order"
        );
        assert_eq!(origin.requested_ids(), 3000);
        let r = &report.sources["origin"];
        assert_eq!(r.errors, 1);
        assert_eq!(r.requested_ids, 3000);
        assert_eq!(r.chunks, 2000);
        assert!(!r.dropped);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_fetch_resumes_with_only_the_rest() {
        let set = chunks(2000, 1024);
        // ~2000 × 1 ms over 4 streams: about 0.5 s in all.
        let origin = FakePeer::new("origin", store(&set, |_| true))
            .with(|b| b.per_chunk = Duration::from_millis(1));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin));
        let w = wants(&set, &[]);
        // Cancel the fetch (drop its future) once a quarter is stored.
        cut_short(&f, &w, &dest, 500).await;
        // Let verifications already running on blocking threads finish.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let have = dest.len();
        assert!(have > 0 && have < 2000, "{have} chunks after the cut");
        let asked_before = origin.requested_ids();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            origin.open_streams(),
            0,
            "dropping the fetch closed its streams"
        );
        let report = f.fetch(&w).await.expect("fetch");
        assert_all_verified(&dest, &set);
        assert_eq!(report.already_local, have as u64);
        assert_eq!(report.fetched, (2000 - have) as u64);
        assert_eq!(
            origin.requested_ids() - asked_before,
            2000 - have,
            "the second fetch asks only for what the first did not store"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_and_outstanding_follow_fetches_running_side_by_side() {
        let a = chunks(600, 1024);
        let b = chunks_in(1000..1400, 1024);
        let both = MemStore::new();
        for x in a.blobs.iter().chain(&b.blobs) {
            both.insert(x).expect("insert");
        }
        // ~1000 x 1 ms over 4 streams: about 0.25 s in all.
        let origin = FakePeer::new("origin", Arc::new(both))
            .with(|x| x.per_chunk = Duration::from_millis(1));
        let dest = Arc::new(MemStore::new());
        let f = Arc::new(Fetcher::new(dest.clone(), "origin", peer(&origin)));
        assert_eq!(f.outstanding().remaining, 0);
        let pa = Arc::new(Progress::default());
        let (wa, wb) = (wants(&a, &[]), wants(&b, &[]));
        let (fa, pa2) = (f.clone(), pa.clone());
        let ta = tokio::spawn(async move { fa.fetch_observed(&wa, pa2).await });
        let fb = f.clone();
        let tb = tokio::spawn(async move { fb.fetch(&wb).await });
        // While both run: the fetcher counts what is left of both, the progress of
        // the first only its own.
        let mut seen_both = false;
        let mut seen_partial = false;
        for _ in 0..500 {
            let o = f.outstanding();
            let p = pa.get();
            assert!(o.remaining <= 1000, "{o:?}");
            assert!(p.remaining <= 600 && p.fetched <= 600, "{p:?}");
            seen_both |= o.remaining > 600;
            seen_partial |= p.fetched > 0 && p.remaining > 0;
            if ta.is_finished() && tb.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ra = ta.await.expect("task").expect("fetch a");
        tb.await.expect("task").expect("fetch b");
        assert!(seen_both, "both fetches were counted while they ran");
        assert!(seen_partial, "the progress moved while the fetch ran");
        let p = pa.get();
        assert_eq!((p.remaining, p.fetched), (0, 600));
        assert_eq!(p.wire_bytes, ra.wire_bytes);
        assert_eq!(p.sources.get("origin").map(|s| s.0), Some(600));
        let o = f.outstanding();
        assert_eq!(o.remaining, 0);
        assert!(o.wire_bytes >= ra.wire_bytes && o.mean_chunk.is_some());
        assert!(o.remaining_bytes(1.0) == 0.0);

        // A fetch dropped half way no longer counts what it left.
        let c = chunks_in(2000..2800, 1024);
        let origin2 = FakePeer::new("origin", store(&c, |_| true))
            .with(|x| x.per_chunk = Duration::from_millis(1));
        let dest2 = Arc::new(MemStore::new());
        let f2 = Fetcher::new(dest2.clone(), "origin", peer(&origin2));
        let wc = wants(&c, &[]);
        cut_short(&f2, &wc, &dest2, 100).await;
        assert!(f2.outstanding().remaining == 0, "{:?}", f2.outstanding());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missing_and_corrupt_chunks_fail_over() {
        let set = chunks(600, 3000);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        // a lacks every 10th chunk; b serves three chunks corrupt.
        let a = FakePeer::new("a", store(&set, |i| i % 10 != 0));
        let bad: Vec<Digest> = vec![set.ids[1], set.ids[2], set.ids[3]];
        let b = FakePeer::new("b", store(&set, |_| true))
            .with(|x| x.corrupt = bad.iter().copied().collect());
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("a", peer(&a))
            .with_source("b", peer(&b));
        // The first 300 only at a (+ origin), the rest only at b (+ origin).
        let mut w = wants(&set, &["a"]);
        for x in &mut w[300..] {
            x.sources = vec!["b".into()];
        }
        w[1].sources = vec!["b".into()];
        w[2].sources = vec!["b".into()];
        w[3].sources = vec!["b".into()];
        let report = f.fetch(&w).await.expect("fetch");
        assert_all_verified(&dest, &set);
        let (ra, rb, ro) = (
            &report.sources["a"],
            &report.sources["b"],
            &report.sources["origin"],
        );
        // a lacked 30 of its 297 (0, 10, ..., 290).
        assert_eq!(ra.missing, 30, "{ra:?}");
        assert_eq!(ra.errors, 0);
        assert_eq!(rb.corrupt, 3, "{rb:?}");
        assert!(rb.errors >= 3, "{rb:?}");
        assert!(rb
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("verify chunk")));
        // At least what the others could not serve; on a loaded machine the slowness
        // rule may also move a late request of a or b to the fallback.
        assert!(
            ro.chunks >= 33,
            "the fallback served what the others could not: {ro:?}"
        );
        assert_eq!(report.fetched, 600);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_killed_source_is_dropped_and_the_rest_complete() {
        let set = chunks(2000, 2048);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        let a = FakePeer::new("a", store(&set, |_| true))
            .with(|b| b.per_chunk = Duration::from_micros(300));
        let b = FakePeer::new("b", store(&set, |_| true))
            .with(|b| b.per_chunk = Duration::from_micros(300));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("a", peer(&a))
            .with_source("b", peer(&b))
            .with_config(FetchConfig {
                error_backoff: Duration::from_millis(5),
                ..FetchConfig::default()
            });
        let killer = {
            let a = a.clone();
            tokio::spawn(async move {
                while a.served() < 300 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                a.kill();
            })
        };
        let report = f.fetch(&wants(&set, &["a", "b"])).await.expect("fetch");
        killer.await.expect("killer");
        assert_all_verified(&dest, &set);
        let ra = &report.sources["a"];
        assert!(ra.errors >= 1 && ra.dropped, "{ra:?}");
        assert!(ra.chunks >= 300 && ra.chunks < 2000, "{ra:?}");
        assert_eq!(report.sources.values().map(|s| s.chunks).sum::<u64>(), 2000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_request_is_hedged_and_the_first_copy_wins() {
        let set = chunks(200, 2048);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        // "sleepy" answers its first batch only after 30 s: the fetch must not wait
        // for it (a bound far from both ends, so a loaded machine does not decide).
        let sleepy = FakePeer::new("sleepy", store(&set, |_| true))
            .with(|b| b.latency = Duration::from_secs(30));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("sleepy", peer(&sleepy))
            .with_config(FetchConfig {
                slow_unmeasured: Duration::from_millis(150),
                slow_min: Duration::from_millis(50),
                ..FetchConfig::default()
            });
        let t = std::time::Instant::now();
        let report = f.fetch(&wants(&set, &["sleepy"])).await.expect("fetch");
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "waited for the sleepy source: {:?}",
            t.elapsed()
        );
        assert_all_verified(&dest, &set);
        let r = &report.sources["sleepy"];
        assert!(r.slow >= 1, "{r:?}");
        assert_eq!(r.chunks, 0);
        assert_eq!(report.sources["origin"].chunks, 200);
        assert!(report.hedged_requests >= 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sleepy.open_streams(), 0, "losing requests were cancelled");
        assert!(sleepy.cancelled() >= 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_nobody_has_make_the_fetch_incomplete() {
        let set = chunks(50, 512);
        let origin = FakePeer::new("origin", store(&set, |i| i != 7));
        let a = FakePeer::new("a", store(&set, |i| i != 7 && i != 8));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin)).with_source("a", peer(&a));
        let err = f.fetch(&wants(&set, &["a"])).await.expect_err("incomplete");
        match err {
            ChunkError::Incomplete { missing, report } => {
                assert_eq!(missing, vec![set.ids[7]]);
                assert_eq!(report.fetched, 49);
                assert_eq!(report.sources["a"].missing, 2);
                assert_eq!(report.sources["origin"].missing, 1);
            }
            other => panic!("unexpected error {other}"),
        }
        assert_eq!(dest.len(), 49);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn have_probe_skips_sources_that_lack_chunks() {
        let set = chunks(100, 512);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        let a = FakePeer::new("a", store(&set, |i| i < 50));
        let dest = Arc::new(MemStore::new());
        let f = Fetcher::new(dest.clone(), "origin", peer(&origin))
            .with_source("a", peer(&a))
            .with_config(FetchConfig {
                probe_have: true,
                ..FetchConfig::default()
            });
        let report = f.fetch(&wants(&set, &["a"])).await.expect("fetch");
        assert_all_verified(&dest, &set);
        assert_eq!(a.requested_ids(), 50, "a was asked only for what it has");
        assert_eq!(report.sources["a"].chunks, 50);
        assert_eq!(report.sources["origin"].chunks, 50);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_sources_are_refused() {
        let set = chunks(1, 16);
        let origin = FakePeer::new("origin", store(&set, |_| true));
        let f = Fetcher::new(Arc::new(MemStore::new()), "origin", peer(&origin));
        let err = f
            .fetch(&wants(&set, &["nobody"]))
            .await
            .expect_err("unknown");
        assert!(matches!(err, ChunkError::UnknownSource(ref s) if s == "nobody"));
    }
}
