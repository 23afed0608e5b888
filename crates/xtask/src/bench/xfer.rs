//! One xfer migration under load: a fresh two-host lab, redis with the dataset on h1, the
//! load from the client namespace, `xfer migrate --json` to h2, then the checks.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{self, LoadGen, LoadReport, Place, Verify};
use super::netns::wait_for_pong;
use crate::demo::{parse_lab_status, parse_redis_integer};
use crate::util::{capture, capture_any, describe};

pub const CONTAINER: &str = "redis";
pub const IMAGE: &str = "redis";

/// A lab brought up by the benchmark; `lab down` when dropped.
#[derive(Debug)]
pub struct Lab {
    xfer: PathBuf,
    prefix: String,
    up: bool,
    pub h2: Ipv4Addr,
    pub subnet: Ipv4Addr,
}

impl Lab {
    fn cmd(xfer: &Path, prefix: &str, what: &[&str]) -> Command {
        let mut c = Command::new(xfer);
        c.args(["--prefix", prefix]).args(what);
        c
    }

    /// `xfer lab down` for a prefix (clears what an interrupted run left).
    pub fn down_prefix(xfer: &Path, prefix: &str) -> Result<()> {
        capture(&mut Self::cmd(xfer, prefix, &["lab", "down"])).map(|_| ())
    }

    /// `xfer lab up --nodes 2 [--rate RATE]` and its addresses.
    pub fn up(xfer: &Path, prefix: &str, rate: Option<&str>) -> Result<Lab> {
        let mut c = Self::cmd(xfer, prefix, &["lab", "up", "--nodes", "2"]);
        if let Some(r) = rate {
            c.args(["--rate", r]);
        }
        let mut lab = Lab {
            xfer: xfer.to_path_buf(),
            prefix: prefix.to_string(),
            up: true,
            h2: Ipv4Addr::UNSPECIFIED,
            subnet: Ipv4Addr::UNSPECIFIED,
        };
        capture(&mut c)?;
        let json = capture(&mut Self::cmd(xfer, prefix, &["lab", "status", "--json"]))?;
        let addrs = parse_lab_status(&json)?;
        lab.h2 = addrs.host("h2")?.parse().context("h2's address")?;
        let v: serde_json::Value = serde_json::from_str(&json).context("lab status")?;
        lab.subnet = v["subnet"]
            .as_str()
            .context("lab status without subnet")?
            .parse()
            .context("lab subnet")?;
        Ok(lab)
    }

    pub fn xfer(&self, args: &[&str]) -> Command {
        Self::cmd(&self.xfer, &self.prefix, args)
    }

    pub fn client_netns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    pub fn h2_netns(&self) -> String {
        format!("{}-h2", self.prefix)
    }

    /// The container's own address (.200 of the lab's subnet).
    pub fn service_ip(&self) -> Ipv4Addr {
        let o = self.subnet.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 200)
    }

    pub fn client(&self) -> Place {
        Place::LabClient {
            xfer: self.xfer.clone(),
            prefix: self.prefix.clone(),
        }
    }

    pub fn redis_cli(&self, args: &[&str]) -> Result<String> {
        let ip = self.service_ip().to_string();
        let mut c = self.xfer(&["lab", "exec", "--node", "client", "--"]);
        c.args(["redis-cli", "-h", &ip]).args(args);
        capture(&mut c)
    }

    pub fn dbsize(&self) -> Result<u64> {
        let out = self.redis_cli(&["DBSIZE"])?;
        parse_redis_integer(&out).with_context(|| format!("DBSIZE answered {:?}", out.trim()))
    }

    pub fn down(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        capture(&mut self.xfer(&["lab", "down"])).map(|_| ())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("warning: lab down: {e:#}");
        }
    }
}

/// One migration phase of xfer's report.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub ms: f64,
    pub bytes: u64,
}

/// One pre-copy round (the last one is the final dump, taken while frozen).
#[derive(Debug, Clone)]
pub struct Round {
    pub dump_ms: f64,
    pub delta_wire_bytes: u64,
}

/// What `xfer migrate --json` reported.
#[derive(Debug, Clone)]
pub struct MigrateReport {
    pub downtime_ms: f64,
    pub total_ms: f64,
    pub bytes_sent: u64,
    pub phases: Vec<Phase>,
    pub rounds: Vec<Round>,
}

impl MigrateReport {
    pub fn parse(text: &str) -> Result<MigrateReport> {
        let v: serde_json::Value = serde_json::from_str(text.trim()).with_context(|| {
            let shown: String = text.chars().take(300).collect();
            format!("parse `xfer migrate --json` output {shown:?}")
        })?;
        let f = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("migrate report without {k}"))
        };
        let phases = v["phases"]
            .as_array()
            .context("migrate report without phases")?
            .iter()
            .map(|p| {
                Ok(Phase {
                    name: p["name"]
                        .as_str()
                        .context("phase without name")?
                        .to_string(),
                    ms: p["ms"].as_f64().context("phase without ms")?,
                    bytes: p["bytes"].as_u64().unwrap_or(0),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rounds = v["rounds"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| Round {
                        dump_ms: r["dump_ms"].as_f64().unwrap_or(0.0),
                        delta_wire_bytes: r["delta_wire_bytes"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(MigrateReport {
            downtime_ms: f("downtime_ms")?,
            total_ms: f("total_ms")?,
            bytes_sent: v["bytes_sent"]
                .as_u64()
                .context("migrate report without bytes_sent")?,
            phases,
            rounds,
        })
    }

    /// Pre-copy rounds taken while the container ran (phases `precopy.N`).
    pub fn live_rounds(&self) -> usize {
        self.phases
            .iter()
            .filter(|p| p.name.starts_with("precopy."))
            .count()
    }
}

/// Everything measured about one migration.
#[derive(Debug, Clone)]
pub struct XferSample {
    pub migrate: MigrateReport,
    /// Wall time of the `xfer migrate` command.
    pub wall_ms: f64,
    pub load: LoadReport,
    pub verify: Verify,
    pub keys_before: u64,
    pub keys_after: u64,
    pub keys_expected: u64,
}

impl XferSample {
    pub fn keys_ok(&self) -> bool {
        self.keys_after == self.keys_expected
    }
}

/// Settings shared by the samples.
#[derive(Debug, Clone)]
pub struct XferSetup {
    pub xfer: PathBuf,
    pub loadgen: PathBuf,
    pub prefix: String,
    pub keys: u64,
    pub value_size: u32,
    pub pace_us: u64,
    /// Load before the migration starts and after it ends, seconds.
    pub settle_s: f64,
    pub work: PathBuf,
}

/// Imports the image into h1, starts redis there with its own address and fills it.
pub fn deploy(s: &XferSetup, lab: &Lab) -> Result<()> {
    capture(&mut lab.xfer(&["image", "import", "--host", "h1", IMAGE])).context("image import")?;
    let ip = lab.service_ip();
    let cidr = format!("{ip}/24");
    let mut run = lab.xfer(&["run", "--host", "h1", "--image", IMAGE, "--name", CONTAINER]);
    run.args(["--address", &cidr, "--"])
        .args(["redis-server", "--port", "6379", "--save", ""])
        .args(["--appendonly", "no", "--protected-mode", "no"])
        .args(["--enable-debug-command", "yes"]);
    capture(&mut run).context("start redis")?;
    wait_for_pong(
        Some(&lab.client_netns()),
        SocketAddr::from((ip, 6379)),
        Duration::from_secs(30),
    )
    .context("redis on h1")?;
    let out = lab.redis_cli(&[
        "DEBUG",
        "POPULATE",
        &s.keys.to_string(),
        "key",
        &s.value_size.to_string(),
    ])?;
    if out.trim() != "OK" {
        bail!("DEBUG POPULATE answered {:?}", out.trim());
    }
    let n = lab.dbsize()?;
    if n != s.keys {
        bail!("redis holds {n} keys after POPULATE, expected {}", s.keys);
    }
    Ok(())
}

/// Migrates h1 -> h2 under load in a lab after [`deploy`]. `window_s` is how long
/// the load runs in all.
pub fn sample(s: &XferSetup, lab: &Lab, mode: &str, window_s: f64) -> Result<XferSample> {
    let ip = lab.service_ip();
    let addr = format!("{ip}:6379");
    let keys_before = lab.dbsize()?;
    let out = s.work.join(format!("load-{mode}.json"));
    let mut gen = LoadGen::start(&lab.client(), &s.loadgen, &addr, window_s, s.pace_us, &out)
        .context("start the load")?;
    std::thread::sleep(Duration::from_secs_f64(s.settle_s));
    if !gen.running() {
        let r = gen.finish(true, window_s);
        bail!("the load generator stopped early: {r:?}");
    }

    let mut m = lab.xfer(&["migrate", CONTAINER, "--from", "h1", "--to", "h2"]);
    m.args(["--mode", mode, "--json"]);
    let what = describe(&m);
    let t0 = Instant::now();
    let res = capture_any(&mut m)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    if !res.success() {
        bail!("{what} failed ({}): {}", res.status, res.combined().trim());
    }
    let migrate = MigrateReport::parse(&res.stdout)?;
    std::thread::sleep(Duration::from_secs_f64(s.settle_s));
    let covered = gen.running();
    let load = gen.finish(covered, window_s)?;
    let verify = load::verify(&lab.client(), &s.loadgen, &addr, &out)?;
    let keys_after = lab.dbsize()?;
    Ok(XferSample {
        migrate,
        wall_ms,
        keys_expected: load::expected_keys(keys_before, &load),
        load,
        verify,
        keys_before,
        keys_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_migrate_report() {
        let text = r#"{"bytes_sent": 34270018, "downtime_ms": 8962.2, "total_ms": 41404.0,
            "phases": [{"bytes": 0, "ms": 22.0, "name": "freeze"},
                       {"bytes": 21338992, "ms": 24469.8, "name": "precopy.1"},
                       {"bytes": 3549002, "ms": 3043.2, "name": "precopy.2"}],
            "rounds": [{"round": 1, "dump_ms": 684.4, "delta_wire_bytes": 21338992},
                       {"round": 2, "dump_ms": 627.7, "delta_wire_bytes": 3549002}]}"#;
        let r = MigrateReport::parse(text).expect("parses");
        assert_eq!(r.bytes_sent, 34_270_018);
        assert_eq!(r.live_rounds(), 2);
        assert_eq!(r.rounds.len(), 2);
        assert_eq!(r.phases[0].name, "freeze");
        assert!(MigrateReport::parse(r#"{"phases": []}"#).is_err());
    }
}
