"""script/gpu-check runs its whole code path on the CPU at a tiny size, so CI covers what a GPU run runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, speed
from benchmarks.gpu_check import TOLERANCES, _compare, cuda_missing_message, deepcache_missing, plan
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
    # The report is rendered from the JSON beside it alone: --from-json writes it again, byte for byte.
    again = tmp_path / "again.md"
    assert gpu_check.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == report
    for check in ("identity", "parallel = sequential", "call counts"):
        for sampler in ("DDIM-50", "DPM-Solver-20"):
            assert f"| {check} | {sampler} | float32 | PASS |" in report
    assert "FAIL" not in report.split("## Speed")[0]
    # The paper's figures beside the measured ones, per mode, with memory against stock.
    assert "| DPM-Solver-20 | stock | 1.14 | 1.00x |" in report
    assert "| DPM-Solver-20 | propagation+batched | 0.64 | 1.78x |" in report
    assert "(1.00x) |" in report  # stock's memory against itself
    assert "### Results" in report  # the full speed report is included
    # In the same run: the product's default (deep reuse, 6 of 20 full steps with DPM-Solver-20, timed spread
    # evenly), with its full / partial steps, and DeepCache with no more full steps, or a row that says it is
    # not installed.
    default = "| DPM-Solver-20 | default: deep reuse `auto:6@feature`, timed as `deep-full:6` | 6 / 14 | "
    assert default in report
    # Batched deep reuse at DeepCache's interval: 5 full steps, their partial steps in 5 UNet batches.
    assert "| DPM-Solver-20 | deep reuse, `batched=True`, `uniform:4` | 5 / 15 | " in report
    assert "- **Batched deep reuse**: `DeepReuseConfig(batched=True)` at DeepCache's interval" in report
    if deepcache_missing() is None:
        assert "| DPM-Solver-20 | DeepCache, `cache_interval=4` | 5 / 15 | " in report
    else:
        assert "| DPM-Solver-20 | DeepCache, `cache_interval=4` | – | not installed: " in report
    # No compiled rows on the CPU unless asked for; the paper's table keeps to the paper's modes.
    assert "**Compiled**: not timed" in report and "stock, compiled" not in report
    paper_rows = report.split("| paper memory GB")[1].split("\n\n")[0]
    assert "deep" not in paper_rows and "compiled" not in paper_rows


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


def test_the_default_and_deepcache_follow_the_policy():
    """The defaults, auto:13 of DDIM-50 and auto:6@feature of DPM-Solver-20, are timed as as many full steps
    spread evenly (random weights have no calibration); DPM-Solver++-20's is uniform:3. DeepCache gets the
    smallest interval with no more full steps: every 4th of 50, every 4th of 20, every 3rd of 20."""
    ddim, dpm, pp = plan(Sampler.DDIM), plan(Sampler.DPM_SOLVER), plan(Sampler.DPM_SOLVER_PP)
    assert (str(ddim.default_keys), ddim.default, ddim.deepcache) == (
        "auto:13",
        "deep-full:13",
        "deepcache:4",
    )
    assert (str(dpm.default_keys), dpm.default, dpm.deepcache) == (
        "auto:6@feature",
        "deep-full:6",
        "deepcache:4",
    )
    assert (str(pp.default_keys), pp.default, pp.deepcache) == ("uniform:3", "deep:3", "deepcache:3")
    assert (ddim.full, dpm.full, pp.full) == (13, 6, 7)
    assert (ddim.batched, dpm.batched, pp.batched) == ("deep-batched:4", "deep-batched:4", "deep-batched:3")
    assert ddim.default_label == "default: deep reuse `auto:13`, timed as `deep-full:13`"
    assert dpm.default_label == "default: deep reuse `auto:6@feature`, timed as `deep-full:6`"
    assert pp.default_label == "default: deep reuse `uniform:3`"


def test_speed_modes_can_be_limited_to_one_sampler():
    samplers = [Sampler.DDIM, Sampler.DPM_SOLVER]
    extra = speed.parse_modes(
        "--extra-modes", "deep-full:13@DDIM-50,deep:3@DPM-Solver-20,deepcache:3", samplers
    )
    assert speed.modes_of(Sampler.DDIM, extra) == ["deep-full:13", "deepcache:3"]
    assert speed.modes_of(Sampler.DPM_SOLVER, extra) == ["deep:3", "deepcache:3"]
    assert speed.parse_modes("--compile", "stock,deep:3@DPM-Solver-20", samplers) == [
        ("stock", None),
        ("deep:3", Sampler.DPM_SOLVER),
    ]
    with pytest.raises(ValueError, match="--compile: 'deep:3@DDIM-50' names DDIM-50, which --samplers"):
        speed.parse_modes("--compile", "deep:3@DDIM-50", [Sampler.DPM_SOLVER])
    with pytest.raises(ValueError, match="--extra-modes: 'stock' must be KIND:I"):
        speed.parse_modes("--extra-modes", "stock", samplers)


def run_in_process(tmp_path, *args: str) -> str:
    """gpu_check's quick CPU run with DPM-Solver-20, in this process (for a test to patch); its report."""
    out = tmp_path / "gpu-check.md"
    torch.set_num_threads(1)
    assert (
        gpu_check.main(
            ["--device", "cpu", "--quick", "--samplers", "DPM-Solver-20", *args, "--out", str(out)]
        )
        == 0
    )
    return out.read_text()


def test_compiled_rows_give_speedups_against_compiled_stock(tmp_path, monkeypatch):
    """With --compile, stock and the default run again on compiled copies of the UNet, after their own
    warm-ups; every compiled row has a speedup against compiled stock. Dynamo's eager backend traces and
    guards like inductor, without a C++ compiler."""
    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": "eager"})
    )
    report = run_in_process(tmp_path, "--compile", "--compile-warmups", "2")
    # Speedups against stock, and for the compiled rows against compiled stock (1.00x for itself).
    assert re.search(r"\| DPM-Solver-20 \| stock \| 20 / 0 \| [^|]+ \| 1\.00x \| – \|", report)
    assert re.search(
        r"\| DPM-Solver-20 \| stock, compiled \| 20 / 0 \| [^|]+ \| [\d.]+x \| 1\.00x \|", report
    )
    assert re.search(
        r"\| DPM-Solver-20 \| default, compiled \| 6 / 14 \| [^|]+ \| [\d.]+x \| [\d.]+x \|", report
    )
    assert "2 untimed warm-ups of each compiled mode" in report
    assert "graphs compiled during the timed runs: 0;" in report
    assert "failed" not in report.split("<details>")[0]
    torch._dynamo.reset()


def test_a_failing_compile_gives_error_rows_not_a_crash(tmp_path, monkeypatch):
    """A compile that fails (here: at the first call, as inductor does without a C++ compiler) puts its error
    in the compiled rows; so does one that fails when asked to compile. No DeepCache: a row says so."""

    def broken(*args, **kwargs):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler | here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(
        gpu_check, "deepcache_missing", lambda: "ModuleNotFoundError: No module named 'DeepCache'"
    )
    report = run_in_process(tmp_path, "--compile")
    for row in ("stock, compiled", "default, compiled"):
        assert f"| DPM-Solver-20 | {row} | – | failed: RuntimeError: no C++ compiler \\| here | – |" in report
    assert (
        "| DPM-Solver-20 | DeepCache, `cache_interval=4` | – | not installed: `DeepCache` does not import"
        in report
    )
    default = "| DPM-Solver-20 | default: deep reuse `auto:6@feature`, timed as `deep-full:6` | 6 / 14 | "
    assert default in report  # the rest still timed
    assert "Failed, and left out of the tables:" in report


def test_a_compile_refused_at_setup_is_reported_and_the_copies_share_the_weights(monkeypatch):
    from fixtures.tiny import build_tiny_pipeline

    def refused(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported here")

    monkeypatch.setattr(torch, "compile", refused)
    pipe = build_tiny_pipeline(0)
    samplers = [Sampler.DPM_SOLVER]
    compile_list = speed.parse_modes("--compile", "stock,deep:3", samplers)
    twins = speed.compile_twins(pipe.unet, samplers, compile_list)
    assert set(twins) == {(None, "stock"), (Sampler.DPM_SOLVER, "deep:3")}
    for twin in twins.values():  # no weights copied
        assert twin is not pipe.unet and twin.conv_in.weight is pipe.unet.conv_in.weight
    bench = speed.Bench(
        pipe=pipe,
        size=16,
        prompt="a cat",
        negative_prompt="",
        guidance_scale=7.5,
        seed=0,
        trim=False,
        clock=speed.UnetClock(pipe.unet),
    )
    benches, failed = speed.compiled_benches(bench, twins, samplers, compile_list)
    error = "RuntimeError: torch.compile is not supported here"
    assert benches == {}
    assert failed == {
        (Sampler.DPM_SOLVER, "stock (compiled)"): error,
        (Sampler.DPM_SOLVER, "deep:3 (compiled)"): error,
    }
