//! The control device `/dev/ublk-control`: every `UBLK_U_CMD_*` command.
//!
//! Commands travel as `IORING_OP_URING_CMD` on a ring with 128-byte SQEs. Each command is
//! bounded by a timeout, so a misbehaving kernel cannot block the caller forever.
//!
//! # Safety
//!
//! A command's SQE points at a payload buffer owned by [`Ctrl`]. The buffer is not touched or
//! freed until the command's completion has been reaped; if the completion does not arrive in
//! time, the buffer is leaked and the `Ctrl` refuses further commands, so the kernel can never
//! write into freed memory.
#![allow(unsafe_code)]

use crate::flags::DeviceFlags;
use crate::params::{DevNumbers, DeviceParams};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use ublk_sys as sys;

/// Path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// Errors of control commands.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtrlError {
    /// `/dev/ublk-control` does not exist.
    #[error("{CONTROL_PATH} not found: the ublk_drv kernel module is not loaded (try `modprobe ublk_drv`)")]
    NoControlDevice,
    /// Opening the control device was refused.
    #[error("permission denied opening {CONTROL_PATH}: ublk devices need root (CAP_SYS_ADMIN), or, for unprivileged devices (`--unprivileged`), the udev rules that give users access (docs/USAGE.md, section Without root)")]
    PermissionDenied,
    /// Another error opening the control device or setting up its ring.
    #[error("failed to set up {CONTROL_PATH}")]
    Open(#[source] io::Error),
    /// The running kernel lacks something the request needs.
    #[error("{what} needs Linux {since} or later; this kernel is {running}")]
    Unsupported {
        /// The feature or command.
        what: String,
        /// First mainline release with it.
        since: &'static str,
        /// `uname -r` of the running kernel.
        running: String,
    },
    /// No such device.
    #[error("device {0} does not exist")]
    NoDevice(u32),
    /// The caller may not use this device (the kernel checks access to `/dev/ublkcN`).
    #[error("permission denied for device {0}: it belongs to another user (or to root)")]
    NotOwner(u32),
    /// The kernel rejected a command.
    #[error("{cmd} for {} failed", DevName(*.dev_id))]
    Command {
        /// Command name.
        cmd: &'static str,
        /// Device id (u32::MAX: none).
        dev_id: u32,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A command did not complete in time; this `Ctrl` is unusable afterwards.
    #[error("{cmd} for {} did not complete within {timeout:?}", DevName(*.dev_id))]
    Timeout {
        /// Command name.
        cmd: &'static str,
        /// Device id.
        dev_id: u32,
        /// The limit.
        timeout: Duration,
    },
    /// Invalid request (bad argument).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// "device N", or "a new device" for the id that lets the kernel choose (`u32::MAX`).
struct DevName(u32);

impl std::fmt::Display for DevName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            u32::MAX => f.write_str("a new device"),
            id => write!(f, "device {id}"),
        }
    }
}

/// Result of control operations.
pub type Result<T, E = CtrlError> = std::result::Result<T, E>;

/// Device state (`UBLK_S_DEV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevState {
    /// `UBLK_S_DEV_DEAD`: added or stopped, no disk.
    Dead,
    /// `UBLK_S_DEV_LIVE`: serving IO.
    Live,
    /// `UBLK_S_DEV_QUIESCED`: daemon gone, IO queued until recovery.
    Quiesced,
    /// `UBLK_S_DEV_FAIL_IO`: daemon gone, IO fails until recovery.
    FailIo,
    /// A state this crate does not know.
    Unknown(u16),
}

impl DevState {
    fn from_raw(s: u16) -> DevState {
        match u32::from(s) {
            sys::UBLK_S_DEV_DEAD => DevState::Dead,
            sys::UBLK_S_DEV_LIVE => DevState::Live,
            sys::UBLK_S_DEV_QUIESCED => DevState::Quiesced,
            sys::UBLK_S_DEV_FAIL_IO => DevState::FailIo,
            _ => DevState::Unknown(s),
        }
    }

    /// The name ublksrv and kublk print.
    pub fn name(self) -> &'static str {
        match self {
            DevState::Dead => "DEAD",
            DevState::Live => "LIVE",
            DevState::Quiesced => "QUIESCED",
            DevState::FailIo => "FAIL_IO",
            DevState::Unknown(_) => "UNKNOWN",
        }
    }
}

/// Device description (`struct ublksrv_ctrl_dev_info`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    /// Device id N (`/dev/ublkbN`).
    pub dev_id: u32,
    /// Number of hardware queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// State.
    pub state: DevState,
    /// Largest request buffer in bytes.
    pub max_io_buf_bytes: u32,
    /// Pid of the serving daemon (-1 or 0: none).
    pub daemon_pid: i32,
    /// Negotiated flags.
    pub flags: DeviceFlags,
    /// Owner uid.
    pub owner_uid: u32,
    /// Owner gid.
    pub owner_gid: u32,
    /// Descriptor size (24 unless `UBLK_F_IO_DESC_SIZE`).
    pub io_desc_size: u16,
    /// Free-form server flags stored by the kernel.
    pub server_flags: u64,
}

impl DevInfo {
    fn to_sys(self) -> sys::ublksrv_ctrl_dev_info {
        sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: self.nr_hw_queues,
            queue_depth: self.queue_depth,
            max_io_buf_bytes: self.max_io_buf_bytes,
            dev_id: self.dev_id,
            ublksrv_pid: self.daemon_pid,
            flags: self.flags.bits(),
            ublksrv_flags: self.server_flags,
            ..Default::default()
        }
    }

    fn from_sys(i: &sys::ublksrv_ctrl_dev_info) -> DevInfo {
        DevInfo {
            dev_id: i.dev_id,
            nr_hw_queues: i.nr_hw_queues,
            queue_depth: i.queue_depth,
            state: DevState::from_raw(i.state),
            max_io_buf_bytes: i.max_io_buf_bytes,
            daemon_pid: i.ublksrv_pid,
            flags: DeviceFlags::from_bits_retain(i.flags),
            owner_uid: i.owner_uid,
            owner_gid: i.owner_gid,
            io_desc_size: if i.io_desc_size == 0 {
                24
            } else {
                i.io_desc_size
            },
            server_flags: i.ublksrv_flags,
        }
    }

    /// `/dev/ublkcN`.
    pub fn char_path(&self) -> String {
        format!("/dev/ublkc{}", self.dev_id)
    }

    /// `/dev/ublkbN`.
    pub fn disk_path(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }
}

/// Request for ADD_DEV.
#[derive(Debug, Clone, Copy)]
pub struct AddRequest {
    /// Wanted id, or `None` for the kernel's choice.
    pub dev_id: Option<u32>,
    /// Queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// Largest request in bytes.
    pub max_io_buf_bytes: u32,
    /// Flags.
    pub flags: DeviceFlags,
}

/// The release of the running kernel (`uname -r`).
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `(name, first mainline release)` of each control command number.
fn cmd_info(op: u32) -> (&'static str, &'static str) {
    match op & 0xff {
        0x01 => ("GET_QUEUE_AFFINITY", "6.0"),
        0x02 => ("GET_DEV_INFO", "6.0"),
        0x04 => ("ADD_DEV", "6.0"),
        0x05 => ("DEL_DEV", "6.0"),
        0x06 => ("START_DEV", "6.0"),
        0x07 => ("STOP_DEV", "6.0"),
        0x08 => ("SET_PARAMS", "6.0"),
        0x09 => ("GET_PARAMS", "6.0"),
        0x10 => ("START_USER_RECOVERY", "6.1"),
        0x11 => ("END_USER_RECOVERY", "6.1"),
        0x12 => ("GET_DEV_INFO2", "6.3"),
        0x13 => ("GET_FEATURES", "6.5"),
        0x14 => ("DEL_DEV_ASYNC", "6.9"),
        0x15 => ("UPDATE_SIZE", "6.16"),
        0x16 => ("QUIESCE_DEV", "6.16"),
        0x17 => ("TRY_STOP_DEV", "7.0"),
        0x18 => ("REG_BUF", "7.1"),
        0x19 => ("UNREG_BUF", "7.1"),
        _ => ("UNKNOWN", "?"),
    }
}

const NO_DEV: u32 = u32::MAX;
const PAYLOAD_MAX: usize = 4096;

/// A handle on `/dev/ublk-control`. One per thread that issues control commands; it can be
/// moved between threads but not shared.
pub struct Ctrl {
    // Field order: the ring (and its in-flight commands) goes before the fd and the buffer.
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    file: File,
    payload: Box<[u8; PAYLOAD_MAX]>,
    features: Option<DeviceFlags>,
    timeout: Duration,
    poisoned: bool,
    /// Whether each device seen so far was added with `UBLK_F_UNPRIVILEGED_DEV`: commands for
    /// those carry the char-device path in front of their payload.
    unprivileged: std::collections::HashMap<u32, bool>,
}

impl std::fmt::Debug for Ctrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctrl")
            .field("timeout", &self.timeout)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Ctrl {
    /// Opens the control device.
    pub fn open() -> Result<Ctrl> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL_PATH)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => CtrlError::NoControlDevice,
                io::ErrorKind::PermissionDenied => CtrlError::PermissionDenied,
                _ => CtrlError::Open(e),
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(16)
            .map_err(CtrlError::Open)?;
        Ok(Ctrl {
            ring,
            file,
            payload: Box::new([0; PAYLOAD_MAX]),
            features: None,
            timeout: Duration::from_secs(30),
            poisoned: false,
            unprivileged: std::collections::HashMap::new(),
        })
    }

    /// Sets the limit for one command (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Issues one command; `payload` is copied in before and out after. Commands for an
    /// unprivileged device get its char-device path in front of the payload.
    fn cmd(
        &mut self,
        op: u32,
        dev_id: u32,
        queue_id: u16,
        data: u64,
        payload: Option<&mut [u8]>,
    ) -> Result<i32> {
        let per_device = dev_id != NO_DEV
            && !matches!(
                op,
                sys::UBLK_U_CMD_ADD_DEV
                    | sys::UBLK_U_CMD_GET_FEATURES
                    | sys::UBLK_U_CMD_GET_DEV_INFO2
            );
        if !per_device || !self.is_unprivileged(dev_id)? {
            return self.cmd_path(op, dev_id, queue_id, data, payload, 0);
        }
        let mut buf = char_dev_path(dev_id);
        let plen = buf.len();
        buf.extend_from_slice(payload.as_deref().unwrap_or(&[]));
        let r = self.cmd_path(op, dev_id, queue_id, data, Some(&mut buf), plen as u16)?;
        if let Some(p) = payload {
            p.copy_from_slice(&buf[plen..]);
        }
        Ok(r)
    }

    /// Whether `dev_id` is an unprivileged device (learnt once per device with GET_DEV_INFO2).
    fn is_unprivileged(&mut self, dev_id: u32) -> Result<bool> {
        if let Some(&u) = self.unprivileged.get(&dev_id) {
            return Ok(u);
        }
        match self.dev_info2_raw(dev_id) {
            Ok(Some(info)) => Ok(info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV)),
            // No GET_DEV_INFO2 (before 6.3): no unprivileged devices either. Any other refusal:
            // the command itself goes without a path and reports its error. Either way, do
            // not ask again for this device.
            Ok(None) | Err(CtrlError::Command { .. }) => {
                self.unprivileged.insert(dev_id, false);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Like `cmd`; the payload starts with a `dev_path_len`-byte char-device path (the
    /// unprivileged-device convention of GET_DEV_INFO2).
    fn cmd_path(
        &mut self,
        op: u32,
        dev_id: u32,
        queue_id: u16,
        data: u64,
        payload: Option<&mut [u8]>,
        dev_path_len: u16,
    ) -> Result<i32> {
        let (name, _) = cmd_info(op);
        if self.poisoned {
            return Err(CtrlError::Invalid(format!(
                "control handle unusable after an earlier timeout ({name})"
            )));
        }
        let len = payload.as_ref().map_or(0, |p| p.len());
        if len > PAYLOAD_MAX {
            return Err(CtrlError::Invalid(format!(
                "{name}: payload of {len} bytes"
            )));
        }
        if let Some(p) = payload.as_ref() {
            self.payload[..len].copy_from_slice(p);
        }
        let c = sys::ublksrv_ctrl_cmd {
            dev_id,
            queue_id,
            len: len as u16,
            addr: if len > 0 {
                self.payload.as_ptr() as u64
            } else {
                0
            },
            data: [data],
            dev_path_len,
            ..Default::default()
        };
        let mut raw = [0u8; 80];
        raw[..size_of::<sys::ublksrv_ctrl_cmd>()].copy_from_slice(as_bytes(&c));
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(raw)
            .build()
            .user_data(u64::from(op));
        // SAFETY: the SQE references only `self.payload`, which stays allocated and untouched
        // until the completion is reaped below (or is leaked on timeout; module contract).
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| CtrlError::Invalid("control ring full".into()))?;

        let deadline = Instant::now() + self.timeout;
        let res = loop {
            if let Some(cqe) = self.ring.completion().next() {
                break cqe.result();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // The kernel may still write into the payload: leak it, refuse further use.
                std::mem::forget(std::mem::replace(
                    &mut self.payload,
                    Box::new([0; PAYLOAD_MAX]),
                ));
                self.poisoned = true;
                return Err(CtrlError::Timeout {
                    cmd: name,
                    dev_id,
                    timeout: self.timeout,
                });
            }
            let ts = types::Timespec::from(left.min(Duration::from_millis(500)));
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(CtrlError::Open(e)),
            }
        };
        if res < 0 {
            return Err(self.cmd_error(op, dev_id, -res));
        }
        if let Some(p) = payload {
            p.copy_from_slice(&self.payload[..len]);
        }
        Ok(res)
    }

    fn cmd_error(&mut self, op: u32, dev_id: u32, errno: i32) -> CtrlError {
        let (name, since) = cmd_info(op);
        if errno == libc::ENODEV && dev_id != NO_DEV && op != sys::UBLK_U_CMD_ADD_DEV {
            return CtrlError::NoDevice(dev_id);
        }
        if matches!(errno, libc::EOPNOTSUPP | libc::ENOTTY) {
            return CtrlError::Unsupported {
                what: name.into(),
                since,
                running: kernel_release(),
            };
        }
        CtrlError::Command {
            cmd: name,
            dev_id,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Returns `Unsupported` unless the kernel has `flag`.
    fn require(&mut self, flag: DeviceFlags, what: &str) -> Result<()> {
        if self.features()?.contains(flag) {
            return Ok(());
        }
        Err(CtrlError::Unsupported {
            what: what.into(),
            since: flag.since().unwrap_or("?"),
            running: kernel_release(),
        })
    }

    /// The flags the kernel supports (`UBLK_U_CMD_GET_FEATURES`, Linux 6.5; older kernels get
    /// the 6.0–6.4 set).
    #[doc(alias = "UBLK_U_CMD_GET_FEATURES")]
    pub fn features(&mut self) -> Result<DeviceFlags> {
        if let Some(f) = self.features {
            return Ok(f);
        }
        let mut buf = [0u8; 8];
        let f = match self.cmd(sys::UBLK_U_CMD_GET_FEATURES, NO_DEV, 0, 0, Some(&mut buf)) {
            Ok(_) => DeviceFlags::from_bits_retain(u64::from_ne_bytes(buf)),
            Err(
                CtrlError::Command { .. } | CtrlError::Unsupported { .. } | CtrlError::NoDevice(_),
            ) => {
                log::warn!(
                    "GET_FEATURES unsupported (kernel older than 6.5); assuming the base set"
                );
                DeviceFlags::URING_CMD_COMP_IN_TASK
                    | DeviceFlags::NEED_GET_DATA
                    | DeviceFlags::USER_RECOVERY
                    | DeviceFlags::USER_RECOVERY_REISSUE
            }
            Err(e) => return Err(e),
        };
        self.features = Some(f);
        Ok(f)
    }

    /// Checks `flags` against the kernel's features; the error names the first missing one.
    pub fn check_flags(&mut self, flags: DeviceFlags) -> Result<()> {
        let missing = flags - self.features()?;
        if let Some(first) = missing.iter().next() {
            return Err(CtrlError::Unsupported {
                what: format!("UBLK_F_{}", first.flag_name().unwrap_or("unknown")),
                since: first.since().unwrap_or("?"),
                running: kernel_release(),
            });
        }
        Ok(())
    }

    /// Adds a device and returns what the kernel granted (flags, sizes, id).
    #[doc(alias = "UBLK_U_CMD_ADD_DEV")]
    pub fn add(&mut self, req: &AddRequest) -> Result<DevInfo> {
        let id = req.dev_id.unwrap_or(NO_DEV);
        let info = DevInfo {
            dev_id: id,
            nr_hw_queues: req.nr_hw_queues,
            queue_depth: req.queue_depth,
            state: DevState::Dead,
            max_io_buf_bytes: req.max_io_buf_bytes,
            daemon_pid: -1,
            flags: req.flags,
            owner_uid: 0,
            owner_gid: 0,
            io_desc_size: 0,
            server_flags: 0,
        }
        .to_sys();
        let mut buf = as_bytes(&info).to_vec();
        self.cmd(sys::UBLK_U_CMD_ADD_DEV, id, u16::MAX, 0, Some(&mut buf))
            .map_err(|e| match e {
                CtrlError::Command { source, .. }
                    if source.raw_os_error() == Some(libc::EEXIST) =>
                {
                    CtrlError::Invalid(format!("device id {id} is already in use"))
                }
                CtrlError::Command { source, .. }
                    if source.raw_os_error() == Some(libc::EACCES)
                        && req.flags.contains(DeviceFlags::UNPRIVILEGED_DEV) =>
                {
                    CtrlError::Invalid(
                        "the kernel's limit of unprivileged devices is reached (ublk_drv \
                         parameter ublks_max, default 64)"
                            .into(),
                    )
                }
                CtrlError::Command { source, .. }
                    if source.raw_os_error() == Some(libc::EPERM)
                        && !req.flags.contains(DeviceFlags::UNPRIVILEGED_DEV) =>
                {
                    CtrlError::Invalid(
                        "adding a device needs CAP_SYS_ADMIN, unless it is an unprivileged \
                         device (`ublk add --unprivileged`, `DeviceBuilder::unprivileged`)"
                            .into(),
                    )
                }
                e => e,
            })?;
        let info = DevInfo::from_sys(&from_bytes(&buf));
        self.unprivileged.insert(
            info.dev_id,
            info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV),
        );
        Ok(info)
    }

    /// Deletes a device; waits until the kernel has released it.
    #[doc(alias = "UBLK_U_CMD_DEL_DEV")]
    pub fn del(&mut self, dev_id: u32) -> Result<()> {
        self.cmd(sys::UBLK_U_CMD_DEL_DEV, dev_id, 0, 0, None)?;
        // The id may be reused by a device of another kind.
        self.unprivileged.remove(&dev_id);
        Ok(())
    }

    /// Deletes a device without waiting for its last user (Linux 6.9).
    #[doc(alias = "UBLK_U_CMD_DEL_DEV_ASYNC")]
    /// The kernel does not take DEL_DEV_ASYNC for unprivileged devices: those are deleted with
    /// DEL_DEV (waiting).
    pub fn del_async(&mut self, dev_id: u32) -> Result<()> {
        if self.is_unprivileged(dev_id)? {
            return self.del(dev_id);
        }
        self.cmd(sys::UBLK_U_CMD_DEL_DEV_ASYNC, dev_id, 0, 0, None)?;
        self.unprivileged.remove(&dev_id);
        Ok(())
    }

    /// Starts a device whose queues have fetched every tag; `pid` is the serving process.
    #[doc(alias = "UBLK_U_CMD_START_DEV")]
    pub fn start(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        self.cmd(sys::UBLK_U_CMD_START_DEV, dev_id, 0, pid as u64, None)
            .map(drop)
    }

    /// Stops a device: removes the disk and aborts the queues' pending commands.
    #[doc(alias = "UBLK_U_CMD_STOP_DEV")]
    pub fn stop(&mut self, dev_id: u32) -> Result<()> {
        self.cmd(sys::UBLK_U_CMD_STOP_DEV, dev_id, 0, 0, None)
            .map(drop)
    }

    /// Stops a device only if nobody has it open (Linux 7.0); `Ok(false)` when busy.
    #[doc(alias = "UBLK_U_CMD_TRY_STOP_DEV")]
    pub fn try_stop(&mut self, dev_id: u32) -> Result<bool> {
        self.require(DeviceFlags::SAFE_STOP_DEV, "TRY_STOP_DEV")?;
        match self.cmd(sys::UBLK_U_CMD_TRY_STOP_DEV, dev_id, 0, 0, None) {
            Ok(_) => Ok(true),
            Err(CtrlError::Command { source, .. })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Sets the parameters (before START_DEV).
    #[doc(alias = "UBLK_U_CMD_SET_PARAMS")]
    pub fn set_params(
        &mut self,
        dev_id: u32,
        params: &DeviceParams,
        max_io_buf_bytes: u32,
    ) -> Result<()> {
        let p = params.to_sys(max_io_buf_bytes);
        let mut buf = as_bytes(&p)[..p.len as usize].to_vec();
        self.cmd(sys::UBLK_U_CMD_SET_PARAMS, dev_id, 0, 0, Some(&mut buf))
            .map(drop)
    }

    /// Reads the parameters and device numbers.
    #[doc(alias = "UBLK_U_CMD_GET_PARAMS")]
    pub fn get_params(&mut self, dev_id: u32) -> Result<(DeviceParams, DevNumbers)> {
        // The length of the 6.0 layout (basic, discard, devt, zoned) is accepted by all kernels.
        let len = std::mem::offset_of!(sys::ublk_params, dma);
        let mut p = sys::ublk_params {
            len: len as u32,
            ..Default::default()
        };
        let mut buf = as_bytes(&p)[..len].to_vec();
        self.cmd(sys::UBLK_U_CMD_GET_PARAMS, dev_id, 0, 0, Some(&mut buf))?;
        as_bytes_mut(&mut p)[..len].copy_from_slice(&buf);
        let d = &p.devt;
        let numbers = DevNumbers {
            char_dev: (d.char_major, d.char_minor),
            disk_dev: (d.disk_major, d.disk_minor),
        };
        Ok((DeviceParams::from_sys(&p), numbers))
    }

    /// Reads the device description.
    #[doc(alias = "UBLK_U_CMD_GET_DEV_INFO")]
    pub fn dev_info(&mut self, dev_id: u32) -> Result<DevInfo> {
        let mut buf = vec![0u8; size_of::<sys::ublksrv_ctrl_dev_info>()];
        self.cmd(sys::UBLK_U_CMD_GET_DEV_INFO, dev_id, 0, 0, Some(&mut buf))?;
        Ok(DevInfo::from_sys(&from_bytes(&buf)))
    }

    /// Reads the device description with GET_DEV_INFO2 (Linux 6.3), which also works for
    /// unprivileged devices; falls back to GET_DEV_INFO on older kernels.
    #[doc(alias = "UBLK_U_CMD_GET_DEV_INFO2")]
    pub fn dev_info2(&mut self, dev_id: u32) -> Result<DevInfo> {
        match self.dev_info2_raw(dev_id)? {
            Some(info) => Ok(info),
            None => self.dev_info(dev_id),
        }
    }

    /// GET_DEV_INFO2, `None` if the kernel lacks it; records whether the device is
    /// unprivileged. The kernel checks the caller's access to `/dev/ublkcN` (read).
    fn dev_info2_raw(&mut self, dev_id: u32) -> Result<Option<DevInfo>> {
        let mut buf = char_dev_path(dev_id);
        let plen = buf.len();
        buf.resize(plen + size_of::<sys::ublksrv_ctrl_dev_info>(), 0);
        match self.cmd_path(
            sys::UBLK_U_CMD_GET_DEV_INFO2,
            dev_id,
            0,
            0,
            Some(&mut buf),
            plen as u16,
        ) {
            Ok(_) => {
                let info = DevInfo::from_sys(&from_bytes(&buf[plen..]));
                self.unprivileged
                    .insert(dev_id, info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV));
                Ok(Some(info))
            }
            Err(CtrlError::Unsupported { .. }) => Ok(None),
            Err(CtrlError::Command { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EACCES | libc::EPERM)) =>
            {
                Err(CtrlError::NotOwner(dev_id))
            }
            Err(e) => Err(e),
        }
    }

    /// The CPUs queue `q` should run on.
    #[doc(alias = "UBLK_U_CMD_GET_QUEUE_AFFINITY")]
    pub fn queue_affinity(&mut self, dev_id: u32, q: u16) -> Result<Vec<usize>> {
        let mut buf = vec![0u8; 128];
        self.cmd(
            sys::UBLK_U_CMD_GET_QUEUE_AFFINITY,
            dev_id,
            0,
            u64::from(q),
            Some(&mut buf),
        )?;
        Ok((0..buf.len() * 8)
            .filter(|&c| buf[c / 8] & (1 << (c % 8)) != 0)
            .collect())
    }

    /// First step of re-attaching a daemon to a quiesced device.
    #[doc(alias = "UBLK_U_CMD_START_USER_RECOVERY")]
    pub fn start_recovery(&mut self, dev_id: u32) -> Result<()> {
        self.cmd(sys::UBLK_U_CMD_START_USER_RECOVERY, dev_id, 0, 0, None)
            .map(drop)
    }

    /// Last step of recovery, once every tag is fetched again; `pid` is the new daemon.
    #[doc(alias = "UBLK_U_CMD_END_USER_RECOVERY")]
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> Result<()> {
        self.cmd(
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            dev_id,
            0,
            pid as u64,
            None,
        )
        .map(drop)
    }

    /// Changes the capacity of a live device (Linux 6.16).
    #[doc(alias = "UBLK_U_CMD_UPDATE_SIZE")]
    pub fn update_size(&mut self, dev_id: u32, bytes: u64) -> Result<()> {
        self.require(DeviceFlags::UPDATE_SIZE, "UPDATE_SIZE")?;
        self.cmd(sys::UBLK_U_CMD_UPDATE_SIZE, dev_id, 0, bytes >> 9, None)
            .map(drop)
    }

    /// Quiesces a device for a planned daemon upgrade (Linux 6.16); 0 waits forever.
    #[doc(alias = "UBLK_U_CMD_QUIESCE_DEV")]
    pub fn quiesce(&mut self, dev_id: u32, timeout_ms: u64) -> Result<()> {
        self.require(DeviceFlags::QUIESCE, "QUIESCE_DEV")?;
        self.cmd(sys::UBLK_U_CMD_QUIESCE_DEV, dev_id, 0, timeout_ms, None)
            .map(drop)
    }

    /// Ids of the existing devices, ascending.
    pub fn list() -> Vec<u32> {
        let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// `/dev/ublkcN` with its terminating NUL: the prefix of commands for unprivileged devices.
fn char_dev_path(dev_id: u32) -> Vec<u8> {
    let mut p = format!("/dev/ublkc{dev_id}").into_bytes();
    p.push(0);
    p
}

/// Views a plain `#[repr(C)]` uapi struct as bytes.
fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: only used with ublk_sys structs: repr(C), Copy, no padding-dependent invariants;
    // reading their bytes (padding included, always zero-initialised here) is defined.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn as_bytes_mut<T: Copy>(v: &mut T) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; any byte pattern is a valid value of these integer-only structs.
    unsafe { std::slice::from_raw_parts_mut((v as *mut T).cast::<u8>(), size_of::<T>()) }
}

fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    let n = b.len().min(size_of::<T>());
    as_bytes_mut(&mut v)[..n].copy_from_slice(&b[..n]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_dev_info_roundtrip() {
        let i = DevInfo {
            dev_id: 3,
            nr_hw_queues: 2,
            queue_depth: 128,
            state: DevState::Live,
            max_io_buf_bytes: 1 << 19,
            daemon_pid: 42,
            flags: DeviceFlags::USER_COPY,
            owner_uid: 0,
            owner_gid: 0,
            io_desc_size: 24,
            server_flags: 7,
        };
        let mut s = i.to_sys();
        s.state = sys::UBLK_S_DEV_LIVE as u16;
        let b = as_bytes(&s).to_vec();
        assert_eq!(b.len(), 64);
        assert_eq!(DevInfo::from_sys(&from_bytes(&b)), i);
    }

    #[test]
    fn test_cmd_names_cover_every_opcode() {
        for op in [
            sys::UBLK_U_CMD_GET_QUEUE_AFFINITY,
            sys::UBLK_U_CMD_GET_DEV_INFO,
            sys::UBLK_U_CMD_ADD_DEV,
            sys::UBLK_U_CMD_DEL_DEV,
            sys::UBLK_U_CMD_START_DEV,
            sys::UBLK_U_CMD_STOP_DEV,
            sys::UBLK_U_CMD_SET_PARAMS,
            sys::UBLK_U_CMD_GET_PARAMS,
            sys::UBLK_U_CMD_START_USER_RECOVERY,
            sys::UBLK_U_CMD_END_USER_RECOVERY,
            sys::UBLK_U_CMD_GET_DEV_INFO2,
            sys::UBLK_U_CMD_GET_FEATURES,
            sys::UBLK_U_CMD_DEL_DEV_ASYNC,
            sys::UBLK_U_CMD_UPDATE_SIZE,
            sys::UBLK_U_CMD_QUIESCE_DEV,
            sys::UBLK_U_CMD_TRY_STOP_DEV,
            sys::UBLK_U_CMD_REG_BUF,
            sys::UBLK_U_CMD_UNREG_BUF,
        ] {
            assert_ne!(cmd_info(op).0, "UNKNOWN", "{op:#x}");
        }
    }

    #[test]
    fn test_cmd_names() {
        assert_eq!(
            cmd_info(sys::UBLK_U_CMD_UPDATE_SIZE),
            ("UPDATE_SIZE", "6.16")
        );
        assert_eq!(cmd_info(sys::UBLK_U_CMD_ADD_DEV).0, "ADD_DEV");
    }
}
