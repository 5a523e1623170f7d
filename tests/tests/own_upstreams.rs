//! mmproxy's own upstream connections never come back to mmproxy (issue #14, item
//! 6). A listen rule that covers the service — a wildcard range with the port taken
//! from the header, or the host's own address as both listen address and target —
//! used to steer mmproxy's connection to the service back to mmproxy (or refuse it
//! as outside the allowed subnets). Now sk_lookup passes it on to the service; a
//! configuration that can only loop refuses to start.
use std::io::{Read, Write};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use mmproxy::proxy_protocol::encode_v1;
use mmproxy_tests::args::{DaemonArgs, Ebpf};
use mmproxy_tests::balancer::{connect, dgram, proxied, UdpBalancer};
use mmproxy_tests::client::roundtrip;
use mmproxy_tests::daemon::{counter, AllowedFile, Daemon};
use mmproxy_tests::topology::*;
use mmproxy_tests::udp_upstream::{answer, UdpEcho};
use mmproxy_tests::upstream::EchoServer;
use mmproxy_tests::{require_root, WAIT};

/// The port the header names: inside the range, not its first port (which mmproxy's
/// own socket holds).
const PORT: u16 = 20123;
/// The port the balancer sends to (its frontend forwards to another port of the
/// range): with the service on the host's own address, mmproxy must answer UDP from
/// the address and port the balancer used, which the service cannot also hold.
const SENT_TO: u16 = 20124;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Listen {
    /// `-l 0.0.0.0:20000-20999 -l [::]:20000-20999 -4 127.0.0.1 -6 [::1]`: the set-up
    /// of issue #14; the service on loopback.
    Wildcard,
    /// `-l 192.0.2.2:20000-20999 … -4 192.0.2.2 -6 2001:db8:1::2`: the host's own
    /// address is both listened on and the service's.
    Specific,
}

impl Listen {
    fn service(self, v6: bool) -> &'static str {
        match (self, v6) {
            (Listen::Wildcard, false) => "127.0.0.1",
            (Listen::Wildcard, true) => "::1",
            (Listen::Specific, false) => HOST_V4,
            (Listen::Specific, true) => HOST_V6,
        }
    }

    fn args(self, proto: Proto) -> DaemonArgs {
        let args = match proto {
            Proto::Tcp => DaemonArgs::tcp(),
            Proto::Udp => DaemonArgs::udp(),
        };
        let (l4, l6) = match self {
            Listen::Wildcard => ("0.0.0.0", "::"),
            Listen::Specific => (HOST_V4, HOST_V6),
        };
        args.listen(format!("{}-20999", sock(l4, 20000)))
            .listen(format!("{}-20999", sock(l6, 20000)))
            .target4(self.service(false))
            .target6(format!("[{}]", self.service(true)))
    }
}

/// Every (protocol, listen address) with both families: the proxied client reaches
/// the service on the header's port from its own address, with an allow-list that
/// holds only the balancers (mmproxy's upstream comes from the client's address,
/// which sk_lookup used to refuse), and sk_lookup counts the pass.
#[test]
fn upstream_connections_reach_the_service_not_mmproxy() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let allowed = AllowedFile::new(&format!("{LB_V4}/32\n{LB_V6}/128\n"))?;
    let mut client_port = 42000;
    for proto in [Proto::Tcp, Proto::Udp] {
        for listen in [Listen::Wildcard, Listen::Specific] {
            let case = format!("{proto:?}, {listen:?}");
            let args = listen
                .args(proto)
                .allowed(&allowed)
                .ebpf(Ebpf::On)
                .verbose(1);
            let d = Daemon::start(&t.host, &args).with_context(|| case.clone())?;
            for (v6, lb, host, client_ip) in [
                (false, LB_V4, HOST_V4, CLIENT_V4),
                (true, LB_V6, HOST_V6, CLIENT_V6),
            ] {
                client_port += 1;
                let client = sock(client_ip, client_port);
                let service = sock(listen.service(v6), PORT);
                let mm = sock(host, SENT_TO);
                let header_dst: SocketAddr = sock(host, PORT).parse()?;
                let why = || format!("{case}, {client} via {mm} to {service}\n{}", d.log_text());
                let seen = match proto {
                    Proto::Tcp => {
                        let echo = EchoServer::start(&t.host, &service)?;
                        let mut c = connect(&t, lb, &mm)?;
                        c.write_all(&encode_v1(client.parse()?, header_dst))?;
                        roundtrip(&mut c, b"to the service").with_context(why)?;
                        echo.next_peer(WAIT).with_context(why)?
                    }
                    Proto::Udp => {
                        let echo = UdpEcho::start(&t.host, &[&service])?;
                        let balancer = UdpBalancer::new(&t, lb)?;
                        let (client, mm): (SocketAddr, SocketAddr) = (client.parse()?, mm.parse()?);
                        balancer.send(&dgram(client, header_dst), b"to the service", mm)?;
                        let (got, from) = balancer.recv().with_context(why)?;
                        assert_eq!(from, mm, "{case}");
                        assert_eq!(got, answer(client, b"to the service"), "{case}");
                        echo.next_peer(WAIT).with_context(why)?
                    }
                };
                assert_eq!(seen.to_string(), client, "{case}");
            }
            let line = d.stats()?;
            assert!(counter(&line, "kernel_own_upstream") >= 2, "{case}: {line}");
            // The balancer's two connections (or datagrams) were still steered.
            assert!(counter(&line, "kernel_steered") >= 2, "{case}: {line}");
        }
    }
    Ok(())
}

/// A header naming the range's first port — mmproxy's own socket, which no lookup
/// can tell from a service — is refused per connection, with the reason logged.
#[test]
fn a_header_naming_mmproxys_own_socket_is_refused() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    let args = Listen::Wildcard.args(Proto::Tcp).ebpf(Ebpf::On).verbose(1);
    let d = Daemon::start(&t.host, &args)?;
    let mut c = proxied(&t, LB_V4, &sock(HOST_V4, 20000), &sock(CLIENT_V4, 42100))?;
    let mut rest = Vec::new();
    // Closed without a byte (an error counts as closed too: no relay was set up).
    let _ = c.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    d.wait_for("upstream_is_mmproxy", WAIT)?;
    let line = d.stats()?;
    assert_eq!(counter(&line, "tcp_proxied"), 0, "{line}");
    // mmproxy's own socket never accepted the would-be upstream connection.
    assert_eq!(counter(&line, "tcp_accepted"), 1, "{line}");
    Ok(())
}

/// A fixed target that is one of mmproxy's own listening sockets can only loop:
/// start-up refuses it, naming the flag and the listen address, TCP and UDP.
#[test]
fn a_target_on_mmproxys_own_socket_refuses_to_start() -> Result<()> {
    require_root!();
    let t = Topology::new()?;
    for args in [
        DaemonArgs::tcp()
            .listen("0.0.0.0:8443")
            .target4("127.0.0.1:8443"),
        DaemonArgs::udp()
            .listen("[::]:20000-20999")
            .target6("[::1]:20000")
            .ebpf(Ebpf::On),
    ] {
        let mut d = Daemon::spawn(&t.host, &args)?;
        let status = d.wait_exit(WAIT)?;
        let log = d.log_text();
        assert!(!status.success(), "{args:?} started:\n{log}");
        assert!(
            log.contains("is where mmproxy itself listens") && log.contains("-l "),
            "{args:?}:\n{log}"
        );
    }
    Ok(())
}
