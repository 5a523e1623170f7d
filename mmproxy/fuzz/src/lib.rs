//! The daemon's pure parts, compiled on their own for fuzzing: the PROXY codec (its
//! datagram entry point included), the allowed-subnets parser and the command line.
//!
//! They have no I/O and depend only on the address newtypes and a few small crates,
//! so the fuzz build takes the same source files instead of the whole daemon:
//! building tokio, aya and the rest with sanitizer instrumentation took about eight
//! minutes, this takes seconds, and a daemon module that does not compile cannot stop
//! fuzzing.
#[path = "../../src/addr.rs"]
pub mod addr;
#[path = "../../src/allowed_subnets.rs"]
pub mod allowed_subnets;
#[path = "../../src/cli.rs"]
pub mod cli;
#[path = "../../src/proxy_protocol/mod.rs"]
pub mod proxy_protocol;

pub mod frame;
