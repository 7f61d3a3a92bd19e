// Max, average and global average pooling, forward and backward.
// CPU twin: src/backend/cpu/pool.rs.
//
// The backward passes gather instead of scatter: each input position visits
// the windows that contain it (in row-major window order) and adds their
// share, so no two threads write the same value and no atomics are needed;
// max pooling recomputes each window's first maximum to see whether this
// position won it.
#include "common.cuh"

struct PoolArgs {
  int n, c, h, w;  // input
  int oh, ow;      // output extent
  int k, stride, pad;
  int count_pad;  // avg: divide by the window clipped to the padded input (1) or the input (0)
};

// The window of output index o along an axis of length len, clipped to the
// input: [lo, hi).
__device__ __forceinline__ void window(const PoolArgs& a, int o, int len, int& lo, int& hi) {
  const int start = o * a.stride - a.pad;
  lo = start > 0 ? start : 0;
  hi = start + a.k < len ? start + a.k : len;
}

// Flat index (within the plane) of the first maximum of window (oh, ow);
// NaN wins, as on the CPU.
__device__ __forceinline__ int window_argmax(const PoolArgs& a, const float* __restrict__ plane, int oh, int ow,
                                             float& best) {
  int h0, h1, w0, w1;
  window(a, oh, a.h, h0, h1);
  window(a, ow, a.w, w0, w1);
  int bi = h0 * a.w + w0;
  best = plane[bi];
  for (int ih = h0; ih < h1; ih++)
    for (int iw = w0; iw < w1; iw++) {
      const int i = ih * a.w + iw;
      const float v = plane[i];
      if (v > best || v != v) {
        best = v;
        bi = i;
      }
    }
  return bi;
}

extern "C" __global__ void max_pool_fwd(const PoolArgs a, const float* __restrict__ x, float* __restrict__ y) {
  const int opl = a.oh * a.ow;
  const int total = a.n * a.c * opl;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int pl = i / opl, o = i - pl * opl;
    float best;
    window_argmax(a, x + pl * a.h * a.w, o / a.ow, o % a.ow, best);
    y[i] = best;
  }
}

// Output indices along one axis whose window contains input index i: [lo, hi).
__device__ __forceinline__ void covering(const PoolArgs& a, int i, int out, int& lo, int& hi) {
  // o*stride - pad <= i < o*stride - pad + k
  const int t = i + a.pad - a.k + 1;
  lo = t > 0 ? (t + a.stride - 1) / a.stride : 0;
  hi = (i + a.pad) / a.stride + 1;
  if (hi > out) hi = out;
}

extern "C" __global__ void max_pool_bwd(const PoolArgs a, const float* __restrict__ x, const float* __restrict__ dy,
                                        float* __restrict__ dx) {
  const int ipl = a.h * a.w, opl = a.oh * a.ow;
  const int total = a.n * a.c * ipl;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int pl = i / ipl, j = i - pl * ipl;
    const int ih = j / a.w, iw = j - (j / a.w) * a.w;
    int oh0, oh1, ow0, ow1;
    covering(a, ih, a.oh, oh0, oh1);
    covering(a, iw, a.ow, ow0, ow1);
    float g = 0.f;
    for (int oh = oh0; oh < oh1; oh++)
      for (int ow = ow0; ow < ow1; ow++) {
        float best;
        if (window_argmax(a, x + pl * ipl, oh, ow, best) == j) g += dy[pl * opl + oh * a.ow + ow];
      }
    dx[i] = g;
  }
}

// The divisor of average window (oh, ow), as PyTorch computes it: the window
// clipped to the padded input when padding counts, else to the input. In
// floor mode with padding counted it is k*k; in ceil mode the last windows
// may hang over the right padding and count less.
__device__ __forceinline__ float avg_divisor(const PoolArgs& a, int oh, int ow) {
  int h0, h1, w0, w1;
  if (a.count_pad) {
    h0 = oh * a.stride - a.pad;
    w0 = ow * a.stride - a.pad;
    h1 = h0 + a.k < a.h + a.pad ? h0 + a.k : a.h + a.pad;
    w1 = w0 + a.k < a.w + a.pad ? w0 + a.k : a.w + a.pad;
  } else {
    window(a, oh, a.h, h0, h1);
    window(a, ow, a.w, w0, w1);
  }
  return (float)((h1 - h0) * (w1 - w0));
}

// Average over the window, divided by avg_divisor; the window is summed row
// by row as on the CPU.
extern "C" __global__ void avg_pool_fwd(const PoolArgs a, const float* __restrict__ x, float* __restrict__ y) {
  const int opl = a.oh * a.ow;
  const int total = a.n * a.c * opl;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int pl = i / opl, o = i - pl * opl;
    const float div = avg_divisor(a, o / a.ow, o % a.ow);
    int h0, h1, w0, w1;
    window(a, o / a.ow, a.h, h0, h1);
    window(a, o % a.ow, a.w, w0, w1);
    const float* p = x + pl * a.h * a.w;
    float s = 0.f;
    for (int ih = h0; ih < h1; ih++) {
      float r = 0.f;
      for (int iw = w0; iw < w1; iw++) r += p[ih * a.w + iw];
      s += r;
    }
    y[i] = s / div;
  }
}

extern "C" __global__ void avg_pool_bwd(const PoolArgs a, const float* __restrict__ dy, float* __restrict__ dx) {
  const int ipl = a.h * a.w, opl = a.oh * a.ow;
  const int total = a.n * a.c * ipl;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int pl = i / ipl, j = i - pl * ipl;
    const int ih = j / a.w, iw = j - (j / a.w) * a.w;
    int oh0, oh1, ow0, ow1;
    covering(a, ih, a.oh, oh0, oh1);
    covering(a, iw, a.ow, ow0, ow1);
    float g = 0.f;
    for (int oh = oh0; oh < oh1; oh++)
      for (int ow = ow0; ow < ow1; ow++) g += dy[pl * opl + oh * a.ow + ow] / avg_divisor(a, oh, ow);
    dx[i] = g;
  }
}

// Mean of each (image, channel) plane: one warp per plane, double sums.
extern "C" __global__ void __launch_bounds__(256)
    global_avg_fwd(const PoolArgs a, const float* __restrict__ x, float* __restrict__ y) {
  const int planes = a.n * a.c, hw = a.h * a.w;
  const int warp = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pl = warp < planes ? warp : planes - 1;  // every lane takes part in the shuffles
  double s = 0.0;
  for (int j = lane; j < hw; j += 32) s += (double)x[pl * hw + j];
  s = warp_sum(s);
  if (lane == 0 && warp < planes) y[pl] = (float)(s / hw);
}

extern "C" __global__ void global_avg_bwd(const PoolArgs a, const float* __restrict__ dy, float* __restrict__ dx) {
  const int hw = a.h * a.w;
  const int total = a.n * a.c * hw;
  for (int i = grid_start(); i < total; i += grid_stride()) dx[i] = dy[i / hw] / (float)hw;
}
