//! Host side of `kernels/conv.cu`: convolution forward (with the fused bias,
//! residual and ReLU epilogue), backward-data (with an optional ReLU mask on
//! dy), backward-filter (split-K plus an ordered reduce) and the bias
//! gradient; linear layers run through the same kernels as 1x1
//! convolutions of `[N, K, 1, 1]` images; and the eval-mode batch-norm fold.

use super::{arg, Driver, GpuBackend, GpuBuf};
use crate::backend::check::{dims4, ConvGeom};
use crate::backend::{ConvParams, Precision};
use crate::error::{Error, Result};

/// Argument struct of every conv kernel (C twin `ConvArgs` in kernels/conv_gather.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvArgs {
    n: i32,
    c: i32,
    h: i32,
    w: i32,
    k: i32,
    r: i32,
    s: i32,
    p: i32,
    q: i32,
    stride: i32,
    pad: i32,
    flags: i32,
    pub(super) gm: i32,
    pub(super) gn: i32,
    pub(super) gk: i32,
    pub(super) k_chunk: i32,
    pub(super) splits: i32,
    /// The width's padding (`pad` is the height's): they differ only in a
    /// phase of a strided dgrad.
    pad_w: i32,
}

const CONV_BIAS: i32 = 1;
const CONV_RELU: i32 = 2;
const CONV_RESIDUAL: i32 = 4;
const CONV_DY_MASK: i32 = 8;
/// Tensor cores: K runs (r, s, c) and the filter is packed to match
/// (`CONV_K_RSC` in kernels/conv_gather.cuh).
const CONV_K_RSC: i32 = 16;

/// Arguments of the `conv_pack_rsc*` kernels (C twin `PackArgs` in
/// kernels/conv_mma.cu): an OIHW filter of `o x c x rs` as the A operand of
/// a GEMM with K in (r, s, c) order, `[o][rs][c]` for the forward,
/// `[c][rs][o]` for dgrad.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PackArgs {
    o: i32,
    c: i32,
    rs: i32,
    dgrad: i32,
}

impl PackArgs {
    /// Elements of the filter.
    pub(super) fn len(&self) -> usize {
        (self.o * self.c * self.rs) as usize
    }
}

impl ConvArgs {
    /// The tensor-core GEMM of these arguments with K in (r, s, c) order,
    /// when its reduced channels (the forward's Cin, a dgrad's Cout) are a
    /// whole number of `step`s and, for dgrad, the stride is 1 (every phase
    /// of a strided dgrad is): the arguments flagged so, the packing of the
    /// filter into that order, and whether the order needs it (a forward
    /// 1x1's OIHW filter already runs that way).
    pub(super) fn rsc_order(&self, dgrad: bool, step: usize) -> Option<(ConvArgs, PackArgs, bool)> {
        let reduced = if dgrad { self.k } else { self.c };
        if reduced <= 0 || !(reduced as usize).is_multiple_of(step) || (dgrad && self.stride != 1) {
            return None;
        }
        let rs = self.r * self.s;
        let pack = PackArgs {
            o: self.k,
            c: self.c,
            rs,
            dgrad: dgrad as i32,
        };
        let flagged = ConvArgs {
            flags: self.flags | CONV_K_RSC,
            ..*self
        };
        Some((flagged, pack, dgrad || rs > 1))
    }
}

/// K step of the GEMM main loop (`BK` in conv.cu).
const BK: usize = 8;

/// One tile configuration of the conv kernels.
#[derive(Clone, Copy, Debug)]
pub struct TileCfg {
    /// Rows (GEMM M) per block.
    pub bm: usize,
    /// Columns (GEMM N) per block.
    pub bn: usize,
    /// Threads per block.
    pub threads: u32,
    fwd: &'static str,
    dgrad: &'static str,
    wgrad: &'static str,
}

/// The configurations compiled in conv.cu (`CONV_CONFIGS`).
pub const TILES: [TileCfg; 4] = [
    TileCfg {
        bm: 128,
        bn: 128,
        threads: 256,
        fwd: "conv_fwd_128x128",
        dgrad: "conv_dgrad_128x128",
        wgrad: "conv_wgrad_128x128",
    },
    TileCfg {
        bm: 64,
        bn: 128,
        threads: 128,
        fwd: "conv_fwd_64x128",
        dgrad: "conv_dgrad_64x128",
        wgrad: "conv_wgrad_64x128",
    },
    TileCfg {
        bm: 32,
        bn: 128,
        threads: 256,
        fwd: "conv_fwd_32x128",
        dgrad: "conv_dgrad_32x128",
        wgrad: "conv_wgrad_32x128",
    },
    TileCfg {
        bm: 64,
        bn: 32,
        threads: 128,
        fwd: "conv_fwd_64x32",
        dgrad: "conv_dgrad_64x32",
        wgrad: "conv_wgrad_64x32",
    },
];

/// Input channels up to which a dense convolution's input gradient runs
/// the direct kernel (`gconv_dgrad`) rather than the implicit GEMM.
pub const DIRECT_DGRAD_CHANNELS: usize = 4;

/// True when a dense convolution with `c` input channels (a network's stem:
/// 1 or 3) takes the direct dgrad kernel. The GEMM's rows are those
/// channels, so its narrowest tile (32 rows) would compute 8 to 32 times
/// the useful products; the direct kernel computes each input gradient
/// from its own taps, skipping a strided layer's empty ones. It depends on
/// the shape alone, so results stay batch-invariant.
pub fn direct_dgrad(c: usize) -> bool {
    c <= DIRECT_DGRAD_CHANNELS
}

/// The tile for a GEMM of `m` rows and `n` columns by shape alone: wide
/// tiles when there are many columns, rows matched to `m` so few rows are
/// wasted. What wgrad uses, since its K splits follow the tile count.
pub fn pick_tile(m: usize, n: usize) -> TileCfg {
    TILES[shape_tile(m, n)]
}

/// [`pick_tile`]'s choice as an index into [`TILES`] (largest first).
fn shape_tile(m: usize, n: usize) -> usize {
    if n < 128 {
        3
    } else if m > 64 {
        0
    } else if m > 32 {
        1
    } else {
        2
    }
}

/// The tile for a forward or backward-data GEMM on a device of `sms` SMs:
/// [`pick_tile`]'s, or, when its grid would leave SMs idle (the deep layers
/// at search batch sizes), the next smaller tile until the grid fills a
/// wave, else the one with the most blocks. Speed only: every output sums
/// its K terms in the same order whatever the tile, so the result is the
/// same on every device.
pub fn pick_tile_for(m: usize, n: usize, sms: usize) -> TileCfg {
    let blocks = |t: &&TileCfg| m.div_ceil(t.bm) * n.div_ceil(t.bn);
    let smaller = &TILES[shape_tile(m, n)..];
    *smaller
        .iter()
        .find(|t| blocks(t) >= sms)
        .or_else(|| smaller.iter().max_by_key(blocks))
        .unwrap_or(&smaller[0])
}

/// Splits of the K axis of a wgrad GEMM (`k` long, `tiles` output tiles,
/// `mn` output values): enough blocks for two waves of a large GPU, at least
/// 32 K steps per split, at most 64 MiB of partial sums. Depends on the
/// shape only, so the summation order (and the result) is the same on every
/// device. Returns `(splits, k_chunk)`.
pub fn wgrad_splits(k: usize, tiles: usize, mn: usize) -> (usize, usize) {
    let want = 264usize.div_ceil(tiles.max(1));
    let by_len = k.div_ceil(32 * BK).max(1);
    let by_mem = ((16usize << 20) / mn.max(1)).max(1);
    let splits = want.min(by_len).min(by_mem).max(1);
    let chunk = k.div_ceil(splits).div_ceil(BK) * BK;
    (k.div_ceil(chunk.max(BK)).max(1), chunk.max(BK))
}

/// The shortest K at which a forward or backward-data GEMM splits its K
/// axis (3x3 convolutions from 256 channels up, 1x1 from 2048).
pub const SPLIT_K_MIN: usize = 2048;
/// The longest K chunk of a split.
const SPLIT_K_CHUNK: usize = 1024;
/// Chunks are whole K steps of both kernel families (8 and 16).
const SPLIT_K_ALIGN: usize = 16;

/// `(splits, k_chunk)` of a forward or backward-data GEMM of K `k`.
///
/// The deep layers have few output tiles at search batch sizes (resnet18's
/// last convolutions at 4 images: 16 tiles for 132 SMs) and a long K, so
/// one block would walk all of K alone; splitting K multiplies the blocks.
/// The split follows K alone, never the batch or the device: each output
/// is the ordered sum of the same chunk sums whatever the batch, so results
/// stay batch-invariant and bitwise reproducible. The partial sums cost at
/// most `splits` times the layer's output (up to 5 for K = 4608), less than
/// the network's largest activation, and 4 bytes of traffic per 2 x 1024
/// products.
pub fn gemm_k_splits(k: usize) -> (usize, usize) {
    if k < SPLIT_K_MIN {
        return (1, k);
    }
    let splits = k.div_ceil(SPLIT_K_CHUNK);
    let chunk = k.div_ceil(splits).div_ceil(SPLIT_K_ALIGN) * SPLIT_K_ALIGN;
    (k.div_ceil(chunk), chunk)
}

/// Arguments of `conv_phase_filter` and `conv_phase_scatter` (C twin
/// `PhaseArgs` in kernels/conv.cu).
#[repr(C)]
struct PhaseArgs {
    planes: i32,
    h: i32,
    w: i32,
    ph: i32,
    pw: i32,
    h0: i32,
    w0: i32,
    stride: i32,
}

impl PhaseArgs {
    /// The `[ph, pw]` grid from `(h0, w0)` every `stride` of `planes`
    /// planes of `[h, w]`.
    fn new(
        planes: usize,
        [h, w]: [usize; 2],
        [ph, pw]: [usize; 2],
        [h0, w0]: [usize; 2],
        stride: usize,
    ) -> Self {
        PhaseArgs {
            planes: planes as i32,
            h: h as i32,
            w: w as i32,
            ph: ph as i32,
            pw: pw as i32,
            h0: h0 as i32,
            w0: w0 as i32,
            stride: stride as i32,
        }
    }

    fn count(&self) -> usize {
        (self.planes * self.ph * self.pw) as usize
    }
}

/// Convolution geometry, shared with the CPU reference so both refuse the
/// same inputs; the kernel argument packing is GPU-only.
pub(super) type Geom = ConvGeom;

impl Geom {
    pub(super) fn args(&self) -> ConvArgs {
        ConvArgs {
            n: self.n as i32,
            c: self.c as i32,
            h: self.h as i32,
            w: self.w as i32,
            k: self.o as i32,
            r: self.kh as i32,
            s: self.kw as i32,
            p: self.oh as i32,
            q: self.ow as i32,
            stride: self.stride as i32,
            pad: self.pad as i32,
            pad_w: self.pad as i32,
            ..ConvArgs::default()
        }
    }
}

/// Fails unless `b` has exactly `shape`.
pub(super) fn expect_shape<D: Driver>(name: &str, b: &GpuBuf<D>, shape: &[usize]) -> Result<()> {
    crate::error::check_shape(name, shape, b.shape())
}

/// Fails unless every GEMM extent fits the kernels' 32-bit indices.
pub(super) fn check_extents(what: &str, extents: &[usize]) -> Result<()> {
    if extents.iter().any(|&e| e > i32::MAX as usize) {
        return Err(Error::Backend(format!(
            "{what}: extents {extents:?} exceed the 32-bit indices of the GPU kernels; use a smaller batch"
        )));
    }
    Ok(())
}

impl<D: Driver> GpuBackend<D> {
    /// Convolution forward with an optional fused epilogue:
    /// `y = relu?(conv(x, w) + bias + residual)`. `residual` must have the
    /// output's shape. Plain `conv2d` is `residual = None, relu = false`.
    pub fn conv_forward(
        &self,
        x: &GpuBuf<D>,
        w: &GpuBuf<D>,
        bias: Option<&GpuBuf<D>>,
        residual: Option<&GpuBuf<D>>,
        relu: bool,
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        let g = Geom::new(x.shape(), w.shape(), p)?;
        if let Some(b) = bias {
            expect_shape("bias", b, &[g.o])?;
        }
        if let Some(r) = residual {
            expect_shape("residual", r, &g.out_shape())?;
        }
        if !g.is_dense() {
            return self.gconv_forward(&g, x, w, bias, residual, relu);
        }
        let y = self.alloc(&g.out_shape())?;
        let mut a = g.args();
        a.gm = g.o as i32;
        let gn = g.n * g.oh * g.ow;
        let gk = g.c * g.kh * g.kw;
        check_extents("conv2d", &[gn, gk])?;
        a.gn = gn as i32;
        a.gk = gk as i32;
        a.flags = if bias.is_some() { CONV_BIAS } else { 0 }
            | if residual.is_some() { CONV_RESIDUAL } else { 0 }
            | if relu { CONV_RELU } else { 0 };
        self.launch_fwd(
            &a,
            x.ptr(),
            w.ptr(),
            bias.map_or(0, |b| b.ptr()),
            residual.map_or(0, |r| r.ptr()),
            y.ptr(),
        )?;
        Ok(y)
    }

    /// Runs a forward or backward-data GEMM (`gemm(args, out)`) whole, or,
    /// when [`gemm_k_splits`] splits its K, into partial sums that
    /// `conv_split_reduce` adds in split order and finishes with the
    /// forward's epilogue (`a.flags`), writing NCHW `out` (`pq` values per
    /// image and channel) just as the whole GEMM does.
    fn split_k(
        &self,
        a: &ConvArgs,
        pq: usize,
        [bias, res, out]: [u64; 3],
        gemm: impl FnOnce(&ConvArgs, u64) -> Result<()>,
    ) -> Result<()> {
        let (m, n) = (a.gm as usize, a.gn as usize);
        let (splits, chunk) = gemm_k_splits(a.gk as usize);
        if splits == 1 || m * n == 0 {
            return gemm(a, out);
        }
        check_extents("a split convolution's partial sums", &[m * n])?;
        let split = ConvArgs {
            splits: splits as i32,
            k_chunk: chunk as i32,
            ..*a
        };
        let partial = self.alloc(&[splits, m * n])?;
        let pp = partial.ptr();
        gemm(&split, pp)?;
        #[repr(C)]
        struct SplitReduceArgs {
            m: i32,
            n: i32,
            pq: i32,
            splits: i32,
            flags: i32,
        }
        let r = SplitReduceArgs {
            m: m as i32,
            n: n as i32,
            pq: pq as i32,
            splits: splits as i32,
            flags: a.flags & (CONV_BIAS | CONV_RESIDUAL | CONV_RELU),
        };
        self.launch_flat(
            "conv_split_reduce",
            m * n,
            &mut [arg(&r), arg(&pp), arg(&bias), arg(&res), arg(&out)],
        )
    }

    /// Launches the forward GEMM on prepared arguments.
    pub(super) fn launch_fwd(
        &self,
        a: &ConvArgs,
        x: u64,
        w: u64,
        bias: u64,
        res: u64,
        y: u64,
    ) -> Result<()> {
        let pq = (a.p * a.q) as usize;
        self.split_k(a, pq, [bias, res, y], |a, y| {
            if self.precision != Precision::Fp32 {
                return self.launch_rows_mma(false, a, x, w, &[bias, res, y]);
            }
            self.launch_tiled(
                a,
                |t| t.fwd,
                &mut [arg(a), arg(&x), arg(&w), arg(&bias), arg(&res), arg(&y)],
            )
        })
    }

    /// Launches the f32 kernel `kernel(tile)` of a forward or dgrad GEMM
    /// with `a.splits` K splits: the tile fills the device with the splits'
    /// blocks counted.
    fn launch_tiled(
        &self,
        a: &ConvArgs,
        kernel: fn(&TileCfg) -> &'static str,
        args: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        let (m, n) = (a.gm as usize, a.gn as usize);
        let z = a.splits.max(1) as usize;
        let t = pick_tile_for(m, n, self.drv.sm_count().div_ceil(z));
        let grid = [n.div_ceil(t.bn) as u32, m.div_ceil(t.bm) as u32, z as u32];
        self.launch(kernel(&t), m * n, grid, [t.threads, 1, 1], args)
    }

    /// Input gradient of a convolution. With `relu_y` (the output of a fused
    /// conv+ReLU), `dy` is first masked by `relu_y > 0`, i.e. this is the
    /// input gradient of `relu(conv(x))`.
    pub fn conv_dgrad(
        &self,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        relu_y: Option<&GpuBuf<D>>,
        x_shape: &[usize],
        p: ConvParams,
    ) -> Result<GpuBuf<D>> {
        let g = Geom::new(x_shape, w.shape(), p)?;
        expect_shape("dy", dy, &g.out_shape())?;
        if let Some(y) = relu_y {
            expect_shape("y", y, &g.out_shape())?;
        }
        if !g.is_dense() || direct_dgrad(g.c) {
            return self.gconv_dgrad(&g, dy, w, relu_y);
        }
        if g.stride > 1 {
            return self.phase_dgrad(&g, dy, w, relu_y);
        }
        let dx = self.alloc(x_shape)?;
        let a = dgrad_args(
            &g,
            [g.h, g.w],
            [g.kh, g.kw],
            [g.pad, g.pad],
            relu_y.is_some(),
        )?;
        self.launch_dgrad(
            &a,
            dy.ptr(),
            w.ptr(),
            relu_y.map_or(0, |y| y.ptr()),
            dx.ptr(),
        )?;
        Ok(dx)
    }

    pub(super) fn launch_dgrad(
        &self,
        a: &ConvArgs,
        dy: u64,
        w: u64,
        mask: u64,
        dx: u64,
    ) -> Result<()> {
        let hw = (a.h * a.w) as usize;
        self.split_k(a, hw, [0, 0, dx], |a, dx| {
            if self.precision != Precision::Fp32 {
                return self.launch_rows_mma(true, a, dy, w, &[mask, dx]);
            }
            self.launch_tiled(
                a,
                |t| t.dgrad,
                &mut [arg(a), arg(&dy), arg(&w), arg(&mask), arg(&dx)],
            )
        })
    }

    /// The input gradient of a strided dense convolution, phase by phase:
    /// the input positions `(h0 + i*stride, w0 + j*stride)` are reached
    /// only by the taps `(rh + i'*stride, rw + j'*stride)` with `rh = (h0 +
    /// pad) % stride` (and alike for the width), at output rows `i +
    /// (h0 + pad) / stride - i'`: a stride-1 dgrad of the sub-filter with
    /// that offset as its padding. So no product is a known zero (a 3x3
    /// stride-2 dgrad as one GEMM multiplies 3 zeros for each useful
    /// product; a 1x1 one, 3 zero columns for each useful one). Positions
    /// no tap reaches (a 1x1 stride-2 layer's odd rows) stay zero.
    fn phase_dgrad(
        &self,
        g: &Geom,
        dy: &GpuBuf<D>,
        w: &GpuBuf<D>,
        relu_y: Option<&GpuBuf<D>>,
    ) -> Result<GpuBuf<D>> {
        let dx = crate::backend::Backend::zeros(self, &[g.n, g.c, g.h, g.w])?;
        let s = g.stride;
        let copy = |name: &str, a: &PhaseArgs, src: u64, dst: u64| {
            self.launch_flat(name, a.count(), &mut [arg(a), arg(&src), arg(&dst)])
        };
        for h0 in 0..s.min(g.h) {
            for w0 in 0..s.min(g.w) {
                let (rh, rw) = ((h0 + g.pad) % s, (w0 + g.pad) % s);
                if rh >= g.kh || rw >= g.kw {
                    continue;
                }
                // The phase's sub-filter and input extents.
                let taps = [(g.kh - rh).div_ceil(s), (g.kw - rw).div_ceil(s)];
                let extent = [(g.h - h0).div_ceil(s), (g.w - w0).div_ceil(s)];
                let filter = PhaseArgs::new(g.o * g.c, [g.kh, g.kw], taps, [rh, rw], s);
                let wsub = self.alloc(&[g.o, g.c, taps[0], taps[1]])?;
                copy("conv_phase_filter", &filter, w.ptr(), wsub.ptr())?;
                let part = self.alloc(&[g.n, g.c, extent[0], extent[1]])?;
                let pads = [(h0 + g.pad) / s, (w0 + g.pad) / s];
                let a = dgrad_args(g, extent, taps, pads, relu_y.is_some())?;
                self.launch_dgrad(
                    &a,
                    dy.ptr(),
                    wsub.ptr(),
                    relu_y.map_or(0, |y| y.ptr()),
                    part.ptr(),
                )?;
                let scatter = PhaseArgs::new(g.n * g.c, [g.h, g.w], extent, [h0, w0], s);
                copy("conv_phase_scatter", &scatter, part.ptr(), dx.ptr())?;
            }
        }
        Ok(dx)
    }

    /// The wgrad GEMM into a fresh `out_shape` buffer: split-K partial
    /// products, then their ordered sum.
    pub(super) fn wgrad_gemm(
        &self,
        a: &mut ConvArgs,
        x: u64,
        dy: u64,
        out_shape: &[usize],
    ) -> Result<GpuBuf<D>> {
        let (m, n, k) = (a.gm as usize, a.gn as usize, a.gk as usize);
        let dw = self.alloc(out_shape)?;
        if m * n == 0 {
            return Ok(dw);
        }
        let mma = self.precision != Precision::Fp32;
        let t = pick_tile(m, n);
        let splits = if mma {
            self.plan_wgrad_mma(a)
        } else {
            let tiles = m.div_ceil(t.bm) * n.div_ceil(t.bn);
            let (splits, chunk) = wgrad_splits(k, tiles, m * n);
            a.splits = splits as i32;
            a.k_chunk = chunk as i32;
            splits
        };
        let grid = [
            n.div_ceil(t.bn) as u32,
            m.div_ceil(t.bm) as u32,
            splits as u32,
        ];
        let launch = |out: u64| -> Result<()> {
            if mma {
                return self.launch_wgrad_mma(a, x, dy, out);
            }
            self.launch(
                t.wgrad,
                m * n,
                grid,
                [t.threads, 1, 1],
                &mut [arg(a), arg(&x), arg(&dy), arg(&out)],
            )
        };
        if splits == 1 {
            launch(dw.ptr())?;
            return Ok(dw);
        }
        let partial = self.alloc(&[splits, m * n])?;
        let pp = partial.ptr();
        launch(pp)?;
        #[repr(C)]
        struct ReduceArgs {
            total: i32,
            splits: i32,
        }
        let r = ReduceArgs {
            total: (m * n) as i32,
            splits: splits as i32,
        };
        let out = dw.ptr();
        self.launch_flat(
            "conv_wgrad_reduce",
            m * n,
            &mut [arg(&r), arg(&pp), arg(&out)],
        )?;
        Ok(dw)
    }

    /// `db[o] = sum of dy[img][o][.]`, `dy` viewed as `[n, o, pq]`.
    pub(super) fn bias_grad(
        &self,
        dy: &GpuBuf<D>,
        n: usize,
        o: usize,
        pq: usize,
    ) -> Result<GpuBuf<D>> {
        #[repr(C)]
        struct BiasGradArgs {
            n: i32,
            k: i32,
            pq: i32,
            pad_: i32,
        }
        let db = self.alloc(&[o])?;
        let a = BiasGradArgs {
            n: n as i32,
            k: o as i32,
            pq: pq as i32,
            pad_: 0,
        };
        let (dyp, dbp) = (dy.ptr(), db.ptr());
        self.launch(
            "conv_bias_grad",
            o,
            [o as u32, 1, 1],
            [256, 1, 1],
            &mut [arg(&a), arg(&dyp), arg(&dbp)],
        )?;
        Ok(db)
    }

    /// Eval-mode batch norm folded into the convolution before it: returns
    /// `(w', b')` with `w' = w * g`, `b' = (b - mean) * g + beta`,
    /// `g = gamma / sqrt(var + eps)` per output channel, so that
    /// `conv(x, w') + b'` equals `bn(conv(x, w) + b)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fold_bn_kernel(
        &self,
        w: &GpuBuf<D>,
        b: Option<&GpuBuf<D>>,
        gamma: &GpuBuf<D>,
        beta: &GpuBuf<D>,
        mean: &GpuBuf<D>,
        var: &GpuBuf<D>,
        eps: f32,
    ) -> Result<(GpuBuf<D>, GpuBuf<D>)> {
        let [o, c, kh, kw] = dims4("w", w.shape())?;
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
        #[repr(C)]
        struct FoldArgs {
            k: i32,
            per_k: i32,
            has_bias: i32,
            eps: f32,
        }
        let w2 = self.alloc(w.shape())?;
        let b2 = self.alloc(&[o])?;
        let a = FoldArgs {
            k: o as i32,
            per_k: (c * kh * kw) as i32,
            has_bias: b.is_some() as i32,
            eps,
        };
        let ptrs = [
            w.ptr(),
            b.map_or(0, |b| b.ptr()),
            gamma.ptr(),
            beta.ptr(),
            mean.ptr(),
            var.ptr(),
            w2.ptr(),
            b2.ptr(),
        ];
        let mut args = vec![arg(&a)];
        args.extend(ptrs.iter().map(arg));
        self.launch_flat("conv_fold_bn", o * c * kh * kw, &mut args)?;
        Ok((w2, b2))
    }
}

/// Arguments of the stride-1 dgrad GEMM of `g`'s output gradient into an
/// input of `[h, w]` through a filter of `[r, s]` taps padded by
/// `[pad, pad_w]`: the whole layer when they are `g`'s own, or one phase of
/// a strided layer (`phase_dgrad`).
fn dgrad_args(
    g: &Geom,
    [h, w]: [usize; 2],
    [r, s]: [usize; 2],
    [pad, pad_w]: [usize; 2],
    masked: bool,
) -> Result<ConvArgs> {
    let gn = g.n * h * w;
    let gk = g.o * r * s;
    check_extents("conv2d_backward_data", &[gn, gk])?;
    Ok(ConvArgs {
        h: h as i32,
        w: w as i32,
        r: r as i32,
        s: s as i32,
        stride: 1,
        pad: pad as i32,
        pad_w: pad_w as i32,
        gm: g.c as i32,
        gn: gn as i32,
        gk: gk as i32,
        flags: if masked { CONV_DY_MASK } else { 0 },
        ..g.args()
    })
}

/// Arguments of a linear layer as a 1x1 convolution of `[n, k, 1, 1]`.
pub(super) fn linear_args(n: usize, k: usize, o: usize, bias: bool) -> ConvArgs {
    ConvArgs {
        n: n as i32,
        c: k as i32,
        h: 1,
        w: 1,
        k: o as i32,
        r: 1,
        s: 1,
        p: 1,
        q: 1,
        stride: 1,
        pad: 0,
        flags: if bias { CONV_BIAS } else { 0 },
        gm: o as i32,
        gn: n as i32,
        gk: k as i32,
        k_chunk: 0,
        splits: 0,
        pad_w: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_k_splits_into_whole_k_steps_covering_k_once() {
        assert_eq!(gemm_k_splits(2047), (1, 2047));
        assert_eq!(gemm_k_splits(576), (1, 576));
        for k in [2048, 2160, 2304, 4096, 4608, 9 * 1024, 12345] {
            let (splits, chunk) = gemm_k_splits(k);
            assert!(splits >= 2, "{k}");
            assert!(chunk % 16 == 0 && chunk % BK == 0, "{k}: {chunk}");
            assert!(chunk <= SPLIT_K_CHUNK, "{k}: {chunk}");
            assert!(splits * chunk >= k && (splits - 1) * chunk < k, "{k}");
        }
        // resnet18's deepest 3x3 (512 channels): five chunks.
        assert_eq!(gemm_k_splits(4608), (5, 928));
    }

    #[test]
    fn only_a_stems_dgrad_runs_the_direct_kernel() {
        assert!(direct_dgrad(1) && direct_dgrad(3) && direct_dgrad(4));
        assert!(!direct_dgrad(5) && !direct_dgrad(64));
        // The GEMM's narrowest tile would waste most of its rows on them.
        let narrowest = TILES.iter().map(|t| t.bm).min().unwrap();
        assert!(narrowest >= 8 * DIRECT_DGRAD_CHANNELS);
    }

    #[test]
    fn a_grid_that_would_leave_sms_idle_takes_a_smaller_tile() {
        // resnet18's last layers at 4 searches x 4 images: 512 x 16 outputs.
        let deep = pick_tile_for(512, 16 * 16, 132);
        assert!(deep.bm * deep.bn < 128 * 128, "{deep:?}");
        assert!(512usize.div_ceil(deep.bm) * 256usize.div_ceil(deep.bn) > 8);
        // A grid that fills the device keeps the shape's tile.
        let wide = pick_tile_for(256, 128 * 1024, 132);
        assert_eq!(wide.fwd, pick_tile(256, 128 * 1024).fwd);
        // Too small for any tile to fill it: the most blocks.
        let tiny = pick_tile_for(64, 128, 132);
        let most = TILES
            .iter()
            .map(|t| 64usize.div_ceil(t.bm) * 128usize.div_ceil(t.bn))
            .max()
            .unwrap();
        assert_eq!(64usize.div_ceil(tiny.bm) * 128usize.div_ceil(tiny.bn), most);
        // One SM: never smaller than the shape's tile.
        assert_eq!(pick_tile_for(512, 256, 1).fwd, pick_tile(512, 256).fwd);
        // The tensor-core tiles alike.
        use super::super::conv_mma::{pick_mma_tile, pick_mma_tile_for, MMA_TILES};
        assert_eq!(pick_mma_tile_for(512, 256, 132), MMA_TILES[1]);
        assert_eq!(pick_mma_tile_for(512, 65536, 132), pick_mma_tile(512));
        assert_eq!(pick_mma_tile_for(512, 256, 1), pick_mma_tile(512));
    }

    #[test]
    fn wgrad_splits_cover_k_exactly_once() {
        for &(k, tiles, mn) in &[
            (1usize, 1usize, 1usize),
            (7, 3, 100),
            (262144, 1, 64 * 576),
            (262144, 36, 512 * 4608),
            (4096, 300, 10),
        ] {
            let (splits, chunk) = wgrad_splits(k, tiles, mn);
            assert!(splits >= 1 && chunk % BK == 0 && chunk > 0);
            assert!(splits * chunk >= k, "{k} {splits} {chunk}");
            assert!(
                (splits - 1) * chunk < k,
                "every split has work: {k} {splits} {chunk}"
            );
        }
    }
}
