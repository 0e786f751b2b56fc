//! What one scrape reads from the kernel and the state directory: CT configs (cached by
//! file identity, re-read when a file changes), run state, cgroup counters and the pinned
//! datapath maps. Nothing here is kept between scrapes except parsed configs and open
//! cgroup counter files ([`super::cgfiles`]; limits are reused for at most
//! [`super::cgfiles::LIMITS_MAX_AGE`]), so every counter is as fresh as the kernel's and
//! berthd restarts cannot move a counter.

use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use berth_runtime::{
    Ctid,
    cgroups::{Cgroup, CgroupManager, Controller, Layout, Stats},
    config::{CtConfig, Host},
    container::{self, State},
};
use tracing::{debug, warn};

use super::cgfiles::{Buf, CtFiles};
use crate::datapath::{CounterRow, Datapath, DropRow};

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

/// A config file's identity: a change of any of these means the file was rewritten
/// (`CtConfig::save` renames a new file into place, so the inode changes too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

/// Reads snapshots; holds the config cache and the last error per source (logged once, not
/// at every scrape).
#[derive(Debug)]
pub struct Reader {
    sources: Sources,
    configs: Mutex<HashMap<u32, (FileId, Arc<CtMeta>)>>,
    /// Open counter files of CTs with a cgroup, by CTID.
    cgroups: Mutex<HashMap<u32, CtFiles>>,
    last_errors: Mutex<HashMap<&'static str, String>>,
    workers: usize,
}

/// Below this many CTs the per-CT reads run on the calling thread.
const PARALLEL_FROM: usize = 64;

impl Reader {
    pub fn new(sources: Sources) -> Self {
        raise_nofile();
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        Self {
            sources,
            configs: Mutex::new(HashMap::new()),
            cgroups: Mutex::new(HashMap::new()),
            last_errors: Mutex::new(HashMap::new()),
            workers,
        }
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

    pub fn read(&self) -> Snapshot {
        let t0 = Instant::now();
        let mut snap = Snapshot::default();

        let metas = match self.read_configs() {
            Ok(m) => {
                snap.sources.configs = true;
                self.note("configs", Ok(()));
                m
            }
            Err(e) => {
                self.note("configs", Err(e));
                Vec::new()
            }
        };

        let host = &self.sources.host;
        let (layout, with_cgroup) = match Layout::detect()
            .and_then(|l| l.list_ctids(&host.cgroup_parent).map(|ids| (l, ids)))
        {
            Ok((l, ids)) => {
                snap.sources.cgroups = true;
                self.note("cgroups", Ok(()));
                let ids: BTreeSet<u32> = ids.into_iter().map(Ctid::get).collect();
                (Some(l), ids)
            }
            Err(e) => {
                self.note("cgroups", Err(e.to_string()));
                (None, BTreeSet::new())
            }
        };

        // Each CT's open files travel with it to a worker and come back; CTs without a
        // cgroup now (stopped, destroyed) leave theirs behind, which closes them.
        let mut work: Vec<(Ctid, Arc<CtMeta>, Option<CtFiles>)> = {
            let mut open = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
            let work = metas
                .iter()
                .map(|(c, m)| (*c, m.clone(), open.remove(&c.get())))
                .collect();
            open.clear();
            work
        };
        let per_ct =
            |buf: &mut Buf, (ctid, meta, files): &mut (Ctid, Arc<CtMeta>, Option<CtFiles>)| {
                let cgroup = layout
                    .as_ref()
                    .filter(|_| with_cgroup.contains(&ctid.get()));
                read_ct(host, *ctid, meta.clone(), cgroup, files, buf)
            };
        snap.cts = if work.len() < PARALLEL_FROM || self.workers == 1 {
            let mut buf = Buf::default();
            work.iter_mut().map(|w| per_ct(&mut buf, w)).collect()
        } else {
            let chunk = work.len().div_ceil(self.workers);
            std::thread::scope(|s| {
                let handles: Vec<_> = work
                    .chunks_mut(chunk)
                    .map(|part| {
                        s.spawn(|| {
                            let mut buf = Buf::default();
                            part.iter_mut()
                                .map(|w| per_ct(&mut buf, w))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().unwrap_or_default())
                    .collect()
            })
        };
        {
            let mut open = self.cgroups.lock().unwrap_or_else(|e| e.into_inner());
            open.extend(work.into_iter().filter_map(|(c, _, f)| Some((c.get(), f?))));
        }

        match self.read_network(&metas) {
            Ok(Some(n)) => {
                snap.sources.datapath = true;
                snap.network = Some(n);
                self.note("datapath", Ok(()));
            }
            Ok(None) => self.note(
                "datapath",
                Err(format!(
                    "no datapath pinned under {}",
                    self.sources.pin_dir.display()
                )),
            ),
            Err(e) => self.note("datapath", Err(e)),
        }
        snap.collect_seconds = t0.elapsed().as_secs_f64();
        snap
    }

    /// Every CT with a config, sorted by CTID. A config that cannot be parsed still names a
    /// CT (its counters are exported with empty info labels).
    fn read_configs(&self) -> Result<Vec<(Ctid, Arc<CtMeta>)>, String> {
        let host = &self.sources.host;
        let ctids = host.list_ctids().map_err(|e| e.to_string())?;
        let mut cache = self.configs.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::with_capacity(ctids.len());
        for ctid in ctids {
            let path = host.conf_path(ctid);
            let md = match fs::metadata(&path) {
                Ok(md) => md,
                // Destroyed between the listing and now.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "stat CT config");
                    continue;
                }
            };
            let id = FileId {
                ino: md.ino(),
                len: md.len(),
                mtime: md.mtime(),
                mtime_nsec: md.mtime_nsec(),
            };
            let meta = match cache.get(&ctid.get()) {
                Some((cached, meta)) if *cached == id => meta.clone(),
                _ => {
                    let meta = Arc::new(match CtConfig::load(host, ctid) {
                        Ok(c) => CtMeta {
                            name: c.name,
                            hostname: c.hostname,
                            template: c.template,
                        },
                        Err(e) => {
                            warn!(ctid = ctid.get(), error = %e, "CT config unreadable; exporting the CT without info labels");
                            CtMeta::default()
                        }
                    });
                    cache.insert(ctid.get(), (id, meta.clone()));
                    meta
                }
            };
            out.push((ctid, meta));
        }
        // Destroyed CTs leave the cache.
        let alive: BTreeSet<u32> = out.iter().map(|(c, _)| c.get()).collect();
        cache.retain(|k, _| alive.contains(k));
        Ok(out)
    }

    fn read_network(
        &self,
        metas: &[(Ctid, Arc<CtMeta>)],
    ) -> Result<Option<NetworkSnapshot>, String> {
        let Some(dp) =
            Datapath::open_pinned_readonly(&self.sources.pin_dir).map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let known: BTreeSet<u32> = metas.iter().map(|(c, _)| c.get()).collect();
        // Counters outlive CTs in the maps (billing); series of destroyed CTs must not.
        let mut counters = dp.counters().map_err(|e| e.to_string())?;
        counters.retain(|r| known.contains(&r.ctid));
        let mut drops = dp.drops().map_err(|e| e.to_string())?;
        drops.retain(|r| known.contains(&r.ctid));
        Ok(Some(NetworkSnapshot { counters, drops }))
    }
}

/// The kept-open cgroup files need ~17 descriptors per CT, far above the 1024 soft limit
/// systemd gives services; the soft limit is raised to the hard one (524288 under systemd).
/// Without enough descriptors CTs are read by path, correct but slower.
fn raise_nofile() {
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

fn read_ct(
    host: &Host,
    ctid: Ctid,
    meta: Arc<CtMeta>,
    layout: Option<&Layout>,
    files: &mut Option<CtFiles>,
    buf: &mut Buf,
) -> CtSnapshot {
    let run = container::running(host, ctid);
    let cgroup = match layout {
        Some(l) => match read_cgroup(l, &host.cgroup_parent, ctid, run.is_some(), files, buf) {
            Ok(c) => Some(c),
            Err(e) => {
                // A CT stopping right now loses its cgroup between the listing and the read.
                debug!(ctid = ctid.get(), error = %e, "cgroup not read");
                None
            }
        },
        None => {
            *files = None;
            None
        }
    };
    let state = match (&run, &cgroup) {
        (Some(_), Some(c)) if c.stats.frozen => State::Suspended,
        (Some(_), _) => State::Running,
        (None, _) if container::state::is_mount_point(&host.root_dir(ctid)) => State::Mounted,
        (None, _) => State::Stopped,
    };
    CtSnapshot {
        ctid: ctid.get(),
        meta,
        state,
        started_at: run.map(|r| r.started_at),
        cgroup,
    }
}

/// Through the CT's open files; a failed read (cgroup removed, perhaps recreated by a
/// restart) opens them again once.
fn read_cgroup(
    layout: &Layout,
    parent: &str,
    ctid: Ctid,
    running: bool,
    files: &mut Option<CtFiles>,
    buf: &mut Buf,
) -> Result<CgroupSnapshot, String> {
    if let Some(f) = files {
        match f.read(buf, running) {
            Ok((stats, processes)) => return Ok(CgroupSnapshot { stats, processes }),
            Err(e) => debug!(ctid = ctid.get(), error = %e, "reopening cgroup files"),
        }
    }
    *files = None;
    let cg = layout.open(parent, ctid).map_err(|e| e.to_string())?;
    // Any failure of the fast path (out of descriptors, a file that does not parse) falls
    // back to the runtime's reader, which also reports a vanished cgroup.
    match CtFiles::open(&cg).and_then(|f| {
        f.map(|mut f| f.read(buf, running).map(|r| (f, r)))
            .transpose()
    }) {
        Ok(Some((f, (stats, processes)))) => {
            *files = Some(f);
            return Ok(CgroupSnapshot { stats, processes });
        }
        Ok(None) => {}
        Err(e) => {
            debug!(ctid = ctid.get(), error = %e, "cgroup files not kept open; reading by path")
        }
    }
    let stats = cg.stats().map_err(|e| e.to_string())?;
    let procs_dir = match &cg {
        Cgroup::V1(v1) => v1.dir(Controller::Pids),
        Cgroup::V2(_) => cg.paths().into_iter().next(),
    };
    let processes = match procs_dir {
        Some(d) => count_procs(&d).map_err(|e| format!("count {}: {e}", d.display()))?,
        None => 0,
    };
    Ok(CgroupSnapshot { stats, processes })
}

/// Lines of `cgroup.procs` in `dir` and the cgroups below it (a CT running systemd makes
/// its own). A cgroup removed while walking counts as empty.
fn count_procs(dir: &Path) -> io::Result<u64> {
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

#[cfg(test)]
mod tests {
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
        assert_eq!(r.configs.lock().unwrap().len(), 1);
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
