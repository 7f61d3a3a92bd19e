"""Whole-model ONNX fixtures of torchvision CNNs (random-free: formula weights).

For each of mobilenet_v3_small, efficientnet_b0, densenet121 and the zoo's
resnet18 (zoo_torch.py) (10 classes, 3x32x32 input) this writes, into the output folder:

- `{name}.onnx`: the graph as `torch.onnx.export` (dynamo, opset 18, symbolic
  batch axis, unoptimised so that every state_dict entry keeps its name) writes
  it, with every initializer in the external file `{name}.onnx.data`. That data
  file is NOT kept: the weights are the fixtures README formula of each
  initializer's name and shape, so a test rebuilds it byte for byte (about
  50 MB for the three models, which the repo need not carry).
- `{name}_expect.safetensors`: `x`, `y`, `logits`, `loss` (mean CE) and `dx`,
  computed by PyTorch in float64 with those weights (eval mode).

The role of an initializer in the formula follows from the names alone: a
tensor whose prefix also has a `running_mean` belongs to a batch norm; else a
`weight` is a conv/linear weight and a `bias` a bias.

Usage: python tools/make_torchvision_fixtures.py OUT_DIR [ARCH ...]
"""
import os
import sys

import onnx
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from make_fixtures import formula_input, labels  # noqa: E402
from zoo_torch import build  # noqa: E402

import math  # noqa: E402

import numpy as np  # noqa: E402

M64 = (1 << 64) - 1


def hash_unit(s, n):
    """u_i in [-1, 1): splitmix64 of (s * golden + i), top 53 bits. Exact in
    any language with wrapping u64 arithmetic."""
    with np.errstate(over="ignore"):
        z = np.uint64(s) * np.uint64(0x9E3779B97F4A7C15) + np.arange(n, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53) * 2.0 - 1.0


def formula_tensor(name, shape, role):
    """The fixtures README formula with a hashed u_i (formula-v2-hash): the
    sine of formula-v1 is smooth along a filter, so stacked depthwise convs
    cancel the input and deep nets end with a gradient of 1e-15."""
    s = sum(name.encode()) % 997
    n = math.prod(shape) if shape else 1
    u = torch.from_numpy(hash_unit(s, n))
    if role == "weight":
        fan_in = n // shape[0]
        v = u * math.sqrt(6.0 / fan_in)
    elif role == "bias":
        v = 0.05 * u
    elif role == "bn_weight":
        v = 1.0 + 0.2 * u
    elif role in ("bn_bias", "bn_mean"):
        v = 0.1 * u
    elif role == "bn_var":
        v = 1.0 + 0.25 * (u + 1.0)
    else:
        raise ValueError(role)
    return v.to(torch.float32).reshape(shape)

torch.use_deterministic_algorithms(True)

# torchvision's own, and the zoo's resnet18 as PyTorch exports it (the
# importer must give the zoo's graph, so it searches as fast).
ARCHS = ["mobilenet_v3_small", "efficientnet_b0", "densenet121", "zoo_resnet18"]


def role(name, names):
    prefix, leaf = name.rsplit(".", 1)
    if prefix + ".running_mean" in names:
        return {"weight": "bn_weight", "bias": "bn_bias", "running_mean": "bn_mean", "running_var": "bn_var"}[leaf]
    return "weight" if leaf == "weight" else "bias"


def make(arch, out, n=2, classes=10, hw=32):
    if arch.startswith("zoo_"):
        model = build(arch[4:], 3, classes, hw).eval()
    else:
        model = getattr(models, arch)(num_classes=classes).eval()
    sd = model.state_dict()
    names = set(sd)
    for name in sd:
        if not name.endswith("num_batches_tracked"):
            sd[name] = formula_tensor(name, list(sd[name].shape), role(name, names))
    model.load_state_dict(sd)

    path = os.path.join(out, f"{arch}.onnx")
    x = formula_input(n, 3, hw, hw)
    torch.onnx.export(model, (x,), path, dynamo=True, opset_version=18, optimize=False, external_data=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    missing = [k for k in sd if not k.endswith("num_batches_tracked") and k not in inits]
    extra = [k for k in inits if k not in sd]
    assert not missing and not extra, f"{arch}: initializer names differ from the state_dict: {missing[:3]} {extra[:3]}"
    # The shapes of intermediate values are not needed (the importer infers
    # them) and are most of the file.
    del m.graph.value_info[:]
    del m.metadata_props[:]
    for node in m.graph.node:
        node.doc_string = ""
    onnx.save_model(m, path)
    os.remove(path + ".data")

    md = model.double()
    y = labels(n, classes)
    xd = x.double().requires_grad_(True)
    logits = md(xd)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    save_file({"x": x, "y": y, "logits": logits.detach().float(), "loss": loss.detach().float().reshape(1),
               "dx": xd.grad.float()}, os.path.join(out, f"{arch}_expect.safetensors"),
              metadata={"arch": arch, "weights": "formula-v2-hash", "mode": "eval", "model": f"{arch}.onnx"})
    print(arch, "logits", logits[0, :4].tolist(), "loss", float(loss), "|dx|max", float(xd.grad.abs().max()),
          "onnx bytes", os.path.getsize(path))


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out, exist_ok=True)
    for a in sys.argv[2:] or ARCHS:
        make(a, out)
