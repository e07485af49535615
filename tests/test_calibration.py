"""Calibrated key steps (``faster_diffusion.calibration``, ``key_steps="auto"``): the optimiser is exact, the
measured costs are what they claim to be, calibrations are deterministic and saved and found by their key,
and an ``auto`` run either uses the calibration or stops before the UNet runs."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import warnings

import numpy as np
import pytest
import torch

from faster_diffusion import (
    CalibrationError,
    CalibrationFallbackWarning,
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    apply_faster_diffusion,
    calibrate,
    get_calibration,
    get_faster_diffusion,
    make_scheduler,
    reference,
    use_sampler,
)
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.calibration import (
    CALIBRATION_FILE,
    FILE_VERSION,
    Calibration,
    find_calibration,
    load_calibrations,
    measure_costs,
    model_fingerprint,
    optimal_key_steps,
    prompts_per_run_for,
    same_weights,
    save_calibration,
    schedule_cost,
    scheduler_key,
    scheduler_timesteps,
    weight_probe,
    weights_folder,
)
from faster_diffusion.policy import parse_key_steps
from faster_diffusion.reference import shapes
from faster_diffusion.schedule import KeyStepError, KeyStepKind, fallback_interval, paper_key_steps
from fixtures.tiny import save_tiny_weights

from .conftest import ROUNDING, generate_latents

PROMPTS = ("a red circle above a blue square", "a small green star on the sea")
SEEDS = (90_000, 90_001)
GUIDANCE = 7.5
STEPS = 8


# ------------------------------------------------------------------------------------------ the optimiser


def brute_force(cost: np.ndarray, budget: int) -> tuple[float, tuple[int, ...]]:
    """The least cost and the first key set (in lexicographic order) that reaches it, over every key set of
    ``budget`` steps that contains 0: each non-key step pays ``cost[latest key step before it, step]``."""
    n = len(cost)
    best: tuple[float, tuple[int, ...]] | None = None
    for rest in itertools.combinations(range(1, n), budget - 1):
        keys = (0, *rest)
        total, latest = 0.0, 0
        for j in range(n):
            if j in keys:
                latest = j
            else:
                total += cost[latest, j]
        if best is None or total < best[0] - 1e-12:
            best = (total, keys)
    return best


@pytest.mark.parametrize("n", range(1, 10))
def test_optimal_key_steps_equals_a_brute_force_for_every_budget(n):
    for seed in range(4):
        cost = np.triu(np.random.default_rng(100 * n + seed).random((n, n)), 1)
        for budget in range(1, n + 1):
            least, brute_keys = brute_force(cost, budget)
            keys = optimal_key_steps(cost, budget)
            assert keys == brute_keys, (n, seed, budget)
            assert len(keys) == budget and keys[0] == 0
            assert schedule_cost(cost, keys) == pytest.approx(least, abs=1e-12)


def test_budget_of_every_step_and_of_one_step():
    cost = np.triu(np.random.default_rng(7).random((6, 6)), 1)
    assert optimal_key_steps(cost, 6) == (0, 1, 2, 3, 4, 5)
    assert schedule_cost(cost, range(6)) == 0.0
    assert optimal_key_steps(cost, 1) == (0,)
    assert schedule_cost(cost, (0,)) == pytest.approx(cost[0].sum())


@pytest.mark.parametrize("budget", [0, 7, 2.5, True])
def test_bad_budget_raises_naming_it(budget):
    cost = np.triu(np.ones((6, 6)), 1)
    with pytest.raises(CalibrationError, match=re.escape(f"from 1 to 6, got {budget!r}")):
        optimal_key_steps(cost, budget)


def test_ties_break_deterministically_to_the_earliest_steps():
    zero = np.zeros((7, 7))
    assert optimal_key_steps(zero, 3) == (0, 1, 2)
    assert optimal_key_steps(zero, 5) == (0, 1, 2, 3, 4)
    # Equal costs everywhere: any placement with the same number of paid steps ties; the earliest wins.
    flat = np.triu(np.ones((5, 5)), 1)
    assert optimal_key_steps(flat, 2) == (0, 1)
    # The last step is dear to serve from any other, so it is a key step; the middle key ties everywhere.
    flat[:, 4] = 100.0
    assert optimal_key_steps(flat, 3) == (0, 1, 4)


# ------------------------------------------------------------------------------------ what is measured


def unet_outputs(pipe, config: FasterDiffusionConfig | None = None) -> list[torch.Tensor]:
    """The noise prediction of every UNet call of one run of :data:`PROMPTS` (stock, or with ``config``)."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        outputs.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    handle = apply_faster_diffusion(pipe, config) if config is not None else None
    hook = pipe.unet.register_forward_hook(keep)
    try:
        with torch.inference_mode():
            pipe(
                list(PROMPTS),
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                output_type="latent",
            )
    finally:
        hook.remove()
        if handle is not None:
            handle.remove()
    return outputs


def guided_relative_error(fast: torch.Tensor, stock: torch.Tensor) -> float:
    """Mean over images of ||eps_fast - eps_stock|| / ||eps_stock||, on the guided prediction (unconditional
    rows first, as diffusers' pipelines batch them)."""

    def guided(prediction):
        uncond, cond = prediction.double().chunk(2)
        return (uncond + GUIDANCE * (cond - uncond)).flatten(1)

    fast, stock = guided(fast), guided(stock)
    return float(((fast - stock).norm(dim=1) / stock.norm(dim=1)).mean())


def measure(pipe, **kwargs):
    return measure_costs(
        pipe,
        num_inference_steps=STEPS,
        prompts=PROMPTS,
        seeds=SEEDS,
        guidance_scale=GUIDANCE,
        height=16,
        width=16,
        **kwargs,
    )


@pytest.mark.parametrize(("sampler", "j"), [("DDIM-50", 3), ("DPM-Solver++-20", 6)])
def test_prediction_cost_is_the_error_of_a_propagation_run_at_its_first_non_key_step(make_pipe, sampler, j):
    pipe = make_pipe(sampler, dtype=torch.float64)  # a replay batch and a run's call agree up to rounding
    costs = measure(pipe)
    stock = unet_outputs(pipe)
    # Every step before j is a key step, so the trajectory is stock's up to j and the prediction at j is the
    # decoder of j on step j-1's encoder outputs: exactly what cost[j-1, j] charges.
    keys = KeySteps.explicit(i for i in range(STEPS) if i != j)
    off = NoiseInjection(enabled=False)
    config = FasterDiffusionConfig(key_steps=keys, parallel=False, noise_injection=off)
    fast = unet_outputs(pipe, config)
    assert len(stock) == len(fast) == STEPS
    for i in range(j):
        torch.testing.assert_close(fast[i], stock[i], rtol=0, atol=0)
    error = guided_relative_error(fast[j], stock[j])
    assert error > 1e-4
    assert costs["prediction"][j - 1, j] == pytest.approx(error, rel=ROUNDING["rtol"])


def final_latents(pipe, config: FasterDiffusionConfig | None = None) -> torch.Tensor:
    """The final latents of one run of :data:`PROMPTS` (stock, or with ``config``)."""
    handle = apply_faster_diffusion(pipe, config) if config is not None else None
    try:
        with torch.inference_mode():
            return pipe(
                list(PROMPTS),
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                height=16,
                width=16,
                generator=[torch.Generator().manual_seed(s) for s in SEEDS],
                output_type="latent",
            ).images
    finally:
        if handle is not None:
            handle.remove()


def relative_error(fast: torch.Tensor, stock: torch.Tensor) -> float:
    """Mean over images of ||fast - stock|| / ||stock||."""
    fast, stock = fast.double().flatten(1), stock.double().flatten(1)
    return float(((fast - stock).norm(dim=1) / stock.norm(dim=1)).mean())


@pytest.mark.parametrize(("sampler", "j"), [("DDIM-50", 2), ("DPM-Solver++-20", 5), ("DPM-Solver-20", 7)])
def test_final_cost_is_the_final_latent_error_of_a_run_that_reuses_features_at_one_step(
    make_pipe, sampler, j
):
    pipe = make_pipe(sampler, dtype=torch.float64)  # a replay batch and a run's call agree up to rounding
    final = measure(pipe, criteria=("final",))["final"]
    stock = final_latents(pipe)
    # Every step but j is a key step: step j's decoder reads step j-1's encoder outputs, every other step is
    # a full UNet call on the (changed, from j+1 on) latents. Its final latents are what cost[j-1, j] charges.
    keys = KeySteps.explicit(i for i in range(STEPS) if i != j)
    config = FasterDiffusionConfig(
        key_steps=keys, parallel=False, noise_injection=NoiseInjection(enabled=False)
    )
    error = relative_error(final_latents(pipe, config), stock)
    assert error > 1e-4
    assert final[j - 1, j] == pytest.approx(error, rel=ROUNDING["rtol"])


def test_final_cost_of_the_last_step_is_its_prediction_error_through_one_ddim_step(make_pipe):
    # Nothing runs after the last step: DDIM (eta 0) maps its prediction to the final latent linearly,
    # x_final = sqrt(a') (x - sqrt(1 - a) eps) / sqrt(a) + sqrt(1 - a') eps, a and a' the alphas of the last
    # timestep and of the end. So the final latent moves c = |sqrt(1 - a') - sqrt(a') sqrt(1 - a) / sqrt(a)|
    # times the prediction's change: final = prediction x c ||eps|| / ||x_final||, for one image exactly.
    pipe = make_pipe("DDIM-50")
    costs = measure_costs(
        pipe,
        num_inference_steps=STEPS,
        prompts=PROMPTS[:1],
        seeds=SEEDS[:1],
        guidance_scale=GUIDANCE,
        height=16,
        width=16,
        criteria=("prediction", "final"),
    )
    eps, x_final = None, None
    outputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_hook(
        lambda m, a, out: outputs.append(out[0] if isinstance(out, tuple) else out.sample)
    )
    try:
        with torch.inference_mode():
            x_final = pipe(
                PROMPTS[0],
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                height=16,
                width=16,
                generator=torch.Generator().manual_seed(SEEDS[0]),
                output_type="latent",
            ).images.double()
    finally:
        hook.remove()
    uncond, cond = outputs[-1].double().chunk(2)
    eps = uncond + GUIDANCE * (cond - uncond)
    scheduler = pipe.scheduler
    a = scheduler.alphas_cumprod[int(scheduler.timesteps[-1])].double()
    a_end = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    c = abs(float((1 - a_end).sqrt() - a_end.sqrt() * (1 - a).sqrt() / a.sqrt()))
    last = STEPS - 1
    expected = costs["prediction"][:last, last] * c * float(eps.norm() / x_final.norm())
    assert np.all(expected > 1e-6)
    np.testing.assert_allclose(costs["final"][:last, last], expected, rtol=1e-3)


def test_final_costs_are_zero_when_the_encoder_outputs_never_change(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    with torch.no_grad():
        for module in (pipe.unet.conv_in, *pipe.unet.time_embedding.children()):
            for parameter in module.parameters():
                parameter.zero_()
    # One copy per run (the stock call's batch of 4 rows): the replayed call is the stock call.
    assert np.all(measure(pipe, criteria=("final",), max_rows=4)["final"] == 0.0)


def encoder_features(pipe) -> list[list[torch.Tensor]]:
    """Each step's encoder outputs (conv_in, down blocks, mid block; every distinct tensor) in a stock run."""
    unet = pipe.unet
    modules = [unet.conv_in, *unet.down_blocks, unet.mid_block]
    steps: list[list[torch.Tensor]] = [[] for _ in modules]

    def flat(value):
        if isinstance(value, torch.Tensor):
            return [value]
        found: dict[int, torch.Tensor] = {}
        for item in value:
            for tensor in flat(item):
                found.setdefault(id(tensor), tensor)
        return list(found.values())

    hooks = [
        module.register_forward_hook(lambda m, a, out, slot=slot: steps[slot].append(flat(out)))
        for slot, module in enumerate(modules)
    ]
    try:
        unet_outputs(pipe)
    finally:
        for hook in hooks:
            hook.remove()
    return [[t for slot in range(len(modules)) for t in steps[slot][i]] for i in range(STEPS)]


def test_feature_cost_is_the_relative_distance_of_the_encoder_outputs(make_pipe):
    pipe = make_pipe("DDIM-50")
    feature = measure(pipe, criteria=("feature",))["feature"]
    features = encoder_features(pipe)

    def rows(tensors):
        return torch.cat([t.double().flatten(1) for t in tensors], dim=1)

    for j in range(STEPS):
        for k in range(STEPS):
            if k >= j:
                assert feature[k, j] == 0.0
                continue
            a, b = rows(features[j]), rows(features[k])
            expected = float(((a - b).norm(dim=1) / a.norm(dim=1)).mean())
            assert expected > 0
            assert feature[k, j] == pytest.approx(expected, rel=1e-6)


def test_both_costs_are_zero_when_the_encoder_outputs_never_change(make_pipe):
    # No input and no time: with conv_in and the time embedding zeroed, the encoder sees the same thing at
    # every step, so reusing any step's features is free, by either criterion.
    pipe = make_pipe("DDIM-50")
    with torch.no_grad():
        for module in (pipe.unet.conv_in, *pipe.unet.time_embedding.children()):
            for parameter in module.parameters():
                parameter.zero_()
    costs = measure(pipe)
    assert np.all(costs["feature"] == 0.0)
    # Replaying several key steps in one batch rounds a little differently from the stock call...
    assert np.all(costs["prediction"] < 1e-5)
    # ...replaying one at a time (the stock call's batch of 4 rows) is the stock call.
    assert np.all(measure(pipe, criteria=("prediction",), max_rows=4)["prediction"] == 0.0)


def test_calibration_is_deterministic_and_leaves_the_pipeline_stock(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    before = generate_latents(pipe, steps=STEPS)
    first = get_calibration(pipe, num_inference_steps=STEPS, prompts=PROMPTS[:1], force=True, save=False)
    second = get_calibration(pipe, num_inference_steps=STEPS, prompts=PROMPTS[:1], force=True, save=False)
    assert first is not second
    assert first.cost == second.cost
    assert first.other == second.other
    assert first.matrix[0, 1] > 0
    assert not pipe.unet.conv_in._diffusers_hook.hooks
    torch.testing.assert_close(generate_latents(pipe, steps=STEPS), before, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- saving and finding


def made_up(
    model="m" * 16, scheduler="DDIMScheduler", num_steps=4, seed=0, probe=(), timesteps=()
) -> Calibration:
    """A calibration with random costs of many digits (no UNet involved)."""
    rng = np.random.default_rng(seed)

    def matrix():
        return tuple(tuple(float(v) for v in row) for row in np.triu(rng.random((num_steps, num_steps)), 1))

    return Calibration(
        model=model,
        scheduler=scheduler,
        num_steps=num_steps,
        criterion="prediction",
        cost=matrix(),
        prompts=("a red circle",),
        seeds=(90_000,),
        guidance_scale=7.5,
        height=16,
        width=16,
        seconds=1.23456,
        other={"feature": matrix()},
        probe=tuple(probe),
        timesteps=tuple(timesteps),
    )


def test_save_then_load_round_trips_the_rounded_values(tmp_path):
    calibration = made_up()
    file = save_calibration(calibration, tmp_path)
    assert file == tmp_path / CALIBRATION_FILE
    (loaded,) = load_calibrations(tmp_path)
    assert loaded.cost == tuple(tuple(float(f"{v:.6g}") for v in row) for row in calibration.cost)
    assert loaded.other["feature"] == tuple(
        tuple(float(f"{v:.6g}") for v in row) for row in calibration.other["feature"]
    )
    assert (loaded.model, loaded.scheduler, loaded.num_steps, loaded.prompts, loaded.seeds) == (
        calibration.model,
        calibration.scheduler,
        calibration.num_steps,
        calibration.prompts,
        calibration.seeds,
    )
    for budget in range(1, 5):
        assert loaded.indices(budget) == calibration.indices(budget)
    assert load_calibrations(tmp_path / "empty") == []


def test_saving_a_second_key_keeps_the_first_and_the_same_key_replaces_it(tmp_path):
    first, second = made_up(num_steps=4), made_up(num_steps=5)
    save_calibration(first, tmp_path)
    save_calibration(second, tmp_path)
    assert [c.num_steps for c in load_calibrations(tmp_path)] == [4, 5]
    again = made_up(num_steps=4, seed=1)
    save_calibration(again, tmp_path)
    loaded = {c.num_steps: c for c in load_calibrations(tmp_path)}
    assert len(load_calibrations(tmp_path)) == 2 and sorted(loaded) == [4, 5]
    assert loaded[4].cost == tuple(tuple(float(f"{v:.6g}") for v in row) for row in again.cost)
    assert not (tmp_path / (CALIBRATION_FILE + ".partial")).exists()


def write_file(folder, data) -> str:
    file = folder / CALIBRATION_FILE
    file.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(file)


@pytest.mark.parametrize(
    "data",
    [
        "{not json",
        [],
        {"version": FILE_VERSION},
        {"version": FILE_VERSION + 1, "calibrations": []},
        {"version": FILE_VERSION, "calibrations": 5},
        {"version": FILE_VERSION, "calibrations": [{"model": "m"}]},
        {"version": FILE_VERSION, "calibrations": ["text"]},
        {"version": FILE_VERSION, "calibrations": [{**made_up().to_json(), "cost": [[0.0]]}]},
        {"version": FILE_VERSION, "calibrations": [{**made_up().to_json(), "criterion": "guess"}]},
    ],
    ids=[
        "not-json",
        "list",
        "no-entries",
        "version",
        "entries-not-a-list",
        "no-fields",
        "text-entry",
        "bad-shape",
        "bad-criterion",
    ],
)
def test_a_malformed_or_wrong_version_file_raises_naming_it(tmp_path, data):
    file = write_file(tmp_path, data)
    with pytest.raises(CalibrationError, match=re.escape(file)):
        load_calibrations(tmp_path)


def corrupt(folder, entry, matrix, k, j, value) -> str:
    """Write ``value`` (NaN or infinite) at ``[k][j]`` of a matrix of ``folder``'s saved calibration number
    ``entry``: ``"cost"`` or the name of a criterion in ``other``. JSON gets it as ``NaN`` or ``Infinity``,
    which Python's json module writes and reads."""
    file = folder / CALIBRATION_FILE
    data = json.loads(file.read_text(encoding="utf-8"))
    saved = data["calibrations"][entry]
    (saved["cost"] if matrix == "cost" else saved["other"][matrix])[k][j] = value
    file.write_text(json.dumps(data), encoding="utf-8")
    return str(file)


@pytest.mark.parametrize(
    ("matrix", "value", "described"),
    [
        ("cost", float("nan"), "the 'prediction' cost matrix has 1 value that is not finite: "),
        ("feature", float("inf"), "the 'feature' cost matrix has 1 value that is not finite: "),
        ("feature", float("-inf"), "the 'feature' cost matrix has 1 value that is not finite: "),
    ],
    ids=["nan-cost", "inf-other", "minus-inf-other"],
)
def test_a_saved_calibration_with_costs_that_are_not_finite_is_refused_naming_the_file(
    tmp_path, matrix, value, described
):
    """One calibration of several in the file is bad: the file is refused, as a malformed one is, naming the
    file, the calibration, the matrix and where; a new calibration is not saved over it either."""
    save_calibration(made_up(num_steps=4), tmp_path)
    save_calibration(made_up(num_steps=5), tmp_path)
    file = corrupt(tmp_path, 1, matrix, 1, 3, value)
    where = f"cost[1][3] = {value}"
    with pytest.raises(CalibrationError) as error:
        load_calibrations(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{file} cannot be read (calibration 2 of 2, DDIMScheduler with 5 steps: ")
    assert described + where in message and message.endswith("delete it to calibrate again")
    before = (tmp_path / CALIBRATION_FILE).read_text(encoding="utf-8")
    with pytest.raises(CalibrationError, match=re.escape(file)):
        save_calibration(made_up(num_steps=6), tmp_path)
    assert (tmp_path / CALIBRATION_FILE).read_text(encoding="utf-8") == before


def test_costs_that_are_not_finite_are_refused_by_the_calibration_and_the_optimiser():
    good = made_up(num_steps=5)
    cost = [list(row) for row in good.cost]
    cost[0][2], cost[1][4], cost[2][3] = float("nan"), float("inf"), float("nan")
    with pytest.raises(CalibrationError) as error:
        dataclasses.replace(good, cost=tuple(tuple(row) for row in cost))
    assert str(error.value) == (
        "the 'prediction' cost matrix has 3 values that are not finite: cost[0][2] = nan, cost[1][4] = inf, "
        "cost[2][3] = nan"
    )
    expected = "cost must be finite numbers >= 0 whose sum is finite; it has 3 values that are not"
    with pytest.raises(ValueError, match=re.escape(expected)):
        optimal_key_steps(np.array(cost), 2)


@pytest.mark.parametrize(
    ("value", "described"),
    [
        (1e308, "the 'prediction' cost matrix has values too large to add up (their sum overflows): the "),
        (-0.5, "the 'prediction' cost matrix has 1 value that is negative: cost[1][3] = -0.5"),
    ],
    ids=["huge", "negative"],
)
def test_a_saved_calibration_with_finite_but_unusable_costs_is_refused_when_it_is_loaded(
    tmp_path, value, described
):
    """Costs that are finite but so large that the optimiser's sums overflow (1e308), or negative (a cost is
    an error, never below 0), are refused when the file is read, naming the file, the calibration and the
    matrix, instead of placing the same step again and again later."""
    good = made_up(num_steps=5)
    save_calibration(good, tmp_path)
    file = tmp_path / CALIBRATION_FILE
    data = json.loads(file.read_text(encoding="utf-8"))
    saved = data["calibrations"][0]
    if value > 0:
        saved["cost"] = [[0.0 if j <= k else value for j in range(5)] for k in range(5)]
    else:
        saved["cost"][1][3] = value
    file.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(CalibrationError) as error:
        load_calibrations(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{file} cannot be read (calibration 1 of 1, DDIMScheduler with 5 steps: ")
    assert described in message and message.endswith("delete it to calibrate again")
    huge = np.triu(np.full((5, 5), 1e308), 1)
    with pytest.raises(ValueError, match=re.escape("too large to add up")):
        optimal_key_steps(huge, 3)


@pytest.fixture
def saved_pipe(tmp_path):
    """A tiny pipeline loaded from a folder, so its calibrations are saved and found there."""
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    pipe = load_pipeline(folder, device="cpu", safety_checker=False)
    use_sampler(pipe, "DDIM-50")
    assert weights_folder(pipe) == folder
    return pipe


def test_find_calibration_ignores_entries_of_another_model_scheduler_or_step_count(saved_pipe):
    pipe = saved_pipe
    folder = weights_folder(pipe)
    model, key = model_fingerprint(pipe.unet), scheduler_key(pipe.scheduler)
    probe = weight_probe(pipe.unet)
    steps = {4: scheduler_timesteps(pipe.scheduler, 4), 5: scheduler_timesteps(pipe.scheduler, 5)}
    assert key.startswith("DDIMScheduler,")
    dpm = scheduler_key(use_sampler_copy(pipe, "DPM-Solver-20"))
    for other in (
        made_up(model="0" * 16, scheduler=key, num_steps=4, probe=probe, timesteps=steps[4]),
        made_up(model=model, scheduler=dpm, num_steps=4, probe=probe, timesteps=steps[4]),
        made_up(model=model, scheduler=key, num_steps=5, probe=probe, timesteps=steps[5]),
    ):
        save_calibration(other, folder)
    assert find_calibration(pipe, 4) is None
    # The same key with other weights (a fine-tune of the same architecture) replaces nothing it should not:
    # saved under the same key, it is found only if its weights are the pipeline's.
    save_calibration(
        made_up(model=model, scheduler=key, num_steps=4, probe=[v + 1.0 for v in probe], timesteps=steps[4]),
        folder,
    )
    assert find_calibration(pipe, 4) is None
    right = made_up(model=model, scheduler=key, num_steps=4, seed=3, probe=probe, timesteps=steps[4])
    save_calibration(right, folder)
    found = find_calibration(pipe, 4)
    assert found is not None and found.indices(2) == right.indices(2)
    assert len(load_calibrations(folder)) == 4


def test_a_run_s_search_for_its_calibration_refuses_a_file_with_costs_that_are_not_finite(saved_pipe):
    """Not skipped, nor used: the search stops with the file's name, as it does for a malformed file."""
    folder = weights_folder(saved_pipe)
    save_calibration(made_up(num_steps=4), folder)
    file = corrupt(folder, 0, "cost", 0, 2, float("nan"))
    with pytest.raises(CalibrationError, match=re.escape(f"{file} cannot be read (calibration 1 of 1")):
        find_calibration(saved_pipe, 4)


def use_sampler_copy(pipe, sampler):
    """The scheduler ``sampler`` would give ``pipe``, leaving ``pipe`` as it is."""
    from faster_diffusion.samplers import scheduler_config_of

    return make_scheduler(sampler, scheduler_config_of(pipe))


def test_calibrate_saves_next_to_the_weights_and_a_new_process_finds_it(saved_pipe):
    pipe = saved_pipe
    keys = calibrate(pipe, budget=3, num_inference_steps=STEPS, prompts=PROMPTS[:1])
    folder = weights_folder(pipe)
    (saved,) = load_calibrations(folder)
    assert keys.indices == saved.indices(3)
    # A fresh load of the same folder (nothing registered for its UNet) finds the saved one.
    again = load_pipeline(folder, device="cpu", safety_checker=False)
    use_sampler(again, "DDIM-50")
    found = find_calibration(again, STEPS)
    assert found is not None and found.indices(3) == keys.indices


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_measured_costs_that_are_not_finite_are_refused_before_anything_is_saved(
    saved_pipe, monkeypatch, value
):
    """An overflow in half precision during the measurement gives NaN or infinite costs: nothing is saved or
    registered, and the message says what to do."""
    from faster_diffusion import calibration as module

    def overflowing(pipe, *, num_inference_steps, criteria, **options):
        costs = {c: np.triu(np.full((num_inference_steps,) * 2, 0.5), 1) for c in criteria}
        costs[criteria[0]][2, 5] = value
        return costs

    monkeypatch.setattr(module, "measure_costs", overflowing)
    pipe = saved_pipe
    with pytest.raises(CalibrationError) as error:
        calibrate(pipe, budget=5, num_inference_steps=STEPS, prompts=PROMPTS[:1])
    message = str(error.value)
    assert message.startswith(
        f"calibrate: the costs measured for DDIMScheduler with {STEPS} steps cannot be used (the 'feature' "
        f"cost matrix has 1 value that is not finite: cost[2][5] = {value}); nothing was saved"
    )
    assert "float16" in message and "float32" in message
    assert not (weights_folder(pipe) / CALIBRATION_FILE).exists()
    assert find_calibration(pipe, STEPS) is None


def test_the_same_weights_are_recognised_in_fp16_and_bf16_and_changed_weights_are_not(make_pipe):
    unet = make_pipe().unet
    fingerprint, probe = model_fingerprint(unet), weight_probe(unet)
    for dtype in (torch.float16, torch.bfloat16):
        cast = copy.deepcopy(unet).to(dtype)
        assert model_fingerprint(cast) == fingerprint
        assert same_weights(weight_probe(cast), probe)
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        changed.conv_in.weight[0, 0, 0, 0] += 0.5
    assert model_fingerprint(changed) == fingerprint  # the same architecture ...
    assert not same_weights(weight_probe(changed), probe)  # ... other weights
    assert not same_weights(weight_probe(make_pipe(seed=1).unet), probe)


def test_model_fingerprint_of_saved_weights_is_that_of_the_model(saved_pipe, make_pipe):
    assert model_fingerprint(saved_pipe.unet) == model_fingerprint(make_pipe().unet)
    assert same_weights(weight_probe(saved_pipe.unet), weight_probe(make_pipe().unet))


# ---------------------------------------------------------------------------------------- the auto path


def test_parse_auto_forms():
    assert KeySteps.parse("auto") == KeySteps.auto()
    assert KeySteps.parse(" AUTO:5 ") == KeySteps.auto(5)
    assert KeySteps.parse("auto:5").kind is KeyStepKind.AUTO
    for steps in (KeySteps.auto(), KeySteps.auto(5)):
        assert KeySteps.parse(str(steps)) == steps
    assert str(KeySteps.auto(5)) == "auto:5"
    with pytest.raises(KeyStepError, match=r"'auto:0'.*auto budget must be a whole number >= 1, got '0'"):
        KeySteps.parse("auto:0")
    with pytest.raises(KeyStepError, match=r"'auto:x'.*auto budget must be a whole number >= 1, got 'x'"):
        KeySteps.parse("auto:x")
    for budget in (0, True, 2.5):
        with pytest.raises(KeyStepError, match=re.escape(f"got {budget!r}")):
            KeySteps.auto(budget)


def test_auto_names_the_criterion_it_reads_the_calibration_with():
    """``auto:B@C`` (and ``auto@C``) reads the calibration with criterion C; the text round-trips."""
    assert KeySteps.parse("auto:6@feature") == KeySteps.auto(6, "feature")
    assert KeySteps.parse(" AUTO = 6 @ Prediction ") == KeySteps.auto(6, "prediction")
    assert KeySteps.parse("auto@feature") == KeySteps.auto(None, "feature")
    for steps in (KeySteps.auto(6, "feature"), KeySteps.auto(None, "final")):
        assert KeySteps.parse(str(steps)) == steps
    assert (str(KeySteps.auto(6, "feature")), str(KeySteps.auto(criterion="final"))) == (
        "auto:6@feature",
        "auto@final",
    )
    assert KeySteps.auto(6, "feature") != KeySteps.auto(6)
    for text, message in [
        ("auto:6@", "after '@' comes a criterion such as 'feature', got ''"),
        ("auto:6@feat!", "after '@' comes a criterion such as 'feature', got 'feat!'"),
        ("auto:0@feature", "the auto budget must be a whole number >= 1, got '0'"),
    ]:
        with pytest.raises(KeyStepError, match=re.escape(message)):
            KeySteps.parse(text)
    with pytest.raises(KeyStepError, match="only 'auto' key steps are read with a criterion"):
        KeySteps(KeyStepKind.UNIFORM, every=3, criterion="feature")
    with pytest.raises(KeyStepError, match="a criterion is a lowercase name such as 'feature', got 3"):
        KeySteps.auto(6, 3)
    # The policy's parser knows the criteria calibration measures, so a typo fails before anything runs.
    assert parse_key_steps("auto:6@feature") == KeySteps.auto(6, "feature")
    with pytest.raises(KeyStepError, match=r"unknown criterion 'featur'; the criteria are .*feature"):
        parse_key_steps("auto:6@featur")


def test_a_criterion_places_the_key_steps_by_that_criterion_s_costs():
    """``placed_by`` reads the calibration with the criterion asked for; one it did not measure is a clear
    error that says how to get it. The echo names a criterion that is not the target's default."""
    calibration = made_up(num_steps=STEPS)  # read with prediction, feature measured too; target encoder
    prediction, feature = KeySteps.auto(3, "prediction"), KeySteps.auto(3, "feature")
    assert (
        prediction.placed_by(calibration) is calibration
        and KeySteps.auto(3).placed_by(calibration) is calibration
    )
    assert feature.placed_by(calibration).criterion == "feature"
    by_feature = calibration.with_criterion("feature").indices(3)
    assert by_feature != calibration.indices(3)  # the two criteria place differently here
    assert feature.resolve(STEPS, calibration).indices == by_feature
    assert prediction.resolve(STEPS, calibration).indices == calibration.indices(3)
    assert feature.resolve(STEPS, calibration).describe().startswith("auto:3, calibrated by feature error")
    echo = prediction.resolve(STEPS, calibration).describe()
    assert echo.startswith("auto:3@prediction, calibrated by prediction error")
    alone = dataclasses.replace(calibration, other={})
    with pytest.raises(
        CalibrationError, match=re.escape("measured the criteria ['prediction'], not 'feature'")
    ):
        feature.resolve(STEPS, alone)


def count_unet_calls(pipe) -> list[int]:
    calls = [0]

    def count(module, args):
        calls[0] += 1

    pipe.unet.register_forward_pre_hook(count)
    return calls


def test_auto_without_a_calibration_runs_its_fallback_says_so_once_and_how_to_calibrate(make_pipe):
    """The rule of benchmarks/README.md, "The first call without a calibration": ``auto`` on a model with no
    calibration for the run runs DeepCache's uniform interval with at least the budget's key steps, bit for
    bit the same as that interval asked for explicitly, and warns once, naming the call that calibrates."""
    pipe = make_pipe("DDIM-50")
    budget = 3
    every = fallback_interval(STEPS, budget)
    assert every > 1 and -(-STEPS // every) >= budget > -(-STEPS // (every + 1))
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(budget)))
    with pytest.warns(CalibrationFallbackWarning) as said:
        latents = generate_latents(pipe, steps=STEPS)
    message = str(said[0].message)
    assert len(said) == 1 and f"calibrate(pipe, num_inference_steps={STEPS})" in message
    assert "DDIMScheduler" in message and f"{STEPS} steps" in message and f"uniform:{every}" in message
    run = handle.last_run
    assert run.fallback is not None and f"uniform:{every}" in run.fallback
    assert "instead of auto:3" in run.fallback
    assert run.schedule.indices == tuple(range(0, STEPS, every))
    assert run.full_passes == len(run.schedule.indices) >= budget
    assert handle.schedule_for(STEPS).indices == run.schedule.indices
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error", CalibrationFallbackWarning
        )  # said once for this step count and scheduler
        assert torch.equal(generate_latents(pipe, steps=STEPS), latents)
    handle.remove()
    fresh = make_pipe("DDIM-50")
    with apply_faster_diffusion(fresh, FasterDiffusionConfig(key_steps=KeySteps.uniform(every))) as explicit:
        torch.testing.assert_close(latents, generate_latents(fresh, steps=STEPS), rtol=0, atol=0)
        assert explicit.last_run.fallback is None


@pytest.mark.parametrize(
    ("steps", "budget", "every"), [(50, 13, 4), (20, 6, 3), (20, 7, 3), (20, 20, 1), (8, 1, 8)]
)
def test_the_fallback_is_the_widest_interval_with_at_least_the_budget(steps, budget, every):
    assert fallback_interval(steps, budget) == every
    assert KeySteps.auto(budget).fallback(steps) == KeySteps.uniform(every)
    assert len(KeySteps.uniform(every).resolve(steps).indices) >= budget
    assert KeySteps.uniform(2).fallback(steps) == KeySteps.uniform(2)  # other kinds are kept
    paper = len(paper_key_steps(steps))  # plain auto's budget
    assert KeySteps.auto().fallback(steps) == KeySteps.uniform(fallback_interval(steps, paper))
    with pytest.raises(KeyStepError, match=re.escape(f"from 1 to {steps}, got {steps + 1}")):
        KeySteps.auto(steps + 1).fallback(steps)


def test_auto_uses_the_calibration_of_the_run(make_pipe):
    pipe = make_pipe("DDIM-50")
    calibrate(pipe, num_inference_steps=STEPS, prompts=PROMPTS[:1])
    calibration = find_calibration(pipe, STEPS)
    assert calibration is not None and calibration.num_steps == STEPS
    with apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto())) as handle:
        generate_latents(pipe, steps=STEPS)
        schedule = handle.last_run.schedule
        assert schedule.indices == calibration.indices()
        assert handle.last_run.full_passes == len(calibration.indices())
        assert "auto" in schedule.describe() and "calibrated" in schedule.describe()
    with apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(3))) as handle:
        generate_latents(pipe, steps=STEPS)
        assert handle.last_run.schedule.indices == optimal_key_steps(calibration.matrix, 3)
        assert handle.last_run.schedule.describe().startswith("auto:3, calibrated")
    calls = count_unet_calls(pipe)
    too_many = rf"budget of {STEPS + 1} key steps is more than the {STEPS}"
    with (
        apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(STEPS + 1))),
        pytest.raises(KeyStepError, match=too_many),
    ):
        generate_latents(pipe, steps=STEPS)
    assert calls == [0]
    # The calibration is for 8 steps; a run of another step count has none, and runs its fallback.
    with (
        apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto())) as handle,
        pytest.warns(CalibrationFallbackWarning, match="num_inference_steps=6"),
    ):
        generate_latents(pipe, steps=6)
        assert handle.last_run.fallback is not None


def test_auto_refuses_a_run_on_custom_timesteps_and_takes_the_scheduler_s_own(make_pipe):
    """A calibration measures the scheduler's own timesteps for its step count: ``auto`` on a run given other
    timesteps (the pipeline's ``timesteps=``) fails before the UNet runs, instead of placing key steps from
    another trajectory; the same timesteps passed explicitly run as the default ones do."""
    pipe = make_pipe("DPM-Solver++-20")
    calibrate(pipe, num_inference_steps=STEPS, prompts=PROMPTS[:1])
    own = scheduler_timesteps(pipe.scheduler, STEPS)
    custom = [999, 900, 800, 600, 400, 250, 100, 20]
    assert len(custom) == STEPS and tuple(custom) != own
    calls = count_unet_calls(pipe)
    with apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto())) as handle:
        with pytest.raises(
            CalibrationError, match=r"given others \(999, 900, 800, \.\.\., 20\).*custom timesteps"
        ):
            generate_latents(pipe, steps=STEPS, timesteps=custom)
        assert calls == [0] and not handle._state.active
        default = generate_latents(pipe, steps=STEPS)
        assert torch.equal(generate_latents(pipe, steps=STEPS, timesteps=list(own)), default)
        assert handle.last_run.schedule.indices == find_calibration(pipe, STEPS).indices()
    with apply_faster_diffusion(
        pipe, FasterDiffusionConfig(key_steps=KeySteps.explicit([0, 3, 6]))
    ) as handle:
        generate_latents(pipe, steps=STEPS, timesteps=custom)  # explicit key steps take any timesteps
        assert handle.last_run.full_passes == 3


@pytest.mark.parametrize("budget", [0, STEPS + 1, 2.5, True])
def test_calibrate_checks_the_budget_before_measuring(make_pipe, budget):
    pipe = make_pipe("DDIM-50")
    calls = count_unet_calls(pipe)
    with pytest.raises(KeyStepError, match=re.escape(f"got {budget!r}")):
        calibrate(pipe, budget, num_inference_steps=STEPS, prompts=PROMPTS[:1], save=False)
    assert calls == [0]


def test_calibrate_on_an_attached_pipeline_measures_it_stock_and_leaves_it_attached(make_pipe):
    """``apply_faster_diffusion(pipe)``, ``calibrate(pipe)``, ``pipe(...)``: the calibration is the stock
    pipeline's (the same matrix as on a pipeline with nothing attached), of the attached mode's target, and
    the next run is placed by it, with faster diffusion still attached."""
    options = dict(num_inference_steps=STEPS, prompts=PROMPTS[:1], save=False)
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.auto(3)))
    keys = calibrate(pipe, 3, **options)
    assert get_faster_diffusion(pipe) is handle and handle.attached
    calibration = find_calibration(pipe, STEPS, target="deep:0")
    assert calibration is not None and "deep:0 reuse" in keys.origin
    assert find_calibration(pipe, STEPS, target="encoder") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationFallbackWarning)  # no fallback: the calibration is found
        generate_latents(pipe, steps=STEPS)
    assert handle.last_run.schedule.indices == keys.indices and handle.last_run.fallback is None
    handle.remove()
    stock = make_pipe("DDIM-50")
    alone = get_calibration(stock, target="deep:0", **options)
    np.testing.assert_array_equal(alone.matrix, calibration.matrix)


# ---------------------------------------------------------------------------------- the reference model


def test_reference_calibration_prompts_are_training_captions_with_seeds_apart_from_the_benchmark():
    from benchmarks.harness import SEEDS_PER_COMBO

    captions = {shapes.caption(shapes.Scene(*combo)): combo for combo in shapes.TRAIN_COMBOS}
    held_out = {shapes.caption(shapes.Scene(*combo)) for combo in shapes.HELD_OUT_COMBOS}
    assert len(reference.CALIBRATION_PROMPTS) == len(reference.CALIBRATION_SEEDS) == 16
    for prompt in reference.CALIBRATION_PROMPTS:
        assert prompt in captions and prompt not in held_out, prompt
    benchmark_seeds = set(range(len(shapes.HELD_OUT_COMBOS) * SEEDS_PER_COMBO))
    assert benchmark_seeds == set(range(240))
    assert not benchmark_seeds & set(reference.CALIBRATION_SEEDS)


@pytest.mark.parametrize(
    ("sampler", "steps"), [("DDIM-50", 50), ("DPM-Solver-20", 20), ("DPM-Solver++-20", 20)]
)
def test_committed_reference_calibrations_are_found_for_each_sampler(sampler, steps):
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    use_sampler(pipe, sampler)
    found = find_calibration(pipe, steps)
    assert found is not None, sampler
    assert found.prompts == reference.CALIBRATION_PROMPTS and found.seeds == reference.CALIBRATION_SEEDS
    # A GPU loads the model in fp16: the same calibration applies.
    assert found.model == model_fingerprint(pipe.unet.to(torch.float16))
    assert found.scheduler == scheduler_key(pipe.scheduler)
    assert len(found.indices()) == len(KeySteps.paper().resolve(steps).indices)


def test_a_calibration_is_not_reused_for_another_trajectory_of_the_same_sampler(make_pipe):
    """Karras sigmas keep the scheduler's class and algorithm but move the sigmas and timesteps: another
    trajectory, and another key."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = make_pipe()
    use_sampler(pipe, "DPM-Solver++-20")
    get_calibration(pipe, num_inference_steps=6, prompts=PROMPTS[:1], save=False)
    assert find_calibration(pipe, 6) is not None
    karras = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    assert scheduler_key(karras) == f"{scheduler_key(pipe.scheduler)},use_karras_sigmas=True"
    assert find_calibration(pipe, 6, karras) is None


def test_only_the_chosen_criterion_is_measured_unless_more_are_asked_for(make_pipe):
    """The default (feature) calibration is one stock run: no decoder replays."""
    pipe = make_pipe()
    use_sampler(pipe, "DDIM-50")
    calls = count_unet_calls(pipe)
    feature = get_calibration(pipe, num_inference_steps=6, prompts=PROMPTS[:1], force=True, save=False)
    assert (feature.criterion, feature.other, calls[0]) == ("feature", {}, 6)
    both = get_calibration(
        pipe, num_inference_steps=6, prompts=PROMPTS[:1], criteria=("prediction",), force=True, save=False
    )
    assert set(both.other) == {"prediction"} and calls[0] > 12
    assert both.cost == feature.cost


def test_a_criterion_asked_of_a_saved_calibration_is_measured_and_added(make_pipe):
    """Deep reuse's calibrations measure feature too (from the stock run's records); a criterion the found
    calibration lacks is measured alone, with its prompts and settings, and added, keeping the rest."""
    pipe = make_pipe()
    use_sampler(pipe, "DPM-Solver-20")
    first = get_calibration(pipe, num_inference_steps=6, prompts=PROMPTS[:1], target="deep", save=False)
    assert (first.criterion, set(first.other)) == ("prediction", {"feature"})
    calls = count_unet_calls(pipe)
    again = get_calibration(pipe, num_inference_steps=6, criterion="feature", target="deep", save=False)
    assert again.criterion == "feature" and calls[0] == 0  # found as it is: nothing measured
    merged = get_calibration(pipe, num_inference_steps=6, criteria=("final",), target="deep", save=False)
    assert merged.prompts == PROMPTS[:1]  # the saved calibration's prompts, not the defaults
    assert (merged.criterion, set(merged.other)) == ("prediction", {"feature", "final"})
    assert merged.cost == first.cost and merged.other["feature"] == first.other["feature"]
    assert merged.seconds >= first.seconds
    added = calls[0]  # the stock run and final's tails, no prediction replays
    fresh = get_calibration(
        pipe,
        num_inference_steps=6,
        prompts=PROMPTS[:1],
        criteria=("final",),
        target="deep",
        force=True,
        save=False,
    )
    assert fresh.with_criterion("final").cost == merged.with_criterion("final").cost
    assert calls[0] - added > added  # measured from scratch, prediction's replays come on top
    # Asked with other prompts: measured again with them, its criteria and the new one.
    pipe = make_pipe()
    use_sampler(pipe, "DPM-Solver-20")
    get_calibration(pipe, num_inference_steps=6, prompts=PROMPTS[:1], save=False)  # encoder: feature alone
    assert find_calibration(pipe, 6).other == {}  # the encoder target adds nothing it was not asked for
    other = get_calibration(pipe, num_inference_steps=6, prompts=PROMPTS[1:], criteria=("final",), save=False)
    assert other.prompts == PROMPTS[1:] and (other.criterion, set(other.other)) == ("feature", {"final"})


def test_the_scheduler_key_does_not_depend_on_the_sampler_used_before(make_pipe):
    """A scheduler built from another's config carries the other's settings, as ``from_config`` of the
    pipeline's scheduler does after another sampler (use_sampler itself builds every sampler from the model's
    own config: tests/test_sampler_names.py); the key leaves them out."""
    fresh, after_dpm = make_pipe(), make_pipe()
    use_sampler(fresh, "DDIM-50")
    use_sampler(after_dpm, "DPM-Solver-20")
    after_dpm.scheduler = make_scheduler("DDIM-50", after_dpm.scheduler.config)
    assert "algorithm_type" in after_dpm.scheduler.config
    assert scheduler_key(after_dpm.scheduler) == scheduler_key(fresh.scheduler)


def test_use_sampler_builds_from_the_model_s_config_whatever_the_sampler_before(make_pipe):
    """DPM-Solver++-20 after DPM-Solver-20 is DPM-Solver++-20 on a fresh pipeline: it ends at sigma 0, and its
    calibration key is the same, so that a server switching samplers finds the calibration it saved."""
    fresh, after_dpm = make_pipe(), make_pipe()
    use_sampler(fresh, "DPM-Solver++-20")
    use_sampler(after_dpm, "DPM-Solver-20")
    use_sampler(after_dpm, "DPM-Solver++-20")
    assert after_dpm.scheduler.config.final_sigmas_type == fresh.scheduler.config.final_sigmas_type == "zero"
    assert scheduler_key(after_dpm.scheduler) == scheduler_key(fresh.scheduler)


def test_prompts_split_over_several_runs_give_the_same_costs(make_pipe):
    """Both criteria are means over images: one run per prompt measures what one run of all prompts does."""
    together = measure(make_pipe(dtype=torch.float64), prompts_per_run=2)
    apart = measure(make_pipe(dtype=torch.float64), prompts_per_run=1)
    for criterion in together:  # in float64, as every comparison up to rounding (conftest.ROUNDING)
        np.testing.assert_allclose(apart[criterion], together[criterion], **ROUNDING)
    assert together["feature"][0, 1] > 0


class _StandIn:
    """A pipeline of a real model's UNet config, without its weights: one fp16 parameter says the dtype."""

    def __init__(self, block_out_channels, layers_per_block=2):
        config = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block)
        parameter = torch.zeros(1, dtype=torch.float16)
        self.unet = type("UNet", (), {"config": config, "parameters": lambda self: iter([parameter])})()
        self.vae_scale_factor = 8


@pytest.mark.parametrize(
    ("model", "size", "free_gib", "expected"),
    [
        # SDXL at 1024 px: 26.9 M encoder values a row, x 2 bytes x 2 rows x 50 steps = 5.0 GiB a prompt.
        ("sdxl", 1024, 10, 1),
        ("sdxl", 1024, 24, 2),
        ("sdxl", 1024, 44, 4),
        # SD v1.5 at 512 px: 1.25 GiB a prompt, so its 4 default prompts share one run on a 24 GB GPU.
        ("sd15", 512, 16, 6),
    ],
)
def test_the_prompts_of_one_run_keep_their_encoder_outputs_within_half_the_free_memory(
    monkeypatch, model, size, free_gib, expected
):
    import faster_diffusion.memory as memory

    channels = {"sdxl": [320, 640, 1280], "sd15": [320, 640, 1280, 1280]}[model]
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: free_gib * 2**30)
    assert prompts_per_run_for(_StandIn(channels), 50, size, size) == expected


def test_bad_prompts_per_run_or_seeds_are_refused(make_pipe):
    with pytest.raises(CalibrationError, match="prompts_per_run must be a whole number >= 1, got 0"):
        measure(make_pipe(), prompts_per_run=0)
    with pytest.raises(CalibrationError, match="one seed per prompt, got 2 prompts and 1 seeds"):
        measure_costs(
            make_pipe(),
            num_inference_steps=STEPS,
            prompts=PROMPTS,
            seeds=SEEDS[:1],
            guidance_scale=GUIDANCE,
            height=16,
            width=16,
        )
