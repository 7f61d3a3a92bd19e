// Checks of the tensor-core and async-copy device functions of mma.cuh, on
// the emu driver and on a real GPU: each kernel fills the fragments from
// plain row-major matrices with the PTX ISA's lane -> element mapping
// (written out here, independently of the emulator), runs the instruction,
// and writes the result back by the same mapping, so the host can compare
// it with a plain matrix product. Tests only; not used by the backend.
#include "mma.cuh"

struct MmaCheckArgs {
  int n;
  int pad_;
};

// One warp: D[16][8] = A[16][8] * B[8][8] + C[16][8] (all row-major), tf32.
extern "C" __global__ void mc_mma_tf32(const MmaCheckArgs a, const float* __restrict__ A,
                                       const float* __restrict__ B, const float* __restrict__ C,
                                       float* __restrict__ D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned fa[4], fb[2];
  fa[0] = f32_to_tf32(A[g * 8 + t]);
  fa[1] = f32_to_tf32(A[(g + 8) * 8 + t]);
  fa[2] = f32_to_tf32(A[g * 8 + t + 4]);
  fa[3] = f32_to_tf32(A[(g + 8) * 8 + t + 4]);
  fb[0] = f32_to_tf32(B[t * 8 + g]);
  fb[1] = f32_to_tf32(B[(t + 4) * 8 + g]);
  float c[4], d[4];
  c[0] = C[g * 8 + 2 * t];
  c[1] = C[g * 8 + 2 * t + 1];
  c[2] = C[(g + 8) * 8 + 2 * t];
  c[3] = C[(g + 8) * 8 + 2 * t + 1];
  mma_tf32_m16n8k8(d, fa, fb, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// One warp: D[16][8] = A[16][16] * B[16][8] + C[16][8] (all row-major), bf16.
extern "C" __global__ void mc_mma_bf16(const MmaCheckArgs a, const float* __restrict__ A,
                                       const float* __restrict__ B, const float* __restrict__ C,
                                       float* __restrict__ D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  unsigned fa[4], fb[2];
  fa[0] = pack_bf16x2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  fa[1] = pack_bf16x2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  fa[2] = pack_bf16x2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  fa[3] = pack_bf16x2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  fb[0] = pack_bf16x2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  fb[1] = pack_bf16x2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  float c[4], d[4];
  c[0] = C[g * 8 + 2 * t];
  c[1] = C[g * 8 + 2 * t + 1];
  c[2] = C[(g + 8) * 8 + 2 * t];
  c[3] = C[(g + 8) * 8 + 2 * t + 1];
  mma_bf16_m16n8k16(d, fa, fb, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// The rounding of the operand conversions: out[2i] = tf32(x[i]) as f32 bits,
// out[2i+1] = the two bf16 halves of pack_bf16x2(x[i], -x[i]).
extern "C" __global__ void mc_convert(const MmaCheckArgs a, const float* __restrict__ x,
                                      unsigned* __restrict__ out) {
  for (int i = grid_start(); i < a.n; i += grid_stride()) {
    out[2 * i] = f32_to_tf32(x[i]);
    out[2 * i + 1] = pack_bf16x2(x[i], -x[i]);
  }
}

// One warp, ldmatrix .x1, .x2 and .x4 of 16-bit 8x8 matrices: logical row
// r of matrix m is row 8m + r of `src` (32 rows of 4 u32 words, 16 bytes).
// Shared memory stores the rows of each matrix in reverse order and lane
// 8m + r hands out the address of its row, so an emulation that ignored the
// addresses (or mixed up which lane gives which row) fails.
// out[(N-1)*128 + lane*4 + i] = register i of the .xN load (0 past N).
extern "C" __global__ void mc_ldmatrix(const MmaCheckArgs a, const unsigned* __restrict__ src,
                                       unsigned* __restrict__ out) {
  __shared__ __align__(16) unsigned rev[32 * 4];
  const int lane = threadIdx.x, m = lane >> 3, r = lane & 7;
  const int slot = m * 8 + 7 - r;
  for (int i = 0; i < 4; i++) rev[slot * 4 + i] = src[lane * 4 + i];
  __syncwarp();
  const void* row = &rev[slot * 4];
  unsigned d1[1], d2[2], d4[4];
  ldmatrix<1>(d1, row);
  ldmatrix<2>(d2, row);
  ldmatrix<4>(d4, row);
  for (int i = 0; i < 4; i++) {
    out[0 * 128 + lane * 4 + i] = i < 1 ? d1[0] : 0u;
    out[1 * 128 + lane * 4 + i] = i == 0 ? d2[0] : (i == 1 ? d2[1] : 0u);
    out[2 * 128 + lane * 4 + i] = 0u;
    out[3 * 128 + lane * 4 + i] = d4[i];
  }
}

// One block of 32 threads, cp.async in two commit groups:
// group 0: thread t copies 16 bytes src[4t..4t+4) to s0 (full copy), and
//          4 bytes src[128 + t] to s1[t] with src_bytes = (t % 2) * 4;
// group 1: thread t copies 16 bytes src[4t..] to s2[4t..] with only the
//          first (t % 5) * 4 bytes read (the rest zero-filled).
// After wait_group 1 (group 0 complete) and a barrier, out[0..128) = s0,
// out[128..160) = s1; after wait_group 0, out[160..288) = s2.
// `early` (emu only, a = n != 0): out[288 + t] = s2[4t] read before any wait,
// which the emulator leaves at its sentinel.
extern "C" __global__ void mc_cp_async(const MmaCheckArgs a, const float* __restrict__ src,
                                       float* __restrict__ out) {
  __shared__ __align__(16) float s0[128];
  __shared__ __align__(16) float s1[32];
  __shared__ __align__(16) float s2[128];
  const int t = threadIdx.x;
  for (int i = 0; i < 4; i++) s2[4 * t + i] = -7.f;
  __syncthreads();
  cp_async<16>(&s0[4 * t], &src[4 * t], 16);
  cp_async<4>(&s1[t], &src[128 + t], (t % 2) * 4);
  cp_async_commit();
  cp_async<16>(&s2[4 * t], &src[4 * t], (t % 5) * 4);
  cp_async_commit();
  if (a.n != 0) out[288 + t] = s2[4 * t];
  cp_async_wait<1>();
  __syncthreads();
  for (int i = 0; i < 4; i++) out[4 * t + i] = s0[4 * ((t + 1) % 32) + i];
  out[128 + t] = s1[(t + 1) % 32];
  cp_async_wait<0>();
  __syncthreads();
  for (int i = 0; i < 4; i++) out[160 + 4 * t + i] = s2[4 * ((t + 1) % 32) + i];
}
