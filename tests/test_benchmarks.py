"""The multi-GPU benchmark runs end to end on fake CPU devices, so that it works the day a
multi-GPU machine is lent (its timings here mean nothing; its checks do)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "bench_sequence_parallel.py"


def test_sequence_parallel_benchmark_checks_and_times_every_method(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
    output = tmp_path / "sp.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-devices", "2", "--heads", "2", "--head-dim", "32",
         "--dtype", "float32", "--causal", "1", "--check-seqlen", "96", "--seqlens", "128",
         "--json", str(output)],
        env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rows = json.loads(output.read_text())
    methods = {"ring_zigzag", "ring_contiguous", "ulysses"}
    checks = [row for row in rows if row["kind"] == "check"]
    assert {row["method"] for row in checks} == methods
    assert all(row["passed"] and row["num_devices"] == 2 for row in checks)
    times = {row["impl"]: row for row in rows if row["kind"] == "time"}
    assert set(times) == methods | {"one_device", "ring_zigzag no_transfers",
                                    "ring_zigzag no_kernels", "ring_contiguous no_transfers",
                                    "ring_contiguous no_kernels"}
    assert all(row["ms"] > 0 for row in times.values())
    assert all(times[m]["efficiency"] > 0 for m in methods)
    assert "exposed_transfer_ms" in times["ring_zigzag"]
