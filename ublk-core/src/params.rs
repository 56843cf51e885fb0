//! Device parameters (`struct ublk_params`) as a plain Rust value.

use std::mem::offset_of;
use ublk_sys as sys;

bitflags::bitflags! {
    /// `UBLK_ATTR_*` attributes of the basic parameters.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct Attrs: u32 {
        /// `UBLK_ATTR_READ_ONLY`
        const READ_ONLY = sys::UBLK_ATTR_READ_ONLY;
        /// `UBLK_ATTR_ROTATIONAL`
        const ROTATIONAL = sys::UBLK_ATTR_ROTATIONAL;
        /// `UBLK_ATTR_VOLATILE_CACHE`: the kernel sends FLUSH requests.
        const VOLATILE_CACHE = sys::UBLK_ATTR_VOLATILE_CACHE;
        /// `UBLK_ATTR_FUA`: the kernel passes FUA writes through.
        const FUA = sys::UBLK_ATTR_FUA;
        const _ = !0;
    }
}

/// Discard and write-zeroes limits (`struct ublk_param_discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardParams {
    /// Bytes; offset of the first aligned discard unit.
    pub alignment: u32,
    /// Bytes; the discard unit.
    pub granularity: u32,
    /// Largest discard in 512-byte sectors (0: no discard).
    pub max_discard_sectors: u32,
    /// Largest write-zeroes in 512-byte sectors (0: no write-zeroes).
    pub max_write_zeroes_sectors: u32,
}

/// What the kernel needs to know about the block device (`SET_PARAMS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceParams {
    /// Capacity in bytes (rounded down to the logical block size).
    pub size: u64,
    /// log2 of the logical block size (9..=12).
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the minimal io size.
    pub io_min_shift: u8,
    /// log2 of the optimal io size.
    pub io_opt_shift: u8,
    /// Largest request in sectors; 0 means "whatever the buffer size allows".
    pub max_sectors: u32,
    /// Attributes (read-only, volatile cache, FUA, rotational).
    pub attrs: Attrs,
    /// Discard / write-zeroes limits, if supported.
    pub discard: Option<DiscardParams>,
}

impl Default for DeviceParams {
    fn default() -> Self {
        DeviceParams {
            size: 0,
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_min_shift: 9,
            io_opt_shift: 12,
            max_sectors: 0,
            attrs: Attrs::empty(),
            discard: None,
        }
    }
}

impl DeviceParams {
    /// Converts to the kernel struct; `max_io_buf_bytes` is the negotiated per-request buffer size.
    ///
    /// `len` covers only the parameter types used, so older kernels with a shorter
    /// `struct ublk_params` accept it.
    pub fn to_sys(&self, max_io_buf_bytes: u32) -> sys::ublk_params {
        let lbs = 1u64 << self.logical_bs_shift;
        let buf_sectors = max_io_buf_bytes >> 9;
        let max_sectors = if self.max_sectors == 0 {
            buf_sectors
        } else {
            self.max_sectors.min(buf_sectors)
        };
        let mut p = sys::ublk_params {
            types: sys::UBLK_PARAM_TYPE_BASIC,
            basic: sys::ublk_param_basic {
                attrs: self.attrs.bits(),
                logical_bs_shift: self.logical_bs_shift,
                physical_bs_shift: self.physical_bs_shift.max(self.logical_bs_shift),
                io_opt_shift: self.io_opt_shift.max(self.logical_bs_shift),
                io_min_shift: self.io_min_shift.max(self.logical_bs_shift),
                max_sectors,
                chunk_sectors: 0,
                dev_sectors: (self.size / lbs) * lbs / 512,
                virt_boundary_mask: 0,
            },
            ..Default::default()
        };
        let mut len = offset_of!(sys::ublk_params, discard);
        if let Some(d) = self.discard {
            p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = sys::ublk_param_discard {
                discard_alignment: d.alignment,
                discard_granularity: d.granularity.max(lbs as u32),
                max_discard_sectors: d.max_discard_sectors,
                max_write_zeroes_sectors: d.max_write_zeroes_sectors,
                max_discard_segments: 1,
                reserved0: 0,
            };
            len = offset_of!(sys::ublk_params, devt);
        }
        p.len = len as u32;
        p
    }

    /// Reads back the kernel struct (GET_PARAMS).
    pub fn from_sys(p: &sys::ublk_params) -> Self {
        let b = &p.basic;
        let discard = (p.types & sys::UBLK_PARAM_TYPE_DISCARD != 0).then_some(DiscardParams {
            alignment: p.discard.discard_alignment,
            granularity: p.discard.discard_granularity,
            max_discard_sectors: p.discard.max_discard_sectors,
            max_write_zeroes_sectors: p.discard.max_write_zeroes_sectors,
        });
        DeviceParams {
            size: b.dev_sectors * 512,
            logical_bs_shift: b.logical_bs_shift,
            physical_bs_shift: b.physical_bs_shift,
            io_min_shift: b.io_min_shift,
            io_opt_shift: b.io_opt_shift,
            max_sectors: b.max_sectors,
            attrs: Attrs::from_bits_retain(b.attrs),
            discard,
        }
    }
}

/// Block device numbers read back with GET_PARAMS (`struct ublk_param_devt`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevNumbers {
    /// `/dev/ublkcN` major:minor.
    pub char_dev: (u32, u32),
    /// `/dev/ublkbN` major:minor.
    pub disk_dev: (u32, u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_params_roundtrip_and_len() {
        let p = DeviceParams {
            size: 1 << 30,
            attrs: Attrs::VOLATILE_CACHE | Attrs::FUA,
            ..Default::default()
        };
        let s = p.to_sys(512 << 10);
        assert_eq!(s.len, 8 + 32, "basic only");
        assert_eq!(s.basic.dev_sectors, 1 << 21);
        assert_eq!(s.basic.max_sectors, 1024);
        let back = DeviceParams::from_sys(&s);
        assert_eq!(back.size, p.size);
        assert_eq!(back.attrs, p.attrs);

        let d = DeviceParams {
            discard: Some(DiscardParams {
                alignment: 0,
                granularity: 4096,
                max_discard_sectors: 1 << 20,
                max_write_zeroes_sectors: 1 << 20,
            }),
            logical_bs_shift: 12,
            size: (1 << 20) + 100,
            ..p
        };
        let s = d.to_sys(512 << 10);
        assert_eq!(s.len, 8 + 32 + 20);
        assert_eq!(
            s.types,
            sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD
        );
        assert_eq!(s.discard.max_discard_segments, 1);
        assert_eq!(
            s.basic.dev_sectors,
            (1 << 20) / 512,
            "rounded down to 4k blocks"
        );
        assert_eq!(DeviceParams::from_sys(&s).discard, d.discard);
    }
}
