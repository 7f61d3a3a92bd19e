#!/usr/bin/env python3
"""Write the float64 golden fixtures of tests/conv_fixtures.rs.

    python3 tools/make_conv_fixtures.py [tests/fixtures/conv]

Each case is one small safetensors file computed by PyTorch in float64:
grouped, depthwise and dilated convolutions (`conv_*.safetensors`: inputs x,
w, b and the upstream gradient dy; outputs y, dx, dw, db) and max/average
pooling with ceil_mode and count_include_pad (`pool_*.safetensors`: x, dy;
y, dx). The op's options are the file's metadata. Inputs are rounded to
float32 first, so the engine (which computes in float32) starts from exactly
the same values. Needs torch and safetensors.
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# name: (x shape, out channels, kernel, stride, pad, groups, dilation)
CONV_CASES = {
    "conv_depthwise_3x3_s1": ((2, 4, 7, 7), 4, 3, 1, 1, 4, 1),
    "conv_depthwise_3x3_s2": ((2, 4, 8, 9), 4, 3, 2, 1, 4, 1),
    "conv_depthwise_mult2_5x5_s2": ((1, 3, 9, 9), 6, 5, 2, 2, 3, 1),
    "conv_groups2_3x3": ((2, 4, 6, 7), 6, 3, 1, 1, 2, 1),
    "conv_groups4_3x3_s2": ((2, 8, 7, 6), 8, 3, 2, 0, 4, 1),
    "conv_dilation2_3x3": ((2, 3, 9, 8), 4, 3, 1, 2, 1, 2),
    "conv_dilation2_depthwise_s2": ((1, 4, 10, 10), 4, 3, 2, 2, 4, 2),
}

# name: (op, x shape, kernel, stride, pad, ceil_mode, count_include_pad)
POOL_CASES = {
    "pool_max_ceil_3x3_s2": ("max", (2, 3, 8, 7), 3, 2, 0, True, True),
    "pool_max_ceil_3x3_s2_p1": ("max", (1, 2, 9, 10), 3, 2, 1, True, True),
    "pool_max_ceil_2x2_s2": ("max", (1, 3, 7, 5), 2, 2, 0, True, True),
    "pool_avg_count_pad": ("avg", (2, 3, 7, 8), 3, 2, 1, False, True),
    "pool_avg_exclude_pad": ("avg", (2, 3, 7, 8), 3, 2, 1, False, False),
    "pool_avg_ceil_count_pad": ("avg", (1, 3, 7, 9), 3, 2, 1, True, True),
    "pool_avg_ceil_exclude_pad": ("avg", (1, 3, 7, 9), 3, 2, 1, True, False),
    "pool_avg_ceil_2x2": ("avg", (1, 2, 5, 7), 2, 2, 0, True, True),
}


def f32_exact(shape, gen):
    """Uniform in [-1, 1), rounded to float32, held in float64."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).float().double()


def conv_case(spec, gen):
    xs, o, k, stride, pad, groups, dil = spec
    x = f32_exact(xs, gen).requires_grad_()
    w = f32_exact((o, xs[1] // groups, k, k), gen).requires_grad_()
    b = f32_exact((o,), gen).requires_grad_()
    y = F.conv2d(x, w, b, stride=stride, padding=pad, dilation=dil, groups=groups)
    dy = f32_exact(y.shape, gen)
    y.backward(dy)
    tensors = {"x": x, "w": w, "b": b, "dy": dy, "y": y, "dx": x.grad, "dw": w.grad, "db": b.grad}
    meta = {"stride": stride, "pad": pad, "groups": groups, "dilation": dil}
    return tensors, meta


def pool_case(spec, gen):
    op, xs, k, stride, pad, ceil, count_pad = spec
    x = f32_exact(xs, gen).requires_grad_()
    if op == "max":
        y = F.max_pool2d(x, k, stride, pad, ceil_mode=ceil)
    else:
        y = F.avg_pool2d(x, k, stride, pad, ceil_mode=ceil, count_include_pad=count_pad)
    dy = f32_exact(y.shape, gen)
    y.backward(dy)
    tensors = {"x": x, "dy": dy, "y": y, "dx": x.grad}
    meta = {
        "op": op,
        "kernel": k,
        "stride": stride,
        "pad": pad,
        "ceil_mode": int(ceil),
        "count_include_pad": int(count_pad),
    }
    return tensors, meta


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join("tests", "fixtures", "conv")
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(20261201)
    cases = [(n, conv_case, s) for n, s in CONV_CASES.items()]
    cases += [(n, pool_case, s) for n, s in POOL_CASES.items()]
    for name, make, spec in cases:
        tensors, meta = make(spec, gen)
        tensors = {k: v.detach().contiguous().double() for k, v in tensors.items()}
        meta = {k: str(v) for k, v in meta.items()}
        meta["source"] = f"PyTorch {torch.__version__} float64, tools/make_conv_fixtures.py"
        path = os.path.join(out, name + ".safetensors")
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
        print(f"{path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
