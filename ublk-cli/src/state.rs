//! Per-device run state in `/run/ublk/ublkN.json`: how the device was added (so `recover` can
//! start an identical daemon) and what `list` shows as its target.

use crate::AddArgs;
use std::path::PathBuf;

const DIR: &str = "/run/ublk";

/// What is stored for a device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct DevState {
    /// The `add` arguments (with the id the kernel assigned).
    pub(crate) args: AddArgs,
    /// Daemon pid.
    pub(crate) pid: u32,
    /// Target description for `list`.
    pub(crate) target: serde_json::Value,
}

fn path(id: u32) -> PathBuf {
    PathBuf::from(DIR).join(format!("ublk{id}.json"))
}

pub(crate) fn save(id: u32, st: &DevState) {
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(DIR)?;
        let tmp = path(id).with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, path(id))
    };
    if let Err(e) = write() {
        log::warn!("cannot save {}: {e}", path(id).display());
    }
}

pub(crate) fn load(id: u32) -> Option<DevState> {
    let data = std::fs::read(path(id)).ok()?;
    serde_json::from_slice(&data).ok()
}

pub(crate) fn remove(id: u32) {
    let _ = std::fs::remove_file(path(id));
}
