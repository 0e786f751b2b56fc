//! Real distributions booting unprivileged (in a user namespace): Debian 12 with systemd, Debian
//! with sysvinit, busybox; the cgroup a CT's root is given and what it can still not do there;
//! teardown of the cgroups a CT made below its own.
//!
//! The Debian templates come from debootstrap and the Debian mirror (about a minute each), so each
//! is built once, by the one test that boots it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_runtime::cgroups::Hierarchy;
use berth_tests::ct::TestHost;
use berth_tests::skip::skip;

/// What `create` needs for an unprivileged CT: nothing, it is the default.
const UNPRIVILEGED: &[&str] = &[];

/// Upper bound for a boot or a graceful stop in these tests: far above the measured 0.3–0.7 s
/// boot and 0.1–0.5 s stop (the benchmark bar is 3 s), far below the 30 s stop timeout after
/// which berth would kill instead of halting.
const BOUND: Duration = Duration::from_secs(15);

fn create_unprivileged(h: &TestHost, ct: &str, template: &str) {
    let mut args = vec!["create", ct, "--template", template];
    args.extend_from_slice(UNPRIVILEGED);
    h.ok(&args);
}

/// The CT's host uid base, from its config.
fn uid_base(h: &TestHost, ct: &str) -> u32 {
    let text = std::fs::read_to_string(h.root.join(format!("conf/{ct}.toml"))).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    let base = v["userns"]["uid_base"]
        .as_integer()
        .expect("[userns] uid_base");
    u32::try_from(base).unwrap()
}

/// The CT's cgroup in the hierarchy delegated to its root: name=systemd (v1) or the unified one.
fn delegated_dir(h: &TestHost, ct: &str) -> PathBuf {
    let mount = match Hierarchy::detect().unwrap() {
        Hierarchy::V1(m) => m.systemd().expect("a name=systemd hierarchy").to_path_buf(),
        Hierarchy::V2(root) => root,
    };
    mount.join(&h.cgroup_parent).join(ct)
}

/// `berth stop`, which must halt init with its own signal within [`BOUND`], not by the kill
/// after the timeout. Returns how long it took.
fn graceful_stop(h: &TestHost, ct: &str) -> Duration {
    let t0 = Instant::now();
    let o = h.run(&["stop", ct]);
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stop {ct}: {stderr}");
    assert!(
        !stderr.contains("did not halt"),
        "init of {ct} ignored its stop signal: {stderr}"
    );
    assert!(took < BOUND, "stop of {ct} took {took:?}");
    took
}

/// The user namespace is real: CT root is not host root, and `exec` becomes the CT's root.
fn assert_unprivileged(h: &TestHost, ct: &str) {
    let (code, map, err) = h.exec(ct, &["cat", "/proc/self/uid_map"]);
    assert_eq!(code, 0, "exec into {ct}: {err}");
    let f: Vec<&str> = map.split_whitespace().collect();
    assert_eq!(f[..2], ["0", &uid_base(h, ct).to_string()], "{map}");
    let (_, id, _) = h.exec(ct, &["id", "-u"]);
    assert_eq!(id.trim(), "0");
}

fn spread(v: &[Duration]) -> String {
    let mut ms: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    format!(
        "min {:.0} ms, median {:.0} ms, max {:.0} ms (n={})",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms.len()
    )
}

/// Polls `systemctl is-system-running` until it answers something other than the states of a
/// boot in progress (or no answer while systemd's socket does not exist yet).
fn wait_system_state(h: &TestHost, ct: &str) -> String {
    let end = Instant::now() + BOUND;
    loop {
        let (_, out, _) = h.exec(ct, &["systemctl", "is-system-running"]);
        let state = out.trim().to_string();
        if !matches!(state.as_str(), "" | "initializing" | "starting") || Instant::now() > end {
            return state;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn debian_systemd_unprivileged_runs_with_no_failed_units_and_halts() {
    let h = TestHost::new();
    h.ok(&[
        "template", "build", "debian", "--suite", "bookworm", "--init", "systemd", "--name", "sd",
    ]);
    let list = h.json(&["template", "list"]);
    let info = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "sd")
        .unwrap();
    assert_eq!(info["stop_signal"], "SIGRTMIN+4", "{info}");
    let tree = h.root.join("template/sd/rootfs");
    assert_eq!(
        std::fs::read_link(tree.join("sbin/init")).unwrap(),
        Path::new("/lib/systemd/systemd")
    );
    create_unprivileged(&h, "4701", "sd");
    let base = uid_base(&h, "4701");
    let (mut boots, mut stops) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let t0 = Instant::now();
        h.ok(&["start", "4701"]);
        let state = wait_system_state(&h, "4701");
        boots.push(t0.elapsed());
        let (_, failed, _) = h.exec("4701", &["systemctl", "--failed", "--no-legend", "--plain"]);
        assert_eq!(state, "running", "round {round}: failed units: {failed}");
        assert_eq!(failed.trim(), "", "round {round}");
        if round == 0 {
            let (_, comm, _) = h.exec("4701", &["cat", "/proc/1/comm"]);
            assert_eq!(comm.trim(), "systemd");
            assert_unprivileged(&h, "4701");
            // systemd tracks its units in cgroups of its own below the CT's, owned by the CT's
            // root: the delegation is what let it make them.
            let dir = delegated_dir(&h, "4701");
            for unit in ["init.scope", "system.slice"] {
                let m = std::fs::metadata(dir.join(unit))
                    .unwrap_or_else(|e| panic!("{unit} in {}: {e}", dir.display()));
                assert_eq!(m.uid(), base, "{unit} not made by the CT's root");
            }
            assert!(
                h.cgroup_dirs().contains(&dir),
                "assert_clean would not see this CT's delegated cgroup"
            );
        }
        stops.push(graceful_stop(&h, "4701"));
        h.assert_clean();
    }
    println!("systemd start -> running: {}", spread(&boots));
    println!("systemd stop: {}", spread(&stops));
    h.ok(&["destroy", "4701"]);
    h.ok(&["template", "remove", "sd"]);
}

#[test]
fn debian_sysvinit_unprivileged_reaches_runlevel_2_and_halts() {
    let h = TestHost::new();
    h.ok(&[
        "template", "build", "debian", "--suite", "bookworm", "--init", "sysvinit", "--name",
        "sysv",
    ]);
    create_unprivileged(&h, "4702", "sysv");
    let t0 = Instant::now();
    h.ok(&["start", "4702"]);
    let end = Instant::now() + BOUND;
    while h.exec("4702", &["runlevel"]).1.trim() != "N 2" {
        assert!(Instant::now() < end, "sysvinit did not reach runlevel 2");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("sysvinit start -> runlevel 2: {:?}", t0.elapsed());
    let (_, comm, _) = h.exec("4702", &["cat", "/proc/1/comm"]);
    assert_eq!(comm.trim(), "init");
    assert_unprivileged(&h, "4702");
    println!("sysvinit stop: {:?}", graceful_stop(&h, "4702"));
    h.assert_clean();
    h.ok(&["destroy", "4702"]);
    h.ok(&["template", "remove", "sysv"]);
}

#[test]
fn busybox_unprivileged_boots_and_halts() {
    let h = TestHost::new();
    create_unprivileged(&h, "4703", "busybox");
    h.ok(&["start", "4703"]);
    let (_, comm, _) = h.exec("4703", &["cat", "/proc/1/comm"]);
    assert_eq!(comm.trim(), "init");
    let (_, exe, _) = h.exec("4703", &["readlink", "/proc/1/exe"]);
    assert_eq!(exe.trim(), "/bin/busybox");
    assert_unprivileged(&h, "4703");
    graceful_stop(&h, "4703");
    h.assert_clean();
    h.ok(&["destroy", "4703"]);
}

/// From inside an unprivileged CT, as its root: the delegated cgroup works (positive control),
/// and nothing beyond it does. Its limits cannot be raised (the files belong to host root,
/// which its user namespace does not map: EACCES, through berth's read-only mount and through a
/// cgroup mount of its own alike), it cannot join or make a cgroup the host did not give it,
/// a cgroup mount shows nothing above its own cgroup (cgroup namespace), it cannot make a new
/// v1 hierarchy (EPERM: needs CAP_SYS_ADMIN in the initial user namespace) nor set a
/// release_agent (EINVAL, "Setting release_agent not allowed"), and no release_agent file is in
/// its view (ENOENT: it exists only in a hierarchy's root).
#[test]
fn cgroup_delegation_gives_the_ct_root_nothing_beyond_its_subtree() {
    if !matches!(Hierarchy::detect(), Ok(Hierarchy::V1(_))) {
        skip(
            "cgroup_delegation_gives_the_ct_root_nothing_beyond_its_subtree",
            "the probes are for v1/hybrid hosts (name=systemd delegation); this host is v2",
        );
        return;
    }
    let h = TestHost::new();
    let probe = berth_tests::probes::build("cgroup", h.dir.path());
    create_unprivileged(&h, "4704", "busybox");
    h.ok(&[
        "set",
        "4704",
        "--memory",
        "256M",
        "--numproc",
        "100",
        "--save",
    ]);
    h.ok(&["start", "4704"]);
    std::fs::copy(&probe, h.root.join("root/4704/cgroup-probe")).unwrap();
    let steps: &[(&[&str], &str)] = &[
        // Positive control: the delegated cgroup is the CT's to use.
        (&["mkdir", "/sys/fs/cgroup/systemd/probe"], "OK"),
        (
            &["writeself", "/sys/fs/cgroup/systemd/probe/cgroup.procs"],
            "OK",
        ),
        (&["writeself", "/sys/fs/cgroup/systemd/cgroup.procs"], "OK"),
        (&["rmdir", "/sys/fs/cgroup/systemd/probe"], "OK"),
        // Only the files that move processes are delegated.
        (
            &["write", "/sys/fs/cgroup/systemd/notify_on_release", "1"],
            "EACCES",
        ),
        // Its own limits, through berth's mounts.
        (
            &["write", "/sys/fs/cgroup/memory/memory.limit_in_bytes", "-1"],
            "EACCES",
        ),
        (&["write", "/sys/fs/cgroup/pids/pids.max", "max"], "EACCES"),
        // (mkdir checks the read-only mount before the owner.)
        (&["mkdir", "/sys/fs/cgroup/memory/escape"], "EROFS"),
        // Its own limits, through a mount of its own (the kernel allows mounting an existing
        // hierarchy in a cgroup namespace the CT owns; the mount's root is the CT's cgroup).
        (&["mount", "memory", "/tmp/cg-memory"], "OK"),
        (
            &["write", "/tmp/cg-memory/memory.limit_in_bytes", "-1"],
            "EACCES",
        ),
        (&["writeself", "/tmp/cg-memory/cgroup.procs"], "EACCES"),
        (&["mkdir", "/tmp/cg-memory/escape"], "EACCES"),
        (&["mount", "pids", "/tmp/cg-pids"], "OK"),
        (&["write", "/tmp/cg-pids/pids.max", "max"], "EACCES"),
        // Nothing above its cgroup can be named: `..` of the mount root leaves cgroupfs.
        (&["mount", "none,name=systemd", "/tmp/cg-systemd"], "OK"),
        (&["writeself", "/tmp/cg-systemd/../cgroup.procs"], "ENOENT"),
        // release_agent.
        (&["open", "/tmp/cg-systemd/release_agent"], "ENOENT"),
        (&["open", "/tmp/cg-memory/release_agent"], "ENOENT"),
        (&["open", "/sys/fs/cgroup/systemd/release_agent"], "ENOENT"),
        (&["mount", "none,name=berthprobe", "/tmp/cg-new"], "EPERM"),
        (
            &[
                "mount",
                "none,name=systemd,release_agent=/x",
                "/tmp/cg-agent",
            ],
            "EINVAL",
        ),
    ];
    let mut argv = vec!["/cgroup-probe"];
    for (args, _) in steps {
        argv.extend_from_slice(args);
    }
    let (code, out, err) = h.exec("4704", &argv);
    assert_eq!(code, 0, "probe: {err}");
    let got: Vec<&str> = out.lines().collect();
    assert_eq!(got.len(), steps.len(), "{out}");
    for ((args, want), line) in steps.iter().zip(&got) {
        let errno = line.rsplit(' ').next().unwrap();
        assert_eq!(errno, *want, "{args:?}: {line}\n{out}");
    }
    // What the host set is still there.
    let mem = match Hierarchy::detect().unwrap() {
        Hierarchy::V1(m) => m
            .get(berth_runtime::cgroups::Controller::Memory)
            .map(|p| p.join(&h.cgroup_parent).join("4704/memory.limit_in_bytes")),
        Hierarchy::V2(_) => None,
    };
    if let Some(mem) = mem {
        assert_eq!(std::fs::read_to_string(mem).unwrap().trim(), "268435456");
    }
    let st = h.status("4704");
    assert_eq!(st["status"], "running", "{st}");
    graceful_stop(&h, "4704");
    h.assert_clean();
    h.ok(&["destroy", "4704"]);
}

/// cgroups the CT's root made below its own (with processes in them) go with the CT: at stop,
/// and through gc after init was SIGKILLed behind berth's back.
#[test]
fn nested_cgroups_the_ct_made_are_removed_by_stop_and_gc() {
    let h = TestHost::new();
    create_unprivileged(&h, "4705", "busybox");
    let nest = |h: &TestHost| {
        let (code, _, err) = h.exec(
            "4705",
            &[
                "sh",
                "-c",
                "mkdir -p /sys/fs/cgroup/systemd/a/b/c; sleep 1000 </dev/null >/dev/null 2>&1 & \
                 echo $! > /sys/fs/cgroup/systemd/a/b/c/cgroup.procs",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let c = delegated_dir(h, "4705").join("a/b/c");
        let procs = std::fs::read_to_string(c.join("cgroup.procs")).unwrap();
        assert_eq!(procs.lines().count(), 1, "sleep not in {}", c.display());
    };
    h.ok(&["start", "4705"]);
    nest(&h);
    graceful_stop(&h, "4705");
    h.assert_clean();

    h.ok(&["start", "4705"]);
    nest(&h);
    let st = h.status("4705");
    let init_pid = st["init_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let end = Instant::now() + BOUND;
    while Path::new(&format!("/proc/{init_pid}")).exists() {
        assert!(Instant::now() < end, "init {init_pid} did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        delegated_dir(&h, "4705").join("a/b/c").exists(),
        "the nested cgroup went away by itself: gc is not what is tested"
    );
    let rep = h.json(&["gc"]);
    assert!(rep["errors"].as_array().unwrap().is_empty(), "{rep}");
    h.assert_clean();
    h.ok(&["destroy", "4705"]);
}

#[test]
fn an_unknown_init_is_refused_before_anything_is_built() {
    let h = TestHost::new();
    let before = h.ok(&["template", "list"]);
    let err = h.fails(&[
        "template", "build", "debian", "--init", "upstart", "--name", "x",
    ]);
    assert!(
        err.contains("unknown init \"upstart\" for a Debian template (choose systemd or sysvinit)"),
        "{err}"
    );
    assert_eq!(h.ok(&["template", "list"]), before);
    let leftovers: Vec<_> = std::fs::read_dir(h.root.join("template"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "busybox")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The v2 delegation model against the real kernel (on this hybrid host the controller-less
/// cgroup2 hierarchy, on unified hosts the real one): after `delegate`, a process running as the
/// CT root's host uid can make cgroups below the CT's and move itself between them, but not move
/// itself out (the common ancestor's cgroup.procs is host root's: EACCES) nor write a file that
/// was not delegated (EACCES).
#[test]
fn v2_delegation_lets_the_owner_manage_only_its_subtree() {
    use berth_runtime::cgroups::CgroupManager;
    use berth_tests::cgroups::{TestCgroup, cgroup2_mount};
    use std::os::unix::process::CommandExt;
    let Some(mount) = cgroup2_mount() else {
        skip(
            "v2_delegation_lets_the_owner_manage_only_its_subtree",
            "no cgroup2 mount on this host",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let probe = berth_tests::probes::build("cgroup", dir.path());
    // The probe is run as an unprivileged uid: it must be able to reach and execute it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let t = TestCgroup::new_v2(&mount).unwrap();
    let uid = 3_000_000u32;
    t.cg.delegate(uid, uid).unwrap();
    let ct = t.cg.paths()[0].clone();
    let parent = ct.parent().unwrap().to_path_buf();
    let p = |rel: &str| ct.join(rel).to_string_lossy().into_owned();
    let up = parent.join("cgroup.procs").to_string_lossy().into_owned();
    let steps: &[(Vec<String>, &str)] = &[
        (vec!["mkdir".into(), p("child")], "OK"),
        (vec!["writeself".into(), p("child/cgroup.procs")], "OK"),
        (vec!["writeself".into(), p("cgroup.procs")], "OK"),
        (vec!["writeself".into(), up], "EACCES"),
        (
            vec!["write".into(), p("cgroup.max.depth"), "1".into()],
            "EACCES",
        ),
        (vec!["rmdir".into(), p("child")], "OK"),
    ];
    let args: Vec<&str> = steps
        .iter()
        .flat_map(|(a, _)| a.iter().map(String::as_str))
        .collect();
    let mut cmd = t.command(&[probe.to_str().unwrap()]);
    cmd.args(&args);
    // SAFETY: setresgid/setresuid are async-signal-safe; this runs after the cgroup join that
    // `command` registered (pre_exec closures run in order), while still root.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setresgid(uid, uid, uid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<&str> = text.lines().collect();
    assert_eq!(got.len(), steps.len(), "{text}");
    for ((args, want), line) in steps.iter().zip(&got) {
        assert_eq!(
            line.rsplit(' ').next().unwrap(),
            *want,
            "{args:?}: {line}\n{text}"
        );
    }
    t.finish().unwrap();
}
