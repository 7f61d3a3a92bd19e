//! The report's files, checked from the outside: a hand-built run (four
//! Fashion-MNIST-like grey classes with one backdoor-like outlier, and a
//! CIFAR-like RGB run) is written with `write_run` / `write_comparison` and
//! every file is read back: PNGs decode at the expected size and colour
//! type, the pattern is exactly the canvas at its positions and white (or
//! transparent) elsewhere, the heat map rises with the mask, the page is
//! self-contained and escaped, report.json reads back unchanged.

use std::path::Path;

use base64::Engine;
use image::{ColorType, DynamicImage, GenericImageView};

use classwise::report::{self, raster, DemoIndex};
use classwise::search::pattern::{self, SourcePower};
use classwise::search::{
    verdict, Canvas, ClassSummary, Example, MaskConfig, Power, RunReport, SearchConfig,
    SearchResult,
};

const NAMES: [&str; 4] = ["T-shirt", "Trouser", "<script>alert(1)</script>", "Dress"];
/// The outlier: its pattern needs a handful of pixels, the others hundreds.
const FLAGGED: usize = 1;

fn names() -> Vec<String> {
    NAMES.iter().map(|s| s.to_string()).collect()
}

/// A deterministic pseudo-random value in [0, 1] (no RNG needed).
fn noise(i: usize, salt: usize) -> f32 {
    // splitmix64 of (salt, i)
    let mut x = ((salt as u64) << 32 ^ i as u64).wrapping_add(0x9E3779B97F4A7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D049BB133111EB);
    x ^= x >> 31;
    (x % 1001) as f32 / 1000.0
}

/// A recognisable canvas: a bright disc (its place and colour depend on
/// the salt) on a dark, slightly noisy background.
fn canvas_pixels([c, h, w]: [usize; 3], salt: usize) -> Vec<f32> {
    let (cy, cx) = ((h / 3 + salt * 3) % h, (w / 2 + salt * 5) % w);
    let r = h as f32 / 4.0;
    (0..c * h * w)
        .map(|i| {
            let (ch, p) = (i / (h * w), i % (h * w));
            let (y, x) = ((p / w) as f32, (p % w) as f32);
            let d = ((y - cy as f32).powi(2) + (x - cx as f32).powi(2)).sqrt();
            let disc = (1.0 - (d / r - 0.8).max(0.0) * 2.0).clamp(0.0, 1.0);
            let tint = [1.0, 0.6 + 0.1 * (salt % 4) as f32, 0.3][ch % 3];
            (0.9 * disc * tint + 0.1 * noise(i, salt)).clamp(0.0, 1.0)
        })
        .collect()
}

/// A mask that is large around the canvas's disc and small elsewhere
/// (like an optimised one), with distinct values everywhere.
fn mask_values([_, h, w]: [usize; 3], salt: usize) -> Vec<f32> {
    let (cy, cx) = ((h / 3 + salt * 3) % h, (w / 2 + salt * 5) % w);
    (0..h * w)
        .map(|p| {
            let (y, x) = ((p / w) as f32, (p % w) as f32);
            let d = ((y - cy as f32).powi(2) + (x - cx as f32).powi(2)).sqrt();
            (0.9 * (-d / (h as f32 / 6.0)).exp() + 0.1 * noise(p, salt + 500)).clamp(0.0, 1.0)
        })
        .collect()
}

/// A synthetic run: `classes` classes of `[c, h, w]` images, one canvas
/// each (two for class 0, so a non-best search exists), a k-sweep, a
/// verdict that flags [`FLAGGED`]; `example_pixels` says whether the
/// stamped examples carry their pixels.
fn make_report(shape: [usize; 3], classes: usize, example_pixels: bool) -> RunReport {
    let [c, h, w] = shape;
    let plane = h * w;
    let top_k = classwise::search::SearchConfig::default_k(h, w);
    let k_sweep = pattern::default_sweep(plane);
    let mut searches = Vec::new();
    for t in 0..classes {
        let canvases = if t == 0 { 2 } else { 1 };
        for j in 0..canvases {
            let salt = t * 10 + j;
            let pixels = canvas_pixels(shape, salt);
            // The outlier's mask is a twentieth of the others' (its L1 flags it).
            let shrink = if t == FLAGGED { 0.05 } else { 1.0 };
            let mask: Vec<f32> = mask_values(shape, salt)
                .iter()
                .map(|m| m * shrink)
                .collect();
            let positions = pattern::top_k(&mask, &[], top_k);
            // How fast the power rises with k: the outlier almost at once.
            let scale = if t == FLAGGED {
                2.0
            } else {
                60.0 + 10.0 * t as f64
            };
            let power_at = |k: usize| 1.0 - (-(k as f64) / scale).exp();
            let sweep: Vec<(usize, f64)> = k_sweep.iter().map(|&k| (k, power_at(k))).collect();
            let min_k = (1..=plane).find(|&k| power_at(k) >= 0.9);
            let examples = (0..classes)
                .filter(|&s| s != t)
                .take(3)
                .enumerate()
                .map(|(n, s)| {
                    let mut img: Vec<f32> = (0..c * plane).map(|i| noise(i, 900 + s)).collect();
                    pattern::stamp(&mut img, &pixels, &positions, plane);
                    Example {
                        index: 100 * s + n,
                        label: s,
                        clean_pred: s,
                        stamped_pred: if n == 0 { t } else { s },
                        pixels: if example_pixels { img } else { Vec::new() },
                    }
                })
                .collect();
            let per_source = (0..classes)
                .filter(|&s| s != t)
                .map(|s| SourcePower {
                    source: s,
                    images: 100,
                    stamped: power_at(top_k),
                    clean: 0.01 * s as f64,
                })
                .collect();
            searches.push(SearchResult {
                class: t,
                class_name: NAMES[t % NAMES.len()].to_string(),
                canvas: Canvas {
                    id: format!("auto{j}"),
                    source: "test".into(),
                    dataset_index: Some(1000 + salt),
                    confidence: Some(0.99 - 0.1 * j as f32),
                    margin: Some(9.0 - j as f64),
                    pixels,
                },
                mask_mean: mask.iter().map(|&m| m as f64).sum::<f64>() / plane as f64,
                mask,
                mask_avg: Vec::new(),
                steps: 250,
                ce_curve: vec![(0, 2.5), (100, 0.7), (250, 0.12)],
                positions,
                power: Power {
                    k: top_k,
                    overall: power_at(top_k) - 0.01 * j as f64,
                    clean: 0.02,
                    per_source,
                },
                select_power: Some(power_at(top_k) - 0.01 * j as f64),
                soft_power: Some(0.75),
                sweep,
                min_k,
                examples,
                eval_seconds: 0.25,
            });
        }
    }
    let class_summaries: Vec<ClassSummary> = (0..classes)
        .map(|t| {
            let best = searches.iter().position(|s| s.class == t).unwrap();
            let s = &searches[best];
            ClassSummary {
                class: t,
                name: s.class_name.clone(),
                best,
                select_power: s.select_power,
                power: s.power.overall,
                clean: s.power.clean,
                min_k: s.min_k,
                mask_mean: s.mask_mean,
            }
        })
        .collect();
    let ids: Vec<usize> = (0..classes).collect();
    // As search::run does: both statistics on a log scale, the mask's decides.
    let verdict_min_k = verdict::analyse(
        "ln_min_k",
        &ids,
        &class_summaries
            .iter()
            .map(|c| (c.min_k.unwrap_or(plane + 1) as f64).ln())
            .collect::<Vec<_>>(),
    );
    let verdict_mask = verdict::analyse(
        "ln_mask_mean",
        &ids,
        &class_summaries
            .iter()
            .map(|c| c.mask_mean.ln())
            .collect::<Vec<_>>(),
    );
    RunReport {
        tool: "classwise 0.1.0".into(),
        command: "cwp search --model 'm <b>.safetensors' --data fashion-mnist".into(),
        model_label: "resnet18 <natural>".into(),
        model: serde_json::json!({
            "arch": "resnet18",
            "input": shape,
            "num_classes": classes,
            "params": 11173962,
            "metadata": {"trained": "natural", "epochs": 30, "note": "<i>hi</i>"},
        }),
        data: "fashion-mnist (10000 images)".into(),
        device: "cpu".into(),
        config: SearchConfig {
            classes: ids.clone(),
            canvas: "auto:1".into(),
            top_k,
            k_sweep,
            threshold: 0.9,
            search_frac: 0.2,
            mask: MaskConfig::default(),
            sweep_per_class: Some(100),
            eval_per_class: None,
            examples: 3,
            eval_batch: 256,
            max_images: 4096,
            protocol: Default::default(),
        },
        numerics: "cpu fp32".into(),
        clean_accuracy: 0.9123,
        images: "Protocol cwp. (test report)".into(),
        verdict_canvas: "natural".into(),
        verdict_searches: class_summaries.iter().map(|c| c.best).collect(),
        searches,
        classes: class_summaries,
        flagged: verdict_mask.flagged.clone(),
        unproven: Vec::new(),
        verdict_min_k: Some(verdict_min_k),
        verdict_mask,
        other_verdicts: Vec::new(),
        reused: 1,
        search_seconds: 12.5,
        steps_per_second: 80.0,
        images_per_second: 320.0,
        total_seconds: 20.25,
    }
}

fn png(path: &Path) -> DynamicImage {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()))
}

fn check_png(path: &Path, size: (u32, u32), colour: ColorType) -> DynamicImage {
    let img = png(path);
    assert_eq!(img.dimensions(), size, "{}", path.display());
    assert_eq!(img.color(), colour, "{}", path.display());
    img
}

/// The byte value a planar float becomes.
fn byte(v: f32) -> u8 {
    raster::to_byte(v)
}

/// Checks the files of one written run against its report.
fn check_run_files(dir: &Path, r: &RunReport) {
    let [c, h, w] = report::image_shape(r).unwrap();
    let s = raster::display_scale(h, w);
    let (dw, dh) = ((w * s) as u32, (h * s) as u32);
    let (plain, alpha) = if c == 3 {
        (ColorType::Rgb8, ColorType::Rgba8)
    } else {
        (ColorType::L8, ColorType::La8)
    };
    assert!(dw >= 112 && dh >= 112);
    let images = dir.join("images");
    for search in &r.searches {
        let stem = format!("c{}_{}", search.class, search.canvas.id);
        let f = |suffix: &str| images.join(format!("{stem}_{suffix}.png"));
        let canvas = check_png(&f("canvas"), (dw, dh), plain);
        let mask = check_png(&f("mask"), (dw, dh), ColorType::Rgb8);
        let pattern = check_png(&f("pattern"), (dw, dh), plain);
        let rgba = check_png(&f("pattern_rgba"), (dw, dh), alpha);
        let grey = check_png(&f("pattern_grey"), (dw, dh), plain);
        let want_grey =
            raster::pattern_on_grey(&search.canvas.pixels, &search.positions, [c, h, w])
                .unwrap()
                .upscale(s);
        assert_eq!(
            grey.to_rgba8().pixels().map(|p| p.0).collect::<Vec<_>>(),
            rgba_of(&want_grey),
            "{stem}_pattern_grey.png"
        );
        let n = search.examples.len() as u32;
        let sep = raster::SEPARATOR as u32;
        check_png(
            &f("examples"),
            (n * dw + (n + 1) * sep, dh + 2 * sep),
            plain,
        );

        let inside: std::collections::HashSet<usize> = search.positions.iter().copied().collect();
        let (canvas, pattern, rgba) = (canvas.to_rgba8(), pattern.to_rgba8(), rgba.to_rgba8());
        let plane = h * w;
        for y in 0..dh {
            for x in 0..dw {
                let p = (y as usize / s) * w + x as usize / s;
                let want: [u8; 3] = if c == 3 {
                    [0, 1, 2].map(|ch| byte(search.canvas.pixels[ch * plane + p]))
                } else {
                    [byte(search.canvas.pixels[p]); 3]
                };
                let (cv, pv, av) = (
                    canvas.get_pixel(x, y).0,
                    pattern.get_pixel(x, y).0,
                    rgba.get_pixel(x, y).0,
                );
                assert_eq!(cv[..3], want, "canvas at ({x},{y})");
                if inside.contains(&p) {
                    assert_eq!(pv[..3], want, "pattern at ({x},{y}) must be the canvas");
                    assert_eq!(av[3], 255, "pattern_rgba opaque at ({x},{y})");
                    assert_eq!(
                        av[..3],
                        want,
                        "pattern_rgba at ({x},{y}) must be the canvas"
                    );
                } else {
                    assert_eq!(pv[..3], [255, 255, 255], "pattern white at ({x},{y})");
                    assert_eq!(av[3], 0, "pattern_rgba transparent at ({x},{y})");
                }
            }
        }

        // The heat map gets brighter with the mask value.
        let mask = mask.to_rgb8();
        let lum = |p: usize| {
            let v = mask.get_pixel(((p % w) * s) as u32, ((p / w) * s) as u32).0;
            0.2126 * v[0] as f64 + 0.7152 * v[1] as f64 + 0.0722 * v[2] as f64
        };
        let mut order: Vec<usize> = (0..plane).collect();
        order.sort_by(|&a, &b| search.mask[a].total_cmp(&search.mask[b]));
        for pair in order.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let (ma, mb) = (search.mask[a], search.mask[b]);
            assert!(
                lum(b) >= lum(a) - 0.5,
                "heat map darker for a larger mask value: {ma} -> {}, {mb} -> {}",
                lum(a),
                lum(b)
            );
        }
        let (lo, hi) = (order[0], order[plane - 1]);
        if search.mask[hi] - search.mask[lo] > 0.5 {
            assert!(lum(hi) > lum(lo) + 50.0);
        }
    }
    let rows = r.classes.len() as u32;
    let sep = raster::SEPARATOR as u32;
    check_png(
        &images.join("grid.png"),
        (4 * dw + 5 * sep, rows * dh + (rows + 1) * sep),
        ColorType::Rgb8,
    );
}

/// Every `<img` of a page has an inline PNG that decodes; nothing is
/// fetched from anywhere; there is no script. Returns the image count.
fn check_self_contained(html: &str) -> usize {
    let lower = html.to_lowercase();
    assert!(!lower.contains("src=\"http"), "external src");
    assert!(!lower.contains("href=\"http"), "external href");
    assert!(!lower.contains("url(http"), "external CSS url");
    assert!(!lower.contains("<script"), "the page must need no script");
    assert!(!lower.contains("<link"), "no linked stylesheet");
    // The fixtures carry no URL in their data, so none may appear at all.
    assert!(
        !lower.contains("http:") && !lower.contains("https:"),
        "a URL in the page"
    );
    let mut n = 0;
    for (i, _) in html.match_indices("<img") {
        let tag = &html[i..i + html[i..].find('>').unwrap()];
        let start = tag.find("src=\"data:image/png;base64,").unwrap_or_else(|| {
            panic!(
                "<img> without an inline PNG: {}",
                &tag[..tag.len().min(120)]
            )
        }) + "src=\"data:image/png;base64,".len();
        let end = start + tag[start..].find('"').unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&tag[start..end])
            .expect("base64");
        image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .expect("inline image decodes as PNG");
        n += 1;
    }
    n
}

/// The text of the first verdict box of a page.
fn verdict_box(html: &str) -> &str {
    let start = html.find("<div class=\"verdict").expect("verdict box");
    let len = html[start..].find("</div>\n").expect("end of verdict box");
    // The box holds a head <div>; its own end is the second `</div>`.
    let rest = &html[start + len + 7..];
    let end = start + len + 7 + rest.find("</div>").expect("end of verdict box");
    &html[start..end]
}

#[test]
fn grey_run_writes_every_file_as_specified() {
    let r = make_report([1, 28, 28], 4, true);
    assert_eq!(r.flagged, vec![FLAGGED], "the fixture must flag one class");
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    check_run_files(dir.path(), &r);
    for f in ["report.json", "pp_vs_k.svg", "report.html"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
}

#[test]
fn rgb_run_writes_rgb_pictures() {
    let r = make_report([3, 32, 32], 3, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    check_run_files(dir.path(), &r);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);
}

#[test]
fn page_is_self_contained_escaped_and_names_the_flagged_class() {
    let r = make_report([1, 28, 28], 4, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    let imgs = check_self_contained(&html);
    // Grid (4 per class) + the paper figure + per search canvas, mask,
    // pattern on grey, on white, rgba + examples.
    let per_search: usize = r.searches.iter().map(|s| 5 + s.examples.len()).sum();
    assert_eq!(imgs, 4 * r.classes.len() + 1 + per_search);

    let vbox = verdict_box(&html);
    assert!(vbox.contains("class=\"verdict flagged\""), "{vbox}");
    assert!(
        vbox.contains(NAMES[FLAGGED]),
        "flagged name missing: {vbox}"
    );
    assert!(vbox.contains("verdict_mask"), "statistic missing: {vbox}");
    let ai = r.verdict_mask.anomaly_index[FLAGGED];
    assert!(
        vbox.contains(&format!("{ai:.2}")),
        "anomaly index missing: {vbox}"
    );
    assert!(!vbox.contains(NAMES[0]) && !vbox.contains(NAMES[3]));

    // Data strings are escaped wherever they appear.
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(!html.contains("<b>.safetensors"));
    assert!(html.contains("m &lt;b&gt;.safetensors"));
    assert!(!html.contains("<i>hi</i>"));
    assert!(!html.contains("<natural>"));

    // The flagged row is highlighted, and only it.
    assert_eq!(
        html.matches("<tr class=\"flagged\">").count(),
        2,
        "grid row + table row"
    );
    // What was run.
    for needle in [
        "resnet18",
        "91.2%",
        "α = 0.2",
        "β = 0.8",
        "lr = 0.02",
        "5 epoch(s)",
        "batch 4",
        "fashion-mnist",
        "reused searches",
    ] {
        assert!(html.contains(needle), "page lacks {needle}");
    }
    // The plot is inline.
    assert!(html.contains("<svg"));
}

#[test]
fn report_json_reads_back_unchanged() {
    let r = make_report([1, 28, 28], 4, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let text = std::fs::read_to_string(dir.path().join("report.json")).unwrap();
    assert!(
        text.contains("\n  \"tool\""),
        "report.json is pretty-printed"
    );
    let back: RunReport = serde_json::from_str(&text).unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&r).unwrap()
    );
    assert_eq!(back.searches, r.searches);
    assert_eq!(back.verdict_min_k, r.verdict_min_k);
}

#[test]
fn infinite_anomaly_indices_read_back() {
    // Reports written before the MAD floor hold infinite indices where the
    // MAD was zero: report.json must still parse.
    let mut r = make_report([1, 28, 28], 4, true);
    let mut v = verdict::analyse("ln_mask_mean", &[0, 1, 2, 3], &[-2.0, -5.0, -2.0, -2.0]);
    v.anomaly_index[1] = f64::INFINITY;
    r.flagged = v.flagged.clone();
    r.verdict_mask = v;
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let back: RunReport =
        serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap()).unwrap();
    assert_eq!(back.verdict_mask, r.verdict_mask);
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(verdict_box(&html).contains("anomaly index <b>inf</b>"));
}

#[test]
fn plot_has_one_line_per_class_and_the_guides() {
    let r = make_report([1, 28, 28], 4, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("pp_vs_k.svg")).unwrap();
    assert!(svg.trim_start().starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    let polylines: Vec<&str> = svg.split("<polyline").skip(1).collect();
    let n = r.classes.len();
    for (rank, c) in r.classes.iter().enumerate() {
        let (red, green, blue) = report::plot::series_colour(rank, n, r.flagged.contains(&c.class));
        let colour = format!("#{red:02X}{green:02X}{blue:02X}");
        let points = |p: &str| {
            let attr = &p[p.find("points=\"").unwrap() + 8..];
            attr[..attr.find('"').unwrap()].split_whitespace().count()
        };
        let sweep = r.searches[c.best].sweep.len();
        let data_lines = polylines
            .iter()
            .map(|p| &p[..p.find("/>").unwrap()])
            .filter(|p| p.contains(&format!("stroke=\"{colour}\"")) && points(p) == sweep)
            .count();
        assert_eq!(
            data_lines, 1,
            "class {}: expected one line of colour {colour} through its {sweep} sweep points",
            c.class
        );
    }
    // Legend names (escaped by the SVG writer), threshold and default k.
    assert!(svg.contains("Trouser"));
    assert!(svg.contains("&lt;script&gt;"));
    assert!(!svg.contains("<script"));
    assert!(svg.contains("threshold 90%"));
    assert!(svg.contains(&format!("default k = {}", r.config.top_k)));
}

#[test]
fn a_run_without_a_sweep_still_gets_a_plot_file() {
    let mut r = make_report([1, 28, 28], 4, true);
    for s in &mut r.searches {
        s.sweep.clear();
        s.min_k = None;
    }
    r.config.k_sweep.clear();
    r.verdict_min_k = None;
    r.flagged = r.verdict_mask.flagged.clone();
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let svg = std::fs::read_to_string(dir.path().join("pp_vs_k.svg")).unwrap();
    assert!(svg.contains("No k-sweep"));
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(verdict_box(&html).contains("verdict_mask"));
    // Nothing was measured, so nothing was "not reached".
    assert!(!html.contains("not reached"));
}

#[test]
fn rewriting_a_folder_works_and_leaves_no_temp_files() {
    let r = make_report([1, 28, 28], 4, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let first = std::fs::read(dir.path().join("images/grid.png")).unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("images/grid.png")).unwrap(),
        first
    );
    check_run_files(dir.path(), &r);
    for d in [dir.path().to_path_buf(), dir.path().join("images")] {
        for e in std::fs::read_dir(&d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            assert!(
                !name.starts_with('.') && !name.ends_with(".tmp"),
                "temp file left behind: {}",
                d.join(name).display()
            );
        }
    }
}

#[test]
fn examples_without_pixels_render_without_their_strip() {
    let r = make_report([1, 28, 28], 4, false);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    assert!(!dir.path().join("images/c0_auto0_examples.png").exists());
    assert!(dir.path().join("images/c0_auto0_pattern.png").exists());
    assert!(dir.path().join("images/grid.png").exists());
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);
    assert!(html.contains("(image not stored)"));
}

#[test]
fn terminal_summary_lists_every_class_and_the_verdict() {
    let r = make_report([1, 28, 28], 4, true);
    let t = report::terminal_summary(&r, &names());
    let lines: Vec<&str> = t.lines().collect();
    for (i, name) in NAMES.iter().enumerate() {
        let row = lines
            .iter()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("class {i} ({name}) missing:\n{t}"));
        assert!(row.trim_start().starts_with(&i.to_string()));
        let min_k = r.classes[i]
            .min_k
            .map_or("not reached".to_string(), |k| k.to_string());
        assert!(row.contains(&min_k), "{row}");
    }
    let flagged_row = lines.iter().find(|l| l.contains(NAMES[FLAGGED])).unwrap();
    assert!(flagged_row.contains("FLAGGED"));
    assert_eq!(
        t.matches("FLAGGED").count(),
        2,
        "flagged row + verdict line:\n{t}"
    );
    let verdict = lines.last().unwrap();
    assert!(
        verdict.contains("verdict") && verdict.contains(NAMES[FLAGGED]),
        "{verdict}"
    );
    // Class names are not given: the report's own names are used.
    let t2 = report::terminal_summary(&r, &[]);
    assert!(t2.contains("Dress"));
}

#[test]
fn comparison_page_puts_runs_side_by_side() {
    let natural = {
        let mut r = make_report([1, 28, 28], 4, true);
        r.flagged.clear();
        r.model_label = "natural".into();
        r
    };
    let backdoored = make_report([1, 28, 28], 4, true);
    let rgb = make_report([3, 32, 32], 3, true);
    let runs = vec![
        ("Natural".to_string(), natural),
        ("Backdoored <trigger>".to_string(), backdoored),
        ("Adversarially trained".to_string(), rgb),
    ];
    let notes = vec!["search ran 2 epochs instead of 5 to fit the demo's <budget>".to_string()];
    let dir = tempfile::tempdir().unwrap();
    report::write_comparison(&runs, &names(), "Demo & comparison", &notes, dir.path()).unwrap();

    let index: DemoIndex =
        serde_json::from_slice(&std::fs::read(dir.path().join("demo.json")).unwrap()).unwrap();
    assert_eq!(index.runs.len(), 3);
    assert_eq!(index.runs[1].flagged, vec![FLAGGED]);
    assert_eq!(
        index.runs[1].flagged_names,
        vec![NAMES[FLAGGED].to_string()]
    );
    for (run, (_, r)) in index.runs.iter().zip(&runs) {
        let sub = dir.path().join(&run.dir);
        check_run_files(&sub, r);
        assert!(sub.join("report.html").is_file());
    }
    assert_eq!(
        index
            .runs
            .iter()
            .map(|r| r.dir.as_str())
            .collect::<Vec<_>>(),
        ["natural", "backdoored-trigger", "adversarially-trained"]
    );

    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);
    assert_eq!(html.matches("<details").count(), 3);
    assert_eq!(html.matches("<div class=\"run\">").count(), 3);
    assert!(html.contains("Backdoored &lt;trigger&gt;"));
    assert!(html.contains("demo&#39;s &lt;budget&gt;"));
    assert!(html.contains("Demo &amp; comparison"));
    assert!(html.contains("class=\"verdict clean\""));
    assert!(html.contains("class=\"verdict flagged\""));
    // Anchors of different runs do not collide.
    assert!(html.contains("id=\"r0-class-1\"") && html.contains("id=\"r1-class-1\""));
    // Each run's column shows its paper figure.
    let columns: Vec<&str> = html[..html.find("<h2>Details</h2>").unwrap()]
        .split("<div class=\"run\">")
        .skip(1)
        .collect();
    assert_eq!(columns.len(), index.runs.len());
    for (run, column) in index.runs.iter().zip(columns) {
        let figure = std::fs::read(dir.path().join(&run.dir).join(report::PAPER_FIGURE)).unwrap();
        assert!(
            column.contains(&report::data_uri(&figure)),
            "{}'s column lacks its paper figure",
            run.label
        );
    }
}

/// Writes the fixture runs to `$CWP_REPORT_PREVIEW` for a look in a
/// browser (`CWP_REPORT_PREVIEW=/tmp/preview cargo test --release --test
/// report_files preview`); does nothing without it.
#[test]
fn preview() {
    let Some(dir) = std::env::var_os("CWP_REPORT_PREVIEW") else {
        return;
    };
    let dir = Path::new(&dir);
    let grey = with_white_canvases([1, 28, 28]);
    report::write_run(&grey, &names(), &dir.join("grey")).unwrap();
    report::write_run(
        &make_report([3, 32, 32], 3, true),
        &names(),
        &dir.join("rgb"),
    )
    .unwrap();
    let fashion: Vec<String> = classwise::data::idx::FASHION_MNIST_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut natural = make_report([1, 28, 28], 10, true);
    natural.flagged.clear();
    let runs = vec![
        ("natural".to_string(), natural),
        ("backdoored".to_string(), make_report([1, 28, 28], 10, true)),
        (
            "adversarially trained".to_string(),
            make_report([1, 28, 28], 10, true),
        ),
    ];
    let notes = ["search ran 2 epochs instead of 5 to fit the demo's time budget".to_string()];
    report::write_comparison(&runs, &fashion, "classwise demo", &notes, &dir.join("demo")).unwrap();
    println!("{}", report::terminal_summary(&grey, &names()));
}

#[test]
fn large_runs_get_thumbnails_and_a_grey_crowd_in_the_plot() {
    let classes = report::GRID_MANY + 1;
    let r = make_report([1, 28, 28], classes, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &[], dir.path()).unwrap();
    // 28×28 is shown at 112 px, more than a thumbnail: the grid shrinks it.
    let t = report::GRID_THUMB as u32;
    let sep = raster::SEPARATOR as u32;
    let rows = classes as u32;
    check_png(
        &dir.path().join("images/grid.png"),
        (4 * t + 5 * sep, rows * t + (rows + 1) * sep),
        ColorType::Rgb8,
    );
    // The per-search pictures keep their display size.
    check_png(
        &dir.path().join("images/c7_auto0_pattern.png"),
        (112, 112),
        ColorType::L8,
    );
    let svg = std::fs::read_to_string(dir.path().join("pp_vs_k.svg")).unwrap();
    assert!(svg.contains("other classes"));
    assert!(svg.matches("<polyline").count() > classes);
}

#[test]
fn an_empty_run_still_renders() {
    let mut r = make_report([1, 28, 28], 4, true);
    r.searches.clear();
    r.classes.clear();
    r.flagged.clear();
    r.verdict_min_k = None;
    r.verdict_mask = verdict::analyse("mask_mean", &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);
    assert!(verdict_box(&html).contains("No class flagged"));
    png(&dir.path().join("images/grid.png"));
}

/// The demo's situation: a white canvas next to the natural ones. Class 0
/// has two natural canvases (the second more predictive) and a white one
/// that wins (stored first, so the page must reorder); class 2 was searched
/// from the white canvas only.
fn with_white_canvases(shape: [usize; 3]) -> RunReport {
    let mut r = make_report(shape, 4, true);
    let numel = shape.iter().product();
    let whiten = |s: &mut SearchResult| {
        s.canvas.id = "solid1".into();
        s.canvas.source = "solid".into();
        s.canvas.dataset_index = None;
        s.canvas.pixels = vec![1.0; numel];
    };
    assert_eq!((r.searches[0].class, r.searches[1].class), (0, 0));
    // Class 0's second natural canvas is the more predictive one, on the
    // selection images (what chooses) as on the report images.
    r.searches[1].power.overall = r.searches[0].power.overall + 0.005;
    r.searches[1].select_power = r.searches[0].select_power.map(|p| p + 0.005);
    let mut white = r.searches[0].clone();
    whiten(&mut white);
    white.power.overall = 0.999;
    white.select_power = Some(0.999);
    r.searches.insert(0, white);
    for c in &mut r.classes {
        c.best += 1;
    }
    r.classes[0].best = 0;
    r.classes[0].power = 0.999;
    let two = r.searches.iter().position(|s| s.class == 2).unwrap();
    assert_eq!(r.searches.iter().filter(|s| s.class == 2).count(), 1);
    whiten(&mut r.searches[two]);
    r
}

/// The tile at `index` of a figure of `columns` tiles of `tw × th` per row.
fn tile(img: &image::RgbaImage, index: usize, columns: usize, tw: u32, th: u32) -> Vec<[u8; 4]> {
    let sep = raster::SEPARATOR as u32;
    let (col, row) = ((index % columns) as u32, (index / columns) as u32);
    let (x0, y0) = (sep + col * (tw + sep), sep + row * (th + sep));
    (0..th)
        .flat_map(|y| (0..tw).map(move |x| (x0 + x, y0 + y)))
        .map(|(x, y)| img.get_pixel(x, y).0)
        .collect()
}

/// `r`'s pixels as RGBA, as a decoded PNG gives them.
fn rgba_of(r: &raster::Raster) -> Vec<[u8; 4]> {
    (0..r.height)
        .flat_map(|y| (0..r.width).map(move |x| (x, y)))
        .map(|(x, y)| match r.pixel(x, y) {
            [g] => [*g, *g, *g, 255],
            [a, b, c] => [*a, *b, *c, 255],
            other => panic!("unexpected pixel {other:?}"),
        })
        .collect()
}

#[test]
fn paper_figure_shows_each_class_pattern_from_its_most_predictive_natural_canvas() {
    for shape in [[1, 28, 28], [3, 32, 32]] {
        let r = with_white_canvases(shape);
        let dir = tempfile::tempdir().unwrap();
        report::write_run(&r, &names(), dir.path()).unwrap();
        let [_, h, w] = shape;
        let scale = raster::display_scale(h, w);
        let (tw, th) = ((w * scale) as u32, (h * scale) as u32);
        let n = r.classes.len();
        let columns = n.min(report::PAPER_COLUMNS);
        let rows = n.div_ceil(columns) as u32;
        let sep = raster::SEPARATOR as u32;
        let colour = if shape[0] == 3 {
            ColorType::Rgb8
        } else {
            ColorType::L8
        };
        let figure = check_png(
            &dir.path().join(report::PAPER_FIGURE),
            (
                columns as u32 * tw + (columns as u32 + 1) * sep,
                rows * th + (rows + 1) * sep,
            ),
            colour,
        )
        .to_rgba8();
        for (index, c) in r.classes.iter().enumerate() {
            let got = tile(&figure, index, columns, tw, th);
            let natural: Vec<usize> = (0..r.searches.len())
                .filter(|&i| {
                    r.searches[i].class == c.class
                        && matches!(r.searches[i].canvas.source.as_str(), "test" | "train")
                })
                .collect();
            // Chosen as the best canvas is: by power on the selection images.
            let chosen_by = |i: usize| r.searches[i].select_power.unwrap();
            let Some(&want) = natural
                .iter()
                .max_by(|&&a, &&b| chosen_by(a).total_cmp(&chosen_by(b)))
            else {
                // Only a white canvas: a blank tile, never the white pattern.
                assert!(
                    got.iter().all(|p| p[..3] == [raster::MISSING_GREY; 3]),
                    "class {} has no natural canvas: its tile must be blank",
                    c.class
                );
                continue;
            };
            let s = &r.searches[want];
            let pattern = raster::pattern_on_grey(&s.canvas.pixels, &s.positions, shape)
                .unwrap()
                .upscale(scale);
            assert_eq!(
                got,
                rgba_of(&pattern),
                "class {}: the tile must be the pattern of canvas {}",
                c.class,
                s.canvas.id
            );
        }
        // The fixture's class 0 must test "most predictive natural", not
        // "first" or "best overall".
        let s0 = &r.searches[report::paper_search(&r, 0).unwrap()];
        assert_eq!(s0.canvas.id, "auto1");
        assert_eq!(report::paper_search(&r, 2), None);
    }
}

#[test]
fn page_shows_each_class_canvases_side_by_side_and_embeds_the_paper_figure() {
    let r = with_white_canvases([1, 28, 28]);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);

    let figure = std::fs::read(dir.path().join(report::PAPER_FIGURE)).unwrap();
    let at = html
        .find(&report::data_uri(&figure))
        .expect("the page embeds paper_figure.png");
    let grid = html.find("<table class=\"grid\">").unwrap();
    let per_class = html.find("id=\"class-0\"").unwrap();
    assert!(
        grid < at && at < per_class,
        "the figure sits under the grid"
    );
    let lower = html.to_lowercase();
    assert!(lower.contains("patterns from natural canvases, as the paper's figure shows them"));
    assert!(lower.contains("the trigger finder"));

    let section = |c: usize| {
        let start = html.find(&format!("<section id=\"class-{c}\">")).unwrap();
        &html[start..start + html[start..].find("</section>").unwrap()]
    };
    let zero = section(0);
    assert_eq!(zero.matches("<div class=\"side\"").count(), 1, "one row");
    let row = &zero[zero.find("<div class=\"side\"").unwrap()..];
    assert!(
        row.contains("grid-template-columns: repeat(3,"),
        "three columns"
    );
    let head = |id: &str| {
        row.find(&format!("<h4>canvas {id} "))
            .unwrap_or_else(|| panic!("no column for {id}"))
    };
    let (a0, a1, white) = (head("auto0"), head("auto1"), head("solid1"));
    assert!(
        a0 < a1 && a1 < white,
        "natural canvases first, in report order"
    );
    // The white canvas is the best and stays marked, in its own column.
    assert_eq!(row.matches("badge best").count(), 1);
    let badge = row.find("badge best").unwrap();
    assert!(badge > white, "the best badge belongs to the white column");
    assert!(row[white..].contains("a white image"));
    assert!(row.contains("natural canvas") && row.contains("solid canvas"));
    // Each column shows its pattern on grey and its power.
    assert_eq!(row.matches("(on grey)").count(), 3);
    assert_eq!(row.matches("power at k = ").count(), 3);
    // The numbers come right under the pictures, before the examples, so
    // the columns line up.
    for column in row.split("<div class=\"search").skip(1) {
        let power = column.find("power at k = ").unwrap();
        let example = column.find("with the pattern of").unwrap();
        assert!(power < example, "power after the examples");
    }

    // The verdict box is untouched by the white canvases' presence.
    let plain = make_report([1, 28, 28], 4, true);
    let dir2 = tempfile::tempdir().unwrap();
    report::write_run(&plain, &names(), dir2.path()).unwrap();
    let html2 = std::fs::read_to_string(dir2.path().join("report.html")).unwrap();
    assert_eq!(verdict_box(&html), verdict_box(&html2));
}

#[test]
fn a_run_without_natural_canvases_has_no_paper_figure() {
    let mut r = make_report([1, 28, 28], 4, true);
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    assert!(dir.path().join(report::PAPER_FIGURE).is_file());
    for s in &mut r.searches {
        s.canvas.source = "solid".into();
    }
    report::write_run(&r, &names(), dir.path()).unwrap();
    assert!(
        !dir.path().join(report::PAPER_FIGURE).exists(),
        "an earlier run's paper figure must not stay"
    );
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    check_self_contained(&html);
    assert!(!html.contains("figure class=\"paper\""));
}

#[test]
fn a_rerun_with_fewer_classes_leaves_no_stale_pictures() {
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&make_report([1, 28, 28], 4, true), &names(), dir.path()).unwrap();
    let images = dir.path().join("images");
    assert!(images.join("c3_auto0_pattern.png").is_file());
    assert!(images.join("c0_auto1_examples.png").is_file());
    let r = make_report([1, 28, 28], 3, false);
    report::write_run(&r, &names(), dir.path()).unwrap();
    let mut want: Vec<String> = vec!["grid.png".into()];
    for s in &r.searches {
        for suffix in ["canvas", "mask", "pattern_grey", "pattern", "pattern_rgba"] {
            want.push(format!("c{}_{}_{suffix}.png", s.class, s.canvas.id));
        }
    }
    want.sort();
    let mut got: Vec<String> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    got.sort();
    assert_eq!(got, want, "images/ holds exactly this run's pictures");
}

#[test]
fn a_class_proven_by_its_optimised_mask_alone_is_flagged_as_a_diffuse_trigger() {
    let mut r = make_report([1, 28, 28], 4, true);
    let compared = r.verdict_searches[FLAGGED];
    let verdict_of = |r: &RunReport| {
        classwise::search::kind_verdict(
            &r.config.classes,
            &r.searches,
            Some("natural"),
            r.config.threshold,
        )
    };
    // A blend: its top-k pattern moves almost nothing, the blended mask nearly everything.
    r.searches[compared].power.overall = 0.05;
    r.searches[compared].soft_power = Some(0.97);
    let v = verdict_of(&r);
    assert_eq!(
        (v.flagged.clone(), v.unproven.clone()),
        (vec![FLAGGED], vec![])
    );
    r.flagged = v.flagged;
    let summary = report::terminal_summary(&r, &names());
    let verdict = summary.lines().last().unwrap();
    assert!(
        verdict.contains("diffuse trigger") && verdict.contains("97.0%"),
        "{verdict}"
    );
    let dir = tempfile::tempdir().unwrap();
    report::write_run(&r, &names(), dir.path()).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(verdict_box(&html).contains("diffuse trigger"));

    // Neither proves it: a failed search, not a backdoor.
    r.searches[compared].soft_power = Some(0.5);
    let v = verdict_of(&r);
    assert_eq!((v.flagged, v.unproven), (vec![], vec![FLAGGED]));
    // A result stored before the mask's power was measured is judged by its pattern.
    r.searches[compared].soft_power = None;
    assert_eq!(verdict_of(&r).unproven, vec![FLAGGED]);
    // A class flagged on its top-k pattern is not called diffuse.
    let plain = make_report([1, 28, 28], 4, true);
    let summary = report::terminal_summary(&plain, &names());
    assert!(!summary.contains("diffuse"), "{summary}");
}
