//! `<run>/<CTID>.adding.json`: a live `set --ipadd` in flight. Written before the addresses go
//! in and removed once the run state has them (or the set was rolled back): a `kill -9` in
//! between leaves addresses, host routes and proxy entries the run state does not know, which
//! stop would never remove. gc and the next `set`/`stop` take them back ([`recover`]).

use std::fs;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::state::RunState;
use super::{NetHooks, Result, io_err, open_ns};
use crate::config::{CtConfig, Host};
use crate::ctid::Ctid;
use crate::error_chain::ErrorChain;
use crate::net::{self, HostNet, IfaceState, Mode};

#[derive(Debug, Serialize, Deserialize)]
struct Adding {
    addrs: Vec<IpAddr>,
    /// The routed interface once the addresses were in (with their proxy entries).
    #[serde(default)]
    iface: Option<IfaceState>,
}

fn path(host: &Host, ctid: Ctid) -> PathBuf {
    host.run.join(format!("{ctid}.adding.json"))
}

fn write(host: &Host, ctid: Ctid, rec: &Adding) -> Result<()> {
    let p = path(host, ctid);
    let tmp = p.with_extension("json.tmp");
    let text =
        serde_json::to_vec(rec).map_err(|e| io_err(ctid, "encode", &p)(io::Error::other(e)))?;
    fs::write(&tmp, text).map_err(io_err(ctid, "write", &tmp))?;
    fs::rename(&tmp, &p).map_err(io_err(ctid, "rename into place", &p))
}

/// Records that `addrs` are about to be added live.
pub(super) fn begin(host: &Host, ctid: Ctid, addrs: &[IpAddr]) -> Result<()> {
    write(
        host,
        ctid,
        &Adding {
            addrs: addrs.to_vec(),
            iface: None,
        },
    )
}

/// Records the routed interface as the add left it (its proxy entries included).
pub(super) fn added(host: &Host, ctid: Ctid, addrs: &[IpAddr], iface: &IfaceState) -> Result<()> {
    write(
        host,
        ctid,
        &Adding {
            addrs: addrs.to_vec(),
            iface: Some(iface.clone()),
        },
    )
}

/// The add is settled (in the run state, or rolled back).
pub(super) fn end(host: &Host, ctid: Ctid) {
    let p = path(host, ctid);
    if let Err(e) = fs::remove_file(&p)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(%ctid, path = %p.display(), error = %e, "remove the record of an address add");
    }
}

/// Takes back the addresses of an add that was killed before the run state had them, and
/// reloads the datapath with the run state's addresses. Call under the CT's lock. Returns
/// whether there was such an add.
pub(super) fn recover(host: &Host, ctid: Ctid, hooks: &mut dyn NetHooks) -> Result<bool> {
    let p = path(host, ctid);
    let rec: Adding = match fs::read(&p) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(r) => r,
            Err(e) => {
                // A record cut short names nothing reliably; the write is atomic, so this is
                // not one of ours.
                warn!(%ctid, path = %p.display(), error = %e, "unreadable address-add record: removed");
                end(host, ctid);
                return Ok(false);
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err(ctid, "read", &p)(e)),
    };
    let st = RunState::read(&host.state_path(ctid)).ok().flatten();
    let live = st.as_ref().filter(|s| s.alive());
    let routed = live
        .and_then(|s| s.net.as_ref())
        .and_then(|n| n.ifaces.iter().find(|i| i.mode == Mode::Routed));
    let known: Vec<IpAddr> = routed
        .map(|i| i.addrs.iter().map(|n| n.addr()).collect())
        .unwrap_or_default();
    let stale: Vec<IpAddr> = rec
        .addrs
        .iter()
        .copied()
        .filter(|a| !known.contains(a))
        .collect();
    if let (false, Some(iface)) = (stale.is_empty(), rec.iface.as_ref().or(routed)) {
        let ns = live.and_then(|s| open_ns(ctid, s.init_pid).ok());
        let mut hn = HostNet::current().map_err(super::net_err(ctid))?;
        for e in net::undo_addrs(ctid, ns.as_ref().map(|f| f.as_fd()), iface, &stale, &mut hn) {
            warn!(%ctid, error = %ErrorChain(&e), "take back an address add in flight");
        }
        if let (Some(s), Some(n)) = (live, live.and_then(|s| s.net.as_ref())) {
            let cfg = CtConfig::load(host, ctid)?;
            let shaping = super::set::current_shaping(&cfg, Some(s));
            hooks
                .net_up(ctid, n, shaping.as_ref())
                .map_err(super::hook_err(ctid))?;
        }
        info!(%ctid, addrs = ?stale, "took back an address add a killed set left in flight");
    }
    end(host, ctid);
    Ok(true)
}
