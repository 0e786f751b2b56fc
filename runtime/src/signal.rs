//! Signal names as written in configs (`SIGPWR`, `SIGRTMIN+4`, `15`).

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown signal {0:?} (examples: SIGTERM, SIGPWR, SIGUSR2, SIGRTMIN+4)")]
pub struct SignalError(pub String);

/// Returns the raw signal number. Real-time signals are not in nix's `Signal` enum, hence raw ints.
pub fn parse_signal(s: &str) -> Result<i32, SignalError> {
    let err = || SignalError(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=libc::SIGRTMAX()).contains(&n) {
            Ok(n)
        } else {
            Err(err())
        };
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    if let Some(rest) = name.strip_prefix("RTMIN") {
        let off: i32 = if rest.is_empty() {
            0
        } else {
            rest.strip_prefix('+')
                .and_then(|r| r.parse().ok())
                .ok_or_else(err)?
        };
        let n = libc::SIGRTMIN() + off;
        return if n <= libc::SIGRTMAX() {
            Ok(n)
        } else {
            Err(err())
        };
    }
    let n = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "PWR" => libc::SIGPWR,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        _ => return Err(err()),
    };
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_signal("SIGTERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("pwr"), Ok(libc::SIGPWR));
        assert_eq!(parse_signal("SIGRTMIN+4"), Ok(libc::SIGRTMIN() + 4));
        assert_eq!(parse_signal("10"), Ok(10));
        assert!(parse_signal("SIGFOO").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("SIGRTMIN+99").is_err());
    }
}
