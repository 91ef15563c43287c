//! `snapctl bench --plot FILE`: the bench's latency distributions (one curve per kind of call:
//! the share of successful calls at or below each latency, on a log scale) and the histogram of
//! snapshot pauses, drawn as one SVG with `plotters`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Colours of the curves, one per kind of call.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Fallible = Result<(), Box<dyn std::error::Error>>;

/// Writes the SVG to `path`: `calls` are (name, latencies of successful calls in microseconds),
/// `pauses_us` the snapshot pauses; `title` goes on top.
///
/// # Errors
/// A message naming the file if it cannot be drawn or written.
pub(crate) fn write(
    path: &Path,
    title: &str,
    calls: &[(&str, Vec<u64>)],
    pauses_us: &[u64],
) -> Result<(), String> {
    let draw = || -> Fallible {
        let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 18))?;
        let (left, right) = root.split_horizontally(680);
        latencies(&left, calls)?;
        pauses(&right, pauses_us)?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("drawing {}: {e}", path.display()))
}

/// The share of calls at or below each latency, per kind of call (log-scale milliseconds).
fn latencies(area: &DrawingArea<SVGBackend<'_>, Shift>, calls: &[(&str, Vec<u64>)]) -> Fallible {
    let all = calls.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = all.fold((u64::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi == 0 {
        (0.01, 1.0)
    } else {
        let lo = (lo.max(1) as f64 / 1000.0).max(0.001);
        (lo * 0.8, (hi as f64 / 1000.0 * 1.25).max(lo * 10.0))
    };
    let mut chart = ChartBuilder::on(area)
        .caption(
            "latency of successful calls (share at or below)",
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("% of calls")
        .x_label_formatter(&|v| milliseconds(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (name, us)) in calls.iter().enumerate() {
        if us.is_empty() {
            continue;
        }
        let mut sorted = us.clone();
        sorted.sort_unstable();
        let n = sorted.len() as f64;
        let colour = COLOURS[i % COLOURS.len()];
        let points = sorted
            .iter()
            .enumerate()
            .map(|(k, &v)| ((v as f64 / 1000.0).max(lo), 100.0 * (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(format!("{name} ({})", sorted.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// How many snapshots paused their VM for how long: bins doubling from a microsecond.
fn pauses(area: &DrawingArea<SVGBackend<'_>, Shift>, pauses_us: &[u64]) -> Fallible {
    let bins = bins(pauses_us);
    let top = bins.iter().map(|b| b.1).max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("VM pause per snapshot ({} snapshots)", pauses_us.len()),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (0u32..bins.len() as u32).into_segmented(),
            0u64..top + top / 8 + 1,
        )?;
    let labels: Vec<String> = bins.iter().map(|b| micros(b.0)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("pause at least (bins double)")
        .y_desc("snapshots")
        .x_labels(bins.len().min(12))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                labels.get(*i as usize).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    chart.draw_series(
        Histogram::vertical(&chart)
            .style(COLOURS[0].filled())
            .margin(2)
            .data(bins.iter().enumerate().map(|(i, b)| (i as u32, b.1))),
    )?;
    Ok(())
}

/// Bins of `values` (microseconds) doubling from the power of two at or below the smallest:
/// (lower bound, count), through the largest.
fn bins(values: &[u64]) -> Vec<(u64, u64)> {
    let (Some(&lo), Some(&hi)) = (values.iter().min(), values.iter().max()) else {
        return Vec::new();
    };
    let first = 63 - lo.max(1).leading_zeros();
    let last = 63 - hi.max(1).leading_zeros();
    let mut out: Vec<(u64, u64)> = (first..=last).map(|k| (1u64 << k, 0)).collect();
    for &v in values {
        let k = 63 - v.max(1).leading_zeros();
        out[(k - first) as usize].1 += 1;
    }
    out
}

/// A tick of the latency axis: whole milliseconds from 1 ms up, three digits below.
fn milliseconds(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.0}")
    } else {
        let s = format!("{ms:.3}");
        s.trim_end_matches('0').to_string()
    }
}

fn micros(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{} s", us / 1_000_000)
    } else if us >= 1000 {
        format!("{} ms", us / 1000)
    } else {
        format!("{us} us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_ticks_are_short() {
        assert_eq!(milliseconds(100.0), "100");
        assert_eq!(milliseconds(1.0), "1");
        assert_eq!(milliseconds(0.25), "0.25");
        assert_eq!(milliseconds(0.001), "0.001");
    }

    #[test]
    fn pauses_fall_into_doubling_bins() {
        assert_eq!(bins(&[]), Vec::new());
        assert_eq!(
            bins(&[3, 2, 9, 1000]),
            vec![
                (2, 2),
                (4, 0),
                (8, 1),
                (16, 0),
                (32, 0),
                (64, 0),
                (128, 0),
                (256, 0),
                (512, 1)
            ]
        );
    }

    #[test]
    fn the_plot_is_an_svg_with_every_curve_and_bar() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.svg");
        let calls = [
            ("create_snapshot", vec![4000, 5000, 9000, 120_000]),
            ("restore_snapshot", vec![3000, 3500]),
            ("stop_vm", vec![]),
        ];
        write(&path, "bench: 2 clients", &calls, &[400, 450, 2500, 30_000]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "bench: 2 clients",
            "create_snapshot (4)",
            "restore_snapshot (2)",
            "VM pause per snapshot (4 snapshots)",
        ] {
            assert!(svg.contains(text), "{text} is drawn");
        }
        assert!(!svg.contains("stop_vm"), "no curve without calls");
        // Two curves and their two legend marks (the only lines 2 wide), and a bar per bin: 7
        // bins from 256 us to 16 ms, three of them holding pauses (2, 1 and 1).
        assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 2 + 2);
        let bars: Vec<&str> = svg
            .lines()
            .filter(|l| l.starts_with("<rect") && l.contains(r##"fill="#1F77B4""##))
            .collect();
        assert_eq!(bars.len(), 7);
        let heights: Vec<u32> = bars
            .iter()
            .filter_map(|l| l.split("height=\"").nth(1)?.split('"').next()?.parse().ok())
            .filter(|&h| h > 0)
            .collect();
        assert_eq!(heights.len(), 3, "{bars:?}");
        let (lo, hi) = (heights.iter().min().unwrap(), heights.iter().max().unwrap());
        assert!(
            (2 * lo).abs_diff(*hi) <= 2,
            "the bin of two is twice as high: {heights:?}"
        );
        let a = write(&dir.path().join("none/x.svg"), "t", &calls, &[]).unwrap_err();
        assert!(a.contains("none/x.svg"), "{a}");
    }
}
