//! Sizes, rates, pps, `barrier:limit` and per-class rates: every parser answers Ok or Err, and
//! what a value prints as parses back to the same value.
#![no_main]

use berth_runtime::Size;
use berth_runtime::shaping::{ClassRate, Rate};
use berth_runtime::vzimport::parse::{parse_pair, parse_quantity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(size) = s.parse::<Size>() {
        let shown = size.to_string();
        assert_eq!(shown.parse::<Size>().ok(), Some(size), "{s:?} -> {shown:?}");
    }
    if let Ok(size) = Size::parse_tc(s) {
        let shown = size.tc().to_string();
        assert_eq!(
            Size::parse_tc(&shown).ok(),
            Some(size),
            "{s:?} -> {shown:?}"
        );
    }
    if let Ok(rate) = Rate::parse("--rate", s) {
        let shown = rate.to_string();
        assert_eq!(
            Rate::parse("--rate", &shown).ok(),
            Some(rate),
            "{s:?} -> {shown:?}"
        );
    }
    let _ = berth_runtime::shaping::parse_optional_rate("--rate-in", s);
    let _ = berth_runtime::shaping::parse_optional_burst("--burst", s);
    let _ = berth_runtime::shaping::ShapingConfig::parse_pps("--pps", s);
    let _ = ClassRate::parse(s);
    let _ = parse_quantity(s);
    let _ = parse_pair(s);
    let _ = berth_runtime::transfer_quota::Bytes::parse("--transfer-quota", s);
});
