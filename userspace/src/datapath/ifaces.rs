//! Interface entries (`IFACES[ifindex % N]`, else `IFACES_SPILL[ifindex]`) and attaching the
//! programs to host-side interfaces.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::fd::AsFd,
    path::PathBuf,
};

use aya::maps::IterableMap;
use berth_common::{IfaceInfo, capacity, map_names};
use tracing::{debug, info};

use super::{
    AttachMethod, AttachedIface, Datapath, DatapathError, DatapathView, FROM_CT, IfaceConfig,
    Result, TO_CT, map_values,
};
use crate::bpf::{
    self, PinLock,
    attach::{self as hooks, Hook, LinkState, Place},
    io_err, map_err, not_found, sys,
};

/// Where an interface's entry lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IfaceAt {
    /// `IFACES[ifindex % capacity::IFACES]`.
    Array,
    /// `IFACES_SPILL[ifindex]`: its array position holds another interface.
    Spill,
}

fn iface_pos(ifindex: u32) -> u32 {
    ifindex % capacity::IFACES
}

fn ifname_of(ifindex: u32) -> Result<String> {
    sys::if_indextoname(ifindex).ok_or(DatapathError::NoSuchIfindex { ifindex })
}

impl DatapathView {
    pub(super) fn find_iface(&self, ifindex: u32) -> Result<Option<(IfaceAt, IfaceInfo)>> {
        let at = self.ifaces.get(&iface_pos(ifindex), 0).map_err(map_err(
            map_names::IFACES,
            &self.pin_dir,
            "get",
        ))?;
        if at.ifindex == ifindex && ifindex != 0 {
            return Ok(Some((IfaceAt::Array, at)));
        }
        match self.ifaces_spill.get(&ifindex, 0) {
            Ok(v) => Ok(Some((IfaceAt::Spill, v))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map_names::IFACES_SPILL, &self.pin_dir, "get")(e).into()),
        }
    }

    /// Every interface entry (array and spill), by ifindex.
    pub(super) fn iface_entries(&self) -> Result<BTreeMap<u32, IfaceInfo>> {
        let mut out = BTreeMap::new();
        let rows = sys::lookup_batch::<u32, IfaceInfo>(self.ifaces.map().fd().as_fd())
            .map_err(io_err("batch lookup", &self.map_path(map_names::IFACES)))?;
        for (_, v) in rows {
            if v.ifindex != 0 {
                out.insert(v.ifindex, v);
            }
        }
        for item in self.ifaces_spill.iter() {
            let (k, v) =
                item.map_err(map_err(map_names::IFACES_SPILL, &self.pin_dir, "iterate"))?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Every interface with an entry (`IFACES` or `IFACES_SPILL`), by ifindex.
    pub fn attached(&self) -> Result<Vec<AttachedIface>> {
        Ok(self
            .iface_entries()?
            .into_iter()
            .filter_map(|(ifindex, raw)| {
                Some(AttachedIface {
                    ifindex,
                    ifname: sys::if_indextoname(ifindex),
                    config: IfaceConfig::from_raw(raw)?,
                })
            })
            .collect())
    }
}

impl Datapath {
    /// Attaches both programs to the host-side interface `ifindex` and records what they
    /// enforce there. Idempotent: attaching again updates the config (and the program, if it
    /// changed). On failure nothing stays attached or recorded.
    pub fn attach(&mut self, ifindex: u32, config: IfaceConfig) -> Result<()> {
        if config.mac_filter && config.mac == [0; 6] {
            return Err(DatapathError::InvalidIfaceConfig {
                ctid: config.ctid,
                reason: "mac_filter needs the CT's MAC (got 00:00:00:00:00:00)".to_owned(),
            });
        }
        let ifname = ifname_of(ifindex)?;
        let _lock = PinLock::take(&self.view.pin_dir)?;
        let previous = self.find_iface(ifindex)?;
        let slot = self.slot_for(config.ctid)?;
        let mut raw = config.to_raw(ifindex, slot);
        raw.flags |= self.quota_cut_flag(config.ctid)?;
        if let Some((_, p)) = previous {
            // Keep the address positions a concurrent reader may be using.
            raw.v4 = p.v4;
            raw.v6 = p.v6;
        }
        map_values::set_inline_addrs(&mut raw, &self.ct_addrs(config.ctid)?);
        // The entry goes first: from the first packet the programs see, the CT is known.
        self.write_iface(ifindex, raw)?;
        // An interface that already has pinned TCX links keeps them (switched to the current
        // programs), whatever the default: a cls_bpf filter next to them would run twice.
        let links = self.links_dir(ifindex);
        let has_links = [FROM_CT.file, TO_CT.file]
            .iter()
            .any(|f| links.join(f).exists());
        let res = match (self.method, has_links) {
            (AttachMethod::Tcx, _) | (AttachMethod::Netlink, true) => {
                self.attach_tcx(ifindex, &ifname, true)
            }
            (AttachMethod::Netlink, false) => self.attach_cls_bpf(ifindex, &ifname),
        };
        if let Err(e) = res {
            let _ = self.detach_links(ifindex, Some(&ifname));
            let _ = match previous {
                Some((_, p)) => self.write_iface(ifindex, p),
                None => self.remove_iface(ifindex),
            };
            return Err(e);
        }
        info!(ifindex, ifname, ctid = %config.ctid, slot, mode = ?config.mode, method = ?self.method, "datapath attached");
        Ok(())
    }

    pub(super) fn write_iface(&mut self, ifindex: u32, info: IfaceInfo) -> Result<()> {
        let pos = iface_pos(ifindex);
        let at = self.view.ifaces.get(&pos, 0).map_err(map_err(
            map_names::IFACES,
            &self.view.pin_dir,
            "get",
        ))?;
        if at.ifindex == 0 || at.ifindex == ifindex {
            self.view.ifaces.set(pos, info, 0).map_err(map_err(
                map_names::IFACES,
                &self.view.pin_dir,
                "set",
            ))?;
            return self.remove_spill(ifindex);
        }
        debug!(
            ifindex,
            holder = at.ifindex,
            "IFACES position taken; using the spill map"
        );
        let pin_dir = self.view.pin_dir.clone();
        self.view
            .ifaces_spill
            .insert(ifindex, info, 0)
            .map_err(map_err(map_names::IFACES_SPILL, &pin_dir, "insert"))?;
        Ok(())
    }

    fn remove_spill(&mut self, ifindex: u32) -> Result<()> {
        match self.view.ifaces_spill.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(map_names::IFACES_SPILL, &self.view.pin_dir, "remove")(e).into()),
        }
    }

    /// Removes the entry; a spilled interface waiting for the freed array position moves in
    /// (written there before it leaves the spill map, so it is never missing).
    fn remove_iface(&mut self, ifindex: u32) -> Result<()> {
        match self.find_iface(ifindex)? {
            None => Ok(()),
            Some((IfaceAt::Spill, _)) => self.remove_spill(ifindex),
            Some((IfaceAt::Array, _)) => {
                let pos = iface_pos(ifindex);
                let waiting = self
                    .ifaces_spill
                    .iter()
                    .filter_map(|r| r.ok())
                    .find(|(k, _)| iface_pos(*k) == pos);
                let next = waiting.map(|(_, v)| v).unwrap_or(IfaceInfo::EMPTY);
                let pin_dir = self.view.pin_dir.clone();
                self.view.ifaces.set(pos, next, 0).map_err(map_err(
                    map_names::IFACES,
                    &pin_dir,
                    "set",
                ))?;
                if next.ifindex != 0 {
                    self.remove_spill(next.ifindex)?;
                }
                Ok(())
            }
        }
    }

    fn links_dir(&self, ifindex: u32) -> PathBuf {
        self.view.pin_dir.join("links").join(ifindex.to_string())
    }

    /// Brings the TCX links of `ifindex` to the current programs; with `create`, attaches the
    /// missing ones (false while upgrading: only existing links are updated).
    pub(super) fn attach_tcx(&mut self, ifindex: u32, ifname: &str, create: bool) -> Result<()> {
        let dir = self.links_dir(ifindex);
        bpf::create_dirs(&[&dir])?;
        let mut todo = Vec::with_capacity(2);
        for mut a in self.attachments() {
            let file = if a.program == FROM_CT.name {
                FROM_CT.file
            } else {
                TO_CT.file
            };
            let path = dir.join(file);
            let hook = Hook {
                ifindex,
                ifname,
                attach_type: a.attach_type,
            };
            let state = hooks::refresh_tcx_link(&mut a, &hook, &path)?;
            if state == LinkState::Missing && create && !ifname.is_empty() {
                todo.push((a, path));
            }
        }
        // First on the hook: accounting and anti-spoofing see packets before any other
        // program (e.g. a shaping classifier) acts on them.
        hooks::create_tcx_links(todo, ifname, ifindex, Place::First)?;
        if !create
            && fs::read_dir(&dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            let _ = fs::remove_dir(&dir);
        }
        Ok(())
    }

    pub(super) fn attach_cls_bpf(&mut self, ifindex: u32, ifname: &str) -> Result<()> {
        for mut a in self.attachments() {
            let hook = Hook {
                ifindex,
                ifname,
                attach_type: a.attach_type,
            };
            hooks::attach_cls_bpf(&mut a, &hook, Place::First)?;
        }
        Ok(())
    }

    fn detach_links(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<()> {
        bpf::remove_tree(&self.links_dir(ifindex))?;
        if let Some(ifname) = ifname {
            for a in self.attachments() {
                hooks::detach_cls_bpf(ifname, a.attach_type, a.program);
            }
        }
        Ok(())
    }

    /// Detaches the programs from `ifindex` and forgets its config. Counters stay. Missing
    /// links or entries are fine (an interface that vanished has lost its links already).
    pub fn detach(&mut self, ifindex: u32) -> Result<()> {
        let _lock = PinLock::take(&self.view.pin_dir)?;
        let ifname = sys::if_indextoname(ifindex);
        self.detach_links(ifindex, ifname.as_deref())?;
        self.remove_iface(ifindex)?;
        info!(
            ifindex,
            ifname = ifname.as_deref().unwrap_or("-"),
            "datapath detached"
        );
        Ok(())
    }

    /// Removes attachments whose interface no longer exists (a CT's veth deleted with its
    /// namespace): their link pins and `IFACES` entries. Returns the ifindexes cleaned.
    pub fn gc(&mut self) -> Result<Vec<u32>> {
        let mut gone = BTreeSet::new();
        for iface in self.attached()? {
            if iface.ifname.is_none() {
                gone.insert(iface.ifindex);
            }
        }
        for (ifindex, dir) in hooks::link_dirs(&self.view.pin_dir.join("links"))? {
            let dead = [FROM_CT.file, TO_CT.file]
                .iter()
                .any(|f| !hooks::tcx_link_alive(&dir.join(f), ifindex));
            if dead || sys::if_indextoname(ifindex).is_none() {
                gone.insert(ifindex);
            }
        }
        for &ifindex in &gone {
            self.detach(ifindex)?;
        }
        Ok(gone.into_iter().collect())
    }
}
