//! mmproxy's upstream connections must reach the service, never mmproxy itself.
//!
//! Two ways an upstream can come back: a listen rule of the kernel side covers the
//! service's address and port (a wildcard range with the header's port, or
//! `-dynamic-destination`) — the sk_lookup program passes mmproxy's own registered
//! flows to the normal lookup for that (ARCHITECTURE.md, step 1) — or the upstream
//! *is* one of mmproxy's own listening sockets, which no lookup can tell from the
//! service. The second is refused here: at start-up when a fixed `-4`/`-6` target
//! is one ([`check_config`]), per connection when the header chose it
//! ([`OwnSockets`]).
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;

use crate::cli::{Args, ListenSpec, TargetSpec};

/// A configuration whose upstream connections can only come back to mmproxy.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error(
        "-{flag} {target} is where mmproxy itself listens (-l {listen}): every upstream \
         connection would come back to mmproxy instead of reaching the service; give the \
         service (and -{flag}) another port or address"
    )]
    TargetIsListener {
        flag: char,
        target: SocketAddr,
        listen: String,
    },
}

/// Refuses a configuration whose fixed `-4`/`-6` target is one of the sockets mmproxy
/// listens on (a range listens on its first port). With `-dynamic-destination` the
/// targets serve LOCAL headers only and are checked per connection instead; without
/// a target port the header's port decides, which is checked per connection too.
pub fn check_config(args: &Args) -> Result<(), LoopError> {
    if args.dynamic_destination {
        return Ok(());
    }
    for (flag, target) in [('4', args.target4), ('6', args.target6)] {
        let Some(port) = target.port else {
            continue;
        };
        let to = SocketAddr::new(target.addr, port);
        if let Some(spec) = args.listen.iter().find(|l| own_socket_covers(bound(l), to)) {
            return Err(LoopError::TargetIsListener {
                flag,
                target: to,
                listen: shown(spec),
            });
        }
    }
    Ok(())
}

/// Whether the kernel side could take an upstream connection for a proxy's: a listen
/// rule covers a target's address and possible ports, or the header chooses the
/// destination. Then TCP flows are registered with the kernel side (UDP flows always
/// are), so sk_lookup can tell mmproxy's own connections apart.
pub fn upstream_may_match_a_listen_rule(args: &Args) -> bool {
    args.dynamic_destination
        || [args.target4, args.target6]
            .iter()
            .any(|t| args.listen.iter().any(|l| rule_covers(l, t)))
}

fn rule_covers(spec: &ListenSpec, target: &TargetSpec) -> bool {
    let addr = spec.addr == target.addr
        || (spec.addr.is_unspecified() && spec.addr.is_ipv4() == target.addr.is_ipv4());
    let port = target.port.is_none_or(|p| spec.ports.contains(&p));
    addr && port
}

/// The address a listen spec's socket is bound to (a range: its first port).
fn bound(spec: &ListenSpec) -> SocketAddr {
    SocketAddr::new(spec.addr, *spec.ports.start())
}

fn shown(spec: &ListenSpec) -> String {
    let first = bound(spec);
    if spec.is_range() {
        format!("{first}-{}", spec.ports.end())
    } else {
        first.to_string()
    }
}

/// Whether a connection to `to` would be taken by a socket bound to `own`. IPv6
/// listeners are IPV6_V6ONLY, so each family only covers its own.
fn own_socket_covers(own: SocketAddr, to: SocketAddr) -> bool {
    own.port() == to.port()
        && own.is_ipv4() == to.is_ipv4()
        && (own.ip() == to.ip() || (own.ip().is_unspecified() && is_local(to.ip())))
}

/// Whether `ip` is one of this host's addresses: what a wildcard listener receives.
/// Asked only for an upstream on a port mmproxy listens on, so the probe (a socket
/// bound to it, closed at once) costs nothing on the common path.
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The addresses mmproxy's own listening sockets are bound to: an upstream among
/// them would be accepted by mmproxy again (and, with `-dynamic-destination`, a
/// header naming one could chain connection after connection).
#[derive(Clone, Debug, Default)]
pub struct OwnSockets(Arc<[SocketAddr]>);

impl OwnSockets {
    pub fn from_args(args: &Args) -> Self {
        Self(args.listen.iter().map(bound).collect())
    }

    /// Whether a connection or datagram to `to` would reach mmproxy itself.
    pub fn covers(&self, to: SocketAddr) -> bool {
        self.0.iter().any(|own| own_socket_covers(*own, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["mmproxy"];
        v.extend_from_slice(extra);
        Args::try_from_iter(v).unwrap_or_else(|e| panic!("{extra:?}: {e}"))
    }

    #[test]
    fn a_fixed_target_on_a_listening_socket_is_refused_naming_both() {
        for (given, flag) in [
            (&["-l", "0.0.0.0:8443", "-4", "127.0.0.1:8443"][..], '4'),
            (&["-l", "127.0.0.1:8443", "-4", "127.0.0.1:8443"], '4'),
            (&["-l", "0.0.0.0:20000-20999", "-4", "127.0.0.1:20000"], '4'),
            (&["-l", "[::]:443", "-4", "127.0.0.1:9000"], '6'),
            (&["-l", "[::1]:443", "-4", "127.0.0.1:9000"], '6'),
        ] {
            let e = check_config(&args(given)).expect_err(&format!("{given:?}"));
            let LoopError::TargetIsListener { flag: f, .. } = &e;
            assert_eq!(*f, flag, "{given:?}: {e}");
            let text = e.to_string();
            assert!(
                text.contains("-l ") && text.contains("come back to mmproxy"),
                "{text}"
            );
        }
    }

    #[test]
    fn configurations_that_can_reach_the_service_start() {
        for given in [
            &[][..],
            // Another port of a range: sk_lookup passes mmproxy's own flows.
            &["-l", "0.0.0.0:20000-20999", "-4", "127.0.0.1:20500"],
            // The header's port: checked per connection.
            &[
                "-l",
                "0.0.0.0:20000-20999",
                "-4",
                "127.0.0.1",
                "-6",
                "[::1]",
            ],
            // Another address on the same port; the other family's wildcard.
            &["-l", "192.0.2.1:443", "-4", "127.0.0.1:443"],
            &["-l", "[::]:443", "-4", "127.0.0.1:443", "-6", "[::1]:444"],
            // The targets only serve LOCAL headers: checked per connection.
            &["-l", "0.0.0.0:443", "-dynamic-destination"],
        ] {
            assert!(check_config(&args(given)).is_ok(), "{given:?}");
        }
    }

    #[test]
    fn own_sockets_cover_their_address_and_local_ones_behind_a_wildcard() {
        let own = OwnSockets::from_args(&args(&[
            "-l",
            "0.0.0.0:20000-20999",
            "-l",
            "[2001:db8::1]:443",
        ]));
        for (to, covered) in [
            ("127.0.0.1:20000", true),
            ("0.0.0.0:20000", true),
            ("127.0.0.1:20001", false),
            // Not an address of this host: a service elsewhere.
            ("192.0.2.200:20000", false),
            ("[::1]:20000", false),
            ("[2001:db8::1]:443", true),
            ("[2001:db8::2]:443", false),
        ] {
            let to: SocketAddr = to.parse().unwrap();
            assert_eq!(own.covers(to), covered, "{to}");
        }
    }

    #[test]
    fn flows_are_registered_when_a_rule_may_cover_the_upstream() {
        for (given, may) in [
            (&[][..], false),
            (&["-l", "0.0.0.0:20000-20999", "-4", "127.0.0.1"], true),
            (
                &["-l", "0.0.0.0:20000-20999", "-4", "127.0.0.1:9000"],
                false,
            ),
            (&["-l", "192.0.2.2:20000-20999", "-4", "192.0.2.2"], true),
            (&["-l", "192.0.2.2:20000-20999", "-4", "127.0.0.1"], false),
            (
                &["-l", "[::]:1-2", "-4", "127.0.0.1", "-6", "[::1]:2"],
                true,
            ),
            (&["-l", "0.0.0.0:443", "-dynamic-destination"], true),
        ] {
            assert_eq!(
                upstream_may_match_a_listen_rule(&args(given)),
                may,
                "{given:?}"
            );
        }
    }
}
