//! Feeding the ledger from the datapath: one read of the pinned counters per tick, keyed by the
//! CTs' UUIDs, with the final counters of CTs destroyed since the last tick booked from their
//! retired records (berthd calls [`Feeder::tick`] every `--tick` seconds and on SIGTERM).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use berth_common::map_names;
use berth_runtime::billing::{BillingConfig, BillingDay};
use berth_runtime::config::{ConfigError, CtConfig, Host};
use tracing::{debug, info, warn};

use super::{
    BillingAnchor, BillingError, Counter, CounterKey, CtInfo, CtReading, Direction, Family, Ledger,
    Reading, TickSummary,
};
use crate::bpf::maps_pinned;
use crate::datapath::{self, CounterRow, DatapathError, DatapathView, Retired};

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// Errors of one feed tick; each names what was read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Ledger(#[from] BillingError),
    #[error("reading the datapath counters under {0}")]
    Counters(PathBuf, #[source] DatapathError),
    #[error("reading the CT configs")]
    Configs(#[source] ConfigError),
    #[error("reading {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{path}: {detail}")]
    Bad { path: PathBuf, detail: String },
    #[error("reading the map info of {0}")]
    MapInfo(PathBuf, #[source] aya::maps::MapError),
}

/// The counter generation of the datapath pinned under `pin_dir`, `None` when none is pinned.
///
/// The kernel counters restart from zero exactly when the `COUNTERS`/`ARCHIVE` maps are created
/// anew: after a reboot (a new boot id) or, within one boot, when the pins were removed and the
/// next start loaded fresh maps. The kernel gives every map a new id at creation (ids are
/// allocated cyclically from an IDR and are not reused while a map lives, kernel/bpf/syscall.c
/// `bpf_map_alloc_id`), and ids restart after a reboot, which the boot id tells apart. So the
/// epoch is the boot id folded to 32 bits in the high half and the `COUNTERS` map id in the low
/// half. A generation number written next to the pins would also work, but the pins are exactly
/// what a reboot or a cleanup removes, and this needs no writer.
pub fn counter_epoch(pin_dir: &Path) -> Result<Option<u64>, FeedError> {
    let maps = pin_dir.join("maps");
    if !maps_pinned(&maps, &map_names::REQUIRED) {
        return Ok(None);
    }
    let boot = boot_id_hash()?;
    let path = maps.join(map_names::COUNTERS);
    let info =
        aya::maps::MapInfo::from_pin(&path).map_err(|e| FeedError::MapInfo(path.clone(), e))?;
    Ok(Some((u64::from(boot) << 32) | u64::from(info.id())))
}

fn boot_id_hash() -> Result<u32, FeedError> {
    let path = PathBuf::from(BOOT_ID);
    let text = std::fs::read_to_string(&path).map_err(|e| FeedError::Io(path.clone(), e))?;
    let id = uuid::Uuid::parse_str(text.trim()).map_err(|e| FeedError::Bad {
        path: path.clone(),
        detail: format!("not a UUID: {e}"),
    })?;
    let v = id.as_u128();
    let folded = (v >> 64) as u64 ^ v as u64;
    Ok((folded >> 32) as u32 ^ folded as u32)
}

fn key_of(r: &CounterRow) -> CounterKey {
    let direction = match r.dir {
        datapath::Direction::In => Direction::In,
        datapath::Direction::Out => Direction::Out,
    };
    // Frames without an IP packet (ARP, the only non-IP ethertype that passes) are IPv4's
    // neighbour resolution: billed with IPv4 so that every counted byte is billed.
    let family = match r.family {
        datapath::Family::V6 => Family::V6,
        datapath::Family::V4 | datapath::Family::Other => Family::V4,
    };
    CounterKey::new(direction, r.class, family)
}

/// Sums counter rows per CTID and billing key.
pub fn group_rows(rows: &[CounterRow]) -> HashMap<u32, BTreeMap<CounterKey, Counter>> {
    let mut out: HashMap<u32, BTreeMap<CounterKey, Counter>> = HashMap::new();
    for r in rows {
        let c = out.entry(r.ctid).or_default().entry(key_of(r)).or_default();
        c.bytes += r.bytes;
        c.packets += r.packets;
    }
    out
}

/// What was delivered: `counted` minus what the shaper dropped after counting it, key by key
/// (`undelivered` is read before `counted`, so it never holds a drop `counted` lacks).
pub fn delivered(
    mut counted: HashMap<u32, BTreeMap<CounterKey, Counter>>,
    undelivered: &HashMap<u32, BTreeMap<CounterKey, Counter>>,
) -> HashMap<u32, BTreeMap<CounterKey, Counter>> {
    for (ctid, rows) in undelivered {
        let Some(have) = counted.get_mut(ctid) else {
            continue;
        };
        for (k, u) in rows {
            if let Some(c) = have.get_mut(k) {
                c.bytes = c.bytes.saturating_sub(u.bytes);
                c.packets = c.packets.saturating_sub(u.packets);
            }
        }
    }
    counted
}

/// One consistent read: the epoch did not change while the counters were read.
struct Snapshot {
    epoch: u64,
    /// The datapath counts IP packets (else frames).
    l3: bool,
    by_ct: HashMap<u32, BTreeMap<CounterKey, Counter>>,
}

fn read_snapshot(pin_dir: &Path) -> Result<Option<Snapshot>, FeedError> {
    let Some(before) = counter_epoch(pin_dir)? else {
        return Ok(None);
    };
    let err = |e| FeedError::Counters(pin_dir.to_path_buf(), e);
    let Some(view) = DatapathView::open_pinned(pin_dir).map_err(err)? else {
        return Ok(None);
    };
    let l3 = view.config().map_err(err)?.byte_layer == datapath::ByteLayer::L3;
    let undelivered = view.undelivered().map_err(err)?;
    let rows = view.counters().map_err(err)?;
    drop(view);
    if counter_epoch(pin_dir)? != Some(before) {
        // The maps were re-created under us: the rows may be of either generation.
        debug!("datapath maps re-created during the read; skipping this tick");
        return Ok(None);
    }
    Ok(Some(Snapshot {
        epoch: before,
        l3,
        by_ct: delivered(group_rows(&rows), &group_rows(&undelivered)),
    }))
}

/// What one feed tick did.
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedSummary {
    pub cts: usize,
    pub registered: usize,
    pub retired: usize,
    pub skipped_no_uuid: usize,
    pub tick: TickSummary,
}

/// The ledger and where its counters come from.
pub struct Feeder {
    pub host: Host,
    pub pin_dir: PathBuf,
    pub ledger: Ledger,
    /// Epoch of the last booked reading, for the retired records of destroyed CTs.
    last_epoch: Option<u64>,
    /// When the slots past retention were last deleted (at most hourly: a period ends at
    /// most once a day).
    last_prune: Option<i64>,
}

impl Feeder {
    pub fn new(host: Host, pin_dir: PathBuf, ledger: Ledger) -> Feeder {
        Feeder {
            host,
            pin_dir,
            ledger,
            last_epoch: None,
            last_prune: None,
        }
    }

    /// Reads the counters once and books them at `now` (Unix seconds) in one ledger transaction.
    /// CTs destroyed since the last tick get their retired record booked, then are marked
    /// destroyed.
    pub fn tick(&mut self, now: i64) -> Result<FeedSummary, FeedError> {
        let mut summary = FeedSummary::default();
        // A ledger that has never ticked is being installed on a running node: counters of CTs
        // it has not seen before have a history it did not watch, so only what follows is
        // booked. Afterwards a new CT's counters start at 0 with it (a reused CTID is cleared
        // at destroy), so everything they hold is its traffic.
        let first = if self.ledger.seq() == 0 {
            super::Baseline::Current
        } else {
            super::Baseline::Zero
        };
        let snap = read_snapshot(&self.pin_dir)?;
        berth_runtime::crash_point!("ledger.tick.after_read");
        let mut alive: HashSet<String> = HashSet::new();
        let mut readings = Vec::new();
        for ctid in self.host.list_ctids().map_err(FeedError::Configs)? {
            let cfg = match CtConfig::load(&self.host, ctid) {
                Ok(c) => c,
                // Destroyed between the listing and the read.
                Err(ConfigError::NotFound(_)) => continue,
                Err(e) => return Err(FeedError::Configs(e)),
            };
            if berth_runtime::container::migrate::migrated(&self.host, ctid).is_some() {
                // Its booking here closed when it left: gone for this node's ledger, billed
                // from the record its migration retired (the target bills it from then on).
                continue;
            }
            let Some(uuid) = cfg.uuid else {
                debug!(%ctid, "CT has no UUID yet (assigned at its first start): not billed yet");
                summary.skipped_no_uuid += 1;
                continue;
            };
            let uuid = uuid.hyphenated().to_string();
            summary.registered += self.sync_settings(&uuid, ctid.get(), &cfg.billing, now)?;
            alive.insert(uuid.clone());
            if let Some(s) = &snap {
                readings.push(CtReading {
                    uuid,
                    reading: Reading {
                        at: now,
                        epoch: s.epoch,
                        counters: s.by_ct.get(&ctid.get()).cloned().unwrap_or_default(),
                    },
                    first,
                });
            }
        }
        for (uuid, ctid, billing, went) in self.unseen_retired(&alive)? {
            info!(%uuid, ctid, "a CT no tick saw alive was destroyed: billed from its retired record");
            summary.registered += self.sync_settings(&uuid, ctid, &billing, went)?;
        }
        let gone: Vec<String> = self
            .ledger
            .cts()
            .filter(|c| c.destroyed.is_none() && !alive.contains(&c.uuid))
            .map(|c| c.uuid.clone())
            .collect();
        let epoch = snap.as_ref().map(|s| s.epoch).or(self.last_epoch);
        let mut final_of = Vec::new();
        for uuid in &gone {
            let mut ended = now;
            if let Some(r) = self.retired_reading(uuid, now, epoch)? {
                ended = r.reading.at;
                readings.push(r);
            }
            final_of.push((uuid.clone(), ended));
        }
        summary.cts = readings.len();
        if let Some(s) = &snap {
            self.ledger.set_byte_layer(s.l3)?;
        }
        summary.tick = self.ledger.tick(&readings)?;
        for (uuid, ended) in &final_of {
            self.ledger.mark_destroyed(uuid, *ended)?;
            summary.retired += 1;
        }
        if snap.is_some() {
            self.last_epoch = epoch;
        }
        self.ledger.set_watched_since(now)?;
        if self.last_prune.is_none_or(|t| now - t >= 3600 || now < t) {
            let deleted = self.ledger.prune(now)?;
            self.last_prune = Some(now);
            if deleted > 0 {
                info!(deleted, "billing slots past retention deleted");
            }
        }
        Ok(summary)
    }

    /// Registers a CT new to the ledger with its config's billing settings, or brings a known
    /// one's in line with its config: a new CTID, commit rate or class filter applies at once
    /// (they only read the bill), a new billing day or time zone from the end of the current
    /// period (the ledger keeps the history, so periods already billed never move). Returns 1
    /// when the CT was new.
    fn sync_settings(
        &mut self,
        uuid: &str,
        ctid: u32,
        billing: &BillingConfig,
        now: i64,
    ) -> Result<usize, FeedError> {
        let anchor = match billing.day() {
            BillingDay::Day(d) => BillingAnchor::Day(d),
            BillingDay::Anniversary => BillingAnchor::Anniversary,
        };
        let tz = billing.tz();
        let commit = billing.commit.map(|r| r.bits_per_sec());
        let Ok(known) = self.ledger.ct(uuid).cloned() else {
            let mut info = CtInfo::new(uuid.to_string(), ctid, anchor, tz.to_string(), now);
            info.commit_bps = commit;
            info.classes = billing.classes.clone();
            self.ledger.register_ct(&info)?;
            return Ok(1);
        };
        if (known.anchor, known.tz.as_str()) != (anchor, tz) {
            let from = self.ledger.change_anchor(uuid, anchor, tz, now)?;
            info!(%uuid, ctid, billing_day = ?anchor, tz, from, "billing day or time zone changed: applies from the end of the current period");
        }
        if known.ctid != ctid || known.commit_bps != commit || known.classes != billing.classes {
            let mut info = self.ledger.ct(uuid)?.clone();
            info.ctid = ctid;
            info.commit_bps = commit;
            info.classes = billing.classes.clone();
            self.ledger.register_ct(&info)?;
        }
        Ok(0)
    }

    /// Retired records of CTs the ledger does not know and that are not alive, destroyed since
    /// the ledger watches the node: (UUID, CTID, billing settings, when it went).
    fn unseen_retired(
        &self,
        alive: &HashSet<String>,
    ) -> Result<Vec<(String, u32, BillingConfig, i64)>, FeedError> {
        let Some(since) = self.ledger.watched_since()? else {
            return Ok(Vec::new());
        };
        let dir = self.host.root.join("retired");
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FeedError::Io(dir, e)),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| FeedError::Io(dir.clone(), e))?;
            let name = e.file_name();
            let Some(uuid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| uuid::Uuid::parse_str(n).ok())
                .map(|u| u.hyphenated().to_string())
            else {
                continue; // temporary files of a record being written, and strangers
            };
            if alive.contains(&uuid) || self.ledger.ct(&uuid).is_ok() {
                continue;
            }
            let path = e.path();
            let rec = crate::lifecycle_hooks::RetiredRecord::read(&path)
                .map_err(|e| FeedError::Io(path.clone(), e))?;
            let Some(rec) = rec else { continue };
            let went = i64::try_from(rec.retired_at).unwrap_or(i64::MAX);
            if went < since {
                debug!(%uuid, went, since, "retired before the ledger watched the node: not billed");
                continue;
            }
            out.push((uuid, rec.ctid, rec.billing.unwrap_or_default(), went));
        }
        Ok(out)
    }

    /// The final reading of a destroyed CT from its retired record, read by destroy just before
    /// the counters were cleared, so in the current epoch (the checkpoint's when none is pinned).
    fn retired_reading(
        &self,
        uuid: &str,
        now: i64,
        epoch: Option<u64>,
    ) -> Result<Option<CtReading>, FeedError> {
        let Ok(id) = uuid::Uuid::parse_str(uuid) else {
            return Ok(None);
        };
        let path = self.host.retired_counters_path(id);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warn!(%uuid, path = %path.display(), "destroyed CT has no retired record: billed up to its last tick");
                return Ok(None);
            }
            Err(e) => return Err(FeedError::Io(path, e)),
        };
        let retired: Retired = serde_json::from_str(&text).map_err(|e| FeedError::Bad {
            path: path.clone(),
            detail: format!("not a retired-counters record: {e}"),
        })?;
        #[derive(serde::Deserialize)]
        struct When {
            retired_at: Option<i64>,
        }
        let retired_at = serde_json::from_str::<When>(&text)
            .ok()
            .and_then(|w| w.retired_at);
        let checkpoint = self.ledger.checkpoint(uuid)?;
        // Billed up to the second it was destroyed (the slot it ended in, and its lifetime
        // for the 95th), not to this tick; never before the last booked reading (a tick that
        // raced the destroy), never in the future.
        let at = match retired_at {
            Some(t) => t.max(checkpoint.as_ref().map_or(t, |c| c.at)).min(now),
            None => now,
        };
        let Some(epoch) = epoch.or(checkpoint.map(|c| c.epoch)) else {
            return Ok(None);
        };
        let mut counters = BTreeMap::new();
        let billed = delivered(
            group_rows(&retired.counters),
            &group_rows(&retired.undelivered),
        );
        for (_, m) in billed {
            for (k, c) in m {
                let t: &mut Counter = counters.entry(k).or_default();
                t.bytes += c.bytes;
                t.packets += c.packets;
            }
        }
        Ok(Some(CtReading {
            uuid: uuid.to_string(),
            reading: Reading {
                at,
                epoch,
                counters,
            },
            first: super::Baseline::Zero,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        ctid: u32,
        dir: datapath::Direction,
        family: datapath::Family,
        bytes: u64,
    ) -> CounterRow {
        CounterRow {
            ctid,
            dir,
            class: 2,
            family,
            bytes,
            packets: 1,
        }
    }

    #[test]
    fn rows_group_per_ct_and_arp_is_billed_with_ipv4() {
        use datapath::{Direction as D, Family as F};
        let rows = [
            row(7, D::In, F::V4, 1000),
            row(7, D::In, F::Other, 42),
            row(7, D::Out, F::V6, 80),
            row(8, D::Out, F::V4, 5),
        ];
        let g = group_rows(&rows);
        assert_eq!(g.len(), 2);
        let ct7 = &g[&7];
        assert_eq!(
            ct7[&CounterKey::new(Direction::In, 2, Family::V4)],
            Counter::new(1042, 2)
        );
        assert_eq!(
            ct7[&CounterKey::new(Direction::Out, 2, Family::V6)],
            Counter::new(80, 1)
        );
        let total: u64 = g.values().flat_map(|m| m.values()).map(|c| c.bytes).sum();
        assert_eq!(total, rows.iter().map(|r| r.bytes).sum::<u64>());
    }

    #[test]
    fn delivered_is_counted_minus_undelivered_per_key() {
        use datapath::{Direction as D, Family as F};
        let counted = group_rows(&[
            row(7, D::In, F::V4, 10_000),
            row(7, D::Out, F::V4, 500),
            row(8, D::In, F::V6, 40),
        ]);
        let undelivered = group_rows(&[row(7, D::In, F::V4, 3_000), row(9, D::In, F::V4, 1)]);
        let billed = delivered(counted, &undelivered);
        let k = |d, f| CounterKey::new(d, 2, f);
        assert_eq!(billed[&7][&k(Direction::In, Family::V4)].bytes, 7_000);
        assert_eq!(billed[&7][&k(Direction::In, Family::V4)].packets, 0);
        assert_eq!(billed[&7][&k(Direction::Out, Family::V4)].bytes, 500);
        assert_eq!(billed[&8][&k(Direction::In, Family::V6)].bytes, 40);
        assert!(!billed.contains_key(&9));
    }

    #[test]
    fn no_pinned_datapath_has_no_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(counter_epoch(dir.path()).expect("epoch").is_none());
    }
}
