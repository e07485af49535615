"""``key_steps="auto"`` and the default key steps, from the command line and the Cog model's layer."""

from __future__ import annotations

import warnings

import pytest
import torch

from faster_diffusion import (
    CalibrationFallbackWarning,
    DeepReuseConfig,
    KeySteps,
    apply_faster_diffusion,
    calibrate,
    reference,
    use_sampler,
)
from faster_diffusion.app.cli import main
from faster_diffusion.app.download import write_source
from faster_diffusion.app.generate import GenerationRequest, faster_config
from faster_diffusion.app.loading import load_pipeline
from faster_diffusion.app.serving import TextToImage
from faster_diffusion.calibration import CALIBRATION_FILE, load_calibrations
from faster_diffusion.policy import default_key_steps, read_source
from fixtures.tiny import build_tiny_pipeline, save_tiny_weights

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def reference_pipe():
    return load_pipeline(reference.MODEL_DIR, device="cpu", safety_checker=False)


def test_the_source_of_downloaded_weights_is_recorded(tmp_path):
    assert read_source(tmp_path) is None
    write_source(tmp_path, SD15, "main")
    assert read_source(tmp_path) == SD15
    (tmp_path / "faster_diffusion_source.json").write_text("not json")
    assert read_source(tmp_path) is None
    assert read_source(None) is None


def test_default_key_steps_are_deep_reuse_s_and_encoder_propagation_keeps_its_own(tmp_path, reference_pipe):
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    pipe = load_pipeline(folder, device="cpu", safety_checker=False)
    # Deep reuse, the default mode, for any weights: auto:13 of 50 with DDIM and auto:6@feature of 20 with
    # DPM-Solver (each fraction kept for other step counts); every third step with DPM-Solver++.
    for weights in (pipe, reference_pipe):
        assert default_key_steps(weights, "DDIM-50") == KeySteps.auto(13)
        assert default_key_steps(weights, "DDIM-50", 30) == KeySteps.auto(8)
        assert default_key_steps(weights, "DPM-Solver-20") == KeySteps.auto(6, "feature")
        assert default_key_steps(weights, "DPM-Solver-20", 25) == KeySteps.auto(8, "feature")  # 7.5, half up
        assert default_key_steps(weights, "DPM-Solver++-20", 40) == KeySteps.uniform(3)
        for sampler in ("DDIM-50", "DPM-Solver-20"):  # one step: nothing to reuse, nothing to calibrate
            assert default_key_steps(weights, sampler, 1) == KeySteps.every_step()
    # Encoder propagation: the paper's preset on SD v1.5 base weights, else auto (9 of 20 for DPM-Solver).
    assert default_key_steps(pipe, "DDIM-50", mode="encoder") == KeySteps.auto()
    assert default_key_steps(pipe, "DPM-Solver-20", mode="encoder") == KeySteps.auto(9)
    assert default_key_steps(pipe, "DPM-Solver++-20", 40, mode="encoder") == KeySteps.auto(18)
    write_source(folder, "someone/sd15-finetune")
    assert default_key_steps(pipe, "DDIM-50", mode="encoder") == KeySteps.auto()
    write_source(folder, SD15)
    assert default_key_steps(pipe, "DDIM-50", mode="encoder") == KeySteps.paper()
    assert default_key_steps(pipe, "DPM-Solver-20", mode="encoder") == KeySteps.paper()
    assert default_key_steps(pipe, "DDIM-50") == KeySteps.auto(13)  # deep reuse's: the same for every weights


def test_apply_with_no_config_gives_the_product_s_default(tmp_path, reference_pipe):
    """One call gives a diffusers user what the command line and Cog use: deep reuse with the policy's full
    steps, read from the pipeline's scheduler, placed by the model's deep:0 calibration (DPM-Solver's read
    with the feature criterion: [0, 3, 6, 9, 13, 17]; the prediction criterion's are [0, 2, 5, 9, 13, 17]).
    """
    for sampler, steps, given, expected, full in [
        ("DDIM-50", 50, KeySteps.auto(13, per=50), KeySteps.auto(13), 13),
        ("DPM-Solver-20", 20, KeySteps.auto(6, "feature", per=20), KeySteps.auto(6, "feature"), 6),
        ("DPM-Solver++-20", 20, KeySteps.uniform(3), KeySteps.uniform(3), 7),
    ]:
        use_sampler(reference_pipe, sampler)
        with apply_faster_diffusion(reference_pipe) as handle:
            assert isinstance(handle.config, DeepReuseConfig)
            assert handle.config.key_steps == given and given.for_steps(steps) == expected
            assert expected == default_key_steps(reference_pipe, sampler)
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "error", CalibrationFallbackWarning
                )  # the built-in model's calibrations are found: no fallback
                reference_pipe("a large red circle", num_inference_steps=steps, output_type="latent")
            assert handle.last_run.full_passes == full and handle.last_run.fallback is None
            assert handle.last_run.schedule.describe().startswith(str(expected))
            if sampler == "DPM-Solver-20":
                assert handle.last_run.schedule.indices == (0, 3, 6, 9, 13, 17)
    use_sampler(reference_pipe, "DDIM-50")


@pytest.mark.parametrize(
    ("sampler", "steps", "fallback", "calibrated"), [("DDIM-50", 25, 4, 7), ("DPM-Solver-20", 10, 4, 3)]
)
def test_the_one_call_default_runs_at_any_step_count_without_a_calibration_and_places_by_one_once_made(
    sampler, steps, fallback, calibrated
):
    """``apply_faster_diffusion(pipe)``, then ``pipe(prompt)`` on a model with no calibration: never an error.
    The default's budget scales to the run (13 of 50 is 7 of 25; 6 of 20 is 3 of 10); with no calibration it
    runs DeepCache's interval with at least that many full steps and warns; ``calibrate(pipe)`` with the
    handle attached makes the calibration, and the next call places the budget by it."""
    pipe = build_tiny_pipeline(0)
    use_sampler(pipe, sampler)
    handle = apply_faster_diffusion(pipe)
    generator = torch.Generator().manual_seed(0)
    with pytest.warns(CalibrationFallbackWarning, match=rf"calibrate\(pipe, num_inference_steps={steps}"):
        pipe("a red circle", num_inference_steps=steps, generator=generator, output_type="latent")
    run = handle.last_run
    assert run.schedule.indices == tuple(range(0, steps, fallback)) and run.fallback is not None
    assert run.full_passes >= calibrated and run.full_passes + run.partial_passes == steps
    calibrate(pipe, num_inference_steps=steps, prompts=["a red circle"], save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationFallbackWarning)
        pipe("a red circle", num_inference_steps=steps, generator=generator, output_type="latent")
    assert handle.last_run.fallback is None and handle.last_run.full_passes == calibrated
    assert "calibrated" in handle.last_run.schedule.describe()
    handle.remove()


def test_cli_default_on_new_weights_calibrates_once_says_so_and_saves_it(tmp_path, capsys):
    """Deep reuse's auto:13 of 50 with DDIM, at 10 steps auto:3, calibrated (target deep:0) on first use."""
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    argv = ["a red circle", "--weights", str(weights), "--steps", "10", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Calibrating key steps of deep:0 reuse for this model (DDIM-50, 10 steps)" in out
    assert f"; saved in {weights / CALIBRATION_FILE}" in out
    assert "Key steps: auto:3, calibrated by prediction error of deep:0 reuse on 4 prompts" in out
    assert "3 full / 7 partial UNet passes" in out
    (saved,) = load_calibrations(weights)
    assert (saved.num_steps, saved.target) == (10, "deep:0") and (weights / CALIBRATION_FILE).is_file()
    # A new process (a new pipeline) finds the saved calibration and does not calibrate again.
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "Calibrating" not in again
    assert f"are key steps {list(saved.indices(3))}" in again
    # Encoder propagation's default calibrates its own target.
    assert main([*argv, "--mode", "encoder", "--sampler", "DPM-Solver-20"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating key steps for this model (DPM-Solver-20, 10 steps)" in out
    assert "Key steps: auto:5, calibrated by feature error on 4 prompts" in out  # 9/20 of 10, rounded
    # Deep reuse's DPM-Solver default reads its calibration with the feature criterion: measured with it.
    assert main([*argv, "--sampler", "DPM-Solver-20"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating key steps of deep:0 reuse with the feature criterion for this model" in out
    assert "Key steps: auto:3@feature, calibrated by feature error of deep:0 reuse" in out  # 6/20 of 10
    # Every calibration measures the feature criterion too (it costs nothing but the stock run), so DDIM's
    # deep:0 calibration, read with prediction, serves auto:3@feature as it is.
    assert main([*argv, "--key-steps", "auto:3@feature"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating" not in out and "Key steps: auto:3@feature, calibrated by feature error" in out
    (before,) = [
        c for c in load_calibrations(weights) if c.num_steps == 10 and c.scheduler.startswith("DDIM")
    ]
    # A criterion the saved calibration did not measure is measured once and added to it, keeping the others.
    assert main([*argv, "--key-steps", "auto:3@final"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating key steps of deep:0 reuse with the final criterion for this model (DDIM-50" in out
    ddim = [c for c in load_calibrations(weights) if c.num_steps == 10 and c.target == "deep:0"]
    assert sorted((c.scheduler.split(",")[0], {c.criterion, *c.other}) for c in ddim) == [
        ("DDIMScheduler", {"prediction", "feature", "final"}),
        ("DPMSolverMultistepScheduler", {"prediction", "feature"}),
    ]
    (after,) = [c.with_criterion("prediction") for c in ddim if c.scheduler.startswith("DDIM")]
    assert after.cost == before.cost and after.other["feature"] == before.other["feature"]
    assert after.prompts == before.prompts  # measured with the saved calibration's prompts
    assert main([*argv, "--key-steps", "auto:3@final"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating" not in out and "Key steps: auto:3@final, calibrated by final error" in out


def test_cli_auto_on_the_reference_model_uses_its_committed_calibration(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    argv = [reference.EXAMPLE_PROMPT, "--out", str(tmp_path / "out")]
    assert main([*argv, "--mode", "encoder", "--key-steps", "auto"]) == 0
    out = capsys.readouterr().out
    assert "Calibrating" not in out
    assert "Key steps: auto, calibrated by feature error on 16 prompts (one seed each)" in out
    assert "9 of 50 steps are key steps [0, 4, 8, 13, 19, 26, 32, 38, 44]" in out
    assert main(argv) == 0  # the default: deep reuse, auto:13
    out = capsys.readouterr().out
    assert "Calibrating" not in out
    assert "Key steps: auto:13, calibrated by prediction error of deep:0 reuse on 16 prompts" in out


@pytest.mark.parametrize(
    ("key_steps", "message"),
    [
        ("auto:0", "error: --key-steps: invalid value 'auto:0': the auto budget must be a whole number >= 1"),
        ("auto:60", "error: --key-steps: the budget must be a whole number from 1 to 50, got 60"),
        ("auto:6@featur", "error: --key-steps 'auto:6@featur': unknown criterion 'featur'; the criteria"),
    ],
)
def test_cli_rejects_a_bad_auto_budget_clearly(key_steps, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    assert main(["a red circle", "--out", str(tmp_path / "out"), "--key-steps", key_steps]) == 2
    assert message in capsys.readouterr().err


def test_a_budget_beyond_the_steps_fails_before_any_calibration(tmp_path, capsys):
    """On weights with no calibration, auto:30 of 10 steps is refused first, not after measuring one."""
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    argv = ["a red circle", "--weights", str(weights), "--steps", "10", "--out", str(tmp_path / "o")]
    assert main([*argv, "--key-steps", "auto:30@final"]) == 2
    captured = capsys.readouterr()
    assert "error: --key-steps: the budget must be a whole number from 1 to 10, got 30" in captured.err
    assert "Calibrating" not in captured.out and not (weights / CALIBRATION_FILE).exists()


def test_the_cog_model_resolves_default_and_auto_key_steps(tmp_path, capsys):
    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    model = TextToImage.load(folder)
    assert model.key_steps("default", "DDIM-50") == KeySteps.auto(13)
    assert model.key_steps(" DEFAULT ", "DPM-Solver-20") == KeySteps.auto(6, "feature")
    assert model.key_steps("default", "DPM-Solver++-20") == KeySteps.uniform(3)
    assert model.key_steps("default", "DDIM-50", "encoder") == KeySteps.auto()
    assert model.key_steps(" DEFAULT ", "DPM-Solver-20", "encoder") == KeySteps.auto(9)
    assert model.key_steps("uniform:3", "DDIM-50") == "uniform:3"
    request = GenerationRequest(
        prompt="a red circle",
        sampler="DPM-Solver-20",
        width=16,
        height=16,
        faster=faster_config(model.key_steps("default", "DPM-Solver-20", "encoder")),
    )
    outcome = model.generate(request, safety_checker=False)
    out = capsys.readouterr().out
    assert "Calibrating key steps" in out and "Key steps: auto:9, calibrated by feature error" in out
    assert outcome.faster.stats.full_passes == 9
    assert load_calibrations(folder)


def test_auto_on_the_reference_model_never_writes_into_the_package(tmp_path, monkeypatch, capsys):
    """A step count with no saved calibration is calibrated for the process, not saved into the package."""
    saved = (reference.MODEL_DIR / CALIBRATION_FILE).read_bytes()
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    argv = [reference.EXAMPLE_PROMPT, "--out", str(tmp_path / "out"), "--steps", "6", "--key-steps", "auto:3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Calibrating key steps of deep:0 reuse for this model (DDIM-50, 6 steps): a stock run of 16" in out
    assert "; kept for this process" in out
    assert (reference.MODEL_DIR / CALIBRATION_FILE).read_bytes() == saved


def test_the_sd15_layout_reference_model_is_calibrated_with_its_own_guidance_and_never_saved(monkeypatch):
    """Either built-in model is package data, calibrated as training/calibrate_reference.py calibrates it."""
    from faster_diffusion.app import generate as generate_module
    from faster_diffusion.calibration import get_calibration

    seen = {}

    def recording(pipe, **options):
        seen.update(options)
        return get_calibration(pipe, **options)

    monkeypatch.setattr("faster_diffusion.calibration.get_calibration", recording)
    saved = (reference.SD15_LAYOUT_MODEL_DIR / CALIBRATION_FILE).read_bytes()
    pipe = load_pipeline(reference.SD15_LAYOUT_MODEL_DIR, device="cpu", safety_checker=False)
    request = GenerationRequest(prompt="-", num_steps=5, faster=faster_config(KeySteps.auto(2)))
    prepared = generate_module.prepare_key_steps(pipe, request, log=lambda line: None)
    assert prepared.faster.key_steps.kind.value == "explicit"
    assert seen["guidance_scale"] == reference.SD15_LAYOUT_GUIDANCE_SCALE
    assert seen["save"] is False
    assert (reference.SD15_LAYOUT_MODEL_DIR / CALIBRATION_FILE).read_bytes() == saved


def test_the_cog_setup_measures_nothing_and_prepare_weights_calibrates_every_default(
    tmp_path, monkeypatch, capsys
):
    """Setup looks the defaults up and warns about a missing calibration (the first request makes it);
    script/prepare-weights, run before cog build, calibrates them, verifies, and setup then finds them all."""
    import predict
    from faster_diffusion.app import prepare
    from faster_diffusion.app.generate import GenerationRequest as Request

    folder = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(folder))
    predict.Predictor().setup()
    out = capsys.readouterr().out
    assert "Calibrating" not in out and not (folder / CALIBRATION_FILE).exists()
    assert (
        "Warning: key_steps 'auto:13': no calibration of deep:0 reuse of this model for DDIM-50" in out
        and "Warning: key_steps 'auto:6@feature': no calibration of deep:0 reuse with the feature" in out
        and "script/prepare-weights before cog build" in out
    )

    assert prepare.main([]) == 0  # the weights folder from $FASTER_DIFFUSION_WEIGHTS, already filled
    out = capsys.readouterr().out
    assert "Ready: " in out and out.count("Calibrating key steps") >= 1
    saved = (folder / CALIBRATION_FILE).read_bytes()
    predictor = predict.Predictor()
    predictor.setup()
    out = capsys.readouterr().out
    assert "Calibrating" not in out and "Warning" not in out
    for sampler in prepare.SAMPLERS:
        for mode in prepare.MODES:
            assert f"Default key steps for {sampler}, mode {mode}: " in out
    request = Request(prompt="a red cat", width=16, height=16, num_steps=None)
    predictor.model.generate(request)  # a default request calibrates nothing either
    assert "Calibrating" not in capsys.readouterr().out
    assert (folder / CALIBRATION_FILE).read_bytes() == saved
    assert prepare.main([]) == 0  # again: nothing to do
    assert "Calibrating" not in capsys.readouterr().out

    write_source(folder, SD15)  # deep reuse's defaults are the same on SD v1.5's weights
    (folder / CALIBRATION_FILE).unlink()
    predict.Predictor().setup()
    out = capsys.readouterr().out
    assert "Calibrating" not in out and not (folder / CALIBRATION_FILE).exists()
    assert "Warning: key_steps 'auto:13': no calibration of deep:0 reuse of this model for DDIM-50" in out
    assert (
        "Warning: key_steps 'auto:6@feature': no calibration of deep:0 reuse with the feature criterion"
        in out
    )
    assert "Default key steps for DPM-Solver++-20, mode deep: uniform:3: 7 of 20 steps are key steps" in out
    # Encoder propagation's defaults are the paper's preset on SD v1.5's base weights: nothing to calibrate.
    assert "Default key steps for DDIM-50, mode encoder: paper: 9 of 50 steps are key steps" in out
    assert "no calibration of this model" not in out


def test_prepare_weights_downloads_into_an_empty_folder_first_and_fails_clearly(
    tmp_path, monkeypatch, capsys
):
    from faster_diffusion.app import prepare

    calls = []
    monkeypatch.setattr(prepare.download, "main", lambda argv: calls.append(argv) or 2)
    assert prepare.main(["--weights", str(tmp_path / "empty"), "--repo", "someone/model"]) == 2
    assert calls == [["--repo", "someone/model", "--dest", str(tmp_path / "empty")]]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    assert prepare.main(["--weights", str(broken)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
