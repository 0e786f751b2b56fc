//! One CT's part of a scrape, run on the worker threads: its config and run state (cached by
//! file identity), cgroup counters and live shaping.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use berth_runtime::net::Netlink;
use berth_runtime::{
    Ctid,
    cgroups::{Cgroup, CgroupManager, Controller, Hierarchy},
    config::{CtConfig, Host},
    container::{self, State, state::RunState},
    error_chain::ErrorChain,
};
use tracing::{debug, warn};

use super::{
    cgfiles::{Buf, CtFiles},
    snapshot::{
        CgroupSnapshot, CtCache, CtMeta, CtSnapshot, Dir, FileId, Liveness, RunEntry, Work,
    },
};
use crate::shaper::view::{self, CtIfaces, CtShaping, ShaperView};

/// What follows the CTID in the name of a per-CT file (`.toml` for `<root>/conf/1.toml`),
/// from the path `path_of` gives CT 1.
pub(super) fn file_suffix(path_of: impl Fn(Ctid) -> PathBuf) -> String {
    let Ok(one) = Ctid::new(1) else {
        return String::new();
    };
    let path = path_of(one);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    name.strip_prefix('1').unwrap_or(&name).to_owned()
}

/// What every CT's read needs of the scrape.
pub(super) struct Env<'a> {
    pub(super) host: &'a Host,
    pub(super) boot_id: Option<&'a str>,
    /// `None` when the configs could not be listed (then no CT is read).
    pub(super) conf_dir: Option<&'a Dir>,
    pub(super) run_dir: &'a Dir,
    pub(super) hierarchy: Option<&'a Hierarchy>,
    /// The shaper's maps and the shaped CTs' interfaces.
    pub(super) shaper: Option<&'a (ShaperView, BTreeMap<u32, CtIfaces>)>,
    /// The first error reading a CT's shaping in this scrape.
    pub(super) shaper_error: &'a Mutex<Option<String>>,
}

/// The CT's config as cached, re-read when its file changed; `None` when it has none any
/// more (destroyed since the listing). A config that cannot be parsed still names a CT (its
/// counters are exported with empty info labels).
fn config(
    env: &Env,
    ctid: Ctid,
    changed: bool,
    cache: &mut Option<(FileId, Arc<CtMeta>)>,
) -> Option<Arc<CtMeta>> {
    if !changed && let Some((_, meta)) = cache {
        return Some(meta.clone());
    }
    let path = env.host.conf_path(ctid);
    let st = match env.conf_dir?.stat(&path) {
        Ok(Some(st)) => st,
        Ok(None) => {
            *cache = None;
            return None;
        }
        Err(e) => {
            debug!(path = %path.display(), error = %e, "stat CT config");
            *cache = None;
            return None;
        }
    };
    let id = FileId::of(&st);
    match cache {
        Some((cached, meta)) if *cached == id => Some(meta.clone()),
        _ => {
            let meta = Arc::new(match CtConfig::load(env.host, ctid) {
                Ok(c) => CtMeta {
                    name: c.name,
                    hostname: c.hostname,
                    template: c.template,
                },
                Err(e) => {
                    warn!(ctid = ctid.get(), error = %ErrorChain(&e), "CT config unreadable; exporting the CT without info labels");
                    CtMeta::default()
                }
            });
            *cache = Some((id, meta.clone()));
            Some(meta)
        }
    }
}

/// The kept-open cgroup files and the init's pidfd need ~18 descriptors per running CT, far
/// above the 1024 soft limit systemd gives services; the soft limit is raised to the hard one
/// (524288 under systemd). Without enough descriptors CTs are read by path, correct but
/// slower.
pub(super) fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "cannot raise the open-file limit; cgroup files of many CTs will be read by path");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-file limit"),
    }
}

/// True once the process behind `pidfd` has exited.
fn exited(pidfd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Reads a run-state file anew: alive as `container::running` decides (same boot, same
/// init start time), then a pidfd on the init, whose start time is checked once more (the
/// PID could have been reused between the first check and the open).
fn read_run(path: &Path, id: FileId, boot_id: Option<&str>) -> Option<RunEntry> {
    let rs = RunState::read(path).ok().flatten()?;
    let same_init = |rs: &RunState| {
        boot_id == Some(rs.boot_id.as_str())
            && container::state::proc_starttime(rs.init_pid) == Some(rs.init_starttime)
    };
    let live = if !same_init(&rs) {
        Liveness::Dead
    } else {
        match container::state::pidfd_open(rs.init_pid) {
            Ok(fd) if same_init(&rs) => Liveness::Pidfd(fd),
            Ok(_) => Liveness::Dead,
            Err(e) => {
                debug!(pid = rs.init_pid, error = %e, "no pidfd for a CT's init; checking /proc at every scrape");
                Liveness::Check(Box::new(rs.clone()))
            }
        }
    };
    Some(RunEntry {
        id,
        started_at: rs.started_at,
        live,
    })
}

/// The CT's start time while its init runs (what `container::running` tells), through the
/// cached run state: a `stat` of the state file only when it may have changed, and one
/// `poll` of a pidfd per scrape.
fn running(env: &Env, ctid: Ctid, changed: bool, c: &mut CtCache) -> Option<u64> {
    let cache = &mut c.run;
    if changed || !c.run_checked {
        c.run_checked = true;
        let path = env.host.state_path(ctid);
        let Ok(Some(st)) = env.run_dir.stat(&path) else {
            *cache = None;
            return None;
        };
        let id = FileId::of(&st);
        if cache.as_ref().is_none_or(|e| e.id != id) {
            *cache = read_run(&path, id, env.boot_id);
        }
    }
    let e = cache.as_mut()?;
    let alive = match &e.live {
        Liveness::Dead => false,
        Liveness::Pidfd(fd) => !exited(fd),
        Liveness::Check(rs) => rs.alive(),
    };
    if !alive {
        // An init that exited stays dead; the file is rewritten by the next start.
        e.live = Liveness::Dead;
        return None;
    }
    Some(e.started_at)
}

/// The CT's shaping, if it is shaped; `nl` is the thread's rtnetlink socket, opened on first
/// use. Errors are kept for the scrape's `shaper` source status.
fn read_shaping(env: &Env, ctid: u32, nl: &mut Option<Netlink>) -> Option<CtShaping> {
    let (view, ifaces) = env.shaper?;
    let ifaces = ifaces.get(&ctid)?;
    let result = match nl {
        Some(nl) => view.read_ct(nl, ctid, ifaces),
        None => view::netlink().and_then(|n| view.read_ct(nl.insert(n), ctid, ifaces)),
    };
    match result {
        Ok(s) => Some(s),
        Err(e) => {
            let mut first = env.shaper_error.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| ErrorChain(&e).to_string());
            None
        }
    }
}

/// One CT, `None` when it has no config any more.
pub(super) fn read_ct(
    env: &Env,
    w: &mut Work,
    buf: &mut Buf,
    nl: &mut Option<Netlink>,
) -> Option<CtSnapshot> {
    let ctid = w.ctid;
    let meta = config(env, ctid, w.conf_changed, &mut w.cache.config)?;
    w.exported = true;
    let started_at = running(env, ctid, w.run_changed, &mut w.cache);
    let files = &mut w.cache.files;
    let cgroup = match env.hierarchy {
        Some(l) => {
            match read_cgroup(
                l,
                &env.host.cgroup_parent,
                ctid,
                started_at.is_some(),
                files,
                buf,
            ) {
                Ok(c) => c,
                Err(e) => {
                    // A CT stopping right now loses its cgroup between the check and the read.
                    debug!(ctid = ctid.get(), error = %e, "cgroup not read");
                    None
                }
            }
        }
        None => {
            *files = None;
            None
        }
    };
    let state = match (started_at, &cgroup) {
        (Some(_), Some(c)) if c.stats.frozen => State::Suspended,
        (Some(_), _) => State::Running,
        (None, _) if container::mounted(env.host, ctid) => State::Mounted,
        (None, _) => State::Stopped,
    };
    Some(CtSnapshot {
        ctid: ctid.get(),
        meta,
        state,
        started_at,
        cgroup,
        shaping: read_shaping(env, ctid.get(), nl),
    })
}

/// Whether the CT has a cgroup, by one directory: the one whose `cgroup.procs` the kept-open
/// files need (v1: pids, v2: the CT's own); without a pids hierarchy any controller's.
fn has_cgroup(cg: &Cgroup) -> bool {
    match cg {
        Cgroup::V1(v1) => match v1.dir(Controller::Pids) {
            Some(d) => d.is_dir(),
            None => cg.exists(),
        },
        Cgroup::V2(v2) => v2.dir().is_dir(),
    }
}

/// Through the CT's open files; a failed read (cgroup removed, perhaps recreated by a
/// restart) opens them again once. `None` when the CT has no cgroup.
pub(super) fn read_cgroup(
    hierarchy: &Hierarchy,
    parent: &str,
    ctid: Ctid,
    running: bool,
    files: &mut Option<CtFiles>,
    buf: &mut Buf,
) -> Result<Option<CgroupSnapshot>, String> {
    if let Some(f) = files {
        match f.read(buf, running) {
            Ok((stats, processes)) => return Ok(Some(CgroupSnapshot { stats, processes })),
            Err(e) => debug!(ctid = ctid.get(), error = %e, "reopening cgroup files"),
        }
    }
    *files = None;
    let cg = hierarchy
        .open(parent, ctid)
        .map_err(|e| ErrorChain(&e).to_string())?;
    if !has_cgroup(&cg) {
        return Ok(None);
    }
    // Any failure of the fast path (out of descriptors, a file that does not parse) falls
    // back to the runtime's reader, which also reports a vanished cgroup.
    match CtFiles::open(&cg).and_then(|f| {
        f.map(|mut f| f.read(buf, running).map(|r| (f, r)))
            .transpose()
    }) {
        Ok(Some((f, (stats, processes)))) => {
            *files = Some(f);
            return Ok(Some(CgroupSnapshot { stats, processes }));
        }
        Ok(None) => {}
        Err(e) => {
            debug!(ctid = ctid.get(), error = %e, "cgroup files not kept open; reading by path")
        }
    }
    let stats = cg.stats().map_err(|e| ErrorChain(&e).to_string())?;
    let procs_dir = match &cg {
        Cgroup::V1(v1) => v1.dir(Controller::Pids),
        Cgroup::V2(_) => cg.paths().into_iter().next(),
    };
    let processes = match procs_dir {
        Some(d) => count_procs(&d).map_err(|e| format!("count {}: {e}", d.display()))?,
        None => 0,
    };
    Ok(Some(CgroupSnapshot { stats, processes }))
}

/// Lines of `cgroup.procs` in `dir` and the cgroups below it (a CT running systemd makes
/// its own). A cgroup removed while walking counts as empty.
pub(super) fn count_procs(dir: &Path) -> io::Result<u64> {
    let mut n = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(s) => s.lines().filter(|l| !l.is_empty()).count() as u64,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(n),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            n += count_procs(&entry.path())?;
        }
    }
    Ok(n)
}
