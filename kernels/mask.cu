// The search ops: composite of canvas and other images through a mask, the
// mask and canvas (pattern) gradients reduced per search, and the signed step
// with clamping.
// CPU twin: src/backend/cpu/mask.rs. Shapes: canvas [S,C,H,W], mask [S,H,W],
// others and composites [S*B,C,H,W].
#include "common.cuh"

struct MaskArgs {
  int s;   // searches
  int b;   // images per search
  int c;   // channels
  int hw;  // pixels per plane
  float l1_grad;
  int n;   // element count for sign_step
  double lr;
};

// out[i] = m * canvas + (1 - m) * other.
extern "C" __global__ void mask_composite(const MaskArgs a, const float* __restrict__ canvas,
                                          const float* __restrict__ mask, const float* __restrict__ others,
                                          float* __restrict__ out) {
  const int total = a.s * a.b * a.c * a.hw;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int t = i / a.hw, j = i - t * a.hw;
    const int ch = t % a.c, img = t / a.c, si = img / a.b;
    const float m = mask[si * a.hw + j];
    out[i] = m * canvas[(si * a.c + ch) * a.hw + j] + (1.f - m) * others[i];
  }
}

// grad[s][j] = sum over the search's images b, then channels c (this order,
// as on the CPU) of dx * (canvas - other), plus l1_grad. One thread per
// (search, pixel): a fixed order, no atomics.
extern "C" __global__ void mask_grad(const MaskArgs a, const float* __restrict__ dx,
                                     const float* __restrict__ canvas, const float* __restrict__ others,
                                     float* __restrict__ grad) {
  const int total = a.s * a.hw;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int si = i / a.hw, j = i - si * a.hw;
    float g = 0.f;
    for (int bi = 0; bi < a.b; bi++) {
      const int img = si * a.b + bi;
      for (int ch = 0; ch < a.c; ch++) {
        const int o = (img * a.c + ch) * a.hw + j;
        g += dx[o] * (canvas[(si * a.c + ch) * a.hw + j] - others[o]);
      }
    }
    grad[i] = g + a.l1_grad;
  }
}

// dcanvas[s][c][j] = mask[s][j] * (sum over the search's images b, in this
// order from zero, of dx), multiplied once at the end as on the CPU. One
// thread per canvas element: a fixed order, no atomics.
extern "C" __global__ void mask_pattern_grad(const MaskArgs a, const float* __restrict__ dx,
                                             const float* __restrict__ mask, float* __restrict__ grad) {
  const int total = a.s * a.c * a.hw;
  const int image = a.c * a.hw;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int si = i / image, e = i - si * image, j = e % a.hw;
    float g = 0.f;
    for (int bi = 0; bi < a.b; bi++) g += dx[(si * a.b + bi) * image + e];
    grad[i] = g * mask[si * a.hw + j];
  }
}

__device__ __forceinline__ float sign_of(float g) { return g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f); }

// m = clamp(m - lr * sign(g), 0, 1) in double, rounded once to f32 (lr = 0.02
// has no exact f32 value); NaN stays NaN, as Rust's clamp.
extern "C" __global__ void mask_sign_step(const MaskArgs a, float* mask, const float* __restrict__ grad) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    const double v = (double)mask[i] - a.lr * (double)sign_of(grad[i]);
    mask[i] = (float)(v < 0.0 ? 0.0 : (v > 1.0 ? 1.0 : v));
  }
}
