// What lets a search step run without the host: gathering a batch from the
// images kept on the device, by row index, and counting the non-finite values
// a step produced (read back only at progress points).
// CPU twin: src/backend/cpu/rows.rs.
#include "common.cuh"

struct GatherArgs {
  int n;        // rows gathered
  int row_len;  // elements per row
  int start;    // first entry of `index` used
  int src_rows; // rows of `src`
};

// out[r] = src[index[start + r]], row by row. An index outside src (the host
// never builds one) gives a row of NaN, which the step's finiteness count
// reports, rather than a read outside the buffer.
extern "C" __global__ void rows_gather(const GatherArgs a, const float* __restrict__ src,
                                       const int* __restrict__ index, float* __restrict__ out) {
  const int total = a.n * a.row_len;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int r = i / a.row_len, j = i - r * a.row_len;
    const int row = index[a.start + r];
    out[i] = (row >= 0 && row < a.src_rows) ? src[(long long)row * a.row_len + j]
                                             : __int_as_float(0x7fc00000);
  }
}

struct CountArgs {
  int n;     // elements of x
  int slot;  // entry of `counts` the count is added to
};

// counts[slot] += number of NaN or infinite values of x. One block of 256
// threads: a fixed tree of integer sums, so the count never depends on
// timing (and a float holds it exactly below 2^24).
extern "C" __global__ void __launch_bounds__(256)
    rows_count_nonfinite(const CountArgs a, const float* __restrict__ x, float* counts) {
  int bad = 0;
  for (int i = threadIdx.x; i < a.n; i += 256) bad += (__float_as_int(x[i]) & 0x7f800000) == 0x7f800000;
  bad = block_sum<256>(bad);
  if (threadIdx.x == 0) counts[a.slot] += (float)bad;
}
