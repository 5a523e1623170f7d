//! Which TCX links (the tc programs aya attaches on Linux 6.6+) a process holds, by
//! interface name and direction: read from the process's descriptors
//! (`/proc/<pid>/fdinfo`), independently of anything the daemon says about itself.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use crate::netns::Netns;

/// A BPF link or program a process holds, from one `/proc/<pid>/fdinfo` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub link_type: Option<String>,
    pub prog_id: u32,
    pub ifindex: Option<u32>,
    pub attach_type: Option<String>,
}

/// Every descriptor of `pid` that refers to a BPF program (directly or through a
/// link), sorted.
pub fn held_by(pid: i32) -> Result<Vec<Held>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let Some(prog_id) = field("prog_id:").and_then(|v| v.parse().ok()) else {
            continue;
        };
        out.push(Held {
            link_type: field("link_type:"),
            prog_id,
            ifindex: field("ifindex:").and_then(|v| v.parse().ok()),
            attach_type: field("attach_type:"),
        });
    }
    out.sort();
    Ok(out)
}

/// (interface, "ingress" | "egress") for every TCX link `pid` holds. A link whose
/// interface no longer exists in `ns` (a defunct link) shows as `#<ifindex>`.
pub fn tcx_links(pid: i32, ns: &Netns) -> Result<BTreeSet<(String, &'static str)>> {
    let names = interface_names(ns)?;
    let mut out = BTreeSet::new();
    for held in held_by(pid)? {
        if held.link_type.as_deref() != Some("tcx") {
            continue;
        }
        let ifindex = held.ifindex.unwrap_or(0);
        let dir = match held.attach_type.as_deref() {
            Some(a) if a.contains("egress") => "egress",
            _ => "ingress",
        };
        let name = names
            .get(&ifindex)
            .cloned()
            .unwrap_or_else(|| format!("#{ifindex}"));
        out.insert((name, dir));
    }
    Ok(out)
}

/// `(name, direction)` pairs, for comparing with [`tcx_links`].
pub fn links(pairs: &[(&str, &'static str)]) -> BTreeSet<(String, &'static str)> {
    pairs.iter().map(|(n, d)| (n.to_string(), *d)).collect()
}

fn interface_names(ns: &Netns) -> Result<BTreeMap<u32, String>> {
    let out = ns.ip_output(&["-o", "link", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let index = parts.next()?.trim().parse().ok()?;
            let name = parts.next()?.trim();
            // A veth shows as "app0@if2".
            let name = name.split('@').next()?.to_owned();
            Some((index, name))
        })
        .collect())
}

/// `"prog_id":N` of every BPF link in the system, per `bpftool link show -j`: tcx
/// links included, whatever the bpftool version makes of their type.
pub fn attached_prog_ids() -> Result<BTreeSet<u32>> {
    // bpftool fails when a link it has just listed goes away before it opens it
    // (other tests' daemons come and go): try again.
    let mut tries = 0;
    let out = loop {
        match crate::netns::output(
            std::process::Command::new("bpftool").args(["link", "show", "-j"]),
        ) {
            Ok(out) => break out,
            Err(e) if tries >= 20 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    };
    Ok(out
        .split("\"prog_id\":")
        .skip(1)
        .filter_map(|s| {
            s.split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect())
}
