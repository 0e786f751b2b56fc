//! The maps. None is pinned by the object itself: user space pins each one under its versioned
//! bpffs directory (`EbpfLoader::map_pin_path`), so a test can use a private directory.
//!
//! The per-packet path only touches arrays (lookups the verifier inlines: no helper call, no
//! hashing) unless a fallback applies; see `berth_common` for the layout.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap},
};
use berth_common::{
    Config, CounterKey, CounterValue, DropValue, IfaceInfo, QuotaOverlay, SlotCounters, capacity,
};

use crate::account::{AddrKeyW, DropKeyW};

#[map]
pub static IFACES: Array<IfaceInfo> = Array::with_max_entries(capacity::IFACES, 0);

#[map]
pub static IFACES_SPILL: HashMap<u32, IfaceInfo> =
    HashMap::with_max_entries(capacity::IFACES_SPILL, BPF_F_NO_PREALLOC);

#[map]
pub static CT_ADDRS: HashMap<AddrKeyW, u32> = HashMap::with_max_entries(capacity::CT_ADDRS, 0);

#[map]
pub static CLASSES_V4: LpmTrie<u32, u32> = LpmTrie::with_max_entries(capacity::CLASSES, 0);

// 16 bytes as 4 words: `Key<[u32; 4]>` keeps the kernel's 4 + 16 byte key layout.
#[map]
pub static CLASSES_V6: LpmTrie<[u32; 4], u32> = LpmTrie::with_max_entries(capacity::CLASSES, 0);

#[map]
pub static COUNTERS: PerCpuArray<SlotCounters> = PerCpuArray::with_max_entries(capacity::SLOTS, 0);

/// slot → CTID owning it (0 = free). Only user space reads it; it lives here so that it is
/// pinned with the counters it gives meaning to.
#[map]
pub static SLOT_CTIDS: Array<u32> = Array::with_max_entries(capacity::SLOTS, 0);

/// Only user space writes it (totals of reclaimed slots); NO_PREALLOC keeps an idle host from
/// paying for capacity × possible CPUs of per-CPU memory up front.
#[map]
pub static ARCHIVE: PerCpuHashMap<CounterKey, CounterValue> =
    PerCpuHashMap::with_max_entries(capacity::ARCHIVE, BPF_F_NO_PREALLOC);

// Drops are rare: a hash keyed by CTID costs nothing on the path of legitimate traffic.
#[map]
pub static DROPS: PerCpuHashMap<DropKeyW, DropValue> =
    PerCpuHashMap::with_max_entries(capacity::DROPS, BPF_F_NO_PREALLOC);

/// Counted traffic dropped later (`undelivered.rs`); key = `CounterKey` as one word.
#[map]
pub static UNDELIVERED: PerCpuHashMap<u64, CounterValue> =
    PerCpuHashMap::with_max_entries(capacity::UNDELIVERED, BPF_F_NO_PREALLOC);

/// Only user space reads it (see `berth_common::QuotaOverlay`).
#[map]
pub static QUOTA: HashMap<u32, QuotaOverlay> =
    HashMap::with_max_entries(capacity::QUOTA, BPF_F_NO_PREALLOC);

#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
