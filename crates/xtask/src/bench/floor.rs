//! The local CRIU floor: a plain redis-server (same dataset) in a network namespace of
//! its own, dumped (which kills it) and restored on the same machine with no transfer.
//! What it measures is the least downtime any CRIU-based migration of that process can
//! have here: `criu dump` + `criu restore` until redis answers PING again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::netns::{netns_path, wait_for_pong};
use crate::util::{capture, capture_any, describe};

/// One dump + restore.
#[derive(Debug, Clone)]
pub struct FloorSample {
    /// `criu dump` (freeze, dump, kill).
    pub dump_ms: f64,
    /// `criu restore -d` until it returned.
    pub restore_ms: f64,
    /// From the end of the dump to the first PING answered by the restored process.
    pub restore_to_pong_ms: f64,
    /// From the start of the dump to the first PING answered: the floor.
    pub total_ms: f64,
    /// Size of the CRIU image directory.
    pub image_bytes: u64,
}

/// A redis-server in a namespace of its own, set up once and dumped/restored per sample.
#[derive(Debug)]
pub struct Floor {
    ns: String,
    work: PathBuf,
    pid: Option<u32>,
    keys: u64,
    ns_made: bool,
}

const PORT: u16 = 6379;

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// `ip netns exec NS redis-cli -p 6379 ARGS...`, captured.
fn redis_cli(ns: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "redis-cli", "-p", "6379"])
        .args(args);
    capture(&mut c)
}

fn dbsize(ns: &str) -> Result<u64> {
    let out = redis_cli(ns, &["DBSIZE"])?;
    crate::demo::parse_redis_integer(&out)
        .with_context(|| format!("DBSIZE answered {:?}", out.trim()))
}

/// `nsenter --net=/run/netns/NS PROG...`: only the network namespace changes, so CRIU
/// and the process share every other namespace (CRIU then dumps no mount namespace).
fn in_net(ns: &str, prog: &str) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns_path(ns).display()))
        .arg(prog);
    c
}

/// Waits (up to 5 s) for `pid`, our child or adopted orphan, to be reaped, so that its
/// pid is free for the restore (CRIU restores the same pid).
fn reap(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on a specific pid with a pointer to a local int; WNOHANG never
        // blocks.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            return Ok(());
        }
        if rc < 0 {
            // Not our child (ECHILD): fine as long as it is gone.
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("pid {pid} did not go away after the dump");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

impl Floor {
    /// Makes the namespace, starts redis-server in it and fills it with `keys` keys of
    /// `value_size` bytes.
    pub fn start(ns: &str, work: &Path, keys: u64, value_size: u32) -> Result<Floor> {
        let mut floor = Floor {
            ns: ns.to_string(),
            work: work.to_path_buf(),
            pid: None,
            keys,
            ns_made: false,
        };
        floor.clear_leftovers();
        std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
        capture(Command::new("ip").args(["netns", "add", ns]))?;
        floor.ns_made = true;
        capture(Command::new("ip").args(["netns", "exec", ns, "ip", "link", "set", "lo", "up"]))?;

        let log = work.join("redis.log");
        let logf =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut c = in_net(ns, "setsid");
        c.args(["redis-server", "--port", "6379", "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--enable-debug-command", "yes", "--daemonize", "no"])
            .current_dir(work)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().context("dup log")?)
            .stderr(logf);
        let what = describe(&c);
        let child = c.spawn().with_context(|| format!("start {what}"))?;
        // nsenter and setsid exec (no fork: we are not a process group leader), so the
        // child is redis-server itself.
        floor.pid = Some(child.id());
        wait_for_pong(Some(ns), addr(), Duration::from_secs(10))
            .with_context(|| format!("redis-server in {ns} (log {})", log.display()))?;
        let pid = Self::server_pid(ns)?;
        if pid != child.id() {
            bail!(
                "redis-server in {ns} has pid {pid}, not the started {}",
                child.id()
            );
        }
        let out = redis_cli(
            ns,
            &[
                "DEBUG",
                "POPULATE",
                &keys.to_string(),
                "key",
                &value_size.to_string(),
            ],
        )?;
        if out.trim() != "OK" {
            bail!("DEBUG POPULATE answered {:?}", out.trim());
        }
        let n = dbsize(ns)?;
        if n != keys {
            bail!("the floor's redis holds {n} keys after POPULATE, expected {keys}");
        }
        Ok(floor)
    }

    fn server_pid(ns: &str) -> Result<u32> {
        let info = redis_cli(ns, &["INFO", "server"])?;
        info.lines()
            .find_map(|l| l.trim().strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .context("no process_id in INFO server")
    }

    /// Resident memory of the redis-server, bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// Dump (kills the process) and restore, timed until PING answers.
    pub fn sample(&mut self, n: usize) -> Result<FloorSample> {
        let pid = self.pid.context("the floor's redis is not running")?;
        let dir = self.work.join(format!("img-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let dir_s = dir.display().to_string();

        let t0 = Instant::now();
        let mut dump = in_net(&self.ns, "criu");
        dump.args(["dump", "-t", &pid.to_string(), "-D", &dir_s, "--shell-job"])
            .args(["-o", "dump.log"]);
        let out = capture_any(&mut dump)?;
        let t1 = Instant::now();
        if !out.success() {
            bail!(
                "{} failed ({}): {}; dump.log ends:\n{}",
                describe(&dump),
                out.status,
                out.combined().trim(),
                log_tail(&dir.join("dump.log"))
            );
        }
        self.pid = None;
        reap(pid)?;
        let image_bytes = dir_size(&dir);

        let pidfile = dir.join("restored.pid");
        let mut restore = in_net(&self.ns, "criu");
        restore
            .args(["restore", "-D", &dir_s, "--shell-job", "-d"])
            .args([
                "--pidfile",
                &pidfile.display().to_string(),
                "-o",
                "restore.log",
            ]);
        let t1b = Instant::now();
        let out = capture_any(&mut restore)?;
        let t2 = Instant::now();
        if !out.success() {
            bail!(
                "{} failed ({}): {}; restore.log ends:\n{}",
                describe(&restore),
                out.status,
                out.combined().trim(),
                log_tail(&dir.join("restore.log"))
            );
        }
        let new_pid: u32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("read {}", pidfile.display()))?
            .trim()
            .parse()
            .context("parse the restored pid")?;
        self.pid = Some(new_pid);
        let t3 = wait_for_pong(Some(&self.ns), addr(), Duration::from_secs(30))?;

        let n_keys = dbsize(&self.ns)?;
        if n_keys != self.keys {
            bail!(
                "the restored redis holds {n_keys} keys, expected {}",
                self.keys
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(FloorSample {
            dump_ms: ms(t1 - t0),
            restore_ms: ms(t2 - t1b),
            restore_to_pong_ms: ms(t3 - t1),
            total_ms: ms(t3 - t0),
            image_bytes,
        })
    }

    /// Kills our redis (by pid, after checking it is the redis-server we started),
    /// deletes the namespace and the work directory.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut errors = Vec::new();
        if let Some(pid) = self.pid.take() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline).contains("redis-server")
                && std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
                    == std::fs::metadata(netns_path(&self.ns)).ok().map(|m| {
                        use std::os::unix::fs::MetadataExt;
                        PathBuf::from(format!("net:[{}]", m.ino()))
                    });
            if ours {
                // SAFETY: kill with a pid we started (or CRIU restored for us) and checked
                // above; no memory is involved.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                if let Err(e) = reap(pid) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        if self.ns_made {
            let out = capture_any(Command::new("ip").args(["netns", "del", &self.ns]))?;
            if out.success() {
                self.ns_made = false;
            } else {
                errors.push(format!(
                    "ip netns del {}: {}",
                    self.ns,
                    out.combined().trim()
                ));
            }
        }
        if self.work.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.work) {
                errors.push(format!("remove {}: {e}", self.work.display()));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("floor clean-up: {}", errors.join("; "))
        }
    }

    /// What an interrupted earlier run may have left: processes in the namespace, the
    /// namespace, the work directory.
    fn clear_leftovers(&mut self) {
        let path = netns_path(&self.ns);
        if path.exists() {
            if let Ok(out) = capture(Command::new("ip").args(["netns", "pids", &self.ns])) {
                for pid in out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                    println!(
                        "  killing pid {pid} left in namespace {} by an earlier run",
                        self.ns
                    );
                    // SAFETY: kill with a pid that `ip netns pids` listed in the
                    // benchmark's own namespace; no memory is involved.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    let _ = reap(pid);
                }
            }
            let _ = capture_any(Command::new("ip").args(["netns", "del", &self.ns]));
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("warning: {e:#}");
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
