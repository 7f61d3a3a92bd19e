// 2-D convolution on tensor cores: the implicit GEMMs of conv.cu (same
// NCHW activations, OIHW filters, same ConvArgs and epilogue), multiplied
// with mma.sync in one of three precisions. Host side:
// src/backend/gpu/conv_mma.rs. CPU twin: src/backend/cpu/conv.rs (f32).
//
//   forward   C[M=Cout][N=Nimg*P*Q]  = W[Cout][Cin*R*S]      * col(x)[Cin*R*S][N*P*Q]
//   dgrad     C[M=Cin ][N=Nimg*H*W]  = W^T[Cin][Cout*R*S]    * col(dy)[Cout*R*S][N*H*W]
//   wgrad     C[M=Cout][N=Cin*R*S]   = dy[Cout][Nimg*P*Q]    * col(x)^T[Nimg*P*Q][Cin*R*S]
//
// Precisions (template P):
//   PREC_TF32    operands rounded to tf32 (cvt.rna), m16n8k8, f32 accumulate;
//   PREC_TF32X3  each operand split as big = tf32(x), small = tf32(x - big);
//                acc += small*big + big*small + big*big (three m16n8k8, the
//                small*small term dropped): about f32 accuracy;
//   PREC_BF16    operands rounded to bf16 (nearest even), m16n8k16, f32 accumulate.
// The rounding is a function of each element alone, so it is applied when a
// fragment is read from shared memory (cp.async cannot convert on the way
// in), or, for a filter packed by conv_pack_rsc_tf32/_bf16, once in the pack
// (bf16 then stored as 16 bits and read by ldmatrix): the same values.
//
// Pipeline: a block computes a BM x BN tile with WM x WN warps of
// (16 * MI) x 32 each (MI x 4 mma tiles of 16x8; the tall tile's warps are
// 64 x 32, so each B fragment read from shared memory feeds four mma and
// each A fragment four). K is walked in steps of BK = 16 through STAGES = 3
// shared-memory buffers filled by cp.async, so two steps' loads are in flight
// while one is multiplied. The A tile is m-major (k contiguous, rows padded
// to 20 floats: the tf32 fragments come from it by ldmatrix.x4 without bank
// conflicts); the B tile is k-major (rows padded to BN + 8 floats).
//
// Operands: when the GEMM's reduced channels are a multiple of BK (the
// forward's Cin; a stride-1 dgrad's Cout, every phase of a strided one
// included), K runs in (r, s, c) order (CONV_K_RSC): the weights are packed
// to match (conv_pack_rsc*, one pass over the filter, rounded for the mode
// on the way) and copied 16 bytes at a time, and the im2col operand is
// gathered one filter tap per step (RscGather: a bounds check per step, not
// per element). Otherwise K runs (c, r, s) with 4-byte copies decoded per
// element, as in conv.cu.
//
// Deterministic: no atomics; every output sums its K terms in BK steps from
// k = 0 or from its split's start (wgrad's splits, and the K chunks of a
// forward or dgrad with K >= 2048, fixed by K alone), the splits then summed
// in order by conv_wgrad_reduce or conv_split_reduce (conv.cu), whatever the
// tile, so the forward and dgrad results do not depend on the tile or the
// batch size.
#include "mma.cuh"
#include "conv_gather.cuh"

#define PREC_TF32 0
#define PREC_TF32X3 1
#define PREC_BF16 2

namespace cmma {

constexpr int BK = 16;
constexpr int STAGES = 3;
constexpr int LDA = BK + 4;
// Row stride (halves) of an A tile stored as bf16: 48 bytes, so the eight
// 16-byte rows one ldmatrix reads fall in distinct banks.
constexpr int LDA16 = BK + 8;

// ---- operand loaders: each `issue` starts the cp.async copies of one BK
// step into a stage (A: [BM][LDA], B: [BK][LDB]) and moves on by BK.

// Row-major A of T: A[m][k] = w[m*K + k] (a forward's filter, or a filter
// packed by conv_pack_rsc*, as 16-bit bf16 values for conv_pack_rsc_bf16),
// into an m-major tile of LD elements per row; 16-byte copies when K is a
// whole number of them, else 4-byte ones. Each thread keeps one pointer,
// moved on by BK per step, and its slots' row checks as bits, so a step
// costs an add, a select and a copy per slot. Copies start at `k_begin`; a
// split's chunk is a whole number of K steps, so no step crosses its end
// except the last split's, at K. A slot past K or M zero-fills, its copy
// pointed at the matrix's start.
template <class T, int LD, int BM, int NT>
struct RowsA {
  static constexpr int VEPC = 16 / (int)sizeof(T), SEPC = 4 / (int)sizeof(T);  // elements per copy
  const T* __restrict__ p;
  const T* __restrict__ w0;
  int K, k, rows_ok;
  bool vec;
  __device__ __forceinline__ RowsA(const T* __restrict__ w, int M, int K_, int k_begin) : w0(w), K(K_) {
    vec = (K % VEPC) == 0 && ((unsigned long long)w & 15) == 0;
    const int epc = vec ? VEPC : SEPC;
    const int kc = ((int)threadIdx.x % (BK / epc)) * epc, m0 = (int)threadIdx.x / (BK / epc);
    const int rows = NT * epc / BK, e = BM * BK / (epc * NT);
    rows_ok = 0;
    for (int i = 0; i < e; i++) rows_ok |= (m0 + i * rows < M) << i;
    k = k_begin + kc;
    p = w + (size_t)m0 * K + k;
  }
  template <int BYTES>
  __device__ __forceinline__ void copies(float* s, bool kin) {
    constexpr int EPC = BYTES / (int)sizeof(T), ROWS = NT * EPC / BK, E = BM * BK / (EPC * NT);
    const int at = ((int)threadIdx.x / (BK / EPC)) * LD + ((int)threadIdx.x % (BK / EPC)) * EPC;
    const SmemAddr d = smem_addr(reinterpret_cast<T*>(s) + at);
#pragma unroll
    for (int i = 0; i < E; i++) {
      const bool ok = kin && ((rows_ok >> i) & 1);
      cp_async_to<BYTES>(d + (int)sizeof(T) * i * ROWS * LD, ok ? p + (size_t)i * ROWS * K : w0, ok ? BYTES : 0);
    }
  }
  __device__ __forceinline__ void issue(float* s) {
    if (vec) {
      copies<16>(s, k < K);
    } else {
      copies<4>(s, k < K);
    }
    p += BK;
    k += BK;
  }
};

// The gathered operands (conv_gather.cuh), each slot one 4-byte cp.async
// (zero-filled where nothing feeds it) into an m-major tile (A: [BM][LD]) or
// a k-major one (B: [BK][LD]).
template <class G, int LD, bool M_MAJOR>
struct Gathered {
  G g;
  const float* __restrict__ src;
  int k0;
  // The gather is built in place from `args` (a copy would keep two sets
  // of cursors alive); `k_begin` is where its K walk starts.
  template <class... Args>
  __device__ __forceinline__ Gathered(const float* __restrict__ src_, int k_begin, Args... args)
      : g(args...), src(src_), k0(k_begin) {}
  __device__ __forceinline__ void issue(float* s) {
    const SmemAddr s0 = smem_addr(s);
    g.step(k0, [&](int i, bool ok, int idx) {
      const int at = M_MAJOR ? g.mn(i) * LD + g.k(i) : g.k(i) * LD + g.mn(i);
      cp_async_to<4>(s0 + 4 * at, ok ? src + idx : src, ok ? 4 : 0);
    });
    k0 += BK;
  }
};

// ---- one BK step of the warp tile (32 x 32: 2 x 4 mma tiles) -------------

__device__ __forceinline__ void split_tf32(unsigned x, unsigned& big, unsigned& small) {
  const float v = __uint_as_float(x);
  big = f32_to_tf32(v);
  small = f32_to_tf32(v - __uint_as_float(big));
}

// A_READY: the A tile holds operands already rounded for the mode (bf16
// values for PREC_BF16, tf32 values for PREC_TF32; packed so by
// conv_pack_rsc_*), so its fragments are read as they are: one ldmatrix per
// 16 x 16 (bf16) or 16 x 8 (tf32) fragment and no conversion.
template <int P, int LDB, int MI, bool A_READY>
__device__ __forceinline__ void warp_step(const float* __restrict__ as, const float* __restrict__ bs, int m_off,
                                          int n_off, float (&acc)[MI][4][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (P == PREC_BF16) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[MI][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < MI; mi++) {
        if (A_READY) {
          const unsigned short* a16 = reinterpret_cast<const unsigned short*>(as);
          ldmatrix<4>(af[mi], a16 + (m_off + mi * 16 + (lane & 15)) * LDA16 + kk + (lane >> 4) * 8);
          continue;
        }
        const float* r0 = as + (m_off + mi * 16 + g) * LDA + kk + 2 * t;
        const float* r1 = r0 + 8 * LDA;
        const float2 v0 = *reinterpret_cast<const float2*>(r0);
        const float2 v1 = *reinterpret_cast<const float2*>(r1);
        const float2 v2 = *reinterpret_cast<const float2*>(r0 + 8);
        const float2 v3 = *reinterpret_cast<const float2*>(r1 + 8);
        af[mi][0] = pack_bf16x2(v0.x, v0.y);
        af[mi][1] = pack_bf16x2(v1.x, v1.y);
        af[mi][2] = pack_bf16x2(v2.x, v2.y);
        af[mi][3] = pack_bf16x2(v3.x, v3.y);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ni++) {
        const float* c = bs + (kk + 2 * t) * LDB + n_off + ni * 8 + g;
        bf[ni][0] = pack_bf16x2(c[0], c[LDB]);
        bf[ni][1] = pack_bf16x2(c[8 * LDB], c[9 * LDB]);
      }
#pragma unroll
      for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) mma_bf16_m16n8k16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      unsigned af[MI][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < MI; mi++)
        ldmatrix<4>(af[mi], as + (m_off + mi * 16 + (lane & 15)) * LDA + kk + (lane >> 4) * 4);
#pragma unroll
      for (int ni = 0; ni < 4; ni++) {
        const float* c = bs + (kk + t) * LDB + n_off + ni * 8 + g;
        bf[ni][0] = __float_as_uint(c[0]);
        bf[ni][1] = __float_as_uint(c[4 * LDB]);
      }
      if (P == PREC_TF32) {
        if (!A_READY) {
#pragma unroll
          for (int mi = 0; mi < MI; mi++)
#pragma unroll
            for (int i = 0; i < 4; i++) af[mi][i] = f32_to_tf32(__uint_as_float(af[mi][i]));
        }
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
          for (int i = 0; i < 2; i++) bf[ni][i] = f32_to_tf32(__uint_as_float(bf[ni][i]));
#pragma unroll
        for (int mi = 0; mi < MI; mi++)
#pragma unroll
          for (int ni = 0; ni < 4; ni++) mma_tf32_m16n8k8(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
      } else {
        unsigned bs_[4][2];
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
          for (int i = 0; i < 2; i++) split_tf32(bf[ni][i], bf[ni][i], bs_[ni][i]);
        // A's small parts one m tile at a time: fewer registers live.
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
          unsigned as_[4];
#pragma unroll
          for (int i = 0; i < 4; i++) split_tf32(af[mi][i], af[mi][i], as_[i]);
#pragma unroll
          for (int ni = 0; ni < 4; ni++) {
            mma_tf32_m16n8k8(acc[mi][ni], as_, bf[ni], acc[mi][ni]);
            mma_tf32_m16n8k8(acc[mi][ni], af[mi], bs_[ni], acc[mi][ni]);
            mma_tf32_m16n8k8(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
          }
        }
      }
    }
  }
}

// ---- the pipelined main loop ----------------------------------------------
// The shared-memory stages of a BM x BN tile, declared once per kernel (a
// kernel with two operand orders would otherwise hold two sets).
template <int BM, int BN>
struct Stages {
  float a[STAGES][BM * LDA];
  float b[STAGES][BK * (BN + 8)];
};

// Warps are laid out WN to a row of the block; each owns a (16 * MI) x 32
// tile of the output.
template <int BM, int BN, int WN, int MI, int P, bool A_READY = false, class LA, class LB>
__device__ __forceinline__ void mma_main(Stages<BM, BN>& sm, LA& la, LB& lb, int k_begin, int k_end,
                                         float (&acc)[MI][4][4]) {
  constexpr int LDB = BN + 8;
  auto& As = sm.a;
  auto& Bs = sm.b;
#pragma unroll
  for (int mi = 0; mi < MI; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mi][ni][i] = 0.f;
  const int nk = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  const int warp = threadIdx.x >> 5;
  const int m_off = (warp / WN) * 16 * MI, n_off = (warp % WN) * 32;
#pragma unroll
  for (int st = 0; st < STAGES - 1; st++) {
    if (st < nk) {
      la.issue(As[st]);
      lb.issue(Bs[st]);
    }
    cp_async_commit();
  }
  for (int kt = 0; kt < nk; kt++) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < nk) {
      la.issue(As[next % STAGES]);
      lb.issue(Bs[next % STAGES]);
    }
    cp_async_commit();
    warp_step<P, LDB, MI, A_READY>(As[kt % STAGES], Bs[kt % STAGES], m_off, n_off, acc);
  }
  cp_async_wait<0>();
}

// Calls f(m, n, value) for each of the thread's accumulators inside the
// GEMM's M x N.
template <int WN, int MI, class F>
__device__ __forceinline__ void for_each_acc(const float (&acc)[MI][4][4], int mtile, int ntile, int gm, int gn,
                                             F f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = mtile + (warp / WN) * 16 * MI, n0 = ntile + (warp % WN) * 32;
#pragma unroll
  for (int mi = 0; mi < MI; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int i = 0; i < 4; i++) {
        const int m = m0 + mi * 16 + g + 8 * (i >> 1), n = n0 + ni * 8 + 2 * t + (i & 1);
        if (m < gm && n < gn) f(m, n, acc[mi][ni][i]);
      }
}

// A split's partial products, GEMM-shaped: out[split][m][n] (wgrad's, and
// a split forward's or dgrad's, summed by conv_wgrad_reduce or
// conv_split_reduce in conv.cu).
template <int WN, int MI>
__device__ __forceinline__ void store_partial(const ConvArgs& a, const float (&acc)[MI][4][4], int mtile, int ntile,
                                              float* __restrict__ out) {
  float* o = out + (size_t)blockIdx.z * a.gm * a.gn;
  for_each_acc<WN>(acc, mtile, ntile, a.gm, a.gn, [&](int m, int n, float v) { o[m * a.gn + n] = v; });
}

// The A operand of a forward, and of a dgrad with K in (r, s, ko) order,
// is a row-major M x K matrix: the layer's filter (a forward in (c, r, s)
// order), or with CONV_K_RSC the filter packed by conv_pack_rsc_* and, in
// tf32 and bf16, already rounded for the mode (bf16 stored as 16 bits).
template <int BM, int BN, int WM, int WN, int MI, int P, class LB>
__device__ __forceinline__ void gemm_rows(Stages<BM, BN>& sm, const ConvArgs& a, const float* __restrict__ w, LB& lb,
                                          const SplitK& sk, float (&acc)[MI][4][4]) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM;
  if ((a.flags & CONV_K_RSC) && P == PREC_BF16) {
    RowsA<unsigned short, LDA16, BM, NT> la(reinterpret_cast<const unsigned short*>(w) + (size_t)mtile * a.gk,
                                            a.gm - mtile, a.gk, sk.begin);
    mma_main<BM, BN, WN, MI, P, true>(sm, la, lb, sk.begin, sk.end, acc);
  } else if ((a.flags & CONV_K_RSC) && P == PREC_TF32) {
    RowsA<float, LDA, BM, NT> la(w + (size_t)mtile * a.gk, a.gm - mtile, a.gk, sk.begin);
    mma_main<BM, BN, WN, MI, P, true>(sm, la, lb, sk.begin, sk.end, acc);
  } else {
    RowsA<float, LDA, BM, NT> la(w + (size_t)mtile * a.gk, a.gm - mtile, a.gk, sk.begin);
    mma_main<BM, BN, WN, MI, P>(sm, la, lb, sk.begin, sk.end, acc);
  }
}

template <int BM, int BN, int WM, int WN, int MI, int P>
__device__ __forceinline__ void fwd(const ConvArgs& a, const float* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ bias, const float* __restrict__ residual,
                                    float* __restrict__ y) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  __shared__ __align__(16) Stages<BM, BN> sm;
  float acc[MI][4][4];
  if (a.flags & CONV_K_RSC) {
    Gathered<RscGather<BK, BN, NT, true>, BN + 8, false> lb(x, sk.begin, a, nullptr, ntile, sk.begin);
    gemm_rows<BM, BN, WM, WN, MI, P>(sm, a, w, lb, sk, acc);
  } else {
    Gathered<FwdGather<BK, BN, NT>, BN + 8, false> lb(x, sk.begin, a, ntile, sk.begin);
    lb.g.K = sk.end;
    gemm_rows<BM, BN, WM, WN, MI, P>(sm, a, w, lb, sk, acc);
  }
  if (sk.split) {
    store_partial<WN>(a, acc, mtile, ntile, y);
    return;
  }
  const int PQ = a.p * a.q;
  for_each_acc<WN>(acc, mtile, ntile, a.gm, a.gn, [&](int m, int n, float v) {
    const int img = n / PQ;
    const int idx = (img * a.gm + m) * PQ + (n - img * PQ);
    if (a.flags & CONV_BIAS) v += bias[m];
    if (a.flags & CONV_RESIDUAL) v += residual[idx];
    if (a.flags & CONV_RELU) v = v > 0.f ? v : 0.f;
    y[idx] = v;
  });
}

// `w` is the layer's OIHW filter, or with CONV_K_RSC its transpose packed
// as [Cin][R][S][Cout] by conv_pack_rsc* (rounded for the mode in tf32 and
// bf16, as in the forward).
template <int BM, int BN, int WM, int WN, int MI, int P>
__device__ __forceinline__ void dgrad(const ConvArgs& a, const float* __restrict__ dy, const float* __restrict__ w,
                                      const float* __restrict__ ymask, float* __restrict__ dx) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  const float* mask = (a.flags & CONV_DY_MASK) ? ymask : nullptr;
  __shared__ __align__(16) Stages<BM, BN> sm;
  float acc[MI][4][4];
  if (a.flags & CONV_K_RSC) {
    Gathered<RscGather<BK, BN, NT, false>, BN + 8, false> lb(dy, sk.begin, a, mask, ntile, sk.begin);
    gemm_rows<BM, BN, WM, WN, MI, P>(sm, a, w, lb, sk, acc);
  } else {
    Gathered<DgradAGather<BK, BM, NT>, LDA, true> la(w, sk.begin, a, mtile, sk.begin);
    la.g.K = sk.end;
    Gathered<DgradGather<BK, BN, NT>, BN + 8, false> lb(dy, sk.begin, a, mask, ntile, sk.begin);
    lb.g.K = sk.end;
    mma_main<BM, BN, WN, MI, P>(sm, la, lb, sk.begin, sk.end, acc);
  }
  if (sk.split) {
    store_partial<WN>(a, acc, mtile, ntile, dx);
    return;
  }
  const int HW = a.h * a.w;
  for_each_acc<WN>(acc, mtile, ntile, a.gm, a.gn, [&](int m, int n, float v) {
    const int img = n / HW;
    dx[(img * a.gm + m) * HW + (n - img * HW)] = v;
  });
}

template <int BM, int BN, int WM, int WN, int MI, int P>
__device__ __forceinline__ void wgrad(const ConvArgs& a, const float* __restrict__ x, const float* __restrict__ dy,
                                      float* __restrict__ out) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const int k_begin = blockIdx.z * a.k_chunk;
  const int k_end = min(a.gk, k_begin + a.k_chunk);
  Gathered<WgradAGather<BK, BM, NT>, LDA, true> la(dy, k_begin, a, mtile, k_begin);
  Gathered<WgradGather<BK, BN, NT>, BN + 8, false> lb(x, k_begin, a, ntile, k_begin);
  // a split's last step never reads into the next split
  la.g.K = k_end;
  lb.g.K = k_end;
  __shared__ __align__(16) Stages<BM, BN> sm;
  float acc[MI][4][4];
  mma_main<BM, BN, WN, MI, P>(sm, la, lb, k_begin, k_end, acc);
  store_partial<WN>(a, acc, mtile, ntile, out);
}

}  // namespace cmma

// The filter of a tensor-core forward or dgrad with K in (r, s, c) order
// (CONV_K_RSC), from OIHW `w` [o][c][rs] (rs = R * S taps):
//   forward: out[o][rs][c]   (A[m = o][k = (r, s, c)])
//   dgrad:   out[c][rs][o]   (A[m = c][k = (r, s, o)])
// copied as f32 (tf32x3, which splits each operand itself), or rounded for
// the mode once here instead of in every fragment: to tf32 (cvt.rna, kept
// in f32 storage) or to bf16 (nearest even, 16-bit storage), the very
// rounding the fragments would apply, so the results are the same.
struct PackArgs {
  int o, c, rs, dgrad;
};

template <class F>
__device__ __forceinline__ void pack_rsc(const PackArgs& a, const float* __restrict__ w, F store) {
  const int total = a.o * a.c * a.rs;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    // i walks the output [first][t][last].
    const int last = a.dgrad ? a.o : a.c;
    const int first = i / (a.rs * last);
    const int rem = i - first * a.rs * last;
    const int t = rem / last, l = rem - t * last;
    const int o = a.dgrad ? l : first, c = a.dgrad ? first : l;
    store(i, w[(o * a.c + c) * a.rs + t]);
  }
}

extern "C" __global__ void conv_pack_rsc(const PackArgs a, const float* __restrict__ w, float* __restrict__ out) {
  pack_rsc(a, w, [&](int i, float v) { out[i] = v; });
}

extern "C" __global__ void conv_pack_rsc_tf32(const PackArgs a, const float* __restrict__ w,
                                              float* __restrict__ out) {
  pack_rsc(a, w, [&](int i, float v) { out[i] = __uint_as_float(f32_to_tf32(v)); });
}

extern "C" __global__ void conv_pack_rsc_bf16(const PackArgs a, const float* __restrict__ w,
                                              unsigned short* __restrict__ out) {
  pack_rsc(a, w, [&](int i, float v) { out[i] = (unsigned short)(pack_bf16x2(v, 0.f) & 0xffffu); });
}

// Tiles: BM x BN with WM x WN warps of (16 * MI) x 32 (threads = 32 * WM * WN).
#define CONV_MMA_TILES(X, P, NAME) \
  X(128, 64, 2, 2, 4, P, NAME)      \
  X(64, 64, 2, 2, 2, P, NAME)

#define CONV_MMA_KERNELS(BM, BN, WM, WN, MI, P, NAME)                                                              \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_fwd_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ x,                       \
                                       const float* __restrict__ w, const float* __restrict__ bias,              \
                                       const float* __restrict__ residual, float* __restrict__ y) {               \
    cmma::fwd<BM, BN, WM, WN, MI, P>(a, x, w, bias, residual, y);                                                 \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_dgrad_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ dy,                    \
                                         const float* __restrict__ w, const float* __restrict__ ymask,           \
                                         float* __restrict__ dx) {                                                \
    cmma::dgrad<BM, BN, WM, WN, MI, P>(a, dy, w, ymask, dx);                                                      \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_wgrad_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ x,                     \
                                         const float* __restrict__ dy, float* __restrict__ out) {                 \
    cmma::wgrad<BM, BN, WM, WN, MI, P>(a, x, dy, out);                                                            \
  }

CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_TF32, tf32)
CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_TF32X3, tf32x3)
CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_BF16, bf16)
