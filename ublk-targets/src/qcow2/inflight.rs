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

//!
//! The counters are per thread slot (each on a cache line of its own), so queue threads
//! registering their requests do not write one shared line per request; draining sums the
//! slots. That sum is not one atomic read, and needs not be: an operation counted in epoch `e`
//! incremented its slot before the epoch left `e` (it checked the epoch after incrementing),
//! and the check that moves the epoch from `e + 1` to `e + 2` reads every slot after that.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

/// Thread slots: threads beyond this many share slots (correct, only less spread).
const SLOTS: usize = 16;

/// One slot's counters for the two epochs in play, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot([AtomicU64; 2]);

/// The calling thread's slot.
fn my_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, SeqCst) % SLOTS;
    }
    SLOT.with(|s| *s)
}

/// Epoch counters of one image.
#[derive(Debug, Default)]
pub struct Inflight {
    epoch: AtomicU64,
    slots: [Slot; SLOTS],
}

/// A registration: the epoch (shifted) and the slot counted in.
const SLOT_BITS: u32 = 8;

impl Inflight {
    /// Registers an operation in the current epoch; returns the token for [`Self::end`].
    pub fn begin(&self) -> u64 {
        let slot = &self.slots[my_slot()];
        loop {
            let e = self.epoch.load(SeqCst);
            slot.0[(e & 1) as usize].fetch_add(1, SeqCst);
            // The epoch may have moved between the load and the increment: then the count
            // belongs to an epoch whose drain check might already have passed. Retry.
            if self.epoch.load(SeqCst) == e {
                return (e << SLOT_BITS) | my_slot() as u64;
            }
            slot.0[(e & 1) as usize].fetch_sub(1, SeqCst);
        }
    }

    /// Deregisters an operation registered by [`Self::begin`] (its token).
    pub fn end(&self, token: u64) {
        let (e, slot) = (
            token >> SLOT_BITS,
            (token & ((1 << SLOT_BITS) - 1)) as usize,
        );
        self.slots[slot % SLOTS].0[(e & 1) as usize].fetch_sub(1, SeqCst);
    }

    /// The current epoch (read after an unlink: the cluster may be freed at `epoch + 2`).
    pub fn current(&self) -> u64 {
        self.epoch.load(SeqCst)
    }

    /// Moves to the next epoch if every operation of the previous one has ended; returns the
    /// (possibly new) current epoch.
    pub fn try_advance(&self) -> u64 {
        let e = self.epoch.load(SeqCst);
        // Operations of epoch e - 1 share the counters of e + 1.
        let i = ((e + 1) & 1) as usize;
        if self.slots.iter().all(|s| s.0[i].load(SeqCst) == 0) {
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
            token: self.begin(),
        }
    }
}

/// Ends a synchronous operation's registration when dropped.
#[derive(Debug)]
pub struct InflightGuard<'a> {
    inflight: &'a Inflight,
    token: u64,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.inflight.end(self.token);
    }
}
