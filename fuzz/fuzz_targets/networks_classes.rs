//! `networks_classes`: any text parses or fails with a line-naming error; what parses holds
//! prefixes with host bits cleared, each once, classes in range.
#![no_main]

use std::collections::HashSet;

use berth::datapath::parse_networks_classes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(entries) = parse_networks_classes(text) else {
        return;
    };
    let mut seen = HashSet::new();
    for e in &entries {
        assert!(e.class < 16, "class {} out of range", e.class);
        assert_eq!(e.net, e.net.trunc(), "host bits left in {}", e.net);
        assert!(seen.insert(e.net), "{} listed twice", e.net);
    }
});
