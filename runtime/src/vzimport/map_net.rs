//! The network settings of an OpenVZ CT: IP_ADDRESS, NETIF, NAMESERVER/SEARCHDOMAIN, RATE.

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;

use super::ImportError;
use super::map::{Ctx, Verdict, bad};
use super::parse::{Setting, parse_bool};
use crate::net::{BridgedIface, Iface, RoutedIface};
use crate::shaping::{ClassRate, Rate};

pub(super) fn map_ips(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let mut addrs: Vec<IpAddr> = Vec::new();
    let mut masked = false;
    let mut skipped = Vec::new();
    for tok in s.value.split_whitespace() {
        let (a, mask) = match tok.split_once('/') {
            Some((a, m)) => (a, Some(m)),
            None => (tok, None),
        };
        let ip: IpAddr = a
            .parse()
            .map_err(|_| bad(s, key, format!("{tok:?} is not an IP address")))?;
        if let Some(m) = mask {
            m.parse::<u8>()
                .map_err(|_| bad(s, key, format!("{tok:?}: bad mask")))?;
            masked = true;
        }
        if ip.is_unspecified() {
            skipped.push(tok.to_string());
            continue;
        }
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }
    let list = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let target = (!addrs.is_empty()).then(|| format!("net.ifaces routed addrs = [{list}]"));
    if !addrs.is_empty() {
        c.cfg.net.ifaces.push(Iface::Routed(RoutedIface { addrs }));
    }
    let mut rule = "routed (venet0) addresses, IPv4 and IPv6".to_string();
    if masked {
        rule.push_str("; masks dropped: each routed address is a host route");
    }
    if !skipped.is_empty() {
        rule.push_str(&format!(
            "; {} skipped (the unspecified address is vzctl's placeholder)",
            skipped.join(" ")
        ));
    }
    let verdict = if masked || !skipped.is_empty() {
        Verdict::Approx
    } else {
        Verdict::Map
    };
    c.push(key, s, verdict, target, rule);
    Ok(())
}

pub(super) fn map_netif(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let mut ignored = Vec::new();
    let mut names = Vec::new();
    for spec in s.value.split(';').map(str::trim).filter(|x| !x.is_empty()) {
        let mut iface: Option<BridgedIface> = None;
        let mut fields = Vec::new();
        for kv in spec.split(',') {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(s, key, format!("{kv:?}: expected name=value")))?;
            fields.push((k.trim(), v.trim()));
        }
        let ifname = fields
            .iter()
            .find(|(k, _)| *k == "ifname")
            .map(|(_, v)| *v)
            .ok_or_else(|| bad(s, key, format!("{spec:?} has no ifname=")))?;
        let mut b = BridgedIface::new(ifname);
        for (k, v) in &fields {
            let mac = || {
                v.parse()
                    .map_err(|e: crate::net::NetError| bad(s, key, e.to_string()))
            };
            match *k {
                "ifname" => {}
                "mac" => b.mac = Some(mac()?),
                "host_mac" => b.host_mac = Some(mac()?),
                "host_ifname" => b.host_ifname = Some(v.to_string()),
                "bridge" => b.bridge = Some(v.to_string()),
                other => ignored.push(format!("{ifname}.{other}")),
            }
        }
        if b.index().is_none() {
            return Err(bad(
                s,
                key,
                format!("interface {ifname:?}: berth names bridged interfaces eth<N>"),
            ));
        }
        names.push(ifname.to_string());
        iface.get_or_insert(b);
        c.cfg.net.ifaces.extend(iface.map(Iface::Bridged));
    }
    let mut rule = "bridged interfaces (veth) with their MACs, host names and bridges".to_string();
    let verdict = if ignored.is_empty() {
        Verdict::Map
    } else {
        rule.push_str(&format!("; not carried: {}", ignored.join(", ")));
        Verdict::Approx
    };
    c.push(
        key,
        s,
        verdict,
        Some(format!("net.ifaces bridged {}", names.join(", "))),
        rule,
    );
    Ok(())
}

pub(super) fn map_resolv(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let v = s.value.trim();
    let ns = key == "NAMESERVER";
    let (values, verdict, rule): (Vec<String>, Verdict, String) = if v == "inherit" {
        let path = c
            .opts
            .resolv_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        let want = if ns { "nameserver" } else { "search" };
        let got: Vec<String> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(want)).then(|| w.map(str::to_string).collect::<Vec<_>>())
            })
            .flatten()
            .collect();
        if got.is_empty() {
            c.warnings.push(format!(
                "{key}=inherit: {} has no {want} line; the CT keeps its own resolv.conf",
                path.display()
            ));
            c.drop_item(
                key,
                s,
                format!("inherit: nothing to inherit in {}", path.display()),
                false,
            );
            return Ok(());
        }
        (
            got,
            Verdict::Approx,
            format!(
                "inherit resolved from this host's {} at import time",
                path.display()
            ),
        )
    } else {
        (
            v.split_whitespace().map(str::to_string).collect(),
            Verdict::Map,
            "written to the CT's /etc/resolv.conf at start".into(),
        )
    };
    if ns {
        for x in &values {
            let a: IpAddr = x
                .parse()
                .map_err(|_| bad(s, key, format!("{x:?} is not an IP address")))?;
            c.cfg.net.nameservers.push(a);
        }
    } else {
        c.cfg.net.searchdomains.extend(values.iter().cloned());
    }
    let target = format!(
        "net.{} = {:?}",
        if ns { "nameservers" } else { "searchdomains" },
        values
    );
    c.push(key, s, verdict, Some(target), rule);
    Ok(())
}

pub(super) fn map_rate(c: &mut Ctx<'_>, key: &str, s: &Setting) -> Result<(), ImportError> {
    let on = c
        .get("TRAFFIC_SHAPING")
        .map(|t| parse_bool(&t.value).unwrap_or(false))
        .unwrap_or(false);
    if !on {
        c.drop_item(key, s, "TRAFFIC_SHAPING was not on in the node's vz.conf: the rates were not applied there either", false);
        return Ok(());
    }
    let mut sh = c.cfg.shaping.take().unwrap_or_default();
    let mut out = Vec::new();
    for tok in s.value.split_whitespace() {
        let parts: Vec<&str> = tok.split(':').collect();
        let [_dev, class, kbit] = parts.as_slice() else {
            return Err(bad(s, key, format!("{tok:?}: expected DEV:CLASS:KBIT")));
        };
        let class: u8 = class
            .parse()
            .map_err(|_| bad(s, key, format!("{tok:?}: bad class")))?;
        let kbit: u64 = kbit
            .parse()
            .map_err(|_| bad(s, key, format!("{tok:?}: bad rate")))?;
        let rate = Rate::from_bps(kbit * 1000)
            .ok_or_else(|| bad(s, key, format!("{tok:?}: rate out of range")))?;
        sh.set_class(ClassRate {
            class,
            rate_in: None,
            rate_out: Some(rate),
        });
        out.push(format!("class {class} out {rate}"));
    }
    c.cfg.shaping = Some(sh);
    c.push(key, s, Verdict::Approx, Some(format!("[[shaping.class]] {}", out.join(", "))), "KBIT (kbit/s) → the class's rate_out (OpenVZ shaped what the CT sends); the device is not kept: berth shapes at the CT's own interface");
    Ok(())
}
