// The activations of src/backend/activation.rs (Sigmoid, SiLU, HardSigmoid,
// HardSwish, Clip, LeakyReLU) and their input gradients from the op's input.
// CPU twin: src/backend/cpu/activation.rs (through Activation::apply/grad).
// Products go through mul_rn so that no multiply-add is contracted into an
// FMA: the CPU rounds each product, and the kink tests (alpha*x + beta
// against 0 and 1) must see the same value on both sides.
#include "common.cuh"

// n: element count; kind: the Activation code (Activation::kernel_args);
// p, q: its two parameters (alpha/beta, or min/max for Clip).
struct ActArgs {
  int n;
  int kind;
  float p;
  float q;
};

__device__ __forceinline__ float mul_rn(float a, float b) {
#ifdef CWP_EMU
  return a * b;
#else
  return __fmul_rn(a, b);
#endif
}

// Comparisons, not fminf/fmaxf, so NaN passes through as in PyTorch.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + expf(-x)); }

__device__ __forceinline__ float act_fwd(const ActArgs& a, float x) {
  switch (a.kind) {
    case 0:
      return sigmoid_f(x);
    case 1:
      return mul_rn(x, sigmoid_f(x));
    case 2:
      return clamp_nan(mul_rn(a.p, x) + a.q, 0.f, 1.f);
    case 3:
      return mul_rn(x, clamp_nan(x + 3.f, 0.f, 6.f)) / 6.f;
    case 4:
      return clamp_nan(x, a.p, a.q);
    default:
      return x > 0.f ? x : mul_rn(a.p, x);
  }
}

__device__ __forceinline__ float act_grad(const ActArgs& a, float x, float dy) {
  switch (a.kind) {
    case 0: {
      const float s = sigmoid_f(x);
      return mul_rn(mul_rn(dy, s), 1.f - s);
    }
    case 1: {
      const float s = sigmoid_f(x);
      return mul_rn(mul_rn(dy, s), 1.f + mul_rn(x, 1.f - s));
    }
    case 2: {
      const float v = mul_rn(a.p, x) + a.q;
      return (v > 0.f && v < 1.f) ? mul_rn(dy, a.p) : 0.f;
    }
    case 3:
      return x <= -3.f ? 0.f : (x >= 3.f ? dy : mul_rn(dy, x / 3.f + 0.5f));
    case 4:
      return (x > a.p && x < a.q) ? dy : 0.f;
    default:
      return x > 0.f ? dy : mul_rn(dy, a.p);
  }
}

extern "C" __global__ void act_forward(const ActArgs a, const float* __restrict__ x, float* __restrict__ y) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) y[i] = act_fwd(a, x[i]);
}

extern "C" __global__ void act_backward(const ActArgs a, const float* __restrict__ dy,
                                        const float* __restrict__ x, float* __restrict__ dx) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) dx[i] = act_grad(a, x[i], dy[i]);
}
