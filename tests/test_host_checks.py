"""Host-compilable CUDA headers, compiled for the host and checked where the GPU tests see
them only through whole attention calls:
- csrc/cuda/key_window.cuh (which keys a query sees, which tiles need a mask) against the
  CPU kernel's visible_keys / visible_queries on random windows: every pair counts;
- csrc/cuda/hopper/tile_order.cuh (the persistent kernels' tile order): every tile taken
  once, paired units balanced; a tile taken twice or never would be a wrong gradient only
  at some grid sizes."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def build_host_check(name, tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip(f"no C++ compiler on PATH (set CXX) to build the host check {name}.cc")
    source = ROOT / "tests" / "host" / f"{name}.cc"
    binary = tmp_path_factory.mktemp(name) / name
    build = subprocess.run([compiler, "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(source),
                            "-o", str(binary)], capture_output=True, text=True)
    assert build.returncode == 0, f"building {source.name} failed:\n{build.stderr}"
    return binary


def run_host_check(binary, *args):
    """Runs a check; returns how many cases it checked, after asserting none mismatched."""
    result = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                            timeout=120)
    summary = re.search(r"checked (\d+) mismatches (\d+)", result.stdout)
    assert summary is not None, result.stdout + result.stderr
    assert int(summary.group(2)) == 0 and result.returncode == 0, result.stdout
    return int(summary.group(1))


@pytest.fixture(scope="module")
def key_window_checker(tmp_path_factory):
    return build_host_check("key_window_check", tmp_path_factory)


@pytest.mark.parametrize("mode", ["none", "causal", "left", "right", "both"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_masks_match_the_cpu_definition(key_window_checker, mode, seed):
    assert run_host_check(key_window_checker, mode, seed, 1500) > 1_000_000  # the sampler ran


def test_tile_order_takes_every_tile_once(tmp_path_factory):
    checker = build_host_check("tile_order_check", tmp_path_factory)
    assert run_host_check(checker) > 100_000  # every grid of the sweep ran
