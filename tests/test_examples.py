"""The examples run, a few steps each, as a user would run them."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args):
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    environment.pop("JAX_ENABLE_X64", None)  # the examples run in JAX's default precision
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_quickstart():
    output = _run("quickstart.py")
    error = float(re.search(r"max \|out - reference\|: (\S+)", output).group(1))
    assert error < 1e-4


def test_train_gpt_flax_loss_curves_agree():
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    output = _run("train_gpt_flax.py", "--steps", "4", "--seqlen", "32")
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(\S+)$", output, re.MULTILINE)
    assert [int(step) for step, _, _ in rows] == [0, 1, 2, 3]
    flash, plain = (np.array([float(row[i]) for row in rows]) for i in (1, 2))
    assert np.all(np.isfinite(flash)) and flash[-1] < flash[0]  # it learns
    assert np.max(np.abs(flash - plain)) < 1e-3
    assert "tokens/s: jax_flash" in output


def test_equinox_example():
    pytest.importorskip("equinox")
    output = _run("equinox_example.py")
    assert "max |output difference|" in output



def test_ring_attention_example():
    output = _run("ring_attention.py", "--seqlen", str(8 * 64))  # it makes 8 CPU devices
    lines = [line for line in output.splitlines() if "max |difference|" in line]
    assert len(lines) == 2, output
    for line in lines:
        assert "on 8 cpu devices" in line and float(line.rsplit(" ", 1)[1]) < 1e-5, line
    kept = re.search(r"the mask keeps (\S+) of the visible probabilities", output)
    assert kept and abs(float(kept.group(1)) - 0.9) < 0.02, output


@pytest.mark.parametrize("cache", [[], ["--paged"]], ids=["contiguous", "paged"])
def test_decode_example_matches_recomputation(cache):
    output = _run("decode.py", "--tokens", "6", *cache)
    difference = re.search(r"max \|logit difference\| \(cache vs recompute\): (\S+)", output)
    assert difference and float(difference.group(1)) < 1e-4, output
    assert "greedy tokens agree: True" in output
