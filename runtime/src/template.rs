//! OS templates: the store, busybox/debootstrap builders, tarball import.
