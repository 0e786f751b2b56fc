//! OpenVZ `networks_classes` files: one `CLASS CIDR` per line, e.g.
//!
//! ```text
//! # class 0: the node's own networks, class 1: everything else
//! 0 192.0.2.0/24
//! 0 2001:db8::/32
//! 1 0.0.0.0/0
//! 1 ::/0
//! ```
//!
//! Classes are 0..=15; `#` starts a comment (whole line or trailing); a bare address means a
//! host prefix (/32, /128); host bits below the prefix length are cleared (vzctl accepted
//! `10.1.2.3/8` as `10.0.0.0/8`). The longest matching prefix wins; addresses matching no
//! line get the datapath's default class.

use std::{collections::HashMap, net::IpAddr, str::FromStr};

use berth_common::{MAX_CLASSES, capacity};
use ipnet::IpNet;
use thiserror::Error;

/// One prefix → class mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClassEntry {
    pub class: u8,
    pub net: IpNet,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClassesError {
    #[error("line {line}: {problem}: {text:?}")]
    Syntax {
        line: usize,
        text: String,
        problem: String,
    },
    #[error(
        "line {line}: {net} is class {class}, but line {first_line} made it class {first_class}"
    )]
    Conflict {
        line: usize,
        net: IpNet,
        class: u8,
        first_line: usize,
        first_class: u8,
    },
    #[error("{count} IPv{family} prefixes exceed the class table capacity ({capacity})")]
    TooMany {
        family: u8,
        count: usize,
        capacity: u32,
    },
}

/// Parses a `networks_classes` file. Errors name the line; nothing is partially returned.
pub fn parse_networks_classes(text: &str) -> Result<Vec<ClassEntry>, ClassesError> {
    let mut seen: HashMap<IpNet, (usize, u8)> = HashMap::new();
    let mut entries = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = idx + 1;
        let content = raw.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let syntax = |problem: String| ClassesError::Syntax {
            line,
            text: raw.to_owned(),
            problem,
        };
        let mut fields = content.split_whitespace();
        let (Some(class_s), Some(net_s), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(syntax("expected `CLASS CIDR`".to_owned()));
        };
        let class: u32 = class_s
            .parse()
            .map_err(|_| syntax(format!("class {class_s:?} is not a number")))?;
        if class >= MAX_CLASSES {
            return Err(syntax(format!(
                "class {class} out of range 0..={}",
                MAX_CLASSES - 1
            )));
        }
        let class = class as u8;
        let net = parse_net(net_s).map_err(syntax)?;
        match seen.get(&net) {
            Some(&(first_line, first_class)) if first_class != class => {
                return Err(ClassesError::Conflict {
                    line,
                    net,
                    class,
                    first_line,
                    first_class,
                });
            }
            Some(_) => continue,
            None => {
                seen.insert(net, (line, class));
                entries.push(ClassEntry { class, net });
            }
        }
    }
    check_capacity(&entries)?;
    Ok(entries)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        IpNet::from_str(s)
            .map(|n| n.trunc())
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 prefix (ADDR/LEN)"))
    } else {
        IpAddr::from_str(s)
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address or prefix"))
    }
}

pub(crate) fn check_capacity(entries: &[ClassEntry]) -> Result<(), ClassesError> {
    let v4 = entries.iter().filter(|e| e.net.addr().is_ipv4()).count();
    let v6 = entries.len() - v4;
    for (family, count) in [(4u8, v4), (6u8, v6)] {
        if count > capacity::CLASSES as usize {
            return Err(ClassesError::TooMany {
                family,
                count,
                capacity: capacity::CLASSES,
            });
        }
    }
    Ok(())
}

/// Formats entries in the file format (what `berth netclass list` prints).
pub fn format_networks_classes(entries: &[ClassEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        out.push_str(&format!("{} {}\n", e.class, e.net));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn parses_openvz_default_file() {
        let text = "# networks_classes\n\n0 10.0.0.0/8 # private\n1 0.0.0.0/0\n1 ::/0\n  2  2001:db8::/32  \n";
        let got = parse_networks_classes(text).unwrap();
        assert_eq!(
            got,
            vec![
                ClassEntry {
                    class: 0,
                    net: net("10.0.0.0/8")
                },
                ClassEntry {
                    class: 1,
                    net: net("0.0.0.0/0")
                },
                ClassEntry {
                    class: 1,
                    net: net("::/0")
                },
                ClassEntry {
                    class: 2,
                    net: net("2001:db8::/32")
                },
            ]
        );
    }

    #[test]
    fn bare_address_is_host_prefix_and_host_bits_are_cleared() {
        let got = parse_networks_classes("3 192.0.2.7\n4 10.1.2.3/8\n5 2001:db8::1\n").unwrap();
        assert_eq!(got[0].net, net("192.0.2.7/32"));
        assert_eq!(got[1].net, net("10.0.0.0/8"));
        assert_eq!(got[2].net, net("2001:db8::1/128"));
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse_networks_classes("1 0.0.0.0/0\n16 10.0.0.0/8\n").unwrap_err();
        assert!(matches!(err, ClassesError::Syntax { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");

        let err = parse_networks_classes("x 10.0.0.0/8").unwrap_err();
        assert!(err.to_string().contains("not a number"), "{err}");

        let err = parse_networks_classes("1 10.0.0.0/33").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");

        let err = parse_networks_classes("1 10.0.0.0/8 extra").unwrap_err();
        assert!(err.to_string().contains("CLASS CIDR"), "{err}");

        let err = parse_networks_classes("1\n").unwrap_err();
        assert!(matches!(err, ClassesError::Syntax { line: 1, .. }));
    }

    #[test]
    fn conflicting_duplicate_is_an_error_same_class_is_not() {
        let err = parse_networks_classes("1 10.0.0.0/8\n\n2 10.0.0.0/8\n").unwrap_err();
        assert_eq!(
            err,
            ClassesError::Conflict {
                line: 3,
                net: net("10.0.0.0/8"),
                class: 2,
                first_line: 1,
                first_class: 1,
            }
        );
        let ok = parse_networks_classes("1 10.0.0.0/8\n1 10.0.0.0/8\n").unwrap();
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn format_round_trips() {
        let text = "0 10.0.0.0/8\n1 ::/0\n";
        let entries = parse_networks_classes(text).unwrap();
        assert_eq!(format_networks_classes(&entries), text);
    }
}
