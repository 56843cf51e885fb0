//! `cargo xtask kublk`: builds kublk, the ublk server of the kernel's selftests
//! (`tools/testing/selftests/ublk`, written by the ublk driver's author and kept in step with
//! it), as a static binary for `cargo xtask bench --kublk`. `cargo xtask selftests` runs those
//! selftests' scripts in the VM with our `ublk` in kublk's place.
//!
//! The source comes from Debian's `linux-source-7.3` package and liburing from trixie's
//! `liburing-dev`, both fetched with the private apt configuration of [`crate::kernel`]; the
//! uapi headers kublk needs (`ublk_cmd.h`, `io_uring.h`, ...) are taken from the same source
//! tree, so the host's older kernel headers are not used for them. Everything lives under
//! `target/vm/kublk/`; the binary is `target/vm/kublk/kublk`.

use crate::initramfs::Mode;
use crate::kernel::{run, Apt, KernelSpec};
use crate::vm::{self, Boot};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// The kernel source package (its kublk speaks every feature of the 7.3 guest kernel).
const SOURCE_PACKAGE: &str = "linux-source-7.3";
/// Where the selftest sits in the source tree, and the uapi headers it includes.
const SELFTEST: &str = "tools/testing/selftests/ublk";
const UAPI: &[&str] = &[
    "include/uapi/linux/ublk_cmd.h",
    "include/uapi/linux/io_uring.h",
    "include/uapi/linux/io_uring",
    "include/uapi/linux/blkdev.h",
    "include/uapi/linux/fs.h",
];
/// kublk's sources (the Makefile's, less `metadata_size.c`, a separate test tool).
const SOURCES: &[&str] = &[
    "kublk.c",
    "null.c",
    "file_backed.c",
    "common.c",
    "stripe.c",
    "fault_inject.c",
    "batch.c",
];

/// Fetches and builds kublk unless it is built already; returns its path.
pub fn build() -> Result<PathBuf> {
    let dir = crate::kernel::vm_dir().join("kublk");
    let bin = dir.join("kublk");
    if fs::metadata(&bin).is_ok_and(|m| m.is_file() && m.len() > 0) {
        return Ok(bin);
    }
    let tree = source()?;
    let inc = dir.join("include");
    let root = dir.join("root");
    let mut gcc = Command::new("gcc");
    gcc.current_dir(tree.join(SELFTEST))
        .args(["-D_GNU_SOURCE", "-O3", "-Wall", "-static", "-o"])
        .arg(&bin)
        .arg("-I")
        .arg(&inc)
        .arg("-I")
        .arg(root.join("usr/include"))
        .args(SOURCES)
        .arg("-L")
        .arg(root.join("usr/lib/x86_64-linux-gnu"))
        .args(["-luring", "-lpthread", "-lm"]);
    eprintln!("xtask: building {}", bin.display());
    run(&mut gcc)?;
    if !bin.is_file() {
        bail!("gcc made no {}", bin.display());
    }
    Ok(bin)
}

/// The kernel source tree holding the selftest and the uapi headers (copied to
/// `target/vm/kublk/include`), with liburing's headers and library in `target/vm/kublk/root`:
/// fetched and unpacked unless they are there already.
fn source() -> Result<PathBuf> {
    let dir = crate::kernel::vm_dir().join("kublk");
    let src = dir.join("src");
    let tree = src.join(SOURCE_PACKAGE);
    let root = dir.join("root");
    let inc = dir.join("include");
    if tree.join(SELFTEST).join("kublk.c").is_file()
        && root.join("usr/include/liburing.h").is_file()
        && inc.join("linux/ublk_cmd.h").is_file()
    {
        return Ok(tree);
    }
    let apt = Apt::private()?;
    let debs = dir.join("debs");
    fs::create_dir_all(&debs)?;
    fs::create_dir_all(&root)?;
    for pkg in [SOURCE_PACKAGE, "liburing-dev", "liburing2"] {
        let version = apt.candidate(pkg)?;
        if find_deb(&debs, pkg)?.is_none() {
            apt.download(pkg, &version, &debs)?;
        }
        let deb = find_deb(&debs, pkg)?.with_context(|| format!("{pkg}: no .deb downloaded"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    }
    let tarball = root
        .join("usr/src")
        .join(format!("{SOURCE_PACKAGE}.tar.xz"));
    let top = SOURCE_PACKAGE;
    fs::create_dir_all(&src)?;
    let mut tar = Command::new("tar");
    tar.arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg(format!("{top}/{SELFTEST}"));
    for h in UAPI {
        tar.arg(format!("{top}/{h}"));
    }
    eprintln!("xtask: unpacking kublk's source from {}", tarball.display());
    run(&mut tar)?;
    fs::remove_file(&tarball)?;
    // The uapi headers go where the selftest Makefile's `usr/include` would have them.
    for h in UAPI {
        let to = inc.join(h.trim_start_matches("include/uapi/"));
        copy_tree(&tree.join(h), &to)?;
    }
    Ok(tree)
}

/// What `cargo xtask selftests` runs.
pub struct SelftestOptions {
    pub kernels: Vec<&'static KernelSpec>,
    /// Comma-separated test names (`loop_01,null_02`); all the runner's by default.
    pub tests: Option<String>,
    pub timeout: Duration,
    pub quiet: bool,
    pub no_build: bool,
}

/// Boots each kernel once and runs the kernel's ublk selftests there with our `ublk` as their
/// server (`xtask/guest/selftests.sh` says which tests and what is adapted).
pub fn selftests(o: &SelftestOptions) -> Result<ExitCode> {
    let dir = source()?.join(SELFTEST);
    let bins = vm::build_binaries(o.no_build)?;
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let mut broken = Vec::new();
    for spec in &o.kernels {
        let (kernel, initrd) = vm::prepare(spec, &bins, &Mode::Selftests(dir.clone()))?;
        let mut append = vm::base_append(spec.label);
        if let Some(t) = &o.tests {
            vm::check_word("--tests", t)?;
            append.push_str(&format!(" UBLK_SELFTESTS={t}"));
        }
        let boot = Boot {
            label: spec.label,
            kernel: &kernel,
            initrd: &initrd,
            append,
            mem: "3G",
            extra_args: Vec::new(),
            timeout: o.timeout,
            quiet: o.quiet,
            log_path: vm::target_dir().join(format!("vm/selftests-{}.log", spec.label)),
        };
        let outcome = vm::run_guest_retrying(&boot, |line| {
            let Some(at) = line.find("@@SELFTEST ") else {
                return;
            };
            let body = line[at + 11..].trim_end().trim_end_matches("@@");
            let mut w = body.splitn(3, ' ');
            let (name, result, detail) = (
                w.next().unwrap_or(""),
                w.next().unwrap_or(""),
                w.next().unwrap_or(""),
            );
            if o.quiet {
                println!("{} {result} {name} ({detail})", spec.label);
            }
            rows.push((
                spec.label.to_string(),
                name.to_string(),
                result.to_string(),
                detail.to_string(),
            ));
        })?;
        if outcome.rc.is_none() {
            broken.push(format!(
                "{}: the guest did not finish ({}; console in {})",
                spec.label,
                if outcome.timed_out {
                    "timed out"
                } else {
                    "no result"
                },
                boot.log_path.display()
            ));
        }
    }
    println!();
    println!("==== the kernel's ublk selftests with our ublk as the server ====");
    for (k, name, result, detail) in &rows {
        println!("{result} {k} {name} ({detail})");
    }
    let count = |r: &str| rows.iter().filter(|row| row.2 == r).count();
    println!(
        "{} passed, {} failed, {} skipped",
        count("PASS"),
        count("FAIL"),
        count("SKIP")
    );
    for b in &broken {
        println!("{b}");
    }
    Ok(
        if count("FAIL") == 0 && broken.is_empty() && !rows.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// The downloaded `.deb` of `pkg` in `dir`, if any.
fn find_deb(dir: &Path, pkg: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{pkg}_");
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Copies a file, or a directory's files, to `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        fs::create_dir_all(to)?;
        for e in fs::read_dir(from)? {
            let e = e?;
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        }
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to).with_context(|| format!("copying {}", from.display()))?;
    Ok(())
}
