//! `berth testbed --rootless` (issue 15) as an unprivileged user (`nobody`, by setpriv): the
//! same topology file that builds real CTs as root builds plain namespaces in a user namespace
//! of the run's own; connectivity (reach and no reach), shaping and the delay line work, the
//! eBPF-based checks report skipped with the reason, and nothing is left behind.

use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use berth_tests::ct::berth_bin;
use berth_tests::skip::skip;
use serde_json::Value;

const NOBODY: u32 = 65_534;

const TOPOLOGY: &str = r#"
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
link = { loss_every = 100 }
[[node]]
name = "b1"
mode = "bridged"
bridge = "br0"
addrs = ["198.51.100.21/24", "2001:db8:2::21/64"]
link = { rate = "10mbit", delay = "5ms" }
[[node]]
name = "c"
addrs = ["203.0.113.5"]
[[check]]
name = "r1-uplink"
kind = "ping"
from = "r1"
to = "uplink"
[[check]]
name = "uplink-b1"
kind = "ping"
from = "uplink"
to = "b1"
[[check]]
name = "no-route-to-c"
kind = "ping"
from = "uplink"
to = "c"
family = "4"
expect = "none"
[[check]]
name = "b1-rate"
kind = "rate"
from = "b1"
to = "uplink"
family = "4"
[[check]]
name = "r1-accounting"
kind = "accounting"
node = "r1"
[[check]]
name = "r1-loss"
kind = "loss"
node = "r1"
"#;

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new(test: &str) -> Option<Env> {
        if !berth_tests::skip::require_tools(test, &["setpriv", "iperf3", "nsenter", "ping", "tc"])
        {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("berth-testbed-rootless-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
        // nobody must reach the binary: a copy in the test's own directory (the build's may sit
        // under a home directory nobody cannot enter).
        let bin = dir.path().join("berth");
        std::fs::copy(berth_bin(), &bin).expect("copy the berth binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let probe = as_nobody(&state, &[bin.to_str().unwrap(), "testbed", "ls"]);
        if !probe.status.success() {
            skip(
                test,
                &format!(
                    "nobody cannot run {}: {}",
                    bin.display(),
                    text(&probe.stderr)
                ),
            );
            return None;
        }
        let userns = as_nobody(&state, &["unshare", "-r", "-n", "true"]);
        if !userns.status.success() {
            skip(
                test,
                &format!("no unprivileged user namespaces: {}", text(&userns.stderr)),
            );
            return None;
        }
        Some(Env { dir })
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write topology");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn testbed(&self, args: &[&str]) -> Output {
        let bin = self.dir.path().join("berth");
        let mut argv = vec![bin.to_str().unwrap(), "testbed"];
        argv.extend_from_slice(args);
        as_nobody(&self.state(), &argv)
    }
}

fn as_nobody(state: &Path, argv: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            &NOBODY.to_string(),
            "--regid",
            &NOBODY.to_string(),
        ])
        .args(["--clear-groups", "--inh-caps=-all", "--"])
        .args(argv)
        .env("BERTH_TESTBED_STATE", state)
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("spawn setpriv")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn runs(state: &Path) -> Vec<String> {
    std::fs::read_dir(state)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn rootless_run_checks_connectivity_and_skips_ebpf_checks() {
    let Some(env) = Env::new("rootless_run_checks_connectivity_and_skips_ebpf_checks") else {
        return;
    };
    let file = env.file("topo.toml", TOPOLOGY);
    let f = file.to_str().unwrap();
    // Without --rootless an unprivileged user gets a setup error that says what to do.
    let out = env.testbed(&["run", f]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--rootless"),
        "{}",
        text(&out.stderr)
    );

    let out = env.testbed(&["run", "--rootless", f, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    println!("{v:#}");
    // A skip never passes: exit 4.
    assert_eq!(out.status.code(), Some(4), "{v:#}\n{}", text(&out.stderr));
    for c in v["checks"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        if name == "r1-accounting" || name == "r1-loss" {
            assert_eq!(c["status"], "skipped", "{c:#}");
            assert!(c["reason"].as_str().unwrap().contains("rootless"), "{c:#}");
        } else {
            assert_eq!(c["status"], "pass", "{c:#}");
        }
    }
    assert_eq!(
        runs(&env.state()),
        Vec::<String>::new(),
        "run directories left"
    );
}

#[test]
fn rootless_up_exec_down_as_nobody() {
    let Some(env) = Env::new("rootless_up_exec_down_as_nobody") else {
        return;
    };
    let file = env.file("topo.toml", TOPOLOGY);
    let f = file.to_str().unwrap();
    let out = env.testbed(&["up", "--rootless", f, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let h: Value = serde_json::from_slice(&out.stdout).expect("up --json");
    assert_eq!(h["rootless"], true, "{h:#}");
    assert_eq!(h["nodes"]["r1"]["kind"], "netns", "{h:#}");
    let sup = h["supervisor_pid"].as_i64().unwrap();
    // The supervisor runs as nobody on this machine.
    let status = std::fs::read_to_string(format!("/proc/{sup}/status")).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid.split_whitespace().nth(1) == Some("65534"), "{uid}");
    let id = h["run_id"].as_str().unwrap();
    let out = env.testbed(&[
        "exec",
        f,
        "--run",
        id,
        "r1",
        "--",
        "ping",
        "-c",
        "1",
        "-W",
        "2",
        "198.51.100.21",
    ]);
    assert!(
        out.status.success(),
        "exec ping: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = env.testbed(&[
        "exec", f, "--run", id, "r1", "--", "ip", "-br", "addr", "show", "venet0",
    ]);
    assert!(
        text(&out.stdout).contains("192.0.2.101"),
        "{}",
        text(&out.stdout)
    );
    let out = env.testbed(&["down", f, "--run", id]);
    assert!(out.status.success(), "down: {}", text(&out.stderr));
    // Gone, or a zombie its new parent has yet to reap.
    let st = std::fs::read_to_string(format!("/proc/{sup}/stat")).unwrap_or_default();
    assert!(
        st.is_empty()
            || st
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z')),
        "supervisor still runs: {st}"
    );
    assert_eq!(
        runs(&env.state()),
        Vec::<String>::new(),
        "run directories left"
    );
}
