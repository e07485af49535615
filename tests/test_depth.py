"""The depth chooser (``faster_diffusion.depth``): full steps that fit a cost, the branch of least predicted
error with its calibrated placement, clear errors, and partial-step costs timed on the pipeline."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from faster_diffusion import (
    CalibrationError,
    DeepReuseConfig,
    apply_faster_diffusion,
    get_calibration,
    get_faster_diffusion,
)
from faster_diffusion.calibration import Calibration, optimal_key_steps, schedule_cost
from faster_diffusion.depth import DepthChoice, choose_depth, full_steps_within, measure_step_costs, run_cost

STEPS = 8


def test_full_steps_within_a_cost():
    # F + (N - F) p <= C: at p = 0.1 and N = 20, 6 full steps cost 7.4 and 5 cost 6.5.
    assert full_steps_within(7.3, 20, 0.1) == 5
    assert full_steps_within(7.4, 20, 0.1) == 6  # exactly at the cost
    assert full_steps_within(10.724, 20, 0.0724) == 10  # DeepCache:2's cost fits its own 10 full steps
    assert full_steps_within(100, 20, 0.5) == 20  # never more than the steps
    assert full_steps_within(1.5, 20, 0.5) == 0  # not even one
    assert full_steps_within(20, 20, 1.2) == 20 and full_steps_within(19, 20, 1.2) == 0
    for bad in (0, -1, math.nan, math.inf, True, "3"):
        with pytest.raises(ValueError, match="cost must be a positive number"):
            full_steps_within(bad, 20, 0.1)
        with pytest.raises(ValueError, match="partial must be a positive number"):
            full_steps_within(5, 20, bad)
    with pytest.raises(ValueError, match="num_steps must be a whole number >= 1, got 0"):
        full_steps_within(5, 0, 0.1)
    # run_cost is the inverse: the cost of F full steps fits F of them and not F + 1.
    assert run_cost(6, 20, 0.1) == pytest.approx(7.4)
    for partial in (0.0724, 0.1721, 0.3929):
        for full in range(1, 21):
            assert full_steps_within(run_cost(full, 20, partial), 20, partial) == full


def made_up(branch: int, scale: float, seed: int) -> Calibration:
    """A deep:B calibration with random costs times ``scale`` (no UNet involved)."""
    rng = np.random.default_rng(seed)
    matrix = tuple(tuple(float(v) * scale for v in row) for row in np.triu(rng.random((STEPS, STEPS)), 1))
    return Calibration(
        model="m",
        scheduler="s",
        num_steps=STEPS,
        criterion="prediction",
        cost=matrix,
        prompts=("a red circle",),
        seeds=(1,),
        guidance_scale=7.5,
        height=16,
        width=16,
        seconds=0.1,
        target=f"deep:{branch}",
    )


def test_choose_depth_takes_the_branch_of_least_predicted_error_with_its_placement(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    costs = {0: 0.1, 1: 0.3, 2: 0.5}
    # A deeper branch errs less per partial step; how much less decides whether its fewer full steps pay.
    calibrations = {0: made_up(0, 1.0, 0), 1: made_up(1, 0.5, 1), 2: made_up(2, 0.05, 2)}
    choice = choose_depth(pipe, 5.0, costs, num_inference_steps=STEPS, calibrations=calibrations)
    assert isinstance(choice, DepthChoice) and choice.budget == 5.0
    fulls = {c.branch: c.full_steps for c in choice.candidates}
    assert fulls == {0: 4, 1: 3, 2: 2}  # 4.4, 3.5 + ... within 5 full passes of 8 steps
    for c in choice.candidates:
        matrix = calibrations[c.branch].matrix
        assert c.indices == optimal_key_steps(matrix, c.full_steps)
        assert c.predicted == pytest.approx(schedule_cost(matrix, c.indices))
        assert c.cost == pytest.approx(c.full_steps + (STEPS - c.full_steps) * costs[c.branch])
        assert c.cost <= 5.0
    best = min(choice.candidates, key=lambda c: c.predicted)
    assert choice.branch == best.branch == 2 and choice.chosen is best
    assert choice.key_steps.indices == best.indices
    assert choice.key_steps.origin.startswith(
        "depth choice at 5 full passes, branch 2, calibrated by prediction"
    )
    assert choice.config(forecast=1) == DeepReuseConfig(key_steps=choice.key_steps, branch=2, forecast=1)
    assert choice.describe().startswith(f"branch 2 with 2 full steps {list(best.indices)} at 5 full passes")
    # With the deeper branches as error-prone as branch 0, its extra full steps win; a tie goes shallower.
    same = {b: made_up(b, 1.0, 0) for b in costs}
    assert choose_depth(pipe, 5.0, costs, num_inference_steps=STEPS, calibrations=same).branch == 0
    ties = {0: 0.1, 1: 0.1}
    assert choose_depth(pipe, 5.0, ties, num_inference_steps=STEPS, calibrations=same).branch == 0
    # A branch that affords no full step is compared as such, never picked.
    tight = choose_depth(pipe, 2.0, costs, num_inference_steps=STEPS, calibrations=calibrations)
    assert [(c.branch, c.full_steps, c.predicted) for c in tight.candidates][1:] == [
        (1, 0, math.inf),
        (2, 0, math.inf),
    ]
    assert tight.branch == 0 and "b2: none fits" in tight.describe()


def test_choose_depth_runs_on_the_model_s_own_calibrations(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    with pytest.raises(CalibrationError) as error:
        choose_depth(pipe, 4.0, {0: 0.1, 1: 0.3}, num_inference_steps=STEPS)
    message = str(error.value)
    assert "no deep:B calibration of this model for branches [0, 1] with 8 steps" in message
    assert "calibrate(pipe, num_inference_steps=8, target='deep:1', criterion='prediction')" in message
    for branch in (0, 1):
        get_calibration(
            pipe, num_inference_steps=STEPS, target=f"deep:{branch}", prompts=["a red circle"], save=False
        )
    choice = choose_depth(pipe, 4.0, {0: 0.1, 1: 0.3}, num_inference_steps=STEPS)
    with apply_faster_diffusion(pipe, choice.config()) as handle:
        pipe("a red circle", num_inference_steps=STEPS, output_type="latent")
        assert handle.last_run.schedule.indices == choice.chosen.indices
        assert handle.last_run.full_passes == choice.chosen.full_steps


BAD_INPUT = [
    ({"cost": 0}, ValueError, "cost must be a positive number, got 0"),
    ({"step_costs": {}}, ValueError, "step_costs must map branches to partial-step costs, got {}"),
    ({"step_costs": {9: 0.1}}, ValueError, "step_costs: a branch must be a whole number from 0 to 5, got 9"),
    ({"step_costs": {0: -0.1}}, ValueError, "step_costs[0] must be a positive number, got -0.1"),
    ({"num_inference_steps": 1}, ValueError, "num_inference_steps must be a whole number >= 2, got 1"),
    ({"cost": 1.2}, ValueError, "cost 1.2 fits no full step of any branch compared; the least is 1.7"),
    ({"calibrations": {0: "x"}}, TypeError, "calibrations[0] must be a Calibration, got str"),
    ("of branch 1", CalibrationError, "is a calibration of deep:1 for 8 steps, not of deep:0 for 8"),
    ("of feature alone", CalibrationError, "did not measure the 'prediction' criterion"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_INPUT)
def test_choose_depth_refuses_bad_input_clearly(make_pipe, change, error, message):
    pipe = make_pipe("DPM-Solver-20")
    given = {"cost": 5.0, "step_costs": {0: 0.1}, "num_inference_steps": STEPS}
    own = made_up(0, 1.0, 0)
    if change == "of branch 1":
        change = {"calibrations": {0: made_up(1, 1.0, 0)}}
    elif change == "of feature alone":
        change = {"calibrations": {0: dataclasses.replace(own, criterion="feature")}}
    with pytest.raises(error, match=re.escape(message)):
        choose_depth(pipe, **{**given, "calibrations": {0: own}, **change})


def test_measure_step_costs_times_each_branch_and_leaves_the_pipeline_stock(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    costs = measure_step_costs(pipe, branches=[0, 3], num_inference_steps=3, repeats=1)
    assert list(costs) == [0, 3] and all(isinstance(p, float) and p > 0 for p in costs.values())
    assert get_faster_diffusion(pipe) is None
    assert not any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in pipe.unet.modules())
    for bad in ([], [6], [True], [-1]):
        with pytest.raises(ValueError, match="branches must be whole numbers from 0 to 5"):
            measure_step_costs(pipe, branches=bad)
    with pytest.raises(ValueError, match="repeats must be a whole number >= 1, got 0"):
        measure_step_costs(pipe, repeats=0)
    with pytest.raises(ValueError, match="num_inference_steps must be a whole number >= 2, got 1"):
        measure_step_costs(pipe, num_inference_steps=1)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        measure_step_costs(pipe, batch_size=0)
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    measure_step_costs(pipe, branches=[0], num_inference_steps=2, repeats=1, batch_size=3)
    hook.remove()
    assert set(batches) == {6}  # 3 images a call, with their unconditional halves
    with (
        apply_faster_diffusion(pipe, DeepReuseConfig()),
        pytest.raises(RuntimeError, match="faster diffusion is attached to this pipeline"),
    ):
        measure_step_costs(pipe)
