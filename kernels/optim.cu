// Optimiser steps, in place. CPU twin: src/backend/cpu/optim.rs.
#include "common.cuh"

struct OptimArgs {
  int n;
  float lr;        // SGD learning rate, or the PGD step
  float momentum;
  float weight_decay;
  float eps;       // PGD radius
  int pad_;
};

// PyTorch's SGD with momentum: g' = g + wd * p; v = momentum * v + g'; p -= lr * v.
extern "C" __global__ void sgd_step(const OptimArgs a, float* param, const float* __restrict__ grad,
                                    float* velocity) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    const float w = param[i];
    const float g = grad[i] + a.weight_decay * w;
    const float v = a.momentum * velocity[i] + g;
    velocity[i] = v;
    param[i] = w - a.lr * v;
  }
}

// x = clamp(clamp(x + step * sign(g), x0 - eps, x0 + eps), 0, 1).
extern "C" __global__ void pgd_step(const OptimArgs a, float* x, const float* __restrict__ grad,
                                    const float* __restrict__ x0) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    const float g = grad[i];
    const float sg = g > 0.f ? 1.f : (g < 0.f ? -1.f : 0.f);
    float v = fminf(fmaxf(x[i] + a.lr * sg, x0[i] - a.eps), x0[i] + a.eps);
    x[i] = v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
  }
}
