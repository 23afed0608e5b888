//! The Podman cold path: the same redis (same binaries, same dataset) in Podman,
//! `podman container checkpoint --export F --compress zstd`, the copy of F, `podman rm`,
//! `podman container restore --import F`.
//!
//! The image comes from `xfer_runtime::image::ImageBuilder` (this machine's redis
//! binaries, as in the lab) written as an OCI layout and pulled with `oci:DIR`, so no
//! registry is involved. The container gets a fixed address and MAC on Podman's CNI
//! bridge so the restored one is reachable where the old one was, and the load
//! generator (in this, the root, namespace) keeps its connection across the restore
//! (`--tcp-established` on both sides).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xfer_runtime::image::ImageBuilder;

use super::load::{self, LoadGen, LoadReport, Place, Verify, RESET_SCRIPT};
use super::netns::{copy_over_link, wait_for_pong};
use crate::demo::parse_redis_integer;
use crate::parse::parse_criu_version;
use crate::util::{capture, capture_any, describe};

pub const NAME: &str = "xfer-bench-redis";
/// A fixed address in Podman's default network (10.88.0.0/16) and a fixed MAC, so the
/// restored container answers where the checkpointed one did.
pub const IP: Ipv4Addr = Ipv4Addr::new(10, 88, 213, 77);
const MAC: &str = "02:00:0a:58:d5:4d";

/// PATH for podman and the runc it starts: /usr/local/sbin first, so runc finds the
/// CRIU >= 4.2 there, not Debian's 3.17 in /usr/sbin (which fails on this kernel).
pub fn path_env() -> String {
    let rest = std::env::var("PATH").unwrap_or_default();
    let rest: Vec<&str> = rest
        .split(':')
        .filter(|p| !p.is_empty() && *p != "/usr/local/sbin")
        .collect();
    format!("/usr/local/sbin:{}", rest.join(":"))
}

fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env("PATH", path_env());
    c
}

/// Where the checkpoint travels in one sample.
#[derive(Debug, Clone)]
pub struct LinkTarget {
    /// Namespace of the receiving host (the lab's h2) and its address.
    pub ns: String,
    pub addr: Ipv4Addr,
    /// The row's nominal rate, bit/s (for the computed transfer time).
    pub nominal_bps: f64,
}

/// One checkpoint / copy / restore.
#[derive(Debug, Clone)]
pub struct PodmanSample {
    pub checkpoint_ms: f64,
    /// podman's own figures (`--print-stats`), when it printed them: the runtime's
    /// (runc + CRIU) share of the checkpoint, and CRIU's frozen time.
    pub runtime_checkpoint_ms: Option<f64>,
    pub criu_frozen_ms: Option<f64>,
    pub export_bytes: u64,
    /// F sent over the row's lab link (root namespace -> h2) into another directory.
    pub link_copy_ms: f64,
    /// F copied to another directory on the same tmpfs.
    pub local_copy_ms: f64,
    /// F's size at the row's nominal rate.
    pub nominal_copy_ms: f64,
    pub rm_ms: f64,
    /// `podman container restore --import` until redis answered PING.
    pub restore_ms: f64,
    pub load: LoadReport,
    pub verify: Verify,
    pub keys_before: u64,
    pub keys_after: u64,
    pub keys_expected: u64,
}

impl PodmanSample {
    /// checkpoint + copy over the link + restore (the cold path's downtime).
    pub fn downtime_ms(&self) -> f64 {
        self.checkpoint_ms + self.link_copy_ms + self.restore_ms
    }
    /// The same with the copy at the nominal link rate.
    pub fn downtime_nominal_ms(&self) -> f64 {
        self.checkpoint_ms + self.nominal_copy_ms + self.restore_ms
    }
    pub fn keys_ok(&self) -> bool {
        self.keys_after == self.keys_expected
    }
}

/// The Podman container, set up once; removed (with its image) when dropped.
#[derive(Debug)]
pub struct Podman {
    work: PathBuf,
    image_id: Option<String>,
    container: bool,
    keys: u64,
    /// The load keys a previous sample left (deleted before the next one).
    last_set: u64,
    pub criu: String,
    pub version: String,
}

fn redis_cli(args: &[&str]) -> Result<String> {
    let ip = IP.to_string();
    capture(Command::new("redis-cli").args(["-h", &ip]).args(args))
}

fn dbsize() -> Result<u64> {
    let out = redis_cli(&["DBSIZE"])?;
    parse_redis_integer(&out).with_context(|| format!("DBSIZE answered {:?}", out.trim()))
}

fn addr() -> SocketAddr {
    SocketAddr::from((IP, 6379))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `--print-stats` JSON: a duration in microseconds, at the top or under criu_statistics.
fn stat_ms(text: &str, key: &str) -> Option<f64> {
    let start = text.find('{')?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).ok()?;
    let find = |v: &serde_json::Value| v.get(key).and_then(serde_json::Value::as_f64);
    let direct = find(&v);
    let nested = || {
        v.get("container_statistics")?
            .as_array()?
            .iter()
            .find_map(|c| find(c).or_else(|| find(c.get("criu_statistics")?)))
    };
    direct.or_else(nested).map(|us| us / 1000.0)
}

impl Podman {
    /// Checks the tools, puts the redis image into Podman, runs the container and fills it.
    pub fn start(work: &Path, keys: u64, value_size: u32) -> Result<Podman> {
        let mut p = Podman {
            work: work.to_path_buf(),
            image_id: None,
            container: false,
            keys,
            last_set: 0,
            criu: String::new(),
            version: String::new(),
        };
        p.version = capture(podman().arg("--version"))?.trim().to_string();
        // The criu that runc will find on the PATH podman passes on.
        let criu_out = capture(
            Command::new("sh")
                .args(["-c", "command -v criu && criu --version"])
                .env("PATH", path_env()),
        )?;
        let v = parse_criu_version(&criu_out)
            .with_context(|| format!("cannot read the CRIU version from {criu_out:?}"))?;
        let criu_path = criu_out.lines().next().unwrap_or("criu").trim().to_string();
        if v < crate::parse::CriuVersion::new(4, 2, 0) {
            bail!(
                "podman would use CRIU {v} ({criu_path}), which fails on this kernel; need >= 4.2"
            );
        }
        p.criu = format!("{criu_path} {v}");
        p.clear_leftovers();
        std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;

        let layout = work.join("oci");
        let mut b = ImageBuilder::host_binaries(&["/usr/bin/redis-server", "/usr/bin/redis-cli"])
            .context("build the redis image from the host binaries")?;
        b.add_busybox("/bin/busybox").context("add busybox")?;
        b.build()
            .context("build the redis image")?
            .write_layout(&layout)
            .with_context(|| format!("write the OCI layout {}", layout.display()))?;
        let out = capture(
            podman()
                .args(["pull", "-q"])
                .arg(format!("oci:{}", layout.display())),
        )?;
        let id = out
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .context("podman pull printed no image id")?
            .to_string();
        p.image_id = Some(id.clone());

        let mut run = podman();
        run.args(["run", "-d", "--name", NAME])
            .args(["--ip", &IP.to_string(), "--mac-address", MAC])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
            ])
            .arg(&id)
            .args(["/usr/bin/redis-server", "--port", "6379", "--save", ""])
            .args(["--appendonly", "no", "--protected-mode", "no"])
            .args(["--enable-debug-command", "yes"]);
        p.container = true;
        capture(&mut run)?;
        wait_for_pong(None, addr(), Duration::from_secs(30)).context("podman's redis")?;
        let out = redis_cli(&[
            "DEBUG",
            "POPULATE",
            &keys.to_string(),
            "key",
            &value_size.to_string(),
        ])?;
        if out.trim() != "OK" {
            bail!("DEBUG POPULATE answered {:?}", out.trim());
        }
        let n = dbsize()?;
        if n != keys {
            bail!("podman's redis holds {n} keys after POPULATE, expected {keys}");
        }
        Ok(p)
    }

    /// Deletes the previous sample's load keys; the key count must be the dataset again.
    fn reset_keys(&mut self) -> Result<u64> {
        let upto = (self.last_set + 16).to_string();
        let out = redis_cli(&["EVAL", RESET_SCRIPT, "0", &upto])?;
        let n = parse_redis_integer(&out)
            .with_context(|| format!("the reset script answered {:?}", out.trim()))?;
        if n != self.keys {
            bail!(
                "podman's redis holds {n} keys after removing the load's keys, expected {}",
                self.keys
            );
        }
        Ok(n)
    }

    /// Checkpoint, copy over `link`, rm, restore, under load from this namespace.
    pub fn sample(
        &mut self,
        n: usize,
        link: &LinkTarget,
        loadgen: &Path,
        pace_us: u64,
        settle_s: f64,
        window_s: f64,
    ) -> Result<PodmanSample> {
        let keys_before = self.reset_keys()?;
        let f = self.work.join(format!("ckpt-{n}.tar.zst"));
        let recv_dir = self.work.join("received");
        let local_dir = self.work.join("local-copy");
        for d in [&recv_dir, &local_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let f2 = recv_dir.join(format!("ckpt-{n}.tar.zst"));
        let f3 = local_dir.join(format!("ckpt-{n}.tar.zst"));
        for x in [&f, &f2, &f3] {
            let _ = std::fs::remove_file(x);
        }
        let report = self.work.join(format!("load-{n}.json"));
        let a = addr().to_string();
        let mut gen = LoadGen::start(&Place::Here, loadgen, &a, window_s, pace_us, &report)
            .context("start the load")?;
        std::thread::sleep(Duration::from_secs_f64(settle_s));

        // checkpoint
        let mut ck = podman();
        ck.args(["container", "checkpoint", "--export"])
            .arg(&f)
            .args([
                "--compress",
                "zstd",
                "--tcp-established",
                "--print-stats",
                NAME,
            ]);
        let t0 = Instant::now();
        let out = capture_any(&mut ck)?;
        let checkpoint_ms = ms(t0.elapsed());
        if !out.success() {
            bail!("{} failed: {}", describe(&ck), out.combined().trim());
        }
        let runtime_checkpoint_ms = stat_ms(&out.stdout, "runtime_checkpoint_duration");
        let criu_frozen_ms = stat_ms(&out.stdout, "frozen_time");
        let export_bytes = std::fs::metadata(&f)
            .with_context(|| format!("stat {}", f.display()))?
            .len();

        // copy over the lab link
        let (_, link_copy) = copy_over_link(&f, &link.ns, link.addr, &f2)
            .with_context(|| format!("copy the checkpoint to {} in {}", link.addr, link.ns))?;

        // rm, restore from the received copy
        let t1 = Instant::now();
        capture(podman().args(["rm", "-f", NAME]))?;
        let rm_ms = ms(t1.elapsed());
        let mut rs = podman();
        rs.args(["container", "restore", "--import"])
            .arg(&f2)
            .args(["--tcp-established"]);
        let t2 = Instant::now();
        let out = capture_any(&mut rs)?;
        if !out.success() {
            self.container = false;
            bail!("{} failed: {}", describe(&rs), out.combined().trim());
        }
        let t3 = wait_for_pong(None, addr(), Duration::from_secs(30))?;
        let restore_ms = ms(t3 - t2);

        std::thread::sleep(Duration::from_secs_f64(settle_s));
        let covered = gen.running();
        let load = gen.finish(covered, window_s)?;
        let verify = load::verify(&Place::Here, loadgen, &a, &report)?;
        let keys_after = dbsize()?;
        self.last_set = self.last_set.max(load.last_set);

        // for reference: a copy to another directory on the same tmpfs
        let t4 = Instant::now();
        std::fs::copy(&f, &f3)
            .with_context(|| format!("copy {} to {}", f.display(), f3.display()))?;
        let local_copy_ms = ms(t4.elapsed());
        for x in [&f, &f2, &f3] {
            let _ = std::fs::remove_file(x);
        }
        Ok(PodmanSample {
            checkpoint_ms,
            runtime_checkpoint_ms,
            criu_frozen_ms,
            export_bytes,
            link_copy_ms: ms(link_copy),
            local_copy_ms,
            nominal_copy_ms: export_bytes as f64 * 8.0 / link.nominal_bps * 1000.0,
            rm_ms,
            restore_ms,
            keys_expected: load::expected_keys(keys_before, &load),
            load,
            verify,
            keys_before,
            keys_after,
        })
    }

    /// Whether the container is there (a failed restore loses it).
    pub fn alive(&self) -> bool {
        self.container && capture(podman().args(["container", "exists", NAME])).is_ok()
    }

    /// Removes the container, the image and the work directory.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        let out = capture_any(podman().args(["rm", "-f", "--ignore", NAME]))?;
        if !out.success() {
            errors.push(format!("podman rm {NAME}: {}", out.combined().trim()));
        }
        self.container = false;
        if let Some(id) = self.image_id.take() {
            let out = capture_any(podman().args(["rmi", "-f", &id]))?;
            if !out.success() {
                errors.push(format!("podman rmi {id}: {}", out.combined().trim()));
            }
        }
        if self.work.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.work) {
                errors.push(format!("remove {}: {e}", self.work.display()));
            }
        }
        // CNI leaves its bridge behind once the last container is gone; the benchmark
        // made it, so it goes (ignored when absent or still in use).
        let _ = capture_any(std::process::Command::new("ip").args(["link", "del", "cni-podman0"]));
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("podman clean-up: {}", errors.join("; "))
        }
    }

    /// A container of this name left by an interrupted run.
    fn clear_leftovers(&mut self) {
        if let Ok(out) = capture_any(podman().args(["rm", "-f", "--ignore", NAME])) {
            if out.success() && !out.stdout.trim().is_empty() {
                println!("  removed podman container {NAME} left by an earlier run");
            }
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("warning: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn print_stats() {
        let text = r#"{"podman_checkpoint_duration": 2500000, "container_statistics": [
            {"id": "abc", "runtime_checkpoint_duration": 1800000,
             "criu_statistics": {"frozen_time": 900000}}]}"#;
        assert_eq!(stat_ms(text, "podman_checkpoint_duration"), Some(2500.0));
        assert_eq!(stat_ms(text, "runtime_checkpoint_duration"), Some(1800.0));
        assert_eq!(stat_ms(text, "frozen_time"), Some(900.0));
        assert_eq!(stat_ms(text, "nope"), None);
        assert_eq!(stat_ms("no json", "x"), None);
    }

    #[test]
    fn path_puts_local_sbin_first() {
        assert!(path_env().starts_with("/usr/local/sbin:"));
        assert_eq!(path_env().matches("/usr/local/sbin").count(), 1);
    }
}
