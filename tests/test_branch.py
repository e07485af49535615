"""Deep reuse's branch chosen per request: the library layer (``app.branch``), ``--branch auto`` and Cog's
``choose_branch``, on the reference model.

Partial steps are timed on the machine; here the timing is replaced by the costs measured on the SD v1.5
architecture at 256 px (``benchmarks/results/deep-variants-costs.json``), so that the choice is the same on
every CPU. With them, at DeepCache:3's cost (uniform:3, DPM-Solver-20), the chooser compares branches 0, 1
and 2 (5 and 3 full steps for the deeper two; branch 3 affords none) and picks branch 0, as
``benchmarks/depth_choice.py`` did on the same model; the request then keeps its own key steps.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import faster_diffusion.app.branch as branch_module
from faster_diffusion import DeepReuseConfig, KeySteps, reference
from faster_diffusion.app.branch import check_branch_choice, choose_branch
from faster_diffusion.app.cli import main
from faster_diffusion.app.generate import GenerationRequest, faster_config, prepare_key_steps
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.app.serving import TextToImage, check_mode_inputs

SD15_COSTS = {0: 0.0724, 1: 0.1721, 2: 0.2751, 3: 0.3663, 4: 0.3929, 5: 0.5023}
#: The calibrated steps of branch 0 at DeepCache:3's cost on the first reference model (depth-choice.md).
PICKED = [0, 2, 4, 8, 11, 14, 17]


@pytest.fixture
def timed(monkeypatch):
    """Replace the timing with fixed costs; returns the list of (branch, height, width, batch) timed, and the
    costs, which a test may change."""
    calls: list[tuple[int, int, int, int]] = []
    costs = dict(SD15_COSTS)

    def fake(pipe, branches, *, height, width, batch_size, **_):
        calls.extend((b, height, width, batch_size) for b in branches)
        return {b: costs.get(b, 0.9) for b in branches}

    monkeypatch.setattr(branch_module, "measure_step_costs", fake)
    return calls, costs


def request(keys: str = "uniform:3", **more) -> GenerationRequest:
    faster = faster_config(keys, mode="deep", **more)
    return GenerationRequest(
        prompt=reference.EXAMPLE_PROMPT, sampler="DPM-Solver-20", width=32, height=32, faster=faster
    )


def test_the_branch_is_chosen_at_the_cost_of_the_key_steps_and_branch_0_keeps_them(timed):
    calls, costs = timed
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    lines: list[str] = []
    asked = prepare_key_steps(pipe, request())
    kept = choose_branch(pipe, asked, lines.append)
    assert kept is asked  # branch 0 won: the key steps asked for (every third step) stay
    said = "\n".join(lines)
    # Timed from branch 0 deeper, stopping at branch 3, the first that affords fewer than 2 full steps.
    assert [c[0] for c in calls] == [0, 1, 2, 3] and {c[1:] for c in calls} == {(32, 32, 1)}
    assert re.search(r"predicted error per branch: b0: 7 full, [\d.]+, b1: 5 full, [\d.]+, b2: 3 full", said)
    assert f"Branch: auto: branch 0 with 7 full steps {PICKED}" in said
    assert said.endswith("keeping branch 0 with the key steps asked for")
    assert "Calibrating deep:1 reuse" in said and "Calibrating deep:2 reuse" in said
    assert "branch 0 0.072, branch 1 0.172, branch 2 0.275" in said

    # Timed once per process, UNet, size and batch; calibrations are not made twice.
    calls.clear()
    lines.clear()
    costs[1] = costs[0]
    assert choose_branch(pipe, asked, lines.append) is asked
    assert calls == [] and not any("Calibrating" in line for line in lines)
    # A branch 1 as cheap as branch 0 affords as many full steps, each partial step straying less: it wins,
    # with its own calibrated steps.
    branch_module._STEP_COSTS.clear()
    moved = choose_branch(pipe, asked, lines.append)
    assert moved.faster.branch == 1 and moved.schedule.num_key_steps == 7
    assert moved.faster.key_steps.origin.startswith("depth choice at 7.9412 full passes, branch 1")
    # A timing below a shallower branch's is noise: it is raised to that branch's.
    branch_module._STEP_COSTS.clear()
    costs[1], costs[2] = SD15_COSTS[1], 0.1
    choose_branch(pipe, asked, lines.append)
    assert "branch 0 0.072, branch 1 0.172, branch 2 0.172" in lines[-1]


def test_when_no_branch_can_save_anything_the_request_is_kept(timed):
    _, costs = timed
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    asked = prepare_key_steps(pipe, request())
    lines: list[str] = []
    costs[1] = 0.9  # only branch 0 affords 2 full steps: nothing is calibrated
    assert choose_branch(pipe, asked, lines.append) is asked
    assert lines[-1].startswith("Branch: auto: branch 0, as no deeper branch affords 2 full steps at 7.9412")
    branch_module._STEP_COSTS.clear()
    costs[0] = 1.2  # a partial step as dear as a full one (a tiny model, a busy machine)
    assert choose_branch(pipe, asked, lines.append) is asked
    assert "a partial step timed as costly as a full one here (1.200 full passes)" in lines[-1]


@pytest.mark.parametrize(
    ("deep", "image", "forecast", "message"),
    [
        (False, False, 0, "X applies to deep reuse only (mode deep)"),
        (True, True, 0, "X works for text-to-image only (it chooses over the whole schedule); give a branch"),
        (True, False, 1, "X predicts the error of copied features, not forecast ones; turn forecasting off"),
    ],
)
def test_what_the_choice_cannot_serve_is_refused_naming_the_setting(deep, image, forecast, message):
    with pytest.raises(ValueError) as error:
        check_branch_choice(deep, image, forecast, "X")
    assert str(error.value).startswith(message)
    check_branch_choice(True, False, 0, "X")  # what it serves


def test_with_every_step_full_there_is_nothing_to_choose_or_time(timed):
    calls, _ = timed
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    lines: list[str] = []
    every = prepare_key_steps(pipe, request("all"))
    assert choose_branch(pipe, every, lines.append) is every
    assert calls == []
    assert lines == ["Branch: auto: every step is a full step, so no branch runs; nothing to choose"]


def test_choose_branch_refuses_an_encoder_request_before_timing_anything(timed):
    calls, _ = timed
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    encoder = GenerationRequest(prompt="a red circle", width=32, height=32, faster=faster_config("uniform:3"))
    with pytest.raises(ValueError, match=r"^branch 'auto' applies to deep reuse only"):
        choose_branch(pipe, encoder)
    assert calls == []


def test_cli_branch_auto(tmp_path, monkeypatch, capsys, timed):
    _, costs = timed
    costs[2] = 0.9  # branch 2 affords no full step: only branch 1 is calibrated beside branch 0
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    argv = ["a red circle", "--out", str(tmp_path / "out"), "--sampler", "DPM-Solver-20"]
    assert main([*argv, "--branch", "auto", "--key-steps", "uniform:3"]) == 0
    out = capsys.readouterr().out
    assert "Branch: auto: branch 0 with 7 full steps [0, 2, 4, 8, 11, 14, 17]" in out
    assert "keeping branch 0 with the key steps asked for" in out
    assert "Key steps: uniform:3: 7 of 20 steps are key steps [0, 3, 6, 9, 12, 15, 18]" in out
    assert "7 full / 13 partial UNet passes" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--branch", "auto", "--mode", "encoder"], "error: --branch auto applies to deep reuse only"),
        (["--branch", "auto", "--forecast", "1"], "error: --branch auto predicts the error of copied"),
        (["--branch", "deep"], "argument --branch: must be a whole number >= 0 or 'auto', got 'deep'"),
    ],
)
def test_cli_branch_flags_that_do_not_fit_fail_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    try:
        code = main(["a red circle", "--out", str(tmp_path / "out"), *flags])
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_cog_choose_branch_runs_the_chosen_branch(timed, capsys):
    _, costs = timed
    costs[1] = costs[0]  # branch 1 wins (see above)
    model = TextToImage.load(reference.MODEL_DIR)
    outcome = model.generate(request(), choose_branch=True)
    assert "Key steps: depth choice at 7.9412 full passes, branch 1," in capsys.readouterr().out
    indices = outcome.faster.stats.schedule.indices
    assert len(indices) == 7 and outcome.faster.stats.full_passes == 7
    # The images are those of branch 1 at those steps, run directly.
    config = DeepReuseConfig(key_steps=KeySteps.explicit(indices), branch=1)
    direct = model.generate(dataclasses.replace(request(), faster=config))
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(outcome.images, direct.images, strict=True)
    )
    zero = DeepReuseConfig(key_steps=config.key_steps)  # the same steps at branch 0 give other images
    branch_zero = model.generate(dataclasses.replace(request(), faster=zero))
    assert not np.array_equal(np.asarray(outcome.images[0]), np.asarray(branch_zero.images[0]))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"mode": "encoder"}, "choose_branch applies to deep reuse only (mode deep)"),
        ({"branch": 2}, "choose_branch chooses the branch: leave branch at 0, got 2"),
        ({"image": True}, "choose_branch works for text-to-image only"),
        ({"forecast": True}, "choose_branch predicts the error of copied features"),
    ],
)
def test_cog_choose_branch_inputs_that_do_not_fit_fail_naming_the_input(inputs, message):
    given = {"mode": "deep", "branch": 0, "max_decoder_batch": 0, "choose_branch": True, **inputs}
    with pytest.raises(ValueError) as error:
        check_mode_inputs(**given)
    assert str(error.value).startswith(message)
    check_mode_inputs("deep", 0, 0, True)  # deep reuse, text-to-image, no forecast: served
