//! The billing gauges: each live CT's current-period totals and 95th from the ledger, advanced
//! once per berthd tick ([`Ledger::current_periods`] re-reads only the slots not yet final: a
//! full report of every CT late in a month is ~1 s of CPU at 1000 CTs) and written by every
//! scrape from that copy.

use std::collections::BTreeMap;

use super::defs;
use super::families::{Sink, Value};
use crate::billing::store::{CurrentBill, CurrentPeriods};
use crate::billing::{BillingError, Counter, CounterKey, Direction, Ledger, P95Mode, Report};
use crate::fleet::ShipStatus;

/// One CT's gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtBilling {
    pub ctid: u32,
    pub uuid: String,
    /// Bytes of the current period by (direction, class), both families summed.
    pub bytes: BTreeMap<(Direction, u8), u64>,
    /// The per-direction 95th, bits per second (`None` while no slot of the period has passed).
    pub p95_in: Option<u64>,
    pub p95_out: Option<u64>,
}

/// The gauges of every live CT, as of one tick.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BillingGauges(pub Vec<CtBilling>);

fn by_direction_and_class(
    totals: &BTreeMap<CounterKey, Counter>,
) -> BTreeMap<(Direction, u8), u64> {
    let mut bytes = BTreeMap::new();
    for (k, c) in totals {
        *bytes.entry((k.direction, k.class)).or_insert(0) += c.bytes;
    }
    bytes
}

impl CtBilling {
    pub fn from_report(r: &Report) -> CtBilling {
        CtBilling {
            ctid: r.ct.ctid,
            uuid: r.ct.uuid.clone(),
            bytes: by_direction_and_class(&r.totals),
            p95_in: r.p95.in_bps,
            p95_out: r.p95.out_bps,
        }
    }

    pub fn from_current(b: &CurrentBill) -> CtBilling {
        CtBilling {
            ctid: b.ct.ctid,
            uuid: b.ct.uuid.clone(),
            bytes: by_direction_and_class(&b.totals),
            p95_in: Some(b.in_bps),
            p95_out: Some(b.out_bps),
        }
    }
}

impl BillingGauges {
    /// Every CT not destroyed, for the period holding `now` in its own terms (a destroyed CT's
    /// series vanish like its other series; its bill stays in the ledger and the API), advanced
    /// from `state` (kept by the caller from tick to tick): the same numbers as [`Self::read`].
    pub fn advance(
        ledger: &Ledger,
        state: &mut CurrentPeriods,
        now: i64,
    ) -> Result<BillingGauges, BillingError> {
        let bills = ledger.current_periods(state, now)?;
        Ok(BillingGauges(
            bills.iter().map(CtBilling::from_current).collect(),
        ))
    }

    /// The same as [`Self::advance`] from full reports (every slot of the period re-read).
    pub fn read(ledger: &Ledger, now: i64) -> Result<BillingGauges, BillingError> {
        let reports = ledger.report_all(now, P95Mode::PerDirection, None, now)?;
        Ok(BillingGauges(
            reports
                .iter()
                .filter(|r| r.ct.destroyed.is_none())
                .map(CtBilling::from_report)
                .collect(),
        ))
    }

    /// Writes the gauges of the CTs `configured` accepts (by CTID): a CT destroyed since the
    /// tick loses its series at the next scrape, like its other series.
    pub fn emit(&self, configured: impl Fn(u32) -> bool, out: &mut impl Sink) {
        let mut ctid = String::new();
        let mut class = String::new();
        for ct in self.0.iter().filter(|c| configured(c.ctid)) {
            ctid.clear();
            ctid.push_str(&ct.ctid.to_string());
            for ((d, c), b) in &ct.bytes {
                class.clear();
                class.push_str(&c.to_string());
                out.sample(
                    &defs::BILLING_PERIOD_BYTES,
                    &[
                        ("ctid", &ctid),
                        ("uuid", &ct.uuid),
                        ("direction", d.as_str()),
                        ("class", &class),
                    ],
                    Value::Int(*b),
                );
            }
            for (d, v) in [(Direction::In, ct.p95_in), (Direction::Out, ct.p95_out)] {
                if let Some(v) = v {
                    // Bytes, Prometheus' base unit (promtool rejects bits): the report's
                    // bit/s over 8, exact in an f64.
                    out.sample(
                        &defs::BILLING_P95,
                        &[
                            ("ctid", &ctid),
                            ("uuid", &ct.uuid),
                            ("direction", d.as_str()),
                        ],
                        Value::Float(v as f64 / 8.0),
                    );
                }
            }
        }
    }
}

/// The shipper's gauges (berthd --ship-url).
pub fn emit_ship(s: &ShipStatus, out: &mut impl Sink) {
    use std::sync::atomic::Ordering::Relaxed;
    let int = |v: i64| Value::Int(u64::try_from(v).unwrap_or(0));
    out.sample(&defs::SHIP_LAG, &[], int(s.lag()));
    out.sample(&defs::SHIP_ACKED, &[], int(s.acked_seq.load(Relaxed)));
    out.sample(
        &defs::SHIP_LAST_SUCCESS,
        &[],
        int(s.last_success.load(Relaxed)),
    );
    out.sample(
        &defs::SHIP_FAILURES,
        &[],
        Value::Int(s.failures_total.load(Relaxed)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::defs::MetricDef;

    #[derive(Default)]
    struct Collect(Vec<String>);

    impl Sink for Collect {
        fn sample(&mut self, def: &'static MetricDef, labels: &[(&str, &str)], value: Value) {
            let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            self.0.push(format!(
                "{}{{{}}} {}",
                def.name,
                l.join(","),
                value.as_f64()
            ));
        }
    }

    #[test]
    fn emits_configured_cts_bytes_by_direction_and_class_and_the_known_95ths() {
        let mut g = BillingGauges(vec![CtBilling {
            ctid: 7,
            uuid: "u".into(),
            bytes: [((Direction::In, 0), 10), ((Direction::Out, 2), 5)]
                .into_iter()
                .collect(),
            p95_in: Some(804),
            p95_out: None,
        }]);
        g.0.push(CtBilling {
            ctid: 8,
            ..g.0[0].clone()
        });
        let mut c = Collect::default();
        g.emit(|ctid| ctid == 7, &mut c);
        assert_eq!(
            c.0,
            [
                "berth_billing_period_bytes{ctid=7,uuid=u,direction=in,class=0} 10",
                "berth_billing_period_bytes{ctid=7,uuid=u,direction=out,class=2} 5",
                "berth_billing_p95_bytes_per_second{ctid=7,uuid=u,direction=in} 100.5",
            ]
        );
    }
}
