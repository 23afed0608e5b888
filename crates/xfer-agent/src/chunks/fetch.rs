//! The multi-source fetcher: gets a set of chunks from every source that holds them,
//! verifies each, and keeps it in the local store.
//!
//! One coordinator (the `fetch` future) owns all scheduling state; each in-flight
//! request is a task that reads its peer's batch stream, verifies and stores the
//! chunks on a blocking thread (`ChunkStore::put_verified_many`), and reports what it
//! stored, what was a duplicate, corrupt or missing. Dropping the `fetch` future
//! aborts every request task, which drops the peers' streams (and cancels their work).
//!
//! Scheduling, in short (the module docs of [`crate::chunks`] have the rules):
//! * every wanted id sits in the work queue of each source that may hold it; the
//!   migration source (the *fallback*) only gets ids no other usable source has;
//! * sources are ranked by a [`RankPolicy`]; in rank order each source takes work
//!   from its queue while it has free request slots (slots in proportion to its
//!   score, 1..=`max_inflight_per_source`);
//! * a request is sized to about `request_time` of the source's measured rate, and
//!   to a fair share of the work left, so the tail is spread thin;
//! * failures hand the ids back: a missing or corrupt chunk never goes to that source
//!   again; a failed stream re-queues only the ids not yet received;
//! * a request that makes no progress for `slow_factor` times its expected batch
//!   time is *hedged*: its remaining ids are also requested elsewhere; the first copy
//!   stored wins and the loser is cancelled once it has nothing left to deliver.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, warn};
use xfer_store::Digest;

use super::peer::ChunkPeer;
use super::rank::{ewma, RankPolicy, SourceStats, SourceView, ThroughputRank};
use super::wire::{self, Load, WireChunk};
use super::{ChunkError, ChunkStore};

/// Most distinct sources in one fetch (ids track their sources in a 64-bit mask).
pub const MAX_SOURCES: usize = 64;

/// A chunk to fetch and the sources that may hold it (besides the fallback, which is
/// always a candidate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub id: Digest,
    pub sources: Vec<String>,
}

impl Want {
    /// A chunk only the fallback is known to hold.
    pub fn from_fallback(id: Digest) -> Self {
        Want {
            id,
            sources: Vec::new(),
        }
    }
}

/// Tuning of a [`Fetcher`]; the defaults suit 1 MiB batches over LAN or edge links.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Requests in flight per source, for the best-ranked source (others get fewer,
    /// in proportion to their score, at least 1).
    pub max_inflight_per_source: usize,
    /// Requests in flight over all sources (bounds memory: each holds at most a few
    /// batches in the peer's channel and the HTTP/2 window).
    pub max_inflight_total: usize,
    /// Batch bound asked of servers.
    pub max_batch_bytes: u32,
    /// A request asks for about this much transfer time at the source's rate...
    pub request_time: Duration,
    /// ...but at least this many bytes...
    pub min_request_bytes: usize,
    /// ...and at most this many bytes...
    pub max_request_bytes: usize,
    /// ...and at most this many ids...
    pub max_request_ids: usize,
    /// ...and at most the work left divided by (request slots × `split`), so the
    /// tail of a fetch is spread thin over every source (1 = no spreading).
    pub split: usize,
    /// Throughput assumed of an unmeasured source (request sizing, slowness).
    pub prior_rate_bps: f64,
    /// The slowness rule expects at least this throughput of a source, however low
    /// its measured rate (a source that delivers next to nothing is not waited for).
    pub min_rate_bps: f64,
    /// Latency assumed of an unmeasured source.
    pub prior_latency: Duration,
    /// Wire size assumed of a chunk until chunks have been received.
    pub prior_chunk_bytes: f64,
    /// A request is slow when no batch arrived for this many times its expected
    /// batch time (latency + a batch at the source's per-stream rate)...
    pub slow_factor: f64,
    /// ...and for at least this long...
    pub slow_min: Duration,
    /// ...or, while the source's rate is not measured yet, for this long.
    pub slow_unmeasured: Duration,
    /// A request without progress for this long fails (its ids go elsewhere).
    pub stall_timeout: Duration,
    /// End game: once no work is left to hand out, the ids of a request at a source
    /// are also queued at idle sources that score this many times higher (0 = off).
    pub endgame_ratio: f64,
    /// Consecutive failures after which a source is dropped for the rest of the fetch.
    pub max_source_errors: u32,
    /// Pause after a failed request, doubled for each consecutive failure.
    pub error_backoff: Duration,
    /// Ask each non-fallback source `Have` before fetching (drops candidates it lacks,
    /// learns its load); worth it when the knowledge base may be stale.
    pub probe_have: bool,
    /// Bound of the `Have` probe.
    pub probe_timeout: Duration,
    /// How often the coordinator checks for slow requests when no event arrives.
    pub tick: Duration,
    /// The fallback shares the work: it is queued every id with the other candidates
    /// and steals from slower sources like they do, instead of getting only what no
    /// other source may serve. For when the source's uplink has room besides the
    /// neighbours' (their rates add up); off by default (the source is spared).
    pub fallback_shares: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            max_inflight_per_source: 4,
            max_inflight_total: 16,
            max_batch_bytes: wire::DEFAULT_BATCH_BYTES as u32,
            request_time: Duration::from_millis(250),
            min_request_bytes: 256 << 10,
            max_request_bytes: 8 << 20,
            max_request_ids: 4096,
            split: 4,
            prior_rate_bps: super::rank::DEFAULT_PRIOR_RATE,
            min_rate_bps: (256 << 10) as f64,
            prior_latency: super::rank::DEFAULT_PRIOR_LATENCY,
            prior_chunk_bytes: (16 << 10) as f64,
            slow_factor: 4.0,
            slow_min: Duration::from_millis(250),
            slow_unmeasured: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(30),
            endgame_ratio: 2.0,
            max_source_errors: 3,
            error_backoff: Duration::from_millis(100),
            probe_have: false,
            fallback_shares: false,
            probe_timeout: Duration::from_secs(3),
            tick: Duration::from_millis(20),
        }
    }
}

/// What one source did during a fetch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceReport {
    /// The migration source (tried last).
    pub fallback: bool,
    /// Fetch requests sent to it.
    pub requests: u64,
    /// Ids asked of it, over all requests (an id asked again after a cut counts again).
    pub requested_ids: u64,
    /// Chunks it delivered first, verified and stored.
    pub chunks: u64,
    /// Frame bytes received from it (stored, duplicate and corrupt).
    pub wire_bytes: u64,
    /// Decoded bytes of the chunks it delivered first.
    pub raw_bytes: u64,
    /// Time it had at least one request of ours in flight.
    pub busy_micros: u64,
    /// Failed requests (cut, refused, stalled, protocol violations) plus corrupt chunks.
    pub errors: u64,
    /// Chunks whose bytes did not verify (never stored; fetched elsewhere).
    pub corrupt: u64,
    /// Ids it said it lacks (or left out of a stream).
    pub missing: u64,
    /// Requests it was too slow with (re-issued elsewhere).
    pub slow: u64,
    /// Chunks it delivered after another source had (first arrival wins).
    pub duplicates: u64,
    /// Dropped for the rest of the fetch after repeated failures.
    pub dropped: bool,
    /// The last error, with its chain.
    pub last_error: Option<String>,
    /// What the fetcher knows of it at the end.
    pub stats: SourceStats,
}

/// What a fetch did; serializable for the CLI's `--json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FetchReport {
    /// Distinct ids wanted.
    pub wanted: u64,
    /// Of those, already in the local store (not fetched).
    pub already_local: u64,
    /// Chunks fetched, verified and stored.
    pub fetched: u64,
    /// Their decoded bytes.
    pub raw_bytes: u64,
    /// Frame bytes received, duplicates and corrupt chunks included.
    pub wire_bytes: u64,
    /// Chunks received after another copy had been stored.
    pub duplicate_chunks: u64,
    pub duplicate_bytes: u64,
    /// Requests re-issued elsewhere for slowness.
    pub hedged_requests: u64,
    /// Wall time of the fetch.
    pub elapsed_micros: u64,
    /// Per source, by name.
    pub sources: BTreeMap<String, SourceReport>,
}

/// What one fetch has done so far, readable while it runs
/// ([`Fetcher::fetch_observed`]): lets a caller answer before the fetch ends.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<ProgressState>,
}

/// A fetch's figures when [`Progress::get`] was called.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressState {
    /// Distinct ids not stored yet.
    pub remaining: u64,
    /// Chunks stored, their decoded bytes, and frame bytes received.
    pub fetched: u64,
    pub raw_bytes: u64,
    pub wire_bytes: u64,
    /// Per source: (chunks it delivered first, frame bytes received from it).
    pub sources: BTreeMap<String, (u64, u64)>,
}

impl Progress {
    /// The figures now.
    pub fn get(&self) -> ProgressState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut ProgressState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Counters over every fetch of one [`Fetcher`], those running side by side included.
#[derive(Debug, Default)]
struct Totals {
    /// Ids not stored yet, over the fetches running now.
    remaining: AtomicU64,
    /// Frame bytes and chunks received (stored, duplicate, corrupt), ever.
    wire_bytes: AtomicU64,
    chunks: AtomicU64,
}

/// [`Fetcher::outstanding`]: what is left over every fetch running now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Outstanding {
    /// Distinct ids not stored yet (an id wanted by two running fetches counts twice).
    pub remaining: u64,
    /// Frame bytes received by this fetcher so far (monotonic: rates come from its
    /// differences).
    pub wire_bytes: u64,
    /// Mean frame bytes per chunk received so far (None before the first chunk).
    pub mean_chunk: Option<f64>,
}

impl Outstanding {
    /// The bytes left, estimated at the mean chunk size (or `prior` per chunk).
    pub fn remaining_bytes(&self, prior: f64) -> f64 {
        self.remaining as f64 * self.mean_chunk.unwrap_or(prior)
    }
}

/// Fetches chunks from several sources into a local store. Keeps what it measured of
/// each source across fetches (e.g. across pre-copy rounds).
pub struct Fetcher<S: ChunkStore> {
    store: Arc<S>,
    fallback: String,
    peers: BTreeMap<String, Arc<dyn ChunkPeer>>,
    policy: Arc<dyn RankPolicy>,
    cfg: FetchConfig,
    stats: Mutex<HashMap<String, SourceStats>>,
    /// What is believed of sources not measured yet (e.g. the knowledge base's link
    /// figures): used instead of the mean prior until they are measured.
    priors: Mutex<HashMap<String, SourceStats>>,
    totals: Arc<Totals>,
}

impl<S: ChunkStore> std::fmt::Debug for Fetcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("fallback", &self.fallback)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .field("policy", &self.policy)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl<S: ChunkStore> Fetcher<S> {
    /// A fetcher into `store` whose fallback (the migration source, which holds every
    /// chunk) is `fallback`, reached through `peer`.
    pub fn new(store: Arc<S>, fallback: impl Into<String>, peer: Arc<dyn ChunkPeer>) -> Self {
        let fallback = fallback.into();
        let mut peers = BTreeMap::new();
        peers.insert(fallback.clone(), peer);
        Fetcher {
            store,
            fallback,
            peers,
            policy: Arc::new(ThroughputRank::default()),
            cfg: FetchConfig::default(),
            stats: Mutex::new(HashMap::new()),
            priors: Mutex::new(HashMap::new()),
            totals: Arc::new(Totals::default()),
        }
    }

    /// What is left over every fetch running now, and what was received so far.
    pub fn outstanding(&self) -> Outstanding {
        let t = &self.totals;
        let chunks = t.chunks.load(Ordering::Relaxed);
        let wire_bytes = t.wire_bytes.load(Ordering::Relaxed);
        Outstanding {
            remaining: t.remaining.load(Ordering::Relaxed),
            wire_bytes,
            mean_chunk: (chunks > 0).then(|| wire_bytes as f64 / chunks as f64),
        }
    }

    /// Sets what is believed of sources before they are measured (throughput and
    /// latency, e.g. from the knowledge base's link figures), replacing earlier
    /// priors. A source measured by this fetcher ranks by its measurements; one with
    /// neither measurements nor a prior by the mean of the measured sources.
    pub fn set_priors(&self, priors: impl IntoIterator<Item = (String, SourceStats)>) {
        *self.priors.lock().unwrap_or_else(|p| p.into_inner()) = priors.into_iter().collect();
    }

    /// [`Fetcher::set_priors`], builder style.
    pub fn with_priors(self, priors: impl IntoIterator<Item = (String, SourceStats)>) -> Self {
        self.set_priors(priors);
        self
    }

    /// Adds (or replaces) a source.
    pub fn add_source(&mut self, name: impl Into<String>, peer: Arc<dyn ChunkPeer>) -> &mut Self {
        self.peers.insert(name.into(), peer);
        self
    }

    /// Adds a source (builder style).
    pub fn with_source(mut self, name: impl Into<String>, peer: Arc<dyn ChunkPeer>) -> Self {
        self.add_source(name, peer);
        self
    }

    /// Replaces the ranking policy.
    pub fn with_policy(mut self, policy: Arc<dyn RankPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Replaces the configuration.
    pub fn with_config(mut self, cfg: FetchConfig) -> Self {
        self.cfg = cfg;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &FetchConfig {
        &self.cfg
    }

    /// What the fetcher has measured of each source so far.
    pub fn stats(&self) -> BTreeMap<String, SourceStats> {
        let m = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Fetches every wanted chunk the local store lacks. Succeeds only when all of them
    /// are stored (verified); otherwise [`ChunkError::Incomplete`] lists the ids no
    /// source could deliver, with the report. Dropping the future cancels the fetch;
    /// a later fetch of the same wants only asks for what was not stored yet.
    pub async fn fetch(&self, wants: &[Want]) -> Result<FetchReport, ChunkError> {
        self.fetch_observed(wants, Arc::new(Progress::default()))
            .await
    }

    /// [`Fetcher::fetch`], keeping `progress` up to date while it runs.
    pub async fn fetch_observed(
        &self,
        wants: &[Want],
        progress: Arc<Progress>,
    ) -> Result<FetchReport, ChunkError> {
        let t0 = Instant::now();
        let mut run = self.plan(wants, progress)?;
        let store = self.store.clone();
        let ids = run.shared.ids.clone();
        let local = tokio::task::spawn_blocking(move || store.has_many(&ids))
            .await
            .map_err(|e| ChunkError::Task(e.to_string()))?;
        for (i, have) in local.iter().enumerate() {
            if *have {
                run.items[i].st = St::Done;
                run.shared.done[i].store(true, Ordering::Relaxed);
                run.report.already_local += 1;
            }
        }
        run.remaining = run.items.iter().filter(|it| it.st != St::Done).count();
        run.totals
            .remaining
            .fetch_add(run.remaining as u64, Ordering::Relaxed);
        run.progress.update(|p| p.remaining = run.remaining as u64);
        if self.cfg.probe_have && run.remaining > 0 {
            run.probe().await;
        }
        // Rarest first: ids with fewer candidates are queued first (a stable sort keeps
        // the wanted order within each group, so a server still reads sequentially).
        // What only the source holds then goes out first, and the tail of the fetch is
        // made of ids any idle source can take over.
        let mut order: Vec<u32> = (0..run.items.len() as u32)
            .filter(|&i| run.items[i as usize].st == St::Needed)
            .collect();
        order.sort_by_key(|&i| run.items[i as usize].cands.count_ones());
        for i in order {
            run.needed += 1;
            run.requeue(i, true);
        }
        let result = run.drive().await;
        run.tasks.abort_all();
        let now = Instant::now();
        let mut report = std::mem::take(&mut run.report);
        report.elapsed_micros = t0.elapsed().as_micros() as u64;
        {
            let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            for s in &mut run.srcs {
                s.report.busy_micros = s.busy_at(now).as_micros() as u64;
                s.report.stats = s.stats.clone();
                stats.insert(s.name.clone(), s.stats.clone());
                report
                    .sources
                    .insert(s.name.clone(), std::mem::take(&mut s.report));
            }
        }
        match result {
            Ok(()) if run.remaining == 0 => Ok(report),
            Ok(()) => {
                let missing = run
                    .items
                    .iter()
                    .enumerate()
                    .filter(|(_, it)| it.st != St::Done)
                    .map(|(i, _)| run.shared.ids[i])
                    .collect();
                Err(ChunkError::Incomplete {
                    missing,
                    report: Box::new(report),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Builds the run: sources (fallback first), distinct ids with their candidates.
    fn plan(&self, wants: &[Want], progress: Arc<Progress>) -> Result<Run<S>, ChunkError> {
        let mut src_index: HashMap<&str, usize> = HashMap::new();
        let mut names: Vec<&str> = vec![self.fallback.as_str()];
        src_index.insert(self.fallback.as_str(), 0);
        let mut index: HashMap<Digest, u32> = HashMap::with_capacity(wants.len());
        let mut ids = Vec::with_capacity(wants.len());
        let mut cands: Vec<u64> = Vec::with_capacity(wants.len());
        for w in wants {
            let mut mask = 1u64; // the fallback
            for s in &w.sources {
                let j = match src_index.get(s.as_str()) {
                    Some(j) => *j,
                    None => {
                        let (name, _) = self
                            .peers
                            .get_key_value(s.as_str())
                            .ok_or_else(|| ChunkError::UnknownSource(s.clone()))?;
                        if names.len() == MAX_SOURCES {
                            return Err(ChunkError::TooManySources {
                                count: names.len() + 1,
                                limit: MAX_SOURCES,
                            });
                        }
                        names.push(name.as_str());
                        src_index.insert(name.as_str(), names.len() - 1);
                        names.len() - 1
                    }
                };
                mask |= 1 << j;
            }
            match index.get(&w.id) {
                Some(&i) => cands[i as usize] |= mask,
                None => {
                    index.insert(w.id, ids.len() as u32);
                    ids.push(w.id);
                    cands.push(mask);
                }
            }
        }
        let known = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let priors = self
            .priors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let srcs = names
            .iter()
            .enumerate()
            .map(|(j, name)| {
                let peer = self
                    .peers
                    .get(*name)
                    .cloned()
                    .ok_or_else(|| ChunkError::UnknownSource((*name).to_string()))?;
                Ok(Src {
                    name: (*name).to_string(),
                    peer,
                    bit: 1 << j,
                    queue: VecDeque::new(),
                    inflight: 0,
                    dead: false,
                    cooldown_until: None,
                    consec_errors: 0,
                    busy_since: None,
                    busy_total: Duration::ZERO,
                    sample_bytes: 0,
                    sample_mark: Duration::ZERO,
                    stats: known.get(*name).cloned().unwrap_or_default(),
                    prior: priors.get(*name).cloned().unwrap_or_default(),
                    report: SourceReport {
                        fallback: j == 0,
                        ..Default::default()
                    },
                })
            })
            .collect::<Result<Vec<_>, ChunkError>>()?;
        let items = cands
            .into_iter()
            .map(|c| Item {
                st: St::Needed,
                cands: c,
                lacks: 0,
                slow: 0,
                inflight: 0,
                hedge: false,
            })
            .collect::<Vec<_>>();
        let (tx, rx) = mpsc::channel(256);
        let n = ids.len();
        Ok(Run {
            shared: Arc::new(Shared {
                store: self.store.clone(),
                done: (0..n).map(|_| AtomicBool::new(false)).collect(),
                index,
                ids,
            }),
            items,
            srcs,
            reqs: HashMap::new(),
            next_req: 0,
            tasks: JoinSet::new(),
            tx,
            rx,
            policy: self.policy.clone(),
            cfg: self.cfg.clone(),
            avg_chunk: None,
            needed: 0,
            remaining: 0,
            progress,
            totals: self.totals.clone(),
            report: FetchReport {
                wanted: n as u64,
                ..Default::default()
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Not stored, not requested anywhere.
    Needed,
    /// Requested from the sources in `Item::inflight`.
    InFlight,
    /// Stored.
    Done,
}

#[derive(Debug)]
struct Item {
    st: St,
    /// Sources that may hold it (bit j = source j; bit 0 = the fallback).
    cands: u64,
    /// Sources that lacked it or served it corrupt: never asked again.
    lacks: u64,
    /// Sources that were too slow with it: asked again only if nothing else is left.
    slow: u64,
    /// Sources it is requested from now.
    inflight: u64,
    /// In flight, but another copy is wanted (the request holding it is slow).
    hedge: bool,
}

/// State shared with the request tasks.
struct Shared<S> {
    store: Arc<S>,
    index: HashMap<Digest, u32>,
    ids: Vec<Digest>,
    /// Set by whichever task stores the chunk first.
    done: Vec<AtomicBool>,
}

struct Src {
    name: String,
    peer: Arc<dyn ChunkPeer>,
    bit: u64,
    /// Ids it may serve, in order; stale entries are skipped when taken.
    queue: VecDeque<u32>,
    inflight: usize,
    dead: bool,
    cooldown_until: Option<Instant>,
    consec_errors: u32,
    busy_since: Option<Instant>,
    busy_total: Duration,
    /// Bytes received since the last rate sample, and busy time at that sample.
    sample_bytes: u64,
    sample_mark: Duration,
    stats: SourceStats,
    /// What is believed of it until measured ([`Fetcher::set_priors`]).
    prior: SourceStats,
    report: SourceReport,
}

impl Src {
    fn busy_at(&self, now: Instant) -> Duration {
        self.busy_total
            + self
                .busy_since
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    fn start(&mut self, now: Instant) {
        if self.inflight == 0 {
            self.busy_since = Some(now);
        }
        self.inflight += 1;
    }

    fn stop(&mut self, now: Instant) {
        self.inflight = self.inflight.saturating_sub(1);
        if self.inflight == 0 {
            if let Some(t) = self.busy_since.take() {
                self.busy_total += now.saturating_duration_since(t);
            }
        }
    }

    /// Takes a throughput sample (bytes since the last sample / busy time since) if
    /// the source was busy for at least `min_span` since.
    fn sample_rate(&mut self, now: Instant, min_span: Duration) {
        let busy = self.busy_at(now);
        let span = busy.saturating_sub(self.sample_mark);
        if span >= min_span && !span.is_zero() {
            let sample = self.sample_bytes as f64 / span.as_secs_f64();
            self.stats.rate_bps = Some(ewma(self.stats.rate_bps, sample, 0.3));
            self.sample_bytes = 0;
            self.sample_mark = busy;
        }
    }

    fn cooling(&self, now: Instant) -> bool {
        self.cooldown_until.is_some_and(|t| t > now)
    }
}

struct Req {
    src: usize,
    /// Ids not delivered yet, in request (= want) order.
    pending: BTreeSet<u32>,
    started: Instant,
    last_progress: Instant,
    first_batch: bool,
    hedged: bool,
    abort: AbortHandle,
}

enum Event {
    Progress {
        req: u64,
        src: usize,
        at: Instant,
        /// (id index, frame bytes, raw bytes)
        stored: Vec<(u32, u32, u32)>,
        dups: Vec<(u32, u32)>,
        corrupt: Vec<(u32, u32, String)>,
        missing: Vec<u32>,
        load: Option<Load>,
    },
    End {
        req: u64,
        result: Result<(), ChunkError>,
    },
}

/// Decrements a counter that must not underflow (a bookkeeping bug if it would).
fn dec(n: &mut usize) {
    debug_assert!(*n > 0, "fetch bookkeeping underflow");
    *n = n.saturating_sub(1);
}

/// The error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// One fetch in progress: the coordinator's state.
struct Run<S: ChunkStore> {
    shared: Arc<Shared<S>>,
    items: Vec<Item>,
    srcs: Vec<Src>,
    reqs: HashMap<u64, Req>,
    next_req: u64,
    tasks: JoinSet<()>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    policy: Arc<dyn RankPolicy>,
    cfg: FetchConfig,
    /// Wire bytes per chunk (EWMA over batches).
    avg_chunk: Option<f64>,
    /// Ids waiting for a request: `Needed`, or `InFlight` with `hedge`.
    needed: usize,
    /// Ids not stored yet.
    remaining: usize,
    /// Published figures of this fetch, and the fetcher's over all its fetches.
    progress: Arc<Progress>,
    totals: Arc<Totals>,
    report: FetchReport,
}

impl<S: ChunkStore> Drop for Run<S> {
    /// A fetch that ends (or is dropped) with ids left no longer counts them.
    fn drop(&mut self) {
        self.totals
            .remaining
            .fetch_sub(self.remaining as u64, Ordering::Relaxed);
    }
}

impl<S: ChunkStore> Run<S> {
    fn alive_mask(&self) -> u64 {
        self.srcs
            .iter()
            .filter(|s| !s.dead)
            .fold(0, |m, s| m | s.bit)
    }

    /// Puts item `i` into the queues of the sources that should serve it next: every
    /// usable non-fallback candidate; else the fallback; else (if `relaxed`) sources
    /// that were slow with it. Returns whether any queue got it.
    fn requeue(&mut self, i: u32, relaxed: bool) -> bool {
        let it = &self.items[i as usize];
        let usable = it.cands & !it.lacks & !it.inflight & self.alive_mask();
        let shares = self.cfg.fallback_shares;
        let pick = |m: u64| {
            if shares || m & !1 == 0 {
                m
            } else {
                m & !1
            }
        };
        let mut target = pick(usable & !it.slow);
        if target == 0 && relaxed {
            target = pick(usable);
        }
        for s in &mut self.srcs {
            if target & s.bit != 0 {
                s.queue.push_back(i);
            }
        }
        target != 0
    }

    /// An id's request at `src` ended without storing it: back to the pool if no
    /// other request holds it.
    fn release(&mut self, i: u32, bit: u64) {
        let it = &mut self.items[i as usize];
        it.inflight &= !bit;
        if it.st != St::InFlight || it.inflight != 0 {
            return;
        }
        if it.hedge {
            it.hedge = false;
            dec(&mut self.needed);
        }
        it.st = St::Needed;
        self.needed += 1;
        self.requeue(i, true);
    }

    fn mark_done(&mut self, i: u32, bit: u64) -> bool {
        let it = &mut self.items[i as usize];
        it.inflight &= !bit;
        let others = it.inflight != 0;
        match it.st {
            St::Done => return false,
            St::Needed => dec(&mut self.needed),
            St::InFlight => {
                if it.hedge {
                    it.hedge = false;
                    dec(&mut self.needed);
                }
            }
        }
        it.st = St::Done;
        dec(&mut self.remaining);
        self.totals.remaining.fetch_sub(1, Ordering::Relaxed);
        others
    }

    /// Takes up to `n` ids from source `j`'s queue.
    fn take_ids(&mut self, j: usize, n: usize) -> Vec<u32> {
        let bit = self.srcs[j].bit;
        let mut out = Vec::new();
        while out.len() < n {
            let Some(i) = self.srcs[j].queue.pop_front() else {
                break;
            };
            let it = &mut self.items[i as usize];
            if it.lacks & bit != 0 || it.inflight & bit != 0 {
                continue;
            }
            match it.st {
                St::Needed => {
                    it.st = St::InFlight;
                    dec(&mut self.needed);
                }
                St::InFlight if it.hedge => {
                    it.hedge = false;
                    dec(&mut self.needed);
                }
                _ => continue,
            }
            it.inflight |= bit;
            out.push(i);
        }
        out
    }

    /// Mean rate and latency of the measured sources: the neutral prior of the others.
    fn neutral(&self) -> (Option<f64>, Option<f64>) {
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        (
            mean(self.srcs.iter().filter_map(|s| s.stats.rate_bps).collect()),
            mean(
                self.srcs
                    .iter()
                    .filter_map(|s| s.stats.latency_micros)
                    .collect(),
            ),
        )
    }

    fn score(&self, j: usize, neutral: (Option<f64>, Option<f64>)) -> f64 {
        let s = &self.srcs[j];
        let mut stats = s.stats.clone();
        let measured = stats.rate_bps.is_some();
        stats.rate_bps = stats.rate_bps.or(s.prior.rate_bps).or(neutral.0);
        stats.latency_micros = stats
            .latency_micros
            .or(s.prior.latency_micros)
            .or(neutral.1);
        let v = SourceView {
            name: &s.name,
            fallback: j == 0,
            measured,
            stats: &stats,
            inflight: s.inflight,
            errors: s.consec_errors,
        };
        let sc = self.policy.score(&v);
        if sc.is_finite() && sc > 0.0 {
            sc
        } else {
            f64::MIN_POSITIVE
        }
    }

    /// Starts requests, best-ranked sources first, while slots and work remain.
    fn dispatch(&mut self, now: Instant) {
        if self.needed == 0 || self.reqs.len() >= self.cfg.max_inflight_total {
            return;
        }
        let neutral = self.neutral();
        let mut order: Vec<(usize, f64)> = (0..self.srcs.len())
            .filter(|&j| {
                let s = &self.srcs[j];
                !s.dead && !s.cooling(now) && !s.queue.is_empty()
            })
            .map(|j| (j, self.score(j, neutral)))
            .collect();
        if order.is_empty() {
            return;
        }
        order.sort_by(|a, b| b.1.total_cmp(&a.1));
        let best = order[0].1;
        let max_per = self.cfg.max_inflight_per_source.max(1);
        let limits: Vec<usize> = order
            .iter()
            .map(|(_, sc)| ((max_per as f64 * sc / best).round() as usize).clamp(1, max_per))
            .collect();
        let slots: usize = limits.iter().sum();
        let fair = self
            .needed
            .div_ceil((slots * self.cfg.split.max(1)).max(1))
            .max(1);
        let avg = self
            .avg_chunk
            .unwrap_or(self.cfg.prior_chunk_bytes)
            .max(1.0);
        for ((j, _), limit) in order.into_iter().zip(limits) {
            while self.srcs[j].inflight < limit && self.reqs.len() < self.cfg.max_inflight_total {
                let n = self.request_ids(j, fair, avg);
                let ids = self.take_ids(j, n);
                if ids.is_empty() {
                    break;
                }
                self.start_request(j, ids, now);
            }
        }
        self.steal(now, fair, avg, neutral);
    }

    /// Ids for one request to source `j`: about `request_time` at its rate, within
    /// the byte and id bounds, at most a fair share of the work left.
    fn request_ids(&self, j: usize, fair: usize, avg: f64) -> usize {
        let rate = self.srcs[j]
            .stats
            .rate_bps
            .unwrap_or(self.cfg.prior_rate_bps);
        let bytes = (rate * self.cfg.request_time.as_secs_f64()).clamp(
            self.cfg.min_request_bytes as f64,
            self.cfg.max_request_bytes.max(self.cfg.min_request_bytes) as f64,
        );
        let upper = fair.min(self.cfg.max_request_ids.clamp(1, wire::MAX_FETCH_IDS));
        ((bytes / avg) as usize).clamp(1, upper.max(1))
    }

    /// Work stealing: an idle source with nothing queued takes queued ids it may
    /// serve from sources that score `endgame_ratio` times lower. The fallback only
    /// steals from sources the slowness rule has already caught (tried last: it
    /// steps in for failing peers, not for merely slower ones).
    fn steal(&mut self, now: Instant, fair: usize, avg: f64, neutral: (Option<f64>, Option<f64>)) {
        if self.cfg.endgame_ratio <= 0.0 || self.needed == 0 {
            return;
        }
        let alive = self.alive_mask();
        // Peers first, the fallback last.
        for k in (1..self.srcs.len()).chain([0]) {
            if self.reqs.len() >= self.cfg.max_inflight_total || self.needed == 0 {
                return;
            }
            let sk = &self.srcs[k];
            if sk.dead || sk.cooling(now) || sk.inflight > 0 || !sk.queue.is_empty() {
                continue;
            }
            let bit = sk.bit;
            let score_k = self.score(k, neutral);
            let mut victims: Vec<(usize, f64)> = (0..self.srcs.len())
                .filter(|&j| j != k && !self.srcs[j].queue.is_empty())
                .filter(|&j| k != 0 || self.cfg.fallback_shares || self.srcs[j].report.slow > 0)
                .map(|j| (j, self.score(j, neutral)))
                .filter(|(_, sj)| score_k >= self.cfg.endgame_ratio * sj)
                .collect();
            victims.sort_by(|a, b| a.1.total_cmp(&b.1));
            let n = self.request_ids(k, fair, avg);
            let mut moved = 0;
            for (j, _) in victims {
                let mut keep = VecDeque::new();
                while moved < n {
                    let Some(i) = self.srcs[j].queue.pop_front() else {
                        break;
                    };
                    let it = &self.items[i as usize];
                    let waiting = it.st == St::Needed || (it.st == St::InFlight && it.hedge);
                    if !waiting {
                        continue; // stale entry
                    }
                    if it.cands & !it.lacks & !it.inflight & alive & bit != 0 {
                        self.srcs[k].queue.push_back(i);
                        moved += 1;
                    } else {
                        keep.push_back(i);
                    }
                }
                while let Some(i) = keep.pop_back() {
                    self.srcs[j].queue.push_front(i);
                }
                if moved >= n {
                    break;
                }
            }
            if moved > 0 {
                let ids = self.take_ids(k, n);
                if !ids.is_empty() {
                    debug!(source = %self.srcs[k].name, ids = ids.len(), "idle source takes work of slower ones");
                    self.start_request(k, ids, now);
                }
            }
        }
    }

    fn start_request(&mut self, j: usize, idx: Vec<u32>, now: Instant) {
        let req = self.next_req;
        self.next_req += 1;
        let s = &mut self.srcs[j];
        s.start(now);
        s.report.requests += 1;
        s.report.requested_ids += idx.len() as u64;
        let abort = self.tasks.spawn(run_request(
            self.shared.clone(),
            req,
            j,
            s.name.clone(),
            s.peer.clone(),
            idx.clone(),
            self.cfg.max_batch_bytes,
            self.tx.clone(),
        ));
        self.reqs.insert(
            req,
            Req {
                src: j,
                pending: idx.into_iter().collect(),
                started: now,
                last_progress: now,
                first_batch: false,
                hedged: false,
                abort,
            },
        );
    }

    /// A source failed (request error or corrupt chunks): count, back off, maybe drop.
    fn source_failed(&mut self, j: usize, err: String, now: Instant, backoff: bool, count: u64) {
        let s = &mut self.srcs[j];
        s.report.errors += count;
        s.consec_errors += 1;
        warn!(source = %s.name, errors = s.consec_errors, "chunk source failed: {err}");
        s.report.last_error = Some(err);
        if backoff {
            let k = s.consec_errors.saturating_sub(1).min(8);
            s.cooldown_until = Some(now + self.cfg.error_backoff * (1u32 << k));
        }
        if s.consec_errors >= self.cfg.max_source_errors && !s.dead {
            s.dead = true;
            s.report.dropped = true;
            warn!(source = %s.name, "chunk source dropped for the rest of this fetch");
            let queue = std::mem::take(&mut s.queue);
            for i in queue {
                if self.items[i as usize].st == St::Needed {
                    self.requeue(i, true);
                }
            }
        }
    }

    /// Ends request `req` without waiting for its task (loser of a hedge, stalled).
    fn cancel(&mut self, req: u64, now: Instant) -> Option<Req> {
        let r = self.reqs.remove(&req)?;
        r.abort.abort();
        self.srcs[r.src].stop(now);
        Some(r)
    }

    /// Cancels requests whose every remaining id was stored from elsewhere.
    fn cancel_losers(&mut self, now: Instant) {
        let losers: Vec<u64> = self
            .reqs
            .iter()
            .filter(|(_, r)| {
                !r.pending.is_empty()
                    && r.pending
                        .iter()
                        .all(|&i| self.items[i as usize].st == St::Done)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in losers {
            if let Some(r) = self.cancel(k, now) {
                let bit = self.srcs[r.src].bit;
                for i in r.pending {
                    self.items[i as usize].inflight &= !bit;
                }
                debug!(source = %self.srcs[r.src].name, "cancelled a request that lost every race");
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Result<(), ChunkError> {
        match ev {
            Event::Progress {
                req,
                src,
                at,
                stored,
                dups,
                corrupt,
                missing,
                load,
            } => {
                let now = Instant::now();
                let bit = self.srcs[src].bit;
                let mut bytes = 0u64;
                let mut raced = false;
                let nchunks = stored.len() + dups.len() + corrupt.len();
                for &(i, wire_len, raw) in &stored {
                    bytes += u64::from(wire_len);
                    let s = &mut self.srcs[src].report;
                    s.chunks += 1;
                    s.raw_bytes += u64::from(raw);
                    self.report.fetched += 1;
                    self.report.raw_bytes += u64::from(raw);
                    raced |= self.mark_done(i, bit);
                }
                for &(i, wire_len) in &dups {
                    bytes += u64::from(wire_len);
                    self.srcs[src].report.duplicates += 1;
                    self.report.duplicate_chunks += 1;
                    self.report.duplicate_bytes += u64::from(wire_len);
                    raced |= self.mark_done(i, bit);
                }
                let mut first_err = None;
                let mut corrupt_ids = Vec::with_capacity(corrupt.len());
                for (i, wire_len, msg) in corrupt {
                    bytes += u64::from(wire_len);
                    self.srcs[src].report.corrupt += 1;
                    self.items[i as usize].lacks |= bit;
                    self.release(i, bit);
                    corrupt_ids.push(i);
                    first_err.get_or_insert(msg);
                }
                for &i in &missing {
                    self.srcs[src].report.missing += 1;
                    self.items[i as usize].lacks |= bit;
                    self.release(i, bit);
                }
                self.srcs[src].report.wire_bytes += bytes;
                self.report.wire_bytes += bytes;
                self.totals.wire_bytes.fetch_add(bytes, Ordering::Relaxed);
                self.totals
                    .chunks
                    .fetch_add(nchunks as u64, Ordering::Relaxed);
                {
                    let (name, first) = (&self.srcs[src].name, stored.len() as u64);
                    let raw: u64 = stored.iter().map(|&(_, _, r)| u64::from(r)).sum();
                    let (remaining, fetched) = (self.remaining as u64, self.report.fetched);
                    let wire = self.report.wire_bytes;
                    self.progress.update(|p| {
                        p.remaining = remaining;
                        p.fetched = fetched;
                        p.raw_bytes += raw;
                        p.wire_bytes = wire;
                        let e = p.sources.entry(name.clone()).or_default();
                        e.0 += first;
                        e.1 += bytes;
                    });
                }
                if nchunks > 0 {
                    let per = bytes as f64 / nchunks as f64;
                    self.avg_chunk = Some(ewma(self.avg_chunk, per, 0.2));
                }
                if let Some(r) = self.reqs.get_mut(&req) {
                    for (i, _, _) in &stored {
                        r.pending.remove(i);
                    }
                    for (i, _) in &dups {
                        r.pending.remove(i);
                    }
                    for i in missing.iter().chain(&corrupt_ids) {
                        r.pending.remove(i);
                    }
                    r.last_progress = at;
                    if !r.first_batch {
                        r.first_batch = true;
                        let lat = at.saturating_duration_since(r.started).as_micros() as f64;
                        let s = &mut self.srcs[src].stats;
                        s.latency_micros = Some(ewma(s.latency_micros, lat, 0.3));
                    }
                }
                let s = &mut self.srcs[src];
                if let Some(l) = load {
                    s.stats.load = f64::from(l.fetch_streams.saturating_sub(s.inflight as u32));
                    s.stats.served_bps = l.served_bytes_per_sec;
                }
                s.sample_bytes += bytes;
                s.sample_rate(now, Duration::from_millis(20));
                if let Some(msg) = first_err {
                    let n = corrupt_ids.len() as u64;
                    self.source_failed(src, msg, now, false, n);
                } else if nchunks > 0 {
                    self.srcs[src].consec_errors = 0;
                }
                if raced {
                    self.cancel_losers(now);
                }
                Ok(())
            }
            Event::End { req, result } => {
                let now = Instant::now();
                let Some(r) = self.reqs.remove(&req) else {
                    return Ok(());
                };
                let j = r.src;
                let bit = self.srcs[j].bit;
                self.srcs[j].stop(now);
                let mut pending = Vec::with_capacity(r.pending.len());
                for i in r.pending {
                    if self.items[i as usize].st == St::Done {
                        self.items[i as usize].inflight &= !bit;
                    } else {
                        pending.push(i);
                    }
                }
                match result {
                    Ok(()) if pending.is_empty() => Ok(()),
                    Ok(()) => {
                        let n = pending.len();
                        for i in pending {
                            self.srcs[j].report.missing += 1;
                            self.items[i as usize].lacks |= bit;
                            self.release(i, bit);
                        }
                        self.source_failed(
                            j,
                            format!("its stream ended without {n} of the ids asked"),
                            now,
                            false,
                            1,
                        );
                        Ok(())
                    }
                    Err(e) if e.is_fatal() => Err(e),
                    Err(e) => {
                        for i in pending {
                            self.release(i, bit);
                        }
                        self.source_failed(j, chain(&e), now, true, 1);
                        Ok(())
                    }
                }
            }
        }
    }

    /// Hedges slow requests and fails stalled ones.
    fn check_slow(&mut self, now: Instant) {
        let avg = self.avg_chunk.unwrap_or(self.cfg.prior_chunk_bytes);
        let mut hedge = Vec::new();
        let mut stalled = Vec::new();
        for (&k, r) in &self.reqs {
            let since = now.saturating_duration_since(r.last_progress);
            if since > self.cfg.stall_timeout {
                stalled.push(k);
                continue;
            }
            if r.hedged {
                continue;
            }
            let s = &self.srcs[r.src];
            let limit = match s.stats.rate_bps {
                None => self.cfg.slow_unmeasured.max(self.cfg.slow_min),
                Some(rate) => {
                    let per_stream =
                        (rate.max(self.cfg.min_rate_bps) / s.inflight.max(1) as f64).max(1.0);
                    let lat = s
                        .stats
                        .latency_micros
                        .map(|us| us / 1e6)
                        .unwrap_or(self.cfg.prior_latency.as_secs_f64());
                    let batch = (r.pending.len() as f64 * avg).min(self.cfg.max_batch_bytes as f64);
                    let expected = lat + batch / per_stream;
                    Duration::from_secs_f64((self.cfg.slow_factor * expected).min(3600.0))
                        .max(self.cfg.slow_min)
                }
            };
            if since > limit {
                hedge.push(k);
            }
        }
        // End game: nothing left to hand out; idle sources much better than a busy
        // one take a copy of its remaining ids.
        if self.needed == 0 && self.cfg.endgame_ratio > 0.0 {
            let neutral = self.neutral();
            let idle_best = (0..self.srcs.len())
                .filter(|&j| {
                    let s = &self.srcs[j];
                    !s.dead && !s.cooling(now) && s.inflight == 0
                })
                .map(|j| self.score(j, neutral))
                .fold(0.0f64, f64::max);
            if idle_best > 0.0 {
                for (&k, r) in &self.reqs {
                    if !r.hedged
                        && !hedge.contains(&k)
                        && idle_best >= self.cfg.endgame_ratio * self.score(r.src, neutral)
                    {
                        hedge.push(k);
                    }
                }
            }
        }
        for k in stalled {
            if let Some(r) = self.cancel(k, now) {
                let bit = self.srcs[r.src].bit;
                let secs = now.saturating_duration_since(r.last_progress).as_secs_f64();
                for i in r.pending {
                    self.release(i, bit);
                }
                let e = ChunkError::Stalled {
                    peer: self.srcs[r.src].name.clone(),
                    secs,
                };
                self.source_failed(r.src, e.to_string(), now, true, 1);
            }
        }
        for k in hedge {
            let Some(r) = self.reqs.get_mut(&k) else {
                continue;
            };
            r.hedged = true;
            let j = r.src;
            let bit = self.srcs[j].bit;
            let pending: Vec<u32> = r.pending.iter().copied().collect();
            let mut moved = 0;
            for i in pending {
                let alive = self.alive_mask();
                let it = &mut self.items[i as usize];
                if it.st != St::InFlight || it.hedge {
                    continue;
                }
                it.slow |= bit;
                let elsewhere = it.cands & !it.lacks & !it.slow & !it.inflight & alive;
                if elsewhere == 0 {
                    continue;
                }
                it.hedge = true;
                self.needed += 1;
                self.requeue(i, false);
                moved += 1;
            }
            // What it delivered over the time it was busy, however little.
            self.srcs[j].sample_rate(now, Duration::from_millis(20));
            if moved > 0 {
                self.srcs[j].report.slow += 1;
                self.report.hedged_requests += 1;
                debug!(source = %self.srcs[j].name, ids = moved, "slow request: re-issued elsewhere");
            }
        }
    }

    /// Asks every non-fallback source which of its candidate ids it really holds.
    async fn probe(&mut self) {
        let mut calls = Vec::new();
        for j in 1..self.srcs.len() {
            let bit = self.srcs[j].bit;
            let idx: Vec<u32> = (0..self.items.len() as u32)
                .filter(|&i| {
                    let it = &self.items[i as usize];
                    it.st == St::Needed && it.cands & bit != 0
                })
                .collect();
            if idx.is_empty() {
                continue;
            }
            let ids = idx.iter().map(|&i| self.shared.ids[i as usize]).collect();
            let call = tokio::time::timeout(self.cfg.probe_timeout, self.srcs[j].peer.have(ids));
            calls.push(async move { (j, idx, call.await) });
        }
        let results = futures::future::join_all(calls).await;
        let now = Instant::now();
        for (j, idx, res) in results {
            let bit = self.srcs[j].bit;
            match res {
                Ok(Ok((bits, load))) => {
                    for (i, has) in idx.iter().zip(bits) {
                        if !has {
                            self.items[*i as usize].cands &= !bit;
                            self.srcs[j].report.missing += 1;
                        }
                    }
                    if let Some(l) = load {
                        self.srcs[j].stats.load = f64::from(l.fetch_streams);
                        self.srcs[j].stats.served_bps = l.served_bytes_per_sec;
                    }
                }
                Ok(Err(e)) => self.source_failed(j, chain(&e), now, true, 1),
                Err(_) => self.source_failed(j, "have probe timed out".into(), now, true, 1),
            }
        }
    }

    /// Runs until every id is stored, or nothing more can be done.
    async fn drive(&mut self) -> Result<(), ChunkError> {
        loop {
            while self.tasks.try_join_next().is_some() {}
            let now = Instant::now();
            self.check_slow(now);
            self.dispatch(now);
            if self.remaining == 0 {
                return Ok(());
            }
            if self.reqs.is_empty() {
                // Nothing in flight: wait for a source to cool down, or give up.
                let wake = self
                    .srcs
                    .iter()
                    .filter(|s| !s.dead && !s.queue.is_empty())
                    .filter_map(|s| s.cooldown_until.filter(|t| *t > now))
                    .min();
                match wake {
                    Some(t) => {
                        tokio::time::sleep_until(t.into()).await;
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            tokio::select! {
                ev = self.rx.recv() => {
                    if let Some(ev) = ev {
                        self.on_event(ev)?;
                        // Drain what else is ready before scheduling again.
                        while let Ok(ev) = self.rx.try_recv() {
                            self.on_event(ev)?;
                        }
                    }
                }
                _ = tokio::time::sleep(self.cfg.tick) => {}
            }
        }
    }
}

type Verified = (
    Vec<(u32, u32, u32)>,
    Vec<(u32, u32)>,
    Vec<(u32, u32, String)>,
);

/// Verifies and stores a batch's chunks (blocking thread). The first copy of an id
/// stored wins; later copies are duplicates.
fn verify_store<S: ChunkStore>(
    shared: &Shared<S>,
    chunks: Vec<(u32, WireChunk)>,
) -> (Verified, Option<ChunkError>) {
    let (mut stored, mut dups, mut corrupt) = (Vec::new(), Vec::new(), Vec::new());
    let mut todo = Vec::with_capacity(chunks.len());
    for (i, c) in chunks {
        if shared.done[i as usize].load(Ordering::Acquire) {
            dups.push((i, c.frame.len() as u32));
        } else {
            todo.push((i, c));
        }
    }
    let items: Vec<(Digest, &[u8], u32)> = todo
        .iter()
        .map(|(_, c)| (c.id, &c.frame[..], c.raw_len))
        .collect();
    let results = shared.store.put_verified_many(&items);
    for ((i, c), r) in todo.iter().zip(results) {
        let (i, wire_len) = (*i, c.frame.len() as u32);
        match r {
            Ok(()) => {
                if shared.done[i as usize].swap(true, Ordering::AcqRel) {
                    dups.push((i, wire_len));
                } else {
                    stored.push((i, wire_len, c.raw_len));
                }
            }
            Err(e) if e.is_corrupt() => corrupt.push((i, wire_len, chain(&e))),
            Err(e) => return ((stored, dups, corrupt), Some(e)),
        }
    }
    ((stored, dups, corrupt), None)
}

/// One request: reads the peer's batches, verifies and stores them, reports to the
/// coordinator. Aborting the task drops the stream, which cancels the peer's work.
#[allow(clippy::too_many_arguments)]
async fn run_request<S: ChunkStore>(
    shared: Arc<Shared<S>>,
    req: u64,
    src: usize,
    name: String,
    peer: Arc<dyn ChunkPeer>,
    idx: Vec<u32>,
    max_batch: u32,
    tx: mpsc::Sender<Event>,
) {
    let ids = idx.iter().map(|&i| shared.ids[i as usize]).collect();
    let mut asked: HashSet<u32> = idx.into_iter().collect();
    let result = async {
        let mut stream = peer.fetch(ids, max_batch).await?;
        while let Some(batch) = stream.next().await {
            let arrived = Instant::now();
            let batch = batch?;
            let mut take = |id: &Digest| -> Result<u32, ChunkError> {
                shared
                    .index
                    .get(id)
                    .copied()
                    .filter(|i| asked.remove(i))
                    .ok_or_else(|| ChunkError::Protocol {
                        peer: name.clone(),
                        detail: format!("sent {id}, which was not asked for (or twice)"),
                    })
            };
            let mut chunks = Vec::with_capacity(batch.chunks.len());
            let mut missing = Vec::with_capacity(batch.missing.len());
            for c in batch.chunks {
                chunks.push((take(&c.id)?, c));
            }
            for id in &batch.missing {
                missing.push(take(id)?);
            }
            let sh = shared.clone();
            let ((stored, dups, corrupt), fatal) =
                tokio::task::spawn_blocking(move || verify_store(&sh, chunks))
                    .await
                    .map_err(|e| ChunkError::Task(e.to_string()))?;
            let ev = Event::Progress {
                req,
                src,
                at: arrived,
                stored,
                dups,
                corrupt,
                missing,
                load: batch.load,
            };
            if tx.send(ev).await.is_err() {
                return Ok(());
            }
            if let Some(e) = fatal {
                return Err(e);
            }
        }
        Ok(())
    }
    .await;
    let _ = tx.send(Event::End { req, result }).await;
}
