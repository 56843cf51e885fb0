//! ublk targets built on `ublk-core`: [`null`] (completes at once, for benchmarks) and
//! [`loop_`] (a file or block device as backing store). qcow2 and nbd come next.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod loop_;
pub mod nbd;
pub mod null;
pub mod qcow2;
