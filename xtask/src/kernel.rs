//! Fetching Debian kernels for the VM tests, with a private apt configuration.
//!
//! Everything apt touches lives under `target/vm/apt/`: its own sources list, state, lists and
//! cache directories and an empty dpkg status file. The host's apt configuration is only read (its
//! `apt.conf.d`, e.g. for a proxy), never written, and the host's package database is not used.
//!
//! Extracted kernels are cached under `target/vm/kernels/<kernel release>/`:
//! `vmlinuz`, `modules/*.ko` (decompressed) and `modules.order` (load order, dependencies first).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The kernels the suite runs against. Bumping a pinned kernel is one edit here.
///
/// If a pinned version has left the archive, [`fetch`] resolves the current version of the same
/// family (`linux-image-cloud-amd64` in the same suite, same major.minor when possible) and warns.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "6.12",
        suite: "trixie",
        release: "6.12.117+deb13-cloud-amd64",
        version: "6.12.117-1",
        packages: &["linux-image-6.12.117+deb13-cloud-amd64"],
    },
    KernelSpec {
        label: "7.3",
        suite: "trixie-backports",
        release: "7.3.4+deb13-cloud-amd64",
        version: "7.3.4-1~bpo13+1",
        packages: &[
            "linux-binary-7.3.4+deb13-cloud-amd64",
            "linux-modules-7.3.4+deb13-cloud-amd64",
        ],
    },
];

/// Modules the guest needs. Dependencies (read from `modinfo -F depends`) are added and ordered
/// automatically; modules built into the kernel are skipped.
pub const GUEST_MODULES: &[&str] = &[
    "configfs",
    "null_blk",
    "loop",
    "nbd",
    "ublk_drv",
    // Kernel TLS and the ciphers it asks the crypto API for by name (no modprobe in the guest).
    "tls",
    "gcm",
    "ctr",
    "aesni_intel",
    "chacha20poly1305",
    // VM sockets to this machine (context id 1), for the nbd target's vsock transport.
    "vsock_loopback",
];

/// Modules loaded where the kernel has them as modules: what `gcm` and `chacha20poly1305` ask
/// for by name, which 6.12 has as modules of their own and 7.3 partly in its crypto library.
pub const GUEST_MODULES_IF_PRESENT: &[&str] = &[
    "ghash_generic",
    "ghash_clmulni_intel",
    "chacha",
    "chacha_generic",
    "chacha_x86_64",
    "poly1305_generic",
    "poly1305_x86_64",
];

/// What a kernel cache was extracted for.
fn module_lists() -> String {
    format!(
        "{} / {}",
        GUEST_MODULES.join(" "),
        GUEST_MODULES_IF_PRESENT.join(" ")
    )
}

/// The private apt configuration's sources.
const APT_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main
";

/// Extra apt configuration (read after the host's `apt.conf.d`, which stays in force for proxies
/// and the like): no host hooks run for our private updates and downloads, no DEP-11 metadata.
const APT_CONF: &str = "\
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";
";

/// The metapackage whose versions tell which cloud kernels the archive currently has.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

#[derive(Debug, Clone, Copy)]
pub struct KernelSpec {
    /// Short name used on the command line and in results (`6.12`).
    pub label: &'static str,
    /// Debian suite the kernel comes from (for the fallback resolution).
    pub suite: &'static str,
    /// Kernel release (`uname -r`).
    pub release: &'static str,
    /// Debian package version of every package in `packages`.
    pub version: &'static str,
    /// Packages holding vmlinuz and the modules.
    pub packages: &'static [&'static str],
}

/// A kernel ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Decompressed modules in load order.
    pub modules: Vec<PathBuf>,
}

pub fn spec(label: &str) -> Result<&'static KernelSpec> {
    KERNELS.iter().find(|k| k.label == label).ok_or_else(|| {
        let known: Vec<_> = KERNELS.iter().map(|k| k.label).collect();
        anyhow!("unknown kernel {label:?}; known: {}", known.join(", "))
    })
}

pub(crate) fn vm_dir() -> PathBuf {
    crate::project_root().join("target/vm")
}

/// Return the kernel for `spec`, downloading and extracting it unless it is cached.
pub fn fetch(spec: &KernelSpec) -> Result<Kernel> {
    let kernels = vm_dir().join("kernels");
    if let Some(k) = load_cached(&kernels.join(spec.release))? {
        return Ok(k);
    }
    let apt = Apt::new(vm_dir().join("apt"))?;
    let updated = apt.update_if_stale()?;
    match fetch_with(&apt, spec, &kernels) {
        Err(e) if !updated => {
            // Lists younger than a day can still be stale (a version just left the archive).
            eprintln!("warning: {e:#}; refreshing the apt lists and trying again");
            apt.update()?;
            fetch_with(&apt, spec, &kernels)
        }
        r => r,
    }
}

fn fetch_with(apt: &Apt, spec: &KernelSpec, kernels: &Path) -> Result<Kernel> {
    let (release, version, packages) = match apt.check_pinned(spec) {
        Ok(()) => (
            spec.release.to_string(),
            spec.version.to_string(),
            spec.packages.iter().map(|s| s.to_string()).collect(),
        ),
        Err(why) => {
            let (rel, ver, pkgs) = apt.resolve_current(spec).with_context(|| {
                format!(
                    "pinned kernel {} is unavailable ({why:#}) and no replacement was found",
                    spec.release
                )
            })?;
            eprintln!(
                "warning: pinned kernel {} {} is not in the archive any more ({why:#}); \
                 using {rel} {ver} instead. Update KERNELS in xtask/src/kernel.rs.",
                spec.release, spec.version
            );
            (rel, ver, pkgs)
        }
    };
    let dir = kernels.join(&release);
    if let Some(k) = load_cached(&dir)? {
        return Ok(k);
    }
    extract(apt, spec.label, &release, &version, &packages, &dir)?;
    load_cached(&dir)?
        .ok_or_else(|| anyhow!("kernel cache {} incomplete after extraction", dir.display()))
}

fn load_cached(dir: &Path) -> Result<Option<Kernel>> {
    if !dir.join(".complete").exists() {
        return Ok(None);
    }
    // A cache made for another module list is extracted again.
    let wanted = module_lists();
    if fs::read_to_string(dir.join("guest-modules")).map_or(true, |m| m.trim() != wanted) {
        return Ok(None);
    }
    let release = fs::read_to_string(dir.join("release"))?.trim().to_string();
    let order = fs::read_to_string(dir.join("modules.order"))?;
    let modules = order
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| dir.join("modules").join(l.trim()))
        .collect();
    Ok(Some(Kernel {
        release,
        vmlinuz: dir.join("vmlinuz"),
        modules,
    }))
}

fn extract(
    apt: &Apt,
    label: &str,
    release: &str,
    version: &str,
    packages: &[String],
    dir: &Path,
) -> Result<()> {
    eprintln!("xtask: fetching kernel {label} ({release} {version}) ...");
    let tmp = dir.with_extension("tmp");
    let _ = fs::remove_dir_all(&tmp);
    let debs = tmp.join("debs");
    let root = tmp.join("root");
    fs::create_dir_all(&debs)?;
    fs::create_dir_all(&root)?;
    for pkg in packages {
        apt.download(pkg, version, &debs)?;
    }
    for entry in fs::read_dir(&debs)? {
        let deb = entry?.path();
        if deb.extension().is_some_and(|e| e == "deb") {
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        }
    }
    let vmlinuz = [
        root.join(format!("boot/vmlinuz-{release}")),
        root.join(format!("usr/lib/modules/{release}/vmlinuz")),
        root.join(format!("lib/modules/{release}/vmlinuz")),
    ]
    .into_iter()
    .find(|p| p.exists())
    .ok_or_else(|| anyhow!("no vmlinuz for {release} in packages {packages:?}"))?;
    let moddir = [
        root.join(format!("usr/lib/modules/{release}")),
        root.join(format!("lib/modules/{release}")),
    ]
    .into_iter()
    .find(|p| p.join("kernel").is_dir())
    .ok_or_else(|| anyhow!("no modules directory for {release} in packages {packages:?}"))?;

    let out = tmp.join("out");
    fs::create_dir_all(out.join("modules"))?;
    fs::copy(&vmlinuz, out.join("vmlinuz"))?;
    let order = collect_modules(&moddir, &out.join("modules"))?;
    fs::write(out.join("modules.order"), order.join("\n") + "\n")?;
    fs::write(out.join("release"), format!("{release}\n"))?;
    fs::write(out.join("package-version"), format!("{version}\n"))?;
    fs::write(out.join("guest-modules"), module_lists() + "\n")?;
    fs::write(out.join(".complete"), "")?;
    let _ = fs::remove_dir_all(dir);
    fs::rename(&out, dir)?;
    fs::remove_dir_all(&tmp)?;
    eprintln!("xtask: kernel {label} cached in {}", dir.display());
    Ok(())
}

/// Find [`GUEST_MODULES`] and their dependencies below `moddir/kernel`, decompress them into
/// `dest` and return their file names in load order.
fn collect_modules(moddir: &Path, dest: &Path) -> Result<Vec<String>> {
    let mut files = BTreeMap::new();
    index_modules(&moddir.join("kernel"), &mut files)?;
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .map(|f| module_name(f).to_string())
        .collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for m in GUEST_MODULES {
        add_module(m, &files, &builtin, &mut done, &mut order, 0)?;
    }
    for m in GUEST_MODULES_IF_PRESENT {
        if files.contains_key(*m) {
            add_module(m, &files, &builtin, &mut done, &mut order, 0)?;
        }
    }
    let mut names = Vec::new();
    for (name, src) in &order {
        let file = format!("{name}.ko");
        decompress(src, &dest.join(&file))?;
        names.push(file);
    }
    Ok(names)
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    done: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    depth: usize,
) -> Result<()> {
    let name = name.replace('-', "_");
    if done.contains(&name) {
        return Ok(());
    }
    if depth > 32 {
        bail!("module dependency loop at {name}");
    }
    let Some(path) = files.get(&name) else {
        if builtin.contains(&name) {
            done.insert(name);
            return Ok(());
        }
        bail!("module {name} is neither a module nor built in");
    };
    let deps = run(Command::new("modinfo").args(["-F", "depends"]).arg(path))?;
    for dep in deps.trim().split(',').filter(|d| !d.is_empty()) {
        add_module(dep, files, builtin, done, order, depth + 1)?;
    }
    done.insert(name.clone());
    order.push((name, path.clone()));
    Ok(())
}

/// `foo-bar.ko.xz` -> `foo_bar` (module names use `_`, file names may use `-`).
fn module_name(file: &str) -> String {
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            index_modules(&path, out)?;
        } else if let Some(f) = path.file_name().and_then(|f| f.to_str()) {
            if f.contains(".ko") {
                out.insert(module_name(f), path.clone());
            }
        }
    }
    Ok(())
}

fn decompress(src: &Path, dest: &Path) -> Result<()> {
    let s = src.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => {
            fs::copy(src, dest)?;
        }
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(src)
                .output()
                .with_context(|| format!("running {tool} (is it installed?)"))?;
            if !out.status.success() {
                bail!(
                    "{tool} -dc {} failed: {}",
                    src.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            fs::write(dest, out.stdout)?;
        }
    }
    Ok(())
}

/// A private apt configuration rooted at `target/vm/apt`.
pub(crate) struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// The private configuration, its package lists refreshed if older than a day.
    pub(crate) fn private() -> Result<Self> {
        let apt = Apt::new(vm_dir().join("apt"))?;
        apt.update_if_stale()?;
        Ok(apt)
    }

    fn new(dir: PathBuf) -> Result<Self> {
        for sub in ["etc", "state", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sources = dir.join("etc/sources.list");
        if fs::read_to_string(&sources).ok().as_deref() != Some(APT_SOURCES) {
            fs::write(&sources, APT_SOURCES)?;
            // Lists from other sources are stale now.
            let _ = fs::remove_file(dir.join("lists/.updated"));
        }
        fs::write(dir.join("etc/apt.conf"), APT_CONF)?;
        let status = dir.join("state/status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        Ok(Self { dir })
    }

    fn opts(&self) -> Vec<String> {
        let d = |p: &str| self.dir.join(p).to_string_lossy().into_owned();
        vec![
            "-c".into(),
            d("etc/apt.conf"),
            format!("-oDir::Etc::SourceList={}", d("etc/sources.list")),
            "-oDir::Etc::SourceParts=/dev/null".into(),
            "-oDir::Etc::Preferences=/dev/null".into(),
            "-oDir::Etc::PreferencesParts=/dev/null".into(),
            format!("-oDir::State={}", d("state")),
            format!("-oDir::State::Lists={}", d("lists")),
            format!("-oDir::State::status={}", d("state/status")),
            format!("-oDir::Cache={}", d("cache")),
            "-oAPT::Architecture=amd64".into(),
            "-oAPT::Architectures::=amd64".into(),
            "-oDebug::NoLocking=1".into(),
            "-oAPT::Sandbox::User=root".into(),
            "-oAcquire::Languages=none".into(),
        ]
    }

    fn cmd(&self, tool: &str) -> Command {
        let mut c = Command::new(tool);
        c.args(self.opts());
        c
    }

    /// `apt-get update` unless the lists are younger than a day; true when it ran.
    fn update_if_stale(&self) -> Result<bool> {
        let stamp = self.dir.join("lists/.updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600));
        if fresh {
            return Ok(false);
        }
        self.update()?;
        Ok(true)
    }

    fn update(&self) -> Result<()> {
        eprintln!(
            "xtask: apt-get update (private configuration in {})",
            self.dir.display()
        );
        let status = self
            .cmd("apt-get")
            .args(["-q", "update"])
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get update failed ({status})");
        }
        fs::write(self.dir.join("lists/.updated"), "")?;
        Ok(())
    }

    fn check_pinned(&self, spec: &KernelSpec) -> Result<()> {
        for pkg in spec.packages {
            let out = self
                .cmd("apt-cache")
                .arg("show")
                .arg(format!("{pkg}={}", spec.version))
                .output()?;
            if !out.status.success() || out.stdout.is_empty() {
                bail!("{pkg}={} not found", spec.version);
            }
        }
        Ok(())
    }

    /// Find the archive's current kernel of the same family as `spec`:
    /// (release, version, packages).
    fn resolve_current(&self, spec: &KernelSpec) -> Result<(String, String, Vec<String>)> {
        let madison = run(self.cmd("apt-cache").args(["madison", META_PACKAGE]))?;
        // "linux-image-cloud-amd64 | 7.3.4-1~bpo13+1 | http://deb.debian.org/debian trixie-backports/main amd64 Packages"
        let rows: Vec<(String, String)> = madison
            .lines()
            .filter_map(|l| {
                let f: Vec<_> = l.split('|').map(str::trim).collect();
                let suite = f
                    .get(2)?
                    .split_whitespace()
                    .nth(1)?
                    .split('/')
                    .next()?
                    .to_string();
                Some((f.get(1)?.to_string(), suite))
            })
            .collect();
        let prefix = format!("{}.", spec.label);
        let meta_version = rows
            .iter()
            .find(|(v, _)| v.starts_with(&prefix))
            .or_else(|| rows.iter().find(|(_, s)| s == spec.suite))
            .map(|(v, _)| v.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{META_PACKAGE} has no version for {} / {}: {madison}",
                    spec.label,
                    spec.suite
                )
            })?;

        let depends = self.depends(META_PACKAGE, &meta_version)?;
        let image = depends
            .iter()
            .find(|d| d.starts_with("linux-image-") && d.as_str() != META_PACKAGE)
            .ok_or_else(|| {
                anyhow!("{META_PACKAGE}={meta_version} depends on no linux-image-*: {depends:?}")
            })?
            .clone();
        let release = image.trim_start_matches("linux-image-").to_string();
        let image_deps = self.depends(&image, &meta_version)?;
        let binary = format!("linux-binary-{release}");
        let modules = format!("linux-modules-{release}");
        let packages = if image_deps.contains(&binary) {
            vec![binary, modules]
        } else {
            vec![image]
        };
        Ok((release, meta_version, packages))
    }

    /// The version of `pkg` apt would install (its candidate) from the private sources.
    pub(crate) fn candidate(&self, pkg: &str) -> Result<String> {
        let policy = run(self.cmd("apt-cache").args(["policy", pkg]))?;
        policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate:"))
            .map(str::trim)
            .filter(|v| !v.is_empty() && *v != "(none)")
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{pkg} is not in the archive"))
    }

    /// Names of the packages `pkg=version` depends on (alternatives flattened).
    fn depends(&self, pkg: &str, version: &str) -> Result<Vec<String>> {
        let show = run(self
            .cmd("apt-cache")
            .arg("show")
            .arg(format!("{pkg}={version}")))?;
        let line = show
            .lines()
            .find_map(|l| l.strip_prefix("Depends:"))
            .ok_or_else(|| anyhow!("{pkg}={version} has no Depends"))?;
        Ok(line
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next())
            .map(|s| s.split(':').next().unwrap_or(s).to_string())
            .collect())
    }

    pub(crate) fn download(&self, pkg: &str, version: &str, into: &Path) -> Result<()> {
        // Always an exact name=version: never a pattern.
        let status = self
            .cmd("apt-get")
            .args(["-q", "download"])
            .arg(format!("{pkg}={version}"))
            .current_dir(into)
            .status()
            .context("running apt-get download")?;
        if !status.success() {
            bail!("apt-get download {pkg}={version} failed ({status})");
        }
        Ok(())
    }
}

/// Run a command, returning its stdout; fail with its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
