//! berthd's panel API end to end: the real daemon in a network namespace of the test's own,
//! real CTs, curl as the client (over the unix socket, and over TLS with certificates made
//! here by the openssl CLI), the OpenAPI document checked by openapi-spec-validator.
//! Run: `cargo test -p berth-tests --test api`.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use berth_tests::berthd::berthd_bin;
use berth_tests::ct::TestHost;
use berth_tests::net::Ns;
use berth_tests::skip::skip;
use serde_json::{Value, json};

const VALIDATOR: &str = "/opt/berth-venv/bin/openapi-spec-validator";

/// A berthd of the test's own, in `ns`, with its API socket at `sock`.
struct Daemon {
    child: Child,
    sock: PathBuf,
    https: Option<String>,
}

impl Daemon {
    /// berthd on `h` (whose run dir the CLI shares), its API socket in `sock_dir`.
    fn start(h: &TestHost, ns: &Ns, sock_dir: &Path, extra: &[&str]) -> Self {
        let out = Self::spawn(h, ns, sock_dir, extra);
        let mut child = out;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let (mut sock, mut https) = (None, None);
        let want_https = extra.contains(&"--api-listen");
        while sock.is_none() || (want_https && https.is_none()) {
            let Some(Ok(l)) = lines.next() else {
                let st = child.wait().expect("wait berthd");
                panic!("berthd ended ({st}) before announcing its API");
            };
            if let Some(p) = l.strip_prefix("berthd API on unix:") {
                sock = Some(PathBuf::from(p));
            }
            if let Some(a) = l.strip_prefix("berthd API on https://") {
                https = Some(a.trim_end_matches("/v1").to_owned());
            }
        }
        Self {
            child,
            sock: sock.unwrap(),
            https,
        }
    }

    fn spawn(h: &TestHost, ns: &Ns, sock_dir: &Path, extra: &[&str]) -> Child {
        let mut c = Command::new(berthd_bin());
        c.args(["--listen", "127.0.0.1:0", "--tick", "300", "--root"])
            .arg(&h.root)
            .arg("--api-socket")
            .arg(sock_dir.join("berthd.sock"))
            .args(["--cgroup-parent", &h.cgroup_parent, "--bpffs"])
            .arg(&h.bpffs)
            .args(extra)
            .env_remove("BERTH_ROOT")
            .env_remove("BERTH_RUN_DIR")
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        in_ns(&mut c, ns);
        c.spawn().expect("spawn berthd")
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let st = self.child.wait().expect("wait berthd");
        assert!(st.success(), "berthd stopped with {st}");
        assert!(!self.sock.exists(), "berthd left its socket behind");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn in_ns(c: &mut Command, ns: &Ns) {
    use std::os::fd::AsRawFd;
    let fd = ns.fd.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the child until exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A directory every user may traverse (the tests' temporary roots are 0700), so a refused
/// connection is the socket's own permissions at work.
fn open_run_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("berth-api-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

struct Answer {
    status: u16,
    body: Value,
}

/// `curl` over the unix socket; the status and the JSON body (Null when not JSON).
fn call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Answer {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    c.arg(format!("http://berthd{path}"));
    parse_curl(c.output().expect("run curl"), method, path)
}

fn parse_curl(o: std::process::Output, method: &str, path: &str) -> Answer {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    let status = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "{method} {path}: no status ({out:?}, {})",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    Answer {
        status,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

fn ok(a: Answer, what: &str) -> Value {
    assert!(
        a.status == 200 || a.status == 201,
        "{what}: {} {}",
        a.status,
        a.body
    );
    a.body
}

/// The events of `GET /v1/events`, read by a curl in the background.
struct Events {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Events {
    fn subscribe(sock: &Path) -> Self {
        let mut child = Command::new("curl")
            .args(["-sSN", "--unix-socket"])
            .arg(sock)
            .arg("http://berthd/v1/events")
            .stdout(Stdio::piped())
            .spawn()
            .expect("curl events");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(d) = l.strip_prefix("data: ")
                    && let Ok(v) = serde_json::from_str::<Value>(d)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        let e = Self { child, rx };
        let first = e
            .next(Duration::from_secs(10))
            .expect("the stream's ready event");
        assert_eq!(first["type"], "ready", "{first}");
        e
    }

    fn next(&self, t: Duration) -> Option<Value> {
        self.rx.recv_timeout(t).ok()
    }

    /// The next event for `ctid`, which must be `kind` from `source`.
    fn expect(&self, ctid: u32, kind: &str, source: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(e) = self.next(left) else { break };
            if e["ctid"] == ctid {
                assert_eq!(e["type"], kind, "event {e}");
                assert_eq!(e["source"], source, "event {e}");
                return e;
            }
        }
        panic!("no {kind} event for CT {ctid}");
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn ct_lifecycle_over_the_socket_with_events() {
    let ns = Ns::new();
    let h = TestHost::new().in_netns(ns.fd());
    let run = open_run_dir();
    let d = Daemon::start(&h, &ns, &run.path().join("run"), &[]);
    let s = &d.sock;
    let ev = Events::subscribe(s);

    let t0 = Instant::now();
    let r = ok(
        call(
            s,
            "POST",
            "/v1/cts",
            Some(r#"{"ctid": 7101, "hostname": "api.test", "name": "apict"}"#),
        ),
        "create",
    );
    assert_eq!(r["ctid"], 7101);
    assert_eq!(r["ct"]["status"], "stopped", "{r}");
    let create_took = t0.elapsed();
    ev.expect(7101, "created", "api");
    // One JSON contract: the API's CT object is the CLI's, key for key.
    let cli = h.status("7101");
    let api = ok(call(s, "GET", "/v1/cts/apict", None), "get")["ct"].clone();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&api), keys(&cli));
    assert_eq!(api["hostname"], "api.test");
    let list = ok(call(s, "GET", "/v1/cts", None), "list");
    assert_eq!(list["schema_version"], 1);
    assert!(
        list["cts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["ctid"] == 7101)
    );

    let r = ok(call(s, "POST", "/v1/cts/7101/start", None), "start");
    assert_eq!(r["ct"]["status"], "running", "{r}");
    assert_eq!(h.status("7101")["init_pid"], r["init_pid"]);
    ev.expect(7101, "started", "api");
    // Starting a running CT changes nothing and announces nothing, as with the CLI.
    let r = ok(call(s, "POST", "/v1/cts/7101/start", None), "start again");
    assert_eq!(r["changed"], false);

    let r = ok(
        call(
            s,
            "PATCH",
            "/v1/cts/7101",
            Some(r#"{"hostname": "api2.test", "cpulimit": 50}"#),
        ),
        "patch",
    );
    assert_eq!(r["saved"], true);
    ev.expect(7101, "settings_changed", "api");
    // Live in the CT, and saved.
    assert_eq!(h.exec("7101", &["hostname"]).1.trim(), "api2.test");
    assert_eq!(h.list_field("7101", "cpulimit"), 50);

    // A state conflict is a 409 with the CLI's code, and changes nothing.
    let a = call(s, "DELETE", "/v1/cts/7101", None);
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["code"], "running");
    assert_eq!(a.body["exit_code"], 32);
    assert_eq!(h.status("7101")["status"], "running");

    // A long operation: 202 with an id, then waited for.
    let a = call(s, "POST", "/v1/cts/7101/stop?wait=false", None);
    assert_eq!(a.status, 202, "{}", a.body);
    let id = a.body["operation"]["id"].as_str().unwrap().to_owned();
    let op = ok(
        call(s, "GET", &format!("/v1/operations/{id}?wait=1"), None),
        "operation",
    );
    assert_eq!(op["operation"]["status"], "succeeded", "{op}");
    assert_eq!(op["operation"]["result"]["stopped"], true);
    assert_eq!(h.status("7101")["status"], "stopped");
    ev.expect(7101, "stopped", "api");

    // Changes made by the CLI are noticed by berthd.
    h.ok(&["start", "7101"]);
    ev.expect(7101, "started", "host");
    h.ok(&["stop", "7101"]);
    ev.expect(7101, "stopped", "host");

    ok(call(s, "DELETE", "/v1/cts/7101", None), "delete");
    ev.expect(7101, "destroyed", "api");
    let a = call(s, "GET", "/v1/cts/7101", None);
    assert_eq!(a.status, 404);
    assert_eq!(a.body["code"], "not_found");
    assert_eq!(a.body["exit_code"], 14);
    drop(ev);
    println!("create through the API: {create_took:?}");
    d.stop();
    h.assert_clean();
}

#[test]
fn bad_requests_get_json_errors_and_change_nothing() {
    let ns = Ns::new();
    let h = TestHost::new().in_netns(ns.fd());
    let run = open_run_dir();
    let d = Daemon::start(&h, &ns, &run.path().join("run"), &[]);
    let s = &d.sock;
    let conf = |n: u32| h.root.join(format!("conf/{n}.toml"));
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        (
            "POST",
            "/v1/cts",
            Some(r#"{"ctid": 7201, "tempalte": "busybox"}"#),
            400,
            "tempalte",
        ),
        (
            "POST",
            "/v1/cts",
            Some(r#"{"ctid": 7201"#),
            400,
            "request body",
        ),
        ("POST", "/v1/cts", Some(r#"{"ctid": "x"}"#), 400, "ctid"),
        ("POST", "/v1/cts", Some(r#"{"ctid": 0}"#), 400, "ctid"),
        (
            "POST",
            "/v1/cts",
            Some(r#"{"ctid": 7201, "template": "nosuch"}"#),
            400,
            "nosuch",
        ),
        (
            "POST",
            "/v1/cts",
            Some(r#"{"ctid": 7201, "commit": "fast"}"#),
            400,
            "commit",
        ),
        (
            "PATCH",
            "/v1/cts/7299",
            Some(r#"{"cpulimit": 5}"#),
            404,
            "7299",
        ),
        ("POST", "/v1/cts/7299/start", None, 404, "7299"),
        ("POST", "/v1/cts/7299/explode", None, 404, "explode"),
        ("GET", "/v1/cts?x=1", None, 400, "\"x\""),
        ("POST", "/v1/cts/7299/stop?wait=maybe", None, 400, "maybe"),
        ("PUT", "/v1/cts", None, 405, "method"),
        ("GET", "/v2/cts", None, 404, "no such resource"),
        ("GET", "/v1/operations/op-nope", None, 404, "op-nope"),
    ];
    for (m, p, b, status, needle) in cases {
        let a = call(s, m, p, *b);
        assert_eq!(a.status, *status, "{m} {p}: {}", a.body);
        assert_eq!(a.body["schema_version"], 1, "{m} {p}: {}", a.body);
        let msg = a.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{m} {p}: {}", a.body));
        assert!(msg.contains(needle), "{m} {p}: {msg:?} lacks {needle:?}");
        assert!(a.body["code"].is_string());
    }
    // Too large a body, and a body that is no JSON object for PATCH.
    let big = format!(r#"{{"ctid": 7201, "hostname": "{}"}}"#, "a".repeat(70_000));
    assert_eq!(call(s, "POST", "/v1/cts", Some(&big)).status, 413);
    ok(
        call(s, "POST", "/v1/cts", Some(r#"{"ctid": 7202}"#)),
        "create",
    );
    let a = call(s, "PATCH", "/v1/cts/7202", Some(r#"{"memory": "lots"}"#));
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (400, Some("invalid_value")),
        "{}",
        a.body
    );
    let a = call(s, "PATCH", "/v1/cts/7202", Some("{}"));
    assert_eq!(a.status, 400, "{}", a.body);
    // Already exists: a conflict.
    let a = call(s, "POST", "/v1/cts", Some(r#"{"ctid": 7202}"#));
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (409, Some("exists")),
        "{}",
        a.body
    );
    // Stopping a stopped CT succeeds unchanged; suspending it is a conflict.
    assert_eq!(
        ok(call(s, "POST", "/v1/cts/7202/stop", None), "stop")["changed"],
        false
    );
    let a = call(s, "POST", "/v1/cts/7202/suspend", None);
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (409, Some("not_running")),
        "{}",
        a.body
    );
    assert!(!conf(7201).exists(), "a refused create left a config");
    assert!(
        !h.root.join("private/7201").exists(),
        "a refused create left a private area"
    );
    ok(call(s, "DELETE", "/v1/cts/7202", None), "delete");
    d.stop();
    h.assert_clean();
}

/// A self-signed CA, a server certificate for 127.0.0.1 and a client certificate it signed.
fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let o = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .output()
            .expect("sh");
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=berth-test-ca -keyout ca.key -out ca.pem 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
        -keyout server.key -out server.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile server.ext -out server.pem 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=panel \
        -keyout client.key -out client.csr 2>/dev/null
        printf 'extendedKeyUsage=clientAuth\\n' > client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile client.ext -out client.pem 2>/dev/null
        printf 'tok-0123456789abcdef-api\\n' > token && chmod 600 token",
    );
}

#[test]
fn tcp_is_tls_only_and_needs_a_token_or_certificate() {
    let ns = Ns::new();
    ns.ip("link set lo up");
    let h = TestHost::new().in_netns(ns.fd());
    let run = open_run_dir();
    let certs = run.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certs(&certs);
    let p = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let (cert, key, token, ca) = (p("server.pem"), p("server.key"), p("token"), p("ca.pem"));
    let run_dir = run.path().join("run");

    // berthd refuses plain and unauthenticated TCP listeners.
    let refused: &[(&[&str], &str)] = &[
        (
            &["--api-listen", "127.0.0.1:0", "--api-token-file", &token],
            "--api-tls-cert",
        ),
        (
            &[
                "--api-listen",
                "127.0.0.1:0",
                "--api-tls-cert",
                &cert,
                "--api-tls-key",
                &key,
            ],
            "--api-token-file",
        ),
    ];
    for (args, needle) in refused {
        let o = Daemon::spawn(&h, &ns, &run_dir, args)
            .wait_with_output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} started");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("berthd API"),
            "{args:?} served"
        );
    }

    let args = [
        "--api-listen",
        "127.0.0.1:0",
        "--api-tls-cert",
        &cert,
        "--api-tls-key",
        &key,
        "--api-token-file",
        &token,
        "--api-client-ca",
        &ca,
        "--api-rate",
        "5",
    ];
    let d = Daemon::start(&h, &ns, &run_dir, &args);
    let addr = d.https.clone().unwrap();
    let url = format!("https://{addr}/v1/cts");
    let curl = |extra: &[&str], url: &str| {
        let mut a = vec![
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            &ca,
            "-w",
            "\n%{http_code}",
        ];
        a.extend_from_slice(extra);
        a.push(url);
        ns.run("curl", &a)
    };
    let a = parse_curl(curl(&[], &url), "GET", &url);
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.body["code"], "unauthenticated");
    let a = parse_curl(
        curl(
            &["-H", "Authorization: Bearer tok-0123456789abcdef-apX"],
            &url,
        ),
        "GET",
        &url,
    );
    assert_eq!(a.status, 401, "wrong token: {}", a.body);
    let a = parse_curl(
        curl(
            &["-H", "Authorization: Bearer tok-0123456789abcdef-api"],
            &url,
        ),
        "GET",
        &url,
    );
    assert_eq!(a.status, 200, "token: {}", a.body);
    assert_eq!(a.body["schema_version"], 1);
    let (ccert, ckey) = (p("client.pem"), p("client.key"));
    let a = parse_curl(curl(&["--cert", &ccert, "--key", &ckey], &url), "GET", &url);
    assert_eq!(a.status, 200, "client certificate: {}", a.body);
    // Plain HTTP on the TLS port gets no answer.
    let o = ns.run(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{addr}/v1/cts"),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "000",
        "plain HTTP was answered"
    );
    // The rate limit (5/s, bursts of 10) holds before authentication.
    let many: Vec<&str> = std::iter::repeat_n(url.as_str(), 25).collect();
    let mut a = vec![
        "-s",
        "--cacert",
        &ca,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
    ];
    a.extend(many);
    let o = ns.run("curl", &a);
    let codes = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(codes.lines().any(|c| c == "429"), "no 429 in {codes}");
    assert!(codes.lines().any(|c| c == "401"), "no 401 in {codes}");
    d.stop();
}

/// Runs curl on the socket as uid/gid 65534, with `groups` as its supplementary groups.
fn curl_as_nobody(sock: &Path, groups: &[u32]) -> std::process::Output {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let mut c = Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--unix-socket",
    ])
    .arg(sock)
    .arg("http://berthd/v1/cts");
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().expect("curl as nobody")
}

#[test]
fn socket_is_out_of_reach_of_cts_and_other_users() {
    let ns = Ns::new();
    let h = TestHost::new().in_netns(ns.fd());
    let run = open_run_dir();
    let run_dir = run.path().join("run");
    let d = Daemon::start(&h, &ns, &run_dir, &[]);
    let s = &d.sock;
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = std::fs::metadata(s).unwrap();
    assert_eq!(m.mode() & 0o777, 0o660, "socket mode {:o}", m.mode());

    // (curl says only "Couldn't connect"; the group member below shows the path itself is
    // reachable, so the refusal is the socket's mode.)
    let o = curl_as_nobody(s, &[]);
    assert!(!o.status.success(), "another user reached the API: {o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "000", "{o:?}");
    match nix::unistd::Group::from_name("berth").unwrap() {
        Some(g) => {
            assert_eq!(m.gid(), g.gid.as_raw(), "socket not of group berth");
            let o = curl_as_nobody(s, &[g.gid.as_raw()]);
            assert_eq!(
                String::from_utf8_lossy(&o.stdout),
                "200",
                "a berth member: {o:?}"
            );
        }
        None => skip(
            "api: socket group",
            "no group `berth` on this machine (xtask/setup.sh creates it)",
        ),
    }

    // From inside a CT, as its root: the socket's path does not exist, nor anywhere else.
    ok(
        call(s, "POST", "/v1/cts", Some(r#"{"ctid": 7401}"#)),
        "create",
    );
    ok(call(s, "POST", "/v1/cts/7401/start", None), "start");
    let sp = s.to_string_lossy().into_owned();
    assert_ne!(
        h.exec("7401", &["test", "-e", &sp]).0,
        0,
        "the CT sees {sp}"
    );
    let (_, found, _) = h.exec(
        "7401",
        &[
            "sh",
            "-c",
            "find / -xdev -type s 2>/dev/null; find /run /tmp /var -type s 2>/dev/null",
        ],
    );
    assert!(!found.contains("berthd.sock"), "the CT found {found}");
    ok(call(s, "POST", "/v1/cts/7401/stop", None), "stop");
    ok(call(s, "DELETE", "/v1/cts/7401", None), "delete");
    d.stop();
    h.assert_clean();
}

#[test]
fn openapi_document_validates_and_every_route_answers() {
    let ns = Ns::new();
    let h = TestHost::new().in_netns(ns.fd());
    // Made before berthd starts: its first ledger tick registers the CT, so usage answers.
    h.ok(&["create", "7501"]);
    let run = open_run_dir();
    let d = Daemon::start(&h, &ns, &run.path().join("run"), &[]);
    let s = &d.sock;
    let doc = ok(call(s, "GET", "/v1/openapi.json", None), "openapi");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let file = run.path().join("openapi.json");
    std::fs::write(&file, doc.to_string()).unwrap();
    if Path::new(VALIDATOR).exists() {
        let o = Command::new(VALIDATOR).arg(&file).output().unwrap();
        assert!(
            o.status.success(),
            "openapi-spec-validator: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        skip(
            "api: openapi-spec-validator",
            &format!("{VALIDATOR} missing (xtask/setup.sh installs it)"),
        );
    }

    // Every documented route, in an order that leaves the CT to be destroyed last.
    let op = call(s, "POST", "/v1/cts/7501/stop?wait=false", None);
    let op_id = op.body["operation"]["id"].as_str().unwrap().to_owned();
    let mut routes: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), path.clone()));
        }
    }
    let rank = |(m, p): &(String, String)| {
        let order = [
            "/v1/cts/{ct}/start",
            "/v1/cts/{ct}/suspend",
            "/v1/cts/{ct}/resume",
            "/v1/cts/{ct}/restart",
            "/v1/cts/{ct}/stop",
        ];
        match (m.as_str(), p.as_str()) {
            ("DELETE", _) => 99,
            (_, p) => order.iter().position(|o| *o == p).map_or(0, |i| i + 1),
        }
    };
    routes.sort_by_key(rank);
    for (m, p) in &routes {
        let path = p.replace("{ct}", "7501").replace("{id}", &op_id);
        let body = match (m.as_str(), p.as_str()) {
            ("POST", "/v1/cts") => Some(r#"{"ctid": 7502}"#),
            ("PATCH", _) => Some(r#"{"cpulimit": 20}"#),
            _ => None,
        };
        let a = if p == "/v1/events" {
            let o = Command::new("curl")
                .args([
                    "-s",
                    "--max-time",
                    "1",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--unix-socket",
                ])
                .arg(s)
                .arg("http://berthd/v1/events")
                .output()
                .unwrap();
            Answer {
                status: String::from_utf8_lossy(&o.stdout).trim().parse().unwrap(),
                body: Value::Null,
            }
        } else {
            call(s, m, &path, body)
        };
        assert!(
            a.status != 405 && a.body["code"] != "no_route" && a.status < 500,
            "{m} {path}: {} {}",
            a.status,
            a.body
        );
        if p.ends_with("/usage") {
            assert_eq!(a.status, 200, "usage: {}", a.body);
        }
    }
    assert_eq!(routes.len(), 17, "{routes:?}");
    assert!(!h.root.join("conf/7501.toml").exists(), "DELETE ran last");
    ok(call(s, "DELETE", "/v1/cts/7502", None), "delete");
    let _ = json!(null);
    d.stop();
    h.assert_clean();
}
