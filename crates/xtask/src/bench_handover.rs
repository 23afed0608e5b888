//! `cargo xtask bench handover`: what the Mobile-IP-style handover costs clients.
//!
//! Per repetition, in a fresh two-host lab:
//! * **handover gap**: a redis with the dataset under a write load over one open
//!   connection from the client namespace is live-migrated h1 -> h2, once with a
//!   *routed* home address (h1 becomes the home agent and tunnels to h2) and once with
//!   a *bridged* address (moved by gratuitous ARP on the shared link: the baseline of
//!   the same migration without a tunnel). The gap is the longest silence the client
//!   saw; every acknowledged write is verified afterwards.
//! * **tunnel cost**: one TCP stream into a sink container with a routed address:
//!   at home (h1, no tunnel), after its migration to h2 (through the home agent's
//!   tunnel), and after `xfer rebind` (direct to h2).
//!
//! Results: bench/results/handover.md (also printed) and handover.json.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::setup::SetupArgs;
use crate::util::{capture, Timeline};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench handover",
    about = "Handover gap and tunnel cost of xfer's home-agent forwarding"
)]
pub struct HandoverArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Skip `xtask setup` before the run.
    #[arg(long)]
    pub no_setup: bool,
    /// Cargo profile of the binaries under test.
    #[arg(long, default_value = "release", value_parser = ["release", "debug"])]
    pub profile: String,
    /// Lab prefix.
    #[arg(long, default_value = "bh")]
    pub prefix: String,
    /// Repetitions; medians and min/max are reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Keys of the redis dataset (DEBUG POPULATE N key 256).
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// MiB per throughput sample.
    #[arg(long, default_value_t = 512)]
    pub mib: u64,
    /// Where the results go (default: bench/results).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
struct Sample {
    gap_routed_ms: f64,
    downtime_routed_ms: f64,
    binding_ms: f64,
    gap_bridged_ms: f64,
    downtime_bridged_ms: f64,
    home_mbit: f64,
    tunnel_mbit: f64,
    rebound_mbit: f64,
    tunnel_kind: String,
}

pub fn main(argv: &[String]) -> Result<()> {
    crate::util::run_bench::<HandoverArgs>("cargo xtask bench handover", argv, bench)
}

struct Bins {
    xfer: PathBuf,
    loadgen: PathBuf,
    prefix: String,
}

impl Bins {
    fn xfer(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.xfer);
        c.args(["--prefix", &self.prefix]).args(args);
        c
    }

    fn in_client(&self, prog: &Path, args: &[&str]) -> Command {
        let mut c = self.xfer(&["lab", "exec", "--node", "client", "--"]);
        c.arg(prog).args(args);
        c
    }

    fn redis_cli(&self, ip: &str, args: &[&str]) -> Result<String> {
        capture(&mut self.in_client(Path::new("redis-cli"), &[&["-h", ip], args].concat()))
    }

    fn wait_pong(&self, ip: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self
                .redis_cli(ip, &["PING"])
                .is_ok_and(|o| o.contains("PONG"))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("redis at {ip} never answered PING")
    }

    fn tput(&self, ip: &str, mib: u64) -> Result<f64> {
        let out = capture(&mut self.in_client(
            &self.loadgen,
            &[
                "tput",
                "--addr",
                &format!("{ip}:5001"),
                "--mib",
                &mib.to_string(),
            ],
        ))?;
        let v: serde_json::Value = serde_json::from_str(out.trim()).context("tput output")?;
        v["mbit_s"].as_f64().context("tput without mbit_s")
    }

    fn load(&self, ip: &str, report: &Path, stop: &Path) -> Result<Child> {
        self.in_client(
            &self.loadgen,
            &[
                "run",
                "--addr",
                &format!("{ip}:6379"),
                "--seconds",
                "300",
                "--stop-file",
                &stop.display().to_string(),
                "--pace-us",
                "500",
                // Long enough that a slow cut-over shows as a gap, not a reconnect.
                "--timeout-ms",
                "15000",
                "--out",
                &report.display().to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the load generator")
    }

    /// Migrates `name` h1 -> h2 under load; returns (client gap, xfer downtime,
    /// binding phase) in ms, after verifying every acknowledged write.
    fn migrate_under_load(&self, ip: &str, name: &str, work: &Path) -> Result<(f64, f64, f64)> {
        let report = work.join(format!("{name}.json"));
        let stop = work.join(format!("{name}.stop"));
        let _ = std::fs::remove_file(&stop);
        let load = self.load(ip, &report, &stop)?;
        std::thread::sleep(Duration::from_millis(2000));
        let migrated =
            capture(&mut self.xfer(&["migrate", name, "--from", "h1", "--to", "h2", "--json"]));
        // The load goes on 2 s past the migration, so the gap falls inside it.
        std::thread::sleep(Duration::from_millis(2000));
        std::fs::write(&stop, b"")?;
        let json = migrated?;
        let out = load.wait_with_output().context("load generator")?;
        if !out.status.success() {
            bail!("load generator: {}", String::from_utf8_lossy(&out.stderr));
        }
        let rep: serde_json::Value = serde_json::from_slice(&out.stdout).context("load report")?;
        if rep["errors"].as_u64() != Some(0) {
            bail!("the client's connection broke during the migration: {rep}");
        }
        capture(&mut self.in_client(
            &self.loadgen,
            &[
                "verify",
                "--addr",
                &format!("{ip}:6379"),
                "--report",
                &report.display().to_string(),
            ],
        ))
        .context("acknowledged writes lost")?;
        let m: serde_json::Value = serde_json::from_str(&json).context("migrate --json")?;
        let binding = m["phases"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == "dst.binding"))
            .and_then(|p| p["ms"].as_f64())
            .unwrap_or(0.0);
        Ok((
            rep["max_gap_ms"].as_f64().unwrap_or(0.0),
            m["downtime_ms"].as_f64().unwrap_or(0.0),
            binding,
        ))
    }
}

fn redis_args() -> Vec<&'static str> {
    vec![
        "--",
        "/usr/bin/redis-server",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--enable-debug-command",
        "yes",
    ]
}

fn one(b: &Bins, args: &HandoverArgs, work: &Path) -> Result<Sample> {
    let mut s = Sample::default();
    capture(&mut b.xfer(&["lab", "up", "--nodes", "2"]))?;
    for h in ["h1", "h2"] {
        for img in ["redis", "busybox"] {
            capture(&mut b.xfer(&["image", "import", "--host", h, img]))?;
        }
    }
    let status: serde_json::Value =
        serde_json::from_str(&capture(&mut b.xfer(&["lab", "status", "--json"]))?)?;
    let subnet: std::net::Ipv4Addr = status["subnet"].as_str().context("lab subnet")?.parse()?;
    let o = subnet.octets();
    let bridged_ip = format!("{}.{}.{}.200", o[0], o[1], o[2]);
    let gateway = format!("{}.{}.{}.254", o[0], o[1], o[2]);

    // Routed redis and the routed sink, both with h1 as home agent.
    let out = capture(
        &mut b.xfer(
            &[
                &[
                    "run",
                    "--host",
                    "h1",
                    "--image",
                    "redis",
                    "--name",
                    "redis",
                    "--address",
                    "home:1",
                    "--routed",
                ][..],
                &redis_args()[..],
            ]
            .concat(),
        ),
    )?;
    let routed_ip = out
        .split_whitespace()
        .skip_while(|w| *w != "address")
        .nth(1)
        .context("run printed no home address")?
        .trim_end_matches(',')
        .to_string();
    let out = capture(&mut b.xfer(&[
        "run",
        "--host",
        "h1",
        "--image",
        "busybox",
        "--name",
        "sink",
        "--address",
        "home:2",
        "--routed",
        "--",
        "sh",
        "-c",
        "while true; do nc -l -p 5001 > /dev/null; done",
    ]))?;
    let sink_ip = out
        .split_whitespace()
        .skip_while(|w| *w != "address")
        .nth(1)
        .context("run printed no home address")?
        .trim_end_matches(',')
        .to_string();
    // The bridged baseline.
    capture(
        &mut b.xfer(
            &[
                &[
                    "run",
                    "--host",
                    "h1",
                    "--image",
                    "redis",
                    "--name",
                    "bredis",
                    "--address",
                    &format!("{bridged_ip}/24"),
                    "--gateway",
                    &gateway,
                ][..],
                &redis_args()[..],
            ]
            .concat(),
        ),
    )?;
    for ip in [&routed_ip, &bridged_ip] {
        b.wait_pong(ip)?;
        b.redis_cli(
            ip,
            &["DEBUG", "POPULATE", &args.keys.to_string(), "key", "256"],
        )?;
    }
    std::thread::sleep(Duration::from_millis(300));

    s.home_mbit = b.tput(&sink_ip, args.mib)?;
    let (g, d, bind) = b.migrate_under_load(&routed_ip, "redis", work)?;
    (s.gap_routed_ms, s.downtime_routed_ms, s.binding_ms) = (g, d, bind);
    let (g, d, _) = b.migrate_under_load(&bridged_ip, "bredis", work)?;
    (s.gap_bridged_ms, s.downtime_bridged_ms) = (g, d);

    capture(&mut b.xfer(&["migrate", "sink", "--from", "h1", "--to", "h2"]))?;
    let bindings = capture(&mut b.xfer(&["bindings", "--on", "h1"]))?;
    s.tunnel_kind = ["vxlan", "ipip", "gre"]
        .into_iter()
        .find(|k| bindings.contains(k))
        .unwrap_or("?")
        .to_string();
    s.tunnel_mbit = b.tput(&sink_ip, args.mib)?;
    capture(&mut b.xfer(&["rebind", "--home-agent", "h1", "--netns", "client"]))?;
    s.rebound_mbit = b.tput(&sink_ip, args.mib)?;
    capture(&mut b.xfer(&["lab", "down"]))?;
    Ok(s)
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn bench(args: &HandoverArgs, tl: &mut Timeline) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let bin_dir = crate::util::setup_and_build(tl, &args.setup, args.no_setup, &args.profile)?;
    let b = Bins {
        xfer: bin_dir.join("xfer"),
        loadgen: bin_dir.join("xfer-loadgen"),
        prefix: args.prefix.clone(),
    };
    let work = PathBuf::from("/dev/shm/xfer-bench-handover");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let _ = capture(&mut b.xfer(&["lab", "down"]));
    let mut samples = Vec::new();
    for r in 0..args.repeats {
        let s = tl.step(&format!("repetition {}", r + 1), || {
            let res = one(&b, args, &work);
            let _ = capture(&mut b.xfer(&["lab", "down"]));
            res
        })?;
        println!("  {s:?}");
        samples.push(s);
    }
    let _ = std::fs::remove_dir_all(&work);
    let col = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let fmt = |(m, lo, hi): (f64, f64, f64)| format!("{m:.0} ({lo:.0}–{hi:.0})");
    let (home, tunnel, rebound) = (
        col(|s| s.home_mbit),
        col(|s| s.tunnel_mbit),
        col(|s| s.rebound_mbit),
    );
    let kind = samples
        .first()
        .map(|s| s.tunnel_kind.clone())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut md = String::new();
    md.push_str("# Handover benchmark: gap and tunnel cost\n\n");
    md.push_str(&format!(
        "Produced by `cargo xtask bench handover` ({} profile), {} repetitions, each in a fresh 2-host lab (unshaped veth links); medians with min–max. Redis dataset: DEBUG POPULATE {} key 256; write load `xfer-loadgen run --pace-us 500 --timeout-ms 15000` over one connection from the client namespace. Tunnel kind picked by the kernel probe: **{kind}**. Load average at the end: {}.\n\n",
        args.profile,
        args.repeats,
        args.keys,
        load.trim()
    ));
    md.push_str("## Handover gap (open TCP connection, live pre-copy migration h1 -> h2)\n\n");
    md.push_str("| address | longest silence the client saw, ms | xfer downtime (freeze -> running), ms | binding registration, ms | lost writes |\n|---|---:|---:|---:|---|\n");
    md.push_str(&format!(
        "| routed (home agent h1 tunnels to h2) | {} | {} | {} | none |\n",
        fmt(col(|s| s.gap_routed_ms)),
        fmt(col(|s| s.downtime_routed_ms)),
        fmt(col(|s| s.binding_ms))
    ));
    md.push_str(&format!(
        "| bridged (gratuitous ARP on the shared link), baseline | {} | {} | — | none |\n\n",
        fmt(col(|s| s.gap_bridged_ms)),
        fmt(col(|s| s.downtime_bridged_ms))
    ));
    md.push_str("## Tunnel cost (one TCP stream into a sink, client namespace -> container)\n\n");
    md.push_str(&format!(
        "| path | Mbit/s | ÷ direct to h2 |\n|---|---:|---:|\n| at home on h1, no tunnel | {} | {:.2} |\n| after the migration, through the home agent's {kind} tunnel | {} | **{:.2}** |\n| after `xfer rebind`, direct to h2 | {} | 1.00 |\n\n",
        fmt(home),
        home.0 / rebound.0.max(1e-9),
        fmt(tunnel),
        tunnel.0 / rebound.0.max(1e-9),
        fmt(rebound),
    ));
    md.push_str(&format!("{} MiB per sample. Every sample of every repetition completed; a broken connection or a lost write fails the benchmark.\n", args.mib));
    println!("\n{md}");
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| crate::util::repo_root().join("bench/results"));
    std::fs::create_dir_all(&out_dir)?;
    std::fs::write(out_dir.join("handover.md"), &md)?;
    std::fs::write(
        out_dir.join("handover.json"),
        serde_json::to_string_pretty(&samples)?,
    )?;
    println!("wrote {}", out_dir.join("handover.md").display());
    Ok(())
}
