// The implicit-GEMM operand gathers of the convolutions, shared by conv.cu
// (global -> registers -> shared) and conv_mma.cu (cp.async copies): for
// each of a thread's E slots of one K step, whether a global element feeds
// it and which one, with the cursors moved on by the step. The kernels
// differ only in how they move the element; the im2col geometry, and so
// which element lands where, is written once here. CPU twin of the
// geometry: im2col_segment and col2im in src/backend/cpu/conv.rs.
//
// Each gather's `step(k0, f)` calls `f(i, ok, idx)` for its slots (`idx`
// only means something when `ok`), then advances by the step; slot i sits
// at row `k(i)` of the step and column `mn(i)` of the tile. Template
// parameters: KB the K step, BM/BN the tile extent, NT the threads.
#pragma once

// Shared by all conv kernels (the Rust twin is `ConvArgs` in
// src/backend/gpu/conv.rs).
struct ConvArgs {
  int n, c, h, w;   // input batch, channels, height, width
  int k, r, s;      // output channels, filter height and width
  int p, q;         // output height and width
  int stride, pad;
  int flags;        // CONV_* bits
  int gm, gn, gk;   // GEMM extents M, N, K
  int k_chunk;      // K values per split (a multiple of the K step)
  int splits;       // number of K splits (gridDim.z; 0 or 1: unsplit)
  int pad_w;        // forward and dgrad: the width's padding (`pad` is the
                    // height's); they differ only in a phase of a strided dgrad
};

// The K range of this block: a forward or dgrad GEMM split along K
// (a.splits > 1, blockIdx.z the split) sums [z * k_chunk, (z + 1) * k_chunk)
// into partial products for conv_split_reduce; unsplit, the whole K.
struct SplitK {
  int begin, end;
  bool split;
  __device__ __forceinline__ explicit SplitK(const ConvArgs& a) {
    split = a.splits > 1;
    begin = split ? (int)blockIdx.z * a.k_chunk : 0;
    end = split ? min(a.gk, begin + a.k_chunk) : a.gk;
  }
};

constexpr int CONV_BIAS = 1;      // forward: add bias[m]
constexpr int CONV_RELU = 2;      // forward: max(., 0) last
constexpr int CONV_RESIDUAL = 4;  // forward: add residual[same index] before the ReLU
constexpr int CONV_DY_MASK = 8;   // dgrad: dy is multiplied by (y > 0)
constexpr int CONV_K_RSC = 16;    // tensor cores: K runs (r, s, c), weights packed
                                  // so (conv_pack_rsc); see RscGather

// Moves a (c, r, s) filter-tap cursor on by one K step, given the step
// split as (dc, dr, ds) in the same mixed radix (R, S): no division in the
// k loop.
__device__ __forceinline__ void advance_crs(int& c, int& r, int& s, int dc, int dr, int ds, int R, int S) {
  s += ds;
  if (s >= S) {
    s -= S;
    r++;
  }
  r += dr;
  if (r >= R) {
    r -= R;
    c++;
  }
  c += dc;
}

// A (c, r, s) cursor for each of E slots, slot i at K offset
// k_begin + first + i * step, stepped by KB with carries.
template <int KB, int E>
struct CrsCursor {
  int R, S, dc, dr, ds;
  int cc[E], rr[E], ss[E];
  __device__ __forceinline__ CrsCursor(int R_, int S_, int k_begin, int first, int step) : R(R_), S(S_) {
    const int RS = R * S;
    dc = KB / RS;
    dr = (KB % RS) / S;
    ds = (KB % RS) % S;
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int k = k_begin + first + i * step;
      cc[i] = k / RS;
      const int rs = k - cc[i] * RS;
      rr[i] = rs / S;
      ss[i] = rs - rr[i] * S;
    }
  }
  __device__ __forceinline__ void advance(int i) { advance_crs(cc[i], rr[i], ss[i], dc, dr, ds, R, S); }
};

// Forward B: im2col of x, B[k = (c, r, s)][n = (img, p, q)] =
// x[img][c][p*st-pad+r][q*st-pad+s]; n-fastest (consecutive threads take
// consecutive n): slot i is row `row(i)` of the step, column `nn`.
template <int KB, int BN, int NT>
struct FwdGather {
  static constexpr int E = BN * KB / NT;
  static constexpr int STEP = NT / BN;
  int K, H, W, HW, nn, base, h0, w0;
  bool nvalid;
  CrsCursor<KB, E> crs;
  __device__ __forceinline__ FwdGather(const ConvArgs& a, int ntile, int k_begin)
      : K(a.gk), H(a.h), W(a.w), HW(a.h * a.w), crs(a.r, a.s, k_begin, threadIdx.x / BN, STEP) {
    nn = threadIdx.x % BN;
    const int n = ntile + nn;
    const int pq = a.p * a.q;
    nvalid = n < a.gn;
    const int img = nvalid ? n / pq : 0;
    const int rem = n - img * pq;
    const int p = rem / a.q, q = rem - (rem / a.q) * a.q;
    base = img * a.c * HW;
    h0 = p * a.stride - a.pad;
    w0 = q * a.stride - a.pad_w;
  }
  __device__ __forceinline__ static int row(int i) { return threadIdx.x / BN + i * STEP; }
  __device__ __forceinline__ int k(int i) const { return row(i); }
  __device__ __forceinline__ int mn(int) const { return nn; }
  template <class F>
  __device__ __forceinline__ void step(int k0, F f) {
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int h = h0 + crs.rr[i], w = w0 + crs.ss[i];
      const bool ok = nvalid && k0 + row(i) < K && (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;
      f(i, ok, base + crs.cc[i] * HW + h * W + w);
      crs.advance(i);
    }
  }
};

// Dgrad B: the "col" of dy, B[k = (ko, r, s)][n = (img, h, w)] =
// dy[img][ko][(h + pad - r) / stride][(w + pad - s) / stride] where the
// division is exact and in range, else 0; also 0 where the ReLU mask (the
// fused conv's output y, when given) is not positive. n-fastest.
template <int KB, int BN, int NT>
struct DgradGather {
  static constexpr int E = BN * KB / NT;
  static constexpr int STEP = NT / BN;
  const float* __restrict__ ymask;
  int K, P, Q, PQ, stride, nn, base, hh, ww;
  bool nvalid;
  CrsCursor<KB, E> crs;
  __device__ __forceinline__ DgradGather(const ConvArgs& a, const float* __restrict__ ymask_, int ntile, int k_begin)
      : ymask(ymask_), K(a.gk), P(a.p), Q(a.q), PQ(a.p * a.q), stride(a.stride),
        crs(a.r, a.s, k_begin, threadIdx.x / BN, STEP) {
    nn = threadIdx.x % BN;
    const int n = ntile + nn;
    const int hw = a.h * a.w;
    nvalid = n < a.gn;
    const int img = nvalid ? n / hw : 0;
    const int rem = n - img * hw;
    const int h = rem / a.w, w = rem - (rem / a.w) * a.w;
    base = img * a.k * PQ;
    hh = h + a.pad;
    ww = w + a.pad_w;
  }
  __device__ __forceinline__ static int row(int i) { return threadIdx.x / BN + i * STEP; }
  __device__ __forceinline__ int k(int i) const { return row(i); }
  __device__ __forceinline__ int mn(int) const { return nn; }
  template <class F>
  __device__ __forceinline__ void step(int k0, F f) {
#pragma unroll
    for (int i = 0; i < E; i++) {
      int ph = hh - crs.rr[i], pw = ww - crs.ss[i];
      bool ok = nvalid && k0 + row(i) < K && ph >= 0 && pw >= 0;
      if (stride != 1) {
        ok = ok && (ph % stride) == 0 && (pw % stride) == 0;
        ph /= stride;
        pw /= stride;
      }
      ok = ok && ph < P && pw < Q;
      const int idx = ok ? base + crs.cc[i] * PQ + ph * Q + pw : 0;
      if (ok && ymask != nullptr) ok = ymask[idx] > 0.f;
      f(i, ok, idx);
      crs.advance(i);
    }
  }
};

// Forward or dgrad B with K ordered (r, s, c), for a GEMM whose reduced
// channels (the forward's Cin, the dgrad's Cout) are a multiple of the K
// step KB: a step's KB rows then share one filter tap, so a column needs one
// bounds check per step and its rows are whole planes apart, where the
// (c, r, s) order (FwdGather, DgradGather) decodes every element. The A
// operand must run in the same order (conv_pack_rsc). The chunks of a split
// K are whole steps, so every step starts on a tap's first channel.
//   forward: B[(r, s, c)][(img, p, q)] = x[img][c][p*st - pad + r][q*st - pad_w + s]
//   dgrad (stride 1): B[(r, s, ko)][(img, h, w)] = dy[img][ko][h + pad - r][w + pad_w - s],
//            0 where the ReLU mask (when given) is not positive.
// n-fastest, as FwdGather.
template <int KB, int BN, int NT, bool FWD>
struct RscGather {
  static constexpr int E = BN * KB / NT;
  static constexpr int STEP = NT / BN;
  const float* __restrict__ ymask;
  int C, S, H, W, plane, base, h0, w0, c0, r, s;
  bool nvalid;
  __device__ __forceinline__ RscGather(const ConvArgs& a, const float* __restrict__ ymask_, int ntile, int k_begin)
      : ymask(ymask_), S(a.s) {
    C = FWD ? a.c : a.k;
    H = FWD ? a.h : a.p;
    W = FWD ? a.w : a.q;
    plane = H * W;
    const int n = ntile + (int)threadIdx.x % BN;
    const int per_img = FWD ? a.p * a.q : a.h * a.w, cols = FWD ? a.q : a.w;
    nvalid = n < a.gn;
    const int img = nvalid ? n / per_img : 0;
    const int rem = n - img * per_img;
    const int y = rem / cols, x = rem - (rem / cols) * cols;
    h0 = FWD ? y * a.stride - a.pad : y + a.pad;
    w0 = FWD ? x * a.stride - a.pad_w : x + a.pad_w;
    base = (img * C + (int)threadIdx.x / BN) * plane;
    const int rs = k_begin / C;
    c0 = k_begin - rs * C;
    r = rs / S;
    s = rs - r * S;
  }
  __device__ __forceinline__ static int row(int i) { return threadIdx.x / BN + i * STEP; }
  __device__ __forceinline__ int k(int i) const { return row(i); }
  __device__ __forceinline__ int mn(int) const { return threadIdx.x % BN; }
  template <class F>
  __device__ __forceinline__ void step(int, F f) {
    const int h = FWD ? h0 + r : h0 - r, w = FWD ? w0 + s : w0 - s;
    const bool ok = nvalid && (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W;
    const int first = base + c0 * plane + h * W + w;
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int idx = first + i * STEP * plane;
      bool on = ok;
      if (!FWD && on && ymask != nullptr) on = ymask[idx] > 0.f;
      f(i, on, idx);
    }
    c0 += KB;
    if (c0 >= C) {
      c0 = 0;
      if (++s == S) {
        s = 0;
        r++;
      }
    }
  }
};

// Wgrad B: col(x)^T, B[k = (img, p, q)][n = (c, r, s)] =
// x[img][c][p*st-pad+r][q*st-pad+s]; k-fastest (consecutive threads take
// consecutive output pixels): slot i is column `col(i)`, row `kk`. Each
// slot keeps its offset c*H*W + r*W + s and its (r, s) packed in one int.
template <int KB, int BN, int NT>
struct WgradGather {
  static constexpr int E = BN * KB / NT;
  static constexpr int STEP = NT / KB;
  int K, H, W, P, Q, CHW, stride, pad, kk, img, p, q;
  int off[E], rs[E];
  __device__ __forceinline__ WgradGather(const ConvArgs& a, int ntile, int k_begin)
      : K(a.gk), H(a.h), W(a.w), P(a.p), Q(a.q), CHW(a.c * a.h * a.w), stride(a.stride), pad(a.pad) {
    kk = threadIdx.x % KB;
    const int RS = a.r * a.s;
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int n = ntile + col(i);
      const int c = n / RS, t = n - (n / RS) * RS;
      const int r = t / a.s, sx = t - (t / a.s) * a.s;
      off[i] = c * H * W + r * W + sx;
      // Out-of-range columns: a row offset (-32768) that is never in bounds.
      rs[i] = n < a.gn ? (r << 16) | sx : (int)0x80000000;
    }
    const int k = k_begin + kk;
    const int pq = P * Q;
    img = k / pq;
    const int rem = k - img * pq;
    p = rem / Q;
    q = rem - p * Q;
  }
  __device__ __forceinline__ static int col(int i) { return threadIdx.x / KB + i * STEP; }
  __device__ __forceinline__ int k(int) const { return kk; }
  __device__ __forceinline__ int mn(int i) const { return col(i); }
  template <class F>
  __device__ __forceinline__ void step(int k0, F f) {
    const int k = k0 + kk;
    const int hb = p * stride - pad, wb = q * stride - pad;
    const int base = img * CHW + hb * W + wb;
#pragma unroll
    for (int i = 0; i < E; i++) {
      const int h = hb + (rs[i] >> 16), w = wb + (rs[i] & 0xffff);
      f(i, k < K && (unsigned)h < (unsigned)H && (unsigned)w < (unsigned)W, base + off[i]);
    }
    q += KB;
    while (q >= Q) {
      q -= Q;
      p++;
    }
    while (p >= P) {
      p -= P;
      img++;
    }
  }
};

// An A operand stored as planes, A[m][k = (outer, in)] = base[outer][m][in]
// with `inner` values of `in`: dgrad's transposed weights (m = c, outer =
// ko, in = (r, s)) and wgrad's dy (m = ko, outer = img, in = (p, q)).
// k-fastest: slot i is output row `m(i)` (absolute), K column `kk`.
template <int KB, int BM, int NT>
struct PlaneAGather {
  static constexpr int E = BM * KB / NT;
  int M, K, inner, kk, m0, outer, in, douter, dinner;
  __device__ __forceinline__ PlaneAGather(int m_rows, int k_cols, int inner_, int mtile,
                                          int k_begin)
      : M(m_rows), K(k_cols), inner(inner_) {
    kk = threadIdx.x % KB;
    m0 = mtile + threadIdx.x / KB;
    const int k = k_begin + kk;
    outer = k / inner;
    in = k - outer * inner;
    // A K step of KB moves `in` by KB % inner with at most one carry.
    douter = KB / inner;
    dinner = KB % inner;
  }
  __device__ __forceinline__ int m(int i) const { return m0 + i * (NT / KB); }
  __device__ __forceinline__ int k(int) const { return kk; }
  // The row within the tile, from the thread index (no register kept for it).
  __device__ __forceinline__ int mn(int i) const { return threadIdx.x / KB + i * (NT / KB); }
  template <class F>
  __device__ __forceinline__ void step(int k0, F f) {
    const int k = k0 + kk;
    const int off = outer * M * inner + in;
#pragma unroll
    for (int i = 0; i < E; i++) f(i, m(i) < M && k < K, off + m(i) * inner);
    in += dinner;
    if (in >= inner) {
      in -= inner;
      outer++;
    }
    outer += douter;
  }
};

// Dgrad A: transposed weights, A[m = c][k = (ko, r, s)] = w[ko][c][r][s].
template <int KB, int BM, int NT>
struct DgradAGather : PlaneAGather<KB, BM, NT> {
  __device__ __forceinline__ DgradAGather(const ConvArgs& a, int mtile, int k_begin)
      : PlaneAGather<KB, BM, NT>(a.gm, a.gk, a.r * a.s, mtile, k_begin) {}
};

// Wgrad A: dy as a matrix, A[m = ko][k = (img, pq)] = dy[img][ko][pq].
template <int KB, int BM, int NT>
struct WgradAGather : PlaneAGather<KB, BM, NT> {
  __device__ __forceinline__ WgradAGather(const ConvArgs& a, int mtile, int k_begin)
      : PlaneAGather<KB, BM, NT>(a.gm, a.gk, a.p * a.q, mtile, k_begin) {}
};
