//! `cargo xtask test`: setup, fmt check, clippy, every test, fuzz hook.

use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::setup::{self, SetupArgs};
use crate::util::{capture, capture_any, cargo, repo_root, run, Timeline};

/// The package holding the root integration tests that share the lab: run single-threaded.
const SERIAL_TEST_PACKAGE: &str = "xfer-tests";

#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Seconds each cargo-fuzz target runs.
    #[arg(long, env = "XFER_FUZZ_SECONDS", default_value_t = 20)]
    pub fuzz_seconds: u32,
}

pub fn test(args: &TestArgs) -> Result<()> {
    let mut tl = Timeline::new("cargo xtask test");
    let result = steps(args, &mut tl);
    tl.print_summary();
    result
}

fn steps(args: &TestArgs, tl: &mut Timeline) -> Result<()> {
    tl.step("setup", || setup::setup(&args.setup))?;
    tl.step("fmt", || {
        run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    // The end-to-end tests start the agent binary (xferd) built next to them.
    tl.step("build binaries", || {
        run(cargo().args(["build", "--workspace", "--bins"]))
    })?;
    tl.step("clippy", || {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;

    let packages = workspace_packages()?;
    if packages.iter().any(|p| p == SERIAL_TEST_PACKAGE) {
        tl.step("test (workspace)", || {
            run(cargo().args(["test", "--workspace", "--exclude", SERIAL_TEST_PACKAGE]))
        })?;
        tl.step(&format!("test ({SERIAL_TEST_PACKAGE}, serial)"), || {
            run(cargo().args(["test", "-p", SERIAL_TEST_PACKAGE, "--", "--test-threads=1"]))
        })?;
    } else {
        tl.step("test (workspace)", || {
            run(cargo().args(["test", "--workspace"]))
        })?;
    }

    fuzz(args, tl)
}

/// Names of the workspace's packages, from `cargo metadata`.
fn workspace_packages() -> Result<Vec<String>> {
    let meta =
        crate::util::capture(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))?;
    let v: serde_json::Value = serde_json::from_str(&meta).context("parse cargo metadata")?;
    Ok(v["packages"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

/// Runs each cargo-fuzz target briefly. cargo-fuzz is installed when missing. It needs
/// nightly-only compiler flags (sanitizers); with only the stable toolchain on this
/// machine, `RUSTC_BOOTSTRAP=1` unlocks them (a nightly toolchain is used if present).
fn fuzz(args: &TestArgs, tl: &mut Timeline) -> Result<()> {
    let root = repo_root();
    if !root.join("fuzz").is_dir() {
        tl.skip("fuzz", "no fuzz/ directory at the repository root");
        return Ok(());
    }
    // Probe with `cargo` from PATH rather than $CARGO (`+nightly` needs the rustup proxy).
    let has_cargo_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .current_dir(&root)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_cargo_fuzz {
        tl.step("install cargo-fuzz", || {
            run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
        })?;
    }
    let default_is_nightly =
        capture(Command::new("rustc").arg("--version")).is_ok_and(|v| v.contains("nightly"));
    let toolchain: Option<&str> = if !default_is_nightly
        && capture_any(Command::new("cargo").args(["+nightly", "--version"]))
            .is_ok_and(|o| o.success())
    {
        Some("+nightly")
    } else {
        None
    };
    let fuzz_cmd = || {
        let mut c = Command::new("cargo");
        c.current_dir(&root);
        if let Some(t) = toolchain {
            c.arg(t);
        } else if !default_is_nightly {
            c.env("RUSTC_BOOTSTRAP", "1");
        }
        c.arg("fuzz");
        c
    };
    tl.step("fuzz build", || run(fuzz_cmd().args(["build", "-O"])))?;
    let list = capture(fuzz_cmd().arg("list"))?;
    let targets: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if targets.is_empty() {
        tl.skip("fuzz", "`cargo fuzz list` shows no targets");
        return Ok(());
    }
    for t in targets {
        tl.step(&format!("fuzz {t} ({}s)", args.fuzz_seconds), || {
            run(fuzz_cmd()
                .args(["run", "-O", &t, "--"])
                .arg(format!("-max_total_time={}", args.fuzz_seconds)))
        })?;
    }
    Ok(())
}
