"""SDXL in the product layer: a weights folder of SDXL base loads as ``StableDiffusionXLPipeline`` (the
refiner and unknown pipelines are refused by name), serving runs SD's safety checker on its images, the
default size and key steps follow the model, and ``script/download-weights`` takes SDXL base's files and the
checker.

The folders are tiny SDXL pipelines (``build_tiny_sdxl_pipeline``) saved in diffusers layout, with the tiny SD
safety checker laid out as the download lays out ``CompVis/stable-diffusion-safety-checker``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import predict
from faster_diffusion import KeySteps
from faster_diffusion.app import cli
from faster_diffusion.app.download import (
    SAFETY_CHECKER_REPO,
    SOURCE_FILE,
    choose_checker_files,
    choose_files,
    download,
    repo_family,
)
from faster_diffusion.app.generate import GenerationRequest, faster_config, generate
from faster_diffusion.app.loading import (
    DOWNLOAD_COMMAND,
    SD,
    SDXL,
    WeightsError,
    has_weights,
    inspect_weights,
    load_pipeline,
    model_size,
    safety_check_of,
)
from faster_diffusion.app.serving import NSFWError, TextToImage
from faster_diffusion.policy import DEFAULT_KEY_STEPS, default_key_steps
from fixtures.tiny import (
    build_tiny_components,
    build_tiny_sdxl_pipeline,
    make_safety_checker_flag_everything,
    save_tiny_weights,
)

from .test_serving import defaults


def save_tiny_checker(folder: Path, *, flat: bool = False) -> None:
    """The tiny SD safety checker in ``folder``: in ``safety_checker/`` and ``feature_extractor/`` (as
    ``script/download-weights`` puts it), or ``flat`` as in the checker's own repository."""
    components = build_tiny_components(0, with_safety_checker=True)
    components["safety_checker"].save_pretrained(folder if flat else folder / "safety_checker")
    components["feature_extractor"].save_pretrained(folder if flat else folder / "feature_extractor")


@pytest.fixture(scope="module")
def sdxl_weights(tmp_path_factory):
    """A tiny SDXL base folder without a safety checker."""
    folder = tmp_path_factory.mktemp("weights") / "sdxl"
    build_tiny_sdxl_pipeline(0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def checked_sdxl_weights(sdxl_weights, tmp_path_factory):
    """The same folder with SD's safety checker."""
    folder = tmp_path_factory.mktemp("weights") / "sdxl-checked"
    shutil.copytree(sdxl_weights, folder)
    save_tiny_checker(folder)
    return folder


@pytest.fixture
def copy_of(sdxl_weights, tmp_path):
    def copy():
        return Path(shutil.copytree(sdxl_weights, tmp_path / "copy"))

    return copy


def edit_index(folder: Path, **entries) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, **entries}))


def tiny_request(**overrides) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red cat", "width": 16, "height": 16, "seed": 1, **overrides})


# ------------------------------------------------------------------------------------------------ loading


def test_an_sdxl_base_folder_is_recognised_and_loads_as_sdxl(sdxl_weights):
    weights = inspect_weights(sdxl_weights)
    assert (weights.family, weights.variant, weights.has_safety_checker) == (SDXL, None, False)

    pipe = load_pipeline(sdxl_weights, device="cpu")

    assert type(pipe) is StableDiffusionXLPipeline
    assert safety_check_of(pipe) is None
    reference = build_tiny_sdxl_pipeline(0)
    for name in ("unet", "text_encoder_2"):
        loaded = getattr(pipe, name).state_dict()
        for key, tensor in getattr(reference, name).state_dict().items():
            assert torch.equal(loaded[key], tensor), f"{name}.{key}"


def test_an_fp16_sdxl_folder_loads_its_variant(tmp_path):
    folder = tmp_path / "fp16"
    build_tiny_sdxl_pipeline(0).to(torch.float16).save_pretrained(
        folder, safe_serialization=True, variant="fp16"
    )

    assert inspect_weights(folder).variant == "fp16"
    assert load_pipeline(folder, device="cpu").unet.dtype == torch.float32


@pytest.mark.parametrize(
    "refiner",
    [
        {"_class_name": "StableDiffusionXLImg2ImgPipeline"},
        {"requires_aesthetics_score": True},
        {"text_encoder": [None, None], "tokenizer": [None, None]},
    ],
    ids=["img2img-pipeline", "aesthetics-score", "no-text-encoder"],
)
def test_the_sdxl_refiner_is_refused_by_name(copy_of, refiner):
    folder = copy_of()
    edit_index(folder, **refiner)

    with pytest.raises(WeightsError) as error:
        load_pipeline(folder, device="cpu")

    message = str(error.value)
    assert f"{folder} holds the SDXL refiner" in message
    assert "which is not supported: it only refines the SDXL base model's images" in message
    assert DOWNLOAD_COMMAND in message


def test_an_unknown_pipeline_is_refused_naming_it_and_what_is_supported(copy_of):
    folder = copy_of()
    edit_index(folder, _class_name="StableDiffusion3Pipeline")

    with pytest.raises(WeightsError) as error:
        inspect_weights(folder)

    assert "names the pipeline 'StableDiffusion3Pipeline', which is not supported; supported: " in str(
        error.value
    )
    assert "StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline (SDXL base)" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_text_encoder_2", "is incomplete: missing text_encoder_2"),
        ("no_tokenizer_2", "is incomplete: missing tokenizer_2"),
        ("pickle_text_encoder_2", "text_encoder_2 has no .safetensors weights (it has model.bin; pickle"),
    ],
)
def test_an_incomplete_sdxl_folder_names_what_is_missing(copy_of, breakage, message):
    folder = copy_of()
    if breakage == "no_text_encoder_2":
        shutil.rmtree(folder / "text_encoder_2")
    elif breakage == "no_tokenizer_2":
        shutil.rmtree(folder / "tokenizer_2")
    else:
        (folder / "text_encoder_2" / "model.safetensors").rename(folder / "text_encoder_2" / "model.bin")

    with pytest.raises(WeightsError) as error:
        load_pipeline(folder, device="cpu")

    assert message in str(error.value)


def test_sdxl_weights_whose_index_names_the_sd_pipeline_are_refused_saying_so(copy_of):
    """They loaded as StableDiffusionPipeline and failed at the first request inside the UNet."""
    folder = copy_of()
    edit_index(folder, _class_name="StableDiffusionPipeline")

    with pytest.raises(WeightsError) as error:
        load_pipeline(folder, device="cpu")

    assert str(error.value).startswith(
        f"{folder} holds SDXL weights (its UNet takes SDXL's 'text_time' embeddings), but "
        f"{folder / 'model_index.json'} names the pipeline 'StableDiffusionPipeline'; SDXL base's is "
        "'StableDiffusionXLPipeline'"
    ), str(error.value)


def test_sd_weights_whose_index_names_the_sdxl_pipeline_are_refused_saying_so(tmp_path):
    """The other direction: an SD v1.5-shaped UNet under an index that names SDXL's pipeline is refused for
    what it is, before the missing second text encoder is reported."""
    folder = save_tiny_weights(tmp_path / "sd", with_safety_checker=False)
    edit_index(folder, _class_name="StableDiffusionXLPipeline")

    with pytest.raises(WeightsError) as error:
        load_pipeline(folder, device="cpu")

    assert str(error.value).startswith(
        f"{folder} holds a UNet without SDXL's 'text_time' embeddings, but {folder / 'model_index.json'} "
        "names the pipeline 'StableDiffusionXLPipeline'; "
    ), str(error.value)
    assert "'StableDiffusionPipeline'" in str(error.value)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            {"_class_name": ["StableDiffusionXLPipeline"]},
            "names the pipeline ['StableDiffusionXLPipeline'], which",
        ),
        (
            {"text_encoder": 5},
            "model_index.json: text_encoder must be [library, class] (or [null, null]), got 5",
        ),
    ],
    ids=["class-name-list", "text-encoder-number"],
)
def test_a_malformed_model_index_is_refused_naming_the_entry(copy_of, entries, message):
    folder = copy_of()
    save_tiny_checker(folder)
    edit_index(folder, **entries)

    with pytest.raises(WeightsError, match=re.escape(message)):
        inspect_weights(folder)
    assert not has_weights(folder)


def test_an_sd_index_whose_safety_checker_entry_is_null_is_refused_naming_it(tmp_path):
    """diffusers cannot load a null entry (it reads null[0]); [null, null] is its form for no component."""
    folder = save_tiny_weights(tmp_path / "sd", with_safety_checker=True)
    edit_index(folder, safety_checker=None)

    message = "model_index.json: safety_checker must be [library, class] (or [null, null]), got null"
    with pytest.raises(WeightsError, match=re.escape(message)):
        load_pipeline(folder, device="cpu")
    edit_index(folder, safety_checker=[None, None])
    assert not inspect_weights(folder).has_safety_checker


def test_an_sd_folder_is_still_sd(tmp_path):
    from fixtures.tiny import save_tiny_weights

    assert inspect_weights(save_tiny_weights(tmp_path / "sd")).family is SD


# ------------------------------------------------------------------------------------------ safety checker


def flag_odd_images(check) -> None:
    def forward(clip_input, images):
        return images, [index % 2 == 1 for index in range(len(images))]

    check.checker.forward = forward


def test_sd_safety_checker_runs_on_sdxl_images_and_flagged_ones_are_left_out(checked_sdxl_weights, capsys):
    model = TextToImage.load(checked_sdxl_weights)
    loaded = capsys.readouterr().out
    assert "(StableDiffusionXLPipeline, 16 px by default)" in loaded and "safety checker: on" in loaded
    check = safety_check_of(model.pipe)
    assert check is not None
    flag_odd_images(check)

    outcome = model.generate(tiny_request(num_outputs=3))
    unchecked = model.generate(tiny_request(num_outputs=3), safety_checker=False)

    assert outcome.names == ["out-0", "out-2"]
    assert outcome.faster.nsfw == [False, True, False]
    assert not np.asarray(outcome.faster.images[1]).any()  # blacked out, as SD's checker does
    assert np.array_equal(np.asarray(outcome.images[1]), np.asarray(unchecked.images[2]))
    assert "NSFW content detected in image 1; it is left out" in capsys.readouterr().out
    assert len(unchecked.images) == 3 and np.asarray(unchecked.images[1]).any()


def test_sds_checker_runs_on_sdxl_images_returned_as_arrays_as_on_sds_own(checked_sdxl_weights):
    """SD's pipeline checks "np" outputs too; on SDXL they came back unchecked and reported as not flagged."""
    pipe = load_pipeline(checked_sdxl_weights, device="cpu")
    make_safety_checker_flag_everything(safety_check_of(pipe).checker)
    request = tiny_request(num_outputs=2, faster=faster_config("all"))

    arrays = generate(pipe, request, output_type="np")
    latents = generate(pipe, request, output_type="latent")

    assert arrays.nsfw == [True, True]
    assert all(isinstance(image, np.ndarray) and image.shape == (16, 16, 3) for image in arrays.images)
    assert not any(image.any() for image in arrays.images)  # blacked out, as SD's checker does
    assert latents.nsfw == [False, False]  # SD's pipeline does not check latents either
    with pytest.raises(ValueError, match="output_type 'pt' is not supported with SDXL's safety checker"):
        generate(pipe, request, output_type="pt")


def test_an_sdxl_run_whose_images_are_all_flagged_fails(checked_sdxl_weights):
    model = TextToImage.load(checked_sdxl_weights)
    make_safety_checker_flag_everything(safety_check_of(model.pipe).checker)

    with pytest.raises(NSFWError, match="NSFW content detected in all 2 outputs"):
        model.generate(tiny_request(num_outputs=2))
    assert len(model.generate(tiny_request(num_outputs=2), safety_checker=False).images) == 2


def test_the_unchecked_sdxl_pipeline_shares_the_models_and_settings(checked_sdxl_weights):
    model = TextToImage.load(checked_sdxl_weights)
    unchecked = model.pipe_without_checker

    assert type(unchecked) is StableDiffusionXLPipeline and safety_check_of(unchecked) is None
    assert safety_check_of(model.pipe) is not None
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer_2", "scheduler"):
        assert getattr(unchecked, name) is getattr(model.pipe, name)
    assert dict(unchecked.config) == dict(model.pipe.config)
    assert (unchecked.watermark is None) == (model.pipe.watermark is None)


def test_an_sdxl_folder_without_a_checker_runs_without_one_and_says_so(sdxl_weights, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="faster_diffusion.app.loading"):
        model = TextToImage.load(sdxl_weights)

    assert "has no safety checker; running without one" in caplog.text
    assert f"safety checker: none ({sdxl_weights} has no safety checker)" in capsys.readouterr().out
    assert model.pipe_without_checker is model.pipe
    assert model.generate(tiny_request()).faster.nsfw == [False]


def test_the_checker_can_be_left_out_when_loading(checked_sdxl_weights):
    assert safety_check_of(load_pipeline(checked_sdxl_weights, device="cpu", safety_checker=False)) is None


# ------------------------------------------------------------------------------------ size and key steps


def test_the_default_size_is_the_models_1024_for_sdxl_base(sdxl_weights):
    """SDXL base's UNet config says 128 latents: 1024 px with its VAE's factor 8 (the tiny VAE's is 2)."""
    model = TextToImage.load(sdxl_weights)
    assert model.default_size == model_size(model.pipe) == 16
    model.pipe.unet.register_to_config(sample_size=512)
    assert model.default_size == 1024

    requests = []

    def record(request, **options):
        requests.append(request)
        raise _Stop

    model.generate = record
    predictor = predict.Predictor()
    predictor.model = model
    for inputs in ({}, {"width": 768}):
        with pytest.raises(_Stop):
            predictor.run(**{**defaults(), "key_steps": "paper", **inputs})
    assert [(r.width, r.height) for r in requests] == [(1024, 1024), (768, 1024)]


class _Stop(Exception):
    pass


def test_the_cli_runs_sdxl_at_the_models_size_with_the_checker(checked_sdxl_weights, tmp_path, capsys):
    code = cli.main(
        [
            *("a red cat", "--weights", str(checked_sdxl_weights), "--steps", "4", "--key-steps", "0,2"),
            *("--device", "cpu", "--out", str(tmp_path)),
        ]
    )

    assert code == 0
    assert "4 steps, 16x16" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["faster-0.png"]


def test_sdxl_default_key_steps_are_calibrated(sdxl_weights, tmp_path):
    folder = Path(shutil.copytree(sdxl_weights, tmp_path / "sdxl"))
    model = TextToImage.load(folder)
    assert model.key_steps(DEFAULT_KEY_STEPS, "DDIM-50") == KeySteps.auto(13)
    assert model.key_steps(DEFAULT_KEY_STEPS, "DDIM-50", "encoder") == KeySteps.auto()
    assert default_key_steps(model.pipe, "DPM-Solver-20", mode="encoder") == KeySteps.auto(9)

    request = tiny_request(num_steps=6, faster=faster_config(KeySteps.auto(3)))
    outcome = model.generate(request)

    assert (folder / "faster_diffusion_calibration.json").is_file()
    assert outcome.faster.stats.full_passes == 3


# ------------------------------------------------------------------------------------------------ download

#: The files of ``stabilityai/stable-diffusion-xl-base-1.0`` (main), as the hub API lists them: the list in
#: InvokeAI's tests (``tests/backend/model_manager/util/test_hf_model_select.py``, "the full list of model
#: paths returned by the HF API for sdxl-base"), which agrees with a public ``model_info`` dump of the repo.
SDXL_BASE_LISTING = [
    ".gitattributes",
    "01.png",
    "LICENSE.md",
    "README.md",
    "comparison.png",
    "model_index.json",
    "pipeline.png",
    "scheduler/scheduler_config.json",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "text_encoder/config.json",
    "text_encoder/flax_model.msgpack",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx",
    "text_encoder/model.safetensors",
    "text_encoder/openvino_model.bin",
    "text_encoder/openvino_model.xml",
    "text_encoder_2/config.json",
    "text_encoder_2/flax_model.msgpack",
    "text_encoder_2/model.fp16.safetensors",
    "text_encoder_2/model.onnx",
    "text_encoder_2/model.onnx_data",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/openvino_model.bin",
    "text_encoder_2/openvino_model.xml",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_flax_model.msgpack",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/model.onnx",
    "unet/model.onnx_data",
    "unet/openvino_model.bin",
    "unet/openvino_model.xml",
    "vae/config.json",
    "vae/diffusion_flax_model.msgpack",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/config.json",
    "vae_decoder/model.onnx",
    "vae_decoder/openvino_model.bin",
    "vae_decoder/openvino_model.xml",
    "vae_encoder/config.json",
    "vae_encoder/model.onnx",
    "vae_encoder/openvino_model.bin",
    "vae_encoder/openvino_model.xml",
]

SDXL_BASE_FP16_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]

#: The files of ``CompVis/stable-diffusion-safety-checker``: a transformers-layout repository with pickle,
#: Flax and TensorFlow weights beside ``model.safetensors``.
CHECKER_LISTING = [
    ".gitattributes",
    "README.md",
    "config.json",
    "flax_model.msgpack",
    "model.safetensors",
    "preprocessor_config.json",
    "pytorch_model.bin",
    "tf_model.h5",
]

#: The folders of ``stabilityai/stable-diffusion-xl-refiner-1.0``: a second text encoder, no first one.
REFINER_LISTING = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
]


def test_sdxl_base_gives_its_fp16_diffusers_files_and_nothing_else():
    assert repo_family(SDXL_BASE_LISTING) is SDXL

    files, variant = choose_files(SDXL_BASE_LISTING)

    assert variant == "fp16"
    assert files == SDXL_BASE_FP16_FILES


def test_an_sdxl_repository_without_its_second_text_encoder_weights_is_refused():
    listing = [p for p in SDXL_BASE_LISTING if not p.startswith("text_encoder_2/model.")]
    with pytest.raises(ValueError, match=r"text_encoder_2/ has no \.safetensors weights"):
        choose_files(listing)


def test_the_sdxl_refiner_repository_is_refused_by_name():
    with pytest.raises(ValueError, match=r"this is the SDXL refiner .* which is not supported"):
        choose_files(REFINER_LISTING)


@pytest.mark.parametrize("variant", ["fp16", None])
def test_the_checker_comes_as_safetensors_into_the_pipeline_folders(variant):
    assert choose_checker_files(CHECKER_LISTING, variant) == {
        "config.json": "safety_checker/config.json",
        "model.safetensors": "safety_checker/model.safetensors",
        "preprocessor_config.json": "feature_extractor/preprocessor_config.json",
    }


def test_a_checker_repository_with_only_pickles_is_refused():
    message = r"the safety checker repository has no full-precision \.safetensors"
    with pytest.raises(ValueError, match=message):
        choose_checker_files([p for p in CHECKER_LISTING if p != "model.safetensors"], "fp16")


class FakeHub:
    """``huggingface_hub`` as ``download`` uses it, serving a folder per repository."""

    def __init__(self, monkeypatch, folders: dict[str, Path]):
        self.folders, self.calls = folders, []
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def list_repo_files(self, repo, revision=None):
        self.calls.append(("list", repo))
        folder = self.folders[repo]
        return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]

    def snapshot_download(self, repo, *, revision=None, allow_patterns, local_dir):
        self.calls.append(("download", repo, sorted(allow_patterns)))
        for name in allow_patterns:
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folders[repo] / name, Path(local_dir) / name)
        return str(local_dir)


def test_download_fetches_sdxl_base_with_sds_safety_checker_and_it_serves(
    monkeypatch, sdxl_weights, tmp_path, capsys
):
    repo = "stabilityai/stable-diffusion-xl-base-1.0"
    checker = tmp_path / "checker-repo"
    save_tiny_checker(checker, flat=True)
    (checker / "pytorch_model.bin").write_bytes(b"a pickle")
    hub = FakeHub(monkeypatch, {repo: sdxl_weights, SAFETY_CHECKER_REPO: checker})
    dest = tmp_path / "weights"

    download(repo, dest)

    assert hub.calls[-1] == (
        "download",
        SAFETY_CHECKER_REPO,
        ["config.json", "model.safetensors", "preprocessor_config.json"],
    )
    weights = inspect_weights(dest)
    assert weights.family is SDXL and weights.has_safety_checker
    assert json.loads((dest / SOURCE_FILE).read_text()) == {
        "repo": repo,
        "revision": None,
        "safety_checker": SAFETY_CHECKER_REPO,
    }
    assert not list(dest.glob(".safety-checker-*"))
    model = TextToImage.load(dest)
    assert "safety checker: on" in capsys.readouterr().out
    assert model.generate(tiny_request()).faster.nsfw == [False]


class _Watermarker:
    """Stands in for diffusers' ``StableDiffusionXLWatermarker`` (invisible-watermark is in the Cog image
    only): shifts every pixel, visibly, and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def apply_watermark(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (images + 0.5).clamp(-1, 1)


@pytest.mark.parametrize("image_to_image", [False, True], ids=["text-to-image", "image-to-image"])
def test_apply_watermark_false_leaves_sdxl_images_unmarked_for_that_request_only(image_to_image):
    pipe = build_tiny_sdxl_pipeline()
    marker = _Watermarker()
    pipe.watermark = marker
    image = Image.new("RGB", (32, 32), (90, 140, 200)) if image_to_image else None
    base = {"prompt": "a red cat", "width": 32, "height": 32, "num_steps": 3, "image": image}
    marked = generate(pipe, GenerationRequest(**base), output_type="np")
    assert marker.calls == 1
    unmarked = generate(pipe, GenerationRequest(**base, watermark=False), output_type="np")
    assert marker.calls == 1 and pipe.watermark is marker  # skipped for that call, then put back
    diff = np.abs(np.asarray(marked.images) - np.asarray(unmarked.images))
    assert diff.max() > 0.2
    again = generate(pipe, GenerationRequest(**base), output_type="np")
    assert marker.calls == 2
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(marked.images))
