//! `berth quota` and the `--quota-*` flags of create and set.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct QuotaArgs {
    /// The ledger berthd keeps the quota state in. Default: <root>/billing.db.
    #[arg(long, global = true, env = "BERTHD_LEDGER")]
    pub ledger: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: QuotaCmd,
}

#[derive(Subcommand, Debug)]
pub enum QuotaCmd {
    /// A CT's (or every CT's) quota, state, usage and webhook deliveries.
    Status {
        /// CTID or name. Default: every CT with a quota.
        ct: Option<String>,
    },
    /// Add SIZE (e.g. 100GB, 50GiB) to the CT's limits for the current billing period.
    Topup {
        /// CTID or name.
        ct: String,
        /// The transfer added, e.g. 100GB (10^9) or 50GiB (2^30).
        size: String,
    },
}

/// The CT's transfer quota, read by berthd from the saved config (`set` needs --save).
#[derive(Args, Debug, Default, PartialEq, Clone)]
pub struct QuotaFlags {
    /// Transfer per billing period, e.g. 2TB (10^12) or 2TiB (2^40); `none` removes the quota.
    #[arg(id = "quota-transfer", long = "quota-transfer", value_name = "SIZE")]
    pub transfer: Option<String>,
    /// Bytes counted: out, in, both (in + out) or max (the larger).
    #[arg(
        id = "quota-count",
        long = "quota-count",
        value_name = "out|in|both|max"
    )]
    pub count: Option<String>,
    /// Network classes counted, e.g. 1,2; `default`: all but class 0; `all`: every class.
    #[arg(id = "quota-classes", long = "quota-classes", value_name = "LIST")]
    pub classes: Option<String>,
    /// Throttle rate over the quota, RATE or IN:OUT (tc units; `none`: no throttle).
    #[arg(
        id = "quota-throttle",
        long = "quota-throttle",
        value_name = "RATE[:RATE]"
    )]
    pub throttle: Option<String>,
    /// Hard limit (at least the transfer quota); `none` removes it.
    #[arg(id = "quota-hard", long = "quota-hard", value_name = "SIZE")]
    pub hard: Option<String>,
    /// What happens at the hard limit: cut, suspend, stop or none.
    #[arg(
        id = "quota-hard-action",
        long = "quota-hard-action",
        value_name = "ACTION"
    )]
    pub hard_action: Option<String>,
    /// Percentages of the quota that notify, e.g. 80,90,100 (`none`: no thresholds).
    #[arg(id = "quota-notify", long = "quota-notify", value_name = "LIST")]
    pub notify: Option<String>,
    /// Webhook URL (http://) the events are POSTed to; `none` removes it.
    #[arg(id = "quota-webhook", long = "quota-webhook", value_name = "URL")]
    pub webhook: Option<String>,
}
