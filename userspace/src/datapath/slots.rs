//! Counter slots: a CT's row block in `COUNTERS`, kept across restarts (`SLOT_CTIDS`), and
//! the `ARCHIVE` that keeps a reclaimed slot's totals.

use std::{collections::HashSet, os::fd::AsFd};

use aya::maps::{IterableMap, PerCpuValues};
use berth_common::{CounterKey, CounterValue, SlotCounters, capacity, map_names};
use berth_runtime::Ctid;
use tracing::{debug, info};

use super::{Datapath, DatapathError, DatapathView, Result, map_values};
use crate::bpf::{io_err, map_err, not_found, nr_cpus, sys};

impl DatapathView {
    pub(super) fn slot_ctids(&self) -> Result<Vec<u32>> {
        let rows = sys::lookup_batch::<u32, u32>(self.slot_ctids.map().fd().as_fd()).map_err(
            io_err("batch lookup", &self.map_path(map_names::SLOT_CTIDS)),
        )?;
        let mut out = vec![0u32; capacity::SLOTS as usize];
        for (slot, ctid) in rows {
            if let Some(o) = out.get_mut(slot as usize) {
                *o = ctid;
            }
        }
        Ok(out)
    }
}

impl Datapath {
    /// The CT's counter slot: its own, else a free one, else one reclaimed from a CT that has
    /// no interface attached (its totals moved to `ARCHIVE` first).
    pub(super) fn slot_for(&mut self, ctid: Ctid) -> Result<u32> {
        let owners = self.slot_ctids()?;
        if let Some(slot) = owners.iter().position(|c| *c == ctid.get()) {
            return Ok(slot as u32);
        }
        let slot = match owners.iter().position(|c| *c == 0) {
            Some(free) => free as u32,
            None => {
                let in_use: HashSet<u32> = self.iface_entries()?.values().map(|i| i.slot).collect();
                let victim = (0..capacity::SLOTS).find(|s| !in_use.contains(s)).ok_or(
                    DatapathError::NoFreeSlot {
                        ctid,
                        slots: capacity::SLOTS,
                    },
                )?;
                self.archive_slot(victim, owners[victim as usize])?;
                victim
            }
        };
        // A fresh slot counts from zero (a reclaimed one was zeroed after archiving; a free
        // one may hold what an interrupted reclaim left).
        self.zero_slot(slot)?;
        let pin_dir = self.view.pin_dir.clone();
        self.view
            .slot_ctids
            .set(slot, ctid.get(), 0)
            .map_err(map_err(map_names::SLOT_CTIDS, &pin_dir, "set"))?;
        debug!(%ctid, slot, "counter slot assigned");
        Ok(slot)
    }

    /// `ARCHIVE[key] += values`, CPU by CPU.
    pub(super) fn archive_add(&mut self, key: &CounterKey, values: &[CounterValue]) -> Result<()> {
        let mut sum: Vec<CounterValue> = match self.view.archive.get(key, 0) {
            Ok(old) => old.iter().copied().collect(),
            Err(e) if not_found(&e) => vec![CounterValue::default(); values.len()],
            Err(e) => return Err(map_err(map_names::ARCHIVE, &self.view.pin_dir, "get")(e).into()),
        };
        for (acc, v) in sum.iter_mut().zip(values) {
            acc.bytes += v.bytes;
            acc.packets += v.packets;
        }
        let sum = PerCpuValues::try_from(sum).map_err(io_err(
            "building per-CPU values for",
            &self.map_path(map_names::ARCHIVE),
        ))?;
        self.view.archive.insert(key, sum, 0).map_err(map_err(
            map_names::ARCHIVE,
            &self.view.pin_dir,
            "insert",
        ))?;
        Ok(())
    }

    pub(super) fn zero_slot(&mut self, slot: u32) -> Result<()> {
        let nr_cpus = nr_cpus()?;
        let zeros =
            PerCpuValues::try_from(vec![SlotCounters::default(); nr_cpus]).map_err(io_err(
                "building per-CPU values for",
                &self.map_path(map_names::COUNTERS),
            ))?;
        self.view.counters.set(slot, zeros, 0).map_err(map_err(
            map_names::COUNTERS,
            &self.view.pin_dir,
            "set",
        ))?;
        Ok(())
    }

    /// Adds the slot's counters to `ARCHIVE` under `ctid` and zeroes the slot. Only for a slot
    /// no interface entry points at (no program writes to it any more).
    fn archive_slot(&mut self, slot: u32, ctid: u32) -> Result<()> {
        let values = self.view.counters.get(&slot, 0).map_err(map_err(
            map_names::COUNTERS,
            &self.view.pin_dir,
            "get",
        ))?;
        for row in 0..berth_common::SLOT_ROWS {
            let per_cpu: Vec<CounterValue> = values.iter().map(|v| v.rows[row]).collect();
            if per_cpu.iter().all(|v| *v == CounterValue::default()) {
                continue;
            }
            self.archive_add(&map_values::row_key(ctid, row), &per_cpu)?;
        }
        self.zero_slot(slot)?;
        info!(ctid, slot, "counter slot reclaimed; totals archived");
        Ok(())
    }
}
