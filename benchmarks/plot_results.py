"""Plots a results file written from bench_attention.py output (benchmarks/results/*.json):
TFLOP/s against sequence length, one panel per (head dim, pass), causal dashed.

    python benchmarks/plot_results.py benchmarks/results/h100_2026-11-24.json benchmarks/results/h100_2026-11-24.png

Needs matplotlib (not a dependency of the package).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"jax_flash": "tab:red", "jax_flash_sm80": "tab:orange", "cudnn": "tab:blue", "fa3": "tab:green",
          "xla": "tab:gray"}


def main(source, target):
    data = json.load(open(source))
    rows, meta = data["rows"], data["meta"]
    head_dims = sorted({r["head_dim"] for r in rows})
    modes = ["fwd", "fwd_bwd"]
    fig, axes = plt.subplots(len(modes), len(head_dims), figsize=(5 * len(head_dims), 8), squeeze=False)
    for col, head_dim in enumerate(head_dims):
        for line, mode in enumerate(modes):
            ax = axes[line][col]
            for impl, color in COLORS.items():
                for causal in (False, True):
                    points = sorted((r["seqlen"], r["tflops"]) for r in rows
                                    if r["impl"] == impl and r["head_dim"] == head_dim
                                    and r["mode"] == mode and r["causal"] == causal and "tflops" in r)
                    if points:
                        ax.plot(*zip(*points), color=color, linestyle="--" if causal else "-",
                                marker="o", markersize=3,
                                label=f"{impl}{' causal' if causal else ''}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"head dim {head_dim}, {mode.replace('_', '+')}")
            ax.set_xlabel("sequence length (batch x seqlen = 16k tokens)")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, jax {meta['jax']}, {meta['dtype']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(target, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:3])
