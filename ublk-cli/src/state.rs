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

/// A fresh log file for a daemon being started (`/run/ublk/add-PID.log`).
pub(crate) fn open_add_log() -> Option<(PathBuf, std::fs::File)> {
    std::fs::create_dir_all(DIR).ok()?;
    let path = PathBuf::from(DIR).join(format!("add-{}.log", std::process::id()));
    let f = std::fs::File::create(&path).ok()?;
    Some((path, f))
}

/// Where device `id`'s daemon logs.
pub(crate) fn log_path(id: u32) -> PathBuf {
    PathBuf::from(DIR).join(format!("ublk{id}.log"))
}

/// Keeps a started daemon's log as `/run/ublk/ublkN.log`.
/// The previous log of that id (an earlier daemon of a recovered device, or an older device)
/// is kept as `ublkN.log.1`.
pub(crate) fn keep_log(tmp: &std::path::Path, id: u32) {
    let path = log_path(id);
    let _ = std::fs::rename(&path, path.with_extension("log.1"));
    if let Err(e) = std::fs::rename(tmp, &path) {
        log::warn!("cannot keep the daemon log {}: {e}", tmp.display());
    }
}
