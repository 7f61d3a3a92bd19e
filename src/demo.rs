//! `cwp demo`: the paper's three settings on one page. The three shipped
//! Fashion-MNIST models (natural, BadNets-backdoored, adversarially trained)
//! are searched for all classes with an automatic canvas, and the reports
//! are written side by side.

use std::path::Path;
use std::time::Instant;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::Result;
use crate::models::{self, Shipped};
use crate::search::{self, RunInputs, RunReport, SearchConfig};

/// The demo's settings: the authors' optimisation (5 epochs) from two
/// canvases per class, with a sampled evaluation so the whole demo fits in
/// minutes on two CPU cores.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Passes over the search set (the authors use 5).
    pub epochs: usize,
    /// Canvas choice.
    pub canvas: String,
    /// Other-class test images per class for the power at the default k (None: all).
    pub eval_per_class: Option<usize>,
    /// Other-class test images per class for the k-sweep.
    pub sweep_per_class: Option<usize>,
    /// No progress output.
    pub quiet: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            epochs: 5,
            canvas: "auto:1+solid:1".into(),
            eval_per_class: Some(200),
            sweep_per_class: Some(30),
            quiet: false,
        }
    }
}

impl DemoConfig {
    /// The search configuration for a model input.
    pub fn search_config(&self, input: [usize; 3], classes: usize) -> SearchConfig {
        let mut cfg = SearchConfig::defaults(input, classes);
        cfg.mask.epochs = self.epochs;
        cfg.canvas = self.canvas.clone();
        cfg.eval_per_class = self.eval_per_class;
        cfg.sweep_per_class = self.sweep_per_class;
        cfg
    }

    /// Lines for the report saying where the demo departs from the defaults.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.epochs != 5 {
            notes.push(format!(
                "The masks were optimised for {} epoch(s) over the search set instead of the authors' 5; `cwp search` uses 5.",
                self.epochs
            ));
        }
        if self.canvas.contains("solid") {
            notes.push(
                "Each class is searched from two canvases: the test image the model is surest of (outside the search set) and a white image. A pattern is made of its canvas's pixels, so a trigger whose pixels no image of the class contains (BadNets' white patch on dark Fashion-MNIST corners) can only show up from a canvas that holds them; the class keeps the canvas with the more predictive pattern.".to_string(),
            );
        }
        if let Some(n) = self.eval_per_class {
            notes.push(format!(
                "Predictive power at the default k is measured on the first {n} test images of each other class (the authors use all 1000); `cwp search --eval-per-class all` does that."
            ));
        }
        if let Some(n) = self.sweep_per_class {
            notes.push(format!(
                "The k-sweep and the minimal k use the first {n} test images of each other class."
            ));
        }
        notes
    }
}

/// Runs the demo on `test` (Fashion-MNIST's test split) into `out`; returns
/// the three runs with their labels.
pub fn run<B: Backend>(
    be: &B,
    test: &Dataset,
    cfg: &DemoConfig,
    out: &Path,
    command: &str,
) -> Result<Vec<(String, RunReport)>> {
    let start = Instant::now();
    let mut runs = Vec::new();
    for shipped in models::ALL {
        runs.push((
            shipped.title.to_string(),
            run_one(be, &shipped, test, cfg, out, command)?,
        ));
    }
    let title = format!(
        "What do deep nets learn? Class-wise patterns of three SmallCNNs on Fashion-MNIST ({:.0} s on {})",
        start.elapsed().as_secs_f64(),
        be.name()
    );
    crate::report::write_comparison(&runs, test.class_names(), &title, &cfg.notes(), out)?;
    Ok(runs)
}

fn run_one<B: Backend>(
    be: &B,
    shipped: &Shipped,
    test: &Dataset,
    cfg: &DemoConfig,
    out: &Path,
    command: &str,
) -> Result<RunReport> {
    let model = shipped.load()?;
    let search_cfg = cfg.search_config(model.graph.input, model.graph.num_classes);
    let inputs = RunInputs {
        model: &model,
        model_id: shipped.id(),
        model_label: format!("{} ({})", shipped.title, shipped.file),
        test,
        train: None,
        command: command.to_string(),
        quiet: cfg.quiet,
        checkpoint_every: None,
    };
    if !cfg.quiet {
        eprintln!("demo: searching the {} model", shipped.slug);
    }
    let dir = out.join(crate::report::slug(shipped.title));
    std::fs::create_dir_all(&dir).map_err(|e| crate::Error::io(&dir, e))?;
    search::run(be, &inputs, &search_cfg, &dir)
}
