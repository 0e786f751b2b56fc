//! The datapath's and the shaper's part in the CT lifecycle ([`NetHooks`]): attach the eBPF
//! programs to every host-side interface a CT gets, load its addresses for anti-spoofing, and
//! shape those interfaces with the CT's shaping.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use berth_common::shaper::{DROP_HORIZON, DROP_PPS};
use berth_common::{DIR_IN, DIR_OUT};
use berth_runtime::Ctid;
use berth_runtime::billing::BillingConfig;
use berth_runtime::container::{HookError, NetGc, NetHooks};
use berth_runtime::error_chain::ErrorChain;
use berth_runtime::net::{Mode, NetState};
use berth_runtime::shaping::ShapingConfig;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::datapath::{ByteLayer, DEFAULT_PIN_DIR, Datapath, DatapathView, IfaceConfig, Retired};
use crate::shaper::view::ShaperView;
use crate::shaper::{Shaper, ShapingDrop};

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
    /// Shapes with exactly `shaping` (`None`: unshaped).
    fn shape_exactly(
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

/// `<root>/retired/<UUID>.json`: what a destroyed CT counted, for the billing ledger. Bytes are
/// at `byte_layer` (drops: whole frames); `retired_at` is seconds since the Unix epoch (UTC) of
/// the last write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredRecord {
    pub uuid: Uuid,
    pub ctid: u32,
    pub retired_at: u64,
    pub byte_layer: ByteLayer,
    #[serde(flatten)]
    pub totals: Retired,
    /// The shaper's packet-rate and horizon drops (not in `drops`, which are anti-spoofing's).
    #[serde(default)]
    pub shaping_drops: Vec<ShapingDrop>,
    /// The CT's billing settings when it went (records of an older berth have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<BillingConfig>,
}

impl RetiredRecord {
    /// The record at `path`; `None` when there is none.
    pub fn read(path: &Path) -> io::Result<Option<Self>> {
        match fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the record durably: a temporary file, fsynced, renamed over `path`, and the
    /// directory fsynced, so a crash leaves the old record or the new one.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    }
}

impl NetHooks for DatapathHooks {
    fn retire(
        &mut self,
        ctid: Ctid,
        uuid: Uuid,
        billing: &BillingConfig,
        record: &Path,
    ) -> Result<(), HookError> {
        let Some(view) = DatapathView::open_pinned(&self.pin_dir)
            .map_err(|e| HookError::new("open the eBPF datapath at", self.pin_dir.display(), e))?
        else {
            // Nothing ever counted here.
            return Ok(());
        };
        let ct = format!("CT {ctid}");
        let byte_layer = view
            .config()
            .map_err(|e| HookError::new("read the datapath settings for", &ct, e))?
            .byte_layer;
        // Read-only first: a CT that counted nothing and is attached nowhere (one that never
        // had a network) needs no write handle, whose opening loads the programs.
        let live = view
            .totals_of(ctid)
            .map_err(|e| HookError::new("read the counters of", &ct, e))?;
        let attached = view
            .attached()
            .map_err(|e| HookError::new("read the attached interfaces of", &ct, e))?;
        let shaper_dropped = match ShaperView::open_pinned(&self.pin_dir) {
            Ok(None) => false,
            Ok(Some(v)) => [DIR_IN, DIR_OUT].iter().any(|&dir| {
                [DROP_PPS, DROP_HORIZON]
                    .iter()
                    .any(|&reason| v.drop_counter(ctid.get(), dir, reason) != (0, 0))
            }),
            Err(e) => {
                debug!(%ctid, error = %ErrorChain(&e), "shaper view; reading through the shaper");
                true
            }
        };
        let idle = live == Retired::default()
            && !attached.iter().any(|a| a.config.ctid == ctid)
            && !shaper_dropped;
        drop(view);
        let (mut totals, mut shaping_drops) = if idle {
            (live, Vec::new())
        } else {
            let dp = self.dp()?;
            // Entries a CT that crashed left behind (its interfaces went with its netns).
            for a in attached.iter().filter(|a| a.config.ctid == ctid) {
                dp.detach(a.ifindex)
                    .map_err(|e| HookError::new("detach eBPF programs from", a.ifindex, e))?;
            }
            let totals = dp
                .totals_of(ctid)
                .map_err(|e| HookError::new("read the counters of", &ct, e))?;
            let shaping_drops = if self.shaper_exists() {
                self.shaper()?
                    .drops_of(ctid)
                    .map_err(|e| HookError::new("read the shaper's drops of", &ct, e))?
            } else {
                Vec::new()
            };
            (totals, shaping_drops)
        };
        let previous =
            RetiredRecord::read(record).map_err(|e| HookError::new("read", record.display(), e))?;
        if let Some(p) = previous.as_ref().filter(|p| p.uuid == uuid) {
            totals.merge_max(&p.totals);
            for old in &p.shaping_drops {
                match shaping_drops
                    .iter_mut()
                    .find(|d| (d.dir, &d.reason) == (old.dir, &old.reason))
                {
                    Some(d) => {
                        d.packets = d.packets.max(old.packets);
                        d.bytes = d.bytes.max(old.bytes);
                    }
                    None => shaping_drops.push(old.clone()),
                }
            }
        }
        let rec = RetiredRecord {
            uuid,
            ctid: ctid.get(),
            retired_at: u64::try_from(crate::clock::unix_now()).unwrap_or(0),
            byte_layer,
            totals,
            shaping_drops,
            billing: Some(billing.clone()),
        };
        rec.write(record)
            .map_err(|e| HookError::new("write", record.display(), e))?;
        if idle {
            debug!(%ctid, %uuid, "nothing counted: nothing to clear");
            return Ok(());
        }
        self.dp()?
            .clear_ct(ctid)
            .map_err(|e| HookError::new("clear the counters of", &ct, e))?;
        if self.shaper_exists() {
            self.shaper()?
                .clear_drops(ctid)
                .map_err(|e| HookError::new("clear the shaper's drops of", &ct, e))?;
        }
        info!(%ctid, %uuid, record = %record.display(), "counters retired");
        Ok(())
    }

    fn gc(&mut self, live: &[(u32, String)]) -> Result<NetGc, HookError> {
        let mut out = NetGc::default();
        // "Gone" means not in this network namespace: from another one than the running CTs'
        // host sides, every interface would look gone and live CTs would be detached.
        if let Some((ifindex, name)) = live
            .iter()
            .find(|(i, n)| crate::bpf::sys::if_indextoname(*i).as_deref() != Some(n.as_str()))
        {
            warn!(ifindex, ifname = %name, "gc: a running CT's host interface is not in this network namespace: the datapath and shaper are left as they are");
            return Ok(out);
        }
        let pinned = DatapathView::open_pinned(&self.pin_dir)
            .map_err(|e| HookError::new("open the eBPF datapath at", self.pin_dir.display(), e))?
            .is_some();
        // Nothing was ever attached where nothing is pinned (and gc must not load programs).
        if pinned {
            out.detached = self.dp()?.gc().map_err(|e| {
                HookError::new("clean the eBPF datapath at", self.pin_dir.display(), e)
            })?;
        }
        if self.pin_dir.join("shaper").exists() {
            out.unshaped = self
                .shaper()?
                .gc()
                .map_err(|e| HookError::new("clean the shaper at", self.pin_dir.display(), e))?;
        }
        Ok(out)
    }

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
        // A CT started while its quota throttles it comes up throttled.
        let overlay = dp
            .quota_overlay(ctid)
            .map_err(|e| HookError::new("read the quota overlay of", format!("CT {ctid}"), e))?;
        let shaping = shaping.filter(|s| !s.is_empty());
        if let Some(cfg) = crate::quota::enforce::throttled(shaping, overlay.as_ref()) {
            self.shape_exactly(ctid, net, Some(&cfg))?;
        }
        debug!(%ctid, ifaces = net.ifaces.len(), "datapath attached");
        Ok(())
    }

    /// Shapes with `shaping` under the CT's quota throttle, if one is in force (a `set
    /// --rate-*` while throttled changes the base the throttle applies to).
    fn shape(
        &mut self,
        ctid: Ctid,
        net: &NetState,
        shaping: Option<&ShapingConfig>,
    ) -> Result<(), HookError> {
        let overlay = self
            .dp()?
            .quota_overlay(ctid)
            .map_err(|e| HookError::new("read the quota overlay of", format!("CT {ctid}"), e))?;
        if overlay.is_some_and(|o| o.throttle_in_bps != 0 || o.throttle_out_bps != 0) {
            let eff = crate::quota::enforce::throttled(shaping, overlay.as_ref());
            return self.shape_exactly(ctid, net, eff.as_ref());
        }
        self.shape_exactly(ctid, net, shaping)
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
