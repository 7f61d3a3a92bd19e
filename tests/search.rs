//! Properties of the batched search: deterministic, and a batched run of S
//! searches gives bit for bit the masks of S separate runs (however the
//! searches are chunked into forward passes).

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::data::{self, DataSpec, Dataset, Split};
use classwise::eval::DeviceModel;
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
    jobs: &[(usize, Vec<f32>, Vec<usize>)],
    max_images: usize,
    cfg: &MaskConfig,
    test: &Dataset,
) -> Vec<Optimised> {
    let be = CpuBackend;
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    // Formula weights (../shared/fixtures/README.md): a network whose CE
    // gradient is strong enough to move each pixel its own way.
    let params: Vec<_> = common::formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let jobs: Vec<Job<'_>> = jobs
        .iter()
        .map(|(t, c, imgs)| Job {
            target: *t,
            canvas: c,
            images: imgs,
        })
        .collect();
    let mut bar = Progress::new("test", 1, true);
    let dm = DeviceModel {
        be: &be,
        graph: &graph,
        params,
    };
    optimise(&dm, test, &jobs, cfg, max_images, &mut bar).unwrap()
}

fn jobs(test: &Dataset) -> Vec<(usize, Vec<f32>, Vec<usize>)> {
    // Three searches: two targets, one with two canvases; different set sizes.
    let of = |c: usize| -> Vec<usize> { (0..test.len()).filter(|&i| test.label(i) == c).collect() };
    let others = |t: usize, n: usize| -> Vec<usize> {
        (0..test.len())
            .filter(|&i| test.label(i) != t)
            .take(n)
            .collect()
    };
    vec![
        (3, test.image(of(3)[0]).into_data(), others(3, 16)),
        (3, test.image(of(3)[1]).into_data(), others(3, 16)),
        (7, test.image(of(7)[0]).into_data(), others(7, 24)),
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
    }
    // Chunked into one search per forward pass: still the same masks.
    let chunked = run(&all, 4, &cfg(), &test);
    for (x, y) in chunked.iter().zip(&batched) {
        assert_same(&x.mask, &y.mask, "chunked vs batched");
    }
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
