//! A qcow2 engine on plain files, usable without ublk.
//!
//! [`Qcow2Image`] opens an image (v2 or v3) and its backing chain (qcow2 or raw) and reads the
//! virtual disk: unallocated clusters come from the backing file (or read as zeros), zero
//! clusters and subclusters read as zeros, data clusters are read in place and compressed
//! clusters (deflate or zstd) are decompressed. Extended L2 entries (subclusters) are supported.
//!
//! Layout: [`header`] and [`entry`] are pure decoders (no I/O), [`decompress`] turns bytes into
//! bytes, [`cache`] is the shared L2 slice cache, and `image` is the only code that touches
//! files.
//!
//! # References
//! * qcow2 specification: `docs/interop/qcow2.txt` in the qemu tree.

pub mod cache;
pub mod decompress;
pub mod entry;
mod error;
pub mod header;
mod image;
#[cfg(test)]
mod tests;

pub use error::{Qcow2Error, Result};
pub use header::{CompressionType, Geometry, Header, HeaderExtension};
pub use image::{Backing, Qcow2Image, Qcow2Options, L2_SLICE_BYTES};
