//! The mask averaged over the last epoch, which breaks the top-k ties of
//! the final mask, is the mean of the masks after each update of that
//! epoch: checked against a search stepped by hand.

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::data::{self, DataSpec, Split};
use classwise::device_model::DeviceModel;
use classwise::progress::Progress;
use classwise::search::checkpoint::Checkpoint;
use classwise::search::optimize::{batch_order, optimise, step, Job, MaskConfig};
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;

#[test]
fn the_last_epoch_average_is_the_mean_of_the_masks_after_each_update_of_the_last_epoch() {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let test = test.subset(&(0..200).collect::<Vec<_>>());
    let be = CpuBackend::REFERENCE;
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let params: Vec<_> = classwise::selftest::formula_params(&graph)
        .iter()
        .map(|t| be.upload(t).unwrap())
        .collect();
    let dm = DeviceModel::new(&be, &graph, params).unwrap();
    // A strong CE term, so pixels move both ways and the mask and its
    // average differ.
    let cfg = MaskConfig {
        epochs: 3,
        alpha: 1.0,
        beta: 0.01,
        ..MaskConfig::default()
    };
    let target = 2;
    let canvas = test
        .image((0..test.len()).find(|&i| test.label(i) == target).unwrap())
        .into_data();
    let images: Vec<usize> = (0..test.len())
        .filter(|&i| test.label(i) != target)
        .take(12)
        .collect();
    let job = Job {
        target,
        canvas: &canvas,
        images: &images,
        learn: false,
    };
    let mut bar = Progress::new("test", 1, true);
    let got = optimise(&dm, &test, &[job], &cfg, 4096, &mut bar, None).unwrap();

    // By hand: 3 epochs of 3 steps; sum the masks after steps 7, 8 and 9.
    let plane = 28 * 28;
    let per_epoch = images.len() / cfg.batch;
    let mut mask = vec![cfg.init; plane];
    let mut sum = vec![0.0f64; plane];
    for epoch in 0..cfg.epochs {
        let order = batch_order(&images, cfg.seed, target, epoch);
        for j in 0..per_epoch {
            let out = step(
                &dm,
                &Tensor::new(&[1, 1, 28, 28], canvas.clone()).unwrap(),
                &Tensor::new(&[1, 28, 28], mask.clone()).unwrap(),
                &test.batch(&order[j * cfg.batch..(j + 1) * cfg.batch]),
                &[target],
                &cfg,
                false,
            )
            .unwrap();
            mask = out.masks.into_data();
            if epoch + 1 == cfg.epochs {
                for (s, &m) in sum.iter_mut().zip(&mask) {
                    *s += m as f64;
                }
            }
        }
    }
    let mean: Vec<f32> = sum.iter().map(|&s| (s / per_epoch as f64) as f32).collect();

    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&got[0].mask), bits(&mask), "final mask");
    assert_eq!(bits(&got[0].mask_avg), bits(&mean), "last-epoch average");
    let differ = mask.iter().zip(&mean).filter(|(a, b)| a != b).count();
    assert!(differ > 0, "the average equals the final mask: no test");
}

#[test]
fn steps_restored_from_a_checkpoint_are_not_counted_as_run_so_the_throughput_is_not_overstated() {
    let spec: DataSpec = "fashion-mnist".parse().unwrap();
    let test = data::load(&spec, Split::Test, Some([1, 28, 28])).unwrap();
    let test = test.subset(&(0..100).collect::<Vec<_>>());
    let be = CpuBackend::REFERENCE;
    let graph = build(&ModelSpec::new("smallcnn", [1, 28, 28], 10)).unwrap();
    let dm =
        DeviceModel::upload(&be, &graph, &classwise::selftest::formula_params(&graph)).unwrap();
    let cfg = MaskConfig {
        epochs: 2,
        ..MaskConfig::default()
    };
    let target = 1;
    let canvas = test
        .image((0..test.len()).find(|&i| test.label(i) == target).unwrap())
        .into_data();
    let images: Vec<usize> = (0..test.len())
        .filter(|&i| test.label(i) != target)
        .take(8)
        .collect();
    let job = || Job {
        target,
        canvas: &canvas,
        images: &images,
        learn: false,
    };
    let out = tempfile::tempdir().unwrap();
    let every = std::time::Duration::from_secs(3600);
    let mut bar = Progress::new("test", 1, true);
    let mut ck = Checkpoint::new(out.path(), vec!["k".into()], every).unwrap();
    let first = optimise(&dm, &test, &[job()], &cfg, 4096, &mut bar, Some(&mut ck)).unwrap();
    assert_eq!(first[0].steps, 4);
    assert_eq!(first[0].steps_run, 4, "a fresh run ran every step");

    // The finished run left its checkpoint; a rerun restores all four steps.
    let mut ck = Checkpoint::new(out.path(), vec!["k".into()], every).unwrap();
    let again = optimise(&dm, &test, &[job()], &cfg, 4096, &mut bar, Some(&mut ck)).unwrap();
    assert_eq!(again[0].steps, 4);
    assert_eq!(again[0].steps_run, 0, "restored steps counted as run");
    assert_eq!(again[0].mask, first[0].mask);
}
