//! berth user space: shared code of the `berth` CLI and `berthd`, including the datapath manager.
pub mod api;
pub mod billing;
pub mod bpf;
pub mod clock;
pub mod ct;
pub mod datapath;
pub mod exit_codes;
pub mod fleet;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod human;
pub mod inventory;
pub mod lifecycle_hooks;
pub mod logging;
pub mod metrics;
pub mod netstat;
pub mod quota;
pub mod shaper;
pub mod vzcompat;
