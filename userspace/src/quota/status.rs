//! `berth quota status`, the `quota.*` fields of `list` and the `quota` object of `status`:
//! a CT's configured quota joined with the state berthd stored at its last tick.
use std::path::{Path, PathBuf};

use berth_runtime::config::{CtConfig, Host};
use berth_runtime::transfer_quota::QuotaConfig;
use serde_json::{Value, json};

use super::store::{OutboxSummary, QuotaStore, QuotaStoreError, StateRow};

/// The ledger the CLI reads when not told: `BERTHD_LEDGER`, else `<root>/billing.db` (berthd's
/// default).
pub fn default_ledger(host: &Host) -> PathBuf {
    std::env::var_os("BERTHD_LEDGER")
        .map(PathBuf::from)
        .unwrap_or_else(|| host.root.join("billing.db"))
}

/// One CT's quota.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtQuotaStatus {
    pub ctid: u32,
    pub uuid: Option<String>,
    pub config: QuotaConfig,
    /// As of berthd's last tick; `None` before it evaluated the quota.
    pub state: Option<StateRow>,
    pub outbox: OutboxSummary,
}

/// The stored states, or none when there is no ledger yet.
pub fn open(ledger: &Path) -> Result<Option<QuotaStore>, QuotaStoreError> {
    match QuotaStore::open_read_only(ledger) {
        Ok(s) => Ok(Some(s)),
        Err(QuotaStoreError::NoLedger(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn of_ct(store: Option<&QuotaStore>, cfg: &CtConfig) -> Result<CtQuotaStatus, QuotaStoreError> {
    let uuid = cfg.uuid.map(|u| u.to_string());
    let (state, outbox) = match (store, &uuid) {
        (Some(s), Some(u)) => (s.state(u)?, s.outbox_summary(u)?),
        _ => (None, OutboxSummary::default()),
    };
    Ok(CtQuotaStatus {
        ctid: cfg.ctid.get(),
        uuid,
        config: cfg.quota.clone(),
        // A state stored under a quota that was removed since is not the CT's any more.
        state: state.filter(|_| cfg.quota.transfer.is_some()),
        outbox,
    })
}

/// Every CT with a `[quota]`, by CTID.
pub fn all(host: &Host, ledger: &Path) -> Result<Vec<CtQuotaStatus>, QuotaStatusError> {
    let store = open(ledger)?;
    let mut out = Vec::new();
    for ctid in host.list_ctids()? {
        let cfg = CtConfig::load(host, ctid)?;
        if cfg.quota.is_empty() {
            continue;
        }
        out.push(of_ct(store.as_ref(), &cfg)?);
    }
    Ok(out)
}

/// Errors of [`all`].
#[derive(Debug, thiserror::Error)]
pub enum QuotaStatusError {
    #[error(transparent)]
    Store(#[from] QuotaStoreError),
    #[error(transparent)]
    Config(#[from] berth_runtime::config::ConfigError),
}

impl CtQuotaStatus {
    pub fn json(&self) -> Value {
        let q = &self.config;
        let st = self.state.as_ref();
        json!({
            "ctid": self.ctid,
            "uuid": self.uuid,
            "configured": q.transfer.is_some(),
            "transfer_bytes": q.transfer.map(|b| b.0),
            "transfer": q.transfer.map(|b| b.to_string()),
            "count": q.transfer.map(|_| q.count().as_str()),
            "classes": q.classes,
            "soft_action": q.transfer.map(|_| q.soft_action().as_str()),
            "throttle_rate_in": q.throttle_rate_in.map(|r| r.to_string()),
            "throttle_rate_out": q.throttle_rate_out.map(|r| r.to_string()),
            "hard_bytes": q.hard.map(|b| b.0),
            "hard_action": q.hard.map(|_| q.hard_action().as_str()),
            "notify": q.notify(),
            "webhook": q.webhook,
            "state": st.map(|s| s.state.as_str()),
            "since": st.map(|s| s.since),
            "period": st.map(|s| s.period.clone()),
            "period_start": st.map(|s| s.period_start),
            "period_end": st.map(|s| s.period_end),
            "used_bytes": st.map(|s| s.used),
            "limit_bytes": st.map(|s| s.soft),
            "hard_limit_bytes": st.and_then(|s| s.hard),
            "updated": st.map(|s| s.updated),
            "enforced": st.and_then(|s| s.enforced.clone()),
            "enforce_error": st.and_then(|s| s.enforce_error.clone()),
            "webhook_delivered": self.outbox.delivered,
            "webhook_pending": self.outbox.pending,
            "webhook_last_error": self.outbox.last_error.as_ref().map(|(k, a, e)| json!({"key": k, "attempts": a, "error": e})),
            "webhook_abandoned": self.outbox.abandoned,
            "webhook_last_abandoned": self.outbox.last_abandoned.as_ref().map(|(k, r)| json!({"key": k, "reason": r})),
        })
    }

    /// The human lines of `quota status`.
    pub fn human(&self) -> String {
        let q = &self.config;
        let Some(t) = q.transfer else {
            return format!("CT {}: no transfer quota", self.ctid);
        };
        let mut s = format!(
            "CT {}: quota {t} ({}, {}) soft {} hard {}",
            self.ctid,
            q.count(),
            match &q.classes {
                Some(c) => format!(
                    "classes {}",
                    c.iter().map(u8::to_string).collect::<Vec<_>>().join(",")
                ),
                None => "classes all but 0".into(),
            },
            match q.soft_action() {
                berth_runtime::transfer_quota::SoftAction::Throttle => format!(
                    "throttle {}:{}",
                    q.throttle_rate_in.map_or("none".into(), |r| r.to_string()),
                    q.throttle_rate_out.map_or("none".into(), |r| r.to_string())
                ),
                berth_runtime::transfer_quota::SoftAction::None => "none".into(),
            },
            q.hard
                .map_or("none".into(), |h| format!("{h} {}", q.hard_action())),
        );
        match &self.state {
            Some(st) => {
                let pct = if st.soft > 0 {
                    st.used as f64 * 100.0 / st.soft as f64
                } else {
                    0.0
                };
                s.push_str(&format!(
                    "\n  period {}: {} state, used {} of {} bytes ({pct:.1} %), enforced {}",
                    st.period,
                    st.state.as_str(),
                    st.used,
                    st.soft,
                    st.enforced.as_deref().unwrap_or("not yet")
                ));
                if let Some(e) = &st.enforce_error {
                    s.push_str(&format!("\n  enforcement failing: {e}"));
                }
            }
            None => {
                s.push_str("\n  not evaluated yet (berthd evaluates it at its next ledger tick)")
            }
        }
        s.push_str(&format!(
            "\n  webhook: {} delivered, {} pending",
            self.outbox.delivered, self.outbox.pending
        ));
        if let Some((k, a, e)) = &self.outbox.last_error {
            s.push_str(&format!("\n  webhook failing: {k} after {a} attempts: {e}"));
        }
        if let Some((k, r)) = &self.outbox.last_abandoned {
            s.push_str(&format!(
                "\n  webhook: {} abandoned, the last {k}: {r}",
                self.outbox.abandoned
            ));
        }
        s
    }
}
