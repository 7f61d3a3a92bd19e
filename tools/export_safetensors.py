#!/usr/bin/env python3
"""Turn a PyTorch checkpoint into a safetensors file that `cwp` loads.

    python3 tools/export_safetensors.py ckpt.pth model.safetensors \
        [--arch resnet18] [--input 3x32x32] [--classes 10] \
        [--norm-mean 0.4914,0.4822,0.4465 --norm-std 0.2023,0.1994,0.2010] [--half]

Accepts {'net': state_dict}, {'state_dict': state_dict}, {'model': ...} or a
bare state_dict, with or without DataParallel's `module.` prefix. Tensors keep
their PyTorch names; `--half` stores floats as float16. The optional flags
become metadata, so later `cwp` commands need no `--arch`. Needs torch and
safetensors (pip install torch safetensors).
"""
import argparse
import sys

import torch
from safetensors.torch import save_file


def state_dict_of(obj):
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("net", "state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], (dict, torch.nn.Module)):
                return state_dict_of(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    sys.exit("export_safetensors: no state_dict found (tried 'net', 'state_dict', 'model', a bare dict of tensors)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--arch")
    ap.add_argument("--input", help="CxHxW, e.g. 3x32x32")
    ap.add_argument("--classes", type=int)
    ap.add_argument("--norm-mean")
    ap.add_argument("--norm-std")
    ap.add_argument("--half", action="store_true", help="store floats as float16")
    a = ap.parse_args()

    obj = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
    sd = state_dict_of(obj)
    out = {}
    for name, t in sd.items():
        if name.startswith("module."):
            name = name[len("module."):]
        t = t.detach().cpu().contiguous()
        if a.half and t.is_floating_point():
            t = t.half()
        out[name] = t
    meta = {"source": a.checkpoint}
    if a.arch:
        meta["arch"] = a.arch
    if a.input:
        c, h, w = (int(v) for v in a.input.lower().split("x"))
        meta.update(in_channels=str(c), height=str(h), width=str(w))
    if a.classes:
        meta["num_classes"] = str(a.classes)
    if a.norm_mean or a.norm_std:
        if not (a.norm_mean and a.norm_std):
            sys.exit("export_safetensors: give both --norm-mean and --norm-std")
        meta.update(norm_mean=a.norm_mean, norm_std=a.norm_std)
    save_file(out, a.out, metadata=meta)
    print(f"wrote {a.out}: {len(out)} tensors")


if __name__ == "__main__":
    main()
