//! `ublk-vm-tests`: kernel-facing integration tests, run inside a VM by `cargo xtask test-vm`.
//!
//! Usage: `ublk-vm-tests [--list] [FILTER[,FILTER...]]` (a test runs when its name contains one
//! of the filters; without an argument `UBLK_VM_FILTER` is used). Every test runs in a child
//! process (`ublk-vm-tests --run-one NAME`) with its own timeout, followed by a cleanup
//! (unmount, `ublk del -a`, kill leftover daemons, remove scratch files).
//!
//! Console protocol, parsed by xtask:
//! `@@TEST START name@@`, `@@TEST PASS name secs@@`, `@@TEST FAIL name secs reason@@`,
//! `@@TEST SKIP name secs reason@@`.
//!
//! Environment: `UBLK_VM_KERNEL` (label the host booted, e.g. `6.12`), `UBLK_VM_FILTER`,
//! `UBLK_BIN` (path of `ublk`, default `/opt/bin/ublk`).

#![forbid(unsafe_code)]

mod cases;
mod nbd_cases;
mod qcow2_cases;
mod unpriv_cases;
mod util;

use anyhow::Result;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// How a test ended when it did not fail.
#[derive(Debug)]
pub enum Outcome {
    Pass,
    Skip(String),
}

pub type TestFn = Box<dyn Fn() -> Result<Outcome>>;

pub struct Test {
    pub name: String,
    pub timeout: Duration,
    pub run: TestFn,
}

impl std::fmt::Debug for Test {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Test")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

const EXIT_SKIP: i32 = 77;
const RESULT_FILE: &str = "/run/ublk-vm-tests.result";

/// Kernel log patterns that make an otherwise passing test fail.
const SPLATS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "general protection fault",
    "Call Trace:",
    "blocked for more than",
    "RCU stall",
    "soft lockup",
    // A request type our device advertises was refused by the target (the kernel's own loop
    // over tmpfs, used as scratch space, refuses WRITE_ZEROES the same way: not ours).
    "operation not supported error, dev ublkb",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tests = cases::all();
    match args.first().map(String::as_str) {
        Some("--list") => {
            for t in &tests {
                println!("{}", t.name);
            }
            ExitCode::SUCCESS
        }
        Some("--run-one") => {
            let Some(t) = args
                .get(1)
                .and_then(|n| tests.iter().find(|t| &t.name == n))
            else {
                eprintln!("unknown test {:?}", args.get(1));
                return ExitCode::from(2);
            };
            run_one(t)
        }
        Some("-h" | "--help") => {
            println!("usage: ublk-vm-tests [--list] [FILTER[,FILTER...]]");
            ExitCode::SUCCESS
        }
        filter => {
            let filter = filter
                .map(str::to_string)
                .or_else(|| std::env::var("UBLK_VM_FILTER").ok())
                .unwrap_or_default();
            run_all(&tests, &filter)
        }
    }
}

/// In the child: run one test, record a skip or failure reason in [`RESULT_FILE`].
fn run_one(t: &Test) -> ExitCode {
    let result = (t.run)();
    let (code, reason) = match result {
        Ok(Outcome::Pass) => (0, String::new()),
        Ok(Outcome::Skip(r)) => (EXIT_SKIP, r),
        Err(e) => {
            eprintln!("{}: FAILED: {e:#}", t.name);
            (1, format!("{e:#}"))
        }
    };
    if let Err(e) = std::fs::write(RESULT_FILE, &reason) {
        eprintln!("cannot write {RESULT_FILE}: {e}");
    }
    ExitCode::from(code as u8)
}

fn one_line(s: &str) -> String {
    let s = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace("@@", "@ @");
    if s.chars().count() > 400 {
        s.chars().take(400).collect::<String>() + "..."
    } else {
        s
    }
}

fn matches(name: &str, filter: &str) -> bool {
    let pats: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    pats.is_empty() || pats.iter().any(|p| name.contains(p))
}

fn dmesg() -> String {
    util::run_timeout(&mut Command::new("dmesg"), Duration::from_secs(10))
        .map(|r| r.stdout)
        .unwrap_or_default()
}

/// Kernel log lines in `after` that were not in `before` (the log is never cleared, so running
/// the tests outside the VM does not wipe the host's log).
fn dmesg_new(before: &str, after: &str) -> String {
    if let Some(rest) = after.strip_prefix(before) {
        return rest.to_string();
    }
    // The ring buffer wrapped: continue after the last line we had seen.
    match before
        .lines()
        .last()
        .and_then(|l| after.rfind(l).map(|i| i + l.len()))
    {
        Some(i) => after[i..].to_string(),
        None => after.to_string(),
    }
}

/// Per-test timeouts are multiplied by `UBLK_VM_TIMEOUT_SCALE` (default 1) for slow machines.
fn timeout_scale() -> f64 {
    std::env::var("UBLK_VM_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s: &f64| *s > 0.0)
        .unwrap_or(1.0)
}

fn run_all(tests: &[Test], filter: &str) -> ExitCode {
    let selected: Vec<&Test> = tests.iter().filter(|t| matches(&t.name, filter)).collect();
    println!(
        "ublk-vm-tests: {} of {} tests selected (filter {filter:?}), kernel {}",
        selected.len(),
        tests.len(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    if selected.is_empty() {
        println!("ublk-vm-tests: no test matches {filter:?}");
        return ExitCode::from(2);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| "/opt/bin/ublk-vm-tests".into());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for t in selected {
        println!("@@TEST START {}@@", t.name);
        let kmsg_before = dmesg();
        let timeout = t.timeout.mul_f64(timeout_scale());
        let _ = std::fs::remove_file(RESULT_FILE);
        let start = Instant::now();
        let child = Command::new(&exe)
            .args(["--run-one", &t.name])
            .process_group(0)
            .spawn();
        let status = match child {
            Err(e) => Err(format!("cannot start child: {e}")),
            Ok(mut child) => {
                let pgid = child.id() as i64;
                let st = util::wait_child(&mut child, timeout);
                // Whatever the child started in its process group goes with it.
                util::kill_group(pgid);
                match st {
                    Ok(Some(st)) => Ok(st),
                    Ok(None) => Err(format!("timeout after {:.0}s", timeout.as_secs_f64())),
                    Err(e) => Err(format!("waiting for child: {e}")),
                }
            }
        };
        let secs = start.elapsed().as_secs_f64();
        let reason = std::fs::read_to_string(RESULT_FILE).unwrap_or_default();
        let (mut kind, mut why) = match status {
            Err(e) => ("FAIL", e),
            Ok(st) if st.success() => ("PASS", String::new()),
            Ok(st) if st.code() == Some(EXIT_SKIP) => ("SKIP", reason),
            Ok(st) if reason.is_empty() => ("FAIL", format!("test process ended with {st}")),
            Ok(_) => ("FAIL", reason),
        };
        let notes = util::cleanup();
        if !notes.is_empty() {
            println!("cleanup after {}: {}", t.name, notes.join("; "));
        }
        let kmsg = dmesg_new(&kmsg_before, &dmesg());
        if let Some(line) = kmsg.lines().find(|l| SPLATS.iter().any(|s| l.contains(s))) {
            if kind != "FAIL" {
                kind = "FAIL";
                why = format!("kernel splat: {}", line.trim());
            }
        }
        if kind == "FAIL" && !kmsg.trim().is_empty() {
            println!("---- kernel log during {} ----", t.name);
            for l in kmsg.lines().take(200) {
                println!("  {l}");
            }
            println!("---- end of kernel log ----");
        }
        match kind {
            "PASS" => passed += 1,
            "SKIP" => skipped += 1,
            _ => failed += 1,
        }
        if why.is_empty() {
            println!("@@TEST {kind} {} {secs:.1}@@", t.name);
        } else {
            println!("@@TEST {kind} {} {secs:.1} {}@@", t.name, one_line(&why));
        }
    }
    println!(
        "ublk-vm-tests summary: {passed} passed, {failed} failed, {skipped} skipped (in guest)"
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
