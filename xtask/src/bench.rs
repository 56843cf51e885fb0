//! `cargo xtask bench`: boot each kernel once under qemu and run a fixed fio matrix against kernel
//! baselines (null_blk, loop with direct IO, qemu-nbd + the kernel nbd driver, nbd-client) and our
//! ublk devices, in the same boot.
//!
//! The guest side is `xtask/guest/bench.sh` (`/opt/bin/ublk-bench` in the initramfs). It writes
//! its results to the guest's second serial port, which qemu saves to
//! `target/vm/bench-<kernel>.out`; progress and kernel messages stay on the console
//! (`target/vm/bench-<kernel>.log`). This module parses the results, prints the tables and writes
//! `docs/benchmarks.md`.

use crate::initramfs::Mode;
use crate::json::{self, Value};
use crate::kernel::KernelSpec;
use crate::vm::{self, Boot};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

/// Seconds per fio run by default and with `--quick`.
pub const DEFAULT_RUNTIME: u64 = 5;
pub const QUICK_RUNTIME: u64 = 3;

/// Guest memory: the raw file and the qcow2 image live on tmpfs.
const BENCH_MEM: &str = "4G";

/// Clock ticks per second in the guest (`CONFIG_HZ` does not matter: /proc reports USER_HZ).
const CLK_TCK: f64 = 100.0;

/// The fio jobs, in the guest script's spelling and order.
const JOBS: &[&str] = &[
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd32",
    "read-128k-qd8",
    "write-128k-qd8",
];

/// A device of a group: guest name, display name, baseline (guest name, same group).
type Device = (&'static str, &'static str, Option<&'static str>);

/// The guest script's groups in run and table order, each with its devices in table order. A
/// device name may appear in several groups (our qcow2 is measured against our loop and against
/// qemu-nbd); runs are told apart by group.
const GROUPS: &[(&str, &[Device])] = &[
    (
        "null",
        &[
            ("null_blk", "null_blk", None),
            ("ublk_null", "ublk null", Some("null_blk")),
            ("ublk_null_c", "ublk null --copy", Some("null_blk")),
            ("ublk_null_z", "ublk null -z", Some("null_blk")),
            ("ublk_null_b", "ublk null -b", Some("null_blk")),
            ("rublk_null", "rublk null", Some("null_blk")),
            ("rublk_null_u", "rublk null -u", Some("null_blk")),
            ("kublk_null", "kublk null", Some("null_blk")),
            ("kublk_null_u", "kublk null -u", Some("null_blk")),
        ],
    ),
    (
        "loop",
        &[
            ("loop", "loop (dio)", None),
            ("ublk_loop", "ublk loop", Some("loop")),
            ("ublk_loop_g", "ublk loop -g", Some("loop")),
            ("ublk_loop_c", "ublk loop --copy", Some("loop")),
            ("ublk_loop_z", "ublk loop -z", Some("loop")),
            ("ublk_loop_b", "ublk loop -b", Some("loop")),
            ("ublk_qcow2", "ublk qcow2", Some("ublk_loop")),
            ("rublk_loop", "rublk loop", Some("loop")),
            ("kublk_loop", "kublk loop", Some("loop")),
            ("kublk_loop_z", "kublk loop -z", Some("loop")),
        ],
    ),
    (
        "qcow2",
        &[
            ("qemu_nbd", "qemu-nbd + nbd", None),
            ("ublk_qcow2", "ublk qcow2", Some("qemu_nbd")),
            ("rublk_qcow2", "rublk qcow2", Some("qemu_nbd")),
        ],
    ),
    (
        "nbd",
        &[
            ("nbd", "nbd-client", None),
            ("ublk_nbd", "ublk nbd", Some("nbd")),
            ("ublk_nbd_t", "ublk nbd threads", Some("nbd")),
            ("ublk_nbd_b", "ublk nbd -b", Some("nbd")),
            ("ublk_nbd_z", "ublk nbd -z", Some("nbd")),
        ],
    ),
    (
        "nbd_apart",
        &[
            ("nbd_sa", "nbd-client, server apart", None),
            ("ublk_nbd_sa", "ublk nbd, server apart", Some("nbd_sa")),
            (
                "ublk_nbd_c_sa",
                "ublk nbd --copy, server apart",
                Some("nbd_sa"),
            ),
            ("ublk_nbd_z_sa", "ublk nbd -z, server apart", Some("nbd_sa")),
        ],
    ),
];

/// Our devices against rublk's (with `--rublk`), like for like: (group, ours, rublk's).
const RUBLK_PAIRS: &[(&str, &str, &str)] = &[
    ("null", "ublk_null", "rublk_null_u"),
    ("null", "ublk_null_c", "rublk_null"),
    ("loop", "ublk_loop_c", "rublk_loop"),
    ("qcow2", "ublk_qcow2", "rublk_qcow2"),
];

/// Our devices against kublk's (with `--kublk`), like for like: (group, ours, kublk's).
const KUBLK_PAIRS: &[(&str, &str, &str)] = &[
    ("null", "ublk_null", "kublk_null_u"),
    ("null", "ublk_null_c", "kublk_null"),
    ("loop", "ublk_loop", "kublk_loop"),
    ("loop", "ublk_loop_c", "kublk_loop"),
    ("loop", "ublk_loop_z", "kublk_loop_z"),
];

/// Number of fio runs per boot, at most (2 queue counts x jobs x devices of every group; the
/// nbd_apart group runs with one queue only).
const RUNS_PER_BOOT: u64 = {
    let mut n = 0;
    let mut i = 0;
    while i < GROUPS.len() {
        n += GROUPS[i].1.len() as u64;
        i += 1;
    }
    2 * JOBS.len() as u64 * n
};

/// What the issues ask for: (issue, group, device, [(job, minimum IOPS ratio to the device's
/// baseline in that group)]).
type Target = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, f64)],
);
const TARGETS: &[Target] = &[
    (
        "3",
        "qcow2",
        "ublk_qcow2",
        &[
            ("randread-4k-qd32", 3.0),
            ("randwrite-4k-qd32", 3.0),
            ("read-128k-qd8", 3.0),
        ],
    ),
    (
        "3",
        "loop",
        "ublk_qcow2",
        &[
            ("randread-4k-qd32", 0.85),
            ("randwrite-4k-qd32", 0.85),
            ("read-128k-qd8", 0.85),
        ],
    ),
    (
        "4",
        "nbd",
        "ublk_nbd",
        &[
            ("randread-4k-qd32", 1.1),
            ("randwrite-4k-qd32", 1.1),
            ("read-128k-qd8", 1.0),
            ("write-128k-qd8", 1.0),
        ],
    ),
    (
        "4",
        "nbd_apart",
        "ublk_nbd_sa",
        &[
            ("randread-4k-qd32", 1.1),
            ("randwrite-4k-qd32", 1.1),
            ("read-128k-qd8", 1.0),
            ("write-128k-qd8", 1.0),
        ],
    ),
    (
        "5",
        "null",
        "ublk_null",
        &[
            ("randread-4k-qd32", 0.97),
            ("randwrite-4k-qd32", 0.97),
            ("read-128k-qd8", 0.9),
        ],
    ),
    (
        "5",
        "loop",
        "ublk_loop",
        &[
            // QD1 latency at most 1.1 times kernel loop's: at QD1 IOPS are 1 / latency.
            ("randread-4k-qd1", 1.0 / 1.1),
            ("randread-4k-qd32", 1.0),
            ("randwrite-4k-qd32", 1.0),
            ("read-128k-qd8", 0.8),
        ],
    ),
    (
        "5",
        "loop",
        "ublk_loop_c",
        &[
            ("randread-4k-qd1", 1.0 / 1.1),
            ("randread-4k-qd32", 1.0),
            ("randwrite-4k-qd32", 1.0),
            ("read-128k-qd8", 0.8),
        ],
    ),
];

#[derive(Debug)]
pub struct BenchOptions {
    pub kernels: Vec<&'static KernelSpec>,
    pub quick: bool,
    pub runtime: Option<u64>,
    /// Rounds of each job per device (interleaved with the other devices of the group).
    pub repeat: u32,
    pub filter: Option<String>,
    pub timeout: Option<u64>,
    pub quiet: bool,
    pub no_build: bool,
    pub no_docs: bool,
    /// Seconds to wait, before each boot, for the host to be idle (0: do not wait).
    pub wait_quiet: u64,
    /// Do not boot: rebuild the tables and the document from the saved results.
    pub rerender: bool,
    /// A rublk binary to measure beside ours.
    pub rublk: Option<std::path::PathBuf>,
    /// A kublk binary to measure beside ours.
    pub kublk: Option<std::path::PathBuf>,
    /// Extra words for the guest kernel's command line.
    pub kernel_args: Vec<String>,
    /// The nbd group's server: `qemu-nbd` or `nbdkit`.
    pub nbd_server: String,
}

/// One fio run as reported by the guest.
#[derive(Debug, Clone)]
struct Run {
    group: String,
    queues: u32,
    dev: String,
    job: String,
    /// Which of the job's rounds (1 without `--repeat`).
    round: u32,
    rc: i32,
    iops: f64,
    bw_bytes: f64,
    /// Standard deviation of fio's per-interval IOPS samples, relative to their mean.
    iops_sd: Option<f64>,
    lat_mean_ns: f64,
    lat_p99_ns: f64,
    ios: f64,
    daemon_ticks: u64,
    sys_busy: u64,
    sys_total: u64,
    /// The steady-state window (runs of 3 s or more): guest busy ticks, IOs the device
    /// completed, daemon ticks.
    win_busy: Option<u64>,
    win_ios: Option<u64>,
    win_daemon: Option<u64>,
    /// The run had a user-space server process of its own (ours, or qemu-nbd for `qemu_nbd`):
    /// the daemon figures are its.
    has_daemon: bool,
    /// Ticks of the NBD server (qemu-nbd) that both NBD clients talk to, whole run and window.
    server_ticks: Option<u64>,
    win_server: Option<u64>,
    /// Timeslices of the daemon's threads (times switched in: wake-ups) and context switches
    /// of the whole guest, in the window.
    win_slices: Option<u64>,
    win_ctxt: Option<u64>,
    /// Per-thread daemon ticks and timeslices during the run (threads with either non-zero).
    threads: Vec<ThreadUse>,
    error: Option<String>,
}

impl Run {
    fn ok(&self) -> bool {
        self.rc == 0 && self.error.is_none() && self.ios > 0.0
    }
    /// IOs and (daemon, guest busy, server) ticks of the steady-state window if there is one,
    /// else of the whole fio invocation.
    fn cpu_sample(&self) -> Option<(f64, u64, u64, Option<u64>)> {
        if !self.ok() {
            return None;
        }
        match (self.win_ios, self.win_busy, self.win_daemon) {
            (Some(ios), Some(busy), Some(daemon)) if ios > 0 => {
                Some((ios as f64, daemon, busy, self.win_server))
            }
            _ => Some((
                self.ios,
                self.daemon_ticks,
                self.sys_busy,
                self.server_ticks,
            )),
        }
    }
    /// Daemon CPU time (all its threads) per IO in microseconds.
    fn daemon_us(&self) -> Option<f64> {
        let (ios, daemon, _, _) = self.cpu_sample()?;
        self.has_daemon.then(|| daemon as f64 / CLK_TCK * 1e6 / ios)
    }
    /// Busy time of all guest CPUs per IO in microseconds.
    fn guest_us(&self) -> Option<f64> {
        let (ios, _, busy, _) = self.cpu_sample()?;
        Some(busy as f64 / CLK_TCK * 1e6 / ios)
    }
    /// Daemon wake-ups (timeslices of all its threads) per IO, in the window.
    fn daemon_wakeups(&self) -> Option<f64> {
        let ios = self.win_ios.filter(|&n| n > 0 && self.ok())?;
        self.has_daemon
            .then_some(self.win_slices?)
            .map(|s| s as f64 / ios as f64)
    }
    /// Context switches of the whole guest per IO, in the window.
    fn guest_switches(&self) -> Option<f64> {
        let ios = self.win_ios.filter(|&n| n > 0 && self.ok())?;
        Some(self.win_ctxt? as f64 / ios as f64)
    }
    /// CPU time of the NBD server per IO in microseconds (nbd group only).
    fn server_us(&self) -> Option<f64> {
        let (ios, _, _, server) = self.cpu_sample()?;
        server.map(|t| t as f64 / CLK_TCK * 1e6 / ios)
    }
}

/// One daemon thread's use during a run (`iou-wrk-*` workers of one thread added up).
#[derive(Debug, Clone, PartialEq)]
struct ThreadUse {
    comm: String,
    ticks: u64,
    /// Times it was switched in (`/proc/PID/task/TID/schedstat`), if the kernel reports it.
    slices: Option<u64>,
}

#[derive(Debug, Clone)]
struct Skip {
    group: String,
    queues: u32,
    dev: String,
    reason: String,
}

#[derive(Debug)]
struct KernelResults {
    label: String,
    release: String,
    runs: Vec<Run>,
    skips: Vec<Skip>,
    /// `@@INFO key=value@@` lines: the guest's, then the host's (`host.*`).
    infos: Vec<(String, String)>,
    /// The guest printed `@@DONE@@` (it finished the matrix).
    done: bool,
    /// The guest's exit status, `None` if it never reported one.
    rc: Option<i32>,
    timed_out: bool,
    /// Seconds of the whole boot.
    total: f64,
}

impl KernelResults {
    fn parse(label: &str, text: &str) -> Self {
        let (runs, skips, infos, done) = parse_results(text);
        let info = |k: &str| {
            infos
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        Self {
            label: label.to_string(),
            release: info("kernel")
                .or_else(|| info("host.release"))
                .unwrap_or_default(),
            rc: info("host.rc").and_then(|r| r.parse().ok()),
            timed_out: info("host.timed_out").as_deref() == Some("true"),
            total: info("host.total")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0.0),
            runs,
            skips,
            infos,
            done,
        }
    }

    fn info(&self, key: &str) -> Option<&str> {
        self.infos
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn finished(&self) -> bool {
        self.rc == Some(0) && self.done && !self.runs.is_empty()
    }
}

pub fn run(opts: &BenchOptions) -> Result<ExitCode> {
    let runtime = opts.runtime.unwrap_or(if opts.quick {
        QUICK_RUNTIME
    } else {
        DEFAULT_RUNTIME
    });
    if runtime == 0 {
        bail!("--runtime must be at least 1 second");
    }
    if opts.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    if let Some(f) = &opts.filter {
        vm::check_word("--filter", f)?;
    }
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let date = crate::kernel::run(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mut bins = if opts.rerender {
        Vec::new()
    } else {
        vm::build_binaries(opts.no_build)?
    };
    for (flag, name, path) in [
        ("--rublk", "rublk", &opts.rublk),
        ("--kublk", "kublk", &opts.kublk),
    ] {
        if let (Some(path), false) = (path, opts.rerender) {
            bins.push(peer_binary(flag, name, path)?);
        }
    }
    let timeout = Duration::from_secs(
        opts.timeout
            .unwrap_or(300 + RUNS_PER_BOOT * u64::from(opts.repeat) * (runtime + 6)),
    );

    let mut all = Vec::new();
    for spec in &opts.kernels {
        let dir = vm::target_dir().join("vm");
        let out_path = dir.join(format!("bench-{}.out", spec.label));
        if !opts.rerender {
            let host = boot_and_bench(spec, &bins, opts, runtime, timeout, &out_path)?;
            // Host-side facts go into the same file, so that --rerender has everything.
            let mut text = String::new();
            for (k, v) in [
                ("host.date", date.clone()),
                ("host.command", command.clone()),
                ("host.runtime", runtime.to_string()),
                ("host.repeat", opts.repeat.to_string()),
                ("host.commit", git_commit()),
            ]
            .into_iter()
            .chain(host)
            {
                let _ = writeln!(text, "@@INFO {k}={v}@@");
            }
            let mut f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&out_path)?;
            std::io::Write::write_all(&mut f, text.as_bytes())?;
        }
        let text = fs::read(&out_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .with_context(|| format!("reading {}", out_path.display()))?;
        let k = KernelResults::parse(spec.label, &text);
        eprintln!(
            "xtask: {} ({}): {} runs, {} skipped, guest rc {:?}, {:.0}s{}",
            k.label,
            k.release,
            k.runs.len(),
            k.skips.len(),
            k.rc,
            k.total,
            if k.timed_out { ", TIMED OUT" } else { "" }
        );
        all.push(k);
    }

    let mut failed = false;
    println!();
    for k in &all {
        println!("==== ublk bench: {} ({}) ====", k.label, k.release);
        println!();
        print!("{}", summary_table(k));
        println!();
        for pairs in [RUBLK_PAIRS, KUBLK_PAIRS] {
            let t = peer_table(k, pairs);
            if !t.is_empty() {
                print!("{t}");
                println!();
            }
        }
        print!("{}", targets_table(k));
        println!();
        print!("{}", full_table(k));
        for s in &k.skips {
            println!("SKIP {} q{} {}: {}", s.group, s.queues, s.dev, s.reason);
        }
        if !k.skips.is_empty() {
            // A device that could not be set up (a tool or module missing, a server that did
            // not start) leaves its comparison empty: that is a failure, not a quiet gap.
            failed = true;
            println!(
                "FAIL {}: {} device(s) could not be set up (SKIP lines above); their rows and ratios are missing",
                k.label,
                k.skips.len()
            );
        }
        for r in k.runs.iter().filter(|r| !r.ok()) {
            failed = true;
            println!(
                "FAIL {} q{} {} {}: {}",
                r.group,
                r.queues,
                r.dev,
                r.job,
                r.error.as_deref().unwrap_or("fio failed")
            );
        }
        if !k.finished() {
            failed = true;
            println!(
                "FAIL {}: guest did not finish the matrix (rc {:?}{}); console log in target/vm/bench-{}.log",
                k.label,
                k.rc,
                if k.timed_out { ", timed out" } else { "" },
                k.label
            );
        }
        println!();
    }

    let filtered = opts.filter.as_deref().is_some_and(|f| !f.is_empty());
    if !opts.no_docs && !filtered && !all.is_empty() {
        let path = crate::project_root().join("docs/benchmarks.md");
        let old = fs::read_to_string(&path).unwrap_or_default();
        let doc = render_doc(&all, notes_of(&old));
        fs::write(&path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Boot `spec` once in bench mode with the results going to `out_path`; returns host-side facts
/// as `host.*` key/value pairs.
fn boot_and_bench(
    spec: &KernelSpec,
    bins: &[std::path::PathBuf],
    opts: &BenchOptions,
    runtime: u64,
    timeout: Duration,
    out_path: &std::path::Path,
) -> Result<Vec<(&'static str, String)>> {
    if opts.wait_quiet > 0 {
        wait_quiet(Duration::from_secs(opts.wait_quiet));
    }
    let (kernel, initrd) = vm::prepare(spec, bins, &Mode::Bench)?;
    let _ = fs::remove_file(out_path);
    let mut append = vm::base_append(spec.label);
    append.push_str(&format!(
        " UBLK_BENCH_RUNTIME={runtime} UBLK_BENCH_REPEAT={}",
        opts.repeat
    ));
    if let Some(f) = opts.filter.as_deref().filter(|f| !f.is_empty()) {
        append.push_str(&format!(" UBLK_BENCH_FILTER={f}"));
    }
    append.push_str(&format!(" UBLK_BENCH_NBD_SERVER={}", opts.nbd_server));
    for w in &opts.kernel_args {
        vm::check_word("--kernel-arg", w)?;
        append.push(' ');
        append.push_str(w);
    }
    let mut serial1 = OsString::from("file:");
    serial1.push(out_path);
    let boot = Boot {
        label: spec.label,
        kernel: &kernel,
        initrd: &initrd,
        append,
        mem: BENCH_MEM,
        extra_args: vec!["-serial".into(), serial1],
        timeout,
        quiet: opts.quiet,
        log_path: vm::target_dir().join(format!("vm/bench-{}.log", spec.label)),
    };
    let load_before = loadavg();
    let (host0, kids0) = (host_busy_ticks(), children_ticks());
    let mut loads: Vec<f64> = Vec::new();
    let outcome = vm::run_guest_retrying(&boot, |line| {
        if line.starts_with("bench: ") {
            if let Some(l) = loadavg()
                .split_whitespace()
                .next()
                .and_then(|l| l.parse().ok())
            {
                loads.push(l);
            }
            if opts.quiet {
                println!("{}| {line}", spec.label);
            }
        }
    })?;
    let load_after = loadavg();
    let (host1, kids1) = (host_busy_ticks(), children_ticks());
    let mut facts = vec![
        ("host.release", kernel.release.clone()),
        ("host.load_before", load_before),
        ("host.load_after", load_after),
        (
            "host.rc",
            outcome.rc.map_or("none".into(), |r| r.to_string()),
        ),
        ("host.timed_out", outcome.timed_out.to_string()),
        ("host.total", format!("{:.1}", outcome.total)),
    ];
    if let (Some(lo), Some(hi)) = (
        loads.iter().copied().reduce(f64::min),
        loads.iter().copied().reduce(f64::max),
    ) {
        facts.push(("host.load_range", format!("{lo:.1}-{hi:.1}")));
    }
    // Host busy time minus qemu's (the only child waited for during the boot).
    if let (Some(h0), Some(h1), Some(k0), Some(k1)) = (host0, host1, kids0, kids1) {
        if outcome.total > 0.0 {
            let other = (h1 - h0 - (k1 - k0)).max(0.0) / outcome.total;
            facts.push(("host.other_cpus", format!("{other:.2}")));
        }
    }
    Ok(facts)
}

/// Busy seconds of all host CPUs so far (all but idle and iowait), from `/proc/stat`.
fn host_busy_ticks() -> Option<f64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3)? + v.get(4)?;
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    Some((v.iter().take(8).sum::<f64>() - idle) / CLK_TCK)
}

/// CPU seconds of this process's waited-for children (cutime + cstime of `/proc/self/stat`).
fn children_ticks() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 16 and 17 of stat; `rest` starts at field 3.
    Some((f.get(13)?.parse::<f64>().ok()? + f.get(14)?.parse::<f64>().ok()?) / CLK_TCK)
}

/// Wait (at most `limit`) until the host's CPUs are nearly idle: other work on the host steals
/// time from the emulated CPUs and makes every figure noisy.
fn wait_quiet(limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let b0 = host_busy_ticks();
        std::thread::sleep(Duration::from_secs(5));
        let busy = match (b0, host_busy_ticks()) {
            (Some(a), Some(b)) => (b - a) / 5.0,
            _ => return,
        };
        if busy < 0.25 {
            eprintln!("xtask: host quiet ({busy:.2} CPUs busy)");
            return;
        }
        if start.elapsed() >= limit {
            eprintln!("xtask: host still busy ({busy:.2} CPUs); starting anyway");
            return;
        }
        eprintln!("xtask: host busy ({busy:.2} CPUs), waiting for it to calm down ...");
        std::thread::sleep(Duration::from_secs(25));
    }
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `key=value` words of a marker line; `reason=` takes the rest of the line.
fn fields(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("reason=") {
            out.push(("reason".into(), r.trim().to_string()));
            break;
        }
        let (word, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        if let Some((k, v)) = word.split_once('=') {
            out.push((k.to_string(), v.to_string()));
        }
        rest = tail.trim_start();
    }
    out
}

fn field<'a>(f: &'a [(String, String)], key: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// `tid:comm:ticks[:slices],...` before and after -> per-thread deltas (threads that ran).
fn thread_deltas(before: &str, after: &str) -> Vec<ThreadUse> {
    type Sample = (String, String, u64, Option<u64>);
    let parse = |s: &str| -> Vec<Sample> {
        s.split(',')
            .filter_map(|t| {
                let mut it = t.splitn(4, ':');
                Some((
                    it.next()?.to_string(),
                    it.next()?.to_string(),
                    it.next()?.parse().ok()?,
                    it.next().and_then(|x| x.parse().ok()),
                ))
            })
            .collect()
    };
    let b = parse(before);
    parse(after)
        .into_iter()
        .filter_map(|(tid, comm, t1, s1)| {
            let (t0, s0) = b
                .iter()
                .find(|(t, _, _, _)| *t == tid)
                .map_or((0, Some(0)), |(_, _, t, s)| (*t, *s));
            let slices = s1.zip(s0).map(|(a, b)| a.saturating_sub(b));
            let ticks = t1.saturating_sub(t0);
            (ticks > 0 || slices.unwrap_or(0) > 0).then_some(ThreadUse {
                comm,
                ticks,
                slices,
            })
        })
        .fold(Vec::new(), |mut acc: Vec<ThreadUse>, u| {
            // io_uring names its workers after the thread they serve: add them up.
            match acc.iter_mut().find(|a| a.comm == u.comm) {
                Some(e) => {
                    e.ticks += u.ticks;
                    e.slices = e.slices.zip(u.slices).map(|(a, b)| a + b);
                }
                None => acc.push(u),
            }
            acc
        })
}

type Parsed = (Vec<Run>, Vec<Skip>, Vec<(String, String)>, bool);

fn parse_results(text: &str) -> Parsed {
    let mut runs = Vec::new();
    let mut skips = Vec::new();
    let mut infos = Vec::new();
    let mut done = false;
    let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
    while let Some(line) = lines.next() {
        let Some(body) = line
            .trim()
            .strip_prefix("@@")
            .and_then(|b| b.strip_suffix("@@"))
        else {
            continue;
        };
        if let Some(h) = body.strip_prefix("RUN ") {
            let mut js = String::new();
            for l in lines.by_ref() {
                if l.trim() == "@@END@@" {
                    break;
                }
                js.push_str(l);
                js.push('\n');
            }
            runs.push(make_run(&fields(h), &js));
        } else if let Some(h) = body.strip_prefix("SKIP ") {
            let f = fields(h);
            skips.push(Skip {
                group: field(&f, "group").to_string(),
                queues: field(&f, "queues").parse().unwrap_or(0),
                dev: field(&f, "dev").to_string(),
                reason: field(&f, "reason").to_string(),
            });
        } else if let Some(h) = body.strip_prefix("INFO ") {
            if let Some((k, v)) = h.split_once('=') {
                infos.push((k.to_string(), v.trim().to_string()));
            }
        } else if body == "DONE" {
            done = true;
        }
    }
    (runs, skips, infos, done)
}

fn make_run(f: &[(String, String)], fio_json: &str) -> Run {
    let num = |k: &str| field(f, k).parse::<u64>().unwrap_or(0);
    let job = field(f, "job").to_string();
    let mut r = Run {
        group: field(f, "group").to_string(),
        queues: field(f, "queues").parse().unwrap_or(0),
        dev: field(f, "dev").to_string(),
        rc: field(f, "rc").parse().unwrap_or(-1),
        iops: 0.0,
        bw_bytes: 0.0,
        iops_sd: None,
        lat_mean_ns: 0.0,
        lat_p99_ns: 0.0,
        ios: 0.0,
        daemon_ticks: num("daemon_ticks"),
        sys_busy: num("sys_busy"),
        sys_total: num("sys_total"),
        win_busy: field(f, "win_busy").parse().ok(),
        win_ios: field(f, "win_ios").parse().ok(),
        win_daemon: field(f, "win_daemon").parse().ok(),
        has_daemon: !field(f, "threads_before").is_empty(),
        server_ticks: field(f, "server_ticks").parse().ok(),
        win_server: field(f, "win_server").parse().ok(),
        win_slices: field(f, "win_slices").parse().ok(),
        win_ctxt: field(f, "win_ctxt").parse().ok(),
        threads: thread_deltas(field(f, "threads_before"), field(f, "threads_after")),
        error: None,
        round: field(f, "round").parse().unwrap_or(1),
        job,
    };
    // fio may print warnings before the JSON document.
    let start = fio_json.find('{').unwrap_or(0);
    match json::parse(&fio_json[start..]) {
        Err(e) => r.error = Some(format!("fio output is not JSON: {e:#}")),
        Ok(v) => {
            let dir = if r.job.contains("write") {
                "write"
            } else {
                "read"
            };
            let get = |p: &[&str]| {
                let mut path = vec!["jobs", "0", dir];
                path.extend_from_slice(p);
                v.at(&path).and_then(Value::num)
            };
            r.iops = get(&["iops"]).unwrap_or(0.0);
            r.bw_bytes = get(&["bw_bytes"]).unwrap_or(0.0);
            r.iops_sd = match (get(&["iops_stddev"]), get(&["iops_mean"])) {
                (Some(sd), Some(m)) if m > 0.0 => Some(sd / m),
                _ => None,
            };
            r.lat_mean_ns = get(&["lat_ns", "mean"]).unwrap_or(0.0);
            r.lat_p99_ns = get(&["lat_ns", "percentile", "99.000000"]).unwrap_or(0.0);
            r.ios = ["read", "write"]
                .iter()
                .filter_map(|d| v.at(&["jobs", "0", d, "total_ios"]).and_then(Value::num))
                .sum();
            if let Some(e) = v.at(&["jobs", "0", "error"]).and_then(Value::num) {
                if e != 0.0 {
                    r.error = Some(format!("fio job error {e}"));
                }
            }
        }
    }
    r
}

fn group_devices(group: &str) -> &'static [Device] {
    GROUPS
        .iter()
        .find(|(g, _)| *g == group)
        .map_or(&[], |(_, d)| d)
}

fn display_name(dev: &str) -> &str {
    GROUPS
        .iter()
        .flat_map(|(_, d)| d.iter())
        .find(|(n, _, _)| *n == dev)
        .map_or(dev, |(_, d, _)| d)
}

fn baseline(group: &str, dev: &str) -> Option<&'static str> {
    group_devices(group)
        .iter()
        .find(|(n, _, _)| *n == dev)
        .and_then(|d| d.2)
}

/// Every round of one device and job, in the order they ran.
fn rounds<'a>(k: &'a KernelResults, group: &str, q: u32, dev: &str, job: &str) -> Vec<&'a Run> {
    k.runs
        .iter()
        .filter(|r| r.group == group && r.queues == q && r.dev == dev && r.job == job)
        .collect()
}

/// The run that stands for a device and job in the tables: the one with the median IOPS of its
/// successful rounds (the lower middle one of an even count), or the first if none succeeded.
fn find<'a>(k: &'a KernelResults, group: &str, q: u32, dev: &str, job: &str) -> Option<&'a Run> {
    let all = rounds(k, group, q, dev, job);
    let mut ok: Vec<&Run> = all.iter().copied().filter(|r| r.ok()).collect();
    ok.sort_by(|a, b| a.iops.total_cmp(&b.iops));
    ok.get(ok.len().saturating_sub(1) / 2)
        .copied()
        .or_else(|| all.first().copied())
}

/// A device's IOPS relative to its baseline: one ratio per round in which both succeeded
/// (each against the baseline's run of the same round, seconds apart), summed up.
#[derive(Debug, Clone, PartialEq)]
struct Ratio {
    median: f64,
    min: f64,
    max: f64,
    /// The per-round ratios, in round order.
    each: Vec<f64>,
    base: &'static str,
}

impl Ratio {
    /// "0.95", or with several rounds "0.95 (0.90-1.02)".
    fn text(&self) -> String {
        if self.each.len() > 1 {
            format!("{:.2} ({:.2}-{:.2})", self.median, self.min, self.max)
        } else {
            format!("{:.2}", self.median)
        }
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn ratio(k: &KernelResults, group: &str, q: u32, dev: &str, job: &str) -> Option<Ratio> {
    ratio_to(k, group, q, dev, baseline(group, dev)?, job)
}

/// `dev`'s IOPS relative to `base`'s, round by round (see [`Ratio`]).
fn ratio_to(
    k: &KernelResults,
    group: &str,
    q: u32,
    dev: &str,
    base: &'static str,
    job: &str,
) -> Option<Ratio> {
    let base_runs = rounds(k, group, q, base, job);
    let each: Vec<f64> = rounds(k, group, q, dev, job)
        .into_iter()
        .filter(|r| r.ok())
        .filter_map(|r| {
            let b = base_runs
                .iter()
                .find(|b| b.round == r.round && b.ok() && b.iops > 0.0)?;
            Some(r.iops / b.iops)
        })
        .collect();
    Some(Ratio {
        median: median(&each)?,
        min: each.iter().copied().reduce(f64::min)?,
        max: each.iter().copied().reduce(f64::max)?,
        each,
        base,
    })
}

/// A markdown table with padded columns (readable as text too).
fn table(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let n = header.len();
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let cell = |i: usize, s: &str| {
        let pad = w[i] - s.chars().count();
        if right.get(i).copied().unwrap_or(false) {
            format!("{}{s}", " ".repeat(pad))
        } else {
            format!("{s}{}", " ".repeat(pad))
        }
    };
    let mut out = String::new();
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    out.push_str(&line(
        header.iter().enumerate().map(|(i, h)| cell(i, h)).collect(),
    ));
    out.push_str(&line(
        (0..n)
            .map(|i| {
                if right.get(i).copied().unwrap_or(false) {
                    format!("{}:", "-".repeat(w[i].max(2) - 1))
                } else {
                    "-".repeat(w[i].max(1))
                }
            })
            .collect(),
    ));
    for r in rows {
        out.push_str(&line((0..n).map(|i| cell(i, &r[i])).collect()));
    }
    out
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.prec$}"))
}

/// IOPS of each of our devices relative to its baseline: rows (queues, device), columns jobs.
fn summary_table(k: &KernelResults) -> String {
    let mut header = vec!["queues", "device", "vs"];
    header.extend_from_slice(JOBS);
    let mut rows = Vec::new();
    for (group, devices) in GROUPS {
        for q in [1, 2] {
            for (dev, name, base) in *devices {
                let Some(base) = base else { continue };
                if !k
                    .runs
                    .iter()
                    .any(|r| r.group == *group && r.queues == q && r.dev == *dev)
                {
                    continue;
                }
                let mut row = vec![
                    q.to_string(),
                    name.to_string(),
                    display_name(base).to_string(),
                ];
                for job in JOBS {
                    row.push(ratio(k, group, q, dev, job).map_or_else(|| "-".into(), |r| r.text()));
                }
                rows.push(row);
            }
        }
    }
    let mut right = vec![true, false, false];
    right.extend(JOBS.iter().map(|_| true));
    table(&header, &rows, &right)
}

/// Copies another server's binary to `target/vm/NAME/NAME`, where the guest finds it as
/// `/opt/bin/NAME` whatever its name here.
fn peer_binary(flag: &str, name: &str, path: &Path) -> Result<PathBuf> {
    let meta = fs::metadata(path).with_context(|| format!("{flag} {}", path.display()))?;
    if !meta.is_file() {
        bail!("{flag} {}: not a file", path.display());
    }
    let dir = vm::target_dir().join("vm").join(name);
    fs::create_dir_all(&dir)?;
    let copy = dir.join(name);
    // `cargo xtask kublk` builds kublk right there: copying a file onto itself empties it.
    if fs::canonicalize(path)? != fs::canonicalize(&copy).unwrap_or_default() {
        fs::copy(path, &copy).with_context(|| format!("copying {}", path.display()))?;
    }
    Ok(copy)
}

/// Our devices against another server's (`--rublk`, `--kublk`): rows (queues, pair), columns
/// jobs; empty without runs of that server.
fn peer_table(k: &KernelResults, pairs: &[(&str, &'static str, &'static str)]) -> String {
    let mut header = vec!["queues", "device", "vs"];
    header.extend_from_slice(JOBS);
    let mut rows = Vec::new();
    for (group, ours, theirs) in pairs {
        for q in [1, 2] {
            let cells: Vec<String> = JOBS
                .iter()
                .map(|job| {
                    ratio_to(k, group, q, ours, theirs, job)
                        .map_or_else(|| "-".into(), |r| r.text())
                })
                .collect();
            if cells.iter().all(|c| c == "-") {
                continue;
            }
            let mut row = vec![
                q.to_string(),
                display_name(ours).to_string(),
                display_name(theirs).to_string(),
            ];
            row.extend(cells);
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut right = vec![true, false, false];
    right.extend(JOBS.iter().map(|_| true));
    table(&header, &rows, &right)
}

/// The issues' targets against this boot's ratios: one row per (target, queues), one column
/// per job ("ratio ≥ target ✓" or "ratio < target ✗"; empty where the issue sets none).
fn targets_table(k: &KernelResults) -> String {
    let mut header = vec!["issue", "queues", "device", "vs"];
    header.extend_from_slice(JOBS);
    let mut rows = Vec::new();
    for (issue, group, dev, goals) in TARGETS {
        let Some(base) = baseline(group, dev) else {
            continue;
        };
        for q in [1, 2] {
            if !k
                .runs
                .iter()
                .any(|r| r.group == *group && r.queues == q && r.dev == *dev)
            {
                continue;
            }
            let mut row = vec![
                issue.to_string(),
                q.to_string(),
                display_name(dev).to_string(),
                display_name(base).to_string(),
            ];
            for job in JOBS {
                let cell = match goals.iter().find(|(j, _)| j == job) {
                    None => String::new(),
                    Some((_, min)) => match ratio(k, group, q, dev, job) {
                        None => format!("- (≥ {min:.2})"),
                        Some(r) => {
                            let x = r.median;
                            let mut c = if x >= *min {
                                format!("{x:.2} ≥ {min:.2} ✓")
                            } else {
                                format!("{x:.2} < {min:.2} ✗")
                            };
                            if r.each.len() > 1 {
                                let met = r.each.iter().filter(|&&e| e >= *min).count();
                                let _ = write!(c, " ({met}/{} rounds)", r.each.len());
                            }
                            c
                        }
                    },
                };
                row.push(cell);
            }
            rows.push(row);
        }
    }
    let mut right = vec![false, true, false, false];
    right.extend(JOBS.iter().map(|_| true));
    table(&header, &rows, &right)
}

fn full_table(k: &KernelResults) -> String {
    let header = [
        "queues",
        "job",
        "device",
        "IOPS",
        "±%",
        "MB/s",
        "lat mean µs",
        "lat p99 µs",
        "daemon CPU µs/IO",
        "guest CPU µs/IO",
        "server CPU µs/IO",
        "daemon wake-ups/IO",
        "guest cs/IO",
        "IOPS ratio",
        "daemon ticks (wake-ups/IO) by thread",
    ];
    let mut rows = Vec::new();
    for (group, devices) in GROUPS {
        for q in [1, 2] {
            for job in JOBS {
                for (dev, name, _) in *devices {
                    let Some(r) = find(k, group, q, dev, job) else {
                        continue;
                    };
                    let ok = r.ok();
                    let ratio = ratio(k, group, q, dev, job)
                        .map(|x| format!("{} vs {}", x.text(), display_name(x.base)))
                        .unwrap_or_else(|| "-".into());
                    rows.push(vec![
                        q.to_string(),
                        job.to_string(),
                        name.to_string(),
                        if ok {
                            format!("{:.0}", r.iops)
                        } else {
                            "FAILED".into()
                        },
                        fmt_opt(r.iops_sd.filter(|_| ok).map(|x| 100.0 * x), 0),
                        fmt_opt(ok.then_some(r.bw_bytes / 1e6), 1),
                        fmt_opt(ok.then_some(r.lat_mean_ns / 1e3), 1),
                        fmt_opt(ok.then_some(r.lat_p99_ns / 1e3), 1),
                        fmt_opt(r.daemon_us(), 2),
                        fmt_opt(r.guest_us(), 2),
                        fmt_opt(r.server_us(), 2),
                        fmt_opt(r.daemon_wakeups(), 2),
                        fmt_opt(r.guest_switches(), 2),
                        ratio,
                        r.threads
                            .iter()
                            .map(|t| match t.slices {
                                Some(s) if r.ios > 0.0 => {
                                    format!("{} {} ({:.2})", t.comm, t.ticks, s as f64 / r.ios)
                                }
                                _ => format!("{} {}", t.comm, t.ticks),
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]);
                }
            }
        }
    }
    let right = [
        true, false, false, true, true, true, true, true, true, true, true, true, true, false,
        false,
    ];
    table(&header, &rows, &right)
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    crate::kernel::run(Command::new(cmd).args(args))
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// The checked-out commit, and whether files other than docs/benchmarks.md had changes.
fn git_commit() -> String {
    let root = crate::project_root();
    let head = first_line(
        "git",
        &["-C", &root.to_string_lossy(), "log", "-1", "--format=%h %s"],
    );
    let dirty = crate::kernel::run(Command::new("git").arg("-C").arg(&root).args([
        "status",
        "--porcelain",
        "--untracked-files=no",
    ]))
    .map(|s| s.lines().any(|l| !l.ends_with("docs/benchmarks.md")))
    .unwrap_or(false);
    if dirty {
        format!("{head} (plus uncommitted changes)")
    } else {
        head
    }
}

fn host_cpu() -> String {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let n = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model} ({n} logical CPUs)")
}

/// Heading of the hand-written part of docs/benchmarks.md, kept when the file is regenerated.
const NOTES_HEADING: &str = "## Notes";

/// The hand-written notes of an existing report: from [`NOTES_HEADING`] (at the start of a line)
/// to the end.
fn notes_of(doc: &str) -> Option<&str> {
    let at = if doc.starts_with(NOTES_HEADING) {
        0
    } else {
        doc.find(&format!("\n{NOTES_HEADING}\n"))? + 1
    };
    Some(&doc[at..])
}

fn render_doc(all: &[KernelResults], notes: Option<&str>) -> String {
    let mut s = String::new();
    let first = |key: &str| {
        all.iter()
            .find_map(|k| k.info(key))
            .unwrap_or("unknown")
            .to_string()
    };
    let qemu = first_line("qemu-system-x86_64", &["--version"]);
    let fio = first_line("fio", &["--version"]);
    let _ = writeln!(s, "# Benchmarks under emulation\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench` (xtask/src/bench.rs, guest side xtask/guest/bench.sh); \
         rerun it rather than editing this file. How to run it, what it costs and what the \
         figures of this run suggest: [BENCHMARKS-HOWTO.md](BENCHMARKS-HOWTO.md).\n"
    );
    let _ = writeln!(s, "| | |\n|-|-|");
    // Facts of each boot: one row when all boots agree, else one per kernel.
    for (key, name, code) in [
        ("host.date", "date", false),
        ("host.command", "command", true),
        ("host.commit", "commit", false),
    ] {
        let vals: Vec<(&str, &str)> = all
            .iter()
            .map(|k| (k.label.as_str(), k.info(key).unwrap_or("unknown")))
            .collect();
        let q = if code { "`" } else { "" };
        if vals.windows(2).all(|w| w[0].1 == w[1].1) {
            let _ = writeln!(s, "| {name} | {q}{}{q} |", first(key));
        } else {
            for (label, v) in vals {
                let _ = writeln!(s, "| {name} ({label}) | {q}{v}{q} |");
            }
        }
    }
    for k in all {
        let _ = writeln!(s, "| kernel {} | {} |", k.label, k.release);
    }
    let _ = writeln!(s, "| qemu | {qemu} |");
    let _ = writeln!(s, "| host CPU | {} |", host_cpu());
    let _ = writeln!(
        s,
        "| guest | TCG (`-accel tcg,thread=multi`, no KVM), `-cpu max,erms=off,fsrm=off`, 2 vCPUs, {BENCH_MEM} RAM |"
    );
    let _ = writeln!(s, "| fio | {fio} (the host's, copied into the guest) |");
    let repeat = first("host.repeat");
    let _ = writeln!(
        s,
        "| runtime | {} s per fio run, time based; {} |",
        first("host.runtime"),
        match repeat.as_str() {
            "1" | "unknown" => "one run per device and job".to_string(),
            n => format!(
                "{n} rounds per device and job (`--repeat {n}`), interleaved: tables show medians"
            ),
        }
    );
    for k in all {
        let range = k
            .info("host.load_range")
            .map(|r| format!(", {r} during the runs"))
            .unwrap_or_default();
        let other = k
            .info("host.other_cpus")
            .map(|c| format!("; other processes used {c} host CPUs on average"))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| host load, {} boot | 1-min load avg. {} before{range}{other}; boot took {:.0} s |",
            k.label,
            k.info("host.load_before")
                .and_then(|l| l.split_whitespace().next())
                .unwrap_or("?"),
            k.total
        );
    }
    s.push('\n');
    s.push_str(
        "## Reading these numbers\n\n\
         Everything ran under qemu's TCG, an instruction-translating emulator: the absolute figures \
         are those of an emulated machine, many times slower than hardware, and mean nothing on \
         their own. **Only ratios between runs of the same boot mean anything**: each of our \
         devices is compared with its baseline measured seconds earlier in the same guest (runs \
         alternate between the devices job by job). On a quiet host, figures move between boots \
         by about ±5 % for 4k runs and up to ±20 % for 128k sequential ones. The host is shared, \
         though, and the emulated CPUs lose time to whatever else runs on it (\"other processes\" \
         above): with half a host CPU or more taken by other work, a single ratio can move by a \
         factor of two between boots, so trust patterns that hold across rows and on both kernels, \
         not single cells; the ±% column tells how unsteady each run was. Even steady ratios are \
         those of an emulated CPU, whose costs differ from real hardware's (system calls, context \
         switches, inter-processor wake-ups and interrupts are comparatively expensive): they show \
         where time goes rather than predict production numbers.\n\n",
    );
    s.push_str(
        "## Method\n\n\
         - One boot per kernel runs the whole matrix; results come back on a second serial port.\n\
         - fio: `--ioengine=io_uring --direct=1 --clocksource=clock_gettime --lat_percentiles=1 \
           --time_based --norandommap --randrepeat=0 --group_reporting`, on the whole device. Jobs: \
           4k randread QD1, 4k randread QD32, 4k randwrite QD32, 128k sequential read QD8, 128k sequential write QD8.\n\
         - Queues: with 1 queue, one fio job. With 2 queues, `--numjobs=2 --cpus_allowed=0-1 \
           --cpus_allowed_policy=split`: one job per vCPU, each with the **same iodepth as the \
           1-queue run** (so twice the IO in flight), each submitting to the hardware queue of its \
           CPU. Sequential jobs read or write their own half of the device each. Our devices get `-q 2`; \
           null_blk gets `submit_queues=2`; kernel loop has a single hardware queue whatever the \
           count (its row under \"2\" is the same device driven by two jobs).\n\
         - null: `null_blk queue_mode=2 submit_queues=N gb=4` (memory-less, default softirq \
           completion, reloaded for each N) vs `ublk add -t null -q N --size 4G` (the null target's \
           default data mode, user copy, where it copies nothing: the request's pages are left \
           as they are, as null_blk does), with `--copy` (copy mode: the kernel copies READ data \
           from the daemon's buffer and WRITE data into it) and, where the kernel has \
           UBLK_F_AUTO_BUF_REG (6.16+), with `-z` (zero copy), and where it has UBLK_F_BATCH_IO \
           (7.0+), with `-b` (batch io commands, default mode).\n\
         - loop: a 512 MiB file on tmpfs written in full with `dd` (not sparse). Kernel loop: \
           util-linux `losetup --direct-io=on` (`/sys/block/loopN/loop/dio` checked to read 1). \
           Ours: `ublk add -t loop -f FILE -q N` in its default mode, which on tmpfs is user \
           copy straight between the request and the mapped file (one copy per request, like \
           kernel loop), with `--copy` (copy mode: the kernel copies between the request and \
           the daemon's buffer, which is then read from or written to the file: two copies), \
           `-g` (NEED_GET_DATA, also through the buffer), (6.16+) `-z` (zero copy) and (7.0+) \
           `-b` (batch io commands, default mode), all O_DIRECT on the same file. \
           On tmpfs the loop and qcow2 targets read and write inline on the queue thread \
           (io_uring would hand each operation to a worker thread); in zero-copy mode they cannot \
           (the data never reaches user space), so `-z` goes through io_uring and its workers.\n\
         - qcow2: `ublk add -t qcow2 -f img.qcow2 -q N` on a 512 MiB image made with `qemu-img \
           create -f qcow2 -o preallocation=full` (every cluster allocated, 64 KiB clusters), \
           compared with our loop (default mode) on the raw file.\n\
         - Latency is fio's total latency (`lat`: submission to completion); `clat` alone is \
           meaningless for devices that complete inline at submission.\n\
         - CPU per IO is measured over a window inside each run, from 1.5 s after fio starts \
           for runtime - 1.5 s (fio's start-up, most of a second under TCG, is left out), divided \
           by the IOs the device completed in that window (`/sys/block/DEV/stat`). Daemon CPU \
           µs/IO: utime+stime of the ublk daemon process (`/proc/PID/stat`, all its threads, \
           io_uring's `iou-wrk` workers included). Guest CPU µs/IO: busy time of both vCPUs from \
           `/proc/stat` (all but idle and iowait: fio, kernel, daemon), the only CPU figure the \
           kernel baselines have. The clock tick is 10 ms (USER_HZ = 100), so the resolution is \
           10 ms / IOs in the window: about 0.5 µs/IO at 20k IOs, 10 µs/IO at 1k IOs. The last \
           column splits the daemon's ticks over the whole run by thread \
           (`/proc/PID/task/*/stat`; `ublkN-qM` are queue threads, `iou-wrk-TID` io_uring's \
           workers for thread TID, added up; workers that exited during the run are missing), \
           with in parentheses the thread's wake-ups per IO over the whole run.\n\
         - Wake-ups and context switches are counts, which host load moves much less than times \
           (at QD1 the path fixes them; at higher depths how much batches depends on timing): \
           the steadiest figures of a noisy boot. Daemon wake-ups/IO: \
           timeslices (times switched in, the third field of `/proc/PID/task/*/schedstat`) of all \
           the daemon's threads in the window, per IO. Guest cs/IO: context switches of the \
           whole guest (`ctxt` in `/proc/stat`: fio, kernel threads, daemons, idle) in the window, \
           per IO; the only such figure the kernel baselines have.\n\
         - Rounds (`--repeat N`): each job runs N times on every device of its group, the \
           devices taking turns (the order reversed every other round), before the next job. \
           Each round gives one ratio against the baseline's run of that round; the ratio cells \
           show their median and, in parentheses, the lowest and highest; the targets table \
           how many rounds reached the target. The other columns are those of the run with the \
           median IOPS.\n\
         - ±%: standard deviation of fio's IOPS samples (one per 500 ms) relative to their mean, a \
           gauge of how steady the run was.\n\
         - IOPS ratio: our IOPS / baseline IOPS in the same boot, same queue count and job; the \
           baseline of ublk null is null_blk, of ublk loop (all modes) kernel loop with direct IO, \
           of ublk qcow2 our loop in its default mode (loop group) and qemu-nbd + kernel nbd (qcow2 \
           group), of ublk nbd the kernel nbd driver.\n",
    );
    let cmd = |key: &str, fallback: &str| {
        all.iter()
            .find_map(|k| k.info(key))
            .unwrap_or(fallback)
            .to_string()
    };
    let _ = writeln!(
        s,
        "- qcow2 group (after the loop group, same queue count): a byte-for-byte copy of the qcow2 \
         image above served by qemu-nbd, which connects the kernel nbd driver itself: `{}` \
         (pid of the forked server in the daemon columns), vs `ublk add -t qcow2 -f img.qcow2 -q N` \
         on the original (two files, so that no image is open read-write twice). qemu-nbd's \
         options are the first of `--cache=none --aio=io_uring`, `--cache=none --aio=native`, \
         `--cache=writeback --aio=threads` it accepts on the tmpfs file (used: `{}`): tmpfs \
         accepts O_DIRECT from Linux 6.6 on, though on tmpfs it is the same page-cache copy as \
         buffered IO (our qcow2 target opens the image without O_DIRECT). The kernel nbd device \
         has one connection and one hardware queue of 128 requests whatever N; with 2 queues \
         it is driven by two fio jobs like kernel loop.",
        cmd(
            "cmd.qemu_nbd",
            "qemu-nbd --connect=/dev/nbd0 -f qcow2 OPTIONS IMG.qcow2"
        ),
        cmd("qemu_nbd_opts", "?"),
    );
    let _ = writeln!(
        s,
        "- nbd group: one NBD server in the guest, `{}` (the raw file of the loop group on a Unix \
         socket; qemu-nbd serves with one thread and offers multi-conn when it allows more than \
         one client; with `--nbd-server nbdkit`, nbdkit's file plugin serves with a pool of \
         threads per connection and always offers multi-conn), and its clients \
         connected to it at the same time, runs alternating: the kernel nbd driver, `{}` \
         (netlink), ours, `{}` (its io_uring engine: each queue thread drives its own \
         connection; user copy where the kernel has it, else copy mode), and ours with the \
         threaded engine, `{}` (a writer and a reader thread per connection, as used for TLS) \
         and, where the kernel has batch io commands (7.0+), \
         ours with `-b`, all connected at once. With N queues all have N connections (nbd-client -C \
         N; our target opens one connection per queue when the server offers multi-conn) and N \
         hardware queues of 128 requests. All devices have 512-byte logical blocks. \
         \"server CPU µs/IO\" is the server's CPU time per IO (in the nbd groups only), the same \
         server for all clients. This group's server shares both vCPUs with fio and the clients, \
         which a server on another machine never does: with one queue, whether it lands on the \
         vCPU of our queue thread decides much of a run (BENCHMARKS-HOWTO, \"One connection to \
         qemu-nbd: two regimes\").\n\
         - nbd_apart group (one queue; devices marked \"server apart\"): the same server and \
         clients, but the server in a cgroup cpuset of vCPU 1 and everything on the client side \
         in one of vCPU 0: fio, our daemons (and so the io_uring workers of both sides, which \
         follow the cpuset) and the kernel's unbound workqueues, where kernel nbd receives \
         (`/sys/devices/virtual/workqueue/cpumask` set to 1 for the group). It stands for a \
         server on another machine: the client side has one CPU and the server one of its own. \
         Devices: nbd-client, ours, ours in copy mode (`--copy`) and, where the kernel has \
         it, ours with `-z`.\n",
        cmd(
            "cmd.nbd_server",
            "qemu-nbd --fork -f raw OPTIONS -k SOCK -x bench --shared=16 RAW"
        ),
        cmd("cmd.nbd", "nbd-client -unix SOCK /dev/nbd1 -N bench -C N"),
        cmd(
            "cmd.ublk_nbd",
            "ublk add -t nbd -q N --uri nbd+unix:///bench?socket=SOCK"
        ),
        cmd(
            "cmd.ublk_nbd_t",
            "ublk add -t nbd -q N --nbd-threads --uri nbd+unix:///bench?socket=SOCK"
        ),
    );
    if all
        .iter()
        .any(|k| k.runs.iter().any(|r| r.dev.starts_with("rublk_")))
    {
        let _ = writeln!(
            s,
            "- rublk (`--rublk`; {}): the libublk-based ublk server, measured in the same groups \
             and rounds as ours: `{}` and `{}` (null group), `{}` (loop group, O_DIRECT on the \
             same raw file), `{}` (qcow2 group, on a third copy of the image; 1 queue only: rublk's qcow2 \
             target refuses more). Its queue threads \
             run as it sets them up (it pins each to one CPU of the queue's affinity).\n",
            cmd("rublk_version", "version unknown"),
            cmd("cmd.rublk_null", "rublk add null -q N"),
            cmd("cmd.rublk_null_u", "rublk add null -u -q N"),
            cmd("cmd.rublk_loop", "rublk add loop -q N -f RAW"),
            cmd("cmd.rublk_qcow2", "rublk add qcow2 -q N -f IMG.qcow2"),
        );
    }
    if all
        .iter()
        .any(|k| k.runs.iter().any(|r| r.dev.starts_with("kublk_")))
    {
        let _ = writeln!(
            s,
            "- kublk (`--kublk`; built by `cargo xtask kublk` from {}): the ublk server of the \
             kernel's selftests, in C, by the ublk driver's author, measured in the same groups \
             and rounds as ours: `{}` and `{}` (null group), `{}` and, where the kernel has \
             UBLK_F_AUTO_BUF_REG, `{}` (loop group, O_DIRECT on the same raw file). It pins each \
             queue thread to the queue's CPUs, as it sets them up.\n",
            cmd("kublk_version", "linux-source-7.3"),
            cmd("cmd.kublk_null", "kublk add -t null -q N"),
            cmd("cmd.kublk_null_u", "kublk add -t null -u -q N"),
            cmd("cmd.kublk_loop", "kublk add -t loop -q N RAW"),
            cmd("cmd.kublk_loop_z", "kublk add -t loop --auto_zc -q N RAW"),
        );
    }
    for k in all {
        let _ = writeln!(s, "## Linux {} ({})\n", k.label, k.release);
        if let Some(f) = k.info("features") {
            let words: Vec<&str> = f.split_whitespace().collect();
            let mask = words.iter().find(|w| w.starts_with("0x")).unwrap_or(&"?");
            let names: Vec<&str> = words
                .iter()
                .filter_map(|w| w.strip_prefix("UBLK_F_"))
                .collect();
            let _ = writeln!(
                s,
                "`ublk features`: {} ({})\n",
                mask.trim_end_matches(':'),
                names.join(", ")
            );
        }
        let _ = writeln!(
            s,
            "### IOPS relative to the baseline (same boot)\n\n{}",
            summary_table(k)
        );
        let _ = writeln!(
            s,
            "### The issues' targets (same boot)\n\n\
             Issue 3: ublk qcow2 at least 3 times qemu-nbd + kernel nbd, and at least 0.85 of our \
             loop on a raw file. Issue 4: ublk nbd at least 1.1 times the kernel nbd driver at 4k \
             random QD32, no worse at 128k sequential. Issue 5: ublk null at least 0.97 of \
             null_blk at 4k QD32 and 0.9 at 128k; ublk loop (its default mode, and copy mode) at least kernel loop's \
             IOPS at 4k QD32, 0.8 of them at 128k, and at most 1.1 times its latency at QD1 \
             (shown as IOPS, at least 0.91).\n\n{}",
            targets_table(k)
        );
        let rublk = peer_table(k, RUBLK_PAIRS);
        if !rublk.is_empty() {
            let _ = writeln!(
                s,
                "### Against rublk (same boot)\n\n\
                 Our IOPS / rublk's, like for like: null without copying (ours by default, \
                 rublk's with `-u`), null in copy mode (`--copy`, rublk's default), loop \
                 in copy mode (ours with `--copy`; both O_DIRECT on the same file, through a \
                 buffer), qcow2 (each on its own copy of the image).\n\n{rublk}"
            );
        }
        let kublk = peer_table(k, KUBLK_PAIRS);
        if !kublk.is_empty() {
            let _ = writeln!(
                s,
                "### Against kublk (same boot)\n\n\
                 Our IOPS / kublk's, like for like: null without copying (ours by default, \
                 kublk's with `-u`), null in copy mode (`--copy`, kublk's default), loop in \
                 each one's default mode (ours maps a tmpfs file and has the kernel copy \
                 between it and the request; kublk uses O_DIRECT through a buffer), loop in \
                 copy mode (ours with `--copy`; both through a buffer, on the same file: ours \
                 reads and writes the tmpfs file inline on the queue thread, kublk through \
                 io_uring, which hands tmpfs IO to its worker threads), loop in zero copy (`-z`, kublk's `--auto_zc`, where the kernel has \
                 it).\n\n{kublk}"
            );
        }
        let _ = writeln!(s, "### All runs\n\n{}", full_table(k));
        for sk in &k.skips {
            let _ = writeln!(
                s,
                "- skipped {} q{} {}: {}",
                sk.group, sk.queues, sk.dev, sk.reason
            );
        }
        for r in k.runs.iter().filter(|r| !r.ok()) {
            let _ = writeln!(
                s,
                "- FAILED {} q{} {} {}: {}",
                r.group,
                r.queues,
                r.dev,
                r.job,
                r.error.as_deref().unwrap_or("fio failed")
            );
        }
        if !k.finished() {
            let _ = writeln!(s, "- the guest did not finish the matrix (rc {:?})", k.rc);
        }
        let idle: Vec<String> = k
            .runs
            .iter()
            .filter(|r| r.ok() && r.sys_total > 0)
            .map(|r| format!("{:.0}", 100.0 * r.sys_busy as f64 / r.sys_total as f64))
            .collect();
        if !idle.is_empty() {
            let _ = writeln!(
                s,
                "\nGuest CPU busy per run (% of both vCPUs, table order): {}\n",
                idle.join(" ")
            );
        }
    }
    if let Some(n) = notes {
        s.push_str(n.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_guest_results() {
        let text = "@@INFO kernel=6.12.1@@\r\n\
            @@RUN group=null queues=1 dev=ublk_null job=randread-4k-qd1 rc=0 daemon_ticks=50 \
            sys_busy=180 sys_total=200 win_busy=90 win_secs=1.00 win_ios=60000 win_daemon=30 \
            threads_before=10:ublk:1,11:ublk0-q0:5 \
            threads_after=10:ublk:1,11:ublk0-q0:55@@\r\n\
            {\"jobs\":[{\"error\":0,\"read\":{\"iops\":10000.5,\"bw_bytes\":40962048,\
            \"total_ios\":100000,\"lat_ns\":{\"mean\":95000.0,\"percentile\":{\"99.000000\":150000}}},\
            \"write\":{\"total_ios\":0}}]}\r\n\
            @@END@@\r\n\
            @@SKIP group=loop queues=2 dev=ublk_loop_c reason=ublk add --copy failed@@\r\n\
            @@DONE@@\r\n";
        let (runs, skips, infos, done) = parse_results(text);
        assert!(done);
        assert_eq!(infos, vec![("kernel".to_string(), "6.12.1".to_string())]);
        assert_eq!(skips.len(), 1);
        assert_eq!(skips[0].reason, "ublk add --copy failed");
        assert_eq!(runs.len(), 1);
        let r = &runs[0];
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.iops, 10000.5);
        assert_eq!(r.lat_p99_ns, 150000.0);
        assert_eq!(
            r.threads,
            vec![ThreadUse {
                comm: "ublk0-q0".into(),
                ticks: 50,
                slices: None
            }]
        );
        // Window: 30 ticks = 0.3 s over 60000 IOs = 5 µs/IO; 90 ticks: 15 µs/IO.
        assert!((r.daemon_us().unwrap() - 5.0).abs() < 1e-9);
        assert!((r.guest_us().unwrap() - 15.0).abs() < 1e-9);
        // Without a window: the whole run (50 ticks over 100000 IOs).
        let mut w = r.clone();
        w.win_ios = None;
        assert!((w.daemon_us().unwrap() - 5.0).abs() < 1e-9);
        assert!((w.guest_us().unwrap() - 18.0).abs() < 1e-9);

        // A baseline run makes the ratio; the document has the tables.
        let mut base = r.clone();
        base.dev = "null_blk".into();
        base.iops = 20001.0;
        let mut k = KernelResults::parse(
            "6.12",
            &format!("{text}@@INFO host.rc=0@@\n@@INFO host.command=cargo xtask bench@@\n"),
        );
        assert!(k.finished());
        assert_eq!(k.info("host.command"), Some("cargo xtask bench"));
        k.runs.insert(0, base);
        assert!(
            summary_table(&k).contains(" 0.50 |"),
            "{}",
            summary_table(&k)
        );
        let doc = render_doc(&[k], Some("## Notes\n\nkept\n"));
        assert!(doc.contains("## Linux 6.12 (6.12.1)"), "{doc}");
        assert!(doc.contains("| command | `cargo xtask bench` |"), "{doc}");
        assert!(doc.contains("0.50 vs null_blk"), "{doc}");
        assert!(
            doc.contains("skipped loop q2 ublk_loop_c: ublk add --copy failed"),
            "{doc}"
        );
        assert!(doc.ends_with("\n## Notes\n\nkept\n"), "{doc}");
    }

    /// A RUN block with one fio job reading or writing at `iops`.
    fn run_text(header: &str, job: &str, iops: f64) -> String {
        let dir = if job.contains("write") {
            "write"
        } else {
            "read"
        };
        format!(
            "@@RUN {header} job={job} rc=0 daemon_ticks=10 sys_busy=100 sys_total=200 \
             win_busy=50 win_secs=1.00 win_ios=1000 win_daemon=5 win_slices=2500 \
             win_ctxt=4000@@\n\
             {{\"jobs\":[{{\"error\":0,\"{dir}\":{{\"iops\":{iops},\"bw_bytes\":1,\
             \"total_ios\":2000,\"lat_ns\":{{\"mean\":1.0}}}}}}]}}\n@@END@@\n"
        )
    }

    #[test]
    fn qcow2_and_nbd_groups() {
        let daemon = "threads_before=5:ublk:0:10,6:nbd-reader:1:100 \
                      threads_after=5:ublk:3:10,6:nbd-reader:2:1100,7:iou-wrk-5:1:7";
        let mut text = String::from("@@INFO cmd.qemu_nbd=qemu-nbd --connect=/dev/nbd0 X@@\n");
        for (header, iops) in [
            ("group=loop queues=1 dev=ublk_loop", 1000.0),
            ("group=loop queues=1 dev=ublk_qcow2", 900.0),
            ("group=qcow2 queues=1 dev=qemu_nbd", 200.0),
            ("group=qcow2 queues=1 dev=ublk_qcow2", 700.0),
        ] {
            text.push_str(&run_text(
                &format!("{header} {daemon}"),
                "randread-4k-qd32",
                iops,
            ));
        }
        for (dev, job, iops) in [
            ("nbd", "randread-4k-qd32", 500.0),
            ("ublk_nbd", "randread-4k-qd32", 600.0),
            ("nbd", "read-128k-qd8", 100.0),
            ("ublk_nbd", "read-128k-qd8", 90.0),
        ] {
            let d = if dev == "nbd" { "" } else { daemon };
            text.push_str(&run_text(
                &format!("group=nbd queues=1 dev={dev} server_ticks=20 win_server=10 {d}"),
                job,
                iops,
            ));
        }
        // The same clients with the server on a vCPU of its own: their own group and baseline.
        for (dev, iops) in [("nbd_sa", 400.0), ("ublk_nbd_sa", 500.0)] {
            text.push_str(&run_text(
                &format!("group=nbd_apart queues=1 dev={dev} server_ticks=20 win_server=10"),
                "randread-4k-qd32",
                iops,
            ));
        }
        text.push_str("@@SKIP group=nbd queues=2 dev=ublk_nbd reason=ublk add -t nbd failed@@\n");
        text.push_str("@@DONE@@\n@@INFO host.rc=0@@\n");
        let k = KernelResults::parse("7.3", &text);
        assert!(k.finished());
        assert_eq!(k.runs.len(), 10);
        let apart = ratio(&k, "nbd_apart", 1, "ublk_nbd_sa", "randread-4k-qd32").unwrap();
        assert_eq!(apart.base, "nbd_sa");
        assert!((apart.median - 1.25).abs() < 1e-9);

        // The same device in two groups: each measured against its own group's baseline.
        let r = |g: &str, d: &str, j: &str| find(&k, g, 1, d, j).unwrap();
        let q_loop = ratio(&k, "loop", 1, "ublk_qcow2", "randread-4k-qd32").unwrap();
        assert_eq!(q_loop.base, "ublk_loop");
        assert!((q_loop.median - 0.9).abs() < 1e-9);
        assert_eq!(q_loop.text(), "0.90");
        let q_nbd = ratio(&k, "qcow2", 1, "ublk_qcow2", "randread-4k-qd32").unwrap();
        assert_eq!(q_nbd.base, "qemu_nbd");
        assert!((q_nbd.median - 3.5).abs() < 1e-9);

        // qemu-nbd is a daemon; the kernel nbd client is not; the server is counted apart.
        let qn = r("qcow2", "qemu_nbd", "randread-4k-qd32");
        assert!((qn.daemon_us().unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(qn.server_us(), None);
        let kn = r("nbd", "nbd", "randread-4k-qd32");
        assert_eq!(kn.daemon_us(), None);
        assert!((kn.server_us().unwrap() - 100.0).abs() < 1e-9);
        let un = r("nbd", "ublk_nbd", "read-128k-qd8");
        assert!(un.daemon_us().is_some());
        // Counts: 2500 daemon timeslices, 4000 guest context switches over 1000 IOs.
        assert_eq!(un.daemon_wakeups(), Some(2.5));
        assert_eq!(un.guest_switches(), Some(4.0));
        assert_eq!(kn.daemon_wakeups(), None);
        assert_eq!(kn.guest_switches(), Some(4.0));
        assert_eq!(
            un.threads,
            vec![
                ThreadUse {
                    comm: "ublk".into(),
                    ticks: 3,
                    slices: Some(0)
                },
                ThreadUse {
                    comm: "nbd-reader".into(),
                    ticks: 1,
                    slices: Some(1000)
                },
                ThreadUse {
                    comm: "iou-wrk-5".into(),
                    ticks: 1,
                    slices: Some(7)
                },
            ]
        );
        // Whole run: 2000 IOs.
        assert!(full_table(&k).contains("nbd-reader 1 (0.50)"));

        let t = targets_table(&k);
        assert!(t.contains("3.50 ≥ 3.00 ✓"), "{t}");
        assert!(t.contains("0.90 ≥ 0.85 ✓"), "{t}");
        assert!(t.contains("1.20 ≥ 1.10 ✓"), "{t}");
        assert!(t.contains("0.90 < 1.00 ✗"), "{t}");
        // A job without a run in the boot shows the target it would be held to.
        assert!(t.contains("- (≥ 1.10)"), "{t}");
        assert!(
            t.contains("| 4     |      1 | ublk nbd, server apart | nbd-client, server apart |"),
            "{t}"
        );
        assert!(t.contains("1.25 ≥ 1.10 ✓"), "{t}");
        let sum = summary_table(&k);
        let cells = sum.replace(' ', "");
        assert!(cells.contains("|1|ublkqcow2|qemu-nbd+nbd|-|3.50|"), "{sum}");
        assert!(
            cells.contains("|1|ublknbd,serverapart|nbd-client,serverapart|-|1.25|"),
            "{sum}"
        );

        let doc = render_doc(&[k], None);
        assert!(doc.contains("`qemu-nbd --connect=/dev/nbd0 X`"), "{doc}");
        assert!(
            doc.contains("skipped nbd q2 ublk_nbd: ublk add -t nbd failed"),
            "{doc}"
        );
        assert!(!doc.contains(NOTES_HEADING), "{doc}");
    }

    /// With `--repeat`, each round is compared with the baseline's run of the same round and the
    /// tables show the median, its range, and how many rounds met a target.
    #[test]
    fn rounds_give_median_ratios() {
        let mut text = String::new();
        // Baseline and device take turns; round 2 of the device failed.
        for (dev, round, iops, rc) in [
            ("nbd", 1, 100.0, 0),
            ("ublk_nbd", 1, 150.0, 0),
            ("ublk_nbd", 2, 90.0, 1),
            ("nbd", 2, 200.0, 0),
            ("nbd", 3, 100.0, 0),
            ("ublk_nbd", 3, 105.0, 0),
            ("nbd", 4, 50.0, 0),
            ("ublk_nbd", 4, 60.0, 0),
        ] {
            let run = run_text(
                &format!("group=nbd queues=1 dev={dev} round={round}"),
                "randread-4k-qd32",
                iops,
            );
            text.push_str(&run.replace(" rc=0 ", &format!(" rc={rc} ")));
        }
        text.push_str("@@DONE@@\n@@INFO host.rc=0@@\n@@INFO host.repeat=4@@\n");
        let k = KernelResults::parse("6.12", &text);
        assert_eq!(k.runs.len(), 8);
        assert_eq!(k.runs[2].round, 2);
        let r = ratio(&k, "nbd", 1, "ublk_nbd", "randread-4k-qd32").unwrap();
        // Rounds 1, 3, 4: 1.5, 1.05, 1.2 (round 2 failed, so it has no ratio).
        assert_eq!(r.each.len(), 3);
        assert!((r.median - 1.2).abs() < 1e-9, "{r:?}");
        assert_eq!(r.text(), "1.20 (1.05-1.50)");
        // The tables show the median run: IOPS 105 of 60, 105, 150.
        assert_eq!(
            find(&k, "nbd", 1, "ublk_nbd", "randread-4k-qd32")
                .unwrap()
                .iops,
            105.0
        );
        // Baseline: 50, 100, 100, 200: the lower middle one.
        assert_eq!(
            find(&k, "nbd", 1, "nbd", "randread-4k-qd32").unwrap().iops,
            100.0
        );
        let t = targets_table(&k);
        assert!(t.contains("1.20 ≥ 1.10 ✓ (2/3 rounds)"), "{t}");
        let doc = render_doc(&[k], None);
        assert!(doc.contains("4 rounds per device and job"), "{doc}");
        assert!(doc.contains("1.20 (1.05-1.50) vs nbd-client"), "{doc}");
        assert_eq!(median(&[1.0, 3.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    /// With rublk runs, a table of ours against rublk's like-for-like device, and a method line;
    /// without, neither.
    #[test]
    fn against_rublk_and_kublk() {
        for (peer, pairs) in [("rublk", RUBLK_PAIRS), ("kublk", KUBLK_PAIRS)] {
            let mut text = format!("@@INFO cmd.{peer}_loop={peer} add loop -q 1 /x@@\n");
            for (group, dev, iops) in [
                ("null", "null_blk", 1000.0),
                ("null", "ublk_null", 900.0),
                ("null", &format!("{peer}_null_u"), 600.0),
                ("loop", "loop", 500.0),
                ("loop", "ublk_loop_c", 400.0),
                ("loop", &format!("{peer}_loop"), 200.0),
            ] {
                text.push_str(&run_text(
                    &format!("group={group} queues=1 dev={dev}"),
                    "randread-4k-qd32",
                    iops,
                ));
            }
            text.push_str("@@DONE@@\n");
            let k = KernelResults::parse("7.3", &text);
            let t = peer_table(&k, pairs);
            assert!(
                t.contains(&format!("| ublk null        | {peer} null -u |")),
                "{t}"
            );
            assert!(t.contains("1.50"), "{t}");
            assert!(
                t.contains(&format!("| ublk loop --copy | {peer} loop    |")),
                "{t}"
            );
            assert!(t.contains("2.00"), "{t}");
            assert!(!t.contains("qcow2"), "{t}");
            let sum = summary_table(&k);
            assert!(sum.contains(&format!("{peer} null -u")), "{sum}");
            let doc = render_doc(&[k], None);
            assert!(doc.contains(&format!("### Against {peer}")), "{doc}");
            assert!(doc.contains(&format!("`{peer} add loop -q 1 /x`")), "{doc}");
            let plain = KernelResults::parse("7.3", &text.replace(peer, "x"));
            assert_eq!(peer_table(&plain, pairs), "");
            assert!(!render_doc(&[plain], None).contains(peer));
        }
    }

    #[test]
    fn notes_survive_regeneration() {
        let old = "# Benchmarks\n\n## Linux 6.12\n\n| a |\n\n## Notes\n\nWhy nbd is slow.\n";
        assert_eq!(notes_of(old), Some("## Notes\n\nWhy nbd is slow.\n"));
        assert_eq!(notes_of("## Notes\nx\n"), Some("## Notes\nx\n"));
        assert_eq!(notes_of("# B\n\n## Notes about x\n"), None);
        assert_eq!(notes_of(""), None);
    }
}
