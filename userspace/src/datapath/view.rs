//! The datapath's pinned maps, typed. Readers (berthd, `berth netstat`, `list -o traffic.*`,
//! `netclass list`) open them read-only with [`DatapathView::open_pinned`]: nothing is loaded,
//! pinned, created, locked or attached, and the kernel refuses writes through the fds. A
//! [`super::Datapath`] holds the same view over read-write fds.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap};
use berth_common::{
    AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, IfaceInfo, QuotaOverlay,
    SlotCounters, map_names,
};

use super::Result;
use crate::bpf::{self, Access, open_map};

/// The datapath's maps pinned under one pin directory.
pub struct DatapathView {
    pub(super) pin_dir: PathBuf,
    pub(super) ifaces: Array<MapData, IfaceInfo>,
    pub(super) ifaces_spill: HashMap<MapData, u32, IfaceInfo>,
    pub(super) ct_addrs: HashMap<MapData, AddrKey, u32>,
    pub(super) classes_v4: LpmTrie<MapData, [u8; 4], u32>,
    pub(super) classes_v6: LpmTrie<MapData, [u8; 16], u32>,
    pub(super) counters: PerCpuArray<MapData, SlotCounters>,
    pub(super) slot_ctids: Array<MapData, u32>,
    pub(super) archive: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pub(super) drops: PerCpuHashMap<MapData, DropKey, DropValue>,
    pub(super) config: Array<MapData, Config>,
    /// `None` in a pin directory an older berth made, until the next load creates it.
    pub(super) undelivered: Option<PerCpuHashMap<MapData, u64, CounterValue>>,
    /// As `undelivered`.
    pub(super) quota: Option<HashMap<MapData, u32, QuotaOverlay>>,
}

impl DatapathView {
    /// The datapath pinned under `pin_dir`, read-only; `Ok(None)` when no datapath is pinned
    /// there (never loaded, unloaded, or an empty or absent directory). A pinned map with
    /// another layout is an error ([`bpf::BpfError::IncompatibleMap`]).
    pub fn open_pinned(pin_dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let pin_dir = pin_dir.as_ref();
        if !bpf::maps_pinned(&pin_dir.join("maps"), &map_names::REQUIRED) {
            return Ok(None);
        }
        Self::open(pin_dir, Access::ReadOnly).map(Some)
    }

    /// Every map under `pin_dir/maps`, which must exist.
    pub(super) fn open(pin_dir: &Path, access: Access) -> Result<Self> {
        let maps = pin_dir.join("maps");
        let maps = maps.as_path();
        Ok(Self {
            ifaces: open_map(maps, map_names::IFACES, 4, size_of::<IfaceInfo>(), access)?,
            ifaces_spill: open_map(
                maps,
                map_names::IFACES_SPILL,
                4,
                size_of::<IfaceInfo>(),
                access,
            )?,
            ct_addrs: open_map(maps, map_names::CT_ADDRS, size_of::<AddrKey>(), 4, access)?,
            classes_v4: open_map(maps, map_names::CLASSES_V4, 8, 4, access)?,
            classes_v6: open_map(maps, map_names::CLASSES_V6, 20, 4, access)?,
            counters: open_map(
                maps,
                map_names::COUNTERS,
                4,
                size_of::<SlotCounters>(),
                access,
            )?,
            slot_ctids: open_map(maps, map_names::SLOT_CTIDS, 4, 4, access)?,
            archive: open_map(
                maps,
                map_names::ARCHIVE,
                size_of::<CounterKey>(),
                size_of::<CounterValue>(),
                access,
            )?,
            drops: open_map(
                maps,
                map_names::DROPS,
                size_of::<DropKey>(),
                size_of::<DropValue>(),
                access,
            )?,
            config: open_map(maps, map_names::CONFIG, 4, size_of::<Config>(), access)?,
            undelivered: if maps.join(map_names::UNDELIVERED).exists() {
                Some(open_map(
                    maps,
                    map_names::UNDELIVERED,
                    8,
                    size_of::<CounterValue>(),
                    access,
                )?)
            } else {
                None
            },
            quota: if maps.join(map_names::QUOTA).exists() {
                Some(open_map(
                    maps,
                    map_names::QUOTA,
                    4,
                    size_of::<QuotaOverlay>(),
                    access,
                )?)
            } else {
                None
            },
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub(super) fn map_path(&self, name: &str) -> PathBuf {
        self.pin_dir.join("maps").join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_pinned_is_none_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("v2");
        assert!(DatapathView::open_pinned(&pin).unwrap().is_none());
        assert!(
            !pin.exists(),
            "a read-only open must not create the pin dir"
        );
        std::fs::create_dir_all(pin.join("maps")).unwrap();
        assert!(DatapathView::open_pinned(&pin).unwrap().is_none());
        assert_eq!(std::fs::read_dir(pin.join("maps")).unwrap().count(), 0);
    }
}
