//! Per-io hot path micro-benchmarks: `cargo bench -p ublk-core`.
//! Regressions in decoding, command building or the tag state machine show here without a VM.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ublk_core::bench::{build_commit_sqe, decode_desc, TagCycle};

fn hot_path(c: &mut Criterion) {
    c.bench_function("decode_desc", |b| {
        b.iter(|| {
            decode_desc(
                black_box(17),
                black_box(1 | (1 << 13)),
                black_box(8),
                black_box(123_456),
            )
        })
    });
    c.bench_function("build_commit_sqe", |b| {
        b.iter(|| {
            build_commit_sqe(
                black_box(1),
                black_box(17),
                black_box(4096),
                black_box(0x7f00_0000_1000),
            )
        })
    });
    let mut tags = TagCycle::new(128);
    let req = decode_desc(0, 0, 8, 0);
    let mut tag = 0u16;
    c.bench_function("tag_state_cycle", |b| {
        b.iter(|| {
            tag = (tag + 1) % 128;
            tags.cycle(black_box(tag), req)
        })
    });
    c.bench_function("user_copy_offset", |b| {
        b.iter(|| ublk_core::queue::user_copy_offset(black_box(3), black_box(99)))
    });
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
