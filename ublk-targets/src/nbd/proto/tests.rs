use super::*;

/// xorshift64*: deterministic, dependency-free randomness for the fuzz-style tests.
pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[test]
fn test_greeting_roundtrip() {
    let mut g = Vec::new();
    g.extend_from_slice(&NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&3u16.to_be_bytes());
    assert_eq!(decode_greeting(&g), Ok(3));
    assert_eq!(client_flags(3), 3);
    assert_eq!(client_flags(1), 1);
    g[8..16].copy_from_slice(&CLISERV_MAGIC.to_be_bytes());
    assert!(matches!(
        decode_greeting(&g),
        Err(ProtoError::BadMagic { .. })
    ));
    assert!(decode_greeting(&g[..10]).is_err());
}

#[test]
fn test_option_encoding() {
    let mut out = Vec::new();
    encode_option(OPT_GO, &encode_go_data("ab", &[INFO_BLOCK_SIZE]), &mut out);
    assert_eq!(
        out,
        [
            0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, // IHAVEOPT
            0, 0, 0, 7, // GO
            0, 0, 0, 10, // length
            0, 0, 0, 2, b'a', b'b', // name
            0, 1, 0, 3, // one info request: BLOCK_SIZE
        ]
    );
}

fn opt_reply(opt: u32, rep: u32, len: u32) -> Vec<u8> {
    let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&rep.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn test_opt_reply_checks() {
    let r = decode_opt_reply(&opt_reply(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
    assert_eq!((r.reply, r.len, r.is_error()), (REP_INFO, 12, false));
    assert!(
        decode_opt_reply(&opt_reply(OPT_GO, REP_ERR_UNSUP, 0), OPT_GO)
            .unwrap()
            .is_error()
    );
    assert!(decode_opt_reply(&opt_reply(OPT_LIST, REP_ACK, 0), OPT_GO).is_err());
    assert!(decode_opt_reply(&opt_reply(OPT_GO, REP_ACK, 1), OPT_GO).is_err());
    assert!(decode_opt_reply(&opt_reply(OPT_GO, REP_INFO, MAX_OPT_REPLY + 1), OPT_GO).is_err());
    let mut b = opt_reply(OPT_GO, REP_ACK, 0);
    b[0] ^= 1;
    assert!(decode_opt_reply(&b, OPT_GO).is_err());
}

#[test]
fn test_info_decoding() {
    let mut p = vec![0, 0];
    p.extend_from_slice(&(1u64 << 30).to_be_bytes());
    p.extend_from_slice(&0x010du16.to_be_bytes());
    let Info::Export { size, flags } = decode_info(&p).unwrap() else {
        panic!()
    };
    assert_eq!(size, 1 << 30);
    assert!(flags.contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::CAN_MULTI_CONN));
    assert!(decode_info(&p[..11]).is_err());

    let mut p = vec![0, 3];
    for v in [512u32, 4096, 1 << 20] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    let Info::BlockSize(bs) = decode_info(&p).unwrap() else {
        panic!()
    };
    assert_eq!(bs.validate().unwrap().max_payload, 1 << 20);
    assert!(BlockSizes {
        min: 3,
        ..BlockSizes::default()
    }
    .validate()
    .is_err());
    assert!(BlockSizes {
        min: 4096,
        preferred: 512,
        max_payload: 1 << 20
    }
    .validate()
    .is_err());
    assert_eq!(decode_info(&[0, 1, b'x']).unwrap(), Info::Name("x".into()));
    assert_eq!(decode_info(&[0, 99]).unwrap(), Info::Unknown(99));
}

#[test]
fn test_rep_server_and_export_name_reply() {
    let mut p = 3u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"abcdescr");
    assert_eq!(
        decode_rep_server(&p).unwrap(),
        ("abc".to_string(), "descr".to_string())
    );
    let mut p = 30u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"abc");
    assert!(decode_rep_server(&p).is_err());
    // Strings beyond the spec's 4096 bytes are refused, name or description.
    let mut p = 4097u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[b'a'; 4097]);
    assert!(decode_rep_server(&p).is_err());
    let mut p = 1u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[b'a'; 4098]);
    assert!(decode_rep_server(&p).is_err());
    let mut p = 4096u32.to_be_bytes().to_vec();
    p.extend_from_slice(&[b'a'; 8192]);
    assert!(decode_rep_server(&p).is_ok());
    let mut p = 4096u64.to_be_bytes().to_vec();
    p.extend_from_slice(&3u16.to_be_bytes());
    let (s, f) = decode_export_name_reply(&p).unwrap();
    assert_eq!((s, f.bits()), (4096, 3));
}

#[test]
fn test_request_header_layout() {
    let h = RequestHeader {
        flags: CMD_FLAG_FUA,
        cmd: CMD_WRITE,
        cookie: 0x0102_0304_0506_0708,
        offset: 0x1000,
        len: 512,
    };
    let b = h.encode_compact();
    assert_eq!(b.len(), 28);
    assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&b[4..8], &[0, 1, 0, 1]);
    assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(&b[16..24], &0x1000u64.to_be_bytes());
    assert_eq!(&b[24..28], &512u32.to_be_bytes());
    let e = h.encode_extended();
    assert_eq!(&e[0..4], &EXTENDED_REQUEST_MAGIC.to_be_bytes());
    assert_eq!(
        &e[4..6],
        &(CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN).to_be_bytes()
    );
    assert_eq!(&e[24..32], &512u64.to_be_bytes());
}

fn chunk(flags: u16, ty: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

#[test]
fn test_reply_decoding() {
    let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&5u32.to_be_bytes());
    s.extend_from_slice(&9u64.to_be_bytes());
    assert_eq!(
        decode_reply(&s, false).unwrap(),
        Reply::Simple {
            error: 5,
            cookie: 9
        }
    );
    assert!(
        decode_reply(&s, true).is_err(),
        "simple reply in extended mode"
    );
    let c = chunk(1, REPLY_TYPE_OFFSET_DATA, 7, 520);
    let Reply::Chunk(h) = decode_reply(&c, false).unwrap() else {
        panic!()
    };
    assert!(h.done());
    assert_eq!((h.ty, h.cookie, h.len), (1, 7, 520));
    let mut x = EXTENDED_REPLY_MAGIC.to_be_bytes().to_vec();
    x.extend_from_slice(&1u16.to_be_bytes());
    x.extend_from_slice(&0u16.to_be_bytes());
    x.extend_from_slice(&3u64.to_be_bytes());
    x.extend_from_slice(&4096u64.to_be_bytes());
    x.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(reply_header_len(EXTENDED_REPLY_MAGIC, true), Ok(32));
    let Reply::Chunk(h) = decode_reply(&x, true).unwrap() else {
        panic!()
    };
    assert_eq!((h.ty, h.cookie, h.len, h.done()), (0, 3, 0, true));
}

#[test]
fn test_chunk_plans() {
    let e = Expect {
        read: true,
        offset: 4096,
        len: 8192,
    };
    let h = |ty, len, flags| ChunkHeader {
        flags,
        ty,
        cookie: 1,
        len,
    };
    assert_eq!(
        plan_chunk(&h(REPLY_TYPE_OFFSET_DATA, 8200, 0), &e),
        Ok(ChunkPlan::OffsetData { data_len: 8192 })
    );
    assert!(plan_chunk(&h(REPLY_TYPE_OFFSET_DATA, 8201, 0), &e).is_err());
    assert!(plan_chunk(&h(REPLY_TYPE_OFFSET_DATA, 8, 0), &e).is_err());
    assert!(plan_chunk(&h(REPLY_TYPE_OFFSET_DATA, u64::MAX, 0), &e).is_err());
    assert!(
        plan_chunk(&h(REPLY_TYPE_NONE, 0, 0), &e).is_err(),
        "NONE without DONE"
    );
    assert!(plan_chunk(&h(REPLY_TYPE_NONE, 1, 1), &e).is_err());
    assert!(plan_chunk(&h(REPLY_TYPE_OFFSET_HOLE, 11, 1), &e).is_err());
    assert_eq!(
        plan_chunk(&h(REPLY_TYPE_BLOCK_STATUS, 8, 1), &e),
        Err(ProtoError::UnknownChunk(REPLY_TYPE_BLOCK_STATUS))
    );
    assert_eq!(
        plan_chunk(&h(77, 0, 1), &e),
        Err(ProtoError::UnknownChunk(77))
    );
    assert_eq!(
        plan_chunk(&h(REPLY_TYPE_FLAG_ERROR | 77, 3, 1), &e),
        Ok(ChunkPlan::Small { len: 3 })
    );
    assert!(plan_chunk(&h(REPLY_TYPE_ERROR, 1 << 20, 1), &e).is_err());
    let w = Expect { read: false, ..e };
    assert!(plan_chunk(&h(REPLY_TYPE_OFFSET_DATA, 100, 1), &w).is_err());

    assert_eq!(place_data(&e, 4096, 8192), Ok(0));
    assert_eq!(place_data(&e, 8192, 4096), Ok(4096));
    assert!(place_data(&e, 4095, 1).is_err());
    assert!(place_data(&e, 8192, 4097).is_err());
    assert!(place_data(&e, u64::MAX, 4097).is_err());

    let mut p = 8192u64.to_be_bytes().to_vec();
    p.extend_from_slice(&4096u32.to_be_bytes());
    assert_eq!(
        decode_small_chunk(&h(REPLY_TYPE_OFFSET_HOLE, 12, 1), &p, &e),
        Ok(ChunkEvent::Hole {
            buf_off: 4096,
            len: 4096
        })
    );
    let mut p = 28u32.to_be_bytes().to_vec();
    p.extend_from_slice(&2u16.to_be_bytes());
    p.extend_from_slice(b"no");
    assert_eq!(
        decode_small_chunk(&h(REPLY_TYPE_ERROR, 8, 1), &p, &e),
        Ok(ChunkEvent::Error {
            error: 28,
            message: "no".into()
        })
    );
    // ERROR_OFFSET needs the trailing offset.
    assert!(decode_small_chunk(&h(REPLY_TYPE_ERROR_OFFSET, 8, 1), &p, &e).is_err());
    p.extend_from_slice(&4096u64.to_be_bytes());
    assert!(decode_small_chunk(&h(REPLY_TYPE_ERROR_OFFSET, 16, 1), &p, &e).is_ok());
    // Unknown error types fail the request.
    assert!(matches!(
        decode_small_chunk(&h(REPLY_TYPE_FLAG_ERROR | 9, 2, 1), &[1, 2], &e),
        Ok(ChunkEvent::Error { error: 22, .. })
    ));
}

#[test]
fn test_coverage() {
    let mut c = Coverage::default();
    c.add(4096, 4096).unwrap();
    c.add(0, 1024).unwrap();
    assert!(c.add(512, 1024).is_err());
    assert!(c.add(4000, 100).is_err());
    assert!(c.add(8000, 200).is_err());
    c.add(1024, 3072).unwrap();
    assert_eq!(c.covered(), 8192);
    assert_eq!(c.ranges, vec![(0, 8192)]);
    c.clear();
    for i in 0..MAX_FRAGMENTS as u32 {
        c.add(i * 2, 1).unwrap();
    }
    assert!(c.add(5000, 1).is_err(), "fragmentation cap");
    c.add(1, 1).unwrap(); // merging is always fine
}

#[test]
fn test_errno_of() {
    assert_eq!(errno_of(errno::EIO), libc::EIO);
    assert_eq!(errno_of(errno::ENOTSUP), libc::EOPNOTSUPP);
    assert_eq!(errno_of(errno::ESHUTDOWN), libc::ESHUTDOWN);
    assert_eq!(errno_of(0xdead), libc::EINVAL);
}

/// Feeds random and mutated reply streams through the decoders the way the client's reader
/// does: nothing may panic, and nothing may ask to read more than the request allows.
#[test]
fn test_fuzz_reply_stream_never_panics() {
    let mut rng = Rng::new(0x5eed);
    let seeds: Vec<Vec<u8>> = vec![
        chunk(1, REPLY_TYPE_OFFSET_DATA, 1, 16),
        chunk(0, REPLY_TYPE_OFFSET_HOLE, 1, 12),
        chunk(1, REPLY_TYPE_ERROR, 1, 8),
        chunk(1, REPLY_TYPE_ERROR_OFFSET, 1, 16),
        chunk(1, REPLY_TYPE_NONE, 1, 0),
        {
            let mut s = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            s.extend_from_slice(&[0; 12]);
            s
        },
    ];
    for iter in 0..200_000u32 {
        let mut buf: Vec<u8> = if iter % 2 == 0 {
            let mut s = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..rng.below(4) {
                let i = rng.below(s.len() as u64) as usize;
                s[i] = rng.next() as u8;
            }
            s
        } else {
            (0..rng.below(40)).map(|_| rng.next() as u8).collect()
        };
        buf.extend((0..32).map(|_| rng.next() as u8));
        let e = Expect {
            read: rng.below(2) == 0,
            offset: rng.below(1 << 20) * 512,
            len: (rng.below(64) as u32 + 1) * 512,
        };
        let extended = rng.below(8) == 0;
        let Ok(reply) = decode_reply(&buf, extended) else {
            continue;
        };
        let hl = reply_header_len(be32(&buf), extended).unwrap();
        let payload = &buf[hl..];
        if let Reply::Chunk(h) = reply {
            match plan_chunk(&h, &e) {
                Ok(ChunkPlan::OffsetData { data_len }) => {
                    assert!(data_len <= e.len);
                    let off = be64(payload);
                    if let Ok(at) = place_data(&e, off, data_len) {
                        assert!(u64::from(at) + u64::from(data_len) <= u64::from(e.len));
                    }
                }
                Ok(ChunkPlan::Small { len }) => {
                    assert!(len as u64 <= MAX_SMALL_CHUNK);
                    let p: Vec<u8> = payload
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0))
                        .take(len)
                        .collect();
                    if let Ok(ChunkEvent::Hole { buf_off, len }) = decode_small_chunk(&h, &p, &e) {
                        assert!(u64::from(buf_off) + u64::from(len) <= u64::from(e.len));
                    }
                }
                Err(_) => {}
            }
        }
    }
}

#[test]
fn test_fuzz_option_replies_never_panic() {
    let mut rng = Rng::new(42);
    for _ in 0..100_000 {
        let n = rng.below(40) as usize;
        let mut b: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
        if rng.below(2) == 0 && b.len() >= 8 {
            b[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        }
        let _ = decode_opt_reply(&b, OPT_GO);
        let _ = decode_info(&b);
        let _ = decode_rep_server(&b);
        let _ = decode_greeting(&b);
        let _ = decode_export_name_reply(&b);
    }
}
