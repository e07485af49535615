"""The request layer shared by the command line and the predictor, and the command line itself."""

from __future__ import annotations

import numpy as np
import pytest

from faster_diffusion import DeepReuseConfig, KeySteps
from faster_diffusion.app.cli import main
from faster_diffusion.app.generate import GenerationRequest, faster_config, generate
from faster_diffusion.app.images import MAX_SIDE
from faster_diffusion.samplers import PAPER_SAMPLERS
from fixtures.tiny import build_tiny_pipeline, save_tiny_weights


def request(**overrides):
    values = dict(prompt="a red circle above a blue square", width=16, height=16, seed=3)
    values.update(overrides)
    return GenerationRequest(**values)


@pytest.mark.parametrize("sampler", PAPER_SAMPLERS)
def test_accelerated_run_counts_and_stock_equivalent_matches_stock_pixels(sampler):
    pipe = build_tiny_pipeline(0)
    fast = generate(pipe, request(sampler=sampler, num_outputs=2))
    assert len(fast.images) == 2 and fast.images[0].size == (16, 16)
    keys = KeySteps.paper().resolve(sampler.default_steps)
    assert (fast.stats.full_passes, fast.stats.partial_passes) == (
        keys.num_key_steps,
        sampler.default_steps - keys.num_key_steps,
    )
    assert fast.loop_seconds > 0 and fast.seconds >= fast.loop_seconds

    stock = generate(pipe, request(sampler=sampler, num_outputs=2), accelerate=False)
    same = generate(
        pipe, request(sampler=sampler, num_outputs=2, faster=faster_config("all", noise_injection=False))
    )
    for a, b in zip(same.images, stock.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert stock.stats is None
    assert not np.array_equal(np.asarray(fast.images[0]), np.asarray(stock.images[0]))


def test_generate_leaves_the_pipeline_stock_even_when_a_step_raises():
    pipe = build_tiny_pipeline(0)

    def cancel(pipeline, step, timestep, tensors):
        if step == 4:
            raise KeyboardInterrupt
        return tensors

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, request(), step_callback=cancel)
    assert (
        not hasattr(pipe.unet, "_diffusers_hook")
        or pipe.unet._diffusers_hook.get_hook("faster_diffusion") is None
    )
    assert generate(pipe, request()).stats.full_passes == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(width=100), "width must be a multiple of 8, got 100"),
        (dict(height=0), f"height must be between 8 and {MAX_SIDE}, got 0"),
        (dict(num_outputs=0), "num_outputs must be between 1 and 64, got 0"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
        (dict(seed=-1), "seed must be between 0 and 4294967295, got -1"),
        (dict(seed=1.5), "seed must be a whole number, got 1.5"),
        (dict(sampler="euler"), "sampler: unknown value 'euler'; allowed: 'DDIM-50', 'DPM-Solver-20'"),
        (dict(prompt=""), None),
        (dict(prompt=None), "prompt must be text or a non-empty list of texts"),
        (dict(num_steps=0), "num_steps must be between 1 and 1000, got 0"),
    ],
)
def test_request_validation_names_the_field(overrides, message):
    if message is None:
        request(**overrides)  # an empty prompt is allowed, as in diffusers (unconditional generation)
        return
    with pytest.raises(ValueError) as error:
        request(**overrides)
    assert message in str(error.value)


def test_faster_config_from_user_inputs():
    config = faster_config(
        "uniform:4", parallel=False, noise_injection=True, noise_strength=0.01, noise_threshold=600
    )
    assert config.key_steps == KeySteps.uniform(4)
    assert (config.noise_injection.alpha, config.noise_injection.tau, config.parallel) == (0.01, 600, False)
    with pytest.raises(ValueError, match="alpha \\(strength\\) must be >= 0"):
        faster_config(noise_strength=-1)


def test_faster_config_of_each_mode():
    deep = faster_config("uniform:3", mode="deep", branch=1, forecast=1)
    assert deep == DeepReuseConfig(key_steps=KeySteps.uniform(3), branch=1, forecast=1)
    assert deep.noise_injection.enabled is False  # the mode's default
    assert faster_config(mode="deep", noise_injection=True).noise_injection.enabled is True
    assert faster_config().noise_injection.enabled is True
    assert faster_config(forecast=1).forecast == 1
    with pytest.raises(ValueError, match="mode must be one of encoder, deep"):
        faster_config(mode="fast")
    with pytest.raises(TypeError, match="faster must be the config of a reuse mode"):
        GenerationRequest(prompt="x", faster="deep")


def test_cli_deep_mode_on_the_reference_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    argv = ["a red circle", "--out", str(tmp_path / "out"), "--mode", "deep", "--sampler", "DPM-Solver-20"]
    assert main([*argv, "--compare"]) == 0
    out = capsys.readouterr().out
    # The default for DPM-Solver: 6 of 20, placed by the model's deep:0 calibration read with the feature
    # criterion, and echoed as such.
    assert (
        "Key steps: auto:6@feature, calibrated by feature error of deep:0 reuse on 16 prompts (one seed "
        "each), 32x32, 20 steps of DPMSolverMultistepScheduler: 6 of 20 steps are key steps "
        "[0, 3, 6, 9, 13, 17]"
    ) in out
    assert "Noise injection: off" in out
    assert "6 full / 14 partial UNet passes" in out and "Speedup: " in out
    assert main([*argv, "--key-steps", "uniform:3"]) == 0
    assert (
        "Key steps: uniform:3: 7 of 20 steps are key steps [0, 3, 6, 9, 12, 15, 18]"
        in capsys.readouterr().out
    )


def test_cli_compare_on_a_weights_folder(tmp_path, capsys):
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=True)
    out_dir = str(tmp_path / "out")
    argv = ["a red circle", "--weights", str(weights), "--compare", "--out", out_dir, "--seed", "7"]
    argv += ["--mode", "encoder", "--key-steps", "paper"]
    code = main([*argv, "--sampler", "DPM-Solver-20", "--num-outputs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Key steps: paper: 7 of 20 steps are key steps [0, 1, 2, 3, 5, 10, 15]" in out
    # The automatic cap keeps the three 5-step groups whole: the 1.5x peak-memory aim counts every module the
    # pipeline holds on the device (UNet, text encoder, VAE, safety checker), which leaves room for them.
    assert "7 full / 13 partial UNet passes in 7 UNet batches" in out
    assert "Speedup: " in out and "PSNR" in out
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["faster-0.png", "faster-1.png", "stock-0.png", "stock-1.png"]


def test_cli_without_weights_says_it_uses_the_reference_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    prompt = "a red circle"
    assert main([prompt, "--out", str(tmp_path / "out"), "--key-steps", "all", "--no-noise-injection"]) == 0
    out = capsys.readouterr().out
    assert "No Stable Diffusion weights in" in out and "Using the built-in reference model" in out
    assert "Noise injection: off" in out
    assert (tmp_path / "out" / "faster-0.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--key-steps", "1,2"], "error: --key-steps: the list must contain step 0"),
        (["--key-steps", "0,60"], "error: --key-steps: index 60 is out of range for 50 steps"),
        (["--width", "20"], "error: --width must be a multiple of 8, got 20"),
        (["--sampler", "plms"], "error: --sampler: unknown value 'plms'"),
        (["--noise-strength", "-1"], "error: --noise-strength must be >= 0"),
        (["--weights", "/nonexistent/sd"], "error: No weights folder at /nonexistent/sd. Fill it with"),
        (["--mode", "deep", "--branch", "6"], "error: --branch: branch must be a whole number from 0 to 5"),
        (["--mode", "encoder", "--branch", "1"], "error: --branch applies to --mode deep only"),
        (["--mode", "deep", "--sequential"], "error: --sequential and --max-decoder-batch apply to --mode"),
    ],
)
def test_cli_rejects_bad_input_clearly(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    assert main(["a cat", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
