//! Ranking chunk sources: what the fetcher measures of each source, and the pluggable
//! [`RankPolicy`] that turns it into a score.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the fetcher has measured of a source (kept across fetches by one `Fetcher`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStats {
    /// Throughput: wire bytes per second while the source had requests in flight
    /// (EWMA); `None` until measured.
    pub rate_bps: Option<f64>,
    /// Time from sending a request to its first batch, in microseconds (EWMA).
    pub latency_micros: Option<f64>,
    /// The source's load from others: the fetch streams it reported serving, minus
    /// the streams this fetcher had open there at the time.
    pub load: f64,
    /// Bytes per second the source reported serving (all clients).
    pub served_bps: u64,
}

/// A source as a [`RankPolicy`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceView<'a> {
    pub name: &'a str,
    /// The migration source: tried last.
    pub fallback: bool,
    /// Whether `stats` were measured; if not, the fetcher filled in the mean of the
    /// measured sources (or left them empty when none is measured yet).
    pub measured: bool,
    pub stats: &'a SourceStats,
    /// Requests this fetcher has in flight there now.
    pub inflight: usize,
    /// Consecutive failures in this fetch.
    pub errors: u32,
}

/// Scores sources; higher is better. Scores only compare sources with each other:
/// the fetcher gives the best source first pick of the work and more requests in
/// flight, in proportion to the score.
pub trait RankPolicy: Send + Sync + std::fmt::Debug + 'static {
    /// The score of `source` (finite, > 0).
    fn score(&self, source: &SourceView<'_>) -> f64;
}

/// The default policy: the effective rate at which the source would deliver a
/// reference request (latency plus transfer at the measured throughput), divided by
/// (1 + its load from others). Unmeasured sources get the neutral priors.
#[derive(Debug, Clone)]
pub struct ThroughputRank {
    /// Throughput assumed until measured.
    pub prior_rate_bps: f64,
    /// Latency assumed until measured.
    pub prior_latency: Duration,
    /// Size of the reference request.
    pub reference_bytes: f64,
}

impl Default for ThroughputRank {
    fn default() -> Self {
        ThroughputRank {
            prior_rate_bps: DEFAULT_PRIOR_RATE,
            prior_latency: DEFAULT_PRIOR_LATENCY,
            reference_bytes: (1 << 20) as f64,
        }
    }
}

/// Throughput assumed of an unmeasured source (32 MiB/s).
pub const DEFAULT_PRIOR_RATE: f64 = (32 << 20) as f64;

/// Latency assumed of an unmeasured source.
pub const DEFAULT_PRIOR_LATENCY: Duration = Duration::from_millis(5);

impl RankPolicy for ThroughputRank {
    fn score(&self, s: &SourceView<'_>) -> f64 {
        let rate = s.stats.rate_bps.unwrap_or(self.prior_rate_bps).max(1.0);
        let lat = s
            .stats
            .latency_micros
            .map(|us| us / 1e6)
            .unwrap_or(self.prior_latency.as_secs_f64())
            .max(0.0);
        let t = lat + self.reference_bytes / rate;
        let eff = self.reference_bytes / t.max(1e-9);
        eff / (1.0 + s.stats.load.max(0.0))
    }
}

/// Exponentially weighted moving average with weight `alpha` for the new sample.
pub(crate) fn ewma(old: Option<f64>, sample: f64, alpha: f64) -> f64 {
    match old {
        Some(o) => o + alpha * (sample - o),
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faster_and_less_loaded_scores_higher() {
        let p = ThroughputRank::default();
        let view = |stats: &SourceStats| {
            p.score(&SourceView {
                name: "x",
                fallback: false,
                measured: true,
                stats,
                inflight: 0,
                errors: 0,
            })
        };
        let fast = SourceStats {
            rate_bps: Some(100e6),
            latency_micros: Some(1000.0),
            ..Default::default()
        };
        let slow = SourceStats {
            rate_bps: Some(10e6),
            ..fast.clone()
        };
        let loaded = SourceStats {
            load: 3.0,
            ..fast.clone()
        };
        let far = SourceStats {
            latency_micros: Some(200_000.0),
            ..fast.clone()
        };
        assert!(view(&fast) > view(&slow));
        assert!(view(&fast) > view(&loaded));
        assert!(view(&fast) > view(&far));
        assert!(view(&SourceStats::default()) > 0.0);
    }
}
