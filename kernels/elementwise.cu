// Elementwise ops: ReLU and its gradient, add, in-place add, per-channel
// input normalisation and its gradient. CPU twin: src/backend/cpu/elementwise.rs.
// Grid-stride loops over float4 (allocations are 256-byte aligned and never
// offset), then a scalar tail.
#include "common.cuh"

// n: element count; c, hw: channels and H*W for per-channel ops (else 0).
struct EwArgs {
  int n;
  int c;
  int hw;
  int pad_;
};

// One functor application per float4 of (a, b) -> out, then the tail.
template <class F>
__device__ __forceinline__ void map2(int n, const float* a, const float* b, float* out, F f) {
  const int n4 = n >> 2;
  const float4* a4 = reinterpret_cast<const float4*>(a);
  const float4* b4 = reinterpret_cast<const float4*>(b);
  float4* o4 = reinterpret_cast<float4*>(out);
  for (int i = grid_start(); i < n4; i += grid_stride()) {
    float4 u = a4[i], v = b4[i], r;
    r.x = f(u.x, v.x);
    r.y = f(u.y, v.y);
    r.z = f(u.z, v.z);
    r.w = f(u.w, v.w);
    o4[i] = r;
  }
  for (int i = (n4 << 2) + grid_start(); i < n; i += grid_stride()) out[i] = f(a[i], b[i]);
}

struct ReluOp {
  __device__ __forceinline__ float operator()(float x, float) const { return x <= 0.f ? 0.f : x; }
};
struct ReluBackOp {
  __device__ __forceinline__ float operator()(float dy, float y) const { return y > 0.f ? dy : 0.f; }
};
struct AddOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

extern "C" __global__ void ew_relu(const EwArgs a, const float* __restrict__ x, float* __restrict__ y) {
  map2(a.n, x, x, y, ReluOp());
}

extern "C" __global__ void ew_relu_backward(const EwArgs a, const float* __restrict__ dy,
                                            const float* __restrict__ y, float* __restrict__ dx) {
  map2(a.n, dy, y, dx, ReluBackOp());
}

extern "C" __global__ void ew_add(const EwArgs a, const float* __restrict__ x, const float* __restrict__ y,
                                  float* __restrict__ out) {
  map2(a.n, x, y, out, AddOp());
}

// acc += b (acc is read and written: no __restrict__ aliasing promise on it).
extern "C" __global__ void ew_add_assign(const EwArgs a, float* acc, const float* __restrict__ b) {
  map2(a.n, acc, b, acc, AddOp());
}

// y = (x - stats[c]) / stats[C + c]: stats holds C means then C stds.
extern "C" __global__ void ew_normalize(const EwArgs a, const float* __restrict__ x,
                                        const float* __restrict__ stats, float* __restrict__ y) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    const int c = (i / a.hw) % a.c;
    y[i] = (x[i] - stats[c]) / stats[a.c + c];
  }
}

// dx = dy / stats[C + c].
extern "C" __global__ void ew_normalize_backward(const EwArgs a, const float* __restrict__ dy,
                                                 const float* __restrict__ stats, float* __restrict__ dx) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    const int c = (i / a.hw) % a.c;
    dx[i] = dy[i] / stats[a.c + c];
  }
}
