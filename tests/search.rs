//! Properties of the batched search: deterministic, and a batched run of S
//! searches gives bit for bit the masks of S separate runs (however the
//! searches are chunked into forward passes); a run split into shards and
//! merged gives the report of one run.

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::device_model::DeviceModel;
use classwise::progress::Progress;
use classwise::search::optimize::{optimise, Job, MaskConfig, Optimised};
use classwise::zoo::{build, ModelSpec};

mod common;

fn small_test_set() -> Dataset {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let idx: Vec<usize> = (0..300).collect();
    test.subset(&idx)
}

fn run(
    jobs: &[(usize, Vec<f32>, Vec<usize>, bool)],
    max_images: usize,
    cfg: &MaskConfig,
    test: &Dataset,
) -> Vec<Optimised> {
    let be = CpuBackend::REFERENCE;
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    // Formula weights (tests/fixtures/README.md): a network whose CE
    // gradient is strong enough to move each pixel its own way.
    let params: Vec<_> = classwise::selftest::formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let jobs: Vec<Job<'_>> = jobs
        .iter()
        .map(|(t, c, imgs, learn)| Job {
            target: *t,
            canvas: c,
            images: imgs,
            learn: *learn,
        })
        .collect();
    let mut bar = Progress::new("test", 1, true);
    let dm = DeviceModel::new(&be, &graph, params).unwrap();
    optimise(&dm, test, &jobs, cfg, max_images, &mut bar, None).unwrap()
}

fn jobs(test: &Dataset) -> Vec<(usize, Vec<f32>, Vec<usize>, bool)> {
    // Four searches: two targets, one with two canvases; different set
    // sizes; the last learns its (grey) canvas.
    let of = |c: usize| -> Vec<usize> { (0..test.len()).filter(|&i| test.label(i) == c).collect() };
    let others = |t: usize, n: usize| -> Vec<usize> {
        (0..test.len())
            .filter(|&i| test.label(i) != t)
            .take(n)
            .collect()
    };
    vec![
        (3, test.image(of(3)[0]).into_data(), others(3, 16), false),
        (3, test.image(of(3)[1]).into_data(), others(3, 16), false),
        (7, test.image(of(7)[0]).into_data(), others(7, 24), false),
        (5, vec![0.5; 784], others(5, 20), true),
    ]
}

/// The CE term weighted up (an untrained model's gradients are weak), so
/// pixels move in both directions and equal masks are not a triviality.
fn cfg() -> MaskConfig {
    MaskConfig {
        epochs: 2,
        alpha: 1.0,
        beta: 0.01,
        ..MaskConfig::default()
    }
}

#[test]
fn a_multi_step_search_is_deterministic() {
    let test = small_test_set();
    let a = run(&jobs(&test), 4096, &cfg(), &test);
    let b = run(&jobs(&test), 4096, &cfg(), &test);
    for (x, y) in a.iter().zip(&b) {
        assert_same(&x.mask, &y.mask, "mask");
        assert_eq!(x.ce_curve, y.ce_curve);
    }
    // The pixels moved in different directions (the CE term is not negligible),
    // so equality is not a triviality of uniform masks.
    let distinct: std::collections::BTreeSet<u32> = a[0].mask.iter().map(|v| v.to_bits()).collect();
    assert!(distinct.len() >= 3, "mask values: {distinct:?}");
    assert_eq!(a[0].steps, 8);
    assert_eq!(a[2].steps, 12);
}

#[test]
fn batched_searches_equal_separate_runs_bit_for_bit() {
    let test = small_test_set();
    let all = jobs(&test);
    let batched = run(&all, 4096, &cfg(), &test);
    for (i, job) in all.iter().enumerate() {
        let alone = run(std::slice::from_ref(job), 4096, &cfg(), &test);
        assert_same(
            &alone[0].mask,
            &batched[i].mask,
            &format!("search {i} alone vs batched"),
        );
        assert_eq!(alone[0].canvas, batched[i].canvas, "search {i}'s canvas");
    }
    // Chunked into one search per forward pass: still the same masks.
    let chunked = run(&all, 4, &cfg(), &test);
    for (x, y) in chunked.iter().zip(&batched) {
        assert_same(&x.mask, &y.mask, "chunked vs batched");
        assert_eq!(x.canvas, y.canvas, "chunked vs batched canvas");
    }
}

#[test]
fn a_learned_canvas_moves_its_pixels_within_0_and_1_and_a_fixed_one_stays() {
    let test = small_test_set();
    let out = run(&jobs(&test), 4096, &cfg(), &test);
    assert!(out[..3].iter().all(|o| o.canvas.is_none()));
    let learned = out[3]
        .canvas
        .as_ref()
        .expect("the learning search returns its canvas");
    assert_eq!(learned.len(), 784);
    assert!(
        learned.iter().all(|v| (0.0..=1.0).contains(v)),
        "{learned:?}"
    );
    let moved = learned.iter().filter(|&&v| v != 0.5).count();
    let (up, down) = (
        learned.iter().filter(|&&v| v > 0.5).count(),
        learned.iter().filter(|&&v| v < 0.5).count(),
    );
    assert!(
        moved > 100 && up > 0 && down > 0,
        "moved {moved}: {up} up, {down} down"
    );
}

#[test]
fn the_batch_order_depends_on_the_seed() {
    let test = small_test_set();
    let a = run(&jobs(&test), 4096, &cfg(), &test);
    let c2 = MaskConfig { seed: 9, ..cfg() };
    let b = run(&jobs(&test), 4096, &c2, &test);
    let differ = a[0]
        .mask
        .iter()
        .zip(&b[0].mask)
        .filter(|(x, y)| x != y)
        .count();
    assert!(differ > 0, "another seed gave the same mask");
}

/// Bitwise equality with a short message (no dump of 784 values).
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    let differ = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differ, 0, "{what}: {differ} of {} values differ", a.len());
}

/// A small but complete run: 3 classes, a tiny search set, 1 epoch.
fn tiny_cfg(model: &classwise::weights::Model, lr: f64) -> classwise::search::SearchConfig {
    let mut cfg = classwise::search::SearchConfig::defaults(model.graph.input, 10);
    cfg.classes = vec![1, 4, 8];
    cfg.canvas = "auto:1".into();
    cfg.search_frac = 0.1;
    cfg.mask.epochs = 1;
    cfg.mask.lr = lr;
    cfg.k_sweep = vec![8, 64, 784];
    cfg.sweep_per_class = Some(5);
    cfg.eval_per_class = Some(10);
    cfg
}

fn tiny_inputs<'a>(
    model: &'a classwise::weights::Model,
    test: &'a Dataset,
) -> classwise::search::RunInputs<'a> {
    classwise::search::RunInputs {
        model,
        model_id: "formula".into(),
        model_label: "formula".into(),
        test,
        train: None,
        command: "test".into(),
        quiet: true,
        checkpoint_every: None,
    }
}

fn tiny_run(
    model: &classwise::weights::Model,
    test: &Dataset,
    lr: f64,
    out: &std::path::Path,
) -> classwise::search::RunReport {
    let cfg = tiny_cfg(model, lr);
    classwise::search::run(&CpuBackend::REFERENCE, &tiny_inputs(model, test), &cfg, out).unwrap()
}

fn tiny_shard(
    model: &classwise::weights::Model,
    test: &Dataset,
    shard: &str,
    out: &std::path::Path,
) -> classwise::search::shard::Manifest {
    tiny_shard_with(model, test, &tiny_cfg(model, 0.02), shard, out)
}

fn tiny_shard_with(
    model: &classwise::weights::Model,
    test: &Dataset,
    cfg: &classwise::search::SearchConfig,
    shard: &str,
    out: &std::path::Path,
) -> classwise::search::shard::Manifest {
    let inputs = tiny_inputs(model, test);
    classwise::search::run_shard(
        &CpuBackend::REFERENCE,
        &inputs,
        cfg,
        out,
        shard.parse().unwrap(),
    )
    .unwrap()
}

fn formula_model() -> classwise::weights::Model {
    let spec = ModelSpec::new("smallcnn", [1, 28, 28], 10);
    let graph = build(&spec).unwrap();
    classwise::weights::Model::new(&spec, classwise::selftest::formula_params(&graph)).unwrap()
}

#[test]
fn a_rerun_reuses_finished_searches_and_a_changed_option_does_not() {
    let model = formula_model();
    let test = small_test_set();
    let out = tempfile::tempdir().unwrap();
    let first = tiny_run(&model, &test, 0.02, out.path());
    assert_eq!((first.searches.len(), first.reused), (3, 0));
    let again = tiny_run(&model, &test, 0.02, out.path());
    assert_eq!(again.reused, 3);
    for (a, b) in first.searches.iter().zip(&again.searches) {
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.power, b.power);
    }
    let changed = tiny_run(&model, &test, 0.05, out.path());
    assert_eq!(
        changed.reused, 0,
        "a different step size reused old results"
    );
    // Every result file is complete JSON (written atomically), none is a temp file.
    for entry in std::fs::read_dir(out.path().join("searches")).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(
            p.extension().and_then(|e| e.to_str()),
            Some("json"),
            "{}",
            p.display()
        );
        let _: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    }
}

#[test]
fn a_rerun_measures_the_optimised_masks_power_of_results_stored_without_it() {
    let model = formula_model();
    let test = small_test_set();
    let out = tempfile::tempdir().unwrap();
    let first = tiny_run(&model, &test, 0.02, out.path());
    for s in &first.searches {
        let p = s
            .soft_power
            .expect("a fresh search measures its mask's power");
        assert!((0.0..=1.0).contains(&p), "{p}");
    }
    // Results as an older version stored them: no soft power.
    let stored: Vec<_> = std::fs::read_dir(out.path().join("searches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let store = classwise::search::store::Store::at(out.path());
    for p in &stored {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
        let key = v["key"].as_str().unwrap();
        let mut r: classwise::search::SearchResult =
            serde_json::from_value(v["result"].clone()).unwrap();
        assert!(r.soft_power.take().is_some(), "{}", p.display());
        store.save(key, &r).unwrap();
        let text = std::fs::read_to_string(p).unwrap();
        assert!(!text.contains("soft_power"), "{}", p.display());
    }
    let again = tiny_run(&model, &test, 0.02, out.path());
    assert_eq!(again.reused, 3, "the searches themselves are not redone");
    for (a, b) in first.searches.iter().zip(&again.searches) {
        assert_eq!(a.soft_power, b.soft_power, "class {}", a.class);
    }
    assert_eq!(first.flagged, again.flagged);
    // ... and the store holds it again.
    for p in &stored {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(text.contains("soft_power"), "{}", p.display());
    }
}

#[test]
fn shards_in_separate_folders_merge_into_the_report_of_one_run() {
    use classwise::search::shard::merge;
    let model = formula_model();
    let test = small_test_set();
    let whole = tiny_run(&model, &test, 0.02, tempfile::tempdir().unwrap().path());

    // Three units dealt round-robin over two shards: units 0 and 2, then 1.
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let m0 = tiny_shard(&model, &test, "0/2", d0.path());
    assert_eq!((m0.stats.searched, m0.header.units.len()), (2, 3));
    let dirs = [d0.path().to_path_buf(), d1.path().to_path_buf()];
    let err = merge(&dirs).unwrap_err().to_string();
    assert!(
        err.contains("1 of 3 searches missing")
            && err.contains("shard 1/2")
            && err.contains("not run"),
        "{err}"
    );
    // Another machine, another memory budget: how searches share a pass
    // never changes a result, so this is still the same run.
    let mut cfg = tiny_cfg(&model, 0.02);
    cfg.max_images = cfg.mask.batch;
    let m1 = tiny_shard_with(&model, &test, &cfg, "1/2", d1.path());
    assert_eq!(m1.stats.searched, 1);

    let (merged, names) = merge(&dirs).unwrap();
    assert_eq!(names, test.class_names());
    assert_eq!(merged.searches.len(), whole.searches.len());
    for (a, b) in whole.searches.iter().zip(&merged.searches) {
        assert_eq!((a.class, &a.canvas.id), (b.class, &b.canvas.id));
        assert_same(&a.mask, &b.mask, "mask");
        assert_eq!(a.positions, b.positions);
        assert_eq!(a.power, b.power);
        assert_eq!(a.sweep, b.sweep);
        assert_eq!(a.min_k, b.min_k);
    }
    assert_eq!(merged.classes, whole.classes);
    assert_eq!(merged.verdict_mask, whole.verdict_mask);
    assert_eq!(merged.verdict_min_k, whole.verdict_min_k);
    assert_eq!(merged.flagged, whole.flagged);
    assert_eq!(merged.clean_accuracy, whole.clean_accuracy);
}

#[test]
fn shards_sharing_a_folder_leave_a_plain_rerun_nothing_to_do() {
    let model = formula_model();
    let test = small_test_set();
    let out = tempfile::tempdir().unwrap();
    for s in ["0/3", "1/3", "2/3"] {
        assert_eq!(
            tiny_shard(&model, &test, s, out.path()).stats.searched,
            1,
            "{s}"
        );
    }
    // A shard rerun finds its work done.
    assert_eq!(tiny_shard(&model, &test, "1/3", out.path()).stats.reused, 1);
    let (merged, _) = classwise::search::shard::merge(&[out.path().to_path_buf()]).unwrap();
    let again = tiny_run(&model, &test, 0.02, out.path());
    assert_eq!(again.reused, 3);
    assert_eq!(again.classes, merged.classes);
}

#[test]
fn shards_of_different_runs_are_not_merged() {
    let model = formula_model();
    let test = small_test_set();
    let (d0, d1) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    tiny_shard(&model, &test, "0/2", d0.path());
    // Same shard count, another step size: another run.
    tiny_shard_with(&model, &test, &tiny_cfg(&model, 0.05), "1/2", d1.path());
    let err = classwise::search::shard::merge(&[d0.path().to_path_buf(), d1.path().to_path_buf()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("different runs"), "{err}");
}

#[test]
fn a_learn_canvas_run_stores_the_learned_pixels_and_its_verdict_compares_them() {
    let model = formula_model();
    let test = small_test_set();
    let out = tempfile::tempdir().unwrap();
    let mut cfg = tiny_cfg(&model, 0.02);
    cfg.canvas = "auto:1+learn:0.5".into();
    cfg.mask.alpha = 1.0;
    let inputs = tiny_inputs(&model, &test);
    let report = classwise::search::run(&CpuBackend::REFERENCE, &inputs, &cfg, out.path()).unwrap();
    assert_eq!(report.searches.len(), 6);
    let learned: Vec<_> = report
        .searches
        .iter()
        .filter(|s| s.canvas.source == "learn")
        .collect();
    assert_eq!(learned.len(), 3);
    for s in &learned {
        let moved = s.canvas.pixels.iter().filter(|&&v| v != 0.5).count();
        assert!(
            moved > 0,
            "class {}: the stored canvas is the start",
            s.class
        );
    }
    assert_eq!(report.verdict_canvas, "learned");
    assert!(report.other_verdicts.iter().any(|(k, _)| k == "natural"));
    // A rerun reuses the stored results, learned pixels included.
    let again = classwise::search::run(&CpuBackend::REFERENCE, &inputs, &cfg, out.path()).unwrap();
    assert_eq!(again.reused, 6);
    for (a, b) in report.searches.iter().zip(&again.searches) {
        assert_eq!(a.canvas, b.canvas);
    }
}
