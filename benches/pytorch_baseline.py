#!/usr/bin/env python3
"""PyTorch baseline for `cwp bench`, on the same machine and the same workloads.

Reads the JSON report of `cwp bench --json` (to measure exactly its models,
batch sizes, search shapes and convolutions) and writes the same figures for
PyTorch (eager, float32, TF32 off, cuDNN autotuning on):

- forward + backward to the input (eval mode, frozen weights, mean
  cross-entropy), images/s;
- the authors' search step: S = 1 is their loop as written (one canvas, batch
  4, `loss.backward()` on the mask); S > 1 batches S searches into one step
  the way `cwp` does (one mask per search, the CE term summed over searches);
- training steps (train-mode BN, mean cross-entropy, `torch.optim.SGD` with
  the momentum and weight decay of `cwp train`), images/s;
- every convolution of the report: forward (`F.conv2d`), backward-data and
  backward-filter (`torch.nn.grad.conv2d_input` / `conv2d_weight`), TFLOP/s.

Usage: pytorch_baseline.py CWP_BENCH.json OUT.json [--zoo DIR_WITH_zoo_torch.py]
The architectures come from zoo_torch.py (tests/fixtures), the same
definitions the engine's golden fixtures were made with.
"""

import argparse
import json
import os
import sys
import time


def median_time(fn, sync, seconds):
    for _ in range(2):
        fn()
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cwp_report")
    ap.add_argument("out")
    ap.add_argument("--zoo", default=None, help="folder holding zoo_torch.py")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    here = os.path.dirname(os.path.abspath(__file__))
    for d in [a.zoo, here, os.path.join(here, "..", "tests", "fixtures")]:
        if d and os.path.exists(os.path.join(d, "zoo_torch.py")):
            sys.path.insert(0, d)
            break
    import torch
    import torch.nn.functional as F
    from zoo_torch import build

    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rep = json.load(open(a.cwp_report))
    out = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "torch": torch.__version__, "models": [], "search": [], "train": [], "convs": []}

    def net_for(arch, inp):
        classes = 1000 if inp[1] >= 224 else 10
        net = build(arch, inp[0], classes, inp[1]).to(dev).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net, classes

    cache = {}
    for m in rep["models"]:
        arch, inp, n = m["arch"], m["input"], m["batch"]
        key = (arch, tuple(inp))
        if key not in cache:
            cache[key] = net_for(arch, inp)
        net, classes = cache[key]
        x0 = torch.rand(n, *inp, device=dev)
        y = (torch.arange(n, device=dev) * 3 + 1) % classes

        def step():
            x = x0.detach().requires_grad_(True)
            F.cross_entropy(net(x), y).backward()
            return x.grad

        try:
            s = median_time(step, sync, a.seconds)
            out["models"].append({"arch": arch, "input": inp, "batch": n, "seconds": s,
                                  "images_per_s": n / s})
        except RuntimeError as e:  # e.g. out of memory
            out["models"].append({"arch": arch, "input": inp, "batch": n, "error": str(e)[:200]})
        print(f"torch {arch} batch {n}: {out['models'][-1]}", flush=True)

    for srow in rep["search"]:
        arch, inp, S, B = srow["arch"], srow["input"], srow["searches"], srow["batch"]
        key = (arch, tuple(inp))
        if key not in cache:
            cache[key] = net_for(arch, inp)
        net, classes = cache[key]
        c, h, w = inp
        canvas = torch.rand(S, c, h, w, device=dev)
        others = torch.rand(S, B, c, h, w, device=dev)
        t = torch.full((S * B,), 1, device=dev, dtype=torch.long)
        state = {"m": torch.full((S, h, w), 0.5, device=dev)}

        def search_step():
            m = state["m"].detach().requires_grad_(True)
            mm = m[:, None, None]                       # [S,1,1,H,W]
            comp = canvas[:, None] * mm + others * (1 - mm)  # [S,B,C,H,W]
            logits = net(comp.reshape(S * B, c, h, w))
            # alpha * mean_b CE per search, summed over searches; beta * L1.
            ce = F.cross_entropy(logits, t, reduction="sum") / B
            loss = 0.2 * ce + 0.8 * m.sum() / (h * w / 2)
            loss.backward()
            state["m"] = torch.clamp(m - 0.02 * m.grad.sign(), 0, 1).detach()

        s = median_time(search_step, sync, a.seconds)
        out["search"].append({"arch": arch, "input": inp, "searches": S, "batch": B, "seconds": s,
                              "steps_per_s": 1 / s, "search_steps_per_s": S / s})
        print(f"torch search {arch} S={S}: {out['search'][-1]}", flush=True)

    for tr in rep.get("train", []):
        arch, inp, n = tr["arch"], tr["input"], tr["batch"]
        classes = 1000 if inp[1] >= 224 else 10
        net = build(arch, inp[0], classes, inp[1]).to(dev).train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        x = torch.rand(n, *inp, device=dev)
        y = (torch.arange(n, device=dev) * 3 + 1) % classes

        def train_step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()

        try:
            s = median_time(train_step, sync, a.seconds)
            out["train"].append({"arch": arch, "input": inp, "batch": n, "seconds": s,
                                 "images_per_s": n / s})
        except RuntimeError as e:
            out["train"].append({"arch": arch, "input": inp, "batch": n, "error": str(e)[:200]})
        print(f"torch train {arch} batch {n}: {out['train'][-1]}", flush=True)

    for cr in rep.get("convs", []):
        xs, ws, st, pd = cr["x"], cr["w"], cr["stride"], cr["pad"]
        x = torch.rand(*xs, device=dev)
        wt = torch.rand(*ws, device=dev) * 0.1
        y = F.conv2d(x, wt, stride=st, padding=pd)
        flops = 2.0 * y.shape[0] * y.shape[2] * y.shape[3] * y.shape[1] * ws[1] * ws[2] * ws[3]
        t0 = median_time(lambda: F.conv2d(x, wt, stride=st, padding=pd), sync, a.seconds)
        t1 = median_time(lambda: torch.nn.grad.conv2d_input(xs, wt, y, stride=st, padding=pd), sync, a.seconds)
        t2 = median_time(lambda: torch.nn.grad.conv2d_weight(x, ws, y, stride=st, padding=pd), sync, a.seconds)
        out["convs"].append({"x": xs, "w": ws, "stride": st, "pad": pd, "count": cr["count"], "flops": flops,
                             "tflops": [flops / t0 / 1e12, flops / t1 / 1e12, flops / t2 / 1e12]})
        print(f"torch conv {ws} on {xs}: {out['convs'][-1]['tflops']}", flush=True)

    with open(a.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
