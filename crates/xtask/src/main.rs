//! Developer tasks for xfer: `cargo xtask setup | test | demo | bench <name>`.

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
    /// Benchmarks (not implemented yet).
    Bench {
        /// Benchmark name.
        name: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Cmd::Setup(args) => setup::setup(args),
        Cmd::Test(args) => ci::test(args),
        Cmd::Demo(args) => demo::demo(args),
        Cmd::Bench { name } => {
            println!("bench {name}: not implemented yet");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
