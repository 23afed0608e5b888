//! The plot: client-observed downtime per method, grouped by link (SVG, plotters).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::Results;
use super::stats::Summary;

/// One bar: median with min–max whiskers.
struct Bar {
    group: usize,
    series: usize,
    s: Summary,
}

const SERIES: [(&str, RGBColor); 7] = [
    ("xfer pre-copy", RGBColor(31, 119, 180)),
    ("xfer post-copy", RGBColor(44, 160, 44)),
    ("xfer hybrid", RGBColor(152, 223, 138)),
    ("xfer auto", RGBColor(148, 103, 189)),
    ("xfer cold", RGBColor(108, 174, 222)),
    ("Podman checkpoint/copy/restore", RGBColor(214, 39, 40)),
    (
        "local CRIU floor (dump + restore, no transfer)",
        RGBColor(120, 120, 120),
    ),
];

fn bars(r: &Results) -> (Vec<String>, Vec<Bar>) {
    let mut groups = Vec::new();
    let mut out = Vec::new();
    let floor = Summary::of(&r.floor.iter().map(|s| s.total_ms).collect::<Vec<_>>());
    for &link in &r.links {
        let modes: Vec<Option<Summary>> = super::report::XFER_MODES
            .iter()
            .map(|(m, _)| {
                Summary::of(
                    &r.xfer_of(link, m)
                        .iter()
                        .map(|s| s.load.max_gap_ms)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let pod = Summary::of(
            &r.podman_of(link)
                .iter()
                .map(|s| s.load.max_gap_ms)
                .collect::<Vec<_>>(),
        );
        if modes.iter().all(Option::is_none) && pod.is_none() {
            continue;
        }
        let g = groups.len();
        groups.push(link.label().to_string());
        let series = modes.into_iter().chain([pod, floor]);
        for (i, s) in series.enumerate() {
            if let Some(s) = s {
                out.push(Bar {
                    group: g,
                    series: i,
                    s,
                });
            }
        }
    }
    (groups, out)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("draw the plot: {e:?}")
}

/// Writes grouped bars of client-observed downtime (the floor: dump + restore until
/// PING) to `path`.
pub fn svg(r: &Results, path: &Path) -> Result<()> {
    let (groups, bars) = bars(r);
    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let title = format!(
        "redis, {} keys × {} B, under write load: downtime the client saw (median, min–max of {} runs)",
        thousands(r.facts.keys),
        r.facts.value_size,
        r.facts.repeats
    );
    if groups.is_empty() {
        root.draw(&Text::new(
            "no successful runs to plot",
            (400, 280),
            ("sans-serif", 20).into_font(),
        ))
        .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
        return Ok(());
    }
    let ymax = bars.iter().map(|b| b.s.max).fold(0.0, f64::max).max(1.0) * 1.45 / 1000.0;
    let ng = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..ng, 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_max_light_lines(0)
        .disable_x_axis()
        .x_labels(0)
        .y_desc("seconds")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(plot_err)?;

    let width = 0.8 / SERIES.len() as f64;
    let x0 = |b: &Bar| b.group as f64 + 0.1 + b.series as f64 * width;
    for (i, (name, color)) in SERIES.iter().enumerate() {
        let mine: Vec<&Bar> = bars.iter().filter(|b| b.series == i).collect();
        if mine.is_empty() {
            continue;
        }
        let c = *color;
        chart
            .draw_series(mine.iter().map(|b| {
                let x = x0(b);
                Rectangle::new(
                    [
                        (x + width * 0.08, 0.0),
                        (x + width * 0.92, b.s.median / 1000.0),
                    ],
                    c.filled(),
                )
            }))
            .map_err(plot_err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled()));
        // whiskers
        chart
            .draw_series(mine.iter().map(|b| {
                let xm = x0(b) + width / 2.0;
                PathElement::new(
                    vec![(xm, b.s.min / 1000.0), (xm, b.s.max / 1000.0)],
                    BLACK.stroke_width(1),
                )
            }))
            .map_err(plot_err)?;
        // value labels
        chart
            .draw_series(mine.iter().map(|b| {
                let xm = x0(b) + width / 2.0;
                Text::new(
                    format!("{:.2}", b.s.median / 1000.0),
                    (xm, b.s.max.max(b.s.median) / 1000.0 + ymax * 0.01),
                    ("sans-serif", 11)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(plot_err)?;
    }
    // group labels under the axis
    for (g, label) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            label.clone(),
            (px, py + 10),
            ("sans-serif", 14)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))
        .map_err(plot_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// 1000000 -> "1,000,000".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1234), "1,234");
    }
}

#[cfg(test)]
mod svg_tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let dir = std::env::temp_dir().join(format!("xtask-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("d.svg");
        svg(&super::super::report::tests::results(), &path).expect("plots");
        let text = std::fs::read_to_string(&path).expect("written");
        assert!(text.contains("<svg"));
        assert!(text.contains("xfer pre-copy"));
        assert!(text.contains("100 Mbit/s (htb-shaped)"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
