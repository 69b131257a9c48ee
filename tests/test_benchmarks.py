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


def test_step_sass_takes_the_shortest_step_that_issues_every_product(tmp_path):
    """benchmarks/step_sass.py on a made-up function: a loop of 16 products with a rare
    path (two extra instructions) and a wait loop; the step is the short way round."""
    sys.path.insert(0, str(BENCHMARKS))
    import step_sass

    lines = ["        Function : made_up_kernel", "        /*0000*/   MOV R1, R2 ;"]
    address = 0x10
    for _ in range(16):
        lines.append(f"        /*{address:04x}*/   HGMMA.64x64x16.F32.BF16 R0, gdesc[UR4], R0 ;")
        address += 0x10
    body = ["SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R3", f"@!P2 BRA 0x{address:x}",
            f"@P0 BRA 0x{address + 0x50:x}", "FMUL R1, R1, R1", "FMUL R1, R1, R1",
            "@P1 BRA 0x10", "EXIT"]
    for text in body:
        lines.append(f"        /*{address:04x}*/   {text} ;")
        address += 0x10
    sass = tmp_path / "made_up.sass"
    sass.write_text("\n".join(lines) + "\n")
    (name, instructions), = step_sass.functions(str(sass))
    head, back = step_sass.step_loop(instructions)
    path = step_sass.shortest_step(instructions, head, back)
    assert name == "made_up_kernel"
    assert sum("HGMMA" in text for text in path) == 16
    assert not any(text.startswith("FMUL") for text in path)
    assert len(path) == 16 + 4  # the products, the wait, its branch, the skip, the back edge
