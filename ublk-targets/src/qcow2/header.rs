//! Pure parsing and validation of the qcow2 header and header extensions (no I/O).
//!
//! [`Header::parse`] decodes the first cluster of an image; [`Header::validate`] checks it against
//! the file size and returns the derived [`Geometry`]. All numbers on disk are big-endian.

use super::error::{Qcow2Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimum length of a version 3 header.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// Smallest supported `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported `cluster_bits` (2 MiB clusters, qemu's limit).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Smallest `cluster_bits` with extended L2 entries (16 KiB clusters: 512-byte subclusters).
pub const MIN_CLUSTER_BITS_EXTENDED_L2: u32 = 14;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// qemu's limit on the L1 table size (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's limit on the refcount table size (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on the number of snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Host offsets must be below 2^56.
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest virtual size accepted (qemu: 2^63 - 512; we stay below 2^62 to keep the math simple).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

/// Incompatible feature bit 0: refcounts may be inconsistent.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: 128-bit L2 entries with 32 subclusters.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// All incompatible bits this implementation knows.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension type: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension type: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension type: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension type: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension type: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951, no zlib header); qemu calls it "zlib".
    #[default]
    Deflate,
    /// One zstd frame per cluster.
    Zstd,
}

/// Which feature bitmap a feature-name-table entry refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureKind {
    /// `incompatible_features`.
    Incompatible,
    /// `compatible_features`.
    Compatible,
    /// `autoclear_features`.
    Autoclear,
    /// Another type byte (kept as is).
    Other(u8),
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// Which bitmap.
    pub kind: FeatureKind,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL padding stripped).
    pub name: String,
}

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// A header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderExtension {
    /// Backing file format name (e.g. `qcow2`, `raw`).
    BackingFormat(String),
    /// Feature name table.
    FeatureNames(Vec<FeatureName>),
    /// Persistent bitmaps.
    Bitmaps(BitmapsExt),
    /// Full disk encryption header location.
    Crypto {
        /// Offset of the encryption header.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// External data file name.
    DataFile(String),
    /// An extension this implementation does not interpret, kept for rewriting the header.
    Unknown {
        /// Extension type.
        kind: u32,
        /// Raw data (without padding).
        data: Vec<u8>,
    },
}

impl HeaderExtension {
    /// The extension's type number.
    pub fn kind(&self) -> u32 {
        match self {
            HeaderExtension::BackingFormat(_) => EXT_BACKING_FORMAT,
            HeaderExtension::FeatureNames(_) => EXT_FEATURE_NAMES,
            HeaderExtension::Bitmaps(_) => EXT_BITMAPS,
            HeaderExtension::Crypto { .. } => EXT_CRYPTO,
            HeaderExtension::DataFile(_) => EXT_DATA_FILE,
            HeaderExtension::Unknown { kind, .. } => *kind,
        }
    }

    fn data(&self) -> Vec<u8> {
        match self {
            HeaderExtension::BackingFormat(s) | HeaderExtension::DataFile(s) => {
                s.as_bytes().to_vec()
            }
            HeaderExtension::FeatureNames(t) => t
                .iter()
                .flat_map(|f| {
                    let mut e = [0u8; 48];
                    e[0] = match f.kind {
                        FeatureKind::Incompatible => 0,
                        FeatureKind::Compatible => 1,
                        FeatureKind::Autoclear => 2,
                        FeatureKind::Other(n) => n,
                    };
                    e[1] = f.bit;
                    let name = f.name.as_bytes();
                    let n = name.len().min(46);
                    e[2..2 + n].copy_from_slice(&name[..n]);
                    e
                })
                .collect(),
            HeaderExtension::Bitmaps(b) => {
                let mut d = Vec::with_capacity(24);
                d.extend_from_slice(&b.nb_bitmaps.to_be_bytes());
                d.extend_from_slice(&0u32.to_be_bytes());
                d.extend_from_slice(&b.directory_size.to_be_bytes());
                d.extend_from_slice(&b.directory_offset.to_be_bytes());
                d
            }
            HeaderExtension::Crypto { offset, length } => {
                let mut d = offset.to_be_bytes().to_vec();
                d.extend_from_slice(&length.to_be_bytes());
                d
            }
            HeaderExtension::Unknown { data, .. } => data.clone(),
        }
    }

    /// Encodes a list of extensions as they go on disk after the header: each padded to 8
    /// bytes, followed by the end marker. Unknown extensions are written back unchanged.
    pub fn encode_all(exts: &[HeaderExtension]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in exts {
            let data = e.data();
            out.extend_from_slice(&e.kind().to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(&data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]);
        out
    }
}

/// A decoded qcow2 header (version 2 or 3) with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, 0 if none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3; 0 for v2).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3; 0 for v2).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (v2: 4).
    pub refcount_order: u32,
    /// Header length (v2: 72).
    pub header_length: u32,
    /// Raw value of the `compression_type` byte (0 if absent).
    pub compression_type_raw: u8,
    /// Header bytes from 105 up to `header_length` (padding and unknown additional fields),
    /// preserved for rewriting.
    pub additional_fields: Vec<u8>,
    /// Header extensions in on-disk order.
    pub extensions: Vec<HeaderExtension>,
    /// Backing file name bytes (not NUL-terminated on disk).
    pub backing_file: Option<Vec<u8>>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn name_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&c| c == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl Header {
    /// How many leading bytes [`Header::parse`] needs at least to learn `cluster_bits`.
    pub const PROBE_LEN: usize = V2_HEADER_LEN as usize;

    /// Reads just `cluster_bits` from the first bytes of an image, to know how much to read for
    /// [`Header::parse`]. Checks the magic and the range.
    pub fn probe_cluster_bits(buf: &[u8]) -> Result<u32> {
        if buf.len() < Self::PROBE_LEN {
            return Err(Qcow2Error::Truncated {
                need: Self::PROBE_LEN as u64,
                have: buf.len() as u64,
            });
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Qcow2Error::BadMagic(magic));
        }
        let bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Qcow2Error::ClusterBits {
                bits,
                min: MIN_CLUSTER_BITS,
            });
        }
        Ok(bits)
    }

    /// Decodes the header from `buf`, the image's first cluster (or less, if the file is
    /// shorter). Extensions and the backing name must lie inside `buf` and inside cluster 0.
    ///
    /// Checks the structure (magic, version, lengths, `cluster_bits`, `refcount_order`,
    /// extension framing); [`Header::validate`] checks the content against the file.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let cluster_bits = Self::probe_cluster_bits(buf)?;
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion(version));
        }
        let cluster_size = 1usize << cluster_bits;
        let buf = &buf[..buf.len().min(cluster_size)];
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type_raw: 0,
            additional_fields: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            let need = V3_MIN_HEADER_LEN as usize;
            if buf.len() < need {
                return Err(Qcow2Error::Truncated {
                    need: need as u64,
                    have: buf.len() as u64,
                });
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN || !h.header_length.is_multiple_of(8) {
                return Err(Qcow2Error::InvalidHeader(format!(
                    "header_length {} must be >= 104 and a multiple of 8",
                    h.header_length
                )));
            }
            let hl = h.header_length as usize;
            if hl > buf.len() {
                return Err(Qcow2Error::Truncated {
                    need: hl as u64,
                    have: buf.len() as u64,
                });
            }
            if hl > 104 {
                h.compression_type_raw = buf[104];
                h.additional_fields = buf[105..hl].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(Qcow2Error::RefcountOrder(h.refcount_order));
        }
        h.extensions = parse_extensions(buf, h.header_length as usize)?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME {
                return Err(Qcow2Error::InvalidHeader(format!(
                    "backing file name length {} exceeds {MAX_BACKING_NAME}",
                    h.backing_file_size
                )));
            }
            let start = h.backing_file_offset;
            let end = start.saturating_add(u64::from(h.backing_file_size));
            if end > cluster_size as u64 {
                return Err(Qcow2Error::InvalidHeader(format!(
                    "backing file name at {start}..{end} is outside the first cluster"
                )));
            }
            if end > buf.len() as u64 {
                return Err(Qcow2Error::Truncated {
                    need: end,
                    have: buf.len() as u64,
                });
            }
            h.backing_file = Some(buf[start as usize..end as usize].to_vec());
        }
        Ok(h)
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTENDED_L2 != 0
    }

    /// The compression type, or an error for an unknown one.
    pub fn compression_type(&self) -> Result<CompressionType> {
        match self.compression_type_raw {
            0 => Ok(CompressionType::Deflate),
            1 => Ok(CompressionType::Zstd),
            n => Err(Qcow2Error::UnsupportedCompression(n)),
        }
    }

    /// The backing file format named by the header extension, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.as_str()),
            _ => None,
        })
    }

    /// Human-readable names of incompatible feature `bits`, from the feature name table when it
    /// has them, else `bit N`.
    pub fn incompatible_feature_names(&self, bits: u64) -> String {
        let table: &[FeatureName] = self
            .extensions
            .iter()
            .find_map(|e| match e {
                HeaderExtension::FeatureNames(t) => Some(t.as_slice()),
                _ => None,
            })
            .unwrap_or(&[]);
        (0..64u8)
            .filter(|b| bits & (1u64 << b) != 0)
            .map(|b| {
                table
                    .iter()
                    .find(|f| f.kind == FeatureKind::Incompatible && f.bit == b)
                    .map(|f| format!("bit {b} \"{}\"", f.name))
                    .unwrap_or_else(|| format!("bit {b}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks the header against an image file of `file_size` bytes and returns the geometry.
    ///
    /// Refuses unknown incompatible features, the corrupt bit (unless `allow_corrupt`),
    /// encryption, external data files, bad compression types, misaligned, overlapping or
    /// out-of-file tables, absurd sizes and an L1 table too small for the virtual size.
    pub fn validate(&self, file_size: u64, allow_corrupt: bool) -> Result<Geometry> {
        let cs = self.cluster_size();
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownIncompatibleFeatures {
                bits: unknown,
                names: self.incompatible_feature_names(unknown),
            });
        }
        if self.incompatible_features & INCOMPAT_CORRUPT != 0 && !allow_corrupt {
            return Err(Qcow2Error::MarkedCorrupt);
        }
        if self.crypt_method != 0 {
            return Err(Qcow2Error::Encrypted {
                method: self.crypt_method,
            });
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }
        let has_compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        if has_compression_bit != (self.compression_type_raw != 0) {
            return Err(Qcow2Error::InvalidHeader(format!(
                "compression type {} inconsistent with incompatible bit 3 ({})",
                self.compression_type_raw, has_compression_bit
            )));
        }
        let compression = self.compression_type()?;
        let extended_l2 = self.extended_l2();
        if extended_l2 && self.cluster_bits < MIN_CLUSTER_BITS_EXTENDED_L2 {
            return Err(Qcow2Error::ClusterBits {
                bits: self.cluster_bits,
                min: MIN_CLUSTER_BITS_EXTENDED_L2,
            });
        }
        if self.version == 2 && self.refcount_order != 4 {
            return Err(Qcow2Error::RefcountOrder(self.refcount_order));
        }
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::TooLarge {
                what: "virtual size",
                value: self.size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        if file_size < cs {
            // qemu always writes at least the header cluster; a shorter file is truncated.
            return Err(Qcow2Error::Truncated {
                need: cs,
                have: file_size,
            });
        }

        let entry_bytes: u64 = if extended_l2 { 16 } else { 8 };
        let l2_entries = cs / entry_bytes;
        let bytes_per_l1 = cs * l2_entries;
        let l1_needed = self.size.div_ceil(bytes_per_l1);
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "L1 table bytes",
                value: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        if u64::from(self.l1_size) < l1_needed {
            return Err(Qcow2Error::InvalidHeader(format!(
                "l1_size {} too small for virtual size {} (needs {l1_needed})",
                self.l1_size, self.size
            )));
        }
        let mut tables: Vec<(&'static str, u64, u64)> = vec![("header", 0, cs)];
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_size)?;
            tables.push(("L1 table", self.l1_table_offset, l1_bytes));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Qcow2Error::TooLarge {
                what: "refcount table bytes",
                value: rt_bytes,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        if rt_bytes == 0 {
            return Err(Qcow2Error::InvalidHeader(
                "refcount table has no clusters".into(),
            ));
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_size,
        )?;
        tables.push(("refcount table", self.refcount_table_offset, rt_bytes));
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Qcow2Error::TooLarge {
                what: "snapshot count",
                value: self.nb_snapshots.into(),
                limit: MAX_SNAPSHOTS.into(),
            });
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes; the table's exact length needs parsing.
            let min_len = u64::from(self.nb_snapshots) * 40;
            check_table(
                "snapshot table",
                self.snapshots_offset,
                min_len,
                cs,
                file_size,
            )?;
            tables.push(("snapshot table", self.snapshots_offset, min_len));
        }
        for ext in &self.extensions {
            if let HeaderExtension::Bitmaps(b) = ext {
                check_table(
                    "bitmap directory",
                    b.directory_offset,
                    b.directory_size,
                    cs,
                    file_size,
                )?;
            }
        }
        for (i, a) in tables.iter().enumerate() {
            for b in &tables[i + 1..] {
                if a.1 < b.1 + b.2 && b.1 < a.1 + a.2 {
                    return Err(Qcow2Error::TablesOverlap { a: a.0, b: b.0 });
                }
            }
        }
        Ok(Geometry {
            cluster_bits: self.cluster_bits,
            cluster_size: cs,
            l2_entries,
            l2_entry_bytes: entry_bytes,
            extended_l2,
            size: self.size,
            l1_size: self.l1_size,
            refcount_order: self.refcount_order,
            compression,
        })
    }
}

fn check_table(what: &'static str, offset: u64, len: u64, cs: u64, file_size: u64) -> Result<()> {
    if !offset.is_multiple_of(cs) {
        return Err(Qcow2Error::InvalidHeader(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    if offset == 0 {
        return Err(Qcow2Error::TablesOverlap {
            a: what,
            b: "header",
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(Qcow2Error::TablePastEof {
            table: what,
            offset,
            len,
            file_size,
        }),
    }
}

fn parse_extensions(buf: &[u8], start: usize) -> Result<Vec<HeaderExtension>> {
    let mut exts = Vec::new();
    let mut at = start;
    loop {
        if at + 8 > buf.len() {
            // No end marker inside the buffer: a v2 image whose header is followed by nothing
            // (qemu always writes the end marker, but the spec allows the cluster to end).
            if at >= buf.len() {
                return Ok(exts);
            }
            return Err(Qcow2Error::InvalidHeader(format!(
                "header extension at {at} runs past the first cluster"
            )));
        }
        let kind = be32(buf, at);
        let len = be32(buf, at + 4) as usize;
        if kind == EXT_END {
            return Ok(exts);
        }
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|&e| e <= buf.len())
            .ok_or_else(|| {
                Qcow2Error::InvalidHeader(format!(
                    "header extension {kind:#010x} of {len} bytes runs past the first cluster"
                ))
            })?;
        let data = &buf[data_start..data_end];
        let ext = match kind {
            EXT_BACKING_FORMAT => HeaderExtension::BackingFormat(name_string(data)),
            EXT_DATA_FILE => HeaderExtension::DataFile(name_string(data)),
            EXT_FEATURE_NAMES => HeaderExtension::FeatureNames(
                data.chunks_exact(48)
                    .map(|e| FeatureName {
                        kind: match e[0] {
                            0 => FeatureKind::Incompatible,
                            1 => FeatureKind::Compatible,
                            2 => FeatureKind::Autoclear,
                            n => FeatureKind::Other(n),
                        },
                        bit: e[1],
                        name: name_string(&e[2..]),
                    })
                    .collect(),
            ),
            EXT_BITMAPS => {
                if data.len() < 24 {
                    return Err(Qcow2Error::InvalidHeader(format!(
                        "bitmaps extension of {len} bytes is shorter than 24"
                    )));
                }
                HeaderExtension::Bitmaps(BitmapsExt {
                    nb_bitmaps: be32(data, 0),
                    directory_size: be64(data, 8),
                    directory_offset: be64(data, 16),
                })
            }
            EXT_CRYPTO => {
                if data.len() < 16 {
                    return Err(Qcow2Error::InvalidHeader(format!(
                        "encryption extension of {len} bytes is shorter than 16"
                    )));
                }
                HeaderExtension::Crypto {
                    offset: be64(data, 0),
                    length: be64(data, 8),
                }
            }
            _ => HeaderExtension::Unknown {
                kind,
                data: data.to_vec(),
            },
        };
        exts.push(ext);
        at = data_start + len.div_ceil(8) * 8;
    }
}

/// Sizes derived from a validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub l2_entry_bytes: u64,
    /// Whether L2 entries carry subcluster bitmaps.
    pub extended_l2: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Compression of compressed clusters.
    pub compression: CompressionType,
}

impl Geometry {
    /// Subcluster size (cluster size / 32 with extended L2, else the cluster size).
    pub fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size / 32
        } else {
            self.cluster_size
        }
    }

    /// Splits a guest offset into (L1 index, L2 index, offset within the cluster).
    pub fn split(&self, guest: u64) -> (u64, u64, u64) {
        let cluster = guest >> self.cluster_bits;
        (
            cluster / self.l2_entries,
            cluster % self.l2_entries,
            guest & (self.cluster_size - 1),
        )
    }
}
