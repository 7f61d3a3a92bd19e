//! The predictive power against k plot (`pp_vs_k.svg`): one line per class
//! (its best canvas's k-sweep), the threshold of the minimal k as a dashed
//! horizontal line and the default k as a dashed vertical one. Drawn with
//! `plotters`' SVG backend: text stays text, rendered by the browser, so no
//! font files are needed.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::Names;
use crate::error::{Error, Result};
use crate::search::RunReport;

/// Size of the plot in SVG user units (it scales with the page).
pub const SIZE: (u32, u32) = (920, 460);

/// Width of the legend panel at the right of the plot (outside the axes,
/// so it never hides a line).
pub const LEGEND_WIDTH: u32 = 240;

/// Legend labels longer than this are cut (with an ellipsis).
const LABEL_MAX: usize = 22;

/// Above this many classes only flagged classes get their own colour and
/// legend entry; the others are thin grey lines ("other classes"), since
/// a legend of a hundred entries helps no one.
pub const LEGEND_MAX: usize = 20;

/// Line colours (Tableau 20, the usual well-separated categorical set).
const PALETTE: [(u8, u8, u8); 20] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
];

/// Grey of the lines of unlabelled classes in large runs.
const OTHER: (u8, u8, u8) = (170, 170, 170);

/// The colour of the line of the `rank`-th class (in `RunReport::classes`
/// order) of a run with `n` classes, `flagged` or not: what the plot
/// draws, public so the HTML table and the tests can match it.
pub fn series_colour(rank: usize, n: usize, flagged: bool) -> (u8, u8, u8) {
    if n <= LEGEND_MAX || flagged {
        PALETTE[rank % PALETTE.len()]
    } else {
        OTHER
    }
}

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("report: drawing the k plot failed: {e}"))
}

/// One class's line.
struct Series {
    /// Position in `RunReport::classes` (decides the colour).
    rank: usize,
    class: usize,
    flagged: bool,
    /// `(k, power)` with k >= 1, by increasing k.
    pts: Vec<(f64, f64)>,
}

/// A k value for display: `38`, `1.2k`, `50k`.
fn k_label(k: f64) -> String {
    if k >= 10_000.0 {
        format!("{:.0}k", k / 1000.0)
    } else if k >= 1000.0 {
        format!("{:.1}k", k / 1000.0)
    } else {
        format!("{k:.0}")
    }
}

/// The SVG text of the plot for `report`. A run without a k-sweep gets a
/// small SVG saying so (the file always exists, so links never break).
pub fn pp_vs_k_svg(report: &RunReport, names: &Names<'_>) -> Result<String> {
    let n = report.classes.len();
    let series: Vec<Series> = report
        .classes
        .iter()
        .enumerate()
        .map(|(rank, c)| {
            let mut pts: Vec<(f64, f64)> = report
                .searches
                .get(c.best)
                .map(|s| {
                    s.sweep
                        .iter()
                        .filter(|(k, _)| *k >= 1)
                        .map(|&(k, p)| (k as f64, p))
                        .collect()
                })
                .unwrap_or_default();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                rank,
                class: c.class,
                flagged: report.flagged.contains(&c.class),
                pts,
            }
        })
        .collect();
    let ks = series.iter().flat_map(|s| s.pts.iter().map(|p| p.0));
    let (lo, hi) = ks.fold((f64::INFINITY, 0.0f64), |(lo, hi), k| {
        (lo.min(k), hi.max(k))
    });
    let mut svg = String::new();
    if !(lo.is_finite() && hi >= lo) {
        let (w, h) = (SIZE.0, 80);
        svg = format!(
            "<svg width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\">\n\
             <text x=\"{}\" y=\"45\" text-anchor=\"middle\" font-family=\"sans-serif\" font-size=\"15\" fill=\"#555\">\
             No k-sweep in this run: predictive power was measured at k = {} only.</text>\n</svg>\n",
            w / 2,
            report.config.top_k
        );
        return Ok(svg);
    }
    let top_k = report.config.top_k as f64;
    let (lo, hi) = (lo.min(top_k), hi.max(top_k));
    // A single k would give an empty log range: widen it around that k.
    let (x0, x1) = if hi > lo {
        (lo, hi)
    } else {
        ((lo / 2.0).max(0.5), hi * 2.0)
    };
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (area, legend) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
        let mut chart = ChartBuilder::on(&area)
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d((x0..x1).log_scale(), 0.0f64..1.02)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("pattern size k (pixels, log scale)")
            .y_desc("predictive power")
            .x_label_formatter(&|k| k_label(*k))
            .y_label_formatter(&|p| format!("{:.0}%", p * 100.0))
            .y_labels(11)
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(plot_err)?;

        // The threshold and the default k first, so the data lines are on top.
        let thr = report.config.threshold;
        let guide = ShapeStyle::from(&RGBColor(90, 90, 90)).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0, thr), (x1, thr)],
                6,
                4,
                guide,
            ))
            .map_err(plot_err)?;
        chart
            .draw_series(DashedLineSeries::new(
                vec![(top_k, 0.0), (top_k, 1.02)],
                6,
                4,
                guide,
            ))
            .map_err(plot_err)?;
        let note = ("sans-serif", 13).into_font().color(&RGBColor(70, 70, 70));
        chart
            .draw_series([
                Text::new(
                    format!("threshold {:.0}%", thr * 100.0),
                    (x0, thr - 0.01),
                    note.clone().pos(Pos::new(HPos::Left, VPos::Top)),
                ),
                Text::new(
                    format!(" default k = {}", report.config.top_k),
                    (top_k, 0.0),
                    note.pos(Pos::new(HPos::Left, VPos::Bottom)),
                ),
            ])
            .map_err(plot_err)?;

        // Grey lines under the coloured ones, flagged classes on top.
        let mut order: Vec<&Series> = series.iter().collect();
        order.sort_by_key(|s| (series_colour(s.rank, n, s.flagged) != OTHER, s.flagged));
        for Series {
            rank, flagged, pts, ..
        } in order
        {
            if pts.is_empty() {
                continue;
            }
            let (r, g, b) = series_colour(*rank, n, *flagged);
            let width = if *flagged { 3 } else { 2 };
            let style = ShapeStyle::from(&RGBColor(r, g, b)).stroke_width(width);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), style).point_size(2))
                .map_err(plot_err)?;
        }

        // The legend, in class order, in its own panel.
        let mut entries: Vec<(String, (u8, u8, u8), u32)> = Vec::new();
        let mut others = false;
        for Series {
            rank,
            class,
            flagged,
            pts,
        } in &series
        {
            if pts.is_empty() {
                continue;
            }
            let colour = series_colour(*rank, n, *flagged);
            if colour == OTHER {
                others = true;
                continue;
            }
            let mut label = format!("{class} {}", names.get(*class));
            if label.chars().count() > LABEL_MAX {
                label = label.chars().take(LABEL_MAX - 1).collect::<String>() + "…";
            }
            if *flagged {
                label.push_str(" (flagged)");
            }
            entries.push((label, colour, if *flagged { 3 } else { 2 }));
        }
        if others {
            entries.push(("other classes".into(), OTHER, 2));
        }
        let top = 24;
        let step = 20
            .min((SIZE.1 as i32 - 2 * top) / entries.len().max(1) as i32)
            .max(8);
        for (i, (label, (r, g, b), width)) in entries.iter().enumerate() {
            let weight = if *width == 3 {
                FontStyle::Bold
            } else {
                FontStyle::Normal
            };
            let font = ("sans-serif", 13, weight)
                .into_font()
                .color(&RGBColor(40, 40, 40));
            let y = top + i as i32 * step;
            legend
                .draw(&PathElement::new(
                    vec![(6, y), (30, y)],
                    ShapeStyle::from(&RGBColor(*r, *g, *b)).stroke_width(*width),
                ))
                .map_err(plot_err)?;
            legend
                .draw(&Text::new(
                    label.clone(),
                    (36, y),
                    font.pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(plot_err)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}
