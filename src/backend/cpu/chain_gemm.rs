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
//! The inner kernel is AVX2 + FMA where the CPU has them; elsewhere a
//! portable kernel with `f32::mul_add` (the same single rounding) runs the
//! same chains, slower.

/// Rows of `C` one kernel call computes (one broadcast of `A` each).
pub(super) const MR: usize = 6;
/// Columns of `C` one kernel call computes (two 8-wide vectors).
pub(super) const NR: usize = 16;

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
    pub(super) fn new(src: &[f32], rows: usize, k: usize, rs: usize, cs: usize) -> Self {
        let blocks = rows.div_ceil(MR);
        let mut data = vec![0.0f32; blocks * k * MR];
        for (blk, dst) in data.chunks_exact_mut((k * MR).max(1)).enumerate() {
            for r in 0..MR.min(rows - blk * MR) {
                let row = (blk * MR + r) * rs;
                for kk in 0..k {
                    dst[kk * MR + r] = src[row + kk * cs];
                }
            }
        }
        PackedA { data, rows, k }
    }

    /// Row blocks of [`MR`] rows (the last one may be partial).
    pub(super) fn blocks(&self) -> usize {
        self.rows.div_ceil(MR)
    }
}

/// A row stride of at least `cols` floats (rounded up to [`NR`]) that is an
/// odd number of 64-byte lines, so that the rows of one column panel do not
/// all fall into the same few cache sets.
pub(super) fn padded_stride(cols: usize) -> usize {
    let s = cols.div_ceil(NR) * NR;
    if (s / NR).is_multiple_of(2) {
        s + NR
    } else {
        s
    }
}

/// `c[i][j] = sum_k a[i][k] b[k][j]` for the row blocks `blocks` of `a` and
/// the columns `0..cols` of `b` (a row-major `[K][ldb]` buffer). `c` is
/// row-major with stride `ldc` and holds `blocks.len() * MR` rows; columns
/// are computed in whole panels of [`NR`], so `ldb` and `ldc` must cover
/// `cols` rounded up to `NR` (the extra columns and rows of `c` receive
/// values that mean nothing).
///
/// The inner index is cut into blocks sized to keep the row blocks of `a`
/// in the second-level cache; see the module doc for why this leaves every
/// element's chain, and so its bits, unchanged.
pub(super) fn gemm(
    a: &PackedA,
    blocks: std::ops::Range<usize>,
    b: &[f32],
    ldb: usize,
    cols: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let k = a.k;
    let panels = cols.div_ceil(NR);
    let nblk = blocks.len();
    assert!(blocks.end <= a.blocks(), "gemm: row blocks out of range");
    assert!(ldb >= panels * NR && ldc >= panels * NR, "gemm: strides");
    assert!(
        k == 0 || b.len() >= (k - 1) * ldb + panels * NR,
        "gemm: b too short"
    );
    assert!(c.len() >= nblk * MR * ldc, "gemm: c too short");
    if k == 0 {
        for row in c.chunks_exact_mut(ldc).take(nblk * MR) {
            row[..panels * NR].fill(0.0);
        }
        return;
    }
    // About 192 KiB of `a` per inner block (it stays in the second-level
    // cache), and at most 256 deep, so that one packed panel of `b`
    // (`kc x NR`, 16 KiB) stays in the first-level cache while every row
    // block of `a` streams past it.
    let kc = ((48 * 1024) / (nblk * MR).max(1)).clamp(64, 256);
    // Column blocks keep the packed slice of `b` small.
    const COL_BLOCK: usize = 256 / NR;
    let avx = has_avx2_fma();
    PANELS.with(|cell| {
        let mut panels_buf = cell.borrow_mut();
        for p0 in (0..panels).step_by(COL_BLOCK) {
            let p1 = (p0 + COL_BLOCK).min(panels);
            for k0 in (0..k).step_by(kc) {
                let kn = kc.min(k - k0);
                let packed = pack_panels(&mut panels_buf, b, ldb, k0..k0 + kn, p0..p1);
                for (q, bp) in packed.chunks_exact(kn * NR).enumerate() {
                    let p = p0 + q;
                    for (local, blk) in blocks.clone().enumerate() {
                        let ap = &a.data[(blk * k + k0) * MR..][..kn * MR];
                        let cp = &mut c[local * MR * ldc + p * NR..];
                        // SAFETY: `bp` holds `kn` rows of NR floats back to
                        // back, and the asserts above keep MR rows of `c` at
                        // stride `ldc` (NR each) inside `cp`.
                        #[cfg(target_arch = "x86_64")]
                        if avx {
                            unsafe { kernel_avx2(kn, ap, bp, NR, cp, ldc, k0 > 0) };
                            continue;
                        }
                        let _ = avx;
                        kernel_portable(kn, ap, bp, NR, cp, ldc, k0 > 0);
                    }
                }
            }
        }
    });
}

thread_local! {
    /// Each thread's buffer for the packed panels of `b` (a few hundred KiB
    /// at most, kept between calls).
    static PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies rows `rows` of the column panels `panels` of `b` (row-major,
/// stride `ldb`) into `buf` panel after panel, each `rows.len() x NR` with
/// its rows back to back: the kernel then reads `b` as one contiguous
/// stream instead of one cache line (and, for wide `b`, one page) per row.
/// The arithmetic is unchanged; only where the operands sit.
fn pack_panels<'a>(
    buf: &'a mut Vec<f32>,
    b: &[f32],
    ldb: usize,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
) -> &'a [f32] {
    let (kn, width) = (rows.len(), panels.len() * NR);
    if buf.len() < kn * width {
        buf.resize(kn * width, 0.0);
    }
    for (kk, r) in rows.enumerate() {
        let src = &b[r * ldb + panels.start * NR..][..width];
        for (q, chunk) in src.chunks_exact(NR).enumerate() {
            buf[(q * kn + kk) * NR..][..NR].copy_from_slice(chunk);
        }
    }
    &buf[..kn * width]
}

/// Whether the AVX2 + FMA kernel can run (checked once per process).
fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The reference kernel: an `MR x NR` tile of `c`, each element's chain
/// resumed from `c` when `resume`, else started from 0.
fn kernel_portable(
    kn: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
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
        let brow = &b[kk * ldb..kk * ldb + NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let av = a[kk * MR + r];
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
/// The CPU must have AVX2 and FMA; `b` must hold `kn` rows of `NR` floats at
/// stride `ldb`, `c` `MR` rows of `NR` at stride `ldc`, `a` `kn * MR` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(
    kn: usize,
    a: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    resume: bool,
) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= kn * MR);
    debug_assert!(kn == 0 || b.len() >= (kn - 1) * ldb + NR);
    debug_assert!(c.len() >= (MR - 1) * ldc + NR);
    let cp = c.as_mut_ptr();
    let ap = a.as_ptr();
    let bp = b.as_ptr();
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
        let b0 = _mm256_loadu_ps(bp.add(kk * ldb));
        let b1 = _mm256_loadu_ps(bp.add(kk * ldb + 8));
        let a_k = ap.add(kk * MR);
        let x = _mm256_broadcast_ss(&*a_k);
        c00 = _mm256_fmadd_ps(x, b0, c00);
        c01 = _mm256_fmadd_ps(x, b1, c01);
        let x = _mm256_broadcast_ss(&*a_k.add(1));
        c10 = _mm256_fmadd_ps(x, b0, c10);
        c11 = _mm256_fmadd_ps(x, b1, c11);
        let x = _mm256_broadcast_ss(&*a_k.add(2));
        c20 = _mm256_fmadd_ps(x, b0, c20);
        c21 = _mm256_fmadd_ps(x, b1, c21);
        let x = _mm256_broadcast_ss(&*a_k.add(3));
        c30 = _mm256_fmadd_ps(x, b0, c30);
        c31 = _mm256_fmadd_ps(x, b1, c31);
        let x = _mm256_broadcast_ss(&*a_k.add(4));
        c40 = _mm256_fmadd_ps(x, b0, c40);
        c41 = _mm256_fmadd_ps(x, b1, c41);
        let x = _mm256_broadcast_ss(&*a_k.add(5));
        c50 = _mm256_fmadd_ps(x, b0, c50);
        c51 = _mm256_fmadd_ps(x, b1, c51);
    }
    let acc = [c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51];
    for r in 0..MR {
        _mm256_storeu_ps(cp.add(r * ldc), acc[2 * r]);
        _mm256_storeu_ps(cp.add(r * ldc + 8), acc[2 * r + 1]);
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
        let ldb = padded_stride(n);
        let mut bb = vec![0.0f32; k * ldb];
        for kk in 0..k {
            bb[kk * ldb..kk * ldb + n].copy_from_slice(&b[kk * n..(kk + 1) * n]);
        }
        let mut c = vec![0.0f32; pa.blocks() * MR * ldb];
        gemm(&pa, 0..pa.blocks(), &bb, ldb, n, &mut c, ldb);
        (0..m * n).map(|i| c[i / n * ldb + i % n]).collect()
    }

    #[test]
    fn every_element_is_the_in_order_fma_chain_whatever_the_tiling() {
        // Sizes off every tile and block edge, an inner extent over several
        // cache blocks, and 1-column and 1-row products.
        let mut r = rng(7);
        for (m, k, n) in [(13, 1500, 37), (1, 70, 1), (7, 3, 100), (50, 1200, 16)] {
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

    fn column(b: &[f32], k: usize, n: usize, j: usize) -> Vec<f32> {
        (0..k).map(|kk| b[kk * n + j]).collect()
    }

    #[test]
    fn zero_inner_extent_gives_zeros() {
        let pa = PackedA::new(&[], 3, 0, 0, 1);
        let mut c = vec![1.0f32; MR * NR];
        gemm(&pa, 0..1, &[], NR, 5, &mut c, NR);
        assert!(c.iter().all(|&v| v == 0.0));
    }
}
