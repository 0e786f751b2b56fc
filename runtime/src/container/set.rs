//! `set`: validated changes of a CT's settings, applied live and/or saved, all or nothing.
//!
//! Everything is checked first (names, values, addresses, the merged shaping, what the cgroup
//! supports). Then the steps run in order — disk quota, addresses and interfaces, shaping,
//! cgroup limits, hostname, resolv.conf, run state, saved config — each recording in a
//! [`Journal`] how to undo it. A step that fails undoes itself and every step before it, so a
//! failed `set` leaves the CT as it found it.

use std::net::IpAddr;
use std::os::fd::AsFd;

use tracing::warn;

use super::create::write_hostname_files;
use super::mount::files_view;
use super::passwd::{self, UserPassword};
use super::set_undo::{Journal, NetUndo, Undo};
use super::state::RunState;
use super::{
    CtError, NetHooks, Result, cg_err, cgroup, exec, hook_err, io_err, lock_loaded, net_err,
    open_ns, resources_of, running,
};
use crate::billing::{BillingChange, BillingConfig};
use crate::cgroups::{Cgroup, CgroupManager, Resources, SavedLimits};
use crate::config::{ConfigError, CtConfig, Host, ResourceConfig};
use crate::ctid::{Ctid, validate_name};
use crate::error_chain::ErrorChain;
use crate::net::{self, HostNet, NetState};
use crate::shaping::{ShapingChange, ShapingConfig};
use crate::transfer_quota::{QuotaChange, QuotaConfig};

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
    /// The shaping flags, merged onto the CT's current shaping (the live one of a running CT,
    /// else the saved one).
    pub shaping: ShapingChange,
    /// The billing flags (`--billing-day`, `--tz`, `--commit`, `--classes`): config only,
    /// berthd's ledger reads them from the saved config, so they need `--save`.
    pub billing: BillingChange,
    /// The transfer quota flags (`--quota-*`): config only like billing (berthd reads the
    /// saved config at each tick), so they need `--save`.
    pub quota: QuotaChange,
    /// `--onboot yes|no`: config only (the boot unit reads the saved config), so it needs
    /// `--save`.
    pub onboot: Option<bool>,
    /// `--userpasswd`: written into the CT's /etc/shadow, running or stopped, without
    /// `--save` (a password is no setting of the config).
    pub passwords: Vec<UserPassword>,
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

    /// Whether the change is passwords only: those apply to a stopped CT without --save.
    fn passwords_only(&self) -> bool {
        let Self { passwords, .. } = self;
        let rest = Self {
            passwords: Vec::new(),
            ..self.clone()
        };
        !passwords.is_empty() && rest.is_empty()
    }

    /// No change at all.
    fn is_empty(&self) -> bool {
        self.hostname.is_none()
            && self.name.is_none()
            && self.resources == ResourceConfig::default()
            && !self.net_changes()
            && self.shaping.is_empty()
            && self.billing.is_empty()
            && self.quota.is_empty()
            && self.onboot.is_none()
            && self.passwords.is_empty()
    }
}

/// The CT's network config after `set`'s changes, validated (nothing is applied yet).
pub(super) fn merged_net(ctid: Ctid, cur: &net::NetConfig, o: &SetOpts) -> Result<net::NetConfig> {
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
            n.ifaces.push(Iface::Bridged(bridged_settings(l)));
        }
    }
    n
}

/// The settings a live bridged interface was made with.
pub(super) fn bridged_settings(l: &net::IfaceState) -> net::BridgedIface {
    l.bridged.clone().unwrap_or_else(|| {
        // A state written before the settings were recorded: what it has.
        let mut b = net::BridgedIface::new(l.ct_ifname.clone());
        b.mac = l.ct_mac;
        b.host_ifname = Some(l.host_ifname.clone());
        b.host_mac = l.host_mac;
        b.bridge = l.bridge.clone();
        b.vlan = l.vlan;
        b.addrs = l.addrs.clone();
        b
    })
}

/// Refuses routed addresses another CT's config claims or the host (or a running CT's host
/// route) holds.
pub(crate) fn check_addrs_free(host: &Host, ctid: Ctid, addrs: &[IpAddr]) -> Result<()> {
    let others: Vec<(Ctid, CtConfig)> = host
        .list_ctids()?
        .into_iter()
        .filter(|c| *c != ctid)
        // Every other config must load: one that does not may claim the address (fail closed).
        .map(|c| CtConfig::load(host, c).map(|cfg| (c, cfg)))
        .collect::<Result<_, _>>()?;
    let mut hn = HostNet::current().map_err(net_err(ctid))?;
    net::addr_owner_check(
        ctid,
        addrs,
        others.iter().map(|(c, cfg)| (*c, &cfg.net)),
        &mut hn,
    )
    .map_err(net_err(ctid))
}

/// The shaping a CT has now: what `set` applied live to a running CT, else its config's.
pub(super) fn current_shaping(cfg: &CtConfig, run: Option<&RunState>) -> Option<ShapingConfig> {
    match run.and_then(|r| r.shaping.clone()) {
        Some(live) => live.non_empty(),
        None => cfg.active_shaping().cloned(),
    }
}

/// Applies a network change to a running CT, keeping `st` in step and recording in `undo`
/// each sub-step done (each of them either completes or undoes itself).
#[allow(clippy::too_many_arguments)]
fn apply_net_live(
    host: &Host,
    ctid: Ctid,
    st: &mut RunState,
    newcfg: &net::NetConfig,
    o: &SetOpts,
    shaping: Option<&ShapingConfig>,
    hooks: &mut dyn NetHooks,
    undo: &mut Vec<NetUndo>,
) -> Result<()> {
    use net::Mode;
    let ns = open_ns(ctid, st.init_pid)?;
    let mut hn = HostNet::current().map_err(net_err(ctid))?;
    let state = st.net.get_or_insert_with(|| NetState::new(ctid));
    if let Some(sel) = &o.ipdel {
        let had = routed_addrs(state);
        let errors =
            net::del_addrs(ctid, Some(ns.as_fd()), sel, &mut hn, state).map_err(net_err(ctid))?;
        crate::crash_point!("set.addrs_deleted");
        let left = routed_addrs(state);
        // The routed link stays with no address; the datapath just loses the addresses.
        undo.push(NetUndo::AddAddrs(
            had.into_iter().filter(|a| !left.contains(a)).collect(),
        ));
        for e in errors {
            warn!(%ctid, error = %ErrorChain(&e), "--ipdel");
        }
    }
    if let Some(which) = &o.netif_del {
        let gone = NetState {
            ctid,
            ifaces: state
                .ifaces
                .iter()
                .filter(|i| {
                    i.mode == Mode::Bridged && which.as_ref().is_none_or(|n| &i.ct_ifname == n)
                })
                .cloned()
                .collect(),
        };
        hooks.net_down(ctid, &gone);
        let errors =
            net::del_netif(ctid, which.as_deref(), &mut hn, state).map_err(net_err(ctid))?;
        undo.push(NetUndo::AddNetifs(
            gone.ifaces.iter().map(bridged_settings).collect(),
        ));
        for e in errors {
            warn!(%ctid, error = %ErrorChain(&e), "--netif_del");
        }
    }
    if !o.ipadd.is_empty() {
        let link_created = state.routed().is_none();
        super::adding::begin(host, ctid, &o.ipadd)?;
        net::add_addrs(ctid, ns.as_fd(), newcfg, &o.ipadd, &mut hn, state)
            .map_err(net_err(ctid))?;
        if let Some(r) = state.ifaces.iter().find(|i| i.mode == net::Mode::Routed) {
            super::adding::added(host, ctid, &o.ipadd, r)?;
        }
        crate::crash_point!("set.addrs_added");
        undo.push(NetUndo::DelAddrs {
            addrs: o.ipadd.clone(),
            link_created,
        });
    }
    for b in &o.netif_add {
        net::add_netif(ctid, ns.as_fd(), b, &mut hn, state).map_err(net_err(ctid))?;
        undo.push(NetUndo::DelNetif(b.name.clone()));
    }
    // New interfaces get the shaping the CT has; a shaping change comes as its own step.
    hooks.net_up(ctid, state, shaping).map_err(hook_err(ctid))?;
    crate::crash_point!("set.datapath_updated");
    Ok(())
}

/// The CT's routed addresses in `state`, in order.
fn routed_addrs(state: &NetState) -> Vec<IpAddr> {
    state
        .routed()
        .map(|i| i.addrs.iter().map(|a| a.addr()).collect())
        .unwrap_or_default()
}

/// Everything `set` checked before changing anything.
struct Plan {
    /// The CT's resource settings afterwards (saved with `--save`).
    resources: ResourceConfig,
    /// What changes in the cgroup of a running CT.
    delta: Resources,
    /// A running CT's cgroup, with the values `delta` overwrites.
    limits: Option<(Cgroup, SavedLimits)>,
    /// The network config afterwards, when it changes.
    net: Option<net::NetConfig>,
    /// The shaping the CT has now (the live one when running).
    shaping_before: Option<ShapingConfig>,
    /// With shaping flags: the shaping afterwards (`None`: unshaped).
    shaping: Option<Option<ShapingConfig>>,
    /// With billing flags: the billing settings afterwards.
    billing: Option<BillingConfig>,
    /// With quota flags: the quota afterwards.
    quota: Option<QuotaConfig>,
}

fn plan(
    host: &Host,
    ctid: Ctid,
    cfg: &CtConfig,
    run: Option<&RunState>,
    opts: &SetOpts,
) -> Result<Plan> {
    if let Some(n) = &opts.name {
        validate_name(n).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?;
        for other in host.list_ctids()? {
            // Fail closed: a config that does not load may hold the name.
            if other != ctid && CtConfig::load(host, other)?.name.as_deref() == Some(n) {
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

    let net = if opts.net_changes() {
        let n = merged_net(ctid, &live_net(&cfg.net, run), opts)?;
        if !opts.ipadd.is_empty() {
            check_addrs_free(host, ctid, &opts.ipadd)?;
        }
        Some(n)
    } else {
        None
    };
    let shaping_before = current_shaping(cfg, run);
    let shaping = if opts.shaping.is_empty() {
        None
    } else {
        Some(
            opts.shaping
                .merge(shaping_before.as_ref())
                .map_err(|source| CtError::Shaping { ctid, source })?,
        )
    };
    let billing = if opts.billing.is_empty() {
        None
    } else {
        Some(
            opts.billing
                .merge(&cfg.billing)
                .map_err(|e| CtError::Invalid {
                    ctid,
                    msg: e.to_string(),
                })?,
        )
    };
    let quota = if opts.quota.is_empty() {
        None
    } else {
        Some(opts.quota.merge(&cfg.quota).map_err(|e| CtError::Invalid {
            ctid,
            msg: e.to_string(),
        })?)
    };
    // Reading what the limits are now also checks that the cgroup supports the change.
    let limits = match run {
        Some(_) => {
            let cg = cgroup(host, ctid)?;
            let saved = cg.save_limits(&delta).map_err(cg_err(ctid))?;
            Some((cg, saved))
        }
        None => None,
    };
    Ok(Plan {
        resources: merged,
        delta,
        limits,
        net,
        shaping_before,
        shaping,
        billing,
        quota,
    })
}

/// Applies `set`: live on a running CT, persisted with `save`. Validates everything first so a
/// bad value changes nothing, and undoes every step done when a later one fails.
pub fn set(
    host: &Host,
    ctid: Ctid,
    opts: &SetOpts,
    save: bool,
    hooks: &mut dyn NetHooks,
) -> Result<()> {
    let (_lock, mut cfg) = lock_loaded(host, ctid)?;
    // An add a killed set left in flight is taken back before this set plans on the state.
    super::adding::recover(host, ctid, hooks)?;
    let run = running(host, ctid);
    if run.is_none() && !save && !opts.passwords_only() {
        return Err(CtError::NeedSave(ctid));
    }
    if opts.onboot.is_some() && !save {
        return Err(CtError::Invalid {
            ctid,
            msg: "--onboot is read from the saved config at boot: add --save".into(),
        });
    }
    if !opts.billing.is_empty() && !save {
        // Nothing in a running CT holds billing settings: berthd reads the saved config, so
        // an unsaved change would be silently ignored.
        return Err(CtError::Invalid {
            ctid,
            msg: "--billing-day, --tz, --commit and --classes are billing settings berthd reads from the saved config: add --save".into(),
        });
    }
    if !opts.quota.is_empty() && !save {
        return Err(CtError::Invalid {
            ctid,
            msg: "--quota-* flags set the transfer quota berthd reads from the saved config at each tick: add --save".into(),
        });
    }
    if save {
        // Saved with the rest, only if the set succeeds: the on-disk UUID (one a start may
        // have assigned since our load), else a new one for a config that predates UUIDs.
        cfg.uuid = CtConfig::load(host, ctid)?
            .uuid
            .or_else(|| Some(uuid::Uuid::new_v4()));
    }
    let plan = plan(host, ctid, &cfg, run.as_ref(), opts)?;
    let mut journal = Journal::new(host, ctid, run);
    let res = apply(host, ctid, cfg, opts, &plan, save, hooks, &mut journal);
    if res.is_err() {
        journal.rollback(hooks);
    }
    // Done either way: in the run state, or rolled back.
    super::adding::end(host, ctid);
    res
}

/// The steps of `set`, in order, each recorded in `journal` (see the module docs).
#[allow(clippy::too_many_arguments)]
fn apply(
    host: &Host,
    ctid: Ctid,
    mut cfg: CtConfig,
    opts: &SetOpts,
    plan: &Plan,
    save: bool,
    hooks: &mut dyn NetHooks,
    journal: &mut Journal,
) -> Result<()> {
    if let Some(limit) = opts.resources.diskspace {
        let private = host.private_dir(ctid);
        // The old limit must be known to be put back: a quota that cannot be read fails the
        // set here, before anything changed (rolling back to "no limit" would lift it).
        let (_, before) = crate::quota::diskspace_usage(&private, ctid.get())?;
        crate::quota::set_diskspace(&private, ctid.get(), limit)?;
        journal.push(Undo::Diskspace(before));
    }
    if let Some(st) = journal.live.as_mut()
        && let Some(n) = &plan.net
    {
        let mut steps = Vec::new();
        let before = st.net.clone();
        let res = apply_net_live(
            host,
            ctid,
            st,
            n,
            opts,
            plan.shaping_before.as_ref(),
            hooks,
            &mut steps,
        );
        // Recorded whatever the outcome: the sub-steps done before a failure are undone too.
        journal.steps.push(Undo::Net {
            steps,
            before,
            cfg: cfg.net.clone(),
            shaping: plan.shaping_before.clone(),
        });
        res?;
    }
    if let Some(st) = journal.live.as_mut()
        && let Some(new) = &plan.shaping
    {
        let net = st.net.clone().unwrap_or_else(|| NetState::new(ctid));
        // Registered first: shaping that fails on the second interface is undone on the first.
        journal.steps.push(Undo::Shaping {
            before: plan.shaping_before.clone(),
        });
        hooks
            .shape(ctid, &net, new.as_ref())
            .map_err(hook_err(ctid))?;
        crate::crash_point!("set.shaping_applied");
        st.shaping = Some(new.clone().unwrap_or_default());
    }
    if let Some((cg, saved)) = &plan.limits {
        // Registered first: a write that fails halfway leaves earlier files changed.
        journal.push(Undo::Limits(cg.clone(), saved.clone()));
        cg.apply(&plan.delta).map_err(cg_err(ctid))?;
        crate::crash_point!("set.limits_applied");
    }
    if let (Some(h), Some(pid)) = (&opts.hostname, journal.live.as_ref().map(|s| s.init_pid)) {
        let before = exec::hostname_live(ctid, pid)?;
        exec::set_hostname_live(ctid, pid, h)?;
        journal.push(Undo::HostnameLive(before));
    }
    if let Some(h) = &opts.hostname {
        let (read, write) = files_view(host, &cfg);
        journal.save_etc_files(&write, &["hostname", "hosts"])?;
        write_hostname_files(ctid, &read, &write, h, cfg.id_shift())?;
    }
    if !opts.passwords.is_empty() {
        let (read, write) = files_view(host, &cfg);
        journal.save_etc_files(&write, &["shadow"])?;
        passwd::set_passwords(ctid, &read, &write, cfg.id_shift(), &opts.passwords)?;
    }
    if let Some(n) = &plan.net
        && (!opts.nameservers.is_empty() || !opts.searchdomains.is_empty())
    {
        let (_, write) = files_view(host, &cfg);
        journal.save_etc_files(&write, &["resolv.conf"])?;
        net::write_resolv_conf(&write, &n.nameservers, &n.searchdomains).map_err(net_err(ctid))?;
    }
    if let Some(st) = &journal.live
        && (plan.net.is_some() || plan.shaping.is_some())
    {
        let sp = host.state_path(ctid);
        st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
        crate::crash_point!("set.state_written");
        journal.push(Undo::RunState);
    }
    if save {
        if opts.hostname.is_some() {
            cfg.hostname = opts.hostname.clone();
        }
        if opts.name.is_some() {
            cfg.name = opts.name.clone();
        }
        cfg.resources = plan.resources.clone();
        if let Some(n) = &plan.net {
            cfg.net = n.clone();
        }
        if let Some(new) = &plan.shaping {
            cfg.shaping = new.clone();
        }
        if let Some(b) = &plan.billing {
            cfg.billing = b.clone();
        }
        if let Some(q) = &plan.quota {
            cfg.quota = q.clone();
        }
        if let Some(b) = opts.onboot {
            cfg.onboot = b;
        }
        cfg.save_with(host, || crate::crash_point!("set.config_tmp_written"))?;
        crate::crash_point!("set.config_written");
    }
    Ok(())
}
