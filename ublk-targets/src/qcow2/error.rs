//! The error type of the qcow2 engine.

use std::io;
use std::path::PathBuf;

/// Errors opening, reading or writing a qcow2 image.
///
/// Variants are kept in alphabetical order.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Qcow2Error {
    /// The file to create exists already (it is left alone).
    #[error("{path} already exists; not overwriting it")]
    AlreadyExists {
        /// The path.
        path: PathBuf,
    },
    /// The backing chain refers back to an image already in the chain.
    #[error("backing chain loop: {path} is already in the chain")]
    BackingChainLoop {
        /// The image that appears twice.
        path: PathBuf,
    },
    /// The backing chain is deeper than the configured limit.
    #[error("backing chain deeper than {limit} images")]
    BackingChainTooDeep {
        /// The limit.
        limit: usize,
    },
    /// A backing file could not be opened.
    #[error("cannot open backing file {path}")]
    BackingOpen {
        /// The resolved backing path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The magic number is not `QFI\xfb`.
    #[error("not a qcow2 image (magic {0:#010x})")]
    BadMagic(u32),
    /// `cluster_bits` is outside the supported range.
    #[error("cluster_bits {bits} out of range {min}..=21")]
    ClusterBits {
        /// The value in the header.
        bits: u32,
        /// The minimum for this image (9, or 14 with extended L2 entries).
        min: u32,
    },
    /// Image metadata found inconsistent while reading it.
    #[error("image metadata is corrupt: {0}")]
    Corrupt(String),
    /// A compressed cluster could not be decompressed.
    #[error("cannot decompress the cluster at host offset {host_offset:#x}: {reason}")]
    Decompress {
        /// Host byte offset of the compressed data.
        host_offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// The image is encrypted.
    #[error("encrypted images are not supported (crypt_method {method})")]
    Encrypted {
        /// `crypt_method` from the header (1 AES, 2 LUKS).
        method: u32,
    },
    /// The image keeps its data in an external data file.
    #[error("images with an external data file are not supported")]
    ExternalDataFile,
    /// The image itself could not be opened.
    #[error("cannot open image {path}")]
    ImageOpen {
        /// The path given.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Parameters of a new image that cannot be created.
    #[error("cannot create the image: {0}")]
    InvalidCreate(String),
    /// Malformed header or header extension.
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    /// An I/O error on the image file.
    #[error("I/O error {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another program holds the image (qemu's image locking).
    #[error("{} is in use: {why}", .path.display())]
    Locked {
        /// The image or backing file.
        path: PathBuf,
        /// Who may hold it.
        why: &'static str,
    },
    /// The image is marked corrupt (incompatible bit 1).
    #[error("image is marked corrupt; repair it with `qemu-img check -r all`")]
    MarkedCorrupt,
    /// A request beyond the end of the virtual disk.
    #[error("request at {offset} of {len} bytes is beyond the virtual size {size}")]
    OutOfRange {
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// Virtual disk size.
        size: u64,
    },
    /// The image was opened read-only, or can only be opened read-only.
    #[error("image is read-only: {0}")]
    ReadOnly(&'static str),
    /// `refcount_order` is out of range.
    #[error("refcount_order {0} out of range 0..=6")]
    RefcountOrder(u32),
    /// A metadata table lies (partly) beyond the end of the file.
    #[error(
        "{table} at {offset:#x} ({len} bytes) extends past the end of the file ({file_size} bytes)"
    )]
    TablePastEof {
        /// Which table.
        table: &'static str,
        /// Start offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// File size.
        file_size: u64,
    },
    /// Two metadata tables overlap.
    #[error("{a} overlaps {b}")]
    TablesOverlap {
        /// First table.
        a: &'static str,
        /// Second table.
        b: &'static str,
    },
    /// A size field is larger than any sane image.
    #[error("{what} {value} exceeds the limit {limit}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The header is shorter than it claims or than the format requires.
    #[error("header truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// Incompatible feature bits this implementation does not know.
    #[error("unknown incompatible feature bits {bits:#x} ({names})")]
    UnknownIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// Their names from the feature-name table, or `bit N`.
        names: String,
    },
    /// An operation this implementation does not support on this image.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// A backing file format other than qcow2 or raw.
    #[error("unsupported backing file format {0:?}")]
    UnsupportedBackingFormat(String),
    /// An unsupported compression type.
    #[error("unsupported compression type {0}")]
    UnsupportedCompression(u8),
    /// A qcow2 version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
}

impl Qcow2Error {
    /// The negative errno to complete a block request with.
    pub fn errno(&self) -> i32 {
        match self {
            Qcow2Error::OutOfRange { .. } | Qcow2Error::InvalidCreate(_) => -libc::EINVAL,
            Qcow2Error::ReadOnly(_) => -libc::EROFS,
            Qcow2Error::Unsupported(_) => -libc::EOPNOTSUPP,
            Qcow2Error::Io { source, .. } => -source.raw_os_error().unwrap_or(libc::EIO),
            _ => -libc::EIO,
        }
    }

    pub(crate) fn io(context: &'static str) -> impl FnOnce(io::Error) -> Qcow2Error {
        move |source| Qcow2Error::Io { context, source }
    }
}

/// The result type of the qcow2 engine.
pub type Result<T, E = Qcow2Error> = std::result::Result<T, E>;
