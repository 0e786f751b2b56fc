//! `berth netstat`: vznetstat-like per-CT, per-class traffic from the datapath's counters.
//!
//! `--reset` only moves the baseline of this live view (a file in the run dir); the kernel
//! counters, and so billing, are never reset.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::datapath::{CounterRow, Direction, Family};
use crate::shaper::report::{ShapingReport, rate_text};

/// In/out bytes and packets of one CT in one class, with the CT's shaping (the same on every
/// row of the CT).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetstatRow {
    pub ctid: u32,
    pub class: u8,
    pub in_bytes: u64,
    pub in_packets: u64,
    pub out_bytes: u64,
    pub out_packets: u64,
    /// The CT's total rate to it / from it in bits per second (`None`: no limit).
    pub rate_in_bps: Option<u64>,
    pub rate_out_bps: Option<u64>,
    /// Packets the CT's shaping dropped (full queues, packet-rate limits, EDT horizon), both
    /// directions, since the last `--reset`.
    pub shaping_drops: u64,
    /// Packets the datapath dropped by reason (`spoofed_ip`, `quota`, …), both directions, as
    /// the kernel counted them (`--reset` does not move these); reasons with none are absent.
    pub drops: BTreeMap<String, u64>,
}

/// What `netstat` shows of one CT's shaping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtShapingSummary {
    pub rate_in_bps: Option<u64>,
    pub rate_out_bps: Option<u64>,
    /// All shaping drops so far (kernel counters).
    pub drops: u64,
}

impl From<&ShapingReport> for CtShapingSummary {
    fn from(r: &ShapingReport) -> Self {
        Self {
            rate_in_bps: r.to_ct.rate_bps,
            rate_out_bps: r.from_ct.rate_bps,
            drops: r.drops(),
        }
    }
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

/// The baseline key of a CT's shaping drops (no counter key has this form).
fn drops_key(ctid: u32) -> String {
    format!("{ctid}/shaping_drops")
}

/// Counter values at the last `--reset`, keyed by ctid/dir/class/family, and each shaped CT's
/// shaping drops (as packets).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Baseline(HashMap<String, (u64, u64)>);

impl Baseline {
    pub fn load(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(
        rows: &[CounterRow],
        shaping: &BTreeMap<u32, CtShapingSummary>,
        path: &Path,
    ) -> std::io::Result<()> {
        let b = Baseline(
            rows.iter()
                .map(|r| (key(r), (r.bytes, r.packets)))
                .chain(
                    shaping
                        .iter()
                        .map(|(ctid, s)| (drops_key(*ctid), (0, s.drops))),
                )
                .collect(),
        );
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&b).map_err(std::io::Error::other)?)?;
        std::fs::rename(tmp, path)
    }
}

/// Sums counters into per-(CT, class) rows, minus the baseline, with each CT's shaping
/// (`shaping`: shaped CTs only). A counter below its baseline (its map entry, or the CT's
/// queues, were recreated) is shown whole rather than negative.
pub fn aggregate(
    rows: &[CounterRow],
    shaping: &BTreeMap<u32, CtShapingSummary>,
    filter: &Filter,
    base: &Baseline,
) -> Vec<NetstatRow> {
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
    let mut out: Vec<NetstatRow> = out.into_values().collect();
    for r in &mut out {
        let Some(sh) = shaping.get(&r.ctid) else {
            continue;
        };
        let d0 = base.0.get(&drops_key(r.ctid)).map_or(0, |(_, p)| *p);
        r.rate_in_bps = sh.rate_in_bps;
        r.rate_out_bps = sh.rate_out_bps;
        r.shaping_drops = sh.drops.checked_sub(d0).unwrap_or(sh.drops);
    }
    out
}

/// Adds the datapath's drop counters to the rows of their CTs.
pub fn add_drops(rows: &mut [NetstatRow], drops: &[crate::datapath::DropRow]) {
    for r in rows.iter_mut() {
        for d in drops.iter().filter(|d| d.ctid == r.ctid && d.packets > 0) {
            *r.drops.entry(d.reason.as_str().to_owned()).or_default() += d.packets;
        }
    }
}

/// `reason=packets …`, or `-` for none.
fn drops_text(d: &BTreeMap<String, u64>) -> String {
    if d.is_empty() {
        return "-".to_owned();
    }
    d.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The human table: one line per (CT, class), the CT's rates ("-": no limit), shaping drops
/// and datapath drops by reason on each of its lines; byte counts in human units.
pub fn table(rows: &[NetstatRow]) -> String {
    let mut s = format!(
        "{:>10} {:>5} {:>16} {:>12} {:>16} {:>12} {:>10} {:>10} {:>12} {}\n",
        "CTID",
        "CLASS",
        "INPUT",
        "INPUT(pkts)",
        "OUTPUT",
        "OUTPUT(pkts)",
        "RATE-IN",
        "RATE-OUT",
        "SHAPE-DROPS",
        "DROPS(reason=pkts)"
    );
    for r in rows {
        let rate = |b: Option<u64>| b.map_or_else(|| "-".to_owned(), rate_text);
        s.push_str(&format!(
            "{:>10} {:>5} {:>16} {:>12} {:>16} {:>12} {:>10} {:>10} {:>12} {}\n",
            r.ctid,
            r.class,
            crate::human::bytes(r.in_bytes),
            r.in_packets,
            crate::human::bytes(r.out_bytes),
            r.out_packets,
            rate(r.rate_in_bps),
            rate(r.rate_out_bps),
            r.shaping_drops,
            drops_text(&r.drops)
        ));
    }
    s
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
        let none = BTreeMap::new();
        let all = aggregate(&rows, &none, &Filter::default(), &Baseline::default());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].in_bytes, 1500);
        assert_eq!(all[0].out_bytes, 300);
        let v4 = aggregate(
            &rows,
            &none,
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
        Baseline::save(&rows, &none, &p).unwrap();
        let mut later = rows.clone();
        later[0].bytes += 42;
        later[0].packets += 1;
        let d = aggregate(&later, &none, &Filter::default(), &Baseline::load(&p));
        assert_eq!(d[0].in_bytes, 42);
        assert_eq!(d[0].in_packets, 1);
        assert_eq!(d[1].out_bytes, 0);
        // a counter that went backwards (map entry recreated) is shown whole
        later[4].bytes = 10;
        let d = aggregate(&later, &none, &Filter::default(), &Baseline::load(&p));
        assert_eq!(d[2].in_bytes, 10);
    }

    fn shaped(rate_in: Option<u64>, rate_out: Option<u64>, drops: u64) -> CtShapingSummary {
        CtShapingSummary {
            rate_in_bps: rate_in,
            rate_out_bps: rate_out,
            drops,
        }
    }

    #[test]
    fn shaping_columns_per_ct_and_their_baseline() {
        let rows = vec![
            row(101, Direction::In, 0, Family::V4, 1000),
            row(101, Direction::In, 1, Family::V4, 500),
            row(102, Direction::In, 0, Family::V4, 700),
        ];
        let mut sh = BTreeMap::new();
        sh.insert(101, shaped(Some(20_000_000), Some(10_000_000), 7));
        let out = aggregate(&rows, &sh, &Filter::default(), &Baseline::default());
        // Every row of CT 101 carries its rates; CT 102 is unshaped.
        for r in &out[..2] {
            assert_eq!(
                (r.rate_in_bps, r.rate_out_bps, r.shaping_drops),
                (Some(20_000_000), Some(10_000_000), 7)
            );
        }
        assert_eq!((out[2].rate_in_bps, out[2].shaping_drops), (None, 0));
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v[0]["rate_in_bps"], 20_000_000);
        assert_eq!(v[0]["rate_out_bps"], 10_000_000);
        assert_eq!(v[0]["shaping_drops"], 7);
        assert!(v[2]["rate_in_bps"].is_null());

        // --reset moves the drops' baseline too; recreated queues (fewer drops) show whole.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.json");
        Baseline::save(&rows, &sh, &p).unwrap();
        sh.insert(101, shaped(Some(20_000_000), None, 10));
        let d = aggregate(&rows, &sh, &Filter::default(), &Baseline::load(&p));
        assert_eq!((d[0].shaping_drops, d[0].rate_out_bps), (3, None));
        sh.insert(101, shaped(None, None, 2));
        let d = aggregate(&rows, &sh, &Filter::default(), &Baseline::load(&p));
        assert_eq!(d[0].shaping_drops, 2);
    }

    #[test]
    fn table_shows_rates_in_tc_units_or_a_dash() {
        let rows = vec![
            NetstatRow {
                ctid: 101,
                class: 0,
                in_bytes: 1000,
                in_packets: 10,
                out_bytes: 2000,
                out_packets: 20,
                rate_in_bps: Some(20_000_000),
                rate_out_bps: Some(1_500_000),
                shaping_drops: 4,
                drops: [("spoofed_ip".to_owned(), 3), ("quota".to_owned(), 2)].into(),
            },
            NetstatRow {
                ctid: 102,
                class: 1,
                ..Default::default()
            },
        ];
        let t = table(&rows);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            [
                "CTID",
                "CLASS",
                "INPUT",
                "INPUT(pkts)",
                "OUTPUT",
                "OUTPUT(pkts)",
                "RATE-IN",
                "RATE-OUT",
                "SHAPE-DROPS",
                "DROPS(reason=pkts)"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "101",
                "0",
                "1000",
                "10",
                "2.0K",
                "20",
                "20mbit",
                "1500kbit",
                "4",
                "quota=2,spoofed_ip=3"
            ]
        );
        assert_eq!(
            lines[2],
            ["102", "1", "0", "0", "0", "0", "-", "-", "0", "-"]
        );
        // The fixed columns line up: the drops list starts at the same offset on every line.
        let starts: Vec<usize> = t.lines().map(|l| l.rfind(' ').unwrap()).collect();
        assert!(starts.iter().all(|w| *w == starts[0]), "{t}");
    }
}
