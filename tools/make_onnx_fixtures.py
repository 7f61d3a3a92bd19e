"""Makes the ONNX import fixtures in tests/fixtures/onnx/ with PyTorch.

Run from the repo root: /path/to/python tools/make_onnx_fixtures.py
(needs torch, onnx, safetensors). For each model NAME it writes NAME.onnx
(exported by torch.onnx.export, dynamic batch axis: the TorchScript
exporter at opsets 11-17, the default dynamo exporter at 18; some edited with
the onnx package to use a form other exporters emit) and NAME.safetensors
holding a fixed input `x` (f32 NCHW, pixels in [0, 1]), labels `y` (i64),
and PyTorch's float64 `logits`, mean cross-entropy `loss` and its input
gradient `dx` (stored as f32), like tests/fixtures/make_fixtures.py.
Also writes the refusal fixtures (an unsupported op, a truncated file, a
symbolic spatial axis). Every file stays a few KB.
"""
import math
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "onnx")
C, HW, K, N = 3, 8, 5, 4


def formula_input(n, c, h, w):
    j = torch.arange(n * c * h * w, dtype=torch.float64)
    return (0.5 + 0.45 * torch.sin(0.917 * j + 0.3)).to(torch.float32).reshape(n, c, h, w)


def labels(n, k):
    return torch.tensor([(3 * i + 1) % k for i in range(n)], dtype=torch.int64)


def randomise_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(1.0 + 0.5 * torch.rand(c, generator=g))


class NormFront(nn.Module):
    """(x - mean) / std per channel, as torchvision-style wrappers do."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class ConvNet(nn.Module):
    """Sub/Div normalisation, conv-BN-ReLU, max and average pools, a strided
    bias-free conv, global average pool, flatten, linear (Gemm)."""

    def __init__(self, softmax=False):
        super().__init__()
        self.norm = NormFront([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])
        self.conv1 = nn.Conv2d(C, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.apool = nn.AvgPool2d(2, stride=1)
        self.fc = nn.Linear(8, K)
        self.softmax = softmax

    def forward(self, x):
        x = self.norm(x)
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.apool(F.relu(self.bn2(self.conv2(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return torch.softmax(x, dim=1) if self.softmax else x


class ResNet(nn.Module):
    """Scalar Mul/Add normalisation, a residual block, strided conv with
    asymmetric-free padding, average pool, flatten (not global) into Gemm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, 4, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.down = nn.Conv2d(4, 6, 1, stride=2, bias=True)
        self.fc = nn.Linear(6 * 2 * 2, K)

    def forward(self, x):
        x = x * 2.0 + (-1.0)
        x = F.relu(self.bn0(self.stem(x)))
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        x = F.relu(x + y)
        x = self.down(x)
        x = F.avg_pool2d(x, 2)
        x = x.reshape(x.shape[0], -1)
        return self.fc(x)


class MatMulNet(nn.Module):
    """A conv, then a classifier written as `x @ W + b` (MatMul + Add)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(4 * 4 * 4, K) * 0.1)
        self.b = nn.Parameter(torch.randn(K) * 0.1)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = torch.flatten(x, 1)
        return x @ self.w + self.b


class KerasNet(nn.Module):
    """The channels-last flatten of Keras-ported models: Transpose(0,2,3,1)
    then Reshape to [N, -1] (through a Shape/Gather/Unsqueeze/Concat chain)
    then Gemm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, K)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        x = x.permute(0, 2, 3, 1)
        x = x.reshape(x.shape[0], -1)
        return self.fc(x)


class SpatialNet(nn.Module):
    """Any input size (conv, global pool, linear): exported with symbolic
    height and width."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, 4, 3, padding=1)
        self.fc = nn.Linear(4, K)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MobileNet(nn.Module):
    """The ops of MobileNet, EfficientNet and DenseNet in one small net:
    hardswish, depthwise and dilated grouped convs, ReLU6 (Clip), a
    squeeze-excitation gate (mean, 1x1 convs, hardsigmoid, Mul), SiLU,
    LeakyReLU, zero Pad, ceil-mode max pool, average pool without the
    padding, a channel Concat, constant affine arithmetic and sigmoid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(C, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.pw = nn.Conv2d(8, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(14, K)

    def forward(self, x):
        x = F.hardswish(self.bn0(self.stem(x)))
        x = F.relu6(self.bn1(self.dw(x)))
        g = F.hardsigmoid(self.se2(F.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        x = x * g
        x = F.silu(self.grouped(x))
        y = F.leaky_relu(self.bn2(self.pw(x)), 0.1)
        y = F.max_pool2d(F.pad(y, (1, 0, 0, 1)), 2, stride=2, ceil_mode=True)
        z = F.avg_pool2d(x, 2, stride=2, padding=1, count_include_pad=False)
        z = torch.sigmoid(z * 0.5 - 0.25)
        h = torch.cat([y, z], 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def export(model, path, opset, spatial=False):
    x = formula_input(N, C, HW, HW)
    if opset >= 18:
        # torch's default (dynamo) exporter, as users get it today.
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["logits"],
                          opset_version=opset, dynamo=True, dynamic_shapes={"x": {0: batch}},
                          external_data=False)
        return
    axes = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    torch.onnx.export(
        model, (x,), path, input_names=["input"], output_names=["logits"],
        opset_version=opset, dynamic_axes={"input": axes, "logits": {0: "batch"}},
        dynamo=False, do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )


def reference(model, hw=HW):
    """float64 logits (before any trailing softmax), loss and dx."""
    m = model.double().eval()
    softmax = getattr(m, "softmax", False)
    if softmax:
        m.softmax = False
    x = formula_input(N, C, hw, hw)
    y = labels(N, K)
    xd = x.double().requires_grad_(True)
    logits = m(xd)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    if softmax:
        m.softmax = True
    return {"x": x, "y": y, "logits": logits.detach().float(),
            "loss": loss.detach().float().reshape(1), "dx": xd.grad.float()}


def save(name, model, opset, edit=None, spatial=False, hw=HW, external=False):
    model = model.float().eval()
    path = os.path.join(OUT, name + ".onnx")
    export(model, path, opset, spatial)
    m = onnx.load(path)
    for n in m.graph.node:
        # The dynamo exporter records stack traces (with this machine's paths).
        del n.metadata_props[:]
    if edit:
        edit(m)
    onnx.checker.check_model(m)
    if external:
        data = name + ".onnx.data"
        if os.path.exists(os.path.join(OUT, data)):
            os.remove(os.path.join(OUT, data))
        onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=0)
    else:
        onnx.save_model(m, path)
    ref = reference(model, hw)
    save_file(ref, os.path.join(OUT, name + ".safetensors"),
              metadata={"source": "tools/make_onnx_fixtures.py", "opset": str(opset)})
    ops = sorted({n.op_type for n in onnx.load(path, load_external_data=False).graph.node})
    print(name, "opset", opset, os.path.getsize(path), "bytes;", ", ".join(ops))


def gemm_trans_b0(m):
    """Rewrites every Gemm as transB=0 with the weight stored [K, O], and
    alpha 0.5 / beta 2 with the weight doubled and the bias halved (same
    function), as some converters emit."""
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type != "Gemm":
            continue
        w = inits[n.input[1]]
        b = inits[n.input[2]]
        wv = numpy_helper.to_array(w)
        w.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(wv.T * 2.0).astype(np.float32), w.name))
        b.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(b) * 0.5).astype(np.float32), b.name))
        del n.attribute[:]
        n.attribute.extend([helper.make_attribute("transB", 0), helper.make_attribute("alpha", 0.5),
                            helper.make_attribute("beta", 2.0)])


def add_identity_dropout(m):
    """Puts an Identity and an (inference) Dropout after the first Relu."""
    g = m.graph
    for i, n in enumerate(g.node):
        if n.op_type == "Relu":
            out = n.output[0]
            n.output[0] = out + "_pre_id"
            ident = helper.make_node("Identity", [out + "_pre_id"], [out + "_id"], name="extra_identity")
            drop = helper.make_node("Dropout", [out + "_id"], [out], name="extra_dropout")
            g.node.insert(i + 1, drop)
            g.node.insert(i + 1, ident)
            return


def low_precision(dtype):
    """Stores every float initializer of rank > 0 as `dtype` (f16 as
    raw_data, bf16 in the typed int32_data field) behind a Cast to float,
    as mixed-precision exports do. The model's own weights are first rounded
    to that precision so PyTorch's reference uses the same values."""

    def edit(m):
        g = m.graph
        casts = []
        keep = []
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            if t.data_type != TensorProto.FLOAT or a.ndim == 0:
                keep.append(t)
                continue
            name = t.name + "_lp"
            if dtype == "f16":
                lp = numpy_helper.from_array(a.astype(np.float16), name)
            else:
                # make_tensor rounds the floats to bf16 and keeps the bits in int32_data.
                lp = helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, a.flatten().tolist())
                assert not lp.raw_data and len(lp.int32_data) == a.size
            keep.append(lp)
            casts.append(helper.make_node("Cast", [name], [t.name], to=TensorProto.FLOAT, name="cast_" + t.name))
        del g.initializer[:]
        g.initializer.extend(keep)
        for c in reversed(casts):
            g.node.insert(0, c)

    return edit


def round_params(model, dtype):
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.dtype == torch.float32 and p.dim() > 0:
                p.copy_(p.to(dtype).to(torch.float32))
    return model


def make(seed, cls, *args):
    torch.manual_seed(seed)
    m = cls(*args)
    randomise_bn(m, seed + 100)
    return m.eval()


def unsupported_model(path):
    """Conv then an Einsum: refused, naming the Einsum node."""
    w = numpy_helper.from_array(np.full((2, C, 1, 1), 0.1, np.float32), "w")
    e = numpy_helper.from_array(np.eye(2, dtype=np.float32), "e")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv0"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Einsum", ["f", "e"], ["logits"], name="mix_einsum", equation="nk,kj->nj"),
    ]
    g = helper.make_graph(
        nodes, "unsupported",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, HW, HW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [w, e])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    onnx.save_model(m, path)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    save("convnet_op11", make(1, ConvNet), 11)
    save("convnet_op17", make(1, ConvNet), 17)
    save("resnet_op11", make(2, ResNet), 11)
    save("resnet_op17", make(2, ResNet), 17)
    save("gemm_transb0_op13", make(3, ConvNet), 13, edit=gemm_trans_b0)
    save("matmul_add_op17", make(4, MatMulNet), 17)
    save("keras_transpose_op11", make(5, KerasNet), 11)
    save("keras_transpose_op17", make(5, KerasNet), 17)
    save("softmax_dropout_op17", make(6, ConvNet, True), 17, edit=add_identity_dropout)
    save("f16_op17", round_params(make(7, ResNet), torch.float16), 17, edit=low_precision("f16"))
    save("bf16_op17", round_params(make(8, ConvNet), torch.bfloat16), 17, edit=low_precision("bf16"))
    save("external_op17", make(9, ResNet), 17, external=True)
    save("spatial_op17", make(10, SpatialNet), 17, spatial=True)
    save("dynamo_convnet_op18", make(1, ConvNet), 18)
    save("dynamo_resnet_op18", make(2, ResNet), 18)
    save("dynamo_keras_op18", make(5, KerasNet), 18)
    save("mobilenet_ops_op11", make(11, MobileNet), 11)
    save("mobilenet_ops_op17", make(11, MobileNet), 17)
    save("mobilenet_ops_op18", make(11, MobileNet), 18)
    unsupported_model(os.path.join(OUT, "unsupported_einsum.onnx"))
    good = open(os.path.join(OUT, "convnet_op17.onnx"), "rb").read()
    with open(os.path.join(OUT, "truncated.onnx"), "wb") as f:
        f.write(good[: len(good) // 2])
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("total", total, "bytes")


if __name__ == "__main__":
    sys.exit(main())
