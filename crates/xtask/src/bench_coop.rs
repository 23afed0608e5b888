//! `cargo xtask bench cooperative`: the seeds' experiment (issue 6 item 5).
//!
//! One lab: h1 the source, h2 the destination, h3 and h4 the neighbours (the lab's
//! client namespace is the fifth host), links shaped with htb: source, neighbours
//! `--link` (100 Mbit/s) each, the destination `--dst-link` (1 Gbit/s: so the source's
//! uplink, not the destination's downlink, is the bottleneck), the client
//! `--client-link` (30 Mbit/s), downloading from a web server on h1 in a loop during
//! each migration (the client load on the source's uplink; `--no-client-load`). The
//! service's image (`--image`, default `bulky`: busybox plus a 40 MB layer) is on h1,
//! h3 and h4 and removed from h2 before each migration, so its blobs travel (as
//! chunks, from whoever holds them). A service with a read-write named volume (`--volume-mb` of random bytes: a `base` file and a `hot`
//! file of `--hot-mb`) starts on h3 and moves h3 -> h4 -> h1 (traditional): the
//! neighbours then hold the chunks of an older snapshot of the volume (and of the
//! container's memory). Then, per mode (traditional = source only, then each of the
//! five knowledge-base modes, on-line query with h3 and h4 as h2's neighbours, the
//! central modes with h3 as the knowledge base): the agents restart with that mode,
//! the service's `hot` file is rewritten (what the neighbours' snapshot lacks), and it
//! migrates h1 -> h2 (pre-copy), measured: total time, downtime (freeze -> restored),
//! bytes on each host's link (the root-side veth counters), the source's uplink load
//! (its bytes / the total time) and bytes per fetch source (the migration report).
//! The service then moves back to h1 and h2's chunk store is emptied.
//!
//! Results: bench/results/cooperative.md (also printed), cooperative.json,
//! cooperative.svg.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use plotters::prelude::*;

use crate::setup::{self, SetupArgs};
use crate::util::{capture, cargo, run, Timeline};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench cooperative",
    about = "Traditional (source-only) vs cooperative migration in each knowledge-base mode"
)]
pub struct CoopArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Skip `xtask setup` before the run.
    #[arg(long)]
    pub no_setup: bool,
    /// Cargo profile of the binaries under test.
    #[arg(long, default_value = "release", value_parser = ["release", "debug"])]
    pub profile: String,
    /// Lab prefix.
    #[arg(long, default_value = "cb")]
    pub prefix: String,
    /// Size of the read-write volume, MB.
    #[arg(long, default_value_t = 100)]
    pub volume_mb: u64,
    /// Part of it rewritten before each measured migration (the neighbours' snapshot
    /// is older than that), MB.
    #[arg(long, default_value_t = 10)]
    pub hot_mb: u64,
    /// Rate of the source's and the neighbours' links.
    #[arg(long, default_value = "100mbit")]
    pub link: String,
    /// Rate of the destination's link.
    #[arg(long, default_value = "1gbit")]
    pub dst_link: String,
    /// Rate of the client's link (the lab's client namespace).
    #[arg(long, default_value = "30mbit")]
    pub client_link: String,
    /// No client load during the migrations (by default the client downloads from
    /// the source host in a loop, over its link, while each migration runs).
    #[arg(long)]
    pub no_client_load: bool,
    /// The service's image (a lab image kind; `bulky` has a 40 MB layer). It is on
    /// the source and the neighbours, not on the destination.
    #[arg(long, default_value = "bulky")]
    pub image: String,
    /// Runs of each mode; medians are reported.
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Where the results go (default: bench/results).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Only these rows (comma-separated, of: traditional, central_pull, central_push,
    /// online_query, neighbour_pull, neighbour_subscribe, online_query_spared).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Leave the lab up at the end, to read the agents' logs (`xfer --prefix PREFIX
    /// lab down` removes it).
    #[arg(long)]
    pub keep_lab: bool,
}

const MODES: [&str; 7] = [
    "traditional",
    "central_pull",
    "central_push",
    "online_query",
    "neighbour_pull",
    "neighbour_subscribe",
    SPARED,
];

/// On-line query with the source spared (`source_shares` off: it serves only what no
/// neighbour holds); every other cooperative row lets it share the fetch.
const SPARED: &str = "online_query_spared";

/// The knowledge-base mode of a row, and whether the source shares the fetch.
fn mode_of(row: &str) -> (&str, bool) {
    if row == SPARED {
        ("online_query", false)
    } else {
        (row, true)
    }
}
const HOSTS: [&str; 4] = ["h1", "h2", "h3", "h4"];

#[derive(Debug, Clone, Default, serde::Serialize)]
struct Sample {
    mode: String,
    total_ms: f64,
    downtime_ms: f64,
    /// Bytes each host sent (uplink) and received (downlink) during the migration.
    up: BTreeMap<String, u64>,
    down: BTreeMap<String, u64>,
    /// Wire bytes per fetch source (the migration report), all objects.
    sources: BTreeMap<String, u64>,
    /// Of which the image blobs.
    image_sources: BTreeMap<String, u64>,
    /// The client's download rate during the migration, Mbit/s.
    client_mbit: f64,
    /// The source's uplink: bytes / total time, Mbit/s.
    source_uplink_mbit: f64,
    /// The migration's report (`xfer migrate --json`: phases, rounds).
    report: serde_json::Value,
    /// Uplink rate of h1, h3 and h4 in each 250 ms of the migration, Mbit/s.
    uplinks: BTreeMap<String, Vec<f64>>,
}

pub fn main(argv: &[String]) -> Result<()> {
    crate::util::run_bench::<CoopArgs>("cargo xtask bench cooperative", argv, bench)
}

struct Lab {
    xfer: PathBuf,
    prefix: String,
    endpoints: BTreeMap<String, String>,
    kb_dir: PathBuf,
}

impl Lab {
    fn xfer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.xfer);
        c.args(["--prefix", &self.prefix]).args(args);
        c
    }

    fn work_dir(&self, host: &str) -> PathBuf {
        Path::new("/dev/shm/xfer-lab").join(&self.prefix).join(host)
    }

    fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&capture(
            &mut self.xfer(&["lab", "status", "--json"]),
        )?)?)
    }

    fn xferd_pid(&self, host: &str) -> Result<i32> {
        let st = self.status()?;
        st["hosts"]
            .as_array()
            .context("hosts")?
            .iter()
            .find(|h| h["name"] == host)
            .and_then(|h| h["xferd_pid"].as_i64())
            .map(|p| p as i32)
            .with_context(|| format!("pid of {host}'s agent"))
    }

    /// Bytes the host sent and received on its link so far (root-side veth: its rx is
    /// the host's uplink).
    fn counters(&self, host: &str) -> Result<(u64, u64)> {
        let dev = format!("/sys/class/net/{}-{host}/statistics", self.prefix);
        let read = |f: &str| -> Result<u64> {
            Ok(std::fs::read_to_string(format!("{dev}/{f}"))
                .with_context(|| format!("read {dev}/{f}"))?
                .trim()
                .parse()?)
        };
        Ok((read("rx_bytes")?, read("tx_bytes")?))
    }

    /// Restarts every agent with `mode` (`traditional`: no knowledge base); `wipe`:
    /// h2's chunk store is emptied while its agent is down.
    fn configure(&self, row: &str, wipe: bool) -> Result<()> {
        let cfg = self.kb_dir.join(format!("{row}.json"));
        let (mode, shares) = mode_of(row);
        if mode != "traditional" {
            let mut v = serde_json::json!({
                "mode": mode,
                "hosts": self.endpoints,
                "neighbours": {"h2": ["h3", "h4"]},
                "kb": "h3",
                "source_shares": shares,
            });
            if mode == "neighbour_pull" || mode == "central_pull" {
                // Pull right away, then every 30 s (the default period).
                v["tuning"] = serde_json::json!({"mode": mode,
                    "period": {"secs": 30, "nanos": 0}, "timeout": {"secs": 5, "nanos": 0},
                    "concurrency": 32, "drop_after": 2});
            }
            std::fs::write(&cfg, serde_json::to_string_pretty(&v)?)?;
        }
        // Every first contact finds its peer up: in central push the knowledge base
        // (h3) before the hosts that push to it (a pusher whose first full update
        // fails retries only at its next heartbeat, 10 s); otherwise the knowledge
        // base after the hosts it pulls and the destination (h2) after its neighbours.
        let order = if mode == "central_push" {
            ["h3", "h1", "h4", "h2"]
        } else {
            ["h1", "h4", "h3", "h2"]
        };
        for h in order {
            if wipe && h == "h2" {
                let pid = self.xferd_pid(h)?;
                // SAFETY: kill(2) with a pid read from the lab's state and SIGKILL.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                std::thread::sleep(Duration::from_millis(300));
                let _ = std::fs::remove_dir_all(self.work_dir(h).join("store"));
                let _ = std::fs::remove_dir_all(self.work_dir(h).join("layers"));
            }
            let mut c = self.xfer(&["lab", "restart-agent", "--node", h]);
            if mode == "traditional" {
                c.env_remove("XFER_KB_CONFIG");
            } else {
                c.env("XFER_KB_CONFIG", &cfg);
            }
            capture(&mut c)?;
        }
        // Let pulls, pushes and subscriptions take their first full inventories.
        std::thread::sleep(Duration::from_secs(3));
        Ok(())
    }

    fn migrate(&self, from: &str, to: &str) -> Result<serde_json::Value> {
        let out =
            capture(&mut self.xfer(&["migrate", "app", "--from", from, "--to", to, "--json"]))?;
        Ok(serde_json::from_str(&out)?)
    }
}

fn write_random(path: &Path, bytes: u64) -> Result<()> {
    let mut src = std::fs::File::open("/dev/urandom")?;
    let tmp = path.with_extension("tmp");
    let mut dst = std::fs::File::create(&tmp)?;
    std::io::copy(&mut std::io::Read::take(&mut src, bytes), &mut dst)?;
    dst.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A process group started in a lab namespace, killed (the whole group) on drop.
struct Bg(std::process::Child);

impl Bg {
    fn start(netns: &str, script: &str) -> Result<Bg> {
        use std::os::unix::process::CommandExt;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "sh", "-c", script])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {script:?} in {netns}"))?;
        Ok(Bg(child))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // SAFETY: kill(2) of the process group this struct started.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The client load: a web server in the source host's namespace serving a file of
/// random bytes, and the client downloading it in a loop over its link.
fn client_load(lab: &Lab) -> Result<(Bg, Bg)> {
    let st = lab.status()?;
    let h1 = st["hosts"]
        .as_array()
        .context("hosts")?
        .iter()
        .find(|h| h["name"] == "h1")
        .context("h1")?;
    let (ns, addr) = (
        h1["netns"].as_str().context("netns")?,
        h1["address"].as_str().context("address")?,
    );
    let client_ns = st["client"]["netns"].as_str().context("client netns")?;
    let www = lab.kb_dir.join("www");
    if !www.join("f").exists() {
        std::fs::create_dir_all(&www)?;
        write_random(&www.join("f"), 64_000_000)?;
    }
    let server = Bg::start(
        ns,
        &format!("exec busybox httpd -f -p 8088 -h {}", www.display()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let client = Bg::start(
        client_ns,
        &format!(
            "while true; do busybox wget -q -O /dev/null http://{addr}:8088/f; sleep 0.1; done"
        ),
    )?;
    Ok((server, client))
}

fn client_counter(lab: &Lab) -> Result<u64> {
    let dev = format!("/sys/class/net/{}-client/statistics/tx_bytes", lab.prefix);
    Ok(std::fs::read_to_string(&dev)
        .with_context(|| format!("read {dev}"))?
        .trim()
        .parse()?)
}

/// Every 250 ms until `stop`: the uplink rates of the hosts that serve chunks.
fn sample_uplinks(lab: &Lab, stop: &std::sync::atomic::AtomicBool) -> BTreeMap<String, Vec<f64>> {
    const STEP: Duration = Duration::from_millis(250);
    let hosts = ["h1", "h3", "h4"];
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let read = || -> Vec<u64> {
        hosts
            .iter()
            .map(|h| lab.counters(h).map(|c| c.0).unwrap_or(0))
            .collect()
    };
    let mut last = read();
    let mut at = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(STEP);
        let now = read();
        let dt = at.elapsed().as_secs_f64();
        at = Instant::now();
        for (i, h) in hosts.iter().enumerate() {
            let rate = now[i].saturating_sub(last[i]) as f64 * 8.0 / 1e6 / dt;
            out.entry(h.to_string())
                .or_default()
                .push((rate * 10.0).round() / 10.0);
        }
        last = now;
    }
    out
}

fn one(lab: &Lab, mode: &str, load: bool) -> Result<Sample> {
    // What the neighbours' snapshot lacks: the hot file, rewritten in the volume on h1.
    let hot = lab.work_dir("h1").join("volumes/data/hot");
    let hot_len = std::fs::metadata(&hot).context("the hot file on h1")?.len();
    write_random(&hot, hot_len)?;
    let bg = if load {
        let bg = client_load(lab)?;
        // Let the client's download reach its link's rate.
        std::thread::sleep(Duration::from_secs(2));
        Some(bg)
    } else {
        None
    };
    let before: Vec<(u64, u64)> = HOSTS
        .iter()
        .map(|h| lab.counters(h))
        .collect::<Result<_>>()?;
    let client_before = client_counter(lab)?;
    let t = Instant::now();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (rep, uplinks) = std::thread::scope(|sc| {
        let sampler = sc.spawn(|| sample_uplinks(lab, &stop));
        let rep = lab.migrate("h1", "h2");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (rep, sampler.join().unwrap_or_default())
    });
    let wall = t.elapsed();
    let client_bytes = client_counter(lab)? - client_before;
    drop(bg);
    let rep = rep?;
    let after: Vec<(u64, u64)> = HOSTS
        .iter()
        .map(|h| lab.counters(h))
        .collect::<Result<_>>()?;
    let mut s = Sample {
        mode: mode.to_string(),
        total_ms: rep["total_ms"].as_f64().context("total_ms")?,
        downtime_ms: rep["downtime_ms"].as_f64().context("downtime_ms")?,
        ..Default::default()
    };
    for (i, h) in HOSTS.iter().enumerate() {
        s.up.insert(h.to_string(), after[i].0 - before[i].0);
        s.down.insert(h.to_string(), after[i].1 - before[i].1);
    }
    for r in rep["rounds"].as_array().context("rounds")? {
        for src in r["sources"].as_array().into_iter().flatten() {
            *s.sources
                .entry(src["source"].as_str().unwrap_or("?").to_string())
                .or_default() += src["wire_bytes"].as_u64().unwrap_or(0);
        }
    }
    for src in rep["image_sources"].as_array().into_iter().flatten() {
        let (name, b) = (
            src["source"].as_str().unwrap_or("?").to_string(),
            src["wire_bytes"].as_u64().unwrap_or(0),
        );
        *s.sources.entry(name.clone()).or_default() += b;
        *s.image_sources.entry(name).or_default() += b;
    }
    s.report = rep.clone();
    s.uplinks = uplinks;
    s.client_mbit = client_bytes as f64 * 8.0 / 1e6 / wall.as_secs_f64().max(1e-3);
    s.source_uplink_mbit = s.up["h1"] as f64 * 8.0 / 1e6 / wall.as_secs_f64().max(1e-3);
    Ok(s)
}

fn median_of(v: &[&Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    let mut x: Vec<f64> = v.iter().map(|s| f(s)).collect();
    x.sort_by(f64::total_cmp);
    x.get(x.len() / 2).copied().unwrap_or(0.0)
}

fn mb(b: f64) -> String {
    format!("{:.1}", b / 1e6)
}

fn markdown(args: &CoopArgs, samples: &[Sample]) -> String {
    let mut md = String::new();
    md.push_str("# Cooperative migration: traditional vs the knowledge-base modes\n\n");
    md.push_str(&format!(
        "Produced by `cargo xtask bench cooperative` ({} profile, {} run(s) per mode; medians). \
         Lab: h1 source, h2 destination, h3 + h4 neighbours, htb-shaped links: h1, h3, h4 {}, h2 {}, \
         client {}. Service: image `{}` (busybox plus a 40 MB layer for `bulky`; on h1, h3, h4, \
         not on h2: its blobs travel as chunks) with a {} MB read-write named volume of random \
         bytes; before each migration {} MB of it (`hot`) is rewritten, the rest is what the \
         neighbours hold from an older snapshot (the service passed h3 -> h4 -> h1 before). \
         Client load: {}. Pre-copy migration h1 -> h2. Every cooperative row but \
         `online_query_spared` lets the source share the fetch (`source_shares`). Bytes are each \
         host's link counters during the migration (all traffic: chunks, gRPC, the knowledge \
         base's own messages, the client's download). Load average at the end: {}.\n\n",
        args.profile,
        args.repeats,
        args.link,
        args.dst_link,
        args.client_link,
        args.image,
        args.volume_mb,
        args.hot_mb,
        if args.no_client_load {
            "none"
        } else {
            "the client downloads from h1 in a loop during each migration"
        },
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
    md.push_str("| mode | total, s | downtime, ms | h1 (source) up, MB | h3 up, MB | h4 up, MB | h2 (dst) down, MB | fetched from source / h3 / h4, MB | of which image, MB | source uplink load, Mbit/s | client, Mbit/s | total vs traditional |\n");
    md.push_str("|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|\n");
    let trad = {
        let v: Vec<&Sample> = samples.iter().filter(|s| s.mode == "traditional").collect();
        median_of(&v, |s| s.total_ms)
    };
    for m in MODES {
        let v: Vec<&Sample> = samples.iter().filter(|s| s.mode == m).collect();
        if v.is_empty() {
            continue;
        }
        let total = median_of(&v, |s| s.total_ms);
        let src = |k: &'static str| move |s: &Sample| s.sources.get(k).copied().unwrap_or(0) as f64;
        let img =
            |k: &'static str| move |s: &Sample| s.image_sources.get(k).copied().unwrap_or(0) as f64;
        md.push_str(&format!(
            "| {m} | {:.2} | {:.0} | {} | {} | {} | {} | {} / {} / {} | {} / {} / {} | {:.1} | {:.1} | {:.2}x |\n",
            total / 1000.0,
            median_of(&v, |s| s.downtime_ms),
            mb(median_of(&v, |s| s.up["h1"] as f64)),
            mb(median_of(&v, |s| s.up["h3"] as f64)),
            mb(median_of(&v, |s| s.up["h4"] as f64)),
            mb(median_of(&v, |s| s.down["h2"] as f64)),
            mb(median_of(&v, src("source"))),
            mb(median_of(&v, src("h3"))),
            mb(median_of(&v, src("h4"))),
            mb(median_of(&v, img("source"))),
            mb(median_of(&v, img("h3"))),
            mb(median_of(&v, img("h4"))),
            median_of(&v, |s| s.source_uplink_mbit),
            median_of(&v, |s| s.client_mbit),
            if trad > 0.0 { total / trad } else { 0.0 },
        ));
    }
    md
}

fn plot(samples: &[Sample], path: &Path) -> Result<()> {
    let err = |e: &dyn std::fmt::Debug| anyhow::anyhow!("draw the plot: {e:?}");
    let modes: Vec<&str> = MODES
        .iter()
        .copied()
        .filter(|m| samples.iter().any(|s| s.mode == *m))
        .collect();
    let val = |m: &str, f: &dyn Fn(&Sample) -> f64| {
        let v: Vec<&Sample> = samples.iter().filter(|s| s.mode == m).collect();
        median_of(&v, f)
    };
    let ymax = modes
        .iter()
        .map(|m| val(m, &|s| s.total_ms / 1000.0))
        .fold(1.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Migration h1 -> h2: total time and source uplink bytes per mode",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..modes.len() as f64, 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("seconds (bars: total; dark: downtime)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, m) in modes.iter().enumerate() {
        let x = i as f64;
        let total = val(m, &|s| s.total_ms / 1000.0);
        let down = val(m, &|s| s.downtime_ms / 1000.0);
        let up = val(m, &|s| s.up["h1"] as f64 / 1e6);
        chart
            .draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, total)],
                RGBColor(31, 119, 180).filled(),
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, down)],
                RGBColor(20, 50, 90).filled(),
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([Text::new(
                format!("{total:.1} s, src {up:.0} MB"),
                (x + 0.12, total + ymax * 0.03),
                ("sans-serif", 13),
            )])
            .map_err(|e| err(&e))?;
        chart
            .draw_series([Text::new(
                m.to_string(),
                (x + 0.12, -ymax * 0.04),
                ("sans-serif", 13),
            )])
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

fn bench(args: &CoopArgs, tl: &mut Timeline) -> Result<()> {
    if args.repeats == 0 || args.hot_mb >= args.volume_mb {
        bail!("--repeats must be at least 1 and --hot-mb below --volume-mb");
    }
    if let Some(m) = args.modes.iter().find(|m| !MODES.contains(&m.as_str())) {
        bail!(
            "unknown mode {m:?} in --modes: the rows are {}",
            MODES.join(", ")
        );
    }
    if args.no_setup {
        tl.skip("setup", "--no-setup");
    } else {
        tl.step("setup", || setup::setup(&args.setup))?;
    }
    tl.step(&format!("build ({} profile)", args.profile), || {
        let mut c = cargo();
        c.args(["build", "-p", "xfer-agent", "-p", "xfer-cli", "--bins"]);
        if args.profile == "release" {
            c.arg("--release");
        }
        run(&mut c)
    })?;
    let meta = capture(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value = serde_json::from_str(&meta)?;
    let bin_dir =
        PathBuf::from(v["target_directory"].as_str().context("target dir")?).join(&args.profile);
    let kb_dir = PathBuf::from("/dev/shm/xfer-bench-coop");
    let _ = std::fs::remove_dir_all(&kb_dir);
    std::fs::create_dir_all(&kb_dir)?;
    let mut lab = Lab {
        xfer: bin_dir.join("xfer"),
        prefix: args.prefix.clone(),
        endpoints: BTreeMap::new(),
        kb_dir: kb_dir.clone(),
    };
    let _ = capture(&mut lab.xfer(&["lab", "down"]));
    let res = run_all(args, tl, &mut lab);
    if !args.keep_lab {
        let _ = capture(&mut lab.xfer(&["lab", "down"]));
    }
    let _ = std::fs::remove_dir_all(&kb_dir);
    let samples = res?;
    let md = markdown(args, &samples);
    println!("{md}");
    let out = args
        .out_dir
        .clone()
        .unwrap_or_else(|| crate::util::repo_root().join("bench/results"));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("cooperative.md"), &md)?;
    std::fs::write(
        out.join("cooperative.json"),
        serde_json::to_string_pretty(&samples)?,
    )?;
    plot(&samples, &out.join("cooperative.svg"))?;
    Ok(())
}

fn run_all(args: &CoopArgs, tl: &mut Timeline, lab: &mut Lab) -> Result<Vec<Sample>> {
    tl.step("lab up (4 hosts, shaped)", || {
        let rates: Vec<String> = HOSTS
            .iter()
            .map(|h| {
                let r = if *h == "h2" {
                    &args.dst_link
                } else {
                    &args.link
                };
                format!("{h}={r}")
            })
            .chain([format!("client={}", args.client_link)])
            .collect();
        let mut c = lab.xfer(&["lab", "up", "--nodes", "4"]);
        for r in &rates {
            c.args(["--rate", r]);
        }
        capture(&mut c)?;
        // Only where the service starts: it reaches h4 and h1 with its migrations.
        capture(&mut lab.xfer(&["image", "import", "--host", "h3", &args.image]))?;
        Ok(())
    })?;
    let st = lab.status()?;
    for h in st["hosts"].as_array().context("hosts")? {
        lab.endpoints.insert(
            h["name"].as_str().context("name")?.to_string(),
            h["endpoint"].as_str().context("endpoint")?.to_string(),
        );
    }
    tl.step("seed: service on h3, then h3 -> h4 -> h1", || {
        let base = (args.volume_mb - args.hot_mb) * 1_000_000;
        let hot = args.hot_mb * 1_000_000;
        let script = format!(
            "head -c {base} /dev/urandom > /data/base && head -c {hot} /dev/urandom > /data/hot \
             && touch /data/ready; i=0; while true; do i=$((i+1)); echo $i > /data/count; sleep 0.1; done"
        );
        capture(&mut lab.xfer(&[
            "run", "--host", "h3", "--image", &args.image, "--name", "app", "-v", "data:/data",
            "--", "sh", "-c", &script,
        ]))?;
        let ready = lab.work_dir("h3").join("volumes/data/ready");
        let t = Instant::now();
        while !ready.exists() {
            if t.elapsed() > Duration::from_secs(120) {
                bail!("the service did not fill its volume");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        lab.migrate("h3", "h4")?;
        lab.migrate("h4", "h1")?;
        Ok(())
    })?;
    let mut samples = Vec::new();
    for r in 0..args.repeats {
        for m in MODES
            .into_iter()
            .filter(|m| args.modes.is_empty() || args.modes.iter().any(|x| x == m))
        {
            let s = tl.step(&format!("{m} (run {})", r + 1), || {
                // The destination lacks the image (and, below, any chunk).
                capture(&mut lab.xfer(&["image", "rm", "--host", "h2", &args.image]))?;
                lab.configure(m, true)?;
                let s = one(lab, m, !args.no_client_load)?;
                lab.migrate("h2", "h1")?;
                Ok(s)
            })?;
            println!(
                "  {m}: total {:.2} s, downtime {:.0} ms, source up {} MB, client {:.1} Mbit/s, sources {:?} (image {:?})",
                s.total_ms / 1000.0,
                s.downtime_ms,
                mb(s.up["h1"] as f64),
                s.client_mbit,
                s.sources,
                s.image_sources
            );
            samples.push(s);
        }
    }
    Ok(samples)
}
