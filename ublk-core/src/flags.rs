//! Typed `UBLK_F_*` device flags, with the kernel release that introduced each one.

use bitflags::bitflags;
use ublk_sys as sys;

bitflags! {
    /// Device feature flags (`UBLK_F_*`), as passed to ADD_DEV and reported by GET_FEATURES.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct DeviceFlags: u64 {
        /// `UBLK_F_SUPPORT_ZERO_COPY`
        const SUPPORT_ZERO_COPY = sys::UBLK_F_SUPPORT_ZERO_COPY as u64;
        /// `UBLK_F_URING_CMD_COMP_IN_TASK` (always forced on by the kernel)
        const URING_CMD_COMP_IN_TASK = sys::UBLK_F_URING_CMD_COMP_IN_TASK as u64;
        /// `UBLK_F_NEED_GET_DATA`: WRITE data is fetched on demand with `UBLK_U_IO_NEED_GET_DATA`.
        const NEED_GET_DATA = sys::UBLK_F_NEED_GET_DATA as u64;
        /// `UBLK_F_USER_RECOVERY`: the device survives its daemon and can be re-attached.
        const USER_RECOVERY = sys::UBLK_F_USER_RECOVERY as u64;
        /// `UBLK_F_USER_RECOVERY_REISSUE`: requests in flight at a crash are reissued.
        const USER_RECOVERY_REISSUE = sys::UBLK_F_USER_RECOVERY_REISSUE as u64;
        /// `UBLK_F_UNPRIVILEGED_DEV`
        const UNPRIVILEGED_DEV = sys::UBLK_F_UNPRIVILEGED_DEV as u64;
        /// `UBLK_F_CMD_IOCTL_ENCODE`
        const CMD_IOCTL_ENCODE = sys::UBLK_F_CMD_IOCTL_ENCODE as u64;
        /// `UBLK_F_USER_COPY`: the server moves data with pread/pwrite on `/dev/ublkcN`.
        const USER_COPY = sys::UBLK_F_USER_COPY as u64;
        /// `UBLK_F_ZONED`
        const ZONED = sys::UBLK_F_ZONED as u64;
        /// `UBLK_F_USER_RECOVERY_FAIL_IO`: while no daemon is attached, IO fails instead of queueing.
        const USER_RECOVERY_FAIL_IO = sys::UBLK_F_USER_RECOVERY_FAIL_IO as u64;
        /// `UBLK_F_UPDATE_SIZE`
        const UPDATE_SIZE = sys::UBLK_F_UPDATE_SIZE as u64;
        /// `UBLK_F_AUTO_BUF_REG`
        const AUTO_BUF_REG = sys::UBLK_F_AUTO_BUF_REG as u64;
        /// `UBLK_F_QUIESCE`
        const QUIESCE = sys::UBLK_F_QUIESCE as u64;
        /// `UBLK_F_PER_IO_DAEMON`
        const PER_IO_DAEMON = sys::UBLK_F_PER_IO_DAEMON as u64;
        /// `UBLK_F_BUF_REG_OFF_DAEMON`
        const BUF_REG_OFF_DAEMON = sys::UBLK_F_BUF_REG_OFF_DAEMON as u64;
        /// `UBLK_F_BATCH_IO`
        const BATCH_IO = sys::UBLK_F_BATCH_IO as u64;
        /// `UBLK_F_INTEGRITY`
        const INTEGRITY = sys::UBLK_F_INTEGRITY as u64;
        /// `UBLK_F_SAFE_STOP_DEV`
        const SAFE_STOP_DEV = sys::UBLK_F_SAFE_STOP_DEV as u64;
        /// `UBLK_F_NO_AUTO_PART_SCAN`
        const NO_AUTO_PART_SCAN = sys::UBLK_F_NO_AUTO_PART_SCAN as u64;
        /// `UBLK_F_SHMEM_ZC`
        const SHMEM_ZC = sys::UBLK_F_SHMEM_ZC as u64;
        /// `UBLK_F_IO_DESC_SIZE`
        const IO_DESC_SIZE = sys::UBLK_F_IO_DESC_SIZE as u64;
        // Bits from kernels newer than the vendored header round-trip unchanged.
        const _ = !0;
    }
}

/// `(flag, name, first mainline release)`, in bit order.
const TIMELINE: &[(DeviceFlags, &str, &str)] = &[
    (DeviceFlags::SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY", "6.15"),
    (
        DeviceFlags::URING_CMD_COMP_IN_TASK,
        "URING_CMD_COMP_IN_TASK",
        "6.0",
    ),
    (DeviceFlags::NEED_GET_DATA, "NEED_GET_DATA", "6.0"),
    (DeviceFlags::USER_RECOVERY, "USER_RECOVERY", "6.1"),
    (
        DeviceFlags::USER_RECOVERY_REISSUE,
        "USER_RECOVERY_REISSUE",
        "6.1",
    ),
    (DeviceFlags::UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV", "6.3"),
    (DeviceFlags::CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE", "6.4"),
    (DeviceFlags::USER_COPY, "USER_COPY", "6.5"),
    (DeviceFlags::ZONED, "ZONED", "6.6"),
    (
        DeviceFlags::USER_RECOVERY_FAIL_IO,
        "USER_RECOVERY_FAIL_IO",
        "6.13",
    ),
    (DeviceFlags::UPDATE_SIZE, "UPDATE_SIZE", "6.16"),
    (DeviceFlags::AUTO_BUF_REG, "AUTO_BUF_REG", "6.16"),
    (DeviceFlags::QUIESCE, "QUIESCE", "6.16"),
    (DeviceFlags::PER_IO_DAEMON, "PER_IO_DAEMON", "6.16"),
    (
        DeviceFlags::BUF_REG_OFF_DAEMON,
        "BUF_REG_OFF_DAEMON",
        "6.17",
    ),
    (DeviceFlags::BATCH_IO, "BATCH_IO", "7.0"),
    (DeviceFlags::INTEGRITY, "INTEGRITY", "7.0"),
    (DeviceFlags::SAFE_STOP_DEV, "SAFE_STOP_DEV", "7.0"),
    (DeviceFlags::NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN", "7.0"),
    (DeviceFlags::SHMEM_ZC, "SHMEM_ZC", "7.1"),
    (DeviceFlags::IO_DESC_SIZE, "IO_DESC_SIZE", "7.3"),
];

impl DeviceFlags {
    /// The kernel name (without `UBLK_F_`) of a single flag, or `None` for an unknown bit.
    pub fn flag_name(self) -> Option<&'static str> {
        TIMELINE
            .iter()
            .find(|(f, _, _)| *f == self)
            .map(|(_, n, _)| *n)
    }

    /// The first mainline Linux release that has this single flag.
    pub fn since(self) -> Option<&'static str> {
        TIMELINE
            .iter()
            .find(|(f, _, _)| *f == self)
            .map(|(_, _, v)| *v)
    }

    /// Names of every set flag, unknown bits as `bitN`.
    pub fn names(self) -> Vec<String> {
        (0..64)
            .map(|bit| DeviceFlags::from_bits_retain(1 << bit))
            .filter(|f| self.contains(*f))
            .map(|f| match f.flag_name() {
                Some(n) => n.to_string(),
                None => format!("bit{}", f.bits().trailing_zeros()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_timeline_in_bit_order() {
        for (i, (f, _, _)) in TIMELINE.iter().enumerate() {
            assert_eq!(f.bits(), 1 << i, "entry {i}");
        }
    }

    #[test]
    fn test_names_and_unknown_bits() {
        let f = DeviceFlags::USER_COPY | DeviceFlags::from_bits_retain(1 << 40);
        assert_eq!(
            f.names(),
            vec!["USER_COPY".to_string(), "bit40".to_string()]
        );
        assert_eq!(DeviceFlags::USER_RECOVERY_FAIL_IO.since(), Some("6.13"));
        // 6.12's GET_FEATURES answer.
        assert_eq!(
            DeviceFlags::from_bits_retain(0x1fe).names().len(),
            8,
            "6.12 reports 8 features"
        );
    }
}
