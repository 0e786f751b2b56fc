//! The seccomp filter every CT runs under (its init and everything `berth exec`/`enter` start):
//! host-wide system calls fail with EPERM, everything else is allowed.
//!
//! A CT's root must not reach the host kernel's global state: loading modules or a new kernel,
//! opening files by handle (which escapes the mount namespace), the eBPF and perf subsystems
//! (berth's own maps and programs are reachable by id through `bpf(2)`), the kernel keyrings
//! (not namespaced), raw port I/O, swap, process accounting, the clocks and quotas. These are
//! the calls Docker's and LXC's default profiles deny for the same reason. What a system
//! container needs stays: mount, pivot_root, unshare, setns (systemd), ptrace of its own
//! processes (debuggers; the pid namespace bounds them), userfaultfd and kcmp (CRIU).
//!
//! EPERM rather than killing the caller: programs probe for features and fall back.
//!
//! The filter is installed without `no_new_privs` (seccompiler's `apply_filter` would set
//! it): a system container's setuid programs (`sudo`, `su`) must keep working. Installing a
//! filter without it needs CAP_SYS_ADMIN in the caller's user namespace, which the CT's init
//! has until it execs (and `berth exec`'s child, root in the CT).

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The system calls denied to every CT, with their names (for the probes and the docs).
pub fn denied() -> Vec<(&'static str, libc::c_long)> {
    let mut v = vec![
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("keyctl", libc::SYS_keyctl),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("acct", libc::SYS_acct),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("settimeofday", libc::SYS_settimeofday),
        ("quotactl", libc::SYS_quotactl),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("vhangup", libc::SYS_vhangup),
    ];
    // Calls that exist on x86 only.
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
        ("nfsservctl", libc::SYS_nfsservctl),
        ("_sysctl", libc::SYS__sysctl),
    ]);
    v
}

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the CTs' seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("the CTs' seccomp filter has no support for this architecture ({0})")]
    Arch(&'static str),
}

/// The compiled filter (built once by `start`/`exec` before forking, installed by the child).
pub fn filter() -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied()
        .into_iter()
        .map(|(_, nr)| (nr, Vec::new()))
        .collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    BpfProgram::try_from(f).map_err(SeccompError::Build)
}

/// Installs `prog` on the calling thread (and what it execs), without `no_new_privs`.
/// Async-signal-safe: meant for a forked child before exec.
pub fn install(prog: &BpfProgram) -> Result<(), String> {
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points at `prog`'s instructions, alive for the call; the kernel copies
    // them (seccomp_prepare_filter).
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(format!(
            "install the seccomp filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_builds_and_denies_in_a_child() {
        let prog = filter().unwrap();
        assert!(
            prog.len() > denied().len(),
            "one check per denied call at least"
        );
        // Installed in a forked child only: a filter cannot be removed from this process.
        // SAFETY: the child only makes raw syscalls and _exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                // no_new_privs lets an unprivileged test install the filter too.
                // SAFETY: plain prctl on this process.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = match install(&prog) {
                    Err(_) => 2,
                    Ok(()) => {
                        // SAFETY: invalid arguments; only the errno matters.
                        let r = unsafe { libc::syscall(libc::SYS_bpf, 0, 0, 0) };
                        let e = std::io::Error::last_os_error().raw_os_error();
                        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
                        if r == -1 && e == Some(libc::EPERM) && pid > 0 {
                            0
                        } else {
                            1
                        }
                    }
                };
                // SAFETY: leaving the forked test child without running the harness' code.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    st,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "bpf(2) must fail with EPERM under the filter (2: install failed)"
                );
            }
        }
    }
}
