//! Fault injection: berth SIGKILLs itself at each named crash point (runtime/src/crashpoint.rs,
//! `FAILPOINTS=<point>=kill`, the binaries built with `--features failpoints`), then `berth gc`
//! and the next command must leave a consistent state: nothing leaked in the test's host
//! netns (links, IFBs, addresses, routes, proxy entries, qdiscs), no cgroup, mount, datapath
//! attachment or link pin of a CT that is not running, no lock held, no half-written file,
//! the config absent or whole — and the operation redone succeeds.
//!
//! One test per group of points, each reusing one installation; a table per group, and a test
//! that every point in POINTS is in some table.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use berth_runtime::crashpoint::POINTS;
use berth_runtime::net::inspect::Snapshot;
use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, assert_same};

/// Each point with the `set` arguments (after the CTID) that reach it on a running CT.
/// The crash points of one operation (the runtime's list, by name prefix): a point added
/// there is tested here without a second list to keep in step.
fn points(prefix: &str) -> Vec<&'static str> {
    let v: Vec<_> = POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with(prefix))
        .collect();
    assert!(!v.is_empty(), "no crash point named {prefix}*");
    v
}

const SET: &[(&str, &[&str])] = &[
    ("set.addrs_added", &["--ipadd", "192.0.2.162"]),
    ("set.datapath_updated", &["--ipadd", "192.0.2.162"]),
    ("set.state_written", &["--ipadd", "192.0.2.162"]),
    ("set.addrs_deleted", &["--ipdel", "192.0.2.161"]),
    ("set.shaping_applied", &["--rate-in", "20mbit"]),
    ("set.limits_applied", &["--cpus", "1"]),
    ("set.config_tmp_written", &["--cpus", "1", "--save"]),
    ("set.config_written", &["--cpus", "1", "--save"]),
];

#[test]
fn every_point_has_a_case() {
    let mut covered: Vec<&str> = [
        "create.",
        "start.",
        "stop.",
        "destroy.",
        "template.import.",
        "ledger.tick.",
        "vzimport.",
    ]
    .into_iter()
    .flat_map(points)
    .chain(SET.iter().map(|(p, _)| *p))
    .collect();
    covered.sort_unstable();
    covered.dedup();
    let mut all = POINTS.to_vec();
    all.sort_unstable();
    assert_eq!(covered, all, "every crash point needs a case here");
}

/// The test's berth installation in a host netns of its own, and that netns as it was.
struct Env {
    topo: Topology,
    h: TestHost,
    before: Snapshot,
    qdiscs: String,
}

impl Env {
    fn new() -> Self {
        let topo = Topology::new();
        let before = topo.host.settled_snapshot();
        let qdiscs = qdiscs(&topo);
        let h = TestHost::new().in_netns(topo.host.fd());
        Self {
            topo,
            h,
            before,
            qdiscs,
        }
    }

    /// Runs berth with `args`, SIGKILLed at `point`; asserts it died there.
    fn killed_at(&self, point: &str, args: &[&str]) {
        let o = self
            .h
            .cmd(args)
            .env("FAILPOINTS", format!("{point}=kill"))
            .output()
            .expect("spawn berth");
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGKILL),
            "berth {args:?} with {point} did not die by SIGKILL there ({}):\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// `berth gc --json`; returns what it removed beyond nothing (for the log).
    fn gc(&self, point: &str) -> serde_json::Value {
        let rep = self.h.json(&["gc"]);
        let mut found = serde_json::Map::new();
        for (k, v) in rep.as_object().unwrap() {
            let nonempty = match v {
                serde_json::Value::Array(a) => !a.is_empty(),
                serde_json::Value::Number(n) => n.as_u64() != Some(0),
                serde_json::Value::Object(o) => o
                    .values()
                    .any(|x| x.as_array().is_some_and(|a| !a.is_empty())),
                _ => false,
            };
            if nonempty {
                found.insert(k.clone(), v.clone());
            }
        }
        eprintln!(
            "{point}: gc removed {}",
            serde_json::Value::Object(found.clone())
        );
        serde_json::Value::Object(found)
    }

    fn running(&self, ct: &str) -> bool {
        self.h.status(ct)["status"] == "running"
    }

    /// Nothing of a CT that does not run is left (call with no CT running).
    fn assert_clean(&self, what: &str) {
        self.h.assert_clean();
        let after = self.topo.host.settled_snapshot();
        assert_same(&format!("host netns after {what}"), &self.before, &after);
        assert_eq!(qdiscs(&self.topo), self.qdiscs, "qdiscs after {what}");
        if let Some(v) = berth::datapath::DatapathView::open_pinned(&self.h.bpffs).unwrap() {
            let att = v.attached().unwrap();
            assert!(att.is_empty(), "datapath attachments after {what}: {att:?}");
        }
        let pins = link_pins(&self.h.bpffs);
        assert!(pins.is_empty(), "link pins after {what}: {pins:?}");
        self.assert_files_whole(what);
    }

    /// No half-written or stale file, no held lock, every config loads.
    fn assert_files_whole(&self, what: &str) {
        let root = &self.h.root;
        for dir in ["conf", "run", "private"] {
            for e in entries(&root.join(dir)) {
                let n = e.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    !n.ends_with(".tmp") && !n.ends_with(".creating"),
                    "{} left after {what}",
                    e.display()
                );
            }
        }
        let confs: Vec<String> = entries(&root.join("conf"))
            .iter()
            .filter_map(|p| {
                p.file_name()?
                    .to_str()?
                    .strip_suffix(".toml")
                    .map(str::to_string)
            })
            .collect();
        for c in &confs {
            // The config parses (status loads it).
            self.h.status(c);
        }
        for e in entries(&root.join("run")) {
            let n = e.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(id) = n.strip_suffix(".lock") {
                assert!(
                    confs.iter().any(|c| c == id),
                    "lock file of a CT that does not exist after {what}: {n}"
                );
                let f = fs::OpenOptions::new().write(true).open(&e).unwrap();
                assert!(
                    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok(),
                    "{n} still held after {what}"
                );
            }
            for suffix in [".state.json", ".exit.json"] {
                if let Some(id) = n.strip_suffix(suffix) {
                    assert!(
                        confs.iter().any(|c| c == id),
                        "{n} of a CT that does not exist after {what}"
                    );
                }
            }
        }
        let private: Vec<String> = entries(&root.join("private"))
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for p in &private {
            assert!(
                confs.contains(p),
                "private area {p} without a config after {what}"
            );
        }
        // Each id range is held by an existing CT.
        for e in entries(&root.join("userns")) {
            let holder = fs::read_to_string(&e).unwrap_or_default();
            assert!(
                confs.iter().any(|c| c == holder.trim()),
                "id range {} held by {holder:?}, which does not exist, after {what}",
                e.display()
            );
        }
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Every per-interface entry under a `links` directory of the pin tree (the datapath's and
/// the shaper's link pins).
fn link_pins(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in entries(dir) {
        if e.is_dir() {
            if e.file_name().is_some_and(|n| n == "links") {
                // Per-interface pins are named by ifindex; others (the shaper's `undelivered`
                // program link) are the host's own.
                out.extend(entries(&e).into_iter().filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                }));
            } else {
                out.extend(link_pins(&e));
            }
        }
    }
    out
}

fn qdiscs(topo: &Topology) -> String {
    let o = topo.host.run("tc", &["qdisc", "show"]);
    assert!(o.status.success(), "tc qdisc show");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn create_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    for point in points("create.") {
        env.killed_at(point, &["create", "150", "--ipadd", "192.0.2.150"]);
        env.gc(point);
        env.assert_clean(point);
        if env.h.root.join("conf/150.toml").exists() {
            // The config was whole: the CT is.
            env.h.ok(&["start", "150"]);
            env.h.ok(&["stop", "--fast", "150"]);
        } else {
            env.h.ok(&["create", "150", "--ipadd", "192.0.2.150"]);
        }
        env.h.ok(&["destroy", "150"]);
        env.assert_clean(&format!("{point}, redone"));
    }
    eprintln!("create: {:?}", t0.elapsed());
}

/// A routed, shaped CT for the start, stop and set groups.
fn shaped_ct(env: &Env, ct: &str, addr: &str) {
    env.h.ok(&["create", ct, "--ipadd", addr]);
    env.h.ok(&[
        "set",
        ct,
        "--rate-in",
        "10mbit",
        "--rate-out",
        "10mbit",
        "--save",
    ]);
}

#[test]
fn start_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    shaped_ct(&env, "160", "192.0.2.160");
    for point in points("start.") {
        env.killed_at(point, &["start", "160"]);
        env.gc(point);
        if env.running("160") {
            // Where the CT's host side is not visible, gc must not take its interfaces for gone.
            gc_in_other_netns(&env);
            let v = berth::datapath::DatapathView::open_pinned(&env.h.bpffs)
                .unwrap()
                .expect("datapath pinned");
            assert!(
                v.attached()
                    .unwrap()
                    .iter()
                    .any(|a| a.config.ctid.get() == 160),
                "{point}: gc from another netns detached the running CT"
            );
            env.h.ok(&["stop", "--fast", "160"]);
        }
        env.assert_clean(point);
        env.h.ok(&["start", "160"]);
        env.h.ok(&["stop", "--fast", "160"]);
        env.assert_clean(&format!("{point}, redone"));
    }
    env.h.ok(&["destroy", "160"]);
    eprintln!("start: {:?}", t0.elapsed());
}

/// `berth gc` of this installation run in a fresh network namespace of the test's own.
fn gc_in_other_netns(env: &Env) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let other = berth_tests::net::Ns::new();
    let fd = other.fd().as_raw_fd();
    let mut c = std::process::Command::new(berth_tests::ct::berth_bin());
    c.arg("--root")
        .arg(&env.h.root)
        .arg("--cgroup-parent")
        .arg(&env.h.cgroup_parent)
        .arg("--bpffs")
        .arg(&env.h.bpffs)
        .arg("gc")
        .env_remove("BERTH_ROOT")
        .env_remove("BERTH_RUN_DIR")
        .stdin(std::process::Stdio::null());
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = c.output().expect("spawn berth gc");
    assert!(
        o.status.success(),
        "gc in another netns: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn stop_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    shaped_ct(&env, "170", "192.0.2.170");
    for point in points("stop.") {
        env.h.ok(&["start", "170"]);
        env.killed_at(point, &["stop", "--fast", "170"]);
        env.gc(point);
        assert!(
            !env.running("170"),
            "{point}: running after a stop killed midway and gc"
        );
        env.assert_clean(point);
        // The stop redone on the stopped CT (it reports so) changes nothing.
        let o = env.h.run(&["stop", "170"]);
        assert!(
            o.status.success() || String::from_utf8_lossy(&o.stderr).contains("not running"),
            "{point}: stop redone: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        env.assert_clean(&format!("{point}, redone"));
    }
    env.h.ok(&["destroy", "170"]);
    eprintln!("stop: {:?}", t0.elapsed());
}

#[test]
fn set_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    shaped_ct(&env, "161", "192.0.2.161");
    let saved = fs::read_to_string(env.h.root.join("conf/161.toml")).unwrap();
    for (point, args) in SET {
        env.h.ok(&["start", "161"]);
        let mut a = vec!["set", "161"];
        a.extend_from_slice(args);
        env.killed_at(point, &a);
        env.gc(point);
        assert!(env.running("161"), "{point}: a killed set stopped the CT");
        env.assert_files_whole(point);
        // The set redone succeeds on the CT as the kill left it, unless the kill came after
        // the change was complete (then the CT has it).
        let o = env.h.run(&a);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("has this address already")
                    && env.h.status("161").to_string().contains("192.0.2.162"),
                "{point}: set redone: {err}"
            );
        }
        env.h.ok(&["stop", "--fast", "161"]);
        env.assert_clean(point);
        // Back to the saved settings for the next point.
        fs::write(env.h.root.join("conf/161.toml"), &saved).unwrap();
    }
    env.h.ok(&["destroy", "161"]);
    eprintln!("set: {:?}", t0.elapsed());
}

#[test]
fn destroy_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    for point in points("destroy.") {
        env.h.ok(&["create", "180", "--ipadd", "192.0.2.180"]);
        env.h.ok(&["start", "180"]);
        env.h.ok(&["stop", "--fast", "180"]);
        env.killed_at(point, &["destroy", "180"]);
        env.gc(point);
        if env.h.root.join("conf/180.toml").exists() {
            env.h.ok(&["destroy", "180"]);
        }
        env.assert_clean(point);
        assert!(
            !env.h.root.join("private/180").exists(),
            "{point}: private area left"
        );
        // The CT's counters were retired once, in a whole record.
        for r in entries(&env.h.root.join("retired")) {
            let text = fs::read_to_string(&r).unwrap();
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{point}: {} is not whole: {e}", r.display()));
        }
    }
    eprintln!("destroy: {:?}", t0.elapsed());
}

#[test]
fn template_import_killed_at_each_point() {
    let t0 = Instant::now();
    let env = Env::new();
    let archive = env.h.dir.path().join("t.tar");
    let rootfs = env.h.root.join("template/busybox/rootfs");
    let o = std::process::Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let a = archive.to_str().unwrap();
    let store = env.h.root.join("template");
    for point in points("template.import.") {
        env.killed_at(point, &["template", "import", a, "--name", "imp"]);
        env.gc(point);
        let left: Vec<PathBuf> = entries(&store)
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{point}: template scratch left: {left:?}");
        env.assert_clean(point);
        if store.join("imp").exists() {
            env.h.ok(&["template", "remove", "imp"]);
        }
        env.h.ok(&["template", "import", a, "--name", "imp"]);
        env.h.ok(&["create", "190", "--template", "imp"]);
        env.h.ok(&["destroy", "190"]);
        env.h.ok(&["template", "remove", "imp"]);
    }
    eprintln!("template: {:?}", t0.elapsed());
}

/// berthd with `FAILPOINTS=<point>=kill`; asserts it SIGKILLed itself within 60 s.
fn berthd_killed_at(env: &Env, ledger: &Path, point: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(berth_tests::berthd::berthd_bin());
    let fd = env.topo.host.fd().as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .args(["--listen", "127.0.0.1:0", "--tick", "10", "--root"])
        .arg(&env.h.root)
        .arg("--cgroup-parent")
        .arg(&env.h.cgroup_parent)
        .arg("--bpffs")
        .arg(&env.h.bpffs)
        .arg("--ledger")
        .arg(ledger)
        .env_remove("BERTH_ROOT")
        .env_remove("BERTH_RUN_DIR")
        .env_remove("BERTH_BPFFS")
        .env("FAILPOINTS", format!("{point}=kill"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn berthd");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("berthd did not reach {point} within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "berthd with {point} did not die by SIGKILL there: {status}"
    );
}

#[test]
fn ledger_tick_killed_at_each_point_stays_exact() {
    use berth_tests::billing::{Berthd, kernel_bytes, ledger_report};
    use std::time::Duration;
    let t0 = Instant::now();
    let env = Env::new();
    let ledger = env.h.root.join("ledger/billing.db");
    let ledger_s = ledger.to_str().unwrap().to_owned();
    // The ledger's first tick books an empty node: the CT made after it counts from 0.
    let mut d = Berthd::start_in(&env.h, &ledger, "10", Some(env.topo.host.fd())).unwrap();
    d.wait_tick_end(0, Duration::from_secs(20)).unwrap();
    d.sigterm().unwrap();
    env.h.ok(&["create", "195", "--ipadd", "192.0.2.195"]);
    for point in points("ledger.tick.") {
        env.h.ok(&["start", "195"]);
        let (code, _, err) = env.h.exec(
            "195",
            &[
                "ping",
                "-c",
                "5",
                "-i",
                "0.2",
                "-W",
                "2",
                berth_tests::net::UPLINK4,
            ],
        );
        assert_eq!(code, 0, "{point}: ping from the CT: {err}");
        // Stopped: its counters are final while the ledger is checked.
        env.h.ok(&["stop", "--fast", "195"]);
        berthd_killed_at(&env, &ledger, point);
        env.gc(point);
        let mut d = Berthd::start_in(&env.h, &ledger, "10", Some(env.topo.host.fd())).unwrap();
        d.wait_tick_end(0, Duration::from_secs(20)).unwrap();
        d.sigterm().unwrap();
        let (k_in, k_out) = kernel_bytes(&env.h, "195");
        let (_, l_in, l_out) = ledger_report(&env.h, &ledger_s, "195").unwrap();
        assert!(k_in > 0 && k_out > 0, "{point}: no traffic counted");
        assert_eq!(
            (l_in, l_out),
            (k_in, k_out),
            "{point}: the ledger's totals differ from the kernel's counters"
        );
        env.assert_clean(point);
    }
    env.h.ok(&["destroy", "195"]);
    eprintln!("ledger: {:?}", t0.elapsed());
}

#[test]
fn vz_import_killed_at_each_point() {
    use berth_tests::vz::{VzNode, run_args};
    let t0 = Instant::now();
    let env = Env::new();
    let node = VzNode::new("VE_PRIVATE=/vz/private/$VEID\n");
    node.conf(196, "HOSTNAME=\"vz196\"\nIP_ADDRESS=\"192.0.2.196\"\n");
    let o = std::process::Command::new("cp")
        .arg("-a")
        .arg(env.h.root.join("template/busybox/rootfs"))
        .arg(node.path("private/196"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let args = node.args(&["196"]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    for point in points("vzimport.") {
        env.killed_at(point, &a);
        env.gc(point);
        env.assert_clean(point);
        if !env.h.root.join("conf/196.toml").exists() {
            let o = run_args(&env.h, &args);
            assert!(
                o.status.success(),
                "{point}: import redone: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        env.h.ok(&["start", "196"]);
        env.h.ok(&["stop", "--fast", "196"]);
        env.h.ok(&["destroy", "196"]);
        env.assert_clean(&format!("{point}, redone"));
    }
    eprintln!("vz import: {:?}", t0.elapsed());
}
