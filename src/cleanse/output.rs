//! The files of a Neural Cleanse run: `cleanse.json` (every number),
//! per-class PNGs (`mask_T.png`, `pattern_T.png`, `fusion_T.png` =
//! mask × pattern, at the image's own size, as the original saves them) and
//! `cleanse.html`, a self-contained page in the search report's style.
//! Every file is written atomically.

use std::fmt::Write as _;
use std::path::Path;

use super::{ClassResult, CleanseReport};
use crate::error::{Error, Result};
use crate::io::write_atomic;
use crate::report::html::{esc, img, kv, num, page};
use crate::report::raster::{display_scale, from_planar, Raster};
use crate::report::text::{anomaly, pct, seconds};
use crate::search::verdict;

/// The three pictures of a class: mask (grey), pattern, fusion.
fn pictures(r: &ClassResult, shape: [usize; 3]) -> Result<[Raster; 3]> {
    let [c, h, w] = shape;
    let plane = h * w;
    let fusion: Vec<f32> = r
        .pattern
        .iter()
        .enumerate()
        .map(|(i, &p)| p * r.mask[i % plane])
        .collect();
    Ok([
        from_planar(&r.mask, [1, h, w])?,
        from_planar(&r.pattern, [c, h, w])?,
        from_planar(&fusion, [c, h, w])?,
    ])
}

/// The name of class `c` (its index when the data names none).
fn name(names: &[String], c: usize) -> String {
    names.get(c).cloned().unwrap_or_else(|| c.to_string())
}

/// Writes `cleanse.json`, the PNGs and `cleanse.html` into `dir` (which must exist).
pub fn write(report: &CleanseReport, class_names: &[String], dir: &Path) -> Result<()> {
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| Error::Msg(format!("cleanse.json: {e}")))?;
    let mut tiles = Vec::with_capacity(report.results.len());
    for r in &report.results {
        let pics = pictures(r, report.shape)?;
        for (kind, pic) in ["mask", "pattern", "fusion"].iter().zip(&pics) {
            write_atomic(&dir.join(format!("{kind}_{}.png", r.class)), &pic.to_png()?)?;
        }
        tiles.push(pics);
    }
    write_atomic(
        &dir.join("cleanse.html"),
        html(report, class_names, &tiles)?.as_bytes(),
    )?;
    write_atomic(&dir.join("cleanse.json"), json.as_bytes())
}

fn verdict_box(report: &CleanseReport, names: &[String]) -> String {
    let mut out = String::new();
    if report.classes.len() < super::MIN_CLASSES {
        let _ = writeln!(
            out,
            "<div class=\"verdict na\"><div class=\"head\">No class flagged</div>\n<p>Only {} class(es) analysed: the anomaly index needs at least 3.</p></div>",
            report.classes.len()
        );
        return out;
    }
    if report.flagged.is_empty() {
        let _ = writeln!(
            out,
            "<div class=\"verdict clean\"><div class=\"head\">No class flagged</div>\n<p>No class's mask is an outlier: no anomaly index below the median exceeds {}.</p></div>",
            anomaly(verdict::THRESHOLD)
        );
        return out;
    }
    let _ = writeln!(
        out,
        "<div class=\"verdict flagged\"><div class=\"head\">Flagged: likely backdoor target{}</div>\n<ul>",
        if report.flagged.len() > 1 { "s" } else { "" }
    );
    for &c in &report.flagged {
        if let Some(k) = report.classes.iter().position(|&x| x == c) {
            let _ = writeln!(
                out,
                "<li>{c} · {}: mask L1 {} against a median of {}, anomaly index {}</li>",
                esc(&name(names, c)),
                num(report.results[k].l1),
                num(report.median),
                anomaly(report.anomaly_index[k])
            );
        }
    }
    out.push_str("</ul></div>\n");
    out
}

fn html(report: &CleanseReport, names: &[String], tiles: &[[Raster; 3]]) -> Result<String> {
    let cfg = &report.config;
    let title = format!("Neural Cleanse — {}", report.model);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<h1>{}</h1>\n<p class=\"sub\">Neural Cleanse (Wang et al., S&amp;P 2019): for every class, the smallest mask and pattern that send clean images to it; a backdoor target needs a far smaller mask.</p>",
        esc(&title)
    );
    body.push_str(&verdict_box(report, names));
    let _ = writeln!(
        body,
        "<p class=\"muted\">Anomaly index: (median − L1) / (1.4826 × MAD) of the kept masks' raw L1 norms, as the original; a class below the median with an index above {} that reached the attack-success threshold is flagged. Median {}, MAD {}.</p>",
        anomaly(verdict::THRESHOLD),
        num(report.median),
        num(report.mad)
    );
    body.push_str("<h2>Run</h2>\n<table class=\"kv\">\n");
    kv(&mut body, "model", &esc(&report.model));
    kv(
        &mut body,
        "input",
        &format!(
            "{}×{}×{}",
            report.shape[0], report.shape[1], report.shape[2]
        ),
    );
    kv(
        &mut body,
        "steps",
        &format!(
            "at most {} per class, {} mini-batches of {} clean test images each",
            cfg.steps, cfg.mini_batches, cfg.batch
        ),
    );
    kv(
        &mut body,
        "optimiser",
        &format!(
            "Adam lr {} β1 {} β2 {} ε {:e}; tanh-parameterised mask and pattern",
            cfg.adam.lr, cfg.adam.beta1, cfg.adam.beta2, cfg.adam.eps
        ),
    );
    let s = &cfg.schedule;
    kv(
        &mut body,
        "cost",
        &format!(
            "0 until ASR ≥ {} for {} steps, then {:e}; ×{} after {} successful steps, ÷{:.3} after {} failed; early stop after {} steps without a smaller mask",
            s.threshold, s.patience, s.init_cost, s.multiplier_up, s.patience, s.multiplier_down, s.patience, s.early_stop_patience
        ),
    );
    kv(
        &mut body,
        "mode",
        if cfg.sequential {
            "one class at a time"
        } else {
            "all classes in the same step"
        },
    );
    kv(
        &mut body,
        "time",
        &format!(
            "{} ({} images through forward and backward)",
            seconds(report.seconds),
            report.images
        ),
    );
    kv(&mut body, "seed", &cfg.seed.to_string());
    body.push_str("</table>\n<h2>Classes</h2>\n<div class=\"scroll\"><table class=\"data\">\n<tr><th class=\"l\">class</th><th>mask L1</th><th>ASR</th><th>reached</th><th>kept step</th><th>steps</th><th>cost at end</th><th>anomaly index</th><th class=\"l\"></th></tr>\n");
    for (k, r) in report.results.iter().enumerate() {
        let flagged = report.flagged.contains(&r.class);
        let _ = writeln!(
            body,
            "<tr{}><td class=\"l\">{} · {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{}</td><td>{:e}</td><td>{}</td><td class=\"l flag\">{}</td></tr>",
            if flagged { " class=\"flagged\"" } else { "" },
            r.class,
            esc(&name(names, r.class)),
            num(r.l1),
            pct(r.asr),
            if r.reached { "yes" } else { "no" },
            r.kept_step,
            r.steps,
            if r.early_stopped { " (early stop)" } else { "" },
            r.cost,
            anomaly(report.anomaly_index[k]),
            if flagged { "flagged" } else { "" },
        );
    }
    body.push_str("</table></div>\n<h2>Masks and patterns</h2>\n<div class=\"scroll\"><table class=\"grid\">\n<tr><th></th><th>mask</th><th>pattern</th><th>mask × pattern</th></tr>\n");
    let [_, h, w] = report.shape;
    let scale = display_scale(h, w);
    for (r, pics) in report.results.iter().zip(tiles) {
        let flagged = report.flagged.contains(&r.class);
        let n = name(names, r.class);
        let mut cells = String::new();
        for (kind, pic) in ["mask", "pattern", "fusion"].iter().zip(pics) {
            let png = pic.upscale(scale).to_png()?;
            let _ = write!(
                cells,
                "<td>{}</td>",
                img(&png, &format!("{kind} of {n}"), "px")
            );
        }
        let _ = writeln!(
            body,
            "<tr{}><td class=\"name\">{} · {}{}</td>{cells}</tr>",
            if flagged { " class=\"flagged\"" } else { "" },
            r.class,
            esc(&n),
            if flagged {
                "<span class=\"badge bad\">flagged</span>"
            } else {
                ""
            },
        );
    }
    body.push_str("</table></div>\n<footer>Generated by classwise (`cwp cleanse`). Self-contained page: every image is inline.</footer>\n");
    Ok(page(&title, false, &body))
}
