//! berth testbed (issue 15) tested against itself: SIGKILL of the supervisor at random moments
//! of `up` then `gc` leaves the host as it was; concurrent runs of one topology pass; a broken
//! file is refused before anything exists; JUnit parses with a real XML parser; an injected
//! fault fails its check and only it.
//!
//! Every run keeps its state in a directory of the test's own (`BERTH_TESTBED_STATE`), so the
//! only host-global objects are the per-run cgroup parents `berth-tb-<run id>`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use berth_testbed::{Options, Testbed};
use berth_tests::ct::berth_bin;
use serde_json::Value;

/// Two routed and one bridged CT (real berth CTs, berthd on), checks that pass on a good host,
/// and a namespace node behind a delay line and a loss classifier (what they make must go too).
const CTS: &str = r#"
berthd = true
[uplink]
prefixes = ["198.51.100.0/24", "2001:db8:2::/64"]
[[bridge]]
name = "br0"
addrs = ["198.51.100.1/24", "2001:db8:2::1/64"]
[[node]]
name = "r1"
kind = "ct"
ctid = 101
addrs = ["192.0.2.101", "2001:db8:1::101"]
link = { rate = "10mbit" }
[[node]]
name = "r2"
kind = "ct"
ctid = 102
addrs = ["192.0.2.102", "2001:db8:1::102"]
[[node]]
name = "b1"
kind = "ct"
ctid = 201
mode = "bridged"
bridge = "br0"
addrs = ["198.51.100.21/24", "2001:db8:2::21/64"]
[[node]]
name = "d"
addrs = ["192.0.2.50"]
link = { delay = "5ms", loss_every = 50 }
[[check]]
kind = "ping"
from = "r1"
to = "uplink"
[[check]]
kind = "ping"
from = "uplink"
to = "b1"
[[check]]
kind = "ping"
from = "b1"
to = "r2"
[[check]]
kind = "rate"
from = "r1"
to = "uplink"
family = "4"
[[check]]
kind = "accounting"
node = "r2"
[[check]]
kind = "spoof"
node = "r2"
count = 3
"#;

/// Plain namespaces only: fast, for the fault-injection and JUnit test.
const NETNS: &str = r#"
[uplink]
prefixes = ["198.51.100.0/24", "2001:db8:2::/64"]
[[bridge]]
name = "br0"
addrs = ["198.51.100.1/24", "2001:db8:2::1/64"]
[[node]]
name = "a"
addrs = ["192.0.2.10", "2001:db8:1::10"]
link = { rate = "10mbit" }
[[node]]
name = "b"
mode = "bridged"
bridge = "br0"
addrs = ["198.51.100.20/24", "2001:db8:2::20/64"]
[[check]]
name = "a-reaches-uplink"
kind = "ping"
from = "a"
to = "uplink"
[[check]]
name = "uplink-reaches-b"
kind = "ping"
from = "uplink"
to = "b"
[[node]]
name = "c"
addrs = ["203.0.113.5"]
[[check]]
name = "uplink-has-no-route-to-c"
kind = "ping"
from = "uplink"
to = "c"
family = "4"
expect = "none"
[[check]]
name = "a-rate"
kind = "rate"
from = "a"
to = "uplink"
family = "4"
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    /// None (after a visible skip) when this machine cannot run testbeds.
    fn new(test: &str) -> Option<Env> {
        if !berth_tests::skip::require_tools(test, &["iperf3", "nsenter", "ping", "tc", "python3"])
        {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-testbed-")
            .tempdir()
            .expect("tempdir");
        Some(Env { dir })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write topology");
        p
    }

    fn cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(berth_bin());
        c.arg("testbed")
            .args(args)
            .env("BERTH_TESTBED_STATE", self.state())
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("spawn berth testbed")
    }

    fn options(&self) -> Options {
        Options {
            berth_bin: berth_bin(),
            state_dir: self.state(),
            rootless: false,
        }
    }

    fn runs(&self) -> Vec<String> {
        std::fs::read_dir(self.state())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What a testbed could leave on the host.
#[derive(Debug, Clone, PartialEq)]
struct HostState {
    netns: BTreeSet<String>,
    links: BTreeSet<String>,
    bpffs: BTreeSet<String>,
    mounts: BTreeSet<String>,
    cgroups: BTreeSet<String>,
}

fn walk(dir: &Path, out: &mut BTreeSet<String>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.display().to_string());
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out);
            }
        }
    }
}

fn host_state() -> HostState {
    let lines = |prog: &str, args: &[&str]| -> BTreeSet<String> {
        let o = Command::new(prog).args(args).output().expect("run tool");
        text(&o.stdout).lines().map(str::to_owned).collect()
    };
    let links = lines("ip", &["-o", "link"])
        .iter()
        .filter_map(|l| {
            l.split(": ")
                .nth(1)
                .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        })
        .collect();
    let mut bpffs = BTreeSet::new();
    walk(Path::new("/sys/fs/bpf"), &mut bpffs);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    let mut cgroups = BTreeSet::new();
    for root in berth_testbed::client::cgroup_roots() {
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(berth_testbed::CGROUP_PREFIX) {
                    cgroups.insert(e.path().display().to_string());
                }
            }
        }
    }
    HostState {
        netns: lines("ip", &["netns", "list"]),
        links,
        bpffs,
        mounts,
        cgroups,
    }
}

/// What `after` has that `before` had not, of the kinds a testbed makes, cgroups of the runs
/// `ids` only (other processes on this machine make their own objects meanwhile: theirs carry
/// other names).
fn leaks(before: &HostState, after: &HostState, state_dir: &Path, ids: &[String]) -> Vec<String> {
    let sd = state_dir.display().to_string();
    let ours_link = |n: &str| {
        ["up0", "up1", "br0"].contains(&n)
            || ["tb-", "venet", "veth1", "veth2", "ifb"]
                .iter()
                .any(|p| n.starts_with(p))
    };
    let mut out = Vec::new();
    let mut diff =
        |what: &str, b: &BTreeSet<String>, a: &BTreeSet<String>, ours: &dyn Fn(&str) -> bool| {
            for x in a.difference(b).filter(|x| ours(x)) {
                out.push(format!("{what}: {x}"));
            }
        };
    // The testbed names no namespace (holders keep them): a name would be one of the nodes'.
    let node_names = ["host", "uplink", "r1", "r2", "b1", "a", "b", "c", "d"];
    diff("netns", &before.netns, &after.netns, &|n| {
        let name = n.split_whitespace().next().unwrap_or(n);
        node_names.contains(&name) || name.starts_with(berth_testbed::CGROUP_PREFIX)
    });
    diff("link", &before.links, &after.links, &ours_link);
    diff("bpffs", &before.bpffs, &after.bpffs, &|p| {
        p.starts_with("/sys/fs/bpf/berth/") || p == "/sys/fs/bpf/berth"
    });
    diff("mount", &before.mounts, &after.mounts, &|m| {
        m.starts_with(&sd) || m == "/run/netns" || m == "/proc" || m == "/sys/fs/bpf"
    });
    diff("cgroup", &before.cgroups, &after.cgroups, &|c| {
        ids.iter()
            .any(|id| c.ends_with(&berth_testbed::cgroup_parent(id)))
    });
    out
}

/// PIDs of processes in the pid namespace `pidns` (`pid:[inode]`).
fn procs_in(pidns: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|l| l.to_string_lossy() == pidns) {
            out.push(pid);
        }
    }
    out
}

/// A pseudo-random number from the clock (no crate needed for a few delays).
fn rand_below(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() as u64 ^ (t.as_secs() << 13)).wrapping_mul(0x9E37_79B9_7F4A_7C15) % n.max(1)
}

#[test]
fn sigkill_of_the_supervisor_during_up_then_gc_leaves_the_host_as_before() {
    let Some(env) = Env::new("sigkill_of_the_supervisor_during_up") else {
        return;
    };
    let file = env.file("cts.toml", CTS);
    let before = host_state();
    // How long an undisturbed `up` takes here: the kill moments are spread over it.
    let t0 = Instant::now();
    let tb = Testbed::up(&file, &env.options()).expect("undisturbed up");
    let up_ms = t0.elapsed().as_millis() as u64;
    let id = tb.handle.run_id.clone();
    tb.down().expect("down");
    let left = leaks(&before, &host_state(), &env.state(), &[id]);
    assert!(left.is_empty(), "down left {left:#?}");

    for round in 0..3 {
        let delay = Duration::from_millis(rand_below(up_ms + up_ms / 4));
        let up = env
            .cli(&["up", file.to_str().unwrap(), "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn up");
        // The lease exists before the supervisor makes anything.
        let end = Instant::now() + Duration::from_secs(10);
        let lease = loop {
            let found = env.runs().into_iter().find_map(|id| {
                let t = std::fs::read_to_string(env.state().join(&id).join("lease.json")).ok()?;
                serde_json::from_str::<Value>(&t).ok()
            });
            if let Some(l) = found {
                break l;
            }
            assert!(Instant::now() < end, "round {round}: no lease appeared");
            std::thread::sleep(Duration::from_millis(2));
        };
        std::thread::sleep(delay);
        let pid = lease["supervisor_pid"].as_i64().unwrap() as i32;
        let pidns = lease["pidns"].as_str().unwrap().to_owned();
        let ids = [lease["run_id"].as_str().unwrap().to_owned()];
        // Odd rounds kill the `up` command first as well (a whole job killed): then only `gc`
        // cleans; in even rounds `up` sees its supervisor die and cleans the run itself.
        let whole_job = round % 2 == 1;
        if whole_job {
            // SAFETY: a child this test spawned.
            assert_eq!(unsafe { libc::kill(up.id() as i32, libc::SIGKILL) }, 0);
        }
        // SAFETY: the supervisor this test started (its lease names it).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let out = up.wait_with_output().expect("up ends");
        println!(
            "round {round}: killed after {} ms of ~{up_ms} ms{}: up exited {:?}",
            delay.as_millis(),
            if whole_job {
                " with the up command"
            } else {
                ""
            },
            out.status.code()
        );
        // The kill moments reach past the reference `up` time, and a round's `up` can be faster
        // than the reference: then `up` handed the run over (exit 0) before the kill, nobody is
        // left to clean it, and gc must remove it like a whole-job kill.
        let handed_over = out.status.code() == Some(0);
        if !whole_job && !handed_over {
            assert_eq!(out.status.code(), Some(2), "up must fail as a setup error");
        }
        // The kernel tore the pid namespace down with its init.
        let end = Instant::now() + Duration::from_secs(5);
        while !procs_in(&pidns).is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            procs_in(&pidns),
            Vec::<i32>::new(),
            "processes outlived the supervisor"
        );
        // Only the cgroups may outlive the supervisor, and gc removes exactly those.
        let pre = leaks(&before, &host_state(), &env.state(), &ids);
        assert!(
            pre.iter().all(|l| l.starts_with("cgroup: ")),
            "the kernel left {pre:#?}"
        );
        let gc = env.run(&["gc", "--json"]);
        assert!(gc.status.success(), "gc: {}", text(&gc.stderr));
        let v: Value = serde_json::from_slice(&gc.stdout).expect("gc --json");
        let left_runs = usize::from(whole_job || handed_over);
        assert_eq!(v["runs"].as_array().map(Vec::len), Some(left_runs), "{v}");
        assert_eq!(
            v["cgroups"].as_array().map(Vec::len),
            Some(pre.len()),
            "{v} vs {pre:#?}"
        );
        println!(
            "round {round}: gc removed {left_runs} run(s), {} cgroup parent(s)",
            pre.len()
        );
        // Idempotent: a second gc finds nothing.
        let again = env.run(&["gc", "--json"]);
        let v: Value = serde_json::from_slice(&again.stdout).expect("gc --json");
        assert_eq!(v["runs"].as_array().map(Vec::len), Some(0), "{v}");
        assert_eq!(env.runs(), Vec::<String>::new(), "run directories left");
        let left = leaks(&before, &host_state(), &env.state(), &ids);
        assert!(left.is_empty(), "round {round} left {left:#?}");
        let in_cgroup: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("cgroup")).ok())
            .filter(|c| {
                c.contains(&berth_testbed::cgroup_parent(
                    lease["run_id"].as_str().unwrap(),
                ))
            })
            .collect();
        assert!(
            in_cgroup.is_empty(),
            "processes in the run's cgroups: {in_cgroup:?}"
        );
    }
}

#[test]
fn four_concurrent_runs_of_one_topology_pass() {
    let Some(env) = Env::new("four_concurrent_runs_of_one_topology_pass") else {
        return;
    };
    let file = env.file("cts.toml", CTS);
    let before = host_state();
    let runs: Vec<_> = (0..4)
        .map(|_| {
            env.cli(&["run", file.to_str().unwrap(), "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn run")
        })
        .collect();
    let mut ids = BTreeSet::new();
    for (i, r) in runs.into_iter().enumerate() {
        let out = r.wait_with_output().expect("run ends");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("run {i}: {e}: {}\n{}", text(&out.stdout), text(&out.stderr))
        });
        assert_eq!(
            out.status.code(),
            Some(0),
            "run {i}: {v:#}\n{}",
            text(&out.stderr)
        );
        let checks = v["checks"].as_array().unwrap();
        assert_eq!(checks.len(), 6);
        assert!(checks.iter().all(|c| c["status"] == "pass"), "{v:#}");
        ids.insert(v["run_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 4, "run ids must differ");
    assert_eq!(env.runs(), Vec::<String>::new(), "run directories left");
    let ids: Vec<String> = ids.into_iter().collect();
    let left = leaks(&before, &host_state(), &env.state(), &ids);
    assert!(left.is_empty(), "left {left:#?}");
}

#[test]
fn a_broken_topology_exits_2_before_creating_anything() {
    let Some(env) = Env::new("a_broken_topology_exits_2_before_creating_anything") else {
        return;
    };
    let cgroups0 = host_state().cgroups;
    let cases = [
        (
            "unknown.toml",
            "[[node]]\nname = \"a\"\naddrs = [\"192.0.2.10\"]\nrat = \"10mbit\"\n",
            4,
            "rat",
        ),
        (
            "bridge.toml",
            "[[node]]\nname = \"a\"\nmode = \"bridged\"\nbridge = \"br9\"\n",
            4,
            "node.bridge",
        ),
        (
            "rate.toml",
            "[[node]]\nname = \"a\"\n\nlink = { rate = \"fast\" }\n",
            4,
            "node.link.rate",
        ),
        (
            "check.toml",
            "[[node]]\nname = \"a\"\naddrs = [\"192.0.2.10\"]\n[[check]]\nkind = \"ping\"\nfrom = \"a\"\nto = \"nowhere\"\n",
            7,
            "check.to",
        ),
    ];
    for (name, body, line, key) in cases {
        let file = env.file(name, body);
        for verb in ["validate", "up", "run"] {
            let out = env.run(&[verb, file.to_str().unwrap()]);
            let err = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{verb} {name}: {err}");
            let at = format!("{}:{line}:", file.display());
            assert!(
                err.contains(&at) && err.contains(key),
                "{verb} {name}: want {at} and {key} in {err}"
            );
            assert!(
                !env.state().exists(),
                "{verb} {name} created {}",
                env.state().display()
            );
        }
    }
    assert_eq!(host_state().cgroups, cgroups0);
}

/// Parses JUnit XML with python3's xml.etree: (tests, failures, names of failed cases).
fn junit(path: &Path) -> (usize, usize, Vec<String>) {
    let script = "import sys, xml.etree.ElementTree as E\n\
        s = E.parse(sys.argv[1]).getroot()\n\
        assert s.tag == 'testsuite'\n\
        cases = s.findall('testcase')\n\
        assert int(s.get('tests')) == len(cases)\n\
        failed = [c.get('name') for c in cases if c.find('failure') is not None]\n\
        assert int(s.get('failures')) == len(failed)\n\
        print(len(cases), len(failed), ' '.join(failed))\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "JUnit did not parse: {}",
        text(&out.stderr)
    );
    let o = text(&out.stdout);
    let mut it = o.split_whitespace();
    let n = it.next().unwrap().parse().unwrap();
    let f = it.next().unwrap().parse().unwrap();
    (n, f, it.map(str::to_owned).collect())
}

#[test]
fn junit_parses_and_a_doubled_rate_fails_only_the_rate_check() {
    let Some(env) = Env::new("junit_parses_and_a_doubled_rate_fails_only_the_rate_check") else {
        return;
    };
    let file = env.file("netns.toml", NETNS);
    let tb = Testbed::up(&file, &env.options()).expect("up");
    let id = tb.handle.run_id.clone();
    let f = file.to_str().unwrap();
    let xml = env.dir.path().join("good.xml");
    let out = env.run(&[
        "check",
        f,
        "--run",
        &id,
        "--json",
        "--junit",
        xml.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(out.status.code(), Some(0), "{v:#}");
    assert_eq!(junit(&xml), (4, 0, vec![]));

    // The fault: the link shaped at twice its configured rate, both ends (as a broken shaper
    // or a wrong unit would).
    for (node, dev) in [("a", "venet0"), ("host", "tb-a")] {
        let o = env.run(&[
            "exec", f, "--run", &id, node, "--", "tc", "qdisc", "change", "dev", dev, "root",
            "tbf", "rate", "20mbit", "burst", "12500", "latency", "50ms",
        ]);
        assert!(o.status.success(), "inject on {node}: {}", text(&o.stderr));
    }
    let bad = env.dir.path().join("bad.xml");
    let out = env.run(&[
        "check",
        f,
        "--run",
        &id,
        "--json",
        "--junit",
        bad.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    for c in v["checks"].as_array().unwrap() {
        let want = if c["name"] == "a-rate" {
            "fail"
        } else {
            "pass"
        };
        assert_eq!(c["status"], want, "{c:#}");
    }
    assert_eq!(junit(&bad), (4, 1, vec!["a-rate".to_owned()]));
    // The table names expected and actual.
    let table = env.run(&["check", f, "--run", &id]);
    let t = text(&table.stdout);
    assert!(
        t.contains("FAIL  a-rate") && t.contains("expected 10.00 Mbit/s"),
        "{t}"
    );
    tb.down().expect("down");
    assert_eq!(env.runs(), Vec::<String>::new());
}
