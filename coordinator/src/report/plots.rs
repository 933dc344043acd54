//! The plots of a run, each drawn as PNG and SVG with `plotters`. Text is drawn with the
//! DejaVu Sans font embedded in the binary (no fontconfig or system fonts needed).

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::ReportError;
use super::data::{Metrics, StepPoint};

/// Size of every plot, pixels.
pub const SIZE: (u32, u32) = (1100, 520);
/// Lines with more points are averaged over buckets of consecutive steps down to this.
pub const MAX_POINTS: usize = 2000;
/// Noisy series with more points are drawn faint, under a bold moving mean.
pub const SMOOTH_ABOVE: usize = 200;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A line through the points.
    Line,
    /// A line through noisy per-step values: when there are more than [`SMOOTH_ABOVE`]
    /// points it is drawn faint, with its moving mean (see [`window`]) drawn bold.
    Noisy,
    /// A dashed line (drawn over a solid line it may coincide with).
    Dashed,
    /// A marker at each point (sparse series such as validation losses).
    Markers,
}

/// One named series of `(step, value)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// Colour.
    pub color: RGBColor,
    /// Line or markers.
    pub style: Style,
    /// The points (finite values only).
    pub points: Vec<(f64, f64)>,
}

/// One plot: its file stem, title, axis and series.
#[derive(Debug, Clone)]
pub struct Chart {
    /// File stem: the plot is written as `<stem>.png` and `<stem>.svg`.
    pub stem: &'static str,
    /// Title (says how per-rank values were aggregated).
    pub title: String,
    /// Y axis description.
    pub y_label: &'static str,
    /// Whether the y axis starts at 0.
    pub y_from_zero: bool,
    /// Whether the values are counts (integer tick labels, room above the largest).
    pub y_integer: bool,
    /// Series drawn.
    pub series: Vec<Series>,
    /// Steps marked with a vertical line (checkpoints).
    pub vlines: Vec<f64>,
}

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE_: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE_: RGBColor = RGBColor(148, 103, 189);
const BROWN_: RGBColor = RGBColor(140, 86, 75);
/// Colour of the checkpoint lines.
const CHECKPOINT: RGBColor = RGBColor(120, 60, 170);

/// Points of the moving mean of a series of `n` points (odd, at least 5: about 2 % of
/// the series).
pub fn window(n: usize) -> usize {
    (n / 50).max(5) | 1
}

/// The centred moving mean of `points` over `w` neighbours (fewer at the ends).
pub fn moving_mean(points: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    let mut prefix = Vec::with_capacity(points.len() + 1);
    prefix.push(0.0);
    for p in points {
        prefix.push(prefix.last().copied().unwrap_or(0.0) + p.1);
    }
    let h = w / 2;
    (0..points.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(h), (i + h + 1).min(points.len()));
            (points[i].0, (prefix[b] - prefix[a]) / (b - a) as f64)
        })
        .collect()
}

/// Averages consecutive points in buckets so that at most `max` remain.
pub fn thin(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max || max == 0 {
        return points;
    }
    let k = points.len().div_ceil(max);
    points
        .chunks(k)
        .map(|c| {
            let n = c.len() as f64;
            let (x, y) = c.iter().fold((0.0, 0.0), |(a, b), p| (a + p.0, b + p.1));
            (x / n, y / n)
        })
        .collect()
}

fn noisy(m: &Metrics, name: &str, color: RGBColor, f: fn(&StepPoint) -> Option<f64>) -> Series {
    Series {
        style: Style::Noisy,
        ..line(m, name, color, f)
    }
}

fn line(m: &Metrics, name: &str, color: RGBColor, f: fn(&StepPoint) -> Option<f64>) -> Series {
    let points = m
        .steps
        .iter()
        .filter_map(|s| Some((s.step as f64, f(s)?)))
        .collect();
    Series {
        name: name.to_string(),
        color,
        style: Style::Line,
        points: thin(points, MAX_POINTS),
    }
}

/// A step function (counts): only the points around each change are kept, so the line
/// is exact however long the run.
fn steps_of(m: &Metrics, name: &str, color: RGBColor, f: fn(&StepPoint) -> f64) -> Series {
    let all: Vec<(f64, f64)> = m.steps.iter().map(|s| (s.step as f64, f(s))).collect();
    let mut points: Vec<(f64, f64)> = Vec::new();
    for (i, &p) in all.iter().enumerate() {
        let changed = i == 0 || all[i - 1].1 != p.1;
        if changed && i > 0 && points.last() != Some(&all[i - 1]) {
            points.push(all[i - 1]);
        }
        if changed || i + 1 == all.len() {
            points.push(p);
        }
    }
    Series {
        name: name.to_string(),
        color,
        style: Style::Line,
        points,
    }
}

fn markers(name: &str, color: RGBColor, points: Vec<(f64, f64)>) -> Series {
    Series {
        name: name.to_string(),
        color,
        style: Style::Markers,
        points,
    }
}

/// The charts of a run; `checkpoints` are the steps marked on the loss plot.
pub fn charts(m: &Metrics, checkpoints: &[u64]) -> Vec<Chart> {
    let val = |f: fn(&super::data::EvalPoint) -> Option<f64>| -> Vec<(f64, f64)> {
        m.evals
            .iter()
            .filter_map(|e| Some((e.step as f64, f(e)?)))
            .collect()
    };
    let cluster = m.max_world_size() > 1;
    let chart = |stem, title: &str, y_label, y_from_zero, series: Vec<Series>| Chart {
        stem,
        title: title.to_string(),
        y_label,
        y_from_zero,
        y_integer: false,
        series,
        vlines: Vec::new(),
    };
    let mut loss = chart(
        "loss",
        "Loss: training (global) and validation; dashed lines: checkpoints",
        "loss",
        false,
        vec![
            noisy(m, "train total", BLUE_, |s| s.loss),
            noisy(m, "train MGEM", ORANGE_, |s| s.mgem),
            noisy(m, "train NT-Xent", GREEN_, |s| s.contrastive),
            markers("validation total", RED_, val(|e| Some(e.val_loss))),
            markers("validation MGEM", PURPLE_, val(|e| e.val_mgem)),
            markers("validation NT-Xent", BROWN_, val(|e| e.val_contrastive)),
        ],
    );
    loss.vlines = checkpoints.iter().map(|&s| s as f64).collect();
    let throughput_title = if cluster {
        "Cells per second, whole job (cells of a step / slowest rank's step time)"
    } else {
        "Cells per second"
    };
    let timing_title = if cluster {
        "Data wait and gradient all-reduce per step (max and mean over ranks)"
    } else {
        "Data wait and gradient all-reduce per step"
    };
    let mut timing = vec![
        noisy(m, "data wait (max)", BLUE_, |s| s.data_wait_max),
        noisy(m, "all-reduce (max)", ORANGE_, |s| s.allreduce_max),
    ];
    if cluster {
        timing.push(noisy(m, "data wait (mean)", GREEN_, |s| s.data_wait_mean));
        timing.push(noisy(m, "all-reduce (mean)", RED_, |s| s.allreduce_mean));
        // Overlapped with the backward pass, the wait differs from the all-reduce (without
        // overlap every rank logs the same value for both).
        if m.steps.iter().any(
            |s| matches!((s.allreduce_wait_max, s.allreduce_max), (Some(w), Some(a)) if w != a),
        ) {
            timing.push(noisy(m, "all-reduce waited for (max)", PURPLE_, |s| {
                s.allreduce_wait_max
            }));
        }
    } else {
        for s in &mut timing {
            s.name = s.name.replace(" (max)", "");
        }
    }
    let mut workers = chart(
        "workers",
        "Workers (world size) and membership generation per step",
        "count",
        true,
        vec![
            steps_of(m, "workers", BLUE_, |s| s.world_size as f64),
            Series {
                style: Style::Dashed,
                ..steps_of(m, "generation", ORANGE_, |s| s.generation as f64)
            },
        ],
    );
    workers.y_integer = true;
    let all = vec![
        loss,
        chart(
            "lr",
            "Learning rate",
            "learning rate",
            true,
            vec![line(m, "lr", BLUE_, |s| s.lr)],
        ),
        chart(
            "grad_norm",
            "Gradient norm (before clipping)",
            "L2 norm",
            true,
            vec![noisy(m, "grad norm", BLUE_, |s| s.grad_norm)],
        ),
        chart(
            "throughput",
            throughput_title,
            "cells / s",
            true,
            vec![noisy(m, "cells/s", BLUE_, |s| s.cells_per_s)],
        ),
        chart("timing", timing_title, "seconds", true, timing),
        workers,
    ];
    all.into_iter()
        .map(|mut c| {
            c.series.retain(|s| !s.points.is_empty());
            c
        })
        .filter(|c| !c.series.is_empty())
        .collect()
}

/// Registers the embedded font as `sans-serif` (once per process).
fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let regular = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let bold =
            plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
        if regular.is_err() || bold.is_err() {
            tracing::warn!("the embedded DejaVu Sans font did not load; plots may lack text");
        }
    });
}

/// Tick label of `v` on an axis from `lo` to `hi`: one format for the whole axis, with
/// as many decimals as about ten ticks need (exponent form for tiny or huge values); an
/// `integer` axis labels whole numbers only.
pub fn tick(v: f64, lo: f64, hi: f64, integer: bool) -> String {
    if integer {
        return if (v - v.round()).abs() < 1e-9 {
            format!("{v:.0}")
        } else {
            String::new()
        };
    }
    let m = lo.abs().max(hi.abs());
    if v == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&m) {
        format!("{v:.1e}")
    } else {
        let step = ((hi - lo) / 10.0).max(f64::MIN_POSITIVE);
        let d = (-step.log10()).ceil().clamp(0.0, 4.0) as usize;
        format!("{v:.d$}")
    }
}

fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = (hi.abs() * 0.1).max(1e-9);
        return (if from_zero { lo } else { lo - d }, hi + d);
    }
    let pad = (hi - lo) * 0.05;
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, c: &Chart) -> Result<(), String> {
    let s = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(s)?;
    let xs = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x0, x1) = range(xs.chain(c.vlines.iter().copied()), false);
    let ys = c.series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (y0, y1) = if c.y_integer {
        (0.0, ys.fold(0.0, f64::max).ceil() + 1.0)
    } else {
        range(ys, c.y_from_zero)
    };
    let mut chart = ChartBuilder::on(root)
        .caption(&c.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(s)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(c.y_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .x_label_formatter(&|v| tick(*v, x0, x1, false))
        .y_label_formatter(&|v| tick(*v, y0, y1, c.y_integer))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(s)?;
    let dashed = CHECKPOINT.mix(0.8).stroke_width(2);
    for (i, &x) in c.vlines.iter().enumerate() {
        let a = chart
            .draw_series(DashedLineSeries::new([(x, y0), (x, y1)], 6, 4, dashed))
            .map_err(s)?;
        if i == 0 {
            a.label("checkpoint").legend(move |(x, y)| {
                plotters::element::DashedPathElement::new([(x, y), (x + 20, y)], 6, 4, dashed)
            });
        }
    }
    // Faint per-step lines first, so that no bold line is hidden under them.
    let smoothed = |ser: &Series| ser.style == Style::Noisy && ser.points.len() > SMOOTH_ABOVE;
    for ser in c.series.iter().filter(|x| smoothed(x)) {
        let pts = ser.points.iter().copied();
        chart
            .draw_series(LineSeries::new(pts, ser.color.mix(0.3).stroke_width(1)))
            .map_err(s)?;
    }
    for ser in &c.series {
        let color = ser.color;
        let pts = ser.points.iter().copied();
        // Wide lines through many sharp turns get miter spikes: thin lines when dense.
        let width = if ser.points.len() > 2 * SMOOTH_ABOVE {
            1
        } else {
            2
        };
        match ser.style {
            Style::Noisy if smoothed(ser) => {
                let w = window(ser.points.len());
                chart
                    .draw_series(LineSeries::new(
                        moving_mean(&ser.points, w),
                        color.stroke_width(2),
                    ))
                    .map_err(s)?
                    .label(format!("{} (faint: per step; bold: mean of {w})", ser.name))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                    })
            }
            Style::Line | Style::Noisy => chart
                .draw_series(LineSeries::new(pts, color.stroke_width(width)))
                .map_err(s)?
                .label(&ser.name)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                }),
            Style::Dashed => {
                let style = color.stroke_width(2);
                chart
                    .draw_series(DashedLineSeries::new(pts, 8, 6, style))
                    .map_err(s)?
                    .label(&ser.name)
                    .legend(move |(x, y)| {
                        plotters::element::DashedPathElement::new(
                            [(x, y), (x + 20, y)],
                            6,
                            4,
                            style,
                        )
                    })
            }
            Style::Markers => chart
                .draw_series(pts.map(|p| Circle::new(p, 4, color.filled())))
                .map_err(s)?
                .label(&ser.name)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled())),
        };
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()
        .map_err(s)?;
    root.present().map_err(s)
}

/// Writes `<stem>.png` and `<stem>.svg` of `chart` into `dir`; returns their paths.
pub fn render(chart: &Chart, dir: &Path) -> Result<[PathBuf; 2], ReportError> {
    fonts();
    let png = dir.join(format!("{}.png", chart.stem));
    let svg = dir.join(format!("{}.svg", chart.stem));
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |message| ReportError::Plot { path, message }
    };
    draw(&BitMapBackend::new(&png, SIZE).into_drawing_area(), chart).map_err(failed(&png))?;
    draw(&SVGBackend::new(&svg, SIZE).into_drawing_area(), chart).map_err(failed(&svg))?;
    Ok([png, svg])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_averages_buckets() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 2.0 * i as f64)).collect();
        assert_eq!(thin(pts.clone(), 20), pts);
        let t = thin(pts, 5);
        assert_eq!(
            t,
            vec![(0.5, 1.0), (2.5, 5.0), (4.5, 9.0), (6.5, 13.0), (8.5, 17.0)]
        );
    }

    #[test]
    fn step_functions_keep_the_points_around_changes() {
        let text: String = [(1, 3), (2, 3), (3, 3), (4, 2), (5, 2), (6, 3)]
            .iter()
            .map(|(s, w)| {
                format!("{{\"event\":\"step\",\"step\":{s},\"loss\":1.0,\"world_size\":{w}}}\n")
            })
            .collect();
        let m = super::super::data::parse(&text, "u").unwrap();
        let w = steps_of(&m, "workers", BLUE_, |s| s.world_size as f64);
        let want = [(1.0, 3.0), (3.0, 3.0), (4.0, 2.0), (5.0, 2.0), (6.0, 3.0)];
        assert_eq!(w.points, want);
    }

    #[test]
    fn moving_mean_is_centred_and_shrinks_at_the_ends() {
        let pts: Vec<(f64, f64)> = [1.0, 2.0, 6.0, 3.0, 8.0]
            .iter()
            .enumerate()
            .map(|(i, &y)| (i as f64, y))
            .collect();
        let m = moving_mean(&pts, 3);
        assert_eq!(
            m,
            vec![
                (0.0, 1.5),
                (1.0, 3.0),
                (2.0, 11.0 / 3.0),
                (3.0, 17.0 / 3.0),
                (4.0, 5.5)
            ]
        );
        assert_eq!(window(100), 5);
        assert_eq!(window(1500), 31);
    }

    #[test]
    fn ticks_use_one_format_per_axis() {
        assert_eq!(tick(0.0, 0.0, 1.0, false), "0");
        assert_eq!(tick(0.0005, 0.0, 0.003, false), "5.0e-4");
        assert_eq!(tick(0.008, 0.0, 0.017, false), "0.008");
        assert_eq!(tick(0.016, 0.0, 0.017, false), "0.016");
        assert_eq!(tick(2.5, 1.2, 4.4, false), "2.5");
        assert_eq!(tick(3.0, 1.2, 4.4, false), "3.0");
        assert_eq!(tick(40.0, 0.0, 62.0, false), "40");
        assert_eq!(tick(250000.0, 0.0, 3e5, false), "2.5e5");
        assert_eq!(tick(2.0, 0.0, 3.0, true), "2");
        assert_eq!(tick(1.5, 0.0, 3.0, true), "");
    }

    #[test]
    fn ranges_pad_and_handle_constant_series() {
        assert_eq!(range([1.0, 1.0].into_iter(), true), (0.0, 1.05));
        assert_eq!(range([2.0, 2.0].into_iter(), false), (1.8, 2.2));
        let (lo, hi) = range([2.0, 4.0].into_iter(), false);
        assert!(lo < 2.0 && hi > 4.0);
        assert_eq!(range(std::iter::empty(), false), (0.0, 1.0));
    }

    #[test]
    fn pngs_and_svgs_are_written_with_text() {
        let text: String = (1..=50)
            .map(|s| {
                format!(
                    "{{\"event\":\"step\",\"step\":{s},\"loss\":{},\"mgem\":1.0,\"contrastive\":0.5,\"grad_norm\":1.0,\"lr\":0.001,\"cells_per_s\":10.0,\"data_wait_s\":0.1,\"compute_s\":0.2,\"allreduce_s\":0.0}}\n",
                    10.0 / s as f64
                )
            })
            .collect();
        let m = super::super::data::parse(&text, "u").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cs = charts(&m, &[25, 50]);
        assert_eq!(cs.len(), 6);
        for c in &cs {
            let [png, svg] = render(c, dir.path()).unwrap();
            assert!(std::fs::metadata(&png).unwrap().len() > 1000);
            let svg = std::fs::read_to_string(svg).unwrap();
            assert!(svg.contains("<svg") && svg.contains(&c.title.replace('\'', "&apos;")));
        }
    }
}
