use super::*;

#[test]
fn sizes_decimal_and_binary() {
    let b = |s| Bytes::parse("--quota-transfer", s).unwrap().0;
    assert_eq!(b("2TB"), 2_000_000_000_000);
    assert_eq!(b("2tb"), 2_000_000_000_000);
    assert_eq!(b("1GiB"), 1 << 30);
    assert_eq!(b("1.5GB"), 1_500_000_000);
    assert_eq!(b("5MB"), 5_000_000);
    assert_eq!(b("4096"), 4096);
    assert_eq!(b("10 MiB"), 10 << 20);
    for bad in ["", "-1GB", "0", "0GB", "2XB", "GB", "1e3GB"] {
        let e = Bytes::parse("--quota-transfer", bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("--quota-transfer {bad:?}: ")),
            "{bad}: {e}"
        );
    }
    for (v, s) in [
        (2_000_000_000_000, "2TB"),
        (3 << 30, "3GiB"),
        (12345, "12345B"),
        (2_200_000_000_000, "2200GB"),
    ] {
        assert_eq!(Bytes(v).to_string(), s);
        assert_eq!(Bytes::parse("x", s).unwrap().0, v);
    }
}

#[test]
fn words_and_urls() {
    assert_eq!(Count::parse("--quota-count", "MAX").unwrap(), Count::Max);
    let e = Count::parse("--quota-count", "sum")
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "--quota-count \"sum\": unknown count: use one of out in both max"
    );
    let e = HardAction::parse("--quota-hard-action", "kill")
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown hard action"), "{e}");
    assert_eq!(
        parse_webhook("--quota-webhook", "http://127.0.0.1:8080/hook").unwrap(),
        "http://127.0.0.1:8080/hook"
    );
    parse_webhook("--quota-webhook", "http://[::1]:80/x").unwrap();
    parse_webhook("--quota-webhook", "http://panel.example").unwrap();
    assert_eq!(
        parse_webhook("--quota-webhook", " https://panel.example:8443/q ").unwrap(),
        "https://panel.example:8443/q"
    );
    parse_webhook("--quota-webhook", "https://[2001:db8::1]/q").unwrap();
    for (bad, why) in [
        ("ftp://x/", "not a URL"),
        ("panel/hook", "not a URL"),
        ("http:///x", "no host"),
        ("http://a:0/", "bad port"),
        ("http://a:99999/", "bad port"),
        ("http://u@a/", "user info"),
        ("https://", "no host"),
        ("https://a:0/", "bad port"),
        ("https://u@a/", "user info"),
        ("http://a b/", "bad host"),
    ] {
        let e = parse_webhook("--quota-webhook", bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    assert_eq!(parse_notify("n", "100, 80,90").unwrap(), [80, 90, 100]);
    assert!(parse_notify("n", "80,80").is_err());
    assert!(parse_notify("n", "0").is_err());
    assert!(parse_notify("n", "x").is_err());
    let (i, o) = parse_throttle("--quota-throttle", "10mbit").unwrap();
    assert_eq!(i.unwrap().bits_per_sec(), 10_000_000);
    assert_eq!(i, o);
    let (i, o) = parse_throttle("--quota-throttle", "none:1mbit").unwrap();
    assert_eq!((i, o.unwrap().bits_per_sec()), (None, 1_000_000));
    assert!(parse_throttle("--quota-throttle", "10parsecs").is_err());
}

#[test]
fn merge_and_validation() {
    let base = QuotaChange {
        transfer: Some(Some(Bytes(5_000_000))),
        throttle: Some(parse_throttle("t", "1mbit").unwrap()),
        hard: Some(Some(Bytes(8_000_000))),
        hard_action: Some(HardAction::Cut),
        notify: Some(vec![80, 100]),
        webhook: Some(Some("http://127.0.0.1:1/h".into())),
        ..QuotaChange::default()
    };
    let q = base.merge(&QuotaConfig::default()).unwrap();
    assert_eq!(q.soft_action(), SoftAction::Throttle);
    assert_eq!(q.count(), Count::Out);
    assert!(!q.counts_class(0) && q.counts_class(1));
    // Hard below transfer: refused, naming it.
    let e = QuotaChange {
        hard: Some(Some(Bytes(4_000_000))),
        ..QuotaChange::default()
    }
    .merge(&q)
    .unwrap_err();
    assert_eq!(e.flag, "--quota-hard");
    assert!(e.reason.contains("below the transfer quota 5MB"), "{e}");
    // Removing the throttle sets soft_action none.
    let q2 = QuotaChange {
        throttle: Some((None, None)),
        ..QuotaChange::default()
    }
    .merge(&q)
    .unwrap();
    assert_eq!(q2.soft_action(), SoftAction::None);
    // none removes everything, alone only.
    let cleared = QuotaChange {
        transfer: Some(None),
        ..QuotaChange::default()
    }
    .merge(&q)
    .unwrap();
    assert!(cleared.is_empty());
    assert!(
        QuotaChange {
            transfer: Some(None),
            count: Some(Count::In),
            ..QuotaChange::default()
        }
        .merge(&q)
        .is_err()
    );
    // A hard limit without a transfer quota.
    assert!(
        QuotaChange {
            hard: Some(Some(Bytes(1))),
            ..QuotaChange::default()
        }
        .merge(&QuotaConfig::default())
        .is_err()
    );
}

#[test]
fn toml_round_trip_and_bad_values() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct W {
        quota: QuotaConfig,
    }
    let text = "[quota]\ntransfer = \"2TB\"\ncount = \"max\"\nclasses = [1, 2]\nsoft_action = \"throttle\"\nthrottle_rate_in = \"10mbit\"\nthrottle_rate_out = \"5mbit\"\nhard = \"2200GB\"\nhard_action = \"suspend\"\nnotify = [80, 90, 100]\nwebhook = \"http://10.0.0.1/q\"\n";
    let w: W = toml::from_str(text).unwrap();
    w.quota.validate().unwrap();
    assert_eq!(w.quota.transfer, Some(Bytes(2_000_000_000_000)));
    assert_eq!(w.quota.hard_action(), HardAction::Suspend);
    assert_eq!(toml::to_string(&w).unwrap(), text);
    for bad in [
        "[quota]\ntransfer = \"2XB\"\n",
        "[quota]\ncount = \"sum\"\n",
        "[quota]\nhard_action = \"kill\"\n",
        "[quota]\nbogus = 1\n",
    ] {
        assert!(toml::from_str::<W>(bad).is_err(), "{bad}");
    }
    for (bad, key) in [
        (
            "[quota]\ntransfer = \"2TB\"\nhard = \"1TB\"\n",
            "quota.hard",
        ),
        (
            "[quota]\ntransfer = \"2TB\"\nsoft_action = \"throttle\"\n",
            "quota.soft_action",
        ),
        (
            "[quota]\ntransfer = \"2TB\"\nwebhook = \"https://x y/\"\n",
            "quota.webhook",
        ),
        (
            "[quota]\ntransfer = \"2TB\"\nnotify = [0]\n",
            "quota.notify",
        ),
        (
            "[quota]\ntransfer = \"2TB\"\nclasses = [99]\n",
            "quota.classes",
        ),
    ] {
        let w: W = toml::from_str(bad).unwrap();
        assert_eq!(w.quota.validate().unwrap_err().flag, key, "{bad}");
    }
}
