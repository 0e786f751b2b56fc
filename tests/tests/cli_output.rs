//! Golden tests of the hoster-facing CLI: `list`'s vzlist-style table and the one JSON
//! contract of `list`/`status`, with real CTs (routed addresses in a host namespace of the
//! test's own, a running CT with live-only limits, a long host name), and every documented
//! exit code provoked by a real failing command.

use std::collections::BTreeSet;
use std::process::Output;

use berth::exit_codes::{ErrorCode, TABLE};
use berth_tests::ct::TestHost;
use berth_tests::net::Topology;
use serde_json::{Value, json};

const LONG: &str = "a-very-long-hostname-wider-than-any-vzlist-column.example.com";

/// 4901: two addresses and a long host name, stopped. 4902: named, no address, running
/// with a live-only `set`. 4903: nothing set, stopped.
fn setup(h: &TestHost) {
    h.ok(&[
        "create",
        "4901",
        "--ipadd",
        "192.0.2.91",
        "--ipadd",
        "2001:db8:1::91",
        "--hostname",
        LONG,
    ]);
    h.ok(&[
        "create",
        "4902",
        "--name",
        "web-4902",
        "--hostname",
        "h4902.test",
    ]);
    h.ok(&["create", "4903"]);
    h.ok(&["start", "4902"]);
    // Not saved: only the running CT's cgroup has it, and list/status must show it.
    h.ok(&["set", "4902", "--numproc", "64", "--cpulimit", "50"]);
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every key of `v`, at any depth, with its path.
fn keys(v: &Value, at: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{at}/{k}");
                out.insert(p.clone());
                keys(v, &p, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys(v, &format!("{at}[]"), out)),
        _ => {}
    }
}

#[test]
fn list_table_is_vzlist_shaped() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    setup(&h);

    // Strings left-, numbers right-aligned (headers with them), `-` for none, one space
    // between columns, addresses space-separated in one column as vzlist prints them.
    let out = h.ok(&[
        "list",
        "-a",
        "-o",
        "ctid,numproc.l,cpulimit,status,ip,hostname",
    ]);
    let golden = format!(
        "\
CTID NPROC.L CPULIM STATUS  IP_ADDR                   HOSTNAME
4901       -      - stopped 192.0.2.91 2001:db8:1::91 {LONG}
4902      64     50 running -                         h4902.test
4903       -      - stopped -                         -
"
    );
    assert_eq!(out, golden);

    // The default columns and headers are vzlist's; -H drops the header and every row keeps
    // five whitespace-separated words (a panel's `awk '{print $4}'` is the address).
    let out = h.ok(&["list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["CTID", "NPROC", "STATUS", "IP_ADDR", "HOSTNAME"],
        "{out}"
    );
    assert_eq!(lines.len(), 2, "only the running CT by default:\n{out}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (row[0], row[2], row[3], row[4]),
        ("4902", "running", "-", "h4902.test")
    );
    let nproc: u64 = row[1].parse().expect("NPROC is a number");
    assert!((1..64).contains(&nproc), "{out}");
    let out = h.ok(&["list", "-a", "-H", "-o", "ctid,ip"]);
    assert_eq!(
        out, "4901 192.0.2.91 2001:db8:1::91\n4902 -\n4903 -\n",
        "-H: no header"
    );

    // -n: the name column; -S: stopped only; -1: CTIDs; CTID/name arguments; patterns.
    let out = h.ok(&["list", "-n"]);
    let words: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        words[0],
        ["CTID", "NPROC", "STATUS", "IP_ADDR", "NAME"],
        "{out}"
    );
    assert_eq!((words[1][0], words[1][4]), ("4902", "web-4902"), "{out}");
    assert_eq!(
        h.ok(&["list", "-o", "ctid,name"]),
        "CTID NAME\n4902 web-4902\n"
    );
    assert_eq!(h.ok(&["list", "-S", "-1"]), "4901\n4903\n");
    assert_eq!(h.ok(&["list", "-a", "-1"]), "4901\n4902\n4903\n");
    assert_eq!(h.ok(&["list", "-1", "4903", "web-4902"]), "4902\n4903\n");
    assert_eq!(h.ok(&["list", "-a", "-1", "-h", "a-very-*"]), "4901\n");
    assert_eq!(h.ok(&["list", "-a", "-1", "-N", "web-49??"]), "4902\n");
    assert_eq!(h.ok(&["list", "-a", "-1", "-h", "nomatch*"]), "");
    // Interface names: the routed CTs' host-side venet device.
    assert_eq!(h.ok(&["list", "-a", "-1", "-i", "venet0"]), "4901\n");

    // -s [-]field: numbers numerically, reverse with '-', unset last either way.
    assert_eq!(
        h.ok(&["list", "-a", "-H", "-o", "ctid", "-s", "-ctid"]),
        "4903\n4902\n4901\n"
    );
    assert_eq!(
        h.ok(&["list", "-a", "-H", "-o", "ctid", "-s", "numproc.l"]),
        "4902\n4901\n4903\n"
    );
    assert_eq!(
        h.ok(&["list", "-a", "-H", "-o", "ctid", "-s", "-hostname"]),
        "4902\n4901\n4903\n"
    );

    // Sizes are human in the table, raw in JSON.
    h.ok(&["set", "4903", "--memory", "256M", "--save"]);
    assert_eq!(
        h.ok(&["list", "4903", "-H", "-o", "ctid,memory.l"]),
        "4903 256M\n"
    );
    assert_eq!(
        h.list(&["4903", "-o", "memory.l"])[0],
        json!({"memory": {"limit": 268435456u64}})
    );

    // Every UBC-style suffix of the running CT: held ≤ maxheld, the live limit, failcnt.
    let v = &h.list(&[
        "4902",
        "-o",
        "numproc,numproc.m,numproc.b,numproc.l,numproc.f",
    ])[0];
    let n = &v["numproc"];
    assert!(
        n["held"].as_u64().unwrap() <= n["maxheld"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(
        (&n["limit"], &n["barrier"], &n["failcnt"]),
        (&json!(64), &json!(64), &json!(0))
    );
    let v = &h.list(&["4902", "-o", "memory,memory.m,memory.f"])[0]["memory"];
    assert!(v["held"].as_u64().unwrap() > 0, "{v}");
    assert!(
        v["maxheld"].as_u64().unwrap() >= v["held"].as_u64().unwrap(),
        "{v}"
    );

    // Options vzlist has and berth cannot honour are refused by name.
    let e = h.fails(&["list", "-t"]);
    assert!(e.contains("list -t") && e.contains("template list"), "{e}");
    let e = h.fails(&["list", "-d", "x*"]);
    assert!(e.contains("no description"), "{e}");

    h.ok(&["stop", "4902"]);
    // Stopped: the config's values (the live-only set is gone with the cgroup).
    assert_eq!(
        h.ok(&[
            "list",
            "4902",
            "-H",
            "-o",
            "ctid,numproc,numproc.l,cpulimit"
        ]),
        "4902 - - -\n"
    );
    for ct in ["4901", "4902", "4903"] {
        h.ok(&["destroy", ct]);
    }
    h.assert_clean();
}

#[test]
fn one_json_object_for_list_and_status() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    setup(&h);

    for ct in ["4901", "4902", "4903"] {
        let st = h.json(&["status", ct]);
        assert_eq!(st["schema_version"], 1, "{st}");
        let st = &st["ct"];
        let listed = h.list(&[ct]);
        assert_eq!(listed.len(), 1);
        let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
        keys(st, "", &mut a);
        keys(&listed[0], "", &mut b);
        assert_eq!(a, b, "CT {ct}: list and status differ in shape");
        for k in &a {
            let last = k.rsplit('/').next().unwrap();
            assert!(
                !last.contains('.') && last == last.to_lowercase(),
                "CT {ct}: key {k} is not snake_case without dots"
            );
        }
        for k in [
            "ctid", "uuid", "name", "hostname", "status", "ip", "init_pid",
        ] {
            assert_eq!(st[k], listed[0][k], "CT {ct}: {k}");
        }
        assert!(st.get("state").is_none(), "status, not state: {st}");
    }

    let a = h.status("4901");
    assert_eq!(a["ip"], json!(["192.0.2.91", "2001:db8:1::91"]));
    assert_eq!(a["hostname"], LONG);
    assert_eq!(a["status"], "stopped");
    assert_eq!(a["name"], Value::Null);
    assert_eq!(a["init_pid"], Value::Null);
    assert_eq!(
        a["numproc"],
        json!({"held": null, "maxheld": null, "barrier": null, "limit": null, "failcnt": null})
    );
    assert_eq!(a["quota"], Value::Null);

    // The human status, golden but for the values a run makes (UUID, id range, PID).
    let base = a["userns"]["uid_base"].as_u64().unwrap();
    assert_eq!(
        h.ok(&["status", "4901"]),
        format!(
            "CT 4901 stopped\nuuid: {}\nunprivileged: CT ids 0..65536 are host ids {base}..{}\n",
            a["uuid"].as_str().unwrap(),
            base + 65536
        )
    );

    let c = h.status("4903");
    assert_eq!(c["ip"], json!([]), "no address: an empty array");
    assert_eq!(c["hostname"], Value::Null);

    let b = h.status("4902");
    assert_eq!(b["status"], "running");
    assert_eq!(b["name"], "web-4902");
    assert!(b["init_pid"].as_i64().unwrap() > 1);
    assert_eq!(b["numproc"]["limit"], 64, "the live-only numproc: {b}");
    assert_eq!(b["cpu"]["limit_percent"], 50, "the live-only cpulimit: {b}");
    let human = h.ok(&["status", "web-4902"]);
    assert_eq!(
        human.lines().next().unwrap(),
        format!("CT 4902 running (init PID {})", b["init_pid"]),
        "{human}"
    );
    assert_eq!(
        h.list(&["web-4902", "-o", "ctid,numproc.l,cpulimit,status"]),
        [
            json!({"ctid": 4902, "numproc": {"limit": 64}, "cpu": {"limit_percent": 50},
                "status": "running"})
        ]
    );
    // The config still has neither.
    let conf = std::fs::read_to_string(h.root.join("conf/4902.toml")).unwrap();
    assert!(
        !conf.contains("numproc") && !conf.contains("cpulimit"),
        "{conf}"
    );

    // `-j` is `--json`; `list` wraps its CTs with the schema version.
    let o = h.run(&["list", "-j", "-a", "-o", "ctid"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v,
        json!({"schema_version": 1, "cts": [{"ctid": 4901}, {"ctid": 4902}, {"ctid": 4903}]})
    );

    // Lifecycle answers say `status` too.
    let v = h.json(&["suspend", "4902"]);
    assert_eq!(
        (&v["status"], &v["schema_version"]),
        (&json!("suspended"), &json!(1))
    );
    assert_eq!(h.status("4902")["status"], "suspended");
    let v = h.json(&["resume", "4902"]);
    assert_eq!(v["status"], "running");

    h.ok(&["stop", "4902"]);
    for ct in ["4901", "4902", "4903"] {
        h.ok(&["destroy", ct]);
    }
    h.assert_clean();
}

/// `args` fails with `code`: its exit status, the human error on stderr, and with --json the
/// JSON error on stdout.
fn provoke(h: &TestHost, code: ErrorCode, args: &[&str], env: &[(&str, &str)]) {
    let run = |json: bool| {
        // First: after `exec CT --` it would be part of the command.
        let mut a = if json { vec!["--json"] } else { vec![] };
        a.extend_from_slice(args);
        let mut c = h.cmd(&a);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("spawn berth")
    };
    let o = run(false);
    assert_eq!(
        o.status.code(),
        Some(i32::from(code.exit())),
        "berth {args:?} (expected {code:?}): {o:?}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("berth: error:") || err.contains("error:"),
        "{err}"
    );
    let o = run(true);
    assert_eq!(o.status.code(), Some(i32::from(code.exit())), "{o:?}");
    let v: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("berth {args:?} --json: not JSON ({e}): {o:?}"));
    assert_eq!(v["code"], code.as_str(), "{v}");
    assert_eq!(v["exit_code"], code.exit(), "{v}");
    assert_eq!(v["schema_version"], 1, "{v}");
    assert!(!v["error"].as_str().unwrap_or_default().is_empty(), "{v}");
}

#[test]
fn every_exit_code_is_provoked() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());
    setup(&h);
    let mut seen = BTreeSet::new();
    let mut check = |code: ErrorCode, args: &[&str], env: &[(&str, &str)]| {
        provoke(&h, code, args, env);
        seen.insert(code.as_str());
    };

    check(ErrorCode::Failed, &["list", "-t"], &[]);
    // A config that cannot be read (a directory where the file should be): EISDIR.
    let conf = h.root.join("conf/4908.toml");
    std::fs::create_dir(&conf).unwrap();
    check(ErrorCode::System, &["status", "4908"], &[]);
    std::fs::remove_dir(&conf).unwrap();
    check(ErrorCode::NotFound, &["start", "4999"], &[]);
    check(ErrorCode::NotFound, &["status", "no-such-name"], &[]);
    check(ErrorCode::InvalidSyntax, &["list", "--bogus"], &[]);
    check(ErrorCode::InvalidSyntax, &["start"], &[]);
    check(ErrorCode::InvalidValue, &["list", "-o", "ctid,bogus"], &[]);
    check(ErrorCode::InvalidValue, &["create", "abc"], &[]);
    check(ErrorCode::InvalidValue, &["list", "-h", ""], &[]);
    // vzctl syntax: a barrier above its limit does not parse; --onboot needs --save; a
    // password for an account the CT lacks.
    check(
        ErrorCode::InvalidSyntax,
        &["set", "4903", "--memory", "300M:256M", "--save"],
        &[],
    );
    check(ErrorCode::InvalidSyntax, &["completion", "tcsh"], &[]);
    check(
        ErrorCode::InvalidValue,
        &["set", "4902", "--onboot", "yes"],
        &[],
    );
    check(
        ErrorCode::InvalidValue,
        &["set", "4903", "--userpasswd", "nosuch:pw"],
        &[],
    );
    check(ErrorCode::NotRunning, &["exec", "4903", "--", "true"], &[]);
    check(ErrorCode::Running, &["destroy", "4902"], &[]);
    check(ErrorCode::Exists, &["create", "4901"], &[]);
    check(
        ErrorCode::AddressInUse,
        &["create", "4904", "--ipadd", "192.0.2.91"],
        &[],
    );
    check(
        ErrorCode::NoTemplate,
        &["create", "4905", "--template", "nosuch"],
        &[],
    );
    check(
        ErrorCode::NameTaken,
        &["create", "4906", "--name", "web-4902"],
        &[],
    );
    check(
        ErrorCode::NeedSave,
        &["set", "4903", "--numproc", "10"],
        &[],
    );
    check(
        ErrorCode::TemplateInUse,
        &["template", "remove", "busybox"],
        &[],
    );
    check(
        ErrorCode::TemplateExists,
        &["template", "build", "busybox"],
        &[],
    );
    for ct in ["4904", "4905", "4906"] {
        assert!(
            !h.root.join(format!("conf/{ct}.toml")).exists(),
            "CT {ct} made"
        );
    }

    h.ok(&["suspend", "4902"]);
    check(ErrorCode::Suspended, &["exec", "4902", "--", "true"], &[]);
    h.ok(&["resume", "4902"]);

    // Another command holds the CT's lock: with a short BERTH_LOCK_TIMEOUT, "locked".
    let lock = std::fs::File::create(h.root.join("run/4903.lock")).unwrap();
    let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("flock");
    check(
        ErrorCode::Locked,
        &["start", "4903"],
        &[("BERTH_LOCK_TIMEOUT", "1")],
    );
    drop(held);

    // An init that cannot run: the start fails and leaves the CT stopped.
    h.ok(&["create", "4907"]);
    let conf = h.root.join("conf/4907.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        text.replace("init = \"/sbin/init\"", "init = \"/sbin/nope\""),
    )
    .unwrap();
    check(ErrorCode::StartFailed, &["start", "4907"], &[]);
    assert_eq!(h.status("4907")["status"], "stopped");

    // Idempotent start and stop: exit 0 with a notice (vzctl's behaviour), no error JSON.
    let o = h.run(&["start", "4902", "--json"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already running"),
        "{o:?}"
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&v["status"], &v["changed"]),
        (&json!("running"), &json!(false))
    );
    let o = h.run(&["stop", "4903"]);
    assert!(o.status.success(), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not running"),
        "{o:?}"
    );
    assert_eq!(stdout(&o), "", "nothing on stdout for a no-op stop");

    // Every code of the table was provoked, except already_running: start of a running CT
    // succeeds (just above), so only the API's strict start can answer with it.
    let documented: BTreeSet<&str> = TABLE
        .iter()
        .map(|(c, ..)| c.as_str())
        .filter(|c| *c != "already_running")
        .collect();
    assert_eq!(seen, documented);

    h.ok(&["stop", "4902"]);
    for ct in ["4901", "4902", "4903", "4907"] {
        h.ok(&["destroy", ct]);
    }
    h.assert_clean();
}
