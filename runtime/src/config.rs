//! Host layout and per-CT configuration.
