"""Static cost of a kernel's step loop, from SASS (no GPU needed).

For each function of a cubin (or of cuobjdump -sass output) it finds the innermost loop
that holds at least 16 HGMMA, then the shortest path once around it that issues as many
HGMMA as any path does (the step that runs every product: for the backward, the
non-deterministic one; masked and general element paths are longer and lose). It prints
that path's instruction count and opcode mix, and with --skeleton the path itself with
runs of ordinary instructions folded into counts, so that the products, waits, barriers
and shared-memory traffic stand out.

    python benchmarks/step_sass.py build/.../backward_sm90_hdim128_bf16.cubin
    python benchmarks/step_sass.py kernel.sass --function Lb1 --skeleton

A cubin needs cuobjdump on PATH (the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import re
import shutil
import subprocess

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
BRANCH = re.compile(r"\bBRA(?:\.\S+)?\s+.*?(0x[0-9a-f]+)")
SHOWN = ("HGMMA", "WARPGROUP", "BAR", "SYNCS", "MEMBAR", "FENCE", "STSM", "UTMA", "UBLKCP")


def functions(path):
    if path.endswith(".cubin"):
        if shutil.which("cuobjdump") is None:
            raise SystemExit("step_sass.py: a .cubin needs cuobjdump on PATH (the CUDA toolkit, "
                             "or pip install nvidia-cuda-cuobjdump)")
        text = subprocess.run(["cuobjdump", "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    else:
        text = open(path).read()
    for chunk in re.split(r"(?:^|\n)\s*Function : ", text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        yield name, [(int(a, 16), s.strip()) for a, s in INSTRUCTION.findall(chunk)]


def opcode(instruction):
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0] if instruction else ""


def successors(instructions, index, position):
    text = instructions[index][1]
    match = BRANCH.search(text)
    if match and "BRA.U.ANY" not in text:  # .U.ANY: an elect loop, not control flow
        target = position[int(match.group(1), 16)]
        return [target, index + 1] if text.startswith("@") else [target]
    if re.search(r"\b(EXIT|RET)\b", text) and not text.startswith("@"):
        return []
    return [index + 1]


def step_loop(instructions):
    """(head, back edge) indices of the innermost loop with at least 16 HGMMA, or None."""
    products = [i for i, (_, s) in enumerate(instructions) if "HGMMA" in s]
    position = {a: i for i, (a, _) in enumerate(instructions)}
    best = None
    for index, (address, text) in enumerate(instructions):
        match = BRANCH.search(text)
        if not match or "BRA.U.ANY" in text or int(match.group(1), 16) >= address:
            continue
        head = position[int(match.group(1), 16)]
        if sum(head <= p <= index for p in products) >= 16 and (
                best is None or index - head < best[1] - best[0]):
            best = (head, index)
    return best


def natural_loop(instructions, head, back, position):
    """The instructions of the loop closed by back -> head: those that reach `back` without
    passing `head` (code the compiler placed outside [head, back], such as a rare path
    moved to the function's end, included)."""
    predecessors = collections.defaultdict(list)
    for i in range(len(instructions) - 1):
        for j in successors(instructions, i, position):
            predecessors[j].append(i)
    loop, stack = {head, back}, [back]
    while stack:
        for i in predecessors[stack.pop()]:
            if i not in loop:
                loop.add(i)
                stack.append(i)
    return loop


def shortest_step(instructions, head, back):
    """The shortest path head -> back issuing the most HGMMA any such path issues."""
    position = {a: i for i, (a, _) in enumerate(instructions)}
    loop = natural_loop(instructions, head, back, position)
    # An inner cycle that issues products could raise the count forever: no path issues
    # more than the loop holds.
    most = sum("HGMMA" in instructions[i][1] for i in loop)
    dist, previous = {(head, 0): 0}, {}
    queue, ends = [(0, head, 0)], {}
    while queue:
        d, i, h = heapq.heappop(queue)
        if d > dist.get((i, h), float("inf")):
            continue
        if i == back:
            ends.setdefault(h, (i, h))
            continue
        for j in successors(instructions, i, position):
            if j in loop:
                state = (j, h + ("HGMMA" in instructions[j][1]))
                if state[1] > most:
                    continue
                if d + 1 < dist.get(state, float("inf")):
                    dist[state], previous[state] = d + 1, (i, h)
                    heapq.heappush(queue, (d + 1, *state))
    if not ends:
        return None
    state, path = ends[max(ends)], []
    while state != (head, 0):
        path.append(instructions[state[0]][1])
        state = previous[state]
    return [instructions[head][1]] + path[::-1]


def skeleton(path):
    run = collections.Counter()
    lines = []
    for text in path + [""]:
        op = opcode(text)
        if text and not any(key in op for key in SHOWN):
            run[op.split(".")[0]] += 1
            continue
        if run:
            lines.append(f"    {sum(run.values())} x " + ", ".join(
                f"{k} {v}" for k, v in run.most_common(6)))
            run.clear()
        if text:
            lines.append(text[:96])
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("path", help="a .cubin, or a file of cuobjdump -sass output")
    parser.add_argument("--function", default="", help="only functions whose name contains this")
    parser.add_argument("--skeleton", action="store_true", help="print the path itself")
    args = parser.parse_args()
    for name, instructions in functions(args.path):
        if args.function not in name:
            continue
        loop = step_loop(instructions)
        if loop is None:
            continue
        path = shortest_step(instructions, *loop)
        if path is None:
            print(f"{name[:110]}\n  step: no path once around the loop (its head is entered "
                  "from elsewhere); read the SASS")
            continue
        mix = collections.Counter(opcode(s).split(".")[0] for s in path)
        print(f"{name[:110]}\n  step: {len(path)} instructions, {mix['HGMMA']} HGMMA; "
              + ", ".join(f"{k} {v}" for k, v in mix.most_common(14)))
        if args.skeleton:
            print("\n".join(skeleton(path)))


if __name__ == "__main__":
    main()
