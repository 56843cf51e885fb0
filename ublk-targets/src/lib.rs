//! ublk targets built on `ublk-core`: [`null`] (completes at once, for benchmarks),
//! [`loop_`] (a file or block device as backing store), [`qcow2`] (an image and its backing
//! chain) and [`nbd`] (a remote NBD export).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod loop_;
mod memfile;
pub mod nbd;
pub mod null;
pub mod qcow2;
