//! Support code shared by berth's privileged end-to-end tests. Each area adds its own module.
pub mod berthd;
pub mod cgroups;
pub mod ct;
pub mod datapath;
pub mod net;
pub mod shaper;
pub mod template;
