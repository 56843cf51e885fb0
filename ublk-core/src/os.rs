//! Thin wrappers over the few OS calls the std library lacks: mmap, prctl, CPU affinity,
//! signal masks and eventfd.
//!
//! # Safety
//!
//! This module owns every raw libc call of the crate outside io_uring submission. Each wrapper is
//! safe: arguments are validated or built here, return values are checked, and [`Mmap`] owns its
//! mapping (unmapped exactly once, on drop). Pointers handed out by [`Mmap::as_ptr`] stay valid
//! for the life of the `Mmap`; what may be read or written through them is the caller's contract
//! (see `desc` and `buf`).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::time::Duration;

/// An owned memory mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; sharing the pointer across threads is
// governed by the users' own contracts (read-only descriptors, per-tag buffers).
unsafe impl Send for Mmap {}
// SAFETY: as above; `Mmap` itself exposes only raw pointers.
unsafe impl Sync for Mmap {}

impl Mmap {
    /// Maps `len` bytes of `file` at `offset`, read-only and shared (the ublk descriptor array).
    pub(crate) fn map_readonly(file: &File, offset: u64, len: usize) -> io::Result<Mmap> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); fd is valid for the call;
        // the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                off,
            )
        };
        Self::from_raw(p, len)
    }

    /// Maps `len` bytes of zeroed, private, page-aligned anonymous memory (io buffers).
    pub(crate) fn anonymous(len: usize) -> io::Result<Mmap> {
        // SAFETY: anonymous private mapping at a kernel-chosen address; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        Self::from_raw(p, len)
    }

    /// Maps the first `len` bytes of `file` shared, readable and (if `writable`) writable,
    /// without reserving swap: a file's pages, reached only by the kernel's copies
    /// ([`map_io`]), never through references.
    pub(crate) fn map_shared(file: &File, len: usize, writable: bool) -> io::Result<Mmap> {
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); fd is valid for the call;
        // the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        Self::from_raw(p, len)
    }

    fn from_raw(p: *mut libc::c_void, len: usize) -> io::Result<Mmap> {
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
        Ok(Mmap { ptr, len })
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a mapping this value created and nobody else unmaps.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Which way [`map_io`] copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MapDir {
    /// `pread(fd, map + off, len, pos)`: from `fd` into the mapping.
    FromFd,
    /// `pwrite(fd, map + off, len, pos)`: from the mapping into `fd`.
    ToFd,
}

/// One `pread` or `pwrite` of `fd` at `pos` with `[off, off + len)` of `map` as the buffer: the
/// kernel copies straight between `fd` and the mapping. Returns the bytes copied; a range
/// outside the mapping is `EINVAL`.
pub(crate) fn map_io(
    fd: &File,
    dir: MapDir,
    map: &Mmap,
    off: usize,
    len: usize,
    pos: u64,
) -> io::Result<usize> {
    let p = map_range(map, off, len)?;
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let r = match dir {
        // SAFETY: [p, p + len) lies inside a live mapping (checked above) that no Rust
        // reference points into; the kernel writes it (or fails with EFAULT), nothing else is
        // touched.
        MapDir::FromFd => unsafe { libc::pread(fd.as_raw_fd(), p.cast(), len, pos) },
        // SAFETY: [p, p + len) lies inside a live mapping (checked above); the kernel only
        // reads it.
        MapDir::ToFd => unsafe { libc::pwrite(fd.as_raw_fd(), p.cast(), len, pos) },
    };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// The address of `[off, off + len)` of `map`, if inside it.
fn map_range(map: &Mmap, off: usize, len: usize) -> io::Result<*mut u8> {
    match off.checked_add(len) {
        Some(end) if end <= map.len => {
            // SAFETY: off <= end <= len of the mapping, so the result is inside it or one
            // past its end (for an empty range).
            Ok(unsafe { map.as_ptr().add(off) })
        }
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// The system page size.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}

/// Marks the calling thread as an IO flusher (`PR_SET_IO_FLUSHER`, 1), so memory reclaim during
/// writeback to our own device cannot deadlock it.
pub(crate) fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread in the SCHED_BATCH policy.
pub(crate) fn set_sched_batch() -> io::Result<()> {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `p` is a valid sched_param.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpus`.
pub(crate) fn set_thread_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; an all-zero value is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c < libc::CPU_SETSIZE as usize {
            // SAFETY: c is below CPU_SETSIZE, so the bit is inside `set`.
            unsafe { libc::CPU_SET(c, &mut set) };
        }
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on.
pub(crate) fn thread_affinity() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; an all-zero value is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `set` is a writable cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: c is below CPU_SETSIZE, so the bit is inside `set`.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// The calling thread's kernel task id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// A set of signals blocked in the calling thread (and inherited by threads it spawns), so that
/// they are only ever received through [`SignalSet::wait`].
#[derive(Debug, Clone, Copy)]
pub struct SignalSet {
    set: libc::sigset_t,
}

impl SignalSet {
    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread. Call it before spawning threads.
    pub fn block_termination() -> io::Result<SignalSet> {
        // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t for each call.
        unsafe {
            libc::sigemptyset(&mut set);
        }
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: as above; valid signal numbers.
            unsafe {
                libc::sigaddset(&mut set, sig);
            }
        }
        // SAFETY: valid set pointer; NULL old-set is allowed.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(SignalSet { set })
    }

    /// Waits up to `timeout` for one of the blocked signals; returns its number.
    pub fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: valid set and timespec pointers; NULL siginfo is allowed.
        let r = unsafe { libc::sigtimedwait(&self.set, std::ptr::null_mut(), &ts) };
        (r > 0).then_some(r)
    }
}

/// Creates a non-blocking, close-on-exec eventfd.
pub(crate) fn eventfd() -> io::Result<File> {
    // SAFETY: eventfd with flags only; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    fn temp_file(name: &str, content: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("ublk-os-{}-{name}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all_at(content, 0).unwrap();
        (path, f)
    }

    /// A thread pinned to one CPU reads that CPU back as its only allowed one.
    #[test]
    fn thread_affinity_reads_back_what_was_set() {
        std::thread::spawn(|| {
            let all = thread_affinity().unwrap();
            assert!(!all.is_empty());
            let last = *all.last().unwrap();
            set_thread_affinity(&[last]).unwrap();
            assert_eq!(thread_affinity().unwrap(), [last]);
        })
        .join()
        .unwrap();
    }

    /// Both directions of `map_io` move bytes between a file and a shared mapping of another,
    /// at the right offsets; ranges outside the mapping are refused before any system call.
    #[test]
    fn map_io_copies_both_ways_and_checks_ranges() {
        let (p1, mapped) = temp_file("mapped", &[0u8; 8192]);
        let (p2, other) = temp_file("other", &[7u8; 4096]);
        let map = Mmap::map_shared(&mapped, 8192, true).unwrap();

        // From `other` (bytes 100..1100) into the mapping at 4000: lands in `mapped`'s pages.
        assert_eq!(
            map_io(&other, MapDir::FromFd, &map, 4000, 1000, 100).unwrap(),
            1000
        );
        let mut back = vec![0u8; 1200];
        mapped.read_exact_at(&mut back, 3900).unwrap();
        assert!(back[..100].iter().all(|&b| b == 0));
        assert!(back[100..1100].iter().all(|&b| b == 7));
        assert!(back[1100..].iter().all(|&b| b == 0));

        // From the mapping (its bytes 4000..4500, now 7s) into `other` at 3000.
        other.write_all_at(&[1u8; 1096], 3000).unwrap();
        assert_eq!(
            map_io(&other, MapDir::ToFd, &map, 4000, 500, 3000).unwrap(),
            500
        );
        let mut o = vec![0u8; 1096];
        other.read_exact_at(&mut o, 3000).unwrap();
        assert!(o[..500].iter().all(|&b| b == 7));
        assert!(o[500..].iter().all(|&b| b == 1));

        for (off, len) in [(8000, 193), (8193, 0), (usize::MAX, 2)] {
            let e = map_io(&other, MapDir::FromFd, &map, off, len, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{off}+{len}");
        }
        let e = map_io(&other, MapDir::ToFd, &map, 0, 1, u64::MAX).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
        drop(map);
        let _ = std::fs::remove_file(p1);
        let _ = std::fs::remove_file(p2);
    }
}
