//! `xfer-loadgen`: a steady write load on a redis server that timestamps every reply.
//!
//! It alternates `SET k:N N` and `INCR ctr`, reconnecting as fast as it can when the
//! server goes away (as during a migration). At the end it prints a JSON
//! [`xfer_bench::LoadReport`]: acknowledged writes, the longest gap between replies
//! (the downtime the client saw) and latency quantiles. `verify` checks afterwards
//! that every acknowledged write is there.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use xfer_bench::{max_gap, quantile, LoadReport};

#[derive(Debug, Parser)]
#[command(name = "xfer-loadgen")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the load for a while.
    Run {
        /// redis address, host:port
        #[arg(long)]
        addr: String,
        /// How long, in seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Pause between requests, in microseconds (0 = as fast as replies come).
        #[arg(long, default_value_t = 1000)]
        pace_us: u64,
        /// Write the report here too.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Open a new connection for every request (a client that reconnects in a
        /// loop) instead of keeping one.
        #[arg(long)]
        new_connection_each: bool,
        /// Give up on a reply after this many ms (then reconnect and retry).
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Keys of this run are `PREFIX:N` and the counter `PREFIXctr` (so two loads
        /// can run against one server).
        #[arg(long, default_value = "k")]
        key_prefix: String,
        /// Stop early once this file exists (checked every 50 ms).
        #[arg(long)]
        stop_file: Option<std::path::PathBuf>,
    },
    /// Throughput of one TCP connection: send this many MiB to ADDR (a sink that
    /// reads until EOF and closes) and print the rate.
    Tput {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 256)]
        mib: u64,
    },
    /// Check that every acknowledged write of a report is in the server.
    Verify {
        #[arg(long)]
        addr: String,
        /// The key prefix of the run.
        #[arg(long, default_value = "k")]
        key_prefix: String,
        /// The report `run` wrote.
        #[arg(long)]
        report: std::path::PathBuf,
    },
}

fn connect(addr: &str, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let c = client.get_connection_with_timeout(Duration::from_millis(200).min(timeout))?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    Ok(c)
}

/// Sends `mib` MiB over one connection to a sink and returns (bytes, seconds): the
/// clock stops when the sink has read everything and closed its end.
fn tput(addr: &str, mib: u64) -> anyhow::Result<(u64, f64)> {
    use std::io::{Read, Write};
    // The sink may be between two connections: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::net::TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("connect {addr}")),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let buf = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&buf)?;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = [0u8; 64];
    while s.read(&mut rest)? > 0 {}
    Ok((mib << 20, t.elapsed().as_secs_f64()))
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("xfer-loadgen: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Run {
            addr,
            seconds,
            pace_us,
            out,
            new_connection_each,
            timeout_ms,
            key_prefix,
            stop_file,
        } => {
            let mut checked = Instant::now();
            let timeout = Duration::from_millis(timeout_ms.max(1));
            let start = Instant::now();
            let end = start + Duration::from_secs_f64(seconds);
            let mut times = Vec::new();
            let mut lat = Vec::new();
            let mut rep = LoadReport::default();
            let mut conn: Option<redis::Connection> = None;
            let mut n: u64 = 0;
            while Instant::now() < end {
                if let Some(f) = &stop_file {
                    if checked.elapsed() >= Duration::from_millis(50) {
                        checked = Instant::now();
                        if f.exists() {
                            break;
                        }
                    }
                }
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match connect(&addr, timeout) {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            rep.errors += 1;
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                    },
                };
                let t0 = Instant::now();
                let res: redis::RedisResult<()> = if n % 2 == 0 {
                    let i = n / 2 + 1;
                    redis::cmd("SET")
                        .arg(format!("{key_prefix}:{i}"))
                        .arg(i)
                        .query::<()>(c)
                        .map(|_| rep.last_set = i)
                } else {
                    redis::cmd("INCR")
                        .arg(format!("{key_prefix}ctr"))
                        .query::<i64>(c)
                        .map(|v| rep.last_incr = v)
                };
                match res {
                    Ok(()) => {
                        let now = Instant::now();
                        times.push(now.duration_since(start).as_secs_f64() * 1000.0);
                        lat.push(now.duration_since(t0).as_secs_f64() * 1000.0);
                        rep.acked += 1;
                        n += 1;
                        if new_connection_each {
                            conn = None;
                        }
                    }
                    Err(_) => {
                        // The request may or may not have been applied; it is not
                        // acknowledged, so it is retried with the same key/number.
                        rep.errors += 1;
                        conn = None;
                    }
                }
                if pace_us > 0 {
                    std::thread::sleep(Duration::from_micros(pace_us));
                }
            }
            let (gap, at) = max_gap(&times);
            rep.max_gap_ms = gap;
            rep.max_gap_at_ms = at;
            rep.p50_ms = quantile(&mut lat, 0.5);
            rep.p99_ms = quantile(&mut lat, 0.99);
            let text = serde_json::to_string(&rep)?;
            println!("{text}");
            if let Some(p) = out {
                std::fs::write(&p, &text).with_context(|| format!("write {}", p.display()))?;
            }
            Ok(())
        }
        Cmd::Tput { addr, mib } => {
            let (bytes, secs) = tput(&addr, mib)?;
            println!(
                "{}",
                serde_json::json!({"bytes": bytes, "secs": secs, "mbit_s": bytes as f64 * 8.0 / secs / 1e6})
            );
            Ok(())
        }
        Cmd::Verify {
            addr,
            report,
            key_prefix,
        } => {
            let text = std::fs::read_to_string(&report)
                .with_context(|| format!("read {}", report.display()))?;
            let rep: serde_json::Value = serde_json::from_str(&text)?;
            let last_set = rep["last_set"].as_u64().context("report has no last_set")?;
            let last_incr = rep["last_incr"]
                .as_i64()
                .context("report has no last_incr")?;
            let mut c = connect(&addr, Duration::from_secs(5))
                .with_context(|| format!("connect to {addr}"))?;
            let ctr: i64 = redis::cmd("GET")
                .arg(format!("{key_prefix}ctr"))
                .query(&mut c)?;
            if ctr < last_incr {
                bail!("lost writes: ctr is {ctr}, but INCR {last_incr} was acknowledged");
            }
            let mut missing = 0u64;
            for chunk in (1..=last_set).collect::<Vec<_>>().chunks(1000) {
                let keys: Vec<String> = chunk.iter().map(|i| format!("{key_prefix}:{i}")).collect();
                let vals: Vec<Option<u64>> = redis::cmd("MGET").arg(&keys).query(&mut c)?;
                for (i, v) in chunk.iter().zip(vals) {
                    if v != Some(*i) {
                        missing += 1;
                    }
                }
            }
            if missing > 0 {
                bail!(
                    "lost writes: {missing} of {last_set} acknowledged SETs are missing or wrong"
                );
            }
            println!("{{\"verified_sets\": {last_set}, \"ctr\": {ctr}, \"acked_incr\": {last_incr}, \"lost\": 0}}");
            Ok(())
        }
    }
}
