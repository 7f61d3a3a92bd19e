#!/usr/bin/env python3
"""PyTorch peers of `cwp` on the same GPU, in the same run (issue 9, item 7).

What a user would run instead of `cwp`, in four configurations:

  authors   PyTorch eager as the authors run it (their generateMap.py): one
            search at a time, batch 4, float32 (they used PyTorch 1.5, which
            had no TF32), cuDNN autotuning off (their default); their images
            come from a DataLoader, here they are already on the GPU, which
            can only flatter this peer;
  fp32      float32, TF32 off, cuDNN autotuning on;
  tf32      TF32 on for convolutions and matmuls (PyTorch's default for
            convolutions), autotuning on;
  bf16_cl   bf16 autocast with channels_last model and input, autotuning on.

Workloads (the same as `cwp bench` runs in scripts/gpu-check.sh):

  models    whole models, forward + backward to the input (eval mode, frozen
            weights, mean cross-entropy) at batch 256: images/s;
  search    the authors' step for S searches of 4 images in one pass, each
            search with its own mask and canvas (fp32, tf32, bf16_cl), and the
            authors' own loop (S = 1): search-steps/s;
  convs     every distinct convolution of resnet50 (3x32x32) at batch 256:
            forward, backward-data and backward-filter TFLOP/s, and the share
            of the mode's dense peak.

The work runs in priority order (the issue's targets first) under a time
budget; the JSON is rewritten after every figure, so a run cut short still
leaves what it measured. Timing: CUDA events around repeated calls after
warm-up (autotuning), median of three samples.

Usage: gpu_peers.py OUT.json [--zoo DIR] [--budget S] [--device cuda] [--smoke]
--smoke: tiny sizes on the CPU, to check that the script runs.
"""

import argparse
import json
import os
import sys
import time

# Dense peaks of an H200 (SXM) by mode, TFLOP/s: bf16 and tf32 tensor cores
# (as measured here: ~790 bf16 on random data; tf32 is half of that), plain
# FP32 FMA; tf32x3 issues three TF32 MMAs per product.
PEAKS_H200 = {"fp32": 67.0, "tf32": 395.0, "bf16": 790.0, "tf32x3": 395.0 / 3}
# The peak each PyTorch configuration is held against.
CONFIG_PEAK = {"authors": "fp32", "fp32": "fp32", "tf32": "tf32", "bf16_cl": "bf16"}


def plan(smoke):
    """The workloads, highest priority first: (kind, arch, input, size, config)."""
    if smoke:
        sc, r18, imnet = [1, 28, 28], [3, 8, 8], [3, 32, 32]
        return ([("search", "smallcnn", sc, 1, "authors")]
                + [("search", "smallcnn", sc, 2, c) for c in ("fp32", "tf32", "bf16_cl")]
                + [("models", "smallcnn", sc, 2, c) for c in ("tf32", "bf16_cl", "fp32")]
                + [("convs", "resnet18", r18, 1, c) for c in ("tf32", "bf16_cl", "fp32")]
                + [("search", "resnet50_imagenet", imnet, 1, "bf16_cl"), ("search", "resnet18", r18, 1, "authors")])
    r32, sc, imnet = [3, 32, 32], [1, 28, 28], [3, 224, 224]
    cfgs = ("fp32", "tf32", "bf16_cl")
    first = [("search", "resnet18", r32, 1, "authors")]
    first += [("search", "resnet18", r32, 40, c) for c in cfgs]
    first += [("models", "resnet50", r32, 256, c) for c in ("tf32", "bf16_cl", "fp32")]
    first += [("convs", "resnet50", r32, 256, c) for c in ("tf32", "bf16_cl", "fp32")]
    rest = []
    for arch, inp in (("smallcnn", sc), ("resnet18", r32), ("resnet50", r32)):
        rest.append(("search", arch, inp, 1, "authors"))
        rest += [("search", arch, inp, s, c) for s in (10, 40, 160) for c in cfgs]
    rest += [("search", "resnet50_imagenet", imnet, 1, "authors")]
    rest += [("search", "resnet50_imagenet", imnet, s, c) for s in (4, 16) for c in cfgs]
    rest += [("models", arch, inp, 256, c) for arch, inp in (("smallcnn", sc), ("resnet18", r32)) for c in cfgs]
    # The inputs are lists (JSON-like), so the key that drops repeats is a
    # tuple of the workload with its input as a tuple.
    seen, out = set(), []
    for t in first + rest:
        key = (t[0], t[1], tuple(t[2]), t[3], t[4])
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


class Runner:
    def __init__(self, a):
        import torch
        self.torch = torch
        self.dev = torch.device(a.device)
        self.cuda = self.dev.type == "cuda"
        self.deadline = time.monotonic() + a.budget
        self.target = a.target
        self.nets = {}

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def configure(self, config):
        b = self.torch.backends
        b.cudnn.benchmark = config != "authors"
        tf32 = config in ("tf32", "bf16_cl")
        b.cudnn.allow_tf32 = tf32
        b.cuda.matmul.allow_tf32 = tf32

    def autocast(self, config):
        import contextlib
        if config != "bf16_cl":
            return contextlib.nullcontext()
        return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)

    def net(self, arch, inp, config):
        from zoo_torch import build
        cl = config == "bf16_cl"
        key = (arch, tuple(inp), cl)
        if key not in self.nets:
            classes = 1000 if arch.endswith("imagenet") else 10
            net = build(arch, inp[0], classes, inp[1]).to(self.dev).eval()
            for p in net.parameters():
                p.requires_grad_(False)
            if cl:
                net = net.to(memory_format=self.torch.channels_last)
            self.nets[key] = (net, classes)
        return self.nets[key]

    def time(self, fn):
        """Median seconds per call: warm-up (autotuning), then three samples of
        `reps` calls each, with reps sized to about `target` seconds in all."""
        fn()
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        one = max(time.perf_counter() - t, 1e-6)
        reps = max(1, min(100, int(self.target / (3 * one))))
        samples = []
        for _ in range(3):
            if self.cuda:
                e0 = self.torch.cuda.Event(enable_timing=True)
                e1 = self.torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(reps):
                    fn()
                e1.record()
                e1.synchronize()
                samples.append(e0.elapsed_time(e1) / 1e3 / reps)
            else:
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                samples.append((time.perf_counter() - t) / reps)
        samples.sort()
        return samples[1]

    def model(self, arch, inp, n, config):
        torch, F = self.torch, self.torch.nn.functional
        net, classes = self.net(arch, inp, config)
        x0 = torch.rand(n, *inp, device=self.dev)
        if config == "bf16_cl":
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = (torch.arange(n, device=self.dev) * 3 + 1) % classes

        def step():
            x = x0.detach().requires_grad_(True)
            with self.autocast(config):
                loss = F.cross_entropy(net(x).float(), y)
            loss.backward()
            return x.grad

        s = self.time(step)
        return {"seconds": s, "images_per_s": n / s}

    def search(self, arch, inp, S, config, B=4):
        """S searches of B images per step, each with its own canvas and mask;
        a fresh batch of other images every step (a pool of 8 batches)."""
        torch, F = self.torch, self.torch.nn.functional
        net, classes = self.net(arch, inp, config)
        c, h, w = inp
        pool = 8
        target = 1 % classes
        if config == "authors":
            # generateMap.py, as written: one mask [H, W], a batch of 4.
            canvas = torch.rand(c, h, w, device=self.dev)
            others = torch.rand(pool, B, c, h, w, device=self.dev)
            t = torch.full((B,), target, device=self.dev, dtype=torch.long)
            st = {"m": torch.full((h, w), 0.5, device=self.dev), "i": 0}

            def step():
                m = st["m"].detach().requires_grad_(True)
                x = others[st["i"] % pool]
                st["i"] += 1
                comp = canvas * m + x * (1 - m)
                loss = 0.2 * F.cross_entropy(net(comp), t) + 0.8 * torch.sum(m) / (h * w / 2)
                loss.backward()
                st["m"] = torch.clamp(m - 0.02 * torch.sign(m.grad), 0, 1).detach()
        else:
            canvas = torch.rand(S, 1, c, h, w, device=self.dev)
            others = torch.rand(pool, S, B, c, h, w, device=self.dev)
            t = torch.full((S * B,), target, device=self.dev, dtype=torch.long)
            st = {"m": torch.full((S, h, w), 0.5, device=self.dev), "i": 0}
            cl = config == "bf16_cl"

            def step():
                m = st["m"].detach().requires_grad_(True)
                x = others[st["i"] % pool]
                st["i"] += 1
                mm = m[:, None, None]
                comp = (canvas * mm + x * (1 - mm)).reshape(S * B, c, h, w)
                if cl:
                    comp = comp.contiguous(memory_format=torch.channels_last)
                with self.autocast(config):
                    logits = net(comp).float()
                # Each search's mean CE over its own B images, summed over the
                # searches: the searches' gradients stay independent.
                ce = F.cross_entropy(logits, t, reduction="sum") / B
                loss = 0.2 * ce + 0.8 * m.sum() / (h * w / 2)
                loss.backward()
                st["m"] = torch.clamp(m - 0.02 * m.grad.sign(), 0, 1).detach()

        s = self.time(step)
        return {"seconds": s, "steps_per_s": 1 / s, "search_steps_per_s": S / s}

    def conv_layers(self, arch, inp, n, config):
        """The distinct convolutions of a model at batch n (by forward hooks)."""
        torch = self.torch
        net, _ = self.net(arch, inp, "fp32")
        found = {}

        def hook(mod, args, out):
            x = args[0]
            key = (tuple(x.shape), tuple(mod.weight.shape), mod.stride[0], mod.padding[0], mod.groups)
            found[key] = found.get(key, 0) + 1

        hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
        with torch.no_grad():
            net(torch.zeros(1, *inp, device=self.dev))
        for h in hs:
            h.remove()
        return [((n,) + k[0][1:], k[1], k[2], k[3], k[4], cnt) for k, cnt in found.items()]

    def convs(self, arch, inp, n, config, report):
        torch = self.torch
        dtype = torch.bfloat16 if config == "bf16_cl" else torch.float32
        fmt = torch.channels_last if config == "bf16_cl" else torch.contiguous_format
        peak = PEAKS_H200[CONFIG_PEAK[config]]
        for xs, ws, st, pd, g, count in self.conv_layers(arch, inp, n, config):
            if time.monotonic() > self.deadline:
                report("skipped", {"x": list(xs), "w": list(ws)})
                continue
            x = torch.rand(*xs, device=self.dev).to(dtype).contiguous(memory_format=fmt)
            wt = (torch.rand(*ws, device=self.dev) * 0.1).to(dtype).contiguous(memory_format=fmt)
            y = torch.nn.functional.conv2d(x, wt, stride=st, padding=pd, groups=g)
            gy = torch.rand_like(y)
            flops = 2.0 * y.shape[0] * y.shape[2] * y.shape[3] * y.shape[1] * ws[1] * ws[2] * ws[3]
            args = (None, [st, st], [pd, pd], [1, 1], False, [0, 0], g)
            bwd = torch.ops.aten.convolution_backward
            t = [self.time(lambda: torch.nn.functional.conv2d(x, wt, stride=st, padding=pd, groups=g)),
                 self.time(lambda: bwd(gy, x, wt, *args, [True, False, False])),
                 self.time(lambda: bwd(gy, x, wt, *args, [False, True, False]))]
            tf = [flops / s / 1e12 for s in t]
            report("convs", {"arch": arch, "x": list(xs), "w": list(ws), "stride": st, "pad": pd,
                             "count": count, "config": config, "flops": flops, "tflops": tf,
                             "share_of_peak": [v / peak for v in tf]})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--zoo", default=None, help="folder holding zoo_torch.py")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run")
    ap.add_argument("--target", type=float, default=0.15, help="seconds of timed calls per figure")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    a = ap.parse_args()
    if a.smoke:
        a.device, a.target = "cpu", 0.01

    here = os.path.dirname(os.path.abspath(__file__))
    for d in [a.zoo, here, os.path.join(here, "..", "tests", "fixtures")]:
        if d and os.path.exists(os.path.join(d, "zoo_torch.py")):
            sys.path.insert(0, d)
            break
    import torch

    r = Runner(a)
    doc = {"device": torch.cuda.get_device_name(0) if r.cuda else "cpu", "torch": torch.__version__,
           "smoke": a.smoke, "budget_s": a.budget, "peaks_tflops": PEAKS_H200, "config_peak": CONFIG_PEAK,
           "models": [], "search": [], "convs": [], "skipped": [], "errors": [], "complete": False}

    def write():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, a.out)

    def report(kind, row):
        doc[kind].append(row)
        print(f"torch {kind}: {json.dumps(row)}", flush=True)
        write()

    t0 = time.monotonic()
    for kind, arch, inp, size, config in plan(a.smoke):
        what = {"kind": kind, "arch": arch, "input": inp, "size": size, "config": config}
        if time.monotonic() > r.deadline:
            report("skipped", what)
            continue
        r.configure(config)
        try:
            if kind == "models":
                report("models", {"arch": arch, "input": inp, "batch": size, "config": config,
                                  **r.model(arch, inp, size, config)})
            elif kind == "search":
                report("search", {"arch": arch, "input": inp, "searches": size, "batch": 4, "config": config,
                                  **r.search(arch, inp, size, config)})
            else:
                r.convs(arch, inp, size, config, report)
        except (RuntimeError, ValueError) as e:  # out of memory, a missing op
            report("errors", {**what, "error": str(e)[:300]})
        finally:
            if r.cuda:
                torch.cuda.empty_cache()
    doc["complete"] = not doc["skipped"]
    doc["seconds"] = time.monotonic() - t0
    write()
    print(f"gpu_peers: {len(doc['models'])} model, {len(doc['search'])} search and {len(doc['convs'])} conv "
          f"figures, {len(doc['skipped'])} skipped, {len(doc['errors'])} errors in {doc['seconds']:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
