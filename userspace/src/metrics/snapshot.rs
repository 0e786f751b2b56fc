//! What one scrape reads from the kernel and the state directory: CT configs (cached by
//! file identity, re-read when a file changes), run state, cgroup counters and the pinned
//! datapath maps. Nothing here is kept between scrapes except parsed configs and run states
//! (re-read when inotify reports their file changed, [`super::watch`]; an init's liveness is
//! checked at every scrape through a pidfd) and open cgroup counter files
//! ([`super::cgfiles`]; limits are reused for at most [`super::cgfiles::LIMITS_MAX_AGE`]), so
//! every counter is as fresh as the kernel's and berthd restarts cannot move a counter.

use std::{
    collections::{BTreeSet, HashMap},
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use berth_runtime::{
    Ctid,
    cgroups::{Hierarchy, Stats},
    config::Host,
    container::{self, State, state::RunState},
    error_chain::ErrorChain,
};
use nix::{fcntl::AtFlags, sys::stat::FileStat};
use tracing::{debug, warn};

use super::{
    cgfiles::{Buf, CtFiles},
    per_ct::{Env, file_suffix, raise_nofile, read_ct},
    watch::{Changes, DirWatch},
};
use crate::{
    datapath::{CounterRow, DatapathView, DropRow},
    shaper::view::{CtShaping, ShaperView},
};

/// Where berthd reads from.
#[derive(Debug, Clone)]
pub struct Sources {
    pub host: Host,
    /// The datapath's pin directory (`berth::datapath::DEFAULT_PIN_DIR` unless told otherwise).
    pub pin_dir: PathBuf,
}

/// What a CT's config says about it (labels of `berth_container_info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtMeta {
    pub name: Option<String>,
    pub hostname: Option<String>,
    /// Empty when the config could not be read.
    pub template: String,
}

/// A CT's cgroup counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupSnapshot {
    pub stats: Stats,
    /// Thread groups (cgroup.procs lines, child cgroups included).
    pub processes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CtSnapshot {
    pub ctid: u32,
    pub meta: Arc<CtMeta>,
    pub state: State,
    /// Unix time of the start, while running.
    pub started_at: Option<u64>,
    /// `None` while the CT has no cgroup (stopped or mounted) or it could not be read.
    pub cgroup: Option<CgroupSnapshot>,
    /// `None` while the CT is not shaped (or the shaper could not be read).
    pub shaping: Option<CtShaping>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkSnapshot {
    pub counters: Vec<CounterRow>,
    pub drops: Vec<DropRow>,
}

/// Whether each source could be read in this scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceStatus {
    pub configs: bool,
    pub cgroups: bool,
    pub datapath: bool,
    /// The shaper's state was read, or there is none (no CT was ever shaped).
    pub shaper: bool,
}

/// One scrape's worth of data. CTs are sorted by CTID; network rows only of those CTs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub cts: Vec<CtSnapshot>,
    /// `None` when no datapath is pinned (or it could not be read).
    pub network: Option<NetworkSnapshot>,
    pub sources: SourceStatus,
    pub collect_seconds: f64,
}

/// A file's identity: a change of any of these means the file was rewritten (configs and
/// run states are written to a new file renamed into place, so the inode changes too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    pub(super) ino: u64,
    pub(super) len: u64,
    pub(super) mtime: i64,
    pub(super) mtime_nsec: i64,
}

impl FileId {
    pub(super) fn of(st: &FileStat) -> Self {
        Self {
            ino: st.st_ino,
            len: st.st_size as u64,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
        }
    }
}

/// A directory opened for `fstatat` of the files in it: one path component to resolve per
/// file instead of the whole path (two files per CT and scrape: config and run state).
pub(super) struct Dir {
    pub(super) path: PathBuf,
    pub(super) fd: Option<OwnedFd>,
}

impl Dir {
    pub(super) fn open(path: PathBuf) -> io::Result<Self> {
        use nix::{fcntl::OFlag, sys::stat::Mode};
        match nix::fcntl::open(
            &path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Self { path, fd: Some(fd) }),
            Err(nix::errno::Errno::ENOENT) => Ok(Self { path, fd: None }),
            Err(e) => Err(io::Error::from(e)),
        }
    }

    /// `stat` of `file` (a path whose parent is this directory); `None` when it does not
    /// exist.
    pub(super) fn stat(&self, file: &Path) -> io::Result<Option<FileStat>> {
        let Some(fd) = &self.fd else { return Ok(None) };
        let name = match file.parent() {
            Some(p) if p == self.path => file.file_name().map(Path::new).unwrap_or(file),
            _ => file,
        };
        match nix::sys::stat::fstatat(fd, name, AtFlags::empty()) {
            Ok(st) => Ok(Some(st)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }
}

/// Whether a CT's init was alive when its run-state file was last read, and how to tell it
/// still is.
#[derive(Debug)]
pub(super) enum Liveness {
    Dead,
    /// A pidfd on the init: readable once it exits (zombies included), one `poll` per scrape
    /// instead of re-reading the state file, the boot id and `/proc/<pid>/stat`.
    Pidfd(OwnedFd),
    /// No pidfd could be opened: [`RunState::alive`] at every scrape.
    Check(Box<RunState>),
}

/// A CT's run-state file as last read.
#[derive(Debug)]
pub(super) struct RunEntry {
    pub(super) id: FileId,
    pub(super) started_at: u64,
    pub(super) live: Liveness,
}

/// What is kept per CT between scrapes: its parsed config and run state (re-read when their
/// file changes) and its open cgroup counter files.
#[derive(Debug, Default)]
pub(super) struct CtCache {
    pub(super) config: Option<(FileId, Arc<CtMeta>)>,
    pub(super) files: Option<CtFiles>,
    pub(super) run: Option<RunEntry>,
    /// `run` tells the run-state file as last seen (`None`: there was none).
    pub(super) run_checked: bool,
}

/// One CT's share of a scrape, handed to a worker with its cache and returned.
pub(super) struct Work {
    pub(super) ctid: Ctid,
    pub(super) cache: CtCache,
    /// Whether the CT still had a config when its worker looked.
    pub(super) exported: bool,
    /// Its config / run-state file may have changed since the last scrape.
    pub(super) conf_changed: bool,
    pub(super) run_changed: bool,
}

/// Reads snapshots; holds the per-CT caches and the last error per source (logged once, not
/// at every scrape).
#[derive(Debug)]
pub struct Reader {
    sources: Sources,
    /// Per-CT state of CTs with a config, by CTID.
    cts: Mutex<HashMap<u32, CtCache>>,
    last_errors: Mutex<HashMap<&'static str, String>>,
    workers: usize,
    /// This boot's id (a run state from another boot is stale); read once.
    boot_id: Option<String>,
    watches: Mutex<Watches>,
}

/// Change notification for the config and run directories, and the CTs with a config.
#[derive(Debug)]
struct Watches {
    conf: DirWatch,
    run: DirWatch,
    /// CTs with a config, sorted, as of the last scrape.
    ctids: Vec<Ctid>,
}

/// CTs per unit of work handed to a worker: small enough to balance the threads, large
/// enough that claiming a batch costs nothing.
const BATCH: usize = 32;

/// What [`Reader::collect`] returns.
pub(crate) struct Collected<S, M> {
    /// One sink per batch of CTs, in CTID order.
    pub batches: Vec<S>,
    /// What the calling thread's own work returned.
    pub main: M,
    /// The CTs read (those with a config), sorted by CTID.
    pub cts: Vec<(u32, Arc<CtMeta>)>,
    pub configs: bool,
    pub cgroups: bool,
    /// The shaper was read (or none is pinned: no CT is shaped).
    pub shaper: bool,
}

impl Reader {
    pub fn new(sources: Sources) -> Self {
        raise_nofile();
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        Self {
            cts: Mutex::new(HashMap::new()),
            last_errors: Mutex::new(HashMap::new()),
            workers,
            boot_id: container::state::boot_id(),
            watches: Mutex::new(Watches {
                conf: DirWatch::new(
                    sources.host.conf_dir(),
                    file_suffix(|c| sources.host.conf_path(c)),
                ),
                run: DirWatch::new(
                    sources.host.run.clone(),
                    file_suffix(|c| sources.host.state_path(c)),
                ),
                ctids: Vec::new(),
            }),
            sources,
        }
    }

    /// The CTs with a config and which of their configs and run states may have changed: a
    /// full listing when anything may have, else the listing of the last scrape updated by
    /// the configs created or removed since.
    fn changes(&self, conf: &Dir) -> Result<(Vec<Ctid>, Changes, Changes), String> {
        let mut w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let conf_changes = w.conf.changes();
        let run_changes = w.run.changes();
        match &conf_changes {
            Changes::All => match self.sources.host.list_ctids() {
                Ok(ids) => w.ctids = ids,
                Err(e) => {
                    w.conf.force_full();
                    return Err(ErrorChain(&e).to_string());
                }
            },
            Changes::Some(changed) => {
                for c in changed.iter().filter_map(|c| Ctid::new(*c).ok()) {
                    let exists = conf
                        .stat(&self.sources.host.conf_path(c))
                        .map_err(|e| format!("{}: {e}", conf.path.display()))?
                        .is_some();
                    match (w.ctids.binary_search(&c), exists) {
                        (Err(i), true) => w.ctids.insert(i, c),
                        (Ok(i), false) => {
                            w.ctids.remove(i);
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok((w.ctids.clone(), conf_changes, run_changes))
    }

    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Logs a source's failure when it is new, and its recovery.
    fn note(&self, source: &'static str, result: Result<(), String>) {
        let mut last = self.last_errors.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => {
                if last.remove(source).is_some() {
                    warn!(source, "source readable again");
                }
            }
            Err(msg) => {
                if last.get(source) != Some(&msg) {
                    warn!(source, error = %msg, "cannot read source; its series are left out");
                    last.insert(source, msg);
                }
            }
        }
    }

    /// One scrape's worth of data.
    pub fn read(&self) -> Snapshot {
        let t0 = Instant::now();
        let c = self.collect(
            Vec::new,
            |v: &mut Vec<CtSnapshot>, ct| v.push(ct),
            || self.network(),
        );
        let known: BTreeSet<u32> = c.cts.iter().map(|(c, _)| *c).collect();
        let network = c.main.map(|mut n| {
            // Counters outlive CTs in the maps (billing); series of destroyed CTs must not.
            n.counters.retain(|r| known.contains(&r.ctid));
            n.drops.retain(|r| known.contains(&r.ctid));
            n
        });
        Snapshot {
            cts: c.batches.into_iter().flatten().collect(),
            sources: SourceStatus {
                configs: c.configs,
                cgroups: c.cgroups,
                datapath: network.is_some(),
                shaper: c.shaper,
            },
            network,
            collect_seconds: t0.elapsed().as_secs_f64(),
        }
    }

    /// The scrape's skeleton, shared by [`Self::read`] and the text writer
    /// ([`super::expose::scrape`]): lists the CTs with a config, then reads them in batches
    /// on a few threads, each batch's snapshots handed to `per_ct` with that batch's sink
    /// (made by `new_sink`), while the calling thread runs `main` (the datapath maps) and
    /// then helps with the batches. A scrape keeps both CPUs of a small host busy: the CTs'
    /// files are most of the work, and the rest overlaps with them.
    pub(crate) fn collect<S: Send, M>(
        &self,
        new_sink: impl Fn() -> S + Sync,
        per_ct: impl Fn(&mut S, CtSnapshot) + Sync,
        main: impl FnOnce() -> M,
    ) -> Collected<S, M> {
        let t0 = Instant::now();
        let host = &self.sources.host;
        let listed = Dir::open(host.conf_dir())
            .map_err(|e| format!("opening {}: {e}", host.conf_dir().display()))
            .and_then(|conf| {
                let (ctids, conf_changes, run_changes) = self.changes(&conf)?;
                Ok((ctids, conf, conf_changes, run_changes))
            });
        let (ctids, conf_dir, conf_changes, run_changes) = match listed {
            Ok((ids, conf, cc, rc)) => {
                self.note("configs", Ok(()));
                (ids, Some(conf), cc, rc)
            }
            Err(e) => {
                self.note("configs", Err(e));
                (Vec::new(), None, Changes::All, Changes::All)
            }
        };
        // No run directory yet means no CT has been started: none runs.
        let run_dir = Dir::open(host.run.clone()).unwrap_or_else(|e| {
            debug!(dir = %host.run.display(), error = %e, "run directory unreadable");
            Dir {
                path: host.run.clone(),
                fd: None,
            }
        });
        let hierarchy = match Hierarchy::detect() {
            Ok(h) => {
                self.note("cgroups", Ok(()));
                Some(h)
            }
            Err(e) => {
                self.note("cgroups", Err(ErrorChain(&e).to_string()));
                None
            }
        };
        // Which CTs are shaped, from the shaper's map; their classes are dumped per CT on
        // the worker threads (one rtnetlink round trip per shaped direction).
        let shaper = match ShaperView::open_pinned(&self.sources.pin_dir) {
            Ok(Some(v)) => {
                let ifaces = v.interfaces();
                Ok(Some((v, ifaces)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ErrorChain(&e).to_string()),
        };
        let shaper_error: Mutex<Option<String>> = Mutex::new(None);
        let t_list = t0.elapsed();

        // Each CT's cache travels with it to a worker and comes back; CTs without a config
        // any more leave theirs behind, which closes their files.
        let mut work: Vec<Work> = {
            let mut kept = self.cts.lock().unwrap_or_else(|e| e.into_inner());
            let work = ctids
                .iter()
                .map(|c| Work {
                    ctid: *c,
                    cache: kept.remove(&c.get()).unwrap_or_default(),
                    exported: false,
                    conf_changed: conf_changes.contains(c.get()),
                    run_changed: run_changes.contains(c.get()),
                })
                .collect();
            kept.clear();
            work
        };
        let env = Env {
            host,
            boot_id: self.boot_id.as_deref(),
            conf_dir: conf_dir.as_ref(),
            run_dir: &run_dir,
            hierarchy: hierarchy.as_ref(),
            shaper: shaper.as_ref().ok().and_then(Option::as_ref),
            shaper_error: &shaper_error,
        };
        let batches: Vec<Mutex<(&mut [Work], Option<S>)>> = work
            .chunks_mut(BATCH)
            .map(|b| Mutex::new((b, None)))
            .collect();
        let next = AtomicUsize::new(0);
        // Claims batches until none is left; `buf` is the thread's read buffer.
        let drain = |buf: &mut Buf| {
            let mut nl = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(slot) = batches.get(i) else { break };
                let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                let (cts, sink) = &mut *slot;
                let mut s = new_sink();
                for w in cts.iter_mut() {
                    if let Some(ct) = read_ct(&env, w, buf, &mut nl) {
                        per_ct(&mut s, ct);
                    }
                }
                *sink = Some(s);
            }
        };
        let helpers = if batches.len() > 1 {
            self.workers - 1
        } else {
            0
        };
        let (main_out, t_main) = std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|| drain(&mut Buf::default()));
            }
            let m = main();
            let t_main = t0.elapsed();
            drain(&mut Buf::default());
            (m, t_main)
        });
        let batches: Vec<S> = batches
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(|e| e.into_inner())
                    .1
                    .unwrap_or_else(&new_sink)
            })
            .collect();
        let mut cts = Vec::with_capacity(work.len());
        {
            let mut kept = self.cts.lock().unwrap_or_else(|e| e.into_inner());
            for w in work.into_iter().filter(|w| w.exported) {
                if let Some((_, meta)) = &w.cache.config {
                    cts.push((w.ctid.get(), meta.clone()));
                }
                kept.insert(w.ctid.get(), w.cache);
            }
        }
        debug!(
            cts = cts.len(),
            threads = helpers + 1,
            list = ?t_list,
            main = ?t_main,
            all = ?t0.elapsed(),
            "collected"
        );
        let shaper_result = match (shaper, shaper_error.into_inner()) {
            (Err(e), _) | (Ok(_), Ok(Some(e))) => Err(e),
            (Ok(_), _) => Ok(()),
        };
        let shaper_ok = shaper_result.is_ok();
        self.note("shaper", shaper_result);
        Collected {
            batches,
            main: main_out,
            cts,
            configs: conf_dir.is_some(),
            cgroups: hierarchy.is_some(),
            shaper: shaper_ok,
        }
    }

    /// The datapath's counters of every CTID in the maps; `None` (logged) when nothing is
    /// pinned or the maps cannot be read.
    pub(crate) fn network(&self) -> Option<NetworkSnapshot> {
        match self.read_network() {
            Ok(Some(n)) => {
                self.note("datapath", Ok(()));
                Some(n)
            }
            Ok(None) => {
                self.note(
                    "datapath",
                    Err(format!(
                        "no datapath pinned under {}",
                        self.sources.pin_dir.display()
                    )),
                );
                None
            }
            Err(e) => {
                self.note("datapath", Err(e));
                None
            }
        }
    }

    fn read_network(&self) -> Result<Option<NetworkSnapshot>, String> {
        let Some(dp) = DatapathView::open_pinned(&self.sources.pin_dir)
            .map_err(|e| ErrorChain(&e).to_string())?
        else {
            return Ok(None);
        };
        let counters = dp.counters().map_err(|e| ErrorChain(&e).to_string())?;
        let drops = dp.drops().map_err(|e| ErrorChain(&e).to_string())?;
        Ok(Some(NetworkSnapshot { counters, drops }))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use berth_runtime::config::CtConfig;

    use super::super::per_ct::{count_procs, read_cgroup};
    use super::*;

    fn reader(dir: &Path) -> Reader {
        let host = Host::new(
            Some(dir.join("root")),
            None,
            Some(format!("berth-unit-{}", std::process::id())),
        )
        .unwrap();
        Reader::new(Sources {
            host,
            pin_dir: dir.join("no-bpffs"),
        })
    }

    #[test]
    fn no_state_dir_is_an_empty_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let snap = reader(dir.path()).read();
        assert!(snap.cts.is_empty());
        assert!(snap.network.is_none());
        assert!(snap.sources.configs);
        assert!(!snap.sources.datapath);
    }

    #[test]
    fn configs_are_cached_reloaded_on_change_and_forgotten_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path());
        let host = r.sources().host.clone();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(101).unwrap();
        let mut cfg = CtConfig::new(ctid, "busybox".into());
        cfg.name = Some("web".into());
        cfg.save(&host).unwrap();
        fs::write(host.conf_path(Ctid::new(102).unwrap()), "not toml [").unwrap();

        let snap = r.read();
        assert_eq!(snap.cts.len(), 2);
        assert_eq!(snap.cts[0].meta.name.as_deref(), Some("web"));
        assert_eq!(snap.cts[0].state, State::Stopped);
        assert!(snap.cts[0].cgroup.is_none());
        assert_eq!(*snap.cts[1].meta, CtMeta::default());
        let first = snap.cts[0].meta.clone();
        assert!(Arc::ptr_eq(&first, &r.read().cts[0].meta), "cached");

        cfg.name = Some("db".into());
        cfg.save(&host).unwrap();
        assert_eq!(r.read().cts[0].meta.name.as_deref(), Some("db"));

        fs::remove_file(host.conf_path(ctid)).unwrap();
        let snap = r.read();
        assert_eq!(snap.cts.iter().map(|c| c.ctid).collect::<Vec<_>>(), [102]);
        assert_eq!(r.cts.lock().unwrap().len(), 1);
    }

    /// Run states: a live init makes the CT running (its start time exported); a rewritten
    /// state file is read again; a removed one makes it stopped.
    #[test]
    fn run_states_follow_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let r = reader(dir.path());
        let host = r.sources().host.clone();
        host.ensure_dirs().unwrap();
        let ctid = Ctid::new(103).unwrap();
        CtConfig::new(ctid, "busybox".into()).save(&host).unwrap();
        assert_eq!(r.read().cts[0].state, State::Stopped);

        // This test process stands in for the CT's init.
        let me = std::process::id() as i32;
        // From JSON: optional fields keep their defaults whatever the struct gains.
        let mut rs: RunState = serde_json::from_value(serde_json::json!({
            "init_pid": me,
            "init_starttime": container::state::proc_starttime(me).unwrap(),
            "monitor_pid": me,
            "boot_id": container::state::boot_id().unwrap(),
            "started_at": 1_700_000_000u64,
            "mounted_by_start": false,
        }))
        .unwrap();
        rs.write(&host.state_path(ctid)).unwrap();
        let ct = &r.read().cts[0];
        assert_eq!(
            (ct.state, ct.started_at),
            (State::Running, Some(1_700_000_000))
        );
        assert_eq!(r.read().cts[0].state, State::Running, "cached");

        // Another init (a start time that is not this process's): not running.
        rs.init_starttime += 1;
        rs.write(&host.state_path(ctid)).unwrap();
        assert_eq!(r.read().cts[0].state, State::Stopped);
        rs.init_starttime -= 1;
        rs.started_at += 60;
        rs.write(&host.state_path(ctid)).unwrap();
        assert_eq!(r.read().cts[0].started_at, Some(1_700_000_060));

        fs::remove_file(host.state_path(ctid)).unwrap();
        assert_eq!(r.read().cts[0].state, State::Stopped);
    }

    /// A source's error text is what berthd logs; the runtime's errors leave their cause to
    /// `source()`, so the text must carry the chain, each cause once.
    #[test]
    fn a_failed_cgroup_read_keeps_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let ct = dir.path().join("p/5");
        // A directory where a counter file belongs: reading it fails with EISDIR.
        fs::create_dir_all(ct.join("memory.current")).unwrap();
        fs::write(ct.join("cgroup.procs"), "").unwrap();
        let hierarchy = Hierarchy::V2(dir.path().to_path_buf());
        let ctid = Ctid::new(5).unwrap();
        let e =
            read_cgroup(&hierarchy, "p", ctid, true, &mut None, &mut Buf::default()).unwrap_err();
        assert_eq!(
            e,
            format!(
                "read memory.current in {}: Is a directory (os error 21)",
                ct.display()
            )
        );
    }

    #[test]
    fn counts_procs_in_child_directories() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.procs"), "1\n2\n").unwrap();
        fs::create_dir(dir.path().join("init.scope")).unwrap();
        fs::write(dir.path().join("init.scope/cgroup.procs"), "3\n").unwrap();
        assert_eq!(count_procs(dir.path()).unwrap(), 3);
        assert_eq!(count_procs(&dir.path().join("gone")).unwrap(), 0);
    }
}
