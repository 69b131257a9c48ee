"""Prints the markdown table of RESULTS.md from a results file (benchmarks/results/*.json, or
the list bench_attention.py --json writes): per (head dim, seqlen, causal), jax_flash / cuDNN /
FA3 TFLOP/s forward and forward+backward, and jax_flash against the better peer.

    python benchmarks/grid_table.py benchmarks/results/h100_2026-11-25_sm90.json
"""

from __future__ import annotations

import json
import sys

PEERS = ("cudnn", "fa3")


def table(rows: list[dict]) -> str:
    tflops = {(r["impl"], r["head_dim"], r["seqlen"], r["causal"], r["mode"]): r["tflops"]
              for r in rows if "tflops" in r}
    points = sorted({(h, c, s) for (impl, h, s, c, _) in tflops if impl == "jax_flash"})
    lines = ["| head dim | seqlen | causal | fwd: jax_flash / cuDNN / FA3 | vs best "
             "| fwd+bwd: jax_flash / cuDNN / FA3 | vs best |",
             "|---|---|---|---|---|---|---|"]
    for head_dim, causal, seqlen in points:
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            ours = tflops.get(("jax_flash", head_dim, seqlen, causal, mode))
            peers = [tflops.get((impl, head_dim, seqlen, causal, mode)) for impl in PEERS]
            shown = " / ".join("—" if v is None else f"{v:.0f}" for v in peers)
            cells.append(f"**{'—' if ours is None else f'{ours:.0f}'}** / {shown}")
            best = max((v for v in peers if v is not None), default=None)
            missing = ours is None or best is None
            cells.append("—" if missing else f"{(ours / best - 1) * 100:+.0f}%")
        point = f"| {head_dim} | {seqlen} | {'yes' if causal else 'no'} | "
        lines.append(point + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(path: str) -> None:
    data = json.load(open(path))
    print(table(data["rows"] if isinstance(data, dict) else data))


if __name__ == "__main__":
    main(sys.argv[1])
