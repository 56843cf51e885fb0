//! `ublk nbd-list`: the exports an NBD server offers, and what a client of each would get.

use crate::{add, NbdServerArgs};
use anyhow::{bail, Context, Result};
use ublk_targets::nbd::{self, ConnectOptions, ExportInfo, NbdError};

/// Lists the server's exports (`NBD_OPT_LIST`) and negotiates each (`NBD_OPT_GO`) to show its
/// size, block sizes and transmission flags. An export named in the address (`--uri .../NAME`,
/// `--export_name`) is described alone, without listing; a server that refuses to list (as
/// nbd-server does by default) gets its default export described.
pub(crate) fn run(server: &NbdServerArgs, json: bool) -> Result<()> {
    let uri = add::nbd_uri(server)?;
    let opts = ConnectOptions::default()
        .for_uri(&uri)
        .context("cannot set up TLS")?;
    // Exports to describe, and why there is only one if it was not listed.
    let (entries, single) = if uri.export.is_empty() {
        match nbd::list_exports(&uri.addr, &opts) {
            Ok(l) => (
                l.into_iter().map(|e| (e.name, e.description)).collect(),
                None,
            ),
            Err(e @ NbdError::OptionRefused { .. }) => {
                log::warn!("{}: {e}; describing the default export", uri.addr);
                let why = "the server does not list its exports: name one with --export_name";
                (vec![(String::new(), String::new())], Some(why))
            }
            Err(e) => {
                return Err(e).with_context(|| format!("cannot list the exports of {}", uri.addr))
            }
        }
    } else {
        (vec![(uri.export.clone(), String::new())], Some(""))
    };
    let described: Vec<serde_json::Value> = entries
        .iter()
        .map(|(name, listed)| {
            let probed = nbd::probe_export(&uri.addr, name, &opts);
            if let Err(err) = &probed {
                log::debug!("nbd: export {name:?}: {err}");
            }
            let description = match &probed {
                Ok(ExportInfo {
                    description: Some(d),
                    ..
                }) if listed.is_empty() => d.clone(),
                _ => listed.clone(),
            };
            export_json(name, &description, probed.map_err(|e| with_causes(&e)))
        })
        .collect();
    if let (Some(why), [v]) = (single, &described[..]) {
        // The one export asked for (or the default one) cannot be opened: that is the answer.
        if let Some(e) = v["error"].as_str() {
            let hint = if why.is_empty() {
                String::new()
            } else {
                format!(" ({why})")
            };
            bail!("export {} of {}: {e}{hint}", v["name"], uri.addr);
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&described)?);
    } else if described.is_empty() {
        println!("{}: no exports listed", uri.addr);
    } else {
        for v in &described {
            print!("{}", format_text(v));
        }
    }
    Ok(())
}

/// Transmission flag names, lower case (`read-only`, `send-flush`, ...), without `has-flags`.
fn flag_names(info: &ExportInfo) -> Vec<String> {
    info.flags
        .iter_names()
        .filter(|(n, _)| *n != "HAS_FLAGS")
        .map(|(n, _)| n.to_lowercase().replace('_', "-"))
        .collect()
}

/// `e` followed by its causes ("cannot connect to h:1: Connection refused").
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn export_json(
    name: &str,
    description: &str,
    info: std::result::Result<ExportInfo, String>,
) -> serde_json::Value {
    let mut v = serde_json::json!({ "name": name, "description": description });
    match info {
        Ok(i) => {
            v["size"] = i.size.into();
            v["read_only"] = i
                .flags
                .contains(nbd::proto::TransmissionFlags::READ_ONLY)
                .into();
            v["flags"] = flag_names(&i).into();
            v["block_size"] = serde_json::json!({
                "min": i.block.min,
                "preferred": i.block.preferred,
                "max_payload": i.block.max_payload,
                "advertised": i.block_sizes_advertised,
            });
            v["structured_replies"] = i.structured.into();
            v["extended_headers"] = i.extended.into();
        }
        Err(e) => v["error"] = e.into(),
    }
    v
}

fn format_text(v: &serde_json::Value) -> String {
    let mut s = format!("export {}", v["name"]);
    if let Some(e) = v["error"].as_str() {
        s += &format!(": cannot open: {e}\n");
    } else {
        let b = &v["block_size"];
        let replies = if v["extended_headers"] == true {
            "extended headers"
        } else if v["structured_replies"] == true {
            "structured"
        } else {
            "simple"
        };
        s += &format!(
            ": size {} ({}), block sizes {}/{}/{}{}\n\tflags: {}\n\treplies: {replies}\n",
            v["size"],
            human(v["size"].as_u64().unwrap_or(0)),
            b["min"],
            b["preferred"],
            b["max_payload"],
            if b["advertised"] == true {
                ""
            } else {
                " (not advertised)"
            },
            v["flags"]
                .as_array()
                .map(|a| a.iter().filter_map(|f| f.as_str()).collect::<Vec<_>>())
                .unwrap_or_default()
                .join(" "),
        );
    }
    if let Some(d) = v["description"].as_str().filter(|d| !d.is_empty()) {
        s += &format!("\tdescription: {d}\n");
    }
    s
}

/// `512 MiB`, `1.5 GiB`: a size for people.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd::proto::{BlockSizes, TransmissionFlags};

    fn info(flags: TransmissionFlags) -> ExportInfo {
        ExportInfo {
            name: "e".into(),
            size: 512 << 20,
            flags,
            block: BlockSizes::default(),
            block_sizes_advertised: false,
            structured: true,
            extended: false,
            used_go: true,
            description: None,
        }
    }

    #[test]
    fn test_export_text() {
        let f = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::READ_ONLY
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::CAN_MULTI_CONN;
        let v = export_json("disk", "my disk", Ok(info(f)));
        let t = format_text(&v);
        assert!(t.starts_with("export \"disk\": size 536870912 (512 MiB), block sizes"));
        assert!(t.contains("(not advertised)"));
        assert!(t.contains("\tflags: read-only send-flush can-multi-conn\n\treplies: structured\n"));
        assert!(t.ends_with("\tdescription: my disk\n"));
        assert_eq!(v["read_only"], true);

        let v = export_json("x", "", Err("refused".into()));
        assert_eq!(format_text(&v), "export \"x\": cannot open: refused\n");
    }

    #[test]
    fn test_human_sizes() {
        assert_eq!(human(512 << 20), "512 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(1000), "1000 B");
    }
}
