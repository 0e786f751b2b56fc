//! OpenVZ `vz.conf` + `CTID.conf` (split at the first NUL byte): parsing never panics or runs
//! anything, and a CT that maps to a berth config maps to one berth loads back.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use berth_runtime::config::CtConfig;
use berth_runtime::vzimport::{MapOpts, Node, SourceCt, map_ct, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (global, ct) = text.split_once('\0').unwrap_or(("", text));
    let Ok(global) = parse::parse(Path::new("/etc/vz/vz.conf"), global, None) else {
        return;
    };
    let Ok(conf) = parse::parse(Path::new("/etc/vz/conf/101.conf"), ct, Some(101)) else {
        return;
    };
    for s in conf.settings.values() {
        // Every number-looking value goes through the quantity parsers too.
        let _ = parse::parse_pair(&s.value);
        let _ = parse::parse_bool(&s.value);
    }
    let node = Node {
        conf_dir: PathBuf::from("/nonexistent/vz/conf"),
        global,
        names: BTreeMap::new(),
        classes: None,
    };
    let ct = SourceCt {
        ctid: 101,
        conf,
        names: Vec::new(),
        scripts: Vec::new(),
    };
    let opts = MapOpts {
        source_cpus: Some(4),
        resolv_conf: Some(PathBuf::from("/nonexistent/resolv.conf")),
    };
    let Ok(mapped) = map_ct(&node, &ct, &opts) else {
        return;
    };
    let path = Path::new("/fuzz/conf/101.toml");
    let saved = toml::to_string_pretty(&mapped.cfg).expect("a mapped config serializes");
    let back: CtConfig = toml::from_str(&saved)
        .unwrap_or_else(|e| panic!("imported config does not parse: {e}\n{saved}"));
    back.validate(path)
        .unwrap_or_else(|e| panic!("imported config does not validate: {e}\n{saved}"));
});
