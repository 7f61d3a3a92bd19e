// Shared by every kernel file. NVRTC receives it as an in-memory header and
// g++ (the emu build) finds it with -I, so kernels write `#include "common.cuh"`
// and include nothing else: NVRTC has no standard headers.
//
// Conventions of all kernels:
// - f32 everywhere, NCHW tensors, 32-bit indices (the host refuses tensors of
//   2^31 elements or more).
// - Each kernel takes one `#[repr(C)]`-twin argument struct by value first,
//   then device pointers; only `int` and `float` fields, so the C and Rust
//   layouts agree without padding rules.
// - Reductions are deterministic: every thread sums a fixed set of elements in
//   a fixed order and blocks combine partial sums in a fixed tree; no float
//   atomics.
#pragma once

#define CWP_INF __int_as_float(0x7f800000)

// Dynamic shared memory (sized by the launch): `CWP_DYNAMIC_SHARED(float, buf);`
#ifdef CWP_EMU
#define CWP_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(cwp_emu_dynamic_smem())
#else
#define CWP_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Sum over the 32 lanes of a warp, the same bits in every lane (a butterfly:
// each step adds the same two values in every lane pair, and float addition
// is commutative).
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of NT threads (NT a multiple of 32, 1-D block), returned to
// every thread. Deterministic. Every thread of the block must call it.
template <int NT, typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T red[NT / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();  // an earlier call's readers of red[0] are done
  if (lane == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    T r = lane < NT / 32 ? red[lane] : T(0);
    r = warp_sum(r);
    if (lane == 0) red[0] = r;
  }
  __syncthreads();
  return red[0];
}

// Maximum over a block of NT threads, returned to every thread.
template <int NT>
__device__ __forceinline__ float block_max(float v) {
  __shared__ float red[NT / 32];
  v = warp_max(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[w] = v;
  __syncthreads();
  if (w == 0) {
    float r = lane < NT / 32 ? red[lane] : -CWP_INF;
    r = warp_max(r);
    if (lane == 0) red[0] = r;
  }
  __syncthreads();
  return red[0];
}

// Index of the first element of a grid-stride loop, and its stride.
__device__ __forceinline__ int grid_start() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int grid_stride() { return blockDim.x * gridDim.x; }
