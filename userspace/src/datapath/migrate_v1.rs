//! Migration from the previous pin directory layout.
//!
//! `v1` (berth before the fast-path layout) kept interfaces in a hash keyed by ifindex with a
//! 12-byte value, counters in a per-CPU hash keyed by (CTID, direction, class, family), and
//! an 8-byte `CONFIG`. When `<root>/v2` is opened and `<root>/v1` exists, everything moves
//! over: settings, class table and addresses are copied; each live interface is attached to
//! the v2 programs by moving its pinned TCX link into `v2/links` and switching the link's
//! program (`BPF_LINK_UPDATE`, atomic: every packet is counted by exactly one generation);
//! then the v1 counters and drops, final because no v1 program runs any more, are added to
//! v2's `ARCHIVE` and `DROPS`, row by row, each row deleted from v1 once added (a migration
//! interrupted and resumed adds nothing twice); finally v1 is unpinned.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, IterableMap, LpmTrie, MapData, PerCpuHashMap, PerCpuValues};
use berth_common::{
    AddrKey, CounterKey, CounterValue, DropKey, DropValue, FAMILY_V4, LAYER_L3, MAX_CLASSES,
    map_names,
};
use berth_runtime::Ctid;
use ipnet::IpNet;
use tracing::{info, warn};

use super::{ByteLayer, ClassEntry, Datapath, DatapathConfig, FROM_CT, IfaceConfig, Result, TO_CT};
use crate::bpf::{self, Access, PinLock, io_err, map_err, not_found, nr_cpus, open_map, sys};

/// The v1 `IFACES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct IfaceInfoV1 {
    ctid: u32,
    mode: u8,
    flags: u8,
    mac: [u8; 6],
}
const _: () = assert!(size_of::<IfaceInfoV1>() == 12);

/// The v1 `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConfigV1 {
    byte_layer: u32,
    default_class: u32,
}

// SAFETY: #[repr(C)], integers and byte arrays only, no padding (sizes asserted).
unsafe impl aya::Pod for IfaceInfoV1 {}
// SAFETY: as above.
unsafe impl aya::Pod for ConfigV1 {}

/// `<root>/v1` when `pin_dir` is `<root>/v2`.
fn v1_of(pin_dir: &Path) -> Option<PathBuf> {
    (pin_dir.file_name()? == "v2").then(|| pin_dir.with_file_name("v1"))
}

impl Datapath {
    /// Migrates `<root>/v1` into this `<root>/v2` datapath, if there is one.
    pub(super) fn migrate_v1(&mut self) -> Result<()> {
        let Some(v1) = v1_of(&self.view.pin_dir) else {
            return Ok(());
        };
        let maps = v1.join("maps");
        if !maps.join(map_names::IFACES).exists() {
            return Ok(());
        }
        let _lock = PinLock::take(&v1)?;
        info!(from = %v1.display(), to = %self.view.pin_dir.display(), "migrating the v1 datapath");

        if let Ok(cfg) = open_map::<Array<MapData, ConfigV1>>(
            &maps,
            map_names::CONFIG,
            4,
            size_of::<ConfigV1>(),
            Access::ReadWrite,
        ) {
            let raw = cfg
                .get(&0, 0)
                .map_err(map_err(map_names::CONFIG, &v1, "get"))?;
            self.set_config(DatapathConfig {
                byte_layer: if raw.byte_layer == u32::from(LAYER_L3) {
                    ByteLayer::L3
                } else {
                    ByteLayer::L2
                },
                default_class: (raw.default_class % MAX_CLASSES) as u8,
            })?;
        }
        self.migrate_classes(&maps, &v1)?;
        self.migrate_addrs(&maps, &v1)?;
        self.migrate_ifaces(&maps, &v1)?;
        self.migrate_counters(&maps, &v1)?;

        // Not unload_all: its clean-up of cls_bpf filters would find the filters v2 has just
        // installed under the same names.
        bpf::remove_tree(&v1)?;
        info!(path = %v1.display(), "v1 datapath migrated and removed");
        Ok(())
    }

    fn migrate_classes(&mut self, maps: &Path, v1: &Path) -> Result<()> {
        let mut entries = Vec::new();
        if let Ok(t) = open_map::<LpmTrie<MapData, [u8; 4], u32>>(
            maps,
            map_names::CLASSES_V4,
            8,
            4,
            Access::ReadWrite,
        ) {
            for item in t.iter() {
                let (k, class) = item.map_err(map_err(map_names::CLASSES_V4, v1, "iterate"))?;
                if let Ok(n) = ipnet::Ipv4Net::new(k.data().into(), k.prefix_len() as u8) {
                    entries.push(ClassEntry {
                        class: (class % MAX_CLASSES) as u8,
                        net: IpNet::V4(n),
                    });
                }
            }
        }
        if let Ok(t) = open_map::<LpmTrie<MapData, [u8; 16], u32>>(
            maps,
            map_names::CLASSES_V6,
            20,
            4,
            Access::ReadWrite,
        ) {
            for item in t.iter() {
                let (k, class) = item.map_err(map_err(map_names::CLASSES_V6, v1, "iterate"))?;
                if let Ok(n) = ipnet::Ipv6Net::new(k.data().into(), k.prefix_len() as u8) {
                    entries.push(ClassEntry {
                        class: (class % MAX_CLASSES) as u8,
                        net: IpNet::V6(n),
                    });
                }
            }
        }
        if !entries.is_empty() {
            self.load_classes(&entries)?;
        }
        Ok(())
    }

    fn migrate_addrs(&mut self, maps: &Path, v1: &Path) -> Result<()> {
        let Ok(addrs) = open_map::<HashMap<MapData, AddrKey, u32>>(
            maps,
            map_names::CT_ADDRS,
            size_of::<AddrKey>(),
            4,
            Access::ReadWrite,
        ) else {
            return Ok(());
        };
        let mut by_ct: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for key in addrs.keys() {
            let k = key.map_err(map_err(map_names::CT_ADDRS, v1, "iterate"))?;
            let ip = if k.family == FAMILY_V4 {
                IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
            } else {
                IpAddr::from(k.addr)
            };
            by_ct.entry(k.ctid).or_default().push(ip);
        }
        for (ctid, mut list) in by_ct {
            let Ok(ctid) = Ctid::new(ctid) else {
                warn!(ctid, "v1 addresses of an invalid CTID skipped");
                continue;
            };
            // Addresses v2 already has for the CT (a resumed migration, or set since) stay.
            list.extend(self.ct_addrs(ctid)?);
            list.sort();
            list.dedup();
            self.set_ct_addrs(ctid, &list)?;
        }
        Ok(())
    }

    fn migrate_ifaces(&mut self, maps: &Path, v1: &Path) -> Result<()> {
        let ifaces = open_map::<HashMap<MapData, u32, IfaceInfoV1>>(
            maps,
            map_names::IFACES,
            4,
            size_of::<IfaceInfoV1>(),
            Access::ReadWrite,
        )?;
        let entries: Vec<(u32, IfaceInfoV1)> = ifaces.iter().filter_map(|r| r.ok()).collect();
        for (ifindex, raw) in entries {
            if sys::if_indextoname(ifindex).is_none() {
                continue;
            }
            let from = v1.join("links").join(ifindex.to_string());
            let to = self.view.pin_dir.join("links").join(ifindex.to_string());
            fs::create_dir_all(&to).map_err(io_err("creating", &to))?;
            for file in [FROM_CT.file, TO_CT.file] {
                let src = from.join(file);
                if !src.exists() {
                    continue;
                }
                let dst = to.join(file);
                if dst.exists() {
                    fs::remove_file(&src).map_err(io_err("unpinning", &src))?;
                } else {
                    // bpffs supports rename: the link object keeps running meanwhile.
                    fs::rename(&src, &dst).map_err(io_err("moving link pin", &src))?;
                }
            }
            // Attaching finds the moved link running a v1 program and switches it.
            let config = IfaceConfig::from_raw(berth_common::IfaceInfo {
                ctid: raw.ctid,
                mode: raw.mode,
                flags: raw.flags,
                mac: raw.mac,
                ..berth_common::IfaceInfo::EMPTY
            });
            match config {
                Some(config) => self.attach(ifindex, config)?,
                None => warn!(
                    ifindex,
                    ctid = raw.ctid,
                    "v1 interface entry without a valid CTID skipped"
                ),
            }
        }
        Ok(())
    }

    fn migrate_counters(&mut self, maps: &Path, v1: &Path) -> Result<()> {
        let ncpus = nr_cpus()?;
        if let Ok(mut old) = open_map::<PerCpuHashMap<MapData, CounterKey, CounterValue>>(
            maps,
            map_names::COUNTERS,
            size_of::<CounterKey>(),
            size_of::<CounterValue>(),
            Access::ReadWrite,
        ) {
            let rows =
                sys::lookup_batch_percpu::<CounterKey, CounterValue>(old.map().fd().as_fd(), ncpus)
                    .map_err(io_err("batch lookup", &maps.join(map_names::COUNTERS)))?;
            for (key, vals) in rows {
                self.archive_add(&key, &vals)?;
                old.remove(&key)
                    .map_err(map_err(map_names::COUNTERS, v1, "remove"))?;
            }
        }
        if let Ok(mut old) = open_map::<PerCpuHashMap<MapData, DropKey, DropValue>>(
            maps,
            map_names::DROPS,
            size_of::<DropKey>(),
            size_of::<DropValue>(),
            Access::ReadWrite,
        ) {
            let rows =
                sys::lookup_batch_percpu::<DropKey, DropValue>(old.map().fd().as_fd(), ncpus)
                    .map_err(io_err("batch lookup", &maps.join(map_names::DROPS)))?;
            for (key, vals) in rows {
                let mut sum: Vec<DropValue> = match self.view.drops.get(&key, 0) {
                    Ok(v) => v.iter().copied().collect(),
                    Err(e) if not_found(&e) => vec![DropValue::default(); vals.len()],
                    Err(e) => {
                        return Err(map_err(map_names::DROPS, &self.view.pin_dir, "get")(e).into());
                    }
                };
                for (acc, v) in sum.iter_mut().zip(&vals) {
                    acc.packets += v.packets;
                    acc.bytes += v.bytes;
                }
                let sum = PerCpuValues::try_from(sum).map_err(io_err(
                    "building per-CPU values for",
                    &self.map_path(map_names::DROPS),
                ))?;
                self.view.drops.insert(key, sum, 0).map_err(map_err(
                    map_names::DROPS,
                    &self.view.pin_dir,
                    "insert",
                ))?;
                old.remove(&key)
                    .map_err(map_err(map_names::DROPS, v1, "remove"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_v2_looks_for_v1() {
        assert_eq!(
            v1_of(Path::new("/sys/fs/bpf/berth/v2")),
            Some(PathBuf::from("/sys/fs/bpf/berth/v1"))
        );
        assert_eq!(v1_of(Path::new("/sys/fs/bpf/berth-test-1x0")), None);
    }
}
