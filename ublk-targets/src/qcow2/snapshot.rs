//! Pure decoding of snapshot table entries (no I/O).
//!
//! An entry is a 40-byte fixed part, `extra_data_size` bytes of extra data, the ID string and
//! the name, padded to a multiple of 8 bytes.

/// Size of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;

/// The fields of a snapshot table entry that locate its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Number of entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// Length of the whole entry in bytes (a multiple of 8).
    pub entry_len: u64,
}

impl SnapshotEntry {
    /// Decodes the fixed part of an entry (`buf` holds at least [`FIXED_LEN`] bytes).
    pub fn parse(buf: &[u8]) -> Result<SnapshotEntry, String> {
        let Some(fixed) = buf.get(..FIXED_LEN) else {
            return Err(format!(
                "snapshot table entry truncated: {} of {FIXED_LEN} bytes",
                buf.len()
            ));
        };
        let be32 = |at: usize| {
            u32::from_be_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]])
        };
        let be16 = |at: usize| u16::from_be_bytes([fixed[at], fixed[at + 1]]);
        let mut off = [0u8; 8];
        off.copy_from_slice(&fixed[..8]);
        let l1_table_offset = u64::from_be_bytes(off);
        let l1_size = be32(8);
        let id_len = u64::from(be16(12));
        let name_len = u64::from(be16(14));
        let extra = u64::from(be32(36));
        let raw = FIXED_LEN as u64 + extra + id_len + name_len;
        Ok(SnapshotEntry {
            l1_table_offset,
            l1_size,
            entry_len: raw.div_ceil(8) * 8,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_snapshot_entry_lengths() {
        let mut b = [0u8; FIXED_LEN];
        b[..8].copy_from_slice(&0x30000u64.to_be_bytes());
        b[8..12].copy_from_slice(&5u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[14..16].copy_from_slice(&2u16.to_be_bytes());
        b[36..40].copy_from_slice(&16u32.to_be_bytes());
        let e = SnapshotEntry::parse(&b).unwrap();
        assert_eq!(e.l1_table_offset, 0x30000);
        assert_eq!(e.l1_size, 5);
        // 40 + 16 + 1 + 2 = 59, padded to 64.
        assert_eq!(e.entry_len, 64);
        assert!(SnapshotEntry::parse(&b[..39]).is_err());
    }
}
