//! `ublk del`: stop a device, wait for its daemon to exit, delete it.

use crate::state;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use ublk_core::Ctrl;

pub(crate) fn run(id: Option<u32>, all: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let ids = if all {
        Ctrl::list()
    } else {
        id.into_iter().collect()
    };
    let mut first_err = None;
    for id in ids {
        if let Err(e) = del_one(&mut ctrl, id) {
            if !all {
                return Err(e);
            }
            eprintln!("ublk: {e:#}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn del_one(ctrl: &mut Ctrl, id: u32) -> Result<()> {
    let info = ctrl.dev_info(id)?;
    ctrl.stop(id)
        .with_context(|| format!("cannot stop device {id}"))?;
    if info.daemon_pid > 0 && !wait_exit(info.daemon_pid, Duration::from_secs(20)) {
        log::warn!("daemon {} of device {id} is still running", info.daemon_pid);
    }
    match ctrl.del(id) {
        Ok(()) | Err(ublk_core::CtrlError::NoDevice(_)) => {}
        Err(e) => return Err(e).with_context(|| format!("cannot delete device {id}")),
    }
    state::remove(id);
    Ok(())
}

/// Waits until `pid` is gone (or a zombie).
fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s) => {
                let state = s.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
                if matches!(state, Some('Z' | 'X')) {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
