#!/usr/bin/env python3
"""Turn a PyTorch checkpoint into a safetensors file that `cwp` loads.

    python3 tools/export_safetensors.py ckpt.pth model.safetensors \
        [--arch resnet18] [--input 3x32x32] [--classes 10] \
        [--norm-mean 0.4914,0.4822,0.4465 --norm-std 0.2023,0.1994,0.2010] [--half] \
        [--trust-pickle]

Accepts {'net': state_dict}, {'state_dict': state_dict}, {'model': ...} or a
bare state_dict, with or without DataParallel's `module.` prefix. Tensors keep
their PyTorch names; `--half` stores floats as float16. The optional flags
become metadata, so later `cwp` commands need no `--arch`. Needs torch and
safetensors (pip install torch safetensors).

A checkpoint is a pickle, and unpickling runs whatever functions the file
names: a checkpoint from an untrusted source (a model hub, the very models a
backdoor scanner is pointed at) can run code on your machine when loaded. So
by default only tensors, dicts and plain values are accepted: the file's
pickles are first checked by this script (without torch, and without running
anything) against the names a state_dict needs, then loaded with
`torch.load(weights_only=True)`. A checkpoint that pickles a whole model
object is refused; `--trust-pickle` loads it with a full unpickle, which runs
the code it carries: use it only on files you made yourself.
"""
import argparse
import collections
import io
import pickle
import re
import sys
import zipfile

# What a state_dict pickle may name: the same set torch's weights_only
# loader accepts for plain tensors.
ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch.serialization", "_get_layout"),
    ("torch", "strided"),
    ("_codecs", "encode"),
}
TORCH_DTYPES = {
    "float64", "float32", "float16", "bfloat16", "double", "float", "half",
    "int64", "int32", "int16", "int8", "uint8", "long", "int", "short", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
}
STORAGE = re.compile(r"^[A-Za-z0-9]*Storage$")


class Refused(Exception):
    """The checkpoint names something a state_dict does not need."""


def allowed(module, name):
    if (module, name) in ALLOWED_GLOBALS:
        return True
    if module in ("torch", "torch.storage") and STORAGE.match(name):
        return True
    return module == "torch" and name in TORCH_DTYPES


class _Stub:
    """Stands for every allowed global during the check: calling it, or
    setting its state, records nothing and runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass


class CheckingUnpickler(pickle.Unpickler):
    """Walks a pickle without running any of it: every global it names must
    be on the allow-list and is replaced by a stub; storages (torch's
    persistent ids) become stubs too."""

    def find_class(self, module, name):
        if not allowed(module, name):
            raise Refused(f"{module}.{name}")
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Stub

    def persistent_load(self, pid):
        return _Stub()


def check_one(stream):
    """Checks one pickle; False when it is not one this check can walk (a
    malformed file, raw bytes), which torch's own weights_only check then
    meets."""
    try:
        CheckingUnpickler(stream).load()
        return True
    except Refused:
        raise
    except Exception:
        return False


def check_pickles(path):
    """Raises Refused if a pickle in the checkpoint names a global outside
    the allow-list. Reads torch's zip format (every *.pkl entry) and the
    legacy format (a run of pickles, then raw storage bytes)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for entry in z.namelist():
                if entry.endswith(".pkl"):
                    check_one(io.BytesIO(z.read(entry)))
        return
    with open(path, "rb") as f:
        # Legacy files: magic number, protocol, system info, the object,
        # storage keys; raw storage bytes follow. A plain pickle is one object.
        for _ in range(5):
            if not check_one(f):
                return


def load_checkpoint(path, trust_pickle):
    """The checkpoint's object: checked and loaded with weights_only=True,
    or, with trust_pickle, fully unpickled (after a warning)."""
    if trust_pickle:
        print(
            f"export_safetensors: WARNING: --trust-pickle: fully unpickling {path}; any code "
            "it carries runs now, with your permissions. Do this only for a file you trust.",
            file=sys.stderr,
        )
    else:
        try:
            check_pickles(path)
        except Refused as e:
            sys.exit(
                f"export_safetensors: {path}: refusing to load: its pickle calls `{e}`, which a "
                "state_dict of tensors never needs; loading it could run code from the file. "
                "If you made the file yourself (e.g. torch.save of a whole model), pass "
                "--trust-pickle."
            )
    try:
        import torch
    except ImportError:
        sys.exit("export_safetensors: needs torch and safetensors (pip install torch safetensors)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        sys.exit(
            f"export_safetensors: {path}: torch refuses it with weights_only=True ({e}). "
            "If you made the file yourself, pass --trust-pickle."
        )


def state_dict_of(obj):
    import torch

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
    ap.add_argument(
        "--trust-pickle",
        action="store_true",
        help="fully unpickle the checkpoint (runs any code it carries; only for files you trust)",
    )
    a = ap.parse_args()

    obj = load_checkpoint(a.checkpoint, a.trust_pickle)
    sd = state_dict_of(obj)
    from safetensors.torch import save_file

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
