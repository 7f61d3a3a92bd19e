//! The method as the report states it: the best canvas is chosen on
//! images its reported power never sees; the verdict compares like with
//! like and flags only classes whose pattern works; results of another
//! backend's numerics are never reused; the authors' ImageNet protocol
//! searches every image, target class included.

use classwise::backend::cpu::CpuBackend;
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::search::{
    self, store::Store, ImageSets, Protocol, RunInputs, RunReport, SearchConfig,
};
use classwise::weights::Model;

fn test_set(n: usize) -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    test.subset(&(0..n).collect::<Vec<_>>())
}

fn badnets() -> Model {
    classwise::models::BACKDOORED.load().unwrap()
}

/// Three classes, the default canvases, a short optimisation.
fn small_cfg(model: &Model) -> SearchConfig {
    let mut cfg = SearchConfig::defaults(model.graph.input, 10);
    cfg.classes = vec![0, 1, 2];
    cfg.search_frac = 0.1;
    cfg.mask.epochs = 1;
    cfg.k_sweep = vec![4, 16, 64, 256];
    cfg.sweep_per_class = Some(8);
    cfg.eval_per_class = Some(20);
    cfg
}

fn inputs<'a>(model: &'a Model, test: &'a Dataset) -> RunInputs<'a> {
    RunInputs {
        model,
        model_id: "badnets".into(),
        model_label: "badnets".into(),
        test,
        train: None,
        command: "test".into(),
        quiet: true,
        checkpoint_every: None,
    }
}

/// A whole search run on the reference backend.
fn run(model: &Model, test: &Dataset, cfg: &SearchConfig, out: &std::path::Path) -> RunReport {
    search::run(&CpuBackend::REFERENCE, &inputs(model, test), cfg, out).unwrap()
}

#[test]
fn selection_and_report_images_are_disjoint_under_cwp_and_overlap_under_the_authors() {
    let test = test_set(600);
    let idx = test.class_indices();
    let model = badnets();
    let cfg = small_cfg(&model);
    let sets = ImageSets::new(&idx, &cfg);
    for c in 0..10 {
        assert_eq!(sets.select[c].len(), 8, "class {c}");
        assert_eq!(sets.report[c].len(), 20, "class {c}");
        assert!(
            sets.select[c].iter().all(|i| !sets.report[c].contains(i)),
            "class {c}: a selection image is also a report image"
        );
    }
    let authors = SearchConfig {
        protocol: Protocol::AuthorsCifar,
        ..cfg.clone()
    };
    let sets = ImageSets::new(&idx, &authors);
    // The authors evaluate on the first images of each class, the very
    // ones a best canvas would be chosen on.
    assert_eq!(sets.report[3][..8], sets.select[3][..]);
    // The selection never takes more than half a class, so the report
    // always has images.
    let all = SearchConfig {
        sweep_per_class: None,
        ..cfg
    };
    let sets = ImageSets::new(&idx, &all);
    for (c, class) in idx.iter().enumerate() {
        assert_eq!(sets.select[c].len(), class.len() / 2, "class {c}");
        assert!(!sets.report[c].is_empty());
    }
}

#[test]
fn the_best_canvas_is_chosen_by_its_power_on_the_selection_images() {
    let test = test_set(600);
    let model = badnets();
    let mut cfg = small_cfg(&model);
    cfg.canvas = "auto:2+solid:1".into();
    let out = tempfile::tempdir().unwrap();
    let report = run(&model, &test, &cfg, out.path());
    let sets = ImageSets::new(&test.class_indices(), &cfg);
    for c in &report.classes {
        let mine: Vec<usize> = (0..report.searches.len())
            .filter(|&i| report.searches[i].class == c.class)
            .collect();
        assert_eq!(mine.len(), 3);
        let best_select = mine
            .iter()
            .map(|&i| report.searches[i].select_power.unwrap())
            .fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(
            report.searches[c.best].select_power,
            Some(best_select),
            "class {}",
            c.class
        );
        // The reported power counts exactly the report images.
        let s = &report.searches[c.best];
        for p in &s.power.per_source {
            assert_eq!(p.images, sets.report[p.source].len());
        }
        // The selection power is the sweep's value at the default k.
        let at_k = s.sweep.iter().find(|&&(k, _)| k == cfg.top_k).unwrap().1;
        assert_eq!(s.select_power, Some(at_k));
    }
    assert!(
        report.images.contains("disjoint"),
        "the report must say which images chose and which reported: {}",
        report.images
    );
}

/// The run's header and stored results, for summarising them again.
fn header_and_results(
    model: &Model,
    test: &Dataset,
    cfg: &SearchConfig,
    out: &std::path::Path,
) -> (search::RunHeader, Vec<search::SearchResult>) {
    let m = search::run_shard(
        &CpuBackend::REFERENCE,
        &inputs(model, test),
        cfg,
        out,
        "0/1".parse().unwrap(),
    )
    .unwrap();
    let store = Store::at(out);
    let results = m
        .header
        .units
        .iter()
        .map(|u| store.load(&u.key).unwrap())
        .collect();
    (m.header, results)
}

#[test]
fn the_verdict_compares_each_class_s_white_canvas_search_when_every_class_has_one() {
    let test = test_set(600);
    let model = badnets();
    let mut cfg = small_cfg(&model);
    cfg.classes = vec![0, 1, 2, 3, 4];
    let out = tempfile::tempdir().unwrap();
    let (header, mut results) = header_and_results(&model, &test, &cfg, out.path());
    // Make the natural canvas the best of class 1 by selection power: the
    // verdict must still compare its solid search.
    for r in results.iter_mut().filter(|r| r.class == 1) {
        r.select_power = Some(if r.canvas.source == "solid" { 0.1 } else { 0.9 });
    }
    let report = search::summarise(header, results, Default::default()).unwrap();
    assert_eq!(report.verdict_canvas, "solid");
    let row1 = report.classes.iter().position(|c| c.class == 1).unwrap();
    assert_ne!(
        report.searches[report.classes[row1].best].canvas.source,
        "solid"
    );
    for (row, &i) in report.verdict_searches.iter().enumerate() {
        let s = &report.searches[i];
        assert_eq!(s.canvas.source, "solid", "row {row}");
        assert_eq!(s.class, report.classes[row].class);
        assert_eq!(report.verdict_mask.values[row], s.mask_mean.max(1e-9).ln());
    }
    // The natural canvases' analysis is there for comparison.
    assert_eq!(report.other_verdicts.len(), 1);
    assert_eq!(report.other_verdicts[0].0, "natural");
}

#[test]
fn a_class_whose_search_failed_is_not_flagged_however_small_its_mask() {
    let test = test_set(600);
    let model = badnets();
    let mut cfg = small_cfg(&model);
    cfg.classes = vec![0, 1, 2, 3, 4];
    cfg.canvas = "solid:1".into();
    let out = tempfile::tempdir().unwrap();
    let (header, results) = header_and_results(&model, &test, &cfg, out.path());
    // Class 3's mask collapses towards 0 and its pattern predicts nothing:
    // the smallest L1 of all, by far.
    let failed = |power: f64| {
        let mut r = results.clone();
        for s in r.iter_mut().filter(|s| s.class == 3) {
            s.mask.iter_mut().for_each(|m| *m = 0.0);
            s.mask[0] = 0.02;
            s.mask_mean = 0.02 / s.mask.len() as f64;
            s.power.overall = power;
        }
        search::summarise(header.clone(), r, Default::default()).unwrap()
    };
    let report = failed(0.0);
    assert!(
        report.verdict_mask.flagged.contains(&3),
        "the collapsed mask must be anomalous: {:?}",
        report.verdict_mask
    );
    assert!(!report.flagged.contains(&3), "a failed search was flagged");
    assert_eq!(report.unproven, vec![3]);
    // The same mask with a pattern that works is a backdoor.
    let report = failed(cfg.threshold);
    assert!(report.flagged.contains(&3));
    assert!(report.unproven.is_empty());
}

#[test]
fn the_authors_imagenet_protocol_searches_every_image_and_counts_the_target_class() {
    let test = test_set(200);
    let model = badnets();
    let mut cfg = SearchConfig::defaults_for(model.graph.input, 10, Protocol::AuthorsImagenet);
    assert_eq!(cfg.mask.epochs, 1);
    assert_eq!(cfg.canvas, "test:0");
    cfg.classes = vec![2];
    cfg.k_sweep = Vec::new();
    let sets = ImageSets::new(&test.class_indices(), &cfg);
    assert_eq!(sets.search_images(2), (0..200).collect::<Vec<_>>());
    let out = tempfile::tempdir().unwrap();
    let report = run(&model, &test, &cfg, out.path());
    let s = &report.searches[0];
    assert_eq!(s.steps, 200 / 4);
    assert!(s.power.per_source.iter().any(|p| p.source == 2));
    let total: usize = s.power.per_source.iter().map(|p| p.images).sum();
    assert_eq!(total, 200);
    assert_eq!(s.min_k, None);
    // Under cwp the target class is neither searched nor counted.
    let cwp = ImageSets::new(
        &test.class_indices(),
        &SearchConfig::defaults(model.graph.input, 10),
    );
    assert!(cwp.search_images(2).iter().all(|&i| test.label(i) != 2));
}

#[test]
fn the_protocol_is_part_of_every_search_s_key() {
    let test = test_set(200);
    let model = badnets();
    let mut cfg = SearchConfig::defaults_for(model.graph.input, 10, Protocol::AuthorsCifar);
    cfg.classes = vec![1];
    cfg.search_frac = 0.1;
    cfg.mask.epochs = 1;
    cfg.k_sweep = Vec::new();
    let out = tempfile::tempdir().unwrap();
    let a = run(&model, &test, &cfg, out.path());
    assert_eq!(a.reused, 0);
    // The same search set and optimisation, another protocol: not reused.
    cfg.protocol = Protocol::Cwp;
    let b = run(&model, &test, &cfg, out.path());
    assert_eq!(b.reused, 0);
    assert_eq!(a.searches[0].mask, b.searches[0].mask);
    assert_ne!(
        a.searches[0].power.per_source,
        b.searches[0].power.per_source
    );
}

#[test]
fn without_a_sweep_the_summary_shows_no_minimal_k_rather_than_not_reached() {
    let out = tempfile::tempdir().unwrap();
    let weights = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/smallcnn_fmnist_badnets.safetensors"
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cwp"))
        .args([
            "search",
            "--weights",
            weights,
            "--out",
            out.path().to_str().unwrap(),
            "--classes",
            "0,1,2",
            "--canvas",
            "solid:1",
            "--k-sweep",
            "none",
            "--epochs",
            "1",
            "--search-frac",
            "0.02",
            "--sweep-per-class",
            "10",
            "--eval-per-class",
            "20",
            "--protocol",
            "authors",
            "--device",
            "cpu",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!stdout.contains("not reached"), "{stdout}");
    assert!(stdout.contains('—'), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    // `authors` at 28×28 is the authors' CIFAR protocol.
    assert_eq!(report["config"]["protocol"], "authors-cifar");
    assert!(report["images"].as_str().unwrap().contains("authors-cifar"));
}
