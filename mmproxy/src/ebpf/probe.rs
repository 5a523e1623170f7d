//! Whether the kernel side could load here, without attaching anything: for
//! `mmproxy check`. Loading creates the maps and runs the verifier on every
//! program; all of it is freed when the object is dropped at the end of the call,
//! so nothing on the host changes.
use aya::programs::{SchedClassifier, SkLookup};
use aya::EbpfLoader;
use mmproxy_common::{map_names, program_names};

use super::{prog_err, EbpfError, FAIL_ENV, OBJECT};

/// Whether this binary carries the BPF object (`cargo xtask build` embeds it).
pub fn object_embedded() -> bool {
    !OBJECT.is_empty()
}

/// Loads the object and every program as start-up may, then drops them.
pub fn probe() -> Result<(), EbpfError> {
    if std::env::var(FAIL_ENV).as_deref() == Ok("1") {
        return Err(EbpfError::ForcedFailure);
    }
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::FLOWS, 1)
        .map_max_entries(map_names::UDP_RELAY, 1)
        .map_max_entries(map_names::UDP_RELEASE, 1)
        .load(OBJECT)
        .map_err(|e| EbpfError::Load(Box::new(e)))?;
    let missing = |name| EbpfError::Missing {
        kind: "program",
        name,
    };
    let name = program_names::SK_LOOKUP;
    let sk_lookup: &mut SkLookup = ebpf
        .program_mut(name)
        .ok_or(missing(name))?
        .try_into()
        .map_err(|source| prog_err(name, source))?;
    sk_lookup.load().map_err(|source| prog_err(name, source))?;
    for name in [
        program_names::TC_EGRESS,
        program_names::TC_INGRESS,
        program_names::TC_UDP_IN,
        program_names::TC_LO_EGRESS,
    ] {
        let tc: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(missing(name))?
            .try_into()
            .map_err(|source| prog_err(name, source))?;
        tc.load().map_err(|source| prog_err(name, source))?;
    }
    Ok(())
}

/// Whether the running kernel has tc links (TCX, Linux 6.6), which the return
/// path's programs are attached through; `None` when the release is unreadable.
pub fn has_tcx() -> Option<bool> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut parts = release.trim().split(['.', '-']);
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= (6, 6))
}

#[cfg(test)]
mod tests {
    /// Every program of the object, the UDP relay's included, passes this
    /// kernel's verifier (tc programs are otherwise only loaded when attached).
    #[test]
    #[cfg(mmproxy_bpf_object)]
    fn every_program_passes_the_verifier() {
        crate::testing::in_netns("every_program_passes_the_verifier", |_, _| async {
            if let Err(e) = super::probe() {
                let mut chain = format!("{e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain.push_str(&format!(": {s}"));
                    source = s.source();
                }
                panic!("{chain}");
            }
        });
    }
}
