//! Device lifecycle: build (ADD_DEV + SET_PARAMS), serve (queue threads + START_DEV), stop
//! and delete; and re-attaching to a quiesced device (user recovery).

use crate::ctrl::{AddRequest, Ctrl, CtrlError, DevInfo, DevState};
use crate::flags::DeviceFlags;
use crate::os::SignalSet;
use crate::params::DeviceParams;
use crate::queue::{self, DataMode, QueueConfig, QueueError, QueueWaker};
use crate::target::Target;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the device lifecycle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// A control command failed.
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    /// A queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Opening `/dev/ublkcN` failed.
    #[error("failed to open {path}")]
    CharDev {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The disk node did not appear.
    #[error("{0} did not appear after START_DEV")]
    NoDisk(String),
    /// Recovery is not possible for this device now.
    #[error("cannot recover device {dev_id}: {why}")]
    NotRecoverable {
        /// Device id.
        dev_id: u32,
        /// Reason.
        why: String,
    },
    /// Invalid configuration.
    #[error("invalid device configuration: {0}")]
    Config(String),
    /// A thread could not be spawned or panicked.
    #[error("queue thread failure: {0}")]
    Thread(String),
    /// Signal setup failed.
    #[error("failed to set up signal handling")]
    Signals(#[source] io::Error),
}

/// Result of lifecycle operations.
pub type Result<T, E = DeviceError> = std::result::Result<T, E>;

/// User recovery policy (`UBLK_F_USER_RECOVERY*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recovery {
    /// The device stops when its daemon dies.
    #[default]
    None,
    /// The device quiesces (IO waits) until a new daemon attaches.
    Quiesce,
    /// Like `Quiesce`, and requests in flight at the crash are reissued.
    Reissue,
    /// While no daemon is attached, IO fails (Linux 6.13).
    FailIo,
}

impl Recovery {
    fn flags(self) -> DeviceFlags {
        match self {
            Recovery::None => DeviceFlags::empty(),
            Recovery::Quiesce => DeviceFlags::USER_RECOVERY,
            Recovery::Reissue => DeviceFlags::USER_RECOVERY | DeviceFlags::USER_RECOVERY_REISSUE,
            Recovery::FailIo => DeviceFlags::USER_RECOVERY | DeviceFlags::USER_RECOVERY_FAIL_IO,
        }
    }
}

/// Configures a new device.
#[derive(Debug, Clone)]
pub struct DeviceBuilder {
    dev_id: Option<u32>,
    queues: u16,
    depth: u16,
    max_io_bytes: u32,
    mode: DataMode,
    fallback: bool,
    recovery: Recovery,
    extra_flags: DeviceFlags,
    params: DeviceParams,
    affinity: bool,
    batch_sched: bool,
    batch_io: bool,
    unprivileged: bool,
}

impl Default for DeviceBuilder {
    fn default() -> Self {
        DeviceBuilder {
            dev_id: None,
            queues: 1,
            depth: 128,
            max_io_bytes: 512 << 10,
            mode: DataMode::Copy,
            fallback: false,
            recovery: Recovery::None,
            extra_flags: DeviceFlags::empty(),
            params: DeviceParams::default(),
            affinity: true,
            batch_sched: true,
            batch_io: false,
            unprivileged: false,
        }
    }
}

impl DeviceBuilder {
    /// A builder with defaults: auto id, 1 queue, depth 128, 512 KiB requests, copy mode.
    pub fn new() -> Self {
        Self::default()
    }
    /// Device id, or `None` to let the kernel choose.
    pub fn id(mut self, id: Option<u32>) -> Self {
        self.dev_id = id;
        self
    }
    /// Number of queues (1..=4096; the kernel caps it at the CPU count).
    pub fn queues(mut self, n: u16) -> Self {
        self.queues = n;
        self
    }
    /// Tags per queue (1..=4096).
    pub fn depth(mut self, n: u16) -> Self {
        self.depth = n;
        self
    }
    /// Largest request in bytes.
    pub fn max_io_bytes(mut self, n: u32) -> Self {
        self.max_io_bytes = n;
        self
    }
    /// Data-transfer mode; with `fallback`, a mode the kernel lacks falls back to copy mode
    /// with a warning instead of failing.
    pub fn data_mode(mut self, mode: DataMode, fallback: bool) -> Self {
        self.mode = mode;
        self.fallback = fallback;
        self
    }
    /// User recovery policy.
    pub fn recovery(mut self, r: Recovery) -> Self {
        self.recovery = r;
        self
    }
    /// Extra `UBLK_F_*` flags.
    pub fn flags(mut self, f: DeviceFlags) -> Self {
        self.extra_flags = f;
        self
    }
    /// Block device parameters (size, block sizes, attributes, discard).
    pub fn params(mut self, p: DeviceParams) -> Self {
        self.params = p;
        self
    }
    /// Pin each queue thread to one CPU of the set the kernel reports for its queue (default
    /// on): the device id picks which, so that single-queue devices spread over the CPUs, and
    /// the io_uring workers the thread starts share its CPU. Off, queue threads run wherever
    /// the scheduler puts them.
    pub fn affinity(mut self, on: bool) -> Self {
        self.affinity = on;
        self
    }

    /// Whether queue threads run under `SCHED_BATCH` (default: yes). A request then does not
    /// preempt the task that submitted it on the same CPU: the queue thread runs when that task
    /// blocks or its slice ends and serves the whole batch at once, instead of one context
    /// switch pair per request (with 2 queues on 2 vCPUs, 2-2.7 times the IOPS of null at 4k
    /// QD32). A queue thread still runs at once on an idle CPU, so QD1 latency is unchanged.
    pub fn batch_scheduling(mut self, on: bool) -> Self {
        self.batch_sched = on;
        self
    }

    /// Batch io commands (`UBLK_F_BATCH_IO`, Linux 7.0; default off): each queue learns of
    /// requests as arrays of tags from a multishot fetch and commits a whole batch of results
    /// with one command, instead of one io command per request. Not with
    /// [`DataMode::NeedGetData`].
    pub fn batch_io(mut self, on: bool) -> Self {
        self.batch_io = on;
        self
    }

    /// An unprivileged device (`UBLK_F_UNPRIVILEGED_DEV`, Linux 6.3): a user without
    /// CAP_SYS_ADMIN can add and serve it, given read-write access to `/dev/ublk-control`
    /// and a udev rule that hands `/dev/ublkcN` and `/dev/ublkbN` to the device's owner (the
    /// kernel lets only the owner open them). The kernel allows neither user copy, zero copy
    /// nor user recovery for such devices (refused here whoever asks). A caller with
    /// CAP_SYS_ADMIN gets an ordinary (privileged) device instead.
    pub fn unprivileged(mut self, on: bool) -> Self {
        self.unprivileged = on;
        self
    }

    /// Adds the device (ADD_DEV) and sets its parameters. The device is deleted again if
    /// anything fails, or if the returned [`Device`] is dropped without being served.
    pub fn build(self, mut ctrl: Ctrl) -> Result<Device> {
        let max = ublk_sys::UBLK_MAX_NR_QUEUES.min(ublk_sys::UBLK_MAX_QUEUE_DEPTH);
        if !(1..=max).contains(&u32::from(self.queues))
            || !(1..=max).contains(&u32::from(self.depth))
        {
            return Err(DeviceError::Config(format!(
                "queues ({}) and depth ({}) must be in 1..={max}",
                self.queues, self.depth
            )));
        }
        if self.max_io_bytes < 4096 {
            // The kernel rounds the buffer size down to pages and refuses the parameters.
            return Err(DeviceError::Config(format!(
                "the largest request ({} bytes) must be at least 4 KiB",
                self.max_io_bytes
            )));
        }
        if self.params.size < 512 {
            return Err(DeviceError::Config(format!(
                "device size {} is too small",
                self.params.size
            )));
        }
        if !(9..=12).contains(&self.params.logical_bs_shift) {
            return Err(DeviceError::Config(
                "logical block size must be 512..=4096".into(),
            ));
        }
        let features = ctrl.features()?;
        let mut mode = self.mode;
        if !features.contains(mode.flag()) {
            if self.fallback {
                log::warn!("kernel lacks {:?}; falling back to copy mode", mode.flag());
                mode = DataMode::Copy;
            } else {
                ctrl.check_flags(mode.flag())?;
            }
        }
        let mut flags = mode.flag() | self.recovery.flags() | self.extra_flags;
        if matches!(self.recovery, Recovery::Quiesce | Recovery::Reissue)
            && features.contains(DeviceFlags::QUIESCE)
            && !self.batch_io
        {
            // Lets QUIESCE_DEV hand the device over to a new daemon (planned upgrades). Not
            // with batch io commands: on 7.3 quiescing such a device fails requests in flight
            // with EIO (kernel_quiesce_refused_batch), so it is not offered; nor with FAIL_IO
            // recovery, under which IO fails while no daemon is attached.
            flags |= DeviceFlags::QUIESCE;
        }
        if self.unprivileged {
            // The kernel refuses these (or, for recovery, silently drops them): say so first.
            if matches!(mode, DataMode::UserCopy | DataMode::ZeroCopy) {
                return Err(DeviceError::Config(format!(
                    "unprivileged devices cannot use the {} data mode (the kernel trusts the \
                     server to fill every byte of a read only when it is privileged)",
                    mode.name()
                )));
            }
            if self.recovery != Recovery::None {
                return Err(DeviceError::Config(
                    "unprivileged devices cannot use user recovery".into(),
                ));
            }
            flags |= DeviceFlags::UNPRIVILEGED_DEV;
        }
        if self.batch_io {
            if mode == DataMode::NeedGetData {
                return Err(DeviceError::Config(format!(
                    "batch io commands do not work with the {} data mode",
                    mode.name()
                )));
            }
            if self.depth < 2 {
                // The kernel keeps each queue's tags in a kfifo, which needs two entries.
                return Err(DeviceError::Config(
                    "batch io commands need a queue depth of 2 or more".into(),
                ));
            }
            flags |= DeviceFlags::BATCH_IO;
        }
        ctrl.check_flags(flags)?;
        let info = ctrl.add(&AddRequest {
            dev_id: self.dev_id,
            nr_hw_queues: self.queues,
            queue_depth: self.depth,
            max_io_buf_bytes: self.max_io_bytes,
            flags,
        })?;
        log::info!("added device {} ({:?})", info.dev_id, info.flags);
        let mut dev = Device {
            info,
            params: self.params,
            mode: DataMode::from_flags(info.flags),
            affinity: self.affinity,
            batch_sched: self.batch_sched,
            poll: DEFAULT_POLL,
            recovering: false,
            ctrl,
            served: false,
        };
        let mut wanted = flags;
        if self.unprivileged && !info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV) {
            log::warn!(
                "the caller has CAP_SYS_ADMIN: device {} is an ordinary (privileged) device",
                info.dev_id
            );
            wanted -= DeviceFlags::UNPRIVILEGED_DEV;
        }
        if !info.flags.contains(wanted) {
            return Err(DeviceError::Config(format!(
                "kernel granted flags {:?}, not the requested {:?}",
                info.flags, flags
            )));
        }
        if info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV) {
            // SET_PARAMS and every later command need read-write access to /dev/ublkcN,
            // which udev gives the owner once the node exists.
            wait_char_dev_access(&info.char_path(), Duration::from_secs(10))?;
        }
        dev.ctrl
            .set_params(info.dev_id, &self.params, info.max_io_buf_bytes)?;
        Ok(dev)
    }
}

/// Lets another thread ask a running device to stop.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    /// A new handle.
    pub fn new() -> Self {
        Self::default()
    }
    /// Requests the stop; `Device::run` then stops and deletes the device.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }
    fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Why [`Device::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A signal (the number) or a [`StopHandle`] asked us to stop; the device was deleted.
    Requested(Option<i32>),
    /// Someone else stopped the device (e.g. `ublk del`); it was left for them to delete.
    External,
}

/// How long a queue thread polls for work before it sleeps, by default
/// ([`Device::set_poll`]). Under emulation (2 vCPUs, one queue, null at 4k QD32) it took IOPS
/// from 0.86-0.90 to 0.94-1.12 of null_blk on Linux 6.12 and 7.3, by sparing fio the wake-ups
/// of the queue thread (docs/BENCHMARKS-HOWTO.md, "Polling before sleeping").
pub const DEFAULT_POLL: Duration = Duration::from_micros(30);

/// Options of [`Device::run`].
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop on SIGINT, SIGTERM and SIGHUP (they are blocked and waited for by `run`).
    pub handle_signals: bool,
    /// Programmatic stop.
    pub stop: StopHandle,
}

/// An added device, ready to be served by [`Device::run`].
#[derive(Debug)]
pub struct Device {
    info: DevInfo,
    params: DeviceParams,
    mode: DataMode,
    affinity: bool,
    batch_sched: bool,
    poll: Duration,
    recovering: bool,
    ctrl: Ctrl,
    served: bool,
}

impl Device {
    /// Prepares a new daemon for a device whose daemon died (state QUIESCED or FAIL_IO):
    /// START_USER_RECOVERY, reading back the device's geometry and parameters.
    pub fn recover(mut ctrl: Ctrl, dev_id: u32) -> Result<Device> {
        let info = ctrl.dev_info(dev_id)?;
        if !info.flags.contains(DeviceFlags::USER_RECOVERY) {
            return Err(DeviceError::NotRecoverable {
                dev_id,
                why: "it was created without user recovery (add it with -r 1)".into(),
            });
        }
        if !matches!(info.state, DevState::Quiesced | DevState::FailIo) {
            return Err(DeviceError::NotRecoverable {
                dev_id,
                why: format!(
                    "its state is {} (needs QUIESCED or FAIL_IO)",
                    info.state.name()
                ),
            });
        }
        // The old daemon's /dev/ublkcN may still be closing: retry EBUSY briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ctrl.start_recovery(dev_id) {
                Ok(()) => break,
                Err(CtrlError::Command { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let (params, _) = ctrl.get_params(dev_id)?;
        log::info!("recovering device {dev_id}");
        Ok(Device {
            info,
            params,
            mode: DataMode::from_flags(info.flags),
            affinity: true,
            batch_sched: true,
            poll: DEFAULT_POLL,
            recovering: true,
            ctrl,
            served: false,
        })
    }

    /// The device as the kernel granted it.
    pub fn info(&self) -> &DevInfo {
        &self.info
    }

    /// The parameters set (or, when recovering, read back).
    pub fn params(&self) -> &DeviceParams {
        &self.params
    }

    /// Whether queue threads run under `SCHED_BATCH` (see
    /// [`DeviceBuilder::batch_scheduling`]); for a recovered device too.
    pub fn set_batch_scheduling(&mut self, on: bool) {
        self.batch_sched = on;
    }

    /// How long each queue thread polls for its next piece of work before it sleeps (default
    /// [`DEFAULT_POLL`]; zero: never). Work that arrives meanwhile is served without the
    /// thread being woken, which spares the submitting task a wake-up of another CPU; a queue
    /// whose polls keep finding nothing pauses polling, so an idle device costs nothing. For a
    /// recovered device too.
    pub fn set_poll(&mut self, max: Duration) {
        self.poll = max;
    }

    /// The negotiated data mode.
    pub fn data_mode(&self) -> DataMode {
        self.mode
    }

    /// Serves the device until it is stopped: opens `/dev/ublkcN`, starts one thread per queue,
    /// START_DEV (or END_USER_RECOVERY), waits for `/dev/ublkbN`, calls `started`, then waits.
    ///
    /// On a stop request it stops and deletes the device. If the device is stopped by someone
    /// else, it returns [`StopReason::External`] and leaves the deletion to them. On error the
    /// device is stopped and deleted (unless it is a recovery-enabled device being recovered).
    pub fn run<T, F>(mut self, target: Arc<T>, opts: RunOptions, started: F) -> Result<StopReason>
    where
        T: Target + 'static,
        F: FnOnce(&DevInfo),
    {
        if self.mode == DataMode::ZeroCopy {
            if let Err(why) = target.zero_copy() {
                return Err(DeviceError::Config(format!(
                    "this target cannot use zero copy: {why}"
                )));
            }
        }
        let signals = if opts.handle_signals {
            Some(SignalSet::block_termination().map_err(DeviceError::Signals)?)
        } else {
            None
        };
        self.served = true;
        let id = self.info.dev_id;
        let path = self.info.char_path();
        let cdev = Arc::new(open_char_dev(&path)?);
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);

        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<Result<(), QueueError>>();
        let (exit_tx, exit_rx) = crossbeam_channel::unbounded::<(u16, Result<(), QueueError>)>();
        let mut threads = Vec::new();
        let mut wakers = Vec::new();
        let mut setup_err = None;
        // The CPUs this daemon may run on (a cpuset may exclude some of a queue's): empty if
        // unknown, then any.
        let allowed = if self.affinity {
            crate::os::thread_affinity().unwrap_or_default()
        } else {
            Vec::new()
        };
        for q in 0..self.info.nr_hw_queues {
            let wake = match QueueWaker::new() {
                Ok(w) => w,
                Err(e) => {
                    setup_err = Some(DeviceError::Queue(QueueError::Ring(q, e)));
                    break;
                }
            };
            wakers.push(wake.clone());
            let cpus = if self.affinity {
                match self.ctrl.queue_affinity(id, q) {
                    Ok(set) => queue_cpu(&set, &allowed, id).into_iter().collect(),
                    Err(e) => {
                        log::warn!("queue {q}: no affinity ({e}); not pinning");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let cfg = QueueConfig {
                q_id: q,
                depth: self.info.queue_depth,
                buf_size: self.info.max_io_buf_bytes as usize,
                desc_size: usize::from(self.info.io_desc_size),
                mode: self.mode,
                batch: self.info.flags.contains(DeviceFlags::BATCH_IO),
                cdev: cdev.clone(),
                wake,
                poll: self.poll,
            };
            let target = target.clone();
            let batch = self.batch_sched;
            let (ready_tx, exit_tx) = (ready_tx.clone(), exit_tx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{id}-q{q}"))
                .spawn(move || queue_thread(&*target, cfg, &cpus, batch, ready_tx, exit_tx));
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    setup_err = Some(DeviceError::Thread(e.to_string()));
                    break;
                }
            }
        }
        drop((ready_tx, exit_tx));
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    setup_err.get_or_insert(e.into());
                }
                Err(_) => {
                    setup_err.get_or_insert(DeviceError::Thread(
                        "queue thread died during setup".into(),
                    ));
                }
            }
        }

        let start = match setup_err {
            Some(e) => Err(e),
            None if self.recovering => self.ctrl.end_recovery(id, pid).map_err(DeviceError::from),
            None => self.ctrl.start(id, pid).map_err(DeviceError::from),
        };
        let started_ok = start.and_then(|()| {
            let disk = self.info.disk_path();
            wait_for_path(&disk, Duration::from_secs(10))
                .then_some(())
                .ok_or(DeviceError::NoDisk(disk))
        });
        if let Err(e) = started_ok {
            // The kernel may not abort the fetches of a device that never started: make the
            // queues quit (closing their rings cancels the commands), then clean up.
            let _ = self.ctrl.stop(id);
            wakers.iter().for_each(QueueWaker::quit);
            join_all(threads);
            drop(cdev);
            if !self.recovering {
                let _ = self.ctrl.del(id);
            }
            return Err(e);
        }
        if let Ok(info) = self.ctrl.dev_info(id) {
            self.info = info;
        }
        log::info!("device {id} started ({} mode)", self.mode.name());
        started(&self.info);

        // Serve until a stop request, or until the queues end on their own.
        let mut reason = StopReason::External;
        let mut result: Result<()> = Ok(());
        let mut remaining = threads.len();
        loop {
            if let Some(sig) = signals
                .as_ref()
                .and_then(|s| s.wait(Duration::from_millis(100)))
            {
                log::info!("device {id}: signal {sig}, stopping");
                reason = StopReason::Requested(Some(sig));
                break;
            }
            if signals.is_none() {
                if let Ok((q, r)) = exit_rx.recv_timeout(Duration::from_millis(100)) {
                    remaining -= 1;
                    queue_exited(q, r, &mut result);
                }
            }
            while let Ok((q, r)) = exit_rx.try_recv() {
                remaining -= 1;
                queue_exited(q, r, &mut result);
            }
            if opts.stop.requested() {
                reason = StopReason::Requested(None);
                break;
            }
            if remaining == 0 || result.is_err() {
                break;
            }
        }
        let delete = matches!(reason, StopReason::Requested(_)) || result.is_err();
        if delete || remaining > 0 {
            if let Err(e) = self.ctrl.stop(id) {
                log::warn!("device {id}: STOP_DEV failed: {e}");
            }
        }
        // STOP_DEV aborts every parked command, so the queues end by themselves; a queue that
        // has not after a grace period (a target stuck on its backing store) is made to quit.
        let deadline = Instant::now() + Duration::from_secs(10);
        while remaining > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match exit_rx.recv_timeout(left) {
                Ok((q, r)) => {
                    remaining -= 1;
                    queue_exited(q, r, &mut result);
                }
                Err(_) => {
                    log::warn!("device {id}: {remaining} queue(s) did not stop; forcing them");
                    wakers.iter().for_each(QueueWaker::quit);
                    break;
                }
            }
        }
        join_all(threads);
        drop(cdev);
        if delete {
            match self.ctrl.del(id) {
                Ok(()) | Err(CtrlError::NoDevice(_)) => log::info!("device {id} deleted"),
                Err(e) => log::warn!("device {id}: DEL_DEV failed: {e}"),
            }
        }
        result.map(|()| reason)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // A device that was added but never served must not be left behind.
        if !self.served && !self.recovering {
            let id = self.info.dev_id;
            if let Err(e) = self.ctrl.del(id) {
                log::warn!("device {id}: cleanup DEL_DEV failed: {e}");
            }
        }
    }
}

fn queue_exited(q: u16, r: Result<(), QueueError>, result: &mut Result<()>) {
    if let Err(e) = r {
        log::error!("queue {q} failed: {e}");
        if result.is_ok() {
            *result = Err(e.into());
        }
    }
}

/// The CPU a queue thread is pinned to: one of `set` (the CPUs the kernel maps to the queue)
/// that the daemon may run on (`allowed`; empty: unknown, any), the `dev_id`-th modulo their
/// count, so that single-queue devices spread over the CPUs instead of piling up on the first.
/// `None` if no CPU qualifies (the thread is then not pinned).
///
/// One CPU rather than the whole set: the io_uring workers a queue thread starts (for file IO
/// that cannot complete inline) inherit its affinity, so handing them an operation and getting
/// its completion back are wake-ups on one CPU instead of inter-processor interrupts. On 7.3,
/// loop `-z` at 4k QD1 went from 2000 to 2900-3500 IOPS (and 4k QD32 and 128k reads up by
/// 15-40 %), matching kublk, which pins the same way (as does libublk); see
/// docs/BENCHMARKS-HOWTO.md.
pub(crate) fn queue_cpu(set: &[usize], allowed: &[usize], dev_id: u32) -> Option<usize> {
    let usable: Vec<usize> = set
        .iter()
        .copied()
        .filter(|c| allowed.is_empty() || allowed.contains(c))
        .collect();
    if usable.is_empty() {
        return None;
    }
    usable.get(dev_id as usize % usable.len()).copied()
}

fn queue_thread<T: Target>(
    target: &T,
    cfg: QueueConfig,
    cpus: &[usize],
    batch: bool,
    ready: crossbeam_channel::Sender<Result<(), QueueError>>,
    exit: crossbeam_channel::Sender<(u16, Result<(), QueueError>)>,
) {
    let q = cfg.q_id;
    if !cpus.is_empty() {
        if let Err(e) = crate::os::set_thread_affinity(cpus) {
            log::warn!("queue {q}: cannot set CPU affinity: {e}");
        }
    }
    if batch {
        if let Err(e) = crate::os::set_sched_batch() {
            log::warn!("queue {q}: cannot use SCHED_BATCH: {e}");
        }
    }
    if let Err(e) = crate::os::set_io_flusher() {
        log::warn!("queue {q}: PR_SET_IO_FLUSHER failed: {e}");
    }
    let serve = match queue::setup(target, cfg) {
        Ok(serve) => {
            let _ = ready.send(Ok(()));
            serve
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let r = serve();
    let _ = exit.send((q, r));
}

fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            log::error!("a queue thread panicked");
        }
    }
}

fn open_char_dev(path: &str) -> Result<File> {
    // devtmpfs creates the node right after ADD_DEV, but allow a moment for udev setups.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(DeviceError::CharDev {
                    path: path.into(),
                    source,
                })
            }
        }
    }
}

/// Waits until this process can open `path` for reading and writing (an unprivileged
/// device's node, until udev has given it to its owner), and closes it again.
fn wait_char_dev_access(path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(_) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                return Err(DeviceError::Config(format!(
                    "{path} did not become accessible within {timeout:?}: unprivileged \
                     devices need the udev rule that gives the node to its owner (docs/USAGE.md, section Without root); \
                     without access the device cannot be deleted either: root can, with \
                     `ublk del`"
                )))
            }
            Err(source) => {
                return Err(DeviceError::CharDev {
                    path: path.into(),
                    source,
                })
            }
        }
    }
}

fn wait_for_path(path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if Path::new(path).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::queue_cpu;

    #[test]
    fn test_queue_cpu_spreads_devices_over_the_set() {
        let set = [0, 1, 2, 3];
        let picks: Vec<_> = (0..6).map(|id| queue_cpu(&set, &[], id)).collect();
        assert_eq!(
            picks,
            [Some(0), Some(1), Some(2), Some(3), Some(0), Some(1)]
        );
        // A queue mapped to one CPU gets that CPU whatever the device.
        assert_eq!(queue_cpu(&[5], &[], 7), Some(5));
    }

    #[test]
    fn test_queue_cpu_keeps_to_the_allowed_cpus() {
        // The daemon may only run on 2 and 3 (a cpuset): the pick is among those.
        assert_eq!(queue_cpu(&[0, 1, 2, 3], &[2, 3], 0), Some(2));
        assert_eq!(queue_cpu(&[0, 1, 2, 3], &[2, 3], 1), Some(3));
        // None of the queue's CPUs is allowed: no pinning rather than a failing call.
        assert_eq!(queue_cpu(&[0, 1], &[2, 3], 0), None);
        assert_eq!(queue_cpu(&[], &[], 0), None);
    }
}
