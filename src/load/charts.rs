//! The SVG charts under `--out`, drawn with plotters: throughput over time, and the latency
//! percentile distribution in the HdrHistogram style (log scale toward the tail).

use std::path::Path;

use plotters::prelude::*;

const SIZE: (u32, u32) = (1000, 520);
const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// The plotters error types borrow the backend; keep only their text.
fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// The largest x (`axis` 0) or y (`axis` 1) over every line, and at least `floor`.
fn max_of(lines: &[(String, Vec<(f64, f64)>)], axis: usize, floor: f64) -> f64 {
    lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(move |p| if axis == 0 { p.0 } else { p.1 }))
        .fold(floor, f64::max)
}

/// One coloured line per series with its legend entry, then the legend box.
fn draw_lines<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    lines: &[(String, Vec<(f64, f64)>)],
    legend_at: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(legend_at)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// msg/s per second of the run, one line per phase.
pub(crate) fn throughput(path: &Path, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let x_max = max_of(series, 0, 1.0).ceil();
    let y_max = max_of(series, 1, 1.0) * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput over time (acked msg/s)", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the warmup started")
        .y_desc("msg/s")
        .y_label_formatter(&|v| super::report::thousands(v.max(0.0) as u64))
        .draw()
        .map_err(err)?;
    draw_lines(&mut chart, series, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Latency (ms) against percentile, the x axis being 1/(1-q) on a log scale, so the tail
/// (99%, 99.9%, 99.99%) gets as much room as the median.
pub(crate) fn latency_percentiles(
    path: &Path,
    curves: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<()> {
    let x_max = max_of(curves, 0, 100.0);
    let y_max = max_of(curves, 1, 0.001) * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency by percentile (send -> ack)", ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(80)
        .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_label_formatter(&|v| percentile_label(*v))
        .draw()
        .map_err(err)?;
    draw_lines(&mut chart, curves, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(err)?;
    Ok(())
}

/// 1/(1-q) as a percentile label: 1 -> "0%", 2 -> "50%", 100 -> "99%", 1000 -> "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let text = format!("{p:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_read_naturally() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(10_000.0), "99.99%");
    }
}
