"""Which files ``script/download-weights`` takes from a Hugging Face repository (offline: listings only), and
the Cog model's setup filling an empty weights folder (from a stand-in for the hub)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

import predict
from faster_diffusion.app.download import (
    DEFAULT_REPO,
    FETCH_AT_SETUP_ENV,
    REPO_ENV,
    SOURCE_FILE,
    build_parser,
    choose_files,
    fetch_at_setup,
)
from faster_diffusion.app.download import main as download_main
from faster_diffusion.app.loading import DOWNLOAD_COMMAND, WEIGHTS_ENV, WeightsError, inspect_weights
from faster_diffusion.app.serving import TextToImage
from faster_diffusion.policy import read_source
from fixtures.tiny import save_tiny_weights

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


# ------------------------------------------------------------------------------------------ setup fetch


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    """A tiny SD-shaped repository, as the hub would serve it."""
    return save_tiny_weights(tmp_path_factory.mktemp("hub") / "repo", seed=0, with_safety_checker=True)


class FakeHub:
    """``huggingface_hub`` as ``download`` uses it, serving ``folder``; or, with ``error``, failing as an
    unreachable hub does. ``fail_after`` files copied, a download breaks off."""

    def __init__(self, monkeypatch, folder, *, error=None, fail_after=None):
        self.folder, self.error, self.fail_after = folder, error, fail_after
        self.calls = []
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def listing(self):
        return [p.relative_to(self.folder).as_posix() for p in sorted(self.folder.rglob("*")) if p.is_file()]

    def list_repo_files(self, repo, revision=None):
        self.calls.append(("list", repo))
        if self.error is not None:
            raise self.error
        return self.listing()

    def snapshot_download(self, repo, *, revision=None, allow_patterns, local_dir):
        self.calls.append(("download", repo))
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)  # as the real one leaves
        for count, name in enumerate(allow_patterns):
            if self.fail_after is not None and count == self.fail_after:
                raise ConnectionError("Connection reset by peer")
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.folder / name, Path(local_dir) / name)
        return str(local_dir)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(FETCH_AT_SETUP_ENV, raising=False)
    monkeypatch.delenv(REPO_ENV, raising=False)


def test_setup_fills_a_missing_folder_with_what_the_download_script_takes(
    online, monkeypatch, hub_folder, tmp_path
):
    hub = FakeHub(monkeypatch, hub_folder)
    dest = tmp_path / "weights"

    fetch_at_setup(dest)

    assert hub.calls == [("list", DEFAULT_REPO), ("download", DEFAULT_REPO)]
    fetched = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert fetched == sorted([*choose_files(hub.listing())[0], SOURCE_FILE])
    assert read_source(dest) == DEFAULT_REPO  # the default key steps follow the weights' source
    assert inspect_weights(dest).has_safety_checker
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]  # no temporary folder left beside it


def test_setup_fills_a_folder_that_holds_only_its_readme_and_keeps_the_readme(
    online, monkeypatch, hub_folder, tmp_path
):
    FakeHub(monkeypatch, hub_folder)
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "README.md").write_text("the checkout's weights/README.md")

    fetch_at_setup(dest)

    assert (dest / "README.md").read_text() == "the checkout's weights/README.md"
    assert inspect_weights(dest).path == dest


def test_a_clean_checkout_serves_after_setup_fetched_the_weights(online, monkeypatch, hub_folder, tmp_path):
    FakeHub(monkeypatch, hub_folder)
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "weights"))

    predictor = predict.Predictor()
    predictor.setup()

    assert inspect_weights(tmp_path / "weights").path.is_dir()
    assert predictor.model.pipe.safety_checker is not None


@pytest.mark.parametrize("breakage", ["no_index", "no_unet"])
def test_a_folder_with_anything_in_it_is_never_fetched_into(
    online, monkeypatch, hub_folder, tmp_path, breakage
):
    hub = FakeHub(monkeypatch, hub_folder)
    dest = tmp_path / "weights"
    shutil.copytree(hub_folder, dest)
    if breakage == "no_index":
        (dest / "model_index.json").unlink()
    else:
        shutil.rmtree(dest / "unet")
    before = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))

    fetch_at_setup(dest)

    assert hub.calls == []
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == before
    with pytest.raises(WeightsError, match="script/download-weights"):
        TextToImage.load(dest)


def test_an_unreachable_hub_fails_with_the_usual_message_and_the_reason(
    online, monkeypatch, hub_folder, tmp_path
):
    FakeHub(monkeypatch, hub_folder, error=ConnectionError("Failed to resolve 'huggingface.co'"))
    dest = tmp_path / "weights"

    with pytest.raises(WeightsError) as error:
        fetch_at_setup(dest)

    message = str(error.value)
    assert f"No weights folder at {dest}. Fill it with `{DOWNLOAD_COMMAND}`" in message
    assert f"Could not fetch {DEFAULT_REPO} from the Hugging Face hub at setup" in message
    assert "ConnectionError: Failed to resolve 'huggingface.co'" in message
    assert list(tmp_path.iterdir()) == []


def test_a_fetch_cut_short_leaves_no_half_folder(online, monkeypatch, hub_folder, tmp_path):
    FakeHub(monkeypatch, hub_folder, fail_after=4)
    dest = tmp_path / "weights"
    dest.mkdir()
    (dest / "README.md").write_text("readme")

    with pytest.raises(WeightsError, match="Connection reset by peer"):
        fetch_at_setup(dest)

    assert [p.name for p in tmp_path.iterdir()] == ["weights"]
    assert [p.name for p in dest.iterdir()] == ["README.md"]


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("HF_HUB_OFFLINE", "1", "HF_HUB_OFFLINE=1 is set"),
        (FETCH_AT_SETUP_ENV, "0", f"{FETCH_AT_SETUP_ENV}=0 is set"),
    ],
)
def test_offline_switches_keep_setup_from_the_hub(
    online, monkeypatch, hub_folder, tmp_path, name, value, reason
):
    hub = FakeHub(monkeypatch, hub_folder)
    monkeypatch.setenv(name, value)
    dest = tmp_path / "weights"

    with pytest.raises(WeightsError) as error:
        fetch_at_setup(dest)

    assert hub.calls == []
    assert f"No weights folder at {dest}. Fill it with `{DOWNLOAD_COMMAND}`" in str(error.value)
    assert f"Not fetched from the Hugging Face hub at setup: {reason}." in str(error.value)
    assert not dest.exists()


# ------------------------------------------------------------------------------------ the script, offline


def chained(error, cause):
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx2.ConnectError("[Errno -2] Name or service not known"), "ConnectError: [Errno -2] Name or"),
        (httpx2.ConnectTimeout("timed out"), "ConnectTimeout: timed out"),
        (ConnectionError("Failed to resolve 'huggingface.co'"), "ConnectionError: Failed to resolve"),
        (  # as snapshot_download raises it
            chained(
                LocalEntryNotFoundError("An error happened"), httpx2.ConnectError("[Errno 101] no route")
            ),
            "ConnectError: [Errno 101] no route",
        ),
    ],
    ids=["name", "timeout", "connection", "snapshot"],
)
def test_the_script_without_network_says_so_in_a_paragraph(
    online, monkeypatch, hub_folder, tmp_path, capsys, error, reason
):
    FakeHub(monkeypatch, hub_folder, error=error)
    dest = tmp_path / "weights"

    assert download_main(["--dest", str(dest)]) == 2

    err = capsys.readouterr().err
    assert err.startswith(
        f"error: could not download {DEFAULT_REPO} from the Hugging Face hub: the hub could not be reached "
        f"({reason}"
    )
    assert "this machine seems to be offline" in err
    assert f"run {DOWNLOAD_COMMAND} again once huggingface.co can be reached" in err
    assert f"a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...) into {dest}/" in err
    assert f"${WEIGHTS_ENV}" in err and len(err.splitlines()) == 1


def test_the_script_cut_short_by_the_network_says_so(online, monkeypatch, hub_folder, tmp_path, capsys):
    FakeHub(monkeypatch, hub_folder, fail_after=3)

    assert download_main(["--dest", str(tmp_path / "weights")]) == 2
    assert "(ConnectionError: Connection reset by peer)" in capsys.readouterr().err


def test_the_script_lets_other_failures_through(online, monkeypatch, hub_folder, tmp_path):
    FakeHub(monkeypatch, hub_folder, error=RuntimeError("a bug"))

    with pytest.raises(RuntimeError, match="a bug"):
        download_main(["--dest", str(tmp_path / "weights")])


def test_the_script_offline_by_switch_ends_without_a_traceback(tmp_path):
    result = subprocess.run(
        [str(REPO_ROOT / "script" / "download-weights"), "--dest", str(tmp_path / "weights")],
        env={**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )

    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: could not download {DEFAULT_REPO} from the Hugging Face hub: HF_HUB_OFFLINE is set"
    )
    assert f"unset HF_HUB_OFFLINE and run {DOWNLOAD_COMMAND} again" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "weights").exists()
