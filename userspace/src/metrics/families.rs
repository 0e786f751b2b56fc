//! Turns a [`Snapshot`] into Prometheus metric families (pure: no I/O, unit-tested).

use std::collections::BTreeMap;

use berth_runtime::container::State;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily};

use super::defs::{self, MetricDef};
use super::snapshot::{CtSnapshot, NetworkSnapshot, Snapshot, SourceStatus};
use crate::{datapath::Direction, shaper::view::CtShaping};

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
        // Not among STATES: the snapshot reports a migrated CT's copy as stopped.
        State::Migrated => "migrated",
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

    /// Samples of several families with the same labels (a CT's cgroup counters).
    fn samples(&mut self, labels: &[(&str, &str)], samples: &[(&'static MetricDef, Value)]) {
        for (def, value) in samples {
            self.sample(def, labels, *value);
        }
    }
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
fn with_ct<'a>(name: Option<&'a str>, ctid: &'a str) -> ([(&'static str, &'a str); 2], usize) {
    match name {
        Some(n) => ([("ctid", ctid), ("name", n)], 2),
        None => ([("ctid", ctid), ("name", "")], 1),
    }
}

const NS: f64 = 1e-9;

fn emit_cgroup(out: &mut impl Sink, ct: &CtSnapshot, ctid: &str) {
    let Some(cg) = &ct.cgroup else { return };
    let s = &cg.stats;
    let (arr, n) = with_ct(ct.meta.name.as_deref(), ctid);
    use Value::{Float, Int};
    let mut v: Vec<(&'static MetricDef, Value)> = Vec::with_capacity(32);
    v.extend([
        (&defs::CPU_USAGE, Float(s.cpu_usage_ns as f64 * NS)),
        (&defs::CPU_USER, Float(s.cpu_user_ns as f64 * NS)),
        (&defs::CPU_SYSTEM, Float(s.cpu_system_ns as f64 * NS)),
        (&defs::CFS_PERIODS, Int(s.nr_periods)),
        (&defs::CFS_THROTTLED_PERIODS, Int(s.nr_throttled)),
        (
            &defs::CFS_THROTTLED_SECONDS,
            Float(s.throttled_ns as f64 * NS),
        ),
    ]);
    if let Some(q) = s.cpu_quota_us {
        v.push((&defs::SPEC_CPU_QUOTA, Int(q.max(0) as u64)));
        v.push((&defs::SPEC_CPU_PERIOD, Int(s.cpu_period_us)));
    }
    v.extend([
        (&defs::MEM_USAGE, Int(s.memory_usage)),
        (&defs::MEM_WORKING_SET, Int(s.memory_working_set)),
        (&defs::MEM_CACHE, Int(s.memory_cache)),
        (&defs::MEM_RSS, Int(s.memory_rss)),
        (&defs::MEM_SWAP, Int(s.swap_usage)),
    ]);
    if let Some(l) = s.memory_limit {
        v.push((&defs::SPEC_MEM_LIMIT, Int(l)));
    }
    if let Some(l) = s.swap_limit {
        v.push((&defs::SPEC_SWAP_LIMIT, Int(l)));
    }
    v.extend([
        (&defs::MEM_FAILCNT, Int(s.memory_failcnt)),
        (&defs::OOM_EVENTS, Int(s.oom_kills)),
        (&defs::PROCESSES, Int(cg.processes)),
        (&defs::THREADS, Int(s.numproc)),
    ]);
    if let Some(l) = s.numproc_limit {
        v.push((&defs::THREADS_MAX, Int(l)));
    }
    v.extend([
        (&defs::NUMPROC_FAILURES, Int(s.numproc_failcnt)),
        (&defs::FS_READ_BYTES, Int(s.blkio_read_bytes)),
        (&defs::FS_WRITE_BYTES, Int(s.blkio_write_bytes)),
        (&defs::FS_READS, Int(s.blkio_read_ios)),
        (&defs::FS_WRITES, Int(s.blkio_write_ios)),
    ]);
    if let Some(t) = ct.started_at {
        v.push((&defs::START_TIME, Int(t)));
    }
    out.samples(&arr[..n], &v);
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

/// Label values of the exported CTs (those with a config), by CTID: the CTID as text and the
/// CT's name. Series of CTIDs not in here are left out.
pub struct CtLabels<'a>(BTreeMap<u32, (String, Option<&'a str>)>);

impl<'a> CtLabels<'a> {
    pub fn new(cts: impl IntoIterator<Item = (u32, Option<&'a str>)>) -> Self {
        Self(
            cts.into_iter()
                .map(|(c, name)| (c, (c.to_string(), name)))
                .collect(),
        )
    }

    fn ctid(&self, ctid: u32) -> Option<&str> {
        self.0.get(&ctid).map(|(s, _)| s.as_str())
    }
}

/// The series of one CT from its config, run state and cgroup (everything but traffic).
pub fn emit_ct(ct: &CtSnapshot, out: &mut impl Sink) {
    let mut ctid_buf = itoa::Buffer::new();
    let ctid = ctid_buf.format(ct.ctid);
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
    if let Some(sh) = &ct.shaping {
        emit_shaping(sh, ctid, out);
    }
}

/// Traffic series of the CTs in `cts`.
pub fn emit_network(net: &NetworkSnapshot, cts: &CtLabels, out: &mut impl Sink) {
    let mut sums: BTreeMap<u32, NetSums> = BTreeMap::new();
    let mut cbuf = [0u8; 3];
    for r in &net.counters {
        let Some(ctid) = cts.ctid(r.ctid) else {
            continue;
        };
        let labels = [
            ("ctid", ctid),
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
        let Some(ctid) = cts.ctid(r.ctid) else {
            continue;
        };
        let labels = [
            ("ctid", ctid),
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
    for (ctid, s) in &sums {
        let Some((ctid, name)) = cts.0.get(ctid) else {
            continue;
        };
        let (arr, n) = with_ct(*name, ctid);
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

/// Shaping series of one CT: settings of the shaped directions, and their counters.
fn emit_shaping(sh: &CtShaping, ctid: &str, out: &mut impl Sink) {
    let mut cbuf = [0u8; 3];
    for d in [Direction::In, Direction::Out] {
        let ds = sh.dir(d);
        let dir = direction_label(d);
        if let Some(r) = ds.rate {
            out.sample(
                &defs::SHAPING_RATE,
                &[("ctid", ctid), ("direction", dir), ("class", "all")],
                Value::Int(r),
            );
        }
        for (class, r) in &ds.class_rates {
            out.sample(
                &defs::SHAPING_RATE,
                &[
                    ("ctid", ctid),
                    ("direction", dir),
                    ("class", class_str(*class, &mut cbuf)),
                ],
                Value::Int(*r),
            );
        }
        if ds.rate.is_some() || !ds.class_rates.is_empty() {
            out.sample(
                &defs::SHAPING_OVERLIMITS,
                &[("ctid", ctid), ("direction", dir)],
                Value::Int(ds.overlimits),
            );
            out.sample(
                &defs::SHAPING_DROPS,
                &[("ctid", ctid), ("direction", dir), ("reason", "queue")],
                Value::Int(ds.queue_drops),
            );
        }
        if let Some(p) = ds.pps_limit {
            out.sample(
                &defs::SHAPING_PPS_LIMIT,
                &[("ctid", ctid), ("direction", dir)],
                Value::Int(p),
            );
            out.sample(
                &defs::SHAPING_DROPS,
                &[("ctid", ctid), ("direction", dir), ("reason", "pps")],
                Value::Int(ds.pps_drops),
            );
        }
    }
}

/// The exporter's own series: which sources were read, and how long collecting took.
pub fn emit_exporter(sources: SourceStatus, collect_seconds: f64, out: &mut impl Sink) {
    for (source, up) in [
        ("configs", sources.configs),
        ("cgroups", sources.cgroups),
        ("datapath", sources.datapath),
        ("shaper", sources.shaper),
    ] {
        out.sample(
            &defs::SOURCE_UP,
            &[("source", source)],
            Value::Int(u64::from(up)),
        );
    }
    out.sample(&defs::COLLECT_SECONDS, &[], Value::Float(collect_seconds));
}

/// Sends every sample of `snap` to `out`.
pub fn emit(snap: &Snapshot, out: &mut impl Sink) {
    for ct in &snap.cts {
        emit_ct(ct, out);
    }
    if let Some(net) = &snap.network {
        let labels = CtLabels::new(snap.cts.iter().map(|c| (c.ctid, c.meta.name.as_deref())));
        emit_network(net, &labels, out);
    }
    emit_exporter(snap.sources, snap.collect_seconds, out);
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
    use crate::shaper::view::{CtShaping, DirShaping};

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
            shaping: Some(CtShaping {
                ctid: 101,
                receive: DirShaping {
                    pps_limit: Some(1000),
                    pps_drops: 5,
                    pps_drop_bytes: 320,
                    ..DirShaping::default()
                },
                transmit: DirShaping {
                    rate: Some(1_250_000),
                    class_rates: vec![(1, 625_000)],
                    overlimits: 7,
                    queue_drops: 2,
                    ..DirShaping::default()
                },
            }),
        };
        let stopped = CtSnapshot {
            ctid: 102,
            meta: Arc::new(CtMeta::default()),
            state: State::Stopped,
            started_at: None,
            cgroup: None,
            shaping: None,
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
                shaper: true,
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
        let sh = |l: &[(&str, &str)]| v("berth_shaping_rate_bytes", l);
        assert_eq!(
            sh(&[("ctid", "101"), ("direction", "transmit"), ("class", "all")]),
            Some(1_250_000.0)
        );
        assert_eq!(
            sh(&[("ctid", "101"), ("direction", "transmit"), ("class", "1")]),
            Some(625_000.0)
        );
        assert_eq!(sh(&[("ctid", "101"), ("direction", "receive")]), None);
        assert_eq!(
            v(
                "berth_shaping_pps_limit",
                &[("ctid", "101"), ("direction", "receive")]
            ),
            Some(1000.0)
        );
        assert_eq!(
            v(
                "berth_shaping_pps_limit",
                &[("ctid", "101"), ("direction", "transmit")]
            ),
            None
        );
        assert_eq!(
            v(
                "berth_shaping_dropped_packets_total",
                &[("ctid", "101"), ("direction", "receive"), ("reason", "pps")]
            ),
            Some(5.0)
        );
        assert_eq!(
            v(
                "berth_shaping_dropped_packets_total",
                &[
                    ("ctid", "101"),
                    ("direction", "transmit"),
                    ("reason", "queue")
                ]
            ),
            Some(2.0)
        );
        assert_eq!(
            v(
                "berth_shaping_overlimits_total",
                &[("ctid", "101"), ("direction", "transmit")]
            ),
            Some(7.0)
        );
        assert_eq!(
            v(
                "berth_shaping_overlimits_total",
                &[("ctid", "101"), ("direction", "receive")]
            ),
            None,
            "only a packet-rate limit: no HTB, no overlimits"
        );
        assert_eq!(
            v("berth_exporter_source_up", &[("source", "shaper")]),
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
