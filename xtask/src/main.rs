//! Project automation: `cargo xtask <task>`.
//!
//! * `bindgen [--check]`: regenerate (or check) `ublk-sys/src/bindings.rs` from the vendored header.
//! * `test-vm`: boot real Debian kernels under qemu and run the kernel-facing tests.
//! * `vm-shell`: an interactive guest with `ublk` and the test tools, for trying things out.

mod bindgen;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bindgen { check } => bindgen::run(check),
    }
}
