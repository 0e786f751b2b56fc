//! Retiring a destroyed CT's counters: they leave the live maps (its slot is freed, its
//! `ARCHIVE` and `DROPS` entries removed), so a new CT that gets the same CTID counts from 0.
//! The caller records [`Retired`] first (`destroy` writes it under the CT's UUID).

use berth_common::{CounterKey, DropKey, map_names};
use berth_runtime::Ctid;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{CounterRow, Datapath, DatapathError, DatapathView, DropRow, Result};
use crate::bpf::{PinLock, map_err, not_found};

/// What one CT counted, traffic and drops, as read before its counters were cleared.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retired {
    pub counters: Vec<CounterRow>,
    pub drops: Vec<DropRow>,
    /// Of `counters`, what the shaper dropped (billed = counters − undelivered). Records of
    /// an older berth have none.
    #[serde(default)]
    pub undelivered: Vec<CounterRow>,
}

/// Row by row the larger of the two readings, into `rows`.
fn merge_rows_max(rows: &mut Vec<CounterRow>, other: &[CounterRow]) {
    for o in other {
        match rows
            .iter_mut()
            .find(|r| (r.ctid, r.dir, r.class, r.family) == (o.ctid, o.dir, o.class, o.family))
        {
            Some(r) => {
                r.bytes = r.bytes.max(o.bytes);
                r.packets = r.packets.max(o.packets);
            }
            None => rows.push(*o),
        }
    }
    rows.sort_by_key(|r| (r.ctid, r.dir, r.class, r.family));
}

impl Retired {
    /// Row by row the larger of `self` and `other`, for a record written again by a destroy
    /// that was interrupted between writing it and clearing the maps: a CT's counters only
    /// grow until they are cleared, so the larger value is the later reading of the same total,
    /// and a reading taken after the clear (all zero) keeps what was recorded.
    pub fn merge_max(&mut self, other: &Retired) {
        merge_rows_max(&mut self.counters, &other.counters);
        merge_rows_max(&mut self.undelivered, &other.undelivered);
        for o in &other.drops {
            match self
                .drops
                .iter_mut()
                .find(|r| (r.ctid, r.dir, r.reason) == (o.ctid, o.dir, o.reason))
            {
                Some(r) => {
                    r.bytes = r.bytes.max(o.bytes);
                    r.packets = r.packets.max(o.packets);
                }
                None => self.drops.push(*o),
            }
        }
        self.drops.sort_by_key(|r| (r.ctid, r.dir, r.reason));
    }
}

impl DatapathView {
    /// CT `ctid`'s traffic (its slot and archived rows) and drop totals.
    pub fn totals_of(&self, ctid: Ctid) -> Result<Retired> {
        let c = ctid.get();
        Ok(Retired {
            counters: self
                .counters()?
                .into_iter()
                .filter(|r| r.ctid == c)
                .collect(),
            drops: self.drops()?.into_iter().filter(|r| r.ctid == c).collect(),
            undelivered: self
                .undelivered()?
                .into_iter()
                .filter(|r| r.ctid == c)
                .collect(),
        })
    }
}

impl Datapath {
    /// Clears CT `ctid`'s counters: frees its slot (zeroed), removes its `ARCHIVE` and
    /// `DROPS` entries. Refused while an interface entry still names the CT (a program could
    /// still count into the slot): detach those first.
    pub fn clear_ct(&mut self, ctid: Ctid) -> Result<()> {
        let _lock = PinLock::take(&self.view.pin_dir)?;
        if let Some((ifindex, _)) = self
            .iface_entries()?
            .into_iter()
            .find(|(_, i)| i.ctid == ctid.get())
        {
            return Err(DatapathError::StillAttached { ctid, ifindex });
        }
        let c = ctid.get();
        for (slot, owner) in self.slot_ctids()?.into_iter().enumerate() {
            if owner != c {
                continue;
            }
            let slot = slot as u32;
            self.zero_slot(slot)?;
            let pin_dir = self.view.pin_dir.clone();
            self.view.slot_ctids.set(slot, 0, 0).map_err(map_err(
                map_names::SLOT_CTIDS,
                &pin_dir,
                "set",
            ))?;
        }
        let archived: Vec<CounterKey> = self
            .read_percpu(&self.view.archive, map_names::ARCHIVE)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ctid == c)
            .collect();
        for k in &archived {
            match self.view.archive.remove(k) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    return Err(map_err(map_names::ARCHIVE, &self.view.pin_dir, "remove")(e).into());
                }
            }
        }
        let drops: Vec<DropKey> = self
            .read_percpu(&self.view.drops, map_names::DROPS)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ctid == c)
            .collect();
        for k in &drops {
            match self.view.drops.remove(k) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => {
                    return Err(map_err(map_names::DROPS, &self.view.pin_dir, "remove")(e).into());
                }
            }
        }
        let undelivered: Vec<u64> = match &self.view.undelivered {
            Some(map) => self
                .read_percpu(map, map_names::UNDELIVERED)?
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| *k as u32 == c)
                .collect(),
            None => Vec::new(),
        };
        let pin_dir = self.view.pin_dir.clone();
        if let Some(map) = self.view.undelivered.as_mut() {
            for k in &undelivered {
                match map.remove(k) {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => {
                        return Err(map_err(map_names::UNDELIVERED, &pin_dir, "remove")(e).into());
                    }
                }
            }
        }
        info!(%ctid, archived = archived.len(), drops = drops.len(), undelivered = undelivered.len(),
            "CT's counters cleared");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{Direction, DropReason, Family};

    fn row(class: u8, bytes: u64, packets: u64) -> CounterRow {
        CounterRow {
            ctid: 7,
            dir: Direction::In,
            class,
            family: Family::V4,
            bytes,
            packets,
        }
    }

    #[test]
    fn merge_keeps_the_larger_reading_row_by_row() {
        let drop = |packets| DropRow {
            ctid: 7,
            dir: Direction::Out,
            reason: DropReason::SpoofedIp,
            packets,
            bytes: packets * 60,
        };
        let mut recorded = Retired {
            counters: vec![row(0, 1000, 10), row(1, 50, 1)],
            drops: vec![drop(3)],
            undelivered: vec![row(0, 100, 1)],
        };
        // Read again after the clear: nothing live, the record stays.
        recorded.merge_max(&Retired::default());
        assert_eq!(recorded.counters, vec![row(0, 1000, 10), row(1, 50, 1)]);
        // Read again before the clear: the same totals or later ones.
        recorded.merge_max(&Retired {
            counters: vec![row(0, 1200, 12), row(2, 5, 1)],
            drops: vec![drop(4)],
            undelivered: vec![row(0, 150, 2)],
        });
        assert_eq!(recorded.undelivered, vec![row(0, 150, 2)]);
        assert_eq!(
            recorded.counters,
            vec![row(0, 1200, 12), row(1, 50, 1), row(2, 5, 1)]
        );
        assert_eq!(recorded.drops, vec![drop(4)]);
    }

    #[test]
    fn round_trips_through_json() {
        let r = Retired {
            counters: vec![row(0, 1, 1)],
            drops: vec![DropRow {
                ctid: 7,
                dir: Direction::In,
                reason: DropReason::Unknown(99),
                packets: 1,
                bytes: 2,
            }],
            undelivered: vec![row(0, 1, 1)],
        };
        // A record written before undelivered traffic was tracked still reads.
        let old = r#"{"counters":[],"drops":[]}"#;
        assert_eq!(
            serde_json::from_str::<Retired>(old).unwrap(),
            Retired::default()
        );
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Retired>(&text).unwrap(), r);
    }
}
