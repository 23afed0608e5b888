//! Developer tasks for xfer: `cargo xtask setup | test | demo | bench <name>`.

mod bench_coop;
mod bench_downtime;
mod bench_handover;
mod ci;
mod demo;
mod parse;
mod setup;
mod util;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Developer tasks for xfer (run as root on Debian 12)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what xfer needs (Debian packages, CRIU >= 4.2) and check the kernel. Idempotent.
    Setup(setup::SetupArgs),
    /// setup, cargo fmt --check, clippy -D warnings, every test (root integration tests too),
    /// then the fuzz targets if cargo-fuzz and a nightly toolchain are available.
    Test(ci::TestArgs),
    /// setup, build, start a 3-node lab, run redis on h1, cold-migrate it to h2, lab down.
    Demo(demo::DemoArgs),
    /// Benchmarks: `downtime`, `handover`, `cooperative` (see `cargo xtask bench NAME --help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// Benchmark name.
        name: String,
        /// Options of that benchmark.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Makes this process the reaper of its orphaned descendants (lab daemons, shims and
/// container processes whose parents died). This machine's PID 1 does not reap
/// zombies, so without this every lab a test or the demo ran would leave zombies.
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes plain integer arguments and only
    // changes this process's attributes.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!("warning: could not become a child subreaper; orphaned lab processes may stay as zombies");
    }
}

/// Reaps every child that has exited (orphans adopted as subreaper).
fn reap_orphans() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid pointer to a local int; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
    }
}

fn main() {
    let cli = Cli::parse();
    become_subreaper();
    let result = match &cli.command {
        Cmd::Setup(args) => setup::setup(args),
        Cmd::Test(args) => ci::test(args),
        Cmd::Demo(args) => demo::demo(args),
        Cmd::Bench { name, args } => match name.as_str() {
            "downtime" => bench_downtime::main(args),
            "handover" => bench_handover::main(args),
            "cooperative" => bench_coop::main(args),
            _ => {
                eprintln!("unknown benchmark {name:?}: downtime, handover or cooperative");
                std::process::exit(2);
            }
        },
    };
    reap_orphans();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
