"""The command line's refusals: each names the flag, comes before the model loads, and ends in ``error: ...``
and exit code 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from faster_diffusion.app import cli

from .cog_server import REPO_ROOT


class Loaded(Exception):
    """Raised in place of loading the model."""


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """``run(*flags)``: the command line's exit code and stderr, with loading the model raising
    :class:`Loaded`, so that a check made only after loading fails the test."""
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))

    def load(args):
        raise Loaded(f"the model was loaded (--device {args.device})")

    monkeypatch.setattr(cli, "_load", load)

    def run(*flags: str) -> tuple[int, str]:
        code = cli.main(["a red circle", "--out", str(tmp_path / "out"), *flags])
        return code, capsys.readouterr().err

    return run


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "input.png"
    Image.new("RGB", (64, 48), "white").save(path)
    return str(path)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--width", "0"], "--width must be between 8 and "),
        (["--height", "0"], "--height must be between 8 and "),
        (["--width", "-16"], "--width must be between 8 and "),
        (["--height", "20"], "--height must be a multiple of 8, got 20"),
        (["--width", "4104"], "--width must be between 8 and "),
        (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
        (["--num-outputs", "0"], "--num-outputs must be between 1 and 64, got 0"),
        (["--num-outputs", "65"], "--num-outputs must be between 1 and 64, got 65"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
        (["--seed", str(2**32)], "--seed must be between 0 and 4294967295, got 4294967296"),
        (["--guidance-scale", "-1"], "--guidance-scale must be "),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
        (["--noise-strength", "-1"], "--noise-strength must be >= 0, got -1.0"),
        (["--noise-strength", "inf"], "--noise-strength must be a finite number, got inf"),
        (["--noise-threshold", "-5"], "--noise-threshold must be >= 0, got -5.0"),
        (["--max-decoder-batch", "-1"], "--max-decoder-batch must be >= 0 (0: automatic), got -1"),
        (["--mode", "deep", "--branch", "-1"], "--branch must be >= 0, got -1"),
        (["--sampler", "plms"], "--sampler: unknown value 'plms'; allowed: 'DDIM-50'"),
        (["--key-steps", "1,2"], "--key-steps: the list must contain step 0"),
        (["--key-steps", "0,60"], "--key-steps: index 60 is out of range for 50 steps"),
        (["--key-steps", "uniform:0"], "--key-steps: uniform spacing must be a whole number >= 1"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_its_flag_before_the_model_loads(run, flags, message):
    code, err = run(*flags)
    assert code == 2
    assert err.startswith(f"error: {message}")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
        (["--strength", "nan"], "--strength must be a finite number, got nan"),
        (["--strength", "0.01"], "--strength 0.01 with 50 steps runs no step"),
        (["--strength", "0.5", "--steps", "1"], "--strength 0.5 with 1 steps runs no step"),
        (["--strength", "0.5", "--key-steps", "0,60"], "--key-steps: index 60 is out of range for 50 steps"),
        (["--mode", "deep", "--branch", "auto"], "--branch auto works for text-to-image only"),
    ],
)
def test_image_to_image_flags_are_checked_before_the_model_loads(run, image, flags, message):
    code, err = run("--image", image, *flags)
    assert code == 2
    assert err.startswith(f"error: {message}")


def test_a_mask_is_checked_before_the_model_loads_naming_its_flag(run, image, tmp_path):
    code, err = run("--mask", image)
    assert (code, err) == (
        2,
        "error: --mask applies only with --image: it marks which part of the image to repaint\n",
    )
    code, err = run("--image", image, "--mask", str(tmp_path / "missing.png"))
    assert (code, err) == (2, f"error: --mask: no such file: {tmp_path / 'missing.png'}\n")
    big = tmp_path / "big.png"
    Image.new("L", (2056, 64)).save(big)
    code, err = run("--image", image, "--mask", str(big))
    assert code == 2 and err.startswith(
        f"error: --mask ({big}): 2056x64 px is too large: at most 2048 px a side"
    )


def test_the_pixel_cap_is_named_by_the_flags_before_the_model_loads(run):
    code, err = run("--width", "2048", "--height", "1024")
    assert code == 2 and err.startswith("error: width x height must be at most 1048576 pixels")
    with pytest.raises(Loaded):
        run("--width", "1344", "--height", "768")


def test_an_image_that_cannot_be_used_is_named_by_its_flag(run, tmp_path):
    code, err = run("--image", str(tmp_path / "missing.png"))
    assert (code, err) == (2, f"error: --image: no such file: {tmp_path / 'missing.png'}\n")


def test_good_flags_reach_loading(run, image):
    with pytest.raises(Loaded):
        run("--width", "8", "--height", "2048", "--seed", str(2**32 - 1), "--steps", "1000")
    with pytest.raises(Loaded):
        run("--guidance-scale", "0", "--noise-strength", "0", "--noise-threshold", "0", "--num-outputs", "64")
    with pytest.raises(Loaded):
        run("--image", image, "--strength", "0.02", "--key-steps", "0,10")  # 1 of 50 steps run
    with pytest.raises(Loaded):
        run("--mode", "deep", "--branch", "3", "--sampler", "dpm-solver++")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "--device: unknown device 'tpu'; accepted here: cpu"),
        ("meta", "--device: unknown device 'meta'; accepted here: cpu"),
        ("cuda", "--device cuda: CUDA is not available on this machine"),
        ("cuda:0", "--device cuda:0: CUDA is not available on this machine"),
    ],
)
def test_a_device_torch_cannot_use_here_is_refused(run, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run("--device", device)
    assert code == 2
    assert err.startswith(f"error: {message}")


def test_mps_is_refused_where_it_is_not_available(run, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    code, err = run("--device", "mps")
    assert code == 2
    assert err.startswith("error: --device mps: MPS is not available on this machine")


def test_a_cuda_device_is_accepted_where_it_exists(run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "cuda:1", "cpu"):
        with pytest.raises(Loaded, match=f"--device {device}"):
            run("--device", device)
    code, err = run("--device", "cuda:2")
    assert code == 2
    assert err.startswith("error: --device cuda:2: this machine has 2 CUDA devices, cuda:0 to cuda:1")


def test_the_module_refuses_an_unknown_device_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "faster_diffusion", "a red circle", "--device", "tpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: --device: unknown device 'tpu'")
    assert "Traceback" not in result.stderr and "Model:" not in result.stdout


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("num_steps must be between 1 and 1000, got 0", "--steps must be between 1 and 1000, got 0"),
        ("guidance_scale must be >= 1, got 0.5", "--guidance-scale must be >= 1, got 0.5"),
        ("noise_injection: alpha (strength) must be >= 0, got -1", "--noise-strength must be >= 0, got -1"),
        ("noise_injection: tau (threshold) must be >= 0, got -1", "--noise-threshold must be >= 0, got -1"),
        ("key_steps: the list must contain step 0", "--key-steps: the list must contain step 0"),
        ("strength must be between 0 and 1, got 2", "--strength must be between 0 and 1, got 2"),
        ("seed must be a whole number, got 1.5", "--seed must be a whole number, got 1.5"),
        ("No weights folder at weights. Fill it", "No weights folder at weights. Fill it"),
        ("seeds must be", "seeds must be"),
    ],
)
def test_a_later_error_that_names_a_field_names_its_flag(message, expected):
    assert cli._flag_message(message) == expected


def test_the_reference_models_refuse_other_sizes_and_use_their_own_guidance(tmp_path, monkeypatch, capsys):
    """After loading (the size a model was trained at is the model's): the same guidance as the Cog model."""
    from faster_diffusion import reference

    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))  # the built-in model
    out = str(tmp_path / "out")
    assert cli.main(["a red circle", "--out", out, "--width", "64"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after loading's progress bars
    assert last.startswith(
        "error: --width and --height: the built-in reference model draws 32x32 images only"
    )
    sd15 = ["--weights", str(reference.SD15_LAYOUT_MODEL_DIR), "--steps", "4", "--key-steps", "uniform:2"]
    assert cli.main(["a red circle", "--out", out, *sd15]) == 0
    assert f"guidance {reference.SD15_LAYOUT_GUIDANCE_SCALE}" in capsys.readouterr().out
