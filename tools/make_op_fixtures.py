#!/usr/bin/env python3
"""Write the float64 PyTorch fixtures of the graph ops into tests/fixtures/ops/.

    python3 tools/make_op_fixtures.py [OUT_DIR]

One small safetensors file per case (float64; integer tensors int64), read by
tests/ops_fixtures.rs, which runs the CPU reference and the emulated GPU on
the same inputs and compares. Every input is an f32 value (drawn in float32,
then widened), so the engine sees exactly the fixture's inputs; parameters
the engine holds as f32 (alpha, clip bounds, scales) are f32-rounded here too.
Gradients are PyTorch's autograd of sum(y * dy) for a random dy, so at the
kinks they are whatever PyTorch's derivative formulas choose; the activation
inputs include every kink exactly (x = -3, 3, 0, -0.0, clip bounds, the
hard-sigmoid ends -2.5 and 2.5 for alpha 0.2).

Files (tensors):
  act_<name>     x, dy, y, dx             for each activation below
  mul_same       a, b, dy, y, da, db      equal shapes
  mul_gate       a, b, dy, y, da, db      b [N, C, 1, 1] broadcast over H, W
  affine_chan    x, scale, shift, dy, y, dx   per-channel constants
  affine_one     x, scale, shift, dy, y, dx   one scale, one shift
  concat         x0, x1, x2, dy, y, dx0, dx1, dx2
  pad            x, pad (int64: top, bottom, left, right), dy, y, dx
  graph_block    x, scale, shift, dy, y, dx: the small graph that
                 ops_fixtures.rs builds with the Builder (see block() below)
Needs torch and safetensors.
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

F64 = torch.float64


def f32(v):
    """The f64 value of the f32 nearest to v."""
    return float(torch.tensor(v, dtype=torch.float32))


def rand(gen, shape, lo, hi):
    t = torch.rand(shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo
    return t.to(F64)


# name -> function of a float64 tensor, mirroring the Rust Activation.
ACTS = {
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    # ONNX HardSigmoid defaults: max(0, min(1, alpha*x + beta)); hardtanh's
    # derivative (strictly inside) is PyTorch's for clamping ops.
    "hardsigmoid_onnx": lambda x: F.hardtanh(f32(0.2) * x + f32(0.5), 0.0, 1.0),
    "hardsigmoid_torch": F.hardsigmoid,
    "hardswish": F.hardswish,
    "relu6": F.relu6,
    "clip": lambda x: torch.clamp(x, f32(-1.0), f32(2.5)),
    "leaky_relu": lambda x: F.leaky_relu(x, f32(0.1)),
}

KINKS = [-3.0, 3.0, 0.0, -0.0, -2.5, 2.5, 6.0, -1.0, 1.0, 0.5]


def grads(f, inputs, dy):
    xs = [x.clone().requires_grad_(True) for x in inputs]
    y = f(*xs)
    gs = torch.autograd.grad((y * dy).sum(), xs)
    return y.detach(), [g.detach() for g in gs]


def block(x, scale, shift):
    """The graph of ops_fixtures.rs::block_graph, in PyTorch."""
    p = F.pad(x, (0, 1, 1, 0))  # left 0, right 1, top 1, bottom 0
    a = F.hardswish(p)
    g = p.mean(dim=(2, 3))  # [N, C]
    g = torch.sigmoid(g * scale + shift)
    m = a * g[:, :, None, None]
    c = torch.cat([m, torch.clamp(p, f32(-0.5), f32(0.5))], dim=1)
    e = F.leaky_relu(c, f32(0.1))
    s = F.silu(e * f32(2.0) + f32(-0.25))
    return s.flatten(1)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "ops")
    os.makedirs(out, exist_ok=True)
    gen = torch.Generator().manual_seed(20261201)
    files = {}

    for name, f in ACTS.items():
        x = rand(gen, (2, 3, 4, 5), -8.0, 8.0)
        flat = x.view(-1)
        for i, k in enumerate(KINKS):
            flat[i] = k
        dy = rand(gen, x.shape, -1.0, 1.0)
        y, (dx,) = grads(f, [x], dy)
        files[f"act_{name}"] = {"x": x, "dy": dy, "y": y, "dx": dx}

    a = rand(gen, (2, 3, 4, 5), -2.0, 2.0)
    b = rand(gen, (2, 3, 4, 5), -2.0, 2.0)
    dy = rand(gen, a.shape, -1.0, 1.0)
    y, (da, db) = grads(lambda a, b: a * b, [a, b], dy)
    files["mul_same"] = {"a": a, "b": b, "dy": dy, "y": y, "da": da, "db": db}
    b = rand(gen, (2, 3, 1, 1), -2.0, 2.0)
    y, (da, db) = grads(lambda a, b: a * b, [a, b], dy)
    files["mul_gate"] = {"a": a, "b": b, "dy": dy, "y": y, "da": da, "db": db}

    x = rand(gen, (2, 3, 4, 5), -3.0, 3.0)
    dy = rand(gen, x.shape, -1.0, 1.0)
    for tag, c in [("chan", 3), ("one", 1)]:
        scale = rand(gen, (c,), -2.0, 2.0)
        shift = rand(gen, (c,), -1.0, 1.0)
        y, (dx,) = grads(lambda x: x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), [x], dy)
        files[f"affine_{tag}"] = {"x": x, "scale": scale, "shift": shift, "dy": dy, "y": y, "dx": dx}

    xs = [rand(gen, (2, c, 3, 4), -1.0, 1.0) for c in (3, 1, 2)]
    dy = rand(gen, (2, 6, 3, 4), -1.0, 1.0)
    y, gs = grads(lambda *xs: torch.cat(xs, dim=1), xs, dy)
    files["concat"] = {"x0": xs[0], "x1": xs[1], "x2": xs[2], "dy": dy, "y": y,
                       "dx0": gs[0], "dx1": gs[1], "dx2": gs[2]}

    x = rand(gen, (2, 3, 4, 5), -1.0, 1.0)
    top, bottom, left, right = 1, 2, 3, 0
    f = lambda x: F.pad(x, (left, right, top, bottom))
    dy = rand(gen, (2, 3, 4 + top + bottom, 5 + left + right), -1.0, 1.0)
    y, (dx,) = grads(f, [x], dy)
    files["pad"] = {"x": x, "pad": torch.tensor([top, bottom, left, right], dtype=torch.int64),
                    "dy": dy, "y": y, "dx": dx}

    x = rand(gen, (2, 4, 5, 5), -4.0, 4.0)
    scale = rand(gen, (4,), -2.0, 2.0)
    shift = rand(gen, (4,), -1.0, 1.0)
    dy = rand(gen, (2, 8 * 6 * 6), -1.0, 1.0)
    y, (dx,) = grads(lambda x: block(x, scale, shift), [x], dy)
    files["graph_block"] = {"x": x, "scale": scale, "shift": shift, "dy": dy, "y": y, "dx": dx}

    for name, tensors in files.items():
        path = os.path.join(out, f"{name}.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path,
                  metadata={"generator": "tools/make_op_fixtures.py", "torch": torch.__version__})
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
