//! From a knowledge-base answer to the fetcher's candidate lists: for every wanted
//! chunk, the hosts that may serve it, best first, with the score of each host and
//! why. The migration source is never listed (the fetcher always has it, as its
//! fallback, tried last), nor the destination itself.
//!
//! Score of host `h` (higher is better), after the issue's policy:
//!
//! ```text
//! rate      = R / (latency + R / throughput)      link h <-> destination, R = 1 MiB
//!                                                 (priors where nothing is measured)
//! load      = 1 / (1 + h's reported load)
//! freshness = 1 while now - as_of <= window, else window / (now - as_of);
//!             h is left out once now - as_of > dead_after x window
//! affinity  = same_container (a snapshot of the same container on h; newer better)
//!           | same_service   (a snapshot of another container of the same service)
//!           | 1
//! score     = rate x load x freshness x affinity
//! ```
//!
//! The affinity of a snapshot decays with its age `a`: the weight `w` becomes
//! `1 + (w - 1) * h / (h + a)` with `h` the half life, so a fresh same-container
//! snapshot weighs `same_container` and an old one tends to 1. The fetcher ranks by
//! its own measurements once it has them; these scores order the candidates and seed
//! its priors.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xfer_store::Digest;

use crate::clock::Timestamp;
use crate::model::{HoldersAnswer, HostFacts, HostName, Link, Snapshot, Subject};

/// Tuning of [`rank_candidates`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CandidatePolicy {
    /// Size of the reference request the link rate is computed for.
    pub reference_bytes: f64,
    /// Throughput assumed when no link figure is known (bytes/s).
    pub prior_rate_bps: f64,
    /// Latency assumed when no link figure is known.
    pub prior_latency: Duration,
    /// Weight of a host holding a fresh snapshot of the same container.
    pub same_container: f64,
    /// Weight of a host holding a fresh snapshot of the same service.
    pub same_service: f64,
    /// Age at which a snapshot's weight is halfway back to 1.
    pub snapshot_half_life: Duration,
    /// Hosts whose information is older than this many windows are left out.
    pub dead_after: f64,
    /// Candidates kept per chunk.
    pub per_chunk: usize,
    /// Distinct sources kept overall (the fetcher takes 64 with the fallback).
    pub max_sources: usize,
}

impl Default for CandidatePolicy {
    fn default() -> Self {
        CandidatePolicy {
            reference_bytes: (1 << 20) as f64,
            prior_rate_bps: (32 << 20) as f64,
            prior_latency: Duration::from_millis(5),
            same_container: 2.0,
            same_service: 1.3,
            snapshot_half_life: Duration::from_secs(600),
            dead_after: 3.0,
            per_chunk: 4,
            max_sources: 63,
        }
    }
}

/// What the container being moved is, for snapshot affinity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moving {
    pub container: Option<String>,
    /// Its service: the image digest.
    pub service: Option<String>,
    /// The GUIDs of its volumes: a snapshot of one of them weighs as the same
    /// container.
    pub volumes: Vec<String>,
}

/// How a host was scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostScore {
    pub host: HostName,
    pub score: f64,
    /// Effective rate of the reference request over the link, bytes/s.
    pub rate_bps: f64,
    /// Whether `rate_bps` comes from a measured link (else priors).
    pub measured_link: bool,
    pub load: f64,
    /// How old the knowledge base's information about the host is.
    pub age: Duration,
    pub freshness: f64,
    pub affinity: f64,
    /// A short human-readable reason, for the fetcher's decision log.
    pub why: String,
}

/// Ranked candidates for a fetch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidates {
    /// Per wanted digest (same order): candidate hosts, best first.
    pub per_chunk: Vec<Vec<HostName>>,
    /// Every host listed, best first, with its score.
    pub hosts: Vec<HostScore>,
    /// Hosts the answer named that were left out, with why.
    pub excluded: BTreeMap<HostName, String>,
}

fn link_rate(p: &CandidatePolicy, link: Option<&Link>) -> (f64, bool) {
    let (rate, lat, measured) = match link {
        Some(l) if l.throughput_bps > 0.0 => (l.throughput_bps, l.latency_micros / 1e6, true),
        _ => (p.prior_rate_bps, p.prior_latency.as_secs_f64(), false),
    };
    let t = lat.max(0.0) + p.reference_bytes / rate.max(1.0);
    (p.reference_bytes / t.max(1e-9), measured)
}

fn snapshot_weight(p: &CandidatePolicy, w: f64, now: Timestamp, taken: Timestamp) -> f64 {
    let age = now.saturating_since(taken).as_secs_f64();
    let hl = p.snapshot_half_life.as_secs_f64().max(1e-3);
    1.0 + (w - 1.0) * hl / (hl + age)
}

fn affinity(
    p: &CandidatePolicy,
    moving: &Moving,
    snaps: &[&Snapshot],
    now: Timestamp,
) -> (f64, String) {
    let mut best = (1.0, String::new());
    for s in snaps {
        let (w, kind) = match (&s.subject, &moving.container) {
            (Subject::Container(c), Some(m)) if c == m => (p.same_container, "same container"),
            (Subject::Volume(g), _) if moving.volumes.contains(g) => {
                (p.same_container, "same container (volume)")
            }
            _ if moving.service.is_some() && s.service == moving.service => {
                (p.same_service, "same service")
            }
            _ => continue,
        };
        let v = snapshot_weight(p, w, now, s.taken);
        if v > best.0 {
            let age = now.saturating_since(s.taken).as_secs();
            best = (v, format!("{kind} snapshot {age}s old"));
        }
    }
    best
}

/// Ranks the holders in `answer` (for `wanted`, same order) as candidate sources of a
/// fetch into `destination` from `source`.
///
/// * `dest_links`: the destination's own measurements of its links (preferred over
///   what each host reported of its link to the destination);
/// * `snapshots`: snapshots of the moving container and its service (from
///   `Directory::snapshots`), for affinity.
#[allow(clippy::too_many_arguments)]
pub fn rank_candidates(
    policy: &CandidatePolicy,
    answer: &HoldersAnswer,
    wanted: &[Digest],
    destination: &str,
    source: &str,
    dest_links: &BTreeMap<HostName, Link>,
    moving: &Moving,
    snapshots: &[Snapshot],
    now: Timestamp,
) -> Candidates {
    let mut out = Candidates::default();
    let window = answer.window.as_secs_f64().max(1e-3);
    // Score every host of the answer once.
    let mut score_of: Vec<Option<f64>> = vec![None; answer.hosts.len()];
    let mut scored: Vec<(usize, HostScore)> = Vec::new();
    for (i, HostFacts { host, as_of, info }) in answer.hosts.iter().enumerate() {
        if host == destination || host == source {
            continue;
        }
        let age = now.saturating_since(*as_of);
        let a = age.as_secs_f64();
        if a > policy.dead_after * window {
            out.excluded.insert(
                host.clone(),
                format!(
                    "information {a:.0}s old, over {:.0}x the {window:.1}s window",
                    policy.dead_after
                ),
            );
            continue;
        }
        let freshness = if a <= window { 1.0 } else { window / a };
        let link = dest_links.get(host).or_else(|| info.links.get(destination));
        let (rate, measured_link) = link_rate(policy, link);
        let load = info.load.max(0.0);
        let host_snaps: Vec<&Snapshot> = snapshots.iter().filter(|s| &s.host == host).collect();
        let (aff, aff_why) = affinity(policy, moving, &host_snaps, now);
        let score = rate / (1.0 + load) * freshness * aff;
        let why = format!(
            "{:.1} MB/s {}link, load {load:.1}, info {a:.1}s old (x{freshness:.2}){}",
            rate / 1e6,
            if measured_link { "" } else { "assumed " },
            if aff_why.is_empty() {
                String::new()
            } else {
                format!(", {aff_why} (x{aff:.2})")
            }
        );
        scored.push((
            i,
            HostScore {
                host: host.clone(),
                score,
                rate_bps: rate,
                measured_link,
                load,
                age,
                freshness,
                affinity: aff,
                why,
            },
        ));
    }
    scored.sort_by(|a, b| {
        b.1.score
            .total_cmp(&a.1.score)
            .then(a.1.host.cmp(&b.1.host))
    });
    for (rank, (i, hs)) in scored.into_iter().enumerate() {
        if rank >= policy.max_sources {
            out.excluded.insert(
                hs.host.clone(),
                format!("beyond the best {} sources", policy.max_sources),
            );
            continue;
        }
        score_of[i] = Some(hs.score);
        out.hosts.push(hs);
    }
    let names: HashMap<usize, &str> = answer
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (i, h.host.as_str()))
        .collect();
    for i in 0..wanted.len() {
        let mut c: Vec<(f64, &str)> = answer
            .holders
            .get(i)
            .into_iter()
            .flatten()
            .filter_map(|&h| {
                Some((
                    score_of.get(h as usize).copied().flatten()?,
                    names[&(h as usize)],
                ))
            })
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        c.truncate(policy.per_chunk);
        out.per_chunk
            .push(c.into_iter().map(|(_, n)| n.to_owned()).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HostInfo, ModeKind};

    fn d(i: u32) -> Digest {
        Digest::of(&i.to_le_bytes())
    }

    fn facts(host: &str, as_of_s: u64, load: f64, link_mbps: Option<f64>) -> HostFacts {
        let mut info = HostInfo {
            load,
            ..HostInfo::default()
        };
        if let Some(m) = link_mbps {
            info.links.insert(
                "dst".into(),
                Link {
                    throughput_bps: m * 1e6 / 8.0,
                    latency_micros: 1000.0,
                },
            );
        }
        HostFacts {
            host: host.into(),
            as_of: Timestamp::from_secs(as_of_s),
            info,
        }
    }

    fn answer(hosts: Vec<HostFacts>, holders: Vec<Vec<u32>>) -> HoldersAnswer {
        HoldersAnswer {
            mode: ModeKind::CentralPush,
            at: Timestamp::from_secs(1000),
            window: Duration::from_secs(10),
            hosts,
            holders,
        }
    }

    fn rank(a: &HoldersAnswer, n: usize, moving: &Moving, snaps: &[Snapshot]) -> Candidates {
        rank_at(a, n, moving, snaps, 1000)
    }

    fn rank_at(
        a: &HoldersAnswer,
        n: usize,
        moving: &Moving,
        snaps: &[Snapshot],
        now: u64,
    ) -> Candidates {
        let wanted: Vec<Digest> = (0..n as u32).map(d).collect();
        rank_candidates(
            &CandidatePolicy::default(),
            a,
            &wanted,
            "dst",
            "src",
            &BTreeMap::new(),
            moving,
            snaps,
            Timestamp::from_secs(now),
        )
    }

    #[test]
    fn link_load_and_freshness_order_candidates() {
        let a = answer(
            vec![
                facts("slow", 1000, 0.0, Some(10.0)),
                facts("fast", 1000, 0.0, Some(100.0)),
                facts("busy", 1000, 4.0, Some(100.0)),
                facts("stale", 975, 0.0, Some(100.0)),
                facts("dead", 900, 0.0, Some(1000.0)),
                facts("src", 1000, 0.0, Some(1000.0)),
                facts("dst", 1000, 0.0, Some(1000.0)),
            ],
            vec![vec![0, 1, 2, 3, 4, 5, 6], vec![0], vec![]],
        );
        let c = rank(&a, 3, &Moving::default(), &[]);
        assert_eq!(c.per_chunk[0], vec!["fast", "stale", "busy", "slow"]);
        assert_eq!(c.per_chunk[1], vec!["slow"]);
        assert!(c.per_chunk[2].is_empty());
        assert!(c.excluded.contains_key("dead"), "{:?}", c.excluded);
        assert!(c.hosts.iter().all(|h| h.host != "src" && h.host != "dst"));
        let stale = c.hosts.iter().find(|h| h.host == "stale").expect("stale");
        assert!((stale.freshness - 10.0 / 25.0).abs() < 1e-9);
    }

    #[test]
    fn same_container_beats_same_service_beats_none() {
        let snap = |host: &str, subject: Subject, taken: u64| Snapshot {
            id: Digest::of(host.as_bytes()),
            host: host.into(),
            subject,
            service: Some("sha256:svc".into()),
            taken: Timestamp::from_secs(taken),
            objects: vec![],
            bytes: 0,
        };
        let a = answer(
            vec![
                facts("plain", 100_000, 0.0, Some(100.0)),
                facts("svc", 100_000, 0.0, Some(100.0)),
                facts("ctr", 100_000, 0.0, Some(100.0)),
                facts("ctr-old", 100_000, 0.0, Some(100.0)),
            ],
            vec![vec![0, 1, 2, 3]],
        );
        let moving = Moving {
            container: Some("c1".into()),
            service: Some("sha256:svc".into()),
            volumes: vec![],
        };
        let snaps = vec![
            snap("svc", Subject::Container("c2".into()), 99_990),
            snap("ctr", Subject::Container("c1".into()), 99_990),
            snap("ctr-old", Subject::Container("c1".into()), 100_000 - 36_000),
        ];
        let c = rank_at(&a, 1, &moving, &snaps, 100_000);
        assert_eq!(c.per_chunk[0], vec!["ctr", "svc", "ctr-old", "plain"]);
        let ctr = c.hosts.iter().find(|h| h.host == "ctr").expect("ctr");
        assert!(ctr.why.contains("same container"), "{}", ctr.why);
    }

    #[test]
    fn volume_snapshots_rank_by_affinity_then_freshness() {
        let snap = |host: &str, subject: Subject, service: &str, taken: u64| Snapshot {
            id: Digest::of(host.as_bytes()),
            host: host.into(),
            subject,
            service: Some(service.into()),
            taken: Timestamp::from_secs(taken),
            objects: vec![],
            bytes: 0,
        };
        let names = [
            "plain",
            "other-svc",
            "svc-old",
            "svc-new",
            "vol-old",
            "vol-new",
        ];
        let a = answer(
            names
                .iter()
                .map(|n| facts(n, 100_000, 0.0, Some(100.0)))
                .collect(),
            vec![(0..names.len() as u32).collect()],
        );
        let moving = Moving {
            container: Some("c1".into()),
            service: Some("sha256:svc".into()),
            volumes: vec!["c1/rw-0".into()],
        };
        let vol = |g: &str| Subject::Volume(g.into());
        let snaps = vec![
            snap("other-svc", vol("c9/rw-0"), "sha256:else", 99_990),
            snap("svc-old", vol("c2/rw-0"), "sha256:svc", 100_000 - 7200),
            snap("svc-new", vol("c2/rw-0"), "sha256:svc", 99_990),
            snap("vol-old", vol("c1/rw-0"), "sha256:svc", 100_000 - 7200),
            snap("vol-new", vol("c1/rw-0"), "sha256:svc", 99_990),
        ];
        let c = rank_at(&a, 1, &moving, &snaps, 100_000);
        // Same volume first, fresher first within a kind; an old snapshot of the same
        // volume (2 h, 12 half lives) falls below a fresh same-service one; a snapshot
        // of another service counts for nothing.
        assert_eq!(
            c.per_chunk[0],
            vec!["vol-new", "svc-new", "vol-old", "svc-old"]
        );
        let by = |h: &str| c.hosts.iter().find(|x| x.host == h).expect("host").clone();
        assert!(
            by("vol-new").why.contains("same container (volume)"),
            "{}",
            by("vol-new").why
        );
        assert!(
            by("svc-new").why.contains("same service"),
            "{}",
            by("svc-new").why
        );
        assert!((by("other-svc").affinity - 1.0).abs() < 1e-9);
        assert!((by("plain").affinity - 1.0).abs() < 1e-9);
        assert!(by("vol-new").affinity > 1.9 && by("svc-new").affinity > 1.25);
    }

    #[test]
    fn limits_per_chunk_and_sources() {
        let hosts: Vec<HostFacts> = (0..100)
            .map(|i| facts(&format!("h{i:03}"), 1000, 0.0, Some(10.0 + i as f64)))
            .collect();
        let a = answer(hosts, vec![(0..100).collect()]);
        let c = rank(&a, 1, &Moving::default(), &[]);
        assert_eq!(c.hosts.len(), 63);
        assert_eq!(c.excluded.len(), 37);
        assert_eq!(c.per_chunk[0], vec!["h099", "h098", "h097", "h096"]);
    }
}
