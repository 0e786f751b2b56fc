//! The testbed's pytest fixture and bats helpers (testbed/fixtures), run for real: a pytest
//! module and a bats file bring a topology up through them, reach a node, run its checks, take
//! it down, and leave no run behind; a test that fails inside still gets its testbed taken down.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use berth_tests::ct::berth_bin;
use berth_tests::skip::skip;

const PYTEST: &str = "/opt/berth-venv/bin/pytest";

const TOPOLOGY: &str = r#"
[uplink]
prefixes = ["198.51.100.0/24"]
[[node]]
name = "a"
addrs = ["192.0.2.10"]
[[check]]
kind = "ping"
from = "a"
to = "uplink"
family = "4"
"#;

const PY_TESTS: &str = r#"
import os

pytest_plugins = ["berth_testbed"]

TOPO = os.environ["TOPOLOGY"]


def test_reach_and_checks(berth_testbed):
    tb = berth_testbed(TOPO)
    assert tb.nodes["a"]["kind"] == "netns"
    out = tb.exec("a", "ping", "-c", "1", "-W", "2", "192.0.2.1")
    assert out.returncode == 0, out.stdout + out.stderr
    res = tb.check()
    assert [c["status"] for c in res["checks"]] == ["pass"]
    assert res["run_id"] == tb.run_id


def test_a_failing_test_still_tears_down(berth_testbed):
    tb = berth_testbed(TOPO)
    with open(os.environ["RUN_ID_FILE"], "w") as f:
        f.write(tb.run_id)
    assert tb.exec("a", "false").returncode == 0, "fails on purpose"
"#;

const BATS_TESTS: &str = r#"
load "$FIXTURES/berth_testbed.bash"

setup_file() { berth_testbed_up "$TOPOLOGY"; }
teardown_file() { berth_testbed_down; }

@test "a reaches the uplink" {
  berth_testbed_exec a ping -c 1 -W 2 192.0.2.1
}

@test "the handle names a's PID" {
  pid=$(berth_testbed_pid a)
  [ -d "/proc/$pid" ]
}

@test "checks pass" {
  run berth_testbed_check
  [ "$status" -eq 0 ]
  [ "$(echo "$output" | jq -r '.checks[0].status')" = pass ]
}
"#;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testbed/fixtures")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

use berth_tests::skip::have_tool as have;

fn runs(state: &Path) -> Vec<String> {
    std::fs::read_dir(state)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn setup(prefix: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let topo = dir.path().join("topology.toml");
    std::fs::write(&topo, TOPOLOGY).unwrap();
    let state = dir.path().join("state");
    (dir, topo, state)
}

fn env(c: &mut Command, topo: &Path, state: &Path) {
    c.env("BERTH_BIN", berth_bin())
        .env("BERTH_TESTBED_STATE", state)
        .env("TOPOLOGY", topo)
        .env("FIXTURES", fixtures_dir())
        .stdin(Stdio::null());
}

#[test]
fn the_pytest_fixture_brings_up_runs_and_tears_down() {
    if !Path::new(PYTEST).exists() {
        skip(
            "the_pytest_fixture_brings_up_runs_and_tears_down",
            &format!("{PYTEST} missing (xtask/setup.sh installs it)"),
        );
        return;
    }
    let (dir, topo, state) = setup("berth-testbed-pytest-");
    std::fs::write(dir.path().join("test_tb.py"), PY_TESTS).unwrap();
    let id_file = dir.path().join("run_id");
    let mut c = Command::new(PYTEST);
    c.args(["-q", "-p", "no:cacheprovider", "test_tb.py"])
        .current_dir(dir.path())
        .env("PYTHONPATH", fixtures_dir())
        .env("RUN_ID_FILE", &id_file);
    env(&mut c, &topo, &state);
    let out: Output = c.output().expect("run pytest");
    let o = text(&out.stdout);
    println!("{o}{}", text(&out.stderr));
    // One passes, the one failing on purpose fails: pytest exits 1.
    assert_eq!(out.status.code(), Some(1), "{o}");
    assert!(o.contains("1 failed, 1 passed"), "{o}");
    assert!(o.contains("fails on purpose"), "{o}");
    assert!(!std::fs::read_to_string(&id_file).unwrap().is_empty());
    assert_eq!(runs(&state), Vec::<String>::new(), "the fixture left runs");
}

#[test]
fn the_bats_helpers_bring_up_run_and_tear_down() {
    for tool in ["bats", "jq"] {
        if !have(tool) {
            skip(
                "the_bats_helpers_bring_up_run_and_tear_down",
                &format!("{tool} is not installed (xtask/setup.sh installs it)"),
            );
            return;
        }
    }
    let (dir, topo, state) = setup("berth-testbed-bats-");
    let file = dir.path().join("tb.bats");
    std::fs::write(&file, BATS_TESTS).unwrap();
    let mut c = Command::new("bats");
    c.arg("--tap").arg(&file);
    env(&mut c, &topo, &state);
    let out = c.output().expect("run bats");
    let o = text(&out.stdout);
    println!("{o}{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{o}{}", text(&out.stderr));
    assert!(o.contains("1..3") && o.matches("\nok ").count() == 3, "{o}");
    assert_eq!(runs(&state), Vec::<String>::new(), "the helpers left runs");
}
