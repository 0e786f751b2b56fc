//! `start`: cgroup, mount, monitor and init, network, then the go-ahead; undone on any failure.
//!
//! After the go-ahead `start` waits for the monitor's word on init: an init that fails before
//! its exec, or exits within its first second, fails the start (its exit status or signal and
//! the console's last lines in the error) and everything is rolled back; an init that is idle
//! (or lived through that second) is "started".

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use tracing::{debug, info, warn};

use super::monitor::{self, MonitorMsg, MonitorMsgError};
use super::mount::{bind_private, unbind_private};
use super::state::{self, LastExit, RunState};
use super::stop::cleanup_stopped;
use super::{
    CtError, NetHooks, Result, cg_err, cgroup, ensure_uuid, hook_err, init, io_err, lock_loaded,
    net_err, open_ns, resources_of, running,
};
use crate::cgroups::CgroupManager;
use crate::config::{CtConfig, Host, UserNs};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::net::{self, HostNet, LinkTeardown, NetError, NetState};

/// Runs registered undo steps in reverse unless disarmed: a failed start leaves nothing behind.
type UndoStep<'a> = (&'static str, Box<dyn FnOnce() + 'a>);

struct Undo<'a> {
    steps: Vec<UndoStep<'a>>,
}

impl<'a> Undo<'a> {
    fn new() -> Self {
        Self { steps: Vec::new() }
    }
    fn push(&mut self, what: &'static str, f: impl FnOnce() + 'a) {
        self.steps.push((what, Box::new(f)));
    }
    fn disarm(mut self) {
        self.steps.clear();
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        while let Some((what, f)) = self.steps.pop() {
            debug!(step = what, "rolling back");
            f();
        }
    }
}

/// Each interface's host ifindex and sorted addresses: what the datapath was given.
fn addrs_by_iface(n: &NetState) -> Vec<(u32, Vec<ipnet::IpNet>)> {
    n.ifaces
        .iter()
        .map(|i| {
            let mut a = i.addrs.clone();
            a.sort();
            (i.host_ifindex, a)
        })
        .collect()
}

fn write_fd(fd: &OwnedFd, data: &[u8]) -> io::Result<()> {
    let mut f = fs::File::from(fd.try_clone()?);
    f.write_all(data)
}

pub fn start(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<RunState> {
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    start_locked(host, ctid, &cfg, hooks)
}

/// `start` for a caller that holds the CT's lock.
pub(super) fn start_locked(
    host: &Host,
    ctid: Ctid,
    cfg: &CtConfig,
    hooks: &mut dyn NetHooks,
) -> Result<RunState> {
    if running(host, ctid).is_some() {
        return Err(CtError::AlreadyRunning(ctid));
    }
    if let Some(m) = super::migrate::migrated(host, ctid) {
        return Err(CtError::Migrated { ctid, to: m.to });
    }
    ensure_uuid(host, ctid)?;
    // Leftovers of a crashed start/stop (or of an init that exited on its own).
    cleanup_stopped(host, ctid, false, hooks)?;

    let cg = cgroup(host, ctid)?;
    let res = resources_of(&cfg.resources);
    res.validate().map_err(cg_err(ctid))?;
    let mut undo = Undo::new();
    cg.create().map_err(cg_err(ctid))?;
    undo.push("cgroup", || {
        if let Err(e) = cg
            .kill_all(Duration::from_secs(5))
            .and_then(|_| cg.destroy())
        {
            warn!(%ctid, error = %ErrorChain(&e), "rollback: remove cgroup");
        }
    });
    crate::crash_point!("start.cgroup_created");
    if let Some(u) = cfg.userns {
        cg.delegate(u.uid_base, u.gid_base).map_err(cg_err(ctid))?;
    }
    cg.setup_devices().map_err(cg_err(ctid))?;
    cg.apply(&res).map_err(cg_err(ctid))?;
    if let Some(limit) = cfg.resources.diskspace {
        crate::quota::set_diskspace(&host.private_dir(ctid), ctid.get(), limit)?;
    }
    crate::crash_point!("start.limits_applied");

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
    // A provisional state (init_pid 0, never "alive") records that the mount is start's own, so
    // gc after a kill -9 mid-start unmounts it but leaves a `berth mount` of the admin alone.
    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    undo.push("state", || {
        let _ = fs::remove_file(host.state_path(ctid));
    });
    crate::crash_point!("start.state_provisional");
    let mounted = bind_private(host, cfg)?;
    crate::crash_point!("start.private_mounted");
    if mounted {
        undo.push("mount", || {
            let _ = unbind_private(host, ctid);
        });
    }
    let rootfs = host.root_dir(ctid);
    let init_path = rootfs.join(cfg.init.trim_start_matches('/'));
    if fs::symlink_metadata(&init_path).is_err() {
        return Err(CtError::StartFailed {
            ctid,
            msg: format!(
                "the CT has no init at {} (set `init` in {})",
                cfg.init,
                host.conf_path(ctid).display()
            ),
        });
    }

    let pipe = |what| {
        pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| CtError::Sys {
            ctid,
            op: what,
            errno,
        })
    };
    let (ready_r, ready_w) = pipe("pipe")?;
    let (go_r, go_w) = pipe("pipe")?;

    let spec = init::InitSpec {
        rootfs: rootfs.clone(),
        hostname: cfg.hostname.clone(),
        console: None,
        console_fd: None,
        init: cfg.init.clone(),
        userns: cfg.userns.is_some(),
        join_cgroup: cg.join_self_files(),
        cgroups: cg.ct_view(),
        seccomp: super::seccomp::filter()?,
    };
    let paths = monitor::Paths {
        console_log: host.console_log_path(ctid),
        last_exit: LastExit::path(&host.run, ctid),
    };
    // How the previous run ended is no news once this one starts.
    LastExit::remove(&paths.last_exit).map_err(io_err(ctid, "remove", &paths.last_exit))?;

    let exe = monitor::exec::MonitorExe::locate();
    // SAFETY: berth's CLI is single-threaded here; the child only runs the monitor and exits.
    let monitor_pid = match unsafe { fork() }.map_err(|errno| CtError::Sys {
        ctid,
        op: "fork monitor",
        errno,
    })? {
        ForkResult::Child => {
            drop((ready_r, go_w));
            let code = monitor::monitor_main(ctid, spec, &paths, ready_w, go_r, cfg.userns, exe);
            // SAFETY: _exit skips atexit handlers and destructors of the parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, go_r, exe));
    crate::crash_point!("start.monitor_spawned");
    undo.push("monitor", move || {
        let _ = kill(monitor_pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(monitor_pid, None);
    });

    let mut ready = fs::File::from(ready_r);
    let init_pid = match MonitorMsg::recv(&mut ready) {
        Ok(MonitorMsg::Started { init_pid }) => init_pid,
        Ok(MonitorMsg::Failed { error }) => {
            return Err(CtError::StartFailed { ctid, msg: error });
        }
        Ok(other) => return Err(bad_report(ctid, MonitorMsgError::Unexpected(other.kind()))),
        Err(MonitorMsgError::Empty) => {
            return Err(CtError::StartFailed {
                ctid,
                msg: "monitor exited before cloning init".into(),
            });
        }
        Err(source) => return Err(bad_report(ctid, source)),
    };
    undo.push("init", move || {
        let _ = kill(Pid::from_raw(init_pid), Signal::SIGKILL);
    });
    let starttime = state::proc_starttime(init_pid).unwrap_or(0);
    crate::crash_point!("start.init_cloned");

    if let Some(u) = cfg.userns {
        write_id_maps(ctid, init_pid, &u)?;
        crate::crash_point!("start.id_maps_written");
    }
    if !cfg.net.ifaces.is_empty() {
        let ns = open_ns(ctid, init_pid)?;
        let mut hn = HostNet::current().map_err(net_err(ctid))?;
        crate::crash_point!("start.netns_opened");
        // A venet/veth left by a crashed run (or still being destroyed with an old netns)
        // would block the names; these are berth's own names for this CT.
        for e in net::remove_stale_links(ctid, &cfg.net, &mut hn) {
            debug!(%ctid, error = %ErrorChain(&e), "stale network cleanup");
        }
        // The datapath attaches while no interface has carrier yet (net::setup calls back
        // between creating the pairs and bringing them up): the first frame is counted.
        let mut early: Option<NetState> = None;
        let setup = net::setup_with(ctid, ns.as_fd(), &cfg.net, &mut hn, &mut |planned| {
            early = Some(planned.clone());
            crate::crash_point!("start.veth_made");
            let r = hooks
                .net_up(ctid, planned, None)
                .map_err(|e| NetError::BeforeUp(Box::new(e)));
            crate::crash_point!("start.ebpf_attached");
            r
        });
        let ns_state = match setup {
            Ok(s) => s,
            Err(e) => {
                if let Some(p) = &early {
                    hooks.net_down(ctid, p);
                }
                return Err(net_err(ctid)(e));
            }
        };
        st.net = Some(ns_state.clone());
        crate::crash_point!("start.net_up");
        // The links die with init's netns; only the proxy entries need removing.
        let undo_state = ns_state.clone();
        undo.push("network", move || {
            if let Ok(mut hn) = HostNet::current() {
                for e in net::teardown(&undo_state, &mut hn, LinkTeardown::Delete) {
                    warn!(%ctid, error = %ErrorChain(&e), "rollback: network");
                }
            }
        });
        // The CT's shaping comes with the interfaces; attaching again only if setting up
        // ended with other addresses than planned. A hook that fails halfway (attached, not
        // shaped) is undone like one that finished.
        let up = if early
            .as_ref()
            .is_some_and(|p| addrs_by_iface(p) == addrs_by_iface(&ns_state))
        {
            match cfg.active_shaping() {
                Some(sh) => hooks.shape(ctid, &ns_state, Some(sh)),
                None => Ok(()),
            }
        } else {
            hooks.net_up(ctid, &ns_state, cfg.active_shaping())
        };
        let hooks = &mut *hooks;
        undo.push("datapath", move || hooks.net_down(ctid, &ns_state));
        up.map_err(hook_err(ctid))?;
        crate::crash_point!("start.shaping_applied");
    }
    if !cfg.net.nameservers.is_empty() || !cfg.net.searchdomains.is_empty() {
        net::write_resolv_conf(&rootfs, &cfg.net.nameservers, &cfg.net.searchdomains)
            .map_err(net_err(ctid))?;
    }

    write_fd(&go_w, b"g").map_err(io_err(ctid, "signal init", Path::new("pipe")))?;
    drop(go_w);
    crate::crash_point!("start.init_released");
    // The monitor answers within its watch window of init's exec; the margin covers a
    // loaded host, the bound a monitor that is stopped or wedged.
    if !readable_within(&ready, monitor::WATCH + Duration::from_secs(10)) {
        return Err(CtError::StartFailed {
            ctid,
            msg: "the monitor did not report on init".into(),
        });
    }
    match MonitorMsg::recv(&mut ready) {
        Ok(MonitorMsg::Settled { after_ms, idle }) => {
            debug!(%ctid, after_ms, idle, "init settled");
        }
        Ok(MonitorMsg::Failed { error }) => {
            return Err(CtError::StartFailed { ctid, msg: error });
        }
        Ok(MonitorMsg::Exited {
            exit,
            after_ms,
            console,
        }) => {
            return Err(CtError::InitDied {
                ctid,
                init: cfg.init.clone(),
                exit,
                after_ms,
                console: monitor::console_lines(&console, CONSOLE_LINES),
            });
        }
        Ok(other) => return Err(bad_report(ctid, MonitorMsgError::Unexpected(other.kind()))),
        Err(MonitorMsgError::Empty) => {
            return Err(CtError::StartFailed {
                ctid,
                msg: "the monitor exited before reporting on init".into(),
            });
        }
        Err(source) => return Err(bad_report(ctid, source)),
    }
    st.init_pid = init_pid;
    st.init_starttime = starttime;
    st.monitor_pid = monitor_pid.as_raw();
    st.mounted_by_start = mounted;
    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    crate::crash_point!("start.state_written");
    undo.disarm();
    info!(%ctid, init_pid, "started");
    Ok(st)
}

/// How many of the console's last lines a start that failed because init died shows.
const CONSOLE_LINES: usize = 10;

fn bad_report(ctid: Ctid, source: MonitorMsgError) -> CtError {
    CtError::StartReport {
        ctid,
        from: "the monitor",
        source,
    }
}

fn readable_within(f: &fs::File, timeout: Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        match poll(&mut [PollFd::new(f.as_fd(), PollFlags::POLLIN)], ms) {
            Ok(n) => return n > 0,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

fn write_id_maps(ctid: Ctid, pid: i32, u: &UserNs) -> Result<()> {
    for (file, base) in [("uid_map", u.uid_base), ("gid_map", u.gid_base)] {
        let p = PathBuf::from(format!("/proc/{pid}/{file}"));
        fs::write(&p, format!("0 {base} {}\n", u.size)).map_err(io_err(ctid, "write", &p))?;
    }
    Ok(())
}
