//! Parsing and validation of rates, bursts, class rates and packet rates; the `[shaping]`
//! format; the merging of `set`'s shaping flags.

use super::*;

#[test]
fn rates_parse_like_tc() {
    let r = |s| Rate::parse("--rate-in", s).map(Rate::bits_per_sec);
    assert_eq!(r("10mbit"), Ok(10_000_000));
    assert_eq!(r("10Mbit"), Ok(10_000_000));
    assert_eq!(r("1.5gbit"), Ok(1_500_000_000));
    assert_eq!(r("100kbit"), Ok(100_000));
    assert_eq!(r("1000"), Ok(1000));
    assert_eq!(r("1000bit"), Ok(1000));
    assert_eq!(r("125bps"), Ok(1000));
    assert_eq!(r("1mbps"), Ok(8_000_000));
    assert_eq!(r("1kibit"), Ok(1024));
    assert_eq!(r("1mibps"), Ok(8 * 1024 * 1024));
}

#[test]
fn bad_rates_name_the_flag() {
    for bad in [
        "0",
        "0mbit",
        "-5mbit",
        "fast",
        "10 parsecs",
        "",
        "10xbit",
        "0.0001bit",
    ] {
        let e = Rate::parse("--rate-out", bad).unwrap_err();
        assert_eq!(e.flag, "--rate-out", "{bad}");
        assert!(e.to_string().starts_with("--rate-out"), "{e}");
    }
    assert!(
        Rate::parse("--rate-in", "-1mbit")
            .unwrap_err()
            .reason
            .contains("negative")
    );
    assert!(
        Rate::parse("--rate-in", "0")
            .unwrap_err()
            .reason
            .contains("greater than zero")
    );
    assert!(Rate::parse("--rate-in", "20tbit").is_err());
}

#[test]
fn rates_display_round_trip() {
    for s in ["10mbit", "1gbit", "1500kbit", "7bit", "10tbit"] {
        assert_eq!(Rate::parse("x", s).unwrap().to_string(), s);
    }
}

#[test]
fn bursts_parse_like_tc() {
    let z = |s| parse_optional_burst("--burst", s);
    assert_eq!(z("1514"), Ok(Some(Size::Bytes(1514))));
    assert_eq!(z("64kb"), Ok(Some(Size::Bytes(65536))));
    assert_eq!(z("64k"), Ok(Some(Size::Bytes(65536))));
    assert_eq!(z("1mb"), Ok(Some(Size::Bytes(1 << 20))));
    assert_eq!(z("8kbit"), Ok(Some(Size::Bytes(1024))));
    assert_eq!(z("none"), Ok(None));
    for bad in ["-1kb", "0", "lots"] {
        let e = z(bad).unwrap_err();
        assert_eq!((e.flag, e.value.as_str()), ("--burst", bad));
    }
    assert_eq!(
        z("lots").unwrap_err().to_string(),
        "--burst \"lots\": not a size (expected a number with a unit like b, kb, mb)"
    );
}

#[test]
fn class_rates_parse() {
    let c = ClassRate::parse("1:100mbit:none").unwrap();
    assert_eq!(c.class, 1);
    assert_eq!(c.rate_in, Some(Rate(100_000_000)));
    assert_eq!(c.rate_out, None);
    assert_eq!(c.to_string(), "1:100mbit:none");
    assert!(ClassRate::parse("16:1mbit:1mbit").is_err());
    assert!(ClassRate::parse("1:1mbit").is_err());
    assert_eq!(
        ClassRate::parse("1:0:1mbit").unwrap_err().flag,
        "--class-rate"
    );
}

#[test]
fn validation_rejects_small_burst_and_zero_pps() {
    let mut c = ShapingConfig {
        rate_in: Some(Rate(10_000_000)),
        burst: Some(Size::Bytes(1000)),
        ..Default::default()
    };
    let e = c.validate(1500).unwrap_err();
    assert_eq!(e.flag, "--burst");
    assert!(e.reason.contains("1514"), "{e}");
    c.burst = Some(Size::Bytes(1514));
    c.validate(1500).unwrap();
    c.pps_in = Some(0);
    assert_eq!(c.validate(1500).unwrap_err().flag, "--pps-in");
    assert_eq!(
        ShapingConfig::parse_pps("--pps-out", "-3")
            .unwrap_err()
            .flag,
        "--pps-out"
    );
    assert_eq!(ShapingConfig::parse_pps("--pps-out", "none"), Ok(None));
}

#[test]
fn toml_round_trip() {
    let text = r#"
        rate_in = "100mbit"
        rate_out = 5000000
        burst = "64kb"
        pps_in = 1000
        [[class]]
        class = 1
        rate_in = "1gbit"
    "#;
    let c: ShapingConfig = toml::from_str(text).unwrap();
    assert_eq!(c.rate_out, Some(Rate(5_000_000)));
    assert_eq!(c.burst, Some(Size::Bytes(65536)));
    assert_eq!(c.classes[0].rate_in, Some(Rate(1_000_000_000)));
    let back: ShapingConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(toml::from_str::<ShapingConfig>("rate_in = \"0\"").is_err());
    assert!(toml::from_str::<ShapingConfig>("rate_in = 0").is_err());
    assert!(toml::from_str::<ShapingConfig>("rate_inn = \"1mbit\"").is_err());
}

/// What the code before the typed config saved (a TOML table, so its keys sorted): it loads,
/// and saving it again gives the same text.
#[test]
fn configs_saved_by_the_table_code_load_and_look_the_same() {
    let old = r#"burst = "64kb"
pps_in = 1000
pps_out = 2000
rate_in = "10mbit"
rate_out = "1500kbit"

[[class]]
class = 1
rate_in = "1gbit"

[[class]]
class = 3
rate_out = "20mbit"
"#;
    let c: ShapingConfig = toml::from_str(old).unwrap();
    assert_eq!(c.burst, Some(Size::Bytes(64 << 10)));
    assert_eq!(c.rate_out, Some(Rate(1_500_000)));
    assert_eq!(c.classes.len(), 2);
    assert_eq!(c.classes[1].rate_out, Some(Rate(20_000_000)));
    assert_eq!(toml::to_string(&c).unwrap(), old);
}

#[test]
fn the_key_of_a_flag() {
    let e = |flag| ShapingError::new(flag, "x", "y").key();
    assert_eq!(e("--rate-in"), "rate_in");
    assert_eq!(e("--pps-out"), "pps_out");
    assert_eq!(e("--burst"), "burst");
    assert_eq!(e("--class-rate"), "class");
}

fn rate(s: &str) -> Rate {
    Rate::parse("x", s).unwrap()
}

#[test]
fn no_flag_is_no_change() {
    assert!(ShapingChange::default().is_empty());
    let base = ShapingConfig {
        rate_in: Some(rate("10mbit")),
        ..Default::default()
    };
    assert_eq!(
        ShapingChange::default().merge(Some(&base)),
        Ok(Some(base.clone()))
    );
    assert_eq!(ShapingChange::default().merge(None), Ok(None));
}

#[test]
fn flags_replace_only_what_they_name() {
    let base = ShapingConfig {
        rate_in: Some(rate("10mbit")),
        rate_out: Some(rate("20mbit")),
        burst: Some(Size::Bytes(64 << 10)),
        classes: vec![
            ClassRate::parse("1:1gbit:none").unwrap(),
            ClassRate::parse("2:5mbit:5mbit").unwrap(),
        ],
        pps_in: Some(1000),
        pps_out: None,
    };
    let change = ShapingChange {
        rate_out: Some(Some(rate("30mbit"))),
        class_rates: vec![ClassRate::parse("2:none:none").unwrap()],
        pps_out: Some(Some(500)),
        ..Default::default()
    };
    assert!(!change.is_empty());
    let merged = change.merge(Some(&base)).unwrap().unwrap();
    assert_eq!(
        merged,
        ShapingConfig {
            rate_out: Some(rate("30mbit")),
            classes: vec![ClassRate::parse("1:1gbit:none").unwrap()],
            pps_out: Some(500),
            ..base.clone()
        }
    );
    // `none` removes a setting; a later --class-rate for the same class wins.
    let change = ShapingChange {
        rate_in: Some(None),
        burst: Some(None),
        pps_in: Some(None),
        class_rates: vec![
            ClassRate::parse("3:1mbit:none").unwrap(),
            ClassRate::parse("3:2mbit:none").unwrap(),
        ],
        ..Default::default()
    };
    let merged = change.merge(Some(&base)).unwrap().unwrap();
    assert_eq!(merged.rate_in, None);
    assert_eq!(merged.burst, None);
    assert_eq!(merged.pps_in, None);
    assert_eq!(merged.rate_out, base.rate_out);
    let classes: Vec<String> = merged.classes.iter().map(ToString::to_string).collect();
    assert_eq!(classes, ["1:1gbit:none", "2:5mbit:5mbit", "3:2mbit:none"]);
}

#[test]
fn removing_everything_leaves_no_shaping() {
    let base = ShapingConfig {
        rate_in: Some(rate("10mbit")),
        burst: Some(Size::Bytes(64 << 10)),
        ..Default::default()
    };
    let change = ShapingChange {
        rate_in: Some(None),
        ..Default::default()
    };
    // A burst alone shapes nothing.
    assert_eq!(change.merge(Some(&base)), Ok(None));
    let change = ShapingChange {
        rate_in: Some(Some(rate("1mbit"))),
        ..Default::default()
    };
    assert_eq!(
        change.merge(None),
        Ok(Some(ShapingConfig {
            rate_in: Some(rate("1mbit")),
            ..Default::default()
        }))
    );
}

#[test]
fn a_merge_is_validated() {
    let change = ShapingChange {
        rate_in: Some(Some(rate("10mbit"))),
        burst: Some(Some(Size::Bytes(100))),
        ..Default::default()
    };
    let e = change.merge(None).unwrap_err();
    assert_eq!(e.flag, "--burst");
    assert_eq!(e.value, "100b");
    // The base's own values are checked too: a burst too small for the new rate's frames.
    let base = ShapingConfig {
        burst: Some(Size::Bytes(1000)),
        ..Default::default()
    };
    let change = ShapingChange {
        rate_out: Some(Some(rate("1mbit"))),
        ..Default::default()
    };
    assert_eq!(change.merge(Some(&base)).unwrap_err().flag, "--burst");
    let change = ShapingChange {
        pps_in: Some(Some(0)),
        ..Default::default()
    };
    assert_eq!(change.merge(None).unwrap_err().flag, "--pps-in");
}
