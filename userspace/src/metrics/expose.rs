//! The exposition berthd serves: samples written straight into text, one buffer per family.
//!
//! Why not the `prometheus` crate's encoder: with 1000 CTs (~45 000 series) building its
//! model (a `Metric` with owned label strings per series), encoding and freeing it took
//! 80-110 ms per scrape on the project's 2-vCPU machine, twice the 50 ms budget; writing the
//! same samples directly takes a few milliseconds, and [`scrape`] writes each batch of CTs on
//! the thread that read it. The crate's model stays available through
//! [`super::BerthCollector`] and the unit tests check that both produce the same samples.

use std::{
    fmt::Write,
    sync::{Arc, Mutex},
    time::Instant,
};

use super::{
    Format, Reader,
    billing::BillingGauges,
    defs::{self, Kind, MetricDef},
    families::{CtLabels, Sink, Value, emit, emit_ct, emit_exporter, emit_network},
    snapshot::{Snapshot, SourceStatus},
};

/// Appends `s` as a label value (or HELP text): `\`, `"` and newline escaped, the only
/// characters both formats require escaping.
fn escape(s: &str, out: &mut String) {
    if !s.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Samples of some CTs (or of anything), per family.
pub(crate) struct Writer {
    /// Samples per family, in [`defs::ALL`] order.
    bodies: Vec<String>,
    /// Family index by the address of its name (a copied `const` keeps pointing at the same
    /// string), direct-mapped: a hit costs one comparison; a miss looks the name up by value
    /// (46 000 samples per 1000-CT scrape; a SipHash map was ~1% of the scrape).
    index: [(usize, usize); INDEX_SLOTS],
    /// A label block being reused.
    scratch: String,
}

const INDEX_SLOTS: usize = 128;

impl Writer {
    pub(crate) fn new() -> Self {
        Self {
            bodies: vec![String::new(); defs::ALL.len()],
            index: [(0, 0); INDEX_SLOTS],
            scratch: String::new(),
        }
    }

    fn index_of(&mut self, def: &MetricDef) -> usize {
        let key = def.name.as_ptr() as usize;
        let slot = (key >> 3 ^ key >> 10) % INDEX_SLOTS;
        let (k, i) = self.index[slot];
        if k == key {
            return i;
        }
        let i = defs::ALL
            .iter()
            .position(|d| d.name == def.name)
            .unwrap_or(0);
        self.index[slot] = (key, i);
        i
    }
}

impl Writer {
    /// Appends `{k="v",...}` (nothing without labels).
    fn labels(out: &mut String, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            escape(v, out);
            out.push('"');
        }
        out.push('}');
    }

    /// Appends ` value\n`.
    fn value(out: &mut String, value: Value) {
        out.push(' ');
        match value {
            Value::Int(v) => out.push_str(itoa::Buffer::new().format(v)),
            Value::Float(v) if v.is_finite() => {
                let _ = write!(out, "{v}");
            }
            Value::Float(v) if v.is_nan() => out.push_str("NaN"),
            Value::Float(v) => out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" }),
        }
        out.push('\n');
    }
}

impl Sink for Writer {
    fn sample(&mut self, def: &'static MetricDef, labels: &[(&str, &str)], value: Value) {
        let i = self.index_of(def);
        let out = &mut self.bodies[i];
        out.push_str(def.name);
        Self::labels(out, labels);
        Self::value(out, value);
    }

    /// The label block is written once and copied into each family.
    fn samples(&mut self, labels: &[(&str, &str)], samples: &[(&'static MetricDef, Value)]) {
        let mut block = std::mem::take(&mut self.scratch);
        block.clear();
        Self::labels(&mut block, labels);
        for (def, value) in samples {
            let i = self.index_of(def);
            let out = &mut self.bodies[i];
            out.push_str(def.name);
            out.push_str(&block);
            Self::value(out, *value);
        }
        self.scratch = block;
    }
}

/// The exposition of the samples in `parts`, family by family in [`defs::ALL`] order, each
/// family's samples in the order of `parts`. Families without samples are left out.
fn assemble<'a>(format: Format, parts: impl Iterator<Item = &'a Writer> + Clone) -> String {
    let total: usize = parts
        .clone()
        .flat_map(|w| w.bodies.iter())
        .map(String::len)
        .sum();
    let mut out = String::with_capacity(total + defs::ALL.len() * 200 + 16);
    for (i, def) in defs::ALL.iter().enumerate() {
        if parts.clone().all(|w| w.bodies[i].is_empty()) {
            continue;
        }
        let kind = match def.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let family = match (format, def.kind) {
            // OpenMetrics names a counter family without the `_total` its samples carry.
            (Format::OpenMetrics, Kind::Counter) => {
                def.name.strip_suffix("_total").unwrap_or(def.name)
            }
            _ => def.name,
        };
        out.push_str("# HELP ");
        out.push_str(family);
        out.push(' ');
        escape(def.help, &mut out);
        out.push('\n');
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for w in parts.clone() {
            out.push_str(&w.bodies[i]);
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// The exposition of `snap` in `format`. Families are in [`defs::ALL`] order; families
/// without samples are left out.
pub fn render(snap: &Snapshot, format: Format) -> String {
    let mut w = Writer::new();
    emit(snap, &mut w);
    assemble(format, std::iter::once(&w))
}

/// One scrape, read and written in `format`: what `/metrics` serves. The same samples as
/// `render(&reader.read(), format)`, but each batch of CTs is written on the thread that
/// read it, while the calling thread reads the datapath's maps.
pub fn scrape(reader: &Reader, format: Format) -> String {
    Scraper::default().scrape(reader, format)
}

/// Writes scrapes like [`scrape`], keeping the per-batch buffers for the next one: at 1000
/// CTs growing them anew was ~5% of a scrape's CPU time (reallocations and copies).
#[derive(Default)]
pub struct Scraper {
    spare: Mutex<Vec<Writer>>,
    /// The billing gauges of the last ledger tick ([`Scraper::set_billing`]).
    billing: Mutex<Arc<BillingGauges>>,
    /// The quota gauges of the last ledger tick ([`Scraper::set_quota`]).
    quota: Mutex<Arc<super::quota::QuotaGauges>>,
    /// The fleet shipper's state, when berthd ships (`--ship-url`).
    ship: Mutex<Option<Arc<crate::fleet::ShipStatus>>>,
}

impl Scraper {
    /// Replaces the billing gauges every later scrape writes.
    pub fn set_billing(&self, gauges: BillingGauges) {
        *self.billing.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(gauges);
    }

    /// Replaces the per-CT quota gauges every later scrape writes (after a ledger tick).
    pub fn set_quota(&self, cts: Vec<crate::quota::engine::CtQuota>) {
        let mut q = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        *q = Arc::new(super::quota::QuotaGauges {
            cts,
            ..(**q).clone()
        });
    }

    /// Replaces the webhook outbox gauges (after a tick or a delivery pass).
    pub fn set_quota_outbox(&self, backlog: u64, failing: u64) {
        let mut q = self.quota.lock().unwrap_or_else(|e| e.into_inner());
        *q = Arc::new(super::quota::QuotaGauges {
            cts: q.cts.clone(),
            outbox: Some((backlog, failing)),
        });
    }

    /// Makes every later scrape carry the shipper's gauges.
    pub fn set_ship(&self, status: Arc<crate::fleet::ShipStatus>) {
        *self.ship.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
    }

    pub fn scrape(&self, reader: &Reader, format: Format) -> String {
        let t0 = Instant::now();
        let take = || {
            self.spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_else(Writer::new)
        };
        let c = reader.collect(take, |w, ct| emit_ct(&ct, w), || reader.network());
        let mut tail = take();
        if let Some(n) = &c.main {
            let labels = CtLabels::new(c.cts.iter().map(|(c, m)| (*c, m.name.as_deref())));
            emit_network(n, &labels, &mut tail);
        }
        let sources = SourceStatus {
            configs: c.configs,
            cgroups: c.cgroups,
            datapath: c.main.is_some(),
            shaper: c.shaper,
        };
        let billing = self
            .billing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let configured: std::collections::HashSet<u32> = c.cts.iter().map(|(id, _)| *id).collect();
        billing.emit(|ctid| configured.contains(&ctid), &mut tail);
        let quota = self.quota.lock().unwrap_or_else(|e| e.into_inner()).clone();
        quota.emit(|ctid| configured.contains(&ctid), &mut tail);
        if let Some(s) = self.ship.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            super::billing::emit_ship(s, &mut tail);
        }
        emit_exporter(sources, t0.elapsed().as_secs_f64(), &mut tail);
        let out = assemble(format, c.batches.iter().chain(std::iter::once(&tail)));
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        for mut w in c.batches.into_iter().chain(std::iter::once(tail)) {
            w.bodies.iter_mut().for_each(String::clear);
            spare.push(w);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::metrics::{encode, families};

    /// `name{labels}` → value, from either text format.
    fn samples(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_owned(), v.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn same_samples_as_the_prometheus_crate_in_both_formats() {
        let snap = families::tests::sample();
        let fams = families::families(&snap);
        for format in [Format::Text, Format::OpenMetrics] {
            let reference = encode(&fams, format).unwrap();
            let ours = render(&snap, format);
            assert_eq!(samples(&ours), samples(&reference), "{format:?}");
            let headers = |t: &str| -> Vec<String> {
                let mut v: Vec<String> = t
                    .lines()
                    .filter(|l| l.starts_with("# TYPE"))
                    .map(str::to_owned)
                    .collect();
                v.sort();
                v
            };
            assert_eq!(headers(&ours), headers(&reference), "{format:?}");
            assert_eq!(ours.ends_with("# EOF\n"), format == Format::OpenMetrics);
        }
    }

    /// The served path (batches written on worker threads, assembled per family) gives the
    /// same text as writing a snapshot in one piece, over more CTs than one batch holds.
    #[test]
    fn scrape_matches_render_of_a_snapshot() {
        use berth_runtime::{Ctid, config::CtConfig};

        let dir = tempfile::tempdir().unwrap();
        let host = berth_runtime::config::Host::new(
            Some(dir.path().join("root")),
            None,
            Some(format!("berth-unit-expose-{}", std::process::id())),
        )
        .unwrap();
        host.ensure_dirs().unwrap();
        for c in 1..=70 {
            let mut cfg = CtConfig::new(Ctid::new(1000 + c).unwrap(), "busybox".into());
            cfg.name = (c % 3 == 0).then(|| format!("ct{c}"));
            cfg.save(&host).unwrap();
        }
        let reader = Reader::new(crate::metrics::Sources {
            host,
            pin_dir: dir.path().join("no-bpffs"),
        });
        let strip = |t: &str| -> String {
            t.lines()
                .filter(|l| !l.starts_with("berth_exporter_collect_duration_seconds"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let scraper = Scraper::default();
        for format in [Format::Text, Format::OpenMetrics] {
            let reference = render(&reader.read(), format);
            for _ in 0..2 {
                let served = scraper.scrape(&reader, format);
                assert_eq!(strip(&served), strip(&reference), "{format:?}");
            }
        }
        let text = render(&reader.read(), Format::Text);
        assert!(text.contains("ctid=\"1003\",name=\"ct3\""), "{text}");
        assert_eq!(text.matches("berth_container_info{").count(), 70);
    }

    #[test]
    fn escapes_label_values() {
        let mut s = String::new();
        escape("a\"b\\c\nd", &mut s);
        assert_eq!(s, "a\\\"b\\\\c\\nd");
    }
}
