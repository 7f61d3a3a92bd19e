//! `scan.html`: the scan's table, one row per (model, method), each linking
//! to the model's full report, and the detection figures when labels were
//! given.

use std::fmt::Write as _;

use super::metrics::Detection;
use super::Row;
use crate::report::html::{esc, page};

fn opt_pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v))
}

fn opt_num(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.3}"))
}

fn classes(c: &[usize]) -> String {
    if c.is_empty() {
        "none".to_string()
    } else {
        c.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The page of a scan.
pub fn scan_page(
    rows: &[Row],
    pending: &[String],
    detection: &[Detection],
    command: &str,
) -> String {
    let mut b = String::new();
    let _ = writeln!(
        b,
        "<h1>classwise scan</h1>\n<p class=\"sub\">{} model row(s){} · <code>{}</code></p>",
        rows.len(),
        if pending.is_empty() {
            String::new()
        } else {
            format!(
                ", {} model(s) not yet scanned (other shards?)",
                pending.len()
            )
        },
        esc(command)
    );
    if !detection.is_empty() {
        b.push_str(
            "<h2>Detection</h2>\n<table class=\"data\"><tr><th>method</th><th>backdoored</th><th>clean</th>\
             <th>TPR</th><th>FPR</th><th>ROC AUC</th><th>target accuracy</th><th>s / model</th></tr>\n",
        );
        for d in detection {
            let _ = writeln!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d.method),
                d.backdoored,
                d.clean,
                opt_pct(d.tpr),
                opt_pct(d.fpr),
                opt_num(d.auc),
                opt_pct(d.target_accuracy),
                d.seconds_per_model.map_or("–".into(), |s| format!("{s:.1}"))
            );
        }
        b.push_str(
            "</table>\n<p class=\"sub\">TPR/FPR: share of backdoored/clean models with a flagged class. \
             AUC over each model's largest anomaly index. Target accuracy: detected backdoored models \
             whose most anomalous flagged class is the target. <code>+ref</code>: the verdict against \
             the reference models (a reference model is judged against the others).</p>\n",
        );
    }
    let referenced = rows.iter().any(|r| r.referenced.is_some());
    let _ = writeln!(
        b,
        "<h2>Models</h2>\n<table class=\"data\"><tr><th>model</th><th>method</th><th>label</th>\
         <th>flagged</th><th>largest anomaly index</th><th>clean accuracy</th>{}<th>seconds</th><th>report</th></tr>",
        if referenced {
            "<th>flagged against references</th><th>its largest index</th>"
        } else {
            ""
        }
    );
    for r in rows {
        let mut label = match &r.label {
            None => "–".to_string(),
            Some(l) if l.backdoored => format!("backdoor → {}", l.target.unwrap_or_default()),
            Some(_) => "clean".to_string(),
        };
        if r.reference {
            label.push_str(" (reference)");
        }
        let flagged = if let Some(e) = &r.error {
            format!(
                "<td class=\"flag\" colspan=\"{}\">error: {}</td>",
                if referenced { 5 } else { 3 },
                esc(e)
            )
        } else {
            let against = if !referenced {
                String::new()
            } else if let Some(x) = &r.referenced {
                format!(
                    "<td class=\"flag\">{}</td><td>{}</td>",
                    classes(&x.flagged),
                    x.score.map_or("–".into(), |s| format!("{s:.2}"))
                )
            } else {
                "<td>no reference</td><td>–</td>".to_string()
            };
            format!(
                "<td class=\"flag\">{}</td><td>{}</td><td>{}</td>{against}",
                classes(&r.flagged),
                r.score.map_or("–".into(), |s| format!("{s:.2}")),
                opt_pct(r.clean_accuracy)
            )
        };
        let link = r.report.as_deref().map_or("–".into(), |p| {
            format!("<a href=\"{}\">report</a>", esc(p))
        });
        let _ = writeln!(
            b,
            "<tr{}><td class=\"l\">{}</td><td>{}</td><td>{}</td>{flagged}<td>{:.1}</td><td>{link}</td></tr>",
            if r.flagged.is_empty() && r.error.is_none() { "" } else { " class=\"flagged\"" },
            esc(&r.model),
            r.method.name(),
            esc(&label),
            r.seconds
        );
    }
    b.push_str("</table>\n");
    if !pending.is_empty() {
        b.push_str("<h2>Not yet scanned</h2>\n<ul class=\"notes\">\n");
        for p in pending {
            let _ = writeln!(b, "<li>{}</li>", esc(p));
        }
        b.push_str("</ul>\n");
    }
    b.push_str("<footer>Generated by classwise.</footer>\n");
    page("classwise scan", true, &b)
}
