//! Kernel-facing tests of the qcow2 target.

use crate::cases::test;
use crate::util::*;
use crate::{Outcome, Test};
use anyhow::{ensure, Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The qcow2 tests, in run order.
pub fn all() -> Vec<Test> {
    vec![
        test("kernel_qcow2_verify_q1", 240, || qcow2_verify(1)),
        test("kernel_qcow2_verify_q2", 240, || qcow2_verify(2)),
        test(
            "kernel_qcow2_ext4_backing_chain",
            240,
            qcow2_ext4_backing_chain,
        ),
    ]
}

fn qemu_img(args: &[&str]) -> Result<Run> {
    check_cmd(
        Command::new(opt_bin("qemu-img")).args(args),
        Duration::from_secs(120),
    )
}

/// `qemu-img check` must find no corruption and no leak.
fn qemu_img_check(img: &Path) -> Result<()> {
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
fn qcow2_verify(queues: u32) -> Result<Outcome> {
    let wd = workdir()?;
    let img = wd.join("disk.qcow2");
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
    let d = ublk_add(&["-t", "qcow2", "-f", &f, "-q", &q])?;
    ensure!(d.queues == queues, "device has {} queues", d.queues);
    for (rw, bs, size) in [("randwrite", "4k", "32M"), ("write", "128k", "64M")] {
        fio(
            &[
                "--name=verify",
                &format!("--filename={}", d.bdev()),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--size={size}"),
                "--iodepth=32",
                "--ioengine=io_uring",
                "--direct=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
            Duration::from_secs(180),
        )
        .with_context(|| format!("fio {rw} bs={bs} verify on qcow2"))?;
    }
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
    let r = run_timeout(
        Command::new(opt_bin("e2fsck")).args(["-fn", &d.bdev()]),
        Duration::from_secs(120),
    )?;
    ensure!(
        r.ok(),
        "e2fsck -fn found problems: {} {}",
        r.stdout.trim(),
        r.stderr.trim()
    );
    ublk_del(d.id)?;
    qemu_img_check(&top)?;
    Ok(Outcome::Pass)
}
