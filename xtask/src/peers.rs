//! A newer NBD server than the host's, for the nbd target's tests: qemu-nbd from Debian trixie
//! (10.0 negotiates extended headers; bookworm's qemu-nbd 7.2, nbdkit 1.32 and nbd-server 3.24
//! do not, and neither does trixie's nbdkit 1.42, which refuses the option).
//!
//! `qemu-utils`, trixie's C library and the libraries of trixie's that qemu-nbd needs in newer
//! versions than bookworm's are fetched with the private apt configuration of
//! [`crate::kernel`] and unpacked under `target/vm/qemu-nbd-trixie/root`. The program runs
//! through trixie's dynamic loader with trixie's libraries first and the host's after them
//! (selinux, numa, zstd, zlib, ...: older, binary compatible):
//! `target/vm/qemu-nbd-trixie/qemu-nbd` is a wrapper that runs it so on the host (the host
//! tests find it there), and [`guest_files`] says what goes into the guest for the VM tests
//! (`/opt/bin/qemu-nbd-new`).

use crate::kernel::{run, vm_dir, Apt};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Packages unpacked into the root: the program, and the libraries it (or another of them)
/// needs in a version newer than bookworm's (found by trying: the loader names what is
/// missing).
const PACKAGES: &[&str] = &[
    "qemu-utils",
    "libc6",
    "libfuse3-4",
    "libaio1t64",
    "liburing2",
    "libglib2.0-0t64",
    "libpcre2-8-0",
    "libffi8",
    "libgnutls30t64",
    "libnettle8t64",
    "libhogweed6t64",
    "libgmp10",
    "libunistring5",
    "libidn2-0",
    "libtasn1-6",
    "libp11-kit0",
];
/// Inside the root.
const BINARY: &str = "usr/bin/qemu-nbd";
const LOADER: &str = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
const LIBDIR: &str = "usr/lib/x86_64-linux-gnu";
/// The host's library directories, searched after trixie's.
const HOST_LIBDIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
];

/// The unpacked qemu-nbd.
pub struct QemuNbdNew {
    pub root: PathBuf,
    /// The wrapper that runs it on the host.
    pub wrapper: PathBuf,
}

/// Fetches and unpacks trixie's qemu-nbd unless it is there already; writes the host wrapper.
pub fn qemu_nbd_new() -> Result<QemuNbdNew> {
    let dir = vm_dir().join("qemu-nbd-trixie");
    let root = dir.join("root");
    let wrapper = dir.join("qemu-nbd");
    let done = dir.join("versions");
    if !(done.is_file() && root.join(BINARY).is_file() && wrapper.is_file()) {
        let _ = fs::remove_dir_all(&dir);
        let debs = dir.join("debs");
        fs::create_dir_all(&debs)?;
        fs::create_dir_all(&root)?;
        let apt = Apt::private()?;
        let mut versions = String::new();
        for pkg in PACKAGES {
            let version = apt.candidate(pkg)?;
            apt.download(pkg, &version, &debs)?;
            versions.push_str(&format!("{pkg}={version}\n"));
        }
        for e in fs::read_dir(&debs)? {
            run(Command::new("dpkg-deb").arg("-x").arg(e?.path()).arg(&root))?;
        }
        fs::remove_dir_all(&debs)?;
        let libpath = std::iter::once(root.join(LIBDIR).display().to_string())
            .chain(HOST_LIBDIRS.iter().map(|d| d.to_string()))
            .collect::<Vec<_>>()
            .join(":");
        let script = format!(
            "#!/bin/sh\n# qemu-nbd from Debian trixie with trixie's libraries (cargo xtask, peers.rs)\n\
             exec {} --library-path {libpath} {} \"$@\"\n",
            root.join(LOADER).display(),
            root.join(BINARY).display()
        );
        fs::write(&wrapper, script)?;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
        fs::write(&done, versions)?;
    }
    let out = run(Command::new(&wrapper).arg("--version"))
        .with_context(|| format!("{} does not run", wrapper.display()))?;
    if !out.contains("qemu-nbd ") {
        bail!("{} --version printed {out:?}", wrapper.display());
    }
    Ok(QemuNbdNew { root, wrapper })
}

/// Where things go in the guest.
pub const GUEST_DIR: &str = "opt/qemu-nbd-new";
pub const GUEST_WRAPPER: &str = "opt/bin/qemu-nbd-new";

/// What the guest needs to run it: `(guest path, host file)` for the program and the trixie
/// libraries it needs (under [`GUEST_DIR`]); the host libraries it needs (at their
/// host paths, for the caller to add with their own dependencies); and the wrapper script.
pub struct GuestFiles {
    pub files: Vec<(String, PathBuf)>,
    pub host_libs: Vec<PathBuf>,
    pub wrapper: String,
}

pub fn guest_files(n: &QemuNbdNew) -> Result<GuestFiles> {
    let mut files = vec![(format!("{GUEST_DIR}/qemu-nbd"), n.root.join(BINARY))];
    let libdir = n.root.join(LIBDIR);
    let mut host_libs = Vec::new();
    let mut todo: Vec<PathBuf> = files.iter().map(|(_, f)| f.clone()).collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(elf) = todo.pop() {
        for lib in needed(&elf)? {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let ours = libdir.join(&lib);
            if ours.exists() {
                files.push((format!("{GUEST_DIR}/lib/{lib}"), ours.clone()));
                todo.push(ours);
            } else if let Some(h) = HOST_LIBDIRS
                .iter()
                .map(|d| Path::new(d).join(&lib))
                .find(|p| p.exists())
            {
                host_libs.push(h);
            } else {
                bail!(
                    "{} needs {lib}, found neither in the trixie packages nor on the host",
                    elf.display()
                );
            }
        }
    }
    files.push((
        format!("{GUEST_DIR}/lib/ld-linux-x86-64.so.2"),
        n.root.join(LOADER),
    ));
    let wrapper = format!(
        "#!/bin/sh\nexec /{GUEST_DIR}/lib/ld-linux-x86-64.so.2 --library-path /{GUEST_DIR}/lib:{} \
         /{GUEST_DIR}/qemu-nbd \"$@\"\n",
        HOST_LIBDIRS.join(":")
    );
    Ok(GuestFiles {
        files,
        host_libs,
        wrapper,
    })
}

/// The `DT_NEEDED` entries of an ELF file (`readelf -d`).
fn needed(elf: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("readelf").arg("-d").arg(elf))?;
    Ok(out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let s = l.split('[').nth(1)?;
            Some(s.trim_end_matches(']').to_string())
        })
        .collect())
}
