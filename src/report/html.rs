//! The HTML pages: one self-contained file each (images as data URIs, CSS
//! inline, no script, no external URL), readable offline and safe to mail
//! around. Every string that comes from data (class names, the command
//! line, metadata, labels) goes through [`esc`].

use std::fmt::Write as _;

use super::text::{self, anomaly, min_k, pct, seconds};
use super::{data_uri, is_natural, plot, Names, PaperFigure, RunPictures, DETAIL_IMAGES_MAX};
use crate::search::{verdict, RunReport, SearchResult};

/// Escapes text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page style: quiet, readable, print-friendly; pixel images stay crisp.
const STYLE: &str = r#"
:root { --fg:#1d2327; --muted:#5f6b73; --line:#dde3e8; --bg:#ffffff; --soft:#f5f7f9;
  --bad:#b3261e; --badbg:#fdecea; --good:#1e6b35; --goodbg:#eaf6ee; --na:#f3f3f3; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1240px; margin: 0 auto; padding: 28px 32px 64px; }
main.wide { max-width: 1800px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 26px 0 8px; }
h4 { font-size: 15px; margin: 16px 0 6px; font-weight: 600; }
.muted { color: var(--muted); }
.sub { color: var(--muted); margin: 0 0 18px; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre.cmd { background: var(--soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px;
  white-space: pre-wrap; word-break: break-all; margin: 4px 0; }
table { border-collapse: collapse; }
table.data { width: 100%; font-variant-numeric: tabular-nums; }
table.data th, table.data td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
table.data th { background: var(--soft); font-weight: 600; white-space: normal; vertical-align: bottom; }
table.data td.l, table.data th.l { text-align: left; }
table.data tr.flagged td { background: var(--badbg); font-weight: 600; }
table.data tr.flagged td.flag { color: var(--bad); }
table.kv td { padding: 2px 14px 2px 0; vertical-align: top; overflow-wrap: anywhere; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.small th, table.small td { padding: 3px 8px; font-size: 13px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; vertical-align: 0; }
.verdict { border-radius: 8px; padding: 14px 18px; margin: 18px 0; border: 2px solid; }
.verdict .head { font-size: 19px; font-weight: 700; margin-bottom: 4px; }
.verdict.flagged { border-color: var(--bad); background: var(--badbg); }
.verdict.flagged .head { color: var(--bad); }
.verdict.clean { border-color: var(--good); background: var(--goodbg); }
.verdict.clean .head { color: var(--good); }
.verdict.na { border-color: #bbb; background: var(--na); }
.verdict ul { margin: 6px 0; padding-left: 22px; }
.verdict p { margin: 6px 0 0; font-size: 14px; }
.grid td, .grid th { padding: 3px 6px; text-align: center; vertical-align: middle; }
.grid th { font-weight: 600; color: var(--muted); font-size: 13px; }
.grid td.name { text-align: left; white-space: nowrap; padding-right: 12px; }
.grid tr.flagged td.name { color: var(--bad); font-weight: 700; }
.grid img { display: block; border: 1px solid var(--line); }
img.px { image-rendering: pixelated; image-rendering: crisp-edges; }
.figs { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin: 6px 0 10px; }
figure { margin: 0; }
figure img { display: block; border: 1px solid var(--line); }
figcaption { font-size: 12.5px; color: var(--muted); margin-top: 3px; max-width: 160px; }
figcaption b.hit { color: var(--bad); }
.checker img { background: repeating-conic-gradient(#686868 0 25%, #989898 0 50%) 0 0 / 16px 16px; }
.plot svg { width: 100%; max-width: 920px; height: auto; display: block; }
.search { border: 1px solid var(--line); border-radius: 8px; padding: 4px 16px 12px; margin: 12px 0; }
.search.best { border-color: #9fb3c8; }
.side { display: grid; gap: 14px; align-items: start; margin: 12px 0; }
.side > .search { margin: 0; min-width: 0; }
.kind { font-size: 12px; font-weight: 600; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
figure.paper { margin: 8px 0 4px; }
figure.paper img { max-width: 100%; height: auto; }
figure.paper figcaption { max-width: none; font-size: 13.5px; }
.run figure.paper img { width: 100%; }
.badge { display: inline-block; font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 10px;
  vertical-align: 2px; margin-left: 6px; }
.badge.bad { background: var(--bad); color: #fff; }
.badge.best { background: #dfe9f3; color: #1f4e79; }
.tables { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.tables > div, .tables > table { min-width: 0; max-width: 100%; }
.scroll { overflow-x: auto; }
.runs { display: grid; gap: 22px; align-items: start; }
.run { border: 1px solid var(--line); border-radius: 10px; padding: 6px 16px 16px; min-width: 0; }
.run h2 { margin-top: 10px; }
.run .grid img { width: 56px; height: auto; }
.run .grid td.name { white-space: normal; font-size: 13px; min-width: 70px; }
.run table.data th, .run table.data td { padding: 4px 5px; font-size: 13px; }
.run table.data td.l { white-space: normal; }
details { border: 1px solid var(--line); border-radius: 8px; padding: 8px 16px; margin: 14px 0; }
details > summary { cursor: pointer; font-weight: 600; font-size: 17px; }
ul.notes li { margin: 3px 0; }
footer { margin-top: 48px; color: var(--muted); font-size: 13px; }
"#;

/// A whole self-contained page around `body` (already HTML), in the
/// reports' style.
pub fn page(title: &str, wide: bool, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main{}>\n{body}\n</main>\n</body>\n</html>\n",
        esc(title),
        if wide { " class=\"wide\"" } else { "" },
    )
}

/// An `<img>` of a PNG, inline, `alt` escaped.
pub(crate) fn img(png: &[u8], alt: &str, class: &str) -> String {
    format!(
        "<img class=\"{class}\" src=\"{}\" alt=\"{}\">",
        data_uri(png),
        esc(alt)
    )
}

/// A key–value row with an already escaped value.
pub(crate) fn kv(out: &mut String, key: &str, value_html: &str) {
    let _ = writeln!(out, "<tr><td>{}</td><td>{value_html}</td></tr>", esc(key));
}

/// A number with thousands separators (`11,173,962`).
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A JSON value as escaped display text (strings without their quotes).
fn json_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => esc(s),
        serde_json::Value::Null => "–".into(),
        other => esc(&other.to_string()),
    }
}

/// The model's description: the known fields first, readably, then
/// whatever else (training metadata) as key–value pairs.
fn model_rows(out: &mut String, model: &serde_json::Value) {
    let Some(obj) = model.as_object() else {
        kv(out, "model", &json_text(model));
        return;
    };
    for (key, v) in obj {
        match (key.as_str(), v) {
            ("input", serde_json::Value::Array(a)) => {
                let dims: Vec<String> = a.iter().map(json_text).collect();
                kv(out, "input (C×H×W)", &dims.join(" × "));
            }
            ("params", serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                kv(out, "parameters", &thousands(n.as_u64().unwrap_or(0)))
            }
            ("num_classes", v) => kv(out, "classes", &json_text(v)),
            ("metadata", serde_json::Value::Object(m)) => {
                if m.is_empty() {
                    kv(
                        out,
                        "metadata",
                        "<span class=\"muted\">none recorded</span>",
                    );
                }
                for (k, v) in m {
                    // Structured metadata (how a model was trained) is a JSON
                    // string: shown folded and pretty, not as one long line.
                    let nested = v
                        .as_str()
                        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                        .filter(|j| j.is_object());
                    let html = match nested {
                        Some(j) => format!(
                            "<details><summary>show</summary><pre>{}</pre></details>",
                            esc(&serde_json::to_string_pretty(&j).unwrap_or_default())
                        ),
                        None => json_text(v),
                    };
                    kv(out, &format!("metadata: {k}"), &html);
                }
            }
            (k, v) => kv(out, k, &json_text(v)),
        }
    }
}

/// "What was run": command, tool, model, data, device, configuration,
/// accuracy, timings, reuse.
fn run_info(report: &RunReport) -> String {
    let cfg = &report.config;
    let m = &cfg.mask;
    let mut out = String::new();
    out.push_str("<div class=\"tables\">\n<div>\n<h4>Run</h4>\n<table class=\"kv\">\n");
    kv(&mut out, "tool", &esc(&report.tool));
    kv(&mut out, "model", &esc(&report.model_label));
    kv(&mut out, "data", &esc(&report.data));
    kv(&mut out, "device", &esc(&report.device));
    if !report.numerics.is_empty() {
        kv(&mut out, "numerics", &esc(&report.numerics));
    }
    kv(
        &mut out,
        "clean accuracy",
        &format!("<b>{}</b>", pct(report.clean_accuracy)),
    );
    kv(&mut out, "search time", &seconds(report.search_seconds));
    kv(&mut out, "total time", &seconds(report.total_seconds));
    kv(
        &mut out,
        "throughput",
        &format!(
            "{:.1} steps/s, {:.0} images/s",
            report.steps_per_second, report.images_per_second
        ),
    );
    kv(
        &mut out,
        "reused searches",
        &format!(
            "{} of {} (from an earlier run with the same settings)",
            report.reused,
            report.searches.len()
        ),
    );
    out.push_str("</table>\n</div>\n<div>\n<h4>Model</h4>\n<table class=\"kv\">\n");
    model_rows(&mut out, &report.model);
    out.push_str("</table>\n</div>\n<div>\n<h4>Configuration</h4>\n<table class=\"kv\">\n");
    let classes = if cfg.classes.len() <= 20 {
        cfg.classes
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        format!("{} classes", cfg.classes.len())
    };
    kv(&mut out, "classes searched", &classes);
    kv(&mut out, "canvas", &esc(&cfg.canvas));
    kv(
        &mut out,
        "optimisation",
        &format!(
            "{} epoch(s), batch {}, α = {}, β = {}, lr = {}, mask init {}, seed {}",
            m.epochs, m.batch, m.alpha, m.beta, m.lr, m.init, m.seed
        ),
    );
    kv(&mut out, "search set", &pct(cfg.search_frac));
    kv(&mut out, "pattern size k", &cfg.top_k.to_string());
    let sweep = if cfg.k_sweep.is_empty() {
        "none".to_string()
    } else {
        cfg.k_sweep
            .iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    kv(&mut out, "k-sweep", &sweep);
    kv(&mut out, "threshold (minimal k)", &pct(cfg.threshold));
    kv(
        &mut out,
        "sweep images per class",
        &cfg.sweep_per_class
            .map_or("all".to_string(), |n| n.to_string()),
    );
    kv(&mut out, "examples per search", &cfg.examples.to_string());
    kv(
        &mut out,
        "batches",
        &format!(
            "eval {}, at most {} composites per step",
            cfg.eval_batch, cfg.max_images
        ),
    );
    out.push_str("</table>\n</div>\n</div>\n");
    if !report.images.is_empty() {
        let _ = writeln!(
            out,
            "<h4>Images</h4>\n<p class=\"muted\">{}</p>",
            esc(&report.images)
        );
    }
    let _ = writeln!(
        out,
        "<h4>Command</h4>\n<pre class=\"cmd\">{}</pre>",
        esc(&report.command)
    );
    out
}

/// The verdict box: flagged classes (name, anomaly index) or none, and
/// which statistic decided it.
fn verdict_box(report: &RunReport, names: &Names<'_>, compact: bool) -> String {
    let v = text::verdict_in_force(report);
    let mut out = String::new();
    let class = if !report.flagged.is_empty() {
        "flagged"
    } else if text::too_few_classes(report) {
        "na"
    } else {
        "clean"
    };
    let _ = writeln!(out, "<div class=\"verdict {class}\">");
    if report.flagged.is_empty() {
        if text::too_few_classes(report) {
            let _ = writeln!(
                out,
                "<div class=\"head\">No class flagged</div>\n<p>Only {} class(es) searched: the anomaly analysis needs at least 3.</p>",
                report.classes.len()
            );
        } else if report.unproven.is_empty() {
            out.push_str("<div class=\"head\">No class flagged</div>\n");
            let _ = writeln!(
                out,
                "<p>No class's pattern is an outlier: every anomaly index is at most {}.</p>",
                anomaly(verdict::THRESHOLD)
            );
        } else {
            out.push_str("<div class=\"head\">No class flagged</div>\n");
        }
    }
    if !report.flagged.is_empty() {
        let _ = writeln!(
            out,
            "<div class=\"head\">Flagged: likely backdoor target{}</div>\n<ul>",
            if report.flagged.len() > 1 { "s" } else { "" }
        );
        for &c in &report.flagged {
            let value = v
                .classes
                .iter()
                .position(|&x| x == c)
                .and_then(|i| v.values.get(i));
            // The analysis runs on ln(mask mean); show the mean itself.
            let value = match value {
                Some(x) => format!(
                    "; mask mean {}, the median {}",
                    pct(x.exp()),
                    pct(v.median.exp())
                ),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "<li><b>class {c} · {}</b> — anomaly index <b>{}</b>{value}{}</li>",
                esc(&names.get(c)),
                anomaly(text::anomaly_of(v, c)),
                esc(&text::diffuse_words(report, c)),
            );
        }
        out.push_str("</ul>\n");
    }
    if !report.unproven.is_empty() {
        let list = report
            .unproven
            .iter()
            .map(|&c| {
                format!(
                    "{c} · {} (anomaly index {})",
                    esc(&names.get(c)),
                    anomaly(text::anomaly_of(v, c))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "<p>Anomalous but not flagged, because neither the pattern nor the optimised mask reaches {} predictive power (a failed search, not a backdoor): {list}.</p>",
            pct(report.config.threshold)
        );
    }
    if compact {
        let _ = writeln!(
            out,
            "<p>Statistic: {}; flagged above anomaly index {}.</p>",
            esc(&text::statistic_words(report)),
            anomaly(verdict::THRESHOLD),
        );
    } else {
        let _ = writeln!(
            out,
            "<p>Statistic: <b>{}</b>. A class is flagged when its anomaly index — its distance below the median in units of {} × the median absolute deviation (at least {}), as in Neural Cleanse — exceeds {}, and its pattern (or its optimised mask, blended in) reaches {} predictive power. Median {}, MAD {}.</p>",
            esc(&text::statistic_words(report)),
            verdict::MAD_SCALE,
            verdict::MIN_MAD,
            anomaly(verdict::THRESHOLD),
            pct(report.config.threshold),
            num(v.median),
            num(v.mad)
        );
    }
    if let (false, Some(vk)) = (compact, &report.verdict_min_k) {
        let list = if vk.flagged.is_empty() {
            "no class".to_string()
        } else {
            vk.flagged
                .iter()
                .map(|&c| format!("{c} · {}", esc(&names.get(c))))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "<p class=\"muted\">For comparison, ln of the minimal k reaching {} predictive power (verdict_min_k) flags {list}.</p>",
            pct(report.config.threshold)
        );
    }
    out.push_str("</div>\n");
    out
}

/// A statistic value: whole numbers without decimals, others with three.
pub(crate) fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.is_finite() {
        format!("{v:.3}")
    } else {
        anomaly(v)
    }
}

fn swatch(report: &RunReport, rank: usize, class: usize) -> String {
    let (r, g, b) =
        plot::series_colour(rank, report.classes.len(), report.flagged.contains(&class));
    format!("<span class=\"swatch\" style=\"background:rgb({r},{g},{b})\"></span>")
}

/// The all-class grid as a table (a labelled version of `grid.png`).
fn grid_table(
    report: &RunReport,
    names: &Names<'_>,
    pictures: &RunPictures,
    id: &str,
    compact: bool,
) -> String {
    let mut out = String::from(
        "<div class=\"scroll\"><table class=\"grid\">\n<tr><th></th><th>canvas</th><th>mask</th><th>pattern</th><th>stamped example</th></tr>\n",
    );
    for row in &pictures.grid_rows {
        let flagged = report.flagged.contains(&row.class);
        let name = names.get(row.class);
        let s = &report.searches[row.search];
        let caption = match row.example.and_then(|i| s.examples.get(i)) {
            _ if compact => String::new(),
            Some(e) => format!(
                "<div class=\"muted\" style=\"font-size:12px\">{} → {}</div>",
                esc(&names.get(e.label)),
                esc(&names.get(e.stamped_pred))
            ),
            None => "<div class=\"muted\" style=\"font-size:12px\">no example image</div>".into(),
        };
        let _ = writeln!(
            out,
            "<tr{}><td class=\"name\"><a href=\"#{id}class-{c}\">{c} · {}</a>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{caption}</td></tr>",
            if flagged { " class=\"flagged\"" } else { "" },
            esc(&name),
            if flagged { "<span class=\"badge bad\">flagged</span>" } else { "" },
            img(&row.tiles[0], &format!("canvas of {name}"), "px"),
            img(&row.tiles[1], &format!("mask of {name}"), "px"),
            img(&row.tiles[2], &format!("pattern of {name}"), "px"),
            img(&row.tiles[3], &format!("stamped example for {name}"), "px"),
            c = row.class,
        );
    }
    out.push_str("</table></div>\n");
    out
}

/// The class table: one row per class (best canvas), flagged rows highlighted.
fn class_table(report: &RunReport, names: &Names<'_>, id: &str, compact: bool) -> String {
    let v = text::verdict_in_force(report);
    let mut out = String::from("<div class=\"scroll\"><table class=\"data\">\n<tr>");
    let k = report.config.top_k;
    let thr = pct(report.config.threshold);
    let heads: Vec<(String, bool)> = if compact {
        vec![
            ("class".into(), false),
            ("name".into(), true),
            (format!("power (k={k})"), false),
            (format!("min k ({thr})"), false),
            ("anomaly".into(), false),
            ("".into(), true),
        ]
    } else {
        vec![
            ("class".into(), false),
            ("name".into(), true),
            ("canvas".into(), true),
            (format!("power at k = {k}"), false),
            ("clean share".into(), false),
            (format!("minimal k ({thr})"), false),
            ("mask mean".into(), false),
            ("anomaly index".into(), false),
            ("flagged".into(), true),
        ]
    };
    for (h, left) in &heads {
        let _ = write!(
            out,
            "<th{}>{}</th>",
            if *left { " class=\"l\"" } else { "" },
            esc(h)
        );
    }
    out.push_str("</tr>\n");
    for (rank, c) in report.classes.iter().enumerate() {
        let flagged = report.flagged.contains(&c.class);
        let name = format!(
            "{}<a href=\"#{id}class-{}\">{}</a>",
            swatch(report, rank, c.class),
            c.class,
            esc(&names.get(c.class))
        );
        let flag = if flagged { "flagged" } else { "" };
        let ai = anomaly(text::anomaly_of(v, c.class));
        let _ = write!(
            out,
            "<tr{}>",
            if flagged { " class=\"flagged\"" } else { "" }
        );
        if compact {
            let _ = write!(
                out,
                "<td>{}</td><td class=\"l\">{name}</td><td>{}</td><td>{}</td><td>{ai}</td><td class=\"l flag\">{flag}</td>",
                c.class,
                pct(c.power),
                min_k(c.min_k, text::min_k_measured(report)),
            );
        } else {
            let _ = write!(
                out,
                "<td>{}</td><td class=\"l\">{name}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{ai}</td><td class=\"l flag\">{flag}</td>",
                c.class,
                esc(&text::canvas_short(report, c.best)),
                pct(c.power),
                pct(c.clean),
                min_k(c.min_k, text::min_k_measured(report)),
                pct(c.mask_mean),
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table></div>\n");
    out
}

/// Where a canvas came from, in words.
fn canvas_words(s: &SearchResult) -> String {
    let c = &s.canvas;
    let uniform = |v: f32| c.pixels.iter().all(|&p| p == v);
    let mut w = match (c.source.as_str(), c.dataset_index) {
        ("solid", _) if !c.pixels.is_empty() && uniform(1.0) => "a white image".to_string(),
        ("solid", _) if !c.pixels.is_empty() && uniform(0.0) => "a black image".to_string(),
        ("solid", _) => "a uniform grey image".to_string(),
        ("learn", _) => "learned pixels (started uniform; confidence on the start)".to_string(),
        (src, Some(i)) => format!("{src} image #{i}"),
        (src, None) => src.to_string(),
    };
    if let Some(conf) = c.confidence {
        let _ = write!(w, ", model confidence {}", pct(conf as f64));
    }
    w
}

/// What kind of canvas a search started from, for the column heads.
fn canvas_kind(s: &SearchResult) -> &'static str {
    if is_natural(s) {
        "natural canvas"
    } else if s.canvas.source == "solid" {
        "solid canvas"
    } else if s.canvas.source == "learn" {
        "learned canvas"
    } else {
        "other canvas"
    }
}

/// One search's pictures, numbers, sweep and per-source powers (one column
/// of its class's side-by-side row).
fn search_details(
    report: &RunReport,
    names: &Names<'_>,
    pictures: &RunPictures,
    i: usize,
    best: bool,
) -> String {
    let s = &report.searches[i];
    let p = &pictures.searches[i];
    let name = names.get(s.class);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<div class=\"search{}\">\n<div class=\"kind\">{}</div>\n<h4>canvas {} <span class=\"muted\">({})</span>{}</h4>",
        if best { " best" } else { "" },
        canvas_kind(s),
        esc(&s.canvas.id),
        esc(&canvas_words(s)),
        if best {
            "<span class=\"badge best\">best canvas</span>"
        } else {
            ""
        }
    );
    let mut examples = String::new();
    if report.searches.len() <= DETAIL_IMAGES_MAX {
        out.push_str("<div class=\"figs\">\n");
        let fig = |png: &[u8], alt: &str, caption: &str, class: &str| {
            format!(
                "<figure class=\"{class}\">{}<figcaption>{caption}</figcaption></figure>\n",
                img(png, alt, "px")
            )
        };
        out.push_str(&fig(&p.canvas, &format!("canvas of {name}"), "canvas", ""));
        out.push_str(&fig(
            &p.mask,
            &format!("mask of {name}"),
            "mask (viridis, 0 → 1)",
            "",
        ));
        out.push_str(&fig(
            &p.pattern_grey,
            &format!("pattern of {name} on grey"),
            &format!("pattern, k = {} (on grey)", s.positions.len()),
            "",
        ));
        out.push_str(&fig(
            &p.pattern,
            &format!("pattern of {name}"),
            "pattern on white",
            "",
        ));
        out.push_str(&fig(
            &p.pattern_rgba,
            &format!("pattern of {name}, transparent"),
            "pattern (transparent)",
            "checker",
        ));
        out.push_str("</div>\n");
        if !s.examples.is_empty() {
            examples.push_str("<div class=\"figs\">\n");
            for (e, tile) in s.examples.iter().zip(&p.example_tiles) {
                let hit = e.stamped_pred == s.class;
                let stamped = if hit {
                    format!("<b class=\"hit\">{}</b>", esc(&names.get(e.stamped_pred)))
                } else {
                    esc(&names.get(e.stamped_pred))
                };
                let caption = format!(
                    "{} → {} / {stamped}<br><span>test #{}</span>",
                    esc(&names.get(e.label)),
                    esc(&names.get(e.clean_pred)),
                    e.index
                );
                match tile {
                    Some(png) => {
                        let _ = writeln!(
                            examples,
                            "<figure>{}<figcaption>{caption}</figcaption></figure>",
                            img(
                                png,
                                &format!("test image {} with the pattern of {name}", e.index),
                                "px"
                            )
                        );
                    }
                    None => {
                        let _ = writeln!(
                            examples,
                            "<figure><figcaption>{caption}<br>(image not stored)</figcaption></figure>"
                        );
                    }
                }
            }
            examples.push_str(
                "</div>\n<p class=\"muted\" style=\"font-size:13px;margin-top:0\">Captions: true class → prediction on the clean image / prediction with the pattern pasted in.</p>\n",
            );
        }
    } else {
        let _ = writeln!(
            out,
            "<p class=\"muted\">Pictures of this search are in <code>images/{}_*.png</code> (not inlined: the run has more than {DETAIL_IMAGES_MAX} searches).</p>",
            esc(&p.stem)
        );
    }

    out.push_str("<div class=\"tables\">\n<div><h4>Figures</h4><table class=\"kv\">\n");
    kv(
        &mut out,
        &format!("power at k = {}", s.power.k),
        &format!("<b>{}</b>", pct(s.power.overall)),
    );
    kv(&mut out, "clean share", &pct(s.power.clean));
    kv(
        &mut out,
        &format!("minimal k ({})", pct(report.config.threshold)),
        &min_k(s.min_k, text::min_k_measured(report)),
    );
    kv(&mut out, "mask mean", &pct(s.mask_mean));
    kv(&mut out, "updates", &s.steps.to_string());
    if let (Some(first), Some(last)) = (s.ce_curve.first(), s.ce_curve.last()) {
        kv(
            &mut out,
            "cross-entropy",
            &format!("{:.3} → {:.3}", first.1, last.1),
        );
    }
    kv(&mut out, "evaluation time", &seconds(s.eval_seconds));
    out.push_str("</table></div>\n");

    if !s.power.per_source.is_empty() {
        let _ = writeln!(
            out,
            "<div><h4>Per source class (k = {})</h4><table class=\"data small\"><tr><th class=\"l\">source</th><th>images</th><th>clean → {}</th><th>with pattern → {}</th></tr>",
            s.power.k,
            esc(&name),
            esc(&name)
        );
        for sp in &s.power.per_source {
            let _ = writeln!(
                out,
                "<tr><td class=\"l\">{} · {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                sp.source,
                esc(&names.get(sp.source)),
                sp.images,
                pct(sp.clean),
                pct(sp.stamped)
            );
        }
        out.push_str("</table></div>\n");
    }
    out.push_str("</div>\n");
    // The stamped examples after the numbers, so the columns of a class
    // line up picture by picture and figure by figure.
    out.push_str(&examples);
    if !s.sweep.is_empty() {
        out.push_str(
            "<h4>k-sweep</h4><div class=\"scroll\"><table class=\"data small\"><tr><th class=\"l\">k</th>",
        );
        for (k, _) in &s.sweep {
            let _ = write!(out, "<th>{k}</th>");
        }
        out.push_str("</tr><tr><td class=\"l\">power</td>");
        for (_, p) in &s.sweep {
            let _ = write!(out, "<td>{}</td>", pct(*p));
        }
        out.push_str("</tr></table></div>\n");
    }

    out.push_str("</div>\n");
    out
}

/// Every class's searches side by side, one column per canvas: natural
/// canvases first (what the class looks like to the model, the paper's
/// view), then solid ones (the trigger finder); the best one is marked.
fn class_details(
    report: &RunReport,
    names: &Names<'_>,
    pictures: &RunPictures,
    id: &str,
) -> String {
    let mut out = String::new();
    for c in &report.classes {
        let flagged = report.flagged.contains(&c.class);
        let _ = writeln!(
            out,
            "<section id=\"{id}class-{cl}\">\n<h3>{cl} · {}{}</h3>",
            esc(&names.get(c.class)),
            if flagged {
                "<span class=\"badge bad\">flagged</span>"
            } else {
                ""
            },
            cl = c.class
        );
        let mut columns: Vec<usize> = (0..report.searches.len())
            .filter(|&i| report.searches[i].class == c.class)
            .collect();
        // Stable: report order within natural and within the others.
        columns.sort_by_key(|&i| !is_natural(&report.searches[i]));
        let _ = writeln!(
            out,
            "<div class=\"scroll\"><div class=\"side\" style=\"grid-template-columns: repeat({}, minmax(360px, 1fr))\">",
            columns.len().max(1)
        );
        for i in columns {
            out.push_str(&search_details(report, names, pictures, i, i == c.best));
        }
        out.push_str("</div></div>\n</section>\n");
    }
    out
}

/// The paper-style figure with a caption naming the classes in order.
fn paper_figure(report: &RunReport, names: &Names<'_>, f: &PaperFigure, compact: bool) -> String {
    let order: Vec<String> = f
        .tiles
        .iter()
        .map(|&(c, s)| match s {
            Some(_) => format!("{c} · {}", esc(&names.get(c))),
            None => format!("{c} · {} (blank: no natural canvas)", esc(&names.get(c))),
        })
        .collect();
    let solid = report.searches.iter().any(|s| s.canvas.source == "solid");
    let caption = if compact {
        format!("Left to right: {}.", order.join(", "))
    } else {
        format!(
            "Patterns from natural canvases, as the paper's figure shows them: for each class, the pattern (on grey) from its most predictive test or train image, {} per row, left to right: {}.{}",
            f.columns,
            order.join(", "),
            if solid {
                " The white (solid) canvas is the trigger finder: its search stands next to the natural one in each class's section below."
            } else {
                ""
            }
        )
    };
    format!(
        "<figure class=\"paper\">{}<figcaption>{caption}</figcaption></figure>\n",
        img(&f.png, "patterns from natural canvases, all classes", "px")
    )
}

/// The body of one run (used by its own page and, collapsed, by the
/// comparison page; `id` prefixes anchors so several runs share a page).
fn run_body(
    report: &RunReport,
    names: &Names<'_>,
    pictures: &RunPictures,
    svg: &str,
    id: &str,
) -> String {
    let mut out = String::new();
    out.push_str(&verdict_box(report, names, false));
    out.push_str("<h2>What was run</h2>\n");
    out.push_str(&run_info(report));
    out.push_str("<h2>All classes</h2>\n<p class=\"muted\">Best canvas of each class: the canvas, its optimised mask, the top-k pattern (canvas pixels at the k positions of largest mask value, white elsewhere) and a test image of another class with the pattern pasted in (one the pattern turns into the class, when there is one).</p>\n");
    out.push_str(&grid_table(report, names, pictures, id, false));
    if let Some(f) = &pictures.paper {
        out.push_str("<h3>The paper's view</h3>\n");
        out.push_str(&paper_figure(report, names, f, false));
    }
    let _ = writeln!(
        out,
        "<h2>Summary</h2>\n<p class=\"muted\">Predictive power: share of other-class test images classified as the class once the pattern (k = {}) is pasted in; clean share: the same images without it. Minimal k: the smallest pattern reaching {}. Anomaly index of the statistic the verdict uses.</p>",
        report.config.top_k,
        pct(report.config.threshold)
    );
    out.push_str(&class_table(report, names, id, false));
    out.push_str("<h2>Predictive power against k</h2>\n<div class=\"plot\">\n");
    // HTML puts an inline <svg> in the SVG namespace by itself; without the
    // attribute the page holds no URL at all.
    out.push_str(&svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1));
    out.push_str("</div>\n<h2>Per class</h2>\n");
    out.push_str(&class_details(report, names, pictures, id));
    out
}

/// The whole page of one run.
pub fn run_page(
    report: &RunReport,
    names: &Names<'_>,
    pictures: &RunPictures,
    svg: &str,
) -> String {
    let title = format!("classwise — {}", report.model_label);
    let mut body = String::new();
    let _ = writeln!(
        body,
        "<h1>{}</h1>\n<p class=\"sub\">Class-wise patterns (Zhao et al. 2021): for every class, the small pattern of its own pixels that makes the model predict it. {} · {} · clean accuracy {}</p>",
        esc(&title),
        esc(&report.tool),
        esc(&report.data),
        pct(report.clean_accuracy)
    );
    body.push_str(&run_body(report, names, pictures, svg, ""));
    body.push_str(
        "<footer>Generated by classwise. Self-contained page: every image is inline.</footer>\n",
    );
    page(&title, false, &body)
}

/// One run of the comparison page.
pub struct RunColumn<'a> {
    /// Its label (`natural`, `backdoored`, ...).
    pub label: &'a str,
    /// Its folder, relative to the page.
    pub dir: &'a str,
    /// The run.
    pub report: &'a RunReport,
    /// Its class names.
    pub names: Names<'a>,
    /// Its pictures.
    pub pictures: &'a RunPictures,
    /// Its k plot.
    pub svg: &'a str,
}

/// The comparison page: runs side by side, then each in full, collapsed.
pub fn comparison_page(title: &str, notes: &[String], runs: &[RunColumn<'_>]) -> String {
    let mut body = String::new();
    let tool = runs
        .first()
        .map(|r| r.report.tool.clone())
        .unwrap_or_default();
    let _ = writeln!(
        body,
        "<h1>{}</h1>\n<p class=\"sub\">Class-wise patterns (Zhao et al. 2021) of {} model(s), side by side. {}</p>",
        esc(title),
        runs.len(),
        esc(&tool)
    );
    if !notes.is_empty() {
        body.push_str("<h2>Notes</h2>\n<ul class=\"notes\">\n");
        for n in notes {
            let _ = writeln!(body, "<li>{}</li>", esc(n));
        }
        body.push_str("</ul>\n");
    }
    let _ = writeln!(
        body,
        "<div class=\"runs\" style=\"grid-template-columns: repeat({}, minmax(0, 1fr))\">",
        runs.len().max(1)
    );
    for (i, r) in runs.iter().enumerate() {
        let id = format!("r{i}-");
        let _ = writeln!(
            body,
            "<div class=\"run\">\n<h2>{}</h2>\n<p class=\"muted\">{} · {} · clean accuracy <b>{}</b></p>",
            esc(r.label),
            esc(&r.report.model_label),
            esc(&r.report.device),
            pct(r.report.clean_accuracy)
        );
        body.push_str(&verdict_box(r.report, &r.names, true));
        body.push_str(&grid_table(r.report, &r.names, r.pictures, &id, true));
        if let Some(f) = &r.pictures.paper {
            body.push_str("<h4>Patterns from natural canvases (the paper's view)</h4>\n");
            body.push_str(&paper_figure(r.report, &r.names, f, true));
        }
        body.push_str("<h4>Classes</h4>\n");
        body.push_str(&class_table(r.report, &r.names, &id, true));
        let _ = writeln!(
            body,
            "<p><a href=\"#{id}details\">full details below</a> · <a href=\"{}/report.html\">this run's own page</a></p>\n</div>",
            esc(r.dir)
        );
    }
    body.push_str("</div>\n<h2>Details</h2>\n");
    for (i, r) in runs.iter().enumerate() {
        let id = format!("r{i}-");
        let _ = writeln!(
            body,
            "<details id=\"{id}details\">\n<summary>{} — {}</summary>",
            esc(r.label),
            esc(&r.report.model_label)
        );
        body.push_str(&run_body(r.report, &r.names, r.pictures, r.svg, &id));
        body.push_str("</details>\n");
    }
    body.push_str("<footer>Generated by classwise. Self-contained page: every image is inline; each run's own folder holds its report.json, PNGs and plot.</footer>\n");
    page(title, true, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(11173962), "11,173,962");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }
}
