// Grouped and dilated 2-D convolution (depthwise when groups == channels) as
// direct loops; the dense undilated case stays on conv.cu's implicit GEMMs.
// CPU twin: src/backend/cpu/conv_grouped.rs.
//
// Forward and dgrad: one block per output (or input) plane and a tile of
// its positions, one thread per value. The block first stages the filter
// taps that plane needs (the channels of one group, in chunks of
// GCONV_SMEM floats) in shared memory, so every thread reads its weights
// from there while its own activations come from global memory; in the
// depthwise case that is just the plane's KH*KW taps. Every value is summed
// in (channel, tap row, tap column) order, as on the CPU, then the epilogue
// of conv.cu (bias, residual, ReLU; or the ReLU mask on dy for dgrad).
//
// wgrad: one block per filter value and a chunk of the long N*P*Q axis; each
// thread sums a fixed strided subset, the block combines them with
// block_sum, and conv_wgrad_reduce (conv.cu) adds the chunks in order:
// deterministic, no atomics.
#include "common.cuh"

// The Rust twin is `GConvArgs` in src/backend/gpu/conv_grouped.rs.
struct GConvArgs {
  int n, c, h, w;     // input batch, channels, height, width
  int k, r, s;        // output channels, filter height and width
  int p, q;           // output height and width
  int stride, pad, dil;
  int cpg, kpg;       // input and output channels per group
  int flags;          // GCONV_* bits
  int chunk;          // wgrad: N*P*Q positions per block along gridDim.y
};

#define GCONV_BIAS 1      // forward: add bias[o]
#define GCONV_RELU 2      // forward: max(., 0) last
#define GCONV_RESIDUAL 4  // forward: add residual[same index] before the ReLU
#define GCONV_DY_MASK 8   // dgrad: dy is multiplied by (y > 0)

// Filter floats staged in shared memory at a time (the host refuses filters
// whose KH*KW exceeds it).
#define GCONV_SMEM 4096

extern "C" __global__ void __launch_bounds__(256)
    gconv_fwd(const GConvArgs a, const float* __restrict__ x, const float* __restrict__ w,
              const float* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ y) {
  __shared__ float ws[GCONV_SMEM];
  const int plane = blockIdx.x;  // img * K + o
  const int img = plane / a.k, o = plane - (plane / a.k) * a.k;
  const int c_base = (o / a.kpg) * a.cpg;
  const int pq = a.p * a.q, rs = a.r * a.s;
  const int pos = blockIdx.y * blockDim.x + threadIdx.x;
  const bool live = pos < pq;
  const int oh = live ? pos / a.q : 0, ow = live ? pos - (pos / a.q) * a.q : 0;
  const int ih0 = oh * a.stride - a.pad, iw0 = ow * a.stride - a.pad;
  const int per_chunk = GCONV_SMEM / rs;
  float acc = 0.f;
  for (int c0 = 0; c0 < a.cpg; c0 += per_chunk) {
    const int cn = a.cpg - c0 < per_chunk ? a.cpg - c0 : per_chunk;
    __syncthreads();  // the previous chunk's readers are done
    for (int i = threadIdx.x; i < cn * rs; i += blockDim.x) ws[i] = w[(o * a.cpg + c0) * rs + i];
    __syncthreads();
    if (live) {
      for (int ci = 0; ci < cn; ci++) {
        const float* xp = x + (img * a.c + c_base + c0 + ci) * a.h * a.w;
        const float* wp = ws + ci * rs;
        for (int rr = 0; rr < a.r; rr++) {
          const int ih = ih0 + rr * a.dil;
          if (ih < 0 || ih >= a.h) continue;
          for (int ss = 0; ss < a.s; ss++) {
            const int iw = iw0 + ss * a.dil;
            if (iw < 0 || iw >= a.w) continue;
            acc += wp[rr * a.s + ss] * xp[ih * a.w + iw];
          }
        }
      }
    }
  }
  if (!live) return;
  const int idx = plane * pq + pos;
  float v = acc;
  if (a.flags & GCONV_BIAS) v += bias[o];
  if (a.flags & GCONV_RESIDUAL) v += residual[idx];
  if (a.flags & GCONV_RELU) v = v > 0.f ? v : 0.f;
  y[idx] = v;
}

// Input gradient: one thread per input value, gathering from the output
// channels of its group (in order) every tap that reached it.
extern "C" __global__ void __launch_bounds__(256)
    gconv_dgrad(const GConvArgs a, const float* __restrict__ dy, const float* __restrict__ w,
                const float* __restrict__ ymask, float* __restrict__ dx) {
  __shared__ float ws[GCONV_SMEM];
  const int plane = blockIdx.x;  // img * C + c
  const int img = plane / a.c, c = plane - (plane / a.c) * a.c;
  const int grp = c / a.cpg, cl = c - grp * a.cpg;
  const int hw = a.h * a.w, pq = a.p * a.q, rs = a.r * a.s;
  const int pos = blockIdx.y * blockDim.x + threadIdx.x;
  const bool live = pos < hw;
  const int ih = live ? pos / a.w : 0, iw = live ? pos - (pos / a.w) * a.w : 0;
  const int per_chunk = GCONV_SMEM / rs;
  const bool mask = (a.flags & GCONV_DY_MASK) != 0;
  float acc = 0.f;
  for (int o0 = 0; o0 < a.kpg; o0 += per_chunk) {
    const int on = a.kpg - o0 < per_chunk ? a.kpg - o0 : per_chunk;
    __syncthreads();
    for (int i = threadIdx.x; i < on * rs; i += blockDim.x) {
      const int oi = i / rs, t = i - (i / rs) * rs;
      ws[i] = w[((grp * a.kpg + o0 + oi) * a.cpg + cl) * rs + t];
    }
    __syncthreads();
    if (live) {
      for (int oi = 0; oi < on; oi++) {
        const int dyp = (img * a.k + grp * a.kpg + o0 + oi) * pq;
        const float* wp = ws + oi * rs;
        for (int rr = 0; rr < a.r; rr++) {
          const int th = ih + a.pad - rr * a.dil;  // = oh * stride
          if (th < 0 || th % a.stride != 0) continue;
          const int oh = th / a.stride;
          if (oh >= a.p) continue;
          for (int ss = 0; ss < a.s; ss++) {
            const int tw = iw + a.pad - ss * a.dil;
            if (tw < 0 || tw % a.stride != 0) continue;
            const int ow = tw / a.stride;
            if (ow >= a.q) continue;
            const int j = dyp + oh * a.q + ow;
            float g = dy[j];
            if (mask && !(ymask[j] > 0.f)) g = 0.f;
            acc += wp[rr * a.s + ss] * g;
          }
        }
      }
    }
  }
  if (live) dx[plane * hw + pos] = acc;
}

// Filter gradient: block (filter value, chunk of N*P*Q). Writes the chunk's
// sum to partial[chunk][value] (gridDim.y == 1: the gradient itself).
extern "C" __global__ void __launch_bounds__(256)
    gconv_wgrad(const GConvArgs a, const float* __restrict__ x, const float* __restrict__ dy,
                float* __restrict__ partial) {
  const int rs = a.r * a.s;
  const int value = blockIdx.x;  // (o * cpg + cl) * rs + t
  const int t = value % rs, ocl = value / rs;
  const int o = ocl / a.cpg, cl = ocl - (ocl / a.cpg) * a.cpg;
  const int c = (o / a.kpg) * a.cpg + cl;
  const int rr = t / a.s, ss = t - (t / a.s) * a.s;
  const int pq = a.p * a.q, total = a.n * pq;
  const int begin = blockIdx.y * a.chunk;
  const int end = begin + a.chunk < total ? begin + a.chunk : total;
  float acc = 0.f;
  for (int i = begin + threadIdx.x; i < end; i += 256) {
    const int img = i / pq, pos = i - (i / pq) * pq;
    const int oh = pos / a.q, ow = pos - (pos / a.q) * a.q;
    const int ih = oh * a.stride - a.pad + rr * a.dil;
    const int iw = ow * a.stride - a.pad + ss * a.dil;
    if (ih < 0 || ih >= a.h || iw < 0 || iw >= a.w) continue;
    acc += dy[(img * a.k + o) * pq + pos] * x[((img * a.c + c) * a.h + ih) * a.w + iw];
  }
  acc = block_sum<256>(acc);
  if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + value] = acc;
}
