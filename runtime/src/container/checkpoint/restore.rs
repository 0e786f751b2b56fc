//! `restore`: cgroup and limits, mount, host side of the network, then CRIU under a new monitor.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use tracing::{debug, info, warn};

use super::super::monitor::{self, MonitorMsg, MonitorMsgError};
use super::super::mount::{bind_private, unbind_private};
use super::super::state::{self, LastExit, RunState};
use super::super::stop::cleanup_stopped;
use super::super::{
    CtError, NetHooks, cg_err, cgroup, ensure_uuid, hook_err, lock_loaded, net_err, resources_of,
    running,
};
use super::{
    CheckpointError, Meta, RESTORE_LOG, Result, Source, common_args, default_dir, io_err, log_tail,
    remove_images, require_criu,
};
use crate::cgroups::CgroupManager;
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::net::{self, HostNet, LinkTeardown, NetError, NetState, Netlink};

/// Undo steps run in reverse unless disarmed: a failed restore leaves nothing behind.
type UndoStep<'a> = (&'static str, Box<dyn FnOnce() + 'a>);

#[derive(Default)]
struct Undo<'a>(Vec<UndoStep<'a>>);

impl<'a> Undo<'a> {
    fn push(&mut self, what: &'static str, f: impl FnOnce() + 'a) {
        self.0.push((what, Box::new(f)));
    }
    fn disarm(mut self) {
        self.0.clear();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        while let Some((what, f)) = self.0.pop() {
            debug!(step = what, "restore: rolling back");
            f();
        }
    }
}

/// Temporary host-side name of the CT end `n` while CRIU picks it up (≤ 15 bytes).
fn staging_ifname(ctid: Ctid, n: usize) -> String {
    format!("bc{ctid}_{n}")
}

/// Restores a CT from the images in `dir` (default: [`default_dir`]). The images are removed
/// once the CT runs again (restoring them twice would fork its history); a failed restore
/// keeps them for another try.
pub fn restore(
    host: &Host,
    ctid: Ctid,
    dir: Option<&Path>,
    hooks: &mut dyn NetHooks,
) -> Result<RunState> {
    CtConfig::load(host, ctid).map_err(CtError::from)?;
    let criu = require_criu(host, "restore")?;
    let dir = dir.map_or_else(|| default_dir(host, ctid), Path::to_path_buf);
    // Checked again under the lock; first so a running CT is the error, not its missing images.
    if running(host, ctid).is_some() {
        return Err(CtError::AlreadyRunning(ctid).into());
    }
    if let Some(m) = super::super::migrate::migrated(host, ctid) {
        return Err(CtError::Migrated { ctid, to: m.to }.into());
    }
    let meta = Meta::read(ctid, &dir)?;
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::AlreadyRunning(ctid).into());
    }
    if meta.uuid.is_some() && meta.uuid != cfg.uuid {
        return Err(CheckpointError::Images {
            ctid,
            dir,
            msg: "holds a checkpoint of another CT that had this CTID (its UUID differs)".into(),
        });
    }
    ensure_uuid(host, ctid)?;
    cleanup_stopped(host, ctid, false, hooks)?;

    let cg = cgroup(host, ctid)?;
    let res = resources_of(&cfg.resources);
    res.validate().map_err(cg_err(ctid))?;
    let mut undo = Undo::default();
    cg.create().map_err(cg_err(ctid))?;
    undo.push("cgroup", || {
        if let Err(e) = cg
            .kill_all(Duration::from_secs(5))
            .and_then(|_| cg.destroy())
        {
            warn!(%ctid, error = %ErrorChain(&e), "rollback: remove cgroup");
        }
    });
    if let Some(u) = cfg.userns {
        cg.delegate(u.uid_base, u.gid_base).map_err(cg_err(ctid))?;
    }
    cg.setup_devices().map_err(cg_err(ctid))?;
    cg.apply(&res).map_err(cg_err(ctid))?;
    if let Some(limit) = cfg.resources.diskspace {
        crate::quota::set_diskspace(&host.private_dir(ctid), ctid.get(), limit)
            .map_err(CtError::from)?;
    }

    let sp = host.state_path(ctid);
    let mut st = RunState {
        init_pid: 0,
        init_starttime: 0,
        monitor_pid: 0,
        boot_id: state::boot_id().unwrap_or_default(),
        started_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        mounted_by_start: !state::is_mount_point(&host.root_dir(ctid)),
        net: None,
        shaping: None,
    };
    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    undo.push("state", || {
        let _ = fs::remove_file(host.state_path(ctid));
    });
    let mounted = bind_private(host, &cfg)?;
    if mounted {
        undo.push("mount", || {
            let _ = unbind_private(host, ctid);
        });
    }

    let mut staged = Vec::new();
    if !cfg.net.ifaces.is_empty() {
        let ns_state = host_side(ctid, &cfg, hooks, &mut undo)?;
        staged = stage_ct_ends(ctid, &ns_state.1, &ns_state.0)?;
        st.net = Some(ns_state.1);
    }

    let (ready_r, ready_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| CtError::Sys {
        ctid,
        op: "pipe",
        errno,
    })?;
    let paths = monitor::Paths {
        console_log: host.console_log_path(ctid),
        last_exit: LastExit::path(&host.run, ctid),
    };
    let _ = LastExit::remove(&paths.last_exit);
    let plan = CriuRestore {
        criu,
        dir: dir.clone(),
        root: host.root_dir(ctid),
        meta: meta.clone(),
        staged: staged.clone(),
    };
    let exe = monitor::exec::MonitorExe::locate();
    let t0 = Instant::now();
    // SAFETY: berth's CLI is single-threaded here (the staging thread has been joined); the
    // child only runs the monitor and exits.
    let monitor_pid = match unsafe { fork() }.map_err(|errno| CtError::Sys {
        ctid,
        op: "fork monitor",
        errno,
    })? {
        ForkResult::Child => {
            drop(ready_r);
            let code =
                monitor::adopt_main(ctid, &paths, ready_w, cfg.userns, exe, &mut |slave, p| {
                    plan.run(slave, p)
                });
            // SAFETY: _exit skips atexit handlers and destructors of the parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, exe));
    undo.push("monitor", move || {
        let _ = kill(monitor_pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(monitor_pid, None);
    });
    let mut ready = fs::File::from(ready_r);
    let init_pid = match MonitorMsg::recv(&mut ready) {
        Ok(MonitorMsg::Started { init_pid }) => init_pid,
        Ok(MonitorMsg::Failed { error }) => {
            return Err(CheckpointError::Criu {
                ctid,
                op: "restore",
                msg: error,
                log: dir.join(RESTORE_LOG),
            });
        }
        Ok(other) => {
            return Err(bad_report(ctid, MonitorMsgError::Unexpected(other.kind())).into());
        }
        Err(source) => return Err(bad_report(ctid, source).into()),
    };
    undo.push("init", move || {
        let _ = kill(Pid::from_raw(init_pid), Signal::SIGKILL);
    });
    let restore_ms = t0.elapsed().as_millis() as u64;
    st.init_pid = init_pid;
    st.init_starttime = state::proc_starttime(init_pid).unwrap_or(0);
    st.monitor_pid = monitor_pid.as_raw();
    st.mounted_by_start = mounted;
    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    undo.disarm();
    remove_images(&dir);
    info!(%ctid, init_pid, restore_ms, "restored");
    Ok(st)
}

fn bad_report(ctid: Ctid, source: MonitorMsgError) -> CtError {
    CtError::StartReport {
        ctid,
        from: "the restoring monitor",
        source,
    }
}

/// The CT's network built as `start` builds it, in a staging namespace of its own: host ends
/// with their routes, proxy entries, datapath and shaping, CT ends with their names and MACs.
/// Returns the staging namespace and what was set up.
fn host_side<'a>(
    ctid: Ctid,
    cfg: &CtConfig,
    hooks: &'a mut dyn NetHooks,
    undo: &mut Undo<'a>,
) -> Result<(OwnedFd, NetState)> {
    // A thread of its own makes the namespace: unshare(CLONE_NEWNET) is per thread, and the
    // fork of the monitor later needs this process single-threaded again.
    let staging = std::thread::spawn(net::create_netns)
        .join()
        .map_err(|_| CtError::StartFailed {
            ctid,
            msg: "the thread creating the staging network namespace panicked".into(),
        })?
        .map_err(net_err(ctid))?;
    let mut hn = HostNet::current().map_err(net_err(ctid))?;
    for e in net::remove_stale_links(ctid, &cfg.net, &mut hn) {
        debug!(%ctid, error = %ErrorChain(&e), "stale network cleanup");
    }
    for n in 0..cfg.net.ifaces.len() {
        let _ = hn.netlink().link_del(&staging_ifname(ctid, n));
    }
    let mut early: Option<NetState> = None;
    let setup = net::setup_with(ctid, staging.as_fd(), &cfg.net, &mut hn, &mut |planned| {
        early = Some(planned.clone());
        hooks
            .net_up(ctid, planned, None)
            .map_err(|e| NetError::BeforeUp(Box::new(e)))
    });
    let ns_state = match setup {
        Ok(s) => s,
        Err(e) => {
            if let Some(p) = &early {
                hooks.net_down(ctid, p);
            }
            return Err(net_err(ctid)(e).into());
        }
    };
    let undo_state = ns_state.clone();
    undo.push("network", move || {
        if let Ok(mut hn) = HostNet::current() {
            for e in net::teardown(&undo_state, &mut hn, LinkTeardown::Delete) {
                warn!(%ctid, error = %ErrorChain(&e), "rollback: network");
            }
        }
    });
    let shaped = match cfg.active_shaping() {
        Some(sh) => hooks.shape(ctid, &ns_state, Some(sh)),
        None => Ok(()),
    };
    let down_state = ns_state.clone();
    undo.push("datapath", move || hooks.net_down(ctid, &down_state));
    shaped.map_err(hook_err(ctid))?;
    Ok((staging, ns_state))
}

/// Moves each CT end out of the staging namespace into this (the host's) namespace under a
/// temporary name, where CRIU's `--external netdev[…]` finds it. The move drops the CT end's
/// addresses; CRIU restores the dumped ones, routes included, in the CT's namespace.
fn stage_ct_ends(ctid: Ctid, ns: &NetState, staging: &OwnedFd) -> Result<Vec<(String, String)>> {
    let here = net::current_netns().map_err(net_err(ctid))?;
    let mut nl = Netlink::open_in(staging.as_fd(), format!("CT {ctid}'s staging netns"))
        .map_err(net_err(ctid))?;
    let mut out = Vec::new();
    for (n, i) in ns.ifaces.iter().enumerate() {
        let tmp = staging_ifname(ctid, n);
        let mut msg = LinkMessage::default();
        msg.header.index = i.ct_ifindex;
        msg.attributes
            .push(LinkAttribute::NetNsFd(here.as_raw_fd()));
        msg.attributes.push(LinkAttribute::IfName(tmp.clone()));
        nl.request(RouteNetlinkMessage::SetLink(msg), 0)
            .map_err(net_err(ctid))?
            .map_err(|e| net_err(ctid)(nl.fail("move CT end to the host", tmp.clone(), e)))?;
        out.push((i.ct_ifname.clone(), tmp));
    }
    Ok(out)
}

/// The CRIU restore the monitor runs.
struct CriuRestore {
    criu: PathBuf,
    dir: PathBuf,
    root: PathBuf,
    meta: Meta,
    /// (CT-side name, temporary host name) of each staged CT end.
    staged: Vec<(String, String)>,
}

impl CriuRestore {
    /// Runs CRIU with the restored tree becoming this process's child; returns init's PID.
    fn run(&self, slave: BorrowedFd<'_>, console: &Path) -> Result<i32, String> {
        let pidfile = self.dir.join("restore.pid");
        let _ = fs::remove_file(&pidfile);
        // The new console is inherited by CRIU (and the restored tasks) under its old id.
        let fd = slave.as_raw_fd();
        nix::fcntl::fcntl(
            slave,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| format!("make the console inheritable: {e}"))?;
        let mut cmd = Command::new(&self.criu);
        cmd.arg("restore")
            .arg("-D")
            .arg(&self.dir)
            .args(["-o", RESTORE_LOG, "-v4"])
            .args(common_args())
            .arg("--root")
            .arg(&self.root)
            .args(["--restore-detached", "--restore-sibling"])
            .arg("--pidfile")
            .arg(&pidfile);
        if let Some(key) = &self.meta.console {
            cmd.arg("--inherit-fd").arg(format!("fd[{fd}]:{key}"));
        }
        for m in &self.meta.mounts {
            let src = match &m.source {
                Source::Host(p) => p.clone(),
                Source::Console => console.to_path_buf(),
            };
            cmd.arg("--external")
                .arg(format!("mnt[{}]:{}", m.key, src.display()));
        }
        for (inner, tmp) in &self.staged {
            cmd.arg("--external").arg(format!("netdev[{inner}]:{tmp}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = cmd
            .status()
            .map_err(|e| format!("run {}: {e}", self.criu.display()))?;
        if !status.success() {
            return Err(format!(
                "criu restore {status}: {}",
                log_tail(&self.dir.join(RESTORE_LOG))
            ));
        }
        let text =
            fs::read_to_string(&pidfile).map_err(|e| format!("read {}: {e}", pidfile.display()))?;
        text.trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{} holds no PID: {text:?}", pidfile.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_fit_an_interface_name() {
        let ctid: Ctid = "4000000000".parse().unwrap_or(Ctid::new(999_999).unwrap());
        assert!(staging_ifname(ctid, 9).len() <= 15);
    }
}
