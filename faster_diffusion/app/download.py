"""Filling a weights folder from the Hugging Face hub: ``script/download-weights``.

Fetches a Stable Diffusion repository in diffusers layout (SD v1.5 by default) with ``snapshot_download``,
taking only what :func:`~faster_diffusion.app.loading.load_pipeline` reads: ``model_index.json`` and the
component folders, with ``.safetensors`` weights only (never ``.bin`` or ``.ckpt`` pickles, nor the
single-file checkpoints at the top of the repository), in the ``fp16`` variant when every model in the
repository offers it. The safety checker and its feature extractor come along when the repository has them.

    script/download-weights                                  # SD v1.5 into weights/
    script/download-weights --repo stabilityai/stable-diffusion-2-1-base --dest /data/sd21

The Cog model's setup calls :func:`fetch_at_setup`, which fills an empty or missing weights folder the same
way (an image built from a clean checkout has none), unless ``HF_HUB_OFFLINE=1`` or
``FASTER_DIFFUSION_FETCH_AT_SETUP=0`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .loading import DEFAULT_WEIGHTS_DIR, WEIGHTS_ENV, WeightsError, default_weights_dir, inspect_weights

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

#: The folders ``StableDiffusionPipeline`` loads; the first five are required.
REQUIRED_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
OPTIONAL_FOLDERS = ("safety_checker", "feature_extractor")

#: ``name[.variant][-00001-of-00002].safetensors``: diffusers' names for (sharded, variant) weight files.
_WEIGHTS = re.compile(r"^[^./]+(?:\.(?P<variant>[^./-]+))?(?:-\d{5}-of-\d{5})?\.safetensors$")
#: ``name.safetensors.index[.variant].json``: the index of sharded safetensors weights.
_WEIGHTS_INDEX = re.compile(r"^[^./]+\.safetensors\.index(?:\.(?P<variant>[^./]+))?\.json$")
#: Configuration and tokenizer files (``config.json``, ``scheduler_config.json``, ``vocab.json``,
#: ``merges.txt``, ...); weight indexes are matched separately.
_SETTINGS = re.compile(r"^[^/]+\.(?:json|txt)$")


def choose_files(listing: Iterable[str]) -> tuple[list[str], str | None]:
    """The files of a repository ``listing`` to download, and the weight variant chosen (``"fp16"`` or None).

    Raises ``ValueError`` when a required folder is missing or a model folder has no ``.safetensors``.
    """
    listing = sorted(set(listing))
    folders: dict[str, list[str]] = {}
    for path in listing:
        folder, _, name = path.rpartition("/")
        if folder in REQUIRED_FOLDERS + OPTIONAL_FOLDERS:
            folders.setdefault(folder, []).append(name)
    missing = [folder for folder in REQUIRED_FOLDERS if folder not in folders]
    if "model_index.json" not in listing or missing:
        what = ", ".join((["model_index.json"] if "model_index.json" not in listing else []) + missing)
        raise ValueError(f"not a diffusers Stable Diffusion repository: it has no {what}")

    def weight_variants(names: list[str]) -> set[str | None]:
        return {match["variant"] for match in map(_WEIGHTS.match, names) if match}

    models = {folder: weight_variants(names) for folder, names in folders.items() if _has_weights(names)}
    for folder in ("unet", "vae", "text_encoder"):
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


def download(repo: str, dest: Path, *, revision: str | None = None) -> Path:
    """Download ``repo`` into ``dest`` (see :func:`choose_files`) and check the result loads as a folder."""
    from huggingface_hub import HfApi, snapshot_download

    listing = HfApi().list_repo_files(repo, revision=revision)
    files, variant = choose_files(listing)
    print(f"Downloading {len(files)} files of {repo} ({variant or 'full-precision'} weights) into {dest}/")
    snapshot_download(repo, revision=revision, allow_patterns=files, local_dir=dest)
    inspect_weights(dest)
    write_source(dest, repo, revision)
    return dest


#: Where :func:`download` records the repository a weights folder came from (read by :func:`read_source`).
SOURCE_FILE = "faster_diffusion_source.json"


def write_source(folder: Path, repo: str, revision: str | None = None) -> None:
    (Path(folder) / SOURCE_FILE).write_text(json.dumps({"repo": repo, "revision": revision}) + "\n")


def read_source(folder: str | Path | None) -> str | None:
    """The repository ``folder`` was downloaded from by :func:`download`; ``None`` if it does not say."""
    if folder is None:
        return None
    try:
        repo = json.loads((Path(folder) / SOURCE_FILE).read_text()).get("repo")
    except (OSError, ValueError, AttributeError):
        return None
    return repo if isinstance(repo, str) else None


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
    print(f"Done: {dest}/ holds {args.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
