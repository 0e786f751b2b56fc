//! The testbed's loss impairment (`berth_impair`, a tc classifier): deterministic packet loss
//! on a link where the kernel has no netem. Each attachment has maps of its own (the loader
//! loads a fresh copy of the program per hook): a configuration word and the counters.
//!
//! Only IP packets (IPv4, IPv6) are numbered and may be dropped; ARP passes, so a lossy link
//! still resolves neighbours the way a real lossy link mostly does. Packet `i` (0-based, in
//! the order the hook saw them) is dropped when [`drops`] says so: user space uses the same
//! function to tell which of a run of numbered packets had to be lost.

/// `IMPAIR_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImpairConfig {
    /// Drop every `every`-th IP packet (0 = off).
    pub every: u32,
    /// Drop packet `i` also when `mix(seed, i) < threshold` (a seeded fraction
    /// `threshold / 2^32`; 0 = off).
    pub threshold: u32,
    pub seed: u64,
}
const _: () = assert!(core::mem::size_of::<ImpairConfig>() == 16);

/// `IMPAIR_STATS[0]`: IP packets seen and dropped on this hook.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImpairStats {
    pub seen: u64,
    pub dropped: u64,
}
const _: () = assert!(core::mem::size_of::<ImpairStats>() == 16);

pub const CONFIG_MAP: &str = "IMPAIR_CONFIG";
pub const STATS_MAP: &str = "IMPAIR_STATS";
pub const PROGRAM: &str = "berth_impair";

/// Whether packet `i` of a hook configured with `cfg` is dropped.
#[inline(always)]
pub const fn drops(cfg: &ImpairConfig, i: u64) -> bool {
    if cfg.every != 0 && (i + 1).is_multiple_of(cfg.every as u64) {
        return true;
    }
    cfg.threshold != 0 && mix(cfg.seed, i) < cfg.threshold
}

/// A 64-bit mix (splitmix64's finaliser) of the seed and the packet's number, top 32 bits.
#[inline(always)]
pub const fn mix(seed: u64, i: u64) -> u32 {
    let mut z = seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 32) as u32
}

/// The threshold of a loss fraction in 0..=1.
pub fn threshold(fraction: f64) -> u32 {
    if fraction <= 0.0 {
        0
    } else if fraction >= 1.0 {
        u32::MAX
    } else {
        (fraction * 4_294_967_296.0) as u32
    }
}

/// How many of the packets numbered `from..to` a hook configured with `cfg` drops.
pub fn dropped_between(cfg: &ImpairConfig, from: u64, to: u64) -> u64 {
    (from..to).filter(|i| drops(cfg, *i)).count() as u64
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)] integers without padding: every bit pattern is valid.
    unsafe impl aya::Pod for super::ImpairConfig {}
    unsafe impl aya::Pod for super::ImpairStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_drops_exactly_one_in_n_of_any_run() {
        let cfg = ImpairConfig {
            every: 100,
            ..Default::default()
        };
        for start in [0, 1, 99, 12_345] {
            assert_eq!(dropped_between(&cfg, start, start + 10_000), 100);
        }
        assert!(drops(&cfg, 99) && !drops(&cfg, 100));
    }

    #[test]
    fn a_seeded_fraction_is_close_and_repeatable() {
        let cfg = ImpairConfig {
            threshold: threshold(0.01),
            seed: 7,
            ..Default::default()
        };
        let n = dropped_between(&cfg, 0, 100_000);
        assert!((900..1100).contains(&n), "{n}");
        assert_eq!(n, dropped_between(&cfg, 0, 100_000));
        let other = ImpairConfig { seed: 8, ..cfg };
        assert!((0..1000).any(|i| drops(&cfg, i) != drops(&other, i)));
    }
}
