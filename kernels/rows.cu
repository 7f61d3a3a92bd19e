// What lets a search step run without the host: gathering a batch from the
// images kept on the device, by row index, writing the step's results into
// its row of a window buffer, and counting the non-finite values it made.
// Where a step stands is read from a cursor on the device, so that every
// step launches exactly the same work (and a recorded step replays as is).
// CPU twin: src/backend/cpu/rows.rs.
#include "common.cuh"

struct GatherArgs {
  int n;         // rows gathered
  int row_len;   // elements per row
  int src_rows;  // rows of `src`
  int entries;   // entries of `index`
};

// out[r] = src[index[cursor * n + r]], row by row. An index outside src or
// a cursor past the index (the host never builds one) gives a row of NaN,
// which the step's finiteness count reports, rather than a read outside.
extern "C" __global__ void rows_gather(const GatherArgs a, const float* __restrict__ src,
                                       const int* __restrict__ index, const int* __restrict__ cursor,
                                       float* __restrict__ out) {
  const int total = a.n * a.row_len;
  const long long first = (long long)cursor[0] * a.n;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int r = i / a.row_len, j = i - r * a.row_len;
    const long long entry = first + r;
    const int row = entry < a.entries ? index[entry] : -1;
    out[i] = (row >= 0 && row < a.src_rows) ? src[(long long)row * a.row_len + j]
                                             : __int_as_float(0x7fc00000);
  }
}

struct WriteArgs {
  int n;     // elements of src (one row of dst)
  int rows;  // rows of dst
};

// dst[cursor] = src, dst holding `rows` rows of n. A cursor past the last
// row writes nothing (the host never lets it).
extern "C" __global__ void rows_write(const WriteArgs a, const int* __restrict__ cursor,
                                      const float* __restrict__ src, float* __restrict__ dst) {
  const int row = cursor[0];
  if (row < 0 || row >= a.rows) return;
  for (int i = grid_start(); i < a.n; i += grid_stride()) dst[(long long)row * a.n + i] = src[i];
}

struct CountArgs {
  int n;      // elements of x
  int width;  // entries of a row of `counts`
  int rows;   // rows of `counts`
  int slot;   // entry of the cursor's row the count is added to
};

// counts[cursor][slot] += number of NaN or infinite values of x. One block
// of 256 threads: a fixed tree of integer sums, so the count never depends
// on timing (and a float holds it exactly below 2^24).
extern "C" __global__ void __launch_bounds__(256)
    rows_count_nonfinite(const CountArgs a, const float* __restrict__ x, const int* __restrict__ cursor,
                         float* counts) {
  int bad = 0;
  for (int i = threadIdx.x; i < a.n; i += 256) bad += (__float_as_int(x[i]) & 0x7f800000) == 0x7f800000;
  bad = block_sum<256>(bad);
  const int row = cursor[0];
  if (threadIdx.x == 0 && row >= 0 && row < a.rows) counts[row * a.width + a.slot] += (float)bad;
}

struct StepArgs {
  int unused;
};

// The cursor moves to the next step.
extern "C" __global__ void rows_next(const StepArgs, int* cursor) {
  if (blockIdx.x == 0 && threadIdx.x == 0) cursor[0] += 1;
}
