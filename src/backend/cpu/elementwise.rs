//! Elementwise ops: ReLU and its gradient, sums.

use rayon::prelude::*;

use super::{expect_shape, ELEMENTWISE_CHUNK};
use crate::error::Result;
use crate::tensor::Tensor;

/// `out[i] = f(a[i], b[i])` in parallel chunks, collected straight into
/// the output (zeroing it first would cost a pass of its own).
fn zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    a.par_iter()
        .zip(b)
        .with_min_len(ELEMENTWISE_CHUNK)
        .map(|(&a, &b)| f(a, b))
        .collect()
}

/// `max(x, 0)`; a NaN stays NaN, as in PyTorch.
pub(super) fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x
        .data()
        .par_iter()
        .with_min_len(ELEMENTWISE_CHUNK)
        .map(|&v| if v <= 0.0 { 0.0 } else { v })
        .collect();
    Tensor::new(x.shape(), y)
}

/// The ReLU's gradient at one element: `g` where its output `y` is
/// positive, else 0 (a NaN output passes nothing). Also applied by the
/// backward-data paths that take the ReLU's gate as they read `dY`.
#[inline(always)]
pub(super) fn relu_gate(g: f32, y: f32) -> f32 {
    if y > 0.0 {
        g
    } else {
        0.0
    }
}

/// `dy` where the ReLU's output `y` is positive, else 0.
pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    expect_shape("y", y, dy.shape())?;
    let dx = zip_map(dy.data(), y.data(), relu_gate);
    Tensor::new(dy.shape(), dx)
}

/// `a + b`, same shapes.
pub(super) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    expect_shape("b", b, a.shape())?;
    Tensor::new(a.shape(), zip_map(a.data(), b.data(), |x, y| x + y))
}

/// `a += b`, same shapes.
pub(super) fn add_assign(a: &mut Tensor, b: &Tensor) -> Result<()> {
    expect_shape("b", b, a.shape())?;
    a.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(b.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    #[test]
    fn relu_clips_negatives_and_keeps_nan() {
        let x = Tensor::new(&[5], vec![-2.0, -0.0, 0.5, 3.0, f32::NAN]).unwrap();
        let y = relu(&x).unwrap();
        assert_eq!(&y.data()[..4], &[0.0, 0.0, 0.5, 3.0]);
        assert!(y.data()[4].is_nan());
    }

    #[test]
    fn relu_gradient_matches_central_differences() {
        let mut g = rng(1);
        // Values at least 0.01 from zero: no kink within a step.
        let x = distinct(&mut g, &[2, 3, 4, 5], 0.01)
            .reshape(&[2, 3, 4, 5])
            .unwrap();
        let x = Tensor::from_fn(x.shape(), |i| {
            let v = x.data()[i];
            v + 0.005f32.copysign(v)
        });
        let r = uniform(&mut g, x.shape(), -1.0, 1.0);
        let y = relu(&x).unwrap();
        let dx = relu_backward(&r, &y).unwrap();
        let f = |x: &[f64]| x.iter().map(|v| v.max(0.0)).collect::<Vec<_>>();
        assert_close("relu", y.data(), &f(&f64s(&x)), 0.0);
        let num = numeric_grad(&f64s(&x), |x| dot(&f(x), &f64s(&r)));
        assert_close("relu dx", dx.data(), &num, 1e-6);
    }

    #[test]
    fn add_and_add_assign_sum_elementwise_and_check_shapes() {
        let mut g = rng(2);
        let a = uniform(&mut g, &[3, 70000], -1.0, 1.0);
        let b = uniform(&mut g, &[3, 70000], -1.0, 1.0);
        let want: Vec<f32> = a.data().iter().zip(b.data()).map(|(x, y)| x + y).collect();
        assert_bitwise("add", add(&a, &b).unwrap().data(), &want);
        let mut acc = a.clone();
        add_assign(&mut acc, &b).unwrap();
        assert_bitwise("add_assign", acc.data(), &want);
        let other = Tensor::zeros(&[70000, 3]);
        assert!(add(&a, &other).is_err());
        assert!(add_assign(&mut acc, &other).is_err());
        assert!(relu_backward(&a, &other).is_err());
    }

    #[test]
    fn elementwise_ops_are_batch_invariant() {
        let mut g = rng(3);
        let x = uniform(&mut g, &[5, 3, 40, 41], -1.0, 1.0);
        let other = uniform(&mut g, &[5, 3, 40, 41], -1.0, 1.0);
        assert_batch_invariant("relu", &x, |x| relu(x).unwrap());
        // The second operand must be the same images: pair them up by index.
        let pairs = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let batch = f(&x, &other);
            for i in 0..5 {
                let alone = f(&x.slice_rows(i, i + 1), &other.slice_rows(i, i + 1));
                assert_bitwise("pair op", alone.data(), batch.slice_rows(i, i + 1).data());
            }
        };
        pairs(&|a, b| add(a, b).unwrap());
        pairs(&|dy, y| relu_backward(dy, &relu(y).unwrap()).unwrap());
    }
}
