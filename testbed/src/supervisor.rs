//! The supervisor: `berth testbed __supervise`, cloned straight into new pid and mount
//! namespaces, so it is their PID 1. Its mounts (a fresh /proc, an empty /run/netns, a private
//! bpffs on /sys/fs/bpf, a tmpfs for berth's root and run dir) exist in its mount namespace only;
//! the nodes' namespaces are held by its children. When it exits or is SIGKILLed the kernel
//! kills every process of the pid namespace, which frees the namespaces, their veths, the bpffs
//! pins and the mounts. Before making anything it writes the run's lease, naming the only thing
//! left for [`crate::gc`]: the cgroup parent.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{MsFlags, mount};
use serde::{Deserialize, Serialize};

use crate::build::{self, Berth, Built};
use crate::topology::{HOST, Kind, Topology, UPLINK};
use crate::{Error, Options, Result, RunDir, checks, exit};

/// What `gc` needs to know about a run: whether its supervisor still lives, and what to remove.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lease {
    pub run_id: String,
    pub supervisor_pid: i32,
    /// Field 22 of /proc/<pid>/stat: tells a reused PID apart.
    pub start_time: u64,
    /// `pid:[inode]` of the supervisor's pid namespace.
    pub pidns: String,
    pub cgroup_parent: String,
    pub topology: PathBuf,
}

/// One node of a running testbed, as `up --json` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `host`, `uplink`, `netns` or `ct`.
    pub kind: String,
    /// A PID in the caller's pid namespace whose namespaces are the node's (`nsenter -t`).
    pub pid: i32,
    pub addrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ifname: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handle {
    pub run_id: String,
    pub supervisor_pid: i32,
    pub run_dir: PathBuf,
    pub topology: PathBuf,
    pub topology_hash: String,
    pub cgroup_parent: String,
    /// berthd's listen address inside the `host` node, when the topology runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub berthd: Option<String>,
    /// The nodes' namespaces belong to the run's user namespace: enter it first (`nsenter -U`).
    #[serde(default)]
    pub rootless: bool,
    pub nodes: BTreeMap<String, NodeInfo>,
}

/// The supervisor's first message on its ready pipe (fd 3), one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ready {
    Handle(Handle),
    Results(crate::Results),
    Error(String),
}

pub const READY_FD: i32 = 3;

/// Clones `berth testbed __supervise` into new pid and mount namespaces. `log` receives its
/// stderr (else inherited). Returns its PID and the read end of its ready pipe.
pub fn spawn(
    opts: &Options,
    file: &Path,
    run_id: &str,
    run_mode: bool,
    log: Option<&File>,
) -> Result<(i32, File)> {
    let cstr = |s: &std::ffi::OsStr| {
        use std::os::unix::ffi::OsStrExt;
        CString::new(s.as_bytes())
            .map_err(|_| Error::failed("spawn the supervisor", "NUL in an argument"))
    };
    let mut args = vec![
        cstr(opts.berth_bin.as_os_str())?,
        cstr("testbed".as_ref())?,
        cstr("__supervise".as_ref())?,
        cstr("--state-dir".as_ref())?,
        cstr(opts.state_dir.as_os_str())?,
        cstr("--run-id".as_ref())?,
        cstr(run_id.as_ref())?,
    ];
    if run_mode {
        args.push(cstr("--run".as_ref())?);
    }
    if opts.rootless {
        args.push(cstr("--rootless".as_ref())?);
    }
    // The child maps the caller's IDs to root of its new user namespace itself (an
    // unprivileged process may map exactly its own IDs, and `setgroups` must be denied first).
    let id_maps = [
        (
            c"/proc/self/setgroups",
            CString::new("deny").expect("no NUL"),
        ),
        (
            c"/proc/self/uid_map",
            CString::new(format!("0 {} 1", nix::unistd::geteuid())).expect("no NUL"),
        ),
        (
            c"/proc/self/gid_map",
            CString::new(format!("0 {} 1", nix::unistd::getegid())).expect("no NUL"),
        ),
    ];
    let rootless = opts.rootless;
    args.push(cstr(file.as_os_str())?);
    let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("make the supervisor's ready pipe")(e.into()))?;
    let devnull = File::open("/dev/null").map_err(Error::io("open /dev/null"))?;
    // Above 3, so the dup2s below cannot clobber one another.
    let high = |fd: i32| -> Result<OwnedFd> {
        // SAFETY: F_DUPFD_CLOEXEC returns a new fd we own, or -1.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if n < 0 {
            return Err(Error::io("duplicate a descriptor")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `n` is a fresh descriptor nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(n) })
    };
    let w = high(w.as_raw_fd())?;
    let null = high(devnull.as_raw_fd())?;
    let logfd = log.map(|l| high(l.as_raw_fd())).transpose()?;
    let (w_raw, null_raw, log_raw) = (
        w.as_raw_fd(),
        null.as_raw_fd(),
        logfd.as_ref().map(|f| f.as_raw_fd()),
    );
    let path = args[0].clone();
    let mut stack = vec![0u8; 256 * 1024];
    let cb = Box::new(move || -> isize {
        // SAFETY: only async-signal-safe calls between clone and exec; every pointer refers to
        // memory owned by the parent's frame, which the child's copy still holds.
        unsafe {
            if rootless {
                for (path, text) in &id_maps {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, text.as_ptr().cast(), text.as_bytes().len()) < 0 {
                        libc::_exit(126);
                    }
                    libc::close(fd);
                }
            }
            libc::setsid();
            libc::dup2(w_raw, READY_FD);
            libc::dup2(null_raw, 0);
            libc::dup2(null_raw, 1);
            if let Some(l) = log_raw {
                libc::dup2(l, 2);
            }
            libc::execv(path.as_ptr(), ptrs.as_ptr());
            libc::_exit(127)
        }
    });
    let mut flags = nix::sched::CloneFlags::CLONE_NEWPID | nix::sched::CloneFlags::CLONE_NEWNS;
    if rootless {
        flags |= nix::sched::CloneFlags::CLONE_NEWUSER;
    }
    // SAFETY: the callback only makes async-signal-safe calls before exec.
    let pid =
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }.map_err(|e| {
            let hint = if rootless || nix::unistd::geteuid().is_root() {
                ""
            } else {
                " (not root: try --rootless)"
            };
            Error::io(format!(
                "clone the supervisor into new pid and mount namespaces{hint}"
            ))(e.into())
        })?;
    drop(w);
    Ok((pid.as_raw(), File::from(r)))
}

/// Reads the supervisor's ready message (it closes the pipe when it dies).
pub fn read_ready(pipe: File) -> Result<Ready> {
    let mut line = String::new();
    BufReader::new(pipe)
        .read_line(&mut line)
        .map_err(Error::io("read the supervisor's ready message"))?;
    if line.trim().is_empty() {
        return Err(Error::failed(
            "start the supervisor",
            "it exited before reporting (see its log)",
        ));
    }
    serde_json::from_str(&line)
        .map_err(|e| Error::failed("parse the supervisor's ready message", e.to_string()))
}

/// `a` and each of its causes, joined.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

pub struct SuperviseArgs {
    pub state_dir: PathBuf,
    pub run_id: String,
    pub file: PathBuf,
    pub run_mode: bool,
    pub rootless: bool,
    pub berth_bin: PathBuf,
}

/// The supervisor's main; its return value is its exit code.
pub fn supervise(a: SuperviseArgs) -> u8 {
    // SAFETY: fd 3 is the ready pipe `spawn` set up; nothing else owns it.
    let mut ready = unsafe { File::from_raw_fd(READY_FD) };
    let rd = RunDir::new(&a.state_dir, &a.run_id);
    let send = |ready: &mut File, msg: &Ready| {
        let line = serde_json::to_string(msg).unwrap_or_default();
        let _ = writeln!(ready, "{line}");
    };
    let built = match setup(&a, &rd) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!("testbed setup: {}", chain(&e));
            send(&mut ready, &Ready::Error(chain(&e)));
            return exit::SETUP;
        }
    };
    let (built, handle) = built;
    if a.run_mode {
        let results = checks::run_all(&built, &handle);
        let code = results.exit_code();
        send(&mut ready, &Ready::Results(results));
        return code;
    }
    let listener = match UnixListener::bind(rd.ctl()) {
        Ok(l) => l,
        Err(e) => {
            send(
                &mut ready,
                &Ready::Error(format!("bind {}: {e}", rd.ctl().display())),
            );
            return exit::SETUP;
        }
    };
    let text = serde_json::to_string_pretty(&handle).unwrap_or_default();
    let tmp = rd.0.join("handle.json.tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, rd.handle()))
        .is_err()
    {
        send(&mut ready, &Ready::Error("write handle.json".into()));
        return exit::SETUP;
    }
    send(&mut ready, &Ready::Handle(handle.clone()));
    drop(ready);
    serve(&listener, &built, &handle);
    exit::PASS
}

/// Answers `check` and `down` on the control socket until `down`; reaps orphans meanwhile
/// (PID 1 inherits every orphan of its namespace, the CTs' monitors among them).
fn serve(listener: &UnixListener, built: &Built, handle: &Handle) {
    let _ = listener.set_nonblocking(true);
    loop {
        reap();
        let Ok((stream, _)) = listener.accept() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let mut line = String::new();
        let mut r = BufReader::new(&stream);
        if r.read_line(&mut line).is_err() {
            continue;
        }
        let mut w = &stream;
        match line.trim() {
            "check" => {
                let res = checks::run_all(built, handle);
                let _ = writeln!(w, "{}", serde_json::to_string(&res).unwrap_or_default());
            }
            "down" => {
                let _ = writeln!(w, "{{\"down\":true}}");
                return;
            }
            other => {
                let _ = writeln!(w, "{{\"error\":\"unknown command {other:?}\"}}");
            }
        }
    }
}

fn reap() {
    loop {
        // SAFETY: plain waitpid on any child, non-blocking.
        let r = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
        if r <= 0 {
            return;
        }
    }
}

fn self_info() -> Result<(i32, u64, String)> {
    let pid: i32 = std::fs::read_link("/proc/self")
        .map_err(Error::io("read /proc/self"))?
        .to_string_lossy()
        .parse()
        .map_err(|_| Error::failed("read /proc/self", "not a PID"))?;
    let start = start_time(Path::new("/proc"), pid)
        .ok_or_else(|| Error::failed("read /proc/self/stat", "no start time"))?;
    let ns =
        std::fs::read_link("/proc/self/ns/pid").map_err(Error::io("read /proc/self/ns/pid"))?;
    Ok((pid, start, ns.to_string_lossy().into_owned()))
}

/// Field 22 (start time) of `<proc>/<pid>/stat`.
pub fn start_time(proc_root: &Path, pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(proc_root.join(format!("{pid}/stat"))).ok()?;
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

fn mount_fs(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| Error::io(format!("mount {fstype} on {}", target.display()))(e.into()))
}

fn setup(a: &SuperviseArgs, rd: &RunDir) -> Result<(Built, Handle)> {
    if nix::unistd::getpid().as_raw() != 1 {
        return Err(Error::failed(
            "supervise",
            "not PID 1 of a pid namespace (start it through `berth testbed`)",
        ));
    }
    let mut topo = Topology::from_file(&a.file)?;
    if a.rootless {
        topo.make_rootless();
    }
    // Read before the fresh /proc hides the host's view.
    let (host_pid, start, pidns) = self_info()?;
    let cg = crate::cgroup_parent(&a.run_id);
    let lease = Lease {
        run_id: a.run_id.clone(),
        supervisor_pid: host_pid,
        start_time: start,
        pidns,
        cgroup_parent: cg.clone(),
        topology: a.file.clone(),
    };
    std::fs::create_dir_all(&rd.0).map_err(Error::io(format!("create {}", rd.0.display())))?;
    let tmp = rd.0.join("lease.json.tmp");
    std::fs::write(&tmp, serde_json::to_string(&lease).unwrap_or_default())
        .and_then(|_| std::fs::rename(&tmp, rd.lease()))
        .map_err(Error::io(format!("write {}", rd.lease().display())))?;

    // Nothing mounted from here on propagates back to the host.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| Error::io("make / private")(e.into()))?;
    let mnt = rd.mnt();
    std::fs::create_dir_all(&mnt).map_err(Error::io(format!("create {}", mnt.display())))?;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("tmpfs", &mnt, "tmpfs", nosuid, Some("mode=0755"))?;
    let hostproc = mnt.join("hostproc");
    std::fs::create_dir(&hostproc).map_err(Error::io("create hostproc"))?;
    mount(
        Some("/proc"),
        &hostproc,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| Error::io("keep the host's /proc")(e.into()))?;
    mount_fs(
        "proc",
        Path::new("/proc"),
        "proc",
        nosuid | MsFlags::MS_NOEXEC,
        None,
    )?;
    if Path::new("/run/netns").is_dir() {
        mount_fs(
            "tmpfs",
            Path::new("/run/netns"),
            "tmpfs",
            nosuid,
            Some("mode=0755"),
        )?;
    }
    // A user namespace may not mount bpffs (and has no use for one: no eBPF there).
    if !a.rootless {
        mount_fs(
            "bpffs",
            Path::new("/sys/fs/bpf"),
            "bpf",
            MsFlags::empty(),
            Some("mode=0700"),
        )?;
    }

    let berth = Berth {
        bin: a.berth_bin.clone(),
        root: mnt.join("root"),
        run_dir: mnt.join("run"),
        cgroup_parent: cg.clone(),
        bpffs: PathBuf::from("/sys/fs/bpf/berth"),
    };
    let mut built = build::build(&topo, berth, &mnt)?;
    built.rootless = a.rootless;
    let host_pids = translate(&hostproc, host_pid, &built.pids)?;
    let mut nodes = BTreeMap::new();
    for (name, pid) in &host_pids {
        let node = built.topo.node(name);
        let kind = match (name.as_str(), node.map(|n| n.kind)) {
            (HOST, _) => "host",
            (UPLINK, _) => "uplink",
            (_, Some(Kind::Ct)) => "ct",
            _ => "netns",
        };
        nodes.insert(
            name.clone(),
            NodeInfo {
                kind: kind.into(),
                pid: *pid,
                addrs: topo.addrs_of(name).iter().map(|a| a.to_string()).collect(),
                ctid: node.and_then(|n| n.ctid),
                host_ifname: node.map(build::host_ifname),
            },
        );
    }
    let handle = Handle {
        run_id: a.run_id.clone(),
        supervisor_pid: host_pid,
        run_dir: rd.0.clone(),
        topology: a.file.clone(),
        topology_hash: topo.hash.clone(),
        cgroup_parent: cg,
        berthd: built.berthd.as_ref().map(|b| b.1.clone()),
        rootless: a.rootless,
        nodes,
    };
    Ok((built, handle))
}

/// Host-namespace PIDs of the nodes' processes: the process whose NSpid at the supervisor's
/// level is the node's PID and whose netns is the node's.
fn translate(
    hostproc: &Path,
    sup_host_pid: i32,
    pids: &BTreeMap<String, i32>,
) -> Result<BTreeMap<String, i32>> {
    let nspid = |p: &Path| -> Vec<i32> {
        std::fs::read_to_string(p.join("status"))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("NSpid:")).map(|l| {
                    l[6..]
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    let level = nspid(&hostproc.join(sup_host_pid.to_string()))
        .len()
        .saturating_sub(1);
    let mut want: BTreeMap<i32, (String, Option<u64>)> = pids
        .iter()
        .map(|(n, p)| (*p, (n.clone(), build::netns_ino(Path::new("/proc"), *p))))
        .collect();
    let mut out = BTreeMap::new();
    let rd = std::fs::read_dir(hostproc).map_err(Error::io("list the host's /proc"))?;
    for e in rd.flatten() {
        let Ok(hp) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let ns = nspid(&e.path());
        let Some(local) = ns.get(level) else { continue };
        if let Some((name, ino)) = want.get(local)
            && build::netns_ino(hostproc, hp) == *ino
        {
            out.insert(name.clone(), hp);
            want.remove(&{ *local });
        }
        if want.is_empty() {
            break;
        }
    }
    if let Some((_, (name, _))) = want.iter().next() {
        return Err(Error::failed(
            "find the host PIDs of the nodes",
            format!("none for `{name}`"),
        ));
    }
    Ok(out)
}
