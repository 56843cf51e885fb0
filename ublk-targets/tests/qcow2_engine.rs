//! qcow2 engine against qemu: images made by qemu-img / qemu-io are read whole through
//! `Qcow2Image` and compared byte for byte with `qemu-img convert -O raw`; malformed images must
//! fail with a clear `Qcow2Error`. Skipped (with a printed reason) when qemu-utils is missing.
#![allow(clippy::print_stderr)]

mod util {
    #![allow(dead_code)]
    use std::fs::File;
    use std::io::{Read, Write};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU64, Ordering};
    use ublk_targets::qcow2::{Qcow2Error, Qcow2Image, Qcow2Options};

    /// `Qcow2Image::open`, waiting out an image lock held only for an instant. Tests run in
    /// threads of one process and spawn qemu-img: a child forked while this thread has an image
    /// open holds a copy of its descriptor, and with it the image's OFD lock, until its exec
    /// closes it; reopening right after a close can meet that copy. (The locking test calls
    /// `Qcow2Image::open` directly: there a lock is the expected answer.)
    pub fn open_image(img: &Path, opts: &Qcow2Options) -> Result<Qcow2Image, Qcow2Error> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Qcow2Image::open(img, opts) {
                Err(Qcow2Error::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }

    pub const MIB: u64 = 1 << 20;

    /// A unique temporary directory, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "ublk-qcow2-{tag}-{}-{n}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
        pub fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn have(tool: &str) -> bool {
        Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Returns false (after printing why) when qemu-img or qemu-io is missing.
    pub fn qemu_available() -> bool {
        for t in ["qemu-img", "qemu-io"] {
            if !have(t) {
                eprintln!("SKIPPED: {t} not found (install qemu-utils)");
                return false;
            }
        }
        true
    }

    /// Runs a command, panicking with its output on failure.
    pub fn run(cmd: &str, args: &[&str]) {
        let out = Command::new(cmd)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
        assert!(
            out.status.success(),
            "{cmd} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn qemu_img(args: &[&str]) {
        run("qemu-img", args);
    }

    /// Runs qemu-io commands on a qcow2 image.
    pub fn qemu_io(img: &Path, cmds: &[&str]) {
        let mut args: Vec<&str> = vec!["-f", "qcow2"];
        for c in cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(s(img));
        run("qemu-io", &args);
    }

    pub fn s(p: &Path) -> &str {
        p.to_str().expect("utf8 path")
    }

    /// Deterministic xorshift generator.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Writes a raw file of `size` bytes whose 4 KiB blocks are a mix of random data, repeated
    /// bytes (compressible), text-like data and zeros.
    pub fn write_pattern_raw(path: &Path, size: u64, seed: u64) {
        let mut f = File::create(path).expect("create raw");
        let mut rng = Rng(seed | 1);
        let mut block = vec![0u8; 4096];
        let mut written = 0u64;
        while written < size {
            let n = (size - written).min(4096) as usize;
            match rng.below(5) {
                0 => block.iter_mut().for_each(|b| *b = rng.next() as u8),
                1 => block.fill(rng.next() as u8),
                2 => {
                    let base = rng.next() as usize;
                    for (i, b) in block.iter_mut().enumerate() {
                        *b = b"abcdefgh qcow2 "[(i + base) % 15];
                    }
                }
                3 => block.fill(0),
                _ => {
                    for (i, b) in block.iter_mut().enumerate() {
                        *b = (i as u64 ^ written ^ seed) as u8;
                    }
                }
            }
            f.write_all(&block[..n]).expect("write raw");
            written += n as u64;
        }
    }

    /// Converts `img` to raw with qemu-img and compares the whole virtual disk as read through
    /// the engine, in aligned 1 MiB chunks and in pseudo-random unaligned pieces.
    pub fn assert_same_as_qemu(img: &Path) {
        assert_same_as_qemu_with(img, &Qcow2Options::default())
    }

    pub fn assert_same_as_qemu_with(img: &Path, opts: &Qcow2Options) {
        let q = open_image(img, opts).unwrap_or_else(|e| panic!("open {}: {e}", img.display()));
        let reference = img.with_extension("ref.raw");
        qemu_img(&["convert", "-O", "raw", s(img), s(&reference)]);
        let mut expected = Vec::new();
        File::open(&reference)
            .expect("open reference")
            .read_to_end(&mut expected)
            .expect("read reference");
        std::fs::remove_file(&reference).ok();
        assert_eq!(
            expected.len() as u64,
            q.virtual_size(),
            "virtual size of {}",
            img.display()
        );
        let size = expected.len() as u64;
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(MIB) as usize;
            q.read_at(&mut buf[..n], off)
                .unwrap_or_else(|e| panic!("read {} at {off}: {e}", img.display()));
            let want = &expected[off as usize..off as usize + n];
            if buf[..n] != *want {
                let first = (0..n).find(|&i| buf[i] != want[i]).unwrap_or(0);
                panic!(
                    "{}: mismatch at guest offset {} (engine {:#04x}, qemu {:#04x})",
                    img.display(),
                    off + first as u64,
                    buf[first],
                    want[first]
                );
            }
            off += n as u64;
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ size);
        for _ in 0..200 {
            let len = (rng.below(300 * 1024) + 1).min(size);
            let start = rng.below(size - len + 1);
            let mut b = vec![0u8; len as usize];
            q.read_at(&mut b, start).expect("random read");
            assert!(
                b == expected[start as usize..(start + len) as usize],
                "{}: random read mismatch at {start}+{len}",
                img.display()
            );
        }
    }

    /// qemu-io commands that leave data, zeroed and discarded regions in a 16 MiB+ image,
    /// including unaligned writes and ranges spanning clusters.
    pub const MIXED_WRITES: &[&str] = &[
        "write -P 0x11 0 1M",
        "write -P 0x22 1536k 777k",
        "write -P 0x33 3000001 12345",
        "write -z 512k 256k",
        "write -z 1600k 64k",
        "discard 2M 512k",
        "write -P 0x44 5M 3M",
        "write -z 6M 100k",
        "discard 7M 1M",
        "write -P 0x55 12345678 1000",
        "write -P 0x66 15M 1M",
    ];
}

use std::path::Path;
use ublk_targets::qcow2::{Qcow2Error, Qcow2Image, Qcow2Options};
use util::*;

macro_rules! require_qemu {
    () => {
        if !qemu_available() {
            return;
        }
    };
}

/// Creates a 16 MiB image from a pattern raw file with `opts`, then applies the mixed qemu-io
/// writes.
fn pattern_image(dir: &TempDir, name: &str, opts: &str) -> std::path::PathBuf {
    let raw = dir.path(&format!("{name}.src.raw"));
    write_pattern_raw(&raw, 16 * MIB, name.len() as u64 * 7919);
    let img = dir.path(&format!("{name}.qcow2"));
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        s(&raw),
        s(&img),
    ]);
    qemu_io(&img, MIXED_WRITES);
    img
}

#[test]
fn test_qcow2_v2_v3_cluster_sizes_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("clusters");
    for compat in ["0.10", "1.1"] {
        for cs in ["512", "4k", "64k", "2M"] {
            let name = format!("c{}-{cs}", compat.replace('.', ""));
            let img = pattern_image(&dir, &name, &format!("compat={compat},cluster_size={cs}"));
            assert_same_as_qemu(&img);
            let q = open_image(&img, &Qcow2Options::default()).expect("open");
            assert_eq!(q.header().version, if compat == "0.10" { 2 } else { 3 });
        }
    }
}

#[test]
fn test_qcow2_refcount_bits_and_lazy_refcounts_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("refbits");
    for opts in [
        "refcount_bits=1",
        "refcount_bits=16",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "refcount_bits=8,lazy_refcounts=on,cluster_size=4k",
    ] {
        let img = pattern_image(&dir, &opts.replace([',', '='], "_"), opts);
        assert_same_as_qemu(&img);
    }
}

#[test]
fn test_qcow2_empty_and_qemu_io_only_images_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("empty");
    let img = dir.path("empty.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "20M"]);
    assert_same_as_qemu(&img);
    // Unaligned virtual size, writes only through qemu-io.
    let img2 = dir.path("odd.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img2),
        "17000000",
    ]);
    qemu_io(
        &img2,
        &[
            "write -P 0xaa 0 3k",
            "write -P 0xbb 16999424 512",
            "write -z 4k 8k",
        ],
    );
    assert_same_as_qemu(&img2);
}

#[test]
fn test_qcow2_extended_l2_subclusters_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("extl2");
    for cs in ["16k", "64k", "2M"] {
        // Over a backing file, so unallocated subclusters must come from it.
        let base = dir.path(&format!("base-{cs}.raw"));
        write_pattern_raw(&base, 16 * MIB, 4242);
        let img = dir.path(&format!("ext-{cs}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("extended_l2=on,cluster_size={cs}"),
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&img),
        ]);
        qemu_io(
            &img,
            &[
                "write -P 0x71 2k 4k",
                "write -P 0x72 70k 1k",
                "write -z 128k 8k",
                "write -P 0x73 131k 1k",
                "write -z 1M 1M",
                "write -P 0x74 1100k 3k",
                "discard 4M 2M",
                "write -P 0x75 9M 1234567",
                "write -z 12M 4k",
            ],
        );
        assert_same_as_qemu(&img);
        // Without a backing file as well.
        let img2 = pattern_image(
            &dir,
            &format!("ext-nb-{cs}"),
            &format!("extended_l2=on,cluster_size={cs}"),
        );
        assert_same_as_qemu(&img2);
    }
}

#[test]
fn test_qcow2_compressed_zlib_and_zstd_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("compressed");
    for ct in ["zlib", "zstd"] {
        for cs in ["4k", "64k", "2M"] {
            let raw = dir.path(&format!("{ct}-{cs}.raw"));
            write_pattern_raw(&raw, 16 * MIB, 99);
            let img = dir.path(&format!("{ct}-{cs}.qcow2"));
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct},cluster_size={cs}"),
                s(&raw),
                s(&img),
            ]);
            assert_same_as_qemu(&img);
            // Compressed clusters partly overwritten, zeroed and discarded.
            qemu_io(
                &img,
                &[
                    "write -P 0x99 100k 5k",
                    "write -z 3M 64k",
                    "discard 8M 2M",
                    &format!("write -c -P 0x5a 8M {cs}"), // into the discarded range
                ],
            );
            assert_same_as_qemu(&img);
            let q = open_image(&img, &Qcow2Options::default()).expect("open");
            let want = if ct == "zstd" {
                ublk_targets::qcow2::CompressionType::Zstd
            } else {
                ublk_targets::qcow2::CompressionType::Deflate
            };
            assert_eq!(q.geometry().compression, want);
        }
    }
}

#[test]
fn test_qcow2_preallocation_modes_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("prealloc");
    for mode in ["metadata", "falloc", "full"] {
        for compat in ["0.10", "1.1"] {
            let img = dir.path(&format!("pre-{mode}-{compat}.qcow2"));
            qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("preallocation={mode},compat={compat}"),
                s(&img),
                "16M",
            ]);
            assert_same_as_qemu(&img);
            qemu_io(&img, MIXED_WRITES);
            assert_same_as_qemu(&img);
        }
    }
}

#[test]
fn test_qcow2_backing_chains_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("chains");
    // raw base <- qcow2 mid <- qcow2 top (relative backing names), top larger than base.
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 8 * MIB, 5);
    let mid = dir.path("mid.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "12M",
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0xa1 1M 1M",
            "write -z 3M 64k",
            "write -P 0xa2 7M 2M",
        ],
    );
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "16M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0xb1 1536k 10k",
            "write -z 7M 4k",
            "discard 100k 4k",
            "write -P 0xb2 13M 1M",
        ],
    );
    assert_same_as_qemu(&mid);
    assert_same_as_qemu(&top);
    let q = open_image(&top, &Qcow2Options::default()).expect("open top");
    assert_eq!(q.chain_depth(), 3);

    // qcow2 base (compressed, v2) <- v3 child with extended L2 <- child, all with a smaller base.
    let qbase = dir.path("qbase.qcow2");
    let qraw = dir.path("qbase.src.raw");
    write_pattern_raw(&qraw, 6 * MIB, 77);
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&qraw),
        s(&qbase),
    ]);
    let c1 = dir.path("c1.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=32k",
        "-b",
        "qbase.qcow2",
        "-F",
        "qcow2",
        s(&c1),
        "10M",
    ]);
    qemu_io(
        &c1,
        &[
            "write -P 0xc1 5000 3000",
            "write -z 2M 5k",
            "write -P 0xc2 5M 2M",
        ],
    );
    let c2 = dir.path("c2.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&c1),
        "-F",
        "qcow2",
        s(&c2),
        "12M",
    ]);
    qemu_io(&c2, &["write -P 0xd1 6M 100k", "write -z 0 4k"]);
    assert_same_as_qemu(&c1);
    assert_same_as_qemu(&c2);
}

#[test]
fn test_qcow2_backing_without_format_extension_is_probed() {
    require_qemu!();
    let dir = TempDir::new("probe");
    let base = dir.path("base.qcow2");
    let raw = dir.path("base.src.raw");
    write_pattern_raw(&raw, 4 * MIB, 3);
    qemu_img(&["convert", "-O", "qcow2", s(&raw), s(&base)]);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x12 1M 4k"]);
    // Drop the backing format extension (qemu-img rebase -u without -F keeps it, so patch
    // the extension type to an unknown one instead).
    let mut bytes = std::fs::read(&top).expect("read");
    let magic = 0xe279_2acau32.to_be_bytes();
    let at = bytes
        .windows(4)
        .position(|w| w == magic)
        .expect("backing format extension present");
    bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&top, &bytes).expect("write");
    let q = open_image(&top, &Qcow2Options::default()).expect("open with probe");
    assert!(matches!(
        q.backing(),
        Some(ublk_targets::qcow2::Backing::Qcow2(_))
    ));
    assert_same_as_qemu(&top);
}

#[test]
fn test_qcow2_snapshots_are_readable() {
    require_qemu!();
    let dir = TempDir::new("snap");
    let img = pattern_image(&dir, "snap", "cluster_size=64k");
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    qemu_io(&img, &["write -P 0xee 0 64k"]);
    let q = open_image(&img, &Qcow2Options::default()).expect("open ro");
    assert_eq!(q.snapshot_count(), 1);
    assert_same_as_qemu(&img);
}

/// Applies `ops` random writes, write-zeroes and discards to `q` and `model`.
fn random_snapshot_ops(q: &Qcow2Image, model: &mut [u8], seed: u64, ops: usize) {
    let size = model.len() as u64;
    let cs = q.cluster_size();
    let mut rng = Rng(seed | 1);
    for op in 0..ops {
        match rng.below(8) {
            0..=4 => {
                let len = rng.below(3 * cs.min(64 * 1024)) + 1;
                let off = rng.below(size - len);
                let b = (op as u8).wrapping_mul(29) | 0x80;
                let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8 & 3)).collect();
                q.write_at(&data, off).expect("write");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 => {
                let len = rng.below(4 * cs) + 1;
                let off = rng.below(size - len);
                q.write_zeroes(off, len, rng.below(2) == 0)
                    .expect("write zeroes");
                model[off as usize..(off + len) as usize].fill(0);
            }
            6 => {
                let len = rng.below(4 * cs) + 1;
                let off = rng.below(size - len);
                q.discard(off, len).expect("discard");
                let first = off.div_ceil(cs) * cs;
                let last = ((off + len) / cs * cs).max(first);
                model[first as usize..last as usize].fill(0);
            }
            _ => q.flush().expect("flush"),
        }
    }
}

#[test]
fn test_qcow2_snapshots_are_writable() {
    require_qemu!();
    let dir = TempDir::new("snapw");
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k",
        "cluster_size=512",
        "compat=0.10,cluster_size=16k",
        "extended_l2=on,cluster_size=64k",
    ] {
        let name = opts.replace([',', '='], "_");
        let img = pattern_image(&dir, &name, opts);
        let s1 = qemu_raw(&img);
        qemu_img(&["snapshot", "-c", "s1", s(&img)]);
        qemu_io(&img, &["write -P 0xee 0 64k", "write -z 2M 128k"]);
        let s2 = qemu_raw(&img);
        qemu_img(&["snapshot", "-c", "s2", s(&img)]);
        let mut model = s2.clone();
        for round in 0..2u64 {
            {
                let q = open_image(&img, &rw()).expect("open rw with snapshots");
                assert_eq!(q.snapshot_count(), 2);
                random_snapshot_ops(&q, &mut model, 77 + round, 300);
                q.flush().expect("flush");
                assert_model(&q, &model, &name);
            }
            assert_eq!(qemu_check(&img), 0, "{opts}: round {round}");
            assert!(qemu_raw(&img) == model, "{opts}: active layer");
        }
        for (snap, want) in [("s1", &s1), ("s2", &s2)] {
            let copy = dir.path("copy.qcow2");
            std::fs::copy(&img, &copy).expect("copy");
            qemu_img(&["snapshot", "-a", snap, s(&copy)]);
            assert_eq!(qemu_check(&copy), 0, "{opts}: after applying {snap}");
            assert!(&qemu_raw(&copy) == want, "{opts}: {snap} content changed");
        }
    }
}

#[test]
fn test_qcow2_concurrent_readers_share_one_image() {
    require_qemu!();
    let dir = TempDir::new("threads");
    let img = pattern_image(&dir, "threads", "cluster_size=4k");
    let reference = dir.path("threads.ref");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&reference)]);
    let expected = std::fs::read(&reference).expect("read ref");
    let opts = Qcow2Options {
        l2_cache_bytes: 8 * 4096, // tiny: constant eviction
        ..Default::default()
    };
    let q = open_image(&img, &opts).expect("open");
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let q = &q;
            let expected = &expected;
            sc.spawn(move || {
                let mut rng = Rng(t * 1000 + 17);
                for _ in 0..300 {
                    let len = rng.below(200_000) + 1;
                    let start = rng.below(expected.len() as u64 - len);
                    let mut b = vec![0u8; len as usize];
                    q.read_at(&mut b, start).expect("read");
                    assert!(b == expected[start as usize..(start + len) as usize]);
                }
            });
        }
    });
    let st = q.l2_cache_stats();
    assert!(st.len <= 8, "cache holds {} slices", st.len);
    assert!(st.misses > 0 && st.hits > 0);
}

#[test]
fn test_qcow2_out_of_range_read_is_an_error() {
    require_qemu!();
    let dir = TempDir::new("range");
    let img = dir.path("r.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "1M"]);
    let q = open_image(&img, &Qcow2Options::default()).expect("open");
    let mut b = [0u8; 512];
    assert!(matches!(
        q.read_at(&mut b, (1 << 20) - 256),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    assert!(matches!(
        q.read_at(&mut b, u64::MAX - 10),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    q.read_at(&mut b, (1 << 20) - 512).expect("last sector");
}

// ---------------------------------------------------------------------------------------------
// Malformed images: each must fail with a clear error, not a panic or a huge allocation.
// ---------------------------------------------------------------------------------------------

fn base_image(dir: &TempDir, name: &str) -> std::path::PathBuf {
    let img = dir.path(name);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        s(&img),
        "16M",
    ]);
    qemu_io(&img, &["write -P 0x42 0 128k"]);
    img
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    let mut b = std::fs::read(path).expect("read");
    b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).expect("write");
}

fn be64_at(path: &Path, at: usize) -> u64 {
    let b = std::fs::read(path).expect("read");
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn open_err(path: &Path) -> Qcow2Error {
    match open_image(path, &Qcow2Options::default()) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => {
            eprintln!(
                "{}: {e}",
                path.file_name().and_then(|n| n.to_str()).unwrap_or("?")
            );
            e
        }
    }
}

#[test]
fn test_qcow2_malformed_images_give_clear_errors() {
    require_qemu!();
    let dir = TempDir::new("malformed");

    let img = base_image(&dir, "trunc.qcow2");
    let b = std::fs::read(&img).expect("read");
    std::fs::write(&img, &b[..50]).expect("truncate");
    assert!(matches!(open_err(&img), Qcow2Error::Truncated { .. }));
    std::fs::write(&img, &b[..90]).expect("truncate");
    assert!(matches!(open_err(&img), Qcow2Error::Truncated { .. }));

    let img = base_image(&dir, "magic.qcow2");
    patch(&img, 0, b"QFI\0");
    assert!(matches!(open_err(&img), Qcow2Error::BadMagic(_)));

    let img = base_image(&dir, "version.qcow2");
    patch(&img, 4, &4u32.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::UnsupportedVersion(4)));

    let img = base_image(&dir, "l1eof.qcow2");
    patch(&img, 40, &(1u64 << 40).to_be_bytes());
    assert!(matches!(
        open_err(&img),
        Qcow2Error::TablePastEof {
            table: "L1 table",
            ..
        }
    ));

    let img = base_image(&dir, "overlap.qcow2");
    let l1 = be64_at(&img, 40);
    patch(&img, 48, &l1.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::TablesOverlap { .. }));

    let img = base_image(&dir, "hugel1.qcow2");
    patch(&img, 36, &u32::MAX.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::TooLarge { .. }));

    let img = base_image(&dir, "l1small.qcow2");
    patch(&img, 24, &(1u64 << 50).to_be_bytes()); // virtual size far beyond what l1_size maps
    assert!(matches!(open_err(&img), Qcow2Error::InvalidHeader(_)));

    let img = base_image(&dir, "hugert.qcow2");
    patch(&img, 56, &u32::MAX.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::TooLarge { .. }));

    for bits in [8u32, 22, 63, u32::MAX] {
        let img = base_image(&dir, &format!("cbits{bits}.qcow2"));
        patch(&img, 20, &bits.to_be_bytes());
        assert!(matches!(open_err(&img), Qcow2Error::ClusterBits { .. }));
    }

    let img = base_image(&dir, "rorder.qcow2");
    patch(&img, 96, &7u32.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::RefcountOrder(7)));

    let img = base_image(&dir, "unknown.qcow2");
    patch(&img, 72, &(1u64 << 9).to_be_bytes());
    match open_err(&img) {
        Qcow2Error::UnknownIncompatibleFeatures { bits, names } => {
            assert_eq!(bits, 1 << 9);
            assert!(names.contains("bit 9"), "{names}");
        }
        e => panic!("unexpected {e:?}"),
    }

    let img = base_image(&dir, "corrupt.qcow2");
    patch(&img, 72, &2u64.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::MarkedCorrupt));
    let ro = Qcow2Options {
        allow_corrupt_read_only: true,
        ..Default::default()
    };
    open_image(&img, &ro).expect("corrupt image opens read-only when allowed");

    let img = base_image(&dir, "extdata.qcow2");
    patch(&img, 72, &4u64.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::ExternalDataFile));

    let img = base_image(&dir, "crypt.qcow2");
    patch(&img, 32, &1u32.to_be_bytes());
    assert!(matches!(
        open_err(&img),
        Qcow2Error::Encrypted { method: 1 }
    ));

    let img = base_image(&dir, "hlen.qcow2");
    patch(&img, 100, &100u32.to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::InvalidHeader(_)));

    let img = base_image(&dir, "ctype.qcow2");
    patch(&img, 104, &[1]); // zstd without incompatible bit 3
    assert!(matches!(open_err(&img), Qcow2Error::InvalidHeader(_)));

    let img = base_image(&dir, "misalign.qcow2");
    let l1 = be64_at(&img, 40);
    patch(&img, 40, &(l1 + 512).to_be_bytes());
    assert!(matches!(open_err(&img), Qcow2Error::InvalidHeader(_)));

    // An L2 table pointer past EOF fails at read time, not at open.
    let img = base_image(&dir, "l2eof.qcow2");
    let l1 = be64_at(&img, 40);
    patch(&img, l1, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let q = open_image(&img, &Qcow2Options::default()).expect("open");
    let mut buf = [0u8; 512];
    assert!(matches!(
        q.read_at(&mut buf, 0),
        Err(Qcow2Error::Corrupt(_))
    ));
}

#[test]
fn test_qcow2_backing_chain_loop_and_depth_are_errors() {
    require_qemu!();
    let dir = TempDir::new("loop");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        s(&b),
        "1M",
    ]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    assert!(matches!(open_err(&a), Qcow2Error::BackingChainLoop { .. }));
    // Self loop.
    let c = dir.path("c.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&c), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", s(&c)]);
    assert!(matches!(open_err(&c), Qcow2Error::BackingChainLoop { .. }));
    // Depth limit.
    let mut prev = dir.path("d0.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&prev), "1M"]);
    for i in 1..6 {
        let next = dir.path(&format!("d{i}.qcow2"));
        let bname = prev
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            &bname,
            "-F",
            "qcow2",
            s(&next),
            "1M",
        ]);
        prev = next;
    }
    let opts = Qcow2Options {
        max_chain_depth: 4,
        ..Default::default()
    };
    assert!(matches!(
        open_image(&prev, &opts),
        Err(Qcow2Error::BackingChainTooDeep { limit: 4 })
    ));
    open_image(&prev, &Qcow2Options::default()).expect("depth 6 is fine by default");
    // Missing backing file.
    std::fs::remove_file(dir.path("d0.qcow2")).expect("rm");
    assert!(matches!(open_err(&prev), Qcow2Error::BackingOpen { .. }));
}

// ---------------------------------------------------------------------------------------------
// Write path: a random op stream mirrored onto an in-memory model, then `qemu-img check` and a
// byte-for-byte comparison with qemu's view of the image.
// ---------------------------------------------------------------------------------------------

fn rw() -> Qcow2Options {
    Qcow2Options {
        writable: true,
        // Small: exercises eviction and write-back under pressure.
        l2_cache_bytes: 16 * 4096,
        refcount_cache_bytes: 0, // 4 blocks
        ..Default::default()
    }
}

/// Runs `qemu-img check` and returns its exit code.
fn qemu_check(img: &Path) -> i32 {
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2", s(img)])
        .output()
        .expect("spawn qemu-img check");
    let code = out.status.code().unwrap_or(-1);
    if code != 0 {
        eprintln!(
            "qemu-img check {}: exit {code}\n{}{}",
            img.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    code
}

fn qemu_raw(img: &Path) -> Vec<u8> {
    let reference = img.with_extension("ref.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&reference)]);
    let v = std::fs::read(&reference).expect("read reference");
    std::fs::remove_file(&reference).ok();
    v
}

fn assert_model(q: &Qcow2Image, model: &[u8], what: &str) {
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0usize;
    while off < model.len() {
        let n = (model.len() - off).min(buf.len());
        q.read_at(&mut buf[..n], off as u64).expect("read back");
        if buf[..n] != model[off..off + n] {
            let i = (0..n).find(|&i| buf[i] != model[off + i]).unwrap_or(0);
            panic!("{what}: engine differs from the model at {}", off + i);
        }
        off += n;
    }
}

/// Applies a seeded random stream of writes (unaligned, sector-aligned, whole clusters,
/// multi-cluster), flushes and read checks to `img`, then verifies it with qemu.
fn random_writes(img: &Path, seed: u64, ops: usize, accept_check: &[i32]) {
    let mut model = qemu_raw(img);
    let size = model.len() as u64;
    {
        let q = open_image(img, &rw()).unwrap_or_else(|e| panic!("open rw {}: {e}", img.display()));
        let cs = q.cluster_size();
        let mut rng = Rng(seed | 1);
        for op in 0..ops {
            let kind = rng.below(10);
            let (off, len) = match kind {
                0..=4 => {
                    let len = rng.below(3 * cs.min(64 * 1024)) + 1;
                    (rng.below(size - len), len)
                }
                5 | 6 => {
                    let len = (rng.below(16) + 1) * 512;
                    (rng.below((size - len) / 512) * 512, len)
                }
                7 => {
                    let n = (rng.below(3) + 1) * cs;
                    let n = n.min(size / 2);
                    (rng.below((size - n) / cs) * cs, n)
                }
                8 => {
                    q.flush().expect("flush");
                    continue;
                }
                _ => {
                    let len = rng.below(200_000) + 1;
                    let start = rng.below(size - len);
                    let mut b = vec![0u8; len as usize];
                    q.read_at(&mut b, start).expect("read");
                    assert!(
                        b == model[start as usize..(start + len) as usize],
                        "{}: op {op}: read at {start}+{len} differs from the model",
                        img.display()
                    );
                    continue;
                }
            };
            let byte = (op as u8).wrapping_mul(31).wrapping_add(7);
            let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8 & 0x0f)).collect();
            q.write_at(&data, off)
                .unwrap_or_else(|e| panic!("{}: op {op}: write {off}+{len}: {e}", img.display()));
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        q.flush().expect("final flush");
        assert_model(&q, &model, "before close");
    }
    let code = qemu_check(img);
    assert!(
        accept_check.contains(&code),
        "{}: qemu-img check exit {code}",
        img.display()
    );
    assert!(
        qemu_raw(img) == model,
        "{}: qemu sees different content",
        img.display()
    );
    let q = open_image(img, &Qcow2Options::default()).expect("reopen");
    assert_model(&q, &model, "after reopen");
}

#[test]
fn test_qcow2_write_random_ops_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("write");
    let configs: &[(&str, &str)] = &[
        ("v3-64k", "cluster_size=64k"),
        ("v2-512", "compat=0.10,cluster_size=512"),
        ("v3-4k-rc1", "cluster_size=4k,refcount_bits=1"),
        ("v3-512-rc64", "cluster_size=512,refcount_bits=64"), // grows the refcount table
        ("v3-2M", "cluster_size=2M"),
        ("v3-lazy", "lazy_refcounts=on,cluster_size=16k"),
        ("v3-prealloc-meta", "preallocation=metadata"),
        (
            "v2-prealloc-falloc",
            "preallocation=falloc,compat=0.10,cluster_size=4k",
        ),
        ("v3-ext-64k", "extended_l2=on,cluster_size=64k"),
        ("v3-ext-16k-snap", "extended_l2=on,cluster_size=16k"),
        ("v3-4k-snap", "cluster_size=4k"),
        ("v3-lazy-dirty", "lazy_refcounts=on,cluster_size=4k"),
        ("v3-ext-lazy-dirty", "lazy_refcounts=on,extended_l2=on"),
    ];
    for (i, (name, opts)) in configs.iter().enumerate() {
        let img = dir.path(&format!("{name}.qcow2"));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, s(&img), "16M"]);
        if i % 2 == 0 || name.contains("snap") {
            qemu_io(&img, MIXED_WRITES);
        }
        if name.ends_with("snap") {
            qemu_img(&["snapshot", "-c", "s1", s(&img)]);
        }
        if name.ends_with("dirty") {
            qemu_io_killed(&img, &["write -P 0x99 3M 2M", "write -z 9M 1M"]);
            assert_eq!(be64_at(&img, 72) & 1, 1, "{name}: not dirty");
        }
        random_writes(&img, 1000 + i as u64, 400, &[0]);
    }
}

#[test]
fn test_qcow2_write_cow_from_compressed_and_backing_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("cow");
    for (ct, cs) in [("zlib", "64k"), ("zstd", "4k"), ("zlib", "512")] {
        let raw = dir.path(&format!("{ct}-{cs}.raw"));
        write_pattern_raw(&raw, 16 * MIB, 7);
        let img = dir.path(&format!("{ct}-{cs}.qcow2"));
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct},cluster_size={cs}"),
            s(&raw),
            s(&img),
        ]);
        random_writes(&img, 77, 300, &[0]);
    }
    // raw base <- qcow2 mid <- qcow2 top (written), top larger than the base.
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 8 * MIB, 5);
    let mid = dir.path("mid.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "12M",
    ]);
    qemu_io(&mid, &["write -P 0xa1 1M 1M", "write -z 3M 64k"]);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "16M",
    ]);
    qemu_io(&top, &["write -P 0xb1 1536k 10k", "write -z 7M 4k"]);
    let mid_before = std::fs::read(&mid).expect("read mid");
    random_writes(&top, 5, 400, &[0]);
    assert!(
        std::fs::read(&mid).expect("read mid") == mid_before,
        "backing file modified"
    );
}

#[test]
fn test_qcow2_write_zero_alloc_and_discarded_clusters() {
    require_qemu!();
    let dir = TempDir::new("zeroalloc");
    let img = dir.path("z.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "4M",
    ]);
    // Allocated data, then zeroed keeping the allocation (ZERO_ALLOC), zeroed with unmap
    // (ZERO_PLAIN) and discarded.
    qemu_io(
        &img,
        &[
            "write -P 0x33 0 4M",
            "write -z 0 1M",
            "write -z -u 1M 1M",
            "discard 2M 1M",
        ],
    );
    let model = qemu_raw(&img);
    {
        let q = open_image(&img, &rw()).expect("open rw");
        // Partial writes into each kind.
        for (i, off) in [
            4096u64 + 100,
            (1 << 20) + 5000,
            (2 << 20) + 9000,
            (3 << 20) + 77,
        ]
        .into_iter()
        .enumerate()
        {
            q.write_at(&[0xc0 + i as u8; 300], off).expect("write");
        }
        q.flush().expect("flush");
    }
    let mut model = model;
    for (i, off) in [
        4096usize + 100,
        (1 << 20) + 5000,
        (2 << 20) + 9000,
        (3 << 20) + 77,
    ]
    .into_iter()
    .enumerate()
    {
        model[off..off + 300].fill(0xc0 + i as u8);
    }
    assert_eq!(qemu_check(&img), 0);
    assert!(qemu_raw(&img) == model);
}

#[test]
fn test_qcow2_write_clears_autoclear_bitmaps_bit() {
    require_qemu!();
    let dir = TempDir::new("bitmap");
    let img = dir.path("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "8M"]);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    assert_ne!(
        be64_at(&img, 88) & 1,
        0,
        "qemu set the bitmaps autoclear bit"
    );
    {
        let q = open_image(&img, &rw()).expect("open rw");
        q.write_at(&[1u8; 4096], 0).expect("write");
    }
    assert_eq!(be64_at(&img, 88), 0, "autoclear bits cleared");
    // qemu now drops the inconsistent bitmaps and reports their clusters as leaks.
    let code = qemu_check(&img);
    assert!(code == 0 || code == 3, "check exit {code}");
}

#[test]
fn test_qcow2_write_refusals() {
    require_qemu!();
    let dir = TempDir::new("refuse");
    let img = dir.path("r.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "1M"]);
    let q = open_image(&img, &Qcow2Options::default()).expect("open ro");
    assert!(matches!(
        q.write_at(&[0u8; 512], 0),
        Err(Qcow2Error::ReadOnly(_))
    ));
    drop(q);
    let q = open_image(&img, &rw()).expect("open rw");
    assert!(matches!(
        q.write_at(&[0u8; 512], (1 << 20) - 256),
        Err(Qcow2Error::OutOfRange { .. })
    ));
    drop(q);
    let corrupt = dir.path("corrupt.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&corrupt), "1M"]);
    patch(&corrupt, 72, &2u64.to_be_bytes());
    let opts = Qcow2Options {
        allow_corrupt_read_only: true,
        ..rw()
    };
    assert!(matches!(
        open_image(&corrupt, &opts),
        Err(Qcow2Error::MarkedCorrupt)
    ));
}

#[test]
fn test_qcow2_concurrent_writers_to_shared_clusters() {
    require_qemu!();
    let dir = TempDir::new("cwrite");
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 8 * MIB, 11);
    let img = dir.path("c.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&img),
    ]);
    let mut model = std::fs::read(&base).expect("read base");
    let threads = 4u64;
    let sectors = model.len() as u64 / 512;
    // Thread t writes 512-byte sectors s with s % threads == t, in random order: threads race
    // on allocating the same clusters and L2 slices.
    let plan: Vec<Vec<u64>> = (0..threads)
        .map(|t| {
            let mut rng = Rng(t + 99);
            (0..600)
                .map(|_| {
                    let s = rng.below(sectors / threads) * threads + t;
                    s.min(sectors - 1)
                })
                .filter(|s| s % threads == t)
                .collect()
        })
        .collect();
    {
        let q = open_image(&img, &rw()).expect("open rw");
        std::thread::scope(|sc| {
            for (t, sectors) in plan.iter().enumerate() {
                let q = &q;
                sc.spawn(move || {
                    for (k, s) in sectors.iter().enumerate() {
                        q.write_at(&[t as u8 * 16 + 1; 512], s * 512)
                            .expect("write");
                        if k % 97 == 0 {
                            q.flush().expect("flush");
                        }
                    }
                });
            }
        });
        q.flush().expect("flush");
    }
    for (t, sectors) in plan.iter().enumerate() {
        for s in sectors {
            let at = *s as usize * 512;
            model[at..at + 512].fill(t as u8 * 16 + 1);
        }
    }
    assert_eq!(qemu_check(&img), 0);
    assert!(
        qemu_raw(&img) == model,
        "content differs after concurrent writes"
    );
}

#[test]
fn test_qcow2_unflushed_writes_leave_a_consistent_image() {
    require_qemu!();
    let dir = TempDir::new("crash");
    for cs in ["512", "64k"] {
        let img = dir.path(&format!("crash-{cs}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cs}"),
            s(&img),
            "8M",
        ]);
        let q = open_image(&img, &rw()).expect("open rw");
        let mut rng = Rng(3);
        for i in 0..200u64 {
            let off = rng.below(4 * MIB - 5000);
            q.write_at(&[i as u8; 5000], off).expect("write");
        }
        q.flush().expect("flush");
        let mut flushed = vec![0u8; 4 * MIB as usize];
        q.read_at(&mut flushed, 0).expect("read");
        for i in 0..200u64 {
            let off = 4 * MIB + rng.below(4 * MIB - 5000);
            q.write_at(&[i as u8; 5000], off).expect("write");
        }
        // "Crash": no flush, no close-time write-back.
        std::mem::forget(q);
        // The file as the crash leaves it (the leaked handle still holds the image's lock).
        let crashed = dir.path(&format!("crashed-{cs}.qcow2"));
        std::fs::copy(&img, &crashed).expect("copy the crashed image");
        let code = qemu_check(&crashed);
        assert!(code == 0 || code == 3, "check after crash: exit {code}");
        let after = qemu_raw(&crashed);
        assert!(
            after[..4 * MIB as usize] == flushed[..],
            "flushed data lost"
        );
    }
}

#[test]
fn test_qcow2_write_grows_the_refcount_table() {
    require_qemu!();
    let dir = TempDir::new("grow");
    // 512-byte clusters: one refcount-table cluster covers 2 MiB of file with 64-bit refcounts
    // and 8 MiB with 16-bit ones, so filling 16 MiB must grow the table (several times).
    for opts in [
        "cluster_size=512,refcount_bits=64",
        "cluster_size=512,compat=0.10",
    ] {
        let img = dir.path(&format!("{}.qcow2", opts.replace([',', '='], "_")));
        qemu_img(&["create", "-f", "qcow2", "-o", opts, s(&img), "16M"]);
        let rt_before = be64_at(&img, 48);
        let mut model = vec![0u8; 16 * MIB as usize];
        {
            let q = open_image(&img, &rw()).expect("open rw");
            let mut rng = Rng(42);
            for (i, chunk) in model.chunks_mut(64 * 1024).enumerate() {
                chunk.iter_mut().for_each(|b| *b = rng.next() as u8);
                q.write_at(chunk, i as u64 * 64 * 1024).expect("write");
                if i % 50 == 0 {
                    q.flush().expect("flush");
                }
            }
            q.flush().expect("flush");
            assert_model(&q, &model, "after growth");
        }
        assert_ne!(be64_at(&img, 48), rt_before, "{opts}: refcount table moved");
        assert_eq!(qemu_check(&img), 0, "{opts}");
        assert!(qemu_raw(&img) == model, "{opts}: content");
    }
}

// ---------------------------------------------------------------------------------------------
// Process crash: a child process (this test binary, re-executed) writes numbered regions and
// flushes often; it is killed with SIGKILL at varying points. Every region acknowledged by a
// completed flush must read back, and `qemu-img check` must find at most leaks.
// ---------------------------------------------------------------------------------------------

const CRASH_CHILD_ENV: &str = "UBLK_QCOW2_CRASH_CHILD";

fn crash_region(i: u64) -> (u64, usize, u8) {
    (
        i * 9000 + (i % 7) * 100,
        5000 + (i % 3) as usize * 1000,
        (i % 251) as u8 + 1,
    )
}

fn crash_child(img: &Path, first: u64) {
    use std::io::Write;
    let q = open_image(img, &rw()).expect("child open");
    let regions = q.virtual_size() / 9000 - 1;
    let mut out = std::io::stdout();
    for i in first..regions {
        let (off, len, b) = crash_region(i);
        q.write_at(&vec![b; len], off).expect("child write");
        if i % 3 == 0 {
            // Discards and write-zeroes in a scratch area the checks do not look at.
            let slot = |k: u64| 8 * MIB + (k % 16) * 256 * 1024;
            q.write_at(&vec![b; 128 * 1024], slot(i) + 4096)
                .expect("child scratch write");
            let r = match i % 4 {
                0 => q.discard(slot(i + 8), 256 * 1024),
                1 => q.write_zeroes(slot(i + 8), 256 * 1024, true),
                _ => q.write_zeroes(slot(i + 8) + 512, 200 * 1024, false),
            };
            r.expect("child discard");
        }
        if i % 2 == 1 {
            q.flush().expect("child flush");
            writeln!(out, "FLUSHED {i}").expect("stdout");
            out.flush().expect("stdout");
        }
    }
    writeln!(out, "DONE").expect("stdout");
    std::mem::forget(q);
}

#[test]
fn test_qcow2_killed_writer_leaves_a_consistent_image() {
    if let Ok(spec) = std::env::var(CRASH_CHILD_ENV) {
        let (first, path) = spec.split_once(':').expect("child spec");
        crash_child(Path::new(path), first.parse().expect("first"));
        return;
    }
    require_qemu!();
    use std::io::BufRead;
    let dir = TempDir::new("kill");
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 16 * MIB, 21);
    let base_bytes = std::fs::read(&base).expect("read base");
    // (create options, take internal snapshots between children, leave the image dirty
    // between children with a killed lazy-refcounts qemu-io)
    for (round, (opts, snapshots, dirty)) in [
        ("cluster_size=4k", false, false),
        ("cluster_size=512", false, false),
        ("cluster_size=64k", false, false),
        (
            "cluster_size=64k,extended_l2=on,lazy_refcounts=on",
            true,
            true,
        ),
        ("cluster_size=4k,lazy_refcounts=on", false, true),
    ]
    .into_iter()
    .enumerate()
    {
        let img = dir.path(&format!("k{round}.qcow2"));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&img),
        ]);
        let mut next = 0u64; // first region of the next child
        let mut acked: Option<u64> = None;
        // Several crashes on the same image: each child continues after the last acked region.
        for (k, kill_after) in [2usize, 5, 9, 3, 14, 7, 20, 4].into_iter().enumerate() {
            let exe = std::env::current_exe().expect("current exe");
            let mut child = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "test_qcow2_killed_writer_leaves_a_consistent_image",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CRASH_CHILD_ENV, format!("{next}:{}", s(&img)))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child");
            let stdout = child.stdout.take().expect("child stdout");
            let mut seen = 0;
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.expect("line");
                if let Some(n) = line.strip_prefix("FLUSHED ") {
                    acked = Some(n.parse().expect("index"));
                    seen += 1;
                    if seen == kill_after {
                        // Spread the kill over the following writes and flush stages.
                        let delay = (k as u64 * 397 + round as u64 * 911) % 3000;
                        std::thread::sleep(std::time::Duration::from_micros(delay));
                        child.kill().expect("kill");
                        break;
                    }
                }
            }
            child.wait().expect("wait");
            let code = qemu_check(&img);
            assert!(
                code == 0 || code == 3,
                "round {round}: check after kill: exit {code}"
            );
            let data = qemu_raw(&img);
            let last = acked.expect("child acknowledged a flush");
            for i in 0..=last {
                let (off, len, b) = crash_region(i);
                assert!(
                    data[off as usize..off as usize + len]
                        .iter()
                        .all(|&x| x == b),
                    "round {round}: acknowledged region {i} lost"
                );
            }
            // Far beyond anything written: still the backing file's content.
            let tail = 15 * MIB as usize;
            assert!(
                data[tail..] == base_bytes[tail..],
                "round {round}: untouched tail changed"
            );
            next = last + 1;
            if snapshots && k % 3 == 1 {
                // The next children write through L2 tables and clusters shared with it.
                qemu_img(&["snapshot", "-c", &format!("s{k}"), s(&img)]);
            }
            if dirty && k < 7 {
                // The next child repairs the refcounts when it opens the image.
                let off = 12 * MIB + k as u64 * 448 * 1024;
                qemu_io_killed(
                    &img,
                    &[
                        &format!("write -P 0x7{k} {off} 300k"),
                        &format!("write -z {} 64k", off + 320 * 1024),
                    ],
                );
                assert_eq!(be64_at(&img, 72) & 1, 1, "round {round}: not dirty");
            }
        }
        assert_same_as_qemu(&img);
    }
}

#[test]
fn test_qcow2_qemu_header_extensions_round_trip() {
    require_qemu!();
    use ublk_targets::qcow2::{Header, HeaderExtension};
    let dir = TempDir::new("exts");
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    for opts in [
        "compat=0.10",
        "compat=1.1",
        "compression_type=zstd,extended_l2=on",
    ] {
        let img = dir.path("top.qcow2");
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            opts,
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&img),
            "4M",
        ]);
        if opts != "compat=0.10" {
            qemu_img(&["bitmap", "--add", s(&img), "b0"]); // v2 cannot store bitmaps
        }
        let bytes = std::fs::read(&img).expect("read");
        let h = Header::parse(&bytes[..65536]).expect("parse");
        assert_eq!(h.backing_format(), Some("qcow2"));
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
        let enc = HeaderExtension::encode_all(&h.extensions);
        let start = h.header_length as usize;
        assert_eq!(enc, bytes[start..start + enc.len()].to_vec(), "{opts}");
    }
}

// ---------------------------------------------------------------------------------------------
// Read planning (the io_uring fast path of the target): executing the plan with plain
// positional reads must give what the engine reads.
// ---------------------------------------------------------------------------------------------

/// Reads `len` bytes at `off` by executing `q.plan_read` the way the target does.
fn read_by_plan(q: &Qcow2Image, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    use ublk_targets::qcow2::ReadSource;
    let token = q.io_begin();
    let mut pieces = Vec::new();
    q.plan_read(off, len as u64, &mut pieces).expect("plan");
    let mut buf = vec![0xeeu8; len];
    let mut expect_at = off;
    for p in &pieces {
        assert_eq!(p.guest, expect_at, "pieces must tile the range");
        expect_at += p.len;
        let at = (p.guest - off) as usize;
        let chunk = &mut buf[at..at + p.len as usize];
        match p.src {
            ReadSource::Zero => chunk.fill(0),
            ReadSource::Engine { layer } => q
                .layer_image(layer)
                .expect("layer image")
                .read_at(chunk, p.guest)
                .expect("engine piece"),
            ReadSource::File { layer, host } => {
                let f = q.layer_file(layer).expect("layer file");
                let mut done = 0;
                while done < chunk.len() {
                    let n = f
                        .read_at(&mut chunk[done..], host + done as u64)
                        .expect("pread");
                    if n == 0 {
                        chunk[done..].fill(0);
                        break;
                    }
                    done += n;
                }
            }
        }
    }
    assert_eq!(expect_at, off + len as u64, "pieces must cover the range");
    q.io_end(token);
    buf
}

#[test]
fn test_qcow2_read_plan_matches_engine() {
    require_qemu!();
    let dir = TempDir::new("plan");
    let mut images = vec![
        pattern_image(&dir, "plain", "cluster_size=4k"),
        pattern_image(&dir, "v2", "compat=0.10,cluster_size=512"),
        pattern_image(&dir, "ext", "extended_l2=on,cluster_size=64k"),
    ];
    // Compressed clusters.
    let comp_src = dir.path("comp.src.raw");
    write_pattern_raw(&comp_src, 8 * MIB, 5);
    let comp = dir.path("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&comp_src),
        s(&comp),
    ]);
    qemu_io(&comp, &["write -P 0x12 1M 100k"]);
    images.push(comp);
    // Clusters allocated past the end of the file.
    let pre = dir.path("pre.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        s(&pre),
        "8M",
    ]);
    qemu_io(&pre, &["write -P 0x34 3M 5k"]);
    images.push(pre);
    // A chain: raw base (smaller than the overlays) <- qcow2 mid <- qcow2 top.
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 6 * MIB + 1000, 9);
    let mid = dir.path("mid.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&mid),
        "12M",
    ]);
    qemu_io(
        &mid,
        &[
            "write -P 0x56 2M 1M",
            "write -c -P 0x57 4M 64k",
            "write -z 5M 64k",
        ],
    );
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
        "16M",
    ]);
    qemu_io(
        &top,
        &[
            "write -P 0x78 2500k 100k",
            "write -z 4M 8k",
            "discard 7M 1M",
        ],
    );
    images.push(top);

    for img in &images {
        let q = open_image(img, &Qcow2Options::default()).expect("open");
        let size = q.virtual_size();
        let mut rng = Rng(size ^ 77);
        for i in 0..300 {
            let len = if i % 3 == 0 {
                rng.below(2 * MIB) + 1
            } else {
                rng.below(200_000) + 1
            }
            .min(size);
            let off = rng.below(size - len + 1);
            let mut want = vec![0u8; len as usize];
            q.read_at(&mut want, off).expect("engine read");
            assert!(
                read_by_plan(&q, off, len as usize) == want,
                "{}: planned read at {off}+{len} differs",
                img.display()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Discard and write-zeroes: random op streams mirrored onto a raw file, then qemu-img compare
// and check.
// ---------------------------------------------------------------------------------------------

/// What an op stream may contain.
#[derive(Clone, Copy)]
struct OpMix {
    /// Discard reads as zeros for whole clusters (false: v2 with a backing file, no-op).
    discard_zeroes: bool,
}

/// Applies a seeded stream of writes, discards, write-zeroes (with and without NOUNMAP),
/// flushes and checked reads to `img`, mirrored onto `model`.
fn random_mixed_ops(q: &Qcow2Image, model: &mut [u8], seed: u64, ops: usize, mix: OpMix) {
    let size = model.len() as u64;
    let cs = q.cluster_size();
    let mut rng = Rng(seed | 1);
    for op in 0..ops {
        let kind = rng.below(24);
        // Ranges: unaligned, sector aligned, or cluster aligned (several clusters).
        let (off, len) = match rng.below(3) {
            0 => {
                let len = rng.below(3 * cs.min(64 * 1024)) + 1;
                (rng.below(size - len), len)
            }
            1 => {
                let len = (rng.below(64) + 1) * 512;
                let len = len.min(size);
                (rng.below((size - len) / 512 + 1) * 512, len)
            }
            _ => {
                let n = ((rng.below(8) + 1) * cs).min(size / 2);
                (rng.below((size - n) / cs + 1) * cs, n)
            }
        };
        let (o, l) = (off as usize, len as usize);
        match kind {
            0..=3 => {
                let byte = (op as u8).wrapping_mul(29).wrapping_add(3);
                let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8 & 0x1f)).collect();
                q.write_at(&data, off).expect("write");
                model[o..o + l].copy_from_slice(&data);
            }
            4..=7 => {
                q.discard(off, len).expect("discard");
                if mix.discard_zeroes {
                    // Only whole clusters change.
                    let first = off.div_ceil(cs) * cs;
                    let end = if off + len == size {
                        size
                    } else {
                        (off + len) / cs * cs
                    };
                    if end > first {
                        model[first as usize..end as usize].fill(0);
                    }
                }
            }
            8..=11 => {
                q.write_zeroes(off, len, kind % 2 == 1)
                    .expect("write zeroes");
                model[o..o + l].fill(0);
            }
            // Flushes are slow (several syncs): one op in about 70.
            12 if op % 3 == 0 => q.flush().expect("flush"),
            12..=18 => {
                let mut b = vec![0u8; l];
                q.read_at(&mut b, off).expect("read");
                assert!(
                    b == model[o..o + l],
                    "op {op}: read at {off}+{len} differs from the model"
                );
            }
            _ => {
                let byte = (op as u8).wrapping_mul(13).wrapping_add(1);
                q.write_at(&vec![byte; l], off).expect("write");
                model[o..o + l].fill(byte);
            }
        }
    }
}

/// `qemu-img compare` of a raw file and a qcow2 image; panics unless identical.
fn qemu_compare(raw: &Path, img: &Path) {
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(raw), s(img)],
    );
}

/// The `N` of `qemu-img check`'s "N/M = x% allocated" line (qemu leaves the line out when
/// nothing is allocated).
fn allocated_clusters(img: &Path) -> u64 {
    let out = std::process::Command::new("qemu-img")
        .args(["check", s(img)])
        .output()
        .expect("qemu-img check");
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.contains("% allocated")) else {
        return 0;
    };
    line.split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {line}"))
}

#[test]
fn test_qcow2_discard_write_zeroes_random_ops_match_raw() {
    require_qemu!();
    let dir = TempDir::new("discard");
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 16 * MIB, 31);
    let base_q = dir.path("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&base), s(&base_q)]);
    /// (name, create options, backing file and format)
    type Config<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>);
    let configs: &[Config<'_>] = &[
        ("v3-64k", "cluster_size=64k", None),
        (
            "v3-4k-raw-backing",
            "cluster_size=4k",
            Some(("base.raw", "raw")),
        ),
        (
            "v3-512-qcow2-backing",
            "cluster_size=512",
            Some(("base.qcow2", "qcow2")),
        ),
        ("v2-4k", "compat=0.10,cluster_size=4k", None),
        (
            "v2-16k-backing",
            "compat=0.10,cluster_size=16k",
            Some(("base.raw", "raw")),
        ),
        ("v3-2M", "cluster_size=2M", None),
        ("v3-rc1", "cluster_size=4k,refcount_bits=1", None),
        ("v3-ext-64k", "extended_l2=on,cluster_size=64k", None),
        (
            "v3-ext-32k-qcow2-backing",
            "extended_l2=on,cluster_size=32k",
            Some(("base.qcow2", "qcow2")),
        ),
    ];
    for (i, (name, opts, backing)) in configs.iter().enumerate() {
        let img = dir.path(&format!("{name}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2", "-o", opts];
        if let Some((b, f)) = backing {
            args.extend(["-b", b, "-F", f]);
        }
        args.push(s(&img));
        args.push("16M");
        qemu_img(&args);
        if i % 2 == 1 {
            qemu_io(&img, MIXED_WRITES);
        }
        let mut model = qemu_raw(&img);
        let v2 = opts.contains("compat=0.10");
        let mix = OpMix {
            discard_zeroes: !(v2 && backing.is_some()),
        };
        {
            let q = open_image(&img, &rw()).expect("open rw");
            let ops = if q.cluster_size() >= MIB { 150 } else { 500 };
            random_mixed_ops(&q, &mut model, 7000 + i as u64, ops, mix);
            q.flush().expect("flush");
            assert_model(&q, &model, name);
        }
        let raw = dir.path(&format!("{name}.model.raw"));
        std::fs::write(&raw, &model).expect("write model");
        assert_eq!(qemu_check(&img), 0, "{name}: qemu-img check");
        qemu_compare(&raw, &img);

        // Discarding everything releases the clusters (unless discard is a no-op here), and
        // rewriting reuses them instead of growing the file.
        let before = allocated_clusters(&img);
        let file_size = std::fs::metadata(&img).expect("stat").len();
        // The default cache: with the tiny test cache, touching every 512-byte cluster of
        // 16 MiB flushes (and syncs) hundreds of times.
        let big_cache = Qcow2Options {
            writable: true,
            ..Default::default()
        };
        {
            let q = open_image(&img, &big_cache).expect("open rw");
            q.discard(0, q.virtual_size()).expect("discard all");
        }
        assert_eq!(qemu_check(&img), 0, "{name}: check after discard");
        let after = allocated_clusters(&img);
        if mix.discard_zeroes {
            assert_eq!(
                after, 0,
                "{name}: {before} clusters before, {after} after discard"
            );
            std::fs::write(&raw, vec![0u8; model.len()]).expect("write zeros");
            qemu_compare(&raw, &img);
            {
                let q = open_image(&img, &big_cache).expect("open rw");
                q.write_at(&vec![0x5a; 4 * MIB as usize], 0)
                    .expect("rewrite");
            }
            let grown = std::fs::metadata(&img).expect("stat").len();
            assert!(
                grown <= file_size.max(5 * MIB) + 4 * q_cluster(&img),
                "{name}: file grew from {file_size} to {grown}: freed clusters not reused"
            );
            assert_eq!(qemu_check(&img), 0, "{name}: check after rewrite");
        } else {
            assert_eq!(after, before, "{name}: discard should be a no-op");
        }
    }
}

fn q_cluster(img: &Path) -> u64 {
    open_image(img, &Qcow2Options::default())
        .expect("open")
        .cluster_size()
}

#[test]
fn test_qcow2_write_zeroes_keeps_or_releases_allocation() {
    require_qemu!();
    let dir = TempDir::new("wz");
    let img = dir.path("wz.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x77 0 4M"]);
    {
        let q = open_image(&img, &rw()).expect("open rw");
        q.write_zeroes(0, 2 * MIB, true).expect("zero, keep");
        q.write_zeroes(2 * MIB, MIB, false).expect("zero, unmap");
        // Partial clusters are written as zeros.
        q.write_zeroes(3 * MIB + 1000, 3000, false)
            .expect("partial");
        // A later partial write into a kept (ZERO_ALLOC) cluster zeroes the rest of it.
        q.write_at(&[0x99; 100], 65536 + 500)
            .expect("write into zero cluster");
    }
    assert_eq!(qemu_check(&img), 0);
    // 2 MiB kept + 1 MiB untouched (the partial cluster stays allocated).
    assert_eq!(allocated_clusters(&img), 48);
    let data = qemu_raw(&img);
    let mut want = vec![0u8; 4 * MIB as usize];
    want[3 * MIB as usize..].fill(0x77);
    want[3 * MIB as usize + 1000..3 * MIB as usize + 4000].fill(0);
    want[65536 + 500..65536 + 600].fill(0x99);
    assert!(data == want, "content after write-zeroes");
}

#[test]
fn test_qcow2_freed_clusters_wait_for_inflight_io() {
    require_qemu!();
    use std::os::unix::fs::FileExt;
    use ublk_targets::qcow2::ReadSource;
    let dir = TempDir::new("quiesce");
    let img = dir.path("q.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x42 0 64k"]);
    let q = open_image(&img, &rw()).expect("open rw");
    // An "in-flight read" looks up cluster 0 and holds its registration.
    let token = q.io_begin();
    let mut pieces = Vec::new();
    q.plan_read(0, 4096, &mut pieces).expect("plan");
    let host = match pieces[..] {
        [p] => match p.src {
            ReadSource::File { layer: 0, host } => host,
            other => panic!("unexpected source {other:?}"),
        },
        _ => panic!("unexpected plan {pieces:?}"),
    };
    // Meanwhile cluster 0 is discarded and flushed, and new data is allocated.
    q.discard(0, 64 * 1024).expect("discard");
    q.flush().expect("flush");
    q.write_at(&vec![0x43; 256 * 1024], MIB).expect("allocate");
    q.flush().expect("flush");
    let mut b = vec![0u8; 4096];
    q.layer_file(0)
        .expect("file")
        .read_exact_at(&mut b, host)
        .expect("pread");
    assert!(
        b.iter().all(|&x| x == 0x42),
        "a cluster freed under an in-flight read was reused"
    );
    q.io_end(token);
    // Once the read ended the clusters are freed and reused.
    q.flush().expect("flush");
    // (In the same L2 table as before: a new table would take the first freed cluster.)
    q.write_at(&vec![0x44; 64 * 1024], MIB + 512 * 1024)
        .expect("allocate");
    q.flush().expect("flush");
    q.layer_file(0)
        .expect("file")
        .read_exact_at(&mut b, host)
        .expect("pread");
    assert!(b.iter().all(|&x| x == 0x44), "freed clusters not reused");
    drop(q);
    assert_eq!(qemu_check(&img), 0);
}

// ---------------------------------------------------------------------------------------------
// Dirty images: qemu-io writes to a lazy-refcounts image and is killed, leaving the dirty bit
// and refcounts that lag behind the L2 tables. A writable open must rebuild the refcounts.
// ---------------------------------------------------------------------------------------------

/// Runs qemu-io commands ending in `sigraise 9` on a qcow2 image (the process dies).
fn qemu_io_killed(img: &Path, cmds: &[&str]) {
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    for c in cmds.iter().chain(&["sigraise 9"]) {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    let out = std::process::Command::new("qemu-io")
        .args(&args)
        .output()
        .expect("spawn qemu-io");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "qemu-io {args:?} was not killed"
    );
}

/// Makes `img` dirty: writes through qemu-io with lazy refcounts and kills it. Applies the
/// writes to `model` too.
fn make_dirty(img: &Path, model: &mut [u8], writes: &[(u64, u64, u8)]) {
    let cmds: Vec<String> = writes
        .iter()
        .map(|(off, len, b)| format!("write -P {b:#x} {off} {len}"))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io_killed(img, &refs);
    for &(off, len, b) in writes {
        model[off as usize..(off + len) as usize].fill(b);
    }
    assert_eq!(be64_at(img, 72) & 1, 1, "{}: dirty bit set", img.display());
}

#[test]
fn test_qcow2_dirty_image_is_repaired_on_writable_open() {
    require_qemu!();
    let dir = TempDir::new("dirty");
    for opts in [
        "cluster_size=64k",
        "cluster_size=4k,refcount_bits=1",
        "cluster_size=512,refcount_bits=64",
        "cluster_size=64k,extended_l2=off,compression_type=zstd",
    ] {
        let img = dir.path(&format!("{}.qcow2", opts.replace([',', '='], "_")));
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &format!("lazy_refcounts=on,{opts}"),
            s(&img),
            "16M",
        ]);
        qemu_io(&img, &["write -c -P 0x44 12M 64k", "write -P 0x55 13M 64k"]);
        let mut model = qemu_raw(&img);
        make_dirty(
            &img,
            &mut model,
            &[
                (0, MIB, 0x11),
                (5 * MIB, 300 * 1024, 0x22),
                (9 * MIB + 512, 70_000, 0x33),
                (13 * MIB + 4096, 4096, 0x66), // in place
                (12 * MIB, 1024, 0x77),        // over the compressed cluster
            ],
        );
        assert_ne!(qemu_check(&img), 0, "{opts}: qemu sees the damage");

        // Read-only: reads the data, writes nothing.
        let before = std::fs::read(&img).expect("read image");
        {
            let q = open_image(&img, &Qcow2Options::default()).expect("open ro");
            assert_model(&q, &model, "dirty, read-only");
        }
        assert!(
            std::fs::read(&img).expect("read image") == before,
            "{opts}: ro open wrote"
        );

        // Writable: repaired first, then written.
        {
            let q = open_image(&img, &rw()).expect("open rw repairs");
            assert_eq!(
                be64_at(&img, 72) & 1,
                0,
                "{opts}: dirty bit cleared on open"
            );
            assert_model(&q, &model, "repaired");
            let mut rng = Rng(7);
            for _ in 0..60 {
                let len = rng.below(100_000) + 1;
                let off = rng.below(16 * MIB - len);
                let b = rng.next() as u8;
                q.write_at(&vec![b; len as usize], off).expect("write");
                model[off as usize..(off + len) as usize].fill(b);
            }
            q.discard(2 * MIB, 2 * MIB).expect("discard");
            model[2 * MIB as usize..4 * MIB as usize].fill(0);
            q.flush().expect("flush");
            assert_model(&q, &model, "after writes");
        }
        assert_eq!(qemu_check(&img), 0, "{opts}: clean after repair and writes");
        assert!(qemu_raw(&img) == model, "{opts}: content");
    }
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn test_qcow2_freed_clusters_are_punched() {
    require_qemu!();
    let dir = TempDir::new("punch");
    for opts in ["cluster_size=64k", "cluster_size=4k,compat=0.10"] {
        let img = dir.path("p.qcow2");
        let _ = std::fs::remove_file(&img);
        qemu_img(&["create", "-f", "qcow2", "-o", opts, s(&img), "32M"]);
        // Compressed clusters share host clusters: discarding one must not punch the others.
        qemu_io(
            &img,
            &[
                "write -c -P 0x31 24M 64k",
                "write -c -P 0x32 25M 64k",
                "write -c -P 0x33 26M 64k",
            ],
        );
        let mut model = qemu_raw(&img);
        let q = open_image(&img, &rw()).expect("open rw");
        let mut rng = Rng(99);
        let data: Vec<u8> = (0..16 * MIB).map(|_| rng.next() as u8).collect();
        q.write_at(&data, 0).expect("write");
        model[..16 * MIB as usize].copy_from_slice(&data);
        q.flush().expect("flush");
        let full = allocated_bytes(&img);
        q.discard(2 * MIB, 12 * MIB).expect("discard");
        q.discard(25 * MIB, 64 * 1024).expect("discard compressed");
        model[2 * MIB as usize..14 * MIB as usize].fill(0);
        model[25 * MIB as usize..(25 * MIB + 64 * 1024) as usize].fill(0);
        q.flush().expect("flush");
        let after = allocated_bytes(&img);
        assert!(
            after + 11 * MIB < full,
            "{opts}: discarding 12 MiB left {after} of {full} bytes allocated"
        );
        assert_model(&q, &model, "after discard");
        // Punched clusters are reused by new allocations and hold what is written there.
        q.write_at(&data[..8 * MIB as usize], 16 * MIB)
            .expect("reuse");
        model[16 * MIB as usize..24 * MIB as usize].copy_from_slice(&data[..8 * MIB as usize]);
        q.flush().expect("flush");
        assert_model(&q, &model, "after reuse");
        assert!(q.punched_clusters() > 0);
        drop(q);
        assert_eq!(qemu_check(&img), 0, "{opts}");
        assert!(qemu_raw(&img) == model, "{opts}: content");
    }
}

// ---------------------------------------------------------------------------------------------
// Creating images.
// ---------------------------------------------------------------------------------------------

fn qemu_info(img: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", s(img)])
        .output()
        .expect("qemu-img info");
    assert!(out.status.success(), "qemu-img info {}", img.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn test_qcow2_create_makes_images_qemu_accepts() {
    require_qemu!();
    use ublk_targets::qcow2::CreateOptions;
    let dir = TempDir::new("create");
    for (size, cs) in [
        (10u64 << 30, 64 * 1024u64),
        (16 * MIB, 512),
        (3 * MIB + 512, 4096),
        (1 << 40, 2 * MIB),
        (64 << 30, 512), // L1 of 32 MiB: several refcount blocks for the tables alone
    ] {
        let img = dir.path(&format!("c-{size}-{cs}.qcow2"));
        let opts = CreateOptions {
            cluster_size: cs,
            ..Default::default()
        };
        Qcow2Image::create(&img, size, &opts).expect("create");
        assert_eq!(qemu_check(&img), 0, "{size} {cs}");
        let info = qemu_info(&img);
        assert!(
            info.contains(&format!("\"virtual-size\": {size},")),
            "{size} {cs}: {info}"
        );
        assert!(
            info.contains(&format!("\"cluster-size\": {cs},")),
            "{size} {cs}: {info}"
        );
        assert!(info.contains("\"compat\": \"1.1\""), "{info}");
        // Data written through the engine reads back, in the engine and in qemu.
        let q = open_image(&img, &rw()).expect("open rw");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let off = size / 2 - 1000;
        q.write_at(&data, off).expect("write");
        q.write_at(&data[..512], size - 512)
            .expect("write at the end");
        drop(q);
        assert_eq!(qemu_check(&img), 0, "{size} {cs} after writes");
        if size <= 16 * MIB {
            let raw = qemu_raw(&img);
            assert!(raw[off as usize..off as usize + data.len()] == data[..]);
        }
        let q = open_image(&img, &Qcow2Options::default()).expect("open ro");
        let mut b = vec![0u8; data.len()];
        q.read_at(&mut b, off).expect("read");
        assert!(b == data, "{size} {cs}: read back");
        std::fs::remove_file(&img).ok();
    }

    // With a backing file (relative to the image's directory), probed as qcow2 or raw.
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 4 * MIB, 5);
    let base_q = dir.path("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&base), s(&base_q)]);
    for (name, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let img = dir.path(&format!("over-{fmt}.qcow2"));
        let opts = CreateOptions {
            backing: Some(name.into()),
            ..Default::default()
        };
        Qcow2Image::create(&img, 4 * MIB, &opts).expect("create with backing");
        let info = qemu_info(&img);
        assert!(
            info.contains(&format!("\"backing-filename-format\": \"{fmt}\"")),
            "{info}"
        );
        assert_eq!(qemu_check(&img), 0);
        let q = open_image(&img, &rw()).expect("open rw");
        q.write_at(&[0xee; 1000], 70_000).expect("write");
        drop(q);
        let mut want = std::fs::read(&base).expect("base");
        want[70_000..71_000].fill(0xee);
        assert!(qemu_raw(&img) == want, "{fmt}: overlay content");
        assert_eq!(qemu_check(&img), 0);
    }
}

#[test]
fn test_qcow2_create_refuses_bad_requests_and_leaves_nothing() {
    use ublk_targets::qcow2::CreateOptions;
    let dir = TempDir::new("create-bad");
    let existing = dir.path("exists.qcow2");
    std::fs::write(&existing, b"precious").expect("write");
    match Qcow2Image::create(&existing, MIB, &CreateOptions::default()) {
        Err(Qcow2Error::AlreadyExists { path }) => assert_eq!(path, existing),
        other => panic!("overwrote? {other:?}"),
    }
    assert_eq!(std::fs::read(&existing).expect("read"), b"precious");
    let img = dir.path("new.qcow2");
    for (size, cs, backing) in [
        (0, 65536, None),
        (1000, 65536, None),
        (MIB, 3000, None),
        (MIB, 256, None),
        (MIB, 4 * MIB, None),
        (1 << 50, 512, None), // L1 too large
        (MIB, 65536, Some("missing.raw")),
        (MIB, 512, Some("x".repeat(1000).leak() as &str)),
    ] {
        let opts = CreateOptions {
            cluster_size: cs,
            backing: backing.map(Into::into),
        };
        let r = Qcow2Image::create(&img, size, &opts);
        assert!(
            matches!(
                r,
                Err(Qcow2Error::InvalidCreate(_) | Qcow2Error::BackingOpen { .. })
            ),
            "{size} {cs} {backing:?}: {r:?}"
        );
        assert!(!img.exists(), "{size} {cs} {backing:?}: file left behind");
    }
}

// ---------------------------------------------------------------------------------------------
// Extended L2 entries: writes allocate and copy on write per subcluster.
// ---------------------------------------------------------------------------------------------

#[test]
fn test_qcow2_extended_l2_writes_match_qemu() {
    require_qemu!();
    let dir = TempDir::new("extl2");
    let base = dir.path("base.raw");
    write_pattern_raw(&base, 16 * MIB, 77);
    let base_bytes = std::fs::read(&base).expect("read base");

    // The subcluster bits of a small write, as qemu maps them: 64 KiB clusters, 2 KiB
    // subclusters; 4 KiB at 2 KiB allocates subclusters 1 and 2 only.
    let img = dir.path("bits.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        s(&img),
        "1M",
    ]);
    {
        let q = open_image(&img, &rw()).expect("open rw");
        q.write_at(&[0x5a; 4096], 2048).expect("write");
    }
    let out = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", s(&img)])
        .output()
        .expect("qemu-img map");
    let map = String::from_utf8_lossy(&out.stdout);
    assert!(
        map.contains(r#""start": 2048, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true"#),
        "{map}"
    );
    assert!(
        map.contains(r#""start": 0, "length": 2048, "depth": 0, "present": false"#),
        "{map}"
    );
    assert_eq!(qemu_check(&img), 0);

    for (name, opts, backing) in [
        ("ext-64k", "extended_l2=on,cluster_size=64k", None),
        (
            "ext-16k-raw",
            "extended_l2=on,cluster_size=16k",
            Some("raw"),
        ),
        (
            "ext-128k-qcow2",
            "extended_l2=on,cluster_size=128k",
            Some("qcow2"),
        ),
        ("ext-2M-raw", "extended_l2=on,cluster_size=2M", Some("raw")),
    ] {
        let img = dir.path(&format!("{name}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2", "-o", opts];
        let base_q = dir.path("base.qcow2");
        if backing == Some("qcow2") && !base_q.exists() {
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on",
                s(&base),
                s(&base_q),
            ]);
        }
        match backing {
            Some("raw") => args.extend(["-b", "base.raw", "-F", "raw"]),
            Some(_) => args.extend(["-b", "base.qcow2", "-F", "qcow2"]),
            None => {}
        }
        args.extend([s(&img), "16M"]);
        qemu_img(&args);
        // qemu's own subcluster states to start from: data, zero subclusters, compressed.
        qemu_io(
            &img,
            &[
                "write -P 0x61 100k 5k",
                "write -z 1M 8k",
                "write -z -u 2M 256k",
                "write -c -P 0x62 4M 2M",
            ],
        );
        let mut model = qemu_raw(&img);
        if backing.is_some() {
            assert!(model[8 * MIB as usize..] == base_bytes[8 * MIB as usize..]);
        }
        {
            let q = open_image(&img, &rw()).expect("open rw");
            let mut rng = Rng(0xe1 + name.len() as u64);
            for op in 0..300 {
                let kind = rng.below(10);
                match kind {
                    0..=5 => {
                        let len = match rng.below(3) {
                            0 => rng.below(3000) + 1,
                            1 => (rng.below(8) + 1) * 512,
                            _ => rng.below(200_000) + 1,
                        };
                        let off = rng.below(16 * MIB - len);
                        let b = (op as u8).wrapping_mul(13) | 1;
                        let data: Vec<u8> = (0..len).map(|i| b ^ (i as u8 & 7)).collect();
                        q.write_at(&data, off).expect("write");
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    6 => {
                        let len = rng.below(600_000) + 1;
                        let off = rng.below(16 * MIB - len);
                        let keep = rng.below(2) == 0;
                        q.write_zeroes(off, len, keep).expect("write zeroes");
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    7 => {
                        // Discard: whole clusters read as zeros, the rest is unchanged.
                        let len = rng.below(600_000) + 1;
                        let off = rng.below(16 * MIB - len);
                        q.discard(off, len).expect("discard");
                        let cs = q.cluster_size();
                        let first = off.div_ceil(cs) * cs;
                        let last = (off + len) / cs * cs;
                        if last > first {
                            model[first as usize..last as usize].fill(0);
                        }
                    }
                    8 => q.flush().expect("flush"),
                    _ => {
                        let len = rng.below(300_000) + 1;
                        let off = rng.below(16 * MIB - len);
                        let mut b = vec![0u8; len as usize];
                        q.read_at(&mut b, off).expect("read");
                        assert!(
                            b == model[off as usize..(off + len) as usize],
                            "{name}: op {op}: read at {off}+{len} differs"
                        );
                    }
                }
            }
            q.flush().expect("flush");
            assert_model(&q, &model, name);
        }
        assert_eq!(qemu_check(&img), 0, "{name}");
        assert!(qemu_raw(&img) == model, "{name}: qemu sees other content");
    }
}

/// qemu's image locking: an image open for writing cannot be opened again, for writing or
/// reading, by us or by qemu-img / qemu-nbd; read-only opens and backing files share; every
/// lock goes with its handle. And an image qemu-nbd serves cannot be opened by us.
#[test]
fn test_qcow2_image_locking_matches_qemu() {
    require_qemu!();
    let dir = TempDir::new("lock");
    let base = dir.path("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    let top = dir.path("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        s(&base),
        s(&top),
    ]);
    let w = Qcow2Image::open(&top, &rw()).expect("open rw");
    let locked = |r: Result<Qcow2Image, Qcow2Error>, what: &str| match r {
        Err(e @ Qcow2Error::Locked { .. }) => e.to_string(),
        other => panic!("{what}: {:?}", other.map(|_| ())),
    };
    let msg = locked(Qcow2Image::open(&top, &rw()), "second writer");
    assert!(msg.contains("top.qcow2") && msg.contains("in use"), "{msg}");
    locked(
        Qcow2Image::open(&top, &Qcow2Options::default()),
        "reader of a written image",
    );
    // qemu-img refuses an image we write (without -U) ...
    let out = std::process::Command::new("qemu-img")
        .args(["info", s(&top)])
        .output()
        .expect("qemu-img info");
    assert!(
        !out.status.success(),
        "qemu-img info opened an image in use"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and cannot write our backing file, which others may read.
    let out = std::process::Command::new("qemu-img")
        .args(["resize", s(&base), "8M"])
        .output()
        .expect("qemu-img resize");
    assert!(
        !out.status.success(),
        "qemu-img resized a backing file in use"
    );
    let r = Qcow2Image::open(&base, &Qcow2Options::default()).expect("second reader of a base");
    drop((w, r));
    // Released with the handles.
    Qcow2Image::open(&top, &rw()).expect("open rw after close");
    // An image qemu-nbd serves (it locks like qemu) cannot be opened by us.
    let sock = dir.path("nbd.sock");
    let mut srv = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k", s(&sock), s(&top)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu-nbd");
    // Some qemu-nbd versions (7.2) create the socket before they open and lock the image:
    // retry while our open succeeds, for as long as qemu-nbd may take to start.
    let t = std::time::Instant::now();
    let r = loop {
        let r = Qcow2Image::open(&top, &rw());
        if r.is_err() || t.elapsed() > std::time::Duration::from_secs(10) {
            break r;
        }
        drop(r);
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = srv.kill();
    let _ = srv.wait();
    assert!(sock.exists(), "qemu-nbd did not start");
    locked(r, "an image qemu-nbd serves");
}

/// The default L2 cache holds all of a large image's L2 tables (qemu's default bound, 32 MiB):
/// random reads over a 16 GiB image whose 2 MiB of L2 tables all exist load each 4 KiB slice
/// at most once. (The earlier 1 MiB default held half of them: every second lookup missed.)
#[test]
fn test_qcow2_default_l2_cache_covers_a_large_image() {
    require_qemu!();
    let dir = TempDir::new("bigcache");
    let img = dir.path("big.qcow2");
    // Every L2 table written, the data clusters allocated in the (sparse) file.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        s(&img),
        "16G",
    ]);
    let q = open_image(&img, &Qcow2Options::default()).expect("open");
    let slices = (16u64 << 30) / (64 << 10) * 8 / 4096;
    let mut rng = Rng(7);
    let mut b = vec![0u8; 4096];
    let mut read_pass = || {
        for _ in 0..3000 {
            let at = rng.below((16u64 << 30) / 4096) * 4096;
            q.read_at(&mut b, at).expect("read");
            assert!(b.iter().all(|&x| x == 0));
        }
    };
    read_pass();
    let first = q.l2_cache_stats();
    assert!(first.misses <= slices, "{first:?}");
    assert!(
        first.misses > slices / 2,
        "3000 reads touch most of the {slices} slices: {first:?}"
    );
    read_pass();
    let second = q.l2_cache_stats();
    // Only slices the first pass did not touch can miss now.
    assert!(
        second.misses <= slices,
        "slices were evicted and read again: {second:?}"
    );
    assert!(second.len as u64 <= slices);
}
