//! berthd's Prometheus exporter: a collector that reads every CT's traffic counters (the
//! pinned eBPF maps) and cgroup counters at scrape time, and the exposition formats.
//!
//! # What is exported
//!
//! [`defs::ALL`] lists every family. Per CT (label `ctid`):
//! * traffic, from the datapath: `berth_network_{receive,transmit}_{bytes,packets}_total`
//!   by `class` and `family` (`ipv4`, `ipv6`, `other`), `berth_network_drops_total` and
//!   `berth_network_dropped_bytes_total` by `direction` and `reason`; plus cAdvisor's
//!   `container_network_*_total` sums. **Direction is the CT's point of view**: receive =
//!   delivered to the CT (host-side interface egress), transmit = sent by the CT (host-side
//!   ingress, where spoofing is dropped).
//! * shaping, read back from the kernel's HTB classes and packet-rate buckets (read-only:
//!   berthd never loads programs or changes qdiscs): `berth_shaping_rate_bytes` (configured
//!   rate in bytes per second by `direction` and `class`, `all` for the CT's total),
//!   `berth_shaping_pps_limit`, `berth_shaping_overlimits_total` and
//!   `berth_shaping_dropped_packets_total` by `reason` (`queue`, `pps`). Present for the
//!   shaped directions of shaped CTs; the rate compares directly with
//!   `rate(berth_network_*_bytes_total)` (both count Ethernet frames).
//! * cgroup counters under cAdvisor's names (`container_cpu_usage_seconds_total`,
//!   `container_memory_working_set_bytes`, ...), with label `name` when the CT has one,
//!   present while the CT's cgroup exists (cgroup v1 and v2).
//! * `berth_container_info{ctid,name,hostname,template}` and
//!   `berth_container_state{ctid,state}` for every CT with a config.
//! * billing, from berthd's ledger as of its last tick ([`billing`]):
//!   `berth_billing_period_bytes{ctid,uuid,direction,class}` (the current period's totals) and
//!   `berth_billing_p95_bytes_per_second{ctid,uuid,direction}` (its per-direction 95th: the bill's
//!   bit/s over 8, bytes being Prometheus' base unit), for
//!   every CT in the ledger with a config.
//!
//! # Lifetimes of series
//!
//! Only CTs with a config file are exported: a destroyed CT's series disappear at the next
//! scrape although its counters stay in the maps for billing. Traffic counters live in the
//! kernel keyed by CTID, so they never go back, neither across CT restarts nor across berthd
//! restarts (berthd keeps no counter state). cgroup counters start from 0 when a CT starts
//! (a new cgroup), like cAdvisor's; `container_start_time_seconds` marks the start, and
//! PromQL's `rate()`/`increase()` treat the drop as a counter reset. Label values are bounded:
//! CTIDs, names, class numbers and fixed enums, never addresses or PIDs.
//!
//! # Cost
//!
//! A scrape reads ~17 kernel files per running CT (cgroup counters through kept-open
//! descriptors, a pidfd `poll` for its init), in batches on as many threads as CPUs (at most
//! 4), each thread writing the text of the CTs it read, while the calling thread reads the
//! datapath's maps. Configs and run states are read again only when inotify says their file
//! changed ([`watch`]). Shaped CTs add one rtnetlink class dump per shaped direction (~13 µs).
//! `cargo xtask bench metrics` measures 1000 running CTs.

pub mod billing;
pub mod cgfiles;
pub mod defs;
pub mod expose;
pub mod families;
pub mod openmetrics;
mod per_ct;
pub mod quota;
pub mod snapshot;
pub mod watch;

use prometheus::{
    Encoder, TextEncoder,
    core::{Collector, Desc},
    proto::MetricFamily,
};
pub use snapshot::{Reader, Snapshot, Sources};

/// Where berthd listens unless told otherwise: loopback only (the metrics name CTs and
/// their traffic), port 9597 (unassigned in Prometheus' default port allocation list).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9597";

/// A Prometheus collector over a [`Reader`]: every `collect` reads the sources afresh.
#[derive(Debug)]
pub struct BerthCollector {
    reader: Reader,
    descs: Vec<Desc>,
}

impl BerthCollector {
    pub fn new(sources: Sources) -> Self {
        let descs = defs::ALL
            .iter()
            .map(|d| {
                let mut labels: Vec<String> = d.labels.iter().map(|l| l.to_string()).collect();
                if d.ct_name {
                    labels.push("name".into());
                }
                Desc::new(
                    d.name.to_owned(),
                    d.help.to_owned(),
                    labels,
                    Default::default(),
                )
                .unwrap_or_else(|e| panic!("metric definition {} is invalid: {e}", d.name))
            })
            .collect();
        Self {
            reader: Reader::new(sources),
            descs,
        }
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }
}

impl Collector for BerthCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        families::families(&self.reader.read())
    }
}

/// Exposition format of a `/metrics` response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (the default).
    Text,
    /// OpenMetrics 1.0.0 text.
    OpenMetrics,
}

const TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Format {
    /// Picks the format from an `Accept` header: OpenMetrics when the client ranks it at
    /// least as high as the text format (Prometheus ≥ 2.5 asks for it first), the text
    /// format otherwise and when there is no header.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let (mut om, mut text) = (None::<f32>, None::<f32>);
        for item in accept.split(',') {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let mut q = 1.0f32;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.parse().unwrap_or(0.0);
                }
            }
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut om,
                "text/plain" | "text/*" | "*/*" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
        match (om, text) {
            (Some(o), t) if o > 0.0 && o >= t.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_TYPE,
            Format::OpenMetrics => OPENMETRICS_TYPE,
        }
    }
}

/// Encodes families in `format`.
pub fn encode(families: &[MetricFamily], format: Format) -> prometheus::Result<String> {
    let mut out =
        String::with_capacity(families.iter().map(|f| f.get_metric().len()).sum::<usize>() * 96);
    match format {
        Format::Text => {
            let mut buf = Vec::new();
            TextEncoder::new().encode(families, &mut buf)?;
            out = String::from_utf8(buf).map_err(|e| {
                prometheus::Error::Msg(format!("text encoder wrote invalid UTF-8: {e}"))
            })?;
        }
        Format::OpenMetrics => openmetrics::encode(families, &mut out),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_prometheus_accept_headers() {
        assert_eq!(Format::negotiate(None), Format::Text);
        // What Prometheus 2.42 sends.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0.2, text/plain")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("application/json")), Format::Text);
    }

    #[test]
    fn collector_registers_and_gathers_with_nothing_to_read() {
        let dir = tempfile::tempdir().unwrap();
        let host = berth_runtime::config::Host::new(
            Some(dir.path().join("root")),
            None,
            Some(format!("berth-unit-{}", std::process::id())),
        )
        .unwrap();
        let reg = prometheus::Registry::new();
        reg.register(Box::new(BerthCollector::new(Sources {
            host,
            pin_dir: dir.path().join("pins"),
        })))
        .unwrap();
        let fams = reg.gather();
        let text = encode(&fams, Format::Text).unwrap();
        assert!(
            text.contains("berth_exporter_source_up{source=\"datapath\"} 0"),
            "{text}"
        );
        let om = encode(&fams, Format::OpenMetrics).unwrap();
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
