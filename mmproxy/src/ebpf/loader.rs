//! aya's loader, built without reading the kernel's BTF when the object does not need it.
//!
//! aya 0.14's `EbpfLoader::new()` reads and parses `/sys/kernel/btf/vmlinux` at once:
//! a 5 MiB file that becomes about 17 MiB of heap, two thirds of mmproxy's peak
//! memory at start-up (BENCHMARKS.md, "Start-up memory"). aya needs it only for CO-RE
//! relocations, and mmproxy's programs have none (they read packet and socket
//! fields through helpers and context offsets the kernel fixes itself). Newer aya
//! parses it lazily but needs rustc 1.98 (ARCHITECTURE.md, "Pinned toolchain").
//!
//! Until then the loader is built on a short-lived thread under a seccomp filter
//! that fails open(2)/openat(2)/openat2(2) with ENOENT: aya then finds no kernel BTF,
//! exactly as on a kernel built without it. Nothing else runs on that thread and
//! the filter dies with it. When the object does have CO-RE relocations, or the
//! filter cannot be installed, the loader is built the ordinary way (more memory,
//! same features).
use aya::EbpfLoader;

/// A loader for `object`, without the kernel's BTF when `object` needs none.
pub(super) fn loader(object: &[u8]) -> EbpfLoader<'static> {
    if needs_kernel_btf(object) {
        return EbpfLoader::new();
    }
    let built = std::thread::Builder::new()
        .name("bpf-loader".into())
        .spawn(|| match deny_open_on_this_thread() {
            Ok(()) => Ok(EbpfLoader::new()),
            Err(e) => Err(e),
        })
        .map(|t| t.join());
    match built {
        Ok(Ok(Ok(loader))) => loader,
        Ok(Ok(Err(e))) => {
            tracing::debug!(
                error = &e as &dyn std::error::Error,
                "cannot skip the kernel's BTF; parsing it"
            );
            EbpfLoader::new()
        }
        _ => EbpfLoader::new(),
    }
}

/// Whether `object` has CO-RE relocations (then aya needs the kernel's BTF). An
/// object that does not parse says yes: aya's own load reports the problem.
pub(super) fn needs_kernel_btf(object: &[u8]) -> bool {
    aya_obj::Object::parse(object)
        .map(|o| o.has_btf_relocations())
        .unwrap_or(true)
}

/// Installs, on the calling thread only, a seccomp filter failing every open with
/// ENOENT. Irrevocable: call it on a thread that ends right after.
fn deny_open_on_this_thread() -> std::io::Result<()> {
    use libc::{sock_filter, sock_fprog, BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let stmt = |code: u32, k: u32| sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Jumps to the last instruction (the ENOENT answer) from instruction `at`.
    let deny_if = |at: u8, nr: libc::c_long, last: u8| sock_filter {
        code: (BPF_JMP | BPF_JEQ | BPF_K) as u16,
        jt: last - at - 1,
        jf: 0,
        k: nr as u32,
    };
    let opens: &[libc::c_long] = &[
        libc::SYS_openat,
        libc::SYS_openat2,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_open,
    ];
    // ld nr; one jeq per call; ret allow; ret errno.
    let last = (opens.len() + 2) as u8;
    let mut program = vec![stmt(BPF_LD | BPF_W | BPF_ABS, 0)];
    for (i, nr) in opens.iter().enumerate() {
        program.push(deny_if(i as u8 + 1, *nr, last));
    }
    program.push(stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW));
    program.push(stmt(
        BPF_RET | BPF_K,
        libc::SECCOMP_RET_ERRNO | (libc::ENOENT as u32 & libc::SECCOMP_RET_DATA),
    ));
    let fprog = sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: prctl with integer arguments; no_new_privs is per thread (needed to
    // install a filter without CAP_SYS_ADMIN) and ends with it.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fprog` points at `program`, alive for the whole call; without the
    // TSYNC flag the filter applies to this thread only.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &raw const fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory saving rests on this: a program that starts using CO-RE makes
    /// the loader parse the kernel's BTF again (correct, but ~17 MiB more at
    /// start-up), and this test says so.
    #[test]
    #[cfg(mmproxy_bpf_object)]
    fn the_embedded_object_needs_no_kernel_btf() {
        assert!(!needs_kernel_btf(super::super::OBJECT));
    }

    #[test]
    fn opens_fail_on_the_filtered_thread_only() {
        let on_thread = std::thread::spawn(|| {
            deny_open_on_this_thread().unwrap();
            std::fs::File::open("/proc/self/status").map(drop)
        })
        .join()
        .unwrap();
        assert_eq!(on_thread.unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
