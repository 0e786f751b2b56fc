//! Checkpoint and restore of a running CT with CRIU on one "host" (a network namespace of the
//! test's own, its own berth root): a counting process goes on from where it was, with the same
//! PID inside the CT, the CT's address answers from another namespace, `stop` works, and
//! nothing is left behind. Bad input fails before anything changes.

use std::path::Path;
use std::time::{Duration, Instant};

use berth_tests::ct::TestHost;
use berth_tests::net::{Topology, assert_same, wait_for};
use berth_tests::skip::skip;

const CT: &str = "301";
const ADDR: &str = "192.0.2.31";

/// Appends 1, 2, 3 … to /tmp/seq every 10 ms, its PID in /tmp/counter.pid.
const COUNTER: &str = "#!/bin/sh\necho $$ > /tmp/counter.pid\ni=0\nwhile :; do i=$((i+1)); echo $i >> /tmp/seq; usleep 10000; done\n";

fn criu_or_skip(what: &str) -> bool {
    match berth_runtime::container::checkpoint::criu_available() {
        Ok(_) => true,
        Err(why) => {
            skip(what, &why);
            false
        }
    }
}

fn seq(h: &TestHost) -> Vec<u64> {
    seq_of(h, CT)
}

fn seq_of(h: &TestHost, ct: &str) -> Vec<u64> {
    let p = h.root.join("private").join(ct).join("upper/tmp/seq");
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The numbers are 1, 2, … n with none missing, repeated or restarted.
fn assert_consecutive(s: &[u64]) {
    for (i, v) in s.iter().enumerate() {
        assert_eq!(
            *v,
            i as u64 + 1,
            "sequence broken at line {}: {:?}",
            i + 1,
            &s[i.saturating_sub(3)..(i + 3).min(s.len())]
        );
    }
}

fn create_counting_ct(h: &TestHost) {
    create_counter(h, CT, ADDR, false);
}

fn create_counter(h: &TestHost, ct: &str, addr: &str, privileged: bool) {
    let mut args = vec!["create", ct, "--ipadd", addr];
    if privileged {
        args.push("--privileged");
    }
    h.ok(&args);
    let private = h.root.join("private").join(ct).join("upper");
    let script = private.join("counter.sh");
    std::fs::write(&script, COUNTER).unwrap();
    let rc = private.join("etc/rc.local");
    std::fs::create_dir_all(rc.parent().unwrap()).unwrap();
    std::fs::write(
        &rc,
        "#!/bin/sh\n/bin/sh /counter.sh </dev/null >/dev/null 2>&1 &\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [&script, &rc] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn cgroup_count(h: &TestHost) -> usize {
    h.cgroup_dirs().len()
}

#[test]
fn checkpoint_restore_continues_the_ct() {
    if !criu_or_skip("checkpoint_restore_continues_the_ct") {
        return;
    }
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    create_counting_ct(&h);
    h.ok(&[
        "set",
        CT,
        "--memory",
        "200M",
        "--rate-in",
        "10mbit",
        "--save",
    ]);
    h.ok(&["start", CT]);
    assert!(
        wait_for(Duration::from_secs(5), || seq(&h).len() >= 20),
        "the counter did not start"
    );
    let limit_before = memory_limit(&h);
    let shaped = tc_classes(&topo);
    assert!(
        shaped.contains("rate 10Mbit"),
        "not shaped before: {shaped}"
    );
    assert!(limit_before.starts_with("209715200"), "{limit_before}");
    let (_, pid, _) = h.exec(CT, &["cat", "/tmp/counter.pid"]);
    let pid = pid.trim().to_string();
    assert!(
        topo.uplink.ping(ADDR),
        "CT unreachable before the checkpoint"
    );
    let uuid = h.status(CT)["uuid"].clone();
    let counted = netstat_bytes(&h);
    assert!(counted > 0, "nothing counted before the checkpoint");
    // The CT's root binds what it can reach (its cgroup, its /etc, the host's /dev/null bound
    // in): the restore must rebuild each from the same source, never a wider host path.
    let (rc, _, e) = h.exec(
        CT,
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/cg /tmp/etc && mount --bind /sys/fs/cgroup/memory /tmp/cg \
             && mount --bind /etc /tmp/etc && touch /tmp/nul && mount --bind /dev/null /tmp/nul",
        ],
    );
    assert_eq!(rc, 0, "binds inside the CT: {e}");
    let views = "ls /tmp/cg | md5sum; ls /sys/fs/cgroup/memory | md5sum; ls /tmp/etc | md5sum; \
                 ls /etc | md5sum; stat -c %t:%T /tmp/nul";
    let (_, views_before, _) = h.exec(CT, &["sh", "-c", views]);
    // A process `berth exec` left behind keeps its session outside the CT: CRIU refuses the
    // dump, and the CT must run on untouched.
    let (rc, _, e) = h.exec(CT, &["sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 &"]);
    assert_eq!(rc, 0, "{e}");
    let n = seq(&h).len();
    let err = h.fails(&["checkpoint", CT]);
    assert!(
        err.contains("checkpoint failed") && err.contains("session leader"),
        "{err}"
    );
    assert_eq!(h.status(CT)["status"], "running");
    assert!(wait_for(Duration::from_secs(5), || seq(&h).len() >= n + 20));
    assert_consecutive(&seq(&h));
    assert!(
        !h.root
            .join("dump")
            .join(CT)
            .join("berth-checkpoint.json")
            .exists()
    );
    let (rc, _, e) = h.exec(CT, &["killall", "sleep"]);
    assert_eq!(rc, 0, "{e}");
    assert!(wait_for(Duration::from_secs(3), || h
        .exec(CT, &["pidof", "sleep"])
        .0
        != 0));
    // An established TCP connection from the uplink into the CT (an echo server there, in a
    // session of its own).
    let (rc, _, e) = h.exec(
        CT,
        &[
            "sh",
            "-c",
            "setsid nc -l -p 7000 -e cat </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(rc, 0, "{e}");
    let mut tcp = TcpClient::connect(&topo, ADDR, 7000);
    assert_eq!(
        tcp.echo("one").as_deref(),
        Some("one"),
        "echo before the checkpoint"
    );

    // Checkpoint: the CT stops, its host side goes.
    let t0 = Instant::now();
    let r = h.json(&["checkpoint", CT]);
    assert_eq!(r["status"], "stopped", "{r}");
    assert_eq!(h.status(CT)["status"], "stopped");
    let dumped = seq(&h);
    assert_consecutive(&dumped);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seq(&h), dumped, "the counter ran on after the checkpoint");
    assert!(
        !topo
            .host
            .run("ip", &["link", "show", "venet301"])
            .status
            .success(),
        "host end still there after the checkpoint"
    );

    // Restore: the same process counts on from where it was.
    let r = h.json(&["restore", CT]);
    let downtime = t0.elapsed();
    assert_eq!(r["status"], "running", "{r}");
    let st = h.status(CT);
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["uuid"], uuid, "the UUID changed");
    assert!(
        wait_for(Duration::from_secs(5), || seq(&h).len()
            >= dumped.len() + 20),
        "the counter did not go on after the restore"
    );
    let after = seq(&h);
    assert_consecutive(&after);
    let (rc, same, _) = h.exec(CT, &["cat", "/tmp/counter.pid"]);
    assert_eq!((rc, same.trim()), (0, pid.as_str()));
    let (rc, cmd, _) = h.exec(CT, &["cat", &format!("/proc/{pid}/cmdline")]);
    assert!(
        rc == 0 && cmd.contains("counter.sh"),
        "PID {pid} in the CT is not the counter: {cmd:?}"
    );
    println!("checkpoint + restore (CLI to CLI, counter stopped) took {downtime:?}");

    // Its address answers from the uplink namespace again, through the re-created host end,
    // and the datapath counts on from the totals before (same CT, same UUID).
    assert!(topo.uplink.ping(ADDR), "CT unreachable after the restore");
    let recounted = netstat_bytes(&h);
    assert!(
        recounted > counted,
        "counters did not continue: {counted} before, {recounted} after"
    );
    assert_eq!(
        memory_limit(&h),
        limit_before,
        "memory limit not re-applied"
    );
    assert_eq!(
        tcp.echo("two").as_deref(),
        Some("two"),
        "the TCP connection did not survive checkpoint and restore"
    );
    let reshaped = tc_classes(&topo);
    assert!(
        reshaped.contains("rate 10Mbit"),
        "shaping not re-applied: {reshaped}"
    );
    let (_, views_after, _) = h.exec(CT, &["sh", "-c", views]);
    assert_eq!(
        views_after, views_before,
        "the CT's own binds came back different"
    );
    let v: Vec<&str> = views_after.lines().collect();
    assert!(
        v.len() == 5 && v[0] == v[1] && v[2] == v[3] && v[4] == "1:3",
        "{views_after}"
    );
    // The console is the new monitor's pty: what the CT writes there is logged.
    let (rc, _, e) = h.exec(CT, &["sh", "-c", "echo restored-console-ok > /dev/console"]);
    assert_eq!(rc, 0, "{e}");
    let log = h.root.join("run").join(format!("{CT}.console.log"));
    assert!(
        wait_for(Duration::from_secs(3), || std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("restored-console-ok")),
        "the console after the restore is not logged"
    );

    // The images are gone (restoring twice would fork the CT's history).
    let err = h.fails(&["restore", CT]);
    assert!(err.contains("already running"), "{err}");
    assert!(
        !h.root
            .join("dump")
            .join(CT)
            .join("berth-checkpoint.json")
            .exists()
    );

    // vzctl's chkpnt/restore: `suspend --dump` stops the CT into a dump, `resume` restores it.
    let n = seq(&h).len();
    h.ok(&["suspend", CT, "--dump"]);
    assert_eq!(h.status(CT)["status"], "stopped");
    h.ok(&["resume", CT]);
    assert!(
        wait_for(Duration::from_secs(5), || seq(&h).len() >= n + 20),
        "the counter did not go on after resume"
    );
    assert_consecutive(&seq(&h));
    let (_, again, _) = h.exec(CT, &["cat", "/tmp/counter.pid"]);
    assert_eq!(again.trim(), pid);

    // --keep-running: a snapshot; the CT goes on.
    let n = seq(&h).len();
    let snap = h.dir.path().join("snap");
    let snap_s = snap.to_str().unwrap();
    let r = h.json(&["checkpoint", CT, "--keep-running", "--dir", snap_s]);
    assert_eq!(r["status"], "running", "{r}");
    assert_eq!(h.status(CT)["status"], "running");
    assert!(wait_for(Duration::from_secs(5), || seq(&h).len() >= n + 20));
    assert_consecutive(&seq(&h));
    assert!(snap.join("berth-checkpoint.json").exists());
    assert!(
        topo.uplink.ping(ADDR),
        "CT unreachable after a --keep-running checkpoint"
    );
    let err = h.fails(&["checkpoint", CT, "--dir", snap_s]);
    assert!(err.contains("already holds a checkpoint"), "{err}");
    assert_eq!(h.status(CT)["status"], "running");

    h.ok(&["stop", CT]);
    assert_eq!(h.status(CT)["status"], "stopped");
    h.assert_clean();
    assert_same("after stop", &before, &topo.host.settled_snapshot());
}

/// A privileged CT (no user namespace) takes CRIU's other paths (no usernsd).
#[test]
fn checkpoint_restore_privileged_ct() {
    if !criu_or_skip("checkpoint_restore_privileged_ct") {
        return;
    }
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    create_counter(&h, "302", "192.0.2.32", true);
    h.ok(&["start", "302"]);
    assert!(wait_for(Duration::from_secs(5), || seq_of(&h, "302").len() >= 20));
    h.ok(&["checkpoint", "302"]);
    let dumped = seq_of(&h, "302").len();
    h.ok(&["restore", "302"]);
    // The restored init's parent, its monitor, is berth-mon as after a start.
    let init = h.status("302")["init_pid"].as_i64().expect("init_pid");
    let stat = std::fs::read_to_string(format!("/proc/{init}/stat")).expect("init's stat");
    let ppid = stat[stat.rfind(')').expect("comm end") + 2..]
        .split(' ')
        .nth(1)
        .expect("ppid")
        .to_string();
    let exe = std::fs::read_link(format!("/proc/{ppid}/exe")).expect("monitor exe");
    assert_eq!(
        exe.file_name().and_then(|f| f.to_str()),
        Some("berth-mon"),
        "restored CT's monitor runs {}",
        exe.display()
    );
    assert!(
        wait_for(Duration::from_secs(5), || seq_of(&h, "302").len()
            >= dumped + 20),
        "the counter did not go on after the restore"
    );
    assert_consecutive(&seq_of(&h, "302"));
    assert!(
        topo.uplink.ping("192.0.2.32"),
        "CT unreachable after the restore"
    );
    h.ok(&["stop", "302"]);
    h.assert_clean();
    assert_same("after stop", &before, &topo.host.settled_snapshot());
}

/// In + out bytes the datapath counted for the CT.
fn netstat_bytes(h: &TestHost) -> u64 {
    let v = h.json(&["netstat", CT]);
    v.as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| r["in_bytes"].as_u64().unwrap_or(0) + r["out_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// The HTB classes on the CT's host end.
fn tc_classes(topo: &Topology) -> String {
    let o = topo.host.run("tc", &["class", "show", "dev", "venet301"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The CT's memory limit as its cgroup has it (v1 or v2).
fn memory_limit(h: &TestHost) -> String {
    for d in h.cgroup_dirs() {
        for f in ["memory.limit_in_bytes", "memory.max"] {
            if let Ok(v) = std::fs::read_to_string(d.join(f)) {
                return v.trim().to_string();
            }
        }
    }
    String::new()
}

#[test]
fn bad_input_changes_nothing() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    create_counting_ct(&h);

    // No CRIU: a clear error before anything happens (runs whether CRIU works here or not).
    let o = h
        .cmd(&["checkpoint", CT])
        .env("BERTH_CRIU", "/nonexistent/criu")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("checkpoint unavailable:"),
        "{err}"
    );
    let o = h
        .cmd(&["restore", CT])
        .env("BERTH_CRIU", "/nonexistent/criu")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("restore unavailable:"),
        "{err}"
    );

    if !criu_or_skip("bad_input_changes_nothing (with CRIU)") {
        return;
    }
    // Not running.
    let err = h.fails(&["checkpoint", CT]);
    assert!(err.contains("CT 301 is not running"), "{err}");
    assert!(!h.root.join("dump").join(CT).exists());

    // No images, or not berth's.
    let err = h.fails(&["restore", CT]);
    assert!(err.contains("holds no checkpoint"), "{err}");
    let bogus = h.dir.path().join("bogus");
    std::fs::create_dir_all(&bogus).unwrap();
    std::fs::write(bogus.join("berth-checkpoint.json"), b"{]").unwrap();
    let err = h.fails(&["restore", CT, "--dir", bogus.to_str().unwrap()]);
    assert!(err.contains("damaged"), "{err}");
    assert_eq!(h.status(CT)["status"], "stopped");

    // Corrupt images of a real checkpoint: CRIU fails, the restore rolls back completely.
    h.ok(&["start", CT]);
    assert!(wait_for(Duration::from_secs(5), || seq(&h).len() >= 5));
    let dir = h.dir.path().join("ck");
    h.ok(&["checkpoint", CT, "--dir", dir.to_str().unwrap()]);
    assert_eq!(h.status(CT)["status"], "stopped");
    let err = h.fails(&["checkpoint", CT, "--dir", dir.to_str().unwrap()]);
    assert!(err.contains("not running"), "{err}");
    corrupt(&dir.join("pstree.img"));
    let err = h.fails(&["restore", CT, "--dir", dir.to_str().unwrap()]);
    assert!(err.contains("restore failed"), "{err}");
    assert_eq!(h.status(CT)["status"], "stopped");
    assert_eq!(
        cgroup_count(&h),
        0,
        "a cgroup is left after a failed restore"
    );
    assert!(
        dir.join("berth-checkpoint.json").exists(),
        "a failed restore removed the images"
    );
    // Images of an earlier CT that had this CTID (another UUID) are refused before anything.
    let meta = dir.join("berth-checkpoint.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    m["uuid"] = "00000000-0000-4000-8000-000000000001".into();
    std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
    let err = h.fails(&["restore", CT, "--dir", dir.to_str().unwrap()]);
    assert!(err.contains("UUID differs"), "{err}");
    assert_eq!(h.status(CT)["status"], "stopped");
    h.assert_clean();
    assert_same(
        "after a failed restore",
        &before,
        &topo.host.settled_snapshot(),
    );
}

fn corrupt(p: &Path) {
    let mut b = std::fs::read(p).unwrap();
    for x in b.iter_mut().skip(4) {
        *x = 0xff;
    }
    std::fs::write(p, b).unwrap();
}

/// `busybox nc` in the uplink namespace, connected to the CT: lines in, echoed lines out.
struct TcpClient {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TcpClient {
    fn connect(topo: &Topology, addr: &str, port: u16) -> Self {
        use std::io::BufRead;
        use std::os::fd::AsRawFd;
        let ns = format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            topo.uplink.fd.as_raw_fd()
        );
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={ns}"))
            .args(["busybox", "nc", addr, &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nc in the uplink namespace");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn echo(&mut self, line: &str) -> Option<String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}").ok()?;
        self.stdin.flush().ok()?;
        self.lines.recv_timeout(Duration::from_secs(10)).ok()
    }
}

impl Drop for TcpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
