//! berth-runtime: the container model and everything that touches the kernel for a CT.

pub mod autostart;
pub mod billing;
pub mod cgroups;
pub mod config;
pub mod container;
pub mod crashpoint;
pub mod ctid;
pub mod error_chain;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod lock;
pub mod net;
pub mod progress;
pub mod quota;
pub mod shaping;
pub mod signal;
pub mod size;
pub mod template;
pub mod transfer_quota;
pub mod userns;
pub mod vzimport;

pub use ctid::Ctid;
pub use size::Size;
