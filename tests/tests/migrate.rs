//! `berth migrate` between two "hosts" (network namespaces with berth installations of their
//! own, the target reached over ssh by an sshd the test starts; see `berth_tests::migrate`):
//! offline with a writer that must lose and repeat nothing, live with processes and a TCP
//! connection kept, failures at each step bringing the source back with nothing leaked, and
//! bad input refused before anything changes.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use berth_tests::ct::TestHost;
use berth_tests::migrate::{Bed, missing_tools};
use berth_tests::net::wait_for;
use berth_tests::skip::skip;

/// Appends the next number to /tmp/seq every 10 ms, going on from the file's last one (an
/// offline migration restarts it), its PID in /tmp/counter.pid.
const COUNTER: &str = "#!/bin/sh\necho $$ > /tmp/counter.pid\ni=$(tail -n 1 /tmp/seq 2>/dev/null)\ni=${i:-0}\nwhile :; do i=$((i+1)); echo $i >> /tmp/seq; usleep 10000; done\n";

fn tools_or_skip(what: &str) -> bool {
    match missing_tools() {
        None => true,
        Some(why) => {
            skip(what, &why);
            false
        }
    }
}

fn seq(h: &TestHost, ct: &str) -> Vec<u64> {
    let p = h.root.join("private").join(ct).join("upper/tmp/seq");
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

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

fn create_counter(h: &TestHost, ct: &str, addr: &str) {
    h.ok(&["create", ct, "--ipadd", addr]);
    let upper = h.root.join("private").join(ct).join("upper");
    let script = upper.join("counter.sh");
    std::fs::write(&script, COUNTER).unwrap();
    let rc = upper.join("etc/rc.local");
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

fn state(h: &TestHost, ct: &str) -> String {
    h.status(ct)["status"].as_str().unwrap_or("?").to_string()
}

fn ok_json(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "migrate failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON {e}: {out}"))
}

fn failed(o: &std::process::Output) -> String {
    assert!(
        !o.status.success(),
        "migrate unexpectedly succeeded: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Nothing of a migration is left on the target for `ct` but (with `copy`) its files and the
/// incoming mark a retry uses.
fn assert_target_clean(bed: &Bed, ct: &str, copy: bool) {
    let d = &bed.dst;
    assert!(
        !d.root.join("conf").join(format!("{ct}.toml")).exists(),
        "config left on the target"
    );
    assert!(
        !d.root
            .join("incoming")
            .join(format!("{ct}.images"))
            .exists(),
        "images left"
    );
    assert_eq!(
        d.root.join("private").join(ct).exists(),
        copy,
        "target's copy"
    );
    assert_eq!(
        d.mounts(),
        Vec::<String>::new(),
        "mounts left on the target"
    );
    assert!(
        !bed.b
            .run("ip", &["link", "show", &format!("venet{ct}")])
            .status
            .success(),
        "host end left on the target"
    );
}

#[test]
fn offline_migration_loses_no_write_and_moves_the_address() {
    if !tools_or_skip("offline_migration_loses_no_write_and_moves_the_address") {
        return;
    }
    let bed = Bed::new();
    let (ct, addr) = ("351", "192.0.2.51");
    create_counter(&bed.src, ct, addr);
    bed.src.ok(&["start", ct]);
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= 30));
    assert!(bed.lan_ping(addr), "CT unreachable before the migration");
    let uuid = bed.src.status(ct)["uuid"].as_str().unwrap().to_string();

    let r = ok_json(&bed.migrate(ct, &["--json"]));
    let downtime = r["downtime_ms"].as_u64().expect("downtime measured");
    println!("offline downtime: {downtime} ms ({r})");
    assert_eq!(r["mode"], "offline");
    assert_eq!(state(&bed.src, ct), "migrated");
    assert_eq!(state(&bed.dst, ct), "running");
    assert_eq!(
        bed.dst.status(ct)["uuid"],
        uuid.as_str(),
        "the UUID moved with it"
    );
    let left = seq(&bed.src, ct);
    assert_consecutive(&left);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seq(&bed.src, ct), left, "the source's writer ran on");
    assert!(
        wait_for(Duration::from_secs(5), || seq(&bed.dst, ct).len()
            >= left.len() + 30),
        "the writer does not go on on the target"
    );
    // Every number the source wrote is on the target, once, and the target's go on from it.
    assert_consecutive(&seq(&bed.dst, ct));
    assert!(
        wait_for(Duration::from_secs(5), || bed.lan_ping(addr)),
        "CT unreachable from the lan after the migration"
    );
    assert!(
        !bed.a
            .run("ip", &["link", "show", &format!("venet{ct}")])
            .status
            .success(),
        "the source still has the CT's host end"
    );
    // The source's booking closed: its counters retired under the UUID.
    assert!(
        bed.src
            .root
            .join("retired")
            .join(format!("{uuid}.json"))
            .exists()
    );
    let err = bed.src.fails(&["start", ct]);
    assert!(err.contains("was migrated to root@198.51.100.2"), "{err}");
    assert!(
        !bed.dst
            .root
            .join("incoming")
            .join(format!("{ct}.json"))
            .exists()
    );

    bed.dst.ok(&["stop", "--fast", ct]);
    bed.dst.ok(&["destroy", ct]);
    bed.src.ok(&["destroy", ct]);
    bed.src.assert_clean();
    bed.dst.assert_clean();
}

/// `busybox nc` in the lan namespace, connected to the CT: lines in, echoed lines out.
struct TcpClient {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TcpClient {
    fn connect(bed: &Bed, addr: &str, port: u16) -> Self {
        let mut child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", bed.ns_path(&bed.lan)))
            .args(["busybox", "nc", addr, &port.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn nc in the lan namespace");
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
        writeln!(self.stdin, "{line}").ok()?;
        self.stdin.flush().ok()?;
        self.lines.recv_timeout(Duration::from_secs(15)).ok()
    }
}

impl Drop for TcpClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PID → command of every process in the CT but the inspecting shell's own.
fn procs(h: &TestHost, ct: &str) -> std::collections::BTreeMap<u32, String> {
    let script = "for p in /proc/[0-9]*; do n=${p#/proc/}; [ \"$n\" = \"$$\" ] && continue; \
                  c=$(cat $p/comm 2>/dev/null) && echo \"$n $c\"; done";
    let (rc, out, e) = h.exec(ct, &["sh", "-c", script]);
    assert_eq!(rc, 0, "{e}");
    out.lines()
        .filter_map(|l| {
            let (p, c) = l.split_once(' ')?;
            Some((p.parse().ok()?, c.to_string()))
        })
        .collect()
}

/// The processes that live on (seen in two looks 300 ms apart): not the counter's short
/// sleeps, not an exec's.
fn lasting(h: &TestHost, ct: &str) -> std::collections::BTreeMap<u32, String> {
    let a = procs(h, ct);
    std::thread::sleep(Duration::from_millis(300));
    let b = procs(h, ct);
    a.into_iter().filter(|(p, c)| b.get(p) == Some(c)).collect()
}

#[test]
fn live_migration_keeps_processes_and_a_connection() {
    if !tools_or_skip("live_migration_keeps_processes_and_a_connection") {
        return;
    }
    if let Err(why) = berth_runtime::container::checkpoint::criu_available() {
        skip("live_migration_keeps_processes_and_a_connection", &why);
        return;
    }
    let bed = Bed::shared_cgroups();
    let (ct, addr) = ("352", "192.0.2.52");
    create_counter(&bed.src, ct, addr);
    bed.src.ok(&["start", ct]);
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= 20));
    let (rc, _, e) = bed.src.exec(
        ct,
        &[
            "sh",
            "-c",
            "setsid nc -l -p 7000 -e cat </dev/null >/dev/null 2>&1 &",
        ],
    );
    assert_eq!(rc, 0, "{e}");
    std::thread::sleep(Duration::from_millis(200));
    let mut tcp = TcpClient::connect(&bed, addr, 7000);
    assert_eq!(
        tcp.echo("one").as_deref(),
        Some("one"),
        "echo before the migration"
    );
    let (_, counter_pid, _) = bed.src.exec(ct, &["cat", "/tmp/counter.pid"]);
    let before = lasting(&bed.src, ct);
    assert!(
        before.len() >= 3,
        "init, the counter and the echo server: {before:?}"
    );

    let r = ok_json(&bed.migrate(ct, &["--live", "--json"]));
    let downtime = r["downtime_ms"].as_u64().expect("downtime measured");
    println!("live downtime: {downtime} ms ({r})");
    assert_eq!(r["mode"], "live");
    assert_eq!(state(&bed.src, ct), "migrated");
    assert_eq!(state(&bed.dst, ct), "running");
    assert_eq!(
        tcp.echo("two").as_deref(),
        Some("two"),
        "the TCP connection did not survive the live migration"
    );
    let (_, after_pid, _) = bed.dst.exec(ct, &["cat", "/tmp/counter.pid"]);
    assert_eq!(after_pid, counter_pid, "the counter is another process");
    let after = lasting(&bed.dst, ct);
    assert_eq!(after, before, "the processes inside differ");
    let n = seq(&bed.dst, ct).len();
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.dst, ct).len() >= n + 20));
    assert_consecutive(&seq(&bed.dst, ct));
    assert!(
        bed.lan_ping(addr),
        "CT unreachable from the lan after the live migration"
    );
    drop(tcp);

    bed.dst.ok(&["stop", "--fast", ct]);
    bed.dst.ok(&["destroy", ct]);
    bed.src.ok(&["destroy", ct]);
    bed.src.assert_clean();
    bed.dst.assert_clean();
}

#[test]
fn failures_bring_the_source_back_and_leak_nothing() {
    if !tools_or_skip("failures_bring_the_source_back_and_leak_nothing") {
        return;
    }
    let mut bed = Bed::new();
    let (ct, addr) = ("353", "192.0.2.53");
    create_counter(&bed.src, ct, addr);
    // Enough files that the copy takes a moment (for the ssh drop below).
    let big = bed.src.root.join("private").join(ct).join("upper/big");
    std::fs::write(&big, vec![7u8; 64 << 20]).unwrap();
    bed.src.ok(&["start", ct]);
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= 20));

    // 1. The target refuses: the CTID is taken there.
    bed.dst.ok(&["create", ct]);
    let err = failed(&bed.migrate(ct, &[]));
    assert!(err.contains("CTID 353 is taken"), "{err}");
    assert_eq!(state(&bed.src, ct), "running");
    assert_eq!(
        state(&bed.dst, ct),
        "stopped",
        "the target's own CT 353 was touched"
    );
    assert!(
        !bed.dst
            .root
            .join("incoming")
            .join(format!("{ct}.json"))
            .exists()
    );
    bed.dst.ok(&["destroy", ct]);

    // 2. The target's start fails (its CT lock is held there): the source runs again, the
    //    target keeps only its copy (which the next attempt reuses).
    let lock_path = bed.dst.root.join("run").join(format!("{ct}.lock"));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let held = berth_runtime::lock::CtLock::acquire(&lock_path, Duration::from_secs(1)).unwrap();
    let mut args = bed.migrate_args(ct);
    let rb = args.iter().position(|a| a == "--remote-berth").unwrap() + 1;
    args[rb] = format!("env BERTH_LOCK_TIMEOUT=0 {}", &args[rb][4..]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = failed(&bed.src.run(&refs));
    assert!(err.contains("starting it on the target"), "{err}");
    assert!(err.contains("runs here again"), "{err}");
    assert_eq!(state(&bed.src, ct), "running");
    assert_target_clean(&bed, ct, true);
    assert!(
        bed.lan_ping(addr),
        "the source's CT unreachable after the failed migration"
    );
    let n = seq(&bed.src, ct).len();
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= n + 20));
    assert_consecutive(&seq(&bed.src, ct));
    drop(held);

    // 3. ssh drops mid-run (the sshd and its sessions killed once the copy began; new
    //    contents for the big file make that copy take a while).
    std::fs::write(&big, vec![9u8; 64 << 20]).unwrap();
    use std::os::unix::fs::MetadataExt;
    let incoming = bed.dst.root.join("incoming").join(format!("{ct}.json"));
    let ino = std::fs::metadata(&incoming).unwrap().ino();
    let args = bed.migrate_args(ct);
    let out = std::thread::scope(|s| {
        let run = s.spawn(|| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            bed.src.run(&refs)
        });
        assert!(
            // Preflight rewrites the mark (a new file renamed over it).
            wait_for(Duration::from_secs(20), || std::fs::metadata(&incoming)
                .is_ok_and(|m| m.ino() != ino)),
            "the migration never got past preflight"
        );
        bed.drop_connections();
        run.join().unwrap()
    });
    bed.kill_sshd();
    let err = failed(&out);
    println!("with the connection dropped: {err}");
    assert!(
        err.contains("ssh") || err.contains("rsync"),
        "the error does not say the connection broke: {err}"
    );
    assert_eq!(state(&bed.src, ct), "running", "{err}");
    assert!(
        !bed.dst
            .root
            .join("conf")
            .join(format!("{ct}.toml"))
            .exists(),
        "config left on the target"
    );
    assert_eq!(bed.dst.mounts(), Vec::<String>::new());
    let n = seq(&bed.src, ct).len();
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= n + 20));
    assert_consecutive(&seq(&bed.src, ct));

    bed.src.ok(&["stop", "--fast", ct]);
    bed.src.ok(&["destroy", ct]);
    bed.src.assert_clean();
    bed.dst.assert_clean();
    assert!(Path::new(&bed.src.root).exists());
}

#[test]
fn bad_input_is_refused_before_anything_changes() {
    if !tools_or_skip("bad_input_is_refused_before_anything_changes") {
        return;
    }
    let bed = Bed::new();
    let (ct, addr) = ("354", "192.0.2.54");
    create_counter(&bed.src, ct, addr);
    let conf = std::fs::read(bed.src.root.join("conf").join(format!("{ct}.toml"))).unwrap();

    // A stopped CT cannot move --live.
    let err = failed(&bed.migrate(ct, &["--live"]));
    assert!(
        err.contains("is not running") && err.contains("--live"),
        "{err}"
    );

    bed.src.ok(&["start", ct]);
    let unchanged = |what: &str| {
        assert_eq!(state(&bed.src, ct), "running", "{what}");
        assert!(
            !bed.dst
                .root
                .join("incoming")
                .join(format!("{ct}.json"))
                .exists(),
            "{what}: the target has a migration under way"
        );
        assert!(
            !bed.dst.root.join("private").join(ct).exists(),
            "{what}: files copied"
        );
    };

    // An unknown host, and a port nothing listens on.
    let mut args = bed.migrate_args(ct);
    args[2] = "root@no-such-host.invalid".into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = failed(&bed.src.run(&refs));
    assert!(
        err.contains("cannot reach root@no-such-host.invalid"),
        "{err}"
    );
    unchanged("unknown host");
    let err = failed(&bed.migrate(ct, &["--ssh-opt", "Port=2"]));
    assert!(err.contains("cannot reach root@198.51.100.2"), "{err}");
    unchanged("bad port");
    let err = failed(&bed.migrate(ct, &["--ssh-opt", "Port 22"]));
    assert!(err.contains("bad --ssh-opt"), "{err}");

    // The CT's address is in use on the target (another CT there has it).
    bed.dst.ok(&["create", "355", "--ipadd", addr]);
    let err = failed(&bed.migrate(ct, &[]));
    assert!(err.contains(addr), "{err}");
    unchanged("address in use");
    bed.dst.ok(&["destroy", "355"]);

    assert_eq!(
        std::fs::read(bed.src.root.join("conf").join(format!("{ct}.toml"))).unwrap(),
        conf,
        "the source's config changed"
    );
    bed.src.ok(&["stop", "--fast", ct]);
    bed.src.ok(&["destroy", ct]);
    bed.src.assert_clean();
    bed.dst.assert_clean();
}

#[test]
fn a_failed_live_restore_brings_the_source_back_from_its_images() {
    if !tools_or_skip("a_failed_live_restore_brings_the_source_back_from_its_images") {
        return;
    }
    if let Err(why) = berth_runtime::container::checkpoint::criu_available() {
        skip(
            "a_failed_live_restore_brings_the_source_back_from_its_images",
            &why,
        );
        return;
    }
    let bed = Bed::shared_cgroups();
    let (ct, addr) = ("356", "192.0.2.56");
    create_counter(&bed.src, ct, addr);
    bed.src.ok(&["start", ct]);
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= 20));
    let (_, counter_pid, _) = bed.src.exec(ct, &["cat", "/tmp/counter.pid"]);
    // The target's restore cannot take the CT's lock there.
    let lock_path = bed.dst.root.join("run").join(format!("{ct}.lock"));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let held = berth_runtime::lock::CtLock::acquire(&lock_path, Duration::from_secs(1)).unwrap();
    let mut args = bed.migrate_args(ct);
    let rb = args.iter().position(|a| a == "--remote-berth").unwrap() + 1;
    args[rb] = format!("env BERTH_LOCK_TIMEOUT=0 {}", &args[rb][4..]);
    args.push("--live".into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let err = failed(&bed.src.run(&refs));
    assert!(err.contains("runs here again"), "{err}");
    drop(held);
    assert_eq!(state(&bed.src, ct), "running");
    let (_, pid, _) = bed.src.exec(ct, &["cat", "/tmp/counter.pid"]);
    assert_eq!(pid, counter_pid, "the source's counter is another process");
    let n = seq(&bed.src, ct).len();
    assert!(wait_for(Duration::from_secs(5), || seq(&bed.src, ct).len() >= n + 20));
    assert_consecutive(&seq(&bed.src, ct));
    assert!(
        bed.lan_ping(addr),
        "the source's CT unreachable after the failed migration"
    );
    assert_target_clean(&bed, ct, true);
    assert!(
        !bed.src
            .root
            .join("dump")
            .join(format!("{ct}.migrate"))
            .join("berth-checkpoint.json")
            .exists(),
        "the source kept images it restored from"
    );

    bed.src.ok(&["stop", "--fast", ct]);
    bed.src.ok(&["destroy", ct]);
    bed.src.assert_clean();
    bed.dst.assert_clean();
}
