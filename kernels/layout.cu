// Copies that change the layout: a window of channels from one tensor into
// another (channel-axis concat and its split), zero padding of H and W and
// its crop (both gather-form: one thread per output value).
// CPU twin: src/backend/cpu/layout.rs.
#include "common.cuh"

// Channel copy: `count` channels of planes of `plane` values, for n images,
// from src channel src_off (of src_c) to dst channel dst_off (of dst_c).
struct ChanCopyArgs {
  int n;
  int count;
  int plane;
  int src_c;
  int src_off;
  int dst_c;
  int dst_off;
  int pad_;
};

extern "C" __global__ void layout_copy_channels(const ChanCopyArgs a, const float* __restrict__ src,
                                                float* __restrict__ dst) {
  const int per_img = a.count * a.plane;
  const int total = a.n * per_img;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int img = i / per_img, r = i - img * per_img;
    dst[(img * a.dst_c + a.dst_off) * a.plane + r] = src[(img * a.src_c + a.src_off) * a.plane + r];
  }
}

// Padding geometry: planes = N*C; (h, w) the unpadded plane, (oh, ow) the
// padded one; top, left the zeros before the data.
struct PadArgs {
  int planes;
  int h;
  int w;
  int oh;
  int ow;
  int top;
  int left;
  int pad_;
};

extern "C" __global__ void layout_pad(const PadArgs a, const float* __restrict__ x, float* __restrict__ y) {
  const int total = a.planes * a.oh * a.ow;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int col = i % a.ow, row = (i / a.ow) % a.oh, pl = i / (a.oh * a.ow);
    const int r = row - a.top, c = col - a.left;
    y[i] = (r >= 0 && r < a.h && c >= 0 && c < a.w) ? x[(pl * a.h + r) * a.w + c] : 0.f;
  }
}

extern "C" __global__ void layout_crop(const PadArgs a, const float* __restrict__ dy, float* __restrict__ dx) {
  const int total = a.planes * a.h * a.w;
  for (int i = grid_start(); i < total; i += grid_stride()) {
    const int c = i % a.w, r = (i / a.w) % a.h, pl = i / (a.h * a.w);
    dx[i] = dy[(pl * a.oh + r + a.top) * a.ow + c + a.left];
  }
}
