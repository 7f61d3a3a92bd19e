#!/usr/bin/env python3
"""Gathers what `gpu-check.sh run` has measured so far into one JSON of ratios.

Usage: gpu_check_report.py WORK OUT

WORK holds the raw outputs of the steps: steps.txt (one line per step:
name, exit code, seconds), selftest.json (fp32) and selftest-MODE.json,
bench-MODE-PART.json (PART: models, search, convs), torch.json
(benches/gpu_peers.py), gate/MODEL/RUN/report.json (whole searches; RUN is a
mode or fp32-seed1) and the steps' text logs. Writes to OUT: gpu-check.json
(ratios and verdicts), bench.json (every cwp bench report by mode),
selftest.json (every mode's checks), torch.json, gate.json (every gate
search's power and first positions) and log.txt. It is run after every step,
so a run cut short still leaves its figures.
"""

import json
import os
import sys

# Dense peaks of an H200 by precision mode, TFLOP/s (gpu_peers.py has the
# same table; it travels in torch.json when that ran).
PEAKS = {"fp32": 67.0, "tf32": 395.0, "bf16": 790.0, "tf32x3": 395.0 / 3}
# Which PyTorch configuration a cwp mode is matched with: the same arithmetic.
MATCH = {"fp32": "fp32", "default": "fp32", "tf32x3": "fp32", "tf32": "tf32", "bf16": "bf16_cl"}
BATCHED = ("fp32", "tf32", "bf16_cl")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except Exception:
        return None


def ratio(a, b):
    return a / b if (a and b) else None


def steps(work):
    out = {}
    try:
        for line in open(os.path.join(work, "steps.txt")):
            p = line.split()
            if len(p) >= 3:
                out[p[0]] = {"rc": int(p[1]), "seconds": int(p[2]), "note": " ".join(p[3:]) or None}
    except OSError:
        pass
    return out


def benches(work):
    """{mode: {"models": [...], "search": [...], "convs": [...], "device": ...}}"""
    out = {}
    for name in sorted(os.listdir(work)):
        if not (name.startswith("bench-") and name.endswith(".json")):
            continue
        mode, part = name[len("bench-"):-len(".json")].rsplit("-", 1)
        rep = load(os.path.join(work, name))
        if rep is None:
            continue
        m = out.setdefault(mode, {"models": [], "search": [], "convs": []})
        m["device"] = rep.get("device")
        m[part] = rep.get(part, [])
        if part == "convs":
            m["conv_tflops_weighted"] = rep.get("conv_tflops_weighted")
    return out


def selftests(work):
    """{mode: selftest JSON}: selftest.json is the default (fp32) run."""
    out = {}
    for name in sorted(os.listdir(work)):
        if name == "selftest.json" or (name.startswith("selftest-") and name.endswith(".json")):
            rep = load(os.path.join(work, name))
            if rep is not None:
                out[rep.get("precision") or name[len("selftest-"):-len(".json")] or "fp32"] = rep
    return out


def gate_runs(work):
    """{model: {run: report.json}} of the whole searches of the gate."""
    out = {}
    root = os.path.join(work, "gate")
    if not os.path.isdir(root):
        return out
    for model in sorted(os.listdir(root)):
        for run in sorted(os.listdir(os.path.join(root, model))):
            rep = load(os.path.join(root, model, run, "report.json"))
            if rep is not None:
                out.setdefault(model, {})[run] = rep
    return out


def gate_compare(ref, other):
    """Issue 9's gate of one search report against the reference's: the same
    flagged classes, every search's power within 1 point and at least 9 of
    its first 10 pattern positions the same."""
    def key(s):
        return (s["class"], s["canvas"]["id"])
    theirs = {key(s): s for s in other.get("searches", [])}
    rows = []
    for s in ref.get("searches", []):
        t = theirs.get(key(s))
        if t is None:
            continue
        dp = abs(s["power"]["overall"] - t["power"]["overall"])
        shared = len(set(s["positions"][:10]) & set(t["positions"][:10]))
        rows.append({"class": s["class"], "canvas": s["canvas"]["id"], "power": [s["power"]["overall"],
                     t["power"]["overall"]], "power_diff_pt": 100 * dp, "first10_shared": shared,
                     "pass": dp <= 0.01 and shared >= 9})
    diffs = sorted(r["power_diff_pt"] for r in rows)
    same_flags = ref.get("flagged") == other.get("flagged")
    return {"flagged": [ref.get("flagged"), other.get("flagged")], "same_flagged": same_flags,
            "searches": len(rows), "searches_failing": sum(not r["pass"] for r in rows),
            "median_power_diff_pt": diffs[len(diffs) // 2] if diffs else None,
            "worst_power_diff_pt": diffs[-1] if diffs else None,
            "fewest_first10_shared": min((r["first10_shared"] for r in rows), default=None),
            "pass": bool(rows) and same_flags and all(r["pass"] for r in rows), "rows": rows}


def large(x, w, stride, pad):
    """A convolution whose implicit GEMM is at least 256 in every dimension:
    one that can fill the tensor cores (the issue's "large layers")."""
    n, c, h, wd = x
    o, _, kh, kw = w
    p = (h + 2 * pad - kh) // stride + 1
    q = (wd + 2 * pad - kw) // stride + 1
    return min(n * p * q, o, c * kh * kw) >= 256


def main():
    work, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    st = steps(work)
    selftest = load(os.path.join(work, "selftest.json"))
    modes_selftest = selftests(work)
    torch = load(os.path.join(work, "torch.json")) or {}
    cwp = benches(work)
    modes = list(cwp)
    doc = {"device": next((b.get("device") for b in cwp.values() if b.get("device")), None),
           "torch_device": torch.get("device"), "torch": torch.get("torch"),
           "steps": st, "cwp_modes": modes, "peaks_tflops": PEAKS,
           "torch_complete": torch.get("complete"), "torch_skipped": len(torch.get("skipped", []))}
    bare = st.get("bare_start")
    try:
        bare_log = open(os.path.join(work, "bare-start.txt"), errors="replace").read()
    except OSError:
        bare_log = ""
    doc["bare_start"] = None if bare is None else {
        "pass": bare["rc"] == 0,
        "asked_for_nvrtc": "NVRTC" in bare_log or "CWP_NVRTC_LIB" in bare_log,
        "what": "cwp selftest --quick with CWP_NVRTC_LIB pointing nowhere: every kernel from the precompiled cache"}
    probe = st.get("nvrtc_probe")
    doc["nvrtc_found_by_cwp"] = None if probe is None else probe["rc"] == 0
    if selftest:
        checks = selftest["checks"]
        doc["selftest"] = {"device": selftest["device"], "checks": len(checks),
                           "failed": [c["group"] + ": " + c["name"] for c in checks if not c["pass"]],
                           "worst_ratio": max((c["ratio"] for c in checks), default=None)}
    doc["selftest_modes"] = {m: {"checks": len(r["checks"]),
                                 "failed": [c["group"] + ": " + c["name"] for c in r["checks"] if not c["pass"]],
                                 "worst_ratio": max((c["ratio"] for c in r["checks"]), default=None)}
                             for m, r in modes_selftest.items()}

    # The accuracy gate: each run of a model against its fp32 run.
    gate = {}
    for model, runs in gate_runs(work).items():
        ref = runs.get("fp32")
        if ref is None:
            continue
        gate[model] = {run: gate_compare(ref, rep) for run, rep in runs.items() if run != "fp32"}
    doc["gate"] = {model: {run: {k: v for k, v in c.items() if k != "rows"} for run, c in runs.items()}
                   for model, runs in gate.items()}

    # Whole models, fwd + bwd-to-input.
    tm = {}
    for r in torch.get("models", []):
        tm.setdefault((r["arch"], r["batch"]), {})[r["config"]] = r["images_per_s"]
    keys = sorted({(r["arch"], r["batch"]) for b in cwp.values() for r in b["models"]} | set(tm))
    rows = []
    for arch, n in keys:
        c = {m: r["images_per_s"] for m, b in cwp.items() for r in b["models"] if (r["arch"], r["batch"]) == (arch, n)}
        t = tm.get((arch, n), {})
        best = max(t.values(), default=None)
        rows.append({"arch": arch, "batch": n, "cwp_images_per_s": c, "torch_images_per_s": t,
                     "ratio_vs_matched_torch": {m: ratio(v, t.get(MATCH.get(m))) for m, v in c.items()},
                     "ratio_vs_best_torch": {m: ratio(v, best) for m, v in c.items()}})
    doc["models"] = rows

    # Search steps per second, per search.
    ts, authors = {}, {}
    for r in torch.get("search", []):
        if r["config"] == "authors":
            authors[r["arch"]] = r["search_steps_per_s"]
        else:
            ts.setdefault((r["arch"], r["searches"]), {})[r["config"]] = r["search_steps_per_s"]
    keys = sorted({(r["arch"], r["searches"]) for b in cwp.values() for r in b["search"]} | set(ts))
    rows = []
    for arch, s in keys:
        c = {m: r["search_steps_per_s"] for m, b in cwp.items() for r in b["search"]
             if (r["arch"], r["searches"]) == (arch, s)}
        t = ts.get((arch, s), {})
        best_cfg = max(t, key=t.get, default=None)
        rows.append({"arch": arch, "searches": s, "cwp_search_steps_per_s": c,
                     "torch_batched_search_steps_per_s": t, "torch_authors_eager_search_steps_per_s": authors.get(arch),
                     "best_torch_config": best_cfg,
                     "ratio_vs_best_torch": {m: ratio(v, t.get(best_cfg)) for m, v in c.items()},
                     "ratio_vs_authors_eager": {m: ratio(v, authors.get(arch)) for m, v in c.items()}})
    doc["search"] = rows

    # Per-layer convolutions.
    def lkey(r):
        return (tuple(r["x"]), tuple(r["w"]), r["stride"], r["pad"])
    layers = {}
    for m, b in cwp.items():
        for r in b["convs"]:
            e = layers.setdefault(lkey(r), {"x": r["x"], "w": r["w"], "stride": r["stride"], "pad": r["pad"],
                                            "count": r["count"], "flops": r["flops"], "cwp": {}, "torch": {}})
            e["cwp"][m] = {"tflops": r["tflops"], "share_of_peak": [v / PEAKS.get(m, PEAKS["fp32"]) for v in r["tflops"]]}
    for r in torch.get("convs", []):
        if lkey(r) in layers:
            layers[lkey(r)]["torch"][r["config"]] = {"tflops": r["tflops"], "share_of_peak": r["share_of_peak"]}
    for e in layers.values():
        e["large"] = large(e["x"], e["w"], e["stride"], e["pad"])
        e["ratio_vs_matched_torch"] = {
            m: [ratio(a, b) for a, b in zip(v["tflops"], e["torch"].get(MATCH.get(m), {}).get("tflops", [None] * 3))]
            for m, v in e["cwp"].items()}
    doc["convs"] = list(layers.values())

    def weighted_share(mode, only_large):
        """FLOP-weighted share of the mode's peak over the layers, per kernel."""
        sel = [e for e in layers.values() if mode in e["cwp"] and (e["large"] or not only_large)]
        if not sel:
            return None
        tot = sum(e["flops"] * e["count"] for e in sel)
        secs = [sum(e["flops"] * e["count"] / (e["cwp"][mode]["tflops"][k] * 1e12) for e in sel) for k in range(3)]
        return [tot / s / 1e12 / PEAKS.get(mode, PEAKS["fp32"]) for s in secs]
    doc["conv_share_of_peak"] = {m: {"all_layers": weighted_share(m, False), "large_layers": weighted_share(m, True)}
                                 for m in modes}

    def srow(arch, s):
        return next((r for r in doc["search"] if (r["arch"], r["searches"]) == (arch, s)), {})

    def best(d):
        d = {k: v for k, v in (d or {}).items() if v}
        k = max(d, key=d.get, default=None)
        return {"value": d.get(k), "mode": k} if k else {"value": None, "mode": None}

    def mrow(arch, n):
        return next((r for r in doc["models"] if (r["arch"], r["batch"]) == (arch, n)), {})

    def verdict(v, goal):
        return {**v, "goal": goal, "pass": (v["value"] >= goal) if v.get("value") is not None else None}

    # Neural Cleanse: seconds of the optimisation (cleanse.json), batched
    # over the classes and one class at a time, with the same steps.
    nc = {m: (load(os.path.join(work, f"nc-{m}", "cleanse.json")) or {}).get("seconds")
          for m in ("batched", "sequential")}
    doc["neural_cleanse"] = {**{f"{m}_seconds": v for m, v in nc.items()},
                             "batched_speedup": ratio(nc["sequential"], nc["batched"])}

    r18 = srow("resnet18", 40)
    r50 = mrow("resnet50", 256).get("ratio_vs_matched_torch", {})
    doc["targets"] = {
        "search_resnet18_s40_vs_best_torch": verdict(best(r18.get("ratio_vs_best_torch")), 1.5),
        "search_resnet18_s40_vs_authors_eager": verdict(best(r18.get("ratio_vs_authors_eager")), 50.0),
        "resnet50_b256_tf32_vs_torch_tf32": verdict({"value": r50.get("tf32"), "mode": "tf32"}, 1.0),
        "resnet50_b256_bf16_vs_torch_bf16_cl": verdict({"value": r50.get("bf16"), "mode": "bf16"}, 1.0),
        "nc_batched_vs_sequential": verdict({"value": doc["neural_cleanse"]["batched_speedup"]}, 2.0),
        "resnet50_large_convs_share_of_mode_peak": {
            m: verdict({"value": min(v["large_layers"]) if v["large_layers"] else None, "mode": m}, 0.5)
            for m, v in doc["conv_share_of_peak"].items()},
    }

    path = os.path.join(out, "gpu-check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(path + ".tmp", path)
    with open(os.path.join(out, "bench.json.tmp"), "w") as f:
        json.dump(cwp, f, indent=1)
    os.replace(os.path.join(out, "bench.json.tmp"), os.path.join(out, "bench.json"))
    for name, data in (("selftest.json", modes_selftest), ("gate.json", gate)):
        if data:
            with open(os.path.join(out, name + ".tmp"), "w") as f:
                json.dump(data, f, indent=1)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    for name in ("torch.json",):
        src = os.path.join(work, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                data = f.read()
            with open(os.path.join(out, name), "wb") as f:
                f.write(data)
    with open(os.path.join(out, "log.txt"), "w") as log:
        for name in sorted(os.listdir(work)):
            if name.endswith((".txt", ".err")):
                log.write(f"===== {name}\n")
                with open(os.path.join(work, name), errors="replace") as f:
                    log.write(f.read())
    print("gpu-check:", json.dumps({k: (v.get("pass") if isinstance(v, dict) and "pass" in v else
                                        {m: x.get("pass") for m, x in v.items()}) for k, v in doc["targets"].items()}))


if __name__ == "__main__":
    main()
