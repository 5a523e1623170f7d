//! The command line from arbitrary argv (arguments split at NUL bytes, any bytes,
//! go-mmproxy spellings normalised first). Checked: parsing never panics, and what
//! it accepts keeps the flags' contracts (listen ports non-zero and ordered, target
//! ports non-zero, the ranges clap enforces); every listen and target address
//! written back out parses to the same value.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use libfuzzer_sys::fuzz_target;
use mmproxy_codec::cli::{normalize_go_flags, Args, ListenSpec, TargetSpec};

fn show(addr: std::net::IpAddr) -> String {
    match addr {
        std::net::IpAddr::V4(a) => a.to_string(),
        std::net::IpAddr::V6(a) => format!("[{a}]"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut argv = vec![OsString::from("mmproxy")];
    if !data.is_empty() {
        argv.extend(
            data.split(|&b| b == 0)
                .map(|a| OsString::from_vec(a.to_vec())),
        );
    }
    assert!(normalize_go_flags(argv.clone()).len() >= argv.len());
    let args = match Args::try_from_iter(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(!args.listen.is_empty());
    for l in &args.listen {
        assert!(
            *l.ports.start() > 0 && l.ports.start() <= l.ports.end(),
            "{l:?}"
        );
        let text = format!("{}:{}-{}", show(l.addr), l.ports.start(), l.ports.end());
        assert_eq!(text.parse::<ListenSpec>().as_ref(), Ok(l), "{text}");
    }
    for t in [&args.target4, &args.target6] {
        assert_ne!(t.port, Some(0));
        let text = match t.port {
            Some(p) => format!("{}:{p}", show(t.addr)),
            None => show(t.addr),
        };
        assert_eq!(text.parse::<TargetSpec>().as_ref(), Ok(t), "{text}");
    }
    assert!((1..=1024).contains(&args.listeners));
    assert!(args.verbose <= 2);
    assert!((108..=65551).contains(&args.max_header_len));
    assert!((1..=0xffff_fff0).contains(&args.route_table));
    let _ = format!("{args:?}");
});
