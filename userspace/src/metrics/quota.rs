//! The quota gauges: each CT's used bytes, limits and state as of berthd's last ledger tick,
//! and the webhook outbox. The state is one series per state with value 1 for the current one
//! (the enum pattern of kube-state-metrics and node_exporter's `node_systemd_unit_state`):
//! alerts and dashboards match `state="cut"` by name instead of decoding magic numbers, and a
//! state added later is a new label value, not a renumbering.

use super::defs;
use super::families::{Sink, Value};
use crate::quota::State;
use crate::quota::engine::CtQuota;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaGauges {
    pub cts: Vec<CtQuota>,
    /// The outbox's (backlog, failing), once berthd read it: a scrape without a ledger (the
    /// library's `scrape`) has no outbox to report.
    pub outbox: Option<(u64, u64)>,
}

impl QuotaGauges {
    /// Writes the CTs `configured` accepts (by CTID) and the outbox gauges.
    pub fn emit(&self, configured: impl Fn(u32) -> bool, out: &mut impl Sink) {
        for ct in self.cts.iter().filter(|c| configured(c.ctid)) {
            let ctid = ct.ctid.to_string();
            let l = [("ctid", ctid.as_str()), ("uuid", ct.uuid.as_str())];
            out.sample(&defs::QUOTA_USED, &l, Value::Int(ct.used));
            out.sample(&defs::QUOTA_LIMIT, &l, Value::Int(ct.soft));
            if let Some(h) = ct.hard {
                out.sample(&defs::QUOTA_HARD_LIMIT, &l, Value::Int(h));
            }
            for s in State::ALL {
                out.sample(
                    &defs::QUOTA_STATE,
                    &[l[0], l[1], ("state", s.as_str())],
                    Value::Int(u64::from(s == ct.state)),
                );
            }
        }
        if let Some((backlog, failing)) = self.outbox {
            out.sample(&defs::QUOTA_WEBHOOK_BACKLOG, &[], Value::Int(backlog));
            out.sample(&defs::QUOTA_WEBHOOK_FAILING, &[], Value::Int(failing));
        }
    }
}
