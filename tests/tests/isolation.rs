//! A CT's root against the host kernel: the seccomp filter every CT runs under. A static probe
//! (tests/probes/syscalls.c, built here with the system's C compiler) makes each denied call
//! from inside a running CT; each must fail with EPERM — the filter's answer, not the EINVAL
//! or EFAULT the kernel gives the same null arguments outside — while ordinary calls work.

use std::path::{Path, PathBuf};
use std::process::Command;

use berth_tests::ct::TestHost;

/// The denied calls the probe knows (a subset of `berth_runtime::container::seccomp::denied`
/// that covers each group: modules, kexec, handles, eBPF/perf, keyrings, port I/O, swap, acct).
const DENIED: &[&str] = &[
    "bpf",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "perf_event_open",
    "add_key",
    "request_key",
    "keyctl",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "acct",
];

fn build_probe(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/syscalls.c");
    let out = dir.join("syscalls-probe");
    let st = Command::new("cc")
        .args(["-static", "-O1", "-Wall", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc (build-essential, installed by xtask/setup.sh)");
    assert!(st.success(), "building {}: {st}", src.display());
    out
}

fn results(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}

#[test]
fn denied_system_calls_fail_with_eperm_inside_a_ct() {
    let h = TestHost::new();
    let probe = build_probe(h.dir.path());
    // Outside any CT the same calls fail for other reasons: the EPERM inside is the filter's.
    let mut args: Vec<&str> = DENIED.to_vec();
    args.push("getpid");
    let outside = Command::new(&probe).args(&args).output().unwrap();
    let outside = results(&String::from_utf8_lossy(&outside.stdout));
    assert!(
        outside.iter().any(|(n, e)| n == "bpf" && e != "EPERM"),
        "bpf(2) with null arguments is EPERM even outside: the probe would prove nothing: {outside:?}"
    );

    h.ok(&["create", "4621"]);
    h.ok(&["start", "4621"]);
    let in_ct = h.root.join("root/4621/syscalls-probe");
    std::fs::copy(&probe, &in_ct).unwrap();
    let mut cmd = vec!["exec", "4621", "--", "/syscalls-probe"];
    cmd.extend(&args);
    let got = results(&h.ok(&cmd));
    assert_eq!(got.len(), args.len(), "{got:?}");
    for (name, errno) in &got {
        if name == "getpid" {
            assert_eq!(errno, "OK", "ordinary calls must work under the filter");
        } else {
            assert_eq!(errno, "EPERM", "{name} inside the CT: {got:?}");
        }
    }
    // The CT's init runs under the filter too, not only what `berth exec` starts.
    let status = h.ok(&["exec", "4621", "--", "cat", "/proc/1/status"]);
    let seccomp = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(str::trim);
    assert_eq!(
        seccomp,
        Some("2"),
        "init's seccomp mode (2 = filter): {status}"
    );

    std::fs::remove_file(&in_ct).unwrap();
    h.ok(&["stop", "--fast", "4621"]);
    h.ok(&["destroy", "4621"]);
}

/// What a default CT already cannot do through its own /proc, /dev and pid namespace; each must
/// fail with the kernel's reason for it. (A fresh procfs mounted inside a default CT still
/// writes the host's core_pattern: that probe waits for the user namespace to be the default,
/// since running it here would change this machine.)
#[test]
fn a_default_ct_cannot_reach_host_state_through_proc_dev_or_pids() {
    let h = TestHost::new();
    h.ok(&["create", "4631"]);
    h.ok(&["start", "4631"]);
    let probes: &[(&str, &str)] = &[
        ("mknod /tmp/sda b 8 0", "Operation not permitted"),
        (
            "echo x > /proc/sys/kernel/core_pattern",
            "Read-only file system",
        ),
        ("echo 1 > /proc/sys/kernel/panic", "Read-only file system"),
        ("echo 3 > /proc/sys/vm/drop_caches", "Read-only file system"),
        ("kill -9 999999", "No such process"),
    ];
    for (cmd, why) in probes {
        let (code, _, err) = h.exec("4631", &["sh", "-c", cmd]);
        assert_ne!(code, 0, "`{cmd}` succeeded inside the CT");
        assert!(
            err.contains(why),
            "`{cmd}` failed, but not with {why:?}: {err}"
        );
    }
    // /proc/sysrq-trigger is masked with /dev/null (char 1:3), or absent where the kernel has
    // no magic SysRq (as on this machine's): a write never reaches the kernel.
    let (code, out, err) = h.exec(
        "4631",
        &[
            "sh",
            "-c",
            "test ! -e /proc/sysrq-trigger || test \"$(stat -c %t:%T /proc/sysrq-trigger)\" = 1:3",
        ],
    );
    assert_eq!(code, 0, "/proc/sysrq-trigger is not masked: {out}{err}");
    // The CT's own network sysctls are its own to change.
    let (code, _, err) = h.exec(
        "4631",
        &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
    );
    assert_eq!(code, 0, "the CT's own net sysctls: {err}");
    h.ok(&["stop", "--fast", "4631"]);
    h.ok(&["destroy", "4631"]);
}
