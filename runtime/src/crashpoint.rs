//! Named crash points for fault-injection tests (tests/tests/crashpoints.rs).
//!
//! `crash_point!` with a name such as `create.private_copied` marks a step after which a `kill -9` must leave a
//! state that `berth gc` or the next command brings back to a consistent one. The points exist
//! only in a build with the cargo feature `failpoints` (the e2e binaries `cargo xtask test`
//! builds); without it the macro expands to nothing. With it they are still inert unless the
//! environment variable `FAILPOINTS` names them: `FAILPOINTS=create.private_copied=kill` makes
//! the process SIGKILL itself there (a `kill -9`, no unwinding, no destructors); any other
//! action is one of the `fail` crate's (`panic`, `sleep(100)`, `off`, ...). Entries are
//! separated by `;`.
//!
//! Every point's name is in [`POINTS`], and a unit test checks the list against the sources.

/// Every crash point, in lifecycle order. A name is `<operation>.<step done>`.
pub const POINTS: &[&str] = &[
    // create (runtime/src/container/create.rs)
    "create.marker_written",
    "create.ids_claimed",
    "create.private_copied",
    "create.private_renamed",
    "create.quota_set",
    "create.config_tmp_written",
    "create.config_written",
    // start (runtime/src/container/start.rs)
    "start.cgroup_created",
    "start.limits_applied",
    "start.state_provisional",
    "start.private_mounted",
    "start.monitor_spawned",
    "start.init_cloned",
    "start.id_maps_written",
    "start.netns_opened",
    "start.veth_made",
    "start.ebpf_attached",
    "start.net_up",
    "start.shaping_applied",
    "start.init_released",
    "start.state_written",
    // stop (runtime/src/container/stop.rs)
    "stop.init_signalled",
    "stop.cgroup_killed",
    "stop.net_down",
    "stop.cgroup_removed",
    "stop.unmounted",
    "stop.state_removed",
    // set (runtime/src/container/set.rs)
    "set.addrs_deleted",
    "set.addrs_added",
    "set.datapath_updated",
    "set.shaping_applied",
    "set.limits_applied",
    "set.state_written",
    "set.config_tmp_written",
    "set.config_written",
    // destroy (runtime/src/container/stop.rs)
    "destroy.cleaned",
    "destroy.counters_retired",
    "destroy.private_removed",
    "destroy.config_removed",
    "destroy.ids_released",
    // template import (runtime/src/template/import.rs)
    "template.import.staged",
    "template.import.unpacked",
    "template.import.committed",
    // berthd's ledger tick (userspace/src/billing)
    "ledger.tick.after_read",
    "ledger.tick.mid_write",
    "ledger.tick.after_commit",
    // OpenVZ import (runtime/src/vzimport)
    "vzimport.private_copied",
    "vzimport.private_renamed",
    "vzimport.config_written",
];

/// Marks a crash point (see the module docs); nothing at all without the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::crashpoint::hit($name)
    };
}

/// Marks a crash point (see the module docs); nothing at all without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        ()
    };
}

#[cfg(feature = "failpoints")]
#[doc(hidden)]
pub fn hit(name: &'static str) {
    fail::fail_point!(name);
}

/// Configures the points `FAILPOINTS` names (a binary's first act). Unknown names are refused:
/// a test that names a point the build lacks must not silently pass.
#[cfg(feature = "failpoints")]
pub fn setup_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, action) = entry
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS entry {entry:?}: expected NAME=ACTION"))?;
        if !POINTS.contains(&name) {
            return Err(format!("FAILPOINTS: unknown crash point {name:?}"));
        }
        if action == "kill" {
            fail::cfg_callback(name, kill_self)?;
        } else {
            fail::cfg(name, action)?;
        }
    }
    Ok(())
}

/// Without the `failpoints` feature: a `FAILPOINTS` setting is refused, so a test run against
/// a build without the points fails instead of passing vacuously.
#[cfg(not(feature = "failpoints"))]
pub fn setup_from_env() -> Result<(), String> {
    match std::env::var_os("FAILPOINTS") {
        Some(_) => Err("FAILPOINTS is set but this build has no crash points (build with --features failpoints)".into()),
        None => Ok(()),
    }
}

#[cfg(feature = "failpoints")]
fn kill_self() {
    // SAFETY: signalling our own process; SIGKILL cannot be caught, so this does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::path::{Path, PathBuf};

    use super::POINTS;

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// Every use of the macro in runtime/ and userspace/, by name, with its count.
    fn uses() -> BTreeMap<String, usize> {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        for d in ["runtime/src", "userspace/src"] {
            rust_files(&ws.join(d), &mut files);
        }
        let needle = concat!("crash_point", "!(\"");
        let mut out = BTreeMap::new();
        for f in files {
            let text = fs::read_to_string(&f).unwrap();
            for (i, _) in text.match_indices(needle) {
                let rest = &text[i + needle.len()..];
                let name = &rest[..rest.find('"').unwrap()];
                *out.entry(name.to_string()).or_default() += 1;
            }
        }
        out
    }

    #[test]
    fn every_point_is_used_exactly_once_and_listed() {
        let used = uses();
        for p in POINTS {
            assert_eq!(
                used.get(*p).copied().unwrap_or(0),
                1,
                "crash point {p:?} must appear exactly once in the sources"
            );
        }
        for name in used.keys() {
            assert!(
                POINTS.contains(&name.as_str()),
                "crash point {name:?} is not in POINTS"
            );
        }
        let mut sorted = POINTS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), POINTS.len(), "POINTS lists a name twice");
    }
}
