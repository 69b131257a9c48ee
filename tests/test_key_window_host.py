"""The CUDA kernels' mask arithmetic (csrc/cuda/key_window.cuh: which keys a query sees,
which tiles need a mask) compiled for the host and checked against the CPU kernel's
visible_keys / visible_queries on random windows. The GPU tests see these functions only
through whole attention calls; here every pair counts."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "host" / "key_window_check.cc"


@pytest.fixture(scope="module")
def checker(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH (set CXX) to build the host check of key_window.cuh")
    binary = tmp_path_factory.mktemp("key_window") / "key_window_check"
    build = subprocess.run([compiler, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(SOURCE),
                            "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, f"building {SOURCE.name} failed:\n{build.stderr}"
    return binary


@pytest.mark.parametrize("mode", ["none", "causal", "left", "right", "both"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_masks_match_the_cpu_definition(checker, mode, seed):
    result = subprocess.run([str(checker), mode, str(seed), "1500"], capture_output=True,
                            text=True, timeout=120)
    summary = re.search(r"checked (\d+) mismatches (\d+)", result.stdout)
    assert summary is not None, result.stdout + result.stderr
    assert int(summary.group(2)) == 0 and result.returncode == 0, result.stdout
    assert int(summary.group(1)) > 1_000_000  # the sampler really ran
