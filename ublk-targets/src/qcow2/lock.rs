//! Image locking, compatible with qemu's (`block/file-posix.c`), so that qemu, qemu-img,
//! qemu-nbd and our devices never write one image at the same time, nor read one that another
//! program writes.
//!
//! qemu takes shared open-file-description locks (`F_OFD_SETLK`, released when the file is
//! closed, also by a crash) on single bytes of the image file: byte 100 + *i* says "I use
//! permission *i*", byte 200 + *i* says "I do not let others have permission *i*", where the
//! permissions are qemu's `BLK_PERM_*` bits (0 consistent read, 1 write, 2 write unchanged,
//! 3 resize). After taking its bytes, an opener tests (`F_OFD_GETLK`) the bytes of the
//! permissions it wants against others' "not shared" bytes, and the bytes of the permissions
//! it does not share against others' "uses" bytes.
//!
//! A writable image uses read, write and resize and shares neither write nor resize; a
//! read-only image or a backing file uses read and does not share write or resize, like
//! qemu's own defaults (`qemu-img info` on an image in use fails the same way, and a base image
//! can back several overlays at once).

use super::error::{Qcow2Error, Result};
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;
use std::path::Path;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const RESIZE: u8 = 1 << 3;
const NAMES: [&str; 4] = ["read", "write", "write unchanged", "resize"];

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes the locks of an image opened `writable` (or a backing file: not writable) and checks
/// that no other program's locks conflict. A file system without OFD locks is used unlocked,
/// with a warning, as qemu does.
pub(super) fn lock(file: &File, path: &Path, writable: bool) -> Result<()> {
    let (used, unshared) = if writable {
        (READ | WRITE | RESIZE, WRITE | RESIZE)
    } else {
        (READ, WRITE | RESIZE)
    };
    for i in 0..4u8 {
        for (set, base) in [(used, PERM_BASE), (unshared, SHARED_BASE)] {
            if set & (1 << i) == 0 {
                continue;
            }
            let l = flock(libc::F_RDLCK, base + i64::from(i));
            if let Err(e) = fcntl(file, FcntlArg::F_OFD_SETLK(&l)) {
                if matches!(e, nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) {
                    return Err(in_use(path, writable));
                }
                log::warn!(
                    "{}: not locking the image (the file system refuses OFD locks: {e})",
                    path.display()
                );
                return Ok(());
            }
        }
    }
    for i in 0..4u8 {
        let bit = 1 << i;
        // Someone refuses to share what we use, or uses what we do not share.
        let conflict = (used & bit != 0 && held_by_other(file, SHARED_BASE + i64::from(i))?)
            || (unshared & bit != 0 && held_by_other(file, PERM_BASE + i64::from(i))?);
        if conflict {
            log::debug!(
                "{}: lock conflict on {}",
                path.display(),
                NAMES[usize::from(i)]
            );
            return Err(in_use(path, writable));
        }
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> Result<bool> {
    let mut l = flock(libc::F_WRLCK, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut l)).map_err(|e| Qcow2Error::Io {
        context: "testing the image's locks",
        source: std::io::Error::from(e),
    })?;
    Ok(i32::from(l.l_type) != libc::F_UNLCK)
}

fn in_use(path: &Path, writable: bool) -> Qcow2Error {
    Qcow2Error::Locked {
        path: path.to_path_buf(),
        why: if writable {
            "another program (qemu, qemu-nbd, qemu-img, another ublk device) has it open"
        } else {
            "another program (qemu, qemu-nbd, another ublk device) has it open for writing"
        },
    }
}
