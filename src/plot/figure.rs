//! Drawing the figure with plotters: a grid of panels, one row per quantity (training
//! success rate, mean reward, replays per batch, and eval scores when a run has them), the
//! left column against the learner step and the right one against generated responses; one
//! colour per run, the legend in the top row. PNG text is rendered with the embedded DejaVu
//! Sans (plotters' `ab_glyph` backend: no system font library); SVG keeps text as text.

use std::path::Path;
use std::sync::Once;

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::data::{Run, StepPoint};

/// DejaVu Sans 2.37 (Debian's `fonts-dejavu-core`; Bitstream Vera licence, see
/// `fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

/// Eight of Tableau's colours: distinguishable, and the same order in every figure.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Output format, from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => bail!(
                "--output {}: the figure must be a .png or .svg file",
                path.display()
            ),
        }
    }
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| anyhow::anyhow!("the embedded DejaVu Sans font does not load"));
    });
    result
}

/// Mean over a trailing window of `w` points (the first points average what there is).
fn moving_average(values: &[f64], w: usize) -> Vec<f64> {
    let w = w.max(1);
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0;
    for (i, v) in values.iter().enumerate() {
        sum += v;
        if i >= w {
            sum -= values[i - w];
        }
        out.push(sum / (i + 1).min(w) as f64);
    }
    out
}

/// One quantity of the step log.
struct Quantity {
    title: &'static str,
    value: fn(&StepPoint) -> f64,
    smooth: bool,
}

const QUANTITIES: [Quantity; 3] = [
    Quantity {
        title: "training success rate (all constraints hold)",
        value: |s| s.success,
        smooth: true,
    },
    Quantity {
        title: "mean reward of the batch",
        value: |s| s.reward,
        smooth: true,
    },
    Quantity {
        title: "replays per batch",
        value: |s| s.replays,
        smooth: false,
    },
];

/// A line of one panel.
struct Line {
    label: String,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Draws `runs` into `path`.
pub fn draw(runs: &[Run], path: &Path, format: Format) -> Result<()> {
    register_font()?;
    let has_eval = runs.iter().any(|r| !r.evals.is_empty());
    let rows = QUANTITIES.len() + usize::from(has_eval);
    let size = (1500u32, 340 * rows as u32);
    match format {
        Format::Png => {
            let root = BitMapBackend::new(path, size).into_drawing_area();
            panels(&root, runs, rows)?;
            root.present()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Format::Svg => {
            let root = SVGBackend::new(path, size).into_drawing_area();
            panels(&root, runs, rows)?;
            root.present()
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

fn panels<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    runs: &[Run],
    rows: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let areas = root.split_evenly((rows, 2));
    let longest = runs.iter().map(|r| r.steps.len()).max().unwrap_or(1);
    let window = (longest / 10).clamp(1, 25);
    for (row, q) in QUANTITIES.iter().enumerate() {
        for (col, by_generated) in [false, true].into_iter().enumerate() {
            let lines: Vec<Line> = runs
                .iter()
                .enumerate()
                .map(|(i, run)| {
                    let ys: Vec<f64> = run.steps.iter().map(q.value).collect();
                    let ys = if q.smooth {
                        moving_average(&ys, window)
                    } else {
                        ys
                    };
                    Line {
                        label: run.name.clone(),
                        colour: COLOURS[i % COLOURS.len()],
                        points: run
                            .steps
                            .iter()
                            .zip(ys)
                            .map(|(s, y)| {
                                (
                                    if by_generated {
                                        s.generated
                                    } else {
                                        s.step as f64
                                    },
                                    y,
                                )
                            })
                            .collect(),
                    }
                })
                .collect();
            let title = if q.smooth && window > 1 {
                format!("{} (mean of {window} steps)", q.title)
            } else {
                q.title.to_string()
            };
            panel(
                &areas[row * 2 + col],
                &title,
                by_generated,
                &lines,
                row == 0,
            )?;
        }
    }
    if rows > QUANTITIES.len() {
        let row = QUANTITIES.len();
        for (col, by_generated) in [false, true].into_iter().enumerate() {
            let mut lines = Vec::new();
            for (i, run) in runs.iter().enumerate() {
                let mut benches: Vec<&str> = run.evals.iter().map(|e| e.bench.as_str()).collect();
                benches.sort_unstable();
                benches.dedup();
                for bench in benches {
                    lines.push(Line {
                        label: format!("{} {bench}", run.name),
                        colour: COLOURS[i % COLOURS.len()],
                        points: run
                            .evals
                            .iter()
                            .filter(|e| e.bench == bench)
                            .map(|e| {
                                let x = if by_generated {
                                    run.generated_at(e.step)
                                } else {
                                    e.step as f64
                                };
                                (x, e.prompt_strict)
                            })
                            .collect(),
                    });
                }
            }
            panel(
                &areas[row * 2 + col],
                "eval: prompt-level strict accuracy",
                by_generated,
                &lines,
                true,
            )?;
        }
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    by_generated: bool,
    lines: &[Line],
    legend: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let all = lines.iter().flat_map(|l| l.points.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0, f64::max).max(1.0);
    let y_top = all.map(|p| p.1).fold(0.0, f64::max);
    // Rates and scores are fractions: keep [0, 1] so that panels compare; counts get room.
    let y_max = if y_top <= 1.0 { 1.0 } else { y_top * 1.1 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(42)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc(if by_generated {
            "generated responses"
        } else {
            "learner step"
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            // Counts: whole numbers as such, and a tick between two of them (a panel of
            // 0 to 4 replays has ticks every 0.5) with its decimal, not rounded onto its
            // neighbour's label.
            if y_max > 1.0 && (y - y.round()).abs() < 1e-9 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    for line in lines {
        let colour = line.colour;
        let series = chart.draw_series(LineSeries::new(
            line.points.iter().copied(),
            colour.stroke_width(2),
        ))?;
        if legend {
            series.label(line.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3))
            });
        }
        // Points too, so that a run of one step (or one evaluation) is visible.
        if line.points.len() < 40 {
            chart.draw_series(
                line.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, colour.filled())),
            )?;
        }
    }
    if legend && !lines.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_over_a_trailing_window() {
        assert_eq!(
            moving_average(&[1.0, 3.0, 5.0, 7.0], 2),
            vec![1.0, 2.0, 4.0, 6.0]
        );
        assert_eq!(moving_average(&[2.0, 4.0], 1), vec![2.0, 4.0]);
    }

    #[test]
    fn format_by_extension() {
        assert_eq!(
            Format::from_path(Path::new("a/b.PNG")).unwrap(),
            Format::Png
        );
        assert_eq!(Format::from_path(Path::new("b.svg")).unwrap(), Format::Svg);
        assert!(Format::from_path(Path::new("b.pdf")).is_err());
        assert!(Format::from_path(Path::new("b")).is_err());
    }
}
