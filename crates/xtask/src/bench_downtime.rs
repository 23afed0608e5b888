//! `cargo xtask bench downtime`: what a client sees while xfer moves a busy redis
//! (1M keys) between lab hosts, against Podman's checkpoint/export/restore cold path and
//! the local CRIU dump + restore floor, measured in the same run on the same dataset.
//!
//! Per repetition: one CRIU floor sample; then per link (unshaped veth as the 1 Gbit/s
//! row, htb-shaped 1 Gbit/s, htb-shaped 100 Mbit/s) a fresh lab for an xfer pre-copy
//! migration, a fresh lab for an xfer cold migration, and a Podman checkpoint whose
//! export travels over that lab's link. Methods are interleaved so that a busy spell of
//! this shared machine does not land on one method only. Results: a markdown table
//! (bench/results/downtime.md, also printed), an SVG plot (downtime.svg) and the raw
//! samples (downtime.json).

#[path = "bench/floor.rs"]
mod floor;
#[path = "bench/load.rs"]
mod load;
#[path = "bench/netns.rs"]
mod netns;
#[path = "bench/plot.rs"]
mod plot;
#[path = "bench/podman.rs"]
mod podman;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/stats.rs"]
mod stats;
#[path = "bench/xfer.rs"]
mod xfer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::setup::SetupArgs;
use crate::util::{capture, Timeline};

pub use report::{Facts, Results};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench downtime",
    about = "Client-observed downtime of xfer migrations vs Podman's cold path and the local CRIU floor"
)]
pub struct DowntimeArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Skip `xtask setup` (packages, CRIU) before the run.
    #[arg(long)]
    pub no_setup: bool,
    /// Cargo profile of the binaries under test: release (optimised, what a benchmark
    /// should measure) or debug (`cargo build --workspace --bins`).
    #[arg(long, default_value = "release", value_parser = ["release", "debug"])]
    pub profile: String,
    /// Lab prefix (its namespaces, bridge and containerds are named after it).
    #[arg(long, default_value = "bd")]
    pub prefix: String,
    /// Runs of every method on every link; medians and min/max are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Keys of the dataset (DEBUG POPULATE N key SIZE).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Value size of the dataset, bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: u32,
    /// Links to measure: unshaped (the veth, faster than 1 Gbit/s), 1gbit, 100mbit.
    #[arg(long, value_delimiter = ',', default_value = "unshaped,1gbit,100mbit")]
    pub links: Vec<String>,
    /// Methods: precopy, postcopy, hybrid, auto, cold (xfer), podman, floor.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "precopy,postcopy,hybrid,auto,cold,podman,floor"
    )]
    pub methods: Vec<String>,
    /// Pause between the load generator's requests, µs.
    #[arg(long, default_value_t = 200)]
    pub pace_us: u64,
    /// Seconds of load before the measured operation starts and after it ends.
    #[arg(long, default_value_t = 2.0)]
    pub settle_s: f64,
    /// Where the table, the plot and the raw samples go (default: <repo>/bench/results).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

/// The CRIU floor's network namespace.
const FLOOR_NETNS: &str = "xfer_bench_floor";

/// A link the migrations cross (h1 -> h2; shaping applies to both directions of h2's link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Link {
    Unshaped,
    Gbit,
    Mbit100,
}

impl Link {
    fn parse(s: &str) -> Result<Link> {
        Ok(match s.trim() {
            "unshaped" | "veth" => Link::Unshaped,
            "1gbit" => Link::Gbit,
            "100mbit" => Link::Mbit100,
            other => bail!("unknown link {other:?} (unshaped, 1gbit, 100mbit)"),
        })
    }
    pub fn key(self) -> &'static str {
        match self {
            Link::Unshaped => "unshaped",
            Link::Gbit => "1gbit",
            Link::Mbit100 => "100mbit",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Link::Unshaped => "1 Gbit/s (unshaped veth)",
            Link::Gbit => "1 Gbit/s (htb-shaped)",
            Link::Mbit100 => "100 Mbit/s (htb-shaped)",
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Link::Unshaped => "1G veth",
            Link::Gbit => "1G htb",
            Link::Mbit100 => "100M htb",
        }
    }
    fn rate(self) -> Option<&'static str> {
        match self {
            Link::Unshaped => None,
            Link::Gbit => Some("h2=1gbit"),
            Link::Mbit100 => Some("h2=100mbit"),
        }
    }
    pub fn nominal_bps(self) -> f64 {
        match self {
            Link::Unshaped | Link::Gbit => 1e9,
            Link::Mbit100 => 1e8,
        }
    }
    /// The rows the issue's targets are stated for.
    pub fn is_1g(self) -> bool {
        matches!(self, Link::Unshaped | Link::Gbit)
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On SIGINT/SIGTERM the running step's children die (they keep the default action) and
/// the benchmark stops before the next run, so the guards clean up the lab, the Podman
/// container and image, and the floor's namespace.
fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // function pointer is valid for the whole life of the process.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted by a signal; cleaning up");
    }
    Ok(())
}

/// Entry point: `cargo xtask bench downtime [OPTIONS]`.
pub fn main(argv: &[String]) -> Result<()> {
    let args = DowntimeArgs::try_parse_from(
        std::iter::once("cargo xtask bench downtime".to_string()).chain(argv.iter().cloned()),
    )
    .unwrap_or_else(|e| e.exit());
    let mut tl = Timeline::new("cargo xtask bench downtime");
    catch_signals();
    let result = bench(&args, &mut tl);
    tl.print_summary();
    result
}

fn has(args: &DowntimeArgs, method: &str) -> bool {
    args.methods.iter().any(|m| m.trim() == method)
}

fn bench(args: &DowntimeArgs, tl: &mut Timeline) -> Result<()> {
    for m in &args.methods {
        let known = report::XFER_MODES.iter().any(|(x, _)| *x == m.trim())
            || ["podman", "floor"].contains(&m.trim());
        if !known {
            bail!("unknown method {m:?} (precopy, postcopy, hybrid, auto, cold, podman, floor)");
        }
    }
    let links = args
        .links
        .iter()
        .map(|l| Link::parse(l))
        .collect::<Result<Vec<_>>>()?;
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if !crate::util::find_on_path("nsenter").is_some_and(|p| p.exists()) {
        bail!("nsenter (util-linux) is needed");
    }
    let bin_dir = crate::util::setup_and_build(tl, &args.setup, args.no_setup, &args.profile)?;
    let xfer_bin = bin_dir.join("xfer");
    let loadgen = bin_dir.join("xfer-loadgen");
    for b in [&xfer_bin, &loadgen] {
        if !b.is_file() {
            bail!("{} was not built", b.display());
        }
    }
    let work = PathBuf::from("/dev/shm/xfer-bench-downtime");
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| crate::util::repo_root().join("bench/results"));

    let mut results = Results::new(Facts::gather(&args.profile, args)?);
    results.links = links.clone();
    println!("{}", results.facts.one_line());

    tl.step("clear what an earlier run may have left", || {
        if let Err(e) = xfer::Lab::down_prefix(&xfer_bin, &args.prefix) {
            println!("  lab down {}: {e:#}", args.prefix);
        }
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))
    })?;
    let _work_guard = RemoveDir(work.clone());

    let setup = xfer::XferSetup {
        xfer: xfer_bin.clone(),
        loadgen: loadgen.clone(),
        prefix: args.prefix.clone(),
        keys: args.keys,
        value_size: args.value_size,
        pace_us: args.pace_us,
        settle_s: args.settle_s,
        work: work.join("xfer"),
    };
    std::fs::create_dir_all(&setup.work).context("create the xfer work directory")?;

    // Baselines that live across the repetitions.
    let mut floor = None;
    if has(args, "floor") {
        match tl.step(
            "CRIU floor: redis with the dataset in its own namespace",
            || {
                floor::Floor::start(
                    // Not "<prefix>-…": `lab up`/`down` remove every namespace named so.
                    FLOOR_NETNS,
                    &work.join("floor"),
                    args.keys,
                    args.value_size,
                )
            },
        ) {
            Ok(f) => {
                results.rss_bytes = f.rss_bytes();
                floor = Some(f);
            }
            Err(e) => results.unavailable("CRIU floor", &e),
        }
    }
    let mut podman = None;
    if has(args, "podman") {
        match tl.step(
            "Podman: image from the host binaries, container, dataset",
            || podman::Podman::start(&work.join("podman"), args.keys, args.value_size),
        ) {
            Ok(p) => {
                results.facts.podman_criu = Some(p.criu.clone());
                podman = Some(p);
            }
            Err(e) => results.unavailable("Podman cold path", &e),
        }
    }

    // Link throughput probes, and which links work at all.
    let mut usable = Vec::new();
    for &link in &links {
        let name = format!("{}: lab up and link throughput probe", link.label());
        match tl.step(&name, || probe_link(&xfer_bin, &args.prefix, link, &work)) {
            Ok(mbps) => {
                results.link_mbps.push((link, mbps));
                usable.push(link);
            }
            Err(e) => results.unavailable(&format!("link {}", link.label()), &e),
        }
    }

    let mut est = Estimates::default();
    for rep in 1..=args.repeats {
        check_interrupted()?;
        let tag = format!("{rep}/{}", args.repeats);
        if let Some(f) = floor.as_mut() {
            match tl.step(&format!("[{tag}] CRIU floor: dump + restore"), || {
                f.sample(rep)
            }) {
                Ok(s) => {
                    println!(
                        "  dump {:.0} ms, restore to PING {:.0} ms, total {:.0} ms, images {}",
                        s.dump_ms,
                        s.restore_to_pong_ms,
                        s.total_ms,
                        stats::bytes(s.image_bytes as f64)
                    );
                    results.floor.push(s);
                }
                Err(e) => {
                    results.failed(rep, None, "CRIU floor", &e);
                    floor = None;
                }
            }
        }
        for &link in &usable {
            for (mode, _) in report::XFER_MODES {
                check_interrupted()?;
                if !has(args, mode) {
                    continue;
                }
                let name = format!("[{tag}] {}: xfer {mode}", link.label());
                match tl.step(&name, || xfer_sample(&setup, link, mode, &mut est)) {
                    Ok(s) => {
                        println!(
                            "  client-observed {:.0} ms, xfer downtime {:.0} ms, total {:.0} ms, {} on the wire, writes {}, keys {}",
                            s.load.max_gap_ms,
                            s.migrate.downtime_ms,
                            s.migrate.total_ms,
                            stats::bytes(s.migrate.bytes_sent as f64),
                            if s.verify.is_ok() { "all there" } else { "LOST" },
                            if s.keys_ok() { "ok" } else { "MISMATCH" }
                        );
                        results.xfer.push((link, mode.to_string(), s));
                    }
                    Err(e) => results.failed(rep, Some(link), &format!("xfer {mode}"), &e),
                }
            }
            check_interrupted()?;
            if let Some(p) = podman.as_mut() {
                let name = format!(
                    "[{tag}] {}: Podman checkpoint / copy / restore",
                    link.label()
                );
                let res = tl.step(&name, || {
                    podman_sample(
                        p,
                        &xfer_bin,
                        &args.prefix,
                        link,
                        &loadgen,
                        args,
                        rep,
                        &mut est,
                    )
                });
                match res {
                    Ok(s) => {
                        println!(
                            "  client-observed {:.0} ms, checkpoint {:.0} ms + copy {:.0} ms + restore {:.0} ms = {:.0} ms, export {}",
                            s.load.max_gap_ms,
                            s.checkpoint_ms,
                            s.link_copy_ms,
                            s.restore_ms,
                            s.downtime_ms(),
                            stats::bytes(s.export_bytes as f64)
                        );
                        results.podman.push((link, s));
                    }
                    Err(e) => {
                        results.failed(rep, Some(link), "Podman cold path", &e);
                        if !p.alive() {
                            results.unavailable(
                                "Podman cold path (later runs)",
                                &anyhow::anyhow!("the container was lost by a failed run"),
                            );
                            podman = None;
                        }
                    }
                }
            }
        }
    }

    tl.step("clean up the baselines", || {
        let mut errs = Vec::new();
        if let Some(mut f) = floor.take() {
            if let Err(e) = f.cleanup() {
                errs.push(format!("{e:#}"));
            }
        }
        if let Some(mut p) = podman.take() {
            if let Err(e) = p.cleanup() {
                errs.push(format!("{e:#}"));
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            bail!("{}", errs.join("; "))
        }
    })?;

    results.facts.finish();
    tl.step("write bench/results", || {
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("create {}", out_dir.display()))?;
        let md = report::markdown(&results);
        let md_path = out_dir.join("downtime.md");
        std::fs::write(&md_path, &md).with_context(|| format!("write {}", md_path.display()))?;
        let svg_path = out_dir.join("downtime.svg");
        plot::svg(&results, &svg_path)?;
        let json_path = out_dir.join("downtime.json");
        let json = serde_json::to_string_pretty(&report::json(&results))?;
        std::fs::write(&json_path, json)
            .with_context(|| format!("write {}", json_path.display()))?;
        println!("\n{md}");
        println!(
            "wrote {}, {} and {}",
            md_path.display(),
            svg_path.display(),
            json_path.display()
        );
        Ok(())
    })?;

    if !results.failures.is_empty() {
        bail!(
            "{} run(s) failed (listed in the table's notes): {}",
            results.failures.len(),
            results
                .failures
                .iter()
                .map(|f| f.what.clone())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How long the measured operations took so far (wall ms, per method and link), to size
/// the load window: long enough to cover the operation, not so long that the run idles.
#[derive(Debug, Default)]
struct Estimates {
    ms: std::collections::BTreeMap<String, f64>,
}

impl Estimates {
    fn record(&mut self, method: &str, link: Link, ms: f64) {
        let e = self
            .ms
            .entry(format!("{method}/{}", link.key()))
            .or_default();
        *e = e.max(ms);
    }

    /// Seconds of load for the next `method` run on `link`: settle before and after, and
    /// 1.5x the longest such operation so far + 5 s (the same method on another link, or
    /// `first_guess_s`, when none ran yet).
    fn window(&self, method: &str, link: Link, settle_s: f64, first_guess_s: f64) -> f64 {
        let own = self.ms.get(&format!("{method}/{}", link.key())).copied();
        let other = self
            .ms
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{method}/")))
            .map(|(_, v)| *v)
            .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
        let op_s = match own.or(other) {
            Some(ms) => ms / 1000.0 * 1.5 + 5.0,
            None => first_guess_s,
        };
        2.0 * settle_s + op_s
    }
}

/// Lab up for `link`, 32 MB from this namespace into h2 (through h2's shaped link),
/// lab down. Returns Mbit/s.
fn probe_link(xfer: &Path, prefix: &str, link: Link, work: &Path) -> Result<f64> {
    let mut lab = xfer::Lab::up(xfer, prefix, link.rate())
        .with_context(|| format!("lab up --rate {}", link.rate().unwrap_or("(none)")))?;
    let src = work.join("probe.bin");
    let dst = work.join("probe.recv");
    let size = 32 * 1024 * 1024;
    // Incompressible doesn't matter for a raw TCP copy; zeros are fine.
    std::fs::write(&src, vec![0u8; size]).context("write the probe file")?;
    let (n, took) = netns::copy_over_link(&src, &lab.h2_netns(), lab.h2, &dst)?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    lab.down()?;
    let mbps = n as f64 * 8.0 / took.as_secs_f64() / 1e6;
    println!(
        "  {} MB in {:.0} ms: {:.0} Mbit/s",
        n / 1_000_000,
        took.as_secs_f64() * 1000.0,
        mbps
    );
    Ok(mbps)
}

fn xfer_sample(
    s: &xfer::XferSetup,
    link: Link,
    mode: &str,
    est: &mut Estimates,
) -> Result<xfer::XferSample> {
    let mut w = est.window(mode, link, s.settle_s, 45.0);
    for attempt in 1..=3 {
        let mut lab = xfer::Lab::up(&s.xfer, &s.prefix, link.rate()).context("lab up")?;
        xfer::deploy(s, &lab).context("redis with the dataset on h1")?;
        let t = Instant::now();
        let res = xfer::sample(s, &lab, mode, w);
        lab.down().context("lab down")?;
        match res {
            Ok(sample) => {
                est.record(mode, link, sample.wall_ms);
                return Ok(sample);
            }
            Err(e) if e.downcast_ref::<load::WindowTooShort>().is_some() && attempt < 3 => {
                let took = t.elapsed().as_secs_f64();
                println!("  {e}; again with a longer window");
                w = w.max(took) * 2.0;
            }
            Err(e) => return Err(e),
        }
    }
    bail!("the load window stayed too short")
}

#[allow(clippy::too_many_arguments)]
fn podman_sample(
    p: &mut podman::Podman,
    xfer: &Path,
    prefix: &str,
    link: Link,
    loadgen: &Path,
    args: &DowntimeArgs,
    rep: usize,
    est: &mut Estimates,
) -> Result<podman::PodmanSample> {
    let mut w = est.window("podman", link, args.settle_s, 25.0);
    for attempt in 1..=3 {
        let mut lab = xfer::Lab::up(xfer, prefix, link.rate()).context("lab up (for its link)")?;
        let target = podman::LinkTarget {
            ns: lab.h2_netns(),
            addr: lab.h2,
            nominal_bps: link.nominal_bps(),
        };
        let t = Instant::now();
        let res = p.sample(rep, &target, loadgen, args.pace_us, args.settle_s, w);
        lab.down().context("lab down")?;
        match res {
            Ok(s) => {
                est.record("podman", link, s.rm_ms + s.downtime_ms());
                return Ok(s);
            }
            Err(e) if e.downcast_ref::<load::WindowTooShort>().is_some() && attempt < 3 => {
                println!("  {e}; again with a longer window");
                w = w.max(t.elapsed().as_secs_f64()) * 2.0;
            }
            Err(e) => return Err(e),
        }
    }
    bail!("the load window stayed too short")
}

/// `uname -r`, CPUs, versions: facts for the report header.
impl Facts {
    fn gather(profile: &str, args: &DowntimeArgs) -> Result<Facts> {
        let cmd_out = |prog: &str, a: &[&str]| {
            capture(Command::new(prog).args(a))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|e| format!("unknown ({e:#})"))
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_gib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kb| kb / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let criu = capture(
            Command::new("criu")
                .arg("--version")
                .env("PATH", podman::path_env()),
        )
        .ok()
        .and_then(|o| crate::parse::parse_criu_version(&o))
        .map(|v| v.to_string())
        .unwrap_or_else(|| "unknown".into());
        let redis = cmd_out("redis-server", &["--version"]);
        let redis = redis
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .unwrap_or(&redis)
            .to_string();
        let git = cmd_out(
            "git",
            &[
                "-C",
                &crate::util::repo_root().display().to_string(),
                "rev-parse",
                "--short",
                "HEAD",
            ],
        );
        let dirty = capture(Command::new("git").args([
            "-C",
            &crate::util::repo_root().display().to_string(),
            "status",
            "--porcelain",
        ]))
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false);
        Ok(Facts {
            date: cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: cmd_out("uname", &["-r"]),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            mem_gib,
            criu,
            podman_criu: None,
            podman: cmd_out("podman", &["--version"]),
            redis,
            profile: profile.to_string(),
            git: format!("{git}{}", if dirty { " + uncommitted changes" } else { "" }),
            load_start: loadavg(),
            load_end: String::new(),
            started: Instant::now(),
            duration: Duration::ZERO,
            keys: args.keys,
            value_size: args.value_size,
            repeats: args.repeats,
            pace_us: args.pace_us,
        })
    }

    fn finish(&mut self) {
        self.load_end = loadavg();
        self.duration = self.started.elapsed();
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links() {
        assert_eq!(Link::parse("unshaped").expect("ok"), Link::Unshaped);
        assert_eq!(Link::parse(" 100mbit").expect("ok"), Link::Mbit100);
        assert!(Link::parse("10gbit").is_err());
        assert_eq!(Link::Gbit.rate(), Some("h2=1gbit"));
        assert!(Link::Unshaped.is_1g() && !Link::Mbit100.is_1g());
    }

    #[test]
    fn load_windows() {
        let mut e = Estimates::default();
        assert_eq!(e.window("precopy", Link::Unshaped, 2.0, 45.0), 49.0);
        e.record("precopy", Link::Unshaped, 20_000.0);
        assert_eq!(e.window("precopy", Link::Unshaped, 2.0, 45.0), 39.0);
        // Another link borrows the same method's figure; another method does not.
        assert_eq!(e.window("precopy", Link::Mbit100, 2.0, 45.0), 39.0);
        assert_eq!(e.window("cold", Link::Unshaped, 2.0, 45.0), 49.0);
        e.record("precopy", Link::Unshaped, 10_000.0);
        assert_eq!(e.window("precopy", Link::Unshaped, 2.0, 45.0), 39.0);
    }

    #[test]
    fn options() {
        let a = DowntimeArgs::try_parse_from([
            "x",
            "--repeats",
            "5",
            "--links",
            "unshaped,100mbit",
            "--methods",
            "precopy,floor",
        ])
        .expect("parses");
        assert_eq!(a.repeats, 5);
        assert_eq!(a.links, vec!["unshaped", "100mbit"]);
        assert!(has(&a, "floor") && !has(&a, "podman"));
        assert_eq!(a.profile, "release");
    }
}
