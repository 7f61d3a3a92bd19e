//! The search ops: the composite of canvas and other-class images under a
//! mask, the mask and canvas (pattern) gradients reduced per search, and the
//! signed mask step.
//!
//! Search `s` owns images `s*B .. (s+1)*B`; nothing crosses searches, so S
//! searches batched together give the bits of S separate runs.

use rayon::prelude::*;

use super::{dims4, expect_shape, ELEMENTWISE_CHUNK};
use crate::backend::check::pattern_grad_dims;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// `(S, B, C, H*W)` of a search batch, checked: `canvas [S,C,H,W]`, `others`
/// (and anything shaped like it) `[S*B,C,H,W]`.
fn search_dims(canvas: &Tensor, others: &Tensor) -> Result<(usize, usize, usize, usize)> {
    let [s, c, h, w] = dims4("canvas", canvas.shape())?;
    let [n, oc, oh, ow] = dims4("others", others.shape())?;
    if s == 0 || c * h * w == 0 {
        return Err(Error::tensor(
            "canvas",
            format!(
                "needs at least one non-empty search image, got shape {:?}",
                canvas.shape()
            ),
        ));
    }
    if (oc, oh, ow) != (c, h, w) || n % s != 0 {
        let b = (n / s).max(1);
        return Err(Error::shape("others", &[s * b, c, h, w], others.shape()));
    }
    Ok((s, n / s, c, h * w))
}

/// `out[s*B+b] = mask[s] * canvas[s] + (1 - mask[s]) * others[s*B+b]`, the
/// `[S,H,W]` mask broadcast over channels.
pub(super) fn composite(canvas: &Tensor, mask: &Tensor, others: &Tensor) -> Result<Tensor> {
    let (s, b, c, hw) = search_dims(canvas, others)?;
    let [_, _, h, w] = dims4("canvas", canvas.shape())?;
    expect_shape("mask", mask, &[s, h, w])?;
    let mut out = vec![0.0f32; others.len()];
    if b > 0 {
        out.par_chunks_mut(c * hw)
            .zip(others.data().par_chunks(c * hw))
            .enumerate()
            .for_each(|(i, (out_i, other_i))| {
                let si = i / b;
                let m = &mask.data()[si * hw..(si + 1) * hw];
                let canvas_s = &canvas.data()[si * c * hw..(si + 1) * c * hw];
                for ((o, x), cv) in out_i
                    .chunks_exact_mut(hw)
                    .zip(other_i.chunks_exact(hw))
                    .zip(canvas_s.chunks_exact(hw))
                {
                    for (((o, &x), &cv), &m) in o.iter_mut().zip(x).zip(cv).zip(m) {
                        *o = m * cv + (1.0 - m) * x;
                    }
                }
            });
    }
    Tensor::new(others.shape(), out)
}

/// The mask gradient of each search, `[S,H,W]`:
/// `l1_grad + sum_{b,c} dx[s*B+b,c] * (canvas[s,c] - others[s*B+b,c])`.
///
/// The sum runs in f32, over `b` then `c` (image by image, channel by
/// channel), from zero; `l1_grad` is added last.
pub(super) fn mask_grad(
    dx: &Tensor,
    canvas: &Tensor,
    others: &Tensor,
    l1_grad: f32,
) -> Result<Tensor> {
    let (s, b, c, hw) = search_dims(canvas, others)?;
    expect_shape("dx", dx, others.shape())?;
    let [_, _, h, w] = dims4("canvas", canvas.shape())?;
    let mut grad = vec![0.0f32; s * hw];
    grad.par_chunks_mut(hw).enumerate().for_each(|(si, g)| {
        let canvas_s = &canvas.data()[si * c * hw..(si + 1) * c * hw];
        let images = si * b * c * hw..(si + 1) * b * c * hw;
        let dx_s = &dx.data()[images.clone()];
        let others_s = &others.data()[images];
        for (dx_i, other_i) in dx_s.chunks_exact(c * hw).zip(others_s.chunks_exact(c * hw)) {
            for ((d, x), cv) in dx_i
                .chunks_exact(hw)
                .zip(other_i.chunks_exact(hw))
                .zip(canvas_s.chunks_exact(hw))
            {
                for (((g, &d), &x), &cv) in g.iter_mut().zip(d).zip(x).zip(cv) {
                    *g += d * (cv - x);
                }
            }
        }
        g.iter_mut().for_each(|g| *g += l1_grad);
    });
    Tensor::new(&[s, h, w], grad)
}

/// The canvas gradient of each search, `[S,C,H,W]`:
/// `mask[s] * sum_b dx[s*B+b]`.
///
/// The sum runs in f32 over `b` (image by image) from zero, and is
/// multiplied by the mask once at the end.
pub(super) fn pattern_grad(dx: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (s, b, c, hw) = pattern_grad_dims(dx.shape(), mask.shape())?;
    let [_, _, h, w] = dims4("dx", dx.shape())?;
    let mut grad = vec![0.0f32; s * c * hw];
    grad.par_chunks_mut(c * hw).enumerate().for_each(|(si, g)| {
        let m = &mask.data()[si * hw..(si + 1) * hw];
        for dx_i in dx.data()[si * b * c * hw..(si + 1) * b * c * hw].chunks_exact(c * hw) {
            for (g, &d) in g.iter_mut().zip(dx_i) {
                *g += d;
            }
        }
        for g_c in g.chunks_exact_mut(hw) {
            for (g, &m) in g_c.iter_mut().zip(m) {
                *g *= m;
            }
        }
    });
    Tensor::new(&[s, c, h, w], grad)
}

/// `sign(g)` with `sign(0) = 0` (and 0 for NaN, so a NaN gradient leaves
/// the value where it is).
pub(super) fn sign(g: f32) -> f32 {
    if g > 0.0 {
        1.0
    } else if g < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Signed-gradient descent on the mask: `m = clamp(m - lr * sign(g), 0, 1)`,
/// in f64 and rounded once to f32, so the step is exactly the reference's.
pub(super) fn sign_step_clamp(mask: &mut Tensor, grad: &Tensor, lr: f64) -> Result<()> {
    expect_shape("grad", grad, mask.shape())?;
    mask.data_mut()
        .par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(grad.data().par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = (*m as f64 - lr * sign(g) as f64).clamp(0.0, 1.0) as f32;
            }
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    const S: usize = 3;
    const B: usize = 4;
    const C: usize = 3;
    const H: usize = 5;
    const W: usize = 6;

    struct Search {
        canvas: Tensor,
        mask: Tensor,
        others: Tensor,
        dx: Tensor,
    }

    fn data(seed: u64) -> Search {
        let mut g = rng(seed);
        Search {
            canvas: uniform(&mut g, &[S, C, H, W], 0.0, 1.0),
            mask: uniform(&mut g, &[S, H, W], 0.0, 1.0),
            others: uniform(&mut g, &[S * B, C, H, W], 0.0, 1.0),
            dx: uniform(&mut g, &[S * B, C, H, W], -1.0, 1.0),
        }
    }

    /// The composite by its definition, in f64.
    fn f64_composite(canvas: &[f64], mask: &[f64], others: &[f64]) -> Vec<f64> {
        let hw = H * W;
        (0..others.len())
            .map(|i| {
                let (img, c, p) = (i / (C * hw), (i / hw) % C, i % hw);
                let s = img / B;
                let m = mask[s * hw + p];
                m * canvas[(s * C + c) * hw + p] + (1.0 - m) * others[i]
            })
            .collect()
    }

    #[test]
    fn composite_blends_each_search_canvas_into_its_own_images() {
        let d = data(1);
        let out = composite(&d.canvas, &d.mask, &d.others).unwrap();
        let want = f64_composite(&f64s(&d.canvas), &f64s(&d.mask), &f64s(&d.others));
        assert_close("composite", out.data(), &want, 1e-7);
    }

    #[test]
    fn mask_gradient_matches_central_differences_of_the_search_loss() {
        // L(m) = sum(composite(m) * dx) + l1_grad * sum(m).
        let d = data(2);
        let l1 = 0.8 / (H * W) as f32 * 2.0;
        let grad = mask_grad(&d.dx, &d.canvas, &d.others, l1).unwrap();
        assert_eq!(grad.shape(), &[S, H, W]);
        let (cv, ot, r) = (f64s(&d.canvas), f64s(&d.others), f64s(&d.dx));
        let loss =
            |m: &[f64]| dot(&f64_composite(&cv, m, &ot), &r) + l1 as f64 * m.iter().sum::<f64>();
        let num = numeric_grad(&f64s(&d.mask), loss);
        assert_close("dmask", grad.data(), &num, 1e-5);
    }

    #[test]
    fn pattern_gradient_is_the_mask_times_the_sum_over_the_search_images() {
        // One search of two 1x1x2 images: dcanvas = m * (dx_0 + dx_1).
        let dx = Tensor::new(&[2, 1, 1, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let m = Tensor::new(&[1, 1, 2], vec![0.5, 0.25]).unwrap();
        let g = pattern_grad(&dx, &m).unwrap();
        assert_eq!(g.shape(), &[1, 1, 1, 2]);
        assert_eq!(g.data(), &[0.5 * (1.0 + 3.0), 0.25 * (2.0 + 4.0)]);
    }

    #[test]
    fn pattern_gradient_matches_central_differences_of_the_composite() {
        // L(canvas) = sum(composite(canvas) * dx).
        let d = data(6);
        let grad = pattern_grad(&d.dx, &d.mask).unwrap();
        assert_eq!(grad.shape(), &[S, C, H, W]);
        let (m, ot, r) = (f64s(&d.mask), f64s(&d.others), f64s(&d.dx));
        let loss = |cv: &[f64]| dot(&f64_composite(cv, &m, &ot), &r);
        let num = numeric_grad(&f64s(&d.canvas), loss);
        assert_close("dcanvas", grad.data(), &num, 1e-5);
    }

    #[test]
    fn searches_batched_together_give_the_bits_of_separate_runs() {
        let d = data(3);
        let (out, grad, stepped, pgrad) = with_threads(2, || {
            let mut m = d.mask.clone();
            let grad = mask_grad(&d.dx, &d.canvas, &d.others, 0.3).unwrap();
            sign_step_clamp(&mut m, &grad, 0.02).unwrap();
            let pgrad = pattern_grad(&d.dx, &d.mask).unwrap();
            (
                composite(&d.canvas, &d.mask, &d.others).unwrap(),
                grad,
                m,
                pgrad,
            )
        });
        for s in 0..S {
            let one = |t: &Tensor, per: usize| t.slice_rows(s * per, (s + 1) * per);
            let (cv, m, ot, dx) = (
                one(&d.canvas, 1),
                one(&d.mask, 1),
                one(&d.others, B),
                one(&d.dx, B),
            );
            let alone = composite(&cv, &m, &ot).unwrap();
            assert_bitwise("composite", alone.data(), one(&out, B).data());
            let g = mask_grad(&dx, &cv, &ot, 0.3).unwrap();
            assert_bitwise("mask_grad", g.data(), one(&grad, 1).data());
            let pg = pattern_grad(&dx, &m).unwrap();
            assert_bitwise("pattern_grad", pg.data(), one(&pgrad, 1).data());
            let mut m1 = m.clone();
            sign_step_clamp(&mut m1, &g, 0.02).unwrap();
            assert_bitwise("sign step", m1.data(), one(&stepped, 1).data());
        }
    }

    #[test]
    fn mask_ops_give_the_same_bits_on_any_number_of_threads() {
        let d = data(4);
        assert_thread_independent("mask ops", || {
            let out = composite(&d.canvas, &d.mask, &d.others).unwrap();
            let grad = mask_grad(&d.dx, &d.canvas, &d.others, 0.3).unwrap();
            let mut m = d.mask.clone();
            sign_step_clamp(&mut m, &grad, 0.02).unwrap();
            let pgrad = pattern_grad(&d.dx, &d.mask).unwrap();
            flat(&[&out, &grad, &m, &pgrad])
        });
    }

    #[test]
    fn sign_step_moves_against_the_gradient_with_sign_of_zero_zero_and_clamps() {
        let mut m = Tensor::new(&[1, 1, 5], vec![0.5, 0.5, 0.5, 0.01, 0.99]).unwrap();
        let g = Tensor::new(&[1, 1, 5], vec![3.0, -1e-9, 0.0, 2.0, -2.0]).unwrap();
        sign_step_clamp(&mut m, &g, 0.02).unwrap();
        let (down, up) = ((0.5f64 - 0.02) as f32, (0.5f64 + 0.02) as f32);
        assert_eq!(m.data(), &[down, up, 0.5, 0.0, 1.0]);
        assert!(sign_step_clamp(&mut m, &Tensor::zeros(&[1, 5]), 0.02).is_err());
    }

    #[test]
    fn mismatched_search_shapes_are_errors_not_panics() {
        let d = data(5);
        let bad_others = Tensor::zeros(&[S * B + 1, C, H, W]);
        assert!(composite(&d.canvas, &d.mask, &bad_others).is_err());
        assert!(composite(&d.canvas, &Tensor::zeros(&[S, H, W + 1]), &d.others).is_err());
        assert!(composite(&d.canvas, &d.mask, &Tensor::zeros(&[S * B, C + 1, H, W])).is_err());
        assert!(composite(&Tensor::zeros(&[0, C, H, W]), &d.mask, &d.others).is_err());
        let no_channels = Tensor::zeros(&[S, 0, H, W]);
        assert!(composite(&no_channels, &d.mask, &Tensor::zeros(&[S * B, 0, H, W])).is_err());
        assert!(mask_grad(
            &Tensor::zeros(&[S * B, 0, H, W]),
            &no_channels,
            &Tensor::zeros(&[S * B, 0, H, W]),
            0.0
        )
        .is_err());
        assert!(mask_grad(&bad_others, &d.canvas, &d.others, 0.0).is_err());
        assert!(mask_grad(&d.dx, &d.canvas, &bad_others, 0.0).is_err());
        assert!(pattern_grad(&bad_others, &d.mask).is_err());
        assert!(pattern_grad(&d.dx, &Tensor::zeros(&[S, H, W + 1])).is_err());
        assert!(pattern_grad(&d.dx, &Tensor::zeros(&[S, 1, H, W])).is_err());
        assert!(pattern_grad(&d.dx, &Tensor::zeros(&[0, H, W])).is_err());
        assert!(pattern_grad(&Tensor::zeros(&[S * B, C, H]), &d.mask).is_err());
    }
}
