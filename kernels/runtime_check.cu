// Kernels that check the execution model itself (barriers, shared memory,
// warp shuffles, dynamic shared memory) on the emu driver and on a real GPU.
// They are not used by the backend.
#include "common.cuh"

struct RtArgs {
  int n;
  int pad_;
};

// out[b] = sum of x[b*n .. b*n+n) via block_sum (256 threads).
extern "C" __global__ void rt_block_sum(const RtArgs a, const float* __restrict__ x, float* __restrict__ out) {
  float s = 0.f;
  for (int i = threadIdx.x; i < a.n; i += 256) s += x[blockIdx.x * a.n + i];
  s = block_sum<256>(s);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// For each thread t: out[4t..4t+4) = shfl_down(x,1), shfl_xor(x,5), shfl(x,7), shfl_up(x,3).
extern "C" __global__ void rt_shuffles(const RtArgs a, const float* __restrict__ x, float* __restrict__ out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[t];
  out[4 * t + 0] = __shfl_down_sync(0xffffffffu, v, 1);
  out[4 * t + 1] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[4 * t + 2] = __shfl_sync(0xffffffffu, v, 7);
  out[4 * t + 3] = __shfl_up_sync(0xffffffffu, v, 3);
}

// Reverses each block's slice of x through dynamic shared memory.
extern "C" __global__ void rt_reverse_dynamic(const RtArgs a, const float* __restrict__ x, float* __restrict__ out) {
  CWP_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  buf[t] = x[base + t];
  __syncthreads();
  out[base + t] = buf[blockDim.x - 1 - t];
}

// Static shared memory with 2-D blocks: transposes one 16x16 tile per block.
extern "C" __global__ void rt_transpose16(const RtArgs a, const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float tile[16][17];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int base = (blockIdx.y * gridDim.x + blockIdx.x) * 256;
  tile[ty][tx] = x[base + ty * 16 + tx];
  __syncthreads();
  out[base + ty * 16 + tx] = tile[tx][ty];
}

// Threads that exit early do not block the barrier of the others.
extern "C" __global__ void rt_early_exit(const RtArgs a, const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  if (t >= a.n) return;
  s[t] = x[t];
  __syncthreads();
  out[t] = s[a.n - 1 - t];
}

// Undefined behaviour on a GPU, a detected deadlock under emu: lane 0 waits at
// the block barrier while the other lanes wait at the warp barrier.
// Launched by the emu tests only.
extern "C" __global__ void rt_deadlock(const RtArgs a, float* __restrict__ out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.f;
}
