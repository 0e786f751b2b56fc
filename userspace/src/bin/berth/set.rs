//! set: change a CT's settings, live when it runs. The flags become typed [`SetOpts`]; the
//! library merges, validates and applies them as one transaction.

use std::net::IpAddr;

use anyhow::{Context, Result};
use berth::shaper::{
    ClassRate, ShapingChange, ShapingConfig, parse_optional_burst, parse_optional_rate,
};
use berth_runtime::billing::{BillingChange, BillingDay, parse_classes, parse_commit, parse_tz};
use berth_runtime::config::ResourceConfig;
use berth_runtime::container::passwd::UserPassword;
use berth_runtime::container::{self, CtError, SetOpts};
use berth_runtime::net::{AddrSelection, BridgedIface};
use serde_json::json;

use crate::Ctx;
use crate::cli::{BarrierLimit, BillingFlags, SetArgs};

pub fn set(ctx: &mut Ctx, a: SetArgs) -> Result<()> {
    let ctid = ctx.resolve(&a.ct)?;
    if let Some(privileged) = a.privileged {
        return convert(ctx, ctid, privileged, &a);
    }
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
    let quota = crate::quota::quota_flags(&a.quota)?;
    if !quota.is_empty() {
        // Refused before anything changes: a quota below what the CT already used.
        crate::quota::check_against_ledger(ctx, ctid, &quota)?;
    }
    let opts = SetOpts {
        shaping: shaping_flags(&a)?,
        billing: billing_flags(&a.billing)?,
        quota,
        ipadd: a.ipadd,
        ipdel,
        netif_add,
        netif_del,
        nameservers: a.nameserver,
        searchdomains: a.searchdomain,
        hostname: a.hostname,
        name: a.name,
        resources: ResourceConfig {
            memory: limit_of(ctx.quiet, "--memory", &a.memory),
            swap: limit_of(ctx.quiet, "--swap", &a.swap),
            cpuunits: a.cpuunits,
            cpulimit: a.cpulimit,
            cpus: a.cpus,
            numproc: limit_of(ctx.quiet, "--numproc", &a.numproc),
            ioweight: a.ioweight,
            diskspace: limit_of(ctx.quiet, "--diskspace", &a.diskspace),
        },
        onboot: a.onboot,
        passwords: a
            .userpasswd
            .iter()
            .map(|u| UserPassword::parse(u).map_err(|msg| CtError::Invalid { ctid, msg }))
            .collect::<Result<_, _>>()?,
    };
    container::set(&ctx.host, ctid, &opts, a.save, &mut ctx.hooks)?;
    ctx.print(json!({"ctid": ctid, "saved": a.save}), || {
        // vzctl's wording, which panel modules look for.
        if a.save {
            println!("Saved parameters for CT {ctid}")
        } else {
            println!("CT {ctid} updated")
        }
    });
    Ok(())
}

/// The limit of a BARRIER:LIMIT value, with a notice when a barrier below it is dropped
/// (berth's cgroup limits are one number).
fn limit_of<T: Copy + PartialEq + std::fmt::Display>(
    quiet: bool,
    flag: &str,
    v: &Option<BarrierLimit<T>>,
) -> Option<T> {
    let v = v.as_ref()?;
    if let Some(b) = v.barrier
        && b != v.limit
        && !quiet
    {
        eprintln!(
            "berth: {flag} {}: berth has one limit, so it applies the limit {} (the barrier {b} is not used)",
            v.raw, v.limit
        );
    }
    Some(v.limit)
}

/// The shaping flags as typed values (each `none` removes that setting).
fn shaping_flags(a: &SetArgs) -> Result<ShapingChange> {
    Ok(ShapingChange {
        rate_in: a
            .rate_in
            .as_deref()
            .map(|r| parse_optional_rate("--rate-in", r))
            .transpose()?,
        rate_out: a
            .rate_out
            .as_deref()
            .map(|r| parse_optional_rate("--rate-out", r))
            .transpose()?,
        burst: a
            .burst
            .as_deref()
            .map(|b| parse_optional_burst("--burst", b))
            .transpose()?,
        class_rates: a
            .class_rate
            .iter()
            .map(|c| ClassRate::parse(c))
            .collect::<Result<_, _>>()?,
        pps_in: a
            .pps_in
            .as_deref()
            .map(|p| ShapingConfig::parse_pps("--pps-in", p))
            .transpose()?,
        pps_out: a
            .pps_out
            .as_deref()
            .map(|p| ShapingConfig::parse_pps("--pps-out", p))
            .transpose()?,
    })
}

/// The billing flags as typed values, each checked on its own (the library checks the merge).
pub fn billing_flags(f: &BillingFlags) -> Result<BillingChange> {
    Ok(BillingChange {
        billing_day: f
            .billing_day
            .as_deref()
            .map(|d| BillingDay::parse("--billing-day", d))
            .transpose()?,
        tz: f.tz.as_deref().map(|t| parse_tz("--tz", t)).transpose()?,
        commit: f
            .commit
            .as_deref()
            .map(|c| parse_commit("--commit", c))
            .transpose()?,
        classes: f
            .classes
            .as_deref()
            .map(|c| parse_classes("--classes", c))
            .transpose()?,
    })
}

/// `set --privileged yes|no`: a conversion of a stopped CT, which takes no other change.
fn convert(ctx: &Ctx, ctid: berth_runtime::Ctid, privileged: bool, a: &SetArgs) -> Result<()> {
    let alone = SetArgs {
        ct: a.ct.clone(),
        privileged: a.privileged,
        save: a.save,
        ..SetArgs::default()
    };
    if *a != alone {
        anyhow::bail!(
            "--privileged converts a stopped CT and takes no other setting: run the other changes as a separate `berth set`"
        );
    }
    let changed = container::set_privileged(&ctx.host, ctid, privileged)?;
    if privileged && changed {
        eprintln!(
            "berth: warning: CT {ctid} is privileged now: its root is root on the host. Privileged CTs are for trusted workloads only."
        );
    }
    ctx.print(
        json!({"ctid": ctid, "privileged": privileged, "changed": changed}),
        || {
            println!(
                "CT {ctid} {} {}",
                if changed { "is now" } else { "already was" },
                if privileged {
                    "privileged"
                } else {
                    "unprivileged"
                }
            )
        },
    );
    Ok(())
}
