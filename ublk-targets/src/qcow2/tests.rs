//! Unit tests of the pure qcow2 modules: header parsing and validation, entry classification,
//! compressed-descriptor math, decompression and the slice cache.

use super::cache::SliceCache;
use super::decompress::decompress;
use super::entry::*;
use super::header::*;
use super::refcount;
use super::Qcow2Error;

/// Builds the first cluster of a v3 image: 64 KiB clusters, 1 GiB virtual size, L1 at
/// cluster 3 (2 entries), refcount table at cluster 1 (1 cluster).
fn v3_header(header_length: u32, compression: u8) -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    b[36..40].copy_from_slice(&2u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
    b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    if compression != 0 {
        b[72..80].copy_from_slice(&INCOMPAT_COMPRESSION.to_be_bytes());
    }
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&header_length.to_be_bytes());
    if header_length > 104 {
        b[104] = compression;
    }
    b
}

fn put_ext(b: &mut [u8], at: usize, kind: u32, data: &[u8]) -> usize {
    b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
    b[at + 4..at + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
    b[at + 8..at + 8 + data.len()].copy_from_slice(data);
    at + 8 + data.len().div_ceil(8) * 8
}

const FILE: u64 = 16 << 16; // 16 clusters

#[test]
fn test_parse_v3_header_with_extensions_and_backing() {
    let mut b = v3_header(112, 1);
    b[110] = 0xab; // unknown additional field byte, preserved
    let mut at = put_ext(&mut b, 112, EXT_BACKING_FORMAT, b"qcow2");
    let mut table = vec![0u8; 96];
    table[0] = 0;
    table[1] = 0;
    table[2..7].copy_from_slice(b"dirty");
    table[48] = 2;
    table[49] = 0;
    table[50..57].copy_from_slice(b"bitmaps");
    at = put_ext(&mut b, at, EXT_FEATURE_NAMES, &table);
    at = put_ext(&mut b, at, 0x1122_3344, &[1, 2, 3]);
    at = put_ext(&mut b, at, EXT_END, &[]);
    let name = b"../base.img";
    b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
    b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    b[at..at + name.len()].copy_from_slice(name);

    let h = Header::parse(&b).expect("parse");
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_bits, 16);
    assert_eq!(h.header_length, 112);
    assert_eq!(h.compression_type().expect("ct"), CompressionType::Zstd);
    assert_eq!(h.additional_fields.len(), 7);
    assert_eq!(h.additional_fields[5], 0xab);
    assert_eq!(h.backing_format(), Some("qcow2"));
    assert_eq!(h.backing_file.as_deref(), Some(&name[..]));
    assert_eq!(h.extensions.len(), 3);
    assert!(matches!(
        &h.extensions[2],
        HeaderExtension::Unknown { kind: 0x1122_3344, data } if data == &[1, 2, 3]
    ));
    match &h.extensions[1] {
        HeaderExtension::FeatureNames(t) => {
            assert_eq!(t.len(), 2);
            assert_eq!(t[1].kind, FeatureKind::Autoclear);
            assert_eq!(t[1].name, "bitmaps");
        }
        e => panic!("unexpected {e:?}"),
    }
    let g = h.validate(FILE, false).expect("validate");
    assert_eq!(g.cluster_size, 65536);
    assert_eq!(g.l2_entries, 8192);
    assert_eq!(g.compression, CompressionType::Zstd);
    assert_eq!(g.split((1 << 29) + 65536 * 3 + 17), (1, 3, 17));
}

#[test]
fn test_parse_v2_header_has_v3_defaults() {
    let mut b = v3_header(104, 0);
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    // v2 ignores bytes 72.. as header fields: they are the extension area.
    b[72..104].fill(0);
    let h = Header::parse(&b).expect("parse");
    assert_eq!(h.version, 2);
    assert_eq!(h.header_length, 72);
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.incompatible_features, 0);
    assert!(h.extensions.is_empty());
    h.validate(FILE, false).expect("validate");
}

#[test]
fn test_parse_never_panics_on_short_or_mutated_input() {
    let good = v3_header(112, 0);
    for len in 0..200 {
        let _ = Header::parse(&good[..len]).and_then(|h| h.validate(FILE, false));
    }
    // Deterministic byte mutations of the first 128 bytes.
    let mut x = 0x1234_5678_9abc_def1u64;
    for _ in 0..20000 {
        let mut b = good[..4096].to_vec();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % 128) as usize;
            b[at] = (x >> 32) as u8;
        }
        if let Ok(h) = Header::parse(&b) {
            let _ = h.validate(FILE, x & 1 == 0);
        }
    }
}

#[test]
fn test_header_errors_are_specific() {
    let b = v3_header(112, 0);
    let mut m = b.clone();
    m[0] = 0;
    assert!(matches!(Header::parse(&m), Err(Qcow2Error::BadMagic(_))));
    for bits in [0u32, 8, 22, 40] {
        let mut m = b.clone();
        m[20..24].copy_from_slice(&bits.to_be_bytes());
        assert!(matches!(
            Header::parse(&m),
            Err(Qcow2Error::ClusterBits { .. })
        ));
    }
    let mut m = b.clone();
    m[96..100].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(
        Header::parse(&m),
        Err(Qcow2Error::RefcountOrder(7))
    ));
    for hl in [96u32, 108, 200_000] {
        let mut m = b.clone();
        m[100..104].copy_from_slice(&hl.to_be_bytes());
        assert!(Header::parse(&m).is_err(), "header_length {hl}");
    }
    // Extension longer than the cluster.
    let mut m = b.clone();
    put_ext(&mut m, 112, 0x55, &[]);
    m[116..120].copy_from_slice(&100_000u32.to_be_bytes());
    assert!(matches!(
        Header::parse(&m),
        Err(Qcow2Error::InvalidHeader(_))
    ));
    // Backing name outside the first cluster / too long.
    let mut m = b.clone();
    m[8..16].copy_from_slice(&65000u64.to_be_bytes());
    m[16..20].copy_from_slice(&1000u32.to_be_bytes());
    assert!(matches!(
        Header::parse(&m),
        Err(Qcow2Error::InvalidHeader(_))
    ));
    let mut m = b.clone();
    m[8..16].copy_from_slice(&512u64.to_be_bytes());
    m[16..20].copy_from_slice(&1024u32.to_be_bytes());
    assert!(matches!(
        Header::parse(&m),
        Err(Qcow2Error::InvalidHeader(_))
    ));
}

#[test]
fn test_validate_refuses_features_and_bad_layouts() {
    let h = Header::parse(&v3_header(112, 0)).expect("parse");
    let with = |f: &dyn Fn(&mut Header)| {
        let mut h = h.clone();
        f(&mut h);
        h.validate(FILE, false)
    };
    assert!(matches!(
        with(&|h| h.incompatible_features = 1 << 7),
        Err(Qcow2Error::UnknownIncompatibleFeatures { bits: 0x80, .. })
    ));
    assert!(matches!(
        with(&|h| h.incompatible_features = INCOMPAT_CORRUPT),
        Err(Qcow2Error::MarkedCorrupt)
    ));
    let mut c = h.clone();
    c.incompatible_features = INCOMPAT_CORRUPT;
    c.validate(FILE, true).expect("corrupt allowed read-only");
    assert!(matches!(
        with(&|h| h.incompatible_features = INCOMPAT_DATA_FILE),
        Err(Qcow2Error::ExternalDataFile)
    ));
    assert!(matches!(
        with(&|h| h.crypt_method = 2),
        Err(Qcow2Error::Encrypted { method: 2 })
    ));
    assert!(matches!(
        with(&|h| {
            h.incompatible_features = INCOMPAT_COMPRESSION;
            h.compression_type_raw = 7;
        }),
        Err(Qcow2Error::UnsupportedCompression(7))
    ));
    // Extended L2 needs cluster_bits >= 14; supported otherwise.
    assert!(matches!(
        with(&|h| h.incompatible_features = INCOMPAT_EXTENDED_L2),
        Err(Qcow2Error::InvalidHeader(_)) // half as many entries per L2: L1 now too small
    ));
    let e = with(&|h| {
        h.incompatible_features = INCOMPAT_EXTENDED_L2;
        h.size = 1 << 29;
    })
    .expect("extended l2");
    assert!(e.extended_l2);
    assert_eq!(e.l2_entries, 4096);
    assert_eq!(e.subcluster_size(), 2048);
    let mut small = h.clone();
    small.incompatible_features = INCOMPAT_EXTENDED_L2;
    small.cluster_bits = 12;
    small.l1_table_offset = 3 << 12;
    small.refcount_table_offset = 1 << 12;
    small.l1_size = 1024;
    assert!(matches!(
        small.validate(FILE, false),
        Err(Qcow2Error::ClusterBits { bits: 12, min: 14 })
    ));
    // L1 too small for the virtual size, too large, past EOF, misaligned, overlapping.
    assert!(matches!(
        with(&|h| h.size = 1 << 40),
        Err(Qcow2Error::InvalidHeader(_))
    ));
    assert!(matches!(
        with(&|h| h.l1_size = 1 << 30),
        Err(Qcow2Error::TooLarge { .. })
    ));
    assert!(matches!(
        with(&|h| h.l1_table_offset = FILE),
        Err(Qcow2Error::TablePastEof {
            table: "L1 table",
            ..
        })
    ));
    assert!(matches!(
        with(&|h| h.l1_table_offset += 8),
        Err(Qcow2Error::InvalidHeader(_))
    ));
    assert!(matches!(
        with(&|h| h.refcount_table_offset = h.l1_table_offset),
        Err(Qcow2Error::TablesOverlap { .. })
    ));
    assert!(matches!(
        with(&|h| h.l1_table_offset = 0),
        Err(Qcow2Error::TablesOverlap { .. })
    ));
    assert!(matches!(
        with(&|h| h.refcount_table_clusters = 1 << 20),
        Err(Qcow2Error::TooLarge { .. })
    ));
    assert!(matches!(
        with(&|h| h.refcount_table_clusters = 0),
        Err(Qcow2Error::InvalidHeader(_))
    ));
    assert!(matches!(
        with(&|h| {
            h.nb_snapshots = 20000;
            h.snapshots_offset = 5 << 16;
        }),
        Err(Qcow2Error::TablePastEof { .. })
    ));
    assert!(matches!(
        with(&|h| h.nb_snapshots = 1 << 20),
        Err(Qcow2Error::TooLarge { .. })
    ));
    assert!(matches!(
        with(&|h| h.size = u64::MAX),
        Err(Qcow2Error::TooLarge { .. })
    ));
    assert!(matches!(
        h.validate(1000, false),
        Err(Qcow2Error::Truncated { .. })
    ));
}

#[test]
fn test_unknown_incompatible_bits_are_named_from_the_table() {
    let mut h = Header::parse(&v3_header(112, 0)).expect("parse");
    h.extensions
        .push(HeaderExtension::FeatureNames(vec![FeatureName {
            kind: FeatureKind::Incompatible,
            bit: 5,
            name: "shiny new thing".into(),
        }]));
    h.incompatible_features = (1 << 5) | (1 << 40);
    match h.validate(FILE, false) {
        Err(Qcow2Error::UnknownIncompatibleFeatures { bits, names }) => {
            assert_eq!(bits, (1 << 5) | (1 << 40));
            assert_eq!(names, "bit 5 \"shiny new thing\", bit 40");
        }
        r => panic!("unexpected {r:?}"),
    }
}

#[test]
fn test_compressed_descriptor_math() {
    // qemu 7.2, 64 KiB clusters: two clusters packed in one host cluster.
    let d = CompressedDescriptor::decode(0x0000_0000_0005_004f, 16);
    assert_eq!(d.host_offset, 0x5004f);
    assert_eq!(d.max_len, 512 - 0x4f);
    // x = 62 - (16 - 8) = 54: sector count in bits 54..62.
    let d = CompressedDescriptor::decode((3u64 << 54) | 0x1_0200, 16);
    assert_eq!(d.host_offset, 0x1_0200);
    assert_eq!(d.max_len, 4 * 512);
    // 2 MiB clusters: x = 49, 13-bit count.
    let d = CompressedDescriptor::decode((0x1fffu64 << 49) | 0x1234, 21);
    assert_eq!(d.host_offset, 0x1234);
    assert_eq!(d.max_len, 0x2000 * 512 - 0x34);
    // 512-byte clusters: x = 61, a single count bit.
    let d = CompressedDescriptor::decode((1u64 << 61) | 0x600, 9);
    assert_eq!(d.host_offset, 0x600);
    assert_eq!(d.max_len, 1024);
    for bits in MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS {
        for (off, len) in [
            (0x10000u64, 1u64),
            (0x10001, 511),
            (0x101ff, 2),
            (0x7777, 300),
        ] {
            let len = len.min(1 << bits);
            let e = CompressedDescriptor::encode(off, len, bits);
            let d = CompressedDescriptor::decode(e, bits);
            assert_eq!(d.host_offset, off, "bits {bits}");
            assert!(d.host_offset + d.max_len >= off + len);
            assert!(d.max_len < len + 512);
        }
    }
    let d = CompressedDescriptor {
        host_offset: 0x1_fff0,
        max_len: 0x210,
    };
    assert_eq!(d.host_clusters(16), (1, 2));
}

#[test]
fn test_classify_entries() {
    let cb = 16;
    assert_eq!(classify(0, None, 0, cb), Ok(Mapping::Unallocated));
    assert_eq!(classify(1, None, 0, cb), Ok(Mapping::Zero));
    assert_eq!(classify(0x5_0000 | 1, None, 0, cb), Ok(Mapping::Zero)); // ZERO_ALLOC
    assert_eq!(
        classify(OFLAG_COPIED | 0x6_0000, None, 0, cb),
        Ok(Mapping::Data {
            host: 0x6_0000,
            copied: true
        })
    );
    // Bit 0 of a compressed entry is part of the offset, not the zero flag.
    match classify(OFLAG_COMPRESSED | 0x5_0001, None, 0, cb) {
        Ok(Mapping::Compressed(d)) => assert_eq!(d.host_offset, 0x5_0001),
        r => panic!("unexpected {r:?}"),
    }
    assert!(classify(0x6_0200, None, 0, cb).is_err()); // misaligned
    assert!(classify(OFLAG_COPIED, None, 0, cb).is_err()); // COPIED without offset
    assert!(classify(OFLAG_COMPRESSED | 0x5_0000, Some(1), 0, cb).is_err());
    assert_eq!(
        l1_l2_offset(OFLAG_COPIED | 0x3_0000, cb),
        Ok(Some(0x3_0000))
    );
    assert_eq!(l1_l2_offset(0, cb), Ok(None));
    assert!(l1_l2_offset(0x3_0200, cb).is_err());

    // Extended L2: alloc bits 0..32, zero bits 32..64.
    let host = 0x8_0000u64;
    let bitmap = 0b0110 | (0b1000u64 << 32);
    assert_eq!(
        classify(host, Some(bitmap), 0, cb),
        Ok(Mapping::Unallocated)
    );
    assert!(matches!(
        classify(host, Some(bitmap), 1, cb),
        Ok(Mapping::Data { .. })
    ));
    assert!(matches!(
        classify(host, Some(bitmap), 2, cb),
        Ok(Mapping::Data { .. })
    ));
    assert_eq!(classify(host, Some(bitmap), 3, cb), Ok(Mapping::Zero));
    assert_eq!(classify(0, Some(1u64 << 40), 8, cb), Ok(Mapping::Zero));
    assert!(classify(0, Some(1), 0, cb).is_err()); // allocated without a host offset
    assert!(classify(host, Some(1 | (1 << 32)), 0, cb).is_err()); // both bits
                                                                  // Extended L2 ignores bit 0 of the standard entry for zero-ness.
    assert_eq!(classify(1, Some(0), 0, cb), Ok(Mapping::Unallocated));
    assert_eq!(subcluster_run(bitmap, 0), 1);
    assert_eq!(subcluster_run(bitmap, 1), 2);
    assert_eq!(subcluster_run(bitmap, 3), 1);
    assert_eq!(subcluster_run(bitmap, 4), 28);
    assert_eq!(subcluster_run(u64::from(u32::MAX), 0), 32);
}

#[test]
fn test_decompress_deflate_and_zstd_with_trailing_bytes() {
    use std::io::Write;
    let mut cluster = vec![0u8; 65536];
    for (i, b) in cluster.iter_mut().enumerate() {
        *b = (i / 100) as u8 ^ (i as u8 & 3);
    }
    // Raw deflate with a 4 KiB window, like qemu.
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&cluster).expect("deflate");
    let mut z = enc.finish().expect("finish");
    let exact = z.len();
    z.extend_from_slice(&[0xff; 300]); // the next compressed cluster / sector padding
    let mut out = vec![0u8; 65536];
    decompress(CompressionType::Deflate, &z, &mut out).expect("inflate");
    assert_eq!(out, cluster);
    assert!(decompress(CompressionType::Deflate, &z[..exact / 2], &mut out).is_err());

    let mut zs = zstd::bulk::compress(&cluster, 3).expect("zstd");
    let exact = zs.len();
    zs.extend_from_slice(&[0x11; 200]);
    let mut out = vec![0u8; 65536];
    decompress(CompressionType::Zstd, &zs, &mut out).expect("unzstd");
    assert_eq!(out, cluster);
    assert!(decompress(CompressionType::Zstd, &zs[..exact / 2], &mut out).is_err());
    // Decompressing to less than a cluster is an error, not a partial success.
    let short = zstd::bulk::compress(&cluster[..1000], 3).expect("zstd");
    assert!(decompress(CompressionType::Zstd, &short, &mut out).is_err());
    assert!(decompress(CompressionType::Deflate, &[0xff; 64], &mut out).is_err());
    assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
}

#[test]
fn test_slice_cache_lru_keeps_dirty_slices() {
    let c = SliceCache::new(2);
    let load = |v: u64| move || Ok(vec![v; 4]);
    assert_eq!(c.with(1, load(1), |s| s[0]).expect("1"), 1);
    assert_eq!(c.with(2, load(2), |s| s[0]).expect("2"), 2);
    c.with(1, load(99), |_| ()).expect("hit 1");
    c.with(3, load(3), |_| ()).expect("3 evicts 2");
    assert_eq!(c.with(2, load(22), |s| s[0]).expect("2 reloaded"), 22);
    let st = c.stats();
    assert_eq!((st.hits, st.misses, st.len), (1, 4, 2));
    c.modify(7, load(7), |s| s[1] = 70).expect("dirty 7");
    c.modify(8, load(8), |s| s[1] = 80).expect("dirty 8");
    c.with(9, load(9), |_| ())
        .expect("over capacity with dirty slices");
    assert_eq!(c.dirty_count(), 2);
    let dirty = c.dirty_slices();
    assert_eq!(dirty.len(), 2);
    assert_eq!(dirty[0], (7, vec![7, 70, 7, 7]));
    c.mark_clean(7, &dirty[0].1);
    c.mark_clean(8, &[0, 0, 0, 0]); // changed since: stays dirty
    assert_eq!(c.dirty_count(), 1);
    assert!(c
        .with(10, || Err(Qcow2Error::Corrupt("x".into())), |_| ())
        .is_err());
}

#[test]
fn test_sharded_slice_cache() {
    let c = SliceCache::new(64);
    let load = |v: u64| move || Ok(vec![v; 4]);
    // 64 clean slices fit (8 per shard only if the keys spread; count what stays).
    for k in 0..1000u64 {
        c.with(k * 4096, load(k), |_| ()).expect("load");
    }
    let st = c.stats();
    assert!(st.len <= 64, "{st:?}");
    assert!(st.len >= 32, "keys should spread over the shards: {st:?}");
    assert_eq!(st.misses, 1000);
    // Dirty slices from every shard come back in key order, and are never evicted.
    for k in 0..100u64 {
        c.modify(k * 4096, load(k), |s| s[0] = k + 1)
            .expect("dirty");
    }
    for k in 1000..3000u64 {
        c.with(k * 4096, load(k), |_| ()).expect("churn");
    }
    let dirty = c.dirty_slices();
    assert_eq!(dirty.len(), 100);
    assert!(dirty.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(dirty.iter().all(|(k, e)| e[0] == k / 4096 + 1));
    assert_eq!(c.dirty_count(), 100);
    for (k, e) in &dirty {
        c.mark_clean(*k, e);
    }
    assert_eq!(c.dirty_count(), 0);
}

#[test]
fn test_refcount_entries_of_every_width() {
    for order in 0..=6u32 {
        let cb = 9;
        let n = refcount::block_entries(cb, order);
        assert_eq!(n, 4096 >> order);
        let max = refcount::max_refcount(order);
        let mut block = vec![0u8; 512];
        for i in 0..n {
            refcount::set(&mut block, order, i, (i * 7 + 3) & max);
        }
        for i in 0..n {
            assert_eq!(
                refcount::get(&block, order, i),
                (i * 7 + 3) & max,
                "order {order} i {i}"
            );
        }
        refcount::set(&mut block, order, 1, max);
        assert_eq!(refcount::get(&block, order, 1), max);
        assert_eq!(refcount::get(&block, order, 0), 3 & max);
        assert_eq!(refcount::get(&block, order, 2), 17 & max);
    }
    // 16-bit entries are big-endian, 1-bit entries start at the LSB.
    let mut b = vec![0u8; 4];
    refcount::set(&mut b, 4, 1, 0x0102);
    assert_eq!(b, [0, 0, 1, 2]);
    let mut b = vec![0u8; 1];
    refcount::set(&mut b, 0, 0, 1);
    refcount::set(&mut b, 0, 3, 1);
    assert_eq!(b, [0b1001]);
}

#[test]
fn test_extensions_round_trip_through_the_encoder() {
    let mut b = v3_header(112, 0);
    let mut table = vec![0u8; 48];
    table[2..7].copy_from_slice(b"dirty");
    let mut at = put_ext(&mut b, 112, EXT_BACKING_FORMAT, b"raw");
    at = put_ext(&mut b, at, EXT_FEATURE_NAMES, &table);
    at = put_ext(&mut b, at, 0xdead_beef, &[9; 13]);
    let mut bm = vec![0u8; 24];
    bm[3] = 1;
    bm[23] = 0x40;
    at = put_ext(&mut b, at, EXT_BITMAPS, &bm);
    at = put_ext(&mut b, at, EXT_END, &[]);
    let h = Header::parse(&b).expect("parse");
    assert_eq!(
        HeaderExtension::encode_all(&h.extensions),
        b[112..at].to_vec()
    );
}

#[test]
fn test_image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<super::Qcow2Image>();
}

#[test]
fn test_inflight_epochs_wait_for_older_operations() {
    use super::inflight::Inflight;
    let f = Inflight::default();
    let a = f.begin();
    let unlinked = f.current(); // a cluster unlinked while `a` runs
    assert_eq!(
        f.try_advance(),
        unlinked + 1,
        "nothing of the previous epoch runs"
    );
    let b = f.begin(); // started after the unlink: cannot have seen the old mapping
    assert_eq!(f.try_advance(), unlinked + 1, "`a` still runs");
    assert!(!f.is_quiescent(unlinked));
    f.end(a);
    assert_eq!(f.try_advance(), unlinked + 2);
    assert!(f.is_quiescent(unlinked), "only `b` runs, which began later");
    assert_eq!(f.try_advance(), unlinked + 2, "`b` blocks the next step");
    f.end(b);
    {
        let _g = f.guard();
        assert_eq!(f.try_advance(), unlinked + 3);
        assert_eq!(f.try_advance(), unlinked + 3);
    }
    assert_eq!(f.try_advance(), unlinked + 4);
}

#[test]
fn test_inflight_counts_operations_of_every_thread() {
    use super::inflight::Inflight;
    let f = Inflight::default();
    let unlinked = f.current();
    // More threads than slots: some share one.
    let tokens: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20).map(|_| s.spawn(|| f.begin())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(f.try_advance(), unlinked + 1);
    assert_eq!(
        f.try_advance(),
        unlinked + 1,
        "operations of other threads run"
    );
    for &t in &tokens[..19] {
        f.end(t);
    }
    assert_eq!(f.try_advance(), unlinked + 1, "one operation still runs");
    f.end(tokens[19]);
    assert_eq!(f.try_advance(), unlinked + 2);
}

/// Found by `cargo fuzz run qcow2_header`: a backing-file offset near u64::MAX overflowed the
/// end-of-name computation (a panic in debug builds, a wrapped bounds check in release).
#[test]
fn test_fuzz_regression_backing_offset_overflow() {
    let input: [u8; 72] = [
        0x51, 0x46, 0x49, 0xfb, 0x00, 0x00, 0x00, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0x0a, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xca, 0xff, 0xff, 0xff, 0xff,
        0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3d, 0xff, 0xff, 0x19, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0x27, 0xff, 0xff, 0xff, 0xac, 0xff, 0xff,
    ];
    assert!(Header::parse(&input).is_err());
}
