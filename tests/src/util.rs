//! Helpers for the in-guest tests: running tools with timeouts, waiting, checksums, parsing
//! `ublk` output, cleaning up.

use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Default limit for one tool invocation.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the `ublk` binary (`UBLK_BIN` overrides, for running outside the VM).
pub fn ublk_bin() -> String {
    std::env::var("UBLK_BIN").unwrap_or_else(|_| "/opt/bin/ublk".to_string())
}

/// A tool from the initramfs' `/opt/bin` (busybox sh would prefer its own applets otherwise).
pub fn opt_bin(name: &str) -> String {
    let p = format!("/opt/bin/{name}");
    if Path::new(&p).exists() {
        p
    } else {
        name.to_string()
    }
}

/// Human-readable form of a command line.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Output of a finished command, as text.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// Collects a pipe in a thread; the data so far stays readable even if the writer never closes
/// it (a daemon that kept its parent's stdout would otherwise hang the caller).
struct PipeReader(Arc<Mutex<(Vec<u8>, bool)>>);

impl PipeReader {
    fn start<R: Read + Send + 'static>(r: Option<R>) -> Self {
        let shared = Arc::new(Mutex::new((Vec::new(), r.is_none())));
        let s2 = shared.clone();
        if let Some(mut r) = r {
            thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => s2.lock().unwrap().0.extend_from_slice(&buf[..n]),
                    }
                }
                s2.lock().unwrap().1 = true;
            });
        }
        PipeReader(shared)
    }

    fn done(&self) -> bool {
        self.0.lock().unwrap().1
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap().0).into_owned()
    }
}

/// Wait for `child` up to `timeout`; kill it (and report the timeout) when it takes longer.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Run `cmd` with a timeout, capturing stdout and stderr. Fails only on spawn errors and timeouts.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Result<Run> {
    let desc = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{desc}`"))?;
    let out = PipeReader::start(child.stdout.take());
    let err = PipeReader::start(child.stderr.take());
    let status = wait_child(&mut child, timeout)?;
    let closed = wait_for("output pipes to close", Duration::from_secs(5), || {
        out.done() && err.done()
    });
    let (stdout, stderr) = (out.text(), err.text());
    match status {
        None => bail!(
            "`{desc}` timed out after {}s (killed); stdout: {:?}; stderr: {:?}",
            timeout.as_secs(),
            tail(&stdout),
            tail(&stderr)
        ),
        Some(status) if closed.is_err() => bail!(
            "`{desc}` exited ({status}) but its stdout/stderr stayed open for 5s \
             (a process it started kept them?); stdout: {:?}; stderr: {:?}",
            tail(&stdout),
            tail(&stderr)
        ),
        Some(status) => Ok(Run {
            status,
            stdout,
            stderr,
        }),
    }
}

fn tail(s: &str) -> String {
    let s = s.trim();
    let cut = s.char_indices().rev().nth(600).map(|(i, _)| i).unwrap_or(0);
    s[cut..].to_string()
}

/// Run `cmd` and require success; the error names the command, status, stderr and stdout.
pub fn check_cmd(cmd: &mut Command, timeout: Duration) -> Result<Run> {
    let desc = describe(cmd);
    let r = run_timeout(cmd, timeout)?;
    if !r.ok() {
        bail!(
            "`{desc}` failed ({}); stderr: {:?}; stdout: {:?}",
            r.status,
            tail(&r.stderr),
            tail(&r.stdout)
        );
    }
    Ok(r)
}

/// `check_cmd` for a program and arguments, with the default timeout; returns stdout.
pub fn sh(prog: &str, args: &[&str]) -> Result<String> {
    Ok(check_cmd(Command::new(prog).args(args), CMD_TIMEOUT)?.stdout)
}

/// `dd if=INPUT of=OUTPUT ARGS... status=none`, to run or to spawn; `args` as dd spells them
/// (`bs=1M`, `count=4`, `seek=8`, `iflag=direct`, `conv=fsync`...).
pub fn dd_cmd(input: impl AsRef<Path>, output: impl AsRef<Path>, args: &[&str]) -> Command {
    let mut c = Command::new("dd");
    c.arg(format!("if={}", input.as_ref().display()))
        .arg(format!("of={}", output.as_ref().display()))
        .args(args)
        .arg("status=none");
    c
}

/// Run [`dd_cmd`] and require success within 120 s.
pub fn dd(input: impl AsRef<Path>, output: impl AsRef<Path>, args: &[&str]) -> Result<()> {
    check_cmd(&mut dd_cmd(input, output, args), Duration::from_secs(120))?;
    Ok(())
}

/// `dd` of `src` onto the block device `bdev` from MiB `seek_mib` on, in 64 KiB O_DIRECT
/// writes, then fsync; to run or to spawn.
pub fn write_dev_cmd(src: impl AsRef<Path>, bdev: &str, seek_mib: u64) -> Command {
    dd_cmd(
        src,
        bdev,
        &[
            "bs=64k",
            &format!("seek={}", seek_mib * 16),
            "oflag=direct",
            "conv=fsync,notrunc",
        ],
    )
}

/// `count` MiB of the block device `bdev` from MiB `skip` on, read with O_DIRECT.
pub fn read_dev(bdev: &str, skip: u64, count: u64) -> Result<Vec<u8>> {
    let out = workdir()?.join("read-back");
    dd(
        bdev,
        &out,
        &[
            "bs=1M",
            &format!("skip={skip}"),
            &format!("count={count}"),
            "iflag=direct",
        ],
    )?;
    Ok(fs::read(&out)?)
}

/// Poll `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!(
                "timed out after {:.1}s waiting for {what}",
                timeout.as_secs_f64()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

pub fn wait_for_path(path: impl AsRef<Path>, timeout: Duration) -> Result<()> {
    let p = path.as_ref();
    wait_for(&format!("{} to appear", p.display()), timeout, || {
        p.exists()
    })
}

pub fn wait_gone(path: impl AsRef<Path>, timeout: Duration) -> Result<()> {
    let p = path.as_ref();
    wait_for(&format!("{} to disappear", p.display()), timeout, || {
        !p.exists()
    })
}

/// sha256 of a file, via busybox `sha256sum`.
pub fn sha256(path: impl AsRef<Path>) -> Result<String> {
    let p = path.as_ref().to_string_lossy().into_owned();
    let out = check_cmd(Command::new("sha256sum").arg(&p), Duration::from_secs(120))?.stdout;
    out.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("sha256sum {p}: empty output"))
}

/// Write `size` bytes of a seeded pseudo-random (never all-zero) pattern to `path`.
pub fn write_pattern(path: impl AsRef<Path>, size: u64, seed: u64) -> Result<()> {
    let mut f = fs::File::create(path.as_ref())
        .with_context(|| format!("create {}", path.as_ref().display()))?;
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// A file of `mib` MiB of zeros written with dd (allocated, not sparse).
pub fn zero_file(path: impl AsRef<Path>, mib: u64) -> Result<()> {
    dd("/dev/zero", path, &["bs=1M", &format!("count={mib}")])
}

/// A sparse file of `mib` MiB.
pub fn sparse_file(path: impl AsRef<Path>, mib: u64) -> Result<()> {
    let f = fs::File::create(path.as_ref())?;
    f.set_len(mib << 20)?;
    Ok(())
}

/// The test's scratch directory (`/tmp/ublk-test`, removed by [`cleanup`]).
pub fn workdir() -> Result<PathBuf> {
    let d = PathBuf::from("/tmp/ublk-test");
    fs::create_dir_all(&d)?;
    Ok(d)
}

/// A scratch directory on ext4 (on a kernel loop device over a tmpfs file), for files whose IO
/// must go through io_uring for real: tmpfs files are served inline by the targets. Unmounted
/// and detached on drop.
pub struct Ext4Scratch {
    pub dir: PathBuf,
    loop_dev: String,
}

impl Ext4Scratch {
    pub fn new(name: &str, mib: u64) -> Result<Ext4Scratch> {
        let file = workdir()?.join(format!("{name}.ext4"));
        sparse_file(&file, mib)?;
        let f = file.to_string_lossy().into_owned();
        let loop_dev = sh(&opt_bin("losetup"), &["-f", "--show", &f])?
            .trim()
            .to_string();
        let dir = PathBuf::from(format!("{MNT_BASE}/{name}"));
        let made = (|| -> Result<()> {
            // Kernel loop over tmpfs fails WRITE_ZEROES (no FALLOC_FL_ZERO_RANGE): zero as
            // little as possible at mkfs and mount time.
            sh(
                &opt_bin("mkfs.ext4"),
                &[
                    "-F",
                    "-q",
                    "-E",
                    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
                    &loop_dev,
                ],
            )?;
            fs::create_dir_all(&dir)?;
            let d = dir.to_string_lossy();
            sh(
                "mount",
                &["-t", "ext4", "-o", "noinit_itable", &loop_dev, &d],
            )?;
            Ok(())
        })();
        if let Err(e) = made {
            let _ = sh(&opt_bin("losetup"), &["-d", &loop_dev]);
            return Err(e);
        }
        Ok(Ext4Scratch { dir, loop_dev })
    }
}

impl Drop for Ext4Scratch {
    fn drop(&mut self) {
        let _ = sh("umount", &[&self.dir.to_string_lossy()]);
        let _ = sh(&opt_bin("losetup"), &["-d", &self.loop_dev]);
    }
}

/// Scheduling policy (`/proc/PID/task/TID/stat` field 41) of each queue thread (`ublkN-qM`) of
/// daemon `pid`: 0 normal, 3 SCHED_BATCH.
pub fn queue_thread_policies(pid: i64) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = fs::read_to_string(e?.path().join("stat"))?;
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            bail!("cannot parse {stat:?}");
        };
        let comm = &stat[open + 1..close];
        if !comm.contains("-q") {
            continue;
        }
        let policy = stat[close + 1..]
            .split_whitespace()
            .nth(41 - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no policy in {stat:?}"))?;
        out.push((comm.to_string(), policy));
    }
    Ok(out)
}

/// The CPUs each thread of daemon `pid` may run on (`Cpus_allowed_list` of
/// `/proc/PID/task/TID/status`), by thread name: `ublkN-qM` for queue threads.
pub fn thread_cpus(pid: i64) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = fs::read_to_string(e?.path().join("status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| anyhow!("no {name} in {status:?}"))
        };
        out.push((field("Name:")?, field("Cpus_allowed_list:")?));
    }
    out.sort();
    Ok(out)
}

/// Mount points used by tests live below this directory.
pub const MNT_BASE: &str = "/mnt/ublk-test";

/// One device as printed by `ublk add|list|recover`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DevInfo {
    pub id: u32,
    pub queues: u32,
    pub depth: u32,
    pub block_size: u64,
    /// In 512-byte sectors.
    pub capacity: u64,
    pub max_rq: u64,
    pub pid: i64,
    pub flags: u64,
    pub state: String,
}

impl DevInfo {
    pub fn bdev(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }
    pub fn cdev(&self) -> String {
        format!("/dev/ublkc{}", self.id)
    }
}

fn after<'a>(words: &[&'a str], key: &[&str]) -> Option<&'a str> {
    words
        .windows(key.len() + 1)
        .find(|w| w[..key.len()] == *key)
        .map(|w| w[key.len()].trim_end_matches([':', ',']))
}

fn num<T: std::str::FromStr>(words: &[&str], key: &[&str]) -> Option<T> {
    after(words, key)?.parse().ok()
}

/// Parse every `dev id N: ...` block in `text`.
pub fn parse_devs(text: &str) -> Vec<DevInfo> {
    let mut devs: Vec<DevInfo> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if line.trim_start().starts_with("dev id ") {
            let Some(id) = num(&words, &["dev", "id"]) else {
                continue;
            };
            devs.push(DevInfo {
                id,
                queues: num(&words, &["nr_hw_queues"]).unwrap_or(0),
                depth: num(&words, &["queue_depth"]).unwrap_or(0),
                block_size: num(&words, &["block", "size"]).unwrap_or(0),
                capacity: num(&words, &["dev_capacity"]).unwrap_or(0),
                ..DevInfo::default()
            });
        } else if let Some(d) = devs.last_mut() {
            if let Some(v) = num(&words, &["max", "rq", "size"]) {
                d.max_rq = v;
            }
            if let Some(v) = num(&words, &["daemon", "pid"]) {
                d.pid = v;
            }
            if let Some(v) = after(&words, &["flags"]) {
                d.flags = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0);
            }
            if let Some(v) = after(&words, &["state"]) {
                d.state = v.to_string();
            }
        }
    }
    devs
}

/// Parse the one device `ublk add|recover` printed.
pub fn parse_one(what: &str, r: &Run) -> Result<DevInfo> {
    let devs = parse_devs(&r.stdout);
    match devs.as_slice() {
        [d] => Ok(d.clone()),
        _ => bail!(
            "could not parse one `dev id N: ...` block from `{what}` output (stdout {:?}, stderr {:?})",
            tail(&r.stdout),
            tail(&r.stderr)
        ),
    }
}

/// `ublk ARGS` with the default timeout, not requiring success.
pub fn ublk(args: &[&str]) -> Result<Run> {
    run_timeout(Command::new(ublk_bin()).args(args), CMD_TIMEOUT)
}

/// `ublk ARGS`, requiring success.
pub fn ublk_ok(args: &[&str]) -> Result<Run> {
    check_cmd(Command::new(ublk_bin()).args(args), CMD_TIMEOUT)
}

/// `ublk add ARGS`: the new device, after checking its block device exists.
pub fn ublk_add(args: &[&str]) -> Result<DevInfo> {
    let mut full = vec!["add"];
    full.extend_from_slice(args);
    let r = ublk_ok(&full)?;
    let d = parse_one(&format!("ublk {}", full.join(" ")), &r)?;
    wait_for_path(d.bdev(), Duration::from_secs(5))
        .context("`ublk add` returned before the block device existed")?;
    println!(
        "added {} (pid {}, flags {:#x}, state {})",
        d.bdev(),
        d.pid,
        d.flags,
        d.state
    );
    Ok(d)
}

/// `ublk list -n ID`.
pub fn ublk_list_one(id: u32) -> Result<DevInfo> {
    let r = ublk_ok(&["list", "-n", &id.to_string()])?;
    parse_one(&format!("ublk list -n {id}"), &r)
}

/// `ublk del -n ID`, then wait for both device nodes to go away.
pub fn ublk_del(id: u32) -> Result<()> {
    ublk_ok(&["del", "-n", &id.to_string()])?;
    wait_gone(format!("/dev/ublkb{id}"), Duration::from_secs(10))?;
    wait_gone(format!("/dev/ublkc{id}"), Duration::from_secs(10))?;
    Ok(())
}

/// All `/dev/ublkc*` nodes.
pub fn ublk_char_devs() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/dev")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ublkc"))
                .map(|n| format!("/dev/{n}"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `(major, minor)` of the running kernel.
pub fn kernel_version() -> Result<(u32, u32)> {
    let rel = fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut it = rel.trim().split(['.', '-', '+']);
    let major = it.next().and_then(|s| s.parse().ok());
    let minor = it.next().and_then(|s| s.parse().ok());
    match (major, minor) {
        (Some(a), Some(b)) => Ok((a, b)),
        _ => bail!("cannot parse kernel release {rel:?}"),
    }
}

/// Is `pid` a live (not zombie) process?
pub fn alive(pid: i64) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// `kill -SIG pid` via the kill applet.
pub fn kill(pid: i64, sig: &str) -> Result<()> {
    sh("kill", &[&format!("-{sig}"), &pid.to_string()]).map(|_| ())
}

/// Pids of processes running `exe` (from /proc/PID/exe).
pub fn pids_of_exe(exe: &str) -> Vec<i64> {
    procs()
        .into_iter()
        .filter(|(_, e, _)| e == exe)
        .map(|(p, _, _)| p)
        .collect()
}

/// (pid, exe, process group) of every process.
fn procs() -> Vec<(i64, String, i64)> {
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pgrp = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(2)?.parse().ok())
            })
            .unwrap_or(0);
        v.push((pid, exe, pgrp));
    }
    v
}

/// SIGKILL every process in process group `pgrp`.
pub fn kill_group(pgrp: i64) {
    for (pid, _, g) in procs() {
        if g == pgrp && pid != std::process::id() as i64 {
            let _ = kill(pid, "9");
        }
    }
}

/// Undo whatever a test left behind. Returns notes about what had to be cleaned.
pub fn cleanup() -> Vec<String> {
    let mut notes = Vec::new();
    // 1. Unmount test file systems and anything on a ublk disk.
    if let Ok(mounts) = fs::read_to_string("/proc/mounts") {
        let mut targets: Vec<String> = mounts
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let (src, dst) = (w.next()?, w.next()?);
                (src.starts_with("/dev/ublkb") || dst.starts_with(MNT_BASE))
                    .then(|| dst.to_string())
            })
            .collect();
        targets.reverse();
        for t in targets {
            notes.push(format!("unmounted {t}"));
            if !run_timeout(Command::new("umount").arg(&t), Duration::from_secs(20))
                .map(|r| r.ok())
                .unwrap_or(false)
            {
                let _ = run_timeout(
                    Command::new("umount").args(["-l", &t]),
                    Duration::from_secs(20),
                );
            }
        }
    }
    // 2. Stray fio.
    for pid in pids_of_exe("/opt/bin/fio") {
        notes.push(format!("killed fio {pid}"));
        let _ = kill(pid, "9");
    }
    // 3. Devices, then daemons, then devices again (del may hang on a stuck daemon).
    let had_devs = ublk_char_devs();
    if !had_devs.is_empty() {
        notes.push(format!("devices left: {}", had_devs.join(" ")));
        if let Err(e) = ublk(&["del", "-a"]) {
            notes.push(format!("ublk del -a: {e:#}"));
        }
    }
    let daemons = pids_of_exe(&ublk_bin());
    if !daemons.is_empty() {
        notes.push(format!("killed ublk processes {daemons:?}"));
        for pid in &daemons {
            let _ = kill(*pid, "9");
        }
        let _ = wait_for("ublk processes to exit", Duration::from_secs(5), || {
            daemons.iter().all(|p| !alive(*p))
        });
    }
    if !ublk_char_devs().is_empty() {
        let _ = ublk(&["del", "-a"]);
        let _ = wait_for("ublk devices to go", Duration::from_secs(5), || {
            ublk_char_devs().is_empty()
        });
        let left = ublk_char_devs();
        if !left.is_empty() {
            notes.push(format!(
                "WARNING: devices still present after cleanup: {}",
                left.join(" ")
            ));
        }
    }
    // 4. Trace recording left on by a failed test (events stay enabled: see flush test).
    let on = Path::new("/sys/kernel/tracing/tracing_on");
    if on.exists() {
        let _ = fs::write(on, "0");
    }
    // 5. Scratch files.
    let _ = fs::remove_dir_all("/tmp/ublk-test");
    let _ = fs::remove_dir_all(MNT_BASE);
    notes
}

/// Run fio with `args` (plus `--output-format=json --clocksource=clock_gettime`); require exit 0
/// and no job errors; return the parsed JSON.
pub fn fio(args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
    fio_as(&[], args, timeout)
}

/// [`fio`] run through the command `prefix` (e.g. `setpriv --reuid=...`), if not empty.
pub fn fio_as(prefix: &[&str], args: &[&str], timeout: Duration) -> Result<serde_json::Value> {
    let fio = opt_bin("fio");
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(&fio);
            c
        }
        None => Command::new(&fio),
    };
    cmd.args(["--output-format=json", "--clocksource=clock_gettime"])
        .args(args);
    let desc = describe(&cmd);
    let r = run_timeout(&mut cmd, timeout)?;
    let json = r
        .stdout
        .find('{')
        .and_then(|i| serde_json::from_str::<serde_json::Value>(&r.stdout[i..]).ok());
    if !r.ok() {
        bail!(
            "`{desc}` failed ({}); stderr: {:?}; stdout: {:?}",
            r.status,
            tail(&r.stderr),
            tail(&r.stdout)
        );
    }
    let json = json.ok_or_else(|| anyhow!("`{desc}`: no JSON in output {:?}", tail(&r.stdout)))?;
    for job in json["jobs"].as_array().into_iter().flatten() {
        let err = job["error"].as_i64().unwrap_or(0);
        if err != 0 {
            bail!(
                "`{desc}`: job {} error {err}; stderr: {:?}",
                job["jobname"],
                tail(&r.stderr)
            );
        }
    }
    Ok(json)
}

/// A file of `sysfs` as a trimmed string.
pub fn read_trim(path: impl AsRef<Path>) -> Result<String> {
    let p = path.as_ref();
    Ok(fs::read_to_string(p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_string())
}

/// Allocated bytes of a file (`stat -c '%b %B'`).
pub fn allocated_bytes(path: impl AsRef<Path>) -> Result<u64> {
    let p = path.as_ref().to_string_lossy().into_owned();
    let out = sh("stat", &["-c", "%b %B", &p])?;
    let mut w = out.split_whitespace().map(|s| s.parse::<u64>());
    match (w.next(), w.next()) {
        (Some(Ok(blocks)), Some(Ok(bsize))) => Ok(blocks * bsize),
        _ => bail!("cannot parse stat output {out:?}"),
    }
}

/// fio in a thread: 4k random writes of `size` at QD32 with crc32c checksums, verified at the
/// end (fatal on the first mismatch), for tests that disturb the device meanwhile.
pub fn spawn_fio_verify(
    name: &str,
    bdev: &str,
    size: &str,
) -> std::thread::JoinHandle<Result<serde_json::Value>> {
    let args = [
        format!("--name={name}"),
        format!("--filename={bdev}"),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={size}"),
        "--iodepth=32".into(),
        "--ioengine=io_uring".into(),
        "--direct=1".into(),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
    ];
    std::thread::spawn(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fio(&a, Duration::from_secs(180))
    })
}

/// Data-integrity pass on a block device: a 4k random-write and a 128k sequential-write fio job,
/// each writing `sizes.0` / `sizes.1` with crc32c checksums and verifying them (fatal on the first
/// mismatch), at `iodepth`.
pub fn fio_verify(bdev: &str, iodepth: u32, sizes: (&str, &str), timeout: Duration) -> Result<()> {
    fio_verify_as(&[], bdev, iodepth, sizes, timeout)
}

/// [`fio_verify`] with fio run through the command `prefix` (see [`fio_as`]).
pub fn fio_verify_as(
    prefix: &[&str],
    bdev: &str,
    iodepth: u32,
    sizes: (&str, &str),
    timeout: Duration,
) -> Result<()> {
    for (rw, bs, size) in [("randwrite", "4k", sizes.0), ("write", "128k", sizes.1)] {
        let t = std::time::Instant::now();
        fio_as(
            prefix,
            &[
                "--name=verify",
                &format!("--filename={bdev}"),
                &format!("--rw={rw}"),
                &format!("--bs={bs}"),
                &format!("--size={size}"),
                &format!("--iodepth={iodepth}"),
                "--ioengine=io_uring",
                "--direct=1",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
            timeout,
        )
        .with_context(|| format!("fio {rw} bs={bs} verify on {bdev}"))?;
        println!(
            "verify {rw} bs={bs} size={size} iodepth={iodepth}: ok in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `e2fsck -fn` on `bdev` finds nothing to fix.
pub fn e2fsck_clean(bdev: &str) -> Result<()> {
    let r = run_timeout(
        Command::new(opt_bin("e2fsck")).args(["-fn", bdev]),
        Duration::from_secs(120),
    )?;
    anyhow::ensure!(
        r.ok(),
        "e2fsck -fn {bdev} found problems ({}): {} {}",
        r.status,
        r.stdout.trim(),
        r.stderr.trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dev_blocks() {
        let text = "dev id 3: nr_hw_queues 2 queue_depth 128 block size 512 dev_capacity 2097152\n\
                    \tmax rq size 524288 daemon pid 77 flags 0x42 state LIVE\n\
                    \tqueue 0: tid 78 affinity(0)\n\
                    dev id 7: nr_hw_queues 1 queue_depth 64 block size 4096 dev_capacity 8\n\
                    \tmax rq size 1048576 daemon pid -1 flags 0x2 state DEAD\n";
        let d = parse_devs(text);
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[0],
            DevInfo {
                id: 3,
                queues: 2,
                depth: 128,
                block_size: 512,
                capacity: 2097152,
                max_rq: 524288,
                pid: 77,
                flags: 0x42,
                state: "LIVE".into()
            }
        );
        assert_eq!(d[1].id, 7);
        assert_eq!(d[1].pid, -1);
        assert_eq!(d[1].state, "DEAD");
    }
}
