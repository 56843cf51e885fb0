//! Grace periods for host clusters: a freed cluster is not handed out again while a data
//! operation that may have looked up its old mapping is still running.
//!
//! Guest reads and in-place writes look a mapping up (L1/L2, under short locks) and then do
//! their data IO outside any lock — synchronously, or as io_uring operations that complete
//! later. Meanwhile a discard or write-zeroes on another queue may unlink the cluster, a flush
//! may drop its refcount to zero, and an allocation may reuse it for other data or metadata.
//! A late write into the reused cluster would corrupt it, a late read would return another
//! cluster's data.
//!
//! Every such operation therefore runs inside an *epoch*: [`Inflight::begin`] registers it in
//! the current epoch before the lookup, [`Inflight::end`] deregisters it when its IO finished.
//! A cluster unlinked while the epoch was `e` is only freed once the epoch reached `e + 2`:
//! moving from `e + 1` to `e + 2` requires every operation registered in `e` to have ended, and
//! operations registered in a later epoch looked the mapping up after the unlink. Epochs only
//! advance when the operations of the previous one have drained ([`Inflight::try_advance`]),
//! never by waiting, so a queue thread that holds operations of its own can never deadlock
//! against itself.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Epoch counters of one image.
#[derive(Debug, Default)]
pub struct Inflight {
    epoch: AtomicU64,
    counts: [AtomicU64; 2],
}

impl Inflight {
    /// Registers an operation in the current epoch; returns the epoch for [`Self::end`].
    pub fn begin(&self) -> u64 {
        loop {
            let e = self.epoch.load(SeqCst);
            self.counts[(e & 1) as usize].fetch_add(1, SeqCst);
            // The epoch may have moved between the load and the increment: then the count
            // belongs to an epoch whose drain check might already have passed. Retry.
            if self.epoch.load(SeqCst) == e {
                return e;
            }
            self.counts[(e & 1) as usize].fetch_sub(1, SeqCst);
        }
    }

    /// Deregisters an operation registered by [`Self::begin`] in epoch `e`.
    pub fn end(&self, e: u64) {
        self.counts[(e & 1) as usize].fetch_sub(1, SeqCst);
    }

    /// The current epoch (read after an unlink: the cluster may be freed at `epoch + 2`).
    pub fn current(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Moves to the next epoch if every operation of the previous one has ended; returns the
    /// (possibly new) current epoch.
    pub fn try_advance(&self) -> u64 {
        let e = self.epoch.load(SeqCst);
        // Operations of epoch e - 1 share the counter of e + 1.
        if self.counts[((e + 1) & 1) as usize].load(SeqCst) == 0 {
            // A concurrent advance wins the race harmlessly.
            let _ = self.epoch.compare_exchange(e, e + 1, SeqCst, SeqCst);
        }
        self.epoch.load(SeqCst)
    }

    /// Whether a cluster unlinked in epoch `unlinked` may be freed now.
    pub fn is_quiescent(&self, unlinked: u64) -> bool {
        self.current() >= unlinked + 2
    }

    /// A guard that ends the operation when dropped (for synchronous IO).
    pub fn guard(&self) -> InflightGuard<'_> {
        InflightGuard {
            inflight: self,
            epoch: self.begin(),
        }
    }
}

/// Ends a synchronous operation's registration when dropped.
#[derive(Debug)]
pub struct InflightGuard<'a> {
    inflight: &'a Inflight,
    epoch: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.inflight.end(self.epoch);
    }
}
