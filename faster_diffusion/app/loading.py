"""Loading a Stable Diffusion weights folder (diffusers layout) for inference, offline and pickle-free.

Any SD 1.x/2.x folder in diffusers layout works, community fine-tunes included: ``model_index.json`` and the
``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` sub-folders, with ``.safetensors``
weights (plain or the ``fp16`` variant). ``safety_checker`` and ``feature_extractor`` are optional.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: The environment variable that names the weights folder.
WEIGHTS_ENV = "FASTER_DIFFUSION_WEIGHTS"
#: The default weights folder, relative to the working directory.
DEFAULT_WEIGHTS_DIR = "weights"
#: The command that fills the weights folder.
DOWNLOAD_COMMAND = "script/download-weights"

_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_MODELS = ("unet", "vae", "text_encoder")
_SAFETY = ("safety_checker", "feature_extractor")


class WeightsError(RuntimeError):
    """A weights folder that is missing or cannot be used. The message names the folder and the fix."""


def default_weights_dir() -> Path:
    """``$FASTER_DIFFUSION_WEIGHTS`` if set, else ``weights/``."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


@dataclass(frozen=True)
class WeightsFolder:
    """A checked weights folder: where it is, which variant it holds, whether it has a safety checker."""

    path: Path
    variant: str | None
    has_safety_checker: bool


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` looks like a usable weights folder (without loading anything)."""
    try:
        inspect_weights(folder)
    except WeightsError:
        return False
    return True


def inspect_weights(folder: str | os.PathLike) -> WeightsFolder:
    """Check a weights folder without loading it; raise :class:`WeightsError` saying what is wrong."""
    path = Path(folder)
    fill = (
        f"Fill it with `{DOWNLOAD_COMMAND}` (or point {WEIGHTS_ENV} at a diffusers Stable Diffusion folder)."
    )
    if not path.is_dir():
        raise WeightsError(f"No weights folder at {path}. {fill}")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise WeightsError(f"{path} is not a diffusers weights folder: it has no model_index.json. {fill}")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"{index_file} cannot be read ({error}). {fill}") from error
    if not isinstance(index, dict):
        raise WeightsError(f"{index_file} is not a JSON object. {fill}")
    missing = [name for name in _REQUIRED if not (path / name).is_dir()]
    if missing:
        raise WeightsError(f"{path} is incomplete: missing {', '.join(missing)}. {fill}")
    variants = set()
    for name in _MODELS:
        files = sorted(p.name for p in (path / name).glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in (path / name).glob("*.bin")) + sorted(
                p.name for p in (path / name).glob("*.ckpt")
            )
            found = f" (it has {', '.join(pickles)}; pickle files are never loaded)" if pickles else ""
            raise WeightsError(f"{path / name} has no .safetensors weights{found}. {fill}")
        variants.add("fp16" if all(".fp16." in f for f in files) else None)
    if len(variants) > 1:
        raise WeightsError(f"{path} mixes fp16-only and full-precision weight files across models. {fill}")
    checker = (path / "safety_checker").is_dir() and (path / "feature_extractor").is_dir()
    checker = checker and index.get("safety_checker", [None, None])[0] is not None
    return WeightsFolder(path=path, variant=variants.pop(), has_safety_checker=checker)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU, fp32 on the CPU (fp16 convolutions on the CPU are slow and not always supported)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(
    folder: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    safety_checker: bool = True,
) -> Any:
    """Load a ``StableDiffusionPipeline`` from a local folder: no hub access, safetensors only.

    On CUDA the pipeline runs in fp16 with xformers attention when xformers imports, else PyTorch's SDPA
    (diffusers' default); on the CPU in fp32. A folder without a safety checker loads without one (logged).
    """
    from diffusers import StableDiffusionPipeline

    weights = inspect_weights(folder if folder is not None else default_weights_dir())
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    extra: dict[str, Any] = {}
    if not (safety_checker and weights.has_safety_checker):
        if safety_checker:
            logger.warning("%s has no safety checker; running without one", weights.path)
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            weights.path,
            local_files_only=True,
            use_safetensors=True,
            variant=weights.variant,
            dtype=dtype,
            **extra,
        )
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        raise WeightsError(
            f"Could not load the weights in {weights.path}: {error}. Fill it again with `{DOWNLOAD_COMMAND}`."
        ) from error
    pipe = pipe.to(device)
    if device.type == "cuda":
        enable_fast_attention(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def enable_fast_attention(pipe: Any) -> str:
    """xformers memory-efficient attention when it imports and works, else PyTorch SDPA. Returns which."""
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "sdpa"
    try:
        pipe.enable_xformers_memory_efficient_attention()
    except Exception as error:  # xformers present but not usable with this GPU or build
        logger.warning("xformers is installed but not usable (%s); using PyTorch SDPA attention", error)
        return "sdpa"
    return "xformers"
