//! What [`install`](super::install()) would do, read from the kernel without
//! changing it: for `mmproxy check`.
use super::netlink::{self, Existing, Kind};
use super::plan::{IpFamily, RoutingPlan};
use super::RoutingError;

/// The plan's entries as start-up would find them, and what else uses its table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preview {
    /// Entries start-up would add, as the `ip` command that adds them.
    pub to_add: Vec<String>,
    /// Entries already there, reused as they are.
    pub present: Vec<String>,
    /// Other rules and routes of the same table (an operator's, or another
    /// program's): left alone, but they share the table.
    pub others: Vec<String>,
}

/// Dumps rules and routes (both families) and matches them against `plan`.
pub async fn preview(plan: &RoutingPlan) -> Result<Preview, RoutingError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
    let task = tokio::spawn(conn);
    let result = preview_with(&handle, plan).await;
    task.abort();
    result
}

async fn preview_with(
    handle: &rtnetlink::Handle,
    plan: &RoutingPlan,
) -> Result<Preview, RoutingError> {
    let lo_index = netlink::loopback_index(handle).await?;
    let mut existing = Vec::new();
    for kind in [Kind::Rule, Kind::Route] {
        for family in [IpFamily::V4, IpFamily::V6] {
            match netlink::dump(handle, kind, family).await {
                Ok(entries) => existing.extend(entries),
                Err(e) if family == IpFamily::V6 && netlink::is_af_unsupported(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
    let items = plan.items();
    let mut out = Preview::default();
    for item in &items {
        match existing.iter().any(|e| e.matches(item, lo_index)) {
            true => out.present.push(item.to_string()),
            false => out.to_add.push(item.to_string()),
        }
    }
    for entry in &existing {
        let in_table = match entry {
            Existing::Rule(m) => netlink::rule_table(m) == plan.table,
            Existing::Route(m) => netlink::route_table(m) == plan.table,
        };
        if in_table && !items.iter().any(|i| entry.matches(i, lo_index)) {
            out.others.push(match entry {
                Existing::Rule(_) => entry.describe(),
                Existing::Route(m) => format!(
                    "{} route {:?} /{} table {}",
                    IpFamily::of(m.header.address_family).ip_cmd(),
                    m.header.kind,
                    m.header.destination_prefix_length,
                    plan.table
                ),
            });
        }
    }
    Ok(out)
}
