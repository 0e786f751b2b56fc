//! The per-CT monitor: `start` execs the small `berth-mon` next to `berth`, which serves the
//! CT (console log, stop's notice, reaping and recording init's exit); without a trustworthy
//! `berth-mon` (absent, not root's, writable by others) the forked monitor serves it instead.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_tests::ct::{TestHost, bin_dir};
use berth_tests::net::wait_for;

fn init_pid(h: &TestHost, ct: &str) -> i32 {
    let st = h.status(ct);
    assert_eq!(st["status"], "running", "{st}");
    st["init_pid"].as_i64().expect("init_pid") as i32
}

/// The monitor is init's parent.
fn monitor_of(init: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{init}/stat")).expect("init's stat");
    let after = &stat[stat.rfind(')').expect("comm end") + 2..];
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

fn exe(pid: i32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/exe")).expect("monitor exe")
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

fn gone(pid: i32) -> bool {
    // A zombie still has /proc/PID; reaped, it has none.
    wait_for(Duration::from_secs(5), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    })
}

fn console_log(h: &TestHost, ct: &str) -> String {
    let p = h.status(ct)["paths"]["console_log"]
        .as_str()
        .map(PathBuf::from)
        .unwrap_or_else(|| h.root.join(format!("run/{ct}.console.log")));
    fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn berth_mon_serves_console_stop_and_reaping() {
    let h = TestHost::new();
    h.ok(&["create", "7101", "--template", "busybox"]);
    h.ok(&["start", "7101"]);
    let init = init_pid(&h, "7101");
    let mon = monitor_of(init);
    let want = fs::canonicalize(bin_dir().join("berth-mon")).expect("berth-mon built");
    assert_eq!(exe(mon), want, "the monitor is not berth-mon");
    assert_eq!(comm(mon), "berth-mon 7101");

    // Console output written in the CT lands in the log berth-mon keeps.
    let (rc, _, err) = h.exec(
        "7101",
        &["sh", "-c", "echo monitor-marker-7101 > /dev/console"],
    );
    assert_eq!(rc, 0, "{err}");
    assert!(
        wait_for(Duration::from_secs(5), || console_log(&h, "7101")
            .contains("monitor-marker-7101")),
        "console log: {}",
        console_log(&h, "7101")
    );

    // stop: berth-mon takes stop's notice (its comm matches), so nothing is recorded.
    h.ok(&["stop", "7101"]);
    assert!(gone(mon), "berth-mon still there after stop");
    assert!(gone(init), "init not reaped after stop");
    std::thread::sleep(Duration::from_millis(300));
    let st = h.status("7101");
    assert_eq!(st["status"], "stopped", "{st}");
    assert!(st["last_exit"].is_null(), "stop recorded an exit: {st}");

    // init killed from the host: berth-mon reaps it (no zombie left) and records the exit.
    h.ok(&["start", "7101"]);
    let init = init_pid(&h, "7101");
    let mon = monitor_of(init);
    assert_eq!(exe(mon), want);
    // SAFETY: the CT's init, started by this test.
    assert_eq!(unsafe { libc::kill(init, libc::SIGKILL) }, 0);
    assert!(gone(init), "init left a zombie: berth-mon did not reap it");
    assert!(gone(mon), "berth-mon did not exit after init");
    assert!(wait_for(Duration::from_secs(5), || {
        !h.status("7101")["last_exit"].is_null()
    }));
    let st = h.status("7101");
    assert_eq!(st["status"], "stopped", "{st}");
    assert_eq!(st["last_exit"]["killed"]["signal"], 9, "{st}");
    h.ok(&["gc"]);
    h.assert_clean();
    h.ok(&["destroy", "7101"]);
}

#[test]
fn monitor_killed_leaves_a_state_stop_and_gc_handle() {
    let h = TestHost::new();
    for ct in ["7102", "7103"] {
        h.ok(&["create", ct, "--template", "busybox"]);
        h.ok(&["start", ct]);
    }
    // 7102: the monitor dies, init lives on: status still answers, stop ends the CT.
    let init = init_pid(&h, "7102");
    let mon = monitor_of(init);
    // SAFETY: this test's CT's monitor.
    assert_eq!(unsafe { libc::kill(mon, libc::SIGKILL) }, 0);
    assert!(gone(mon));
    let st = h.status("7102");
    assert!(
        st["status"] == "running" || st["status"] == "stopped",
        "{st}"
    );
    h.ok(&["stop", "--fast", "7102"]);
    assert!(gone(init));
    assert_eq!(h.status("7102")["status"], "stopped");

    // 7103: monitor and init both killed: gc cleans up what start left.
    let init = init_pid(&h, "7103");
    let mon = monitor_of(init);
    // SAFETY: this test's CT's processes.
    unsafe {
        libc::kill(mon, libc::SIGKILL);
        libc::kill(init, libc::SIGKILL);
    }
    assert!(gone(mon) && gone(init));
    h.ok(&["gc"]);
    assert_eq!(h.status("7103")["status"], "stopped");
    h.assert_clean();
    // And the CT starts again.
    h.ok(&["start", "7103"]);
    h.ok(&["stop", "--fast", "7103"]);
    h.assert_clean();
}

/// A directory of the test's own (root's, 0700) with `berth` hard-linked into it.
fn bin_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("berth-mon-test-")
        .tempdir_in(bin_dir())
        .expect("tempdir next to the binaries");
    let berth = dir.path().join("berth");
    fs::hard_link(bin_dir().join("berth"), &berth)
        .or_else(|_| fs::copy(bin_dir().join("berth"), &berth).map(|_| ()))
        .expect("berth into the test's directory");
    (dir, berth)
}

fn put_monitor(dir: &Path, mode: u32, uid: u32) {
    let p = dir.join("berth-mon");
    let _ = fs::remove_file(&p);
    fs::copy(bin_dir().join("berth-mon"), &p).expect("copy berth-mon");
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    std::os::unix::fs::chown(&p, Some(uid), Some(uid)).unwrap();
}

#[test]
fn untrusted_or_missing_berth_mon_falls_back_to_the_forked_monitor() {
    let (dir, berth) = bin_copy();
    let h = TestHost::new().with_bin(berth.clone());
    h.ok(&["create", "7104", "--template", "busybox"]);
    let berth = fs::canonicalize(&berth).unwrap();
    let mon_path = fs::canonicalize(dir.path()).unwrap().join("berth-mon");
    // (what, the berth-mon put there as (mode, owner), whether start uses it)
    type Case = (&'static str, Option<(u32, u32)>, bool);
    let cases: [Case; 4] = [
        ("absent", None, false),
        ("owned by nobody", Some((0o755, 65534)), false),
        ("writable by others", Some((0o757, 0)), false),
        ("root's, 0755", Some((0o755, 0)), true),
    ];
    for (i, (what, put, used)) in cases.into_iter().enumerate() {
        let marker = format!("fallback-marker-{i}");
        match put {
            Some((mode, uid)) => put_monitor(dir.path(), mode, uid),
            None => {
                let _ = fs::remove_file(&mon_path);
            }
        }
        h.ok(&["start", "7104"]);
        let init = init_pid(&h, "7104");
        let mon = monitor_of(init);
        let want = if used { &mon_path } else { &berth };
        assert_eq!(&exe(mon), want, "berth-mon {what}");
        assert_eq!(comm(mon), "berth-mon 7104", "berth-mon {what}");
        let (rc, _, err) = h.exec(
            "7104",
            &["sh", "-c", &format!("echo {marker} > /dev/console")],
        );
        assert_eq!(rc, 0, "{err}");
        assert!(
            wait_for(Duration::from_secs(5), || console_log(&h, "7104")
                .contains(&marker)),
            "berth-mon {what}: console not logged"
        );
        h.ok(&["stop", "7104"]);
        assert!(gone(mon), "berth-mon {what}: monitor left after stop");
        std::thread::sleep(Duration::from_millis(200));
        assert!(h.status("7104")["last_exit"].is_null(), "berth-mon {what}");
    }
    h.assert_clean();
    h.ok(&["destroy", "7104"]);
}
