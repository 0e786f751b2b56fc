//! Support code shared by berth's privileged end-to-end tests and its benchmarks (bench/).
//! Each area adds its own module.
pub mod berthd;
pub mod billing;
pub mod billing_graph;
pub mod bpf_stats;
pub mod cgroups;
pub mod ct;
pub mod dashboard;
pub mod datapath;
pub mod fleet;
pub mod migrate;
pub mod net;
pub mod pg;
pub mod probes;
pub mod shaper;
pub mod skip;
pub mod template;
pub mod vz;
pub mod webhook;

/// `n` as a CTID, for tests that name CTs by number.
pub fn ct(n: u32) -> berth_runtime::Ctid {
    berth_runtime::Ctid::new(n).expect("tests use valid CTIDs")
}
