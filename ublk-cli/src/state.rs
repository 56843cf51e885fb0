//! Per-device run state in `/run/ublk/ublkN.json` (`$XDG_RUNTIME_DIR/ublk` for users who
//! cannot write `/run/ublk`): how the device was added (so `recover` can
//! start an identical daemon) and what `list` shows as its target.

use crate::AddArgs;
use std::path::PathBuf;

const DIR: &str = "/run/ublk";

/// Where state and logs go: `/run/ublk`, or for users who cannot write there (owners of
/// unprivileged devices) `$XDG_RUNTIME_DIR/ublk`.
fn dirs() -> Vec<PathBuf> {
    let mut d = vec![PathBuf::from(DIR)];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
        d.push(PathBuf::from(x).join("ublk"));
    }
    d
}

/// The first of [`dirs`] this process can create files in.
fn writable_dir() -> Option<PathBuf> {
    dirs()
        .into_iter()
        .find(|d| std::fs::create_dir_all(d).is_ok() && tempfile_probe(d))
}

fn tempfile_probe(d: &std::path::Path) -> bool {
    let p = d.join(format!(".probe-{}", std::process::id()));
    let ok = std::fs::File::create(&p).is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// `name` in the first of [`dirs`] that has it.
fn existing(name: &str) -> Option<PathBuf> {
    dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.exists())
}

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

fn name(id: u32) -> String {
    format!("ublk{id}.json")
}

pub(crate) fn save(id: u32, st: &DevState) {
    let write = || -> std::io::Result<PathBuf> {
        let dir = writable_dir().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("no writable directory among {:?}", dirs()),
            )
        })?;
        let path = dir.join(name(id));
        let tmp = path.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, &path)?;
        Ok(path)
    };
    if let Err(e) = write() {
        log::warn!("cannot save the state of device {id}: {e}");
    }
}

pub(crate) fn load(id: u32) -> Option<DevState> {
    let data = std::fs::read(existing(&name(id))?).ok()?;
    serde_json::from_slice(&data).ok()
}

pub(crate) fn remove(id: u32) {
    for d in dirs() {
        let _ = std::fs::remove_file(d.join(name(id)));
    }
}

/// A fresh log file for a daemon being started (`add-PID.log`).
pub(crate) fn open_add_log() -> Option<(PathBuf, std::fs::File)> {
    let path = writable_dir()?.join(format!("add-{}.log", std::process::id()));
    let f = std::fs::File::create(&path).ok()?;
    Some((path, f))
}

/// Where device `id`'s daemon logs (`ublkN.log` next to the add log, if there is one).
pub(crate) fn log_path(id: u32) -> PathBuf {
    let n = format!("ublk{id}.log");
    existing(&n).unwrap_or_else(|| PathBuf::from(DIR).join(n))
}

/// Keeps a started daemon's log as `ublkN.log` in the directory of `tmp`.
/// The previous log of that id (an earlier daemon of a recovered device, or an older device)
/// is kept as `ublkN.log.1`.
pub(crate) fn keep_log(tmp: &std::path::Path, id: u32) {
    let dir = tmp.parent().unwrap_or(std::path::Path::new(DIR));
    let path = dir.join(format!("ublk{id}.log"));
    let _ = std::fs::rename(&path, path.with_extension("log.1"));
    if let Err(e) = std::fs::rename(tmp, &path) {
        log::warn!("cannot keep the daemon log {}: {e}", tmp.display());
    }
}
