//! The CT lifecycle: create, start, stop, destroy, mount, suspend, set, status, gc.
//!
//! Start clones the CT's init in new pid/mnt/uts/ipc/net/cgroup (+user) namespaces from a small
//! per-CT monitor process. The monitor holds the console pty (logging it to
//! `<run>/<CTID>.console.log`) and reaps init; berth itself exits once init has exec'd, so the CT
//! keeps running with no berth command alive.

pub mod exec;
pub mod init;
pub mod state;

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::{ForkResult, Pid, fork, pipe2};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::cgroups::{self, CgroupManager, Resources};
use crate::config::{ConfigError, CtConfig, Host, PrivateLayout, ResourceConfig, UserNs};
use crate::ctid::{Ctid, validate_name};
use crate::lock::{CtLock, LockError};
use crate::net::{self, HostNet, LinkTeardown, NetError, NetState};
use crate::template::TemplateStore;
use state::RunState;

/// How long a command waits for another command on the same CT to finish.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CtError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("CT {ctid}: {source}")]
    Cgroup {
        ctid: Ctid,
        #[source]
        source: cgroups::CgroupError,
    },
    #[error(transparent)]
    Template(#[from] crate::template::TemplateError),
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaError),
    #[error("CT {ctid}: {op} {path}: {source}")]
    Io {
        ctid: Ctid,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("CT {ctid}: {op}: {errno}")]
    Sys {
        ctid: Ctid,
        op: &'static str,
        errno: nix::errno::Errno,
    },
    #[error("CT {0} is not running")]
    NotRunning(Ctid),
    #[error("CT {0} is already running")]
    AlreadyRunning(Ctid),
    #[error("CT {0} is running: stop it first")]
    Running(Ctid),
    #[error("CT {0} is suspended: resume it first")]
    Suspended(Ctid),
    #[error("CT {ctid} failed to start: {msg}")]
    StartFailed { ctid: Ctid, msg: String },
    #[error("CT {ctid}: {msg}")]
    Invalid { ctid: Ctid, msg: String },
    #[error("CT {0} is stopped: use --save to change its stored config")]
    NeedSave(Ctid),
    #[error("CT {ctid}: {source}")]
    Net {
        ctid: Ctid,
        #[source]
        source: NetError,
    },
}

type Result<T, E = CtError> = std::result::Result<T, E>;

fn io_err<'a>(
    ctid: Ctid,
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CtError + 'a {
    move |source| CtError::Io {
        ctid,
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn cg_err(ctid: Ctid) -> impl FnOnce(cgroups::CgroupError) -> CtError {
    move |source| CtError::Cgroup { ctid, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Suspended,
    Mounted,
    Stopped,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Suspended => "suspended",
            State::Mounted => "mounted",
            State::Stopped => "stopped",
        })
    }
}

/// What `berth status --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub ctid: Ctid,
    pub name: Option<String>,
    pub hostname: Option<String>,
    pub template: String,
    pub state: State,
    pub init_pid: Option<i32>,
    pub config_path: PathBuf,
    pub root_path: PathBuf,
    pub private_path: PathBuf,
    pub console_log: PathBuf,
    /// Interfaces with host-side names, addresses and mode (as set up when running, as
    /// configured otherwise).
    pub net: NetState,
}

/// Options of `berth create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOpts {
    pub template: String,
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub userns: bool,
    /// Full copy instead of an overlay over the template (always with `userns`).
    pub copy: bool,
}

/// Changes of `berth set`; `None`/empty = unchanged.
#[derive(Debug, Clone, Default)]
pub struct SetOpts {
    pub hostname: Option<String>,
    pub name: Option<String>,
    pub resources: ResourceConfig,
    /// `--ipadd`: routed (venet) addresses to add.
    pub ipadd: Vec<std::net::IpAddr>,
    /// `--ipdel ADDR|all`.
    pub ipdel: Option<net::AddrSelection>,
    /// `--netif_add`: bridged interfaces to add.
    pub netif_add: Vec<net::BridgedIface>,
    /// `--netif_del eth<N>|all`: `Some(None)` = all.
    pub netif_del: Option<Option<String>>,
    /// `--nameserver` (replaces the list when given).
    pub nameservers: Vec<std::net::IpAddr>,
    /// `--searchdomain` (replaces the list when given).
    pub searchdomains: Vec<String>,
    /// The CT's new shaping table (validated by the caller), stored with `save`; `Some(empty)`
    /// removes it. Applying it to a running CT is the caller's (the shaper's) job.
    pub shaping: Option<toml::Table>,
}

impl SetOpts {
    fn net_changes(&self) -> bool {
        !self.ipadd.is_empty()
            || self.ipdel.is_some()
            || !self.netif_add.is_empty()
            || self.netif_del.is_some()
            || !self.nameservers.is_empty()
            || !self.searchdomains.is_empty()
    }
}

/// The CT's network config after `set`'s changes, validated (nothing is applied yet).
fn merged_net(ctid: Ctid, cur: &net::NetConfig, o: &SetOpts) -> Result<net::NetConfig> {
    use net::{AddrSelection, Iface, RoutedIface};
    let invalid = |msg: String| CtError::Invalid { ctid, msg };
    let mut n = cur.clone();
    let routed_pos =
        |n: &net::NetConfig| n.ifaces.iter().position(|i| matches!(i, Iface::Routed(_)));
    match &o.ipdel {
        None => {}
        Some(AddrSelection::All) => n.ifaces.retain(|i| !matches!(i, Iface::Routed(_))),
        Some(AddrSelection::Some(list)) => {
            let Some(p) = routed_pos(&n) else {
                return Err(invalid(format!(
                    "--ipdel {}: the CT has no routed addresses",
                    list[0]
                )));
            };
            if let Iface::Routed(r) = &mut n.ifaces[p] {
                for a in list {
                    let before = r.addrs.len();
                    r.addrs.retain(|x| x != a);
                    if r.addrs.len() == before {
                        return Err(invalid(format!("--ipdel {a}: the CT has no such address")));
                    }
                }
                if r.addrs.is_empty() {
                    n.ifaces.remove(p);
                }
            }
        }
    }
    if !o.ipadd.is_empty() {
        let p = match routed_pos(&n) {
            Some(p) => p,
            None => {
                n.ifaces.insert(0, Iface::Routed(RoutedIface::default()));
                0
            }
        };
        if let Iface::Routed(r) = &mut n.ifaces[p] {
            for a in &o.ipadd {
                if r.addrs.contains(a) {
                    return Err(invalid(format!(
                        "--ipadd {a}: the CT has this address already"
                    )));
                }
                r.addrs.push(*a);
            }
        }
    }
    match &o.netif_del {
        None => {}
        Some(None) => n.ifaces.retain(|i| !matches!(i, Iface::Bridged(_))),
        Some(Some(name)) => {
            let before = n.ifaces.len();
            n.ifaces
                .retain(|i| !matches!(i, Iface::Bridged(b) if &b.name == name));
            if n.ifaces.len() == before {
                return Err(invalid(format!(
                    "--netif_del {name}: the CT has no such interface"
                )));
            }
        }
    }
    for b in &o.netif_add {
        n.ifaces.push(Iface::Bridged(b.clone()));
    }
    if !o.nameservers.is_empty() {
        n.nameservers = o.nameservers.clone();
    }
    if !o.searchdomains.is_empty() {
        n.searchdomains = o.searchdomains.clone();
    }
    n.validate(ctid).map_err(net_err(ctid))?;
    Ok(n)
}

/// The network config as it is live: unsaved `set` changes on a running CT are part of it.
fn live_net(cfg: &net::NetConfig, run: Option<&RunState>) -> net::NetConfig {
    use net::{Iface, RoutedIface};
    let Some(state) = run.and_then(|r| r.net.as_ref()) else {
        return cfg.clone();
    };
    let mut n = cfg.clone();
    let live: Vec<std::net::IpAddr> = state
        .ifaces
        .iter()
        .filter(|i| i.mode == net::Mode::Routed)
        .flat_map(|i| i.addrs.iter().map(|a| a.addr()))
        .collect();
    n.ifaces.retain(|i| !matches!(i, Iface::Routed(_)));
    if !live.is_empty() {
        n.ifaces
            .insert(0, Iface::Routed(RoutedIface { addrs: live }));
    }
    let live_bridged: Vec<&net::IfaceState> = state
        .ifaces
        .iter()
        .filter(|i| i.mode == net::Mode::Bridged)
        .collect();
    n.ifaces.retain(
        |i| !matches!(i, Iface::Bridged(b) if !live_bridged.iter().any(|l| l.ct_ifname == b.name)),
    );
    // Interfaces added live without --save: known from the run state only.
    for l in live_bridged {
        let saved = n
            .ifaces
            .iter()
            .any(|i| matches!(i, Iface::Bridged(b) if b.name == l.ct_ifname));
        if !saved {
            n.ifaces
                .push(Iface::Bridged(l.bridged.clone().unwrap_or_else(|| {
                    // A state written before the settings were recorded: what it has.
                    let mut b = net::BridgedIface::new(l.ct_ifname.clone());
                    b.mac = l.ct_mac;
                    b.host_ifname = Some(l.host_ifname.clone());
                    b.host_mac = l.host_mac;
                    b.bridge = l.bridge.clone();
                    b.vlan = l.vlan;
                    b.addrs = l.addrs.clone();
                    b
                })));
        }
    }
    n
}

/// Applies a network change to a running CT, keeping its recorded state in step.
fn apply_net_live(
    ctid: Ctid,
    st: &mut RunState,
    newcfg: &net::NetConfig,
    o: &SetOpts,
    hooks: &mut dyn NetHooks,
) -> Result<()> {
    let ns = open_ns(ctid, st.init_pid)?;
    let mut hn = HostNet::current().map_err(net_err(ctid))?;
    let mut state = st.net.clone().unwrap_or_else(|| NetState::new(ctid));
    let mut gone = NetState::new(ctid);
    if let Some(sel) = &o.ipdel {
        let before = state.clone();
        for e in net::del_addrs(ctid, Some(ns.as_fd()), sel, &mut hn, &mut state)
            .map_err(net_err(ctid))?
        {
            warn!(%ctid, error = %e, "--ipdel");
        }
        // The routed link stays with no address; the datapath just loses the addresses.
        let _ = before;
    }
    if let Some(which) = &o.netif_del {
        let names: Vec<String> = state
            .ifaces
            .iter()
            .filter(|i| {
                i.mode == net::Mode::Bridged && which.as_ref().is_none_or(|n| &i.ct_ifname == n)
            })
            .map(|i| i.ct_ifname.clone())
            .collect();
        gone.ifaces = state
            .ifaces
            .iter()
            .filter(|i| names.contains(&i.ct_ifname) && i.mode == net::Mode::Bridged)
            .cloned()
            .collect();
        hooks.net_down(ctid, &gone);
        for e in
            net::del_netif(ctid, which.as_deref(), &mut hn, &mut state).map_err(net_err(ctid))?
        {
            warn!(%ctid, error = %e, "--netif_del");
        }
    }
    if !o.ipadd.is_empty() {
        net::add_addrs(ctid, ns.as_fd(), newcfg, &o.ipadd, &mut hn, &mut state)
            .map_err(net_err(ctid))?;
    }
    for b in &o.netif_add {
        net::add_netif(ctid, ns.as_fd(), b, &mut hn, &mut state).map_err(net_err(ctid))?;
    }
    st.net = Some(state.clone());
    hooks
        .net_up(ctid, &state)
        .map_err(|msg| CtError::Invalid { ctid, msg })?;
    Ok(())
}

fn cgroup(host: &Host, ctid: Ctid) -> Result<cgroups::Cgroup> {
    cgroups::open(&host.cgroup_parent, ctid).map_err(cg_err(ctid))
}

fn resources_of(r: &ResourceConfig) -> Resources {
    Resources {
        memory: r.memory,
        swap: r.swap,
        cpuunits: r.cpuunits,
        cpulimit: r.cpulimit,
        cpus: r.cpus,
        numproc: r.numproc,
        ioweight: r.ioweight,
    }
}

/// The live run state, if the CT's init is running.
pub fn running(host: &Host, ctid: Ctid) -> Option<RunState> {
    RunState::read(&host.state_path(ctid))
        .ok()
        .flatten()
        .filter(RunState::alive)
}

pub fn status(host: &Host, ctid: Ctid) -> Result<Status> {
    let cfg = CtConfig::load(host, ctid)?;
    let run = running(host, ctid);
    let state = match &run {
        Some(_) => {
            if cgroup(host, ctid)?.is_frozen().unwrap_or(false) {
                State::Suspended
            } else {
                State::Running
            }
        }
        None if state::is_mount_point(&host.root_dir(ctid)) => State::Mounted,
        None => State::Stopped,
    };
    Ok(Status {
        ctid,
        name: cfg.name,
        hostname: cfg.hostname,
        template: cfg.template,
        state,
        init_pid: run.as_ref().map(|r| r.init_pid),
        net: run
            .and_then(|r| r.net)
            .unwrap_or_else(|| NetState::expected(ctid, &cfg.net)),
        config_path: host.conf_path(ctid),
        root_path: host.root_dir(ctid),
        private_path: host.private_dir(ctid),
        console_log: host.console_log_path(ctid),
    })
}

fn lock(host: &Host, ctid: Ctid) -> Result<CtLock> {
    fs::create_dir_all(&host.run).map_err(io_err(ctid, "create run directory", &host.run))?;
    Ok(CtLock::acquire(&host.lock_path(ctid), LOCK_TIMEOUT)?)
}

/// Default user-namespace range for a CT: 65536 ids per CT above 1e6, by CTID, like LXC's
/// subordinate ranges but deterministic so a private area's ownership matches across hosts.
pub fn default_userns(ctid: Ctid) -> UserNs {
    let base = 1_000_000u64 + u64::from(ctid.get() % 60_000) * 65_536;
    UserNs {
        uid_base: base as u32,
        gid_base: base as u32,
        size: 65_536,
    }
}

pub fn create(host: &Host, ctid: Ctid, opts: &CreateOpts) -> Result<()> {
    if let Some(n) = &opts.name {
        validate_name(n).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?;
    }
    if let Some(h) = &opts.hostname {
        crate::config::validate_hostname(h).map_err(|msg| CtError::Invalid { ctid, msg })?;
    }
    let store = TemplateStore::open(host.template_dir())?;
    let tmpl = store.get(&opts.template)?;
    host.ensure_dirs()?;
    let _lock = lock(host, ctid)?;
    if host.conf_path(ctid).exists() {
        return Err(ConfigError::Exists(ctid).into());
    }
    if let Some(n) = &opts.name {
        for other in host.list_ctids()? {
            if let Ok(c) = CtConfig::load(host, other)
                && c.name.as_deref() == Some(n)
            {
                return Err(ConfigError::NameTaken {
                    name: n.clone(),
                    ctid: other,
                }
                .into());
            }
        }
    }
    let private = host.private_dir(ctid);
    if private.exists() {
        return Err(CtError::Invalid {
            ctid,
            msg: format!(
                "private area {} exists without a config: remove it or run `berth gc`",
                private.display()
            ),
        });
    }
    let mut cfg = CtConfig::new(ctid, opts.template.clone());
    cfg.name = opts.name.clone();
    cfg.hostname = opts.hostname.clone();
    cfg.init = tmpl.init.clone();
    cfg.stop_signal = tmpl.stop_signal.clone();
    if opts.userns {
        cfg.userns = Some(default_userns(ctid));
    }
    // Copy into a hidden sibling and rename: a crash mid-copy leaves only `.N.tmp`, which gc removes.
    let tmp = host.root.join("private").join(format!(".{ctid}.tmp"));
    if tmp.exists() {
        TemplateStore::remove_tree_fast(&tmp)?;
    }
    // A user namespace needs ids shifted on disk, so those CTs get their own copy.
    cfg.layout = if opts.userns || opts.copy {
        PrivateLayout::Copy
    } else {
        PrivateLayout::Overlay
    };
    let shift = cfg.userns.map(|u| (u.uid_base, u.gid_base));
    let res = (|| -> Result<()> {
        match cfg.layout {
            PrivateLayout::Copy => {
                store.instantiate(&opts.template, &tmp, shift)?;
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(ctid, &tmp, &tmp, h)?;
                }
            }
            PrivateLayout::Overlay => {
                overlay_paths_ok(ctid, &[&store.rootfs(&opts.template), &private])?;
                for d in [tmp.join("upper"), tmp.join("work")] {
                    fs::create_dir_all(&d).map_err(io_err(ctid, "create directory", &d))?;
                }
                if let Some(h) = &cfg.hostname {
                    write_hostname_files(
                        ctid,
                        &store.rootfs(&opts.template),
                        &tmp.join("upper"),
                        h,
                    )?;
                }
            }
        }
        fs::rename(&tmp, &private).map_err(io_err(ctid, "rename into place", &private))?;
        cfg.save(host)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = TemplateStore::remove_tree_fast(&tmp);
        let _ = TemplateStore::remove_tree_fast(&private);
        let _ = fs::remove_file(host.conf_path(ctid));
        return Err(e);
    }
    info!(%ctid, template = %opts.template, "created");
    Ok(())
}

/// Overlay mount options are comma/colon separated: paths holding those cannot be passed.
fn overlay_paths_ok(ctid: Ctid, paths: &[&Path]) -> Result<()> {
    for p in paths {
        let s = p.to_string_lossy();
        if s.contains([',', ':', '\\']) {
            return Err(CtError::Invalid {
                ctid,
                msg: format!(
                    "path {s} contains ',', ':' or '\\', which overlayfs options cannot carry: use another --root or `create --copy`"
                ),
            });
        }
    }
    Ok(())
}

/// Writes /etc/hostname and the CT's line in /etc/hosts (through `net::write_hostname_files`,
/// which refuses a symlinked /etc). For a stopped overlay CT, `read_root` is the template: its
/// /etc/hosts is copied up into `write_root` first, as overlayfs would on a write.
pub fn write_hostname_files(
    ctid: Ctid,
    read_root: &Path,
    write_root: &Path,
    hostname: &str,
) -> Result<()> {
    if !read_root.join("etc").is_dir() {
        return Ok(());
    }
    if read_root != write_root {
        let etc = write_root.join("etc");
        fs::create_dir_all(&etc).map_err(io_err(ctid, "create directory", &etc))?;
        let hosts = etc.join("hosts");
        if hosts.symlink_metadata().is_err()
            && let Ok(text) = fs::read(read_root.join("etc/hosts"))
        {
            fs::write(&hosts, text).map_err(io_err(ctid, "copy up", &hosts))?;
        }
    }
    net::write_hostname_files(write_root, hostname).map_err(net_err(ctid))
}

/// Mounts the CT's files on `root/<CTID>`: a bind mount of the private area, or the overlay of
/// the private area's `upper` over the template. Returns false if it was mounted already.
fn bind_private(host: &Host, cfg: &CtConfig) -> Result<bool> {
    let ctid = cfg.ctid;
    let root = host.root_dir(ctid);
    if state::is_mount_point(&root) {
        return Ok(false);
    }
    let private = host.private_dir(ctid);
    if !private.is_dir() {
        return Err(CtError::Invalid {
            ctid,
            msg: format!("private area {} is missing", private.display()),
        });
    }
    fs::create_dir_all(&root).map_err(io_err(ctid, "create mount point", &root))?;
    match cfg.layout {
        PrivateLayout::Copy => mount(
            Some(&private),
            &root,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|errno| CtError::Sys {
            ctid,
            op: "bind-mount private area",
            errno,
        })?,
        PrivateLayout::Overlay => {
            let lower = TemplateStore::open(host.template_dir())?.rootfs(&cfg.template);
            if !lower.is_dir() {
                return Err(CtError::Invalid {
                    ctid,
                    msg: format!(
                        "template {:?} (its rootfs {}) is missing: the CT's files are an overlay over it",
                        cfg.template,
                        lower.display()
                    ),
                });
            }
            overlay_paths_ok(ctid, &[&lower, &private])?;
            let opts = format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                private.join("upper").display(),
                private.join("work").display()
            );
            mount(
                Some("overlay"),
                &root,
                Some("overlay"),
                MsFlags::empty(),
                Some(opts.as_str()),
            )
            .map_err(|errno| CtError::Sys {
                ctid,
                op: "mount overlay of the private area over the template",
                errno,
            })?;
        }
    }
    // Nothing the host mounts under /var/lib/berth should leak into or out of a CT root.
    mount(
        None::<&str>,
        &root,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|errno| CtError::Sys {
        ctid,
        op: "make CT root private",
        errno,
    })?;
    Ok(true)
}

fn unbind_private(host: &Host, ctid: Ctid) -> Result<()> {
    let root = host.root_dir(ctid);
    while state::is_mount_point(&root) {
        match umount2(&root, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(errno) => {
                return Err(CtError::Sys {
                    ctid,
                    op: "unmount CT root",
                    errno,
                });
            }
        }
    }
    Ok(())
}

pub fn mount_ct(host: &Host, ctid: Ctid) -> Result<()> {
    let cfg = CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    bind_private(host, &cfg)?;
    Ok(())
}

pub fn umount_ct(host: &Host, ctid: Ctid) -> Result<()> {
    CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::Running(ctid));
    }
    unbind_private(host, ctid)
}

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

fn write_fd(fd: &OwnedFd, data: &[u8]) -> io::Result<()> {
    let mut f = fs::File::from(fd.try_clone()?);
    f.write_all(data)
}

/// What the caller plugs into the network steps of the lifecycle: the eBPF datapath (which
/// lives in the `berth` crate) attaches to the host-side interfaces here.
pub trait NetHooks {
    /// `net` is set up (at start, before init execs, or after a live change): attach to every
    /// interface in it and (re)load the CT's addresses. Must be idempotent.
    fn net_up(&mut self, ctid: Ctid, net: &NetState) -> Result<(), String>;
    /// The interfaces in `net` are gone or going: detach from them.
    fn net_down(&mut self, ctid: Ctid, net: &NetState);
}

/// Lifecycle without a datapath.
pub struct NoHooks;
impl NetHooks for NoHooks {
    fn net_up(&mut self, _: Ctid, _: &NetState) -> Result<(), String> {
        Ok(())
    }
    fn net_down(&mut self, _: Ctid, _: &NetState) {}
}

fn net_err(ctid: Ctid) -> impl FnOnce(NetError) -> CtError {
    move |source| CtError::Net { ctid, source }
}

fn open_ns(ctid: Ctid, pid: i32) -> Result<OwnedFd> {
    let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
    fs::File::open(&p)
        .map(OwnedFd::from)
        .map_err(io_err(ctid, "open network namespace", &p))
}

pub fn start(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<RunState> {
    let cfg = CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::AlreadyRunning(ctid));
    }
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
            warn!(%ctid, error = %e, "rollback: remove cgroup");
        }
    });
    cg.setup_devices().map_err(cg_err(ctid))?;
    cg.apply(&res).map_err(cg_err(ctid))?;
    if let Some(limit) = cfg.resources.diskspace {
        crate::quota::set_diskspace(&host.private_dir(ctid), ctid.get(), limit)?;
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
    // A provisional state (init_pid 0, never "alive") records that the mount is start's own, so
    // gc after a kill -9 mid-start unmounts it but leaves a `berth mount` of the admin alone.
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
    let (err_r, err_w) = pipe("pipe")?;

    let spec = init::InitSpec {
        rootfs: rootfs.clone(),
        hostname: cfg.hostname.clone(),
        console: None,
        console_fd: None,
        init: cfg.init.clone(),
        userns: cfg.userns.is_some(),
        join_cgroup: cg.join_self_files(),
    };
    let log_path = host.console_log_path(ctid);

    // SAFETY: berth's CLI is single-threaded here; the child only runs the monitor and exits.
    let monitor_pid = match unsafe { fork() }.map_err(|errno| CtError::Sys {
        ctid,
        op: "fork monitor",
        errno,
    })? {
        ForkResult::Child => {
            drop((ready_r, go_w, err_r));
            let code = monitor_main(ctid, spec, &log_path, ready_w, go_r, err_w, cfg.userns);
            // SAFETY: _exit skips atexit handlers and destructors of the parent's state.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    drop((ready_w, go_r, err_w));
    undo.push("monitor", move || {
        let _ = kill(monitor_pid, Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(monitor_pid, None);
    });

    // Protocol: the monitor sends init's host PID as 4 bytes, or 0 followed by an error text.
    let mut ready = fs::File::from(ready_r);
    let mut pidbuf = [0u8; 4];
    let init_pid = match ready.read_exact(&mut pidbuf) {
        Ok(()) => i32::from_ne_bytes(pidbuf),
        Err(_) => 0,
    };
    if init_pid <= 0 {
        let mut msg = String::new();
        let _ = ready.read_to_string(&mut msg);
        return Err(CtError::StartFailed {
            ctid,
            msg: if msg.is_empty() {
                "monitor exited before cloning init".into()
            } else {
                msg
            },
        });
    }
    undo.push("init", move || {
        let _ = kill(Pid::from_raw(init_pid), Signal::SIGKILL);
    });
    let starttime = state::proc_starttime(init_pid).unwrap_or(0);

    if let Some(u) = cfg.userns {
        write_id_maps(ctid, init_pid, &u)?;
    }
    if !cfg.net.ifaces.is_empty() {
        let ns = open_ns(ctid, init_pid)?;
        let mut hn = HostNet::current().map_err(net_err(ctid))?;
        // A venet/veth left by a crashed run (or still being destroyed with an old netns)
        // would block the names; these are berth's own names for this CT.
        for e in net::remove_stale_links(ctid, &cfg.net, &mut hn) {
            debug!(%ctid, error = %e, "stale network cleanup");
        }
        let ns_state = net::setup(ctid, ns.as_fd(), &cfg.net, &mut hn).map_err(net_err(ctid))?;
        st.net = Some(ns_state.clone());
        // The links die with init's netns; only the proxy entries need removing.
        let undo_state = ns_state.clone();
        undo.push("network", move || {
            if let Ok(mut hn) = HostNet::current() {
                for e in net::teardown(&undo_state, &mut hn, LinkTeardown::Delete) {
                    warn!(%ctid, error = %e, "rollback: network");
                }
            }
        });
        hooks
            .net_up(ctid, &ns_state)
            .map_err(|msg| CtError::StartFailed { ctid, msg })?;
        let hooks = &mut *hooks;
        undo.push("datapath", move || hooks.net_down(ctid, &ns_state));
    }
    if !cfg.net.nameservers.is_empty() || !cfg.net.searchdomains.is_empty() {
        net::write_resolv_conf(&rootfs, &cfg.net.nameservers, &cfg.net.searchdomains)
            .map_err(net_err(ctid))?;
    }

    write_fd(&go_w, b"g").map_err(io_err(ctid, "signal init", Path::new("pipe")))?;
    drop(go_w);
    let mut msg = String::new();
    let _ = fs::File::from(err_r).read_to_string(&mut msg);
    if !msg.is_empty() {
        return Err(CtError::StartFailed { ctid, msg });
    }
    st.init_pid = init_pid;
    st.init_starttime = starttime;
    st.monitor_pid = monitor_pid.as_raw();
    st.mounted_by_start = mounted;
    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    undo.disarm();
    info!(%ctid, init_pid, "started");
    Ok(st)
}

fn write_id_maps(ctid: Ctid, pid: i32, u: &UserNs) -> Result<()> {
    for (file, base) in [("uid_map", u.uid_base), ("gid_map", u.gid_base)] {
        let p = PathBuf::from(format!("/proc/{pid}/{file}"));
        fs::write(&p, format!("0 {base} {}\n", u.size)).map_err(io_err(ctid, "write", &p))?;
    }
    Ok(())
}

/// The monitor: clones init, tells berth its PID, then logs the console and reaps init.
fn monitor_main(
    ctid: Ctid,
    mut spec: init::InitSpec,
    log_path: &Path,
    ready_w: OwnedFd,
    go_r: OwnedFd,
    err_w: OwnedFd,
    userns: Option<UserNs>,
) -> i32 {
    // No panics from here on: unwinding in this forked copy would run the parent's rollback.
    let fail = |msg: String| {
        let mut buf = 0i32.to_ne_bytes().to_vec();
        buf.extend_from_slice(msg.as_bytes());
        let _ = nix::unistd::write(&ready_w, &buf);
        1
    };
    let _ = nix::unistd::setsid();
    let _ = nix::sys::prctl::set_name(
        &std::ffi::CString::new(format!("berth-mon {ctid}")).unwrap_or_default(),
    );
    // The monitor outlives the CLI: it must not hold the CLI's stdio (a caller reading
    // `berth start` output to EOF would hang) nor its CT lock (flock is per open file).
    if let Ok(null) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let b = std::os::fd::AsFd::as_fd(&null);
        let _ = nix::unistd::dup2_stdin(b);
        let _ = nix::unistd::dup2_stdout(b);
        let _ = nix::unistd::dup2_stderr(b);
    }
    let pty = match nix::pty::openpty(None, None) {
        Ok(p) => p,
        Err(e) => return fail(format!("open console pty: {e}")),
    };
    let console_path = match nix::unistd::ttyname(&pty.slave) {
        Ok(p) => p,
        Err(e) => return fail(format!("console pty name: {e}")),
    };
    spec.console = Some(console_path);
    spec.console_fd = Some(pty.slave.as_raw_fd());
    let keep = [
        ready_w.as_raw_fd(),
        go_r.as_raw_fd(),
        err_w.as_raw_fd(),
        pty.master.as_raw_fd(),
        pty.slave.as_raw_fd(),
    ];
    init::close_fds_except(&keep);

    let mut flags = CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWNET;
    if userns.is_some() {
        flags |= CloneFlags::CLONE_NEWUSER;
    }
    // SIGCHLD arrives on a signalfd so the monitor sleeps until there is console output or init
    // exits; the mask is inherited by the clone and undone in init before exec.
    let mut chld = nix::sys::signal::SigSet::empty();
    chld.add(Signal::SIGCHLD);
    if let Err(e) = chld.thread_block() {
        return fail(format!("block SIGCHLD: {e}"));
    }
    let sfd = match nix::sys::signalfd::SignalFd::with_flags(
        &chld,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    ) {
        Ok(f) => f,
        Err(e) => return fail(format!("signalfd: {e}")),
    };
    let go_fd = go_r.as_raw_fd();
    let err_fd = err_w.as_raw_fd();
    let mut stack = vec![0u8; 256 * 1024];
    let child = {
        let spec = &spec;
        let cb = Box::new(move || init_main(spec, go_fd, err_fd));
        // SAFETY: clone without CLONE_VM gives the child its own copy of memory, like fork; the
        // monitor is single-threaded.
        unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
    };
    let child = match child {
        Ok(c) => c,
        Err(e) => return fail(format!("clone CT init with {flags:?}: {e}")),
    };
    drop(go_r);
    drop(err_w);
    drop(pty.slave);
    {
        let mut f = fs::File::from(ready_w);
        if f.write_all(&child.as_raw().to_ne_bytes()).is_err() {
            let _ = kill(child, Signal::SIGKILL);
        }
    }
    console_loop(child, pty.master, sfd, log_path);
    0
}

/// In the cloned init: wait for the go-ahead, build the CT's view of the world, exec init.
fn init_main(spec: &init::InitSpec, go_fd: RawFd, err_fd: RawFd) -> isize {
    let res = (|| -> Result<(), String> {
        let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
        let mut b = [0u8; 1];
        init::read_exact_fd(go_fd, &mut b)?;
        let _ = nix::unistd::close(go_fd);
        // Still single-threaded and on the host's paths: join the CT's cgroups ourselves (the
        // cheap single-thread migration, see join_self_files), then root a cgroup namespace there.
        for f in &spec.join_cgroup {
            fs::write(f, b"0").map_err(|e| format!("join cgroup {}: {e}", f.display()))?;
        }
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| format!("unshare cgroup namespace: {e}"))?;
        if spec.userns {
            nix::unistd::setgroups(&[]).ok();
            nix::unistd::setresgid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setgid 0 in user namespace: {e}"))?;
            nix::unistd::setresuid(0.into(), 0.into(), 0.into())
                .map_err(|e| format!("setuid 0 in user namespace: {e}"))?;
        }
        init::set_hostname(spec.hostname.as_deref())?;
        init::setup_rootfs(spec)?;
        init::setup_console(spec)?;
        init::drop_caps()?;
        init::close_fds_except(&[err_fd]);
        Err(init::exec_init(spec))
    })();
    if let Err(msg) = res {
        // SAFETY: writing a byte buffer to a pipe fd we hold.
        unsafe { libc::write(err_fd, msg.as_ptr().cast(), msg.len()) };
    }
    // SAFETY: exiting the forked child without running the parent's destructors.
    unsafe { libc::_exit(127) }
}

/// Copies console output to the log (capped: truncated when it passes 1 MiB) until init exits.
fn console_loop(child: Pid, master: OwnedFd, sfd: nix::sys::signalfd::SignalFd, log_path: &Path) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    use std::os::fd::AsFd;
    const CAP: u64 = 1 << 20;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .ok();
    let mut master_open = true;
    let mut buf = [0u8; 8192];
    let mut copy = |master: &OwnedFd, log: &mut Option<fs::File>| -> bool {
        match nix::unistd::read(master, &mut buf) {
            Ok(n) if n > 0 => {
                if let Some(l) = log.as_mut() {
                    let _ = l.write_all(&buf[..n]);
                    if l.metadata().map(|m| m.len() > CAP).unwrap_or(false) {
                        let _ = l.set_len(0);
                    }
                }
                true
            }
            _ => false,
        }
    };
    loop {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if master_open {
            fds.push(PollFd::new(master.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
        let sig = fds[0].revents().unwrap_or(PollFlags::empty());
        let con = fds
            .get(1)
            .and_then(|f| f.revents())
            .unwrap_or(PollFlags::empty());
        if con.contains(PollFlags::POLLIN) {
            if !copy(&master, &mut log) {
                master_open = false;
            }
        } else if con.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
            master_open = false;
        }
        if sig.contains(PollFlags::POLLIN) {
            while let Ok(Some(_)) = sfd.read_signal() {}
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                _ => {
                    while master_open && copy(&master, &mut log) {}
                    break;
                }
            }
        }
    }
}

/// Sends init the distro's halt signal, waits, then kills whatever is left in the cgroup.
pub fn stop(host: &Host, ctid: Ctid, fast: bool, hooks: &mut dyn NetHooks) -> Result<()> {
    let cfg = CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    let Some(st) = running(host, ctid) else {
        // Not running: still clean what a crash may have left, so `stop` always converges.
        cleanup_stopped(host, ctid, true, hooks)?;
        return Err(CtError::NotRunning(ctid));
    };
    let cg = cgroup(host, ctid)?;
    if cg.is_frozen().unwrap_or(false) {
        cg.thaw().map_err(cg_err(ctid))?;
    }
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
    cg.kill_all(Duration::from_secs(10)).map_err(cg_err(ctid))?;
    if let Some(ns) = &st.net {
        net_teardown(ctid, ns, hooks, LinkTeardown::NetnsExit);
    }
    teardown_after_stop(host, ctid, &cg, st.mounted_by_start)?;
    info!(%ctid, "stopped");
    Ok(())
}

/// Best effort: the datapath detaches, proxy entries go (links go with the netns or are deleted).
fn net_teardown(ctid: Ctid, ns: &NetState, hooks: &mut dyn NetHooks, links: LinkTeardown) {
    hooks.net_down(ctid, ns);
    match HostNet::current() {
        Ok(mut hn) => {
            for e in net::teardown(ns, &mut hn, links) {
                warn!(%ctid, error = %e, "network teardown");
            }
        }
        Err(e) => warn!(%ctid, error = %e, "network teardown: open host netlink"),
    }
}

fn teardown_after_stop(host: &Host, ctid: Ctid, cg: &cgroups::Cgroup, unmount: bool) -> Result<()> {
    if cg.exists() {
        cg.destroy().map_err(cg_err(ctid))?;
    }
    if unmount {
        unbind_private(host, ctid)?;
    }
    for p in [host.state_path(ctid)] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(ctid, "remove", &p)(e)),
        }
    }
    Ok(())
}

/// Removes what a stopped CT may have left (stale state, cgroup, start's mount). `unmount_any`
/// also drops a mount made by `berth mount`.
fn cleanup_stopped(
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
    match stop(host, ctid, false, hooks) {
        Ok(()) | Err(CtError::NotRunning(_)) => {}
        Err(e) => return Err(e),
    }
    start(host, ctid, hooks)
}

pub fn destroy(host: &Host, ctid: Ctid) -> Result<()> {
    let cfg = CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    if running(host, ctid).is_some() {
        return Err(CtError::Running(ctid));
    }
    cleanup_stopped(host, ctid, true, &mut NoHooks)?;
    let private = host.private_dir(ctid);
    if cfg.resources.diskspace.is_some()
        && private.exists()
        && let Err(e) = crate::quota::clear_diskspace(&private, ctid.get())
    {
        warn!(%ctid, error = %e, "clear disk quota");
    }
    if private.exists() {
        TemplateStore::remove_tree_fast(&private)?;
    }
    let root = host.root_dir(ctid);
    match fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(ctid, "remove mount point", &root)(e)),
    }
    for p in [
        host.console_log_path(ctid),
        host.conf_path(ctid),
        host.lock_path(ctid),
    ] {
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(ctid, "remove", &p)(e)),
        }
    }
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

/// Applies `set`: live on a running CT, persisted with `save`. Validates everything first so a
/// bad value changes nothing.
pub fn set(
    host: &Host,
    ctid: Ctid,
    opts: &SetOpts,
    save: bool,
    hooks: &mut dyn NetHooks,
) -> Result<()> {
    let mut cfg = CtConfig::load(host, ctid)?;
    let _lock = lock(host, ctid)?;
    let run = running(host, ctid);
    if run.is_none() && !save {
        return Err(CtError::NeedSave(ctid));
    }
    if let Some(n) = &opts.name {
        validate_name(n).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?;
        for other in host.list_ctids()? {
            if other != ctid
                && let Ok(c) = CtConfig::load(host, other)
                && c.name.as_deref() == Some(n)
            {
                return Err(ConfigError::NameTaken {
                    name: n.clone(),
                    ctid: other,
                }
                .into());
            }
        }
    }
    if let Some(h) = &opts.hostname {
        crate::config::validate_hostname(h).map_err(|msg| CtError::Invalid { ctid, msg })?;
    }
    let r = &opts.resources;
    let mut merged = cfg.resources.clone();
    macro_rules! merge {
        ($($f:ident),*) => { $( if r.$f.is_some() { merged.$f = r.$f; } )* };
    }
    merge!(
        memory, swap, cpuunits, cpulimit, cpus, numproc, ioweight, diskspace
    );
    let mut delta = resources_of(r);
    // cpulimit and cpus both become the one CFS quota (the smaller wins): a change of either
    // must carry the other, or applying it would drop the other's cap.
    if r.cpulimit.is_some() || r.cpus.is_some() {
        delta.cpulimit = merged.cpulimit;
        delta.cpus = merged.cpus;
    }
    delta.validate().map_err(cg_err(ctid))?;
    resources_of(&merged).validate().map_err(cg_err(ctid))?;

    let newnet = if opts.net_changes() {
        let n = merged_net(ctid, &live_net(&cfg.net, run.as_ref()), opts)?;
        if !opts.ipadd.is_empty() {
            let others: Vec<(Ctid, CtConfig)> = host
                .list_ctids()?
                .into_iter()
                .filter(|c| *c != ctid)
                .filter_map(|c| CtConfig::load(host, c).ok().map(|cfg| (c, cfg)))
                .collect();
            let mut hn = HostNet::current().map_err(net_err(ctid))?;
            net::addr_owner_check(
                ctid,
                &opts.ipadd,
                others.iter().map(|(c, cfg)| (*c, &cfg.net)),
                &mut hn,
            )
            .map_err(net_err(ctid))?;
        }
        Some(n)
    } else {
        None
    };

    if let Some(limit) = r.diskspace {
        crate::quota::set_diskspace(&host.private_dir(ctid), ctid.get(), limit)?;
    }
    if let (Some(n), Some(mut st)) = (&newnet, run.clone()) {
        apply_net_live(ctid, &mut st, n, opts, hooks)?;
        let sp = host.state_path(ctid);
        st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
    }
    if let Some(n) = &newnet
        && (!opts.nameservers.is_empty() || !opts.searchdomains.is_empty())
    {
        let (_, write) = files_view(host, &cfg);
        net::write_resolv_conf(&write, &n.nameservers, &n.searchdomains).map_err(net_err(ctid))?;
    }
    if let Some(st) = &run {
        let cg = cgroup(host, ctid)?;
        cg.apply(&delta).map_err(cg_err(ctid))?;
        if let Some(h) = &opts.hostname {
            exec::set_hostname_live(ctid, st.init_pid, h)?;
        }
    }
    if let Some(h) = &opts.hostname {
        let (read, write) = files_view(host, &cfg);
        write_hostname_files(ctid, &read, &write, h)?;
    }
    if save {
        if opts.hostname.is_some() {
            cfg.hostname = opts.hostname.clone();
        }
        if opts.name.is_some() {
            cfg.name = opts.name.clone();
        }
        cfg.resources = merged;
        if let Some(n) = newnet {
            cfg.net = n;
        }
        if let Some(t) = &opts.shaping {
            cfg.shaping = (!t.is_empty()).then(|| t.clone());
        }
        cfg.save(host)?;
    }
    Ok(())
}

/// Where to read and write the CT's files from the host: the mounted view when mounted,
/// otherwise the private area (for an overlay: its upper layer, reading through to the template).
fn files_view(host: &Host, cfg: &CtConfig) -> (PathBuf, PathBuf) {
    let root = host.root_dir(cfg.ctid);
    if state::is_mount_point(&root) {
        return (root.clone(), root);
    }
    let private = host.private_dir(cfg.ctid);
    match cfg.layout {
        PrivateLayout::Copy => (private.clone(), private),
        PrivateLayout::Overlay => (
            host.template_dir().join(&cfg.template).join("rootfs"),
            private.join("upper"),
        ),
    }
}

/// CTs whose files are an overlay over `template` (it must not be removed under them).
pub fn template_users(host: &Host, template: &str) -> Result<Vec<Ctid>> {
    let mut out = Vec::new();
    for c in host.list_ctids()? {
        if let Ok(cfg) = CtConfig::load(host, c)
            && cfg.layout == PrivateLayout::Overlay
            && cfg.template == template
        {
            out.push(c);
        }
    }
    Ok(out)
}

/// Resource counters of a running CT (`list -o`, berthd).
pub fn stats(host: &Host, ctid: Ctid) -> Result<Option<cgroups::Stats>> {
    if running(host, ctid).is_none() {
        return Ok(None);
    }
    cgroup(host, ctid)?.stats().map(Some).map_err(cg_err(ctid))
}

/// What `berth gc` cleaned.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub cleaned: Vec<Ctid>,
    pub orphan_cgroups: Vec<Ctid>,
    pub partial_creates: Vec<PathBuf>,
    pub errors: Vec<String>,
}

/// Cleans what a `kill -9` of berth mid start/stop/create left behind: stale state files,
/// cgroups (with their processes) of CTs that are not running, start's mounts, half-copied
/// private areas. Running CTs are left alone.
pub fn gc(host: &Host, hooks: &mut dyn NetHooks) -> Result<GcReport> {
    let mut rep = GcReport::default();
    let known = host.list_ctids()?;
    for &ctid in &known {
        let _lock = match lock(host, ctid) {
            Ok(l) => l,
            Err(e) => {
                rep.errors.push(e.to_string());
                continue;
            }
        };
        if running(host, ctid).is_some() {
            continue;
        }
        match cleanup_stopped(host, ctid, false, hooks) {
            Ok(true) => rep.cleaned.push(ctid),
            Ok(false) => {}
            Err(e) => rep.errors.push(e.to_string()),
        }
    }
    match cgroups::list_ctids(&host.cgroup_parent) {
        Ok(list) => {
            for ctid in list {
                if known.contains(&ctid) {
                    continue;
                }
                let r = cgroup(host, ctid).and_then(|cg| {
                    cg.kill_all(Duration::from_secs(10))
                        .and_then(|_| cg.destroy())
                        .map_err(cg_err(ctid))
                });
                match r {
                    Ok(()) => rep.orphan_cgroups.push(ctid),
                    Err(e) => rep.errors.push(e.to_string()),
                }
            }
        }
        Err(e) => rep.errors.push(e.to_string()),
    }
    let pdir = host.root.join("private");
    if let Ok(rd) = fs::read_dir(&pdir) {
        for ent in rd.flatten() {
            let name = ent.file_name();
            let n = name.to_string_lossy();
            if n.starts_with('.') && n.ends_with(".tmp") {
                let p = ent.path();
                match TemplateStore::remove_tree_fast(&p) {
                    Ok(()) => rep.partial_creates.push(p),
                    Err(e) => rep.errors.push(e.to_string()),
                }
            }
        }
    }
    Ok(rep)
}
