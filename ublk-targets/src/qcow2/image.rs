//! The qcow2 engine on a plain file: open (with the backing chain), map and read.

use super::cache::{CacheStats, SliceCache};
use super::decompress::decompress;
use super::entry::{self, CompressedDescriptor, Mapping};
use super::error::{Qcow2Error, Result};
use super::header::{Geometry, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAGIC};
use super::inflight::Inflight;
use super::write::Writer;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Size of a cached L2 slice in bytes (or the cluster size, if smaller).
pub const L2_SLICE_BYTES: u64 = 4096;

/// Default bound of an image's L2 cache: 32 MiB, qemu's default `l2-cache-size` on Linux. That
/// holds every L2 entry of a 256 GiB image with 64 KiB clusters, so random IO over such an
/// image reads each L2 slice once.
pub const DEFAULT_L2_CACHE_BYTES: usize = 32 << 20;

/// Default size of the refcount block cache: 1 MiB, 16 blocks of 64 KiB clusters with 16-bit
/// refcounts, each covering 2 GiB of the image file (new clusters are allocated in file order,
/// so allocation touches few blocks at a time).
pub const DEFAULT_REFCOUNT_CACHE_BYTES: usize = 1 << 20;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// Open the top image read-write (backing files are always read-only).
    pub writable: bool,
    /// Most memory for the L2 slice cache of each image in the chain, in bytes. Slices are
    /// cached as lookups touch them, so an image whose L2 tables are smaller never uses more.
    pub l2_cache_bytes: usize,
    /// Memory for the refcount block cache of a writable image, in bytes (at least 4 blocks).
    pub refcount_cache_bytes: usize,
    /// Maximum number of images in the chain, the top one included.
    pub max_chain_depth: usize,
    /// Open images marked corrupt (read-only opens only).
    pub allow_corrupt_read_only: bool,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            writable: false,
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            refcount_cache_bytes: DEFAULT_REFCOUNT_CACHE_BYTES,
            max_chain_depth: 64,
            allow_corrupt_read_only: false,
        }
    }
}

/// A backing file of a qcow2 image.
#[derive(Debug)]
pub enum Backing {
    /// A qcow2 image (itself possibly with a backing file).
    Qcow2(Box<Qcow2Image>),
    /// A raw image.
    Raw {
        /// Resolved path.
        path: PathBuf,
        /// The open file.
        file: File,
        /// Its size at open.
        size: u64,
    },
}

impl Backing {
    /// Virtual size of the backing image.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(q) => q.virtual_size(),
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Path of the backing image.
    pub fn path(&self) -> &Path {
        match self {
            Backing::Qcow2(q) => q.path(),
            Backing::Raw { path, .. } => path,
        }
    }

    /// Reads `buf` at `offset`; the part beyond the backing image's end reads as zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.size().saturating_sub(offset);
        let n = (buf.len() as u64).min(avail) as usize;
        let (head, tail) = buf.split_at_mut(n);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Qcow2(q) => q.read_at(head, offset),
            Backing::Raw { file, .. } => {
                read_zero_fill(file, head, offset, "reading raw backing file")
            }
        }
    }
}

/// Reads `buf` at `offset`, filling whatever lies past the end of the file with zeros (as qemu
/// does for clusters allocated beyond EOF, e.g. with `preallocation=metadata`).
pub(crate) fn read_zero_fill(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    context: &'static str,
) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Qcow2Error::Io { context, source: e }),
        }
    }
    Ok(())
}

fn read_exact(file: &File, buf: &mut [u8], offset: u64, context: &'static str) -> Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(Qcow2Error::io(context))
}

/// A qcow2 image (and its backing chain) opened on plain files.
///
/// All methods take `&self`; the image can be shared between threads. L1 lookups take no lock,
/// L2 lookups a short lock on one shard of the cache, data I/O runs outside them.
#[derive(Debug)]
pub struct Qcow2Image {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) header: Header,
    pub(super) geo: Geometry,
    pub(super) l1: L1Table,
    pub(super) l2_cache: SliceCache,
    /// Entries per cached L2 slice.
    pub(super) slice_entries: u64,
    pub(super) backing: Option<Backing>,
    /// The last decompressed cluster, keyed by its descriptor.
    pub(super) last_compressed: Mutex<Option<(CompressedDescriptor, Arc<Vec<u8>>)>>,
    /// Allocation and metadata write-back state; None when read-only.
    pub(super) writer: Option<Mutex<Writer>>,
    /// Data operations that may still use a looked-up mapping (see the `inflight` module).
    pub(super) inflight: Inflight,
}

/// The active L1 table in memory, one atomic word per entry, so that lookups take no lock.
///
/// Entries change only under the writer lock, each after the L2 table it points at is in the
/// file (release store, acquire load). The number of entries is fixed while the image is open.
#[derive(Debug)]
pub(super) struct L1Table(Box<[AtomicU64]>);

impl L1Table {
    pub(super) fn new(entries: Vec<u64>) -> L1Table {
        L1Table(entries.into_iter().map(AtomicU64::new).collect())
    }

    /// Entry `i`, or None past the end of the table.
    pub(super) fn get(&self, i: usize) -> Option<u64> {
        self.0.get(i).map(|e| e.load(Ordering::Acquire))
    }

    /// Sets entry `i` (inside the table; the writer lock held).
    pub(super) fn set(&self, i: usize, value: u64) {
        self.0[i].store(value, Ordering::Release);
    }

    /// A copy of all entries.
    pub(super) fn to_vec(&self) -> Vec<u64> {
        self.0.iter().map(|e| e.load(Ordering::Acquire)).collect()
    }
}

/// Where one piece of a guest read comes from (see [`Qcow2Image::plan_read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// Zeros.
    Zero,
    /// Bytes of the file of chain layer `layer` (0 = this image) from `host` on; whatever lies
    /// past the end of that file reads as zeros.
    File {
        /// Chain layer.
        layer: u8,
        /// File offset.
        host: u64,
    },
    /// Only the synchronous reader of layer `layer` can produce it (compressed clusters).
    Engine {
        /// Chain layer.
        layer: u8,
    },
}

/// A piece of a guest read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPiece {
    /// Guest offset.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Where the bytes come from.
    pub src: ReadSource,
}

impl Qcow2Image {
    /// Opens the image at `path` and its backing chain.
    pub fn open(path: impl AsRef<Path>, opts: &Qcow2Options) -> Result<Qcow2Image> {
        let mut chain = Vec::new();
        Self::open_in_chain(path.as_ref(), opts, opts.writable, &mut chain)
    }

    fn open_in_chain(
        path: &Path,
        opts: &Qcow2Options,
        writable: bool,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Qcow2Image> {
        let top = chain.is_empty();
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| {
                let path = path.to_path_buf();
                if top {
                    Qcow2Error::ImageOpen { path, source }
                } else {
                    Qcow2Error::BackingOpen { path, source }
                }
            })?;
        super::lock::lock(&file, path, writable)?;
        let canonical = std::fs::canonicalize(path).map_err(|source| Qcow2Error::BackingOpen {
            path: path.to_path_buf(),
            source,
        })?;
        if chain.contains(&canonical) {
            return Err(Qcow2Error::BackingChainLoop { path: canonical });
        }
        if chain.len() >= opts.max_chain_depth {
            return Err(Qcow2Error::BackingChainTooDeep {
                limit: opts.max_chain_depth,
            });
        }
        chain.push(canonical);
        let file_size = file
            .metadata()
            .map_err(Qcow2Error::io("reading image metadata"))?
            .len();

        let mut probe = vec![0u8; Header::PROBE_LEN];
        let n = read_prefix(&file, &mut probe)?;
        let cluster_bits = Header::probe_cluster_bits(&probe[..n])?;
        let first = (1u64 << cluster_bits).min(file_size) as usize;
        let mut cluster0 = vec![0u8; first];
        let n = read_prefix(&file, &mut cluster0)?;
        cluster0.truncate(n);
        let header = Header::parse(&cluster0)?;
        let allow_corrupt = !writable && opts.allow_corrupt_read_only;
        let geo = header.validate(file_size, allow_corrupt)?;
        if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
            log::warn!(
                "{}: image is marked corrupt, opened read-only",
                path.display()
            );
        }
        if header.nb_snapshots > 0 {
            log::info!(
                "{}: {} internal snapshots; only the active layer is visible (writes copy shared clusters)",
                path.display(),
                header.nb_snapshots
            );
        }

        let mut l1_raw = vec![0u8; geo.l1_size as usize * 8];
        read_exact(
            &file,
            &mut l1_raw,
            header.l1_table_offset,
            "reading the L1 table",
        )?;
        let l1: Vec<u64> = l1_raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        drop(l1_raw);

        let backing = match &header.backing_file {
            None => None,
            Some(name) => Some(Self::open_backing(path, &header, name, opts, chain)?),
        };

        let slice_bytes = L2_SLICE_BYTES.min(geo.cluster_size);
        let slices = (opts.l2_cache_bytes as u64 / slice_bytes).max(4) as usize;
        log::debug!(
            "{}: qcow2 v{} cluster {} size {} l1 {} extended_l2 {} compression {:?} backing {:?}",
            path.display(),
            header.version,
            geo.cluster_size,
            geo.size,
            geo.l1_size,
            geo.extended_l2,
            geo.compression,
            backing.as_ref().map(|b| b.path().to_path_buf())
        );
        let mut img = Qcow2Image {
            path: path.to_path_buf(),
            file,
            header,
            geo,
            l1: L1Table::new(l1),
            l2_cache: SliceCache::new(slices),
            slice_entries: slice_bytes / geo.l2_entry_bytes,
            backing,
            last_compressed: Mutex::new(None),
            writer: None,
            inflight: Inflight::default(),
        };
        if writable {
            if img.header.incompatible_features & INCOMPAT_DIRTY != 0 {
                img.repair_refcounts()?;
            }
            img.open_writer(opts.refcount_cache_bytes)?;
        }
        Ok(img)
    }

    fn open_backing(
        path: &Path,
        header: &Header,
        name: &[u8],
        opts: &Qcow2Options,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Backing> {
        let name = Path::new(OsStr::from_bytes(name));
        let resolved = if name.is_absolute() {
            name.to_path_buf()
        } else {
            path.parent().unwrap_or(Path::new(".")).join(name)
        };
        let format = match header.backing_format() {
            Some(f) => f.to_string(),
            None => {
                // No format extension: probe like old qemu did.
                let f = File::open(&resolved).map_err(|source| Qcow2Error::BackingOpen {
                    path: resolved.clone(),
                    source,
                })?;
                let mut magic = [0u8; 4];
                let n = read_prefix(&f, &mut magic)?;
                let fmt = if n == 4 && u32::from_be_bytes(magic) == MAGIC {
                    "qcow2"
                } else {
                    "raw"
                };
                log::warn!(
                    "{}: backing file {} has no format extension; probed {fmt}",
                    path.display(),
                    resolved.display()
                );
                fmt.to_string()
            }
        };
        match format.as_str() {
            "qcow2" => {
                let img = Self::open_in_chain(&resolved, opts, false, chain)?;
                Ok(Backing::Qcow2(Box::new(img)))
            }
            "raw" | "file" => {
                let file = File::open(&resolved).map_err(|source| Qcow2Error::BackingOpen {
                    path: resolved.clone(),
                    source,
                })?;
                super::lock::lock(&file, &resolved, false)?;
                let size = file
                    .metadata()
                    .map_err(Qcow2Error::io("reading backing file metadata"))?
                    .len();
                Ok(Backing::Raw {
                    path: resolved,
                    file,
                    size,
                })
            }
            other => Err(Qcow2Error::UnsupportedBackingFormat(other.to_string())),
        }
    }

    /// Path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.geo.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size
    }

    /// The header as read at open (autoclear bits cleared for writable opens; later changes
    /// such as a moved refcount table are not reflected).
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The derived geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Whether the image was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.writer.is_none()
    }

    /// Number of internal snapshots (the engine serves the active layer; writes copy clusters
    /// shared with snapshots first).
    pub fn snapshot_count(&self) -> u32 {
        self.header.nb_snapshots
    }

    /// The backing file, if any.
    pub fn backing(&self) -> Option<&Backing> {
        self.backing.as_ref()
    }

    /// Number of images in the chain (1 without a backing file).
    pub fn chain_depth(&self) -> usize {
        match &self.backing {
            None => 1,
            Some(Backing::Raw { .. }) => 2,
            Some(Backing::Qcow2(q)) => 1 + q.chain_depth(),
        }
    }

    /// L2 cache counters of this image (not of its backing files).
    pub fn l2_cache_stats(&self) -> CacheStats {
        self.l2_cache.stats()
    }

    pub(super) fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(Qcow2Error::OutOfRange {
                offset,
                len: len as u64,
                size: self.geo.size,
            }),
        }
    }

    pub(super) fn load_l2_slice(&self, key: u64) -> Result<Vec<u64>> {
        let bytes = self.slice_entries * self.geo.l2_entry_bytes;
        let mut raw = vec![0u8; bytes as usize];
        self.file.read_exact_at(&mut raw, key).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Qcow2Error::Corrupt(format!(
                    "L2 table slice at {key:#x} lies past the end of the file"
                ))
            } else {
                Qcow2Error::Io {
                    context: "reading an L2 table",
                    source: e,
                }
            }
        })?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    /// The cache key (host offset of the slice) and index in the slice of an L2 entry.
    pub(super) fn l2_slot(&self, l2_off: u64, l2_index: u64) -> (u64, usize) {
        let slice = l2_index / self.slice_entries;
        let key = l2_off + slice * self.slice_entries * self.geo.l2_entry_bytes;
        (key, (l2_index % self.slice_entries) as usize)
    }

    /// The raw L2 entry and (with extended L2) subcluster bitmap of a guest cluster, or None if
    /// its L2 table is not allocated.
    pub(super) fn l2_entry(
        &self,
        l1_index: u64,
        l2_index: u64,
    ) -> Result<Option<(u64, Option<u64>)>> {
        let Some(l1e) = self.l1.get(l1_index as usize) else {
            return Ok(None);
        };
        let l2_off =
            match entry::l1_l2_offset(l1e, self.geo.cluster_bits).map_err(Qcow2Error::Corrupt)? {
                None => return Ok(None),
                Some(o) => o,
            };
        let (key, i) = self.l2_slot(l2_off, l2_index);
        let ext = self.geo.extended_l2;
        let r = self.l2_cache.with(
            key,
            || self.load_l2_slice(key),
            |s| {
                if ext {
                    (s[2 * i], Some(s[2 * i + 1]))
                } else {
                    (s[i], None)
                }
            },
        )?;
        Ok(Some(r))
    }

    /// Maps the guest range starting at `guest` (at most `max_len` bytes, within one cluster):
    /// returns the mapping of its first byte and how many bytes share it.
    pub(super) fn map_one(&self, guest: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let (l1i, l2i, in_cluster) = self.geo.split(guest);
        let cluster_rest = (self.geo.cluster_size - in_cluster).min(max_len);
        let Some((l2e, bitmap)) = self.l2_entry(l1i, l2i)? else {
            return Ok((Mapping::Unallocated, cluster_rest));
        };
        let sub_bits = self.geo.cluster_bits - 5;
        let sub = if bitmap.is_some() {
            (in_cluster >> sub_bits) as u32
        } else {
            0
        };
        let m = entry::classify(l2e, bitmap, sub, self.geo.cluster_bits)
            .map_err(Qcow2Error::Corrupt)?;
        let len = match (bitmap, m) {
            (_, Mapping::Compressed(_)) | (None, _) => cluster_rest,
            (Some(b), _) => {
                let run = u64::from(entry::subcluster_run(b, sub));
                let end = (u64::from(sub) + run) << sub_bits;
                (end - in_cluster).min(max_len)
            }
        };
        let m = match m {
            Mapping::Data { host, copied } => Mapping::Data {
                host: host + in_cluster,
                copied,
            },
            other => other,
        };
        Ok((m, len))
    }

    /// Maps `[guest, guest + max_len)` to the longest prefix with one kind of mapping
    /// (contiguous host ranges for data), merging adjacent clusters.
    pub fn map_extent(&self, guest: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let (first, mut len) = self.map_one(guest, max_len)?;
        if matches!(first, Mapping::Compressed(_)) {
            return Ok((first, len));
        }
        while len < max_len {
            let (next, n) = self.map_one(guest + len, max_len - len)?;
            let contiguous = match (first, next) {
                (Mapping::Unallocated, Mapping::Unallocated) | (Mapping::Zero, Mapping::Zero) => {
                    true
                }
                (
                    Mapping::Data {
                        host: a,
                        copied: ca,
                    },
                    Mapping::Data {
                        host: b,
                        copied: cb,
                    },
                ) => ca == cb && a + len == b,
                _ => false,
            };
            if !contiguous {
                break;
            }
            len += n;
        }
        Ok((first, len))
    }

    /// Registers a data operation that is about to look up mappings and will do IO with
    /// them; returns the token for [`Self::io_end`]. Clusters unlinked meanwhile are not
    /// reused before the operation ended.
    pub fn io_begin(&self) -> u64 {
        self.inflight.begin()
    }

    /// Ends an operation registered with [`Self::io_begin`].
    pub fn io_end(&self, token: u64) {
        self.inflight.end(token)
    }

    /// The image of chain layer `layer` (0 = this one), if it is a qcow2 image.
    pub fn layer_image(&self, layer: u8) -> Option<&Qcow2Image> {
        if layer == 0 {
            return Some(self);
        }
        match &self.backing {
            Some(Backing::Qcow2(q)) => q.layer_image(layer - 1),
            _ => None,
        }
    }

    /// The file of chain layer `layer` (0 = this image).
    pub fn layer_file(&self, layer: u8) -> Option<&File> {
        if layer == 0 {
            return Some(&self.file);
        }
        match &self.backing {
            Some(Backing::Qcow2(q)) => q.layer_file(layer - 1),
            Some(Backing::Raw { file, .. }) if layer == 1 => Some(file),
            _ => None,
        }
    }

    /// Splits the guest range `[guest, guest + len)` into pieces by where their bytes come
    /// from, following the backing chain, and appends them to `out` (adjacent pieces of the
    /// same kind merged). The caller registers with [`Self::io_begin`] first and keeps the
    /// registration until its IO with the pieces finished.
    pub fn plan_read(&self, guest: u64, len: u64, out: &mut Vec<ReadPiece>) -> Result<()> {
        self.check_range(guest, len as usize)?;
        self.plan_read_layer(0, guest, len, out)
    }

    fn plan_read_layer(
        &self,
        layer: u8,
        guest: u64,
        len: u64,
        out: &mut Vec<ReadPiece>,
    ) -> Result<()> {
        let mut pos = 0;
        while pos < len {
            let g = guest + pos;
            let (m, n) = self.map_extent(g, len - pos)?;
            match m {
                Mapping::Zero => push_piece(out, g, n, ReadSource::Zero),
                Mapping::Data { host, .. } => {
                    push_piece(out, g, n, ReadSource::File { layer, host })
                }
                Mapping::Compressed(_) => push_piece(out, g, n, ReadSource::Engine { layer }),
                Mapping::Unallocated => {
                    let b = match &self.backing {
                        None => {
                            push_piece(out, g, n, ReadSource::Zero);
                            pos += n;
                            continue;
                        }
                        Some(b) => b,
                    };
                    let avail = b.size().saturating_sub(g).min(n);
                    if avail > 0 {
                        let next = layer
                            .checked_add(1)
                            .ok_or(Qcow2Error::BackingChainTooDeep {
                                limit: usize::from(u8::MAX),
                            })?;
                        match b {
                            Backing::Qcow2(q) => q.plan_read_layer(next, g, avail, out)?,
                            Backing::Raw { .. } => push_piece(
                                out,
                                g,
                                avail,
                                ReadSource::File {
                                    layer: next,
                                    host: g,
                                },
                            ),
                        }
                    }
                    if avail < n {
                        push_piece(out, g + avail, n - avail, ReadSource::Zero);
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let _io = self.inflight.guard();
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let (m, len) = self.map_extent(guest, (buf.len() - pos) as u64)?;
            let chunk = &mut buf[pos..pos + len as usize];
            match m {
                Mapping::Unallocated => match &self.backing {
                    None => chunk.fill(0),
                    Some(b) => b.read_at(chunk, guest)?,
                },
                Mapping::Zero => chunk.fill(0),
                Mapping::Data { host, .. } => {
                    read_zero_fill(&self.file, chunk, host, "reading guest data")?
                }
                Mapping::Compressed(desc) => {
                    let in_cluster = (guest & (self.geo.cluster_size - 1)) as usize;
                    let data = self.decompress_cluster(desc)?;
                    chunk.copy_from_slice(&data[in_cluster..in_cluster + chunk.len()]);
                }
            }
            pos += len as usize;
        }
        Ok(())
    }

    /// Reads and decompresses a compressed cluster (the last one is cached).
    pub(crate) fn decompress_cluster(&self, desc: CompressedDescriptor) -> Result<Arc<Vec<u8>>> {
        {
            let g = self
                .last_compressed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((d, data)) = g.as_ref() {
                if *d == desc {
                    return Ok(data.clone());
                }
            }
        }
        let mut input = vec![0u8; desc.max_len as usize];
        let n = read_prefix_at(&self.file, &mut input, desc.host_offset)?;
        input.truncate(n);
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        decompress(self.geo.compression, &input, &mut out).map_err(|reason| {
            Qcow2Error::Decompress {
                host_offset: desc.host_offset,
                reason,
            }
        })?;
        let out = Arc::new(out);
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((desc, out.clone()));
        Ok(out)
    }
}

/// Appends a piece, merging it into the previous one when they continue each other.
fn push_piece(out: &mut Vec<ReadPiece>, guest: u64, len: u64, src: ReadSource) {
    if let Some(last) = out.last_mut() {
        if last.guest + last.len == guest {
            let merged = match (last.src, src) {
                (ReadSource::Zero, ReadSource::Zero) => true,
                (
                    ReadSource::File { layer: a, host: ha },
                    ReadSource::File { layer: b, host: hb },
                ) => a == b && ha + last.len == hb,
                _ => false,
            };
            if merged {
                last.len += len;
                return;
            }
        }
    }
    out.push(ReadPiece { guest, len, src });
}

/// Reads as much of `buf` as the file has from offset 0; returns the count.
fn read_prefix(file: &File, buf: &mut [u8]) -> Result<usize> {
    read_prefix_at(file, buf, 0)
}

fn read_prefix_at(file: &File, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Qcow2Error::Io {
                    context: "reading image metadata",
                    source: e,
                })
            }
        }
    }
    Ok(done)
}
