//! Running commands with readable errors, and timing named steps.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// `prog arg arg` for messages; arguments with spaces or quotes are single-quoted.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    s
}

fn quote(arg: &OsStr) -> String {
    let a = arg.to_string_lossy();
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn status_text(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit status {code}"),
        None => format!("{status}"),
    }
}

/// Runs `cmd` with inherited stdio; fails with "run <cmd>: exit status N".
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("run {what}: could not start it"))?;
    if !status.success() {
        bail!("run {what}: {}", status_text(status));
    }
    Ok(())
}

/// Runs `cmd` and returns its exit status without judging it (stdio inherited).
pub fn run_status(cmd: &mut Command) -> Result<ExitStatus> {
    let what = describe(cmd);
    cmd.status()
        .with_context(|| format!("run {what}: could not start it"))
}

/// Output of a command that ran (successfully or not).
#[derive(Debug)]
pub struct Captured {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Captured {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout and stderr together, for searching and for messages.
    pub fn combined(&self) -> String {
        let mut s = self.stdout.clone();
        if !self.stderr.is_empty() {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&self.stderr);
        }
        s
    }
}

/// Runs `cmd` capturing stdout and stderr; only fails if it cannot be started.
pub fn capture_any(cmd: &mut Command) -> Result<Captured> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {what}: could not start it"))?;
    Ok(Captured {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `cmd` capturing its output; fails (with its stderr in the message) unless it exits 0.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = capture_any(cmd)?;
    if !out.success() {
        let detail = out.combined();
        let detail = detail.trim();
        if detail.is_empty() {
            bail!("run {what}: {}", status_text(out.status));
        }
        bail!("run {what}: {}: {}", status_text(out.status), detail);
    }
    Ok(out.stdout)
}

/// Searches `$PATH` for an executable file called `name`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// The repository root (this crate lives in `<root>/crates/xtask`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

/// The cargo that started us (`$CARGO` under `cargo run`), else `cargo` from PATH.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(repo_root());
    cmd
}

pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.2}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:05.2}s", whole / 60, secs - (whole / 60 * 60) as f64)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Skipped,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
        }
    }
}

/// Named, timed steps with a summary table at the end.
#[derive(Debug)]
pub struct Timeline {
    title: String,
    started: Instant,
    rows: Vec<(String, Outcome, Duration)>,
}

impl Timeline {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_string(),
            started: Instant::now(),
            rows: Vec::new(),
        }
    }

    /// Runs one step, printing its name before and its duration after. A failing step's error
    /// is wrapped with "step `<name>` failed".
    pub fn step<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        println!("\n==> {name}");
        let t = Instant::now();
        let result = f();
        let took = t.elapsed();
        match &result {
            Ok(_) => {
                println!("<== {name}: ok in {}", fmt_duration(took));
                self.rows.push((name.to_string(), Outcome::Ok, took));
            }
            Err(e) => {
                println!("<== {name}: FAILED after {}: {e:#}", fmt_duration(took));
                self.rows.push((name.to_string(), Outcome::Failed, took));
            }
        }
        result.with_context(|| format!("step `{name}` failed"))
    }

    pub fn skip(&mut self, name: &str, why: &str) {
        println!("\n==> {name}: skipped: {why}");
        self.rows
            .push((name.to_string(), Outcome::Skipped, Duration::ZERO));
    }

    pub fn summary(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|(n, _, _)| n.len())
            .max()
            .unwrap_or(4)
            .max(5);
        let mut s = String::new();
        let _ = writeln!(s, "\n{} summary:", self.title);
        let _ = writeln!(
            s,
            "  {:<width$}  {:<7}  {:>10}",
            "step", "result", "duration"
        );
        for (name, outcome, took) in &self.rows {
            let _ = writeln!(
                s,
                "  {:<width$}  {:<7}  {:>10}",
                name,
                outcome.as_str(),
                if *outcome == Outcome::Skipped {
                    "-".to_string()
                } else {
                    fmt_duration(*took)
                }
            );
        }
        let _ = writeln!(
            s,
            "  {:<width$}  {:<7}  {:>10}",
            "total",
            "",
            fmt_duration(self.started.elapsed())
        );
        s
    }

    pub fn print_summary(&self) {
        print!("{}", self.summary());
    }
}

/// The set-up (unless `no_setup`) and build steps every benchmark starts with: builds
/// the workspace's binaries in `profile` (release or debug) and returns their directory.
pub fn setup_and_build(
    tl: &mut Timeline,
    setup: &crate::setup::SetupArgs,
    no_setup: bool,
    profile: &str,
) -> Result<PathBuf> {
    if no_setup {
        tl.skip("setup", "--no-setup");
    } else {
        tl.step("setup", || crate::setup::setup(setup))?;
    }
    tl.step(&format!("build ({profile} profile)"), || {
        let mut c = cargo();
        c.args(["build", "--workspace", "--bins"]);
        if profile == "release" {
            c.arg("--release");
        }
        run(&mut c)
    })?;
    let meta = capture(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value = serde_json::from_str(&meta).context("parse cargo metadata")?;
    let target = v["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    Ok(PathBuf::from(target).join(profile))
}

/// A benchmark's entry point: parses `argv` as the arguments of `title` (exiting with
/// clap's message when they are wrong), runs `bench` in a timeline and prints its
/// summary.
pub fn run_bench<A: clap::Parser>(
    title: &str,
    argv: &[String],
    bench: impl FnOnce(&A, &mut Timeline) -> Result<()>,
) -> Result<()> {
    let args = A::try_parse_from(std::iter::once(title.to_string()).chain(argv.iter().cloned()))
        .unwrap_or_else(|e| e.exit());
    let mut tl = Timeline::new(title);
    let result = bench(&args, &mut tl);
    tl.print_summary();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_quotes() {
        let mut c = Command::new("redis-server");
        c.args(["--save", "", "--port", "6379", "it's"]);
        assert_eq!(
            describe(&c),
            r"redis-server --save '' --port 6379 'it'\''s'"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.23s");
        assert_eq!(fmt_duration(Duration::from_millis(61_500)), "1m01.50s");
    }

    #[test]
    fn timeline_records_failures() {
        let mut tl = Timeline::new("t");
        assert!(tl.step("good", || Ok(())).is_ok());
        let err = tl
            .step("bad", || -> Result<()> { bail!("boom") })
            .expect_err("step fails");
        assert_eq!(format!("{err:#}"), "step `bad` failed: boom");
        tl.skip("later", "not needed");
        let s = tl.summary();
        assert!(s.contains("good"));
        assert!(s.contains("FAILED"));
        assert!(s.contains("skipped"));
    }
}
