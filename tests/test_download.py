"""Which files ``script/download-weights`` takes from a Hugging Face repository (offline: listings only)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from faster_diffusion.download import DEFAULT_REPO, REPO_ENV, build_parser, choose_files

from .cog_server import REPO_ROOT

#: The files of ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (main), as ``HfApi().list_repo_files`` lists
#: them: pickles, a non-EMA UNet and single-file checkpoints beside the diffusers folders.
SD15_LISTING = [
    ".gitattributes",
    "README.md",
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "v1-5-pruned-emaonly-fp16.safetensors",
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "v1-inference.yaml",
    "vae/config.json",
    "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]

SD15_FP16_FILES = [
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]


def without(listing, *names):
    return [path for path in listing if path not in names]


def test_sd15_gives_the_fp16_safetensors_with_the_safety_checker_and_nothing_else():
    files, variant = choose_files(SD15_LISTING)

    assert variant == "fp16"
    assert files == SD15_FP16_FILES


def test_full_precision_everywhere_when_one_model_has_no_fp16_safetensors():
    files, variant = choose_files(without(SD15_LISTING, "safety_checker/model.fp16.safetensors"))

    assert variant is None
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights == [
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_a_repository_without_a_safety_checker_is_fine():
    checker = ("safety_checker/", "feature_extractor/")

    files, variant = choose_files([p for p in SD15_LISTING if not p.startswith(checker)])

    assert variant == "fp16"
    assert files == [f for f in SD15_FP16_FILES if not f.startswith(checker)]


def test_sharded_weights_come_with_the_index_of_the_chosen_variant():
    unet = [p for p in SD15_LISTING if p.startswith("unet/") and p != "unet/config.json"]
    listing = [
        *without(SD15_LISTING, *unet),
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
    ]

    files, _ = choose_files(listing)

    assert [f for f in files if f.startswith("unet/")] == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        (
            without(SD15_LISTING, "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"),
            "text_encoder/ has no .safetensors weights (pickle files are never downloaded)",
        ),
        (
            [p for p in SD15_LISTING if not p.startswith("unet/")],
            "not a diffusers Stable Diffusion repository: it has no unet",
        ),
        (["v1-5-pruned-emaonly.safetensors"], "it has no model_index.json, unet, vae, text_encoder"),
        (
            without(
                SD15_LISTING,
                "vae/diffusion_pytorch_model.safetensors",
                "unet/diffusion_pytorch_model.fp16.safetensors",
            ),
            "vae/ has only fp16 .safetensors weights and no full-precision ones",
        ),
    ],
)
def test_a_repository_that_cannot_be_used_is_refused_with_the_reason(listing, message):
    with pytest.raises(ValueError) as error:
        choose_files(listing)
    assert message in str(error.value)


def test_the_repository_is_a_setting(monkeypatch):
    monkeypatch.delenv(REPO_ENV, raising=False)
    assert build_parser().parse_args([]).repo == DEFAULT_REPO == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert build_parser().parse_args(["--repo", "someone/fine-tune"]).repo == "someone/fine-tune"
    monkeypatch.setenv(REPO_ENV, "someone/else")
    assert build_parser().parse_args([]).repo == "someone/else"


def test_the_script_explains_itself():
    result = subprocess.run(
        [str(REPO_ROOT / "script" / "download-weights"), "--help"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    )

    assert "usage: script/download-weights" in result.stdout
    assert "--repo" in result.stdout and "FASTER_DIFFUSION_WEIGHTS" in result.stdout
