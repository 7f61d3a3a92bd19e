//! Grouped and dilated 2-D convolution (depthwise when `groups` equals the
//! channel count) by direct loops: forward, backward-data and
//! backward-filter. The dense undilated case keeps the im2col + GEMM path of
//! `conv.rs`, which dispatches here for everything else.
//!
//! A depthwise filter has only `KH*KW` taps per output, so a GEMM per group
//! would be tiny; direct loops over each tap's valid output range cost the
//! same arithmetic without the column matrix. Every output value is
//! computed by one task in a fixed order (input channel, tap row, tap
//! column), so results are batch invariant and thread independent.

use rayon::prelude::*;

use super::conv::valid_outputs;
use crate::backend::check::ConvGeom;
use crate::error::Result;
use crate::tensor::Tensor;

/// The output positions `(lo..hi)` along one axis that tap `t` reaches
/// inside the input, and the input index of output `lo`.
fn tap_range(g: &ConvGeom, t: usize, len: usize, out: usize) -> (usize, usize, usize) {
    let off = t * g.dilation;
    let (lo, hi) = valid_outputs(off, g.pad, g.stride, len, out);
    (lo, hi, (lo * g.stride + off).saturating_sub(g.pad))
}

/// Forward of a grouped convolution: output channel `o` of group
/// `o / (O/groups)` sees that group's `C/groups` input channels. The
/// epilogue `relu?(. + bias + residual)` (in that order, `residual` of the
/// output's shape, already checked) is applied per plane while it is in
/// cache, as the GPU kernel does.
pub(super) fn forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    g: &ConvGeom,
) -> Result<Tensor> {
    let (cpg, opg) = (g.c_per_group(), g.o_per_group());
    let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
    let taps = g.kh * g.kw;
    let mut y = vec![0.0f32; g.n * g.o * plane_out];
    if plane_out > 0 {
        y.par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(idx, yp)| {
                let (img, o) = (idx / g.o, idx % g.o);
                let c0 = (o / opg) * cpg;
                for ci in 0..cpg {
                    let xp = &x.data()[(img * g.c + c0 + ci) * plane_in..][..plane_in];
                    let wf = &w.data()[(o * cpg + ci) * taps..][..taps];
                    for a in 0..g.kh {
                        let (h_lo, h_hi, ih0) = tap_range(g, a, g.h, g.oh);
                        for b in 0..g.kw {
                            let (w_lo, w_hi, iw0) = tap_range(g, b, g.w, g.ow);
                            if w_lo == w_hi {
                                continue;
                            }
                            let wv = wf[a * g.kw + b];
                            for (r, oh) in (h_lo..h_hi).enumerate() {
                                let row = &xp[(ih0 + r * g.stride) * g.w..][..g.w];
                                let dst = &mut yp[oh * g.ow + w_lo..oh * g.ow + w_hi];
                                for (d, v) in
                                    dst.iter_mut().zip(row[iw0..].iter().step_by(g.stride))
                                {
                                    *d += wv * *v;
                                }
                            }
                        }
                    }
                }
                let rp = residual.map(|r| &r.data()[idx * plane_out..][..plane_out]);
                super::conv::epilogue(yp, bias.map(|b| b.data()[o]), rp, relu);
            });
    }
    Tensor::new(&g.out_shape(), y)
}

/// Input gradient: each input plane gathers from the output channels of
/// its group, in channel order, then tap order.
pub(super) fn backward_data(dy: &Tensor, w: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let (cpg, opg) = (g.c_per_group(), g.o_per_group());
    let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
    let taps = g.kh * g.kw;
    let mut dx = vec![0.0f32; g.n * g.c * plane_in];
    if plane_in > 0 {
        dx.par_chunks_mut(plane_in)
            .enumerate()
            .for_each(|(idx, dxp)| {
                let (img, c) = (idx / g.c, idx % g.c);
                let (grp, cl) = (c / cpg, c % cpg);
                for o in grp * opg..(grp + 1) * opg {
                    let dyp = &dy.data()[(img * g.o + o) * plane_out..][..plane_out];
                    let wf = &w.data()[(o * cpg + cl) * taps..][..taps];
                    for a in 0..g.kh {
                        let (h_lo, h_hi, ih0) = tap_range(g, a, g.h, g.oh);
                        for b in 0..g.kw {
                            let (w_lo, w_hi, iw0) = tap_range(g, b, g.w, g.ow);
                            if w_lo == w_hi {
                                continue;
                            }
                            let wv = wf[a * g.kw + b];
                            for (r, oh) in (h_lo..h_hi).enumerate() {
                                let row = &mut dxp[(ih0 + r * g.stride) * g.w..][..g.w];
                                let src = &dyp[oh * g.ow + w_lo..oh * g.ow + w_hi];
                                for (d, v) in row[iw0..].iter_mut().step_by(g.stride).zip(src) {
                                    *d += wv * *v;
                                }
                            }
                        }
                    }
                }
            });
    }
    Tensor::new(&[g.n, g.c, g.h, g.w], dx)
}

/// Filter gradient: each filter value is one f64 sum over images and
/// output positions, in order, rounded once.
pub(super) fn backward_filter(x: &Tensor, dy: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    let (cpg, opg) = (g.c_per_group(), g.o_per_group());
    let (plane_in, plane_out) = (g.h * g.w, g.oh * g.ow);
    let taps = g.kh * g.kw;
    let mut dw = vec![0.0f32; g.o * cpg * taps];
    dw.par_chunks_mut(taps).enumerate().for_each(|(idx, dwf)| {
        let (o, cl) = (idx / cpg, idx % cpg);
        let c = (o / opg) * cpg + cl;
        for a in 0..g.kh {
            let (h_lo, h_hi, ih0) = tap_range(g, a, g.h, g.oh);
            for b in 0..g.kw {
                let (w_lo, w_hi, iw0) = tap_range(g, b, g.w, g.ow);
                let mut s = 0.0f64;
                if w_lo == w_hi {
                    dwf[a * g.kw + b] = 0.0;
                    continue;
                }
                for img in 0..g.n {
                    let xp = &x.data()[(img * g.c + c) * plane_in..][..plane_in];
                    let dyp = &dy.data()[(img * g.o + o) * plane_out..][..plane_out];
                    for (r, oh) in (h_lo..h_hi).enumerate() {
                        let row = &xp[(ih0 + r * g.stride) * g.w..][..g.w];
                        let src = &dyp[oh * g.ow + w_lo..oh * g.ow + w_hi];
                        for (v, d) in row[iw0..].iter().step_by(g.stride).zip(src) {
                            s += *v as f64 * *d as f64;
                        }
                    }
                }
                dwf[a * g.kw + b] = s as f32;
            }
        }
    });
    Tensor::new(&[g.o, cpg, g.kh, g.kw], dw)
}

#[cfg(test)]
mod tests {
    use super::super::conv::{conv2d, conv2d_backward_data, conv2d_backward_filter};
    use crate::backend::cpu::testutil::*;
    use crate::backend::ConvParams;
    use crate::tensor::Tensor;

    /// A grouped convolution case: input shape, output channels, kernel,
    /// stride, padding, groups, dilation.
    #[derive(Clone, Copy, Debug)]
    struct Case {
        x: [usize; 4],
        o: usize,
        k: [usize; 2],
        p: ConvParams,
    }

    fn case(x: [usize; 4], o: usize, k: [usize; 2], stride: usize, pad: usize) -> Case {
        Case {
            x,
            o,
            k,
            p: ConvParams::new(stride, pad),
        }
    }

    impl Case {
        fn g(self, groups: usize) -> Case {
            Case {
                p: self.p.with_groups(groups),
                ..self
            }
        }

        fn d(self, dilation: usize) -> Case {
            Case {
                p: self.p.with_dilation(dilation),
                ..self
            }
        }

        fn w_shape(&self) -> [usize; 4] {
            [self.o, self.x[1] / self.p.groups, self.k[0], self.k[1]]
        }

        fn y_shape(&self) -> [usize; 4] {
            [
                self.x[0],
                self.o,
                self.p.out_len(self.x[2], self.k[0]),
                self.p.out_len(self.x[3], self.k[1]),
            ]
        }

        /// Calls `f(x index, w index, y index)` for every product term, by
        /// PyTorch's definition of a grouped dilated convolution.
        fn for_each_term(&self, mut f: impl FnMut(usize, usize, usize)) {
            let [n, c, h, w] = self.x;
            let [o, cpg, kh, kw] = self.w_shape();
            let [_, _, oh, ow] = self.y_shape();
            let opg = o / self.p.groups;
            let (s, d, pad) = (self.p.stride, self.p.dilation, self.p.pad as isize);
            for i in 0..n {
                for oc in 0..o {
                    for cl in 0..cpg {
                        let ic = (oc / opg) * cpg + cl;
                        for yh in 0..oh {
                            for yw in 0..ow {
                                for a in 0..kh {
                                    for b in 0..kw {
                                        let ih = (yh * s + a * d) as isize - pad;
                                        let iw = (yw * s + b * d) as isize - pad;
                                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize
                                        {
                                            continue;
                                        }
                                        let xi = ((i * c + ic) * h + ih as usize) * w + iw as usize;
                                        let wi = ((oc * cpg + cl) * kh + a) * kw + b;
                                        let yi = ((i * o + oc) * oh + yh) * ow + yw;
                                        f(xi, wi, yi);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }

        fn naive_forward(&self, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
            let [_, o, oh, ow] = self.y_shape();
            let len: usize = self.y_shape().iter().product();
            let mut y: Vec<f64> = (0..len).map(|i| b[(i / (oh * ow)) % o]).collect();
            self.for_each_term(|xi, wi, yi| y[yi] += x[xi] * w[wi]);
            y
        }
    }

    /// Depthwise (3x3 stride 1 and 2, 5x5), depthwise with a channel
    /// multiplier, groups 2 and 4, dilation 2 and 3 with and without
    /// groups, non-square inputs and kernels, batch 1 and 3.
    fn cases() -> Vec<Case> {
        vec![
            case([2, 6, 7, 9], 6, [3, 3], 1, 1).g(6),
            case([3, 4, 9, 8], 4, [3, 3], 2, 1).g(4),
            case([1, 5, 11, 10], 5, [5, 5], 2, 2).g(5),
            case([2, 3, 6, 7], 6, [3, 3], 1, 1).g(3),
            case([2, 4, 7, 6], 6, [3, 2], 1, 0).g(2),
            case([1, 8, 8, 9], 12, [3, 3], 2, 1).g(4),
            case([2, 3, 9, 10], 4, [3, 3], 1, 2).d(2),
            case([1, 4, 11, 9], 4, [3, 3], 2, 3).d(3).g(4),
            case([2, 4, 10, 10], 6, [2, 3], 1, 1).d(2).g(2),
        ]
    }

    #[test]
    fn grouped_and_dilated_forward_and_gradients_match_central_differences() {
        for (k, c) in cases().into_iter().enumerate() {
            let mut r = rng(40 + k as u64);
            let x = uniform(&mut r, &c.x, -1.0, 1.0);
            let w = uniform(&mut r, &c.w_shape(), -1.0, 1.0);
            let b = uniform(&mut r, &[c.o], -1.0, 1.0);
            let dy = uniform(&mut r, &c.y_shape(), -1.0, 1.0);
            let (xd, wd, bd, dyd) = (f64s(&x), f64s(&w), f64s(&b), f64s(&dy));
            let what = format!("{c:?}");

            let y = conv2d(&x, &w, Some(&b), c.p).unwrap();
            assert_eq!(y.shape(), c.y_shape(), "{what}");
            assert_close(
                &format!("forward {what}"),
                y.data(),
                &c.naive_forward(&xd, &wd, &bd),
                2e-5,
            );
            let dx = conv2d_backward_data(&dy, &w, &c.x, c.p).unwrap();
            let (dw, db) = conv2d_backward_filter(&x, &dy, &c.w_shape(), c.p, true).unwrap();
            let num_dx = numeric_grad(&xd, |x| dot(&c.naive_forward(x, &wd, &bd), &dyd));
            let num_dw = numeric_grad(&wd, |w| dot(&c.naive_forward(&xd, w, &bd), &dyd));
            let num_db = numeric_grad(&bd, |b| dot(&c.naive_forward(&xd, &wd, b), &dyd));
            assert_close(&format!("dx {what}"), dx.data(), &num_dx, 1e-4);
            assert_close(&format!("dw {what}"), dw.data(), &num_dw, 1e-4);
            assert_close(&format!("db {what}"), db.unwrap().data(), &num_db, 1e-4);
        }
    }

    #[test]
    fn the_grouped_epilogue_is_bias_then_residual_then_relu_bit_for_bit() {
        use crate::backend::check::ConvGeom;
        use crate::backend::cpu::elementwise::{add, relu};
        let c = case([2, 6, 7, 9], 6, [3, 3], 1, 1).g(6);
        let mut r = rng(70);
        let x = uniform(&mut r, &c.x, -1.0, 1.0);
        let w = uniform(&mut r, &c.w_shape(), -1.0, 1.0);
        let b = uniform(&mut r, &[c.o], -1.0, 1.0);
        let res = uniform(&mut r, &c.y_shape(), -1.0, 1.0);
        let g = ConvGeom::new(&c.x, &c.w_shape(), c.p).unwrap();
        let plain = conv2d(&x, &w, Some(&b), c.p).unwrap();
        let with_res = add(&plain, &res).unwrap();
        for (residual, relu_on, want) in [
            (None, true, relu(&plain).unwrap()),
            (Some(&res), false, with_res.clone()),
            (Some(&res), true, relu(&with_res).unwrap()),
        ] {
            let got = super::forward(&x, &w, Some(&b), residual, relu_on, &g).unwrap();
            assert_bitwise(
                &format!("residual {} relu {relu_on}", residual.is_some()),
                got.data(),
                want.data(),
            );
        }
    }

    #[test]
    fn grouped_ops_are_batch_invariant_and_thread_independent() {
        let c = case([5, 6, 9, 8], 6, [3, 3], 2, 1).g(6);
        let d = case([5, 4, 9, 9], 8, [3, 3], 1, 2).d(2).g(2);
        for (k, c) in [c, d].into_iter().enumerate() {
            let mut r = rng(90 + k as u64);
            let x = uniform(&mut r, &c.x, -1.0, 1.0);
            let w = uniform(&mut r, &c.w_shape(), -1.0, 1.0);
            let dy = uniform(&mut r, &c.y_shape(), -1.0, 1.0);
            assert_batch_invariant(&format!("forward {c:?}"), &x, |x| {
                conv2d(x, &w, None, c.p).unwrap()
            });
            assert_batch_invariant(&format!("backward_data {c:?}"), &dy, |dy| {
                let mut xs = c.x;
                xs[0] = dy.shape()[0];
                conv2d_backward_data(dy, &w, &xs, c.p).unwrap()
            });
            assert_thread_independent(&format!("{c:?}"), || {
                let y = conv2d(&x, &w, None, c.p).unwrap();
                let dx = conv2d_backward_data(&dy, &w, &c.x, c.p).unwrap();
                let (dw, db) = conv2d_backward_filter(&x, &dy, &c.w_shape(), c.p, true).unwrap();
                flat(&[&y, &dx, &dw, &db.unwrap()])
            });
        }
    }

    #[test]
    fn groups_that_do_not_divide_the_channels_are_clear_errors() {
        let x = Tensor::zeros(&[1, 6, 5, 5]);
        let p = ConvParams::new(1, 1);
        // 6 channels in 4 groups.
        let e = conv2d(&x, &Tensor::zeros(&[4, 1, 3, 3]), None, p.with_groups(4))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4 groups") && e.contains("6 input channels"),
            "{e}"
        );
        // 6 channels in 3 groups, but 4 outputs.
        let e = conv2d(&x, &Tensor::zeros(&[4, 2, 3, 3]), None, p.with_groups(3))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 output channels"), "{e}");
        // Depthwise filter must be [O, 1, k, k].
        let e = conv2d(&x, &Tensor::zeros(&[6, 6, 3, 3]), None, p.with_groups(6))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[6, 1, 3, 3]"), "{e}");
        // Zero groups or dilation.
        assert!(conv2d(&x, &Tensor::zeros(&[6, 6, 3, 3]), None, p.with_groups(0)).is_err());
        assert!(conv2d(&x, &Tensor::zeros(&[6, 6, 3, 3]), None, p.with_dilation(0)).is_err());
        // A dilated 3x3 spans 7 pixels: more than 5 + 2*1.
        let e = conv2d(&x, &Tensor::zeros(&[6, 6, 3, 3]), None, p.with_dilation(4))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dilation 4"), "{e}");
    }
}
