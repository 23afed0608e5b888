//! Measures every mode's staleness window on a simulated cluster (20 hosts, the
//! default periods, 5 ms one-way delay), without and with 10% of events lost.
//! Time is tokio's paused clock: the periods are real, the run takes seconds.
//!
//! `cargo run --release -p xfer-kb --example staleness [samples]`

use std::time::Duration;

use xfer_kb::sim::{measure_staleness, StalenessOpts};
use xfer_kb::ModeConfig;

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let samples = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    println!(
        "| mode | loss | bound (ms) | change mean | p50 | p99 | max | dead-host bound | dead mean | dead max | timeouts | lost events |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for cfg in ModeConfig::all_defaults() {
        for loss in [0.0, 0.1] {
            let evented = matches!(
                cfg,
                ModeConfig::CentralPush(_) | ModeConfig::NeighbourSubscribe(_)
            );
            if loss > 0.0 && !evented {
                continue;
            }
            let opts = StalenessOpts {
                samples,
                loss_rate: loss,
                ..StalenessOpts::default()
            };
            let r = rt.block_on(measure_staleness(&cfg, &opts));
            println!(
                "| {:?} | {:.0}% | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.mode,
                loss * 100.0,
                ms(r.window),
                ms(r.change.mean),
                ms(r.change.p50),
                ms(r.change.p99),
                ms(r.change.max),
                ms(r.gone_window),
                ms(r.gone.mean),
                ms(r.gone.max),
                r.timeouts,
                r.lost_events
            );
        }
    }
}
