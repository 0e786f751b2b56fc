//! The vzctl/vzlist entry points as an SSH-driven panel module uses them, and `set
//! --userpasswd` against a real CT — including a CT root that plants symlinks to make berth
//! write its shadow file onto the host.

use std::process::Output;

use berth::exit_codes::ErrorCode;
use berth_tests::ct::TestHost;
use berth_tests::net::Topology;

fn out(o: &Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn vzctl(h: &TestHost, args: &[&str]) -> (i32, String, String) {
    out(&h.compat("vzctl", args).output().expect("spawn vzctl"))
}

fn vzctl_ok(h: &TestHost, args: &[&str]) -> String {
    let (code, stdout, stderr) = vzctl(h, args);
    assert_eq!(code, 0, "vzctl {args:?}:\n{stdout}\n{stderr}");
    stdout
}

/// `user`'s hash in `shadow`.
fn hash_of<'a>(shadow: &'a str, user: &str) -> &'a str {
    shadow
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(user)).then(|| f.next().unwrap_or_default())
        })
        .unwrap_or_else(|| panic!("no {user} in {shadow}"))
}

/// `hash` is SHA-512-crypt of `password`, checked by OpenSSL (another implementation than the
/// one berth hashed with): `openssl passwd -6` with the hash's salt gives the same string.
fn assert_hash_of(hash: &str, password: &str) {
    // The salt field, with its `rounds=N$` prefix if any (OpenSSL takes both).
    let salt = hash
        .strip_prefix("$6$")
        .and_then(|r| r.rsplit_once('$'))
        .map(|(salt, _)| salt)
        .unwrap_or_else(|| panic!("not a $6$ hash: {hash:?}"));
    let o = std::process::Command::new("openssl")
        .args(["passwd", "-6", "-salt", salt, password])
        .output()
        .expect("run openssl");
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), hash);
}

#[test]
fn panel_session_over_vzctl_and_vzlist() {
    let topo = Topology::new();
    let h = TestHost::new().in_netns(topo.host.fd());

    vzctl_ok(
        &h,
        &[
            "create",
            "4951",
            "--ostemplate",
            "busybox",
            "--hostname",
            "panel.test",
            "--ipadd",
            "192.0.2.51",
        ],
    );
    vzctl_ok(&h, &["create", "4952"]);

    // BARRIER:LIMIT: the limit is applied, and berth says so on stderr.
    let (code, stdout, stderr) = vzctl(
        &h,
        &[
            "set",
            "4951",
            "--memory",
            "256M:300M",
            "--numproc",
            "100:120",
            "--onboot",
            "yes",
            "--save",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout, "Saved parameters for CT 4951\n");
    assert!(
        stderr.contains("--memory 256M:300M") && stderr.contains("300M"),
        "{stderr}"
    );
    assert!(stderr.contains("--numproc 100:120"), "{stderr}");
    // --ram is vzctl's name of the same limit; a barrier above the limit is refused.
    let (code, _, stderr) = vzctl(&h, &["set", "4952", "--ram", "300M:256M", "--save"]);
    assert_eq!(code, i32::from(ErrorCode::InvalidSyntax.exit()), "{stderr}");
    assert!(stderr.contains("barrier is above the limit"), "{stderr}");
    vzctl_ok(&h, &["set", "4952", "--ram", "128M", "--save"]);
    // --quiet silences the notice, not the change.
    let (code, stdout, stderr) = vzctl(
        &h,
        &["--quiet", "set", "4952", "--ram", "100M:120M", "--save"],
    );
    assert_eq!((code, stderr.as_str()), (0, ""), "{stdout}");
    let conf = std::fs::read_to_string(h.root.join("conf/4952.toml")).unwrap();
    assert!(
        conf.contains("120M") || conf.contains(&(120u64 << 20).to_string()),
        "{conf}"
    );

    vzctl_ok(&h, &["start", "4951"]);
    assert_eq!(
        vzctl_ok(&h, &["status", "4951"]),
        "CTID 4951 exist mounted running\n"
    );
    assert_eq!(
        vzctl_ok(&h, &["status", "4952"]),
        "CTID 4952 exist unmounted down\n"
    );
    // The live cgroup has the limits.
    let st = h.status("4951");
    assert_eq!(st["memory"]["limit"], 300 << 20, "{st}");
    assert_eq!(st["numproc"]["limit"], 120, "{st}");
    let conf = std::fs::read_to_string(h.root.join("conf/4951.toml")).unwrap();
    assert!(conf.contains("onboot = true"), "{conf}");
    assert!(
        !std::fs::read_to_string(h.root.join("conf/4952.toml"))
            .unwrap()
            .contains("onboot = true")
    );

    // A panel splits vzlist's rows on whitespace: every column is there, `-` for none.
    let (code, stdout, stderr) = out(&h
        .compat(
            "vzlist",
            &["-a", "-H", "-o", "ctid,status,ip,hostname,numproc.l"],
        )
        .output()
        .unwrap());
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        vec![
            vec!["4951", "running", "192.0.2.51", "panel.test", "120"],
            vec!["4952", "stopped", "-", "-", "-"],
        ],
        "{stdout}"
    );

    // exec with one string: vzctl runs it through a shell.
    assert_eq!(
        vzctl_ok(&h, &["exec", "4951", "cat /etc/hostname; echo $((6*7))"]),
        "panel.test\n42\n"
    );
    let (code, ..) = vzctl(&h, &["exec", "4951", "exit 3"]);
    assert_eq!(code, 3, "exec's exit code is the command's");

    // --userpasswd on the running CT: the hash in its /etc/shadow is the password's.
    vzctl_ok(&h, &["set", "4951", "--userpasswd", "root:pa:ss w0rd"]);
    let shadow = vzctl_ok(&h, &["exec", "4951", "cat /etc/shadow"]);
    assert_hash_of(hash_of(&shadow, "root"), "pa:ss w0rd");
    assert_eq!(hash_of(&shadow, "nobody"), "*", "other accounts untouched");

    // vzctl's error codes.
    let (code, ..) = vzctl(&h, &["create", "4951"]);
    assert_eq!(code, i32::from(ErrorCode::Exists.exit()));
    let (code, ..) = vzctl(&h, &["destroy", "4951"]);
    assert_eq!(code, i32::from(ErrorCode::Running.exit()));
    let (code, ..) = vzctl(&h, &["start", "4999"]);
    assert_eq!(code, i32::from(ErrorCode::NotFound.exit()));
    let (code, ..) = vzctl(&h, &["exec", "4952", "true"]);
    assert_eq!(code, i32::from(ErrorCode::NotRunning.exit()));
    let (code, _, stderr) = vzctl(&h, &["frobnicate", "4951"]);
    assert_eq!(code, i32::from(ErrorCode::InvalidSyntax.exit()));
    assert!(stderr.contains("Usage: vzctl"), "{stderr}");

    vzctl_ok(&h, &["stop", "4951"]);
    assert_eq!(
        vzctl_ok(&h, &["status", "4951"]),
        "CTID 4951 exist unmounted down\n"
    );
    // Stopping a stopped CT is no failure (vzctl's behaviour); --quiet drops the notice.
    let (code, _, stderr) = vzctl(&h, &["stop", "4951"]);
    assert_eq!(code, 0);
    assert!(stderr.contains("not running"), "{stderr}");
    let (code, _, stderr) = vzctl(&h, &["--quiet", "stop", "4951"]);
    assert_eq!((code, stderr.as_str()), (0, ""));
    vzctl_ok(&h, &["destroy", "4951"]);
    vzctl_ok(&h, &["delete", "4952"]);
    assert_eq!(
        vzctl_ok(&h, &["status", "4951"]),
        "CTID 4951 deleted unmounted down\n"
    );
    let (code, stdout, _) = out(&h.compat("vzlist", &["-a", "-H"]).output().unwrap());
    assert_eq!((code, stdout.as_str()), (0, ""));
    h.assert_clean();
}

#[test]
fn userpasswd_on_a_stopped_ct_and_bad_input() {
    let h = TestHost::new();
    h.ok(&["create", "4953"]);
    // Stopped, without --save: a password is no config setting.
    let o = h.ok(&[
        "set",
        "4953",
        "--userpasswd",
        "root:first",
        "--userpasswd",
        "nobody:x",
    ]);
    assert_eq!(o, "CT 4953 updated\n");
    h.ok(&["start", "4953"]);
    let (code, shadow, err) = h.exec("4953", &["cat", "/etc/shadow"]);
    assert_eq!(code, 0, "{err}");
    assert_hash_of(hash_of(&shadow, "root"), "first");
    assert_hash_of(hash_of(&shadow, "nobody"), "x");
    // The CT's own view of the file: root-only, owned by its root.
    let (_, ls, _) = h.exec("4953", &["stat", "-c", "%a %u %g", "/etc/shadow"]);
    assert_eq!(ls.trim(), "600 0 0");

    // Bad input: a clear error, and the file as it was.
    for (arg, says) in [
        ("nosuch:pw", "no user \"nosuch\""),
        ("root:", "password is empty"),
        ("root", "USER:PASSWORD"),
        ("../x:pw", "not a user name"),
    ] {
        let err = h.fails(&["set", "4953", "--userpasswd", arg]);
        assert!(err.contains(says), "{arg}: {err}");
    }
    let (_, after, _) = h.exec("4953", &["cat", "/etc/shadow"]);
    assert_eq!(after, shadow);
    h.ok(&["stop", "4953"]);
    h.ok(&["destroy", "4953"]);
    h.assert_clean();
}

#[test]
fn userpasswd_does_not_follow_a_ct_roots_symlinks() {
    let h = TestHost::new();
    // A host file and directory the CT's root points its /etc/shadow and /etc at.
    let host = tempfile::tempdir().unwrap();
    let target = host.path().join("shadow");
    let original = "root:HOST-SECRET:1:0:99999:7:::\n";
    std::fs::write(&target, original).unwrap();
    std::fs::write(host.path().join("passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(host.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing();

    h.ok(&["create", "4954"]);
    h.ok(&["start", "4954"]);
    let plant = |script: &str| {
        let (code, _, err) = h.exec("4954", &["sh", "-c", script]);
        assert_eq!(code, 0, "{script}: {err}");
    };
    let t = target.display().to_string();
    plant(&format!("rm /etc/shadow && ln -s {t} /etc/shadow"));
    for running in [true, false] {
        let err = h.fails(&["set", "4954", "--userpasswd", "root:owned"]);
        assert!(err.contains("symlink"), "running={running}: {err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), original);
        assert_eq!(listing(), before, "nothing made next to the target");
        if running {
            h.ok(&["stop", "4954"]);
        }
    }

    // The whole /etc a link to the host directory.
    h.ok(&["start", "4954"]);
    let d = host.path().display().to_string();
    plant(&format!("mv /etc /etc.real && ln -s {d} /etc"));
    let err = h.fails(&["set", "4954", "--userpasswd", "root:owned"]);
    assert!(
        err.contains("not a symlink") && err.contains("/etc"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&target).unwrap(), original);
    assert_eq!(listing(), before);

    h.ok(&["stop", "--fast", "4954"]);
    h.ok(&["destroy", "4954"]);
    h.assert_clean();
}
