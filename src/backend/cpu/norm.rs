//! Per-channel normalisations: batch norm (eval and train, with backward)
//! and the model's input normalisation.
//!
//! Tensors are `[N, C, ...]`; everything after the channel axis is one
//! contiguous plane per (image, channel). Per-channel reductions run
//! sequentially inside each channel, in f64, one channel per task.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::elementwise::relu_value;
use super::expect_shape;
use crate::backend::check::channel_dims;
use crate::backend::BnSaved;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Calls `f(channel, range of the plane in the flat data, output plane)` for
/// every (image, channel) plane of `out`, in parallel.
fn for_each_plane<T: Send>(
    out: &mut [T],
    c: usize,
    plane: usize,
    f: impl Fn(usize, Range<usize>, &mut [T]) + Sync + Send,
) {
    if plane == 0 {
        return;
    }
    out.par_chunks_mut(plane)
        .enumerate()
        .for_each(|(i, dst)| f(i % c, i * plane..(i + 1) * plane, dst));
}

/// Accumulators of [`channel_sums`]: independent chains of f64 adds that
/// the CPU overlaps, where one chain would wait on each add's latency.
const LANES: usize = 8;

/// `sum_i f(i)` over the flat indices `i` of channel `ch`'s values, `K`
/// sums at once, in f64. Value `j` of each image's plane goes to lane
/// `j % LANES`, the lanes run over the images in order and are added in
/// order at the end: the order depends on the shape alone, never on the
/// thread count. Also the convolution's bias gradient.
pub(super) fn channel_sums<const K: usize>(
    (n, c, plane): (usize, usize, usize),
    ch: usize,
    f: impl Fn(usize) -> [f64; K],
) -> [f64; K] {
    let mut acc = [[0.0f64; K]; LANES];
    let full = plane / LANES * LANES;
    for img in 0..n {
        let start = (img * c + ch) * plane;
        for j0 in (start..start + full).step_by(LANES) {
            for (l, lane) in acc.iter_mut().enumerate() {
                let v = f(j0 + l);
                for (a, v) in lane.iter_mut().zip(v) {
                    *a += v;
                }
            }
        }
        for (lane, j) in acc.iter_mut().zip(start + full..start + plane) {
            for (a, v) in lane.iter_mut().zip(f(j)) {
                *a += v;
            }
        }
    }
    let mut sums = [0.0f64; K];
    for lane in &acc {
        for (s, a) in sums.iter_mut().zip(lane) {
            *s += a;
        }
    }
    sums
}

/// `1 / sqrt(var + eps)` of each channel, as eval-mode batch norm uses it.
fn eval_invstd(var: &Tensor, eps: f32) -> Vec<f32> {
    var.data().iter().map(|&v| 1.0 / (v + eps).sqrt()).collect()
}

/// Eval-mode batch norm folded into the convolution `w [O,C,KH,KW]`, `b [O]`
/// before it (see [`crate::backend::Backend::fold_bn`]); the scale is
/// rounded as [`batch_norm_eval`] rounds it.
#[allow(clippy::too_many_arguments)]
pub(super) fn fold_bn(
    w: &Tensor,
    b: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let [o, c, kh, kw] = crate::backend::check::dims4("w", w.shape())?;
    for (name, t) in [
        ("gamma", gamma),
        ("beta", beta),
        ("mean", mean),
        ("var", var),
    ] {
        expect_shape(name, t, &[o])?;
    }
    if let Some(b) = b {
        expect_shape("bias", b, &[o])?;
    }
    let scale: Vec<f32> = eval_invstd(var, eps)
        .iter()
        .zip(gamma.data())
        .map(|(s, g)| g * s)
        .collect();
    let per = c * kh * kw;
    let w2: Vec<f32> = w
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| v * scale[i / per])
        .collect();
    let b2: Vec<f32> = (0..o)
        .map(|k| (b.map_or(0.0, |b| b.data()[k]) - mean.data()[k]) * scale[k] + beta.data()[k])
        .collect();
    Ok((Tensor::new(w.shape(), w2)?, Tensor::new(&[o], b2)?))
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
/// `momentum` and the unbiased variance, as PyTorch does. With `relu`, the
/// output goes through a ReLU on its way out (the same bits as applying
/// one after, without a second pass over memory).
#[allow(clippy::too_many_arguments)]
pub(super) fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &mut Tensor,
    running_var: &mut Tensor,
    momentum: f32,
    eps: f32,
    relu: bool,
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
            let x = x.data();
            let [sum] = channel_sums(dims, ch, |i| [x[i] as f64]);
            let mean = sum / count as f64;
            let [sq] = channel_sums(dims, ch, |i| [(x[i] as f64 - mean).powi(2)]);
            let var = sq / count as f64;
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
    let normalise = |ch: usize, range: Range<usize>, dst: &mut [MaybeUninit<f32>]| {
        let (m, s, b) = (mean[ch], invstd[ch] * gamma.data()[ch], beta.data()[ch]);
        for (d, &v) in dst.iter_mut().zip(&x.data()[range]) {
            let y = (v - m) * s + b;
            d.write(if relu { relu_value(y) } else { y });
        }
    };
    // SAFETY: the planes cover `y`, and each plane's values are all
    // written (`dst` and the input plane have the same length).
    let y = unsafe { super::filled_by(x.len(), |y| for_each_plane(y, c, plane, normalise)) };
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
    batch_norm_train_backward_owned(dy.clone(), x, gamma, saved)
}

/// [`batch_norm_train_backward`] with `dx` written over `dy`: each value
/// of `dx` needs only the `dy` at its own place once the sums are taken, so
/// no second buffer (and no pass to clear one) is needed.
pub(super) fn batch_norm_train_backward_owned(
    mut dy: Tensor,
    x: &Tensor,
    gamma: &Tensor,
    saved: &BnSaved<Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims @ (n, c, plane) = channel_dims("x", x.shape())?;
    expect_shape("dy", &dy, x.shape())?;
    expect_shape("gamma", gamma, &[c])?;
    expect_shape("saved mean", &saved.mean, &[c])?;
    expect_shape("saved invstd", &saved.invstd, &[c])?;
    let (mean, invstd) = (saved.mean.data(), saved.invstd.data());
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (m, s) = (mean[ch] as f64, invstd[ch] as f64);
            let (dy, x) = (dy.data(), x.data());
            let [sum_dy, sum_dy_xhat] = channel_sums(dims, ch, |i| {
                let g = dy[i] as f64;
                [g, g * (x[i] as f64 - m) * s]
            });
            (sum_dy, sum_dy_xhat)
        })
        .collect();
    let count = (n * plane).max(1) as f64;
    for_each_plane(dy.data_mut(), c, plane, |ch, range, dst| {
        let (m, s) = (mean[ch], invstd[ch]);
        let k = gamma.data()[ch] * s;
        let mean_dy = (sums[ch].0 / count) as f32;
        let mean_dy_xhat = (sums[ch].1 / count) as f32;
        for (d, &v) in dst.iter_mut().zip(&x.data()[range]) {
            let xhat = (v - m) * s;
            *d = k * (*d - mean_dy - xhat * mean_dy_xhat);
        }
    });
    let dgamma = sums.iter().map(|s| s.1 as f32).collect();
    let dbeta = sums.iter().map(|s| s.0 as f32).collect();
    Ok((dy, Tensor::new(&[c], dgamma)?, Tensor::new(&[c], dbeta)?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    const EPS: f32 = 1e-5;

    /// `(N, C, plane)` of a shape.
    fn dims(shape: &[usize]) -> (usize, usize, usize) {
        (shape[0], shape[1], shape[2..].iter().product())
    }

    /// `y = (x - mean[c]) * scale[c] + shift[c]` in f64.
    fn f64_affine(
        x: &[f64],
        shape: &[usize],
        mean: &[f64],
        scale: &[f64],
        shift: &[f64],
    ) -> Vec<f64> {
        let (_, c, plane) = dims(shape);
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / plane) % c;
                (v - mean[ch]) * scale[ch] + shift[ch]
            })
            .collect()
    }

    /// Per-channel batch mean and biased variance in f64.
    fn f64_batch_stats(x: &[f64], shape: &[usize]) -> (Vec<f64>, Vec<f64>) {
        let (n, c, plane) = dims(shape);
        let count = (n * plane) as f64;
        let values = |ch: usize| {
            (0..n).flat_map(move |i| {
                x[(i * c + ch) * plane..(i * c + ch + 1) * plane]
                    .iter()
                    .copied()
            })
        };
        let mean: Vec<f64> = (0..c).map(|ch| values(ch).sum::<f64>() / count).collect();
        let var = (0..c)
            .map(|ch| values(ch).map(|v| (v - mean[ch]).powi(2)).sum::<f64>() / count)
            .collect();
        (mean, var)
    }

    /// Train-mode batch norm in f64.
    fn f64_bn_train(x: &[f64], shape: &[usize], gamma: &[f64], beta: &[f64]) -> Vec<f64> {
        let (mean, var) = f64_batch_stats(x, shape);
        let scale: Vec<f64> = var
            .iter()
            .zip(gamma)
            .map(|(v, g)| g / (v + EPS as f64).sqrt())
            .collect();
        f64_affine(x, shape, &mean, &scale, beta)
    }

    struct Bn {
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        mean: Tensor,
        var: Tensor,
        r: Tensor,
    }

    fn bn_data(shape: &[usize], seed: u64) -> Bn {
        let mut g = rng(seed);
        let c = shape[1];
        Bn {
            x: uniform(&mut g, shape, -1.0, 2.0),
            gamma: uniform(&mut g, &[c], 0.5, 1.5),
            beta: uniform(&mut g, &[c], -0.5, 0.5),
            mean: uniform(&mut g, &[c], -0.5, 0.5),
            var: uniform(&mut g, &[c], 0.5, 2.0),
            r: uniform(&mut g, shape, -1.0, 1.0),
        }
    }

    #[test]
    fn eval_forward_matches_f64_and_its_gradient_matches_central_differences() {
        let shape = [2, 3, 2, 3];
        let d = bn_data(&shape, 1);
        let y = batch_norm_eval(&d.x, &d.gamma, &d.beta, &d.mean, &d.var, EPS).unwrap();
        let (gamma, var) = (f64s(&d.gamma), f64s(&d.var));
        let scale: Vec<f64> = var
            .iter()
            .zip(&gamma)
            .map(|(v, g)| g / (v + EPS as f64).sqrt())
            .collect();
        let f = |x: &[f64]| f64_affine(x, &shape, &f64s(&d.mean), &scale, &f64s(&d.beta));
        assert_close("eval forward", y.data(), &f(&f64s(&d.x)), 1e-6);
        let dx = batch_norm_eval_backward(&d.r, &d.gamma, &d.var, EPS).unwrap();
        let num = numeric_grad(&f64s(&d.x), |x| dot(&f(x), &f64s(&d.r)));
        assert_close("eval dx", dx.data(), &num, 1e-4);
    }

    #[test]
    fn train_forward_with_its_relu_gives_the_bits_of_a_relu_after_it() {
        let d = bn_data(&[5, 4, 6, 7], 7);
        let run = |relu| {
            let (mut rm, mut rv) = (d.mean.clone(), d.var.clone());
            let (y, saved) =
                batch_norm_train(&d.x, &d.gamma, &d.beta, &mut rm, &mut rv, 0.1, EPS, relu)
                    .unwrap();
            (y, saved, rm, rv)
        };
        let (y, saved, rm, rv) = run(false);
        let (y_relu, saved_relu, rm_relu, rv_relu) = run(true);
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let after = super::super::elementwise::relu(&y).unwrap();
        assert!(y.data().iter().any(|&v| v < 0.0), "the ReLU must shut some");
        assert_eq!(bits(&y_relu), bits(&after));
        for (a, b) in [
            (&saved.mean, &saved_relu.mean),
            (&saved.invstd, &saved_relu.invstd),
            (&rm, &rm_relu),
            (&rv, &rv_relu),
        ] {
            assert_eq!(bits(a), bits(b));
        }
    }

    #[test]
    fn train_forward_matches_f64_and_dx_dgamma_dbeta_match_central_differences() {
        let shape = [3, 2, 2, 3];
        let d = bn_data(&shape, 2);
        let (mut rm, mut rv) = (d.mean.clone(), d.var.clone());
        let (y, saved) =
            batch_norm_train(&d.x, &d.gamma, &d.beta, &mut rm, &mut rv, 0.1, EPS, false).unwrap();
        let (xd, gd, bd, rd) = (f64s(&d.x), f64s(&d.gamma), f64s(&d.beta), f64s(&d.r));
        assert_close(
            "train forward",
            y.data(),
            &f64_bn_train(&xd, &shape, &gd, &bd),
            1e-5,
        );

        let (dx, dgamma, dbeta) = batch_norm_train_backward(&d.r, &d.x, &d.gamma, &saved).unwrap();
        let loss = |x: &[f64], g: &[f64], b: &[f64]| dot(&f64_bn_train(x, &shape, g, b), &rd);
        assert_close(
            "dx",
            dx.data(),
            &numeric_grad(&xd, |x| loss(x, &gd, &bd)),
            1e-4,
        );
        assert_close(
            "dgamma",
            dgamma.data(),
            &numeric_grad(&gd, |g| loss(&xd, g, &bd)),
            1e-4,
        );
        assert_close(
            "dbeta",
            dbeta.data(),
            &numeric_grad(&bd, |b| loss(&xd, &gd, b)),
            1e-4,
        );
    }

    #[test]
    fn train_updates_running_statistics_with_momentum_and_unbiased_variance() {
        // Channel 0 holds 1, 2 | 3, 4: mean 2.5, biased variance 1.25,
        // unbiased 5/3. Channel 1 holds 0, 0 | 0, 8: mean 2, biased 12,
        // unbiased 16.
        let x = Tensor::new(&[2, 2, 1, 2], vec![1., 2., 0., 0., 3., 4., 0., 8.]).unwrap();
        let ones = Tensor::full(&[2], 1.0);
        let zeros = Tensor::zeros(&[2]);
        let (rm0, rv0) = ([0.5, -1.0], [1.0, 2.0]);
        let mut rm = Tensor::new(&[2], rm0.to_vec()).unwrap();
        let mut rv = Tensor::new(&[2], rv0.to_vec()).unwrap();
        let (y, saved) =
            batch_norm_train(&x, &ones, &zeros, &mut rm, &mut rv, 0.1, EPS, false).unwrap();
        let blend = |old: f32, new: f64| 0.9 * old as f64 + 0.1 * new;
        let want_rm = [blend(rm0[0], 2.5), blend(rm0[1], 2.0)];
        let want_rv = [blend(rv0[0], 5.0 / 3.0), blend(rv0[1], 16.0)];
        assert_close("running mean", rm.data(), &want_rm, 1e-7);
        assert_close("running var", rv.data(), &want_rv, 1e-7);
        assert_close("saved mean", saved.mean.data(), &[2.5, 2.0], 1e-7);
        let invstd = [1.0 / (1.25f64 + 1e-5).sqrt(), 1.0 / (12.0f64 + 1e-5).sqrt()];
        assert_close("saved invstd", saved.invstd.data(), &invstd, 1e-6);
        assert_close("y[0]", &y.data()[..1], &[(1.0 - 2.5) * invstd[0]], 1e-6);
    }

    #[test]
    fn train_refuses_a_single_value_per_channel() {
        let x = Tensor::zeros(&[1, 3, 1, 1]);
        let c3 = Tensor::zeros(&[3]);
        let (mut rm, mut rv) = (c3.clone(), c3.clone());
        let Err(err) = batch_norm_train(&x, &c3, &c3, &mut rm, &mut rv, 0.1, EPS, false) else {
            panic!("a batch of one 1x1 image was accepted");
        };
        assert!(err.to_string().contains("more than one value"), "{err}");
    }

    #[test]
    fn normalize_matches_f64_and_its_gradient_matches_central_differences() {
        let shape = [2, 3, 2, 2];
        let mut g = rng(3);
        let x = uniform(&mut g, &shape, 0.0, 1.0);
        let r = uniform(&mut g, &shape, -1.0, 1.0);
        let (mean, std) = ([0.49f32, 0.48, 0.45], [0.25f32, 0.24, 0.26]);
        let f = |x: &[f64]| {
            let m: Vec<f64> = mean.iter().map(|&v| v as f64).collect();
            let s: Vec<f64> = std.iter().map(|&v| 1.0 / v as f64).collect();
            f64_affine(x, &shape, &m, &s, &[0.0; 3])
        };
        let y = normalize(&x, &mean, &std).unwrap();
        assert_close("normalize", y.data(), &f(&f64s(&x)), 1e-6);
        let dx = normalize_backward(&r, &std).unwrap();
        let num = numeric_grad(&f64s(&x), |x| dot(&f(x), &f64s(&r)));
        assert_close("normalize dx", dx.data(), &num, 1e-4);
    }

    #[test]
    fn eval_norm_and_normalize_are_batch_invariant() {
        let d = bn_data(&[7, 5, 6, 7], 4);
        let (mean, std) = ([0.1f32, 0.2, 0.3, 0.4, 0.5], [0.9f32, 0.8, 0.7, 0.6, 0.5]);
        assert_batch_invariant("bn eval", &d.x, |x| {
            batch_norm_eval(x, &d.gamma, &d.beta, &d.mean, &d.var, EPS).unwrap()
        });
        assert_batch_invariant("bn eval backward", &d.r, |r| {
            batch_norm_eval_backward(r, &d.gamma, &d.var, EPS).unwrap()
        });
        assert_batch_invariant("normalize", &d.x, |x| normalize(x, &mean, &std).unwrap());
        assert_batch_invariant("normalize backward", &d.r, |r| {
            normalize_backward(r, &std).unwrap()
        });
    }

    #[test]
    fn every_norm_op_gives_the_same_bits_on_any_number_of_threads() {
        let d = bn_data(&[9, 6, 7, 5], 5);
        assert_thread_independent("batch norm", || {
            let (mut rm, mut rv) = (d.mean.clone(), d.var.clone());
            let (y, saved) =
                batch_norm_train(&d.x, &d.gamma, &d.beta, &mut rm, &mut rv, 0.1, EPS, false)
                    .unwrap();
            let (dx, dg, db) = batch_norm_train_backward(&d.r, &d.x, &d.gamma, &saved).unwrap();
            let ye = batch_norm_eval(&d.x, &d.gamma, &d.beta, &d.mean, &d.var, EPS).unwrap();
            let dxe = batch_norm_eval_backward(&d.r, &d.gamma, &d.var, EPS).unwrap();
            flat(&[
                &y,
                &saved.mean,
                &saved.invstd,
                &rm,
                &rv,
                &dx,
                &dg,
                &db,
                &ye,
                &dxe,
            ])
        });
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let d = bn_data(&[2, 3, 2, 2], 6);
        let c2 = Tensor::zeros(&[2]);
        assert!(batch_norm_eval(&d.x, &c2, &d.beta, &d.mean, &d.var, EPS).is_err());
        assert!(batch_norm_eval(
            &Tensor::zeros(&[3]),
            &d.gamma,
            &d.beta,
            &d.mean,
            &d.var,
            EPS
        )
        .is_err());
        assert!(batch_norm_eval_backward(&d.r, &d.gamma, &c2, EPS).is_err());
        let (mut rm, mut rv) = (c2.clone(), d.var.clone());
        assert!(
            batch_norm_train(&d.x, &d.gamma, &d.beta, &mut rm, &mut rv, 0.1, EPS, false).is_err()
        );
        let (mut rm, mut rv) = (d.mean.clone(), d.var.clone());
        let (_, saved) =
            batch_norm_train(&d.x, &d.gamma, &d.beta, &mut rm, &mut rv, 0.1, EPS, false).unwrap();
        assert!(
            batch_norm_train_backward(&Tensor::zeros(&[2, 3, 2, 1]), &d.x, &d.gamma, &saved)
                .is_err()
        );
        assert!(normalize(&d.x, &[0.0; 2], &[1.0; 3]).is_err());
        assert!(normalize(&d.x, &[0.0; 3], &[1.0, 0.0, 1.0]).is_err());
        assert!(normalize_backward(&d.r, &[1.0; 4]).is_err());
    }
}
