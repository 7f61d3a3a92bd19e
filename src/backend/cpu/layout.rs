//! Copies that change the layout: channel-axis concatenation and its split,
//! zero padding of H and W and its crop. GPU twin: kernels/layout.cu.

use rayon::prelude::*;

use crate::backend::shape_ops::{concat_dims, crop_shape, pad_out_shape, Pad2d};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The concatenation of `xs` on the channel axis.
pub(super) fn concat(xs: &[&Tensor]) -> Result<Tensor> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape()).collect();
    let (n, plane, cs) = concat_dims(&shapes)?;
    let total: usize = cs.iter().sum();
    let mut shape = xs[0].shape().to_vec();
    shape[1] = total;
    let mut out = vec![0.0f32; n * total * plane];
    out.par_chunks_mut((total * plane).max(1))
        .enumerate()
        .for_each(|(img, o)| {
            let mut at = 0;
            for (x, &c) in xs.iter().zip(&cs) {
                let len = c * plane;
                o[at..at + len].copy_from_slice(&x.data()[img * len..(img + 1) * len]);
                at += len;
            }
        });
    Tensor::new(&shape, out)
}

/// `dy` split on the channel axis into parts of `channels[i]` channels.
pub(super) fn concat_backward(dy: &Tensor, channels: &[usize]) -> Result<Vec<Tensor>> {
    let s = dy.shape();
    let total: usize = channels.iter().sum();
    if s.len() < 2 || s[1] != total || channels.len() < 2 {
        return Err(Error::tensor(
            "dy",
            format!("concat_backward: shape {s:?} cannot split into {channels:?} channels"),
        ));
    }
    let plane = s[2..].iter().product::<usize>();
    let mut at = 0;
    channels
        .iter()
        .map(|&c| {
            let mut shape = s.to_vec();
            shape[1] = c;
            let part = Tensor::from_fn(&shape, |i| {
                let (img, r) = (i / (c * plane).max(1), i % (c * plane).max(1));
                dy.data()[img * total * plane + at * plane + r]
            });
            at += c;
            Ok(part)
        })
        .collect()
}

/// `x` with `p`'s zeros around each plane.
pub(super) fn pad2d(x: &Tensor, p: Pad2d) -> Result<Tensor> {
    let [n, c, oh, ow] = pad_out_shape(x.shape(), p)?;
    let mut y = vec![0.0f32; n * c * oh * ow];
    pad_planes(x.data(), (x.shape()[2], x.shape()[3]), p, &mut y);
    Tensor::new(&[n, c, oh, ow], y)
}

/// Writes each `h x w` plane of `x` into the planes of `y` with `p`'s zeros
/// around it, planes in parallel. Every value of `y` is written, so it may
/// be a reused buffer.
pub(super) fn pad_planes(x: &[f32], (h, w): (usize, usize), p: Pad2d, y: &mut [f32]) {
    let (oh, ow) = (h + p.top + p.bottom, w + p.left + p.right);
    if h * w == 0 {
        y.fill(0.0);
        return;
    }
    y.par_chunks_mut((oh * ow).max(1))
        .zip(x.par_chunks(h * w))
        .with_min_len(16)
        .for_each(|(y, x)| {
            y[..p.top * ow].fill(0.0);
            y[(p.top + h) * ow..].fill(0.0);
            for (row, src) in y[p.top * ow..].chunks_exact_mut(ow).zip(x.chunks_exact(w)) {
                row[..p.left].fill(0.0);
                row[p.left..p.left + w].copy_from_slice(src);
                row[p.left + w..].fill(0.0);
            }
        });
}

/// `dy` with `p`'s padding cropped off.
pub(super) fn pad2d_backward(dy: &Tensor, p: Pad2d) -> Result<Tensor> {
    let [n, c, h, w] = crop_shape(dy.shape(), p)?;
    let ow = dy.shape()[3];
    let plane = dy.shape()[2] * ow;
    let mut dx = vec![0.0f32; n * c * h * w];
    if h * w > 0 {
        dx.par_chunks_mut(h * w)
            .zip(dy.data().par_chunks(plane))
            .for_each(|(dx, dy)| {
                for r in 0..h {
                    let at = (r + p.top) * ow + p.left;
                    dx[r * w..(r + 1) * w].copy_from_slice(&dy[at..at + w]);
                }
            });
    }
    Tensor::new(&[n, c, h, w], dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    #[test]
    fn concat_then_split_gives_the_parts_back() {
        let mut g = rng(21);
        let a = uniform(&mut g, &[2, 3, 4, 5], -1.0, 1.0);
        let b = uniform(&mut g, &[2, 1, 4, 5], -1.0, 1.0);
        let y = concat(&[&a, &b]).unwrap();
        assert_eq!(y.shape(), [2, 4, 4, 5]);
        // Image 1, channel 3 is b's image 1, channel 0.
        assert_eq!(y.data()[(4 + 3) * 20 + 7], b.data()[20 + 7]);
        assert_eq!(y.data()[(4 + 2) * 20 + 7], a.data()[(3 + 2) * 20 + 7]);
        let parts = concat_backward(&y, &[3, 1]).unwrap();
        assert_bitwise("part 0", parts[0].data(), a.data());
        assert_bitwise("part 1", parts[1].data(), b.data());
        assert!(concat_backward(&y, &[3, 2]).is_err());
        assert!(concat(&[&a, &uniform(&mut g, &[2, 1, 5, 4], 0.0, 1.0)]).is_err());
    }

    #[test]
    fn pad_places_the_plane_and_crop_takes_it_back() {
        let x = Tensor::from_fn(&[1, 2, 2, 3], |i| i as f32 + 1.0);
        let p = Pad2d {
            top: 1,
            bottom: 0,
            left: 2,
            right: 1,
        };
        let y = pad2d(&x, p).unwrap();
        assert_eq!(y.shape(), [1, 2, 3, 6]);
        #[rustfmt::skip]
        let plane0 = [
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 1.0, 2.0, 3.0, 0.0,
            0.0, 0.0, 4.0, 5.0, 6.0, 0.0,
        ];
        assert_bitwise("padded plane", &y.data()[..18], &plane0);
        assert_bitwise("cropped", pad2d_backward(&y, p).unwrap().data(), x.data());
        // 2 rows cannot lose 3.
        assert!(pad2d_backward(&x, Pad2d { top: 3, ..p }).is_err());
    }
}
