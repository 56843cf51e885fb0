//! Safe API for Linux ublk userspace block devices.
//!
//! * [`Ctrl`]: the control device (`/dev/ublk-control`): every `UBLK_U_CMD_*` command.
//! * [`DeviceBuilder`] → [`Device`] → [`Device::run`]: the lifecycle of one device: add, set
//!   parameters, serve each queue on its own thread and io_uring, start, stop, delete; and
//!   [`Device::recover`] to re-attach to a device whose daemon died.
//! * [`Target`] / [`QueueHandler`]: what a backend implements; [`IoCtx`] is its view of the
//!   queue (buffers, io_uring operations), [`Completer`] completes from other threads.
//! * [`DataMode`]: kernel copy, `NEED_GET_DATA` or `USER_COPY`, negotiated with the kernel.
//!
//! Unsafe code is confined to `os`, `desc`, `buf`, `batch`, `ctrl` and `queue`, each with a `# Safety`
//! contract. Kernel documentation: <https://docs.kernel.org/block/ublk.html>.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod batch;
#[doc(hidden)]
pub mod bench;
mod buf;
pub mod ctrl;
mod desc;
pub mod device;
mod filemap;
pub mod flags;
mod os;
pub mod params;
pub mod queue;
mod tags;
pub mod target;

pub use ctrl::{kernel_release, Ctrl, CtrlError, DevInfo, DevState};
pub use device::{
    Device, DeviceBuilder, DeviceError, Recovery, RunOptions, StopHandle, StopReason, DEFAULT_POLL,
};
pub use filemap::FileMap;
pub use flags::DeviceFlags;
pub use os::{gettid, SignalSet};
pub use params::{Attrs, DevNumbers, DeviceParams, DiscardParams};
pub use queue::{socket_io_on_fixed_buffers, Completer, DataMode, IoCtx, QueueError, SendPart};
pub use target::{Action, IoFlags, IoRequest, Op, QueueHandler, Target};
