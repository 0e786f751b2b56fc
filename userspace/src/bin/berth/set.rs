//! set: change a CT's settings, live when it runs.
//!
//! Shaping glue that belongs in the runtime's `set` (it moves there next): [`shaping_change`]
//! merges the shaping flags into the CT's live or saved shaping, and after the library's
//! `set` the new shaping is applied to a running CT and kept in its run state by
//! [`record_live_shaping`].

use std::net::IpAddr;

use anyhow::{Context, Result};
use berth::ctnet::shaping_of;
use berth::shaper::{ClassRate, DEFAULT_MTU, ShapingConfig, parse_optional_rate};
use berth_runtime::Ctid;
use berth_runtime::config::{CtConfig, Host, ResourceConfig};
use berth_runtime::container::state::RunState;
use berth_runtime::container::{self, SetOpts, State};
use berth_runtime::net::{AddrSelection, BridgedIface};
use serde_json::json;

use crate::Ctx;
use crate::cli::SetArgs;

pub fn set(ctx: &mut Ctx, a: SetArgs) -> Result<()> {
    let ctid = ctx.resolve(&a.ct)?;
    let ipdel = if a.ipdel.is_empty() {
        None
    } else if a.ipdel.iter().any(|x| x == "all") {
        Some(AddrSelection::All)
    } else {
        Some(AddrSelection::Some(
            a.ipdel
                .iter()
                .map(|x| {
                    x.parse::<IpAddr>()
                        .with_context(|| format!("--ipdel {x:?}: not an IP address or `all`"))
                })
                .collect::<Result<_>>()?,
        ))
    };
    let netif_add = a
        .netif_add
        .iter()
        .map(|s| BridgedIface::parse_vzctl(s))
        .collect::<Result<Vec<_>, _>>()?;
    let netif_del = a
        .netif_del
        .as_ref()
        .map(|n| if n == "all" { None } else { Some(n.clone()) });
    let shaping = shaping_change(&ctx.host, ctid, &a)?;
    let opts = SetOpts {
        shaping: shaping
            .as_ref()
            .map(|c| toml::Table::try_from(c.clone().unwrap_or_default()))
            .transpose()?,
        ipadd: a.ipadd,
        ipdel,
        netif_add,
        netif_del,
        nameservers: a.nameserver,
        searchdomains: a.searchdomain,
        hostname: a.hostname,
        name: a.name,
        resources: ResourceConfig {
            memory: a.memory,
            swap: a.swap,
            cpuunits: a.cpuunits,
            cpulimit: a.cpulimit,
            cpus: a.cpus,
            numproc: a.numproc,
            ioweight: a.ioweight,
            diskspace: a.diskspace,
        },
    };
    container::set(&ctx.host, ctid, &opts, a.save, &mut ctx.hooks)?;
    if let Some(new) = &shaping {
        let st = container::status(&ctx.host, ctid)?;
        if matches!(st.state, State::Running | State::Suspended) {
            ctx.hooks
                .apply_shaping(ctid, &st.net, new.as_ref())
                .map_err(anyhow::Error::msg)?;
            record_live_shaping(&ctx.host, ctid, opts.shaping.clone())?;
        }
    }
    ctx.print(json!({"ctid": ctid, "saved": a.save}), || {
        println!(
            "CT {ctid} updated{}",
            if a.save { " and saved" } else { "" }
        )
    });
    Ok(())
}

/// Keeps what `set` applied live in the CT's run state (see [`RunState::shaping`]).
fn record_live_shaping(host: &Host, ctid: Ctid, table: Option<toml::Table>) -> Result<()> {
    let path = host.state_path(ctid);
    if let Some(mut st) = RunState::read(&path)
        .with_context(|| format!("read {}", path.display()))?
        .filter(RunState::alive)
    {
        st.shaping = table;
        st.write(&path)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// The CT's shaping after `set`'s shaping flags (None: no shaping flag given), validated
/// before anything changes. `Some(None)` removes all shaping.
fn shaping_change(host: &Host, ctid: Ctid, a: &SetArgs) -> Result<Option<Option<ShapingConfig>>> {
    if a.rate_in.is_none()
        && a.rate_out.is_none()
        && a.burst.is_none()
        && a.class_rate.is_empty()
        && a.pps_in.is_none()
        && a.pps_out.is_none()
    {
        return Ok(None);
    }
    let cfg = CtConfig::load(host, ctid)?;
    // A running CT's unsaved shaping is the base, like its unsaved addresses.
    let live = RunState::read(&host.state_path(ctid))
        .ok()
        .flatten()
        .filter(RunState::alive)
        .and_then(|st| st.shaping);
    let mut sc = shaping_of(live.as_ref().or(cfg.shaping.as_ref()))
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    if let Some(r) = &a.rate_in {
        sc.rate_in = parse_optional_rate("--rate-in", r)?;
    }
    if let Some(r) = &a.rate_out {
        sc.rate_out = parse_optional_rate("--rate-out", r)?;
    }
    if let Some(b) = &a.burst {
        sc.burst = if b.trim().eq_ignore_ascii_case("none") {
            None
        } else {
            Some(berth::shaper::Size::parse("--burst", b)?)
        };
    }
    for c in &a.class_rate {
        sc.set_class(ClassRate::parse(c)?);
    }
    if let Some(p) = &a.pps_in {
        sc.pps_in = ShapingConfig::parse_pps("--pps-in", p)?;
    }
    if let Some(p) = &a.pps_out {
        sc.pps_out = ShapingConfig::parse_pps("--pps-out", p)?;
    }
    sc.validate(DEFAULT_MTU)?;
    Ok(Some((!sc.is_empty()).then_some(sc)))
}
