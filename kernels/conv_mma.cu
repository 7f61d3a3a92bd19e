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
// fragment is read from shared memory (cp.async cannot convert on the way in).
//
// Pipeline: a block computes a BM x BN tile with WM x WN warps of 32x32
// each (2 x 4 mma tiles of 16x8). K is walked in steps of BK = 16 through
// STAGES = 3 shared-memory buffers filled by cp.async (4-byte copies for the
// gathered im2col operands, zero-filled out of range; 16-byte copies for
// the forward weights when K is a multiple of 4), so two steps' loads are in
// flight while one is multiplied. The A tile is m-major (k contiguous, rows
// padded to 20 floats: the tf32 fragments come from it by ldmatrix.x4 without
// bank conflicts); the B tile is k-major (rows padded to BN + 8 floats).
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

// ---- operand loaders: each `issue` starts the cp.async copies of one BK
// step into a stage (A: [BM][LDA], B: [BK][LDB]) and moves on by BK.

// Forward A: A[m][k] = w[m*K + k]; 16-byte copies when K % 4 == 0. Copies
// start at `k_begin`; a split's chunk is a whole number of K steps, so no
// step crosses its end except the last split's, at K.
template <int BM, int NT>
struct FwdA {
  const float* __restrict__ w;
  int M, K, k0;
  bool vec;
  __device__ __forceinline__ FwdA(const float* __restrict__ w_, int M_, int K_, int k_begin)
      : w(w_), M(M_), K(K_), k0(k_begin) {
    vec = (K % 4) == 0 && ((unsigned long long)w_ & 15) == 0;
  }
  __device__ __forceinline__ void issue(float* s) {
    if (vec) {
      constexpr int E = BM * BK / (4 * NT);
      const int kc = (threadIdx.x % (BK / 4)) * 4, m0 = threadIdx.x / (BK / 4);
#pragma unroll
      for (int i = 0; i < E; i++) {
        const int m = m0 + i * (NT * 4 / BK), k = k0 + kc;
        const bool ok = m < M && k < K;
        cp_async<16>(s + m * LDA + kc, ok ? w + m * K + k : w, ok ? 16 : 0);
      }
    } else {
      constexpr int E = BM * BK / NT;
      const int kk = threadIdx.x % BK, m0 = threadIdx.x / BK;
#pragma unroll
      for (int i = 0; i < E; i++) {
        const int m = m0 + i * (NT / BK), k = k0 + kk;
        const bool ok = m < M && k < K;
        cp_async<4>(s + m * LDA + kk, ok ? w + m * K + k : w, ok ? 4 : 0);
      }
    }
    k0 += BK;
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
    g.step(k0, [&](int i, bool ok, int idx) {
      float* dst = M_MAJOR ? s + g.mn(i) * LD + g.k(i) : s + g.k(i) * LD + g.mn(i);
      cp_async<4>(dst, ok ? src + idx : src, ok ? 4 : 0);
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

template <int P, int LDB>
__device__ __forceinline__ void warp_step(const float* __restrict__ as, const float* __restrict__ bs, int m_off,
                                          int n_off, float (&acc)[2][4][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  if (P == PREC_BF16) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; mi++) {
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
      for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int ni = 0; ni < 4; ni++) mma_bf16_m16n8k16(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
      unsigned af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; mi++)
        ldmatrix<4>(af[mi], as + (m_off + mi * 16 + (lane & 15)) * LDA + kk + (lane >> 4) * 4);
#pragma unroll
      for (int ni = 0; ni < 4; ni++) {
        const float* c = bs + (kk + t) * LDB + n_off + ni * 8 + g;
        bf[ni][0] = __float_as_uint(c[0]);
        bf[ni][1] = __float_as_uint(c[4 * LDB]);
      }
      if (P == PREC_TF32) {
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
          for (int i = 0; i < 4; i++) af[mi][i] = f32_to_tf32(__uint_as_float(af[mi][i]));
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
          for (int i = 0; i < 2; i++) bf[ni][i] = f32_to_tf32(__uint_as_float(bf[ni][i]));
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
          for (int ni = 0; ni < 4; ni++) mma_tf32_m16n8k8(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
      } else {
        unsigned as_[2][4], bs_[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
          for (int i = 0; i < 4; i++) split_tf32(af[mi][i], af[mi][i], as_[mi][i]);
#pragma unroll
        for (int ni = 0; ni < 4; ni++)
#pragma unroll
          for (int i = 0; i < 2; i++) split_tf32(bf[ni][i], bf[ni][i], bs_[ni][i]);
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
          for (int ni = 0; ni < 4; ni++) {
            mma_tf32_m16n8k8(acc[mi][ni], as_[mi], bf[ni], acc[mi][ni]);
            mma_tf32_m16n8k8(acc[mi][ni], af[mi], bs_[ni], acc[mi][ni]);
            mma_tf32_m16n8k8(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
          }
      }
    }
  }
}

// ---- the pipelined main loop ----------------------------------------------
template <int BM, int BN, int WN, int P, class LA, class LB>
__device__ __forceinline__ void mma_main(LA& la, LB& lb, int k_begin, int k_end, float (&acc)[2][4][4]) {
  constexpr int LDB = BN + 8;
  __shared__ __align__(16) float As[STAGES][BM * LDA];
  __shared__ __align__(16) float Bs[STAGES][BK * LDB];
#pragma unroll
  for (int mi = 0; mi < 2; mi++)
#pragma unroll
    for (int ni = 0; ni < 4; ni++)
#pragma unroll
      for (int i = 0; i < 4; i++) acc[mi][ni][i] = 0.f;
  const int nk = k_end > k_begin ? (k_end - k_begin + BK - 1) / BK : 0;
  const int warp = threadIdx.x >> 5;
  const int m_off = (warp / WN) * 32, n_off = (warp % WN) * 32;
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
    warp_step<P, LDB>(As[kt % STAGES], Bs[kt % STAGES], m_off, n_off, acc);
  }
  cp_async_wait<0>();
}

// Calls f(m, n, value) for each of the thread's accumulators inside the
// GEMM's M x N.
template <int WN, class F>
__device__ __forceinline__ void for_each_acc(const float (&acc)[2][4][4], int mtile, int ntile, int gm, int gn,
                                             F f) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = mtile + (warp / WN) * 32, n0 = ntile + (warp % WN) * 32;
#pragma unroll
  for (int mi = 0; mi < 2; mi++)
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
template <int WN>
__device__ __forceinline__ void store_partial(const ConvArgs& a, const float (&acc)[2][4][4], int mtile, int ntile,
                                              float* __restrict__ out) {
  float* o = out + (size_t)blockIdx.z * a.gm * a.gn;
  for_each_acc<WN>(acc, mtile, ntile, a.gm, a.gn, [&](int m, int n, float v) { o[m * a.gn + n] = v; });
}

template <int BM, int BN, int WM, int WN, int P>
__device__ __forceinline__ void fwd(const ConvArgs& a, const float* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ bias, const float* __restrict__ residual,
                                    float* __restrict__ y) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  FwdA<BM, NT> la(w + mtile * a.gk, a.gm - mtile, a.gk, sk.begin);
  Gathered<FwdGather<BK, BN, NT>, BN + 8, false> lb(x, sk.begin, a, ntile, sk.begin);
  lb.g.K = sk.end;
  float acc[2][4][4];
  mma_main<BM, BN, WN, P>(la, lb, sk.begin, sk.end, acc);
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

template <int BM, int BN, int WM, int WN, int P>
__device__ __forceinline__ void dgrad(const ConvArgs& a, const float* __restrict__ dy, const float* __restrict__ w,
                                      const float* __restrict__ ymask, float* __restrict__ dx) {
  constexpr int NT = WM * WN * 32;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  Gathered<DgradAGather<BK, BM, NT>, LDA, true> la(w, sk.begin, a, mtile, sk.begin);
  la.g.K = sk.end;
  const float* mask = (a.flags & CONV_DY_MASK) ? ymask : nullptr;
  Gathered<DgradGather<BK, BN, NT>, BN + 8, false> lb(dy, sk.begin, a, mask, ntile, sk.begin);
  lb.g.K = sk.end;
  float acc[2][4][4];
  mma_main<BM, BN, WN, P>(la, lb, sk.begin, sk.end, acc);
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

template <int BM, int BN, int WM, int WN, int P>
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
  float acc[2][4][4];
  mma_main<BM, BN, WN, P>(la, lb, k_begin, k_end, acc);
  store_partial<WN>(a, acc, mtile, ntile, out);
}

}  // namespace cmma

// Tiles: BM x BN with WM x WN warps of 32 x 32 (threads = 32 * WM * WN).
#define CONV_MMA_TILES(X, P, NAME) \
  X(128, 64, 4, 2, P, NAME)         \
  X(64, 64, 2, 2, P, NAME)

#define CONV_MMA_KERNELS(BM, BN, WM, WN, P, NAME)                                                                  \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_fwd_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ x,                       \
                                       const float* __restrict__ w, const float* __restrict__ bias,              \
                                       const float* __restrict__ residual, float* __restrict__ y) {               \
    cmma::fwd<BM, BN, WM, WN, P>(a, x, w, bias, residual, y);                                                     \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_dgrad_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ dy,                    \
                                         const float* __restrict__ w, const float* __restrict__ ymask,           \
                                         float* __restrict__ dx) {                                                \
    cmma::dgrad<BM, BN, WM, WN, P>(a, dy, w, ymask, dx);                                                          \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(WM * WN * 32)                                                      \
      convmma_wgrad_##NAME##_##BM##x##BN(const ConvArgs a, const float* __restrict__ x,                     \
                                         const float* __restrict__ dy, float* __restrict__ out) {                 \
    cmma::wgrad<BM, BN, WM, WN, P>(a, x, dy, out);                                                                \
  }

CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_TF32, tf32)
CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_TF32X3, tf32x3)
CONV_MMA_TILES(CONV_MMA_KERNELS, PREC_BF16, bf16)
