//! The chunk protocol's decoders reject malformed input with clear errors.

// Inside `mod chunks` so that `cargo test -p xfer-agent chunks` selects these tests.
mod chunks {

    use xfer_agent::chunks::wire::{
        decode_batch, decode_bitmap, decode_fetch_request, decode_have_reply, decode_have_request,
        decode_ids, encode_bitmap, encode_ids, MAX_BATCH_BYTES, MAX_FETCH_IDS, MAX_HAVE_IDS,
        MIN_BATCH_BYTES,
    };
    use xfer_agent::chunks::{verify_frame, ChunkError};
    use xfer_proto::v1::{Chunk, ChunkBatch, FetchRequest, HaveReply, HaveRequest, PeerLoad};
    use xfer_store::{Digest, MAX_FRAME};

    const V1: i32 = xfer_proto::PROTOCOL_VERSION as i32;

    fn ids(n: usize) -> Vec<Digest> {
        (0..n as u32)
            .map(|i| Digest::of(&i.to_le_bytes()))
            .collect()
    }

    #[test]
    fn ids_round_trip_and_wrong_lengths_are_rejected() {
        let v = ids(5);
        assert_eq!(decode_ids(&encode_ids(&v)).expect("decode"), v);
        assert_eq!(decode_ids(&[]).expect("empty"), Vec::<Digest>::new());
        for len in [1usize, 31, 33, 63, 65] {
            let err = decode_ids(&vec![0u8; len]).expect_err("must reject");
            assert!(
                matches!(err, ChunkError::DecodeIds { len: l } if l == len),
                "{err}"
            );
            assert!(err.to_string().contains("not a multiple of 32"), "{err}");
        }
    }

    #[test]
    fn version_zero_and_unknown_versions_are_refused() {
        for version in [0, 2, -1] {
            let err = decode_have_request(&HaveRequest {
                version,
                ids: encode_ids(&ids(1)),
            })
            .expect_err("have");
            assert!(matches!(err, ChunkError::CheckVersion(_)), "{err}");
            assert_eq!(err.to_status().code(), tonic::Code::FailedPrecondition);
            let err = decode_fetch_request(&FetchRequest {
                version,
                ids: encode_ids(&ids(1)),
                max_batch_bytes: 0,
            })
            .expect_err("fetch");
            assert!(matches!(err, ChunkError::CheckVersion(_)), "{err}");
        }
    }

    #[test]
    fn requests_check_id_fields_and_counts() {
        let err = decode_have_request(&HaveRequest {
            version: V1,
            ids: vec![7u8; 32 * 3 + 5],
        })
        .expect_err("ragged");
        assert!(matches!(err, ChunkError::DecodeIds { len: 101 }));
        assert_eq!(err.to_status().code(), tonic::Code::InvalidArgument);

        let err = decode_have_request(&HaveRequest {
            version: V1,
            ids: vec![0u8; 32 * (MAX_HAVE_IDS + 1)],
        })
        .expect_err("too many");
        assert!(matches!(err, ChunkError::TooManyIds { .. }), "{err}");

        let err = decode_fetch_request(&FetchRequest {
            version: V1,
            ids: vec![0u8; 32 * (MAX_FETCH_IDS + 1)],
            max_batch_bytes: 0,
        })
        .expect_err("too many");
        assert!(matches!(err, ChunkError::TooManyIds { .. }), "{err}");

        let ok = decode_fetch_request(&FetchRequest {
            version: V1,
            ids: encode_ids(&ids(3)),
            max_batch_bytes: 1,
        })
        .expect("valid");
        assert_eq!(ok.ids.len(), 3);
        assert_eq!(ok.max_batch_bytes, MIN_BATCH_BYTES);
        let ok = decode_fetch_request(&FetchRequest {
            version: V1,
            ids: Vec::new(),
            max_batch_bytes: u32::MAX,
        })
        .expect("valid");
        assert_eq!(ok.max_batch_bytes, MAX_BATCH_BYTES);
    }

    #[test]
    fn bitmaps_must_match_the_request() {
        let bits: Vec<bool> = (0..13).map(|i| i % 2 == 0).collect();
        let reply = HaveReply {
            bitmap: encode_bitmap(&bits),
            load: Some(PeerLoad {
                fetch_streams: 3,
                served_bytes_per_sec: 10,
            }),
        };
        let (got, load) = decode_have_reply(&reply, 13).expect("decode");
        assert_eq!(got, bits);
        assert_eq!(load.map(|l| l.fetch_streams), Some(3));
        assert!(decode_have_reply(&reply, 20).is_err(), "too short");
        assert!(decode_have_reply(&reply, 8).is_err(), "too long");
        // Padding bits set.
        assert!(matches!(
            decode_bitmap(&[0xff, 0xff], 13),
            Err(ChunkError::DecodeBitmap { .. })
        ));
    }

    fn chunk(id: Vec<u8>, zstd: Vec<u8>, raw_len: u32) -> Chunk {
        Chunk { id, zstd, raw_len }
    }

    #[test]
    fn batches_reject_bad_ids_sizes_and_missing_fields() {
        let data = b"hello chunk";
        let id = Digest::of(data);
        let frame = xfer_store::frame::encode(data).expect("encode");
        let good = ChunkBatch {
            chunks: vec![chunk(id.0.to_vec(), frame.clone(), data.len() as u32)],
            missing: encode_ids(&ids(2)),
            load: None,
        };
        let b = decode_batch(good.clone()).expect("good batch");
        assert_eq!(b.chunks[0].id, id);
        assert_eq!(b.missing.len(), 2);
        assert_eq!(
            verify_frame(&id, &b.chunks[0].frame, b.chunks[0].raw_len).expect("verify"),
            data
        );

        // Wrong id length.
        let mut bad = good.clone();
        bad.chunks.push(chunk(vec![1; 31], frame.clone(), 3));
        let err = decode_batch(bad).expect_err("short id");
        assert!(
            matches!(err, ChunkError::DecodeChunk { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("31 bytes"), "{err}");

        // raw_len above the frame limit.
        let mut bad = good.clone();
        bad.chunks[0].raw_len = MAX_FRAME as u32 + 1;
        let err = decode_batch(bad).expect_err("oversize raw_len");
        assert!(err.to_string().contains("exceeds the frame limit"), "{err}");
        let mut bad = good.clone();
        bad.chunks[0].raw_len = u32::MAX;
        assert!(decode_batch(bad).is_err());

        // Frame larger than any 8 MiB chunk can compress to.
        let mut bad = good.clone();
        bad.chunks[0].zstd = vec![0; MAX_FRAME + MAX_FRAME / 2];
        assert!(decode_batch(bad).is_err());

        // Ragged missing field.
        let mut bad = good.clone();
        bad.missing.push(0);
        assert!(matches!(
            decode_batch(bad),
            Err(ChunkError::DecodeIds { len: 65 })
        ));
    }

    #[test]
    fn verification_catches_wrong_bytes_and_lengths() {
        let data = vec![42u8; 5000];
        let id = Digest::of(&data);
        let frame = xfer_store::frame::encode(&data).expect("encode");
        assert!(verify_frame(&id, &frame, 5000).is_ok());
        let e = verify_frame(&id, &frame, 4999).expect_err("length");
        assert!(e.is_corrupt());
        let other = Digest::of(b"other");
        let e = verify_frame(&other, &frame, 5000).expect_err("digest");
        assert!(matches!(e, ChunkError::VerifyDigest { .. }) && e.is_corrupt());
        let e = verify_frame(&id, &[1, 2, 3], 5000).expect_err("garbage");
        assert!(e.is_corrupt());
        let e = verify_frame(&id, &frame, MAX_FRAME as u32 + 1).expect_err("limit");
        assert!(e.is_corrupt());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic sweep over odd shapes (the decoders are plain functions,
        // ready for a fuzzer).
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..2000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            let _ = decode_ids(&bytes);
            let _ = decode_bitmap(&bytes, round % 300);
            let _ = decode_batch(ChunkBatch {
                chunks: vec![chunk(bytes.clone(), bytes.clone(), x as u32)],
                missing: bytes.clone(),
                load: None,
            });
            let _ = verify_frame(&Digest::of(&bytes), &bytes, (x % 70_000) as u32);
        }
    }
}
