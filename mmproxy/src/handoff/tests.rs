//! The handoff between two "instances" in one test process: the offer on one
//! runtime task, the takeover on a blocking thread, real sockets passed.
use std::io::{Read, Write};
use std::os::fd::AsFd;

use super::*;

fn set(text: &str) -> ListenSet {
    ListenSet {
        text: format!("tcp {text} test-{}", std::process::id()),
    }
}

#[test]
fn layout_round_trips_and_rejects_nonsense() {
    let l = Layout {
        metrics: true,
        groups: vec![2, 1],
    };
    assert_eq!(Layout::parse(&l.line()), Some(l));
    assert_eq!(Layout::parse("SOCKETS 1 2 1").map(|l| l.total()), Some(5));
    for bad in [
        "",
        "SOCKETS",
        "SOCKETS 2 1",
        "SOCKETS 0",
        "SOCKETS 0 0",
        "SOCKETS 0 x",
        "HELLO 0 1",
    ] {
        assert_eq!(Layout::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn names_are_stable_and_differ_by_listen_set() {
    let a = set("0.0.0.0:8443-8443");
    assert_eq!(a.socket_name(), set("0.0.0.0:8443-8443").socket_name());
    assert_ne!(a.socket_name(), set("0.0.0.0:8444-8444").socket_name());
    assert!(a.socket_name().len() < 100);
    // FNV-1a's published test vector: the name must not change between builds.
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_new_instance_gets_the_same_listening_socket_and_the_offer() {
    let s = set("handoff");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let offer = Offer::bind(&s, &[vec![listener.as_fd()]], None)
        .unwrap()
        .expect("name free");
    assert!(
        Offer::bind(&s, &[vec![listener.as_fd()]], None)
            .unwrap()
            .is_none(),
        "a second offer under the same name"
    );
    // A connection queued before the handoff is accepted after it.
    let mut early = std::net::TcpStream::connect(addr).unwrap();
    let s2 = s.clone();
    let new = tokio::task::spawn_blocking(move || {
        let t = take_over(&s2).unwrap().expect("someone offers");
        assert_eq!(t.old_pid, std::process::id() as i32);
        assert!(t.metrics.is_none());
        assert_eq!(t.groups.len(), 1);
        let mut groups = t.groups;
        let taken = std::net::TcpListener::from(groups.remove(0).remove(0));
        let (control, _) = Takeover {
            groups: Vec::new(),
            ..t
        }
        .finish()
        .unwrap();
        (taken, control)
    });
    let successor = offer.successor().await;
    assert_eq!(successor.pid, std::process::id() as i32);
    successor.release();
    let (taken, control) = new.await.unwrap();
    drop(offer);
    drop(listener);
    assert_eq!(taken.local_addr().unwrap(), addr);
    taken.set_nonblocking(false).unwrap();
    let (mut conn, _) = taken.accept().unwrap();
    early.write_all(b"queued").unwrap();
    let mut buf = [0u8; 6];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"queued");
    // The new instance now offers under the same name, on the inherited socket,
    // and a third instance takes over from it.
    let again = Offer::inherit(control, &s, &[vec![taken.as_fd()]], None).unwrap();
    let s3 = s.clone();
    let third = tokio::task::spawn_blocking(move || {
        let t = take_over(&s3).unwrap().expect("the new instance offers");
        let port = std::net::TcpListener::from(t.groups[0][0].try_clone().unwrap())
            .local_addr()
            .unwrap();
        t.finish().unwrap();
        port
    });
    again.successor().await.release();
    assert_eq!(third.await.unwrap(), addr);
    drop(again);
    // Nobody offers any more: a fourth instance starts as usual.
    let s4 = s.clone();
    let fourth = tokio::task::spawn_blocking(move || take_over(&s4).map(|t| t.is_none()));
    assert!(fourth.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_different_listen_set_is_refused_and_the_offer_stands() {
    let s = set("refuse");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let offer = Offer::bind(&s, &[vec![listener.as_fd()]], None)
        .unwrap()
        .unwrap();
    let name = s.address().unwrap();
    let client = tokio::task::spawn_blocking(move || {
        let mut c = UnixStream::connect_addr(&name).unwrap();
        c.write_all(b"MMPROXY-HANDOFF 1 udp 0.0.0.0:1-1\n").unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        answer
    });
    tokio::select! {
        _ = offer.successor() => panic!("handed over to a different listen set"),
        answer = client => assert!(answer.unwrap().starts_with("REFUSED "), "refused with a reason"),
    }
}
