//! Pure access to refcount block entries of any width (1..=64 bits; no I/O).
//!
//! Sub-byte widths pack entries starting at the least significant bit of each byte; multi-byte
//! widths are big-endian.

/// Entries per refcount block for a cluster size and `refcount_order`.
pub fn block_entries(cluster_bits: u32, refcount_order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> refcount_order
}

/// The largest refcount representable with `refcount_order`.
pub fn max_refcount(refcount_order: u32) -> u64 {
    let bits = 1u32 << refcount_order;
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Reads entry `index` of a refcount block.
pub fn get(block: &[u8], refcount_order: u32, index: u64) -> u64 {
    let bits = 1u64 << refcount_order;
    if bits < 8 {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let at = index as usize * n;
        block[at..at + n]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes entry `index` of a refcount block; `value` must fit the width.
pub fn set(block: &mut [u8], refcount_order: u32, index: u64, value: u64) {
    let bits = 1u64 << refcount_order;
    if bits < 8 {
        let bit = index * bits;
        let mask = ((1u8 << bits) - 1) << (bit % 8);
        let byte = &mut block[(bit / 8) as usize];
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
    } else {
        let n = (bits / 8) as usize;
        let at = index as usize * n;
        let be = value.to_be_bytes();
        block[at..at + n].copy_from_slice(&be[8 - n..]);
    }
}
