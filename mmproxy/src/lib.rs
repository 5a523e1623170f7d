//! mmproxy: accepts connections and datagrams from a PROXY-protocol load balancer,
//! strips the header and talks to the service from the original client's address.
pub mod addr;
pub mod proxy_protocol;
