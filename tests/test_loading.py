"""Loading a weights folder: real SD layout, offline, safetensors only, and clear errors when it is broken."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from faster_diffusion.app.loading import (
    DOWNLOAD_COMMAND,
    WeightsError,
    default_weights_dir,
    has_weights,
    inspect_weights,
    load_pipeline,
)
from fixtures.tiny import build_tiny_pipeline, save_tiny_weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "sd", seed=0, with_safety_checker=True)


@pytest.fixture
def copy_of(weights, tmp_path):
    def copy():
        target = tmp_path / "copy"
        shutil.copytree(weights, target)
        return target

    return copy


def test_loads_the_tiny_folder_with_its_safety_checker(weights):
    pipe = load_pipeline(weights, device="cpu")
    assert pipe.safety_checker is not None and pipe.feature_extractor is not None
    assert pipe.unet.dtype == torch.float32
    reference = build_tiny_pipeline(0)
    for name, tensor in reference.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[name], tensor)


def test_safety_checker_can_be_left_out(weights):
    assert load_pipeline(weights, device="cpu", safety_checker=False).safety_checker is None


def test_folder_without_safety_checker_runs_without_one_and_logs_it(weights, copy_of, caplog):
    folder = copy_of()
    shutil.rmtree(folder / "safety_checker")
    shutil.rmtree(folder / "feature_extractor")
    with caplog.at_level(logging.WARNING, logger="faster_diffusion.app.loading"):
        pipe = load_pipeline(folder, device="cpu")
    assert pipe.safety_checker is None
    assert "has no safety checker; running without one" in caplog.text


def test_fp16_variant_folder_loads_in_fp32_on_cpu(tmp_path):
    folder = tmp_path / "fp16"
    pipe = build_tiny_pipeline(0)
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    assert inspect_weights(folder).variant == "fp16"
    loaded = load_pipeline(folder, device="cpu")
    assert loaded.unet.dtype == torch.float32


def test_missing_folder_names_the_folder_and_the_download_command(tmp_path):
    with pytest.raises(WeightsError) as error:
        load_pipeline(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)
    assert DOWNLOAD_COMMAND in str(error.value)
    assert not has_weights(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_index", "is not a diffusers weights folder: it has no model_index.json"),
        ("bad_index", "model_index.json cannot be read"),
        ("no_unet", "is incomplete: missing unet"),
        (
            "pickle_only",
            "has no .safetensors weights (it has diffusion_pytorch_model.bin; pickle files are never",
        ),
        ("truncated", "Could not load the weights in"),
    ],
)
def test_broken_folder_fails_with_a_message_naming_it(copy_of, breakage, message):
    folder = copy_of()
    unet_weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if breakage == "no_index":
        (folder / "model_index.json").unlink()
    elif breakage == "bad_index":
        (folder / "model_index.json").write_text("{not json")
    elif breakage == "no_unet":
        shutil.rmtree(folder / "unet")
    elif breakage == "pickle_only":
        unet_weights.rename(folder / "unet" / "diffusion_pytorch_model.bin")
    elif breakage == "truncated":
        unet_weights.write_bytes(unet_weights.read_bytes()[:1000])
    with pytest.raises(WeightsError) as error:
        load_pipeline(folder, device="cpu")
    assert message in str(error.value)
    assert str(folder) in str(error.value)
    assert DOWNLOAD_COMMAND in str(error.value)


def test_weights_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path))
    assert default_weights_dir() == tmp_path
    monkeypatch.delenv("FASTER_DIFFUSION_WEIGHTS")
    assert str(default_weights_dir()) == "weights"


def test_index_lists_the_components(weights):
    index = json.loads((weights / "model_index.json").read_text())
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker"} <= set(index)
