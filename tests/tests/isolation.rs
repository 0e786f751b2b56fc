//! A CT's root against the host kernel: the seccomp filter every CT runs under. A static probe
//! (tests/probes/syscalls.c, built here with the system's C compiler) makes each denied call
//! from inside a running CT; each must fail with EPERM — the filter's answer, not the EINVAL
//! or EFAULT the kernel gives the same null arguments outside — while ordinary calls work.

use std::path::Path;
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

fn results(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect()
}

#[test]
fn denied_system_calls_fail_with_eperm_inside_a_ct() {
    let h = TestHost::new();
    let probe = berth_tests::probes::build("syscalls", h.dir.path());
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
/// fail with the kernel's reason for it. (What a fresh procfs inside the CT reaches is probed,
/// without writing, by the escape suite below.)
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

// ---- Escape probes: one suite, run against a default (unprivileged) and a privileged CT ----

/// How the suite asks for each kind of CT: a plain `create` is unprivileged.
const DEFAULT_CT: &[&str] = &[];
const PRIVILEGED_CT: &[&str] = &["--privileged"];

/// One line of tests/probes/escape.c: `<probe> BLOCKED <errno> <step>` or `<probe> ALLOWED - <what>`.
#[derive(Debug, Clone)]
struct ProbeResult {
    name: String,
    blocked: bool,
    errno: String,
    detail: String,
}

impl ProbeResult {
    /// A matrix cell; `step` adds where a blocked probe stopped.
    fn cell(&self, step: bool) -> String {
        match (self.blocked, step) {
            (true, false) => format!("blocked: {}", self.errno),
            (true, true) => format!("blocked: {} ({})", self.errno, self.detail),
            (false, _) => format!("ALLOWED ({})", self.detail),
        }
    }
}

/// Why a default CT's probe must fail: the errno, or (where the host lacks the v1 hierarchy
/// the probe mounts) a refused mount of it.
#[derive(Debug)]
enum Expect {
    Errno(&'static str),
    MountRefused,
}

fn host_has(path: &str) -> bool {
    Path::new(path).exists()
}

fn host_v1(controller: &str) -> bool {
    berth_tests::ct::cgroup_roots()
        .iter()
        .any(|r| r.file_name().is_some_and(|n| n == controller))
}

/// Every probe and the errno a default CT gets for it on this kind of host.
fn default_ct_expectations() -> Vec<(&'static str, Expect)> {
    use Expect::*;
    // A fresh procfs in a user namespace: the host's sysctls belong to a uid the CT does not map.
    let absent_or = |host_path: &str, e| Errno(if host_has(host_path) { e } else { "ENOENT" });
    // The CT's own cgroup in each hierarchy (its cgroup namespace's root) belongs to host root.
    let v1 = |c| {
        if host_v1(c) {
            Errno("EACCES")
        } else {
            MountRefused
        }
    };
    vec![
        ("procfs-core-pattern", Errno("EACCES")),
        (
            "procfs-modprobe",
            absent_or("/proc/sys/kernel/modprobe", "EACCES"),
        ),
        ("procfs-drop-caches", Errno("EACCES")),
        ("procfs-sysctls", Errno("EACCES")),
        (
            "procfs-sysrq-trigger",
            absent_or("/proc/sysrq-trigger", "EACCES"),
        ),
        ("proc-core-pattern", Errno("EACCES")),
        ("proc-sysctls", Errno("EACCES")),
        // Masked with /dev/null, or absent where the kernel has no magic SysRq.
        (
            "proc-sysrq-trigger",
            absent_or("/proc/sysrq-trigger", "MASKED"),
        ),
        // The CT's /sys is read-only and the kernel keeps a user namespace from making any
        // sysfs view of it less restricted (fs/namespace.c, locked mount flags).
        ("sysfs-remount-rw", Errno("EPERM")),
        ("sysfs-fresh-rw", Errno("EPERM")),
        ("debugfs-mount", Errno("EPERM")),
        // seccomp (bpf, handles, modules, kexec), before any capability check.
        ("bpf-map-by-id", Errno("EPERM")),
        ("bpf-prog-by-id", Errno("EPERM")),
        ("bpf-link-by-id", Errno("EPERM")),
        ("bpffs-mount", Errno("EPERM")),
        // New hierarchies may only be created in the initial cgroup namespace.
        ("cgroup1-release-agent", Errno("EPERM")),
        // Through the cgroup namespace the mount's root is the CT's cgroup: no release_agent.
        (
            "cgroup1-memory-release-agent",
            if host_v1("memory") {
                Errno("ENOENT")
            } else {
                MountRefused
            },
        ),
        ("cgroup-memory-limit", v1("memory")),
        ("cgroup-pids-limit", v1("pids")),
        ("cgroup-cpu-limit", v1("cpu")),
        ("cgroup-devices-allow", v1("devices")),
        // On a hybrid host every controller is on v1: the v2 cgroup has no limit files.
        (
            "cgroup2-limits",
            Errno(if host_v1("memory") {
                "ENOENT"
            } else {
                "EACCES"
            }),
        ),
        // /sys/fs/cgroup shows the CT's own cgroups (systemd needs them): every limit file
        // there belongs to host root, which the CT's user namespace does not map.
        ("cgroup-mounted-limits", Errno("EACCES")),
        ("open-by-handle", Errno("EPERM")),
        // mknod of a device node in a user namespace (and the devices cgroup).
        ("mknod-block", Errno("EPERM")),
        ("mknod-dev-mem", Errno("EPERM")),
        ("init-module", Errno("EPERM")),
        ("finit-module", Errno("EPERM")),
        ("kexec-load", Errno("EPERM")),
        ("kexec-file-load", Errno("EPERM")),
        // The host's pids do not exist in the CT's pid namespace.
        ("ptrace-host-pid", Errno("ESRCH")),
        ("kill-host-pid", Errno("ESRCH")),
        ("setns-host-netns", Errno("ENOENT")),
    ]
}

/// What a privileged CT certainly cannot do either, because berth applies it to every CT:
/// the seccomp filter, the pid and cgroup namespaces, the devices cgroup, a read-only /proc/sys.
const PRIVILEGED_BLOCKED: &[(&str, &str)] = &[
    ("proc-core-pattern", "EROFS"),
    ("proc-sysctls", "EROFS"),
    ("bpf-map-by-id", "EPERM"),
    ("bpf-prog-by-id", "EPERM"),
    ("bpf-link-by-id", "EPERM"),
    ("bpffs-mount", "EPERM"),
    ("cgroup1-release-agent", "EPERM"),
    ("open-by-handle", "EPERM"),
    ("mknod-block", "EPERM"),
    ("mknod-dev-mem", "EPERM"),
    ("init-module", "EPERM"),
    ("finit-module", "EPERM"),
    ("kexec-load", "EPERM"),
    ("kexec-file-load", "EPERM"),
    ("ptrace-host-pid", "ESRCH"),
    ("kill-host-pid", "ESRCH"),
    ("setns-host-netns", "ENOENT"),
];

/// Creates, starts and probes one CT, then removes it; the results in the probe's order.
fn run_escape_probes(h: &TestHost, probe: &Path, ctid: &str, create: &[&str]) -> Vec<ProbeResult> {
    let mut args = vec!["create", ctid];
    args.extend(create);
    h.ok(&args);
    h.ok(&["start", ctid]);
    let in_ct = h.root.join("root").join(ctid).join("escape-probe");
    std::fs::copy(probe, &in_ct).unwrap();
    // The test's own pid as the host sees it: a process that exists only outside the CT.
    let host_pid = std::process::id().to_string();
    let (code, out, err) = h.exec(ctid, &["/escape-probe", &host_pid]);
    assert_eq!(code, 0, "escape probe in CT {ctid}: {out}{err}");
    let results: Vec<ProbeResult> = out
        .lines()
        .map(|l| {
            let mut f = l.splitn(4, ' ');
            let (name, verdict, errno, detail) = (
                f.next().unwrap_or_default(),
                f.next().unwrap_or_default(),
                f.next().unwrap_or_default(),
                f.next().unwrap_or_default(),
            );
            assert!(
                matches!(verdict, "BLOCKED" | "ALLOWED"),
                "probe line in CT {ctid}: {l:?}"
            );
            ProbeResult {
                name: name.to_owned(),
                blocked: verdict == "BLOCKED",
                errno: errno.to_owned(),
                detail: detail.to_owned(),
            }
        })
        .collect();
    std::fs::remove_file(&in_ct).unwrap();
    h.ok(&["stop", "--fast", ctid]);
    h.ok(&["destroy", ctid]);
    results
}

/// Both columns of the matrix: each probe in a default and in a privileged CT, printed.
fn escape_matrix(ctids: [&str; 2]) -> (Vec<ProbeResult>, Vec<ProbeResult>) {
    let h = TestHost::new();
    let probe = berth_tests::probes::build("escape", h.dir.path());
    let unpriv = run_escape_probes(&h, &probe, ctids[0], DEFAULT_CT);
    let priv_ = run_escape_probes(&h, &probe, ctids[1], PRIVILEGED_CT);
    h.assert_clean();
    let names: Vec<&str> = unpriv.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        priv_.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        "both CTs ran the same probes"
    );
    println!("{:<30} {:<24} privileged CT", "escape probe", "default CT");
    for (u, p) in unpriv.iter().zip(&priv_) {
        // The privileged column says where a probe stopped when it got further than in the
        // default CT (a mount that worked, a different errno).
        let further = p.blocked && (p.errno != u.errno || p.detail != u.detail);
        println!("{:<30} {:<24} {}", u.name, u.cell(false), p.cell(further));
    }
    for (what, rs) in [("a default", &unpriv), ("a privileged", &priv_)] {
        let n = rs.len();
        let b = rs.iter().filter(|r| r.blocked).count();
        println!(
            "probes blocked in {what} CT: {b}/{n} ({:.0} %)",
            100.0 * b as f64 / n as f64
        );
    }
    (unpriv, priv_)
}

/// Every escape probe fails in a default CT, each for the kernel's reason for it (the errno the
/// namespace, ownership, mount lock or seccomp rule gives), not for a missing file or tool.
#[test]
fn every_escape_probe_fails_in_a_default_ct_for_the_right_reason() {
    let (unpriv, _) = escape_matrix(["4641", "4642"]);
    let expect = default_ct_expectations();
    assert_eq!(
        unpriv.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
        expect.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        "the probe and the test know the same probes"
    );
    let wrong: Vec<String> = unpriv
        .iter()
        .zip(&expect)
        .filter(|(r, (_, e))| match e {
            Expect::Errno(errno) => !r.blocked || r.errno != *errno,
            Expect::MountRefused => !r.blocked || !r.detail.starts_with("mount-"),
        })
        .map(|(r, (_, e))| format!("{}: {} (expected {e:?})", r.name, r.cell(true)))
        .collect();
    assert!(wrong.is_empty(), "in a default CT:\n{}", wrong.join("\n"));
    // The refusal met a real handle of the CT's own files, not a made-up one.
    let handle = unpriv.iter().find(|r| r.name == "open-by-handle").unwrap();
    assert!(
        handle.detail.contains("):ok,"),
        "name_to_handle_at found no file of the CT to name: {}",
        handle.detail
    );
}

/// The same suite in a privileged CT: several probes succeed there (the matrix says which);
/// what berth applies to every CT still holds.
#[test]
fn escape_probes_in_a_privileged_ct_still_meet_seccomp_and_the_namespaces() {
    let (_, priv_) = escape_matrix(["4643", "4644"]);
    for (name, errno) in PRIVILEGED_BLOCKED {
        let r = priv_
            .iter()
            .find(|r| r.name == *name)
            .unwrap_or_else(|| panic!("probe {name} did not run"));
        assert!(
            r.blocked && r.errno == *errno,
            "{name} in a privileged CT: {} (expected {errno})",
            r.cell(true)
        );
    }
}
