//! The few host sysctls routed mode needs, set in the host netns (see [`super`] for the list).

use std::fs;
use std::io::ErrorKind;

use super::error::NetError;
use super::{HostNet, ns};

/// Makes sure `/proc/sys/net/<key>` is 1 in the host netns. Read first and write only when
/// needed; checked once per [`HostNet`].
pub(crate) fn ensure(host: &mut HostNet, key: &str) -> Result<(), NetError> {
    if host.sysctls_done.contains(key) {
        return Ok(());
    }
    let path = format!("/proc/sys/net/{key}");
    let err = |source| NetError::Sysctl {
        path: path.clone(),
        ns: "the host netns".into(),
        source,
    };
    // /proc/sys/net resolves against the *calling thread's* netns, so read and write it inside
    // the host netns.
    ns::within(host.netns(), || {
        let cur = fs::read_to_string(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => err(std::io::Error::new(
                ErrorKind::NotFound,
                "no such setting (interface missing, or IPv6 disabled on the host?)",
            )),
            _ => err(e),
        })?;
        if cur.trim() != "1" {
            fs::write(&path, "1\n").map_err(err)?;
            tracing::info!(sysctl = %key, "set to 1 for routed CT networking");
        }
        Ok(())
    })?;
    host.sysctls_done.insert(key.to_string());
    Ok(())
}
