//! The datapath's and the shaper's part in the CT lifecycle ([`NetHooks`]): attach the eBPF
//! programs to every host-side interface a CT gets, load its addresses for anti-spoofing, and
//! shape those interfaces with the CT's shaping.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use berth_runtime::Ctid;
use berth_runtime::container::{HookError, NetHooks};
use berth_runtime::error_chain::ErrorChain;
use berth_runtime::net::{Mode, NetState};
use berth_runtime::shaping::ShapingConfig;
use tracing::{debug, warn};

use crate::datapath::{DEFAULT_PIN_DIR, Datapath, IfaceConfig};
use crate::shaper::Shaper;

/// Opens (or loads and pins) the datapath and the shaper on first use only, so commands that
/// touch no network pay nothing.
pub struct DatapathHooks {
    pin_dir: PathBuf,
    dp: Option<Datapath>,
    shaper: Option<Shaper>,
}

impl DatapathHooks {
    pub fn new(pin_dir: Option<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            dp: None,
            shaper: None,
        }
    }

    /// The shaper, opened on first use (its pins live under the datapath's directory).
    pub fn shaper(&mut self) -> Result<&mut Shaper, HookError> {
        if self.shaper.is_none() {
            let s = Shaper::open(&self.pin_dir)
                .map_err(|e| HookError::new("open the shaper at", self.pin_dir.display(), e))?;
            self.shaper = Some(s);
        }
        Ok(self.shaper.as_mut().expect("just set"))
    }

    /// Whether a shaper may hold state for this host: opened already, or pinned.
    fn shaper_exists(&self) -> bool {
        self.shaper.is_some() || self.pin_dir.join("shaper").exists()
    }

    fn dp(&mut self) -> Result<&mut Datapath, HookError> {
        if self.dp.is_none() {
            let dp = Datapath::open_or_load(&self.pin_dir).map_err(|e| {
                HookError::new("open the eBPF datapath at", self.pin_dir.display(), e)
            })?;
            self.dp = Some(dp);
        }
        Ok(self.dp.as_mut().expect("just set"))
    }
}

impl NetHooks for DatapathHooks {
    fn net_up(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        shaping: Option<&ShapingConfig>,
    ) -> Result<(), HookError> {
        let dp = self.dp()?;
        let mut addrs = BTreeSet::<IpAddr>::new();
        for i in &net.ifaces {
            let mac = i.ct_mac.map(|m| m.0).unwrap_or_default();
            let cfg = match i.mode {
                Mode::Routed => IfaceConfig::routed(ctid, mac),
                Mode::Bridged => IfaceConfig::bridged(ctid, mac),
            };
            dp.attach(i.host_ifindex, cfg)
                .map_err(|e| HookError::new("attach eBPF programs to", &i.host_ifname, e))?;
            addrs.extend(i.addrs.iter().map(|n| n.addr()));
        }
        let addrs: Vec<IpAddr> = addrs.into_iter().collect();
        let ifaces: Vec<u32> = net.ifaces.iter().map(|i| i.host_ifindex).collect();
        dp.set_ct_addrs_on(ctid, &addrs, &ifaces).map_err(|e| {
            HookError::new(
                "load into the datapath the addresses of",
                format!("CT {ctid}"),
                e,
            )
        })?;
        if let Some(cfg) = shaping.filter(|s| !s.is_empty()) {
            self.shape(ctid, net, Some(cfg))?;
        }
        debug!(%ctid, ifaces = net.ifaces.len(), "datapath attached");
        Ok(())
    }

    fn shape(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        shaping: Option<&ShapingConfig>,
    ) -> Result<(), HookError> {
        // Nothing to remove where no shaper was ever set up.
        if shaping.is_none() && !self.shaper_exists() {
            return Ok(());
        }
        let sh = self.shaper()?;
        for i in &net.ifaces {
            match shaping {
                Some(c) => sh
                    .apply(ctid, i.host_ifindex, c)
                    .map_err(|e| HookError::new("shape", &i.host_ifname, e))?,
                None => sh
                    .remove(ctid, i.host_ifindex)
                    .map_err(|e| HookError::new("unshape", &i.host_ifname, e))?,
            }
        }
        Ok(())
    }

    fn net_down(&mut self, ctid: Ctid, net: &NetState) {
        let dp = match self.dp() {
            Ok(dp) => dp,
            Err(e) => {
                warn!(%ctid, error = %berth_runtime::error_chain::ErrorChain(&e), "datapath detach");
                return;
            }
        };
        for i in &net.ifaces {
            // The interface may already be gone with the CT's netns; detach drops our pins.
            if let Err(e) = dp.detach(i.host_ifindex) {
                debug!(%ctid, ifname = %i.host_ifname, error = %ErrorChain(&e), "datapath detach");
            }
        }
        if self.shaper_exists() {
            match self.shaper() {
                Ok(sh) => {
                    for i in &net.ifaces {
                        if let Err(e) = sh.remove(ctid, i.host_ifindex) {
                            debug!(%ctid, ifname = %i.host_ifname, error = %ErrorChain(&e), "shaper remove");
                        }
                    }
                }
                Err(e) => warn!(
                    %ctid,
                    error = %berth_runtime::error_chain::ErrorChain(&e),
                    "shaper remove"
                ),
            }
        }
    }
}
