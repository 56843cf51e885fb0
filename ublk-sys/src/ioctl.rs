//! The ioctl-encoded opcodes of the ublk control and io commands.
//!
//! The kernel defines them with `_IOR('u', nr, struct)` / `_IOWR('u', nr, struct)`; bindgen cannot
//! expand those macros, so they are computed here with the same encoding (asm-generic/ioctl.h:
//! `dir << 30 | size << 16 | type << 8 | nr`) and pinned by tests against the kernel's numbers.

use crate::{ublk_batch_io, ublksrv_ctrl_cmd, ublksrv_io_cmd};

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` from asm-generic/ioctl.h.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}
const fn ior<T>(nr: u8) -> u32 {
    ioc(IOC_READ, b'u', nr, core::mem::size_of::<T>())
}
const fn iowr<T>(nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, b'u', nr, core::mem::size_of::<T>())
}

macro_rules! opcodes {
    ($($(#[$m:meta])* $name:ident = $how:ident<$ty:ty>($nr:expr);)*) => {
        $($(#[$m])* pub const $name: u32 = $how::<$ty>($nr);)*
    };
}

opcodes! {
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_GET_QUEUE_AFFINITY = ior<ublksrv_ctrl_cmd>(0x01);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_GET_DEV_INFO = ior<ublksrv_ctrl_cmd>(0x02);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_ADD_DEV = iowr<ublksrv_ctrl_cmd>(0x04);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_DEL_DEV = iowr<ublksrv_ctrl_cmd>(0x05);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_START_DEV = iowr<ublksrv_ctrl_cmd>(0x06);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_STOP_DEV = iowr<ublksrv_ctrl_cmd>(0x07);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_SET_PARAMS = iowr<ublksrv_ctrl_cmd>(0x08);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_CMD_GET_PARAMS = ior<ublksrv_ctrl_cmd>(0x09);
    /// Linux 6.1 (ioctl encoding 6.4).
    UBLK_U_CMD_START_USER_RECOVERY = iowr<ublksrv_ctrl_cmd>(0x10);
    /// Linux 6.1 (ioctl encoding 6.4).
    UBLK_U_CMD_END_USER_RECOVERY = iowr<ublksrv_ctrl_cmd>(0x11);
    /// Linux 6.3 (ioctl encoding 6.4).
    UBLK_U_CMD_GET_DEV_INFO2 = ior<ublksrv_ctrl_cmd>(0x12);
    /// Linux 6.5.
    UBLK_U_CMD_GET_FEATURES = ior<ublksrv_ctrl_cmd>(0x13);
    /// Linux 6.9. Note `_IOR`, unlike DEL_DEV.
    UBLK_U_CMD_DEL_DEV_ASYNC = ior<ublksrv_ctrl_cmd>(0x14);
    /// Linux 6.16.
    UBLK_U_CMD_UPDATE_SIZE = iowr<ublksrv_ctrl_cmd>(0x15);
    /// Linux 6.16.
    UBLK_U_CMD_QUIESCE_DEV = iowr<ublksrv_ctrl_cmd>(0x16);
    /// Linux 7.0.
    UBLK_U_CMD_TRY_STOP_DEV = iowr<ublksrv_ctrl_cmd>(0x17);
    /// Linux 7.1.
    UBLK_U_CMD_REG_BUF = iowr<ublksrv_ctrl_cmd>(0x18);
    /// Linux 7.1.
    UBLK_U_CMD_UNREG_BUF = iowr<ublksrv_ctrl_cmd>(0x19);

    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_IO_FETCH_REQ = iowr<ublksrv_io_cmd>(0x20);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_IO_COMMIT_AND_FETCH_REQ = iowr<ublksrv_io_cmd>(0x21);
    /// Linux 6.0 (ioctl encoding 6.4).
    UBLK_U_IO_NEED_GET_DATA = iowr<ublksrv_io_cmd>(0x22);
    /// Linux 6.15.
    UBLK_U_IO_REGISTER_IO_BUF = iowr<ublksrv_io_cmd>(0x23);
    /// Linux 6.15.
    UBLK_U_IO_UNREGISTER_IO_BUF = iowr<ublksrv_io_cmd>(0x24);
    /// Linux 7.0.
    UBLK_U_IO_PREP_IO_CMDS = iowr<ublk_batch_io>(0x25);
    /// Linux 7.0.
    UBLK_U_IO_COMMIT_IO_CMDS = iowr<ublk_batch_io>(0x26);
    /// Linux 7.0.
    UBLK_U_IO_FETCH_IO_CMDS = iowr<ublk_batch_io>(0x27);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value as the kernel computes it (checked against the 6.12 and 7.3 driver binaries).
    #[test]
    fn test_opcodes_match_kernel() {
        let expect: &[(u32, u32)] = &[
            (UBLK_U_CMD_GET_QUEUE_AFFINITY, 0x8020_7501),
            (UBLK_U_CMD_GET_DEV_INFO, 0x8020_7502),
            (UBLK_U_CMD_ADD_DEV, 0xc020_7504),
            (UBLK_U_CMD_DEL_DEV, 0xc020_7505),
            (UBLK_U_CMD_START_DEV, 0xc020_7506),
            (UBLK_U_CMD_STOP_DEV, 0xc020_7507),
            (UBLK_U_CMD_SET_PARAMS, 0xc020_7508),
            (UBLK_U_CMD_GET_PARAMS, 0x8020_7509),
            (UBLK_U_CMD_START_USER_RECOVERY, 0xc020_7510),
            (UBLK_U_CMD_END_USER_RECOVERY, 0xc020_7511),
            (UBLK_U_CMD_GET_DEV_INFO2, 0x8020_7512),
            (UBLK_U_CMD_GET_FEATURES, 0x8020_7513),
            (UBLK_U_CMD_DEL_DEV_ASYNC, 0x8020_7514),
            (UBLK_U_CMD_UPDATE_SIZE, 0xc020_7515),
            (UBLK_U_CMD_QUIESCE_DEV, 0xc020_7516),
            (UBLK_U_CMD_TRY_STOP_DEV, 0xc020_7517),
            (UBLK_U_CMD_REG_BUF, 0xc020_7518),
            (UBLK_U_CMD_UNREG_BUF, 0xc020_7519),
            (UBLK_U_IO_FETCH_REQ, 0xc010_7520),
            (UBLK_U_IO_COMMIT_AND_FETCH_REQ, 0xc010_7521),
            (UBLK_U_IO_NEED_GET_DATA, 0xc010_7522),
            (UBLK_U_IO_REGISTER_IO_BUF, 0xc010_7523),
            (UBLK_U_IO_UNREGISTER_IO_BUF, 0xc010_7524),
            (UBLK_U_IO_PREP_IO_CMDS, 0xc010_7525),
            (UBLK_U_IO_COMMIT_IO_CMDS, 0xc010_7526),
            (UBLK_U_IO_FETCH_IO_CMDS, 0xc010_7527),
        ];
        for (i, &(got, want)) in expect.iter().enumerate() {
            assert_eq!(got, want, "opcode #{i}: {got:#x} != {want:#x}");
        }
    }

    #[test]
    fn test_nr_matches_legacy_constants() {
        assert_eq!(UBLK_U_IO_FETCH_REQ & 0xff, crate::UBLK_IO_FETCH_REQ);
        assert_eq!(
            UBLK_U_IO_COMMIT_AND_FETCH_REQ & 0xff,
            crate::UBLK_IO_COMMIT_AND_FETCH_REQ
        );
        assert_eq!(UBLK_U_IO_NEED_GET_DATA & 0xff, crate::UBLK_IO_NEED_GET_DATA);
        assert_eq!(UBLK_U_CMD_ADD_DEV & 0xff, crate::UBLK_CMD_ADD_DEV);
        assert_eq!(
            UBLK_U_CMD_GET_DEV_INFO2 & 0xff,
            crate::UBLK_CMD_GET_DEV_INFO2
        );
    }
}
