//! What the caller plugs into the network steps of the lifecycle: the eBPF datapath and the
//! shaper (which live in the `berth` crate) attach to the host-side interfaces here.

use std::error::Error;
use std::fmt::Display;
use std::path::Path;

use uuid::Uuid;

use crate::billing::BillingConfig;
use crate::ctid::Ctid;
use crate::net::NetState;
use crate::shaping::ShapingConfig;

/// A lifecycle hook that failed: what it was doing, on what (an interface, a pin directory, a
/// CT), and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}")]
pub struct HookError {
    /// e.g. "attach eBPF programs to", "shape".
    pub op: &'static str,
    /// e.g. "venet101", "/sys/fs/bpf/berth/v2".
    pub object: String,
    #[source]
    pub source: Box<dyn Error + Send + Sync>,
}

impl HookError {
    pub fn new(
        op: &'static str,
        object: impl Display,
        source: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        Self {
            op,
            object: object.to_string(),
            source: source.into(),
        }
    }
}

/// The network steps of the lifecycle that belong to the caller.
pub trait NetHooks {
    /// `net` is set up (at start, before init execs, or after a live change): attach to every
    /// interface in it, (re)load the CT's addresses, and shape every interface with `shaping`
    /// (`None`: the CT is not shaped, nothing to do for shaping). Must be idempotent.
    fn net_up(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        shaping: Option<&ShapingConfig>,
    ) -> Result<(), HookError>;
    /// The interfaces in `net` are gone or going: detach from them (and drop their shaping).
    fn net_down(&mut self, ctid: Ctid, net: &NetState);
    /// Shapes every interface in `net` with `shaping`, live; `None` removes the CT's shaping
    /// from them. Must be idempotent.
    fn shape(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        shaping: Option<&ShapingConfig>,
    ) -> Result<(), HookError>;
    /// CT `ctid` (identity `uuid`) is being destroyed, stopped: write what it counted to
    /// `record` (replacing the file atomically) with its billing settings (a CT no ledger tick
    /// saw alive is registered from them), then clear its counters, so a new CT given the
    /// same CTID counts from 0. Must be idempotent (a destroy interrupted after it runs again).
    /// The default: nothing is counted, nothing to do.
    fn retire(
        &mut self,
        ctid: Ctid,
        uuid: Uuid,
        billing: &BillingConfig,
        record: &Path,
    ) -> Result<(), HookError> {
        let _ = (ctid, uuid, billing, record);
        Ok(())
    }
    /// `berth gc`: drops the caller's state for interfaces that no longer exist (a CT whose
    /// berth was killed mid start or stop: its veth went with the netns, its datapath entries,
    /// link pins, IFBs and shaper entries did not). The default: nothing is kept, nothing to do.
    /// `live`: the host-side interfaces (ifindex, name) of the CTs that run; an implementation
    /// must clean nothing when they are not visible by that name, which means this berth runs
    /// in another network namespace than the CTs' host sides.
    fn gc(&mut self, live: &[(u32, String)]) -> Result<NetGc, HookError> {
        let _ = live;
        Ok(NetGc::default())
    }
}

/// What [`NetHooks::gc`] removed, by host ifindex.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetGc {
    /// Datapath attachments (link pins, interface entries) of vanished interfaces.
    pub detached: Vec<u32>,
    /// Shaping (IFB, map entries) of vanished interfaces.
    pub unshaped: Vec<u32>,
}

/// Lifecycle without a datapath (and so without shaping).
pub struct NoHooks;

impl NetHooks for NoHooks {
    fn net_up(
        &mut self,
        _: Ctid,
        _: &NetState,
        _: Option<&ShapingConfig>,
    ) -> Result<(), HookError> {
        Ok(())
    }
    fn net_down(&mut self, _: Ctid, _: &NetState) {}
    fn shape(&mut self, _: Ctid, _: &NetState, _: Option<&ShapingConfig>) -> Result<(), HookError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_chain::{ErrorChain, assert_causes_not_repeated};

    #[test]
    fn names_the_operation_and_object_and_chains_the_cause() {
        let e = HookError::new(
            "attach eBPF programs to",
            "venet101",
            std::io::Error::other("no such device"),
        );
        assert_causes_not_repeated(&e);
        assert_eq!(
            ErrorChain(&e).to_string(),
            "attach eBPF programs to venet101: no such device"
        );
    }
}
