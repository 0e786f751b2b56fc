//! stderr logging of the berth binaries: `BERTH_LOG` (tracing filter syntax) or a level from
//! `-v` counts. stdout stays for output. Colour only on a terminal and without `NO_COLOR`
//! (no-color.org: set and not empty), so a pipe or a log file gets no escape codes.

use std::io::IsTerminal;

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
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .init();
}

/// Whether logs on stderr are coloured.
pub fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
