"""Which torchvision classification CNNs `cwp` imports from ONNX, and how
close it comes to PyTorch on each (the target of issue 11: logits relative
L2 <= 1e-4, input gradient <= 1e-3).

For every model: random init (torchvision's own, BN statistics randomised),
10 classes, a 3xHxW input (32 unless the model needs more); exported by
torch.onnx.export (dynamo, opset 18); PyTorch's float64 logits and input
gradient of the mean cross-entropy; then `cwp forward` on the same input,
and the relative L2 errors. Needs torch, torchvision, onnx, onnxscript and
a built `cwp`; writes into a scratch folder, nothing into the repo.

Usage: python tools/check_torchvision.py CWP_BINARY SCRATCH_DIR [MODEL[@HW] ...]
(vgg and alexnet upsample a small map in their adaptive pool, which is
outside the op set; at 224 it is the identity: `vgg11_bn@224`.)
"""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torchvision import models

# Input extent per model where 32 is too small for its downsampling.
SIZES = {"alexnet": 64, "inception_v3": 80, "googlenet": 32, "squeezenet1_0": 48, "squeezenet1_1": 48}
DEFAULT = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "alexnet",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "efficientnet_b0",
    "efficientnet_v2_s", "densenet121", "squeezenet1_1", "googlenet", "shufflenet_v2_x0_5",
    "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
]


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(cwp, out, name):
    name, _, size = name.partition("@")
    hw = int(size) if size else SIZES.get(name, 32)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    torch.manual_seed(0)
    m = getattr(models, name)(num_classes=10, **kw).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                mod.running_var.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
    x = torch.rand(2, 3, hw, hw, generator=g)
    y = torch.tensor([1, 4])
    path = os.path.join(out, f"{name}.onnx")
    try:
        torch.onnx.export(m, (x,), path, dynamo=True, opset_version=18, external_data=True,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    except Exception as e:  # noqa: BLE001 - a report, not a test
        return f"{name:22s} export failed: {type(e).__name__}"
    md = m.double()
    xd = x.double().requires_grad_(True)
    logits = md(xd)
    F.cross_entropy(logits, y).backward()
    inp = os.path.join(out, f"{name}_in.safetensors")
    save_file({"x": x, "y": y}, inp)
    res = os.path.join(out, f"{name}_out.safetensors")
    r = subprocess.run([cwp, "forward", "--weights", path, "--input", inp, "--out", res, "--device", "cpu"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
        return f"{name:22s} refused: {msg[:220]}"
    got = load_file(res)
    el, ed = rel_l2(got["logits"], logits.detach()), rel_l2(got["dx"], xd.grad)
    ok = "ok  " if el <= 1e-4 and ed <= 1e-3 else "FAIL"
    return f"{name:22s} {ok} {hw:3d}x{hw:<3d}  logits relL2 {el:.1e}  dx relL2 {ed:.1e}"


def main():
    cwp, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name in sys.argv[3:] or DEFAULT:
        print(check(cwp, out, name), flush=True)


if __name__ == "__main__":
    main()
