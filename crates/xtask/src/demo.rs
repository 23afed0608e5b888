//! `cargo xtask demo`: lab up, a stateful redis with its own address on h1 under a
//! client write load, live-migrate it to h2, check every key and every acknowledged
//! write, lab down.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{self, SetupArgs};
use crate::util::{capture, capture_any, cargo, describe, run, Timeline};

const CONTAINER: &str = "demo-redis";
const IMAGE: &str = "redis";

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Lab prefix (names of namespaces, bridges and containerd instances start with it).
    #[arg(long, default_value = "xd")]
    pub prefix: String,
    /// Number of keys to put into redis before migrating it.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// The `xfer` binary to drive (default: <target dir>/debug/xfer, built by this command).
    #[arg(long, env = "XFER_BIN")]
    pub xfer: Option<PathBuf>,
}

/// Addresses from `xfer lab status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabAddresses {
    pub hosts: Vec<(String, String)>,
    pub client: Option<String>,
}

impl LabAddresses {
    pub fn host(&self, name: &str) -> Result<&str> {
        self.hosts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a.as_str())
            .with_context(|| {
                let names: Vec<&str> = self.hosts.iter().map(|(n, _)| n.as_str()).collect();
                format!(
                    "`xfer lab status --json` has no host {name} (hosts: {})",
                    names.join(", ")
                )
            })
    }
}

/// Parses `{"prefix":..,"hosts":[{"name":"h1","address":"10.x.y.z",..}],"client":{"address":..}}`.
/// A "/len" suffix on an address is dropped.
pub fn parse_lab_status(json: &str) -> Result<LabAddresses> {
    let v: serde_json::Value = serde_json::from_str(json).with_context(|| {
        let shown: String = json.chars().take(300).collect();
        format!("parse `xfer lab status --json` output {shown:?}")
    })?;
    let strip = |a: &str| a.split('/').next().unwrap_or(a).to_string();
    let hosts = v["hosts"]
        .as_array()
        .context("`xfer lab status --json`: no \"hosts\" array")?
        .iter()
        .map(|h| {
            let name = h["name"].as_str().context("a host without \"name\"")?;
            let addr = h["address"]
                .as_str()
                .with_context(|| format!("host {name} without \"address\""))?;
            Ok((name.to_string(), strip(addr)))
        })
        .collect::<Result<Vec<_>>>()?;
    let client = v["client"]["address"].as_str().map(strip);
    Ok(LabAddresses { hosts, client })
}

/// Reads an integer reply of `redis-cli` ("100000" when not on a tty, "(integer) 100000" on one).
pub fn parse_redis_integer(out: &str) -> Option<u64> {
    let t = out.trim();
    let t = t.strip_prefix("(integer)").unwrap_or(t).trim();
    t.parse().ok()
}

struct Demo {
    xfer: PathBuf,
    prefix: String,
}

impl Demo {
    fn xfer(&self) -> Command {
        Command::new(&self.xfer)
    }

    fn lab(&self, what: &str) -> Command {
        let mut c = self.xfer();
        c.args(["lab", what, "--prefix", &self.prefix]);
        c
    }

    /// `xfer lab exec --prefix P --node client -- redis-cli -h ADDR <args>`, captured.
    fn redis_cli(&self, addr: &str, args: &[&str]) -> Result<String> {
        let mut c = self.xfer();
        c.args([
            "lab",
            "exec",
            "--prefix",
            &self.prefix,
            "--node",
            "client",
            "--",
        ])
        .args(["redis-cli", "-h", addr])
        .args(args);
        let out = capture(&mut c)?;
        println!("  {} -> {}", describe(&c), out.trim());
        Ok(out)
    }

    /// Polls `PING` until the server answers `PONG`.
    fn wait_for_redis(&self, addr: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut c = self.xfer();
        c.args([
            "lab",
            "exec",
            "--prefix",
            &self.prefix,
            "--node",
            "client",
            "--",
        ])
        .args(["redis-cli", "-h", addr, "PING"]);
        loop {
            let out = capture_any(&mut c)?;
            if out.success() && out.stdout.trim() == "PONG" {
                println!("  redis at {addr} answers PING");
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis at {addr} did not answer PING within {}s; last answer: {}",
                    timeout.as_secs(),
                    out.combined().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn dbsize(&self, addr: &str) -> Result<u64> {
        let out = self.redis_cli(addr, &["DBSIZE"])?;
        parse_redis_integer(&out).with_context(|| format!("DBSIZE answered {:?}", out.trim()))
    }
}

/// Runs `xfer lab down` when dropped unless it already ran (covers panics and early returns).
struct LabGuard<'a> {
    demo: &'a Demo,
    armed: bool,
}

impl LabGuard<'_> {
    fn down(&mut self, tl: &mut Timeline) -> Result<()> {
        self.armed = false;
        tl.step("lab down", || run(&mut self.demo.lab("down")))
    }
}

impl Drop for LabGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = run(&mut self.demo.lab("down")) {
                eprintln!("warning: lab down: {e:#}");
            }
        }
    }
}

fn target_dir() -> Result<PathBuf> {
    let meta = capture(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value = serde_json::from_str(&meta).context("parse cargo metadata")?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

pub fn demo(args: &DemoArgs) -> Result<()> {
    let mut tl = Timeline::new("cargo xtask demo");
    let result = run_demo(args, &mut tl);
    tl.print_summary();
    result
}

fn run_demo(args: &DemoArgs, tl: &mut Timeline) -> Result<()> {
    tl.step("setup", || setup::setup(&args.setup))?;
    tl.step("build", || {
        run(cargo().args(["build", "--workspace", "--bins"]))
    })?;
    let xfer = match &args.xfer {
        Some(p) => p.clone(),
        None => target_dir()?.join("debug/xfer"),
    };
    if !xfer.is_file() {
        bail!("{} was not built", xfer.display());
    }
    let demo = Demo {
        xfer,
        prefix: args.prefix.clone(),
    };

    tl.step("lab down (clear an earlier run)", || {
        if let Err(e) = run(&mut demo.lab("down")) {
            println!("  (ignored: {e:#})");
        }
        Ok(())
    })?;

    let mut guard = LabGuard {
        demo: &demo,
        armed: true,
    };
    let result = lab_session(args, &demo, tl);
    let down = guard.down(tl);
    result?;
    down
}

fn lab_session(args: &DemoArgs, demo: &Demo, tl: &mut Timeline) -> Result<()> {
    let prefix = args.prefix.as_str();
    tl.step("lab up (3 nodes)", || {
        run(demo.lab("up").args(["--nodes", "3"]))
    })?;
    let lab = tl.step("lab status", || {
        run(&mut demo.lab("status"))?;
        let json = capture(demo.lab("status").arg("--json"))?;
        parse_lab_status(&json)
    })?;
    let h1_host = lab.host("h1")?.to_string();
    let h2_host = lab.host("h2")?.to_string();
    // The container's own address (the lab subnet's .200): it moves with the container.
    let service = match h1_host.rsplit_once('.') {
        Some((net, _)) => format!("{net}.200"),
        None => bail!("h1's address {h1_host} is not IPv4"),
    };
    println!("h1 = {h1_host}, h2 = {h2_host}, redis = {service}");
    let (h1, h2) = (service.clone(), service.clone());

    tl.step("image import (redis into h1)", || {
        run(demo
            .xfer()
            .args(["image", "import", "--prefix", prefix, "--host", "h1", IMAGE]))
    })?;
    tl.step("run redis on h1", || {
        run(demo
            .xfer()
            .args(["run", "--prefix", prefix, "--host", "h1", "--image", IMAGE])
            .args([
                "--name",
                CONTAINER,
                "--address",
                &format!("{service}/24"),
                "--",
            ])
            .args(["redis-server", "--port", "6379", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            // Redis 7 refuses DEBUG (used for POPULATE below) unless this is set.
            .args(["--enable-debug-command", "yes"]))?;
        demo.wait_for_redis(&h1, Duration::from_secs(30))
    })?;

    let keys = args.keys.to_string();
    tl.step(&format!("fill redis with {} keys", args.keys), || {
        let out = demo.redis_cli(&h1, &["DEBUG", "POPULATE", &keys, "key", "64"])?;
        if out.trim() != "OK" {
            bail!("DEBUG POPULATE answered {:?}", out.trim());
        }
        let n = demo.dbsize(&h1)?;
        if n != args.keys {
            bail!("h1 holds {n} keys after POPULATE, expected {}", args.keys);
        }
        Ok(())
    })?;

    // A client in the client namespace writes steadily over one connection while the
    // container moves.
    let loadgen = demo
        .xfer
        .parent()
        .map(|d| d.join("xfer-loadgen"))
        .context("locate xfer-loadgen")?;
    let report = std::env::temp_dir().join("xfer-demo-load.json");
    let load = demo
        .xfer()
        .args(["lab", "exec", "--prefix", prefix, "--node", "client", "--"])
        .arg(&loadgen)
        .args([
            "run",
            "--addr",
            &format!("{service}:6379"),
            "--seconds",
            "8",
        ])
        .arg("--out")
        .arg(&report)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the client load")?;
    std::thread::sleep(Duration::from_secs(2));
    tl.step("migrate h1 -> h2 (live, pre-copy)", || {
        run(demo
            .xfer()
            .args(["migrate", CONTAINER, "--prefix", prefix])
            .args(["--from", "h1", "--to", "h2"]))
    })?;
    tl.step("client during the migration", || {
        let out = load
            .wait_with_output()
            .context("wait for the client load")?;
        if !out.status.success() {
            bail!("the client load failed");
        }
        println!(
            "  client saw: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        run(demo
            .xfer()
            .args(["lab", "exec", "--prefix", prefix, "--node", "client", "--"])
            .arg(&loadgen)
            .args(["verify", "--addr", &format!("{service}:6379"), "--report"])
            .arg(&report))
    })?;

    tl.step("check redis on h2", || {
        demo.wait_for_redis(&h2, Duration::from_secs(15))?;
        let n = demo.dbsize(&h2)?;
        // The client's writes added keys (k:N and ctr) on top of the populated ones.
        if n < args.keys {
            bail!(
                "h2 holds {n} keys after migration, expected at least {}",
                args.keys
            );
        }
        println!(
            "  h2 holds all {} keys (+{} written by the client)",
            args.keys,
            n - args.keys
        );
        Ok(())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_status_json() {
        let json = r#"{"prefix":"xd","hosts":[
            {"name":"h1","address":"10.77.0.11","containerd":"/run/xd/h1.sock"},
            {"name":"h2","address":"10.77.0.12/24"}],
            "client":{"address":"10.77.0.2"}}"#;
        let lab = parse_lab_status(json).expect("parses");
        assert_eq!(lab.host("h1").expect("h1"), "10.77.0.11");
        assert_eq!(lab.host("h2").expect("h2"), "10.77.0.12");
        assert_eq!(lab.client.as_deref(), Some("10.77.0.2"));
        let err = lab.host("h9").expect_err("no h9");
        assert!(format!("{err:#}").contains("hosts: h1, h2"));
    }

    #[test]
    fn lab_status_bad_json() {
        assert!(parse_lab_status("not json").is_err());
        assert!(parse_lab_status(r#"{"prefix":"xd"}"#).is_err());
        assert!(parse_lab_status(r#"{"hosts":[{"name":"h1"}]}"#).is_err());
    }

    #[test]
    fn redis_integers() {
        assert_eq!(parse_redis_integer("100000\n"), Some(100_000));
        assert_eq!(parse_redis_integer("(integer) 42\n"), Some(42));
        assert_eq!(parse_redis_integer("ERR unknown command"), None);
    }
}
