//! The wall clock of the ledger, the quotas and their webhooks, in Unix seconds.
//!
//! Debug builds (the ones the end-to-end tests run) add the offset in seconds written in the
//! file named by `BERTH_TEST_CLOCK_FILE`, read at every call: a test moves a running berthd and
//! the CLI into the next billing period without waiting a month. Release builds ignore the
//! variable, so an installed berth always books at the real time.

/// Seconds since the Unix epoch (0 before it), plus the test offset in debug builds.
pub fn unix_now() -> i64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    real.saturating_add(test_offset())
}

#[cfg(debug_assertions)]
fn test_offset() -> i64 {
    let Some(path) = std::env::var_os("BERTH_TEST_CLOCK_FILE") else {
        return 0;
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().is_empty() => 0,
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(path = %std::path::Path::new(&path).display(), "test clock: not a number of seconds; offset 0");
            0
        }),
        // A missing file is no offset (the test writes it when it moves the clock).
        Err(_) => 0,
    }
}

#[cfg(not(debug_assertions))]
fn test_offset() -> i64 {
    0
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_is_after_2026() {
        assert!(super::unix_now() > 1_767_225_600);
    }
}
