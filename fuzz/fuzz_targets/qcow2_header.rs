//! The qcow2 header parser and validator on arbitrary bytes: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ublk_targets::qcow2::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        let _ = h.validate(data.len() as u64, false);
        let _ = h.validate(u64::MAX / 2, true);
    }
});
