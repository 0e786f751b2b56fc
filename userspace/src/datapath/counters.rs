//! Reading the traffic and drop totals: every slot's rows plus the archive, summed over CPUs.

use std::{collections::BTreeMap, io, os::fd::AsFd};

use aya::maps::{IterableMap, MapData, PerCpuHashMap};
use berth_common::{CounterKey, DropKey, DropValue, SlotCounters, map_names};
use tracing::debug;

use super::{CounterRow, DatapathView, Direction, DropReason, DropRow, Family, Result, map_values};
use crate::bpf::{io_err, map_err, nr_cpus, sys};

impl DatapathView {
    /// Every traffic counter row, summed over CPUs, sorted by (CTID, direction, class,
    /// family).
    pub fn counters(&self) -> Result<Vec<CounterRow>> {
        let mut sums: BTreeMap<CounterKey, (u64, u64)> = BTreeMap::new();
        for (k, vals) in self.read_percpu(&self.archive, map_names::ARCHIVE)? {
            let e = sums.entry(k).or_default();
            e.0 += vals.iter().map(|v| v.bytes).sum::<u64>();
            e.1 += vals.iter().map(|v| v.packets).sum::<u64>();
        }
        let owners = self.slot_ctids()?;
        let used = owners.iter().filter(|c| **c != 0).count();
        // Many CTs: the whole array in a few batch syscalls (the same bytes, ~1 µs less per
        // slot); few: only the used slots, not every slot's per-CPU rows.
        let batch = if used > 64 {
            match sys::lookup_batch_percpu::<u32, SlotCounters>(
                self.counters.map().fd().as_fd(),
                nr_cpus()?,
            ) {
                Ok(rows) => Some(
                    rows.into_iter()
                        .collect::<BTreeMap<u32, Vec<SlotCounters>>>(),
                ),
                Err(e) if e.kind() == io::ErrorKind::Unsupported => None,
                Err(e) => {
                    return Err(
                        io_err("batch lookup", &self.map_path(map_names::COUNTERS))(e).into(),
                    );
                }
            }
        } else {
            None
        };
        for (slot, ctid) in owners.into_iter().enumerate() {
            if ctid == 0 {
                continue;
            }
            let fetched;
            let vals: &[SlotCounters] = match batch.as_ref().and_then(|b| b.get(&(slot as u32))) {
                Some(v) => v,
                None => {
                    fetched = self.counters.get(&(slot as u32), 0).map_err(map_err(
                        map_names::COUNTERS,
                        &self.pin_dir,
                        "get",
                    ))?;
                    &fetched
                }
            };
            for row in 0..berth_common::SLOT_ROWS {
                let bytes: u64 = vals.iter().map(|v| v.rows[row].bytes).sum();
                let packets: u64 = vals.iter().map(|v| v.rows[row].packets).sum();
                if bytes == 0 && packets == 0 {
                    continue;
                }
                let e = sums.entry(map_values::row_key(ctid, row)).or_default();
                e.0 += bytes;
                e.1 += packets;
            }
        }
        let mut out: Vec<CounterRow> = sums
            .into_iter()
            .filter(|(_, (b, p))| *b != 0 || *p != 0)
            .map(|(k, (bytes, packets))| CounterRow {
                ctid: k.ctid,
                dir: Direction::from_raw(k.dir),
                class: k.class,
                family: Family::from_raw(k.family),
                bytes,
                packets,
            })
            .collect();
        out.sort_by_key(|r| (r.ctid, r.dir, r.class, r.family));
        Ok(out)
    }

    /// Traffic that was counted and then dropped by the shaper (its queues, packet-rate
    /// limit or EDT horizon), summed over CPUs, sorted like [`Self::counters`]: what was
    /// delivered is a counter row minus its row here. Empty where nothing is shaped or the
    /// kernel cannot seal (see `berth_common::undelivered`).
    pub fn undelivered(&self) -> Result<Vec<CounterRow>> {
        let Some(map) = &self.undelivered else {
            return Ok(Vec::new());
        };
        let mut out: Vec<CounterRow> = self
            .read_percpu(map, map_names::UNDELIVERED)?
            .into_iter()
            .map(|(k, vals)| {
                let k = CounterKey {
                    ctid: k as u32,
                    dir: (k >> 32) as u8,
                    class: (k >> 40) as u8,
                    family: (k >> 48) as u8,
                    _pad: 0,
                };
                CounterRow {
                    ctid: k.ctid,
                    dir: Direction::from_raw(k.dir),
                    class: k.class,
                    family: Family::from_raw(k.family),
                    bytes: vals.iter().map(|v| v.bytes).sum(),
                    packets: vals.iter().map(|v| v.packets).sum(),
                }
            })
            .filter(|r| r.bytes != 0 || r.packets != 0)
            .collect();
        out.sort_by_key(|r| (r.ctid, r.dir, r.class, r.family));
        Ok(out)
    }

    /// Every drop counter row, summed over CPUs.
    pub fn drops(&self) -> Result<Vec<DropRow>> {
        let rows = self.read_percpu(&self.drops, map_names::DROPS)?;
        let mut out: Vec<DropRow> = rows
            .into_iter()
            .map(|(k, vals): (DropKey, Vec<DropValue>)| DropRow {
                ctid: k.ctid,
                dir: Direction::from_raw(k.dir),
                reason: DropReason::from_raw(k.reason),
                packets: vals.iter().map(|v| v.packets).sum(),
                bytes: vals.iter().map(|v| v.bytes).sum(),
            })
            .collect();
        out.sort_by_key(|r| (r.ctid, r.dir, r.reason));
        Ok(out)
    }

    pub(super) fn read_percpu<K: aya::Pod + Eq + Ord, V: aya::Pod>(
        &self,
        map: &PerCpuHashMap<MapData, K, V>,
        name: &'static str,
    ) -> Result<Vec<(K, Vec<V>)>> {
        let nr_cpus = nr_cpus()?;
        match sys::lookup_batch_percpu::<K, V>(map.map().fd().as_fd(), nr_cpus) {
            Ok(rows) => return Ok(rows),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                debug!(map = name, "no BPF_MAP_LOOKUP_BATCH; iterating");
            }
            Err(e) => {
                return Err(io_err("batch lookup", &self.map_path(name))(e).into());
            }
        }
        // Entries can be deleted between get_next_key and lookup: merge by key.
        let mut rows: BTreeMap<K, Vec<V>> = BTreeMap::new();
        for item in map.iter() {
            let (k, vals) = item.map_err(map_err(name, &self.pin_dir, "iterate"))?;
            rows.insert(k, vals.iter().copied().collect());
        }
        Ok(rows.into_iter().collect())
    }
}
