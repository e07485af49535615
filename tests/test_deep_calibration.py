"""Calibration of deep reuse (target ``"deep:B"``): its costs, its own saved entries, and ``auto`` from it."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from faster_diffusion import (
    CalibrationError,
    CalibrationFallbackWarning,
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    apply_faster_diffusion,
    calibrate,
    get_calibration,
    reference,
)
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.calibration import (
    CALIBRATION_FILE,
    Calibration,
    default_criterion,
    find_calibration,
    load_calibrations,
    measure_costs,
    weights_folder,
)
from faster_diffusion.deep import deep_modules
from faster_diffusion.measure import canonical_target, target_modules
from fixtures.tiny import save_tiny_weights

from .conftest import ROUNDING
from .test_calibration import (
    GUIDANCE,
    PROMPTS,
    SEEDS,
    STEPS,
    guided_relative_error,
    made_up,
    unet_outputs,
)

OPTIONS = dict(num_inference_steps=STEPS, prompts=PROMPTS, seeds=SEEDS, guidance_scale=GUIDANCE)


@pytest.mark.parametrize(
    ("sampler", "branch", "j", "batched"),
    [("DDIM-50", 0, 3, False), ("DPM-Solver++-20", 2, 5, False), ("DPM-Solver-20", 0, 4, True)],
)
def test_deep_prediction_cost_is_the_error_of_a_deep_reuse_run_at_its_only_partial_step(
    make_pipe, sampler, branch, j, batched
):
    """Every step but j full: the trajectory is stock's up to j, and step j's prediction is the shallow layers
    on step j-1's deep features, which is what cost[j-1, j] of target deep:B charges."""
    pipe = make_pipe(sampler, dtype=torch.float64)
    target = f"deep-batched:{branch}" if batched else f"deep:{branch}"
    costs = measure_costs(pipe, height=16, width=16, target=target, criteria=("prediction",), **OPTIONS)
    # Another target's cost: the encoder's, or for the batched variant, deep reuse of the same branch.
    other = {"target": f"deep:{branch}"} if batched else {}
    encoder = measure_costs(pipe, height=16, width=16, criteria=("prediction",), **other, **OPTIONS)
    stock = unet_outputs(pipe)
    keys = KeySteps.explicit(i for i in range(STEPS) if i != j)
    fast = unet_outputs(pipe, DeepReuseConfig(key_steps=keys, branch=branch, batched=batched))
    for i in range(j):
        torch.testing.assert_close(fast[i], stock[i], rtol=0, atol=0)
    error = guided_relative_error(fast[j], stock[j])
    assert error > 1e-6
    assert costs["prediction"][j - 1, j] == pytest.approx(error, rel=ROUNDING["rtol"])
    # Not the other target's cost: the two reuse different features.
    assert abs(encoder["prediction"][j - 1, j] - error) > 1e-6 * error


def test_deep_feature_cost_is_the_relative_distance_of_the_deep_modules_outputs(make_pipe):
    pipe = make_pipe("DDIM-50", dtype=torch.float64)
    records: list[list[torch.Tensor]] = []
    modules = deep_modules(pipe.unet, 0)
    current: list[torch.Tensor] = []

    def keep(module, args, output):
        found: list[torch.Tensor] = []

        def walk(value):  # a down block returns (hidden, (skips...)), its last skip being the hidden state
            if torch.is_tensor(value):
                if not any(value is t for t in found):
                    found.append(value)
            elif isinstance(value, (tuple, list)):
                for item in value:
                    walk(item)
            elif hasattr(value, "to_tuple"):
                walk(value.to_tuple())

        walk(output)
        current.extend(found)

    def end_step(module, args, output):
        records.append(list(current))
        current.clear()

    handles = [m.register_forward_hook(keep) for m in modules]
    step_hook = pipe.unet.register_forward_hook(end_step)
    try:
        unet_outputs(pipe)
    finally:
        for handle in [*handles, step_hook]:
            handle.remove()
    costs = measure_costs(pipe, height=16, width=16, target="deep", criteria=("feature",), **OPTIONS)
    k, j = 2, 5

    def flat(step):
        return torch.cat([t.flatten(1) for t in records[step]], dim=1)

    expected = ((flat(j) - flat(k)).norm(dim=1) / flat(j).norm(dim=1)).mean()
    assert costs["feature"][k, j] == pytest.approx(float(expected), rel=1e-6)


def test_targets_are_canonical_and_bad_ones_are_refused_by_name(make_pipe):
    unet = make_pipe().unet
    assert canonical_target("deep") == "deep:0" and canonical_target("encoder") == "encoder"
    assert target_modules(unet, "deep:1") == deep_modules(unet, 1)
    assert target_modules(unet, "encoder") == [unet.conv_in, *unet.down_blocks, unet.mid_block]
    assert default_criterion("deep:3") == "prediction" and default_criterion("encoder") == "feature"
    assert canonical_target("deep-batched") == "deep-batched:0"
    assert default_criterion("deep-batched:0") == "prediction"
    for bad, message in [
        ("deep:x", "the branch after 'deep:' must be a whole number, got 'x'"),
        ("deep:99", "branch must be a whole number from 0 to 5 for this UNet"),
        ("encoder:1", "the encoder target takes no argument"),
        ("decoder", "target must be one of ('deep', 'deep-batched', 'encoder')"),
        ("deep-batched:x", "the branch after 'deep-batched:' must be a whole number, got 'x'"),
        (3, "target must be a text such as 'encoder' or 'deep:0', got 3"),
    ]:
        with pytest.raises(CalibrationError, match=re.escape(message)):
            target_modules(unet, bad)
    with pytest.raises(CalibrationError, match=re.escape("branch must be a whole number from 0 to 5")):
        get_calibration(make_pipe(), target="deep:6", prompts=PROMPTS[:1])


@pytest.fixture
def saved_pipe(tmp_path):
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    pipe = load_pipeline(folder, device="cpu", safety_checker=False)
    from faster_diffusion import use_sampler

    use_sampler(pipe, "DPM-Solver-20")
    return pipe


def test_each_target_has_its_own_entry_and_auto_reads_the_mode_s_own(saved_pipe):
    pipe = saved_pipe
    folder = weights_folder(pipe)
    options = dict(num_inference_steps=STEPS, prompts=PROMPTS[:1])
    encoder = get_calibration(pipe, criteria=("prediction",), **options)
    # Deep reuse's auto is not placed from the encoder's calibration: it asks for its own, by name.
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.auto(3)))
    with pytest.warns(CalibrationFallbackWarning, match=re.escape("target='deep:0'")):
        pipe("a red circle", num_inference_steps=STEPS, output_type="latent")
    assert handle.last_run.fallback is not None
    handle.remove()
    keys = calibrate(pipe, budget=3, target="deep", **options)
    deep = find_calibration(pipe, STEPS, target="deep:0")
    assert deep is not None and deep.target == "deep:0" and deep.criterion == "prediction"
    assert "deep:0 reuse" in keys.origin
    saved = load_calibrations(folder)
    assert sorted(c.target for c in saved) == ["deep:0", "encoder"]
    assert find_calibration(pipe, STEPS).matrix.tolist() == encoder.matrix.tolist()
    assert deep.matrix.tolist() != encoder.matrix.tolist()
    # A deep-reuse run with auto uses the deep calibration's placement.
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.auto(3)))
    pipe("a red circle", num_inference_steps=STEPS, output_type="latent")
    assert handle.last_run.schedule.indices == deep.indices(3) == keys.indices
    handle.remove()
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(3)))
    pipe("a red circle", num_inference_steps=STEPS, output_type="latent")
    assert handle.last_run.schedule.indices == encoder.indices(3)
    handle.remove()
    # Calibrating deep reuse again replaces only its own entry.
    calibrate(pipe, budget=3, target="deep:0", force=True, seeds=(5,), **options)
    again = load_calibrations(folder)
    assert sorted(c.target for c in again) == ["deep:0", "encoder"]
    assert [c.seeds for c in again if c.target == "deep:0"] == [(5,)]


def test_a_file_from_before_targets_reads_as_the_encoder_s(tmp_path):
    entry = made_up(num_steps=4).to_json()
    assert entry.pop("target") == "encoder"
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"version": 1, "calibrations": [entry]}))
    (loaded,) = load_calibrations(tmp_path)
    assert loaded.target == "encoder"
    deep = dataclasses.replace(made_up(num_steps=4), target="deep:0")
    assert Calibration.from_json(deep.to_json()).target == "deep:0"
    assert not deep.matches(deep.model, deep.scheduler, 4) and deep.matches(
        deep.model, deep.scheduler, 4, target="deep:0"
    )


@pytest.mark.parametrize(
    "model_dir", [reference.MODEL_DIR, reference.SD15_LAYOUT_MODEL_DIR], ids=["first", "sd15"]
)
def test_the_reference_models_ship_deep_calibrations_for_every_sampler(model_dir):
    saved = load_calibrations(model_dir)
    for target in ("encoder", "deep:0"):
        entries = [c for c in saved if c.target == target]
        assert sorted((c.scheduler.split(",")[0], c.num_steps) for c in entries) == [
            ("DDIMScheduler", 50),
            ("DPMSolverMultistepScheduler", 20),
            ("DPMSolverMultistepScheduler", 20),
        ]
    assert all(c.criterion == default_criterion(c.target) for c in saved)
    assert all(c.guidance_scale == reference.guidance_scale(model_dir) for c in saved)


def test_cli_deep_auto_on_the_reference_model_uses_its_shipped_calibration(tmp_path, monkeypatch, capsys):
    from faster_diffusion import use_sampler
    from faster_diffusion.app.cli import main

    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    saved = (reference.MODEL_DIR / CALIBRATION_FILE).read_bytes()
    argv = [reference.EXAMPLE_PROMPT, "--out", str(tmp_path / "out"), "--sampler", "DPM-Solver-20"]
    assert main([*argv, "--mode", "deep", "--key-steps", "auto:6"]) == 0
    out = capsys.readouterr().out
    pipe = load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)
    use_sampler(pipe, "DPM-Solver-20")
    shipped = find_calibration(pipe, 20, target="deep:0")
    assert "Calibrating" not in out
    assert "Key steps: auto:6, calibrated by prediction error of deep:0 reuse on 16 prompts" in out
    assert f"are key steps {list(shipped.indices(6))}" in out
    assert "6 full / 14 partial UNet passes" in out
    assert (reference.MODEL_DIR / CALIBRATION_FILE).read_bytes() == saved
