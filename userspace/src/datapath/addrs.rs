//! The addresses each CT may use: `CT_ADDRS` (all of them) and the inline copies in the CT's
//! interface entries (the first 8 per family, what the fast path reads).

use std::{collections::HashSet, io, net::IpAddr, os::fd::AsFd};

use aya::maps::IterableMap;
use berth_common::{ADDR_ALLOWED, AddrKey, FAMILY_V4, FAMILY_V6, IfaceInfo, capacity, map_names};
use berth_runtime::Ctid;
use tracing::info;

use super::{Datapath, DatapathError, DatapathView, Result, map_values};
use crate::bpf::{io_err, map_err, not_found, sys};

fn v4_addr_key(ctid: u32, a: [u8; 4]) -> AddrKey {
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&a);
    AddrKey {
        ctid,
        family: FAMILY_V4,
        _pad: [0; 3],
        addr,
    }
}

pub(super) fn addr_key(ctid: Ctid, ip: IpAddr) -> AddrKey {
    match ip {
        IpAddr::V4(a) => v4_addr_key(ctid.get(), a.octets()),
        IpAddr::V6(a) => AddrKey {
            ctid: ctid.get(),
            family: FAMILY_V6,
            _pad: [0; 3],
            addr: a.octets(),
        },
    }
}

impl DatapathView {
    /// Addresses recorded for `ctid`.
    pub fn ct_addrs(&self, ctid: Ctid) -> Result<Vec<IpAddr>> {
        let mut out: Vec<IpAddr> = self
            .ct_addr_keys(Some(ctid.get()))?
            .into_iter()
            .map(|k| {
                if k.family == FAMILY_V4 {
                    IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
                } else {
                    IpAddr::from(k.addr)
                }
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// The `CT_ADDRS` keys (all, or one CT's). One batch syscall per 256 entries: iterating
    /// key by key costs a syscall per address on the node, on every start.
    pub(super) fn ct_addr_keys(&self, ctid: Option<u32>) -> Result<HashSet<AddrKey>> {
        let mut out = HashSet::new();
        match sys::lookup_batch::<AddrKey, u32>(self.ct_addrs.map().fd().as_fd()) {
            Ok(rows) => {
                out.extend(
                    rows.into_iter()
                        .map(|(k, _)| k)
                        .filter(|k| ctid.is_none_or(|c| c == k.ctid)),
                );
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                for key in self.ct_addrs.keys() {
                    let key =
                        key.map_err(map_err(map_names::CT_ADDRS, &self.pin_dir, "iterate"))?;
                    if ctid.is_none_or(|c| c == key.ctid) {
                        out.insert(key);
                    }
                }
            }
            Err(e) => {
                return Err(io_err("batch lookup", &self.map_path(map_names::CT_ADDRS))(e).into());
            }
        }
        Ok(out)
    }
}

impl Datapath {
    /// Rewrites the inline address copies of every interface of `ctid` to `addrs` (the CT's
    /// new set; `CT_ADDRS` may still hold stale ones at this point).
    /// `ifaces`: the CT's interfaces when the caller knows them; None scans every entry
    /// (`IFACES` is 3 MiB, a few milliseconds to read).
    fn refresh_inline_addrs(
        &mut self,
        ctid: Ctid,
        addrs: &[IpAddr],
        ifaces: Option<&[u32]>,
    ) -> Result<()> {
        let entries: Vec<(u32, IfaceInfo)> = match ifaces {
            None => self.iface_entries()?.into_iter().collect(),
            Some(list) => {
                let mut v = Vec::with_capacity(list.len());
                for &ifindex in list {
                    if let Some((_, info)) = self.find_iface(ifindex)? {
                        v.push((ifindex, info));
                    }
                }
                v
            }
        };
        for (ifindex, mut info) in entries {
            if info.ctid != ctid.get() {
                continue;
            }
            map_values::set_inline_addrs(&mut info, addrs);
            self.write_iface(ifindex, info)?;
        }
        Ok(())
    }

    /// Replaces the set of addresses `ctid` may use (routed mode: send from and receive for;
    /// bridged with `ip_filter`: send from). Validated before anything changes; new
    /// addresses are added before stale ones go, so kept addresses never see a gap.
    pub fn set_ct_addrs(&mut self, ctid: Ctid, addrs: &[IpAddr]) -> Result<()> {
        self.set_ct_addrs_inner(ctid, addrs, None)
    }

    /// [`Self::set_ct_addrs`] when the CT's interfaces are known (`ifaces`: host-side
    /// ifindexes): only their entries are rewritten, without scanning every interface entry.
    /// Interfaces attached to the CT but missing from `ifaces` keep their old inline copies.
    pub fn set_ct_addrs_on(&mut self, ctid: Ctid, addrs: &[IpAddr], ifaces: &[u32]) -> Result<()> {
        self.set_ct_addrs_inner(ctid, addrs, Some(ifaces))
    }

    fn set_ct_addrs_inner(
        &mut self,
        ctid: Ctid,
        addrs: &[IpAddr],
        ifaces: Option<&[u32]>,
    ) -> Result<()> {
        for &addr in addrs {
            let reason = match addr {
                IpAddr::V4(a) if a.is_unspecified() => Some("unspecified"),
                IpAddr::V4(a) if a.is_multicast() => Some("multicast"),
                IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
                IpAddr::V6(a) if a.is_unspecified() => Some("unspecified"),
                IpAddr::V6(a) if a.is_multicast() => Some("multicast"),
                _ => None,
            };
            if let Some(reason) = reason {
                return Err(DatapathError::InvalidAddr { ctid, addr, reason });
            }
        }
        let wanted: HashSet<AddrKey> = addrs.iter().map(|&a| addr_key(ctid, a)).collect();
        let all = self.ct_addr_keys(None)?;
        let total = all.len();
        let existing: HashSet<AddrKey> = all.into_iter().filter(|k| k.ctid == ctid.get()).collect();
        let adding = wanted.difference(&existing).count();
        if total + adding > capacity::CT_ADDRS as usize {
            return Err(DatapathError::TooManyAddrs {
                ctid,
                count: adding,
                capacity: capacity::CT_ADDRS - total as u32,
            });
        }
        for key in wanted.difference(&existing) {
            self.view
                .ct_addrs
                .insert(key, ADDR_ALLOWED, 0)
                .map_err(map_err(map_names::CT_ADDRS, &self.view.pin_dir, "insert"))?;
        }
        // CT_ADDRS holds old + new now; the inline copies switch to the new set, then the
        // stale keys go: a kept address is found at every moment.
        self.refresh_inline_addrs(ctid, addrs, ifaces)?;
        for key in existing.difference(&wanted) {
            self.remove_addr_key(key)?;
        }
        info!(%ctid, count = addrs.len(), "CT addresses set");
        Ok(())
    }

    fn remove_addr_key(&mut self, key: &AddrKey) -> Result<()> {
        match self.view.ct_addrs.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(map_names::CT_ADDRS, &self.view.pin_dir, "remove")(e).into()),
        }
    }

    /// Forgets the CT's addresses (the CT is stopped or destroyed). Its counters stay for
    /// billing; its interfaces are detached separately ([`Self::detach`]).
    pub fn remove_ct(&mut self, ctid: Ctid) -> Result<()> {
        for key in self.ct_addr_keys(Some(ctid.get()))? {
            self.remove_addr_key(&key)?;
        }
        self.refresh_inline_addrs(ctid, &[], None)
    }
}
