//! Parsing and validation of topology files.

use super::*;

fn parse(t: &str) -> Result<Topology, TopologyError> {
    Topology::parse(t, Path::new("t.toml"))
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let e = parse("[[node]]\nname = \"a\"\nrat = 1\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("t.toml:3:"), "{e}");
    assert!(e.contains("rat"), "{e}");
}

#[test]
fn semantic_errors_point_at_the_value() {
    let e = parse("[[node]]\nname = \"a\"\nmode = \"bridged\"\nbridge = \"br9\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.toml:4:10:") && e.contains("node.bridge") && e.contains("br9"),
        "{e}"
    );
    let e = parse("[[node]]\nname = \"a\"\nlink = { rate = \"10furlongs\" }\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.toml:3:") && e.contains("node.link.rate"),
        "{e}"
    );
    let e = parse("[[node]]\nname = \"a\"\naddrs=[\"192.0.2.5\"]\n[[check]]\nkind = \"ping\"\nfrom = \"a\"\nto = \"zz\"\n").unwrap_err().to_string();
    assert!(e.starts_with("t.toml:7:") && e.contains("check.to"), "{e}");
    let e = parse("[[node]]\nname = \"a\"\n[node.link]\nloss_every = 1\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.toml:4:") && e.contains("node.link.loss_every"),
        "{e}"
    );
    let e = parse("[[node]]\nname = \"a\"\nkind = \"ct\"\nctid = 5\nlink = { delay = \"20ms\" }\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("t.toml:5:") && e.contains("node.link.delay"),
        "{e}"
    );
}

#[test]
fn a_valid_topology_resolves() {
    let t = parse(
        "[[bridge]]\nname=\"br0\"\naddrs=[\"198.51.100.1/24\"]\n[[node]]\nname=\"a\"\nkind=\"ct\"\nctid=7\naddrs=[\"192.0.2.7\"]\nlink={rate=\"10mbit\"}\n[[node]]\nname=\"b\"\nmode=\"bridged\"\nbridge=\"br0\"\naddrs=[\"198.51.100.9/24\"]\n[[check]]\nkind=\"rate\"\nfrom=\"a\"\nto=\"uplink\"\n",
    )
    .unwrap();
    assert_eq!(t.nodes[0].addrs[0].to_string(), "192.0.2.7/32");
    assert_eq!(t.nodes[0].rate, Some(("10mbit".into(), 10_000_000)));
    assert_eq!(t.checks[0].families, vec![Family::V4, Family::V6]);
    assert_eq!(rate_between(&t, "a", "uplink"), Some(10_000_000));
}

#[test]
fn impairments_parse() {
    let t = parse("[[node]]\nname = \"a\"\naddrs = [\"192.0.2.5\"]\nlink = { loss_every = 100, delay = \"20ms\", jitter = \"500us\" }\n[[check]]\nkind = \"loss\"\nnode = \"a\"\ncount = 10000\n").unwrap();
    let i = &t.nodes[0].impair;
    assert_eq!(i.loss_every, Some(100));
    assert_eq!(i.delay, Some(std::time::Duration::from_millis(20)));
    assert_eq!(i.jitter, std::time::Duration::from_micros(500));
    assert_eq!(t.checks[0].count, 10_000);
    let e = parse("[[node]]\nname = \"a\"\naddrs = [\"192.0.2.5\"]\n[[check]]\nkind = \"loss\"\nnode = \"a\"\n").unwrap_err().to_string();
    assert!(e.contains("loss_every"), "{e}");
}

#[test]
fn rates() {
    assert_eq!(parse_rate("1.5mbit"), Ok(1_500_000));
    assert_eq!(parse_rate("2mbps"), Ok(16_000_000));
    assert!(parse_rate("10").is_err());
}
