//! Reports: everything a run leaves for people to look at.
//!
//! [`write_run`] fills one run's folder: `report.json` (the [`RunReport`],
//! every number), `images/` (per search the canvas, the mask heat map, the
//! pattern on grey, on white and on transparency, the stamped examples;
//! `grid.png` with one row per class), `paper_figure.png` (every class's
//! pattern from its natural canvas, as the paper's figure shows them),
//! `pp_vs_k.svg` (predictive power against k) and `report.html`, a single
//! self-contained page (images inline as data URIs, CSS inline, no script,
//! no external URL). [`write_comparison`] puts
//! several runs side by side (the `cwp demo` page) and [`terminal_summary`]
//! is the table the CLI prints.
//!
//! Every file is written atomically ([`crate::io::write_atomic`]), the
//! page last, so a folder with a `report.html` is complete and a crash never
//! leaves half a PNG.

pub mod html;
pub mod plot;
pub mod raster;
pub mod text;

use std::path::Path;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::search::{ClassSummary, RunReport, SearchResult};
use raster::Raster;

/// Above this many classes the grid's tiles are shrunk to [`GRID_THUMB`]
/// pixels (a 1000-class ImageNet grid at full size would be a quarter of a
/// million pixels tall).
pub const GRID_MANY: usize = 100;

/// Largest tile edge of the grid of a run with more than [`GRID_MANY`] classes.
pub const GRID_THUMB: usize = 64;

/// Above this many searches, the per-search pictures are not inlined in
/// the page's details (they stay in `images/`), so the page stays loadable.
pub const DETAIL_IMAGES_MAX: usize = 300;

/// Tiles per row of the paper figure (one row for up to this many classes).
pub const PAPER_COLUMNS: usize = 10;

/// The paper figure's file name in the run folder.
pub const PAPER_FIGURE: &str = "paper_figure.png";

/// Class names for display: the caller's list first, then the names the
/// report carries, then the number, so a report renders whatever is known.
pub struct Names<'a> {
    given: &'a [String],
    report: &'a RunReport,
}

impl<'a> Names<'a> {
    /// Names for `report`, preferring `given[class]` when non-empty.
    pub fn new(given: &'a [String], report: &'a RunReport) -> Names<'a> {
        Names { given, report }
    }

    /// The name of `class`.
    pub fn get(&self, class: usize) -> String {
        if let Some(n) = self.given.get(class).filter(|n| !n.is_empty()) {
            return n.clone();
        }
        if let Some(c) = self.report.classes.iter().find(|c| c.class == class) {
            if !c.name.is_empty() {
                return c.name.clone();
            }
        }
        if let Some(s) = self.report.searches.iter().find(|s| s.class == class) {
            if !s.class_name.is_empty() {
                return s.class_name.clone();
            }
        }
        class.to_string()
    }
}

/// The image shape `[C, H, W]` of a run: the model's `input` when the
/// report records it, otherwise inferred from the first search (a square
/// mask gives H = W, the canvas length gives C).
pub fn image_shape(report: &RunReport) -> Result<[usize; 3]> {
    let from_model = report
        .model
        .get("input")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 3)
        .and_then(|a| {
            let v: Vec<usize> = a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as usize))
                .collect();
            (v.len() == 3).then(|| [v[0], v[1], v[2]])
        });
    if let Some(shape) = from_model {
        return Ok(shape);
    }
    let Some(s) = report.searches.first() else {
        return Ok([1, 1, 1]);
    };
    let plane = s.mask.len();
    let side = (plane as f64).sqrt().round() as usize;
    if plane == 0 || side * side != plane || s.canvas.pixels.len() % plane != 0 {
        return Err(Error::Msg(format!(
            "report: cannot tell the image shape: the model's input is not recorded and the mask of class {} has {plane} values",
            s.class
        )));
    }
    Ok([s.canvas.pixels.len() / plane, side, side])
}

/// A canvas id made safe for a file name (ids are like `auto0`, `test3`,
/// `solid0.5`; anything else becomes `_`).
fn file_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The file name stem of a search's pictures: `c{class}_{canvas_id}`.
pub fn search_stem(s: &SearchResult) -> String {
    format!("c{}_{}", s.class, file_safe(&s.canvas.id))
}

/// Whether a search started from a real image (a test or train image of
/// the class), as the paper's patterns do; solid canvases are not.
pub fn is_natural(s: &SearchResult) -> bool {
    matches!(s.canvas.source.as_str(), "test" | "train")
}

/// The search the paper figure shows for `class`: its natural-canvas
/// search of highest power at the default k (the first on a tie; NaN counts
/// as lowest), or None when the class has no natural-canvas search.
pub fn paper_search(report: &RunReport, class: usize) -> Option<usize> {
    let power = |i: usize| {
        let p = report.searches[i].power.overall;
        if p.is_nan() {
            f64::NEG_INFINITY
        } else {
            p
        }
    };
    let mut best: Option<usize> = None;
    for (i, s) in report.searches.iter().enumerate() {
        if s.class == class && is_natural(s) && best.is_none_or(|b| power(i) > power(b)) {
            best = Some(i);
        }
    }
    best
}

/// PNG bytes of one search's pictures, at display size.
pub struct SearchPictures {
    /// `c{class}_{canvas_id}`.
    pub stem: String,
    /// The canvas.
    pub canvas: Vec<u8>,
    /// The mask heat map.
    pub mask: Vec<u8>,
    /// The pattern on a grey checkerboard (white pixels show).
    pub pattern_grey: Vec<u8>,
    /// The pattern on white.
    pub pattern: Vec<u8>,
    /// The pattern on transparency.
    pub pattern_rgba: Vec<u8>,
    /// The strip of stamped examples (None when no example has pixels).
    pub examples: Option<Vec<u8>>,
    /// Each stamped example alone, for the page's captions (None: no pixels).
    pub example_tiles: Vec<Option<Vec<u8>>>,
}

/// One row of the all-class grid, as the page shows it.
pub struct GridRow {
    /// The class.
    pub class: usize,
    /// Index of its best search in [`RunReport::searches`].
    pub search: usize,
    /// The example shown (index into that search's examples), if any.
    pub example: Option<usize>,
    /// canvas, mask, pattern, stamped example (a blank tile when none): PNG.
    pub tiles: [Vec<u8>; 4],
}

/// The paper-style figure: every class's pattern from its natural canvas,
/// in class order, [`PAPER_COLUMNS`] to a row; a class without a
/// natural-canvas search keeps its place as a blank tile
/// ([`raster::MISSING_GREY`]), so positions always follow class order.
pub struct PaperFigure {
    /// One per class, in [`RunReport::classes`] order: the class and the
    /// search its tile shows ([`paper_search`]; None: a blank tile).
    pub tiles: Vec<(usize, Option<usize>)>,
    /// Tiles per row.
    pub columns: usize,
    /// `paper_figure.png`.
    pub png: Vec<u8>,
}

/// Every picture of a run, encoded once: written to `images/` and inlined
/// in the page from the same bytes.
pub struct RunPictures {
    /// One per search, in [`RunReport::searches`] order.
    pub searches: Vec<SearchPictures>,
    /// One per class, in [`RunReport::classes`] order.
    pub grid_rows: Vec<GridRow>,
    /// `grid.png`.
    pub grid: Vec<u8>,
    /// `paper_figure.png`; None when no class has a natural-canvas search.
    pub paper: Option<PaperFigure>,
}

/// The example a grid row shows: the first whose stamped prediction is the
/// target (the pattern at work), else the first with pixels.
fn grid_example(s: &SearchResult, numel: usize) -> Option<usize> {
    let has = |i: &usize| s.examples[*i].pixels.len() == numel;
    (0..s.examples.len())
        .filter(has)
        .find(|&i| s.examples[i].stamped_pred == s.class)
        .or_else(|| (0..s.examples.len()).find(has))
}

/// Renders every picture of `report` (nothing is written).
pub fn render_pictures(report: &RunReport) -> Result<RunPictures> {
    let shape = image_shape(report)?;
    let [c, h, w] = shape;
    let numel = c * h * w;
    let scale = raster::display_scale(h, w);
    let shown = |r: Raster| r.upscale(scale);
    let mut searches = Vec::with_capacity(report.searches.len());
    let mut rasters = Vec::with_capacity(report.searches.len());
    for s in &report.searches {
        let at = |e: Error| Error::Msg(format!("class {} canvas {}: {e}", s.class, s.canvas.id));
        let canvas = shown(raster::from_planar(&s.canvas.pixels, shape).map_err(at)?);
        let mask = shown(raster::heat_map(&s.mask, h, w).map_err(at)?);
        let pattern =
            shown(raster::pattern(&s.canvas.pixels, &s.positions, shape, false).map_err(at)?);
        let pattern_grey =
            shown(raster::pattern_on_grey(&s.canvas.pixels, &s.positions, shape).map_err(at)?);
        let pattern_rgba =
            shown(raster::pattern(&s.canvas.pixels, &s.positions, shape, true).map_err(at)?);
        let blank = || {
            Raster::filled(
                canvas.width,
                canvas.height,
                &vec![raster::MISSING_GREY; canvas.channels],
            )
        };
        let example_rasters: Vec<Option<Raster>> = s
            .examples
            .iter()
            .map(|e| {
                (e.pixels.len() == numel)
                    .then(|| raster::from_planar(&e.pixels, shape).map(shown))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let examples = if example_rasters.iter().any(Option::is_some) {
            let tiles: Vec<Raster> = example_rasters
                .iter()
                .map(|r| r.clone().unwrap_or_else(blank))
                .collect();
            Some(raster::strip(&tiles).to_png()?)
        } else {
            None
        };
        let example_tiles = example_rasters
            .iter()
            .map(|r| r.as_ref().map(Raster::to_png).transpose())
            .collect::<Result<_>>()?;
        searches.push(SearchPictures {
            stem: search_stem(s),
            canvas: canvas.to_png()?,
            mask: mask.to_png()?,
            pattern_grey: pattern_grey.to_png()?,
            pattern: pattern.to_png()?,
            pattern_rgba: pattern_rgba.to_png()?,
            examples,
            example_tiles,
        });
        // The grid shows the pattern over grey, where white pixels show.
        rasters.push((canvas, mask, pattern_grey, example_rasters));
    }

    // The grid: the best canvas of each class; thumbnails in large runs.
    let thumb = |r: &Raster| -> Raster {
        let edge = r.width.max(r.height);
        if report.classes.len() > GRID_MANY && edge > GRID_THUMB {
            r.resize_nearest(
                (r.width * GRID_THUMB / edge).max(1),
                (r.height * GRID_THUMB / edge).max(1),
            )
        } else {
            r.clone()
        }
    };
    let mut grid_rows = Vec::with_capacity(report.classes.len());
    let mut grid_tiles = Vec::with_capacity(report.classes.len());
    for ClassSummary { class, best, .. } in &report.classes {
        let (canvas, mask, pattern, examples) = rasters.get(*best).ok_or_else(|| {
            Error::Msg(format!(
                "report: class {class}'s best search {best} does not exist ({} searches)",
                report.searches.len()
            ))
        })?;
        let example = grid_example(&report.searches[*best], numel);
        let ex = match example.and_then(|i| examples[i].clone()) {
            Some(r) => r,
            None => Raster::filled(
                canvas.width,
                canvas.height,
                &vec![raster::MISSING_GREY; canvas.channels],
            ),
        };
        let row = [canvas, mask, pattern, &ex].map(thumb);
        grid_rows.push(GridRow {
            class: *class,
            search: *best,
            example,
            tiles: [
                row[0].to_png()?,
                row[1].to_png()?,
                row[2].to_png()?,
                row[3].to_png()?,
            ],
        });
        grid_tiles.push(row.to_vec());
    }
    let grid = raster::grid(&grid_tiles).to_png()?;

    // The paper figure: natural canvases only; a blank tile as large as the
    // others where a class has none.
    let tiles: Vec<(usize, Option<usize>)> = report
        .classes
        .iter()
        .map(|c| (c.class, paper_search(report, c.class)))
        .collect();
    let paper = if tiles.iter().any(|(_, s)| s.is_some()) {
        let pictures: Vec<Raster> = tiles
            .iter()
            .map(|(_, s)| match s {
                Some(i) => thumb(&rasters[*i].2),
                None => {
                    let size = thumb(&Raster::filled(w * scale, h * scale, &[0]));
                    let channels = rasters.first().map_or(1, |r| r.2.channels);
                    Raster::filled(
                        size.width,
                        size.height,
                        &vec![raster::MISSING_GREY; channels],
                    )
                }
            })
            .collect();
        let columns = tiles.len().clamp(1, PAPER_COLUMNS);
        let rows: Vec<Vec<Raster>> = pictures.chunks(columns).map(<[Raster]>::to_vec).collect();
        Some(PaperFigure {
            tiles,
            columns,
            png: raster::grid(&rows).to_png()?,
        })
    } else {
        None
    };
    Ok(RunPictures {
        searches,
        grid_rows,
        grid,
        paper,
    })
}

/// `data:image/png;base64,...` for inlining a PNG in the page.
pub fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// What [`write_run`] rendered, for pages that show the run again.
pub struct Rendered {
    /// The pictures.
    pub pictures: RunPictures,
    /// The k plot's SVG text.
    pub svg: String,
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Removes the PNGs of `images` this report did not write: pictures of an
/// earlier run into the same folder (classes or canvases no longer
/// searched, examples no longer stored) would otherwise pass for this run's.
fn remove_stale_pictures(
    images: &Path,
    written: &std::collections::HashSet<std::ffi::OsString>,
) -> Result<()> {
    let entries = std::fs::read_dir(images).map_err(|e| Error::io(images, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(images, e))?;
        let name = entry.file_name();
        let is_png = Path::new(&name).extension().is_some_and(|x| x == "png");
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_png && is_file && !written.contains(&name) {
            remove_if_present(&entry.path())?;
        }
    }
    Ok(())
}

/// Writes one run's folder and returns what was rendered.
pub fn write_run_rendered(
    report: &RunReport,
    class_names: &[String],
    dir: &Path,
) -> Result<Rendered> {
    let names = Names::new(class_names, report);
    let images = dir.join("images");
    create_dir(&images)?;
    let pictures = render_pictures(report)?;
    let mut written = std::collections::HashSet::new();
    let mut write_image = |name: String, png: &[u8]| -> Result<()> {
        write_atomic(&images.join(&name), png)?;
        written.insert(std::ffi::OsString::from(name));
        Ok(())
    };
    for p in &pictures.searches {
        let file = |suffix: &str| format!("{}_{suffix}.png", p.stem);
        write_image(file("canvas"), &p.canvas)?;
        write_image(file("mask"), &p.mask)?;
        write_image(file("pattern_grey"), &p.pattern_grey)?;
        write_image(file("pattern"), &p.pattern)?;
        write_image(file("pattern_rgba"), &p.pattern_rgba)?;
        if let Some(ex) = &p.examples {
            write_image(file("examples"), ex)?;
        }
    }
    write_image("grid.png".into(), &pictures.grid)?;
    let paper = dir.join(PAPER_FIGURE);
    match &pictures.paper {
        Some(f) => write_atomic(&paper, &f.png)?,
        None => remove_if_present(&paper)?,
    }
    remove_stale_pictures(&images, &written)?;
    let json = serde_json::to_vec_pretty(report)
        .map_err(|e| Error::Msg(format!("report: cannot serialise report.json: {e}")))?;
    write_atomic(&dir.join("report.json"), &json)?;
    let svg = plot::pp_vs_k_svg(report, &names)?;
    write_atomic(&dir.join("pp_vs_k.svg"), svg.as_bytes())?;
    let page = html::run_page(report, &names, &pictures, &svg);
    write_atomic(&dir.join("report.html"), page.as_bytes())?;
    Ok(Rendered { pictures, svg })
}

/// Writes everything for one run into `dir` (created if needed):
/// `report.json` (the [`RunReport`], pretty), `images/` (per search
/// `c{class}_{canvas}_canvas.png`, `_mask.png`, `_pattern_grey.png`,
/// `_pattern.png`, `_pattern_rgba.png`, `_examples.png` when the examples
/// carry their pixels; `grid.png`), [`PAPER_FIGURE`] (when some class has
/// a natural-canvas search), `pp_vs_k.svg` and the self-contained
/// `report.html` (written last). Rewriting a folder replaces each file
/// atomically and removes the PNGs of `images/` (and a paper figure) the
/// new report did not write, so nothing of an earlier run lingers.
/// `class_names[c]` names class c (an empty or short list falls back to
/// the names in the report).
pub fn write_run(report: &RunReport, class_names: &[String], dir: &Path) -> Result<()> {
    write_run_rendered(report, class_names, dir).map(|_| ())
}

/// A folder name for a run label: lower-case letters, digits and `-`
/// (`"Adversarially trained"` → `adversarially-trained`; `run` if nothing is left).
pub fn slug(label: &str) -> String {
    let mut s = String::new();
    for c in label.chars() {
        if c.is_ascii_alphanumeric() {
            s.push(c.to_ascii_lowercase());
        } else if !s.ends_with('-') && !s.is_empty() {
            s.push('-');
        }
    }
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "run".into()
    } else {
        s
    }
}

/// Distinct slugs for `labels` (a repeated slug gets `-2`, `-3`, ...).
pub fn slugs(labels: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for l in labels {
        let base = slug(l);
        let mut s = base.clone();
        let mut i = 2;
        while out.contains(&s) {
            s = format!("{base}-{i}");
            i += 1;
        }
        out.push(s);
    }
    out
}

/// One run of a comparison, as `demo.json` lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DemoRun {
    /// The label (e.g. `backdoored`).
    pub label: String,
    /// Its folder under the comparison's folder (its full report is there).
    pub dir: String,
    /// The model label of the run.
    pub model_label: String,
    /// Clean test accuracy.
    pub clean_accuracy: f64,
    /// The statistic the verdict comes from (`min_k` or `mask_mean`).
    pub statistic: String,
    /// Flagged classes.
    pub flagged: Vec<usize>,
    /// Their names.
    pub flagged_names: Vec<String>,
    /// One line per class.
    pub classes: Vec<ClassSummary>,
}

/// `demo.json`: the comparison at a glance; each run's every number is in
/// its own `DIR/report.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DemoIndex {
    /// The page title.
    pub title: String,
    /// `classwise <version>`.
    pub tool: String,
    /// Notes shown on the page (e.g. shortened settings).
    pub notes: Vec<String>,
    /// The runs, in page order.
    pub runs: Vec<DemoRun>,
}

/// The `cwp demo` page: writes each run's own folder with [`write_run`]
/// into `dir/<slug of its label>/` (so the caller need not), then
/// `dir/report.html` with the runs side by side (one column per run: its
/// verdict, grid and a compact table; then every run's full details in
/// collapsed sections, and the `notes`) and `dir/demo.json` ([`DemoIndex`]).
pub fn write_comparison(
    runs: &[(String, RunReport)],
    class_names: &[String],
    title: &str,
    notes: &[String],
    dir: &Path,
) -> Result<()> {
    create_dir(dir)?;
    let labels: Vec<&str> = runs.iter().map(|(l, _)| l.as_str()).collect();
    let dirs = slugs(&labels);
    let mut rendered = Vec::with_capacity(runs.len());
    for ((_, report), sub) in runs.iter().zip(&dirs) {
        rendered.push(write_run_rendered(report, class_names, &dir.join(sub))?);
    }
    let index = DemoIndex {
        title: title.to_string(),
        tool: format!("classwise {}", env!("CARGO_PKG_VERSION")),
        notes: notes.to_vec(),
        runs: runs
            .iter()
            .zip(&dirs)
            .map(|((label, r), sub)| {
                let names = Names::new(class_names, r);
                DemoRun {
                    label: label.clone(),
                    dir: sub.clone(),
                    model_label: r.model_label.clone(),
                    clean_accuracy: r.clean_accuracy,
                    statistic: text::verdict_in_force(r).statistic.clone(),
                    flagged: r.flagged.clone(),
                    flagged_names: r.flagged.iter().map(|&c| names.get(c)).collect(),
                    classes: r.classes.clone(),
                }
            })
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&index)
        .map_err(|e| Error::Msg(format!("report: cannot serialise demo.json: {e}")))?;
    write_atomic(&dir.join("demo.json"), &json)?;
    let cols: Vec<html::RunColumn<'_>> = runs
        .iter()
        .zip(&dirs)
        .zip(&rendered)
        .map(|(((label, report), sub), r)| html::RunColumn {
            label,
            dir: sub,
            report,
            names: Names::new(class_names, report),
            pictures: &r.pictures,
            svg: &r.svg,
        })
        .collect();
    let page = html::comparison_page(title, notes, &cols);
    write_atomic(&dir.join("report.html"), page.as_bytes())
}

/// A plain-text summary table for the terminal: class, name, canvas,
/// power at the default k, clean share, minimal k, mask mean, anomaly
/// index (of the statistic the verdict uses), flagged; then the verdict line.
pub fn terminal_summary(report: &RunReport, class_names: &[String]) -> String {
    text::terminal_summary(report, &Names::new(class_names, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_folder_names_and_distinct() {
        assert_eq!(
            slug("Adversarially trained (PGD)"),
            "adversarially-trained-pgd"
        );
        assert_eq!(slug("  ../../etc "), "etc");
        assert_eq!(slug("§§"), "run");
        assert_eq!(
            slugs(&["natural", "Natural", "backdoored"]),
            vec!["natural", "natural-2", "backdoored"]
        );
    }

    #[test]
    fn file_names_of_odd_canvas_ids_are_safe() {
        assert_eq!(file_safe("solid0.5"), "solid0.5");
        assert_eq!(file_safe("a/b c"), "a_b_c");
    }
}
