//! `ublk`: create, list, delete and recover ublk block devices.
//!
//! Flag spelling follows the kernel selftests' `kublk` and ublksrv, so commands from the kernel
//! documentation work unchanged.
#![forbid(unsafe_code)]

mod add;
mod del;
mod exports;
mod list;
mod logger;
mod size;
mod state;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "ublk",
    version,
    about = "Userspace block devices over Linux ublk"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
// Parsed once per run: the size of `AddArgs` does not matter.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Add a device and serve it (in the background unless --foreground).
    Add(Box<AddArgs>),
    /// Stop and delete devices.
    Del(DelArgs),
    /// Show devices.
    List(ListArgs),
    /// Attach a new daemon to a device whose daemon died (needs `add -r 1`).
    Recover(RecoverArgs),
    /// Detach a device's daemon without losing IO, for `recover` to attach a new one (e.g. an
    /// upgraded binary); IO waits meanwhile (needs `add -r 1`, Linux 6.16).
    Quiesce(QuiesceArgs),
    /// Change a live device's size (null: any size; loop: up to the backing file's size, which
    /// is the default, e.g. after growing the file; Linux 6.16).
    #[command(alias = "update_size")]
    Resize(ResizeArgs),
    /// Show the ublk features of the running kernel.
    Features,
    /// Print the owner of an unprivileged device as "UID GID" (for udev rules; fails for
    /// ordinary devices).
    Owner(OwnerArgs),
    /// List the exports of an NBD server with their size and flags (what `add -t nbd` would
    /// get from each).
    #[command(name = "nbd-list", alias = "list-exports")]
    NbdList(NbdListArgs),
}

#[derive(Args, Debug)]
struct NbdListArgs {
    #[command(flatten)]
    server: NbdServerArgs,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct QuiesceArgs {
    /// Device id.
    #[arg(short = 'n', long = "number")]
    id: u32,
    /// Give up if the kernel cannot quiesce the device within this many seconds (0: wait for
    /// ever).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Args, Debug)]
struct ResizeArgs {
    /// Device id.
    #[arg(short = 'n', long = "number")]
    id: u32,
    /// New size, e.g. 20G (loop: default the backing file's current size).
    #[arg(value_parser = size::parse_size)]
    size: Option<u64>,
    /// The new size as kublk's `update_size -s` spells it.
    #[arg(short = 's', long = "size", value_parser = size::parse_size, conflicts_with = "size")]
    size_opt: Option<u64>,
}

#[derive(Args, Debug)]
struct OwnerArgs {
    /// Device node name or path: ublkcN, ublkbN (or /dev/...), or the id N.
    name: String,
}

/// Target types.
#[derive(
    clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TargetType {
    /// Completes every request at once.
    Null,
    /// A file or block device as backing store.
    Loop,
    /// A qcow2 image (and its backing chain).
    Qcow2,
    /// A remote NBD export (--uri, or --host/--port/--unix with --export_name).
    Nbd,
}

/// Who encrypts an NBD TLS session once the export is negotiated (`--ktls`).
#[derive(
    clap::ValueEnum,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub(crate) enum KtlsArg {
    /// The kernel where it can (TCP and the tls module), else this process.
    #[default]
    Auto,
    /// The kernel, or the connection fails.
    On,
    /// This process (rustls).
    Off,
}

fn default_poll_us() -> u64 {
    ublk_core::DEFAULT_POLL.as_micros() as u64
}

#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct AddArgs {
    /// Target type.
    #[arg(short = 't', long = "type")]
    pub(crate) target: TargetType,
    /// Device id (default: the kernel picks one).
    #[arg(short = 'n', long = "number")]
    pub(crate) id: Option<u32>,
    /// Number of queues.
    #[arg(short = 'q', long = "queues", default_value_t = 1)]
    pub(crate) queues: u16,
    /// Queue depth.
    #[arg(short = 'd', long = "depth", default_value_t = 128)]
    pub(crate) depth: u16,
    /// Copy mode: the kernel copies data between the request's pages and the daemon's
    /// buffers. The default, except for these, which use user copy where the kernel has it (and
    /// the device is not --unprivileged): null, which then moves no data at all; loop and qcow2
    /// on tmpfs, where the kernel copies straight between the request and the mapped file; nbd's
    /// io_uring engine, where it copies READ data from the receive buffer into the request.
    #[arg(long)]
    #[serde(default)]
    pub(crate) copy: bool,
    /// NEED_GET_DATA mode: WRITE data is fetched on demand.
    #[arg(short = 'g', long = "need-get-data")]
    pub(crate) need_get_data: bool,
    /// USER_COPY mode: data moved with pread/pwrite on /dev/ublkcN (Linux 6.5).
    #[arg(short = 'u', long = "user-copy")]
    pub(crate) user_copy: bool,
    /// Zero copy: request pages are registered in the queue's io_uring and the target's IO
    /// uses them directly (UBLK_F_AUTO_BUF_REG, Linux 6.16; null and loop; nbd where the kernel
    /// has io_uring receives into registered buffers, Linux 7.3).
    #[arg(short = 'z', long = "zero-copy")]
    pub(crate) zero_copy: bool,
    /// Batch io commands: requests arrive as arrays of tags and results go back many per
    /// command (UBLK_F_BATCH_IO, Linux 7.0; not with -g).
    #[arg(short = 'b', long = "batch")]
    #[serde(default)]
    pub(crate) batch: bool,
    /// An unprivileged device (UBLK_F_UNPRIVILEGED_DEV): added and served without
    /// CAP_SYS_ADMIN, its nodes handed to the caller by udev (see docs/USAGE.md); copy or -g only, no
    /// recovery.
    #[arg(long)]
    #[serde(default)]
    pub(crate) unprivileged: bool,
    /// Do not let the kernel scan the new disk for partitions (UBLK_F_NO_AUTO_PART_SCAN, Linux
    /// 7.0; an untrusted image's partition table is then not parsed until `blockdev
    /// --rereadpt`).
    #[arg(long = "no-auto-part-scan", alias = "no_auto_part_scan")]
    #[serde(default)]
    pub(crate) no_auto_part_scan: bool,
    /// Fall back to copy mode (with a warning) when the kernel lacks the requested mode.
    #[arg(long)]
    pub(crate) fallback: bool,
    /// User recovery: the device survives its daemon (1) or stops with it (0).
    #[arg(short = 'r', long = "recovery", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) recovery: u8,
    /// With recovery: fail IO while no daemon is attached (Linux 6.13).
    #[arg(short = 'e', long = "recovery-fail-io", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) fail_io: u8,
    /// With recovery: reissue requests that were in flight when the daemon died.
    #[arg(short = 'i', long = "recovery-reissue", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub(crate) reissue: u8,
    /// Stay in the foreground (for systemd and debugging).
    #[arg(long)]
    pub(crate) foreground: bool,
    /// Backing file or block device (loop), or image (qcow2).
    #[arg(short = 'f', long = "file")]
    pub(crate) file: Option<PathBuf>,
    /// The backing file without -f, as kublk spells it (`ublk add -t loop disk.img`).
    #[arg(value_name = "FILE", conflicts_with = "file")]
    #[serde(skip)]
    pub(crate) file_arg: Option<PathBuf>,
    /// Buffered IO on the backing file instead of O_DIRECT (loop).
    #[arg(long)]
    pub(crate) buffered: bool,
    /// Expose a read-only device (the file is opened read-only).
    #[arg(long = "read-only")]
    pub(crate) read_only: bool,
    /// Device size, e.g. 1G, 512M (null; default 250G).
    #[arg(long, value_parser = size::parse_size)]
    pub(crate) size: Option<u64>,
    /// Create the image given with -f first, a new qcow2 v3 image of this size (e.g. 10G);
    /// an existing file is never overwritten (qcow2).
    #[arg(long, value_parser = size::parse_size, value_name = "SIZE")]
    #[serde(default)]
    pub(crate) create: Option<u64>,
    /// Cluster size of the image made by --create (default 64K; 512 to 2M).
    #[arg(long = "cluster-size", value_parser = size::parse_size, requires = "create")]
    #[serde(default)]
    pub(crate) cluster_size: Option<u64>,
    /// Backing file of the image made by --create (qcow2 or raw, probed; a relative name is
    /// relative to the image's directory).
    #[arg(long, requires = "create")]
    #[serde(default)]
    pub(crate) backing: Option<PathBuf>,
    /// Most memory for the L2 table cache of each image in the chain, e.g. 1M (qcow2; default
    /// 32M, qemu's default, enough for every L2 entry of a 256 GiB image with 64 KiB clusters;
    /// memory is used only as tables are read).
    #[arg(long = "l2-cache-size", value_parser = size::parse_size)]
    #[serde(default)]
    pub(crate) l2_cache_size: Option<u64>,
    /// Memory for the refcount block cache of the image, e.g. 256K (qcow2; default 1M).
    #[arg(long = "refcount-cache-size", value_parser = size::parse_size)]
    #[serde(default)]
    pub(crate) refcount_cache_size: Option<u64>,
    /// Largest request, e.g. 512K, 1M.
    #[arg(long = "max-io-size", value_parser = size::parse_size)]
    pub(crate) max_io_size: Option<u64>,
    /// Do not pin queue threads (by default each runs on one CPU of those the kernel maps to
    /// its queue, picked by device id).
    #[arg(long = "no-affinity")]
    pub(crate) no_affinity: bool,
    /// Keep queue threads in the normal scheduling policy instead of SCHED_BATCH (which lets a
    /// batch of requests build up before the queue thread takes the CPU from the submitter).
    #[arg(long = "no-batch-sched")]
    pub(crate) no_batch_sched: bool,
    /// Microseconds each queue thread polls for its next request before it sleeps (0: never).
    /// Spares the submitting task the wake-up of the queue thread; a queue whose polls keep
    /// finding nothing pauses polling, so an idle device costs no CPU.
    #[arg(long = "poll-us", value_name = "US", default_value_t = default_poll_us())]
    #[serde(default = "default_poll_us")]
    pub(crate) poll_us: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) nbd: NbdServerArgs,
    /// Who encrypts NBD TLS sessions once the export is negotiated: the kernel (kTLS), which
    /// lets the queue threads' io_uring drive the connections, or this process (nbd).
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    #[serde(default)]
    pub(crate) ktls: KtlsArg,
    /// Drive NBD connections with writer and reader threads instead of the queue threads'
    /// io_uring (which is used whenever each queue has a connection of its own carrying
    /// plaintext for us: no TLS, or TLS in the kernel).
    #[arg(long = "nbd-threads")]
    pub(crate) nbd_threads: bool,
    /// Let the NBD server answer reads of holes with hole chunks instead of zeros (less
    /// traffic on sparse exports; costs qemu-nbd an allocation lookup per read).
    #[arg(long = "nbd-sparse-reads")]
    pub(crate) nbd_sparse_reads: bool,
    /// A request the NBD server has not answered within SECS fails with EIO, and the
    /// connection is considered dead and re-established (0: wait for ever; nbd; default 30).
    #[arg(long = "nbd-timeout", value_name = "SECS")]
    #[serde(default)]
    pub(crate) nbd_timeout: Option<u64>,
    /// Fail all IO with EIO once the connection to the NBD server is lost, instead of
    /// reconnecting (with backoff) and resending what was in flight (nbd).
    #[arg(long = "nbd-no-reconnect")]
    #[serde(default)]
    pub(crate) nbd_no_reconnect: bool,
    /// Do not ask the NBD server for extended headers (64-bit lengths; asked for by default,
    /// and structured replies used where the server does not offer them; nbd).
    #[arg(long = "nbd-no-extended-headers")]
    #[serde(default)]
    pub(crate) nbd_no_extended_headers: bool,
    /// Internal: re-attach to this device instead of adding one.
    #[arg(long, hide = true)]
    pub(crate) recover_id: Option<u32>,
}

/// Where the NBD server is (`add -t nbd`, `nbd-list`).
#[derive(Args, Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub(crate) struct NbdServerArgs {
    /// NBD server: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH or
    /// nbd+vsock://CID[:PORT]/EXPORT (a VM socket; CID 2 is the host), nbds... with TLS (nbd).
    #[arg(long)]
    pub(crate) uri: Option<String>,
    /// NBD server host (ublksrv spelling; nbd).
    #[arg(long)]
    pub(crate) host: Option<String>,
    /// NBD server port (nbd; default 10809).
    #[arg(long)]
    pub(crate) port: Option<u16>,
    /// NBD server Unix socket (nbd).
    #[arg(long)]
    pub(crate) unix: Option<PathBuf>,
    /// NBD export name (nbd).
    #[arg(long = "export_name", alias = "export-name")]
    pub(crate) export_name: Option<String>,
    /// Require TLS (NBD_OPT_STARTTLS) with --host/--unix; nbds:// URIs imply it (nbd).
    #[arg(long)]
    pub(crate) tls: bool,
    /// Directory with ca-cert.pem, optionally client-cert.pem + client-key.pem (nbd TLS;
    /// default: the system CA bundle). Implies --tls.
    #[arg(long = "tls-certs")]
    pub(crate) tls_certs: Option<PathBuf>,
    /// Name the server certificate must carry (nbd TLS; default: the host, or localhost for
    /// Unix and VM sockets). Implies --tls.
    #[arg(long = "tls-hostname")]
    pub(crate) tls_hostname: Option<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["id", "all"])))]
struct DelArgs {
    /// Device id.
    #[arg(short = 'n', long = "number")]
    id: Option<u32>,
    /// Delete every device.
    #[arg(short = 'a', long = "all")]
    all: bool,
    /// Delete a device even while it is mounted or held open exclusively (the file system
    /// on it then sees IO errors); without it such a device is left alone.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct ListArgs {
    /// Only this device.
    #[arg(short = 'n', long = "number")]
    id: Option<u32>,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RecoverArgs {
    /// Device id.
    #[arg(short = 'n', long = "number")]
    id: u32,
    /// Stay in the foreground.
    #[arg(long)]
    foreground: bool,
    /// The command line the device was added with, as kublk takes it (`recover -n 0 -t loop
    /// -q 2 -r 1 disk.img`): checked against the device's saved configuration, which is the
    /// one used.
    #[arg(
        value_name = "ADD_ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    add_args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logger::init(cli.verbose);
    let r = match cli.cmd {
        Cmd::Add(a) => add::run(*a),
        Cmd::Del(d) => del::run(d.id, d.all, d.force),
        Cmd::List(l) => list::run(l.id, l.json),
        Cmd::Recover(r) => add::recover(r.id, r.foreground, &r.add_args),
        Cmd::Quiesce(q) => del::quiesce(q.id, q.timeout),
        Cmd::Resize(r) => list::resize(r.id, r.size.or(r.size_opt)),
        Cmd::Features => list::features(),
        Cmd::Owner(o) => list::owner(&o.name),
        Cmd::NbdList(l) => exports::run(&l.server, l.json),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("ublk: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ublk").chain(args.iter().copied()))
    }

    #[test]
    fn test_add_kublk_spelling() {
        let cli = parse(&[
            "add", "-t", "loop", "-n", "3", "-q", "2", "-d", "64", "-u", "-r", "1", "-i", "1",
            "-f", "/tmp/x",
        ])
        .unwrap();
        let Cmd::Add(a) = cli.cmd else {
            panic!("not add")
        };
        assert_eq!(a.target, TargetType::Loop);
        assert_eq!((a.id, a.queues, a.depth), (Some(3), 2, 64));
        assert!(a.user_copy && !a.need_get_data);
        assert_eq!((a.recovery, a.reissue, a.fail_io), (1, 1, 0));
        assert_eq!(a.file.as_deref(), Some(std::path::Path::new("/tmp/x")));
    }

    #[test]
    fn test_kublk_positional_file_update_size_and_recover_line() {
        let Cmd::Add(a) = parse(&["add", "-t", "loop", "-q", "2", "/tmp/x"])
            .unwrap()
            .cmd
        else {
            panic!("not add")
        };
        assert_eq!(a.file_arg.as_deref(), Some(std::path::Path::new("/tmp/x")));
        assert!(parse(&["add", "-t", "loop", "-f", "/a", "/b"]).is_err());
        assert!(parse(&["add", "-t", "loop", "/a", "/b"]).is_err());
        let Cmd::Resize(r) = parse(&["update_size", "-n", "1", "-s", "4096"])
            .unwrap()
            .cmd
        else {
            panic!("not resize")
        };
        assert_eq!((r.id, r.size, r.size_opt), (1, None, Some(4096)));
        let Cmd::Recover(r) = parse(&["recover", "-n", "0", "-t", "null", "-q", "2", "-r", "1"])
            .unwrap()
            .cmd
        else {
            panic!("not recover")
        };
        assert_eq!(r.id, 0);
        assert_eq!(r.add_args, ["-t", "null", "-q", "2", "-r", "1"]);
    }

    #[test]
    fn test_add_rejects_bad_values() {
        assert!(parse(&["add", "-t", "floppy"]).is_err());
        assert!(parse(&["add", "-t", "null", "-r", "2"]).is_err());
        assert!(parse(&["add", "-t", "null", "--size", "12X"]).is_err());
        assert!(parse(&["add"]).is_err(), "type is required");
    }

    #[test]
    fn test_del_needs_id_or_all() {
        assert!(parse(&["del"]).is_err());
        assert!(parse(&["del", "-n", "1", "-a"]).is_err());
        assert!(matches!(
            parse(&["del", "-a"]).unwrap().cmd,
            Cmd::Del(DelArgs { all: true, .. })
        ));
        assert!(matches!(
            parse(&["list", "-n", "2", "--json"]).unwrap().cmd,
            Cmd::List(ListArgs {
                id: Some(2),
                json: true
            })
        ));
    }

    #[test]
    fn test_add_create_flags() {
        let cli = parse(&[
            "add",
            "-t",
            "qcow2",
            "-f",
            "/tmp/n.qcow2",
            "--create",
            "10G",
            "--cluster-size",
            "4K",
            "--backing",
            "b.raw",
        ])
        .unwrap();
        let Cmd::Add(a) = cli.cmd else {
            panic!("not add")
        };
        assert_eq!(a.create, Some(10 << 30));
        assert_eq!(a.cluster_size, Some(4096));
        assert_eq!(a.backing.as_deref(), Some(std::path::Path::new("b.raw")));
        assert!(
            parse(&["add", "-t", "qcow2", "-f", "x", "--cluster-size", "4K"]).is_err(),
            "--cluster-size needs --create"
        );
        assert!(parse(&["add", "-t", "qcow2", "-f", "x", "--create", "0"]).is_err());
    }

    #[test]
    fn test_parse_dev_id_from_ready_report() {
        let out = "dev id 12: nr_hw_queues 1 queue_depth 128 block size 512 dev_capacity 8\n\tmax rq size 524288 daemon pid 9 flags 0x42 state LIVE\n";
        assert_eq!(add::parse_dev_id(out), Some(12));
        assert_eq!(add::parse_dev_id("garbage\n"), None);
    }

    #[test]
    fn test_daemon_argv_roundtrip() {
        let cli = parse(&[
            "add",
            "-t",
            "null",
            "-g",
            "--size",
            "1G",
            "-q",
            "4",
            "-e",
            "1",
            "--no-affinity",
        ])
        .unwrap();
        let Cmd::Add(a) = cli.cmd else {
            panic!("not add")
        };
        let argv = a.to_argv();
        let again = Cli::try_parse_from(std::iter::once("ublk".to_string()).chain(argv)).unwrap();
        let Cmd::Add(b) = again.cmd else {
            panic!("not add")
        };
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            serde_json::to_value(&b).unwrap()
        );
    }

    /// Every on/off option of `add` reaches the daemon: each is set alone (through the
    /// serialized arguments, so a new option cannot be forgotten here) and must survive
    /// `to_argv` and parsing.
    #[test]
    fn test_daemon_argv_every_switch() {
        let Cmd::Add(base) = parse(&["add", "-t", "null"]).unwrap().cmd else {
            panic!("not add")
        };
        let base = serde_json::to_value(&base).unwrap();
        let switches: Vec<String> = base
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| v.as_bool() == Some(false))
            .map(|(k, _)| k.clone())
            .collect();
        assert!(switches.len() >= 10, "{switches:?}");
        for k in switches {
            let mut v = base.clone();
            v[&k] = serde_json::Value::Bool(true);
            let a: AddArgs = serde_json::from_value(v.clone()).unwrap();
            let again = Cli::try_parse_from(std::iter::once("ublk".to_string()).chain(a.to_argv()))
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            let Cmd::Add(b) = again.cmd else {
                panic!("not add")
            };
            assert_eq!(v, serde_json::to_value(&b).unwrap(), "{k} is lost");
        }
    }

    /// `del` needs -n or -a (and says so), not both; --force is accepted with either.
    #[test]
    fn test_del_args() {
        let e = parse(&["del"]).unwrap_err().to_string();
        assert!(e.contains("--number") && e.contains("--all"), "{e}");
        assert!(parse(&["del", "-n", "1", "-a"]).is_err());
        assert!(matches!(
            parse(&["del", "--force", "-n", "3"]).unwrap().cmd,
            Cmd::Del(DelArgs {
                id: Some(3),
                force: true,
                ..
            })
        ));
    }

    /// Without a mode on the command line, null (which moves no data) asks for user copy with
    /// fallback; targets that use data get copy mode; a mode given is kept as given.
    #[test]
    fn test_default_data_mode() {
        use ublk_core::DataMode;
        struct Data;
        impl ublk_core::Target for Data {
            type Queue = ublk_targets::null::NullQueue;
            fn open_queue(&self, _q: u16) -> std::io::Result<Self::Queue> {
                Ok(ublk_targets::null::NullQueue)
            }
        }
        let null = ublk_targets::null::NullTarget;
        let mode = |args: &[&str], data: bool| {
            let mut v = vec!["add", "-t", "null"];
            v.extend_from_slice(args);
            let Cmd::Add(a) = parse(&v).unwrap().cmd else {
                panic!("not add")
            };
            if data {
                a.mode_for(&Data)
            } else {
                a.mode_for(&null)
            }
        };
        assert_eq!(mode(&[], false).unwrap(), (DataMode::UserCopy, true));
        assert_eq!(mode(&[], true).unwrap(), (DataMode::Copy, false));
        assert_eq!(mode(&["--copy"], false).unwrap(), (DataMode::Copy, false));
        assert_eq!(
            mode(&["--unprivileged"], false).unwrap(),
            (DataMode::Copy, false)
        );
        assert_eq!(
            mode(&["-g", "--fallback"], false).unwrap(),
            (DataMode::NeedGetData, true)
        );
        assert_eq!(mode(&["-z"], true).unwrap(), (DataMode::ZeroCopy, false));
        assert!(mode(&["--copy", "-u"], false).is_err());
    }

    /// The daemon, started with `a.to_argv()`, parses the same options back.
    fn assert_reaches_daemon(a: &AddArgs) {
        let again =
            Cli::try_parse_from(std::iter::once("ublk".to_string()).chain(a.to_argv())).unwrap();
        let Cmd::Add(b) = again.cmd else {
            panic!("not add")
        };
        assert_eq!(
            serde_json::to_value(a).unwrap(),
            serde_json::to_value(&*b).unwrap()
        );
    }

    /// Options the daemon must get again (it is started with `to_argv`), in kublk's spelling
    /// too.
    #[test]
    fn test_add_options_reach_the_daemon() {
        let Cmd::Add(a) = parse(&[
            "add",
            "-t",
            "nbd",
            "--unix",
            "/s",
            "--nbd-timeout",
            "0",
            "--nbd-no-reconnect",
            "--nbd-no-extended-headers",
            "--no_auto_part_scan",
            "--l2-cache-size",
            "64K",
            "--refcount-cache-size",
            "128K",
        ])
        .unwrap()
        .cmd
        else {
            panic!("not add")
        };
        assert_eq!(a.nbd_timeout, Some(0));
        assert!(a.nbd_no_reconnect && a.nbd_no_extended_headers && a.no_auto_part_scan);
        assert_eq!(a.l2_cache_size, Some(64 << 10));
        assert_eq!(a.refcount_cache_size, Some(128 << 10));
        assert_reaches_daemon(&a);
        // A state file written before these options existed still loads.
        let mut old = serde_json::to_value(&a).unwrap();
        for k in [
            "nbd_timeout",
            "nbd_no_reconnect",
            "nbd_no_extended_headers",
            "no_auto_part_scan",
            "l2_cache_size",
            "refcount_cache_size",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        let c: AddArgs = serde_json::from_value(old).unwrap();
        assert!(c.nbd_timeout.is_none() && !c.nbd_no_reconnect && !c.no_auto_part_scan);
        assert!(!c.nbd_no_extended_headers);
    }

    #[test]
    fn test_nbd_tls_options() {
        let cli = parse(&[
            "add",
            "-t",
            "nbd",
            "--host",
            "srv",
            "--export_name",
            "e",
            "--tls-certs",
            "/etc/pki/x",
            "--tls-hostname",
            "srv.example",
            "--ktls",
            "off",
        ])
        .unwrap();
        let Cmd::Add(a) = cli.cmd else {
            panic!("not add")
        };
        assert_eq!(a.ktls, KtlsArg::Off);
        let u = add::nbd_uri(&a.nbd).unwrap();
        let t = u.tls.expect("--tls-certs implies TLS");
        assert_eq!(
            t.certificates.as_deref(),
            Some(std::path::Path::new("/etc/pki/x"))
        );
        assert_eq!(t.hostname.as_deref(), Some("srv.example"));
        // The daemon gets the same options.
        assert_reaches_daemon(&a);

        // --tls alone; plain otherwise; nbds:// URIs need no flag.
        let tls_of = |args: &[&str]| {
            let Cmd::Add(a) = parse(args).unwrap().cmd else {
                panic!("not add")
            };
            add::nbd_uri(&a.nbd).unwrap().tls
        };
        assert!(tls_of(&["add", "-t", "nbd", "--unix", "/s", "--tls"]).is_some());
        assert!(tls_of(&["add", "-t", "nbd", "--unix", "/s"]).is_none());
        let t = tls_of(&[
            "add",
            "-t",
            "nbd",
            "--uri",
            "nbds://h/x?tls-hostname=a",
            "--tls-hostname",
            "b",
        ]);
        assert_eq!(t.unwrap().hostname.as_deref(), Some("b"), "the flag wins");
    }
}
