// Products: mul of two tensors (same shape, or a per-channel gate b[N*C]
// broadcast over planes of hw values) with its gradients, and the
// per-channel constant affine map x * scale[c] + shift[c] with its gradient.
// CPU twin: src/backend/cpu/scale.rs. Products go through mul_rn (no FMA
// contraction), as the CPU rounds each product before the sum.
#include "common.cuh"

// n: element count; c: channels (affine); hw: values per broadcast value
// (1 when both operands have one shape) or per channel plane (affine).
struct ScaleArgs {
  int n;
  int c;
  int hw;
  int pad_;
};

__device__ __forceinline__ float scale_mul_rn(float a, float b) {
#ifdef CWP_EMU
  return a * b;
#else
  return __fmul_rn(a, b);
#endif
}

// out[i] = a[i] * b[i / hw].
extern "C" __global__ void scale_mul(const ScaleArgs s, const float* __restrict__ a,
                                     const float* __restrict__ b, float* __restrict__ out) {
  for (int i = grid_start(); i < s.n; i += grid_stride()) out[i] = scale_mul_rn(a[i], b[i / s.hw]);
}

// db[k] = sum over the k-th plane of dy * a, in f64: one warp per plane,
// lanes striding the plane, then the warp's butterfly (a fixed order).
extern "C" __global__ void scale_mul_grad_b(const ScaleArgs s, const float* __restrict__ dy,
                                            const float* __restrict__ a, float* __restrict__ db) {
  const int planes = s.n / s.hw;
  const int warp = blockIdx.x * 8 + threadIdx.x / 32, lane = threadIdx.x % 32;
  const int pl = warp < planes ? warp : planes - 1;  // every lane takes part in the shuffles
  double acc = 0.0;
  for (int j = lane; j < s.hw; j += 32) acc += (double)dy[pl * s.hw + j] * (double)a[pl * s.hw + j];
  acc = warp_sum(acc);
  if (lane == 0 && warp < planes) db[pl] = (float)acc;
}

// y = x * ss[c] + ss[C + c]: ss holds C scales then C shifts.
extern "C" __global__ void scale_affine(const ScaleArgs s, const float* __restrict__ x,
                                        const float* __restrict__ ss, float* __restrict__ y) {
  for (int i = grid_start(); i < s.n; i += grid_stride()) {
    const int c = (i / s.hw) % s.c;
    y[i] = scale_mul_rn(x[i], ss[c]) + ss[s.c + c];
  }
}

// dx = dy * ss[c].
extern "C" __global__ void scale_affine_backward(const ScaleArgs s, const float* __restrict__ dy,
                                                 const float* __restrict__ ss, float* __restrict__ dx) {
  for (int i = grid_start(); i < s.n; i += grid_stride()) {
    const int c = (i / s.hw) % s.c;
    dx[i] = scale_mul_rn(dy[i], ss[c]);
  }
}
