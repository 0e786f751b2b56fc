//! The order CTs start in at host boot and stop in at shutdown (OpenVZ's ONBOOT/BOOTORDER):
//! `onboot` CTs start by `bootorder`, higher first and unset last, the CTs of one level in
//! parallel; shutdown stops every running CT in the reverse order.

use std::collections::BTreeMap;

use crate::config::{ConfigError, CtConfig, Host};
use crate::ctid::Ctid;

/// Groups CTs into levels: `Some(n)` levels by descending `n`, then the unordered ones.
pub fn levels(cts: impl IntoIterator<Item = (Ctid, Option<u32>)>) -> Vec<Vec<Ctid>> {
    let mut ordered: BTreeMap<std::cmp::Reverse<u32>, Vec<Ctid>> = BTreeMap::new();
    let mut unset = Vec::new();
    for (c, o) in cts {
        match o {
            Some(n) => ordered.entry(std::cmp::Reverse(n)).or_default().push(c),
            None => unset.push(c),
        }
    }
    let mut out: Vec<Vec<Ctid>> = ordered.into_values().collect();
    if !unset.is_empty() {
        out.push(unset);
    }
    for l in &mut out {
        l.sort();
    }
    out
}

/// The levels `start --all-onboot` goes through. A config that does not load is an error
/// naming it: a boot that silently skips a CT is worse than one that says so.
pub fn start_levels(host: &Host) -> Result<Vec<Vec<Ctid>>, ConfigError> {
    let mut cts = Vec::new();
    for c in host.list_ctids()? {
        let cfg = CtConfig::load(host, c)?;
        if cfg.onboot {
            cts.push((c, cfg.bootorder));
        }
    }
    Ok(levels(cts))
}

/// The levels `stop --all` goes through: every CT in `running`, the boot order reversed.
pub fn stop_levels(host: &Host, running: &[Ctid]) -> Result<Vec<Vec<Ctid>>, ConfigError> {
    let mut cts = Vec::new();
    for &c in running {
        let order = CtConfig::load(host, c).ok().and_then(|cfg| cfg.bootorder);
        cts.push((c, order));
    }
    let mut l = levels(cts);
    l.reverse();
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_first_unset_last_and_reversed_for_stop() {
        let c = |n| Ctid::new(n).unwrap();
        let got = levels([
            (c(5), None),
            (c(1), Some(10)),
            (c(2), Some(100)),
            (c(3), Some(10)),
            (c(4), None),
        ]);
        assert_eq!(got, vec![vec![c(2)], vec![c(1), c(3)], vec![c(4), c(5)]]);
        assert!(levels([]).is_empty());
    }
}
