//! Entry points into the per-io hot path for the criterion benchmarks (`benches/hot_path.rs`).
//! Not a stable API.

use crate::tags::{Cmd, Finish, Tags};
use crate::target::IoRequest;

/// Decodes a descriptor's raw fields, as the queue does for every request.
pub fn decode_desc(tag: u16, op_flags: u32, nr_sectors: u32, start_sector: u64) -> IoRequest {
    IoRequest::from_raw(tag, op_flags, nr_sectors, start_sector)
}

/// Builds a COMMIT_AND_FETCH SQE, returning its user_data.
pub fn build_commit_sqe(q_id: u16, tag: u16, result: i32, addr: u64) -> u64 {
    crate::queue::io_cmd_sqe(
        ublk_sys::UBLK_U_IO_COMMIT_AND_FETCH_REQ,
        q_id,
        tag,
        result,
        addr,
        None,
    )
    .get_user_data()
}

/// A queue's tag table, driven through one full request cycle per call.
#[derive(Debug)]
pub struct TagCycle(Tags);

impl TagCycle {
    /// `depth` tags.
    pub fn new(depth: u16) -> Self {
        TagCycle(Tags::new(depth))
    }

    /// FETCH completion → dispatch → one target operation → completion → commit.
    pub fn cycle(&mut self, tag: u16, req: IoRequest) -> i32 {
        let t = &mut self.0;
        t.on_cmd(tag, Cmd::Fetch, 0, false);
        t.begin(tag, req);
        t.op_submitted(tag);
        let r = match t.op_completed(tag) {
            None => match t.finish(tag, 4096) {
                Finish::Commit(r) => r,
                _ => -1,
            },
            _ => -1,
        };
        t.committed(tag, true);
        r
    }
}
