//! The per-tag state machine of a queue, kept free of io so it can be tested on its own.
//!
//! ```text
//!            FETCH / COMMIT_AND_FETCH parked in the kernel
//!   ┌──────────────► Fetching ──res 1 (NEED_GET_DATA)──► GettingData
//!   │                   │ res 0                              │ res 0
//!   │                   ▼                                    │
//!   └──── commit ─── InTarget ◄──────────────────────────────┘
//!                  (ops in flight: commit deferred until they finish)
//!   any command completing with ABORT (-ENODEV) or an error ──► Dead
//! ```

use crate::target::IoRequest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TagState {
    /// A FETCH or COMMIT_AND_FETCH command is parked in the kernel.
    Fetching,
    /// A NEED_GET_DATA command is in flight.
    GettingData,
    /// The target owns the request.
    InTarget,
    /// Aborted: the tag is never used again.
    Dead,
}

/// Which io command completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    /// FETCH_REQ or COMMIT_AND_FETCH_REQ.
    Fetch,
    /// NEED_GET_DATA.
    GetData,
}

/// What to do after an io command completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmdOutcome {
    /// A request is in the descriptor: hand it to the target.
    Dispatch,
    /// Issue NEED_GET_DATA for this tag.
    GetData,
    /// The command was cancelled (`UBLK_IO_RES_ABORT`): the tag is dead.
    Aborted,
    /// The command failed with this errno: the tag is dead.
    Failed(i32),
    /// A completion the state does not allow (ignored).
    Unexpected(TagState),
}

/// What to do when the target finishes a request or one of its operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Commit the request with this result now.
    Commit(i32),
    /// Operations still point into the buffer: the commit waits for them.
    Deferred,
    /// The tag is not with the target, or already completed (ignored).
    Invalid,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: TagState,
    ops: u32,
    deferred: Option<i32>,
    req: IoRequest,
}

/// The tags of one queue.
#[derive(Debug)]
pub(crate) struct Tags {
    slots: Vec<Slot>,
}

impl Tags {
    /// `depth` tags, all with a FETCH about to be submitted.
    pub(crate) fn new(depth: u16) -> Tags {
        let slot = Slot {
            state: TagState::Fetching,
            ops: 0,
            deferred: None,
            req: IoRequest::from_raw(0, 0, 0, 0),
        };
        Tags {
            slots: vec![slot; usize::from(depth)],
        }
    }

    fn slot(&mut self, tag: u16) -> Option<&mut Slot> {
        self.slots.get_mut(usize::from(tag))
    }

    /// Whether any tag can still see a completion.
    pub(crate) fn live(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.state != TagState::Dead || s.ops != 0)
    }

    /// Whether every tag not yet aborted has only its command parked in the kernel: nothing
    /// of the server's is in flight.
    pub(crate) fn only_parked(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.state == TagState::Dead || (s.state == TagState::Fetching && s.ops == 0))
    }

    /// The request `tag` currently holds.
    pub(crate) fn req(&self, tag: u16) -> Option<&IoRequest> {
        self.slots.get(usize::from(tag)).map(|s| &s.req)
    }

    /// Whether the target owns `tag` and may use its buffer (`idle`: with no operation in flight).
    pub(crate) fn owned_by_target(&self, tag: u16, idle: bool) -> bool {
        self.slots.get(usize::from(tag)).is_some_and(|s| {
            s.state == TagState::InTarget && s.deferred.is_none() && (!idle || s.ops == 0)
        })
    }

    /// An io command of `tag` completed with `res`.
    pub(crate) fn on_cmd(
        &mut self,
        tag: u16,
        cmd: Cmd,
        res: i32,
        need_get_data: bool,
    ) -> CmdOutcome {
        let Some(s) = self.slot(tag) else {
            return CmdOutcome::Unexpected(TagState::Dead);
        };
        let expect = match cmd {
            Cmd::Fetch => TagState::Fetching,
            Cmd::GetData => TagState::GettingData,
        };
        if s.state != expect {
            return CmdOutcome::Unexpected(s.state);
        }
        match res {
            0 => CmdOutcome::Dispatch,
            1 if cmd == Cmd::Fetch && need_get_data => {
                s.state = TagState::GettingData;
                CmdOutcome::GetData
            }
            r if r == -libc::ENODEV => {
                s.state = TagState::Dead;
                CmdOutcome::Aborted
            }
            r => {
                s.state = TagState::Dead;
                CmdOutcome::Failed(if r < 0 { -r } else { libc::EPROTO })
            }
        }
    }

    /// The request of `tag` goes to the target.
    pub(crate) fn begin(&mut self, tag: u16, req: IoRequest) {
        if let Some(s) = self.slot(tag) {
            *s = Slot {
                state: TagState::InTarget,
                ops: 0,
                deferred: None,
                req,
            };
        }
    }

    /// The target submitted an operation for `tag`.
    pub(crate) fn op_submitted(&mut self, tag: u16) {
        if let Some(s) = self.slot(tag) {
            s.ops += 1;
        }
    }

    /// An operation of `tag` completed. `Some(Finish::Commit)` when a deferred result can now
    /// be committed, `Some(Finish::Deferred)` while others remain, `None` when the target
    /// should see the completion, `Some(Finish::Invalid)` for a stray one.
    pub(crate) fn op_completed(&mut self, tag: u16) -> Option<Finish> {
        let Some(s) = self.slot(tag) else {
            return Some(Finish::Invalid);
        };
        if s.state != TagState::InTarget || s.ops == 0 {
            return Some(Finish::Invalid);
        }
        s.ops -= 1;
        match s.deferred {
            Some(res) if s.ops == 0 => {
                s.deferred = None;
                Some(Finish::Commit(res))
            }
            Some(_) => Some(Finish::Deferred),
            None => None,
        }
    }

    /// The target completed `tag` with `res`.
    pub(crate) fn finish(&mut self, tag: u16, res: i32) -> Finish {
        let Some(s) = self.slot(tag) else {
            return Finish::Invalid;
        };
        if s.state != TagState::InTarget || s.deferred.is_some() {
            return Finish::Invalid;
        }
        if s.ops > 0 {
            s.deferred = Some(res);
            return Finish::Deferred;
        }
        Finish::Commit(res)
    }

    /// A COMMIT_AND_FETCH for `tag` was submitted (`ok`) or could not be (`!ok`: dead).
    pub(crate) fn committed(&mut self, tag: u16, ok: bool) {
        if let Some(s) = self.slot(tag) {
            s.state = if ok {
                TagState::Fetching
            } else {
                TagState::Dead
            };
        }
    }

    /// Every tag the kernel holds is dead (batch io commands: no fetch will deliver them any
    /// more).
    pub(crate) fn kill_fetching(&mut self) {
        for s in &mut self.slots {
            if s.state == TagState::Fetching {
                s.state = TagState::Dead;
            }
        }
    }

    /// A command for `tag` could not be submitted: it will never complete.
    pub(crate) fn kill(&mut self, tag: u16) {
        if let Some(s) = self.slot(tag) {
            s.state = TagState::Dead;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(tag: u16) -> IoRequest {
        IoRequest::from_raw(tag, 1, 8, 0)
    }

    #[test]
    fn test_fetch_dispatch_commit_cycle() {
        let mut t = Tags::new(2);
        assert!(t.live());
        assert_eq!(t.on_cmd(0, Cmd::Fetch, 0, false), CmdOutcome::Dispatch);
        t.begin(0, req(0));
        assert!(t.owned_by_target(0, true));
        assert_eq!(t.finish(0, 4096), Finish::Commit(4096));
        t.committed(0, true);
        assert!(!t.owned_by_target(0, false));
        // A second completion of the same request is refused.
        assert_eq!(t.finish(0, 4096), Finish::Invalid);
    }

    #[test]
    fn test_need_get_data_only_when_enabled() {
        let mut t = Tags::new(1);
        assert_eq!(t.on_cmd(0, Cmd::Fetch, 1, true), CmdOutcome::GetData);
        // A fetch completion while getting data is unexpected.
        assert_eq!(
            t.on_cmd(0, Cmd::Fetch, 0, true),
            CmdOutcome::Unexpected(TagState::GettingData)
        );
        assert_eq!(t.on_cmd(0, Cmd::GetData, 0, true), CmdOutcome::Dispatch);

        let mut t = Tags::new(1);
        assert_eq!(
            t.on_cmd(0, Cmd::Fetch, 1, false),
            CmdOutcome::Failed(libc::EPROTO)
        );
        assert!(!t.live());
    }

    #[test]
    fn test_commit_waits_for_operations() {
        let mut t = Tags::new(1);
        t.on_cmd(0, Cmd::Fetch, 0, false);
        t.begin(0, req(0));
        t.op_submitted(0);
        t.op_submitted(0);
        assert!(
            !t.owned_by_target(0, true),
            "buffer busy while ops are in flight"
        );
        assert_eq!(t.op_completed(0), None, "target sees the first completion");
        assert_eq!(t.finish(0, -libc::EIO), Finish::Deferred);
        assert_eq!(t.finish(0, 0), Finish::Invalid, "no second result");
        assert_eq!(t.op_completed(0), Some(Finish::Commit(-libc::EIO)));
        assert_eq!(t.op_completed(0), Some(Finish::Invalid), "stray completion");
    }

    #[test]
    fn test_abort_ends_queue() {
        let mut t = Tags::new(3);
        for tag in 0..3 {
            assert_eq!(
                t.on_cmd(tag, Cmd::Fetch, -libc::ENODEV, false),
                CmdOutcome::Aborted
            );
        }
        assert!(!t.live());
        assert_eq!(
            t.on_cmd(1, Cmd::Fetch, 0, false),
            CmdOutcome::Unexpected(TagState::Dead)
        );
        assert_eq!(
            t.on_cmd(7, Cmd::Fetch, 0, false),
            CmdOutcome::Unexpected(TagState::Dead)
        );
    }

    #[test]
    fn test_queue_stays_live_while_ops_run_on_dead_tag() {
        let mut t = Tags::new(1);
        t.on_cmd(0, Cmd::Fetch, 0, false);
        t.begin(0, req(0));
        t.op_submitted(0);
        assert_eq!(t.finish(0, 0), Finish::Deferred);
        assert!(t.live());
        assert_eq!(t.op_completed(0), Some(Finish::Commit(0)));
        t.committed(0, false);
        assert!(!t.live());
    }
}
