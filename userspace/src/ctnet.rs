//! The datapath's part in the CT lifecycle: attach the eBPF programs to every host-side
//! interface a CT gets, and load its addresses for anti-spoofing.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use berth_runtime::Ctid;
use berth_runtime::container::NetHooks;
use berth_runtime::net::{Mode, NetState};
use tracing::{debug, warn};

use crate::datapath::{DEFAULT_PIN_DIR, Datapath, IfaceConfig};
use crate::shaper::{Shaper, ShapingConfig};

/// Opens (or loads and pins) the datapath on first use only, so commands that touch no network
/// pay nothing. With `shaping` set, every interface the CT gets is shaped too.
pub struct DatapathHooks {
    pin_dir: PathBuf,
    dp: Option<Datapath>,
    shaper: Option<Shaper>,
    /// The CT's shaping settings, set by the caller before the lifecycle call.
    pub shaping: Option<ShapingConfig>,
}

/// The shaping table of a CT config, parsed (errors name the config key).
pub fn shaping_of(table: Option<&toml::Table>) -> Result<Option<ShapingConfig>, String> {
    match table {
        None => Ok(None),
        Some(t) => t
            .clone()
            .try_into::<ShapingConfig>()
            .map(|c| (!c.is_empty()).then_some(c))
            .map_err(|e| format!("[shaping] in the CT config: {e}")),
    }
}

impl DatapathHooks {
    pub fn new(pin_dir: Option<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            dp: None,
            shaper: None,
            shaping: None,
        }
    }

    /// The shaper, opened on first use (its pins live under the datapath's directory).
    pub fn shaper(&mut self) -> Result<&mut Shaper, String> {
        if self.shaper.is_none() {
            let s = Shaper::open(&self.pin_dir)
                .map_err(|e| format!("shaper at {}: {e}", self.pin_dir.display()))?;
            self.shaper = Some(s);
        }
        Ok(self.shaper.as_mut().expect("just set"))
    }

    /// Applies `cfg` (None: no shaping) to every host-side interface in `net`, live.
    pub fn apply_shaping(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        cfg: Option<&ShapingConfig>,
    ) -> Result<(), String> {
        if cfg.is_none() && self.shaper.is_none() && !self.pin_dir.join("shaper").exists() {
            return Ok(());
        }
        let sh = self.shaper()?;
        for i in &net.ifaces {
            match cfg {
                Some(c) => sh
                    .apply(ctid, i.host_ifindex, c)
                    .map_err(|e| format!("shape {}: {e}", i.host_ifname))?,
                None => sh
                    .remove(ctid, i.host_ifindex)
                    .map_err(|e| format!("unshape {}: {e}", i.host_ifname))?,
            }
        }
        Ok(())
    }

    fn dp(&mut self) -> Result<&mut Datapath, String> {
        if self.dp.is_none() {
            let dp = Datapath::open_or_load(&self.pin_dir)
                .map_err(|e| format!("eBPF datapath at {}: {e}", self.pin_dir.display()))?;
            self.dp = Some(dp);
        }
        Ok(self.dp.as_mut().expect("just set"))
    }
}

impl NetHooks for DatapathHooks {
    fn net_up(&mut self, ctid: Ctid, net: &NetState) -> Result<(), String> {
        let dp = self.dp()?;
        let mut addrs = BTreeSet::<IpAddr>::new();
        for i in &net.ifaces {
            let mac = i.ct_mac.map(|m| m.0).unwrap_or_default();
            let cfg = match i.mode {
                Mode::Routed => IfaceConfig::routed(ctid, mac),
                Mode::Bridged => IfaceConfig::bridged(ctid, mac),
            };
            dp.attach(i.host_ifindex, cfg)
                .map_err(|e| format!("attach eBPF programs to {}: {e}", i.host_ifname))?;
            addrs.extend(i.addrs.iter().map(|n| n.addr()));
        }
        let addrs: Vec<IpAddr> = addrs.into_iter().collect();
        let ifaces: Vec<u32> = net.ifaces.iter().map(|i| i.host_ifindex).collect();
        dp.set_ct_addrs_on(ctid, &addrs, &ifaces)
            .map_err(|e| format!("load CT {ctid}'s addresses into the datapath: {e}"))?;
        if let Some(cfg) = self.shaping.clone() {
            self.apply_shaping(ctid, net, Some(&cfg))?;
        }
        debug!(%ctid, ifaces = net.ifaces.len(), "datapath attached");
        Ok(())
    }

    fn net_down(&mut self, ctid: Ctid, net: &NetState) {
        let dp = match self.dp() {
            Ok(dp) => dp,
            Err(e) => {
                warn!(%ctid, error = %e, "datapath detach");
                return;
            }
        };
        for i in &net.ifaces {
            // The interface may already be gone with the CT's netns; detach drops our pins.
            if let Err(e) = dp.detach(i.host_ifindex) {
                debug!(%ctid, ifname = %i.host_ifname, error = %e, "datapath detach");
            }
        }
        if self.shaper.is_some() || self.pin_dir.join("shaper").exists() {
            match self.shaper() {
                Ok(sh) => {
                    for i in &net.ifaces {
                        if let Err(e) = sh.remove(ctid, i.host_ifindex) {
                            debug!(%ctid, ifname = %i.host_ifname, error = %e, "shaper remove");
                        }
                    }
                }
                Err(e) => warn!(%ctid, error = %e, "shaper remove"),
            }
        }
    }
}
