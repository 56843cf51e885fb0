//! `NbdTarget` against real servers: connection count (multi-conn) and device parameters.
//! Queue handling needs a kernel and is exercised by the VM tests.
#![allow(clippy::print_stderr)]

mod nbd_util;

use nbd_util::*;
use ublk_core::{Attrs, Target};
use ublk_targets::nbd::{NbdConfig, NbdTarget};

#[test]
fn test_nbd_target_multi_conn_opens_one_connection_per_queue() {
    require_bin!("nbdkit");
    with_timeout(60, || {
        let dir = TempDir::new("target");
        let srv = Server::nbdkit(&dir, &["memory", "64M"]);
        let mut cfg = NbdConfig::new(srv.uri(""));
        cfg.client = quick_opts();
        cfg.queues = 4;
        let t = NbdTarget::connect(&cfg).unwrap();
        assert!(t.multi_conn());
        assert_eq!(t.connections(), 4);
        let p = t.params();
        assert_eq!(p.size, 64 * MIB);
        assert_eq!(p.attrs, Attrs::VOLATILE_CACHE | Attrs::FUA);
        assert!(p.discard.is_some());
        assert_eq!(t.max_io_bytes(), 1 << 20);
        for q in 0..4 {
            t.open_queue(q).unwrap();
        }
        drop(t);
        drop(srv);

        let srv = Server::nbdkit(
            &dir,
            &[
                "--filter=multi-conn",
                "memory",
                "64M",
                "multi-conn-mode=disable",
            ],
        );
        let mut cfg = NbdConfig::new(srv.uri(""));
        cfg.client = quick_opts();
        cfg.queues = 4;
        let t = NbdTarget::connect(&cfg).unwrap();
        assert!(!t.multi_conn());
        assert_eq!(t.connections(), 1);
        drop(t);
        drop(srv);

        // Block size constraints and read-only.
        let srv = Server::nbdkit(
            &dir,
            &[
                "-r",
                "--filter=blocksize-policy",
                "memory",
                "8M",
                "blocksize-minimum=4096",
                "blocksize-preferred=65536",
                "blocksize-maximum=256K",
            ],
        );
        let mut cfg = NbdConfig::new(srv.uri(""));
        cfg.client = quick_opts();
        let t = NbdTarget::connect(&cfg).unwrap();
        let p = t.params();
        assert_eq!((p.logical_bs_shift, p.io_opt_shift), (12, 16));
        assert!(p.attrs.contains(Attrs::READ_ONLY));
        assert!(p.discard.is_none());
        assert_eq!(t.max_io_bytes(), 256 << 10);
    });
}

#[test]
fn test_nbd_target_qemu_nbd_single_connection_unless_shared() {
    require_bin!("qemu-nbd");
    with_timeout(60, || {
        let dir = TempDir::new("qtarget");
        let img = dir.path("disk.raw");
        std::fs::write(&img, vec![0u8; 4 * MIB as usize]).unwrap();
        let srv = Server::qemu_nbd(&dir, &img, &[]);
        let mut cfg = NbdConfig::new(srv.uri(""));
        cfg.client = quick_opts();
        cfg.queues = 2;
        let t = NbdTarget::connect(&cfg).unwrap();
        assert_eq!(t.connections(), 1);
        drop(t);
        drop(srv);
        let srv = Server::qemu_nbd(&dir, &img, &["-e", "2"]);
        let mut cfg = NbdConfig::new(srv.uri(""));
        cfg.client = quick_opts();
        cfg.queues = 2;
        let t = NbdTarget::connect(&cfg).unwrap();
        assert_eq!(t.connections(), 2);
    });
}
