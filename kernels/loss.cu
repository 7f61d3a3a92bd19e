// Softmax cross-entropy per sample, with the weighted gradient of the logits.
// CPU twin: src/backend/cpu/loss.rs. One block of 128 threads per row; the
// log-sum-exp and the probabilities are computed in double, like the CPU.
#include "common.cuh"

struct LossArgs {
  int n;  // rows
  int k;  // classes
};

extern "C" __global__ void __launch_bounds__(128)
    softmax_xent(const LossArgs a, const float* __restrict__ logits, const int* __restrict__ labels,
                 const float* __restrict__ weights, float* __restrict__ loss, float* __restrict__ dlogits) {
  const int row = blockIdx.x;
  const float* z = logits + row * a.k;
  float m = -CWP_INF;
  for (int j = threadIdx.x; j < a.k; j += 128) m = fmaxf(m, z[j]);
  const double max = (double)block_max<128>(m);
  double s = 0.0;
  for (int j = threadIdx.x; j < a.k; j += 128) s += exp((double)z[j] - max);
  const double lse = max + log(block_sum<128>(s));
  // A label out of range (the host never uploads one) makes the row NaN,
  // which the finiteness checks report, rather than a read outside the row.
  const int label = labels[row];
  const bool in_range = label >= 0 && label < a.k;
  const float nan = __int_as_float(0x7fc00000);
  const double w = (double)weights[row];
  for (int j = threadIdx.x; j < a.k; j += 128) {
    const double p = exp((double)z[j] - lse);
    dlogits[row * a.k + j] = in_range ? (float)(w * (p - (j == label ? 1.0 : 0.0))) : nan;
  }
  if (threadIdx.x == 0) loss[row] = in_range ? (float)(lse - (double)z[label]) : nan;
}
