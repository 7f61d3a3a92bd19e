// CPU emulation of the CUDA C++ subset the kernels in kernels/*.cu use, so
// that g++ compiles the very same sources and the emu driver runs them.
//
// Execution model (kernels/emu/runtime.cpp): a launch runs its blocks on a
// small pool of OS threads, one block at a time per OS thread; the CUDA
// threads of a block are fibers (user-mode contexts, each with its own stack)
// on that OS thread. `__syncthreads()` and the warp intrinsics switch between
// fibers, so `__shared__` memory is simply a `static thread_local` variable:
// every fiber of the running block sees the same storage, and blocks running
// on other OS threads have their own.
//
// Only what the kernels need is here; grow it when a kernel needs more.
// Inline PTX stays out of kernels that run here: the tensor-core and
// async-copy instructions are device functions in kernels/mma.cuh, each with
// a scalar twin under CWP_EMU built on the warp exchange and cp.async queue
// of runtime.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#define CWP_EMU 1

// ---- qualifiers ----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __constant__ static const
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// ---- built-in vector types -------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float4 make_float4(float x, float y, float z, float w) {
  return float4{x, y, z, w};
}
static inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ---- thread coordinates (set by the runtime on every fiber switch) -------
extern __thread uint3 cwp_emu_threadIdx;
extern __thread uint3 cwp_emu_blockIdx;
extern __thread dim3 cwp_emu_blockDim;
extern __thread dim3 cwp_emu_gridDim;
#define threadIdx cwp_emu_threadIdx
#define blockIdx cwp_emu_blockIdx
#define blockDim cwp_emu_blockDim
#define gridDim cwp_emu_gridDim
#define warpSize 32

// ---- synchronisation and warp exchange (runtime.cpp) ---------------------
extern "C" void cwp_emu_syncthreads();
extern "C" void cwp_emu_syncwarp();
extern "C" unsigned long long cwp_emu_shfl(unsigned long long v, int src_lane, int mode,
                                           int width);
extern "C" void* cwp_emu_dynamic_smem();
extern "C" void cwp_emu_warp_gather(const void* mine, const void** all);
extern "C" void cwp_emu_cp_async(void* dst, const void* src, int bytes, int src_bytes);
extern "C" void cwp_emu_cp_async_commit();
extern "C" void cwp_emu_cp_async_wait(int n);
enum { CWP_SHFL_IDX = 0, CWP_SHFL_DOWN = 1, CWP_SHFL_UP = 2, CWP_SHFL_XOR = 3 };

static inline void __syncthreads() { cwp_emu_syncthreads(); }
static inline void __syncwarp(unsigned = 0xffffffffu) { cwp_emu_syncwarp(); }
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
static inline T cwp_emu_shfl_t(T v, int lane, int mode, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = cwp_emu_shfl(bits, lane, mode, width);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
template <typename T>
static inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return cwp_emu_shfl_t(v, src, CWP_SHFL_IDX, width);
}
template <typename T>
static inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cwp_emu_shfl_t(v, (int)delta, CWP_SHFL_DOWN, width);
}
template <typename T>
static inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cwp_emu_shfl_t(v, (int)delta, CWP_SHFL_UP, width);
}
template <typename T>
static inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return cwp_emu_shfl_t(v, mask, CWP_SHFL_XOR, width);
}

// ---- atomics (blocks run on several OS threads: these are real atomics) --
static inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline unsigned atomicAdd(unsigned* p, unsigned v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
static inline float atomicAdd(float* p, float v) {
  float old, desired;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  do {
    desired = old + v;
  } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_SEQ_CST,
                                      __ATOMIC_SEQ_CST));
  return old;
}
static inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v &&
         !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
static inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old > v &&
         !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
static inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
static inline int atomicCAS(int* p, int cmp, int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
static inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}

// ---- integer helpers that CUDA provides as overloads ---------------------
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }

// ---- math -----------------------------------------------------------------
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
#define __expf(x) expf(x)
#define __logf(x) logf(x)
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
static inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
static inline unsigned __float_as_uint(float f) {
  unsigned i;
  std::memcpy(&i, &f, 4);
  return i;
}
static inline float __uint_as_float(unsigned i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
template <typename T>
static inline T __ldg(const T* p) {
  return *p;
}
using std::isfinite;
using std::isinf;
using std::isnan;

// ---- how the generated trampolines call a kernel --------------------------
// `args` is the launch's kernelParams: one pointer to each argument value.
namespace cwp_emu {
template <typename... A, unsigned long... I>
static inline void call(void (*f)(A...), void** args, std::integer_sequence<unsigned long, I...>) {
  f(*static_cast<A*>(args[I])...);
}
template <typename... A>
static inline void invoke(void (*f)(A...), void** args) {
  call(f, args, std::make_integer_sequence<unsigned long, sizeof...(A)>{});
}
// The byte size of each parameter of a kernel (what a recorded launch must
// copy of its argument values), written to `out`; returns how many.
template <typename... A>
static inline int arg_sizes(void (*)(A...), unsigned long* out) {
  const unsigned long sizes[sizeof...(A) + 1] = {sizeof(A)..., 0};
  for (unsigned long i = 0; i < sizeof...(A); ++i) out[i] = sizes[i];
  return (int)sizeof...(A);
}
}  // namespace cwp_emu
