//! A qcow2 engine on plain files, usable without ublk.
//!
//! [`Qcow2Image`] opens an image (v2 or v3) and its backing chain (qcow2 or raw) and reads the
//! virtual disk: unallocated clusters come from the backing file (or read as zeros), zero
//! clusters and subclusters read as zeros, data clusters are read in place and compressed
//! clusters (deflate or zstd) are decompressed. Extended L2 entries (subclusters) are supported.
//!
//! Opened with [`Qcow2Options::writable`], it also writes: in place to allocated clusters, and
//! by allocating a cluster (copy-on-write from the backing file, zero or compressed clusters)
//! otherwise, with crash-safe metadata write-back on [`Qcow2Image::flush`] (see the `write`
//! module). Extended L2 entries are written per subcluster. Clusters and L2 tables shared with
//! internal snapshots are copied before they are written (the snapshots keep their content).
//! A dirty image (left by a lazy-refcounts writer) gets its refcounts rebuilt when opened for
//! writing (the `repair` module); writable opens refuse the corrupt bit. Refcounts are always
//! written eagerly: a clean image with the lazy-refcounts bit stays clean and keeps the bit.
//! [`Qcow2Image::discard`] and [`Qcow2Image::write_zeroes`] rewrite whole clusters' L2 entries
//! (unallocated or zero flag) and release their host clusters safely; freed host clusters are
//! punched out of the image file. [`Qcow2Image::create`] makes a new, empty v3 image.
//!
//! For asynchronous IO, [`Qcow2Image::plan_read`] splits a read into pieces by source (zeros,
//! a file range in the chain, or the synchronous engine for compressed clusters); callers
//! bracket the lookup and their IO with [`Qcow2Image::io_begin`] / [`Qcow2Image::io_end`] so
//! that host clusters freed meanwhile are not reused under them.
//!
//! Layout: [`header`], [`entry`] and [`refcount`] are pure decoders (no I/O), [`decompress`]
//! turns bytes into bytes, [`cache`] is the shared L2 slice cache, `inflight` keeps freed
//! clusters from reuse while data IO may still use them, and `image` (open, read, read
//! planning), `write`, `discard`, `repair` and `create` are the only code that touches files;
//! [`snapshot`] decodes snapshot table entries. [`target`] serves an
//! image over ublk with io_uring data IO.
//!
//! # References
//! * qcow2 specification: `docs/interop/qcow2.txt` in the qemu tree.

pub mod cache;
mod create;
pub mod decompress;
mod discard;
pub mod entry;
mod error;
pub mod header;
mod image;
mod inflight;
mod lock;
pub mod refcount;
mod repair;
pub mod snapshot;
pub mod target;
#[cfg(test)]
mod tests;
mod write;

pub use create::CreateOptions;
pub use error::{Qcow2Error, Result};
pub use header::{CompressionType, Geometry, Header, HeaderExtension};
pub use image::{
    Backing, Qcow2Image, Qcow2Options, ReadPiece, ReadSource, DEFAULT_L2_CACHE_BYTES,
    DEFAULT_REFCOUNT_CACHE_BYTES, L2_SLICE_BYTES,
};
pub use target::{Qcow2Queue, Qcow2Target};
