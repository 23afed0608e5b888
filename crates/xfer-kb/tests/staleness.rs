//! Each mode's measured staleness stays within its documented bound, and the
//! measurement sees the lag the mode really has (pull lags by about half a period,
//! push and subscribe by one message delay).

use std::time::Duration;

use xfer_kb::sim::{measure_staleness, StalenessOpts, StalenessReport};
use xfer_kb::{ModeConfig, ModeKind};

/// Quantisation of the measurement (10% of the figure) plus scheduling slack.
fn slack(d: Duration) -> Duration {
    d + d / 10 + Duration::from_millis(2)
}

async fn measure(cfg: &ModeConfig, loss: f64) -> StalenessReport {
    let opts = StalenessOpts {
        samples: 60,
        kills: 3,
        loss_rate: loss,
        ..StalenessOpts::default()
    };
    let r = measure_staleness(cfg, &opts).await;
    eprintln!("{r:?}");
    assert_eq!(r.timeouts, 0, "{:?}: changes never reflected", r.mode);
    assert!(r.change.count >= 50);
    assert!(r.gone.count == 3);
    assert!(
        r.gone.max <= slack(r.gone_window),
        "{:?}: dead host {:?} > {:?}",
        r.mode,
        r.gone.max,
        r.gone_window
    );
    r
}

#[tokio::test(start_paused = true)]
async fn staleness_within_bounds_without_loss() {
    for cfg in ModeConfig::all_defaults() {
        let r = measure(&cfg, 0.0).await;
        assert!(
            r.change.max <= slack(r.window),
            "{:?}: {:?} > bound {:?}",
            r.mode,
            r.change.max,
            r.window
        );
        match r.mode {
            ModeKind::CentralPull | ModeKind::NeighbourPull => {
                // Uniform over the 30 s period: mean near 15 s.
                assert!(r.change.mean > Duration::from_secs(10), "{r:?}");
                assert!(r.change.mean < Duration::from_secs(20), "{r:?}");
                assert!(r.change.max > Duration::from_secs(20), "{r:?}");
            }
            // One 5 ms message (the 1 ms poll may add a little).
            ModeKind::CentralPush | ModeKind::NeighbourSubscribe => {
                assert!(r.change.max <= Duration::from_millis(8), "{r:?}");
                assert!(r.change.p50 >= Duration::from_millis(5), "{r:?}");
            }
            // Visible in the first answer after the change (one 10 ms round trip).
            ModeKind::OnlineQuery => assert!(r.change.max <= Duration::from_millis(12), "{r:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn staleness_with_lost_events_bounded_by_heartbeat_or_full_update() {
    for cfg in ModeConfig::all_defaults() {
        let full = match &cfg {
            ModeConfig::CentralPush(p) => p.full_period,
            ModeConfig::NeighbourSubscribe(s) => s.full_period,
            _ => continue,
        };
        let r = measure(&cfg, 0.1).await;
        assert!(r.lost_events > 0, "{r:?}");
        // Some changes were lost and repaired later than one message delay.
        assert!(r.change.max > Duration::from_millis(100), "{r:?}");
        assert!(r.change.max <= slack(full), "{r:?}");
    }
}
