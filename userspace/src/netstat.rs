//! `berth netstat`: vznetstat-like per-CT, per-class traffic from the datapath's counters.
//!
//! `--reset` only moves the baseline of this live view (a file in the run dir); the kernel
//! counters, and so billing, are never reset.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::datapath::{CounterRow, Direction, Family};

/// In/out bytes and packets of one CT in one class.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetstatRow {
    pub ctid: u32,
    pub class: u8,
    pub in_bytes: u64,
    pub in_packets: u64,
    pub out_bytes: u64,
    pub out_packets: u64,
}

/// What to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ctid: Option<u32>,
    pub class: Option<u8>,
    /// Only this family (`-4` / `-6`); both when None. ARP ("other") is shown only then.
    pub family: Option<Family>,
}

fn key(r: &CounterRow) -> String {
    format!(
        "{}/{}/{}/{}",
        r.ctid,
        r.dir.as_str(),
        r.class,
        r.family.as_str()
    )
}

/// Counter values at the last `--reset`, keyed by ctid/dir/class/family.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Baseline(HashMap<String, (u64, u64)>);

impl Baseline {
    pub fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(rows: &[CounterRow], path: &Path) -> std::io::Result<()> {
        let b = Baseline(
            rows.iter()
                .map(|r| (key(r), (r.bytes, r.packets)))
                .collect(),
        );
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&b).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }
}

/// Sums counters into per-(CT, class) rows, minus the baseline. A counter below its baseline
/// (its map entry was recreated) is shown whole rather than negative.
pub fn aggregate(rows: &[CounterRow], filter: &Filter, base: &Baseline) -> Vec<NetstatRow> {
    let mut out: BTreeMap<(u32, u8), NetstatRow> = BTreeMap::new();
    for r in rows {
        if filter.ctid.is_some_and(|c| c != r.ctid)
            || filter.class.is_some_and(|c| c != r.class)
            || filter.family.is_some_and(|f| f != r.family)
        {
            continue;
        }
        let (b0, p0) = base.0.get(&key(r)).copied().unwrap_or((0, 0));
        let (bytes, packets) = if r.bytes >= b0 && r.packets >= p0 {
            (r.bytes - b0, r.packets - p0)
        } else {
            (r.bytes, r.packets)
        };
        let e = out.entry((r.ctid, r.class)).or_insert_with(|| NetstatRow {
            ctid: r.ctid,
            class: r.class,
            ..Default::default()
        });
        match r.dir {
            Direction::In => {
                e.in_bytes += bytes;
                e.in_packets += packets;
            }
            Direction::Out => {
                e.out_bytes += bytes;
                e.out_packets += packets;
            }
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ctid: u32, dir: Direction, class: u8, family: Family, bytes: u64) -> CounterRow {
        CounterRow {
            ctid,
            dir,
            class,
            family,
            bytes,
            packets: bytes / 100,
        }
    }

    #[test]
    fn sums_filters_and_subtracts_baseline() {
        let rows = vec![
            row(101, Direction::In, 1, Family::V4, 1000),
            row(101, Direction::In, 1, Family::V6, 500),
            row(101, Direction::Out, 1, Family::V4, 300),
            row(101, Direction::Out, 2, Family::V4, 200),
            row(102, Direction::In, 1, Family::V4, 700),
        ];
        let all = aggregate(&rows, &Filter::default(), &Baseline::default());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].in_bytes, 1500);
        assert_eq!(all[0].out_bytes, 300);
        let v4 = aggregate(
            &rows,
            &Filter {
                ctid: Some(101),
                class: Some(1),
                family: Some(Family::V4),
            },
            &Baseline::default(),
        );
        assert_eq!(v4.len(), 1);
        assert_eq!(v4[0].in_bytes, 1000);

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        Baseline::save(&rows, &p).unwrap();
        let mut later = rows.clone();
        later[0].bytes += 42;
        later[0].packets += 1;
        let d = aggregate(&later, &Filter::default(), &Baseline::load(&p));
        assert_eq!(d[0].in_bytes, 42);
        assert_eq!(d[0].in_packets, 1);
        assert_eq!(d[1].out_bytes, 0);
        // a counter that went backwards (map entry recreated) is shown whole
        later[4].bytes = 10;
        let d = aggregate(&later, &Filter::default(), &Baseline::load(&p));
        assert_eq!(d[2].in_bytes, 10);
    }
}
