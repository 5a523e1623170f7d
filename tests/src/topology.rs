//! The standard test network:
//!
//! ```text
//! client 198.51.100.9 ──► lb (HAProxy) 192.0.2.1 ──► host 192.0.2.2 (mmproxy, service on lo)
//!                                                      └─► gw 203.0.113.1 (dead end: the default route)
//! ```
//! With [`Topology::with_app`] a fourth namespace `app` holds a service reached over a
//! veth, `host` being its default gateway (the container case):
//!
//! ```text
//! host app0 203.0.113.129/25 ──► app eth0 203.0.113.130/25 (default via host)
//! ```
//! No namespace has a route out of the machine; every address is from a
//! documentation range.
use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use crate::netns::Netns;

pub const CLIENT_V4: &str = "198.51.100.9";
pub const CLIENT_V6: &str = "2001:db8:c::9";
/// The balancer's address on the client side (HAProxy's frontends bind here).
pub const FRONT_V4: &str = "198.51.100.1";
pub const FRONT_V6: &str = "2001:db8:c::1";
/// The balancer's address towards the host: the proxy address mmproxy sees.
pub const LB_V4: &str = "192.0.2.1";
pub const LB_V6: &str = "2001:db8:1::1";
/// A second balancer address, for "not in the allowed subnets".
pub const LB_OTHER_V4: &str = "192.0.2.3";
pub const LB_OTHER_V6: &str = "2001:db8:1::3";
/// The host running mmproxy.
pub const HOST_V4: &str = "192.0.2.2";
pub const HOST_V6: &str = "2001:db8:1::2";
pub const GW_V4: &str = "203.0.113.1";
pub const GW_V6: &str = "2001:db8:f::1";
/// The `app` namespace's service address and the host's end of its veth (`app0`);
/// the /25 is more specific than gw0's 203.0.113.0/24.
pub const APP_V4: &str = "203.0.113.130";
pub const APP_V6: &str = "2001:db8:a::2";
pub const APP_GW_V4: &str = "203.0.113.129";
pub const APP_GW_V6: &str = "2001:db8:a::1";

/// `ip` (either family, without brackets) and `port` as `addr:port`, IPv6 in brackets.
pub fn sock(ip: &str, port: u16) -> String {
    match ip.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => panic!("{ip}: not an IP address"),
    }
}

pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub host: Netns,
    pub gw: Netns,
    /// Only with [`Topology::with_app`].
    pub app: Option<Netns>,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let t = Self {
            client: Netns::new("client")?,
            lb: Netns::new("lb")?,
            host: Netns::new("host")?,
            gw: Netns::new("gw")?,
            app: None,
        };
        t.client.link("eth0", &t.lb, "front")?;
        t.client.addr("eth0", &format!("{CLIENT_V4}/24"))?;
        t.client.addr("eth0", &format!("{CLIENT_V6}/64"))?;
        t.client.ip(&["route", "add", "default", "via", FRONT_V4])?;
        t.client
            .ip(&["-6", "route", "add", "default", "via", FRONT_V6])?;
        t.lb.addr("front", &format!("{FRONT_V4}/24"))?;
        t.lb.addr("front", &format!("{FRONT_V6}/64"))?;

        t.lb.link("back", &t.host, "eth0")?;
        for a in [LB_V4, LB_OTHER_V4] {
            t.lb.addr("back", &format!("{a}/24"))?;
        }
        for a in [LB_V6, LB_OTHER_V6] {
            t.lb.addr("back", &format!("{a}/64"))?;
        }
        t.host.addr("eth0", &format!("{HOST_V4}/24"))?;
        t.host.addr("eth0", &format!("{HOST_V6}/64"))?;

        // A veth into an otherwise empty namespace stands in for the default route;
        // its end has an address so that neighbour resolution succeeds.
        t.host.link("gw0", &t.gw, "eth0")?;
        t.host.addr("gw0", "203.0.113.2/24")?;
        t.host.addr("gw0", "2001:db8:f::2/64")?;
        t.gw.addr("eth0", &format!("{GW_V4}/24"))?;
        t.gw.addr("eth0", &format!("{GW_V6}/64"))?;
        t.host.ip(&["route", "add", "default", "via", GW_V4])?;
        t.host
            .ip(&["-6", "route", "add", "default", "via", GW_V6])?;
        Ok(t)
    }

    /// The standard topology plus the `app` namespace behind `host`'s `app0`.
    pub fn with_app() -> Result<Self> {
        let mut t = Self::new()?;
        let app = Netns::new("app")?;
        t.host.link("app0", &app, "eth0")?;
        t.host.addr("app0", &format!("{APP_GW_V4}/25"))?;
        t.host.addr("app0", &format!("{APP_GW_V6}/64"))?;
        app.addr("eth0", &format!("{APP_V4}/25"))?;
        app.addr("eth0", &format!("{APP_V6}/64"))?;
        app.ip(&["route", "add", "default", "via", APP_GW_V4])?;
        app.ip(&["-6", "route", "add", "default", "via", APP_GW_V6])?;
        t.app = Some(app);
        Ok(t)
    }
}
