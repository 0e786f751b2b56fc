//! `set`'s undo log: what each step changed and how to put it back, run in reverse when a later
//! step fails. Undo steps are best effort (a failure is logged and the rest still run): the
//! error the caller sees is the one of the step that failed.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::state::RunState;
use super::{NetHooks, Result, exec, io_err, net_err, open_ns};
use crate::cgroups::{Cgroup, SavedLimits};
use crate::config::Host;
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::net::files::{EtcFile, restore_etc_file, save_etc_file};
use crate::net::{self, AddrSelection, HostNet, LinkTeardown, Mode, NetError, NetState};
use crate::shaping::ShapingConfig;
use crate::size::Size;

/// The inverse of one network sub-step of a live `set`.
pub(super) enum NetUndo {
    /// `--ipdel` removed these: add them again.
    AddAddrs(Vec<IpAddr>),
    /// `--netif_del` removed bridged interfaces made with these settings: make them again.
    AddNetifs(Vec<net::BridgedIface>),
    /// `--ipadd` added these; `link_created`: the routed link came with them (it goes too).
    DelAddrs {
        addrs: Vec<IpAddr>,
        link_created: bool,
    },
    /// `--netif_add` made this bridged interface.
    DelNetif(String),
}

/// The inverse of one step of `set`.
pub(super) enum Undo {
    /// The disk quota limit before (`None`: unknown, so the limit is cleared).
    Diskspace(Size),
    /// The live network change: its sub-steps, the state, config and shaping before it.
    Net {
        steps: Vec<NetUndo>,
        before: Option<NetState>,
        cfg: net::NetConfig,
        shaping: Option<ShapingConfig>,
    },
    /// The live shaping before.
    Shaping {
        before: Option<ShapingConfig>,
    },
    Limits(Cgroup, SavedLimits),
    /// The hostname the running CT had.
    HostnameLive(String),
    /// Files of `<root>/etc` as they were.
    EtcFiles {
        root: PathBuf,
        files: Vec<(&'static str, EtcFile)>,
    },
    /// The run state file was rewritten: write the one from before back.
    RunState,
}

/// What a `set` has done so far.
pub(super) struct Journal<'h> {
    host: &'h Host,
    ctid: Ctid,
    /// The run state when `set` began (`None`: the CT is stopped).
    before: Option<RunState>,
    /// The run state as the live steps change it.
    pub(super) live: Option<RunState>,
    pub(super) steps: Vec<Undo>,
}

impl<'h> Journal<'h> {
    pub(super) fn new(host: &'h Host, ctid: Ctid, run: Option<RunState>) -> Self {
        Self {
            host,
            ctid,
            live: run.clone(),
            before: run,
            steps: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, undo: Undo) {
        self.steps.push(undo);
    }

    /// Records `names` under `<root>/etc` as they are now, before a step rewrites them.
    pub(super) fn save_etc_files(&mut self, root: &Path, names: &[&'static str]) -> Result<()> {
        let mut files = Vec::new();
        for &n in names {
            files.push((n, save_etc_file(root, n).map_err(net_err(self.ctid))?));
        }
        self.push(Undo::EtcFiles {
            root: root.to_path_buf(),
            files,
        });
        Ok(())
    }

    /// Undoes every recorded step, last first.
    pub(super) fn rollback(mut self, hooks: &mut dyn NetHooks) {
        let ctid = self.ctid;
        while let Some(step) = self.steps.pop() {
            if let Err(e) = self.undo(step, hooks) {
                warn!(%ctid, error = %ErrorChain(&e), "set: rollback step failed");
            }
        }
    }

    fn undo(&mut self, step: Undo, hooks: &mut dyn NetHooks) -> Result<()> {
        let (host, ctid) = (self.host, self.ctid);
        match step {
            Undo::Diskspace(before) => {
                debug!(%ctid, "rolling back: disk quota");
                let private = host.private_dir(ctid);
                match before {
                    Size::Unlimited => crate::quota::clear_diskspace(&private, ctid.get())?,
                    limit => crate::quota::set_diskspace(&private, ctid.get(), limit)?,
                }
            }
            Undo::Net {
                steps,
                before,
                cfg,
                shaping,
            } => {
                debug!(%ctid, "rolling back: network");
                self.undo_net(steps, before, &cfg, shaping.as_ref(), hooks)?;
            }
            Undo::Shaping { before } => {
                debug!(%ctid, "rolling back: shaping");
                if let Some(st) = self.live.as_mut() {
                    st.shaping = self.before.as_ref().and_then(|b| b.shaping.clone());
                    let net = st.net.clone().unwrap_or_else(|| NetState::new(ctid));
                    hooks
                        .shape(ctid, &net, before.as_ref())
                        .map_err(super::hook_err(ctid))?;
                }
            }
            Undo::Limits(cg, saved) => {
                debug!(%ctid, "rolling back: cgroup limits");
                cg.restore_limits(&saved).map_err(super::cg_err(ctid))?;
            }
            Undo::HostnameLive(before) => {
                debug!(%ctid, "rolling back: hostname");
                if let Some(st) = &self.live {
                    exec::set_hostname_live(ctid, st.init_pid, &before)?;
                }
            }
            Undo::EtcFiles { root, files } => {
                debug!(%ctid, root = %root.display(), "rolling back: /etc files");
                for (name, saved) in files.iter().rev() {
                    restore_etc_file(&root, name, saved).map_err(net_err(ctid))?;
                }
            }
            Undo::RunState => {
                debug!(%ctid, "rolling back: run state");
                if let Some(st) = &self.before {
                    let sp = host.state_path(ctid);
                    st.write(&sp).map_err(io_err(ctid, "write state", &sp))?;
                }
            }
        }
        Ok(())
    }

    /// Puts the network of the running CT back: each sub-step undone in reverse, then the
    /// datapath (and shaping) re-synced with what is there. Where that rebuilt a different
    /// state than before (an interface made again has a new ifindex), the run state file
    /// records the new one.
    fn undo_net(
        &mut self,
        steps: Vec<NetUndo>,
        before: Option<NetState>,
        cfg: &net::NetConfig,
        shaping: Option<&ShapingConfig>,
        hooks: &mut dyn NetHooks,
    ) -> Result<()> {
        let ctid = self.ctid;
        let Some(st) = self.live.as_mut() else {
            return Ok(());
        };
        let ns = open_ns(ctid, st.init_pid)?;
        let mut hn = HostNet::current().map_err(net_err(ctid))?;
        let state = st.net.get_or_insert_with(|| NetState::new(ctid));
        for step in steps.into_iter().rev() {
            let res = undo_net_step(ctid, ns.as_fd(), cfg, step, &mut hn, state, hooks);
            for e in res.unwrap_or_else(|e| vec![e]) {
                warn!(%ctid, error = %ErrorChain(&e), "set: rollback of the network");
            }
        }
        // The run state must name the interfaces as they are now (an undone --netif_del made
        // a new ifindex) even when re-attaching fails: a stale ifindex would make a later stop
        // detach whatever interface holds it then.
        let up = hooks
            .net_up(ctid, state, shaping)
            .map_err(super::hook_err(ctid));
        let empty = NetState::new(ctid);
        if same_net(state, before.as_ref().unwrap_or(&empty)) {
            st.net = before;
        }
        let recorded = self.before.as_ref().and_then(|b| b.net.as_ref());
        if let Some(b) = &self.before
            && st.net.as_ref() != recorded
        {
            let sp = self.host.state_path(ctid);
            RunState {
                net: st.net.clone(),
                ..b.clone()
            }
            .write(&sp)
            .map_err(io_err(ctid, "write state", &sp))?;
        }
        up
    }
}

/// One network sub-step undone; the errors of a best-effort removal come back as a list.
fn undo_net_step(
    ctid: Ctid,
    ns: std::os::fd::BorrowedFd<'_>,
    cfg: &net::NetConfig,
    step: NetUndo,
    hn: &mut HostNet,
    state: &mut NetState,
    hooks: &mut dyn NetHooks,
) -> std::result::Result<Vec<NetError>, NetError> {
    let take = |state: &NetState, pick: &dyn Fn(&net::IfaceState) -> bool| NetState {
        ctid,
        ifaces: state.ifaces.iter().filter(|i| pick(i)).cloned().collect(),
    };
    match step {
        NetUndo::DelNetif(name) => {
            let gone = take(state, &|i| i.mode == Mode::Bridged && i.ct_ifname == name);
            hooks.net_down(ctid, &gone);
            net::del_netif(ctid, Some(&name), hn, state)
        }
        NetUndo::DelAddrs {
            addrs,
            link_created,
        } => {
            if link_created {
                // The routed link came with these addresses; it goes with them.
                let gone = take(state, &|i| i.mode == Mode::Routed);
                hooks.net_down(ctid, &gone);
                state.ifaces.retain(|i| i.mode != Mode::Routed);
                Ok(net::teardown(&gone, hn, LinkTeardown::Delete))
            } else {
                net::del_addrs(ctid, Some(ns), &AddrSelection::Some(addrs), hn, state)
            }
        }
        NetUndo::AddNetifs(list) => {
            let mut errors = Vec::new();
            for b in list {
                if let Err(e) = net::add_netif(ctid, ns, &b, hn, state) {
                    errors.push(e);
                }
            }
            Ok(errors)
        }
        NetUndo::AddAddrs(addrs) if addrs.is_empty() => Ok(Vec::new()),
        NetUndo::AddAddrs(addrs) => {
            net::add_addrs(ctid, ns, cfg, &addrs, hn, state).map(|()| vec![])
        }
    }
}

/// The same interfaces with the same addresses and proxy entries, whatever their order.
fn same_net(a: &NetState, b: &NetState) -> bool {
    fn normal(n: &NetState) -> Vec<net::IfaceState> {
        let mut ifaces = n.ifaces.clone();
        for i in &mut ifaces {
            i.addrs.sort();
            i.proxy
                .sort_by(|x, y| (x.addr, x.ifindex, &x.dev).cmp(&(y.addr, y.ifindex, &y.dev)));
        }
        ifaces.sort_by(|x, y| x.host_ifname.cmp(&y.host_ifname));
        ifaces
    }
    a.ctid == b.ctid && normal(a) == normal(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_network_in_another_order() {
        let ctid = Ctid::new(101).unwrap();
        let mut cfg = net::NetConfig::default();
        cfg.ifaces.push(net::Iface::Routed(net::RoutedIface {
            addrs: vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()],
        }));
        cfg.ifaces
            .push(net::Iface::Bridged(net::BridgedIface::new("eth0")));
        let a = NetState::expected(ctid, &cfg);
        let mut b = a.clone();
        b.ifaces.reverse();
        b.ifaces[1].addrs.reverse();
        assert_ne!(a, b);
        assert!(same_net(&a, &b));
        b.ifaces[1].addrs.pop();
        assert!(!same_net(&a, &b));
        assert!(same_net(&NetState::new(ctid), &NetState::new(ctid)));
    }
}
