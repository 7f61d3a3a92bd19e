//! The op families of the activations, products, concatenation and
//! padding (activation.cu, scale.cu, layout.cu), GPU against the CPU
//! reference. Everything but the transcendental activations and the
//! broadcast gradient's f64 sums performs the same f32 operations in the
//! same order on both sides (the kernels keep products unfused), so it is
//! held to identical bits.

use super::{abs, Suite, U};
use crate::backend::gpu::Driver;
use crate::backend::{Activation, Backend, Pad2d};
use crate::error::Result;
use crate::tensor::Tensor;

/// Every activation, with the parameters of its common uses.
const ACTIVATIONS: &[Activation] = &[
    Activation::Sigmoid,
    Activation::Silu,
    Activation::HardSigmoid {
        alpha: 0.2,
        beta: 0.5,
    },
    Activation::HardSigmoid {
        alpha: 1.0 / 6.0,
        beta: 0.5,
    },
    Activation::HardSwish,
    Activation::Clip { min: 0.0, max: 6.0 },
    Activation::Clip {
        min: -1.0,
        max: f32::INFINITY,
    },
    Activation::LeakyRelu { alpha: 0.01 },
];

/// Values exactly at the kinks of [`ACTIVATIONS`].
const KINKS: &[f32] = &[-3.0, 3.0, 0.0, -0.0, -2.5, 2.5, 6.0, -1.0, 1.0];

fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-(x as f64)).exp())
}

impl<D: Driver> Suite<'_, D> {
    pub(super) fn activation(&mut self) -> Result<()> {
        for shape in [vec![1usize], vec![7], vec![2, 3, 5, 5], vec![4, 1031]] {
            let mut x = self.rand(&shape, -8.0, 8.0);
            for (v, &k) in x.data_mut().iter_mut().zip(KINKS) {
                *v = k;
            }
            let dy = self.rand(&shape, -1.0, 1.0);
            let (gx, gdy) = (self.up(&x)?, self.up(&dy)?);
            for &act in ACTIVATIONS {
                let tag = format!("{act:?}");
                let xs = x.data();
                let ds = dy.data();
                // expf differs between libraries by a few ulps: bounds of a
                // few ulps of the result (forward) and of |dy| * s * (1 + |x|)
                // (backward, which bounds every term of the gradient).
                let smooth = matches!(act, Activation::Sigmoid | Activation::Silu);
                let s = |i: usize| sigmoid(xs[i]);
                let m = |i: usize| {
                    if act == Activation::Silu {
                        xs[i].abs() as f64
                    } else {
                        1.0
                    }
                };
                let fwd = |i: usize| {
                    if smooth {
                        16.0 * U * s(i) * m(i)
                    } else {
                        0.0
                    }
                };
                let bwd = |i: usize| {
                    if smooth {
                        32.0 * U * ds[i].abs() as f64 * s(i) * (1.0 + xs[i].abs() as f64)
                    } else {
                        0.0
                    }
                };
                let want = self.cpu.activation(&x, act)?;
                let got = self.down(&self.gpu.activation(&gx, act)?)?;
                self.cmp(&format!("activation {tag}"), &got, &want, fwd);
                let want = self.cpu.activation_backward(&dy, &x, act)?;
                let got = self.down(&self.gpu.activation_backward(&gdy, &gx, act)?)?;
                self.cmp(&format!("activation_backward {tag}"), &got, &want, bwd);
            }
        }
        // NaN passes through every activation, as on the CPU.
        let x = Tensor::new(&[3], vec![f32::NAN, -1.0, 2.0])?;
        for &act in ACTIVATIONS {
            let want = self.cpu.activation(&x, act)?;
            let got = self.down(&self.gpu.activation(&self.up(&x)?, act)?)?;
            self.cmp(&format!("activation of NaN {act:?}"), &got, &want, |i| {
                if i == 0 {
                    0.0
                } else {
                    16.0 * U
                }
            });
        }
        let bad = Activation::Clip { min: 1.0, max: 0.0 };
        let gx = self.up(&x)?;
        self.property(
            "activation with min > max refused by both",
            self.cpu.activation(&x, bad).is_err() && self.gpu.activation(&gx, bad).is_err(),
        );
        Ok(())
    }

    pub(super) fn mul(&mut self) -> Result<()> {
        for (sa, sb) in [
            (vec![2usize, 3, 5, 7], vec![2usize, 3, 5, 7]),
            (vec![2, 3, 5, 7], vec![2, 3, 1, 1]),
            (vec![3, 70, 4, 4], vec![3, 70]),
            (vec![2, 5, 1, 1], vec![2, 5]),
            (vec![4, 9], vec![4, 9]),
            (vec![1, 2, 33, 17], vec![1, 2, 1, 1]),
        ] {
            let a = self.rand(&sa, -2.0, 2.0);
            let b = self.rand(&sb, -2.0, 2.0);
            let dy = self.rand(&sa, -1.0, 1.0);
            let (ga, gb, gdy) = (self.up(&a)?, self.up(&b)?, self.up(&dy)?);
            let tag = format!("{sb:?}");
            let want = self.cpu.mul(&a, &b)?;
            self.cmp(
                &format!("mul by {tag}"),
                &self.down(&self.gpu.mul(&ga, &gb)?)?,
                &want,
                |_| 0.0,
            );
            let (wa, wb) = self.cpu.mul_backward(&dy, &a, &b)?;
            let (da, db) = self.gpu.mul_backward(&gdy, &ga, &gb)?;
            self.cmp(
                &format!("mul_backward da by {tag}"),
                &self.down(&da)?,
                &wa,
                |_| 0.0,
            );
            // f64 sums in another order, each rounded once to f32.
            let (_, absb) = self.cpu.mul_backward(&abs(&dy), &abs(&a), &abs(&b))?;
            self.cmp(
                &format!("mul_backward db by {tag}"),
                &self.down(&db)?,
                &wb,
                |i| 4.0 * U * absb.data()[i] as f64,
            );
        }
        let (a, b) = (Tensor::zeros(&[2, 3, 4, 4]), Tensor::zeros(&[2, 3, 4, 1]));
        let (ga, gb) = (self.up(&a)?, self.up(&b)?);
        self.property(
            "mul by a [N, C, H, 1] refused by both",
            self.cpu.mul(&a, &b).is_err() && self.gpu.mul(&ga, &gb).is_err(),
        );
        Ok(())
    }

    pub(super) fn affine(&mut self) -> Result<()> {
        for shape in [vec![2usize, 3, 4, 5], vec![1, 70, 3, 3], vec![5, 4]] {
            let c = shape[1];
            let x = self.rand(&shape, -3.0, 3.0);
            let gx = self.up(&x)?;
            let scale = self.rand(&[c], -2.0, 2.0).into_data();
            let shift = self.rand(&[c], -1.0, 1.0).into_data();
            for (s, b, tag) in [
                (&scale[..], &shift[..], "per channel"),
                (&[0.5f32][..], &shift[..], "one scale"),
                (&scale[..], &[-3.0f32][..], "one shift"),
            ] {
                let want = self.cpu.affine(&x, s, b)?;
                self.cmp(
                    &format!("affine {tag}"),
                    &self.down(&self.gpu.affine(&gx, s, b)?)?,
                    &want,
                    |_| 0.0,
                );
                let want = self.cpu.affine_backward(&x, s)?;
                self.cmp(
                    &format!("affine_backward {tag}"),
                    &self.down(&self.gpu.affine_backward(&gx, s)?)?,
                    &want,
                    |_| 0.0,
                );
            }
        }
        let x = Tensor::zeros(&[2, 3, 2, 2]);
        let gx = self.up(&x)?;
        self.property(
            "affine with 2 scales for 3 channels refused by both",
            self.cpu.affine(&x, &[1.0, 2.0], &[0.0]).is_err()
                && self.gpu.affine(&gx, &[1.0, 2.0], &[0.0]).is_err(),
        );
        self.property(
            "affine with a NaN shift refused by both",
            self.cpu.affine(&x, &[1.0], &[f32::NAN]).is_err()
                && self.gpu.affine(&gx, &[1.0], &[f32::NAN]).is_err(),
        );
        Ok(())
    }

    pub(super) fn concat(&mut self) -> Result<()> {
        for shapes in [
            vec![vec![2usize, 3, 5, 7], vec![2, 1, 5, 7], vec![2, 4, 5, 7]],
            vec![vec![1, 16, 8, 8], vec![1, 16, 8, 8]],
            vec![vec![3, 2], vec![3, 5]],
        ] {
            let xs: Vec<Tensor> = shapes.iter().map(|s| self.rand(s, -1.0, 1.0)).collect();
            let gxs = xs.iter().map(|x| self.up(x)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = xs.iter().collect();
            let grefs: Vec<_> = gxs.iter().collect();
            let want = self.cpu.concat(&refs)?;
            let got = self.gpu.concat(&grefs)?;
            self.cmp("concat", &self.down(&got)?, &want, |_| 0.0);
            let channels: Vec<usize> = shapes.iter().map(|s| s[1]).collect();
            let dy = self.rand(want.shape(), -1.0, 1.0);
            let wparts = self.cpu.concat_backward(&dy, &channels)?;
            let gparts = self.gpu.concat_backward(&self.up(&dy)?, &channels)?;
            self.property(
                &format!("concat_backward gives {} parts", channels.len()),
                gparts.len() == channels.len(),
            );
            for (w, g) in wparts.iter().zip(&gparts) {
                self.cmp("concat_backward part", &self.down(g)?, w, |_| 0.0);
            }
        }
        let (a, b) = (Tensor::zeros(&[2, 3, 4, 4]), Tensor::zeros(&[2, 3, 4, 5]));
        let (ga, gb) = (self.up(&a)?, self.up(&b)?);
        self.property(
            "concat of different planes refused by both",
            self.cpu.concat(&[&a, &b]).is_err() && self.gpu.concat(&[&ga, &gb]).is_err(),
        );
        self.property(
            "concat of one input refused by both",
            self.cpu.concat(&[&a]).is_err() && self.gpu.concat(&[&ga]).is_err(),
        );
        Ok(())
    }

    pub(super) fn pad(&mut self) -> Result<()> {
        let pd = |top, bottom, left, right| Pad2d {
            top,
            bottom,
            left,
            right,
        };
        for (shape, p) in [
            ([2usize, 3, 5, 7], pd(1, 1, 1, 1)),
            ([1, 2, 4, 4], pd(0, 1, 0, 1)),
            ([2, 1, 3, 6], pd(2, 0, 3, 0)),
            ([1, 4, 6, 5], pd(0, 0, 0, 0)),
        ] {
            let x = self.rand(&shape, -1.0, 1.0);
            let want = self.cpu.pad2d(&x, p)?;
            let tag = format!("{p:?}");
            self.cmp(
                &format!("pad2d {tag}"),
                &self.down(&self.gpu.pad2d(&self.up(&x)?, p)?)?,
                &want,
                |_| 0.0,
            );
            let dy = self.rand(want.shape(), -1.0, 1.0);
            let want = self.cpu.pad2d_backward(&dy, p)?;
            self.cmp(
                &format!("pad2d_backward {tag}"),
                &self.down(&self.gpu.pad2d_backward(&self.up(&dy)?, p)?)?,
                &want,
                |_| 0.0,
            );
        }
        let dy = Tensor::zeros(&[1, 1, 2, 2]);
        let p = pd(2, 1, 0, 0);
        self.property(
            "pad2d_backward of a gradient smaller than the padding refused by both",
            self.cpu.pad2d_backward(&dy, p).is_err()
                && self.gpu.pad2d_backward(&self.up(&dy)?, p).is_err(),
        );
        Ok(())
    }
}
