//! Pure translations between what user space knows (addresses, the class table, counter
//! rows) and the map values laid out for the programs' fast path (`berth_common`). No kernel
//! access here, so all of it is unit-tested.

use std::net::IpAddr;

use berth_common::{
    CLASSES_INLINE, CLASSES_LPM, CLASSES_UNIFORM, Config, CounterKey, FAMILY_INDEX, INLINE_ADDRS,
    INLINE_CLASSES, IfaceInfo, LAYER_L3, MAX_CLASSES, SLOT_ROWS, V4Prefix, V6Prefix,
};
use ipnet::IpNet;

use super::{ByteLayer, ClassEntry, DatapathConfig};

/// Rewrites the inline address copies of `info` to hold `addrs` (the CT's complete set).
/// An address already inline keeps its position, so a program reading the entry while it
/// is being rewritten still finds every address that stays; new ones take free positions.
/// Sets or clears `FLAG_V4_SPILL`/`FLAG_V6_SPILL` when a family has more addresses than fit.
pub fn set_inline_addrs(info: &mut IfaceInfo, addrs: &[IpAddr]) {
    let v4: Vec<[u8; 4]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(a.octets()),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<[u8; 16]> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(a.octets()),
            IpAddr::V4(_) => None,
        })
        .collect();
    let spill4 = place(&mut info.v4, &v4, [0; 4]);
    let spill6 = place(&mut info.v6, &v6, [0; 16]);
    info.flags &= !(berth_common::FLAG_V4_SPILL | berth_common::FLAG_V6_SPILL);
    if spill4 {
        info.flags |= berth_common::FLAG_V4_SPILL;
    }
    if spill6 {
        info.flags |= berth_common::FLAG_V6_SPILL;
    }
}

/// Places `wanted` into `slots` keeping positions of those already there; returns whether
/// some did not fit.
fn place<T: Copy + PartialEq, const N: usize>(slots: &mut [T; N], wanted: &[T], empty: T) -> bool {
    for s in slots.iter_mut() {
        if *s != empty && !wanted.contains(s) {
            *s = empty;
        }
    }
    let mut spilled = false;
    for w in wanted {
        if slots.contains(w) {
            continue;
        }
        match slots.iter_mut().find(|s| **s == empty) {
            Some(free) => *free = *w,
            None => spilled = true,
        }
    }
    spilled
}

const _: () = assert!(INLINE_ADDRS == 8);

/// How the programs classify one family, derived from its part of the class table.
#[derive(Debug, PartialEq, Eq)]
enum Plan<'a> {
    /// Every address has this class (empty table → the default class; only a /0 → its class).
    Uniform(u8),
    /// Few prefixes: scanned inline, longest first.
    Inline(Vec<&'a ClassEntry>),
    /// Many prefixes: the LPM trie.
    Lpm,
}

fn plan<'a>(entries: &[&'a ClassEntry], default_class: u8) -> Plan<'a> {
    match entries {
        [] => Plan::Uniform(default_class),
        [only] if only.net.prefix_len() == 0 => Plan::Uniform(only.class),
        _ if entries.len() <= INLINE_CLASSES => {
            let mut sorted = entries.to_vec();
            // Longest prefix first: the first match is the longest match.
            sorted.sort_by_key(|e| std::cmp::Reverse(e.net.prefix_len()));
            Plan::Inline(sorted)
        }
        _ => Plan::Lpm,
    }
}

/// The `CONFIG` value for these settings and this class table.
pub fn config_value(settings: DatapathConfig, entries: &[ClassEntry]) -> Config {
    let mut cfg = Config {
        byte_layer: match settings.byte_layer {
            ByteLayer::L2 => berth_common::LAYER_L2,
            ByteLayer::L3 => LAYER_L3,
        },
        default_class: settings.default_class,
        ..Config::default()
    };
    let (v4, v6): (Vec<&ClassEntry>, Vec<&ClassEntry>) =
        entries.iter().partition(|e| e.net.addr().is_ipv4());
    match plan(&v4, settings.default_class) {
        Plan::Uniform(c) => {
            cfg.v4_mode = CLASSES_UNIFORM;
            cfg.v4_class = c;
        }
        Plan::Inline(list) => {
            cfg.v4_mode = CLASSES_INLINE;
            cfg.v4_len = list.len() as u8;
            for (slot, e) in cfg.v4.iter_mut().zip(list) {
                if let IpNet::V4(n) = e.net.trunc() {
                    *slot = V4Prefix {
                        net: u32::from_ne_bytes(n.network().octets()),
                        mask: u32::from_ne_bytes(n.netmask().octets()),
                        class: u32::from(e.class),
                    };
                }
            }
        }
        Plan::Lpm => cfg.v4_mode = CLASSES_LPM,
    }
    match plan(&v6, settings.default_class) {
        Plan::Uniform(c) => {
            cfg.v6_mode = CLASSES_UNIFORM;
            cfg.v6_class = c;
        }
        Plan::Inline(list) => {
            cfg.v6_mode = CLASSES_INLINE;
            cfg.v6_len = list.len() as u8;
            for (slot, e) in cfg.v6.iter_mut().zip(list) {
                if let IpNet::V6(n) = e.net.trunc() {
                    *slot = V6Prefix {
                        net: halves(n.network().octets()),
                        mask: halves(n.netmask().octets()),
                        class: u32::from(e.class),
                        _pad: 0,
                    };
                }
            }
        }
        Plan::Lpm => cfg.v6_mode = CLASSES_LPM,
    }
    cfg
}

/// The 16 bytes as the program loads them: two native-endian 64-bit words.
fn halves(b: [u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_ne_bytes(lo), u64::from_ne_bytes(hi)]
}

/// The settings part of a `CONFIG` value.
pub fn settings_of(cfg: &Config) -> DatapathConfig {
    DatapathConfig {
        byte_layer: if cfg.byte_layer == LAYER_L3 {
            ByteLayer::L3
        } else {
            ByteLayer::L2
        },
        default_class: cfg.default_class,
    }
}

/// The (CTID, direction, class, family) a `SlotCounters` row counts.
pub fn row_key(ctid: u32, row: usize) -> CounterKey {
    let classes = MAX_CLASSES as usize;
    let class = (row % classes) as u8;
    let family = FAMILY_INDEX[(row / classes) % 3];
    let dir = (row / (classes * 3)) as u8;
    CounterKey {
        ctid,
        dir,
        class,
        family,
        _pad: 0,
    }
}

const _: () = assert!(SLOT_ROWS == 96);

/// Inverse of [`row_key`], for tests and for folding archive rows.
#[cfg(test)]
fn row_of(key: &CounterKey) -> usize {
    let fam = FAMILY_INDEX
        .iter()
        .position(|f| *f == key.family)
        .unwrap_or(0) as u8;
    berth_common::slot_row(key.dir, fam, key.class)
}

#[cfg(test)]
mod tests {
    use berth_common::{FLAG_V4_SPILL, FLAG_V6_SPILL};

    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn inline_addrs_keep_positions_and_spill() {
        let mut info = IfaceInfo::EMPTY;
        set_inline_addrs(&mut info, &ips(&["10.0.0.1", "10.0.0.2", "2001:db8::1"]));
        assert_eq!(info.v4[0], [10, 0, 0, 1]);
        assert_eq!(info.v4[1], [10, 0, 0, 2]);
        assert_eq!(info.flags & (FLAG_V4_SPILL | FLAG_V6_SPILL), 0);
        // Removing .1 and adding .3: .2 stays where a concurrent reader looks for it.
        set_inline_addrs(&mut info, &ips(&["10.0.0.2", "10.0.0.3"]));
        assert_eq!(info.v4[1], [10, 0, 0, 2]);
        assert_eq!(info.v4[0], [10, 0, 0, 3]);
        assert!(info.v6.iter().all(|a| *a == [0; 16]));
        // Nine v4 addresses: eight inline, the flag sends misses to CT_ADDRS.
        let many: Vec<String> = (1..=9).map(|i| format!("10.1.0.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        set_inline_addrs(&mut info, &ips(&many));
        assert_eq!(info.flags & FLAG_V4_SPILL, FLAG_V4_SPILL);
        assert!(info.v4.iter().all(|a| *a != [0; 4]));
        set_inline_addrs(&mut info, &ips(&["10.1.0.9"]));
        assert_eq!(info.flags & FLAG_V4_SPILL, 0);
    }

    fn entries(text: &str) -> Vec<ClassEntry> {
        super::super::parse_networks_classes(text).unwrap()
    }

    fn settings(default_class: u8) -> DatapathConfig {
        DatapathConfig {
            byte_layer: ByteLayer::L3,
            default_class,
        }
    }

    #[test]
    fn class_plans() {
        let c = config_value(settings(3), &[]);
        assert_eq!((c.v4_mode, c.v4_class, c.v6_mode, c.v6_class), (0, 3, 0, 3));
        assert_eq!(settings_of(&c), settings(3));

        let c = config_value(settings(3), &entries("1 0.0.0.0/0\n2 ::/0\n"));
        assert_eq!((c.v4_mode, c.v4_class), (CLASSES_UNIFORM, 1));
        assert_eq!((c.v6_mode, c.v6_class), (CLASSES_UNIFORM, 2));

        let c = config_value(
            settings(0),
            &entries("1 0.0.0.0/0\n2 10.0.0.0/8\n3 10.1.0.0/16\n4 2001:db8::/32\n"),
        );
        assert_eq!((c.v4_mode, c.v4_len), (CLASSES_INLINE, 3));
        // Longest first, network order as loaded from the packet.
        assert_eq!(c.v4[0].net, u32::from_ne_bytes([10, 1, 0, 0]));
        assert_eq!(c.v4[0].mask, u32::from_ne_bytes([255, 255, 0, 0]));
        assert_eq!(c.v4[0].class, 3);
        assert_eq!(c.v4[2].mask, 0);
        assert_eq!((c.v6_mode, c.v6_len), (CLASSES_INLINE, 1));
        assert_eq!(c.v6[0].mask[1], 0);
        assert_eq!(
            c.v6[0].mask[0],
            u64::from_ne_bytes([255, 255, 255, 255, 0, 0, 0, 0])
        );

        let text: String = (0..9).map(|i| format!("1 10.{i}.0.0/16\n")).collect();
        let c = config_value(settings(0), &entries(&text));
        assert_eq!(c.v4_mode, CLASSES_LPM);
    }

    #[test]
    fn row_keys_round_trip() {
        for row in 0..SLOT_ROWS {
            let k = row_key(7, row);
            assert_eq!(row_of(&k), row);
            assert!(k.dir <= 1 && u32::from(k.class) < MAX_CLASSES);
        }
        let k = row_key(7, berth_common::slot_row(1, 2, 5));
        assert_eq!((k.dir, k.family, k.class), (1, berth_common::FAMILY_V6, 5));
    }
}
