//! NBD reply decoding on arbitrary server bytes, the way the client's reader sees them:
//! errors, never panics, never a read plan larger than the request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublk_targets::nbd::proto::{decode_reply, plan_chunk, ChunkPlan, Expect, Reply};

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(Reply::Chunk(h)) = decode_reply(data, extended) {
            let e = Expect { read: true, offset: 0, len: 1 << 20 };
            if let Ok(ChunkPlan::OffsetData { data_len }) = plan_chunk(&h, &e) {
                assert!(data_len <= e.len);
            }
        }
    }
});
