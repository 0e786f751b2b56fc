//! Fifty berth commands at once on one node, while berthd is scraped and ticks: commands on one
//! CT serialize on its lock, commands on different CTs run in parallel, none deadlocks or
//! fails, and the end state (configs, cgroups, host routes, the ledger) is what the commands
//! that ran say it should be. Nothing is left behind.
//! Run: `cargo test -p berth-tests --test concurrency`.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::time::{Duration, Instant};

use berth_tests::berthd::{Berthd, BerthdArgs};
use berth_tests::ct::{TestHost, cgroup_roots};
use berth_tests::net::{Topology, assert_same, wait_for};

/// The CT twenty commands fight over.
const SAME: u32 = 5101;
/// Created and started before the storm; the storm adds an address and a rate to each, and
/// stops the odd ones.
const KEPT: std::ops::RangeInclusive<u32> = 5102..=5111;
/// Created during the storm, each by a thread of its own; the even ones are destroyed again.
const FRESH: std::ops::RangeInclusive<u32> = 5112..=5121;
/// No command may wait longer than this for a lock or finish later: past it, a deadlock.
const DEADLINE: Duration = Duration::from_secs(300);

fn addr(ct: u32) -> String {
    format!("192.0.2.{}", ct - 5000)
}

fn second_addr(ct: u32) -> String {
    format!("192.0.2.{}", ct - 5000 + 50)
}

struct Done {
    who: String,
    steps: Vec<(Vec<String>, Output)>,
    started: Instant,
    ended: Instant,
}

/// Runs `steps` one after the other as berth commands (each with a lock timeout past the
/// storm's length, so waiting is never mistaken for failing).
fn run_steps(h: &TestHost, who: String, steps: Vec<Vec<String>>) -> Done {
    let started = Instant::now();
    let mut out = Vec::new();
    for s in steps {
        let args: Vec<&str> = s.iter().map(String::as_str).collect();
        let o = h
            .cmd(&args)
            .env("BERTH_LOCK_TIMEOUT", DEADLINE.as_secs().to_string())
            .output()
            .expect("spawn berth");
        let failed = !o.status.success();
        out.push((s, o));
        if failed {
            break;
        }
    }
    Done {
        who,
        steps: out,
        started,
        ended: Instant::now(),
    }
}

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A thread in the test's host namespace (where berthd listens) scraping until `stop`.
fn scraper(host: BorrowedFd<'_>, d: &Berthd, stop: &AtomicBool, ok: &AtomicU32) -> Vec<String> {
    let fd = host.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with an fd that outlives the scope.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0, "setns");
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match d.scrape() {
                    Ok((_, samples)) if !samples.is_empty() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => errors.push("an empty scrape".to_string()),
                    Err(e) => errors.push(format!("{e:#}")),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            errors
        })
        .join()
        .expect("scraper panicked")
    })
}

fn start_berthd(host: BorrowedFd<'_>, h: &TestHost) -> Berthd {
    let fd = host.as_raw_fd();
    let args = BerthdArgs {
        root: h.root.clone(),
        run_dir: None,
        cgroup_parent: h.cgroup_parent.clone(),
        bpffs: h.bpffs.clone(),
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: as in `scraper`; berthd, forked from this thread, lives in the namespace.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0, "setns");
            Berthd::start_bin_with(
                &berth_tests::berthd::berthd_bin(),
                &args,
                0,
                &["--tick", "10"],
            )
            .expect("berthd starts")
        })
        .join()
        .expect("berthd thread panicked")
    })
}

/// The CT's numproc as its config file holds it.
fn saved_numproc(h: &TestHost, ct: u32) -> Option<u64> {
    let text = std::fs::read_to_string(h.root.join(format!("conf/{ct}.toml"))).unwrap();
    let doc: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{ct}.toml: {e}"));
    fn find(v: &toml::Value) -> Option<u64> {
        let t = v.as_table()?;
        if let Some(n) = t.get("numproc").and_then(toml::Value::as_integer) {
            return u64::try_from(n).ok();
        }
        t.values().find_map(find)
    }
    find(&doc)
}

/// `pids.max` of the CT's cgroup, where the pids controller is (v1 or v2).
fn live_numproc(h: &TestHost, ct: u32) -> Option<u64> {
    cgroup_roots()
        .into_iter()
        .map(|r| {
            r.join(&h.cgroup_parent)
                .join(ct.to_string())
                .join("pids.max")
        })
        .find_map(|p: PathBuf| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse().ok())
}

fn host_routes(topo: &Topology) -> String {
    let o = topo.host.run("ip", &["-4", "route", "show"]);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn routed(routes: &str, a: &str) -> bool {
    routes
        .lines()
        .any(|l| l.split_whitespace().next() == Some(a))
}

fn ledger_ok(root: &Path) {
    let db = root.join("billing.db");
    let c = rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap_or_else(|e| panic!("open {}: {e}", db.display()));
    let r: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(r, "ok", "ledger integrity");
}

#[test]
fn fifty_parallel_commands_serialize_per_ct_and_leave_a_consistent_node() {
    let topo = Topology::new();
    let before = topo.host.settled_snapshot();
    let h = TestHost::new().in_netns(topo.host.fd());
    for ct in std::iter::once(SAME).chain(KEPT) {
        let c = ct.to_string();
        h.ok(&["create", &c, "--ipadd", &addr(ct)]);
        h.ok(&["start", &c]);
    }
    let d = start_berthd(topo.host.fd(), &h);

    // The mechanism itself: with CT SAME's lock held by someone else, a stop of SAME waits
    // while a command on another CT goes through; releasing the lock lets the stop finish.
    {
        let f = std::fs::File::create(h.root.join(format!("run/{SAME}.lock"))).unwrap();
        let held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .expect("flock");
        let mut stop = h.cmd(&["stop", &SAME.to_string()]).spawn().unwrap();
        h.ok(&["set", "5102", "--numproc", "77"]);
        assert_eq!(live_numproc(&h, 5102), Some(77));
        std::thread::sleep(Duration::from_millis(500));
        assert!(
            stop.try_wait().unwrap().is_none(),
            "stop of {SAME} did not wait for the CT's lock"
        );
        assert_eq!(h.status(&SAME.to_string())["status"], "running");
        drop(held);
        assert!(stop.wait().unwrap().success());
        assert_eq!(h.status(&SAME.to_string())["status"], "stopped");
        h.ok(&["start", &SAME.to_string()]);
    }

    // The storm.
    let mut plans: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    let same = SAME.to_string();
    let mut numprocs = BTreeSet::new();
    for i in 0..20u32 {
        let step = match i % 4 {
            0 => v(&["stop", &same]),
            1 => v(&["start", &same]),
            2 => {
                numprocs.insert(u64::from(100 + i));
                v(&["set", &same, "--numproc", &(100 + i).to_string(), "--save"])
            }
            _ => v(&["restart", &same]),
        };
        plans.push((format!("same#{i}"), vec![step]));
    }
    for ct in FRESH {
        let c = ct.to_string();
        let mut steps = vec![
            v(&["create", &c, "--ipadd", &addr(ct)]),
            v(&["start", &c]),
            v(&["set", &c, "--rate-out", "20mbit", "--save"]),
        ];
        if ct % 2 == 0 {
            steps.push(v(&["stop", &c]));
            steps.push(v(&["destroy", &c]));
        }
        plans.push((format!("fresh {c}"), steps));
    }
    for ct in KEPT {
        let c = ct.to_string();
        let mut steps = vec![
            v(&["set", &c, "--ipadd", &second_addr(ct), "--save"]),
            v(&["set", &c, "--rate-in", "30mbit", "--save"]),
        ];
        if ct % 2 == 1 {
            steps.push(v(&["stop", &c]));
        }
        plans.push((format!("kept {c}"), steps));
    }
    for i in 0..10 {
        let reader = if i % 2 == 0 {
            v(&["list", "-a", "--json"])
        } else {
            v(&["netstat", "--json"])
        };
        plans.push((format!("reader#{i}"), vec![reader; 4]));
    }
    assert_eq!(plans.len(), 50);

    let stop_scraping = AtomicBool::new(false);
    let scrapes = AtomicU32::new(0);
    let (tx, rx) = mpsc::channel::<Done>();
    let barrier = Arc::new(Barrier::new(plans.len()));
    let t0 = Instant::now();
    let (done, scrape_errors) = std::thread::scope(|s| {
        let scraping = s.spawn(|| scraper(topo.host.fd(), &d, &stop_scraping, &scrapes));
        let mut pending: BTreeSet<String> = plans.iter().map(|p| p.0.clone()).collect();
        for (who, steps) in plans {
            let (tx, barrier, h) = (tx.clone(), barrier.clone(), &h);
            s.spawn(move || {
                barrier.wait();
                tx.send(run_steps(h, who, steps)).unwrap();
            });
        }
        drop(tx);
        let mut done = Vec::new();
        while !pending.is_empty() {
            match rx.recv_timeout(DEADLINE.saturating_sub(t0.elapsed())) {
                Ok(r) => {
                    pending.remove(&r.who);
                    done.push(r);
                }
                Err(_) => {
                    let ps = std::process::Command::new("ps")
                        .args(["-eo", "pid,etimes,args"])
                        .output()
                        .unwrap();
                    let ps = String::from_utf8_lossy(&ps.stdout);
                    let berths: Vec<&str> = ps.lines().filter(|l| l.contains("berth")).collect();
                    panic!(
                        "deadlock: after {:?} these never finished: {pending:?}\n{}",
                        t0.elapsed(),
                        berths.join("\n")
                    );
                }
            }
        }
        // Let berthd tick at least once after the storm, then stop scraping.
        std::thread::sleep(Duration::from_secs(1));
        stop_scraping.store(true, Ordering::Relaxed);
        (done, scraping.join().unwrap())
    });
    let wall = t0.elapsed();

    let mut failures = Vec::new();
    for r in &done {
        for (args, o) in &r.steps {
            if !o.status.success() {
                failures.push(format!(
                    "{}: berth {} → {}\n{}",
                    r.who,
                    args.join(" "),
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                ));
            } else if args.iter().any(|a| a == "--json") {
                let j: serde_json::Value = serde_json::from_slice(&o.stdout)
                    .unwrap_or_else(|e| panic!("{}: {args:?}: bad JSON {e}", r.who));
                // Objects carry the schema version; row arrays (netstat) are bare rows.
                match &j {
                    serde_json::Value::Array(rows) => assert!(
                        rows.iter().all(|row| row["ctid"].is_u64()),
                        "{}: {j}",
                        r.who
                    ),
                    _ => assert_eq!(j["schema_version"], 1, "{}: {j}", r.who),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "failed commands:\n{}",
        failures.join("\n")
    );
    assert!(
        scrape_errors.is_empty(),
        "scrapes failed during the storm: {scrape_errors:?}"
    );
    assert!(scrapes.load(Ordering::Relaxed) >= 3, "too few scrapes");

    // Different CTs ran in parallel: the fresh CTs' threads together were busy far longer
    // than the storm lasted (one global lock would make the sum at most the wall time).
    let fresh: Vec<&Done> = done.iter().filter(|r| r.who.starts_with("fresh")).collect();
    let busy: Duration = fresh.iter().map(|r| r.ended - r.started).sum();
    let span = fresh.iter().map(|r| r.ended).max().unwrap()
        - fresh.iter().map(|r| r.started).min().unwrap();
    eprintln!(
        "storm: {wall:?}; fresh CTs busy {busy:?} in a span of {span:?} ({:.1}x parallel); {} scrapes",
        busy.as_secs_f64() / span.as_secs_f64(),
        scrapes.load(Ordering::Relaxed)
    );
    assert!(
        busy.as_secs_f64() > 2.0 * span.as_secs_f64(),
        "commands on different CTs did not overlap: busy {busy:?} in {span:?}"
    );

    // The end state, read from the kernel and the files, agrees with the commands.
    let rows = h.list(&["-a"]);
    let listed: BTreeSet<u32> = rows
        .iter()
        .map(|r| r["ctid"].as_u64().unwrap() as u32)
        .collect();
    let mut want: BTreeSet<u32> = std::iter::once(SAME).chain(KEPT).collect();
    want.extend(FRESH.filter(|c| c % 2 == 1));
    assert_eq!(listed, want, "CTs after the storm");
    let routes = host_routes(&topo);
    for ct in &want {
        let st = h.status(&ct.to_string());
        let running = st["status"] == "running";
        let expect_running = match *ct {
            SAME => running,
            c if KEPT.contains(&c) => c % 2 == 0,
            _ => true,
        };
        assert_eq!(running, expect_running, "CT {ct}: {st}");
        assert_eq!(
            routed(&routes, &addr(*ct)),
            running,
            "CT {ct} ({}) host route for {}:\n{routes}",
            st["status"],
            addr(*ct)
        );
        if KEPT.contains(ct) {
            assert_eq!(
                routed(&routes, &second_addr(*ct)),
                running,
                "CT {ct}:\n{routes}"
            );
        }
        if running {
            let pid = st["init_pid"].as_i64().expect("init_pid");
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "CT {ct}: {st}");
        }
    }
    for ct in FRESH.filter(|c| c % 2 == 0) {
        assert!(!routed(&routes, &addr(ct)), "destroyed {ct} still routed");
        assert!(!h.root.join(format!("conf/{ct}.toml")).exists());
        assert!(!h.root.join(format!("private/{ct}")).exists());
    }
    // Two `set --save`s never interleave their live and saved halves on one CT.
    let saved = saved_numproc(&h, SAME).expect("numproc saved");
    assert!(numprocs.contains(&saved), "numproc {saved} of {numprocs:?}");
    if h.status(&same)["status"] == "running" {
        let seen: Vec<_> = cgroup_roots()
            .into_iter()
            .map(|r| r.join(&h.cgroup_parent).join(SAME.to_string()))
            .filter(|d| d.exists())
            .collect();
        assert_eq!(
            live_numproc(&h, SAME),
            Some(saved),
            "live vs saved numproc {seen:?}"
        );
    }
    ledger_ok(&h.root);

    // berthd survived and still answers; then everything goes and nothing stays.
    let fd = topo.host.fd().as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: as in `scraper`.
            assert_eq!(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }, 0);
            d.scrape().expect("berthd after the storm");
        });
    });
    drop(d);
    for ct in &want {
        h.ok(&["stop", "--fast", &ct.to_string()]);
        h.ok(&["destroy", &ct.to_string()]);
    }
    assert!(
        wait_for(Duration::from_secs(5), || topo.host.snapshot() == before),
        "host namespace changed"
    );
    assert_same("host namespace", &before, &topo.host.settled_snapshot());
    h.assert_clean();
}
