//! A pre-copy round's early reply (destination side).
//!
//! Asked to overlap (`SyncRequest.overlap_micros`), a round replies before its fetch
//! ends, once what is left (over every fetch of the migration, the image's included)
//! would take at most that long at the rate of the last [`WINDOW`]: the source's next
//! step (its freeze and final dump) then runs while the last chunks arrive, instead of
//! after them. The fetch goes on in the background ([`Pending`]); the next `Sync`
//! does not ask for its ids again, awaits it before rebuilding, and carries its
//! complete figures back (`SyncReply.tail`). If that fetch fails, the next `Sync`
//! fetches what it left (the source is always a candidate), so an early reply never
//! loses a chunk; at worst the final round waits for it, inside the downtime.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use xfer_proto::v1::{RoundTail, SourceBytes};
use xfer_store::{Digest, Store};

use crate::chunks::{ChunkError, FetchReport, Fetcher, Progress, SourceReport};
use crate::error::AgentError;
use crate::node::Node;

/// The longest overlap honoured, whatever the source asks.
pub(super) const MAX_OVERLAP: Duration = Duration::from_secs(2);
/// How often the fetch is looked at.
const TICK: Duration = Duration::from_millis(20);
/// The rate is what arrived over this long (and no early reply before the fetch ran
/// this long).
const WINDOW: Duration = Duration::from_millis(300);
/// The estimate is stretched by this much: a fetch's last chunks come slower, as
/// sources run out of work, and the source's dump competes for the CPU with the
/// fetch's verification (measured in the cooperative benchmark: the tail took 1.6-1.8
/// times its estimate).
const MARGIN: f64 = 1.75;

/// A round that replied early: its fetch, still running.
pub(super) struct Early {
    pub task: JoinHandle<Result<FetchReport, ChunkError>>,
    pub progress: Arc<Progress>,
    /// The ids the round fetches (not asked again by the next round).
    pub ids: Vec<Digest>,
    pub started: Instant,
}

/// A deferred round: its tail fetch (if it replied early), then its rebuild.
#[derive(Debug)]
pub(super) struct Pending {
    pub ids: Arc<HashSet<Digest>>,
    /// Stops the tail fetch (clean-up of the migration).
    pub cancel: Arc<Notify>,
    /// The round's complete figures if it replied early.
    pub task: JoinHandle<Result<Option<RoundTail>, AgentError>>,
}

/// How watching a fetch ended.
pub(super) enum Watched {
    /// The fetch ended first.
    Done(Result<FetchReport, ChunkError>),
    /// What is left would take about `eta`: reply now.
    Early { eta: Duration },
}

/// The time the bytes left take at the rate seen over `samples` ((time, bytes
/// received so far), oldest first), if that span is long enough to tell.
pub(super) fn eta(samples: &VecDeque<(Instant, u64)>, left_bytes: f64) -> Option<Duration> {
    let (&(t0, b0), &(t1, b1)) = (samples.front()?, samples.back()?);
    let span = t1.saturating_duration_since(t0);
    if span < WINDOW / 2 || b1 <= b0 {
        return None;
    }
    let rate = (b1 - b0) as f64 / span.as_secs_f64();
    Some(Duration::from_secs_f64(left_bytes.max(0.0) / rate))
}

/// Whether to reply now: the fetch ran a window, something is left, and that would
/// take (with the margin) at most `overlap`.
pub(super) fn reply_now(
    ran: Duration,
    left: u64,
    eta: Option<Duration>,
    overlap: Duration,
) -> bool {
    ran >= WINDOW && left > 0 && eta.is_some_and(|e| e.mul_f64(MARGIN) <= overlap)
}

/// Watches `task` (a fetch by `fetcher`) until it ends or may be left to run.
pub(super) async fn watch(
    fetcher: &Fetcher<Store>,
    task: &mut JoinHandle<Result<FetchReport, ChunkError>>,
    overlap: Duration,
) -> Watched {
    let started = Instant::now();
    let mut samples: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            res = &mut *task => {
                return Watched::Done(res.unwrap_or_else(|e| Err(ChunkError::Task(e.to_string()))));
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let o = fetcher.outstanding();
                samples.push_back((now, o.wire_bytes));
                while samples.len() > 2
                    && now.saturating_duration_since(samples[0].0) > WINDOW
                {
                    samples.pop_front();
                }
                let left = o.remaining_bytes(fetcher.config().prior_chunk_bytes);
                let e = eta(&samples, left);
                if reply_now(now - started, o.remaining, e, overlap) {
                    return Watched::Early { eta: e.unwrap_or_default() };
                }
            }
        }
    }
}

/// A report of what a running fetch has done so far.
pub(super) fn partial(p: &crate::chunks::fetch::ProgressState) -> FetchReport {
    FetchReport {
        fetched: p.fetched,
        raw_bytes: p.raw_bytes,
        wire_bytes: p.wire_bytes,
        sources: p
            .sources
            .iter()
            .map(|(name, &(chunks, wire_bytes))| {
                let r = SourceReport {
                    fallback: name == crate::chunks::FALLBACK_NAME,
                    chunks,
                    wire_bytes,
                    ..Default::default()
                };
                (name.clone(), r)
            })
            .collect(),
        ..Default::default()
    }
}

/// Adds `more` (a second fetch of the same round) to `into`.
pub(super) fn absorb(into: &mut FetchReport, more: &FetchReport) {
    into.fetched += more.fetched;
    into.raw_bytes += more.raw_bytes;
    into.wire_bytes += more.wire_bytes;
    into.duplicate_chunks += more.duplicate_chunks;
    into.duplicate_bytes += more.duplicate_bytes;
    for (name, s) in &more.sources {
        let e = into.sources.entry(name.clone()).or_default();
        e.fallback |= s.fallback;
        e.chunks += s.chunks;
        e.wire_bytes += s.wire_bytes;
        e.raw_bytes += s.raw_bytes;
    }
}

/// Bytes per source that delivered something.
pub(super) fn source_bytes(report: &FetchReport) -> Vec<SourceBytes> {
    report
        .sources
        .iter()
        .filter(|(_, s)| s.chunks > 0)
        .map(|(name, s)| SourceBytes {
            source: name.clone(),
            chunks: s.chunks,
            wire_bytes: s.wire_bytes,
        })
        .collect()
}

/// Waits for an early round's fetch (unless `stop` is notified first: the fetch is
/// dropped, which cancels its requests) and returns its complete figures.
pub(super) async fn finish(
    node: &Node,
    round: u32,
    e: Early,
    stop: &Notify,
) -> Result<RoundTail, AgentError> {
    let mut task = e.task;
    let res = tokio::select! {
        r = &mut task => r,
        _ = stop.notified() => {
            task.abort();
            let _ = task.await;
            return Err(AgentError::Refused(
                "the migration was cleaned up during a round's tail fetch".into(),
            ));
        }
    };
    let report = res
        .map_err(|err| AgentError::Refused(format!("tail fetch task: {err}")))?
        .map_err(AgentError::Fetch)?;
    node.fetched(&e.ids, &report);
    Ok(RoundTail {
        round,
        chunks: report.fetched,
        wire_bytes: report.wire_bytes,
        raw_bytes: report.raw_bytes,
        fetch_micros: e.started.elapsed().as_micros() as u64,
        sources: source_bytes(&report),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(u64, u64)]) -> VecDeque<(Instant, u64)> {
        let t0 = Instant::now();
        points
            .iter()
            .map(|&(ms, b)| (t0 + Duration::from_millis(ms), b))
            .collect()
    }

    #[test]
    fn the_eta_is_the_bytes_left_at_the_windows_rate() {
        // 3 MB in 300 ms = 10 MB/s; 1 MB left = 100 ms.
        let s = samples(&[(0, 0), (150, 1_500_000), (300, 3_000_000)]);
        let e = eta(&s, 1_000_000.0).expect("an estimate");
        assert!((e.as_secs_f64() - 0.1).abs() < 1e-6, "{e:?}");
        // Too short a span, or nothing received: no estimate.
        assert_eq!(eta(&samples(&[(0, 0), (100, 1_000_000)]), 1.0), None);
        assert_eq!(eta(&samples(&[(0, 5), (300, 5)]), 1.0), None);
        assert_eq!(eta(&VecDeque::new(), 1.0), None);
    }

    #[test]
    fn a_reply_goes_early_only_when_the_tail_fits_the_overlap_with_margin() {
        let ov = Duration::from_millis(200);
        let ran = Duration::from_millis(500);
        let ms = |n| Some(Duration::from_millis(n));
        assert!(reply_now(ran, 10, ms(110), ov));
        // 120 ms x 1.75 > 200 ms.
        assert!(!reply_now(ran, 10, ms(120), ov));
        // Not measured long enough, nothing left, or no estimate.
        assert!(!reply_now(Duration::from_millis(100), 10, ms(10), ov));
        assert!(!reply_now(ran, 0, ms(0), ov));
        assert!(!reply_now(ran, 10, None, ov));
    }

    #[test]
    fn a_second_fetch_adds_to_the_rounds_report() {
        let mut a = FetchReport {
            fetched: 2,
            wire_bytes: 20,
            ..Default::default()
        };
        a.sources.insert(
            "h3".into(),
            SourceReport {
                chunks: 2,
                wire_bytes: 20,
                ..Default::default()
            },
        );
        let mut b = FetchReport {
            fetched: 1,
            wire_bytes: 7,
            ..Default::default()
        };
        b.sources.insert(
            "source".into(),
            SourceReport {
                fallback: true,
                chunks: 1,
                wire_bytes: 7,
                ..Default::default()
            },
        );
        absorb(&mut a, &b);
        assert_eq!((a.fetched, a.wire_bytes), (3, 27));
        let by: Vec<_> = source_bytes(&a)
            .into_iter()
            .map(|s| (s.source, s.chunks, s.wire_bytes))
            .collect();
        assert_eq!(by, vec![("h3".into(), 2, 20), ("source".into(), 1, 7)]);
    }
}
