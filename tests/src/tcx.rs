//! Which TCX links (the tc programs aya attaches on Linux 6.6+) a process holds, by
//! interface name and direction: read from the process's descriptors
//! (`/proc/<pid>/fdinfo`), independently of anything the daemon says about itself.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use crate::netns::Netns;

/// (interface, "ingress" | "egress") for every TCX link `pid` holds. A link whose
/// interface no longer exists in `ns` (a defunct link) shows as `#<ifindex>`.
pub fn tcx_links(pid: i32, ns: &Netns) -> Result<BTreeSet<(String, &'static str)>> {
    let names = interface_names(ns)?;
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if field("link_type:").as_deref() != Some("tcx") {
            continue;
        }
        let ifindex: u32 = field("ifindex:").and_then(|v| v.parse().ok()).unwrap_or(0);
        let dir = match field("attach_type:") {
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
