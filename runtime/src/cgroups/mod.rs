//! cgroup v1 + v2 behind one trait.
