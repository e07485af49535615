"""script/gpu-check runs its whole code path on the CPU at a tiny size, so CI covers what a GPU run runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from benchmarks.gpu_check import TOLERANCES, _compare, cuda_missing_message
from faster_diffusion import Sampler

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run(
        ["script/gpu-check", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_gpu_check_runs_on_the_cpu_and_writes_a_report(tmp_path):
    out = tmp_path / "gpu-check.md"
    result = run_gpu_check("--device", "cpu", "--quick", "--samplers", "DPM-Solver-20", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = out.read_text()
    for check in ("identity", "parallel = sequential", "call counts"):
        for sampler in ("DDIM-50", "DPM-Solver-20"):
            assert f"| {check} | {sampler} | float32 | PASS |" in report
    assert "FAIL" not in report.split("## Speed")[0]
    # The paper's figures beside the measured ones, per mode, with memory against stock.
    assert "| DPM-Solver-20 | stock | 1.14 | 1.00x |" in report
    assert "| DPM-Solver-20 | propagation+batched | 0.64 | 1.78x |" in report
    assert "(1.00x) |" in report  # stock's memory against itself
    assert "### Results" in report  # the full speed report is included


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_check_without_cuda_says_so_and_fails(tmp_path):
    result = run_gpu_check("--out", str(tmp_path / "never.md"))
    assert result.returncode == 2
    assert "sees no CUDA GPU" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "never.md").exists()
    assert cuda_missing_message() in result.stderr


def test_exactness_comparison_fails_beyond_its_tolerance():
    reference = torch.linspace(-2, 2, 64)
    atol, rtol = TOLERANCES[("parallel = sequential", torch.float32)]
    allowed = atol + rtol * 2
    assert _compare(
        "parallel = sequential", Sampler.DDIM, torch.float32, reference + allowed / 2, reference
    ).passed
    assert not _compare(
        "parallel = sequential", Sampler.DDIM, torch.float32, reference + 2 * allowed, reference
    ).passed
    assert not _compare("identity", Sampler.DDIM, torch.float32, reference + 1e-3, reference).passed
    nan = reference.clone()
    nan[0] = float("nan")
    assert not _compare("identity", Sampler.DDIM, torch.float16, nan, reference).passed


def test_timed_runs_on_cuda_sync_only_at_their_start(monkeypatch):
    """A sync inside every UNet call would stall stock (a call per step) far more than the batched decoder (a
    call per group): with per-call syncs off, the clock syncs once after clear(), whatever the mode."""
    from fixtures.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(0)
    syncs = []
    clock = speed.UnetClock(pipe.unet, sync=lambda: syncs.append(1))
    latent = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    with torch.inference_mode():
        clock.sync_each_call = False
        for _ in range(3):
            pipe.unet(latent, torch.full((2,), 500), encoder_hidden_states=text)
        assert len(syncs) == 1 and len(clock.calls) == 3
        clock.clear()
        clock.sync_each_call = True
        pipe.unet(latent, torch.full((2,), 500), encoder_hidden_states=text)
    assert len(syncs) == 1 + 4  # call, conv_in, mid block, return
