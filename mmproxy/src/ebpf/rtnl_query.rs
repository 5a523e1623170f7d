//! One request and its one answer over `NETLINK_ROUTE`, synchronously: what the
//! relay asks the kernel when a flow is handed over (a route, a neighbour). The
//! async `rtnetlink` handle would need a connection task per question; these are
//! a few per flow, on the listener's own thread.
use std::io;

use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};

/// The kernel's answer to `msg`: `Ok(Some(_))` its message, `Ok(None)` one of the
/// errors in `absent` (the kernel has no such thing), `Err` anything else.
pub fn ask(msg: RouteNetlinkMessage, absent: &[i32]) -> io::Result<Option<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);

    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&NlAddr::new(0, 0))?;
    socket.send(&buf, 0)?;
    let (reply, _) = socket.recv_from_full()?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(m) => Ok(Some(m)),
        NetlinkPayload::Error(e) => {
            let err = e.to_io();
            match err.raw_os_error() {
                Some(code) if absent.contains(&code) => Ok(None),
                _ => Err(err),
            }
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected netlink answer",
        )),
    }
}
