//! The tensor-core convolutions (`kernels/conv_mma.cu`, `--precision
//! tf32x3|tf32|bf16`) under the emulated driver against the f32 CPU
//! reference: forward (with the fused bias + residual + ReLU epilogue),
//! backward-data (with the ReLU mask) and backward-filter, on odd shapes
//! (stride 2, padding, one and three input channels, K off the tile),
//! each element within its mode's derived bound
//! ([`Precision::dot_bound`] of `conv(|x|, |w|)`).

use classwise::backend::cpu::CpuBackend;
use classwise::backend::gpu::emu::EmuDriver;
use classwise::backend::gpu::GpuBackend;
use classwise::backend::{Backend, ConvParams, Precision};
use classwise::tensor::Tensor;

/// (n, c, h, w, o, k, stride, pad)
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: [Case; 12] = [
    (2, 1, 9, 7, 5, 3, 2, 1),      // one input channel, stride 2, padding
    (3, 3, 11, 10, 17, 3, 1, 1),   // three input channels: K = 27
    (2, 7, 8, 9, 70, 5, 2, 2),     // 5x5, K = 175, M over one 64-row tile
    (1, 20, 6, 6, 33, 1, 1, 0),    // 1x1, K = 20 (16-byte weight copies)
    (2, 16, 10, 10, 130, 3, 1, 1), // M = 130: two tall tiles and a sliver
    (8, 4, 16, 16, 8, 3, 1, 1),    // wgrad K = 2048: split and reduced
    (2, 240, 3, 3, 232, 3, 1, 1),  // forward K = 2160, dgrad K = 2088: split
    // Channels in whole K steps (16): K runs tap by tap, the filter packed.
    (2, 32, 7, 6, 48, 3, 1, 1),  // forward and dgrad both
    (2, 16, 9, 8, 32, 3, 2, 1),  // strided: every phase's dgrad
    (1, 32, 5, 5, 16, 1, 1, 0),  // 1x1: forward unpacked, dgrad transposed
    (1, 256, 3, 3, 20, 3, 1, 1), // forward K = 2304: split, tap by tap
    (1, 20, 4, 5, 256, 3, 1, 1), // dgrad K = 2304: split, tap by tap
];

fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    Tensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
    })
}

fn abs(t: &Tensor) -> Tensor {
    Tensor::from_fn(t.shape(), |i| t.data()[i].abs())
}

/// Largest |got - want| / bound over the elements (bound from `abs_ref`,
/// the same computation on absolute values, and `k` terms per element).
fn worst(got: &Tensor, want: &Tensor, abs_ref: &Tensor, k: usize, p: Precision) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let mut r = 0.0f64;
    for i in 0..got.len() {
        let (g, w) = (got.data()[i] as f64, want.data()[i] as f64);
        assert!(g.is_finite(), "element {i} is {g}");
        // abs_ref is itself an f32 sum of k positive terms: at most
        // k·2^-24 relative below the exact one.
        let bound = p.dot_bound(
            abs_ref.data()[i] as f64 * (1.0 + k as f64 * 2f64.powi(-24)),
            k,
        );
        let e = (g - w).abs();
        if e > 0.0 {
            r = r.max(if bound > 0.0 {
                e / bound
            } else {
                f64::INFINITY
            });
        }
    }
    r
}

/// Largest absolute difference.
fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

type Buf = classwise::backend::gpu::GpuBuf<EmuDriver>;

/// `f` (an op on a batch on `gpu`) on all of `x`, and on its second image
/// alone: that image's output bits must not depend on the batch around
/// it. Returns the whole batch's output.
fn second_image_as_in_batch(
    gpu: &GpuBackend<EmuDriver>,
    x: &Tensor,
    f: impl Fn(&Buf) -> Buf,
    tag: &str,
) -> Tensor {
    let all = gpu.download(&f(&gpu.upload(x).unwrap())).unwrap();
    let one = gpu
        .download(&f(&gpu.upload(&x.slice_rows(1, 2)).unwrap()))
        .unwrap();
    assert_eq!(
        all.slice_rows(1, 2).data(),
        one.data(),
        "{tag}: an image alone differs from the same image in a batch"
    );
    all
}

struct Outcome {
    /// Worst error/bound over all checks of all cases.
    ratio: f64,
    /// Largest absolute difference from the CPU over forward outputs.
    fwd_err: f64,
    /// Largest absolute difference from the GPU's own fp32 path.
    vs_fp32: f64,
}

fn run(p: Precision) -> Outcome {
    let cpu = CpuBackend::REFERENCE;
    let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
    let f32gpu = GpuBackend::new(EmuDriver::new());
    let mut out = Outcome {
        ratio: 0.0,
        fwd_err: 0.0,
        vs_fp32: 0.0,
    };
    for (ci, &(n, c, h, w, o, k, stride, pad)) in CASES.iter().enumerate() {
        let cp = ConvParams::new(stride, pad);
        let seed = ci as u64 * 10;
        let x = rand(&[n, c, h, w], seed + 1, 1.0);
        let wt = rand(&[o, c, k, k], seed + 2, 0.5);
        let b = rand(&[o], seed + 3, 0.5);
        let y0 = cpu.conv2d(&x, &wt, None, cp).unwrap();
        let yshape = y0.shape().to_vec();
        let res = rand(&yshape, seed + 4, 1.0);
        let dy = rand(&yshape, seed + 5, 1.0);
        let ymask = rand(&yshape, seed + 6, 1.0);
        let tag = format!("{p} case {ci} {:?} o{o} k{k} s{stride} p{pad}", x.shape());
        let up = |t: &Tensor| gpu.upload(t).unwrap();
        let (gx, gw, gb, gres, gdy, gy) = (up(&x), up(&wt), up(&b), up(&res), up(&dy), up(&ymask));

        // forward + bias + residual + ReLU (ReLU only shrinks differences)
        let kf = c * k * k;
        let want = cpu
            .conv2d_fused(&x, &wt, Some(&b), Some(&res), true, cp)
            .unwrap();
        let got = gpu
            .download(
                &gpu.conv2d_fused(&gx, &gw, Some(&gb), Some(&gres), true, cp)
                    .unwrap(),
            )
            .unwrap();
        let mut absref = cpu.conv2d(&abs(&x), &abs(&wt), Some(&abs(&b)), cp).unwrap();
        for (a, r) in absref.data_mut().iter_mut().zip(res.data()) {
            *a += r.abs();
        }
        let r = worst(&got, &want, &absref, kf + 2, p);
        assert!(r <= 1.0, "{tag}: forward error {r} x its bound");
        out.ratio = out.ratio.max(r);
        out.fwd_err = out.fwd_err.max(max_diff(&got, &want));
        let f32got = f32gpu
            .download(
                &f32gpu
                    .conv2d_fused(
                        &f32gpu.upload(&x).unwrap(),
                        &f32gpu.upload(&wt).unwrap(),
                        Some(&f32gpu.upload(&b).unwrap()),
                        Some(&f32gpu.upload(&res).unwrap()),
                        true,
                        cp,
                    )
                    .unwrap(),
            )
            .unwrap();
        out.vs_fp32 = out.vs_fp32.max(max_diff(&got, &f32got));

        // backward data through the ReLU mask
        let kd = o * k * k;
        let want = cpu
            .conv2d_fused_backward_data(&dy, &wt, Some(&ymask), x.shape(), cp)
            .unwrap();
        let got = gpu
            .download(
                &gpu.conv2d_fused_backward_data(&gdy, &gw, Some(&gy), x.shape(), cp)
                    .unwrap(),
            )
            .unwrap();
        let masked = cpu.relu_backward(&dy, &ymask).unwrap();
        let absref = cpu
            .conv2d_backward_data(&abs(&masked), &abs(&wt), x.shape(), cp)
            .unwrap();
        let r = worst(&got, &want, &absref, kd, p);
        assert!(r <= 1.0, "{tag}: backward-data error {r} x its bound");
        out.ratio = out.ratio.max(r);

        // backward filter (split-K on the long case)
        let kw = n * yshape[2] * yshape[3];
        let (want, _) = cpu
            .conv2d_backward_filter(&x, &dy, wt.shape(), cp, false)
            .unwrap();
        let (absref, _) = cpu
            .conv2d_backward_filter(&abs(&x), &abs(&dy), wt.shape(), cp, false)
            .unwrap();
        let (gdw, _) = gpu
            .conv2d_backward_filter(&gx, &gdy, wt.shape(), cp, false)
            .unwrap();
        let got = gpu.download(&gdw).unwrap();
        let r = worst(&got, &want, &absref, kw, p);
        assert!(r <= 1.0, "{tag}: backward-filter error {r} x its bound");
        out.ratio = out.ratio.max(r);
        // deterministic: a second run gives the same bits
        let (again, _) = gpu
            .conv2d_backward_filter(&gx, &gdy, wt.shape(), cp, false)
            .unwrap();
        assert_eq!(
            gpu.download(&again).unwrap().data(),
            got.data(),
            "{tag}: wgrad not reproducible"
        );
    }
    out
}

#[test]
fn tf32_convolutions_are_within_the_tf32_bound_and_differ_from_fp32() {
    let o = run(Precision::Tf32);
    println!("tf32: worst error/bound {:.3}", o.ratio);
    // The tensor cores really ran: rounding the operands to tf32 changes
    // the result in the last bits somewhere.
    assert!(o.vs_fp32 > 0.0, "tf32 gave the fp32 path's bits exactly");
}

#[test]
fn bf16_convolutions_are_within_the_bf16_bound() {
    let o = run(Precision::Bf16);
    println!("bf16: worst error/bound {:.3}", o.ratio);
    assert!(o.vs_fp32 > 0.0, "bf16 gave the fp32 path's bits exactly");
}

/// tf32x3 recovers (about) f32 accuracy: within its own bound, and far
/// closer to the CPU than plain tf32 on the same problems.
#[test]
fn tf32x3_convolutions_are_far_more_accurate_than_tf32() {
    let x3 = run(Precision::Tf32x3);
    let t = run(Precision::Tf32);
    println!(
        "forward max |err|: tf32x3 {:.3e}, tf32 {:.3e}",
        x3.fwd_err, t.fwd_err
    );
    assert!(
        x3.fwd_err * 64.0 < t.fwd_err,
        "tf32x3 {} is not much better than tf32 {}",
        x3.fwd_err,
        t.fwd_err
    );
}

/// The forward sums each output's K terms in the same order whatever the
/// batch: one image alone gives the bits it gets inside a batch.
#[test]
fn tensor_core_forward_is_batch_invariant() {
    for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
        let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
        let cp = ConvParams::new(1, 1);
        let x = rand(&[3, 5, 9, 9], 77, 1.0);
        let wt = rand(&[12, 5, 3, 3], 78, 0.5);
        let gw = gpu.upload(&wt).unwrap();
        let conv = |b: &Buf| gpu.conv2d(b, &gw, None, cp).unwrap();
        second_image_as_in_batch(&gpu, &x, conv, &p.to_string());
    }
}

/// A strided dense dgrad runs phase by phase (a stride-1 dgrad of each
/// phase's sub-filter), so no product is a known zero: four phases for a
/// 3x3 stride-2 layer, one for a 1x1 stride-2 layer (its odd rows and
/// columns get no tap and stay zero); a stride-1 dgrad is one GEMM. In
/// every mode the result matches the CPU (the bounds of the cases above and
/// of `cwp selftest`), here exactly where no tap reaches.
#[test]
fn a_strided_dgrad_runs_one_stride_one_gemm_per_phase_with_taps() {
    for p in Precision::ALL {
        let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
        let phases = || gpu.driver().launches("conv_phase_scatter");
        let dgrad = |x: [usize; 4], o: usize, k: usize, cp: ConvParams| {
            let wt = rand(&[o, x[1], k, k], 95, 0.5);
            let y = CpuBackend::REFERENCE
                .conv2d(&rand(&x, 96, 1.0), &wt, None, cp)
                .unwrap();
            let dy = rand(y.shape(), 97, 1.0);
            let got = gpu
                .download(
                    &gpu.conv2d_backward_data(
                        &gpu.upload(&dy).unwrap(),
                        &gpu.upload(&wt).unwrap(),
                        &x,
                        cp,
                    )
                    .unwrap(),
                )
                .unwrap();
            let want = CpuBackend::REFERENCE
                .conv2d_backward_data(&dy, &wt, &x, cp)
                .unwrap();
            (got, want)
        };
        dgrad([2, 6, 7, 7], 5, 3, ConvParams::new(1, 1));
        assert_eq!(phases(), 0, "{p}: stride 1 is one GEMM");
        dgrad([2, 6, 7, 8], 5, 3, ConvParams::new(2, 1));
        assert_eq!(phases(), 4, "{p}: 3x3 stride 2: four phases");
        let (got, want) = dgrad([2, 6, 7, 8], 5, 1, ConvParams::new(2, 0));
        assert_eq!(phases(), 5, "{p}: 1x1 stride 2: one phase has taps");
        for (i, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
            let (h, x) = ((i / 8) % 7, i % 8);
            if h % 2 == 1 || x % 2 == 1 {
                assert_eq!((*g, *w), (0.0, 0.0), "{p}: no tap reaches ({h}, {x})");
            }
        }
    }
}

/// Forward and backward-data GEMMs with a K of 2048 or more are split
/// along K (into partial sums, then `conv_split_reduce`) in every mode; a
/// shorter K is not. The split follows K alone, so an image gets the same
/// bits alone as in a batch, through the split too.
#[test]
fn a_long_k_splits_forward_and_dgrad_by_k_alone_in_every_mode() {
    let cp = ConvParams::new(1, 1);
    for p in Precision::ALL {
        let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
        let reduces = || gpu.driver().launches("conv_split_reduce");
        let short = gpu.upload(&rand(&[2, 5, 6, 6], 90, 1.0)).unwrap();
        let wshort = gpu.upload(&rand(&[7, 5, 3, 3], 91, 0.5)).unwrap();
        gpu.conv2d(&short, &wshort, None, cp).unwrap();
        assert_eq!(reduces(), 0, "{p}: K = 45 is not split");

        let x = rand(&[3, 240, 3, 3], 92, 1.0);
        let wt = rand(&[232, 240, 3, 3], 93, 0.5);
        let gw = gpu.upload(&wt).unwrap();
        let conv = |b: &Buf| gpu.conv2d(b, &gw, None, cp).unwrap();
        second_image_as_in_batch(&gpu, &x, conv, &format!("{p}: forward"));
        assert_eq!(reduces(), 2, "{p}: the forward's K = 2160 is split");

        let dy = rand(&[3, 232, 3, 3], 94, 1.0);
        let dgrad = |b: &Buf| {
            gpu.conv2d_backward_data(b, &gw, &[b.shape()[0], 240, 3, 3], cp)
                .unwrap()
        };
        second_image_as_in_batch(&gpu, &dy, dgrad, &format!("{p}: dgrad"));
        assert_eq!(reduces(), 4, "{p}: the dgrad's K = 2088 is split");
    }
}

/// A tensor-core GEMM whose reduced channels (the forward's Cin, a stride-1
/// dgrad's Cout) are whole K steps runs K tap by tap, (r, s, c), with the
/// filter packed to match once per call, in tf32 and bf16 rounded for the
/// mode by the pack (so a forward 1x1, whose filter already runs that way,
/// is packed in those modes only); other shapes, and fp32, keep (c, r, s).
/// The order follows the shape alone, so an image gets the same bits alone
/// as in a batch. (Accuracy in both orders: the CASES above.)
#[test]
fn channels_in_whole_k_steps_run_k_tap_by_tap_with_a_packed_filter() {
    for p in Precision::ALL {
        let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
        let kernel = match p {
            Precision::Bf16 => "conv_pack_rsc_bf16",
            Precision::Tf32 => "conv_pack_rsc_tf32",
            _ => "conv_pack_rsc",
        };
        let packs = || gpu.driver().launches(kernel);
        let tc = usize::from(p != Precision::Fp32);
        let rounds = usize::from(matches!(p, Precision::Tf32 | Precision::Bf16));
        let mut want = 0;
        let mut fwd = |x: &[usize], o: usize, k: usize, cp: ConvParams, packed: usize| {
            let x = rand(x, 101, 1.0);
            let w = gpu
                .upload(&rand(&[o, x.shape()[1], k, k], 102, 0.5))
                .unwrap();
            let tag = format!("{p}: forward of {:?} by {o}x{k}x{k}", x.shape());
            let conv = |b: &Buf| gpu.conv2d(b, &w, None, cp).unwrap();
            second_image_as_in_batch(&gpu, &x, conv, &tag);
            // once per call: the batch and the image alone
            want += 2 * packed * tc;
            assert_eq!(packs(), want, "{tag}");
        };
        let s1 = ConvParams::new(1, 1);
        fwd(&[2, 32, 6, 5], 24, 3, s1, 1);
        fwd(&[2, 32, 6, 5], 24, 1, ConvParams::new(1, 0), rounds);
        fwd(&[2, 20, 6, 5], 24, 3, s1, 0);
        let dgrad = |c: usize, o: usize, cp: ConvParams, packed: usize| {
            let x = [2, c, 7, 6];
            let w = gpu.upload(&rand(&[o, c, 3, 3], 103, 0.5)).unwrap();
            let y = gpu
                .conv2d(&gpu.upload(&rand(&x, 104, 1.0)).unwrap(), &w, None, cp)
                .unwrap();
            let dy = rand(y.shape(), 105, 1.0);
            let before = packs();
            let tag = format!("{p}: dgrad of {o} into {c} channels, {cp:?}");
            let dgrad = |b: &Buf| {
                gpu.conv2d_backward_data(b, &w, &[b.shape()[0], c, 7, 6], cp)
                    .unwrap()
            };
            second_image_as_in_batch(&gpu, &dy, dgrad, &tag);
            assert_eq!(packs() - before, 2 * packed * tc, "{tag}");
        };
        dgrad(8, 32, s1, 1);
        dgrad(8, 20, s1, 0);
        // stride 2 on 7x6: four phases, each its own packed sub-filter
        dgrad(8, 32, ConvParams::new(2, 1), 4);
    }
}

/// `x` rounded as the tensor cores read it in mode `p`: tf32 by cvt.rna
/// (nearest, ties away from zero), bf16 to nearest even.
fn rounded(x: &Tensor, p: Precision) -> Tensor {
    Tensor::from_fn(x.shape(), |i| {
        let u = x.data()[i].to_bits();
        f32::from_bits(match p {
            Precision::Tf32 => (u + 0x1000) & 0xffff_e000,
            Precision::Bf16 => ((u + 0x7fff + ((u >> 16) & 1)) >> 16) << 16,
            _ => u,
        })
    })
}

/// In tf32 and bf16 a convolution is the f32 product of its operands
/// rounded for the mode, whether the filter was rounded by the pack (K tap
/// by tap) or fragment by fragment (K in (c, r, s)): against the CPU on
/// rounded operands only the f32 accumulation differs, far inside the
/// mode's own bound (a rounding off by one bf16 step in a tenth of the
/// weights would already miss it).
#[test]
fn tf32_and_bf16_multiply_exactly_the_rounded_operands_in_both_k_orders() {
    let cpu = CpuBackend::REFERENCE;
    for p in [Precision::Tf32, Precision::Bf16] {
        let gpu = GpuBackend::new(EmuDriver::new()).with_precision(p);
        // (x, o, k, pad): tap by tap 3x3 and 1x1 (both directions), then
        // (c, r, s) in both directions (20 channels)
        for (xs, o, k, pad) in [
            ([2, 32, 6, 5], 32, 3, 1),
            ([2, 32, 6, 5], 48, 1, 0),
            ([2, 20, 6, 5], 20, 3, 1),
        ] {
            let cp = ConvParams::new(1, pad);
            let x = rand(&xs, 111, 1.0);
            let w = rand(&[o, xs[1], k, k], 112, 0.5);
            let want = cpu
                .conv2d(&rounded(&x, p), &rounded(&w, p), None, cp)
                .unwrap();
            let gw = gpu.upload(&w).unwrap();
            let got = gpu
                .download(&gpu.conv2d(&gpu.upload(&x).unwrap(), &gw, None, cp).unwrap())
                .unwrap();
            let absref = cpu.conv2d(&abs(&x), &abs(&w), None, cp).unwrap();
            let kf = xs[1] * k * k;
            let r = worst(&got, &want, &absref, kf, Precision::Fp32);
            assert!(
                r <= 1.0,
                "{p} forward {xs:?} by {o}x{k}x{k}: {r} x the f32 bound"
            );
            let dy = rand(want.shape(), 113, 1.0);
            let want = cpu
                .conv2d_backward_data(&rounded(&dy, p), &rounded(&w, p), &xs, cp)
                .unwrap();
            let got = gpu
                .download(
                    &gpu.conv2d_backward_data(&gpu.upload(&dy).unwrap(), &gw, &xs, cp)
                        .unwrap(),
                )
                .unwrap();
            let absref = cpu
                .conv2d_backward_data(&abs(&dy), &abs(&w), &xs, cp)
                .unwrap();
            let r = worst(&got, &want, &absref, o * k * k, Precision::Fp32);
            assert!(
                r <= 1.0,
                "{p} dgrad {xs:?} by {o}x{k}x{k}: {r} x the f32 bound"
            );
        }
    }
}

#[test]
fn precision_is_part_of_the_numerics_and_fp32_is_the_default() {
    let gpu = GpuBackend::new(EmuDriver::new());
    assert_eq!(gpu.precision(), Precision::Fp32);
    assert_eq!(gpu.numerics(), "emu fp32");
    let gpu = gpu.with_precision(Precision::Bf16);
    assert_eq!(gpu.numerics(), "emu bf16");
}

#[test]
fn the_cpu_refuses_tensor_core_precisions_naming_the_option() {
    let (mut dev, _) = classwise::backend::select_device("cpu").unwrap();
    dev.set_precision(Precision::Fp32).expect("fp32 on the CPU");
    let e = dev.set_precision(Precision::Tf32).unwrap_err().to_string();
    assert!(e.contains("--precision") && e.contains("tf32"), "{e}");
}

/// Model level: the small CNN's logits and input gradient (graph runner and
/// fused eval path) in tf32x3 are within the model tolerances
/// ([`classwise::selftest::model_tolerances_in`]). (tf32 and bf16 are not
/// held here: their input gradients on the formula weights are off by far
/// more than the first-order bound, about 17% relative L2 for tf32, from
/// cancellation; `cwp selftest --precision tf32` reports that as failures.)
#[test]
fn small_cnn_in_tf32x3_is_within_the_model_tolerances() {
    let case = classwise::selftest::zoo_cases()
        .into_iter()
        .find(|c| c.arch == "smallcnn")
        .expect("a smallcnn case");
    let gpu = GpuBackend::new(EmuDriver::new()).with_precision(Precision::Tf32x3);
    let checks = classwise::selftest::check_model(&gpu, &case).expect("model checks run");
    let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}
