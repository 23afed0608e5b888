//! Benchmark helpers: statistics over what a client saw during a migration.

use serde::Serialize;

/// What a write-load client saw.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    /// Replies received (acknowledged writes).
    pub acked: u64,
    /// Errors (connection lost, refused) while the service was away.
    pub errors: u64,
    /// The longest time between two consecutive replies, in ms: the downtime the
    /// client observed.
    pub max_gap_ms: f64,
    /// When that gap started, ms after the load began.
    pub max_gap_at_ms: f64,
    /// Median and 99th percentile reply latency, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Highest `k:N` SET that was acknowledged, and the last INCR value seen.
    pub last_set: u64,
    pub last_incr: i64,
}

/// The largest gap between consecutive reply times (ms since start) and where it
/// starts. `times` must be sorted.
pub fn max_gap(times: &[f64]) -> (f64, f64) {
    times
        .windows(2)
        .map(|w| (w[1] - w[0], w[0]))
        .fold((0.0, 0.0), |best, g| if g.0 > best.0 { g } else { best })
}

/// The `q`-quantile (0..=1) of `v` (sorted in place), or 0 for an empty slice.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The median of a list of figures (for reporting several runs).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    quantile(&mut v, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_quantiles() {
        assert_eq!(max_gap(&[0.0, 1.0, 2.0, 10.0, 11.0]), (8.0, 2.0));
        assert_eq!(max_gap(&[5.0]), (0.0, 0.0));
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 1.0), 5.0);
        assert_eq!(median(&[]), 0.0);
    }
}
