//! `stop`, `restart`, `destroy`, `suspend`/`resume`, and the teardown shared with `start` and `gc`.

use std::fs;
use std::io;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::mount::unbind_private;
use super::start::start_locked;
use super::state::{self, LastExit, RunState};
use super::{
    CtError, NetHooks, NoHooks, Result, cg_err, cgroup, hook_err, io_err, lock, lock_loaded,
    running,
};
use crate::cgroups::{self, CgroupManager};
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::net::{self, HostNet, LinkTeardown, NetState};
use crate::template::TemplateStore;

/// Sends init the distro's halt signal, waits, then kills whatever is left in the cgroup.
pub fn stop(host: &Host, ctid: Ctid, fast: bool, hooks: &mut dyn NetHooks) -> Result<()> {
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    stop_locked(host, ctid, &cfg, fast, hooks)
}

/// `stop` for a caller that holds the CT's lock.
fn stop_locked(
    host: &Host,
    ctid: Ctid,
    cfg: &CtConfig,
    fast: bool,
    hooks: &mut dyn NetHooks,
) -> Result<()> {
    // Addresses a killed set was adding are not in the run state the teardown goes by.
    super::adding::recover(host, ctid, hooks)?;
    let Some(st) = running(host, ctid) else {
        // Not running: still clean what a crash may have left, so `stop` always converges.
        cleanup_stopped(host, ctid, true, hooks)?;
        return Err(CtError::NotRunning(ctid));
    };
    let cg = cgroup(host, ctid)?;
    if cg.is_frozen().unwrap_or(false) {
        cg.thaw().map_err(cg_err(ctid))?;
    }
    notify_monitor(ctid, st.monitor_pid);
    if fast {
        // SIGKILL to the pid namespace's init makes the kernel kill every task in it, and the
        // pidfd turns readable only after that namespace is empty (zap_pid_ns_processes).
        if let Ok(pidfd) = state::pidfd_open(st.init_pid) {
            let _ = kill(Pid::from_raw(st.init_pid), Signal::SIGKILL);
            state::wait_pidfd(&pidfd, Duration::from_secs(10));
        }
    } else {
        let sig = crate::signal::parse_signal(&cfg.stop_signal).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?;
        if let Ok(pidfd) = state::pidfd_open(st.init_pid) {
            // SAFETY: sending a signal to the recorded init, verified alive by start time above.
            unsafe { libc::kill(st.init_pid, sig) };
            if !state::wait_pidfd(&pidfd, Duration::from_secs(cfg.stop_timeout.into())) {
                warn!(%ctid, timeout = cfg.stop_timeout, "init did not halt in time; killing");
            }
        }
    }
    crate::crash_point!("stop.init_signalled");
    cg.kill_all(Duration::from_secs(10)).map_err(cg_err(ctid))?;
    crate::crash_point!("stop.cgroup_killed");
    if let Some(ns) = &st.net {
        net_teardown(ctid, ns, hooks, LinkTeardown::NetnsExit);
    }
    crate::crash_point!("stop.net_down");
    teardown_after_stop(host, ctid, &cg, st.mounted_by_start)?;
    let exit = LastExit::path(&host.run, ctid);
    LastExit::remove(&exit).map_err(io_err(ctid, "remove", &exit))?;
    info!(%ctid, "stopped");
    Ok(())
}

/// Stops a CT that the caller froze, without letting it run again first: every process gets
/// SIGKILL while frozen (a frozen task cannot handle it yet) and only then the cgroup is thawed,
/// so the tasks die on their way out of the freezer before running another instruction of
/// their own. A migration relies on it: files copied while frozen are the CT's last state.
pub fn kill_frozen(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<()> {
    let (_lock, _cfg) = lock_loaded(host, ctid)?;
    let Some(st) = running(host, ctid) else {
        return Err(CtError::NotRunning(ctid));
    };
    let cg = cgroup(host, ctid)?;
    if !cg.is_frozen().unwrap_or(false) {
        return Err(CtError::Invalid {
            ctid,
            msg: "kill_frozen: the CT is not frozen".into(),
        });
    }
    notify_monitor(ctid, st.monitor_pid);
    let pidfd = state::pidfd_open(st.init_pid).ok();
    for pid in cg.pids().map_err(cg_err(ctid))? {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    cg.thaw().map_err(cg_err(ctid))?;
    if let Some(fd) = &pidfd {
        state::wait_pidfd(fd, Duration::from_secs(10));
    }
    cg.kill_all(Duration::from_secs(10)).map_err(cg_err(ctid))?;
    if let Some(ns) = &st.net {
        net_teardown(ctid, ns, hooks, LinkTeardown::NetnsExit);
    }
    teardown_after_stop(host, ctid, &cg, st.mounted_by_start)?;
    let exit = LastExit::path(&host.run, ctid);
    LastExit::remove(&exit).map_err(io_err(ctid, "remove", &exit))?;
    info!(%ctid, "stopped while frozen");
    Ok(())
}

/// Tells the CT's monitor that init's coming exit is this stop's doing, so it records no exit
/// of init's own for `status`. Sent before init is signalled: the monitor reads it no later
/// than that exit's SIGCHLD.
fn notify_monitor(ctid: Ctid, pid: i32) {
    // A PID reused since is not the monitor: its name says so (comm is cut at 15 bytes).
    let name = super::monitor::comm_name(ctid);
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if pid > 0 && comm.trim_end() == &name[..name.len().min(15)] {
        let _ = kill(Pid::from_raw(pid), super::monitor::STOPPING);
    }
}

/// Best effort: the datapath detaches, proxy entries go (links go with the netns or are deleted).
fn net_teardown(ctid: Ctid, ns: &NetState, hooks: &mut dyn NetHooks, links: LinkTeardown) {
    hooks.net_down(ctid, ns);
    match HostNet::current() {
        Ok(mut hn) => {
            for e in net::teardown(ns, &mut hn, links) {
                warn!(%ctid, error = %ErrorChain(&e), "network teardown");
            }
        }
        Err(e) => warn!(%ctid, error = %ErrorChain(&e), "network teardown: open host netlink"),
    }
}

fn teardown_after_stop(host: &Host, ctid: Ctid, cg: &cgroups::Cgroup, unmount: bool) -> Result<()> {
    if cg.exists() {
        cg.destroy().map_err(cg_err(ctid))?;
    }
    crate::crash_point!("stop.cgroup_removed");
    if unmount {
        unbind_private(host, ctid)?;
    }
    crate::crash_point!("stop.unmounted");
    for p in [host.state_path(ctid)] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(ctid, "remove", &p)(e)),
        }
    }
    crate::crash_point!("stop.state_removed");
    Ok(())
}

/// Removes what a stopped CT may have left (stale state, cgroup, start's mount). `unmount_any`
/// also drops a mount made by `berth mount`.
pub(super) fn cleanup_stopped(
    host: &Host,
    ctid: Ctid,
    unmount_any: bool,
    hooks: &mut dyn NetHooks,
) -> Result<bool> {
    let st = RunState::read(&host.state_path(ctid)).ok().flatten();
    let cg = cgroup(host, ctid)?;
    let had_cg = cg.exists();
    let mut cleaned = false;
    if had_cg {
        cg.kill_all(Duration::from_secs(10)).map_err(cg_err(ctid))?;
        cleaned = true;
    }
    if st.is_some() || had_cg {
        // A crash may have lost the real network state: rebuild what the config implies.
        let expected = match (
            st.as_ref().and_then(|s| s.net.clone()),
            CtConfig::load(host, ctid),
        ) {
            (Some(n), _) => Some(n),
            (None, Ok(cfg)) if !cfg.net.ifaces.is_empty() => {
                Some(NetState::expected(ctid, &cfg.net))
            }
            _ => None,
        };
        if let Some(n) = expected {
            net_teardown(ctid, &n, hooks, LinkTeardown::Delete);
        }
    }
    let unmount = unmount_any || st.as_ref().is_some_and(|s| s.mounted_by_start);
    if st.is_some() || had_cg || (unmount && state::is_mount_point(&host.root_dir(ctid))) {
        teardown_after_stop(host, ctid, &cg, unmount)?;
        cleaned = true;
    }
    Ok(cleaned)
}

pub fn restart(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<RunState> {
    // One lock over both halves: a `start` from elsewhere between them would make ours fail.
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    match stop_locked(host, ctid, &cfg, false, hooks) {
        Ok(()) | Err(CtError::NotRunning(_)) => {}
        Err(e) => return Err(e),
    }
    start_locked(host, ctid, &CtConfig::load(host, ctid)?, hooks)
}

/// Removes a stopped CT: its counters are retired first (`hooks.retire`, recorded under the
/// CT's UUID in [`Host::retired_counters_path`]), so a failure there leaves the CT whole.
pub fn destroy(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<()> {
    let (_lock, cfg) = lock_loaded(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::Running(ctid));
    }
    cleanup_stopped(host, ctid, true, &mut NoHooks)?;
    crate::crash_point!("destroy.cleaned");
    // A CT made before UUIDs and never started since has none: its record gets a fresh one.
    let uuid = CtConfig::load(host, ctid)?
        .uuid
        .unwrap_or_else(uuid::Uuid::new_v4);
    hooks
        .retire(ctid, uuid, &cfg.billing, &host.retired_counters_path(uuid))
        .map_err(hook_err(ctid))?;
    crate::crash_point!("destroy.counters_retired");
    let private = host.private_dir(ctid);
    if cfg.resources.diskspace.is_some()
        && private.exists()
        && let Err(e) = crate::quota::clear_diskspace(&private, ctid.get())
    {
        warn!(%ctid, error = %ErrorChain(&e), "clear disk quota");
    }
    if private.exists() {
        TemplateStore::remove_tree_fast(&private)?;
    }
    crate::crash_point!("destroy.private_removed");
    let root = host.root_dir(ctid);
    match fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(ctid, "remove mount point", &root)(e)),
    }
    for p in [
        host.console_log_path(ctid),
        LastExit::path(&host.run, ctid),
        host.conf_path(ctid),
        host.lock_path(ctid),
    ] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(ctid, "remove", &p)(e)),
        }
    }
    crate::crash_point!("destroy.config_removed");
    super::migrate::clear_migrated(host, ctid)?;
    // After the config: a crash in between leaves a claim without a CT, which gc releases.
    if let Some(u) = &cfg.userns {
        crate::userns::release(host, ctid, u)?;
    }
    crate::crash_point!("destroy.ids_released");
    info!(%ctid, "destroyed");
    Ok(())
}

pub fn suspend(host: &Host, ctid: Ctid) -> Result<()> {
    CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_none() {
        return Err(CtError::NotRunning(ctid));
    }
    cgroup(host, ctid)?.freeze().map_err(cg_err(ctid))
}

pub fn resume(host: &Host, ctid: Ctid) -> Result<()> {
    CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_none() {
        return Err(CtError::NotRunning(ctid));
    }
    cgroup(host, ctid)?.thaw().map_err(cg_err(ctid))
}
