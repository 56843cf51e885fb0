//! `ublk del`: stop a device, wait for its daemon to exit, delete it; and `ublk quiesce`:
//! detach the daemon and keep the device for `ublk recover`.

use crate::state;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use ublk_core::{Ctrl, DevState, DeviceFlags};

pub(crate) fn run(id: Option<u32>, all: bool, force: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let ids = if all {
        Ctrl::list()
    } else {
        id.into_iter().collect()
    };
    let mut first_err = None;
    for id in ids {
        if let Err(e) = del_one(&mut ctrl, id, force) {
            if !all {
                return Err(e);
            }
            // Other users' devices are not ours to delete.
            if matches!(e.downcast_ref(), Some(ublk_core::CtrlError::NotOwner(_))) {
                log::debug!("device {id}: {e}");
                continue;
            }
            eprintln!("ublk: {e:#}");
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

fn del_one(ctrl: &mut Ctrl, id: u32, force: bool) -> Result<()> {
    let info = ctrl.dev_info(id)?;
    let busy = in_use(id);
    if busy && !force {
        anyhow::bail!(
            "device {id} is in use (/dev/ublkb{id} is mounted or held open exclusively): \
             unmount it first, or `ublk del --force -n {id}` to delete it anyway (its file \
             system then sees IO errors)"
        );
    }
    ctrl.stop(id)
        .with_context(|| format!("cannot stop device {id}"))?;
    if info.daemon_pid > 0 && !wait_exit(info.daemon_pid, Duration::from_secs(20)) {
        log::warn!("daemon {} of device {id} is still running", info.daemon_pid);
    }
    // DEL_DEV waits for the disk's last user, which a mounted file system is until it is
    // unmounted: don't wait for it (DEL_DEV_ASYNC, Linux 6.9) where the kernel can.
    let deleted = if busy {
        match ctrl.del_async(id) {
            Err(ublk_core::CtrlError::Unsupported { .. }) => ctrl.del(id),
            r => r,
        }
    } else {
        ctrl.del(id)
    };
    match deleted {
        Ok(()) | Err(ublk_core::CtrlError::NoDevice(_)) => {}
        Err(e) => return Err(e).with_context(|| format!("cannot delete device {id}")),
    }
    state::remove(id);
    Ok(())
}

/// Whether the block device of `id` is mounted or held open exclusively by someone: an
/// exclusive open of it fails with EBUSY (plain openers such as fio or dd do not count).
fn in_use(id: u32) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_NONBLOCK)
        .open(format!("/dev/ublkb{id}"))
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

/// `ublk quiesce -n ID`: QUIESCE_DEV makes the daemon let go of the device (its queues see
/// every command aborted and it exits, leaving the device); IO waits in the kernel until
/// `ublk recover` attaches a new daemon.
pub(crate) fn quiesce(id: u32, timeout_secs: u64) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let info = ctrl.dev_info(id)?;
    if !info.flags.contains(DeviceFlags::QUIESCE) {
        if info.flags.contains(DeviceFlags::USER_RECOVERY_FAIL_IO) {
            anyhow::bail!(
                "device {id} fails IO while no daemon is attached (`-e 1`), so it is not \
                 offered for quiescing"
            );
        }
        if info.flags.contains(DeviceFlags::BATCH_IO) {
            anyhow::bail!(
                "device {id} uses batch io commands (-b), which cannot be quiesced without \
                 failing the requests in flight; `ublk del` and `ublk add` again instead"
            );
        }
        let features = ctrl.features()?;
        if !features.contains(DeviceFlags::QUIESCE) {
            anyhow::bail!(
                "quiescing a device needs Linux 6.16 or later (UBLK_F_QUIESCE); this kernel is {}",
                ublk_core::kernel_release()
            );
        }
        anyhow::bail!(
            "device {id} cannot be quiesced: it was added without user recovery (`ublk add -r 1`)"
        );
    }
    if info.state != DevState::Live {
        anyhow::bail!("device {id} is {}, not LIVE", info.state.name());
    }
    // The kernel waits up to `timeout_secs` (0: for ever): our own limit must be longer.
    ctrl.set_timeout(match timeout_secs {
        0 => Duration::from_secs(365 * 24 * 3600),
        t => Duration::from_secs(t.saturating_add(15)),
    });
    if let Err(e) = ctrl.quiesce(id, timeout_secs.saturating_mul(1000)) {
        // The kernel has stopped handing requests to the daemon and keeps them queued.
        return Err(anyhow::Error::new(e).context(format!(
            "cannot quiesce device {id}; IO to it now waits in the kernel: `kill -9 {}` \
             (its daemon) and `ublk recover -n {id}` bring it back",
            info.daemon_pid
        )));
    }
    // The daemon ends its queues and tears down; under heavy load (an emulated machine
    // with fio running) that took over 20 s once in CI.
    if info.daemon_pid > 0 && !wait_exit(info.daemon_pid, Duration::from_secs(60)) {
        anyhow::bail!(
            "device {id} is quiesced but its daemon {} did not exit within 60 s",
            info.daemon_pid
        );
    }
    // The kernel moves the device to QUIESCED once the daemon has closed /dev/ublkcN.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = ctrl.dev_info(id)?.state;
        if st == DevState::Quiesced {
            break;
        }
        if Instant::now() >= deadline {
            anyhow::bail!("device {id} is {} after QUIESCE_DEV", st.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // On stderr: scripts written for kublk read the state from stdout right after.
    eprintln!("device {id} quiesced; `ublk recover -n {id}` attaches a new daemon");
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
