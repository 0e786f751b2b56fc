//! Numbers as human views show them (JSON keeps them raw).

/// A byte count in binary units, vzctl style: `512M`, `1.5G`, `900` (bytes below 1K).
/// One decimal unless it is whole; a value that would print as `1024K` moves up a unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1023.95 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if n.is_multiple_of(1u64 << (10 * (u + 1))) {
        format!("{}{}", n >> (10 * (u + 1)), UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::bytes;

    #[test]
    fn sizes_read_like_vzctl_input() {
        assert_eq!(bytes(0), "0");
        assert_eq!(bytes(1023), "1023");
        assert_eq!(bytes(1024), "1K");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(512 << 20), "512M");
        assert_eq!(bytes(104_857_600), "100M");
        assert_eq!(bytes(1_500_000), "1.4M");
        assert_eq!(bytes((1 << 30) - 1), "1.0G");
        assert_eq!(bytes(3 << 40), "3T");
        assert_eq!(bytes(u64::MAX), "16.0E");
    }
}
