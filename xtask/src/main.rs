//! Project automation: `cargo xtask <task>`.
//!
//! * `bindgen [--check]`: regenerate (or check) `ublk-sys/src/bindings.rs` from the vendored header.
//! * `test-vm`: boot real Debian kernels under qemu and run the kernel-facing tests.
//! * `vm-shell`: an interactive guest with `ublk` and the test tools, for trying things out.
//! * `bench`: fio figures of our devices against kernel baselines, one boot per kernel.

mod bench;
mod bindgen;
mod initramfs;
mod json;
mod kernel;
mod kublk;
mod peers;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "xtask", about = "ublk-rs project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Regenerate ublk-sys/src/bindings.rs from ublk-sys/include/ublk_cmd.h.
    Bindgen {
        /// Fail instead of writing when the committed bindings are stale.
        #[arg(long)]
        check: bool,
    },
    /// Boot Debian kernels under qemu and run `ublk-vm-tests` inside (see xtask/src/vm.rs).
    ///
    /// Prints one `PASS|FAIL|SKIP <kernel> <test> ...` line per test and closes with
    /// `N passed, M failed, K skipped`.
    TestVm {
        /// Kernel(s): 6.12, 7.3, a comma-separated list, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Run only tests whose name contains PATTERN (comma-separated alternatives).
        #[arg(long)]
        filter: Option<String>,
        /// Boot into an interactive shell instead of running the tests.
        #[arg(long)]
        shell: bool,
        /// Host-side limit for one boot, in seconds.
        #[arg(long, default_value_t = vm::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
        /// Do not stream the guest console (it is still saved to target/vm/<kernel>.log).
        #[arg(long)]
        quiet: bool,
        /// Use the binaries already in target/release instead of running cargo build.
        #[arg(long)]
        no_build: bool,
    },
    /// Run the kernel's own ublk selftests (tools/testing/selftests/ublk of Linux 7.3, from
    /// Debian's linux-source-7.3) in the VM with our `ublk` as their server, on each kernel.
    Selftests {
        /// Kernel(s): 6.12, 7.3, a comma-separated list, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only these tests, comma-separated (e.g. `loop_01,recover_01`).
        #[arg(long)]
        tests: Option<String>,
        /// Host-side limit for one boot, in seconds.
        #[arg(long, default_value_t = 2400)]
        timeout: u64,
        /// Show only the result lines, not the guest console.
        #[arg(long)]
        quiet: bool,
        /// Use the binaries already in target/release instead of running cargo build.
        #[arg(long)]
        no_build: bool,
    },
    /// Fetch the kernel selftests' ublk server (kublk, in C) from Debian's linux-source-7.3 and
    /// build it statically into target/vm/kublk/kublk (prints the path), for `bench --kublk`.
    Kublk,
    /// Boot one kernel into an interactive shell with ublk and the test tools (Ctrl-A X quits).
    VmShell {
        /// Kernel: 6.12 or 7.3.
        #[arg(long, default_value = "7.3")]
        kernel: String,
        /// Use the binaries already in target/release instead of running cargo build.
        #[arg(long)]
        no_build: bool,
        /// Also copy this host program into the guest's /opt/bin (repeatable; its shared
        /// libraries come along), e.g. a measuring tool for an experiment.
        #[arg(long = "with", value_name = "PROGRAM")]
        with: Vec<PathBuf>,
    },
    /// Boot each kernel once and run a fixed fio matrix: kernel null_blk and loop vs our null,
    /// loop (copy, -g, -u) and qcow2 devices, 1 and 2 queues (see xtask/src/bench.rs).
    ///
    /// Prints the tables and writes docs/benchmarks.md (unless --filter or --no-docs).
    Bench {
        /// Kernel(s): 6.12, 7.3, a comma-separated list, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Shorter runs (3 s each instead of 5 s).
        #[arg(long)]
        quick: bool,
        /// Seconds per fio run (overrides --quick).
        #[arg(long)]
        runtime: Option<u64>,
        /// Run each job N times on every device of its group, the devices taking turns; the
        /// tables show median ratios with their range.
        #[arg(long, value_name = "N", default_value_t = 1)]
        repeat: u32,
        /// Only runs whose "group:device/qQUEUES/job" contains PATTERN (comma-separated alternatives),
        /// e.g. `ublk_null/q1/`, `randread-4k-qd1`; devices: null_blk ublk_null loop ublk_loop
        /// ublk_loop_g ublk_loop_u ublk_qcow2.
        #[arg(long)]
        filter: Option<String>,
        /// Host-side limit for one boot, in seconds (default: from the runtime).
        #[arg(long)]
        timeout: Option<u64>,
        /// Show only the benchmark progress lines, not the whole guest console.
        #[arg(long)]
        quiet: bool,
        /// Use the binaries already in target/release instead of running cargo build.
        #[arg(long)]
        no_build: bool,
        /// Do not write docs/benchmarks.md.
        #[arg(long)]
        no_docs: bool,
        /// Before each boot, wait up to SECS for the host CPUs to be idle (other work on the host
        /// makes the figures noisy).
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        wait_quiet: u64,
        /// Do not boot: rebuild the tables (and docs/benchmarks.md) from the results saved by
        /// the last run in target/vm/bench-<kernel>.out.
        #[arg(long)]
        rerender: bool,
        /// Also measure rublk (the libublk-based ublk server; e.g. from `cargo install rublk
        /// --root DIR`, then DIR/bin/rublk): its null, loop and qcow2 devices in the same
        /// groups, and a table of ours against it.
        #[arg(long, value_name = "PATH")]
        rublk: Option<PathBuf>,
        /// Also measure kublk (the kernel selftests' ublk server, in C; `cargo xtask kublk`
        /// builds it): its null and loop devices in the same groups, and a table of ours
        /// against it.
        #[arg(long, value_name = "PATH")]
        kublk: Option<PathBuf>,
        /// One more word for the guest kernel's command line (repeatable), for an A/B such as
        /// `mitigations=off`.
        #[arg(long = "kernel-arg", value_name = "WORD")]
        kernel_args: Vec<String>,
        /// The nbd group's server: qemu-nbd (one thread: it bounds every client with one
        /// connection) or nbdkit (its file plugin, a pool of threads per connection).
        #[arg(long, value_name = "SERVER", default_value = "qemu-nbd",
              value_parser = ["qemu-nbd", "nbdkit"])]
        nbd_server: String,
    },
    /// Fetch qemu-nbd from Debian trixie (extended headers) into target/vm/qemu-nbd-trixie and
    /// print the wrapper that runs it on this host (the nbd host tests use it when it is there;
    /// the VM tests always have it, as /opt/bin/qemu-nbd-new).
    QemuNbdNew,
    /// Print the Debian packages the host needs for test-vm / vm-shell.
    VmHostPackages,
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Bindgen { check } => bindgen::run(check).map(|()| ExitCode::SUCCESS),
        Cmd::TestVm {
            kernel,
            filter,
            shell,
            timeout,
            quiet,
            no_build,
        } => vm::test(&vm::TestOptions {
            kernels: vm::parse_kernels(&kernel)?,
            filter,
            shell,
            timeout: Duration::from_secs(timeout),
            quiet,
            no_build,
        }),
        Cmd::VmShell {
            kernel,
            no_build,
            with,
        } => vm::shell(kernel::spec(&kernel)?, None, no_build, &with),
        Cmd::Bench {
            kernel,
            quick,
            runtime,
            repeat,
            filter,
            timeout,
            quiet,
            no_build,
            no_docs,
            wait_quiet,
            rerender,
            rublk,
            kublk,
            kernel_args,
            nbd_server,
        } => bench::run(&bench::BenchOptions {
            kernels: vm::parse_kernels(&kernel)?,
            quick,
            runtime,
            repeat,
            filter,
            timeout,
            quiet,
            no_build,
            no_docs,
            wait_quiet,
            rerender,
            rublk,
            kublk,
            kernel_args,
            nbd_server,
        }),
        Cmd::Selftests {
            kernel,
            tests,
            timeout,
            quiet,
            no_build,
        } => kublk::selftests(&kublk::SelftestOptions {
            kernels: vm::parse_kernels(&kernel)?,
            tests,
            timeout: Duration::from_secs(timeout),
            quiet,
            no_build,
        }),
        Cmd::Kublk => {
            println!("{}", kublk::build()?.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::QemuNbdNew => {
            println!("{}", peers::qemu_nbd_new()?.wrapper.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::VmHostPackages => {
            println!("{}", vm::HOST_PACKAGES.join(" "));
            Ok(ExitCode::SUCCESS)
        }
    }
}
