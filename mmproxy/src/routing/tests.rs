use std::net::IpAddr;
use std::path::Path;

use netlink_packet_route::route::{RouteAttribute, RouteProtocol, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;

use super::install::Outcome;
use super::netlink::{
    dump, loopback_index, route_is_ours, route_matches, route_message, route_table, rule_is_ours,
    rule_matches, rule_message, rule_table, Existing, Kind,
};
use super::plan::{IpFamily, Item, RouteSpec, RuleSpec, Selector};
use super::*;

fn plan(v4: bool, v6: bool, mark: Option<u32>) -> RoutingPlan {
    RoutingPlan {
        table: 123,
        v4_loopback: v4,
        v6_loopback: v6,
        fwmark: mark,
    }
}

#[test]
fn plan_items_and_their_ip_commands() {
    let lines: Vec<String> = plan(true, true, Some(0x10))
        .items()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        lines,
        [
            "ip route local 0.0.0.0/0 dev lo table 123",
            "ip rule from 127.0.0.0/8 iif lo lookup 123",
            "ip rule fwmark 0x10 lookup 123",
            "ip -6 route local ::/0 dev lo table 123",
            "ip -6 rule from ::1/128 iif lo lookup 123",
            "ip -6 rule fwmark 0x10 lookup 123",
        ]
    );
    assert!(plan(false, false, None).is_empty());
    let only6: Vec<String> = plan(false, true, None)
        .items()
        .iter()
        .map(|i| i.to_string())
        .collect();
    assert_eq!(
        only6,
        [
            "ip -6 route local ::/0 dev lo table 123",
            "ip -6 rule from ::1/128 iif lo lookup 123"
        ]
    );
}

#[test]
fn for_targets_detects_loopback_families() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let p = RoutingPlan::for_targets(7, &[ip("127.0.0.1"), ip("::1")]);
    assert!(p.v4_loopback && p.v6_loopback && p.fwmark.is_none());
    assert_eq!(p.table, 7);
    let p = RoutingPlan::for_targets(7, &[ip("192.0.2.1"), ip("2001:db8::1")]);
    assert!(!p.v4_loopback && !p.v6_loopback && p.is_empty());
    let p = RoutingPlan::for_targets(7, &[ip("127.8.9.10"), ip("2001:db8::1")]).with_fwmark(5);
    assert!(p.v4_loopback && !p.v6_loopback);
    assert_eq!(p.fwmark, Some(5));
    assert!(RoutingPlan::for_targets(7, &[ip("::ffff:127.0.0.1")]).v4_loopback);
}

fn spec(family: IpFamily, selector: Selector) -> RuleSpec {
    RuleSpec {
        family,
        selector,
        table: 123,
    }
}

/// The rule go-mmproxy's documented setup has the operator type, as the kernel
/// dumps it: default protocol, address as written, kernel-chosen priority.
fn go_mmproxy_rule(src: &str, len: u8, table: u32) -> RuleMessage {
    let ip: IpAddr = src.parse().unwrap();
    let mut m = RuleMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.action = RuleAction::ToTable;
    m.header.src_len = len;
    m.header.table = if table < 256 { table as u8 } else { 252 };
    m.attributes = vec![
        RuleAttribute::Table(table),
        RuleAttribute::SuppressPrefixLen(u32::MAX),
        RuleAttribute::Priority(32765),
        RuleAttribute::Source(ip),
        RuleAttribute::Iifname("lo".into()),
    ];
    m
}

#[test]
fn own_rule_messages_match_their_spec() {
    for s in [
        spec(IpFamily::V4, Selector::FromLoopback),
        spec(IpFamily::V6, Selector::FromLoopback),
        spec(IpFamily::V4, Selector::FwMark(0x6d6d_7078)),
        spec(IpFamily::V6, Selector::FwMark(1)),
        RuleSpec {
            table: 1000,
            ..spec(IpFamily::V4, Selector::FromLoopback)
        },
    ] {
        let m = rule_message(&s);
        assert!(rule_matches(&s, &m), "{s:?}");
        assert!(rule_is_ours(&m));
        // And nothing else.
        for other in [
            RuleSpec {
                table: s.table + 1,
                ..s
            },
            RuleSpec {
                family: if s.family == IpFamily::V4 {
                    IpFamily::V6
                } else {
                    IpFamily::V4
                },
                ..s
            },
            RuleSpec {
                selector: Selector::FwMark(99),
                ..s
            },
        ] {
            assert!(!rule_matches(&other, &m), "{other:?} matched {s:?}");
        }
    }
    let big = rule_message(&RuleSpec {
        table: 1000,
        ..spec(IpFamily::V4, Selector::FromLoopback)
    });
    assert_eq!(rule_table(&big), 1000);
}

#[test]
fn go_mmproxy_rules_are_recognised() {
    let s4 = spec(IpFamily::V4, Selector::FromLoopback);
    // As typed (127.0.0.1/8) and as a kernel that masks it stores it.
    assert!(rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 8, 123)));
    assert!(rule_matches(&s4, &go_mmproxy_rule("127.0.0.0", 8, 123)));
    assert!(!rule_is_ours(&go_mmproxy_rule("127.0.0.0", 8, 123)));
    assert!(!rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 32, 123)));
    assert!(!rule_matches(&s4, &go_mmproxy_rule("127.0.0.1", 8, 124)));
    let s6 = spec(IpFamily::V6, Selector::FromLoopback);
    assert!(rule_matches(&s6, &go_mmproxy_rule("::1", 128, 123)));
    assert!(!rule_matches(&s6, &go_mmproxy_rule("::1", 127, 123)));
    assert!(!rule_matches(&s4, &go_mmproxy_rule("::1", 128, 123)));
}

#[test]
fn narrower_or_different_rules_are_not_reused() {
    let s4 = spec(IpFamily::V4, Selector::FromLoopback);
    let base = go_mmproxy_rule("127.0.0.1", 8, 123);

    let mut inverted = base.clone();
    inverted.header.flags.insert(RuleFlags::Invert);
    let mut with_mark = base.clone();
    with_mark.attributes.push(RuleAttribute::FwMark(1));
    let mut other_iif = base.clone();
    other_iif
        .attributes
        .retain(|a| !matches!(a, RuleAttribute::Iifname(_)));
    other_iif
        .attributes
        .push(RuleAttribute::Iifname("eth0".into()));
    let mut no_iif = base.clone();
    no_iif
        .attributes
        .retain(|a| !matches!(a, RuleAttribute::Iifname(_)));
    let mut with_oif = base.clone();
    with_oif
        .attributes
        .push(RuleAttribute::Oifname("lo".into()));
    let mut blackhole = base.clone();
    blackhole.header.action = RuleAction::Blackhole;
    let mut with_tos = base.clone();
    with_tos.header.tos = 0x10;
    let mut with_dst = base.clone();
    with_dst.header.dst_len = 24;
    with_dst
        .attributes
        .push(RuleAttribute::Destination("192.0.2.0".parse().unwrap()));
    let mut suppress = base.clone();
    suppress
        .attributes
        .retain(|a| !matches!(a, RuleAttribute::SuppressPrefixLen(_)));
    suppress
        .attributes
        .push(RuleAttribute::SuppressPrefixLen(0));
    for (name, m) in [
        ("not", inverted),
        ("fwmark", with_mark),
        ("iif eth0", other_iif),
        ("no iif", no_iif),
        ("oif", with_oif),
        ("blackhole", blackhole),
        ("tos", with_tos),
        ("to", with_dst),
        ("suppress_prefixlength 0", suppress),
    ] {
        assert!(!rule_matches(&s4, &m), "{name}");
    }

    let sm = spec(IpFamily::V4, Selector::FwMark(7));
    let mut mark = RuleMessage::default();
    mark.header.family = AddressFamily::Inet;
    mark.header.action = RuleAction::ToTable;
    mark.attributes = vec![RuleAttribute::Table(123), RuleAttribute::FwMark(7)];
    assert!(rule_matches(&sm, &mark));
    mark.attributes.push(RuleAttribute::FwMask(u32::MAX));
    assert!(rule_matches(&sm, &mark));
    mark.attributes.pop();
    mark.attributes.push(RuleAttribute::FwMask(0xff));
    assert!(!rule_matches(&sm, &mark), "a partial mask selects more");
}

#[test]
fn route_matching() {
    let s = RouteSpec {
        family: IpFamily::V4,
        table: 123,
    };
    let m = route_message(&s, 1);
    assert!(route_matches(&s, &m, 1));
    assert!(route_is_ours(&m));
    assert!(!route_matches(&s, &m, 2), "other device");
    assert!(!route_matches(&RouteSpec { table: 124, ..s }, &m, 1));
    assert!(!route_matches(
        &RouteSpec {
            family: IpFamily::V6,
            ..s
        },
        &m,
        1
    ));
    let mut unicast = m.clone();
    unicast.header.kind = RouteType::Unicast;
    assert!(!route_matches(&s, &unicast, 1));
    let mut via = m.clone();
    via.attributes
        .push(RouteAttribute::Gateway(IpAddr::from([192, 0, 2, 1]).into()));
    assert!(!route_matches(&s, &via, 1));
    // An operator's (iproute2's default protocol "boot") counts, not ours.
    let mut boot = m.clone();
    boot.header.protocol = RouteProtocol::Boot;
    assert!(route_matches(&s, &boot, 1) && !route_is_ours(&boot));
    let big = route_message(&RouteSpec { table: 70000, ..s }, 1);
    assert_eq!(route_table(&big), 70000);
    let s6 = RouteSpec {
        family: IpFamily::V6,
        table: 123,
    };
    assert!(route_matches(&s6, &route_message(&s6, 1), 1));
}

#[test]
fn describe_and_report_texts() {
    let r = InstalledRoutes {
        table: 123,
        entries: vec![
            (plan(true, false, None).items()[0], Outcome::Added),
            (
                plan(true, false, None).items()[1],
                Outcome::Reused { ours: false },
            ),
            (
                plan(false, true, None).items()[0],
                Outcome::Skipped("IPv6 is disabled in this kernel"),
            ),
        ],
        lock: None,
        lock_note: None,
    };
    assert_eq!(
        r.describe(),
        "table 123: added `ip route local 0.0.0.0/0 dev lo table 123`; \
         reused existing `ip rule from 127.0.0.0/8 iif lo lookup 123`; \
         skipped `ip -6 route local ::/0 dev lo table 123` (IPv6 is disabled in this kernel)"
    );
    assert!(r.added_any());
    let rep = RemoveReport {
        removed: vec![],
        left_for_others: true,
    };
    assert!(rep.to_string().contains("another mmproxy"));
}

#[test]
fn permission_error_has_a_hint() {
    let e = RoutingError::PermissionDenied {
        what: "adding `ip rule from 127.0.0.0/8 iif lo lookup 123`".into(),
    };
    assert!(e.to_string().contains("needs CAP_NET_ADMIN"), "{e}");
}

/// Privileged tests: each runs in a network namespace of its own, made by
/// unshare(CLONE_NEWNET) on a dedicated thread. The namespace dies with the
/// thread, so nothing survives a failing test, and the host's rules and
/// routes are never touched.
mod netns {
    use super::*;
    use crate::testing::in_netns;
    use std::process::Command;

    fn plan(v4: bool, v6: bool, mark: Option<u32>) -> RoutingPlan {
        RoutingPlan {
            table: 123,
            v4_loopback: v4,
            v6_loopback: v6,
            fwmark: mark,
        }
    }

    /// Every install in these tests keeps its lock files in the test's
    /// own directory.
    async fn install(p: &RoutingPlan, dir: &Path) -> Result<InstalledRoutes, RoutingError> {
        install_with_lock_dir(p, dir).await
    }

    /// Everything rule- and route-related in the namespace, comparable
    /// across calls (sorted debug forms).
    async fn snapshot(h: &Handle) -> Vec<String> {
        let mut out = Vec::new();
        for kind in [Kind::Rule, Kind::Route] {
            for f in [IpFamily::V4, IpFamily::V6] {
                for e in dump(h, kind, f).await.unwrap() {
                    match e {
                        Existing::Rule(r) => out.push(format!("{r:?}")),
                        Existing::Route(mut r) => {
                            // Cache info carries counters that change by themselves.
                            r.attributes
                                .retain(|a| !matches!(a, RouteAttribute::CacheInfo(_)));
                            out.push(format!("{r:?}"));
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }

    async fn count_matching(h: &Handle, p: &RoutingPlan) -> usize {
        let lo = loopback_index(h).await.unwrap();
        let mut n = 0;
        for item in p.items() {
            let kind = match item {
                Item::Rule(_) => Kind::Rule,
                Item::Route(_) => Kind::Route,
            };
            n += dump(h, kind, item.family())
                .await
                .unwrap()
                .iter()
                .filter(|e| e.matches(&item, lo))
                .count();
        }
        n
    }

    /// `ip` run from this thread: a child inherits the thread's namespace.
    fn ip(args: &[&str]) -> Option<String> {
        let out = Command::new("ip").args(args).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn add_go_mmproxy_rules(h: &Handle, lo: u32) {
        // What go-mmproxy's documented setup has the operator type, proto boot.
        let mut r4 = rule_message(&RuleSpec {
            family: IpFamily::V4,
            selector: Selector::FromLoopback,
            table: 123,
        });
        r4.attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_) | RuleAttribute::Source(_)));
        r4.attributes
            .push(RuleAttribute::Source("127.0.0.1".parse().unwrap()));
        let mut req = h.rule().add();
        *req.message_mut() = r4;
        req.execute().await.unwrap();
        let mut r6 = rule_message(&RuleSpec {
            family: IpFamily::V6,
            selector: Selector::FromLoopback,
            table: 123,
        });
        r6.attributes
            .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
        let mut req = h.rule().add();
        *req.message_mut() = r6;
        req.execute().await.unwrap();
        for f in [IpFamily::V4, IpFamily::V6] {
            let mut m = route_message(
                &RouteSpec {
                    family: f,
                    table: 123,
                },
                lo,
            );
            m.header.protocol = RouteProtocol::Boot;
            h.route().add(m).execute().await.unwrap();
        }
    }

    #[test]
    fn install_reuse_remove_in_netns() {
        in_netns("install_reuse_remove_in_netns", |h, dir| async move {
            let before = snapshot(&h).await;
            let p = plan(true, true, Some(0x6d6d_7078));

            let first = install(&p, &dir).await.unwrap();
            let d = first.describe();
            assert!(d.contains("added") && !d.contains("reused"), "{d}");
            assert_eq!(count_matching(&h, &p).await, 6, "one of each");
            if let Some(rules) = ip(&["rule", "show"]) {
                assert!(
                    rules.contains("from 127.0.0.0/8 iif lo lookup 123 proto 109"),
                    "{rules}"
                );
                assert!(
                    rules.contains("fwmark 0x6d6d7078 lookup 123 proto 109"),
                    "{rules}"
                );
            }
            if let Some(routes) = ip(&["-6", "route", "show", "table", "123"]) {
                assert!(
                    routes.contains("local default dev lo proto 109"),
                    "{routes}"
                );
            }

            // Second instance (e.g. the UDP one): adds nothing.
            let second = install(&p, &dir).await.unwrap();
            assert!(!second.added_any(), "{}", second.describe());
            assert!(
                second.describe().contains("shared with"),
                "{}",
                second.describe()
            );
            assert_eq!(count_matching(&h, &p).await, 6, "no duplicates");

            // The first to stop leaves everything for the other.
            let rep = first.remove().await.unwrap();
            assert!(rep.left_for_others, "{rep}");
            assert_eq!(count_matching(&h, &p).await, 6);

            // The last one cleans up, including what the first added.
            let rep = second.remove().await.unwrap();
            assert!(!rep.left_for_others && rep.removed.len() == 6, "{rep}");
            assert_eq!(snapshot(&h).await, before);
        });
    }

    #[test]
    fn go_mmproxy_setup_is_reused_and_left_alone() {
        in_netns(
            "go_mmproxy_setup_is_reused_and_left_alone",
            |h, dir| async move {
                let lo = loopback_index(&h).await.unwrap();
                add_go_mmproxy_rules(&h, lo).await;
                if let Some(rules) = ip(&["rule", "show"]) {
                    eprintln!(
                        "kernel shows the go-mmproxy rule as: {}",
                        rules
                            .lines()
                            .find(|l| l.contains("lookup 123"))
                            .unwrap_or("?")
                    );
                }
                let before = snapshot(&h).await;
                let p = plan(true, true, None);
                let got = install(&p, &dir).await.unwrap();
                assert!(!got.added_any(), "{}", got.describe());
                assert!(
                    got.describe().contains("reused existing"),
                    "{}",
                    got.describe()
                );
                assert_eq!(snapshot(&h).await, before);
                let rep = got.remove().await.unwrap();
                assert!(rep.removed.is_empty(), "{rep}");
                assert_eq!(snapshot(&h).await, before, "the operator's entries stay");

                // With an fwmark the missing rules are added, and only they go.
                let p = plan(true, true, Some(9));
                let got = install(&p, &dir).await.unwrap();
                assert_eq!(
                    got.entries
                        .iter()
                        .filter(|(_, o)| *o == Outcome::Added)
                        .count(),
                    2,
                    "{}",
                    got.describe()
                );
                got.remove().await.unwrap();
                assert_eq!(snapshot(&h).await, before);
            },
        );
    }

    #[test]
    fn leftovers_of_a_killed_instance_are_adopted_then_removed() {
        in_netns(
            "leftovers_of_a_killed_instance_are_adopted_then_removed",
            |h, dir| async move {
                let before = snapshot(&h).await;
                let p = plan(true, false, None);
                let killed = install(&p, &dir).await.unwrap();
                // SIGKILL: no remove(); the kernel drops the process's lock.
                drop(killed);
                let after_kill = snapshot(&h).await;
                assert_ne!(after_kill, before);

                let restarted = install(&p, &dir).await.unwrap();
                assert!(!restarted.added_any(), "{}", restarted.describe());
                assert_eq!(snapshot(&h).await, after_kill, "no duplicates");
                let rep = restarted.remove().await.unwrap();
                assert_eq!(rep.removed.len(), 2, "{rep}");
                assert_eq!(snapshot(&h).await, before);
            },
        );
    }

    #[test]
    fn without_a_lock_only_own_additions_are_removed() {
        in_netns(
            "without_a_lock_only_own_additions_are_removed",
            |h, dir| async move {
                let before = snapshot(&h).await;
                // A file where the lock directory should be: no lock.
                std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
                std::fs::write(&dir, b"not a directory").unwrap();
                let p = plan(true, false, None);
                let got = install(&p, &dir).await.unwrap();
                assert!(
                    got.describe().contains("only what this process added"),
                    "{}",
                    got.describe()
                );
                assert!(got.added_any());
                got.remove().await.unwrap();
                assert_eq!(snapshot(&h).await, before);
                let _ = std::fs::remove_file(&dir);
            },
        );
    }

    #[test]
    fn large_table_ids_work() {
        in_netns("large_table_ids_work", |h, dir| async move {
            let before = snapshot(&h).await;
            let p = RoutingPlan {
                table: 70_000,
                ..plan(true, true, None)
            };
            let got = install(&p, &dir).await.unwrap();
            assert_eq!(count_matching(&h, &p).await, 4);
            if let Some(rules) = ip(&["rule", "show"]) {
                assert!(rules.contains("lookup 70000"), "{rules}");
            }
            got.remove().await.unwrap();
            assert_eq!(snapshot(&h).await, before);
        });
    }
}
