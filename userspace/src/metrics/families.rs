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

/// A sample value: counters of the kernel are integers (exact in the text), durations not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl Value {
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }
}

/// Where [`emit`] sends samples: the `prometheus` crate's model ([`families`]) or the
/// direct text writer ([`super::expose`]).
pub trait Sink {
    fn sample(&mut self, def: &'static MetricDef, labels: &[(&str, &str)], value: Value);
}

/// Families being filled, by name.
struct Out {
    fams: BTreeMap<&'static str, MetricFamily>,
}

impl Sink for Out {
    fn sample(&mut self, def: &'static MetricDef, labels: &[(&str, &str)], value: Value) {
        let fam = self.fams.entry(def.name).or_insert_with(|| {
            let mut f = MetricFamily::default();
            f.set_name(def.name.to_owned());
            f.set_help(def.help.to_owned());
            f.set_field_type(def.kind.proto());
            f
        });
        let mut m = Metric::from_label(labels.iter().map(|(k, v)| pair(k, v)).collect());
        match def.kind {
            defs::Kind::Counter => {
                let mut c = Counter::default();
                c.set_value(value.as_f64());
                m.set_counter(c);
            }
            defs::Kind::Gauge => {
                let mut g = Gauge::default();
                g.set_value(value.as_f64());
                m.set_gauge(g);
            }
        }
        fam.mut_metric().push(m);
    }
}

fn pair(name: &str, value: &str) -> LabelPair {
    let mut p = LabelPair::default();
    p.set_name(name.to_owned());
    p.set_value(value.to_owned());
    p
}

/// `ctid` plus `name` when the CT has one: the labels of cAdvisor-compatible families.
fn with_ct<'a>(ct: &'a CtSnapshot, ctid: &'a str) -> ([(&'static str, &'a str); 2], usize) {
    match ct.meta.name.as_deref() {
        Some(n) => ([("ctid", ctid), ("name", n)], 2),
        None => ([("ctid", ctid), ("name", "")], 1),
    }
}

const NS: f64 = 1e-9;

fn emit_cgroup(out: &mut impl Sink, ct: &CtSnapshot, ctid: &str) {
    let Some(cg) = &ct.cgroup else { return };
    let s = &cg.stats;
    let (arr, n) = with_ct(ct, ctid);
    let l = &arr[..n];
    let mut put = |def: &'static MetricDef, v: Value| out.sample(def, l, v);
    use Value::{Float, Int};
    put(&defs::CPU_USAGE, Float(s.cpu_usage_ns as f64 * NS));
    put(&defs::CPU_USER, Float(s.cpu_user_ns as f64 * NS));
    put(&defs::CPU_SYSTEM, Float(s.cpu_system_ns as f64 * NS));
    put(&defs::CFS_PERIODS, Int(s.nr_periods));
    put(&defs::CFS_THROTTLED_PERIODS, Int(s.nr_throttled));
    put(
        &defs::CFS_THROTTLED_SECONDS,
        Float(s.throttled_ns as f64 * NS),
    );
    if let Some(q) = s.cpu_quota_us {
        put(&defs::SPEC_CPU_QUOTA, Int(q.max(0) as u64));
        put(&defs::SPEC_CPU_PERIOD, Int(s.cpu_period_us));
    }
    put(&defs::MEM_USAGE, Int(s.memory_usage));
    put(&defs::MEM_WORKING_SET, Int(s.memory_working_set));
    put(&defs::MEM_CACHE, Int(s.memory_cache));
    put(&defs::MEM_RSS, Int(s.memory_rss));
    put(&defs::MEM_SWAP, Int(s.swap_usage));
    if let Some(v) = s.memory_limit {
        put(&defs::SPEC_MEM_LIMIT, Int(v));
    }
    if let Some(v) = s.swap_limit {
        put(&defs::SPEC_SWAP_LIMIT, Int(v));
    }
    put(&defs::MEM_FAILCNT, Int(s.memory_failcnt));
    put(&defs::OOM_EVENTS, Int(s.oom_kills));
    put(&defs::PROCESSES, Int(cg.processes));
    put(&defs::THREADS, Int(s.numproc));
    if let Some(v) = s.numproc_limit {
        put(&defs::THREADS_MAX, Int(v));
    }
    put(&defs::NUMPROC_FAILURES, Int(s.numproc_failcnt));
    put(&defs::FS_READ_BYTES, Int(s.blkio_read_bytes));
    put(&defs::FS_WRITE_BYTES, Int(s.blkio_write_bytes));
    put(&defs::FS_READS, Int(s.blkio_read_ios));
    put(&defs::FS_WRITES, Int(s.blkio_write_ios));
    if let Some(t) = ct.started_at {
        put(&defs::START_TIME, Int(t));
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

/// Class numbers as label values without allocating (classes are < 256).
fn class_str(c: u8, buf: &mut [u8; 3]) -> &str {
    let mut n = 0;
    if c >= 100 {
        buf[n] = b'0' + c / 100;
        n += 1;
    }
    if c >= 10 {
        buf[n] = b'0' + (c / 10) % 10;
        n += 1;
    }
    buf[n] = b'0' + c % 10;
    n += 1;
    std::str::from_utf8(&buf[..n]).unwrap_or("0")
}

/// Sends every sample of `snap` to `out`.
pub fn emit(snap: &Snapshot, out: &mut impl Sink) {
    let ctid_strs: BTreeMap<u32, String> = snap
        .cts
        .iter()
        .map(|ct| (ct.ctid, ct.ctid.to_string()))
        .collect();
    for ct in &snap.cts {
        let ctid = ctid_strs[&ct.ctid].as_str();
        let m = &ct.meta;
        out.sample(
            &defs::INFO,
            &[
                ("ctid", ctid),
                ("name", m.name.as_deref().unwrap_or("")),
                ("hostname", m.hostname.as_deref().unwrap_or("")),
                ("template", &m.template),
            ],
            Value::Int(1),
        );
        for s in STATES {
            out.sample(
                &defs::STATE,
                &[("ctid", ctid), ("state", state_label(s))],
                Value::Int(u64::from(s == ct.state)),
            );
        }
        emit_cgroup(out, ct, ctid);
    }

    if let Some(net) = &snap.network {
        let mut sums: BTreeMap<u32, NetSums> = BTreeMap::new();
        let mut cbuf = [0u8; 3];
        for r in &net.counters {
            let Some(ctid) = ctid_strs.get(&r.ctid) else {
                continue;
            };
            let labels = [
                ("ctid", ctid.as_str()),
                ("class", class_str(r.class, &mut cbuf)),
                ("family", r.family.as_str()),
            ];
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
            out.sample(bytes_def, &labels, Value::Int(r.bytes));
            out.sample(packets_def, &labels, Value::Int(r.packets));
        }
        for r in &net.drops {
            let Some(ctid) = ctid_strs.get(&r.ctid) else {
                continue;
            };
            let labels = [
                ("ctid", ctid.as_str()),
                ("direction", direction_label(r.dir)),
                ("reason", r.reason.as_str()),
            ];
            out.sample(&defs::NET_DROPS, &labels, Value::Int(r.packets));
            out.sample(&defs::NET_DROP_BYTES, &labels, Value::Int(r.bytes));
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
            let (arr, n) = with_ct(ct, &ctid_strs[&ct.ctid]);
            for (def, v) in [
                (&defs::C_NET_RX_BYTES, s.rx_bytes),
                (&defs::C_NET_TX_BYTES, s.tx_bytes),
                (&defs::C_NET_RX_PACKETS, s.rx_packets),
                (&defs::C_NET_TX_PACKETS, s.tx_packets),
                (&defs::C_NET_RX_DROPPED, s.rx_dropped),
                (&defs::C_NET_TX_DROPPED, s.tx_dropped),
            ] {
                out.sample(def, &arr[..n], Value::Int(v));
            }
        }
    }

    for (source, up) in [
        ("configs", snap.sources.configs),
        ("cgroups", snap.sources.cgroups),
        ("datapath", snap.sources.datapath),
    ] {
        out.sample(
            &defs::SOURCE_UP,
            &[("source", source)],
            Value::Int(u64::from(up)),
        );
    }
    out.sample(
        &defs::COLLECT_SECONDS,
        &[],
        Value::Float(snap.collect_seconds),
    );
}

/// Every family with at least one series, sorted by name, in the `prometheus` crate's model.
pub fn families(snap: &Snapshot) -> Vec<MetricFamily> {
    let mut out = Out {
        fams: BTreeMap::new(),
    };
    emit(snap, &mut out);
    out.fams.into_values().collect()
}

#[cfg(test)]
pub(crate) mod tests {
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

    pub(crate) fn sample() -> Snapshot {
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

#[cfg(test)]
mod perf {
    use std::sync::Arc;
    use std::time::Instant;

    use berth_runtime::cgroups::Stats;

    use super::*;
    use crate::datapath::{CounterRow, Family};
    use crate::metrics::snapshot::{CgroupSnapshot, CtMeta, NetworkSnapshot, SourceStatus};

    #[test]
    #[ignore = "timing"]
    fn encode_1000() {
        let mut cts = Vec::new();
        let mut counters = Vec::new();
        for c in 1..=1000u32 {
            cts.push(CtSnapshot {
                ctid: 10000 + c,
                meta: Arc::new(CtMeta {
                    name: Some(format!("ct{c}")),
                    hostname: Some("h".into()),
                    template: "b".into(),
                }),
                state: State::Running,
                started_at: Some(1),
                cgroup: Some(CgroupSnapshot {
                    stats: Stats {
                        memory_limit: Some(1),
                        numproc_limit: Some(1),
                        cpu_quota_us: Some(1),
                        ..Stats::default()
                    },
                    processes: 1,
                }),
            });
            for (dir, fam) in [
                (Direction::In, Family::V4),
                (Direction::Out, Family::V4),
                (Direction::In, Family::V6),
                (Direction::Out, Family::V6),
            ] {
                counters.push(CounterRow {
                    ctid: 10000 + c,
                    dir,
                    class: 0,
                    family: fam,
                    bytes: 1234567,
                    packets: 1234,
                });
            }
        }
        let snap = Snapshot {
            cts,
            network: Some(NetworkSnapshot {
                counters,
                drops: vec![],
            }),
            sources: SourceStatus::default(),
            collect_seconds: 0.0,
        };
        for _ in 0..3 {
            let t = Instant::now();
            let f = crate::metrics::expose::render(&snap, crate::metrics::Format::Text);
            let t1 = t.elapsed();
            let text = f.clone();
            let t2 = t.elapsed();
            drop(f);
            let t3 = t.elapsed();
            eprintln!(
                "families {t1:?} encode {:?} drop {:?} bytes {}",
                t2 - t1,
                t3 - t2,
                text.len()
            );
        }
    }
}
