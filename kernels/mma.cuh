// Tensor-core and async-copy instructions (sm_80+) as small device functions:
// inline PTX on the device, and under CWP_EMU an exact scalar twin that
// implements the PTX ISA's lane -> element mapping with the warp exchange
// and the cp.async queue of kernels/emu/runtime.cpp. Fragment layouts are
// those of the PTX ISA (also CUTLASS's cute/atom/mma_traits_sm80.hpp); with
// g = lane / 4 and t = lane % 4:
//
//   mma.m16n8k8 tf32   A 16x8:  a0 (g, t)   a1 (g+8, t)   a2 (g, t+4)   a3 (g+8, t+4)
//                      B 8x8:   b0 (k=t, n=g)             b1 (k=t+4, n=g)
//   mma.m16n8k16 bf16  A 16x16: reg r holds two bf16 (low half first):
//                      r0 (g, 2t..2t+1)  r1 (g+8, 2t..)  r2 (g, 2t+8..)  r3 (g+8, 2t+8..)
//                      B 16x8:  r0 (k=2t..2t+1, n=g)  r1 (k=2t+8..2t+9, n=g)
//   C/D 16x8 f32:      c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
//   ldmatrix .x1/.x2/.x4 (b16, non-transposed): lanes 8i..8i+7 give the row
//                      addresses of matrix i (16 bytes each); lane l receives,
//                      for matrix i, the 32-bit word l % 4 of row l / 4.
//
// Numerics of the emulation: the tensor-core operands are read as the
// instruction reads them (tf32: the top 19 bits of the register; bf16: the
// 16 bits widened), their products are exact in f32, and each output sums
// c then the k products in increasing k, rounding to nearest after each
// addition. A GPU's adder tree rounds differently in the last bits, so a
// kernel's emulated and device results agree within the mode's error bound,
// not bitwise.
#pragma once

#include "common.cuh"

#ifdef CWP_EMU
__device__ __forceinline__ int cwp_lane() {
  return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u);
}
__device__ __forceinline__ float cwp_tf32_value(unsigned u) { return __uint_as_float(u & 0xffffe000u); }
__device__ __forceinline__ float cwp_bf16_value(unsigned short h) { return __uint_as_float((unsigned)h << 16); }
#endif

// f32 -> tf32 by cvt.rna (round to nearest, ties away from zero), returned as
// an f32 bit pattern whose low 13 bits are zero. Inf and NaN stay Inf and NaN.
__device__ __forceinline__ unsigned f32_to_tf32(float x) {
#ifdef CWP_EMU
  const unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return (u & 0x007fffffu) ? 0x7fffe000u : u;
  return (u + 0x1000u) & 0xffffe000u;
#else
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r & 0xffffe000u;
#endif
}

// f32 -> bf16, round to nearest even (cvt.rn.bf16x2.f32); `lo` goes to the
// low half of the result, `hi` to the high half.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
#ifdef CWP_EMU
  unsigned h[2];
  const float v[2] = {lo, hi};
  for (int i = 0; i < 2; i++) {
    const unsigned u = __float_as_uint(v[i]);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) {
      h[i] = 0x7fffu;  // canonical NaN
    } else {
      h[i] = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    }
  }
  return h[0] | (h[1] << 16);
#else
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
#endif
}

// D = A * B + C, m16n8k8, A row-major tf32, B column-major tf32, f32 accumulate.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                 const float (&c)[4]) {
#ifdef CWP_EMU
  struct Ops {
    unsigned a[4], b[2];
  } mine;
  for (int i = 0; i < 4; i++) mine.a[i] = a[i];
  for (int i = 0; i < 2; i++) mine.b[i] = b[i];
  const void* all[32];
  cwp_emu_warp_gather(&mine, all);
  for (int j = 0; j < 32; j++)
    if (all[j] == nullptr) __builtin_trap();  // mma.sync needs all 32 lanes
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; l++) {
    const Ops& o = *static_cast<const Ops*>(all[l]);
    const int g = l >> 2, t = l & 3;
    A[g][t] = cwp_tf32_value(o.a[0]);
    A[g + 8][t] = cwp_tf32_value(o.a[1]);
    A[g][t + 4] = cwp_tf32_value(o.a[2]);
    A[g + 8][t + 4] = cwp_tf32_value(o.a[3]);
    B[t][g] = cwp_tf32_value(o.b[0]);
    B[t + 4][g] = cwp_tf32_value(o.b[1]);
  }
  cwp_emu_syncwarp();
  const int lane = cwp_lane(), g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; i++) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float s = c[i];
    for (int k = 0; k < 8; k++) s += A[row][k] * B[k][col];
    out[i] = s;
  }
  for (int i = 0; i < 4; i++) d[i] = out[i];
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

// D = A * B + C, m16n8k16, A row-major bf16, B column-major bf16, f32 accumulate.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                                  const float (&c)[4]) {
#ifdef CWP_EMU
  struct Ops {
    unsigned a[4], b[2];
  } mine;
  for (int i = 0; i < 4; i++) mine.a[i] = a[i];
  for (int i = 0; i < 2; i++) mine.b[i] = b[i];
  const void* all[32];
  cwp_emu_warp_gather(&mine, all);
  for (int j = 0; j < 32; j++)
    if (all[j] == nullptr) __builtin_trap();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; l++) {
    const Ops& o = *static_cast<const Ops*>(all[l]);
    const int g = l >> 2, t = l & 3;
    for (int r = 0; r < 4; r++) {
      const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
      A[row][col] = cwp_bf16_value((unsigned short)(o.a[r] & 0xffffu));
      A[row][col + 1] = cwp_bf16_value((unsigned short)(o.a[r] >> 16));
    }
    for (int r = 0; r < 2; r++) {
      const int k = 2 * t + 8 * r;
      B[k][g] = cwp_bf16_value((unsigned short)(o.b[r] & 0xffffu));
      B[k + 1][g] = cwp_bf16_value((unsigned short)(o.b[r] >> 16));
    }
  }
  cwp_emu_syncwarp();
  const int lane = cwp_lane(), g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; i++) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float s = c[i];
    for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
    out[i] = s;
  }
  for (int i = 0; i < 4; i++) d[i] = out[i];
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#endif
}

#ifndef CWP_EMU
__device__ __forceinline__ unsigned cwp_smem_addr(const void* p) {
  unsigned r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}
#endif

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16: `row` is this lane's row
// address in shared memory (16-byte aligned; lanes 8N.. are ignored).
template <int N>
__device__ __forceinline__ void ldmatrix(unsigned (&d)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
#ifdef CWP_EMU
  const void* all[32];
  cwp_emu_warp_gather(&row, all);
  const int lane = cwp_lane();
  unsigned out[N];
  for (int i = 0; i < N; i++) {
    const void* src_lane = all[i * 8 + (lane >> 2)];
    if (src_lane == nullptr) __builtin_trap();
    const unsigned* r = static_cast<const unsigned*>(*static_cast<const void* const*>(src_lane));
    out[i] = r[lane & 3];
  }
  cwp_emu_syncwarp();
  for (int i = 0; i < N; i++) d[i] = out[i];
#else
  const unsigned s = cwp_smem_addr(row);
  if (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(d[0]) : "r"(s));
  } else if (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(d[0]), "=r"(d[1 % N]) : "r"(s));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1 % N]), "=r"(d[2 % N]), "=r"(d[3 % N])
                 : "r"(s));
  }
#endif
}

// A shared-memory location as cp.async addresses it: on the device the
// 32-bit shared-window address, so a thread's slots are a base plus
// constant byte offsets (32-bit adds, where pointers into shared memory
// cost 64-bit arithmetic and a conversion per copy); under CWP_EMU the
// pointer itself.
#ifdef CWP_EMU
typedef char* SmemAddr;
__device__ __forceinline__ SmemAddr smem_addr(void* p) { return static_cast<char*>(p); }
#else
typedef unsigned SmemAddr;
__device__ __forceinline__ SmemAddr smem_addr(void* p) { return cwp_smem_addr(p); }
#endif

// cp.async of BYTES (4, 8 or 16) from global `src` to shared `dst`; only the
// first `src_bytes` are read, the rest of the destination is zero-filled
// (src_bytes = 0 zero-fills and reads nothing). 16-byte copies bypass L1
// (.cg), smaller ones cannot (.ca).
template <int BYTES>
__device__ __forceinline__ void cp_async_to(SmemAddr dst, const void* src, int src_bytes) {
  static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef CWP_EMU
  cwp_emu_cp_async(dst, src, BYTES, src_bytes);
#else
  if (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(BYTES), "r"(src_bytes)
                 : "memory");
  }
#endif
}

// cp_async_to a pointer into shared memory.
template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes) {
  cp_async_to<BYTES>(smem_addr(dst), src, src_bytes);
}

// Closes this thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() {
#ifdef CWP_EMU
  cwp_emu_cp_async_commit();
#else
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in
// flight. Other threads' copies need a barrier after this to be visible.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef CWP_EMU
  cwp_emu_cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
