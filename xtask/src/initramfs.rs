//! The guest's initramfs: an uncompressed newc cpio archive written here (no host `cpio` needed).
//!
//! Layout inside the guest:
//! * `/bin/busybox` and its applet symlinks (`busybox --list-full`), `/init` (a busybox sh script);
//! * `/opt/bin/`: `ublk`, `ublk-vm-tests`, `fio`, `mke2fs` (+ `mkfs.ext4`), `e2fsck`, `blkdiscard`,
//!   `losetup` (util-linux), `qemu-img` (qcow2 images for the qcow2 target's tests), `qemu-nbd`
//!   and `nbdkit` (servers for the nbd target's tests), `nbd-client` (the kernel nbd driver's
//!   client, for `cargo xtask bench`), `ublk-bench` (`xtask/guest/bench.sh`, the guest side of
//!   `cargo xtask bench`);
//! * nbdkit's memory plugin at its host path (nbdkit's compiled-in plugin directory);
//! * the shared libraries `ldd` lists for them, at the paths `ldd` prints;
//! * `/lib/modules/<release>/*.ko`: decompressed modules, loaded by `/init` in dependency order;
//! * `/dev/console` so that init has a console before devtmpfs is mounted.

use crate::kernel::Kernel;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Host programs copied into the guest's `/opt/bin` (name in guest, candidates on the host).
const HOST_TOOLS: &[(&str, &[&str])] = &[
    ("fio", &["/usr/bin/fio"]),
    ("mke2fs", &["/usr/sbin/mke2fs", "/sbin/mke2fs"]),
    ("e2fsck", &["/usr/sbin/e2fsck", "/sbin/e2fsck"]),
    ("blkdiscard", &["/usr/sbin/blkdiscard", "/sbin/blkdiscard"]),
    ("losetup", &["/usr/sbin/losetup", "/sbin/losetup"]),
    ("setpriv", &["/usr/bin/setpriv", "/bin/setpriv"]),
    ("qemu-img", &["/usr/bin/qemu-img"]),
    ("qemu-nbd", &["/usr/bin/qemu-nbd"]),
    ("nbd-client", &["/usr/sbin/nbd-client", "/sbin/nbd-client"]),
    ("nbdkit", &["/usr/bin/nbdkit", "/usr/sbin/nbdkit"]),
];

/// nbdkit plugins (and filters) copied to the same path in the guest, where the guest's
/// nbdkit looks for them (`nbdkit --dump-config`: plugindir, filterdir).
const NBDKIT_MODULES: &[&[&str]] = &[
    &[
        "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so",
        "/usr/lib64/nbdkit/plugins/nbdkit-memory-plugin.so",
    ],
    &[
        "/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-file-plugin.so",
        "/usr/lib64/nbdkit/plugins/nbdkit-file-plugin.so",
    ],
];

const BUSYBOX: &[&str] = &["/usr/bin/busybox", "/bin/busybox"];

/// What `/init` does after setting the guest up.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Run `/opt/bin/ublk-vm-tests`, print the result marker, power off.
    Test,
    /// Interactive shell on the console, power off when it exits.
    Shell,
    /// Run `/opt/bin/ublk-bench` (`cargo xtask bench`), print the result marker, power off.
    Bench,
    /// Run the kernel's ublk selftests in this directory (`cargo xtask selftests`) with our
    /// `ublk` as their server, print the result marker, power off.
    Selftests(PathBuf),
}

/// The guest side of `cargo xtask bench`, installed as `/opt/bin/ublk-bench` in every mode.
const BENCH_SCRIPT: &str = include_str!("../guest/bench.sh");

/// The guest side of `cargo xtask selftests`, installed as `/opt/bin/ublk-selftests`.
const SELFTESTS_SCRIPT: &str = include_str!("../guest/selftests.sh");

/// Host programs the kernel's selftest scripts need beyond busybox.
const SELFTEST_TOOLS: &[(&str, &[&str])] = &[
    ("bash", &["/bin/bash", "/usr/bin/bash"]),
    ("lsblk", &["/bin/lsblk", "/usr/bin/lsblk"]),
    // GNU spellings the scripts use (busybox's mktemp wants six X's, the scripts give five).
    ("mktemp", &["/bin/mktemp", "/usr/bin/mktemp"]),
    ("realpath", &["/bin/realpath", "/usr/bin/realpath"]),
    ("stat", &["/bin/stat", "/usr/bin/stat"]),
    ("truncate", &["/bin/truncate", "/usr/bin/truncate"]),
    // part_01 writes a partition table and rereads it.
    ("sfdisk", &["/sbin/sfdisk", "/usr/sbin/sfdisk"]),
    ("blockdev", &["/sbin/blockdev", "/usr/sbin/blockdev"]),
];

/// Marker the guest prints last in test mode: `@@UBLK-VM-RESULT rc=N@@`.
pub const RESULT_MARKER: &str = "@@UBLK-VM-RESULT rc=";

enum Entry {
    Dir,
    File { src: PathBuf, mode: u32 },
    Data { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn dirs_for(&mut self, path: &str) {
        let mut cur = String::new();
        let parts: Vec<_> = path.split('/').filter(|p| !p.is_empty()).collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(p);
            self.entries.entry(cur.clone()).or_insert(Entry::Dir);
        }
    }

    fn add(&mut self, path: &str, e: Entry) {
        let path = path.trim_start_matches('/').to_string();
        self.dirs_for(&path);
        self.entries.insert(path, e);
    }

    fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    fn file(&mut self, path: &str, src: &Path) -> Result<()> {
        let meta = fs::metadata(src)
            .with_context(|| format!("{} (needed in the guest)", src.display()))?;
        self.add(
            path,
            Entry::File {
                src: src.to_path_buf(),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(())
    }

    /// A dynamically linked program and every library it needs.
    fn program(&mut self, path: &str, src: &Path) -> Result<()> {
        self.file(path, src)?;
        for lib in shared_libs(src)? {
            let key = lib.to_string_lossy().to_string();
            if !self.entries.contains_key(key.trim_start_matches('/')) {
                self.file(&key, &lib)?;
            }
        }
        Ok(())
    }

    fn write(&self, out: &Path) -> Result<()> {
        let mut w = CpioWriter {
            out: BufWriter::new(File::create(out)?),
            ino: 1,
        };
        for (path, e) in &self.entries {
            match e {
                Entry::Dir => w.entry(path, 0o040755, 0, 0, &[])?,
                Entry::File { src, mode } => {
                    let data =
                        fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    w.entry(path, 0o100000 | mode, 0, 0, &data)?
                }
                Entry::Data { data, mode } => w.entry(path, 0o100000 | mode, 0, 0, data)?,
                Entry::Symlink(target) => w.entry(path, 0o120777, 0, 0, target.as_bytes())?,
                Entry::CharDev { major, minor } => w.entry(path, 0o020600, *major, *minor, &[])?,
            }
        }
        w.entry("TRAILER!!!", 0, 0, 0, &[])?;
        w.out.flush()?;
        Ok(())
    }
}

struct CpioWriter {
    out: BufWriter<File>,
    ino: u32,
}

impl CpioWriter {
    /// One newc entry: 110-byte ASCII header, NUL-terminated name, data; both padded to 4 bytes.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        rmajor: u32,
        rminor: u32,
        data: &[u8],
    ) -> Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let ino = if name == "TRAILER!!!" { 0 } else { self.ino };
        self.ino += 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            u32::try_from(data.len()).context("file too large for cpio")?,
            0, // devmajor
            0, // devminor
            rmajor,
            rminor,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..n])?;
        Ok(())
    }
}

/// Libraries (and the dynamic loader) that `ldd` lists for `bin`; empty for static programs.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable"
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!(
                "{}: shared library missing on the host: {line}",
                bin.display()
            );
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

fn find_first(candidates: &[&str]) -> Result<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("none of {candidates:?} exists; install the host packages listed in xtask/src/vm.rs"))
}

/// Build `out` for `kernel`. `bins` are workspace binaries placed in `/opt/bin`.
pub fn build(kernel: &Kernel, bins: &[PathBuf], mode: &Mode, out: &Path) -> Result<()> {
    let mut t = Tree::default();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "opt/bin",
    ] {
        t.dir(d);
    }
    t.add("dev/console", Entry::CharDev { major: 5, minor: 1 });
    t.add("dev/null", Entry::CharDev { major: 1, minor: 3 });

    let busybox = find_first(BUSYBOX)?;
    if !shared_libs(&busybox)?.is_empty() {
        bail!(
            "{} is not static; install busybox-static",
            busybox.display()
        );
    }
    t.file("bin/busybox", &busybox)?;
    let list = crate::kernel::run(Command::new(&busybox).arg("--list-full"))?;
    for applet in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "bin/busybox")
    {
        t.add(applet, Entry::Symlink("/bin/busybox".into()));
    }

    for (name, candidates) in HOST_TOOLS {
        let src = find_first(candidates)?;
        t.program(&format!("opt/bin/{name}"), &src)?;
    }
    for candidates in NBDKIT_MODULES {
        let src = find_first(candidates)?;
        let guest = src.to_string_lossy().trim_start_matches('/').to_string();
        t.program(&guest, &src)?;
    }
    // A newer qemu-nbd (Debian trixie's, with extended headers) as /opt/bin/qemu-nbd-new.
    let g = crate::peers::guest_files(&crate::peers::qemu_nbd_new()?)?;
    for (guest, src) in &g.files {
        t.file(guest, src)?;
    }
    for lib in &g.host_libs {
        t.program(lib.to_string_lossy().trim_start_matches('/'), lib)?;
    }
    t.add(
        crate::peers::GUEST_WRAPPER,
        Entry::Data {
            data: g.wrapper.into_bytes(),
            mode: 0o755,
        },
    );
    t.add("opt/bin/mkfs.ext4", Entry::Symlink("mke2fs".into()));
    t.add(
        "opt/bin/ublk-bench",
        Entry::Data {
            data: BENCH_SCRIPT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    for bin in bins {
        let name = bin
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| anyhow!("bad binary path"))?;
        t.program(&format!("opt/bin/{name}"), bin)?;
    }

    if let Mode::Selftests(dir) = mode {
        add_selftests(&mut t, dir)?;
    }

    if Path::new("/etc/mke2fs.conf").exists() {
        t.file("etc/mke2fs.conf", Path::new("/etc/mke2fs.conf"))?;
    }
    t.add("etc/mtab", Entry::Symlink("/proc/self/mounts".into()));
    t.add(
        "etc/passwd",
        Entry::Data {
            data: b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
            mode: 0o644,
        },
    );
    t.add(
        "etc/group",
        Entry::Data {
            data: b"root:x:0:\n".to_vec(),
            mode: 0o644,
        },
    );

    let mut insmods = String::new();
    for m in &kernel.modules {
        let name = m.file_name().unwrap().to_string_lossy();
        let guest = format!("lib/modules/{}/{name}", kernel.release);
        t.file(&guest, m)?;
        insmods.push_str(&format!(
            "insmod /{guest} || echo \"init: insmod {name} failed\"\n"
        ));
    }
    t.add(
        "init",
        Entry::Data {
            data: init_script(&insmods, mode).into_bytes(),
            mode: 0o755,
        },
    );
    t.write(out)
}

/// The kernel's selftest scripts in `/opt/ublk-selftests`, `kublk` there being our `ublk`,
/// with bash, lsblk, a `udevadm` that has nothing to settle (devtmpfs makes the nodes) and the
/// runner `/opt/bin/ublk-selftests`.
fn add_selftests(t: &mut Tree, dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_file() && (name.ends_with(".sh") || name == "settings") {
            t.file(&format!("opt/ublk-selftests/{name}"), &path)?;
        }
    }
    t.add(
        "opt/ublk-selftests/kublk",
        Entry::Symlink("/opt/bin/ublk".into()),
    );
    for (name, candidates) in SELFTEST_TOOLS {
        let src = find_first(candidates)?;
        t.program(&format!("opt/bin/{name}"), &src)?;
    }
    t.add(
        "opt/bin/udevadm",
        Entry::Data {
            data: b"#!/bin/sh\n# The guest has no udev: devtmpfs makes the nodes.\nexit 0\n"
                .to_vec(),
            mode: 0o755,
        },
    );
    t.add(
        "opt/bin/ublk-selftests",
        Entry::Data {
            data: SELFTESTS_SCRIPT.as_bytes().to_vec(),
            mode: 0o755,
        },
    );
    Ok(())
}

/// `/init`'s tail that runs `program`, then prints its exit status in the result marker.
fn run_and_report(program: &str, note: &str) -> String {
    format!(
        r#"echo "init: running {program} (kernel $(uname -r){note})"
{program}
rc=$?
sync
echo
echo "{RESULT_MARKER}$rc@@"
"#
    )
}

fn init_script(insmods: &str, mode: &Mode) -> String {
    let tail = match mode {
        Mode::Test => run_and_report("/opt/bin/ublk-vm-tests", ", filter '$UBLK_VM_FILTER'"),
        Mode::Bench => run_and_report("/opt/bin/ublk-bench", ""),
        Mode::Selftests(_) => run_and_report("/opt/bin/ublk-selftests", ""),
        Mode::Shell => r#"echo
echo "ublk VM shell: kernel $(uname -r). Tools in /opt/bin (ublk, ublk-vm-tests, fio, mkfs.ext4, ...)."
echo "Run 'ublk-vm-tests --list' / 'ublk-vm-tests FILTER'. Exit the shell to power off."
setsid cttyhack sh -l || sh
"#
        .to_string(),
    };
    format!(
        r#"#!/bin/sh
export PATH=/opt/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
if [ -d /sys/kernel/tracing ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
    # Events named by trace_event= are on; keep the ring buffer quiet until a test wants it.
    echo 0 > /sys/kernel/tracing/tracing_on 2>/dev/null
fi
{insmods}mount -t configfs configfs /sys/kernel/config
echo "init: guest ready: $(uname -r), modules: $(cut -d' ' -f1 /proc/modules | tr '\n' ' ')"
{tail}poweroff -f
"#
    )
}
