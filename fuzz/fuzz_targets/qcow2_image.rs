//! Opening and reading an arbitrary file as a qcow2 image: errors, never panics, bounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Write;
use ublk_targets::qcow2::{Qcow2Image, Qcow2Options};

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("ublk-fuzz-{}.qcow2", std::process::id()));
    let Ok(mut f) = std::fs::File::create(&path) else { return };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    let opts = Qcow2Options { writable: false, l2_cache_bytes: 64 << 10, ..Qcow2Options::default() };
    if let Ok(img) = Qcow2Image::open(&path, &opts) {
        let size = img.virtual_size();
        let mut buf = vec![0u8; 64 << 10];
        for off in [0, size / 3, size.saturating_sub(buf.len() as u64)] {
            let len = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..len], off);
        }
    }
    let _ = std::fs::remove_file(&path);
});
