//! Pure decoding of L1 and L2 entries, compressed cluster descriptors and extended-L2 subcluster
//! bitmaps (no I/O).

/// Offset bits of L1 and standard L2 entries (bits 9..=55).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of refcount table entries (bits 9..=63).
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// L1/L2 bit 63: the refcount of the cluster is exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 bit 62: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 bit 0: the cluster reads as zeros (standard entries only).
pub const OFLAG_ZERO: u64 = 1;
/// Reserved bits of an L1 entry (1..=8 and 56..=62; bit 0 is reserved too).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry (1..=8 and 56..=61).
pub const L2_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Size of the sectors compressed lengths are counted in.
pub const COMPRESSED_SECTOR: u64 = 512;

/// Where compressed data lives, decoded from a compressed L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub host_offset: u64,
    /// Upper bound of the compressed length in bytes: the data ends at or before
    /// `host_offset + max_len`.
    pub max_len: u64,
}

impl CompressedDescriptor {
    /// Decodes the descriptor bits (0..=61) of a compressed L2 entry for `cluster_bits`.
    ///
    /// With `x = 62 - (cluster_bits - 8)`, bits `0..x` are the host offset and bits `x..62` the
    /// number of 512-byte sectors beyond the first one.
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedDescriptor {
        let shift = 62 - (cluster_bits - 8);
        let offset_mask = (1u64 << shift) - 1;
        let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
        let host_offset = entry & offset_mask;
        let nb_sectors = ((entry >> shift) & sectors_mask) + 1;
        CompressedDescriptor {
            host_offset,
            max_len: nb_sectors * COMPRESSED_SECTOR - (host_offset & (COMPRESSED_SECTOR - 1)),
        }
    }

    /// Encodes the descriptor (without the compressed flag); inverse of [`Self::decode`] for
    /// lengths that fit. `len` is the exact compressed length in bytes (≥ 1).
    pub fn encode(host_offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let shift = 62 - (cluster_bits - 8);
        let first_sector = host_offset / COMPRESSED_SECTOR;
        let last_sector = (host_offset + len - 1) / COMPRESSED_SECTOR;
        let nb_extra = last_sector - first_sector;
        host_offset | (nb_extra << shift)
    }

    /// Host clusters the compressed data touches (each holds one reference per compressed
    /// cluster touching it): `(first, last)` cluster indices, inclusive.
    pub fn host_clusters(&self, cluster_bits: u32) -> (u64, u64) {
        let start = self.host_offset & !(COMPRESSED_SECTOR - 1);
        let end = self.host_offset + self.max_len; // sector aligned
        (start >> cluster_bits, (end - 1) >> cluster_bits)
    }
}

/// What a guest cluster (or subcluster) maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated here: read from the backing file, or zeros without one.
    Unallocated,
    /// Reads as zeros; the backing file is not consulted.
    Zero,
    /// Data at this host offset (already including the offset within the cluster).
    Data {
        /// Host byte offset.
        host: u64,
        /// OFLAG_COPIED was set (refcount is exactly one: writable in place).
        copied: bool,
    },
    /// A compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Decodes an L1 entry into the L2 table offset (None if unallocated).
///
/// Returns an error message if the offset is misaligned.
pub fn l1_l2_offset(entry: u64, cluster_bits: u32) -> Result<Option<u64>, String> {
    let off = entry & OFFSET_MASK;
    if off == 0 {
        return Ok(None);
    }
    if off & ((1 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "L1 entry {entry:#018x}: L2 table offset {off:#x} is not cluster aligned"
        ));
    }
    Ok(Some(off))
}

/// Classifies one guest cluster from its L2 entry (and, with extended L2, its subcluster
/// bitmap), for the subcluster `sub` (0..32; 0 without extended L2).
///
/// The compressed flag is tested before anything else: in a compressed descriptor bit 0 is part
/// of the host offset, not the zero flag. For data mappings `host` is the start of the cluster.
pub fn classify(
    entry: u64,
    bitmap: Option<u64>,
    sub: u32,
    cluster_bits: u32,
) -> Result<Mapping, String> {
    if entry & OFLAG_COMPRESSED != 0 {
        if bitmap.is_some_and(|b| b != 0) {
            return Err(format!(
                "compressed L2 entry {entry:#018x} has a non-zero subcluster bitmap"
            ));
        }
        let desc =
            CompressedDescriptor::decode(entry & !(OFLAG_COMPRESSED | OFLAG_COPIED), cluster_bits);
        if desc.host_offset + desc.max_len > super::header::MAX_HOST_OFFSET {
            return Err(format!(
                "compressed L2 entry {entry:#018x}: host offset too large"
            ));
        }
        if desc.host_offset == 0 {
            return Err(format!(
                "compressed L2 entry {entry:#018x} points at the header"
            ));
        }
        return Ok(Mapping::Compressed(desc));
    }
    let host = entry & OFFSET_MASK;
    if host & ((1 << cluster_bits) - 1) != 0 {
        return Err(format!(
            "L2 entry {entry:#018x}: host offset {host:#x} is not cluster aligned"
        ));
    }
    let copied = entry & OFLAG_COPIED != 0;
    match bitmap {
        None => {
            if entry & OFLAG_ZERO != 0 {
                Ok(Mapping::Zero)
            } else if host == 0 {
                if copied {
                    // Only valid with an external data file, which is refused at open.
                    return Err(format!(
                        "L2 entry {entry:#018x}: COPIED set without a host offset"
                    ));
                }
                Ok(Mapping::Unallocated)
            } else {
                Ok(Mapping::Data { host, copied })
            }
        }
        Some(bitmap) => {
            let alloc = bitmap & (1u64 << sub) != 0;
            let zero = bitmap & (1u64 << (sub + 32)) != 0;
            match (alloc, zero, host != 0) {
                (true, true, _) => Err(format!(
                    "subcluster {sub} of L2 entry {entry:#018x} is both allocated and zero (bitmap {bitmap:#018x})"
                )),
                (true, false, false) => Err(format!(
                    "subcluster {sub} of L2 entry {entry:#018x} is allocated without a host offset"
                )),
                (true, false, true) => Ok(Mapping::Data { host, copied }),
                (false, true, _) => Ok(Mapping::Zero),
                (false, false, _) => Ok(Mapping::Unallocated),
            }
        }
    }
}

/// Number of consecutive subclusters starting at `sub` (< 32) whose state (allocated, zero,
/// neither) equals that of `sub`, capped at `32 - sub`.
pub fn subcluster_run(bitmap: u64, sub: u32) -> u32 {
    let state = |s: u32| ((bitmap >> s) & 1, (bitmap >> (s + 32)) & 1);
    let first = state(sub);
    (sub..32).take_while(|&s| state(s) == first).count() as u32
}
