//! `set`: validated changes of a CT's settings, applied live and/or saved.

use std::os::fd::AsFd;

use tracing::warn;

use super::create::write_hostname_files;
use super::mount::files_view;
use super::state::RunState;
use super::{
    CtError, NetHooks, Result, cg_err, cgroup, exec, io_err, lock, net_err, open_ns, resources_of,
    running,
};
use crate::cgroups::CgroupManager;
use crate::config::{ConfigError, CtConfig, Host, ResourceConfig};
use crate::ctid::{Ctid, validate_name};
use crate::net::{self, HostNet, NetState};

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
