//! Order statistics the benchmarks report.

use std::time::Duration;

/// The `q`-quantile of sorted, non-empty values: the sample nearest to rank `(n - 1) · q`.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub struct Summary {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// p50, p90, p99 and the extremes of non-empty samples.
pub fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort();
    Summary {
        p50: quantile(&v, 0.5),
        p90: quantile(&v, 0.9),
        p99: quantile(&v, 0.99),
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_pick_the_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 51);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[7], 0.99), 7);
        let s = summarize(vec![Duration::from_millis(3), Duration::from_millis(1)]);
        assert_eq!(
            (s.min, s.max),
            (Duration::from_millis(1), Duration::from_millis(3))
        );
    }
}
