// 2-D convolution (NCHW activations, OIHW filters, f32) as tiled implicit
// GEMMs: the im2col matrix is never stored in global memory; each tile of it
// is gathered into shared memory as the GEMM main loop needs it.
// CPU twin: src/backend/cpu/conv.rs.
//
//   forward   C[M=Cout][N=Nimg*P*Q]  = W[Cout][Cin*R*S]      * col(x)[Cin*R*S][N*P*Q]
//   dgrad     C[M=Cin ][N=Nimg*H*W]  = W^T[Cin][Cout*R*S]    * col(dy)[Cout*R*S][N*H*W]
//   wgrad     C[M=Cout][N=Cin*R*S]   = dy[Cout][Nimg*P*Q]    * col(x)^T[Nimg*P*Q][Cin*R*S]
//
// One block computes a BM x BN tile of C with (BM/TM)*(BN/TN) threads, each
// owning a TM x TN register tile. K is walked in steps of BK = 8 with two
// shared-memory buffers: the next step's global loads are in registers while
// the current step is multiplied, one barrier per step. Every accumulator
// sums its K terms in increasing k order, whatever the tile shape. A forward
// or dgrad GEMM with K of 2048 or more is split into K chunks fixed by K
// alone (blockIdx.z; `gemm_k_splits` in src/backend/gpu/conv.rs), whose
// partial products `conv_split_reduce` sums in chunk order and finishes with
// the epilogue; so the forward and dgrad results depend neither on the tile
// nor on the batch size. wgrad splits K (the long N*P*Q axis) into fixed
// chunks whose partial products are summed in chunk order by
// `conv_wgrad_reduce`: deterministic, no atomics.
//
// The forward epilogue fuses bias, a residual input and ReLU; dgrad can apply
// a ReLU mask (the output y of a fused conv+ReLU) to dy on the way in. Both
// serve the eval-mode graphs where batch norm has been folded into the conv
// (`conv_fold_bn`).
#include "common.cuh"

#include "conv_gather.cuh"

constexpr int BK = 8;

// ---- operand loaders: global -> registers -> shared ---------------------------
// Each thread loads E elements of a BK x BM (or BK x BN) tile per K step and
// later stores them into the k-major shared tile (row stride LD, padded by 4
// floats so that the transposing stores hit distinct banks).
// "k-fastest" loaders give consecutive threads consecutive k (coalesced when
// memory is contiguous along k); "n-fastest" ones consecutive n.

// Forward A: weights, A[m][k] = w[m*K + k] (row-major), k-fastest.
template <int BM, int NT, int LD>
struct FwdA {
  static constexpr int E = BM * BK / NT;
  static constexpr int STEP = NT / BK;
  const float* __restrict__ w;
  int M, K, kk, m0;
  float v[E];
  // K is the row length of w. A split's K range needs no bound of its own:
  // its chunk is a whole number of K steps, so no step crosses its end
  // except the last split's, at K.
  __device__ __forceinline__ FwdA(const float* __restrict__ w_, int M_, int K_, int mtile, int k_begin)
      : w(w_), M(M_), K(K_) {
    kk = threadIdx.x % BK;
    m0 = mtile + threadIdx.x / BK;
  }
  __device__ __forceinline__ void load(int k0) {
    const int k = k0 + kk;
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int m = m0 + i * STEP;
      v[i] = (m < M && k < K) ? w[m * K + k] : 0.f;
    }
  }
  __device__ __forceinline__ void store(float* s) const {
#pragma unroll
    for (int i = 0; i < E; i++) s[kk * LD + threadIdx.x / BK + i * STEP] = v[i];
  }
};

// The gathered operands (conv_gather.cuh): each slot's value held in a
// register from `load` until `store` puts it in the k-major shared tile.
template <class G, int LD>
struct Gathered {
  G g;
  const float* __restrict__ src;
  float v[G::E];
  // The gather is built in place from `args` (a copy would keep two sets
  // of cursors alive).
  template <class... Args>
  __device__ __forceinline__ Gathered(const float* __restrict__ src_, Args... args) : g(args...), src(src_) {}
  __device__ __forceinline__ void load(int k0) {
    g.step(k0, [&](int i, bool ok, int idx) { v[i] = ok ? src[idx] : 0.f; });
  }
  __device__ __forceinline__ void store(float* s) const {
#pragma unroll
    for (int i = 0; i < G::E; i++) s[g.k(i) * LD + g.mn(i)] = v[i];
  }
};

// ---- the GEMM main loop ------------------------------------------------------
// Thread (ty, tx) owns rows  g*(BM/RG) + ty*4 + {0..3}, g < RG = TM/4, and
// columns g*(BN/CG) + tx*4 + {0..3}, g < CG = TN/4, so its operands come
// from shared memory as aligned float4 reads.
template <int BM, int BN, int TM, int TN>
struct Tile {
  static constexpr int TX = BN / TN;
  static constexpr int TY = BM / TM;
  static constexpr int NT = TX * TY;
  static constexpr int RG = TM / 4;
  static constexpr int CG = TN / 4;
  static constexpr int LDA = BM + 4;
  static constexpr int LDB = BN + 4;
  __device__ __forceinline__ static int row(int i) { return (i / 4) * (BM / RG) + (threadIdx.x / TX) * 4 + (i % 4); }
  __device__ __forceinline__ static int col(int j) { return (j / 4) * (BN / CG) + (threadIdx.x % TX) * 4 + (j % 4); }
};

template <int BM, int BN, int TM, int TN, class LA, class LB>
__device__ __forceinline__ void gemm_main(LA& la, LB& lb, int k_begin, int k_end, float (&acc)[TM][TN]) {
  typedef Tile<BM, BN, TM, TN> T;
  __shared__ __align__(16) float As[2][BK * T::LDA];
  __shared__ __align__(16) float Bs[2][BK * T::LDB];
#pragma unroll
  for (int i = 0; i < TM; i++)
#pragma unroll
    for (int j = 0; j < TN; j++) acc[i][j] = 0.f;
  if (k_begin >= k_end) return;
  const int ty4 = (threadIdx.x / T::TX) * 4, tx4 = (threadIdx.x % T::TX) * 4;
  la.load(k_begin);
  lb.load(k_begin);
  la.store(As[0]);
  lb.store(Bs[0]);
  __syncthreads();
  int buf = 0;
  for (int k0 = k_begin; k0 < k_end; k0 += BK) {
    const bool more = k0 + BK < k_end;
    if (more) {
      la.load(k0 + BK);
      lb.load(k0 + BK);
    }
    const float* as = As[buf];
    const float* bs = Bs[buf];
#pragma unroll
    for (int kk = 0; kk < BK; kk++) {
      float a[TM], b[TN];
#pragma unroll
      for (int g = 0; g < T::RG; g++) {
        const float4 t = *reinterpret_cast<const float4*>(as + kk * T::LDA + g * (BM / T::RG) + ty4);
        a[4 * g + 0] = t.x;
        a[4 * g + 1] = t.y;
        a[4 * g + 2] = t.z;
        a[4 * g + 3] = t.w;
      }
#pragma unroll
      for (int g = 0; g < T::CG; g++) {
        const float4 t = *reinterpret_cast<const float4*>(bs + kk * T::LDB + g * (BN / T::CG) + tx4);
        b[4 * g + 0] = t.x;
        b[4 * g + 1] = t.y;
        b[4 * g + 2] = t.z;
        b[4 * g + 3] = t.w;
      }
#pragma unroll
      for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] += a[i] * b[j];
    }
    if (more) {
      la.store(As[buf ^ 1]);
      lb.store(Bs[buf ^ 1]);
    }
    __syncthreads();
    buf ^= 1;
  }
}

// ---- the three convolutions ---------------------------------------------------

// A split's partial products, GEMM-shaped: out[split][m][n] (wgrad's, and
// a split forward's or dgrad's).
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void store_partial(const ConvArgs& a, const float (&acc)[TM][TN], int mtile, int ntile,
                                              float* __restrict__ out) {
  typedef Tile<BM, BN, TM, TN> T;
  float* o = out + (size_t)blockIdx.z * a.gm * a.gn;
#pragma unroll
  for (int i = 0; i < TM; i++) {
    const int m = mtile + T::row(i);
    if (m >= a.gm) continue;
#pragma unroll
    for (int j = 0; j < TN; j++) {
      const int n = ntile + T::col(j);
      if (n < a.gn) o[m * a.gn + n] = acc[i][j];
    }
  }
}

template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_fwd_impl(const ConvArgs& a, const float* __restrict__ x,
                                              const float* __restrict__ w, const float* __restrict__ bias,
                                              const float* __restrict__ residual, float* __restrict__ y) {
  typedef Tile<BM, BN, TM, TN> T;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  FwdA<BM, T::NT, T::LDA> la(w, a.gm, a.gk, mtile, sk.begin);
  Gathered<FwdGather<BK, BN, T::NT>, T::LDB> lb(x, a, ntile, sk.begin);
  lb.g.K = sk.end;
  float acc[TM][TN];
  gemm_main<BM, BN, TM, TN>(la, lb, sk.begin, sk.end, acc);
  if (sk.split) {
    store_partial<BM, BN, TM, TN>(a, acc, mtile, ntile, y);
    return;
  }
  const int PQ = a.p * a.q;
#pragma unroll
  for (int j = 0; j < TN; j++) {
    const int n = ntile + T::col(j);
    if (n >= a.gn) continue;
    const int img = n / PQ;
    const int obase = img * a.gm * PQ + (n - img * PQ);
#pragma unroll
    for (int i = 0; i < TM; i++) {
      const int m = mtile + T::row(i);
      if (m >= a.gm) continue;
      const int idx = obase + m * PQ;
      float v = acc[i][j];
      if (a.flags & CONV_BIAS) v += bias[m];
      if (a.flags & CONV_RESIDUAL) v += residual[idx];
      if (a.flags & CONV_RELU) v = v > 0.f ? v : 0.f;
      y[idx] = v;
    }
  }
}

template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_dgrad_impl(const ConvArgs& a, const float* __restrict__ dy,
                                                const float* __restrict__ w, const float* __restrict__ ymask,
                                                float* __restrict__ dx) {
  typedef Tile<BM, BN, TM, TN> T;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const SplitK sk(a);
  Gathered<DgradAGather<BK, BM, T::NT>, T::LDA> la(w, a, mtile, sk.begin);
  la.g.K = sk.end;
  const float* mask = (a.flags & CONV_DY_MASK) ? ymask : nullptr;
  Gathered<DgradGather<BK, BN, T::NT>, T::LDB> lb(dy, a, mask, ntile, sk.begin);
  lb.g.K = sk.end;
  float acc[TM][TN];
  gemm_main<BM, BN, TM, TN>(la, lb, sk.begin, sk.end, acc);
  if (sk.split) {
    store_partial<BM, BN, TM, TN>(a, acc, mtile, ntile, dx);
    return;
  }
  const int HW = a.h * a.w;
#pragma unroll
  for (int j = 0; j < TN; j++) {
    const int n = ntile + T::col(j);
    if (n >= a.gn) continue;
    const int img = n / HW;
    const int obase = img * a.gm * HW + (n - img * HW);
#pragma unroll
    for (int i = 0; i < TM; i++) {
      const int m = mtile + T::row(i);
      if (m < a.gm) dx[obase + m * HW] = acc[i][j];
    }
  }
}

template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void conv_wgrad_impl(const ConvArgs& a, const float* __restrict__ x,
                                                const float* __restrict__ dy, float* __restrict__ out) {
  typedef Tile<BM, BN, TM, TN> T;
  const int mtile = blockIdx.y * BM, ntile = blockIdx.x * BN;
  const int k_begin = blockIdx.z * a.k_chunk;
  const int k_end = min(a.gk, k_begin + a.k_chunk);
  Gathered<WgradAGather<BK, BM, T::NT>, T::LDA> la(dy, a, mtile, k_begin);
  Gathered<WgradGather<BK, BN, T::NT>, T::LDB> lb(x, a, ntile, k_begin);
  float acc[TM][TN];
  gemm_main<BM, BN, TM, TN>(la, lb, k_begin, k_end, acc);
  store_partial<BM, BN, TM, TN>(a, acc, mtile, ntile, out);
}

// Tile configurations: BMxBN with TMxTN per thread (threads = BM/TM * BN/TN),
// and the blocks per SM the register budget must allow (__launch_bounds__)
// for forward/dgrad and for wgrad: 128x128 at two blocks of 256 threads caps
// registers at 128 per thread, which the forward and dgrad kernels fit
// without spilling; wgrad's loaders need a few more, so it keeps one block
// rather than spill in its main loop (tests/gpu_nvrtc.rs checks for spills).
#define CONV_CONFIGS(X)    \
  X(128, 128, 8, 8, 2, 1)  \
  X(64, 128, 8, 8, 3, 3)   \
  X(32, 128, 4, 4, 4, 4)   \
  X(64, 32, 4, 4, 8, 8)

#define CONV_KERNELS(BM, BN, TM, TN, MINB, MINB_W)                                                                      \
  extern "C" __global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB)                                  \
      conv_fwd_##BM##x##BN(const ConvArgs a, const float* __restrict__ x, const float* __restrict__ w,    \
                           const float* __restrict__ bias, const float* __restrict__ residual,            \
                           float* __restrict__ y) {                                                       \
    conv_fwd_impl<BM, BN, TM, TN>(a, x, w, bias, residual, y);                                            \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB)                                  \
      conv_dgrad_##BM##x##BN(const ConvArgs a, const float* __restrict__ dy, const float* __restrict__ w, \
                             const float* __restrict__ ymask, float* __restrict__ dx) {                   \
    conv_dgrad_impl<BM, BN, TM, TN>(a, dy, w, ymask, dx);                                                 \
  }                                                                                                       \
  extern "C" __global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB_W)                                  \
      conv_wgrad_##BM##x##BN(const ConvArgs a, const float* __restrict__ x, const float* __restrict__ dy, \
                             float* __restrict__ out) {                                                   \
    conv_wgrad_impl<BM, BN, TM, TN>(a, x, dy, out);                                                       \
  }

CONV_CONFIGS(CONV_KERNELS)

// dw[i] = sum over splits s (in order) of partial[s][i]; total = M*N.
struct ReduceArgs {
  int total;
  int splits;
};

extern "C" __global__ void conv_wgrad_reduce(const ReduceArgs a, const float* __restrict__ partial,
                                             float* __restrict__ out) {
  for (int i = grid_start(); i < a.total; i += grid_stride()) {
    float s = 0.f;
    for (int z = 0; z < a.splits; z++) s += partial[z * a.total + i];
    out[i] = s;
  }
}

// The ordered sum of a split forward or dgrad GEMM's partial products
// (out[split][m][n]) with the forward's epilogue, written in NCHW like the
// unsplit kernels: ((p0 + p1) + p2)..., then bias, residual, ReLU. Each
// thread walks the output in NCHW order, so reads and writes are coalesced.
struct SplitReduceArgs {
  int m, n, pq, splits, flags;
};

extern "C" __global__ void conv_split_reduce(const SplitReduceArgs a, const float* __restrict__ partial,
                                             const float* __restrict__ bias, const float* __restrict__ residual,
                                             float* __restrict__ out) {
  const int total = a.m * a.n;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int img = i / (a.m * a.pq);
    const int rem = i - img * a.m * a.pq;
    const int m = rem / a.pq;
    const int col = img * a.pq + (rem - m * a.pq);
    float v = 0.f;
    for (int z = 0; z < a.splits; z++) v += partial[(size_t)z * total + m * a.n + col];
    if (a.flags & CONV_BIAS) v += bias[m];
    if (a.flags & CONV_RESIDUAL) v += residual[i];
    if (a.flags & CONV_RELU) v = v > 0.f ? v : 0.f;
    out[i] = v;
  }
}

// A strided dgrad runs as stride^2 phases (src/backend/gpu/conv.rs,
// `phase_dgrad`): the input positions (h0 + i*stride, w0 + j*stride) are
// reached only by the taps (rh + i'*stride, rw + j'*stride), so each phase is
// a stride-1 dgrad with that sub-filter and no product is a known zero.
// Both kernels walk the phase's `ph x pw` grid of each plane (a filter's
// [ko][c], an input gradient's [img][c]) inside the full `h x w` one:
// conv_phase_filter gathers the sub-filter, out[plane][i][j] =
// w[plane][rh + i*stride][rw + j*stride]; conv_phase_scatter writes a
// phase's input gradient to its positions, dx[plane][h0 + i*stride][w0 +
// j*stride] = src[plane][i][j].
struct PhaseArgs {
  int planes;       // filter: output x input channels; scatter: images x channels
  int h, w;         // the full extent: filter R x S, or input H x W
  int ph, pw;       // the phase's extent: sub-filter or phase input
  int h0, w0;       // its first row and column in the full extent
  int stride;
};

// The full-extent index of element i of the phase grid.
__device__ __forceinline__ int phase_index(const PhaseArgs& a, int i) {
  const int j = i % a.pw, t = i / a.pw;
  const int r = t % a.ph, plane = t / a.ph;
  return (plane * a.h + a.h0 + r * a.stride) * a.w + a.w0 + j * a.stride;
}

extern "C" __global__ void conv_phase_filter(const PhaseArgs a, const float* __restrict__ w,
                                             float* __restrict__ out) {
  const int total = a.planes * a.ph * a.pw;
  for (int i = grid_start(); i < total; i += grid_stride()) out[i] = w[phase_index(a, i)];
}

extern "C" __global__ void conv_phase_scatter(const PhaseArgs a, const float* __restrict__ src,
                                              float* __restrict__ dx) {
  const int total = a.planes * a.ph * a.pw;
  for (int i = grid_start(); i < total; i += grid_stride()) dx[phase_index(a, i)] = src[i];
}

// Bias gradient: db[ko] = sum over images and positions of dy[img][ko][.],
// one block of 256 threads per channel, accumulated in double.
struct BiasGradArgs {
  int n, k, pq, pad_;
};

extern "C" __global__ void __launch_bounds__(256)
    conv_bias_grad(const BiasGradArgs a, const float* __restrict__ dy, float* __restrict__ db) {
  const int ko = blockIdx.x;
  const int count = a.n * a.pq;
  double s = 0.0;
  for (int i = threadIdx.x; i < count; i += 256) {
    const int img = i / a.pq;
    s += (double)dy[(img * a.k + ko) * a.pq + (i - img * a.pq)];
  }
  s = block_sum<256>(s);
  if (threadIdx.x == 0) db[ko] = (float)s;
}

// Eval-mode batch norm folded into the convolution before it:
// w'[o][...] = w[o][...] * g[o], b'[o] = (b[o] - mean[o]) * g[o] + beta[o],
// with g[o] = gamma[o] / sqrt(var[o] + eps).
struct FoldArgs {
  int k;        // output channels
  int per_k;    // filter values per output channel (C*R*S)
  int has_bias; // the conv has a bias of its own
  float eps;
};

extern "C" __global__ void conv_fold_bn(const FoldArgs a, const float* __restrict__ w, const float* __restrict__ b,
                                        const float* __restrict__ gamma, const float* __restrict__ beta,
                                        const float* __restrict__ mean, const float* __restrict__ var,
                                        float* __restrict__ w_out, float* __restrict__ b_out) {
  const int total = a.k * a.per_k;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int o = i / a.per_k;
    const float g = gamma[o] * (1.f / sqrtf(var[o] + a.eps));
    w_out[i] = w[i] * g;
    if (i - o * a.per_k == 0) b_out[o] = ((a.has_bias ? b[o] : 0.f) - mean[o]) * g + beta[o];
  }
}
