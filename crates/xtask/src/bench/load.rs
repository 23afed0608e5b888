//! Driving `xfer-loadgen`: a steady SET/INCR load whose report gives the longest gap
//! between replies (the downtime the client saw), and the check that every acknowledged
//! write is still there.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{capture_any, describe};

/// How to start a program where the client lives: `xfer lab exec --node client --`
/// (a lab's client namespace) or directly (this namespace).
#[derive(Debug, Clone)]
pub enum Place {
    LabClient { xfer: PathBuf, prefix: String },
    Here,
}

impl Place {
    pub fn command(&self, prog: &Path) -> Command {
        match self {
            Place::LabClient { xfer, prefix } => {
                let mut c = Command::new(xfer);
                c.args(["lab", "exec", "--prefix", prefix, "--node", "client", "--"])
                    .arg(prog);
                c
            }
            Place::Here => Command::new(prog),
        }
    }
}

/// What `xfer-loadgen run` reported.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub acked: u64,
    pub errors: u64,
    pub max_gap_ms: f64,
    pub max_gap_at_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub last_set: u64,
    pub last_incr: i64,
}

impl LoadReport {
    pub fn parse(text: &str) -> Result<LoadReport> {
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("parse the load report {:?}", text.trim()))?;
        let f = |k: &str| {
            v[k].as_f64()
                .with_context(|| format!("load report without {k}"))
        };
        let u = |k: &str| {
            v[k].as_u64()
                .with_context(|| format!("load report without {k}"))
        };
        Ok(LoadReport {
            acked: u("acked")?,
            errors: u("errors")?,
            max_gap_ms: f("max_gap_ms")?,
            max_gap_at_ms: f("max_gap_at_ms")?,
            p50_ms: f("p50_ms")?,
            p99_ms: f("p99_ms")?,
            last_set: u("last_set")?,
            last_incr: v["last_incr"]
                .as_i64()
                .context("load report without last_incr")?,
        })
    }
}

/// A running `xfer-loadgen run`.
#[derive(Debug)]
pub struct LoadGen {
    child: Option<Child>,
    out: PathBuf,
    what: String,
}

/// The load window ended before the measured operation did: its gap may be missing.
#[derive(Debug)]
pub struct WindowTooShort {
    pub window_s: f64,
}

impl std::fmt::Display for WindowTooShort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the load generator's {:.0} s window ended before the operation did",
            self.window_s
        )
    }
}

impl std::error::Error for WindowTooShort {}

impl LoadGen {
    /// Starts `loadgen run --addr ADDR --seconds S --pace-us P --out FILE` at `place`.
    pub fn start(
        place: &Place,
        loadgen: &Path,
        addr: &str,
        seconds: f64,
        pace_us: u64,
        out: &Path,
    ) -> Result<LoadGen> {
        let _ = std::fs::remove_file(out);
        let log = out.with_extension("log");
        let logf =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut c = place.command(loadgen);
        c.args(["run", "--addr", addr, "--seconds", &format!("{seconds:.1}")])
            .args(["--pace-us", &pace_us.to_string(), "--out"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().context("dup log")?)
            .stderr(logf);
        let what = describe(&c);
        let child = c.spawn().with_context(|| format!("start {what}"))?;
        Ok(LoadGen {
            child: Some(child),
            out: out.to_path_buf(),
            what,
        })
    }

    /// Whether it is still running (the window has not ended).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) | None => false,
        }
    }

    /// Waits for the end of the window and reads the report. `covered` is whether the load
    /// was still running when the measured operation had ended (checked by the caller
    /// with [`running`](Self::running)); when it was not, this fails with
    /// [`WindowTooShort`].
    pub fn finish(mut self, covered: bool, window_s: f64) -> Result<LoadReport> {
        let mut child = self
            .child
            .take()
            .context("load generator already finished")?;
        let status = child
            .wait()
            .with_context(|| format!("wait for {}", self.what))?;
        if !status.success() {
            let log = std::fs::read_to_string(self.out.with_extension("log")).unwrap_or_default();
            bail!("{} failed ({status}): {}", self.what, log.trim());
        }
        if !covered {
            return Err(WindowTooShort { window_s }.into());
        }
        let text = std::fs::read_to_string(&self.out)
            .with_context(|| format!("read the load report {}", self.out.display()))?;
        LoadReport::parse(&text)
    }
}

impl Drop for LoadGen {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Result of `xfer-loadgen verify`.
#[derive(Debug, Clone)]
pub enum Verify {
    /// Every acknowledged write is there.
    Ok,
    /// Some are missing (the message says which).
    Lost(String),
}

impl Verify {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verify::Ok)
    }
}

/// Runs `loadgen verify --addr ADDR --report FILE` at `place`.
pub fn verify(place: &Place, loadgen: &Path, addr: &str, report: &Path) -> Result<Verify> {
    let mut c = place.command(loadgen);
    c.args(["verify", "--addr", addr, "--report"]).arg(report);
    // A server that just moved may need a moment before a new connection succeeds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = capture_any(&mut c)?;
        let text = out.combined();
        if out.success() {
            return Ok(Verify::Ok);
        }
        if text.contains("lost writes") {
            return Ok(Verify::Lost(text.trim().to_string()));
        }
        if Instant::now() >= deadline {
            bail!("{}: {}", describe(&c), text.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The key count expected after a load run on a server that held `before` keys and none
/// of the load's keys: every acknowledged `SET k:N` (k:1..=last_set) plus `ctr`.
pub fn expected_keys(before: u64, rep: &LoadReport) -> u64 {
    before + rep.last_set + u64::from(rep.last_incr > 0)
}

/// A Lua script that deletes the load's keys (`k:1..=ARGV[1]`) and its counter (`kctr`:
/// the load generator's default key prefix is `k`) and returns DBSIZE, so one server
/// can take several load runs.
pub const RESET_SCRIPT: &str = "for i=1,tonumber(ARGV[1]) do redis.call('DEL','k:'..i) end \
     redis.call('DEL','kctr') return redis.call('DBSIZE')";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report() {
        let r = LoadReport::parse(
            r#"{"acked":48283,"errors":0,"max_gap_ms":539.9,"max_gap_at_ms":5261.9,"p50_ms":0.04,"p99_ms":2.0,"last_set":24142,"last_incr":24141}"#,
        )
        .expect("parses");
        assert_eq!(r.acked, 48283);
        assert_eq!(r.last_set, 24142);
        assert_eq!(expected_keys(1_000_000, &r), 1_024_143);
        assert!(LoadReport::parse("{}").is_err());
    }
}
