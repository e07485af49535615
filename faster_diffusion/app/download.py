"""Filling a weights folder from the Hugging Face hub: ``script/download-weights``.

Fetches a Stable Diffusion repository in diffusers layout (SD v1.5 by default) with ``snapshot_download``,
taking only what :func:`~faster_diffusion.app.loading.load_pipeline` reads: ``model_index.json`` and the
component folders, with ``.safetensors`` weights only (never ``.bin`` or ``.ckpt`` pickles, nor the
single-file checkpoints at the top of the repository), in the ``fp16`` variant when every model in the
repository offers it. The safety checker and its feature extractor come along when the repository has them.

SDXL base repositories (``text_encoder_2`` and ``tokenizer_2`` beside the SD folders) are fetched the same
way; the SDXL refiner is refused. diffusers' SDXL pipeline has no safety checker, so for SDXL the download
also takes SD's (:data:`SAFETY_CHECKER_REPO`, safetensors only) into ``safety_checker/`` and
``feature_extractor/``, which serving runs on the decoded images, as Replicate's own SDXL model does.

    script/download-weights                                  # SD v1.5 into weights/
    script/download-weights --repo stabilityai/stable-diffusion-2-1-base --dest /data/sd21
    script/download-weights --repo stabilityai/stable-diffusion-xl-base-1.0

The Cog model's setup calls :func:`fetch_at_setup`, which fills an empty or missing weights folder the same
way (an image built from a clean checkout has none), unless ``HF_HUB_OFFLINE=1`` or
``FASTER_DIFFUSION_FETCH_AT_SETUP=0`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..policy import SOURCE_FILE
from .loading import (
    DEFAULT_WEIGHTS_DIR,
    DOWNLOAD_COMMAND,
    SD,
    SDXL,
    WEIGHTS_ENV,
    Family,
    WeightsError,
    default_weights_dir,
    inspect_weights,
)

#: The environment variable that names the repository to download.
REPO_ENV = "FASTER_DIFFUSION_REPO"
#: SD v1.5 in diffusers layout. The original ``runwayml/stable-diffusion-v1-5`` is gone; this mirror serves
#: the same files.
DEFAULT_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: The environment variable that, set to 0, keeps the Cog model's setup from fetching weights.
FETCH_AT_SETUP_ENV = "FASTER_DIFFUSION_FETCH_AT_SETUP"
#: What an empty weights folder may still hold: the checkout's README (and hidden files).
PLACEHOLDERS = ("README.md",)
#: The weight variant taken when every model in the repository offers it.
PREFERRED_VARIANT = "fp16"

#: The folders ``StableDiffusionPipeline`` requires (SDXL's: ``SDXL.required``), and those it may have.
REQUIRED_FOLDERS = SD.required
OPTIONAL_FOLDERS = ("safety_checker", "feature_extractor")
#: SD's safety checker, fetched for SDXL weights (diffusers' SDXL pipeline has none), as Replicate's SDXL
#: model (replicate/cog-sdxl) runs it: a flat repository with ``config.json``, the weights and the feature
#: extractor's ``preprocessor_config.json``.
SAFETY_CHECKER_REPO = "CompVis/stable-diffusion-safety-checker"

#: ``name[.variant][-00001-of-00002].safetensors``: diffusers' names for (sharded, variant) weight files.
_WEIGHTS = re.compile(r"^[^./]+(?:\.(?P<variant>[^./-]+))?(?:-\d{5}-of-\d{5})?\.safetensors$")
#: ``name.safetensors.index[.variant].json``: the index of sharded safetensors weights.
_WEIGHTS_INDEX = re.compile(r"^[^./]+\.safetensors\.index(?:\.(?P<variant>[^./]+))?\.json$")
#: Configuration and tokenizer files (``config.json``, ``scheduler_config.json``, ``vocab.json``,
#: ``merges.txt``, ...); weight indexes are matched separately.
_SETTINGS = re.compile(r"^[^/]+\.(?:json|txt)$")


def repo_family(listing: Iterable[str]) -> Family:
    """The family of a repository, from its ``listing``: SDXL when it has ``text_encoder_2/`` or
    ``tokenizer_2/``, else SD (``model_index.json`` says for sure once downloaded: :func:`download` checks).

    Raises ``ValueError`` for the SDXL refiner (a second text encoder and no first one).
    """
    folders = {path.rpartition("/")[0] for path in listing}
    if not {"text_encoder_2", "tokenizer_2"} & folders:
        return SD
    if "text_encoder" not in folders:
        raise ValueError(
            "this is the SDXL refiner (text_encoder_2 without text_encoder), which is not supported: it only "
            "refines the SDXL base model's images; use stabilityai/stable-diffusion-xl-base-1.0"
        )
    return SDXL


def choose_files(listing: Iterable[str]) -> tuple[list[str], str | None]:
    """The files of a repository ``listing`` to download, and the weight variant chosen (``"fp16"`` or None).

    The folders are those of the repository's family (:func:`repo_family`). Raises ``ValueError`` when a
    required folder is missing or a model folder has no ``.safetensors``.
    """
    listing = sorted(set(listing))
    family = repo_family(listing)
    folders: dict[str, list[str]] = {}
    for path in listing:
        folder, _, name = path.rpartition("/")
        if folder in family.required + OPTIONAL_FOLDERS:
            folders.setdefault(folder, []).append(name)
    missing = [folder for folder in family.required if folder not in folders]
    if "model_index.json" not in listing or missing:
        what = ", ".join((["model_index.json"] if "model_index.json" not in listing else []) + missing)
        raise ValueError(f"not a diffusers Stable Diffusion repository: it has no {what}")

    def weight_variants(names: list[str]) -> set[str | None]:
        return {match["variant"] for match in map(_WEIGHTS.match, names) if match}

    models = {folder: weight_variants(names) for folder, names in folders.items() if _has_weights(names)}
    for folder in family.models:
        if folder not in models:
            raise ValueError(f"{folder}/ has no .safetensors weights (pickle files are never downloaded)")
    offered = all(PREFERRED_VARIANT in variants for variants in models.values())
    variant = PREFERRED_VARIANT if offered else None
    for folder, variants in models.items():
        if None not in variants and variant is None:
            only = ", ".join(sorted(variants))
            raise ValueError(f"{folder}/ has only {only} .safetensors weights and no full-precision ones")

    chosen = ["model_index.json"]
    for folder, names in sorted(folders.items()):
        for name in names:
            weights, index = _WEIGHTS.match(name), _WEIGHTS_INDEX.match(name)
            if weights or index:
                keep = (weights or index)["variant"] == variant
            else:
                keep = bool(_SETTINGS.match(name))
            if keep:
                chosen.append(f"{folder}/{name}")
    return chosen, variant


def _has_weights(names: list[str]) -> bool:
    return any(_WEIGHTS.match(name) for name in names)


def choose_checker_files(listing: Iterable[str], variant: str | None) -> dict[str, str]:
    """The files of :data:`SAFETY_CHECKER_REPO`'s ``listing`` to download, each with its place in a weights
    folder: ``config.json`` and the ``.safetensors`` weights into ``safety_checker/``,
    ``preprocessor_config.json`` into ``feature_extractor/``. The weights are in ``variant`` when the
    repository offers it, else full precision; unsharded, never pickles.

    Raises ``ValueError`` naming what the repository lacks.
    """
    listing = set(listing)
    weights = {m["variant"]: name for name in listing if (m := _WEIGHTS.match(name)) and "-of-" not in name}
    chosen = weights.get(variant) or weights.get(None)
    missing = [name for name in ("config.json", "preprocessor_config.json") if name not in listing]
    if chosen is None or missing:
        what = ", ".join(missing + ([] if chosen is not None else ["full-precision .safetensors weights"]))
        raise ValueError(f"the safety checker repository has no {what}")
    return {
        "config.json": "safety_checker/config.json",
        chosen: f"safety_checker/{chosen}",
        "preprocessor_config.json": "feature_extractor/preprocessor_config.json",
    }


def download_safety_checker(dest: Path, variant: str | None) -> None:
    """Download :data:`SAFETY_CHECKER_REPO` (:func:`choose_checker_files`) into ``dest``'s
    ``safety_checker/`` and ``feature_extractor/``."""
    from huggingface_hub import HfApi, snapshot_download

    files = choose_checker_files(HfApi().list_repo_files(SAFETY_CHECKER_REPO), variant)
    print(f"Downloading the safety checker {SAFETY_CHECKER_REPO} into {dest}/safety_checker/")
    staging = Path(tempfile.mkdtemp(prefix=".safety-checker-", dir=dest))
    try:
        snapshot_download(SAFETY_CHECKER_REPO, allow_patterns=list(files), local_dir=staging)
        for name, place in files.items():
            (dest / place).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).rename(dest / place)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(repo: str, dest: Path, *, revision: str | None = None) -> Path:
    """Download ``repo`` into ``dest`` (see :func:`choose_files`) and check the result loads as a folder."""
    from huggingface_hub import HfApi, snapshot_download

    listing = HfApi().list_repo_files(repo, revision=revision)
    files, variant = choose_files(listing)
    print(f"Downloading {len(files)} files of {repo} ({variant or 'full-precision'} weights) into {dest}/")
    snapshot_download(repo, revision=revision, allow_patterns=files, local_dir=dest)
    checker = None
    if repo_family(listing) is SDXL and not any(name.startswith("safety_checker/") for name in files):
        checker = SAFETY_CHECKER_REPO
        download_safety_checker(Path(dest), variant)
    inspect_weights(dest)
    write_source(dest, repo, revision, safety_checker=checker)
    return dest


def write_source(
    folder: Path, repo: str, revision: str | None = None, *, safety_checker: str | None = None
) -> None:
    """Record ``repo`` (and, when it came from elsewhere, the ``safety_checker`` repository)."""
    source: dict[str, str | None] = {"repo": repo, "revision": revision}
    if safety_checker is not None:
        source["safety_checker"] = safety_checker
    (Path(folder) / SOURCE_FILE).write_text(json.dumps(source) + "\n")


def is_unfilled(folder: Path) -> bool:
    """Whether ``folder`` is missing, or holds nothing but :data:`PLACEHOLDERS` and hidden files."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    return all(entry.name in PLACEHOLDERS or entry.name.startswith(".") for entry in folder.iterdir())


def download_into_place(repo: str, dest: Path, *, revision: str | None = None) -> Path:
    """:func:`download` ``repo`` into a temporary folder beside ``dest``, then move it into place.

    ``dest`` must be missing or unfilled (:func:`is_unfilled`). A download that fails or is cut short leaves
    ``dest`` as it was. Into an existing ``dest`` the folders are moved first and ``model_index.json`` last,
    so a move cut short leaves a folder that fails to load with a clear message, never a half one that loads.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-download-", dir=dest.parent))
    try:
        download(repo, staging, revision=revision)
        shutil.rmtree(staging / ".cache", ignore_errors=True)  # the hub's bookkeeping, for resumed downloads
        if not dest.exists():
            staging.rename(dest)
        else:
            for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == "model_index.json"):
                entry.rename(dest / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def setup_fetch_switched_off() -> str | None:
    """The offline switch that keeps setup from the hub (``HF_HUB_OFFLINE=1`` or
    ``FASTER_DIFFUSION_FETCH_AT_SETUP=0``), as text; None when neither is set."""
    offline = os.environ.get("HF_HUB_OFFLINE", "")
    if offline.strip().upper() in ("1", "ON", "YES", "TRUE"):  # as huggingface_hub reads it
        return f"HF_HUB_OFFLINE={offline} is set"
    fetch = os.environ.get(FETCH_AT_SETUP_ENV, "")
    if fetch.strip().upper() in ("0", "OFF", "NO", "FALSE"):
        return f"{FETCH_AT_SETUP_ENV}={fetch} is set"
    return None


def fetch_at_setup(folder: Path, repo: str | None = None) -> None:
    """Fill an empty or missing weights ``folder`` from the hub, as the Cog model's setup does.

    ``repo`` defaults to ``$FASTER_DIFFUSION_REPO`` or SD v1.5; the files are those that
    ``script/download-weights`` takes (:func:`choose_files`), moved into place once complete
    (:func:`download_into_place`). A folder with anything else in it is left alone, whole or broken: loading
    it then says what is wrong with it.

    Raises :class:`~faster_diffusion.app.loading.WeightsError` with the usual message (the folder and
    ``script/download-weights``) and why the hub was not used: an offline switch
    (:func:`setup_fetch_switched_off`), or the error of the fetch.
    """
    if not is_unfilled(folder):
        return
    try:
        inspect_weights(folder)
    except WeightsError as error:
        usual = str(error)
    else:  # unreachable: an unfilled folder has no model_index.json
        return
    switch = setup_fetch_switched_off()
    if switch is not None:
        raise WeightsError(f"{usual} Not fetched from the Hugging Face hub at setup: {switch}.")
    repo = repo or os.environ.get(REPO_ENV) or DEFAULT_REPO
    print(f"{folder} has no weights: fetching {repo} from the Hugging Face hub")
    try:
        download_into_place(repo, folder)
    except Exception as error:  # any failure of the hub or the network: reported with the usual message
        reason = f"{type(error).__name__}: {error}"
        raise WeightsError(
            f"{usual} Could not fetch {repo} from the Hugging Face hub at setup: {reason}"
        ) from error


def hub_unreachable(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain (it and those it was raised from) that says the Hugging Face hub could
    not be reached: no network, a host name that does not resolve, a timeout, ``HF_HUB_OFFLINE`` (the
    innermost such error); None when there is none."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    # huggingface_hub's offline mode raises a ConnectionError; its HTTP library (httpx2, httpx in earlier
    # versions) raises its own transport errors; snapshot_download raises LocalEntryNotFoundError from them.
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            kinds.append(importlib.import_module(module).TransportError)
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, tuple(kinds)):
            found = error
        error = error.__cause__ or error.__context__
    return found


def unreachable_message(repo: str, dest: Path, cause: BaseException) -> str:
    """What ``script/download-weights`` says when the hub could not be reached (``cause``: see
    :func:`hub_unreachable`): what failed, why, and how to retry or fill ``dest`` by hand."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(cause, OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set, so huggingface_hub does not go online"
        retry = f"unset HF_HUB_OFFLINE and run {DOWNLOAD_COMMAND} again"
    else:
        why = (
            f"the hub could not be reached ({type(cause).__name__}: {cause}): this machine seems to be "
            "offline, or huggingface.co is blocked (by a firewall, or behind a proxy: set HTTPS_PROXY)"
        )
        retry = f"run {DOWNLOAD_COMMAND} again once huggingface.co can be reached"
    return (
        f"could not download {repo} from the Hugging Face hub: {why}. To retry, {retry}. Or fill the weights "
        f"folder by hand: copy a diffusers Stable Diffusion folder (model_index.json, unet/, vae/, ...) into "
        f"{dest}/, or name one with ${WEIGHTS_ENV} or the command line's --weights."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="script/download-weights",
        description="Download Stable Diffusion weights in diffusers layout from the Hugging Face hub: "
        "safetensors only, fp16 where offered, with the safety checker when the repository has one.",
    )
    parser.add_argument(
        "--repo",
        default=os.environ.get(REPO_ENV) or DEFAULT_REPO,
        help=f"Hugging Face repository id (default: ${REPO_ENV} or {DEFAULT_REPO})",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help=f"weights folder (default: ${WEIGHTS_ENV} or {DEFAULT_WEIGHTS_DIR}/)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dest = args.dest or default_weights_dir()
    try:
        download(args.repo, dest, revision=args.revision)
    except (ValueError, WeightsError) as error:
        print(f"error: {args.repo}: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        cause = hub_unreachable(error)
        if cause is None:
            raise
        print(f"error: {unreachable_message(args.repo, dest, cause)}", file=sys.stderr)
        return 2
    print(f"Done: {dest}/ holds {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
