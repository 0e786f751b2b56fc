//! Stand-in for `quota/enforce.rs` (the lead's, landing on main) with its signature: it only
//! logs what would be enforced. Removed when that file is merged.
use std::path::Path;

use berth_runtime::{Ctid, config::Host, shaping::Rate};
use tracing::debug;

pub enum Enforcement {
    Normal,
    Throttle {
        rate_in: Option<Rate>,
        rate_out: Option<Rate>,
    },
    Cut,
    Suspend,
    Stop,
}

#[derive(Debug, thiserror::Error)]
#[error("enforcing the quota of CT {ctid}")]
pub struct EnforceError {
    pub ctid: Ctid,
}

/// Idempotent: berthd calls it every tick with the CT's current state.
pub fn apply(host: &Host, pin_dir: &Path, ctid: Ctid, e: &Enforcement) -> Result<(), EnforceError> {
    let what = match e {
        Enforcement::Normal => "normal",
        Enforcement::Throttle { .. } => "throttle",
        Enforcement::Cut => "cut",
        Enforcement::Suspend => "suspend",
        Enforcement::Stop => "stop",
    };
    debug!(%ctid, root = %host.root.display(), pin_dir = %pin_dir.display(), what, "quota enforcement (shim: logged only)");
    Ok(())
}
