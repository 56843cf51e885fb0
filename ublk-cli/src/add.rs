//! `ublk add` and `ublk recover`: build the target, add (or re-attach to) the device, serve it.

use crate::state::{self, DevState};
use crate::{list, AddArgs, KtlsArg, NbdServerArgs, TargetType};
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use ublk_core::{
    Ctrl, DataMode, DevInfo, Device, DeviceBuilder, DeviceFlags, DeviceParams, Recovery,
    RunOptions, StopReason, Target,
};
use ublk_targets::loop_::{LoopConfig, LoopTarget};
use ublk_targets::nbd::{Engine, Ktls, NbdAddr, NbdConfig, NbdTarget, NbdUri, TlsParams};
use ublk_targets::null::NullTarget;
use ublk_targets::qcow2::{
    CreateOptions, Qcow2Image, Qcow2Options, Qcow2Target, DEFAULT_L2_CACHE_BYTES,
    DEFAULT_REFCOUNT_CACHE_BYTES,
};

/// Marker the daemon prints once the device is up; the parent stops reading there.
const READY: &str = "@@ublk-ready@@";
/// Set in the daemon's environment by the parent.
const NOTIFY_ENV: &str = "UBLK_NOTIFY_READY";

impl AddArgs {
    /// The arguments again as a command line (for the daemon and for recovery).
    pub(crate) fn to_argv(&self) -> Vec<String> {
        let mut v = vec![
            "add".to_string(),
            "-t".into(),
            format!("{:?}", self.target).to_lowercase(),
        ];
        let mut opt = |k: &str, val: String| {
            v.push(k.into());
            v.push(val);
        };
        if let Some(id) = self.id {
            opt("-n", id.to_string());
        }
        opt("-q", self.queues.to_string());
        opt("-d", self.depth.to_string());
        opt("-r", self.recovery.to_string());
        opt("-e", self.fail_io.to_string());
        opt("-i", self.reissue.to_string());
        opt("--poll-us", self.poll_us.to_string());
        if let Some(f) = &self.file {
            opt("-f", f.display().to_string());
        }
        if let Some(s) = self.size {
            opt("--size", s.to_string());
        }
        if let Some(s) = self.max_io_size {
            opt("--max-io-size", s.to_string());
        }
        if let Some(s) = self.nbd_timeout {
            opt("--nbd-timeout", s.to_string());
        }
        if let Some(s) = self.l2_cache_size {
            opt("--l2-cache-size", s.to_string());
        }
        if let Some(s) = self.refcount_cache_size {
            opt("--refcount-cache-size", s.to_string());
        }
        for (k, val) in [
            ("--uri", self.nbd.uri.clone()),
            ("--host", self.nbd.host.clone()),
            ("--port", self.nbd.port.map(|p| p.to_string())),
            (
                "--unix",
                self.nbd.unix.as_ref().map(|p| p.display().to_string()),
            ),
            ("--export_name", self.nbd.export_name.clone()),
            (
                "--tls-certs",
                self.nbd.tls_certs.as_ref().map(|p| p.display().to_string()),
            ),
            ("--tls-hostname", self.nbd.tls_hostname.clone()),
        ] {
            if let Some(val) = val {
                opt(k, val);
            }
        }
        if let Some(id) = self.recover_id {
            opt("--recover-id", id.to_string());
        }
        if self.ktls != KtlsArg::Auto {
            opt("--ktls", format!("{:?}", self.ktls).to_lowercase());
        }
        for (on, flag) in [
            (self.copy, "--copy"),
            (self.need_get_data, "-g"),
            (self.user_copy, "-u"),
            (self.zero_copy, "-z"),
            (self.batch, "-b"),
            (self.unprivileged, "--unprivileged"),
            (self.no_auto_part_scan, "--no-auto-part-scan"),
            (self.fallback, "--fallback"),
            (self.buffered, "--buffered"),
            (self.read_only, "--read-only"),
            (self.no_affinity, "--no-affinity"),
            (self.no_batch_sched, "--no-batch-sched"),
            (self.foreground, "--foreground"),
            (self.nbd.tls, "--tls"),
            (self.nbd_threads, "--nbd-threads"),
            (self.nbd_sparse_reads, "--nbd-sparse-reads"),
            (self.nbd_no_reconnect, "--nbd-no-reconnect"),
            (self.nbd_no_extended_headers, "--nbd-no-extended-headers"),
        ] {
            if on {
                v.push(flag.into());
            }
        }
        v
    }

    /// The data mode asked for on the command line, if any.
    fn data_mode(&self) -> Result<Option<DataMode>> {
        match (
            self.copy,
            self.need_get_data,
            self.user_copy,
            self.zero_copy,
        ) {
            (false, false, false, false) => Ok(None),
            (true, false, false, false) => Ok(Some(DataMode::Copy)),
            (false, true, false, false) => Ok(Some(DataMode::NeedGetData)),
            (false, false, true, false) => Ok(Some(DataMode::UserCopy)),
            (false, false, false, true) => Ok(Some(DataMode::ZeroCopy)),
            _ => bail!(
                "--copy, -g (NEED_GET_DATA), -u (USER_COPY) and -z (zero copy) exclude each other"
            ),
        }
    }

    /// The data mode for `target`, and whether a mode the kernel lacks falls back to copy mode.
    /// Without a choice on the command line: copy mode, but user copy (falling back to copy
    /// mode) for a target that moves no data (null), privileged: the request's pages are then
    /// left alone and nothing is copied, as with the kernel's null_blk.
    pub(crate) fn mode_for(&self, target: &impl Target) -> Result<(DataMode, bool)> {
        Ok(match self.data_mode()? {
            Some(m) => (m, self.fallback),
            None if self.unprivileged => (DataMode::Copy, false),
            None => match target.preferred_mode() {
                DataMode::Copy => (DataMode::Copy, false),
                m => (m, true),
            },
        })
    }

    fn recovery(&self) -> Recovery {
        match (
            self.recovery == 1 || self.fail_io == 1 || self.reissue == 1,
            self.fail_io == 1,
            self.reissue == 1,
        ) {
            (false, _, _) => Recovery::None,
            (true, true, _) => Recovery::FailIo,
            (true, false, true) => Recovery::Reissue,
            (true, false, false) => Recovery::Quiesce,
        }
    }
}

/// Set once the device was started and reported: from then on a failure must not remove an
/// image that `--create` made (it may hold data).
static DEVICE_STARTED: AtomicBool = AtomicBool::new(false);

/// `ublk add`.
pub(crate) fn run(mut a: AddArgs) -> Result<()> {
    if let Some(f) = a.file_arg.take() {
        a.file = Some(f);
    }
    a.data_mode()?;
    if a.fail_io == 1 && a.reissue == 1 {
        bail!("-e 1 (fail io) and -i 1 (reissue) exclude each other");
    }
    let created = create_image(&mut a)?;
    let r = run_created(a);
    if let (Err(_), Some(path)) = (&r, &created) {
        if !DEVICE_STARTED.load(Ordering::SeqCst) {
            // The device never came up: leave nothing half-done.
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove {} made by --create: {e}", path.display());
            }
        }
    }
    r
}

/// `--create SIZE`: makes the qcow2 image before anything else, then drops the create flags
/// (a daemon restarted by `recover` must open the image, not create it again). Returns the
/// path of the new image.
fn create_image(a: &mut AddArgs) -> Result<Option<PathBuf>> {
    let Some(size) = a.create.take() else {
        return Ok(None);
    };
    if a.target != TargetType::Qcow2 {
        bail!("--create works with -t qcow2 only");
    }
    let path = a
        .file
        .clone()
        .ok_or_else(|| anyhow!("--create needs the new image's path: -f FILE"))?;
    let mut opts = CreateOptions {
        backing: a.backing.take(),
        ..CreateOptions::default()
    };
    if let Some(cs) = a.cluster_size.take() {
        opts.cluster_size = cs;
    }
    Qcow2Image::create(&path, size, &opts)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok(Some(path))
}

fn run_created(a: AddArgs) -> Result<()> {
    match a.target {
        TargetType::Loop | TargetType::Qcow2 => {
            let what = if a.target == TargetType::Loop {
                "backing file"
            } else {
                "image"
            };
            let f = a
                .file
                .as_ref()
                .ok_or_else(|| anyhow!("this target needs a {what}: -f FILE"))?;
            if !f.exists() {
                bail!("{what} {} does not exist", f.display());
            }
        }
        TargetType::Null | TargetType::Nbd => {
            if a.file.is_some() {
                bail!(
                    "the {} target takes no file (-f)",
                    format!("{:?}", a.target).to_lowercase()
                );
            }
        }
    }
    let mut a = a;
    if a.target != TargetType::Nbd && a.nbd.wants_tls() {
        bail!("--tls, --tls-certs and --tls-hostname are for the nbd target");
    }
    if a.target != TargetType::Null && a.size.is_some() {
        bail!(
            "--size is for the null target (loop serves its whole file, `ublk resize` changes \
             that later; qcow2 has its image's size, `--create SIZE` for a new image; nbd the \
             export's)"
        );
    }
    if a.target != TargetType::Nbd
        && (a.nbd_threads
            || a.nbd_sparse_reads
            || a.nbd_timeout.is_some()
            || a.nbd_no_reconnect
            || a.nbd_no_extended_headers
            || a.ktls != KtlsArg::Auto)
    {
        bail!("--nbd-* options and --ktls are for the nbd target");
    }
    if a.target != TargetType::Qcow2
        && (a.l2_cache_size.is_some() || a.refcount_cache_size.is_some())
    {
        bail!("--l2-cache-size and --refcount-cache-size are for the qcow2 target");
    }
    if let Some(d) = &a.nbd.tls_certs {
        // The daemon may run elsewhere; keep the directory meaning what the user meant.
        a.nbd.tls_certs = Some(std::path::absolute(d).context("bad --tls-certs directory")?);
    }
    if a.target == TargetType::Nbd && nbd_uri(&a.nbd)?.tls.is_none() && a.ktls != KtlsArg::Auto {
        bail!("--ktls is for TLS sessions (nbds:// or --tls)");
    }
    if a.foreground {
        serve(a)
    } else {
        spawn_daemon(&a)
    }
}

/// The NBD server from `--uri`, or from ublksrv's `--host/--port/--unix/--export_name`.
pub(crate) fn nbd_uri(a: &NbdServerArgs) -> Result<NbdUri> {
    let export = a.export_name.clone().unwrap_or_default();
    let mut uri = match (&a.uri, &a.host, &a.unix) {
        (Some(u), None, None) => NbdUri::parse(u)?,
        (None, Some(h), None) => NbdUri {
            addr: NbdAddr::Tcp {
                host: h.clone(),
                port: a.port.unwrap_or(10809),
            },
            export,
            tls: None,
        },
        (None, None, Some(p)) => NbdUri {
            addr: NbdAddr::Unix(p.clone()),
            export,
            tls: None,
        },
        (None, None, None) => {
            bail!("an NBD server is needed: --uri nbd://HOST/EXPORT (or --host / --unix)")
        }
        _ => bail!("give the NBD server once: --uri, --host or --unix"),
    };
    // --tls-* override the URI's tls- parameters; any of them requires TLS.
    if a.wants_tls() {
        let t = uri.tls.get_or_insert_with(TlsParams::default);
        if let Some(d) = &a.tls_certs {
            t.certificates = Some(d.clone());
        }
        if let Some(h) = &a.tls_hostname {
            t.hostname = Some(h.clone());
        }
    }
    Ok(uri)
}

impl NbdServerArgs {
    /// Whether a TLS flag was given.
    pub(crate) fn wants_tls(&self) -> bool {
        self.tls || self.tls_certs.is_some() || self.tls_hostname.is_some()
    }
}

/// Whether a daemon log line (`ublk[PID]: LEVEL: ...`) is a warning or an error.
fn is_warning(line: &str) -> bool {
    line.split_once("]: ")
        .is_some_and(|(_, rest)| rest.starts_with("warning: ") || rest.starts_with("error: "))
}

/// `ublk recover -n ID`: start a daemon like the one that died, re-attaching to the device.
pub(crate) fn recover(id: u32, foreground: bool, add_args: &[String]) -> Result<()> {
    let st = state::load(id).ok_or_else(|| {
        anyhow!("no saved state for device {id} (in /run/ublk or $XDG_RUNTIME_DIR/ublk): it was not added by this tool, or the machine rebooted")
    })?;
    if !add_args.is_empty() {
        check_add_line(id, &st.args, add_args)?;
    }
    let mut a = st.args;
    a.id = Some(id);
    a.recover_id = Some(id);
    a.foreground = foreground;
    if foreground {
        serve(a)
    } else {
        spawn_daemon(&a)
    }
}

/// `ublk recover -n ID ADD_ARGS...` (kublk's spelling): the add command line given must parse
/// and name the device's target type and queue count; the saved configuration is what is used.
fn check_add_line(id: u32, saved: &AddArgs, line: &[String]) -> Result<()> {
    #[derive(clap::Parser)]
    #[command(no_binary_name = true)]
    struct Line {
        #[command(flatten)]
        add: AddArgs,
    }
    let given = <Line as clap::Parser>::try_parse_from(line)
        .map_err(|e| anyhow!("recover: the add command line does not parse: {e}"))?
        .add;
    if given.target != saved.target || given.queues != saved.queues {
        bail!(
            "device {id} was added as -t {:?} -q {}, not -t {:?} -q {}",
            saved.target,
            saved.queues,
            given.target,
            given.queues
        );
    }
    Ok(())
}

/// Re-runs this program in the foreground as a detached daemon and returns once it reports the
/// device ready, relaying what it printed (or its error).
fn spawn_daemon(a: &AddArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the ublk executable")?;
    let mut argv = a.to_argv();
    argv.push("--foreground".into());
    // The daemon logs to a file, renamed to /run/ublk/ublkN.log once the id is known, so its
    // warnings outlive this command. Without /run/ublk, its stderr comes back through a pipe.
    let log = state::open_add_log();
    let stderr = match &log {
        Some((_, f)) => Stdio::from(f.try_clone().context("cannot share the daemon log")?),
        None => Stdio::piped(),
    };
    let mut child = Command::new(exe)
        .args(&argv)
        .env(NOTIFY_ENV, "1")
        .env("UBLK_LOG", log::max_level().as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .context("cannot start the ublk daemon")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut out = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line == READY {
            if let Some((path, _)) = &log {
                // Warnings of the start-up (e.g. a fallback to copy mode) reach the user too.
                let text = std::fs::read_to_string(path).unwrap_or_default();
                for w in text.lines().filter(|l| is_warning(l)) {
                    eprintln!("{w}");
                }
                if let Some(id) = parse_dev_id(&out) {
                    state::keep_log(path, id);
                }
            }
            print!("{out}");
            return Ok(());
        }
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().context("waiting for the ublk daemon")?;
    let mut err = String::new();
    match &log {
        Some((path, _)) => {
            err = std::fs::read_to_string(path).unwrap_or_default();
            let _ = std::fs::remove_file(path);
        }
        None => {
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
        }
    }
    let err = err.trim();
    // The daemon already printed "ublk: <error>": pass it on as is.
    let msg = err
        .lines()
        .rev()
        .find(|l| l.starts_with("ublk: "))
        .map(|l| l.trim_start_matches("ublk: "));
    match msg {
        Some(m) => bail!("{m}"),
        None if !err.is_empty() => bail!("the daemon failed ({status}): {err}"),
        None => bail!("the daemon exited ({status}) before the device was ready"),
    }
}

/// The id in the first `dev id N:` line (the daemon's ready report).
pub(crate) fn parse_dev_id(text: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        l.strip_prefix("dev id ")?
            .split(':')
            .next()?
            .trim()
            .parse()
            .ok()
    })
}

fn serve(a: AddArgs) -> Result<()> {
    match a.target {
        TargetType::Null => {
            let size = a.size.unwrap_or(250 << 30);
            let params = DeviceParams {
                size,
                ..DeviceParams::default()
            };
            let json = serde_json::json!({"name": "null", "dev_size": size});
            serve_target(a, Arc::new(NullTarget), params, json)
        }
        TargetType::Loop => {
            let path = a
                .file
                .clone()
                .ok_or_else(|| anyhow!("the loop target needs -f FILE"))?;
            let t = LoopTarget::open(&LoopConfig {
                path: path.clone(),
                buffered: a.buffered,
                read_only: a.read_only,
            })?;
            let params = t.params();
            let json = serde_json::json!({
                "name": "loop",
                "backing_file": path,
                "dev_size": params.size,
                "direct_io": u8::from(t.is_direct()),
                "mapped": u8::from(t.is_mapped()),
            });
            serve_target(a, Arc::new(t), params, json)
        }
        TargetType::Nbd => {
            let uri = nbd_uri(&a.nbd)?;
            let mut cfg = NbdConfig::new(uri.clone());
            cfg.queues = a.queues;
            cfg.read_only = a.read_only;
            if a.nbd_threads {
                cfg.engine = Engine::Threads;
            }
            cfg.client.sparse_reads = a.nbd_sparse_reads;
            if let Some(secs) = a.nbd_timeout {
                cfg.client.request_timeout = (secs > 0).then(|| Duration::from_secs(secs));
            }
            cfg.client.reconnect = !a.nbd_no_reconnect;
            cfg.client.connect.extended_headers = !a.nbd_no_extended_headers;
            cfg.client.connect.ktls = match a.ktls {
                KtlsArg::Auto => Ktls::Auto,
                KtlsArg::On => Ktls::On,
                KtlsArg::Off => Ktls::Off,
            };
            let t = NbdTarget::connect(&cfg).context("cannot connect to the NBD server")?;
            let params = t.params();
            let mut a = a;
            a.max_io_size.get_or_insert(u64::from(t.max_io_bytes()));
            let json = serde_json::json!({
                "name": "nbd",
                "server": uri.addr.to_string(),
                "export": uri.export,
                "tls": uri.tls.is_some(),
                "ktls": t.kernel_tls(),
                "dev_size": params.size,
                "connections": t.connections(),
                "multi_conn": t.multi_conn(),
                "engine": if t.engine() == Engine::Ring { "io_uring" } else { "threads" },
                "timeout_secs": cfg.client.request_timeout.map_or(0, |d| d.as_secs()),
                "reconnect": cfg.client.reconnect,
                "structured_replies": t.info().structured,
                "extended_headers": t.info().extended,
            });
            serve_target(a, Arc::new(t), params, json)
        }
        TargetType::Qcow2 => {
            let path = a
                .file
                .clone()
                .ok_or_else(|| anyhow!("the qcow2 target needs -f FILE"))?;
            let opts = Qcow2Options {
                writable: !a.read_only,
                l2_cache_bytes: match a.l2_cache_size {
                    Some(n) => usize::try_from(n).context("--l2-cache-size is too large")?,
                    None => DEFAULT_L2_CACHE_BYTES,
                },
                refcount_cache_bytes: match a.refcount_cache_size {
                    Some(n) => usize::try_from(n).context("--refcount-cache-size is too large")?,
                    None => DEFAULT_REFCOUNT_CACHE_BYTES,
                },
                ..Qcow2Options::default()
            };
            let mut t = Qcow2Target::open_with(&path, &opts)
                .with_context(|| format!("cannot open {}", path.display()))?;
            // A device that outlives its daemon must not keep acknowledged writes' metadata
            // only in the daemon's memory.
            t.set_survive_daemon(a.recovery() != Recovery::None);
            let params = t.params();
            let json = serde_json::json!({
                "name": "qcow2",
                "image": path,
                "dev_size": params.size,
                "cluster_size": t.image().cluster_size(),
                "backing_depth": t.image().chain_depth(),
                "mapped": u8::from(t.is_mapped()),
                "l2_cache_bytes": opts.l2_cache_bytes,
                "refcount_cache_bytes": opts.refcount_cache_bytes,
            });
            serve_target(a, Arc::new(t), params, json)
        }
    }
}

/// Keeps the OOM killer off the daemon, as multipathd and iscsid do: the block device dies
/// with it, and under memory pressure it is what writes dirty pages back. Its resident size
/// also counts the pages of a tmpfs backing file it maps, which would otherwise make it the
/// killer's first pick. Needs CAP_SYS_RESOURCE; without it (unprivileged) nothing changes.
fn shield_from_oom_killer() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "-1000") {
        log::debug!("cannot lower oom_score_adj: {e}");
    }
}

fn serve_target<T: Target + 'static>(
    a: AddArgs,
    target: Arc<T>,
    params: DeviceParams,
    json: serde_json::Value,
) -> Result<()> {
    let (mut mode, fallback) = a.mode_for(&*target)?;
    if mode == DataMode::ZeroCopy {
        if let Err(why) = target.zero_copy() {
            let name = json["name"].as_str().unwrap_or("chosen");
            if !fallback {
                bail!("the {name} target cannot use zero copy (-z): {why}");
            }
            log::warn!(
                "the {name} target cannot use zero copy here ({why}); falling back to copy mode"
            );
            mode = DataMode::Copy;
        }
    }
    shield_from_oom_killer();
    let ctrl = Ctrl::open()?;
    let mut dev = match a.recover_id {
        Some(id) => Device::recover(ctrl, id)?,
        None => {
            let mut b = DeviceBuilder::new()
                .id(a.id)
                .queues(a.queues)
                .depth(a.depth)
                .data_mode(mode, fallback)
                .recovery(a.recovery())
                .params(params)
                .affinity(!a.no_affinity)
                .batch_io(a.batch)
                .unprivileged(a.unprivileged);
            if a.no_auto_part_scan {
                b = b.flags(DeviceFlags::NO_AUTO_PART_SCAN);
            }
            if let Some(m) = a.max_io_size {
                let m = u32::try_from(m).map_err(|_| anyhow!("--max-io-size is too large"))?;
                b = b.max_io_bytes(m);
            }
            b.build(ctrl)?
        }
    };
    dev.set_batch_scheduling(!a.no_batch_sched);
    dev.set_poll(std::time::Duration::from_micros(a.poll_us));
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    let mut saved = a.clone();
    saved.foreground = false;
    saved.recover_id = None;
    let started = |info: &DevInfo| {
        DEVICE_STARTED.store(true, Ordering::SeqCst);
        saved.id = Some(info.dev_id);
        state::save(
            info.dev_id,
            &DevState {
                args: saved.clone(),
                pid: std::process::id(),
                target: json.clone(),
            },
        );
        let text = list::describe(info.dev_id)
            .unwrap_or_else(|e| format!("dev id {}: {e}\n", info.dev_id));
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{text}");
        if notify {
            let _ = writeln!(out, "{READY}");
        }
        let _ = out.flush();
    };
    let opts = RunOptions {
        handle_signals: true,
        ..RunOptions::default()
    };
    let id = dev.info().dev_id;
    let reason = dev.run(target, opts, started)?;
    if let StopReason::Requested(_) = reason {
        state::remove(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::is_warning;

    #[test]
    fn test_is_warning() {
        assert!(is_warning(
            "ublk[12]: warning: kernel lacks X; falling back to copy mode"
        ));
        assert!(is_warning("ublk[12]: error: queue 0: boom"));
        assert!(!is_warning("ublk[12]: info: queue 0 ready"));
        assert!(!is_warning("warning: not from the logger"));
    }
}
