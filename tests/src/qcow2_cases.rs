//! Kernel-facing tests of the qcow2 target.

use crate::cases::{batch_supported, test};
use crate::util::*;
use crate::{Outcome, Test};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The qcow2 tests, in run order.
pub fn all() -> Vec<Test> {
    vec![
        test("kernel_qcow2_verify_q1", 240, || {
            qcow2_verify(&workdir()?, 1, &[])
        }),
        test("kernel_qcow2_verify_q2", 240, || {
            qcow2_verify(&workdir()?, 2, &[])
        }),
        test("kernel_qcow2_verify_batch_q2", 240, || {
            if !batch_supported()? {
                return Ok(Outcome::Skip("batch io commands need Linux 7.0".into()));
            }
            qcow2_verify(&workdir()?, 2, &["-b"])
        }),
        // tmpfs image files are served inline; on ext4 the data goes through io_uring.
        test("kernel_qcow2_verify_ext4_q2", 240, || {
            let scratch = Ext4Scratch::new("qcow2-ext4", 400)?;
            qcow2_verify(&scratch.dir, 2, &[])
        }),
        test(
            "kernel_qcow2_ext4_backing_chain",
            240,
            qcow2_ext4_backing_chain,
        ),
        test(
            "kernel_qcow2_mapped_preallocated",
            240,
            qcow2_mapped_preallocated,
        ),
        test("kernel_qcow2_discard", 240, qcow2_discard),
        test("kernel_qcow2_small_l2_cache_q2", 240, qcow2_small_l2_cache),
        test(
            "kernel_qcow2_write_zeroes_over_backing",
            240,
            qcow2_write_zeroes_over_backing,
        ),
        test("kernel_qcow2_create", 300, qcow2_create),
        test("kernel_qcow2_snapshot_dirty", 300, qcow2_snapshot_dirty),
    ]
}

fn qemu_img(args: &[&str]) -> Result<Run> {
    check_cmd(
        Command::new(opt_bin("qemu-img")).args(args),
        Duration::from_secs(120),
    )
}

/// `qemu-img check` must find no corruption and no leak.
pub(crate) fn qemu_img_check(img: &Path) -> Result<()> {
    let r = run_timeout(
        Command::new(opt_bin("qemu-img")).arg("check").arg(img),
        Duration::from_secs(120),
    )?;
    ensure!(
        r.ok(),
        "qemu-img check {} failed ({}): {} {}",
        img.display(),
        r.status,
        r.stdout.trim(),
        r.stderr.trim()
    );
    Ok(())
}

/// fio verify through a qcow2 device; afterwards qemu-img check is clean.
fn qcow2_verify(dir: &Path, queues: u32, extra: &[&str]) -> Result<Outcome> {
    let img = dir.join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &img.to_string_lossy(),
        "256M",
    ])?;
    let q = queues.to_string();
    let f = img.to_string_lossy().into_owned();
    let mut args = vec!["-t", "qcow2", "-f", &f, "-q", &q];
    args.extend_from_slice(extra);
    let d = ublk_add(&args)?;
    ensure!(d.queues == queues, "device has {} queues", d.queues);
    // On tmpfs the image is mapped and user copy is the default; elsewhere copy mode.
    let tmpfs = sh("stat", &["-f", "-c", "%T", &dir.to_string_lossy()])?.trim() == "tmpfs";
    let listed = ublk_ok(&["list", "-n", &d.id.to_string()])?.stdout;
    ensure!(
        listed.contains(&format!("\"mapped\":{}", u8::from(tmpfs)))
            && (d.flags & (1 << 7) != 0) == tmpfs,
        "on tmpfs: {tmpfs}, flags {:#x}, listed {listed}",
        d.flags
    );
    fio_verify(&d.bdev(), 32, ("32M", "64M"), Duration::from_secs(180))?;
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    Ok(Outcome::Pass)
}

/// `--l2-cache-size 16K --refcount-cache-size 4K` on an image with 4 KiB clusters: the caches
/// hold 4 L2 slices of 2 MiB of guest space and 4 refcount blocks of 8 MiB of file each, so fio
/// over 32-64 MiB from two queues evicts (and writes back dirty entries) all the time; the
/// data verifies and `qemu-img check` is clean.
fn qcow2_small_l2_cache() -> Result<Outcome> {
    let img = workdir()?.join("small-cache.qcow2");
    let f = img.to_string_lossy().into_owned();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        &f,
        "128M",
    ])?;
    let d = ublk_add(&[
        "-t",
        "qcow2",
        "-f",
        &f,
        "-q",
        "2",
        "--l2-cache-size",
        "16K",
        "--refcount-cache-size",
        "4K",
    ])?;
    let listed = ublk_ok(&["list", "-n", &d.id.to_string()])?.stdout;
    ensure!(
        listed.contains("\"l2_cache_bytes\":16384")
            && listed.contains("\"refcount_cache_bytes\":4096"),
        "the cache size is not the one asked for: {listed}"
    );
    fio_verify(&d.bdev(), 32, ("32M", "64M"), Duration::from_secs(180))?;
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    Ok(Outcome::Pass)
}

/// An image on tmpfs with every cluster allocated but not written
/// (`preallocation=metadata`): reading it whole returns zeros and allocates nothing (reads
/// through the mapping only where the file holds data), writes in place through the mapping
/// verify, and `qemu-img check` is clean.
fn qcow2_mapped_preallocated() -> Result<Outcome> {
    let img = workdir()?.join("prealloc.qcow2");
    let f = img.to_string_lossy().into_owned();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        &f,
        "64M",
    ])?;
    let used = allocated_bytes(&img)?;
    let d = ublk_add(&["-t", "qcow2", "-f", &f, "-q", "2"])?;
    let data = read_dev(&d.bdev(), 0, 64)?;
    ensure!(
        data.len() as u64 == 64 * MIB && data.iter().all(|&b| b == 0),
        "the preallocated image does not read as 64 MiB of zeros"
    );
    let after = allocated_bytes(&img)?;
    ensure!(
        after == used,
        "reading the image allocated {} bytes of it",
        after - used
    );
    fio_verify(&d.bdev(), 32, ("16M", "32M"), Duration::from_secs(180))?;
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    Ok(Outcome::Pass)
}

/// ext4 on a qcow2 overlay over a qcow2 base with data: files written through ublk survive
/// del + re-add, the base is untouched, and both images check clean.
fn qcow2_ext4_backing_chain() -> Result<Outcome> {
    let wd = workdir()?;
    let base = wd.join("base.qcow2");
    let top = wd.join("top.qcow2");
    let (bs, ts) = (
        base.to_string_lossy().into_owned(),
        top.to_string_lossy().into_owned(),
    );
    qemu_img(&["create", "-q", "-f", "qcow2", &bs, "256M"])?;
    // The base holds a file system with one file.
    let d = ublk_add(&["-t", "qcow2", "-f", &bs])?;
    sh(&opt_bin("mkfs.ext4"), &["-F", "-q", &d.bdev()])?;
    let mnt = format!("{MNT_BASE}/qcow2");
    fs::create_dir_all(&mnt)?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    write_pattern(format!("{mnt}/base-file"), 3 * MIB + 7, 77)?;
    let base_sum = sha256(format!("{mnt}/base-file"))?;
    sh("umount", &[&mnt])?;
    ublk_del(d.id)?;
    qemu_img_check(&base)?;
    let base_hash = sha256(&base)?;

    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &bs, "-F", "qcow2", &ts])?;
    let d = ublk_add(&["-t", "qcow2", "-f", &ts, "-q", "2"])?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    ensure!(
        sha256(format!("{mnt}/base-file"))? == base_sum,
        "base file differs through the overlay"
    );
    let mut sums = Vec::new();
    for (i, size) in [1u64, 4096, 65537, 5 * MIB].iter().enumerate() {
        let p = format!("{mnt}/top{i}");
        write_pattern(&p, *size, 500 + i as u64)?;
        sums.push((p.clone(), sha256(&p)?));
    }
    sh("umount", &[&mnt])?;
    ublk_del(d.id)?;
    ensure!(
        sha256(&base)? == base_hash,
        "the backing image was modified"
    );
    qemu_img_check(&top)?;

    let d = ublk_add(&["-t", "qcow2", "-f", &ts])?;
    sh("mount", &["-t", "ext4", &d.bdev(), &mnt])?;
    for (p, want) in &sums {
        ensure!(&sha256(p)? == want, "{p} differs after re-add");
    }
    sh("umount", &[&mnt])?;
    e2fsck_clean(&d.bdev())?;
    ublk_del(d.id)?;
    qemu_img_check(&top)?;
    Ok(Outcome::Pass)
}

/// The `N` of `qemu-img check`'s "N/M = x% allocated" line (qemu leaves the line out when no
/// cluster is allocated).
fn allocated_clusters(img: &Path) -> Result<u64> {
    let r = qemu_img(&["check", &img.to_string_lossy()])?;
    let Some(line) = r.stdout.lines().find(|l| l.contains("% allocated")) else {
        return Ok(0);
    };
    line.split('/')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("cannot parse {line:?}"))
}

/// Bytes the file system allocated for a file (`st_blocks`).
fn allocated_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .blocks()
        * 512)
}

/// Reads `len` bytes of a block device from offset 0 through the page cache, after dropping
/// it (so the device serves them now).
fn read_buffered(bdev: &str, len: u64) -> Result<Vec<u8>> {
    fs::write("/proc/sys/vm/drop_caches", "1").context("drop caches")?;
    let mut f = fs::File::open(bdev).with_context(|| format!("open {bdev}"))?;
    let mut out = vec![0u8; len as usize];
    f.read_exact(&mut out)
        .with_context(|| format!("read {bdev}"))?;
    Ok(out)
}

/// Writes `data` to a block device at `off` and syncs it.
fn write_dev(bdev: &str, off: u64, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(bdev)
        .with_context(|| format!("open {bdev}"))?;
    f.seek(SeekFrom::Start(off))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

fn blkdiscard(bdev: &str, zero: bool, off: u64, len: u64) -> Result<()> {
    let (o, l) = (off.to_string(), len.to_string());
    let mut args = vec!["-o", &o, "-l", &l, bdev];
    if zero {
        args.insert(0, "-z");
    }
    check_cmd(
        Command::new(opt_bin("blkdiscard")).args(&args),
        Duration::from_secs(60),
    )?;
    Ok(())
}

/// Where `got` first differs from `want` (None if equal).
fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// blkdiscard on a qcow2 device: whole 64 KiB clusters are released (read as zeros, the
/// allocated cluster count drops), partial clusters keep their data, qemu-img check is clean.
fn qcow2_discard() -> Result<Outcome> {
    let wd = workdir()?;
    let img = wd.join("discard.qcow2");
    let f = img.to_string_lossy().into_owned();
    qemu_img(&["create", "-q", "-f", "qcow2", &f, "128M"])?;
    let pattern = wd.join("pattern");
    write_pattern(&pattern, 64 * MIB, 0xd1)?;
    let data = fs::read(&pattern)?;

    let d = ublk_add(&["-t", "qcow2", "-f", &f, "-q", "2"])?;
    let q = format!("/sys/block/ublkb{}/queue", d.id);
    let gran = read_trim(format!("{q}/discard_granularity"))?;
    ensure!(
        gran == "65536",
        "discard_granularity {gran}, want the cluster size"
    );
    ensure!(
        read_trim(format!("{q}/write_zeroes_max_bytes"))? != "0",
        "device does not advertise write-zeroes"
    );
    write_dev(&d.bdev(), 0, &data)?;
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    let before = allocated_clusters(&img)?;
    let bytes_before = allocated_bytes(&img)?;
    ensure!(
        before >= 1024,
        "only {before} clusters allocated after 64 MiB"
    );

    let d = ublk_add(&["-t", "qcow2", "-f", &f])?;
    // 48 MiB aligned, then 1 MiB starting 512 bytes into a cluster.
    blkdiscard(&d.bdev(), false, 0, 48 * MIB)?;
    blkdiscard(&d.bdev(), false, 48 * MIB + 512, MIB)?;
    let mut want = data.clone();
    want[..(48 * MIB) as usize].fill(0);
    want[(48 * MIB + 65536) as usize..(49 * MIB) as usize].fill(0);
    let got = read_buffered(&d.bdev(), 64 * MIB)?;
    if let Some(at) = first_diff(&got, &want) {
        bail!(
            "after discard: byte {at} is {:#x}, want {:#x}",
            got[at],
            want[at]
        );
    }
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    // Freed clusters were punched out of the image file.
    let bytes_after = allocated_bytes(&img)?;
    println!("image file: {bytes_before} bytes allocated before, {bytes_after} after");
    ensure!(
        bytes_after + 40 * MIB <= bytes_before,
        "the image file only shrank from {bytes_before} to {bytes_after} allocated bytes"
    );
    let after = allocated_clusters(&img)?;
    println!("allocated clusters: {before} before, {after} after discarding 48.9 MiB");
    ensure!(
        after + 768 + 15 <= before,
        "allocated clusters only dropped from {before} to {after}"
    );
    // qemu sees the same content.
    let raw = wd.join("discard.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &f,
        &raw.to_string_lossy(),
    ])?;
    let conv = fs::read(&raw)?;
    if let Some(at) = first_diff(&conv[..want.len()], &want) {
        bail!("qemu-img convert differs at byte {at}");
    }
    Ok(Outcome::Pass)
}

/// Write-zeroes (`blkdiscard -z`, NOUNMAP) and discard on an overlay whose backing file holds
/// data: the ranges read as zeros (the backing file never shows through), partial clusters
/// around them keep their data, the base is untouched and qemu reads the same.
fn qcow2_write_zeroes_over_backing() -> Result<Outcome> {
    let wd = workdir()?;
    let base_raw = wd.join("wzbase.raw");
    write_pattern(&base_raw, 64 * MIB, 0xba5e)?;
    let base = wd.join("wzbase.qcow2");
    let top = wd.join("wztop.qcow2");
    let (bs, ts) = (
        base.to_string_lossy().into_owned(),
        top.to_string_lossy().into_owned(),
    );
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &base_raw.to_string_lossy(),
        &bs,
    ])?;
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", &bs, "-F", "qcow2", &ts])?;
    let base_hash = sha256(&base)?;
    let mut want = fs::read(&base_raw)?;
    fs::remove_file(&base_raw)?;
    let top_pat = wd.join("wztop.pat");
    write_pattern(&top_pat, 16 * MIB, 0x7007)?;
    let top_data = fs::read(&top_pat)?;

    let d = ublk_add(&["-t", "qcow2", "-f", &ts, "-q", "2"])?;
    write_dev(&d.bdev(), 16 * MIB, &top_data)?;
    want[(16 * MIB) as usize..(32 * MIB) as usize].copy_from_slice(&top_data);
    // Zeroes over backing-only and overlay-allocated clusters, unaligned at both ends.
    let (zo, zl) = (8 * MIB + 4096, 16 * MIB);
    blkdiscard(&d.bdev(), true, zo, zl)?;
    want[zo as usize..(zo + zl) as usize].fill(0);
    // A discard over backing-only and allocated clusters: zero flags, no backing data.
    blkdiscard(&d.bdev(), false, 28 * MIB, 16 * MIB)?;
    want[(28 * MIB) as usize..(44 * MIB) as usize].fill(0);
    let got = read_buffered(&d.bdev(), 64 * MIB)?;
    if let Some(at) = first_diff(&got, &want) {
        bail!(
            "through the device: byte {at} is {:#x}, want {:#x}",
            got[at],
            want[at]
        );
    }
    ublk_del(d.id)?;
    qemu_img_check(&top)?;
    ensure!(
        sha256(&base)? == base_hash,
        "the backing image was modified"
    );
    let raw = wd.join("wztop.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &ts,
        &raw.to_string_lossy(),
    ])?;
    let conv = fs::read(&raw)?;
    if let Some(at) = first_diff(&conv, &want) {
        bail!("qemu-img convert differs at byte {at}");
    }
    Ok(Outcome::Pass)
}

/// `ublk add --create`: a new image is made and served (fio verify), checks clean and has the
/// asked-for size and cluster size; a second `--create` of the same path is refused and leaves
/// the image alone; an overlay made with `--create --backing` shows the base's data.
fn qcow2_create() -> Result<Outcome> {
    let wd = workdir()?;
    let img = wd.join("created.qcow2");
    let f = img.to_string_lossy().into_owned();
    let _ = fs::remove_file(&img);
    let d = ublk_add(&[
        "-t",
        "qcow2",
        "-f",
        &f,
        "--create",
        "1G",
        "--cluster-size",
        "16K",
        "-q",
        "2",
    ])?;
    ensure!(
        d.capacity == 2 << 20,
        "device capacity {} sectors",
        d.capacity
    );
    fio_verify(&d.bdev(), 32, ("32M", "64M"), Duration::from_secs(180))?;
    ublk_del(d.id)?;
    qemu_img_check(&img)?;
    let info = qemu_img(&["info", "--output=json", &f])?.stdout;
    ensure!(
        info.contains("\"virtual-size\": 1073741824,") && info.contains("\"cluster-size\": 16384,"),
        "qemu-img info: {info}"
    );

    let hash = sha256(&img)?;
    let r = ublk(&["add", "-t", "qcow2", "-f", &f, "--create", "2G"])?;
    ensure!(!r.ok(), "a second --create of {f} succeeded");
    ensure!(
        r.stderr.contains("already exists"),
        "unclear error: {}",
        r.stderr.trim()
    );
    ensure!(
        sha256(&img)? == hash,
        "the refused --create changed the image"
    );

    // A bad --create leaves no file.
    let bad = wd.join("bad.qcow2");
    let b = bad.to_string_lossy().into_owned();
    let r = ublk(&[
        "add",
        "-t",
        "qcow2",
        "-f",
        &b,
        "--create",
        "1G",
        "--cluster-size",
        "3K",
    ])?;
    ensure!(
        !r.ok() && !bad.exists(),
        "bad --create: {} {}",
        r.status,
        r.stderr.trim()
    );

    // An overlay over the created image reads its data.
    let top = wd.join("created-top.qcow2");
    let t = top.to_string_lossy().into_owned();
    let _ = fs::remove_file(&top);
    let d = ublk_add(&[
        "-t",
        "qcow2",
        "-f",
        &t,
        "--create",
        "1G",
        "--backing",
        "created.qcow2",
    ])?;
    let got = read_buffered(&d.bdev(), 64 * MIB)?;
    ublk_del(d.id)?;
    let raw = wd.join("created.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &f,
        &raw.to_string_lossy(),
    ])?;
    let mut want = vec![0u8; (64 * MIB) as usize];
    fs::File::open(&raw)?.read_exact(&mut want)?;
    fs::remove_file(&raw)?;
    if let Some(at) = first_diff(&got, &want) {
        bail!("overlay differs from its base at byte {at}");
    }
    qemu_img_check(&top)?;
    Ok(Outcome::Pass)
}

/// An image with an internal snapshot and the dirty bit set is served read-write: the daemon
/// repairs the refcounts and clears the bit at open, fio verify passes through the device,
/// `qemu-img check` is clean afterwards and applying the snapshot (on a copy) restores the old
/// content.
fn qcow2_snapshot_dirty() -> Result<Outcome> {
    let wd = workdir()?;
    let img = wd.join("snap.qcow2");
    let f = img.to_string_lossy().into_owned();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=16k",
        &f,
        "128M",
    ])?;
    let pattern = wd.join("snap.pat");
    write_pattern(&pattern, 48 * MIB, 0x5a5)?;
    let data = fs::read(&pattern)?;
    fs::remove_file(&pattern)?;
    let d = ublk_add(&["-t", "qcow2", "-f", &f])?;
    write_dev(&d.bdev(), 0, &data)?;
    ublk_del(d.id)?;
    qemu_img(&["snapshot", "-c", "s1", &f])?;
    // The dirty bit (incompatible feature bit 0, header byte 79) as a killed lazy-refcounts
    // writer leaves it.
    let mut hdr = fs::OpenOptions::new().read(true).write(true).open(&img)?;
    hdr.seek(SeekFrom::Start(79))?;
    hdr.write_all(&[1])?;
    hdr.sync_all()?;
    drop(hdr);

    let d = ublk_add(&["-t", "qcow2", "-f", &f, "-q", "2"])?;
    fio_verify(&d.bdev(), 32, ("32M", "64M"), Duration::from_secs(180))?;
    ublk_del(d.id)?;
    let mut b = [0u8; 1];
    fs::File::open(&img)?.read_exact_at(&mut b, 79)?;
    ensure!(b[0] & 1 == 0, "the dirty bit is still set");
    qemu_img_check(&img)?;

    let copy = wd.join("snap-copy.qcow2");
    fs::copy(&img, &copy)?;
    let c = copy.to_string_lossy().into_owned();
    qemu_img(&["snapshot", "-a", "s1", &c])?;
    qemu_img_check(&copy)?;
    let raw = wd.join("snap-s1.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &c,
        &raw.to_string_lossy(),
    ])?;
    let mut got = vec![0u8; data.len()];
    fs::File::open(&raw)?.read_exact(&mut got)?;
    fs::remove_file(&raw)?;
    fs::remove_file(&copy)?;
    if let Some(at) = first_diff(&got, &data) {
        bail!("snapshot s1 differs from what was written before it at byte {at}");
    }
    Ok(Outcome::Pass)
}
