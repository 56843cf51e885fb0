//! `ublk list` and `ublk features`, in the text layout of ublksrv and kublk.

use crate::state;
use anyhow::Result;
use ublk_core::{kernel_release, Ctrl, DeviceFlags};

/// One device as ublksrv prints it.
pub(crate) fn describe(id: u32) -> Result<String> {
    let mut ctrl = Ctrl::open()?;
    let v = device_json(&mut ctrl, id)?;
    Ok(format_text(&v))
}

fn device_json(ctrl: &mut Ctrl, id: u32) -> Result<serde_json::Value> {
    let info = ctrl.dev_info2(id)?;
    let (params, numbers) = ctrl.get_params(id).unwrap_or_else(|e| {
        log::debug!("device {id}: GET_PARAMS failed: {e}");
        Default::default()
    });
    let target = state::load(id)
        .map(|s| s.target)
        .unwrap_or(serde_json::Value::Null);
    Ok(serde_json::json!({
        "dev_id": info.dev_id,
        "nr_hw_queues": info.nr_hw_queues,
        "queue_depth": info.queue_depth,
        "block_size": 1u32 << params.logical_bs_shift,
        "dev_capacity": params.size >> 9,
        "max_rq_size": info.max_io_buf_bytes,
        "daemon_pid": info.daemon_pid,
        "flags": info.flags.bits(),
        "flag_names": info.flags.names(),
        "state": info.state.name(),
        "ublkc": format!("{}:{}", numbers.char_dev.0, numbers.char_dev.1),
        "ublkb": format!("{}:{}", numbers.disk_dev.0, numbers.disk_dev.1),
        "owner": format!("{}:{}", info.owner_uid, info.owner_gid),
        "target": target,
        "log": Some(state::log_path(id)).filter(|p| p.exists()),
    }))
}

fn format_text(v: &serde_json::Value) -> String {
    let mut s = format!(
        "dev id {}: nr_hw_queues {} queue_depth {} block size {} dev_capacity {}\n",
        v["dev_id"], v["nr_hw_queues"], v["queue_depth"], v["block_size"], v["dev_capacity"]
    );
    s += &format!(
        "\tmax rq size {} daemon pid {} flags {:#x} state {}\n",
        v["max_rq_size"],
        v["daemon_pid"],
        v["flags"].as_u64().unwrap_or(0),
        v["state"].as_str().unwrap_or("?")
    );
    s += &format!(
        "\tublkc: {} ublkb: {} owner: {}\n",
        v["ublkc"].as_str().unwrap_or("?"),
        v["ublkb"].as_str().unwrap_or("?"),
        v["owner"].as_str().unwrap_or("?")
    );
    if !v["target"].is_null() {
        s += &format!("\ttarget {}\n", v["target"]);
    }
    s
}

pub(crate) fn run(id: Option<u32>, json: bool) -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let explicit = id.is_some();
    let ids = match id {
        Some(id) => vec![id],
        None => Ctrl::list(),
    };
    let mut devs = Vec::new();
    for id in ids {
        match device_json(&mut ctrl, id) {
            Ok(v) => devs.push(v),
            Err(e) if explicit => return Err(e),
            // Other users' devices are not ours to show.
            Err(e) if matches!(e.downcast_ref(), Some(ublk_core::CtrlError::NotOwner(_))) => {
                log::debug!("device {id}: {e}")
            }
            Err(e) => log::warn!("device {id}: {e}"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&devs)?);
    } else {
        for d in &devs {
            print!("{}", format_text(d));
        }
    }
    Ok(())
}

pub(crate) fn features() -> Result<()> {
    let mut ctrl = Ctrl::open()?;
    let f = ctrl.features()?;
    println!(
        "ublk features of Linux {}: {:#x}",
        kernel_release(),
        f.bits()
    );
    for bit in 0..64 {
        let flag = DeviceFlags::from_bits_retain(1 << bit);
        if f.contains(flag) {
            let name = flag
                .flag_name()
                .map_or(format!("bit{bit}"), |n| format!("UBLK_F_{n}"));
            println!("\t{name:<32} (since Linux {})", flag.since().unwrap_or("?"));
        }
    }
    Ok(())
}

/// `ublk owner NAME`: "UID GID" of an unprivileged device, for a udev rule
/// (`PROGRAM="ublk owner %k", OWNER="%c{1}", GROUP="%c{2}"`). Ordinary devices are an error, so
/// the rule leaves their nodes to root.
pub(crate) fn owner(name: &str) -> Result<()> {
    let base = name.rsplit('/').next().unwrap_or(name);
    let rest = base
        .strip_prefix("ublkc")
        .or_else(|| base.strip_prefix("ublkb"))
        .unwrap_or(base);
    // A partition (ublkb3p1) belongs to the owner of its disk.
    let digits = rest.split('p').next().unwrap_or(rest);
    let id: u32 = digits
        .parse()
        .map_err(|_| anyhow::anyhow!("{name:?} names no ublk device (ublkcN, ublkbN or N)"))?;
    let info = Ctrl::open()?.dev_info2(id)?;
    if !info.flags.contains(DeviceFlags::UNPRIVILEGED_DEV) {
        anyhow::bail!("device {id} is not an unprivileged device: it belongs to root");
    }
    println!("{} {}", info.owner_uid, info.owner_gid);
    Ok(())
}

/// `ublk resize -n ID [SIZE]`: UPDATE_SIZE (Linux 6.16) for the targets whose daemon needs no
/// telling: null, and loop within its backing file (by default growing the device to the
/// file's size, e.g. after `truncate -s`).
pub(crate) fn resize(id: u32, size: Option<u64>) -> Result<()> {
    use anyhow::{bail, Context};
    use std::io::{Seek, SeekFrom};
    let mut ctrl = Ctrl::open()?;
    if !ctrl.features()?.contains(DeviceFlags::UPDATE_SIZE) {
        bail!(
            "resizing a device needs Linux 6.16 or later (UPDATE_SIZE); this kernel is {}",
            kernel_release()
        );
    }
    let info = ctrl.dev_info(id)?;
    if !matches!(
        info.state,
        ublk_core::DevState::Live | ublk_core::DevState::Quiesced
    ) {
        bail!(
            "device {id} is {}: only a started device can be resized",
            info.state.name()
        );
    }
    let (params, _) = ctrl.get_params(id)?;
    let mut st = state::load(id).ok_or_else(|| {
        anyhow::anyhow!("no saved state for device {id}: it was not added by this tool")
    })?;
    let name = st.target["name"].as_str().unwrap_or("?").to_string();
    let new = match name.as_str() {
        "null" => size.ok_or_else(|| anyhow::anyhow!("give the new size of a null device"))?,
        "loop" => {
            let path = st.target["backing_file"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no backing file recorded for device {id}"))?
                .to_string();
            let have = std::fs::File::open(&path)
                .and_then(|mut f| f.seek(SeekFrom::End(0)))
                .with_context(|| format!("cannot read the size of {path}"))?;
            let new = size.unwrap_or(have);
            if new > have {
                bail!("{path} has {have} bytes, fewer than {new}: grow it first");
            }
            new
        }
        other => bail!(
            "resizing a {other} device is not supported (its size is that of the image or export)"
        ),
    };
    let lbs = 1u64 << params.logical_bs_shift;
    let new = new / lbs * lbs;
    if new == 0 {
        bail!("a device needs at least one block of {lbs} bytes");
    }
    ctrl.update_size(id, new)
        .with_context(|| format!("cannot resize device {id}"))?;
    st.target["dev_size"] = serde_json::json!(new);
    if name == "null" {
        st.args.size = Some(new);
    }
    state::save(id, &st);
    println!("device {id}: {} -> {new} bytes", params.size);
    Ok(())
}
