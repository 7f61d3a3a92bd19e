//! A matrix product in which every output element is one fused
//! multiply-add chain over the inner index, in order `0..K`, starting from 0:
//! `c = fma(a[i][K-1], b[K-1][j], ... fma(a[i][0], b[0][j], 0))`.
//!
//! That order is fixed by `K` alone. Row and column tiling, cache blocking
//! of the inner index (a block resumes the chain from the stored partial
//! instead of summing partials), the number of columns in one call and the
//! thread that computes a tile all leave the bits unchanged. So the
//! convolutions can lay the columns of every image of a batch side by side
//! in one product and still give each image the bits it gets alone.
//!
//! The inner kernel is AVX-512 (two column panels, `MR x 2NR`, per call)
//! where the CPU has it, else AVX2 + FMA; elsewhere a portable kernel with
//! `f32::mul_add` (the same single rounding) runs the same chains, slower.
//! All three compute each element's chain in the same order, so which one
//! runs never changes a bit.

use rayon::prelude::*;

/// Rows of `C` one kernel call computes (one broadcast of `A` each).
pub(super) const MR: usize = 6;
/// Columns of `C` one kernel call computes (two 8-wide vectors).
pub(super) const NR: usize = 16;

/// Columns the widest kernel covers in one call (two panels): products
/// whose column ranges are cut at multiples of it never leave a lone panel
/// to the narrower kernel except at the very end.
pub(super) const CUT: usize = 2 * NR;

/// Row blocks (of [`MR`] rows) that [`product`] runs through one inner
/// block before the next: at most 192 rows, so the slice of `c` that the
/// inner blocks resume (192 x 256 floats) stays in a 512 KiB second-level
/// cache beside that group's rows of `a`. Taller products (a 1x1 layer of
/// 1024 or 2048 filters, the filter gradient's `C*KH*KW` rows) had sent
/// that slice to the third level on every inner block: 2304 x 512 x 256 on
/// one Zen 3 core ran at 74 GFLOP/s, 90 grouped (the kernel's peak is
/// about 97).
const ROW_GROUP: usize = 32;

/// Floats from which [`PackedA::new`] packs on all threads: below it the
/// hand-off costs more than the copy.
const PARALLEL_PACK: usize = 1 << 16;

/// `A` packed for the kernel: blocks of [`MR`] rows, each stored `k`-major
/// (`[block][k][MR]`), the last block padded with zero rows.
pub(super) struct PackedA {
    data: Vec<f32>,
    rows: usize,
    k: usize,
}

impl PackedA {
    /// Packs the `rows x k` matrix whose element `(i, kk)` is
    /// `src[i * rs + kk * cs]` (row-major `rs = k, cs = 1`; a transpose
    /// swaps them).
    ///
    /// A large matrix is packed on all threads: in training the filters
    /// change every step, and packing them on one thread left the others
    /// idle for about 3% of a resnet18 step.
    pub(super) fn new(src: &[f32], rows: usize, k: usize, rs: usize, cs: usize) -> Self {
        let blocks = rows.div_ceil(MR);
        let mut data = vec![0.0f32; blocks * k * MR];
        let pack = |(blk, dst): (usize, &mut [f32])| {
            let live = MR.min(rows - blk * MR);
            let row = |r: usize| (blk * MR + r) * rs;
            if cs == 1 {
                // Row-major source: read each row in order.
                for r in 0..live {
                    for (kk, &v) in src[row(r)..][..k].iter().enumerate() {
                        dst[kk * MR + r] = v;
                    }
                }
            } else {
                // Strided rows (a transpose): read the block's rows side
                // by side, one step of `k` at a time.
                for kk in 0..k {
                    for r in 0..live {
                        dst[kk * MR + r] = src[row(r) + kk * cs];
                    }
                }
            }
        };
        let chunk = (k * MR).max(1);
        if data.len() >= PARALLEL_PACK {
            data.par_chunks_exact_mut(chunk).enumerate().for_each(pack);
        } else {
            data.chunks_exact_mut(chunk).enumerate().for_each(pack);
        }
        PackedA { data, rows, k }
    }

    /// A `rows x k` matrix already in the packed layout (`[block][k][MR]`,
    /// the last block's missing rows zero), as a producer wrote it.
    ///
    /// # Panics
    /// If `data` does not hold exactly the blocks of `rows` rows.
    pub(super) fn from_packed(data: Vec<f32>, rows: usize, k: usize) -> Self {
        assert_eq!(
            data.len(),
            rows.div_ceil(MR) * k * MR,
            "gemm: packed A size"
        );
        PackedA { data, rows, k }
    }

    /// Floats held (the rows padded to whole blocks).
    pub(super) fn len(&self) -> usize {
        self.data.len()
    }

    /// Row blocks of [`MR`] rows (the last one may be partial).
    pub(super) fn blocks(&self) -> usize {
        self.rows.div_ceil(MR)
    }

    /// The packed floats, for tests that compare two packings.
    #[cfg(test)]
    pub(super) fn data(&self) -> &[f32] {
        &self.data
    }
}

/// The `A` operand as the kernels read it: element `(i, kk)` of row block
/// `blk` at `data[blk * block_stride + (i % MR) * rs + kk * ks]`. A
/// [`PackedA`] is one such layout (`rs = 1, ks = MR`); a row-major matrix
/// is another (`rs = lda, ks = 1`), so an operand whose rows a producer
/// writes anyway (the backward-filter's column matrix) needs no packing.
#[derive(Clone, Copy)]
pub(super) struct AView<'a> {
    data: &'a [f32],
    k: usize,
    blocks: usize,
    block_stride: usize,
    rs: usize,
    ks: usize,
}

impl<'a> AView<'a> {
    /// The first `k` columns of the row-major `data` (row stride `lda`) as
    /// `rows` rows; `data` must hold whole row blocks (`rows` rounded up to
    /// [`MR`]), since the kernels read every row of a block (the extra rows
    /// give rows of `c` that mean nothing).
    pub(super) fn row_major(data: &'a [f32], rows: usize, k: usize, lda: usize) -> Self {
        let blocks = rows.div_ceil(MR);
        assert!(
            lda >= k && data.len() >= (blocks * MR).saturating_sub(1) * lda + k,
            "gemm: row-major A too short"
        );
        AView {
            data,
            k,
            blocks,
            block_stride: MR * lda,
            rs: lda,
            ks: 1,
        }
    }

    /// Row blocks of [`MR`] rows.
    pub(super) fn blocks(&self) -> usize {
        self.blocks
    }

    /// The `kn` steps from `k0` of row block `blk`, from its first element.
    fn block(&self, blk: usize, k0: usize, kn: usize) -> &'a [f32] {
        let at = blk * self.block_stride + k0 * self.ks;
        &self.data[at..at + (MR - 1) * self.rs + (kn - 1) * self.ks + 1]
    }
}

impl<'a> From<&'a PackedA> for AView<'a> {
    fn from(a: &'a PackedA) -> Self {
        AView {
            data: &a.data,
            k: a.k,
            blocks: a.blocks(),
            block_stride: a.k * MR,
            rs: 1,
            ks: MR,
        }
    }
}

/// A row stride of at least `cols` floats (rounded up to [`NR`]) that is an
/// odd number of 64-byte lines, so that the `MR` rows one kernel call
/// writes of `c` do not all fall into the same few cache sets.
pub(super) fn padded_stride(cols: usize) -> usize {
    let s = cols.div_ceil(NR) * NR;
    if (s / NR).is_multiple_of(2) {
        s + NR
    } else {
        s
    }
}

/// `c[i][j] = sum_k a[i][k] b[k][j]` for the row blocks `blocks` of `a` and
/// the columns `0..cols` of `b`, which is laid out as the kernel reads it:
/// column panels of [`NR`], each `k x NR` with its rows back to back
/// (element `(kk, j)` at [`panel_index`]), so the kernel streams it from
/// memory in order. Producers (im2col, the Winograd input transform, the
/// gathered `dY`) write this layout directly, sparing a packing copy.
///
/// `c` is row-major with stride `ldc` and holds `blocks.len() * MR` rows;
/// columns are computed in whole panels, so `ldc` must cover `cols` rounded
/// up to `NR` (the extra columns and rows of `c` receive values that mean
/// nothing).
///
/// The inner index is cut into blocks sized to keep the row blocks of `a`
/// in the second-level cache; see the module doc for why this leaves every
/// element's chain, and so its bits, unchanged.
pub(super) fn gemm<'a>(
    a: impl Into<AView<'a>>,
    blocks: std::ops::Range<usize>,
    b: &[f32],
    cols: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let a = a.into();
    product(
        a,
        blocks,
        BSource::Panels(BRows::all(b, a.k)),
        cols,
        c,
        ldc,
        false,
    );
}

/// The `B` operand read in place from windows of one buffer, not from a
/// packed copy: element `(kk, j)` at `data[panels[j / NR] + rows[kk] + j %
/// NR]`. A stride-1 convolution's column matrix is such windows of the
/// zero-padded input (row `(c, kh, kw)` is the input shifted by its tap),
/// so the product reads the input where it lies instead of a copy nine
/// times its size. Only where `B` is read from changes: every element's
/// chain, and so its bits, are those of [`gemm`] on the same matrix.
#[derive(Clone, Copy)]
pub(super) struct Windows<'a> {
    data: &'a [f32],
    rows: &'a [usize],
    panels: &'a [usize],
    /// One past the farthest float a panel reads from its first.
    reach: usize,
}

impl<'a> Windows<'a> {
    /// The windows `rows` (one offset per inner index) of the panels that
    /// start at `panels` (one offset per [`NR`] columns) in `data`.
    ///
    /// # Panics
    /// If some window runs past the end of `data`.
    pub(super) fn new(data: &'a [f32], rows: &'a [usize], panels: &'a [usize]) -> Self {
        let reach = rows.iter().max().map_or(0, |&r| r + NR);
        let last = panels.iter().max().copied().unwrap_or(0);
        assert!(
            panels.is_empty() || last + reach <= data.len(),
            "gemm: windows run past their buffer"
        );
        Windows {
            data,
            rows,
            panels,
            reach,
        }
    }

    /// The same windows from panel `p` on (the columns `p * NR..`).
    pub(super) fn panels_from(&self, p: usize) -> Self {
        Windows {
            panels: &self.panels[p..],
            ..*self
        }
    }
}

/// [`gemm`] with `b` read from [`Windows`]; `cols` must not exceed the
/// columns its panels cover.
pub(super) fn gemm_windows<'a>(
    a: impl Into<AView<'a>>,
    blocks: std::ops::Range<usize>,
    b: Windows<'_>,
    cols: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let a = a.into();
    assert!(b.rows.len() == a.k, "gemm: one window per inner index");
    assert!(cols.div_ceil(NR) <= b.panels.len(), "gemm: windows too few");
    product(a, blocks, BSource::Windows(b), cols, c, ldc, false);
}

/// [`gemm`] with `b` the rows `from..` of a `depth`-deep panel layout, as
/// many as `a` has columns, and, when `onto`, every element's chain
/// continued from the value in `c` as if the inner index went on: products
/// over `k1` then over `k2` this way give the bits of one product over
/// `k1 + k2`. So a long inner extent (the backward-filter's positions of
/// many images) is multiplied a slice at a time, from one `B` written once.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_rows<'a>(
    a: impl Into<AView<'a>>,
    blocks: std::ops::Range<usize>,
    b: &[f32],
    depth: usize,
    from: usize,
    cols: usize,
    c: &mut [f32],
    ldc: usize,
    onto: bool,
) {
    let a = a.into();
    assert!(from + a.k <= depth, "gemm: b rows out of range");
    let b = BRows {
        data: b,
        depth,
        from,
    };
    product(a, blocks, BSource::Panels(b), cols, c, ldc, onto);
}

/// The `B` operand of a product: the rows `from..` of a `depth`-deep panel
/// layout.
#[derive(Clone, Copy)]
struct BRows<'a> {
    data: &'a [f32],
    depth: usize,
    from: usize,
}

impl<'a> BRows<'a> {
    /// A whole `k`-deep panel layout.
    fn all(data: &'a [f32], k: usize) -> Self {
        BRows {
            data,
            depth: k,
            from: 0,
        }
    }
}

/// Where a product reads `B` from.
#[derive(Clone, Copy)]
enum BSource<'a> {
    /// The packed panel layout.
    Panels(BRows<'a>),
    /// Windows of a buffer read in place.
    Windows(Windows<'a>),
}

impl<'a> BSource<'a> {
    /// The `kn` rows from `k0` of the `n` panels from `p`.
    fn tile(&self, p: usize, n: usize, k0: usize, kn: usize) -> BTile<'a> {
        match *self {
            BSource::Panels(b) => BTile::Panels {
                data: &b.data[panel_index(b.from + k0, p * NR, b.depth)..],
                pstride: b.depth * NR,
            },
            BSource::Windows(w) => BTile::Windows {
                data: w.data,
                first: [w.panels[p], w.panels[p + n - 1]],
                rows: &w.rows[k0..k0 + kn],
                reach: w.reach,
            },
        }
    }
}

/// The `B` of one kernel call: one or two panels of `kn` rows.
#[derive(Clone, Copy)]
enum BTile<'a> {
    /// Rows of [`NR`] back to back, the panels `pstride` floats apart.
    Panels { data: &'a [f32], pstride: usize },
    /// Row `kk` of panel `j` at `data[first[j] + rows[kk]..]`; no row
    /// reaches `reach` floats or more past its panel's first.
    Windows {
        data: &'a [f32],
        first: [usize; 2],
        rows: &'a [usize],
        reach: usize,
    },
}

/// [`gemm`], [`gemm_rows`] and [`gemm_windows`]: the chains start from 0,
/// or from `c` when `onto`.
fn product(
    a: AView<'_>,
    blocks: std::ops::Range<usize>,
    b: BSource<'_>,
    cols: usize,
    c: &mut [f32],
    ldc: usize,
    onto: bool,
) {
    let k = a.k;
    let panels = cols.div_ceil(NR);
    let nblk = blocks.len();
    assert!(blocks.end <= a.blocks, "gemm: row blocks out of range");
    assert!(ldc >= panels * NR, "gemm: strides");
    if let BSource::Panels(b) = b {
        assert!(b.data.len() >= panels * b.depth * NR, "gemm: b too short");
    }
    assert!(c.len() >= nblk * MR * ldc, "gemm: c too short");
    if k == 0 {
        if !onto {
            for row in c.chunks_exact_mut(ldc).take(nblk * MR) {
                row[..panels * NR].fill(0.0);
            }
        }
        return;
    }
    let isa = Isa::detect();
    // Panels go two at a time where the kernel takes two.
    let step = isa.panels_per_call();
    // Row blocks go in groups of at most `ROW_GROUP`, of equal size (see
    // there). About 192 KiB of a group's `a` per inner block (it stays in
    // the second-level cache), and at most 16 KiB of `b` per kernel call
    // (`kc x NR` per panel), so that the panels stay in the first-level
    // cache while every row block of the group streams past them.
    let group = nblk.div_ceil(nblk.div_ceil(ROW_GROUP).max(1)).max(1);
    let kc = ((48 * 1024) / (group * MR)).clamp(64, 256 / step);
    // Column blocks of 256 keep the slice of `c` that every inner block
    // resumes small.
    for p0 in (0..panels).step_by(16) {
        let p1 = (p0 + 16).min(panels);
        for g0 in (0..nblk).step_by(group) {
            let g1 = (g0 + group).min(nblk);
            for k0 in (0..k).step_by(kc) {
                let kn = kc.min(k - k0);
                for p in (p0..p1).step_by(step) {
                    let n = step.min(p1 - p);
                    let bp = b.tile(p, n, k0, kn);
                    for local in g0..g1 {
                        let blk = blocks.start + local;
                        let ap = AStep {
                            data: a.block(blk, k0, kn),
                            rs: a.rs,
                            ks: a.ks,
                        };
                        let cp = &mut c[local * MR * ldc + p * NR..];
                        tile(isa, kn, ap, bp, n, cp, ldc, onto || k0 > 0);
                    }
                }
            }
        }
    }
}

/// Where element `(kk, j)` of a `k`-deep operand sits in the layout
/// [`gemm`] reads.
#[inline]
pub(super) fn panel_index(kk: usize, j: usize, k: usize) -> usize {
    (j / NR * k + kk) * NR + j % NR
}

/// Copies `src` into row `kk` of a `k`-deep operand in the layout [`gemm`]
/// reads, from column `j`: one panel's share at a time. With a `gate` (a
/// ReLU's output beside `src`), each value passes through
/// [`relu_gate`](super::elementwise::relu_gate) on the way.
pub(super) fn copy_into_panels(
    panels: &mut [f32],
    k: usize,
    kk: usize,
    j: usize,
    src: &[f32],
    gate: Option<&[f32]>,
) {
    let mut done = 0;
    while done < src.len() {
        let col = j + done;
        let n = (NR - col % NR).min(src.len() - done);
        let (at, values) = (panel_index(kk, col, k), &src[done..done + n]);
        let gate = gate.map(|y| &y[done..done + n]);
        if let (None, Ok(d), Ok(s)) = (
            gate,
            <&mut [f32; NR]>::try_from(&mut panels[at..at + n]),
            <&[f32; NR]>::try_from(values),
        ) {
            // A whole panel row: one fixed-size move, not a `memcpy` call.
            *d = *s;
        } else {
            super::elementwise::copy_gated(&mut panels[at..at + n], values, gate);
        }
        done += n;
    }
}

/// Zeros the columns `cols..` of the last panel of a `k`-deep panel layout
/// (they are multiplied like the others; zeros keep them from holding
/// stale NaNs or subnormals).
pub(super) fn zero_panel_tail(panels: &mut [f32], k: usize, cols: usize) {
    if cols.is_multiple_of(NR) {
        return;
    }
    let last = &mut panels[cols / NR * k * NR..][..k * NR];
    for row in last.chunks_exact_mut(NR) {
        row[cols % NR..].fill(0.0);
    }
}

/// The instruction sets the kernels come in, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best the CPU runs (the checks are cached by the standard library).
    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Column panels one kernel call covers.
    fn panels_per_call(self) -> usize {
        if self == Isa::Avx512 {
            2
        } else {
            1
        }
    }
}

/// One row block of `A` from the first step a tile takes: element
/// `(r, kk)` at `data[r * rs + kk * ks]`.
#[derive(Clone, Copy)]
struct AStep<'a> {
    data: &'a [f32],
    rs: usize,
    ks: usize,
}

impl AStep<'_> {
    /// Whether `data` holds all `MR` rows of `kn` steps.
    fn covers(&self, kn: usize) -> bool {
        kn >= 1 && self.data.len() > (MR - 1) * self.rs + (kn - 1) * self.ks
    }
}

/// The `MR x (n * NR)` tile of `c` from `kn` steps of `a` and the `n`
/// panels of `b`, on `isa`'s kernel; a lone panel where `isa` takes two
/// goes to the next kernel down.
#[allow(clippy::too_many_arguments)]
fn tile(
    isa: Isa,
    kn: usize,
    a: AStep<'_>,
    b: BTile<'_>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    assert!(
        (1..=2).contains(&n) && kn >= 1 && a.covers(kn),
        "gemm: tile operands"
    );
    assert!(c.len() >= (MR - 1) * ldc + n * NR, "gemm: tile output");
    match b {
        BTile::Panels { data, pstride } => {
            assert!(
                pstride >= kn * NR && data.len() >= (n - 1) * pstride + kn * NR,
                "gemm: tile operands"
            );
            run(
                isa,
                kn,
                a,
                data,
                [0, (n - 1) * pstride],
                Packed,
                n,
                c,
                ldc,
                resume,
            );
        }
        BTile::Windows {
            data,
            first,
            rows,
            reach,
        } => {
            assert!(
                rows.len() >= kn && first.iter().all(|&f| f + reach <= data.len()),
                "gemm: tile operands"
            );
            run(isa, kn, a, data, first, Listed(rows), n, c, ldc, resume);
        }
    }
}

/// [`tile`] once its operands are checked: panel `j` of `b` starts at
/// `data[first[j]]`, its row `kk` `rows.at(kk)` floats further, and every
/// row read lies inside `data`.
#[allow(clippy::too_many_arguments)]
fn run<R: RowAt>(
    isa: Isa,
    kn: usize,
    a: AStep<'_>,
    data: &[f32],
    first: [usize; 2],
    rows: R,
    n: usize,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    let at = |j: usize| data[first[j]..].as_ptr();
    match (isa, n) {
        // SAFETY: `detect` found the feature; `tile` checked that every
        // row of both panels, `a`'s steps and `c`'s tile are in bounds.
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, 2) => unsafe { kernel_avx512(kn, a, [at(0), at(1)], rows, c, ldc, resume) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512 | Isa::Avx2, _) => {
            for j in 0..n {
                // SAFETY: as above; AVX-512 implies AVX2 and FMA.
                unsafe { kernel_avx2(kn, a, at(j), rows, &mut c[j * NR..], ldc, resume) };
            }
        }
        _ => {
            for j in 0..n {
                kernel_portable(
                    kn,
                    a,
                    &data[first[j]..],
                    rows,
                    &mut c[j * NR..],
                    ldc,
                    resume,
                );
            }
        }
    }
}

/// Where row `kk` of a kernel's `B` panel starts, in floats from the
/// panel's first: the kernels are generic over it, so the packed layout
/// keeps its fixed stride and windows pay one offset load per step.
trait RowAt: Copy {
    fn at(self, kk: usize) -> usize;
}

/// Rows of [`NR`] floats back to back (the packed layout).
#[derive(Clone, Copy)]
struct Packed;

impl RowAt for Packed {
    #[inline(always)]
    fn at(self, kk: usize) -> usize {
        kk * NR
    }
}

/// Rows at listed offsets ([`Windows`]).
#[derive(Clone, Copy)]
struct Listed<'a>(&'a [usize]);

impl RowAt for Listed<'_> {
    #[inline(always)]
    fn at(self, kk: usize) -> usize {
        self.0[kk]
    }
}

/// The reference kernel: an `MR x NR` tile of `c`, each element's chain
/// resumed from `c` when `resume`, else started from 0.
fn kernel_portable(
    kn: usize,
    a: AStep<'_>,
    b: &[f32],
    rows: impl RowAt,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    if resume {
        for (r, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[r * ldc..r * ldc + NR]);
        }
    }
    for kk in 0..kn {
        let brow = &b[rows.at(kk)..][..NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let av = a.data[r * a.rs + kk * a.ks];
            for (v, &bv) in row.iter_mut().zip(brow) {
                *v = av.mul_add(bv, *v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + NR].copy_from_slice(row);
    }
}

/// [`kernel_portable`] in AVX2: twelve 8-wide accumulators.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `NR` floats from `bp` plus each of the
/// `kn` rows' offsets must be readable, `c` must hold `MR` rows of `NR` at
/// stride `ldc`, and `a` cover `kn` steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(
    kn: usize,
    a: AStep<'_>,
    bp: *const f32,
    rows: impl RowAt,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.covers(kn));
    debug_assert!(c.len() >= (MR - 1) * ldc + NR);
    let cp = c.as_mut_ptr();
    let (ap, rs, ks) = (a.data.as_ptr(), a.rs, a.ks);
    let mut acc = [_mm256_setzero_ps(); 2 * MR];
    if resume {
        for r in 0..MR {
            acc[2 * r] = _mm256_loadu_ps(cp.add(r * ldc));
            acc[2 * r + 1] = _mm256_loadu_ps(cp.add(r * ldc + 8));
        }
    }
    let [mut c00, mut c01, mut c10, mut c11, mut c20, mut c21, mut c30, mut c31, mut c40, mut c41, mut c50, mut c51] =
        acc;
    for kk in 0..kn {
        let row = bp.add(rows.at(kk));
        let b0 = _mm256_loadu_ps(row);
        let b1 = _mm256_loadu_ps(row.add(8));
        let a_k = ap.add(kk * ks);
        let x = _mm256_broadcast_ss(&*a_k);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        let x = _mm256_broadcast_ss(&*a_k.add(rs));
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        let x = _mm256_broadcast_ss(&*a_k.add(2 * rs));
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        let x = _mm256_broadcast_ss(&*a_k.add(3 * rs));
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        let x = _mm256_broadcast_ss(&*a_k.add(4 * rs));
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        let x = _mm256_broadcast_ss(&*a_k.add(5 * rs));
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    let acc = [c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51];
    for r in 0..MR {
        _mm256_storeu_ps(cp.add(r * ldc), acc[2 * r]);
        _mm256_storeu_ps(cp.add(r * ldc + 8), acc[2 * r + 1]);
    }
}

/// [`kernel_portable`] over two panels in AVX-512: an `MR x 2NR` tile,
/// twelve 16-wide accumulators, the panels starting at `bp[0]` and `bp[1]`.
/// Each element's chain is the same as the other kernels'.
///
/// # Safety
/// The CPU must have AVX-512F; `NR` floats from each of `bp` plus each of
/// the `kn` rows' offsets must be readable, `c` must hold `MR` rows of
/// `2 * NR` at stride `ldc`, and `a` cover `kn` steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_avx512(
    kn: usize,
    a: AStep<'_>,
    bp: [*const f32; 2],
    rows: impl RowAt,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.covers(kn));
    debug_assert!(c.len() >= (MR - 1) * ldc + 2 * NR);
    let cp = c.as_mut_ptr();
    let (ap, rs, ks) = (a.data.as_ptr(), a.rs, a.ks);
    let [b0p, b1p] = bp;
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    if resume {
        for r in 0..MR {
            acc[2 * r] = _mm512_loadu_ps(cp.add(r * ldc));
            acc[2 * r + 1] = _mm512_loadu_ps(cp.add(r * ldc + NR));
        }
    }
    let [mut c00, mut c01, mut c10, mut c11, mut c20, mut c21, mut c30, mut c31, mut c40, mut c41, mut c50, mut c51] =
        acc;
    for kk in 0..kn {
        let row = rows.at(kk);
        let b0 = _mm512_loadu_ps(b0p.add(row));
        let b1 = _mm512_loadu_ps(b1p.add(row));
        let a_k = ap.add(kk * ks);
        let x = _mm512_set1_ps(*a_k);
        c00 = _mm512_fmadd_ps(x, b0, c00);
        c01 = _mm512_fmadd_ps(x, b1, c01);
        let x = _mm512_set1_ps(*a_k.add(rs));
        c10 = _mm512_fmadd_ps(x, b0, c10);
        c11 = _mm512_fmadd_ps(x, b1, c11);
        let x = _mm512_set1_ps(*a_k.add(2 * rs));
        c20 = _mm512_fmadd_ps(x, b0, c20);
        c21 = _mm512_fmadd_ps(x, b1, c21);
        let x = _mm512_set1_ps(*a_k.add(3 * rs));
        c30 = _mm512_fmadd_ps(x, b0, c30);
        c31 = _mm512_fmadd_ps(x, b1, c31);
        let x = _mm512_set1_ps(*a_k.add(4 * rs));
        c40 = _mm512_fmadd_ps(x, b0, c40);
        c41 = _mm512_fmadd_ps(x, b1, c41);
        let x = _mm512_set1_ps(*a_k.add(5 * rs));
        c50 = _mm512_fmadd_ps(x, b0, c50);
        c51 = _mm512_fmadd_ps(x, b1, c51);
    }
    let acc = [c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51];
    for r in 0..MR {
        _mm512_storeu_ps(cp.add(r * ldc), acc[2 * r]);
        _mm512_storeu_ps(cp.add(r * ldc + NR), acc[2 * r + 1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::*;

    /// `a [m,k] b [k,n]` through [`gemm`] with the given column count and
    /// row blocks, returned as a dense `m x n` matrix.
    fn product(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let pa = PackedA::new(a, m, k, k, 1);
        let ldc = padded_stride(n);
        let mut bb = vec![f32::NAN; k * n.div_ceil(NR) * NR];
        for kk in 0..k {
            for j in 0..n {
                bb[panel_index(kk, j, k)] = b[kk * n + j];
            }
        }
        zero_panel_tail(&mut bb, k, n);
        let mut c = vec![0.0f32; pa.blocks() * MR * ldc];
        gemm(&pa, 0..pa.blocks(), &bb, n, &mut c, ldc);
        (0..m * n).map(|i| c[i / n * ldc + i % n]).collect()
    }

    #[test]
    fn every_element_is_the_in_order_fma_chain_whatever_the_tiling() {
        // Sizes off every tile and block edge, an inner extent over several
        // cache blocks, more columns than one column block, 1-column and
        // 1-row products, and rows in several row groups (uneven at that).
        let mut r = rng(7);
        let sizes = [
            (13, 1500, 37),
            (1, 70, 1),
            (7, 3, 100),
            (50, 1200, 16),
            (8, 300, 290),
            (MR * ROW_GROUP * 2 + 5, 700, 40),
        ];
        for (m, k, n) in sizes {
            let a = uniform(&mut r, &[m, k], -1.0, 1.0);
            let b = uniform(&mut r, &[k, n], -1.0, 1.0);
            let got = product(a.data(), b.data(), m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let chain = (0..k).fold(0.0f32, |s, kk| {
                        a.data()[i * k + kk].mul_add(b.data()[kk * n + j], s)
                    });
                    let g = got[i * n + j];
                    assert_eq!(g.to_bits(), chain.to_bits(), "{m}x{k}x{n} at ({i},{j})");
                }
            }
            // Any subset of columns gives the same bits for those columns.
            let sub = product(a.data(), &column(b.data(), k, n, n / 2), m, k, 1);
            for i in 0..m {
                assert_eq!(sub[i].to_bits(), got[i * n + n / 2].to_bits());
            }
        }
    }

    /// The kernels this CPU runs, the portable one first.
    fn isas() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if std::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    #[test]
    fn every_kernel_this_cpu_runs_gives_the_portable_kernels_bits() {
        // Two panels with a gap between them (NaN, so reading it shows),
        // fresh and resumed chains, packed and as windows: a kernel that
        // mixes up panels, rows or the resume path fails whichever CPU runs
        // CI.
        let mut r = rng(11);
        let kn = 37;
        let pstride = (kn + 5) * NR;
        let a = uniform(&mut r, &[kn * MR], -1.0, 1.0);
        let mut b = uniform(&mut r, &[pstride + kn * NR], -1.0, 1.0);
        b.data_mut()[kn * NR..pstride].fill(f32::NAN);
        // The same two panels as windows of a buffer: row `kk` at a
        // scattered offset (a permutation, rows a float apart).
        let rows: Vec<usize> = (0..kn).map(|kk| (kk * 29) % kn * (NR + 1)).collect();
        let first = [5, 700];
        let mut windows = vec![f32::NAN; 2000];
        for (j, f) in first.iter().enumerate() {
            for (kk, &row) in rows.iter().enumerate() {
                let src = &b.data()[j * pstride + kk * NR..][..NR];
                windows[f + row..f + row + NR].copy_from_slice(src);
            }
        }
        let reach = rows.iter().max().unwrap() + NR;
        let start = uniform(&mut r, &[MR * 3 * NR], -1.0, 1.0);
        let ldc = 3 * NR;
        let packed = AStep {
            data: a.data(),
            rs: 1,
            ks: MR,
        };
        let panels = BTile::Panels {
            data: b.data(),
            pstride,
        };
        let win = BTile::Windows {
            data: &windows,
            first,
            rows: &rows,
            reach,
        };
        for resume in [false, true] {
            let mut want = start.data().to_vec();
            tile(Isa::Portable, kn, packed, panels, 2, &mut want, ldc, resume);
            for isa in isas() {
                for (what, bt) in [("panels", panels), ("windows", win)] {
                    let mut got = start.data().to_vec();
                    tile(isa, kn, packed, bt, 2, &mut got, ldc, resume);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "{isa:?} {what} resume={resume} at {i}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_product_over_windows_gives_the_bits_of_the_packed_product() {
        // B's rows are shifted views of one buffer (a 1-D "image" with 3
        // taps over 2 channels), 70 columns in 5 panels placed at scattered
        // starts, against the same matrix copied into the packed layout.
        let (m, n, taps, chans, len) = (13, 70usize, 3, 2, 400);
        let k = taps * chans;
        let mut r = rng(3);
        let a = uniform(&mut r, &[m, k], -1.0, 1.0);
        let src = uniform(&mut r, &[chans * len + 200], -1.0, 1.0);
        let rows: Vec<usize> = (0..k).map(|kk| kk / taps * len + kk % taps).collect();
        let panels: Vec<usize> = (0..n.div_ceil(NR)).map(|p| p * 19 + p % 2).collect();
        let mut bb = vec![0.0f32; k * n];
        for kk in 0..k {
            for j in 0..n {
                bb[kk * n + j] = src.data()[panels[j / NR] + rows[kk] + j % NR];
            }
        }
        let want = product(a.data(), &bb, m, k, n);
        let pa = PackedA::new(a.data(), m, k, k, 1);
        let ldc = padded_stride(n);
        let mut c = vec![0.0f32; pa.blocks() * MR * ldc];
        let w = Windows::new(src.data(), &rows, &panels);
        gemm_windows(&pa, 0..pa.blocks(), w, n, &mut c, ldc);
        for i in 0..m {
            for j in 0..n {
                let (g, w) = (c[i * ldc + j], want[i * n + j]);
                assert_eq!(g.to_bits(), w.to_bits(), "at ({i},{j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "windows run past their buffer")]
    fn windows_past_the_buffer_are_refused() {
        let data = vec![0.0f32; 100];
        let _ = Windows::new(&data, &[0, 50], &[0, 40]);
    }

    #[test]
    fn a_row_major_a_and_slices_resumed_from_c_give_the_bits_of_one_packed_product() {
        // 13 rows (two whole blocks and a partial one) at a row stride
        // wider than k, and 37 columns: a row-major `A` read in place, and
        // the inner index in slices of 1, 64 and 200 resumed from `c`,
        // against one product of the packed `A`.
        let (m, k, n, lda) = (13, 300, 37, 307);
        let mut r = rng(5);
        let a = uniform(&mut r, &[m, k], -1.0, 1.0);
        let b = uniform(&mut r, &[k, n], -1.0, 1.0);
        let want = product(a.data(), b.data(), m, k, n);
        let mut strided = vec![f32::NAN; m.div_ceil(MR) * MR * lda];
        for (dst, src) in strided.chunks_exact_mut(lda).zip(a.data().chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let mut bb = vec![f32::NAN; k * n.div_ceil(NR) * NR];
        for kk in 0..k {
            for j in 0..n {
                bb[panel_index(kk, j, k)] = b.data()[kk * n + j];
            }
        }
        zero_panel_tail(&mut bb, k, n);
        let ldc = padded_stride(n);
        for slice in [1, 64, 200, k] {
            let mut c = vec![0.0f32; m.div_ceil(MR) * MR * ldc];
            for k0 in (0..k).step_by(slice) {
                let kn = slice.min(k - k0);
                let a = AView::row_major(&strided[k0..], m, kn, lda);
                gemm_rows(a, 0..a.blocks(), &bb, k, k0, n, &mut c, ldc, k0 > 0);
            }
            for i in 0..m {
                for j in 0..n {
                    let (g, w) = (c[i * ldc + j], want[i * n + j]);
                    assert_eq!(g.to_bits(), w.to_bits(), "slices of {slice} at ({i},{j})");
                }
            }
        }
    }

    fn column(b: &[f32], k: usize, n: usize, j: usize) -> Vec<f32> {
        (0..k).map(|kk| b[kk * n + j]).collect()
    }

    #[test]
    fn zero_inner_extent_gives_zeros() {
        let pa = PackedA::new(&[], 3, 0, 0, 1);
        let mut c = vec![1.0f32; MR * NR];
        gemm(&pa, 0..1, &[], 5, &mut c, NR);
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
