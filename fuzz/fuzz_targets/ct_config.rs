//! `conf/<CTID>.toml`: any text either fails to load with an error or loads into a config that
//! validates, saves and loads back to the same config.
#![no_main]

use std::path::Path;

use berth_runtime::config::CtConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/fuzz/conf/101.toml");
    let Ok(cfg) = toml::from_str::<CtConfig>(text) else {
        return;
    };
    if cfg.validate(path).is_err() {
        return;
    }
    // What `save` writes must be what `load` accepts, unchanged.
    let saved = toml::to_string_pretty(&cfg).expect("a loaded config serializes");
    let back: CtConfig = toml::from_str(&saved)
        .unwrap_or_else(|e| panic!("saved config does not parse: {e}\n{saved}"));
    back.validate(path)
        .unwrap_or_else(|e| panic!("saved config does not validate: {e}\n{saved}"));
    assert_eq!(back, cfg, "config changed across save and load:\n{saved}");
});
