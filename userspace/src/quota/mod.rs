//! Transfer quotas.

pub mod enforce;
