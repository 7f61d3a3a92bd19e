//! Fully connected layers: `y = x W^T + b` and its gradients.
//!
//! The forward and input-gradient products are those of a 1x1 convolution
//! over 1x1 images (`conv::fully_connected`): packed filters and one
//! in-order chain per output, so a row gets the same bits in any batch. (A
//! gemm product picks its blocking, and so its summation order, from the
//! matrix shape; run row by row it re-read the weights once per row.)

use rayon::prelude::*;

use super::{conv, dims2, expect_shape, matmul, MatRef};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Output features per weight-gradient task: fixed, so the GEMM shapes do
/// not depend on the number of threads.
const WEIGHT_ROWS: usize = 16;

/// `x [N,K] * w[O,K]^T + bias [O]`.
pub(super) fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let [n, k] = dims2("x", x.shape())?;
    let [o, wk] = dims2("w", w.shape())?;
    if wk != k {
        return Err(Error::shape("w", &[o, k], w.shape()));
    }
    if let Some(b) = bias {
        expect_shape("bias", b, &[o])?;
    }
    let y = if n == 0 || o == 0 {
        vec![0.0f32; n * o]
    } else if k == 0 {
        // An empty sum: the bias alone.
        let b = bias.map_or(vec![0.0; o], |b| b.data().to_vec());
        b.repeat(n)
    } else {
        conv::fully_connected(x.data(), w.data(), bias.map(Tensor::data), [n, k, o])
    };
    Tensor::new(&[n, o], y)
}

/// Input gradient of [`linear`]: `dy [N,O] * w [O,K]`.
pub(super) fn linear_backward_data(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let [n, o] = dims2("dy", dy.shape())?;
    let [wo, k] = dims2("w", w.shape())?;
    if wo != o {
        return Err(Error::shape("w", &[o, k], w.shape()));
    }
    let dx = if n == 0 || k == 0 || o == 0 {
        vec![0.0f32; n * k]
    } else {
        conv::fully_connected_backward_data(dy.data(), w.data(), [n, k, o])
    };
    Tensor::new(&[n, k], dx)
}

/// Weight gradient `dy^T x` (`[O,K]`) and, when `with_bias`, the bias
/// gradient (the column sums of `dy`, in row order).
pub(super) fn linear_backward_weight(
    x: &Tensor,
    dy: &Tensor,
    with_bias: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let [n, k] = dims2("x", x.shape())?;
    let [dn, o] = dims2("dy", dy.shape())?;
    if dn != n {
        return Err(Error::shape("dy", &[n, o], dy.shape()));
    }
    let mut dw = vec![0.0f32; o * k];
    if k > 0 && n > 0 {
        let xm = MatRef::row_major(x.data(), n, k);
        dw.par_chunks_mut(WEIGHT_ROWS * k)
            .enumerate()
            .for_each(|(chunk, dw_rows)| {
                let o0 = chunk * WEIGHT_ROWS;
                let rows = dw_rows.len() / k;
                // dy^T restricted to features o0..o0+rows: element (j, i) is
                // dy[i, o0 + j].
                let dyt = MatRef {
                    data: &dy.data()[o0..],
                    rows,
                    cols: n,
                    rs: 1,
                    cs: o,
                };
                matmul(dw_rows, dyt, xm, false);
            });
    }
    let db = if with_bias {
        let sums: Vec<f32> = (0..o)
            .map(|j| (0..n).map(|i| dy.data()[i * o + j] as f64).sum::<f64>() as f32)
            .collect();
        Some(Tensor::new(&[o], sums)?)
    } else {
        None
    };
    Ok((Tensor::new(&[o, k], dw)?, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    /// `x w^T + b` in f64.
    fn f64_linear(x: &[f64], w: &[f64], b: &[f64], k: usize) -> Vec<f64> {
        let o = b.len();
        x.chunks(k)
            .flat_map(|row| (0..o).map(move |j| b[j] + dot(row, &w[j * k..(j + 1) * k])))
            .collect()
    }

    fn data(n: usize, k: usize, o: usize, seed: u64) -> (Tensor, Tensor, Tensor, Tensor) {
        let mut r = rng(seed);
        (
            uniform(&mut r, &[n, k], -1.0, 1.0),
            uniform(&mut r, &[o, k], -1.0, 1.0),
            uniform(&mut r, &[o], -1.0, 1.0),
            uniform(&mut r, &[n, o], -1.0, 1.0),
        )
    }

    #[test]
    fn forward_matches_f64_and_gradients_match_central_differences() {
        let (n, k, o) = (3, 7, 5);
        let (x, w, b, r) = data(n, k, o, 1);
        let (xd, wd, bd, rd) = (f64s(&x), f64s(&w), f64s(&b), f64s(&r));
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.shape(), &[n, o]);
        assert_close("forward", y.data(), &f64_linear(&xd, &wd, &bd, k), 1e-6);
        let no_bias = linear(&x, &w, None).unwrap();
        assert_close(
            "forward without bias",
            no_bias.data(),
            &f64_linear(&xd, &wd, &[0.0; 5], k),
            1e-6,
        );

        let dx = linear_backward_data(&r, &w).unwrap();
        let (dw, db) = linear_backward_weight(&x, &r, true).unwrap();
        let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&f64_linear(x, w, b, k), &rd);
        assert_close(
            "dx",
            dx.data(),
            &numeric_grad(&xd, |x| loss(x, &wd, &bd)),
            1e-4,
        );
        assert_close(
            "dw",
            dw.data(),
            &numeric_grad(&wd, |w| loss(&xd, w, &bd)),
            1e-4,
        );
        assert_close(
            "db",
            db.unwrap().data(),
            &numeric_grad(&bd, |b| loss(&xd, &wd, b)),
            1e-4,
        );
        assert!(linear_backward_weight(&x, &r, false).unwrap().1.is_none());
    }

    #[test]
    fn weight_gradient_of_a_large_layer_matches_f64() {
        // More features than one task's 16 rows, a batch larger than gemm's
        // tiles, to cover the chunked path.
        let (n, k, o) = (37, 70, 41);
        let (x, _, _, dy) = data(n, k, o, 2);
        let (dw, db) = linear_backward_weight(&x, &dy, true).unwrap();
        let (xd, dyd) = (f64s(&x), f64s(&dy));
        let want: Vec<f64> = (0..o * k)
            .map(|i| (0..n).map(|s| dyd[s * o + i / k] * xd[s * k + i % k]).sum())
            .collect();
        let want_db: Vec<f64> = (0..o)
            .map(|j| (0..n).map(|s| dyd[s * o + j]).sum())
            .collect();
        assert_close("dw", dw.data(), &want, 1e-5);
        assert_close("db", db.unwrap().data(), &want_db, 1e-5);
    }

    #[test]
    fn forward_and_backward_data_are_batch_invariant() {
        for (n, k, o) in [(37, 300, 70), (20, 3136, 256), (9, 512, 10)] {
            let (x, w, b, dy) = data(n, k, o, 3);
            assert_batch_invariant(&format!("forward {n}x{k}->{o}"), &x, |x| {
                linear(x, &w, Some(&b)).unwrap()
            });
            assert_batch_invariant(&format!("backward_data {n}x{k}->{o}"), &dy, |dy| {
                linear_backward_data(dy, &w).unwrap()
            });
        }
    }

    #[test]
    fn every_linear_op_gives_the_same_bits_on_any_number_of_threads() {
        let (x, w, b, dy) = data(37, 300, 70, 4);
        assert_thread_independent("linear", || {
            let y = linear(&x, &w, Some(&b)).unwrap();
            let dx = linear_backward_data(&dy, &w).unwrap();
            let (dw, db) = linear_backward_weight(&x, &dy, true).unwrap();
            flat(&[&y, &dx, &dw, &db.unwrap()])
        });
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let (x, w, b, dy) = data(3, 7, 5, 5);
        assert!(linear(&x, &Tensor::zeros(&[5, 6]), None).is_err());
        assert!(linear(&x, &w, Some(&Tensor::zeros(&[4]))).is_err());
        assert!(linear(&Tensor::zeros(&[3, 7, 1]), &w, Some(&b)).is_err());
        assert!(linear_backward_data(&dy, &Tensor::zeros(&[4, 7])).is_err());
        assert!(linear_backward_weight(&x, &Tensor::zeros(&[2, 5]), true).is_err());
        let empty = linear_backward_weight(&Tensor::zeros(&[0, 7]), &Tensor::zeros(&[0, 5]), true);
        assert_eq!(empty.unwrap().0.data(), Tensor::zeros(&[5, 7]).data());
    }
}
