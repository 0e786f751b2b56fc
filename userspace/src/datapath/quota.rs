//! What a CT's transfer quota enforces in the datapath: the `QUOTA` overlay per CTID (cut,
//! throttle rates), and `FLAG_QUOTA_CUT` on the CT's interface entries, which makes the
//! programs drop everything but class 0 (reason `quota`). The overlay is pinned with the
//! counters, so a CT started while cut comes up cut, and the shaping hooks find the throttle.

use aya::maps::{HashMap, MapData};
use berth_common::{FLAG_QUOTA_CUT, QuotaOverlay, map_names};
use berth_runtime::Ctid;
use tracing::info;

use super::{Datapath, DatapathView, Result};
use crate::bpf::{PinLock, map_err, not_found};

impl DatapathView {
    /// The CT's overlay; `None` when nothing is enforced (or the pin directory predates it).
    pub fn quota_overlay(&self, ctid: Ctid) -> Result<Option<QuotaOverlay>> {
        let Some(map) = &self.quota else {
            return Ok(None);
        };
        match map.get(&ctid.get(), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map_names::QUOTA, &self.pin_dir, "get")(e).into()),
        }
    }
}

fn map_mut<'a>(
    m: &'a mut Option<HashMap<MapData, u32, QuotaOverlay>>,
    pin_dir: &std::path::Path,
) -> Result<&'a mut HashMap<MapData, u32, QuotaOverlay>> {
    m.as_mut().ok_or_else(|| {
        super::DatapathError::Bpf(crate::bpf::BpfError::Io {
            op: "opening the quota overlay (reload the datapath: its pins predate it)",
            path: pin_dir.join("maps").join(map_names::QUOTA),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
    })
}

impl Datapath {
    /// Sets (or with `None` removes) the CT's overlay, and sets or clears the cut flag on
    /// every interface entry of the CT now. Idempotent.
    pub fn set_quota_overlay(&mut self, ctid: Ctid, overlay: Option<QuotaOverlay>) -> Result<()> {
        let _lock = PinLock::take(&self.view.pin_dir)?;
        let pin_dir = self.view.pin_dir.clone();
        let map = map_mut(&mut self.view.quota, &pin_dir)?;
        match overlay {
            Some(o) => map.insert(ctid.get(), o, 0).map_err(map_err(
                map_names::QUOTA,
                &pin_dir,
                "insert",
            ))?,
            None => match map.remove(&ctid.get()) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(map_err(map_names::QUOTA, &pin_dir, "remove")(e).into()),
            },
        }
        let cut = overlay.is_some_and(|o| o.cut != 0);
        let mut changed = 0;
        for (ifindex, mut info) in self.iface_entries()? {
            if info.ctid != ctid.get() || (info.flags & FLAG_QUOTA_CUT != 0) == cut {
                continue;
            }
            info.flags ^= FLAG_QUOTA_CUT;
            self.write_iface(ifindex, info)?;
            changed += 1;
        }
        if changed > 0 {
            info!(%ctid, cut, interfaces = changed, "quota cut flag set");
        }
        Ok(())
    }

    /// The cut flag a new interface entry of `ctid` starts with.
    pub(super) fn quota_cut_flag(&self, ctid: Ctid) -> Result<u8> {
        Ok(match self.view.quota_overlay(ctid)? {
            Some(o) if o.cut != 0 => FLAG_QUOTA_CUT,
            _ => 0,
        })
    }
}
