//! stderr logging of the berth binaries: `BERTH_LOG` (tracing filter syntax) or a level from
//! `-v` counts. stdout stays for output.

/// Installs the subscriber; `levels[n]` is the filter for `-v` given `n` times (the last for
/// more).
pub fn init(verbose: u8, levels: &[&str]) {
    let filter = std::env::var("BERTH_LOG").unwrap_or_else(|_| {
        levels
            .get(usize::from(verbose))
            .or(levels.last())
            .copied()
            .unwrap_or("warn")
            .to_owned()
    });
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_target(false)
        .init();
}
