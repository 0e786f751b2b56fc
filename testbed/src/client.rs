//! The caller's side: start a supervisor, talk to it, take it down, and `gc` what dead
//! supervisors left (their cgroup parents and run directories).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::supervisor::{self, Handle, Lease, Ready};
use crate::{Error, Options, Result, Results, RunDir, Topology};

/// A running testbed. Dropping one that [`Testbed::up`] made takes it down (as
/// [`Testbed::down`]); dropping an attached one leaves it running.
pub struct Testbed {
    pub handle: Handle,
    opts: Options,
    /// Set when this process cloned the supervisor: then it owns the run and reaps it.
    child: bool,
    done: bool,
}

impl Testbed {
    /// Validates `file` (nothing is created when it is broken), then starts its supervisor and
    /// waits until the topology is up.
    pub fn up(file: &Path, opts: &Options) -> Result<Testbed> {
        let file = std::fs::canonicalize(file)
            .map_err(Error::io(format!("resolve {}", file.display())))?;
        Topology::from_file(&file)?;
        let id = crate::new_run_id();
        let rd = prepare(opts, &id)?;
        let log = std::fs::File::create(rd.log())
            .map_err(Error::io(format!("create {}", rd.log().display())))?;
        let (pid, ready) =
            supervisor::spawn(opts, &file, &id, false, Some(&log)).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&rd.0);
            })?;
        match supervisor::read_ready(ready) {
            Ok(Ready::Handle(handle)) => Ok(Testbed {
                handle,
                opts: opts.clone(),
                child: true,
                done: false,
            }),
            other => {
                wait_pid(pid, true, Duration::from_secs(5));
                let _ = gc_run(opts, &id);
                Err(match other {
                    Ok(Ready::Error(e)) => Error::failed(format!("bring up {}", file.display()), e),
                    Ok(_) => Error::failed("bring up", "unexpected answer from the supervisor"),
                    Err(e) => e,
                })
            }
        }
    }

    /// A testbed some other process brought up (by run id).
    pub fn attach(opts: &Options, run_id: &str) -> Result<Testbed> {
        let rd = RunDir::new(&opts.state_dir, run_id);
        let text = std::fs::read_to_string(rd.handle())
            .map_err(Error::io(format!("read {}", rd.handle().display())))?;
        let handle: Handle = serde_json::from_str(&text).map_err(|e| {
            Error::failed(format!("parse {}", rd.handle().display()), e.to_string())
        })?;
        // Not ours: only an explicit `down` ends it.
        Ok(Testbed {
            handle,
            opts: opts.clone(),
            child: false,
            done: true,
        })
    }

    /// `argv` in `node`: a CT's every namespace (as its root), else the node's network
    /// namespace with the host's tools.
    pub fn command(&self, node: &str, argv: &[&str]) -> Result<Command> {
        let n = self.handle.nodes.get(node).ok_or_else(|| {
            Error::failed(
                "exec",
                format!("no node `{node}` in run {}", self.handle.run_id),
            )
        })?;
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(n.pid.to_string());
        if self.handle.rootless {
            c.args(["-U", "--preserve-credentials"]);
        }
        if n.kind == "ct" {
            c.arg("-a");
        } else {
            c.arg("-n");
        }
        c.arg("--").args(argv);
        Ok(c)
    }

    /// Like [`Testbed::command`], in the node's network namespace only (host tools in a CT's
    /// network).
    pub fn net_command(&self, node: &str, argv: &[&str]) -> Result<Command> {
        let n = self
            .handle
            .nodes
            .get(node)
            .ok_or_else(|| Error::failed("exec", format!("no node `{node}`")))?;
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(n.pid.to_string());
        if self.handle.rootless {
            c.args(["-U", "--preserve-credentials"]);
        }
        c.arg("-n").arg("--").args(argv);
        Ok(c)
    }

    pub fn exec(&self, node: &str, argv: &[&str]) -> Result<Output> {
        self.command(node, argv)?
            .output()
            .map_err(Error::io(format!("exec in {node}")))
    }

    /// Runs the topology's checks now.
    pub fn check(&self) -> Result<Results> {
        let line = ctl(&self.handle.run_dir, "check", Duration::from_secs(600))?;
        serde_json::from_str(&line)
            .map_err(|e| Error::failed("parse check results", format!("{e}: {line}")))
    }

    /// Lets the testbed run on after this value is gone (a CLI verb that only talks to it).
    pub fn detach(mut self) -> Handle {
        self.done = true;
        self.handle.clone()
    }

    /// Takes the testbed down: the supervisor exits (the kernel frees its namespaces), then
    /// its cgroups and run directory go.
    pub fn down(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        self.done = true;
        let pid = self.handle.supervisor_pid;
        if ctl(&self.handle.run_dir, "down", Duration::from_secs(5)).is_err()
            || !wait_pid(pid, self.child, Duration::from_secs(5))
        {
            // SAFETY: kill of the supervisor's PID, checked alive by its lease just before.
            if lease_alive(&RunDir(self.handle.run_dir.clone())) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            wait_pid(pid, self.child, Duration::from_secs(5));
        }
        gc_run(&self.opts, &self.handle.run_id).map(|_| ())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.teardown() {
            tracing::warn!(
                "testbed {} teardown: {}",
                self.handle.run_id,
                supervisor::chain(&e)
            );
        }
    }
}

fn prepare(opts: &Options, id: &str) -> Result<RunDir> {
    let rd = RunDir::new(&opts.state_dir, id);
    std::fs::create_dir_all(&rd.0).map_err(Error::io(format!("create {}", rd.0.display())))?;
    Ok(rd)
}

/// `run`: up, checks and down under one supervisor; its exit code comes back with the results.
pub fn run(file: &Path, opts: &Options) -> Result<(Results, u8)> {
    let file =
        std::fs::canonicalize(file).map_err(Error::io(format!("resolve {}", file.display())))?;
    Topology::from_file(&file)?;
    let id = crate::new_run_id();
    let rd = prepare(opts, &id)?;
    let (pid, ready) = supervisor::spawn(opts, &file, &id, true, None).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&rd.0);
    })?;
    let msg = supervisor::read_ready(ready);
    wait_pid(pid, true, Duration::from_secs(10));
    gc_run(opts, &id)?;
    match msg? {
        Ready::Results(r) => {
            let code = r.exit_code();
            Ok((r, code))
        }
        Ready::Error(e) => Err(Error::failed(format!("bring up {}", file.display()), e)),
        Ready::Handle(_) => Err(Error::failed(
            "run",
            "unexpected answer from the supervisor",
        )),
    }
}

fn ctl(run_dir: &Path, cmd: &str, timeout: Duration) -> Result<String> {
    let path = RunDir(run_dir.to_owned()).ctl();
    let op = format!("{cmd} via {}", path.display());
    let mut s = UnixStream::connect(&path).map_err(Error::io(op.clone()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(Error::io(op.clone()))?;
    writeln!(s, "{cmd}").map_err(Error::io(op.clone()))?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .map_err(Error::io(op.clone()))?;
    if line.is_empty() {
        return Err(Error::failed(op, "no answer"));
    }
    Ok(line)
}

/// Waits up to `timeout` for `pid` to end (reaping it when it is our child).
fn wait_pid(pid: i32, child: bool, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if child {
            // SAFETY: waitpid on our own child, non-blocking.
            let r = unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            if r == pid || r < 0 {
                return true;
            }
        } else if gone(pid) {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Gone or a zombie: a pid namespace's init turns zombie only once the kernel has reaped
/// every other process of its namespace.
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with(['Z', 'X'])),
    }
}

fn read_lease(rd: &RunDir) -> Option<Lease> {
    serde_json::from_str(&std::fs::read_to_string(rd.lease()).ok()?).ok()
}

/// Whether the supervisor named by the run's lease still runs (same PID, same start time).
fn lease_alive(rd: &RunDir) -> bool {
    read_lease(rd).is_some_and(|l| {
        supervisor::start_time(Path::new("/proc"), l.supervisor_pid) == Some(l.start_time)
            && !gone(l.supervisor_pid)
    })
}

/// A run as `ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub run_id: String,
    pub alive: bool,
    pub supervisor_pid: Option<i32>,
    pub topology: Option<PathBuf>,
}

pub fn list_runs(opts: &Options) -> Vec<RunInfo> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(&opts.state_dir) else {
        return out;
    };
    for e in rd.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let r = RunDir(e.path());
        let l = read_lease(&r);
        out.push(RunInfo {
            run_id: id,
            alive: lease_alive(&r),
            supervisor_pid: l.as_ref().map(|l| l.supervisor_pid),
            topology: l.map(|l| l.topology),
        });
    }
    out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    out
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub runs: Vec<String>,
    pub cgroups: Vec<PathBuf>,
}

/// Removes what dead runs left: their cgroup parents (every hierarchy) and run directories.
/// Idempotent; a live run, or a run directory younger than 30 s without a lease (its
/// supervisor may be starting), is left alone.
pub fn gc(opts: &Options) -> Result<GcReport> {
    let mut rep = GcReport::default();
    for r in list_runs(opts) {
        if r.alive {
            continue;
        }
        let rd = RunDir::new(&opts.state_dir, &r.run_id);
        let young = std::fs::metadata(&rd.0)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(30));
        if r.supervisor_pid.is_none() && young {
            continue;
        }
        let one = gc_run(opts, &r.run_id)?;
        rep.runs.extend(one.runs);
        rep.cgroups.extend(one.cgroups);
    }
    Ok(rep)
}

/// Removes one dead run's cgroups and directory.
pub fn gc_run(opts: &Options, id: &str) -> Result<GcReport> {
    let rd = RunDir::new(&opts.state_dir, id);
    if lease_alive(&rd) {
        return Err(Error::failed(
            format!("gc run {id}"),
            "its supervisor still runs",
        ));
    }
    let mut rep = GcReport::default();
    let parent = crate::cgroup_parent(id);
    for root in cgroup_roots() {
        let dir = root.join(&parent);
        if dir.exists() {
            remove_cgroup_tree(&dir)?;
            rep.cgroups.push(dir);
        }
    }
    if rd.0.exists() {
        std::fs::remove_dir_all(&rd.0).map_err(Error::io(format!("remove {}", rd.0.display())))?;
        rep.runs.push(id.to_owned());
    }
    Ok(rep)
}

/// Mount points of the cgroup hierarchies (v1 and v2) of this mount namespace.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mi.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mp = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mp))
        })
        .collect()
}

/// rmdir, deepest first. The processes were SIGKILLed with their pid namespace, but a cgroup
/// stays busy until the kernel has finished their exit: retry for a while.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path())?;
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > end => {
                return Err(Error::io(format!("remove cgroup {}", dir.display()))(e));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
