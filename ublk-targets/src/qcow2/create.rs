//! Creating a new, empty version 3 image.
//!
//! Layout: the header (with the backing-format extension and the backing file name, if any)
//! in cluster 0, then the refcount table, the refcount blocks covering every cluster written
//! here, and the L1 table (all zeros: nothing allocated). Every cluster written is counted once.
//! The file is created exclusively (an existing file is never touched), synced with its
//! directory, and removed again if anything fails.

use super::error::{Qcow2Error, Result};
use super::header::{
    EXT_BACKING_FORMAT, EXT_END, MAGIC, MAX_BACKING_NAME, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use super::image::{Qcow2Image, Qcow2Options};
use super::refcount;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Parameters of a new image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Cluster size in bytes (a power of two from 512 B to 2 MiB; default 64 KiB).
    pub cluster_size: u64,
    /// Backing file, stored as given (a relative name is relative to the new image's
    /// directory). Its format (qcow2 or raw) is probed and recorded in the header.
    pub backing: Option<PathBuf>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 64 * 1024,
            backing: None,
        }
    }
}

/// Header length written (qemu writes 112: the compression type byte and padding).
const HEADER_LEN: u32 = 112;
/// Refcount width of new images (16 bits, qemu's default).
const REFCOUNT_ORDER: u32 = 4;

impl Qcow2Image {
    /// Creates a new, empty version 3 image of `size` bytes at `path`, which must not exist.
    ///
    /// `size` must be a non-zero multiple of 512. On error no file is left behind.
    pub fn create(path: impl AsRef<Path>, size: u64, opts: &CreateOptions) -> Result<()> {
        let path = path.as_ref();
        let layout = Layout::new(size, opts)?;
        let backing = match &opts.backing {
            None => None,
            Some(b) => Some(backing_format(path, b)?),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    Qcow2Error::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    Qcow2Error::Io {
                        context: "creating the image file",
                        source,
                    }
                }
            })?;
        let r = layout
            .write(&file, opts, backing.as_ref())
            .and_then(|()| {
                file.sync_all()
                    .map_err(Qcow2Error::io("syncing the new image"))
            })
            .and_then(|()| sync_dir(path));
        // Check that the result opens as what was asked for.
        let r = r.and_then(|()| {
            let img = Qcow2Image::open(path, &Qcow2Options::default())?;
            if img.virtual_size() != size || img.cluster_size() != opts.cluster_size {
                return Err(Qcow2Error::Corrupt(
                    "the new image does not read back as created".into(),
                ));
            }
            Ok(())
        });
        if let Err(e) = r {
            if let Err(re) = std::fs::remove_file(path) {
                log::error!(
                    "{}: cannot remove after a failed create: {re}",
                    path.display()
                );
            }
            return Err(e);
        }
        log::info!(
            "{}: created qcow2 image, {size} bytes, cluster size {}",
            path.display(),
            opts.cluster_size
        );
        Ok(())
    }
}

/// Probes the backing file (relative to the new image's directory) and returns its stored
/// name and format.
fn backing_format(image: &Path, backing: &Path) -> Result<(Vec<u8>, &'static str)> {
    let name = backing.as_os_str().as_bytes().to_vec();
    if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
        return Err(Qcow2Error::InvalidCreate(format!(
            "backing file name must have 1..={MAX_BACKING_NAME} bytes"
        )));
    }
    let resolved = if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(backing)
    };
    let f = File::open(&resolved).map_err(|source| Qcow2Error::BackingOpen {
        path: resolved.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_qcow2 = f.read_exact_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == MAGIC;
    if is_qcow2 {
        // Fails here, not at the first read, if the backing chain cannot be opened.
        Qcow2Image::open(&resolved, &Qcow2Options::default())?;
        Ok((name, "qcow2"))
    } else {
        Ok((name, "raw"))
    }
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Qcow2Error::io("syncing the image's directory"))
}

/// Where the structures of a new image go (in clusters).
#[derive(Debug)]
struct Layout {
    size: u64,
    cluster_bits: u32,
    l1_size: u64,
    /// Refcount table: clusters 1..1+rt.
    rt: u64,
    /// Refcount blocks: the next rb clusters.
    rb: u64,
    /// L1 table: the next l1 clusters.
    l1: u64,
}

impl Layout {
    fn new(size: u64, opts: &CreateOptions) -> Result<Layout> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two()
            || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
        {
            return Err(Qcow2Error::InvalidCreate(format!(
                "cluster size {cs} is not a power of two from 512 to 2M"
            )));
        }
        if size == 0 || !size.is_multiple_of(512) || size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::InvalidCreate(format!(
                "size {size} must be a non-zero multiple of 512 up to 2^62"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        let l2_entries = cs / 8;
        let l1_size = size.div_ceil(cs).div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Qcow2Error::InvalidCreate(format!(
                "size {size} needs an L1 table of {} bytes (limit {MAX_L1_BYTES}): use larger clusters",
                l1_size * 8
            )));
        }
        let l1 = (l1_size * 8).div_ceil(cs);
        let rb_entries = refcount::block_entries(cluster_bits, REFCOUNT_ORDER);
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1;
            let need_rb = total.div_ceil(rb_entries);
            let need_rt = (need_rb * 8).div_ceil(cs);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        if rt * cs > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::InvalidCreate(format!(
                "size {size} needs a refcount table larger than {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        Ok(Layout {
            size,
            cluster_bits,
            l1_size,
            rt,
            rb,
            l1,
        })
    }

    fn write(
        &self,
        file: &File,
        opts: &CreateOptions,
        backing: Option<&(Vec<u8>, &str)>,
    ) -> Result<()> {
        let cs = opts.cluster_size;
        let cb = self.cluster_bits;
        let rt_off = cs;
        let rb_first = 1 + self.rt;
        let l1_off = (rb_first + self.rb) * cs;
        let total = rb_first + self.rb + self.l1;
        let put = |buf: &[u8], off: u64, what: &'static str| {
            file.write_all_at(buf, off).map_err(Qcow2Error::io(what))
        };

        // Zeros first, so that the file has its final length even if it is all tables.
        file.set_len(total * cs)
            .map_err(Qcow2Error::io("sizing the new image"))?;

        // Refcount blocks: clusters 0..total are used.
        let rb_entries = refcount::block_entries(cb, REFCOUNT_ORDER);
        let mut table = vec![0u8; (self.rt * cs) as usize];
        for b in 0..self.rb {
            let mut block = vec![0u8; cs as usize];
            let first = b * rb_entries;
            for c in first..(first + rb_entries).min(total) {
                refcount::set(&mut block, REFCOUNT_ORDER, c - first, 1);
            }
            let off = (rb_first + b) * cs;
            put(&block, off, "writing a refcount block")?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        put(&table, rt_off, "writing the refcount table")?;

        // Header, extensions, backing name.
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cb.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        h[36..40].copy_from_slice(&(self.l1_size as u32).to_be_bytes());
        h[40..48].copy_from_slice(&l1_off.to_be_bytes());
        h[48..56].copy_from_slice(&rt_off.to_be_bytes());
        h[56..60].copy_from_slice(&(self.rt as u32).to_be_bytes());
        h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h[100..104].copy_from_slice(&HEADER_LEN.to_be_bytes());
        if let Some((name, format)) = backing {
            push_ext(&mut h, EXT_BACKING_FORMAT, format.as_bytes());
            push_ext(&mut h, EXT_END, &[]);
            let name_off = h.len() as u64;
            h.extend_from_slice(name);
            h[8..16].copy_from_slice(&name_off.to_be_bytes());
            h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        } else {
            push_ext(&mut h, EXT_END, &[]);
        }
        if h.len() as u64 > cs {
            return Err(Qcow2Error::InvalidCreate(format!(
                "the header with the backing file name needs {} bytes, more than a cluster",
                h.len()
            )));
        }
        put(&h, 0, "writing the header")
    }
}

fn push_ext(h: &mut Vec<u8>, kind: u32, data: &[u8]) {
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    h.resize(h.len().div_ceil(8) * 8, 0);
}
