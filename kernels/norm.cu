// Batch norm (eval: running statistics; train: batch statistics, with the
// running-statistics update and the backward pass). Tensors are [N, C, ...]
// with `plane` values per (image, channel). CPU twin: src/backend/cpu/norm.rs.
//
// Per-channel reductions run one block of 256 threads per channel, each
// thread summing a fixed strided subset in double, combined by a fixed tree
// (block_sum): deterministic, and as accurate as the CPU's f64 sums.
#include "common.cuh"

struct BnArgs {
  int n;       // images
  int c;       // channels
  int plane;   // values per (image, channel)
  float eps;
  float momentum;
  int pad_;
};

// y = (x - mean) * (gamma / sqrt(var + eps)) + beta.
extern "C" __global__ void bn_eval(const BnArgs a, const float* __restrict__ x, const float* __restrict__ gamma,
                                   const float* __restrict__ beta, const float* __restrict__ mean,
                                   const float* __restrict__ var, float* __restrict__ y) {
  const int total = a.n * a.c * a.plane;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int ch = (i / a.plane) % a.c;
    const float s = (1.f / sqrtf(var[ch] + a.eps)) * gamma[ch];
    y[i] = (x[i] - mean[ch]) * s + beta[ch];
  }
}

// dx = dy * gamma / sqrt(var + eps).
extern "C" __global__ void bn_eval_backward(const BnArgs a, const float* __restrict__ dy,
                                            const float* __restrict__ gamma, const float* __restrict__ var,
                                            float* __restrict__ dx) {
  const int total = a.n * a.c * a.plane;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int ch = (i / a.plane) % a.c;
    const float s = (1.f / sqrtf(var[ch] + a.eps)) * gamma[ch];
    dx[i] = dy[i] * s;
  }
}

// Index of the j-th value (in image order) of channel ch.
__device__ __forceinline__ int chan_index(const BnArgs& a, int ch, int j) {
  const int img = j / a.plane;
  return (img * a.c + ch) * a.plane + (j - img * a.plane);
}

// Batch statistics of channel blockIdx.x (two passes, double), the saved
// mean and 1/sqrt(var + eps), and the running-statistics update with the
// unbiased variance.
extern "C" __global__ void __launch_bounds__(256)
    bn_train_stats(const BnArgs a, const float* __restrict__ x, float* __restrict__ running_mean,
                   float* __restrict__ running_var, float* __restrict__ mean_out, float* __restrict__ invstd_out) {
  const int ch = blockIdx.x;
  const int count = a.n * a.plane;
  double s = 0.0;
  for (int j = threadIdx.x; j < count; j += 256) s += (double)x[chan_index(a, ch, j)];
  const double mean = block_sum<256>(s) / count;
  double q = 0.0;
  for (int j = threadIdx.x; j < count; j += 256) {
    const double d = (double)x[chan_index(a, ch, j)] - mean;
    q += d * d;
  }
  const double var = block_sum<256>(q) / count;
  if (threadIdx.x == 0) {
    const double mom = (double)a.momentum;
    const double unbias = (double)count / (double)(count - 1);
    running_mean[ch] = (float)((1.0 - mom) * (double)running_mean[ch] + mom * mean);
    running_var[ch] = (float)((1.0 - mom) * (double)running_var[ch] + mom * var * unbias);
    mean_out[ch] = (float)mean;
    invstd_out[ch] = (float)(1.0 / sqrt(var + (double)a.eps));
  }
}

// y = (x - mean) * (invstd * gamma) + beta with the batch statistics.
extern "C" __global__ void bn_train_apply(const BnArgs a, const float* __restrict__ x,
                                          const float* __restrict__ mean, const float* __restrict__ invstd,
                                          const float* __restrict__ gamma, const float* __restrict__ beta,
                                          float* __restrict__ y) {
  const int total = a.n * a.c * a.plane;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int ch = (i / a.plane) % a.c;
    y[i] = (x[i] - mean[ch]) * (invstd[ch] * gamma[ch]) + beta[ch];
  }
}

// Per channel: dbeta = sum dy, dgamma = sum dy * xhat (double), and their
// means over the channel's values into scratch[ch] and scratch[C + ch].
extern "C" __global__ void __launch_bounds__(256)
    bn_train_backward_reduce(const BnArgs a, const float* __restrict__ dy, const float* __restrict__ x,
                             const float* __restrict__ mean, const float* __restrict__ invstd,
                             float* __restrict__ dgamma, float* __restrict__ dbeta, float* __restrict__ scratch) {
  const int ch = blockIdx.x;
  const int count = a.n * a.plane;
  const double m = (double)mean[ch], s = (double)invstd[ch];
  double sdy = 0.0, sdyx = 0.0;
  for (int j = threadIdx.x; j < count; j += 256) {
    const int i = chan_index(a, ch, j);
    const double g = (double)dy[i];
    sdy += g;
    sdyx += g * ((double)x[i] - m) * s;
  }
  sdy = block_sum<256>(sdy);
  sdyx = block_sum<256>(sdyx);
  if (threadIdx.x == 0) {
    const double cnt = count > 0 ? (double)count : 1.0;
    dbeta[ch] = (float)sdy;
    dgamma[ch] = (float)sdyx;
    scratch[ch] = (float)(sdy / cnt);
    scratch[a.c + ch] = (float)(sdyx / cnt);
  }
}

// dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)).
extern "C" __global__ void bn_train_backward_apply(const BnArgs a, const float* __restrict__ dy,
                                                   const float* __restrict__ x, const float* __restrict__ mean,
                                                   const float* __restrict__ invstd,
                                                   const float* __restrict__ gamma,
                                                   const float* __restrict__ scratch, float* __restrict__ dx) {
  const int total = a.n * a.c * a.plane;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int ch = (i / a.plane) % a.c;
    const float s = invstd[ch];
    const float k = gamma[ch] * s;
    const float xhat = (x[i] - mean[ch]) * s;
    dx[i] = k * (dy[i] - scratch[ch] - xhat * scratch[a.c + ch]);
  }
}
