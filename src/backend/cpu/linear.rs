//! Fully connected layers: `y = x W^T + b` and its gradients.
//!
//! The forward and input-gradient products run one row at a time: gemm picks
//! its blocking (and so its summation order) from the matrix shape, so a
//! whole-batch product could round row `i` differently for different batch
//! sizes. A row-by-row product has one shape whatever the batch.

use rayon::prelude::*;

use super::{dims2, expect_shape, matmul, MatRef};
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
    let mut y = vec![0.0f32; n * o];
    if o > 0 {
        let wt = MatRef::row_major(w.data(), o, k).t();
        y.par_chunks_mut(o).enumerate().for_each(|(i, y_row)| {
            let x_row = MatRef::row_major(&x.data()[i * k..(i + 1) * k], 1, k);
            matmul(y_row, x_row, wt, false);
            if let Some(b) = bias {
                y_row.iter_mut().zip(b.data()).for_each(|(v, b)| *v += b);
            }
        });
    }
    Tensor::new(&[n, o], y)
}

/// Input gradient of [`linear`]: `dy [N,O] * w [O,K]`.
pub(super) fn linear_backward_data(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    let [n, o] = dims2("dy", dy.shape())?;
    let [wo, k] = dims2("w", w.shape())?;
    if wo != o {
        return Err(Error::shape("w", &[o, k], w.shape()));
    }
    let mut dx = vec![0.0f32; n * k];
    if k > 0 {
        let wm = MatRef::row_major(w.data(), o, k);
        dx.par_chunks_mut(k).enumerate().for_each(|(i, dx_row)| {
            let dy_row = MatRef::row_major(&dy.data()[i * o..(i + 1) * o], 1, o);
            matmul(dx_row, dy_row, wm, false);
        });
    }
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
