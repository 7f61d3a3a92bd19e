//! The property the batched search rests on, end to end: through a whole
//! model (forward, loss, backward to the input) on the CPU backend, every
//! image's logits and input gradient are the same bits whether it runs
//! alone or inside a batch, and whatever the number of threads.

use classwise::backend::cpu::CpuBackend;
use classwise::backend::Backend;
use classwise::selftest::formula_params;
use classwise::zoo::{build, ModelSpec};
use classwise::Tensor;

/// Logits and input gradient of a per-sample CE loss (weight 1 per image,
/// so each image's gradient does not depend on the batch size).
fn step(arch: &str, input: [usize; 3], x: &Tensor, labels: &[usize]) -> (Tensor, Tensor) {
    let be = CpuBackend::REFERENCE;
    let graph = build(&ModelSpec::new(arch, input, 10)).unwrap();
    let params = formula_params(&graph);
    let n = x.shape()[0];
    let trace = graph.forward_trace(&be, &params, x.clone()).unwrap();
    let logits = trace.logits().clone();
    let (_, dlogits) = be
        .softmax_cross_entropy(&logits, labels, &vec![1.0; n])
        .unwrap();
    let dx = graph
        .backward(&be, &params, &trace, dlogits, false)
        .unwrap()
        .dx;
    (logits, dx)
}

fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.shape(), b.shape(), "{what}: shapes");
    if let Some(i) = (0..a.len()).find(|&i| a.data()[i].to_bits() != b.data()[i].to_bits()) {
        panic!(
            "{what}: differs at [{i}]: {} vs {}",
            a.data()[i],
            b.data()[i]
        );
    }
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
fn every_image_gets_the_same_bits_alone_in_a_batch_and_on_any_thread_count() {
    for (arch, input) in [
        ("smallcnn", [1, 28, 28]),
        ("resnet18", [3, 32, 32]),
        ("preact_resnet18", [3, 32, 32]),
    ] {
        let n = 3;
        let [c, h, w] = input;
        let x = Tensor::from_fn(&[n, c, h, w], |j| {
            0.5 + 0.45 * (0.917 * j as f64 + 0.3).sin() as f32
        });
        let labels: Vec<usize> = (0..n).map(|i| (3 * i + 1) % 10).collect();
        let (logits, dx) = pool(2).install(|| step(arch, input, &x, &labels));
        let (logits1, dx1) = pool(1).install(|| step(arch, input, &x, &labels));
        assert_same_bits(
            &format!("{arch}: logits, 1 vs 2 threads"),
            &logits,
            &logits1,
        );
        assert_same_bits(&format!("{arch}: dx, 1 vs 2 threads"), &dx, &dx1);
        for i in 0..n {
            let xi = x.slice_rows(i, i + 1);
            let (l, d) = pool(2).install(|| step(arch, input, &xi, &labels[i..=i]));
            let what = format!("{arch}: image {i} alone vs in a batch of {n}");
            assert_same_bits(&format!("{what}: logits"), &l, &logits.slice_rows(i, i + 1));
            assert_same_bits(&format!("{what}: dx"), &d, &dx.slice_rows(i, i + 1));
        }
    }
}
