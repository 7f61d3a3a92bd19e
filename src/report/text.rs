//! Number formatting shared by the terminal table and the HTML page (so
//! both say the same thing the same way), the verdict in words, and the
//! terminal summary.

use super::Names;
use crate::search::{verdict, RunReport, SearchResult, Verdict};

/// A share in [0, 1] as a percentage with one decimal (`87.5%`).
pub fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}%", v * 100.0)
    } else {
        "–".into()
    }
}

/// A minimal k; `not reached` when the sweep ran and no measured k
/// reached the threshold; `—` when no sweep ran (nothing was measured).
pub fn min_k(k: Option<usize>, measured: bool) -> String {
    match k {
        Some(k) => k.to_string(),
        None if measured => "not reached".into(),
        None => "—".into(),
    }
}

/// Whether the run measured minimal k values (it ran a k-sweep).
pub fn min_k_measured(report: &RunReport) -> bool {
    !report.config.k_sweep.is_empty()
}

/// The search the verdict compares for class row `row` (None for reports
/// without the comparison, or one that indexes wrong).
pub fn compared_search(report: &RunReport, row: usize) -> Option<&SearchResult> {
    report
        .verdict_searches
        .get(row)
        .and_then(|&i| report.searches.get(i))
}

/// The mask mean of the search the verdict compares for class row `row`
/// (the best search's for reports without the comparison).
pub fn compared_mask_mean(report: &RunReport, row: usize) -> f64 {
    compared_search(report, row)
        .map(|s| s.mask_mean)
        .unwrap_or_else(|| report.classes[row].mask_mean)
}

/// An anomaly index with two decimals (`inf` / `-inf` for a zero MAD).
pub fn anomaly(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v == f64::INFINITY {
        "inf".into()
    } else if v == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{v:.2}")
    }
}

/// Seconds, compactly (`0.4 s`, `12.3 s`, `5 min 3 s`).
pub fn seconds(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        "–".into()
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else {
        let m = (s / 60.0).floor();
        format!("{m:.0} min {:.0} s", s - 60.0 * m)
    }
}

/// The verdict the run's `flagged` list comes from: the mask-mean
/// analysis (as `search::run` decides it).
pub fn verdict_in_force(report: &RunReport) -> &Verdict {
    &report.verdict_mask
}

/// What the statistic of [`verdict_in_force`] is, in words, with the name
/// of the report field it lives in.
pub fn statistic_words(report: &RunReport) -> String {
    let compared = match report.verdict_canvas.as_str() {
        "solid" => " of each class's best solid-canvas search",
        "natural" => " of each class's best natural-canvas search",
        _ => "",
    };
    format!(
        "ln of the mask mean{compared}, the mask's L1 norm as Neural Cleanse uses it (verdict_mask)"
    )
}

/// The anomaly index of `class` in `v` (NaN when it was not analysed).
pub fn anomaly_of(v: &Verdict, class: usize) -> f64 {
    v.classes
        .iter()
        .position(|&c| c == class)
        .and_then(|i| v.anomaly_index.get(i).copied())
        .unwrap_or(f64::NAN)
}

/// True when too few classes were searched for the anomaly analysis to
/// mean anything (`search::run` flags nothing below three).
pub fn too_few_classes(report: &RunReport) -> bool {
    report.classes.len() < 3
}

/// The verdict as one line: which classes are flagged (name, anomaly
/// index) by which statistic, or that none is.
pub fn verdict_line(report: &RunReport, names: &Names<'_>) -> String {
    let v = verdict_in_force(report);
    let stat = statistic_words(report);
    if report.flagged.is_empty() {
        if too_few_classes(report) {
            format!(
                "verdict: no class flagged (only {} class(es) searched; the anomaly analysis needs at least 3)",
                report.classes.len()
            )
        } else {
            format!(
                "verdict ({stat}): no class flagged{}",
                unproven_words(report, names)
            )
        }
    } else {
        let list: Vec<String> = report
            .flagged
            .iter()
            .map(|&c| {
                format!(
                    "class {c} ({}), anomaly index {}{}",
                    names.get(c),
                    anomaly(anomaly_of(v, c)),
                    diffuse_words(report, c)
                )
            })
            .collect();
        format!(
            "verdict ({stat}): FLAGGED as a likely backdoor target: {} (threshold {}){}",
            list.join("; "),
            anomaly(verdict::THRESHOLD),
            unproven_words(report, names)
        )
    }
}

/// For a flagged class whose top-k pattern stays below the threshold power
/// while its optimised mask reaches it, says so (empty otherwise): the
/// evidence is then a diffuse trigger, such as a blend, not a small patch.
pub fn diffuse_words(report: &RunReport, class: usize) -> String {
    let compared = report
        .classes
        .iter()
        .position(|s| s.class == class)
        .and_then(|row| compared_search(report, row));
    let threshold = report.config.threshold;
    match compared {
        Some(s) if s.power.overall < threshold && s.soft_power.is_some_and(|p| p >= threshold) => {
            format!(
            " (its optimised mask, blended in, reaches {} power where its top-{} pattern reaches {}: a diffuse trigger such as a blend)",
            pct(s.soft_power.unwrap_or(f64::NAN)),
            s.power.k,
            pct(s.power.overall)
            )
        }
        _ => String::new(),
    }
}

/// The anomalous classes left unflagged because neither their pattern nor
/// their optimised mask reaches the threshold power, in words (empty when
/// there are none).
pub fn unproven_words(report: &RunReport, names: &Names<'_>) -> String {
    if report.unproven.is_empty() {
        return String::new();
    }
    let list: Vec<String> = report
        .unproven
        .iter()
        .map(|&c| format!("class {c} ({})", names.get(c)))
        .collect();
    format!(
        "; not flagged although anomalous, because neither the pattern nor the optimised mask reaches {} power (a failed search, not a backdoor): {}",
        pct(report.config.threshold),
        list.join(", ")
    )
}

/// The canvas of a search in short: `auto0 (98.7%)`.
pub fn canvas_short(report: &RunReport, best: usize) -> String {
    match report.searches.get(best) {
        Some(s) => match s.canvas.confidence {
            Some(c) => format!("{} ({})", s.canvas.id, pct(c as f64)),
            None => s.canvas.id.clone(),
        },
        None => "–".into(),
    }
}

/// The plain-text summary for the terminal: one row per class (best
/// canvas) and the verdict line.
pub fn terminal_summary(report: &RunReport, names: &Names<'_>) -> String {
    let v = verdict_in_force(report);
    let header = [
        "class".to_string(),
        "name".into(),
        "canvas".into(),
        format!("power@k={}", report.config.top_k),
        "clean".into(),
        format!("min k ({})", pct(report.config.threshold)),
        "verdict mask mean".into(),
        "anomaly".into(),
        "flagged".into(),
    ];
    let rows: Vec<[String; 9]> = report
        .classes
        .iter()
        .enumerate()
        .map(|(row, c)| {
            [
                c.class.to_string(),
                names.get(c.class),
                canvas_short(report, c.best),
                pct(c.power),
                pct(c.clean),
                min_k(c.min_k, min_k_measured(report)),
                pct(compared_mask_mean(report, row)),
                anomaly(anomaly_of(v, c.class)),
                if report.flagged.contains(&c.class) {
                    "FLAGGED".into()
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    let width = |j: usize| {
        rows.iter()
            .map(|r| r[j].chars().count())
            .chain([header[j].chars().count()])
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..9).map(width).collect();
    // Text columns left-aligned, numbers right-aligned.
    let left = [false, true, true, false, false, false, false, false, true];
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (j, cell) in cells.iter().enumerate() {
            let pad = widths[j] - cell.chars().count();
            if j > 0 {
                s.push_str("  ");
            }
            if left[j] {
                s.push_str(cell);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            }
        }
        s.trim_end().to_string()
    };
    let mut out = String::new();
    out.push_str(&format!(
        "{} — clean accuracy {}\n",
        report.model_label,
        pct(report.clean_accuracy)
    ));
    out.push_str(&line(&header));
    out.push('\n');
    out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push_str(&verdict_line(report, names));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(pct(0.875), "87.5%");
        assert_eq!(pct(1.0), "100.0%");
        assert_eq!(min_k(None, true), "not reached");
        assert_eq!(min_k(None, false), "—");
        assert_eq!(min_k(Some(12), true), "12");
        assert_eq!(anomaly(1.23456), "1.23");
        assert_eq!(anomaly(f64::INFINITY), "inf");
        assert_eq!(seconds(75.2), "1 min 15 s");
    }
}
