//! Host side of `kernels/conv_mma.cu`: the tensor-core convolutions (tf32,
//! tf32x3, bf16) behind the same GEMM launches as conv.rs. The arguments
//! (`ConvArgs`), the logical NCHW layout, the epilogue and the wgrad split
//! plus ordered reduce are those of the f32 path; only the kernel differs.

use super::conv::{wgrad_splits, ConvArgs};
use super::{arg, Driver, GpuBackend, GpuBuf};
use crate::backend::Precision;
use crate::error::{Error, Result};

/// K step of the tensor-core main loop (`cmma::BK` in conv_mma.cu); wgrad
/// splits are multiples of it.
pub const MMA_BK: usize = 16;

/// One tile of conv_mma.cu (`CONV_MMA_TILES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmaTile {
    /// Rows (GEMM M) per block.
    pub bm: usize,
    /// Columns (GEMM N) per block.
    pub bn: usize,
    /// Threads per block (32 per warp; the tall tile's warps own 64x32, the
    /// short one's 32x32).
    pub threads: u32,
}

/// The tiles compiled in conv_mma.cu.
pub const MMA_TILES: [MmaTile; 2] = [
    MmaTile {
        bm: 128,
        bn: 64,
        threads: 128,
    },
    MmaTile {
        bm: 64,
        bn: 64,
        threads: 128,
    },
];

/// The tile for a GEMM of `m` rows: the tall one once `m` fills it. Speed
/// only: each output sums its K terms in the same order whatever the tile.
pub fn pick_mma_tile(m: usize) -> MmaTile {
    if m > 64 {
        MMA_TILES[0]
    } else {
        MMA_TILES[1]
    }
}

/// The tile of a forward or backward-data GEMM of `m` x `n` on a device of
/// `sms` SMs: [`pick_mma_tile`]'s, or the short one when the tall one's
/// grid would not fill a wave and the short one has more blocks (speed
/// only, as there).
pub fn pick_mma_tile_for(m: usize, n: usize, sms: usize) -> MmaTile {
    let t = pick_mma_tile(m);
    let blocks = |t: MmaTile| m.div_ceil(t.bm) * n.div_ceil(t.bn);
    let short = MMA_TILES[1];
    if blocks(t) < sms && blocks(short) > blocks(t) {
        short
    } else {
        t
    }
}

/// The kernel name of `op` (`fwd`, `dgrad`, `wgrad`) in precision `p` on tile `t`.
pub fn mma_kernel(op: &str, p: Precision, t: MmaTile) -> Result<String> {
    if p == Precision::Fp32 {
        return Err(Error::Backend(
            "fp32 convolutions run on conv.cu, not the tensor-core kernels".into(),
        ));
    }
    Ok(format!("convmma_{op}_{}_{}x{}", p.name(), t.bm, t.bn))
}

/// `(splits, k_chunk)` of a tensor-core wgrad: the f32 path's choice with
/// the chunk rounded up to a whole number of K steps.
pub fn mma_wgrad_splits(k: usize, tiles: usize, mn: usize) -> (usize, usize) {
    let (_, chunk) = wgrad_splits(k, tiles, mn);
    let chunk = chunk.div_ceil(MMA_BK) * MMA_BK;
    (k.div_ceil(chunk).max(1), chunk)
}

impl<D: Driver> GpuBackend<D> {
    /// The tile and grid of a GEMM with `a.splits` K splits: a wgrad keeps
    /// the shape's tile its split plan counted; a forward or dgrad's tile
    /// fills the device with the splits' blocks counted. No tile changes a
    /// result.
    fn mma_grid(&self, a: &ConvArgs, wgrad: bool) -> (MmaTile, [u32; 3]) {
        let (m, n) = (a.gm as usize, a.gn as usize);
        let z = a.splits.max(1) as usize;
        let t = if wgrad {
            pick_mma_tile(m)
        } else {
            pick_mma_tile_for(m, n, self.drv.sm_count().div_ceil(z))
        };
        (
            t,
            [n.div_ceil(t.bn) as u32, m.div_ceil(t.bm) as u32, z as u32],
        )
    }

    /// The arguments and filter of a tensor-core forward or dgrad GEMM: in
    /// (r, s, c) order with the filter packed for it where the shape allows
    /// ([`ConvArgs::rsc_order`]), else as given. In tf32 and bf16 the pack
    /// also rounds the filter for the mode (bf16 into 16 bits), so it runs
    /// for a forward 1x1 too, whose order needs none. The packed copy lives
    /// in `keep` until the launch has been queued.
    fn mma_operands(
        &self,
        a: &ConvArgs,
        w: u64,
        dgrad: bool,
        keep: &mut Option<GpuBuf<D>>,
    ) -> Result<(ConvArgs, u64)> {
        let Some((flagged, pack, reorders)) = a.rsc_order(dgrad, MMA_BK) else {
            return Ok((*a, w));
        };
        let (kernel, floats) = match self.precision {
            Precision::Bf16 => ("conv_pack_rsc_bf16", pack.len().div_ceil(2)),
            Precision::Tf32 => ("conv_pack_rsc_tf32", pack.len()),
            _ if reorders => ("conv_pack_rsc", pack.len()),
            _ => return Ok((flagged, w)),
        };
        let packed = self.alloc(&[floats])?;
        let out = packed.ptr();
        self.launch_flat(kernel, pack.len(), &mut [arg(&pack), arg(&w), arg(&out)])?;
        *keep = Some(packed);
        Ok((flagged, out))
    }

    /// Tensor-core forward (`dgrad` false: arguments `x, w, bias, res, y`,
    /// see `launch_fwd`) or dgrad GEMM (`dy, w, mask, dx`, see
    /// `launch_dgrad`) on prepared arguments: `src`, the filter `w`, then
    /// `rest`, with the filter packed first where the shape allows.
    pub(super) fn launch_rows_mma(
        &self,
        dgrad: bool,
        a: &ConvArgs,
        src: u64,
        w: u64,
        rest: &[u64],
    ) -> Result<()> {
        let mut keep = None;
        let (a, w) = self.mma_operands(a, w, dgrad, &mut keep)?;
        let (t, grid) = self.mma_grid(&a, false);
        let name = mma_kernel(if dgrad { "dgrad" } else { "fwd" }, self.precision, t)?;
        let mut list = vec![arg(&a), arg(&src), arg(&w)];
        list.extend(rest.iter().map(arg));
        self.launch(
            &name,
            a.gm as usize * a.gn as usize,
            grid,
            [t.threads, 1, 1],
            &mut list,
        )
    }

    /// Chooses the split of a tensor-core wgrad: sets `a.splits` and
    /// `a.k_chunk`, returns the number of splits.
    pub(super) fn plan_wgrad_mma(&self, a: &mut ConvArgs) -> usize {
        let (m, n, k) = (a.gm as usize, a.gn as usize, a.gk as usize);
        let t = pick_mma_tile(m);
        let tiles = m.div_ceil(t.bm) * n.div_ceil(t.bn);
        let (splits, chunk) = mma_wgrad_splits(k, tiles, m * n);
        a.splits = splits as i32;
        a.k_chunk = chunk as i32;
        splits
    }

    /// Tensor-core wgrad partial products on planned arguments
    /// ([`Self::plan_wgrad_mma`]): `a.splits` slices of `M*N` to `out`.
    pub(super) fn launch_wgrad_mma(&self, a: &ConvArgs, x: u64, dy: u64, out: u64) -> Result<()> {
        let (t, grid) = self.mma_grid(a, true);
        let name = mma_kernel("wgrad", self.precision, t)?;
        self.launch(
            &name,
            a.gm as usize * a.gn as usize,
            grid,
            [t.threads, 1, 1],
            &mut [arg(a), arg(&x), arg(&dy), arg(&out)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mma_wgrad_splits_are_whole_k_steps_covering_k_once() {
        for &(k, tiles, mn) in &[
            (1usize, 1usize, 1usize),
            (7, 3, 100),
            (262144, 1, 64 * 576),
            (262144, 36, 512 * 4608),
            (4096, 300, 10),
        ] {
            let (splits, chunk) = mma_wgrad_splits(k, tiles, mn);
            assert!(splits >= 1 && chunk % MMA_BK == 0 && chunk > 0);
            assert!(splits * chunk >= k && (splits - 1) * chunk < k);
        }
    }

    #[test]
    fn every_mma_kernel_name_exists_in_conv_mma_cu() {
        let file = super::super::kernels::file_of("convmma_fwd_tf32_128x64")
            .expect("conv_mma.cu is embedded");
        for p in [Precision::Tf32, Precision::Tf32x3, Precision::Bf16] {
            for t in MMA_TILES {
                for op in ["fwd", "dgrad", "wgrad"] {
                    let name = mma_kernel(op, p, t).unwrap();
                    assert!(file.kernels.contains(&name.as_str()), "{name}");
                }
            }
        }
        for pack in ["conv_pack_rsc", "conv_pack_rsc_tf32", "conv_pack_rsc_bf16"] {
            assert!(file.kernels.contains(&pack), "{pack}");
        }
        assert!(mma_kernel("fwd", Precision::Fp32, MMA_TILES[0]).is_err());
    }
}
