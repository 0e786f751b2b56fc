//! The maps. None is pinned by the object itself: user space pins each one under its versioned
//! bpffs directory (`EbpfLoader::map_pin_path`), so a test can use a private directory.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuHashMap},
};
use berth_common::{
    AddrKey, Config, CounterKey, CounterValue, DropKey, DropValue, IfaceInfo, capacity,
};

#[map]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::with_max_entries(capacity::IFACES, 0);

#[map]
pub static CT_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(capacity::CT_ADDRS, 0);

#[map]
pub static CLASSES_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(capacity::CLASSES, 0);

#[map]
pub static CLASSES_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(capacity::CLASSES, 0);

// Rows appear on first use; NO_PREALLOC keeps an idle host from paying for
// capacity × possible CPUs of per-CPU memory up front.
#[map]
pub static COUNTERS: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::with_max_entries(capacity::COUNTERS, BPF_F_NO_PREALLOC);

#[map]
pub static DROPS: PerCpuHashMap<DropKey, DropValue> =
    PerCpuHashMap::with_max_entries(capacity::DROPS, BPF_F_NO_PREALLOC);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
