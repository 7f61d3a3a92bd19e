//! Per-channel normalisations: batch norm (eval and train, with backward)
//! and the model's input normalisation.
//!
//! Tensors are `[N, C, ...]`; everything after the channel axis is one
//! contiguous plane per (image, channel). Per-channel reductions run
//! sequentially inside each channel, in f64, one channel per task.

use std::ops::Range;

use rayon::prelude::*;

use super::expect_shape;
use crate::backend::BnSaved;
use crate::error::{Error, Result};
use crate::tensor::{numel, Tensor};

/// `(N, C, plane size)` of a tensor with at least two axes.
fn channel_dims(name: &str, shape: &[usize]) -> Result<(usize, usize, usize)> {
    if shape.len() < 2 {
        return Err(Error::tensor(
            name,
            format!("expected [N, C, ...], got shape {shape:?}"),
        ));
    }
    Ok((shape[0], shape[1], numel(&shape[2..])))
}

/// Calls `f(channel, range of the plane in the flat data, output plane)` for
/// every (image, channel) plane of `out`, in parallel.
fn for_each_plane(
    out: &mut [f32],
    c: usize,
    plane: usize,
    f: impl Fn(usize, Range<usize>, &mut [f32]) + Sync + Send,
) {
    if plane == 0 {
        return;
    }
    out.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, dst)| f(i % c, i * plane..(i + 1) * plane, dst));
}

/// `sum_i f(v_i)` over the values of channel `ch`, image by image, in f64.
fn channel_sum(
    data: &[f32],
    (n, c, plane): (usize, usize, usize),
    ch: usize,
    f: impl Fn(usize, f32) -> f64,
) -> f64 {
    let mut s = 0.0f64;
    for img in 0..n {
        let start = (img * c + ch) * plane;
        for (j, &v) in data[start..start + plane].iter().enumerate() {
            s += f(start + j, v);
        }
    }
    s
}

/// `1 / sqrt(var + eps)` of each channel, as eval-mode batch norm uses it.
fn eval_invstd(var: &Tensor, eps: f32) -> Vec<f32> {
    var.data().iter().map(|&v| 1.0 / (v + eps).sqrt()).collect()
}

/// Batch norm with running statistics.
pub(super) fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (_, c, plane) = channel_dims("x", x.shape())?;
    for (name, t) in [
        ("gamma", gamma),
        ("beta", beta),
        ("mean", mean),
        ("var", var),
    ] {
        expect_shape(name, t, &[c])?;
    }
    let scale: Vec<f32> = eval_invstd(var, eps)
        .iter()
        .zip(gamma.data())
        .map(|(s, g)| s * g)
        .collect();
    let mut y = vec![0.0f32; x.len()];
    for_each_plane(&mut y, c, plane, |ch, range, dst| {
        let (m, s, b) = (mean.data()[ch], scale[ch], beta.data()[ch]);
        for (d, &v) in dst.iter_mut().zip(&x.data()[range]) {
            *d = (v - m) * s + b;
        }
    });
    Tensor::new(x.shape(), y)
}

/// Input gradient of [`batch_norm_eval`]: `dy * gamma / sqrt(var + eps)`.
pub(super) fn batch_norm_eval_backward(
    dy: &Tensor,
    gamma: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (_, c, plane) = channel_dims("dy", dy.shape())?;
    expect_shape("gamma", gamma, &[c])?;
    expect_shape("var", var, &[c])?;
    let scale: Vec<f32> = eval_invstd(var, eps)
        .iter()
        .zip(gamma.data())
        .map(|(s, g)| s * g)
        .collect();
    let mut dx = vec![0.0f32; dy.len()];
    for_each_plane(&mut dx, c, plane, |ch, range, dst| {
        for (d, &g) in dst.iter_mut().zip(&dy.data()[range]) {
            *d = g * scale[ch];
        }
    });
    Tensor::new(dy.shape(), dx)
}

/// Batch norm with batch statistics; updates the running statistics with
/// `momentum` and the unbiased variance, as PyTorch does.
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    eps: f32,
) -> Result<(Tensor, BnSaved<Tensor>)> {
    let dims @ (n, c, plane) = channel_dims("x", x.shape())?;
    expect_shape("gamma", gamma, &[c])?;
    expect_shape("beta", beta, &[c])?;
    expect_shape("running_mean", running_mean, &[c])?;
    expect_shape("running_var", running_var, &[c])?;
    let count = n * plane;
    if count < 2 {
        return Err(Error::Msg(format!(
            "batch_norm_train: needs more than one value per channel, got input shape {:?}",
            x.shape()
        )));
    }
    // Two passes (mean, then squared deviations) in f64: accurate even when
    // the mean is large against the spread.
    let stats: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mean = channel_sum(x.data(), dims, ch, |_, v| v as f64) / count as f64;
            let var =
                channel_sum(x.data(), dims, ch, |_, v| (v as f64 - mean).powi(2)) / count as f64;
            (mean, var)
        })
        .collect();
    let mom = momentum as f64;
    let unbias = count as f64 / (count - 1) as f64;
    for (ch, &(mean, var)) in stats.iter().enumerate() {
        let rm = &mut running_mean.data_mut()[ch];
        *rm = ((1.0 - mom) * *rm as f64 + mom * mean) as f32;
        let rv = &mut running_var.data_mut()[ch];
        *rv = ((1.0 - mom) * *rv as f64 + mom * var * unbias) as f32;
    }
    let mean: Vec<f32> = stats.iter().map(|s| s.0 as f32).collect();
    let invstd: Vec<f32> = stats
        .iter()
        .map(|s| (1.0 / (s.1 + eps as f64).sqrt()) as f32)
        .collect();
    let mut y = vec![0.0f32; x.len()];
    for_each_plane(&mut y, c, plane, |ch, range, dst| {
        let (m, s, b) = (mean[ch], invstd[ch] * gamma.data()[ch], beta.data()[ch]);
        for (d, &v) in dst.iter_mut().zip(&x.data()[range]) {
            *d = (v - m) * s + b;
        }
    });
    let saved = BnSaved {
        mean: Tensor::new(&[c], mean)?,
        invstd: Tensor::new(&[c], invstd)?,
    };
    Ok((Tensor::new(x.shape(), y)?, saved))
}

/// Gradients of [`batch_norm_train`]: `(dx, dgamma, dbeta)`, with
/// `xhat = (x - mean) * invstd`, `dbeta = sum dy`, `dgamma = sum dy * xhat`
/// and `dx = gamma * invstd * (dy - dbeta/n - xhat * dgamma/n)`.
pub(super) fn batch_norm_train_backward(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims @ (n, c, plane) = channel_dims("x", x.shape())?;
    expect_shape("dy", dy, x.shape())?;
    expect_shape("gamma", gamma, &[c])?;
    expect_shape("saved mean", &saved.mean, &[c])?;
    expect_shape("saved invstd", &saved.invstd, &[c])?;
    let (mean, invstd) = (saved.mean.data(), saved.invstd.data());
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (m, s) = (mean[ch] as f64, invstd[ch] as f64);
            let sum_dy = channel_sum(dy.data(), dims, ch, |_, g| g as f64);
            let sum_dy_xhat = channel_sum(dy.data(), dims, ch, |i, g| {
                g as f64 * (x.data()[i] as f64 - m) * s
            });
            (sum_dy, sum_dy_xhat)
        })
        .collect();
    let count = (n * plane).max(1) as f64;
    let mut dx = vec![0.0f32; x.len()];
    for_each_plane(&mut dx, c, plane, |ch, range, dst| {
        let (m, s) = (mean[ch], invstd[ch]);
        let k = gamma.data()[ch] * s;
        let mean_dy = (sums[ch].0 / count) as f32;
        let mean_dy_xhat = (sums[ch].1 / count) as f32;
        for ((d, &g), &v) in dst
            .iter_mut()
            .zip(&dy.data()[range.clone()])
            .zip(&x.data()[range])
        {
            let xhat = (v - m) * s;
            *d = k * (g - mean_dy - xhat * mean_dy_xhat);
        }
    });
    let dgamma = sums.iter().map(|s| s.1 as f32).collect();
    let dbeta = sums.iter().map(|s| s.0 as f32).collect();
    Ok((
        Tensor::new(x.shape(), dx)?,
        Tensor::new(&[c], dgamma)?,
        Tensor::new(&[c], dbeta)?,
    ))
}

/// Checks a per-channel statistic has one value per channel (and, for a
/// divisor, no zeros).
fn check_channel_stat(name: &str, v: &[f32], c: usize, divisor: bool) -> Result<()> {
    if v.len() != c {
        return Err(Error::shape(name, &[c], &[v.len()]));
    }
    if divisor && v.contains(&0.0) {
        return Err(Error::tensor(name, "a standard deviation is zero"));
    }
    Ok(())
}

/// Per-channel input normalisation `(x - mean[c]) / std[c]`.
pub(super) fn normalize(x: &Tensor, mean: &[f32], std: &[f32]) -> Result<Tensor> {
    let (_, c, plane) = channel_dims("x", x.shape())?;
    check_channel_stat("mean", mean, c, false)?;
    check_channel_stat("std", std, c, true)?;
    let mut y = vec![0.0f32; x.len()];
    for_each_plane(&mut y, c, plane, |ch, range, dst| {
        for (d, &v) in dst.iter_mut().zip(&x.data()[range]) {
            *d = (v - mean[ch]) / std[ch];
        }
    });
    Tensor::new(x.shape(), y)
}

/// Input gradient of [`normalize`]: `dy / std[c]`.
pub(super) fn normalize_backward(dy: &Tensor, std: &[f32]) -> Result<Tensor> {
    let (_, c, plane) = channel_dims("dy", dy.shape())?;
    check_channel_stat("std", std, c, true)?;
    let mut dx = vec![0.0f32; dy.len()];
    for_each_plane(&mut dx, c, plane, |ch, range, dst| {
        for (d, &g) in dst.iter_mut().zip(&dy.data()[range]) {
            *d = g / std[ch];
        }
    });
    Tensor::new(dy.shape(), dx)
}
