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

/// The ReLU of one value: a NaN stays NaN, -0 becomes 0.
#[inline(always)]
pub(super) fn relu_value(v: f32) -> f32 {
    if v <= 0.0 {
        0.0
    } else {
        v
    }
}

/// `max(x, 0)`; a NaN stays NaN, as in PyTorch.
pub(super) fn relu(x: &Tensor) -> Result<Tensor> {
    let y = x
        .data()
        .par_iter()
        .with_min_len(ELEMENTWISE_CHUNK)
        .map(|&v| relu_value(v))
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

/// Copies `src` into `dst`, through [`relu_gate`] where a `gate` (the
/// ReLU's output beside `src`) is given: how backward-data reads `dY`.
#[inline(always)]
pub(super) fn copy_gated(dst: &mut [f32], src: &[f32], gate: Option<&[f32]>) {
    match gate {
        Some(gate) => {
            for ((d, &v), &y) in dst.iter_mut().zip(src).zip(gate) {
                *d = relu_gate(v, y);
            }
        }
        None => dst.copy_from_slice(src),
    }
}

/// `dy` where the ReLU's output `y` is positive, else 0.
pub(super) fn relu_backward(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    expect_shape("y", y, dy.shape())?;
    let dx = zip_map(dy.data(), y.data(), relu_gate);
    Tensor::new(dy.shape(), dx)
}

/// [`relu`] written over `x`: no new buffer (a fresh one costs page faults
/// or zeroing on top of the pass).
pub(super) fn relu_in_place(mut x: Tensor) -> Tensor {
    x.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v = relu_value(*v)));
    x
}

/// [`relu_backward`] written over `dy`.
pub(super) fn relu_backward_in_place(mut dy: Tensor, y: &Tensor) -> Result<Tensor> {
    expect_shape("y", y, dy.shape())?;
    dy.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(y.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(g, y)| {
            g.iter_mut()
                .zip(y)
                .for_each(|(g, &y)| *g = relu_gate(*g, y))
        });
    Ok(dy)
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
    fn relu_and_its_gradient_over_their_inputs_give_the_bits_of_the_copying_ops() {
        let mut g = rng(4);
        // Larger than one chunk, with -0, NaN and zeros among the values.
        let mut x = uniform(&mut g, &[3, 70000], -1.0, 1.0).data().to_vec();
        (x[0], x[1], x[2]) = (-0.0, f32::NAN, 0.0);
        let x = Tensor::new(&[3, 70000], x).unwrap();
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let y = relu(&x).unwrap();
        assert_eq!(bits(&relu_in_place(x.clone())), bits(&y));
        let dy = uniform(&mut g, x.shape(), -1.0, 1.0);
        let want = relu_backward(&dy, &y).unwrap();
        assert_eq!(
            bits(&relu_backward_in_place(dy.clone(), &y).unwrap()),
            bits(&want)
        );
        assert!(relu_backward_in_place(dy, &Tensor::zeros(&[3, 69999])).is_err());
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
