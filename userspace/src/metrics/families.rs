//! Turns a [`Snapshot`] into Prometheus metric families (pure: no I/O, unit-tested).

use std::collections::BTreeMap;

use berth_runtime::container::State;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily};

use super::defs::{self, MetricDef};
use super::snapshot::{CtSnapshot, Snapshot};
use crate::datapath::Direction;

/// Direction label values: the CT's point of view, as in the metric names.
pub fn direction_label(d: Direction) -> &'static str {
    match d {
        Direction::In => "receive",
        Direction::Out => "transmit",
    }
}

fn state_label(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Suspended => "suspended",
        State::Mounted => "mounted",
        State::Stopped => "stopped",
    }
}

const STATES: [State; 4] = [
    State::Running,
    State::Suspended,
    State::Mounted,
    State::Stopped,
];

fn pair(name: &str, value: &str) -> LabelPair {
    let mut p = LabelPair::default();
    p.set_name(name.to_owned());
    p.set_value(value.to_owned());
    p
}

/// Families being filled, by name.
struct Out {
    fams: BTreeMap<&'static str, MetricFamily>,
}

impl Out {
    fn push(&mut self, def: &MetricDef, labels: Vec<LabelPair>, value: f64) {
        let fam = self.fams.entry(def.name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(def.name.to_owned());
            f.set_help(def.help.to_owned());
            f.set_field_type(def.kind.proto());
            f
        });
        let mut m = Metric::from_label(labels);
        match def.kind {
            defs::Kind::Counter => {
                let mut c = Counter::default();
                c.set_value(value);
                m.set_counter(c);
            }
            defs::Kind::Gauge => {
                let mut g = Gauge::default();
                g.set_value(value);
                m.set_gauge(g);
            }
        }
        fam.mut_metric().push(m);
    }
}

/// `ctid` plus `name` when the CT has one: the labels of cAdvisor-compatible families.
fn ct_labels(ct: &CtSnapshot, ctid: &str) -> Vec<LabelPair> {
    let mut v = Vec::with_capacity(2);
    v.push(pair("ctid", ctid));
    if let Some(n) = ct.meta.name.as_deref() {
        v.push(pair("name", n));
    }
    v
}

const NS: f64 = 1e-9;

fn push_cgroup(out: &mut Out, ct: &CtSnapshot, ctid: &str) {
    let Some(cg) = &ct.cgroup else { return };
    let s = &cg.stats;
    let mut put = |def: &MetricDef, v: f64| out.push(def, ct_labels(ct, ctid), v);
    put(&defs::CPU_USAGE, s.cpu_usage_ns as f64 * NS);
    put(&defs::CPU_USER, s.cpu_user_ns as f64 * NS);
    put(&defs::CPU_SYSTEM, s.cpu_system_ns as f64 * NS);
    put(&defs::CFS_PERIODS, s.nr_periods as f64);
    put(&defs::CFS_THROTTLED_PERIODS, s.nr_throttled as f64);
    put(&defs::CFS_THROTTLED_SECONDS, s.throttled_ns as f64 * NS);
    if let Some(q) = s.cpu_quota_us {
        put(&defs::SPEC_CPU_QUOTA, q as f64);
        put(&defs::SPEC_CPU_PERIOD, s.cpu_period_us as f64);
    }
    put(&defs::MEM_USAGE, s.memory_usage as f64);
    put(&defs::MEM_WORKING_SET, s.memory_working_set as f64);
    put(&defs::MEM_CACHE, s.memory_cache as f64);
    put(&defs::MEM_RSS, s.memory_rss as f64);
    put(&defs::MEM_SWAP, s.swap_usage as f64);
    if let Some(l) = s.memory_limit {
        put(&defs::SPEC_MEM_LIMIT, l as f64);
    }
    if let Some(l) = s.swap_limit {
        put(&defs::SPEC_SWAP_LIMIT, l as f64);
    }
    put(&defs::MEM_FAILCNT, s.memory_failcnt as f64);
    put(&defs::OOM_EVENTS, s.oom_kills as f64);
    put(&defs::PROCESSES, cg.processes as f64);
    put(&defs::THREADS, s.numproc as f64);
    if let Some(l) = s.numproc_limit {
        put(&defs::THREADS_MAX, l as f64);
    }
    put(&defs::NUMPROC_FAILURES, s.numproc_failcnt as f64);
    put(&defs::FS_READ_BYTES, s.blkio_read_bytes as f64);
    put(&defs::FS_WRITE_BYTES, s.blkio_write_bytes as f64);
    put(&defs::FS_READS, s.blkio_read_ios as f64);
    put(&defs::FS_WRITES, s.blkio_write_ios as f64);
    if let Some(t) = ct.started_at {
        put(&defs::START_TIME, t as f64);
    }
}

/// Per-CT sums for the cAdvisor network families.
#[derive(Default, Clone, Copy)]
struct NetSums {
    rx_bytes: u64,
    tx_bytes: u64,
    rx_packets: u64,
    tx_packets: u64,
    rx_dropped: u64,
    tx_dropped: u64,
}

/// Every family with at least one series, sorted by name.
pub fn families(snap: &Snapshot) -> Vec<MetricFamily> {
    let mut out = Out {
        fams: BTreeMap::new(),
    };
    let mut ctid_strs: BTreeMap<u32, String> = BTreeMap::new();
    for ct in &snap.cts {
        let ctid = ct.ctid.to_string();
        let m = &ct.meta;
        out.push(
            &defs::INFO,
            vec![
                pair("ctid", &ctid),
                pair("name", m.name.as_deref().unwrap_or("")),
                pair("hostname", m.hostname.as_deref().unwrap_or("")),
                pair("template", &m.template),
            ],
            1.0,
        );
        for s in STATES {
            out.push(
                &defs::STATE,
                vec![pair("ctid", &ctid), pair("state", state_label(s))],
                if s == ct.state { 1.0 } else { 0.0 },
            );
        }
        push_cgroup(&mut out, ct, &ctid);
        ctid_strs.insert(ct.ctid, ctid);
    }

    if let Some(net) = &snap.network {
        let mut sums: BTreeMap<u32, NetSums> = BTreeMap::new();
        for r in &net.counters {
            let Some(ctid) = ctid_strs.get(&r.ctid) else {
                continue;
            };
            let labels = || {
                vec![
                    pair("ctid", ctid),
                    pair("class", &r.class.to_string()),
                    pair("family", r.family.as_str()),
                ]
            };
            let s = sums.entry(r.ctid).or_default();
            let (bytes_def, packets_def) = match r.dir {
                Direction::In => {
                    s.rx_bytes += r.bytes;
                    s.rx_packets += r.packets;
                    (&defs::NET_RX_BYTES, &defs::NET_RX_PACKETS)
                }
                Direction::Out => {
                    s.tx_bytes += r.bytes;
                    s.tx_packets += r.packets;
                    (&defs::NET_TX_BYTES, &defs::NET_TX_PACKETS)
                }
            };
            out.push(bytes_def, labels(), r.bytes as f64);
            out.push(packets_def, labels(), r.packets as f64);
        }
        for r in &net.drops {
            let Some(ctid) = ctid_strs.get(&r.ctid) else {
                continue;
            };
            let labels = || {
                vec![
                    pair("ctid", ctid),
                    pair("direction", direction_label(r.dir)),
                    pair("reason", r.reason.as_str()),
                ]
            };
            out.push(&defs::NET_DROPS, labels(), r.packets as f64);
            out.push(&defs::NET_DROP_BYTES, labels(), r.bytes as f64);
            let s = sums.entry(r.ctid).or_default();
            match r.dir {
                Direction::In => s.rx_dropped += r.packets,
                Direction::Out => s.tx_dropped += r.packets,
            }
        }
        for ct in &snap.cts {
            let Some(s) = sums.get(&ct.ctid) else {
                continue;
            };
            let ctid = &ctid_strs[&ct.ctid];
            for (def, v) in [
                (&defs::C_NET_RX_BYTES, s.rx_bytes),
                (&defs::C_NET_TX_BYTES, s.tx_bytes),
                (&defs::C_NET_RX_PACKETS, s.rx_packets),
                (&defs::C_NET_TX_PACKETS, s.tx_packets),
                (&defs::C_NET_RX_DROPPED, s.rx_dropped),
                (&defs::C_NET_TX_DROPPED, s.tx_dropped),
            ] {
                out.push(def, ct_labels(ct, ctid), v as f64);
            }
        }
    }

    for (source, up) in [
        ("configs", snap.sources.configs),
        ("cgroups", snap.sources.cgroups),
        ("datapath", snap.sources.datapath),
    ] {
        out.push(
            &defs::SOURCE_UP,
            vec![pair("source", source)],
            if up { 1.0 } else { 0.0 },
        );
    }
    out.push(&defs::COLLECT_SECONDS, Vec::new(), snap.collect_seconds);
    out.fams.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use berth_runtime::cgroups::Stats;

    use super::*;
    use crate::datapath::{CounterRow, DropReason, DropRow, Family};
    use crate::metrics::snapshot::{
        CgroupSnapshot, CtMeta, CtSnapshot, NetworkSnapshot, SourceStatus,
    };

    fn value(fams: &[MetricFamily], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let f = fams.iter().find(|f| f.name() == name)?;
        f.get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|p| p.name() == *k && p.value() == *v)
                }) && m.get_label().len() >= labels.len()
            })
            .map(|m| match f.get_field_type() {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                _ => m.get_gauge().get_value(),
            })
    }

    fn sample() -> Snapshot {
        let running = CtSnapshot {
            ctid: 101,
            meta: Arc::new(CtMeta {
                name: Some("web".into()),
                hostname: Some("web.example.com".into()),
                template: "busybox".into(),
            }),
            state: State::Running,
            started_at: Some(1_700_000_000),
            cgroup: Some(CgroupSnapshot {
                stats: Stats {
                    cpu_usage_ns: 2_500_000_000,
                    memory_usage: 4096,
                    memory_limit: Some(1 << 30),
                    numproc: 3,
                    memory_failcnt: 7,
                    ..Stats::default()
                },
                processes: 2,
            }),
        };
        let stopped = CtSnapshot {
            ctid: 102,
            meta: Arc::new(CtMeta::default()),
            state: State::Stopped,
            started_at: None,
            cgroup: None,
        };
        let row = |ctid, dir, family, bytes| CounterRow {
            ctid,
            dir,
            class: 0,
            family,
            bytes,
            packets: bytes / 100,
        };
        Snapshot {
            cts: vec![running, stopped],
            network: Some(NetworkSnapshot {
                counters: vec![
                    row(101, Direction::In, Family::V4, 1000),
                    row(101, Direction::In, Family::V6, 500),
                    row(101, Direction::Out, Family::V4, 300),
                    row(102, Direction::Out, Family::V4, 42),
                    // A destroyed CT's counters stay in the maps but get no series.
                    row(999, Direction::Out, Family::V4, 1),
                ],
                drops: vec![DropRow {
                    ctid: 101,
                    dir: Direction::Out,
                    reason: DropReason::SpoofedIp,
                    packets: 4,
                    bytes: 400,
                }],
            }),
            sources: SourceStatus {
                configs: true,
                cgroups: true,
                datapath: true,
            },
            collect_seconds: 0.001,
        }
    }

    #[test]
    fn every_source_maps_to_its_series() {
        let f = families(&sample());
        let v = |n, l: &[(&str, &str)]| value(&f, n, l);
        assert_eq!(
            v(
                "berth_network_receive_bytes_total",
                &[("ctid", "101"), ("family", "ipv6"), ("class", "0")]
            ),
            Some(500.0)
        );
        assert_eq!(
            v(
                "container_network_receive_bytes_total",
                &[("ctid", "101"), ("name", "web")]
            ),
            Some(1500.0)
        );
        assert_eq!(
            v(
                "container_network_transmit_packets_dropped_total",
                &[("ctid", "101")]
            ),
            Some(4.0)
        );
        assert_eq!(
            v(
                "berth_network_drops_total",
                &[
                    ("ctid", "101"),
                    ("direction", "transmit"),
                    ("reason", "spoofed_ip")
                ]
            ),
            Some(4.0)
        );
        assert_eq!(
            v(
                "container_cpu_usage_seconds_total",
                &[("ctid", "101"), ("name", "web")]
            ),
            Some(2.5)
        );
        assert_eq!(
            v("container_spec_memory_limit_bytes", &[("ctid", "101")]),
            Some(1073741824.0)
        );
        assert_eq!(v("container_memory_failcnt", &[("ctid", "101")]), Some(7.0));
        assert_eq!(v("container_processes", &[("ctid", "101")]), Some(2.0));
        assert_eq!(v("container_threads", &[("ctid", "101")]), Some(3.0));
        assert_eq!(v("container_spec_cpu_quota", &[("ctid", "101")]), None);
        assert_eq!(
            v(
                "berth_container_state",
                &[("ctid", "101"), ("state", "running")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "berth_container_state",
                &[("ctid", "102"), ("state", "running")]
            ),
            Some(0.0)
        );
        assert_eq!(
            v(
                "berth_container_state",
                &[("ctid", "102"), ("state", "stopped")]
            ),
            Some(1.0)
        );
        assert_eq!(
            v(
                "berth_container_info",
                &[
                    ("ctid", "101"),
                    ("hostname", "web.example.com"),
                    ("template", "busybox")
                ]
            ),
            Some(1.0)
        );
        // Stopped: no cgroup series; its traffic totals stay.
        assert_eq!(v("container_memory_usage_bytes", &[("ctid", "102")]), None);
        assert_eq!(
            v("berth_network_transmit_bytes_total", &[("ctid", "102")]),
            Some(42.0)
        );
        for fam in &f {
            for m in fam.get_metric() {
                assert!(
                    !m.get_label().iter().any(|p| p.value() == "999"),
                    "series of an unknown CT in {}",
                    fam.name()
                );
            }
        }
    }

    #[test]
    fn every_family_is_declared_and_no_datapath_means_no_network_series() {
        let mut snap = sample();
        for fam in families(&snap) {
            let def = defs::ALL
                .iter()
                .find(|d| d.name == fam.name())
                .unwrap_or_else(|| panic!("{} not in defs::ALL", fam.name()));
            assert_eq!(def.kind.proto(), fam.get_field_type(), "{}", def.name);
            for m in fam.get_metric() {
                let names: Vec<&str> = m.get_label().iter().map(|p| p.name()).collect();
                let mut want: Vec<&str> = def.labels.to_vec();
                if def.ct_name && names.contains(&"name") {
                    want.push("name");
                }
                assert_eq!(names, want, "{}", def.name);
            }
        }
        snap.network = None;
        snap.sources.datapath = false;
        let f = families(&snap);
        assert!(!f.iter().any(|x| x.name().contains("network")));
        assert_eq!(
            value(&f, "berth_exporter_source_up", &[("source", "datapath")]),
            Some(0.0)
        );
    }
}
