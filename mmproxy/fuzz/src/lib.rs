//! The pure PROXY codec, compiled on its own for fuzzing.
//!
//! The codec has no I/O and depends only on the address newtypes, so the fuzz build
//! takes the same source files instead of the whole daemon: building tokio, aya and
//! the rest with sanitizer instrumentation took about eight minutes, this takes
//! seconds, and a daemon module that does not compile cannot stop fuzzing.
#[path = "../../src/addr.rs"]
pub mod addr;
#[path = "../../src/proxy_protocol/mod.rs"]
pub mod proxy_protocol;
