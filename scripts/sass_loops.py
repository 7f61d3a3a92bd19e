#!/usr/bin/env python3
"""Issue slots per tensor-core instruction in each GEMM main loop, read off
the machine code: what a kernel costs before any device time is spent.

    python3 scripts/sass_loops.py KERNELS.sass [NAME-FILTER...]

KERNELS.sass is `cuobjdump -sass` of a CUBIN (`cwp precompile --out DIR`
writes them, after a short header, into DIR/conv_mma.cu-*.bin; the CUBIN
starts at its ELF magic). cuobjdump comes with the CUDA toolkit, or with
Triton's wheel (triton/backends/nvidia/bin). For every innermost loop that
holds HMMA instructions it prints the HMMA per iteration and the
instructions issued per iteration, fewest to most over the ways through the
body (the steady state issues the next stage's copies; the last STAGES-1
iterations do not, shown apart): with mma.sync, a warp
scheduler issues one instruction per cycle and an m16n8k16 bf16 HMMA keeps
the tensor core busy for a few cycles, so a loop far above a handful of
instructions per HMMA is issue-bound, not tensor-bound.
"""
import re
import sys


def functions(path):
    """{kernel name: [(address, instruction text)]}"""
    out, name = {}, None
    for line in open(path):
        m = re.search(r"Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[name] = []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and name:
            out[name].append((int(m.group(1), 16), m.group(2).strip()))
    return out


BRA = re.compile(r"^(@!?U?P\w+\s+)?BRA\s+(?:!?U?P\w+,\s*)?0x([0-9a-f]+)")


def hmma_loops(code):
    """Bodies [(address, text)] of the loops (backward branches) with HMMA."""
    loops = []
    for addr, text in code:
        m = BRA.match(text)
        if m and int(m.group(2), 16) < addr:
            top = int(m.group(2), 16)
            body = [(a, t) for a, t in code if top <= a <= addr]
            if any("HMMA" in t for _, t in body):
                loops.append(body)
    return loops


def paths(body, max_branches=6):
    """(instructions, HMMA) along each way through the body: forward
    conditional branches taken or not, in every combination."""
    index = {a: i for i, a in enumerate(a for a, _ in body)}
    found = set()
    for mask in range(1 << max_branches):
        i, n, h, seen, k = 0, 0, 0, set(), 0
        while i < len(body):
            addr, text = body[i]
            if addr in seen:
                break
            seen.add(addr)
            n += 1
            h += "HMMA" in text
            m = BRA.match(text)
            if m:
                target = int(m.group(2), 16)
                if target not in index or target <= body[0][0]:
                    break  # the loop's back edge or an exit
                taken = m.group(1) is None or (mask >> k) & 1
                k += m.group(1) is not None
                if taken:
                    i = index[target]
                    continue
            i += 1
        if h:
            found.add((n, h))
    return sorted(found)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    filters = sys.argv[2:]
    for name, code in functions(sys.argv[1]).items():
        if filters and not any(f in name for f in filters):
            continue
        for body in hmma_loops(code):
            ways = paths(body)
            hmma = ways[0][1]
            # the shortest way issues no copies (the last iterations); the
            # next is the steady state's fastest, the last its slowest
            drain, steady = ways[0][0], [n for n, _ in ways[1:]] or [ways[0][0]]
            print(
                f"{name}: {hmma} HMMA per iteration; instructions issued: "
                f"{min(steady)}-{max(steady)} ({min(steady) / hmma:.1f}-{max(steady) / hmma:.1f} per HMMA), "
                f"{drain} in the last iterations"
            )


if __name__ == "__main__":
    main()
