"""Loading a Stable Diffusion weights folder (diffusers layout) for inference, offline and pickle-free.

Two families are served, told apart by ``model_index.json``'s ``_class_name`` (:data:`FAMILIES`):

- ``StableDiffusionPipeline``: any SD 1.x/2.x folder, community fine-tunes included, with the ``unet``,
  ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler`` sub-folders;
- ``StableDiffusionXLPipeline``: SDXL base (and its fine-tunes), which adds ``text_encoder_2`` and
  ``tokenizer_2``. The SDXL refiner (``StableDiffusionXLImg2ImgPipeline``, or ``requires_aesthetics_score``,
  or no ``text_encoder``) is refused: it only refines the base model's images.

Every model has ``.safetensors`` weights (plain or the ``fp16`` variant). ``safety_checker`` and
``feature_extractor`` are optional. For SD they are the pipeline's own components. diffusers' SDXL pipeline
has no safety checker, so for SDXL they hold SD's checker (``CompVis/stable-diffusion-safety-checker``, as
``script/download-weights`` puts it there): :func:`load_pipeline` attaches it to the pipeline as a
:class:`SafetyCheck`, which :func:`~faster_diffusion.app.generate.generate` runs on the decoded images, as
Replicate's own SDXL model does.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import reference
from ..calibration import weights_folder
from ..families import FAMILIES, SD, SDXL, SDXL_REFINER_PIPELINE, Family

logger = logging.getLogger(__name__)

#: Stable Diffusion's usual classifier-free guidance scale: the default but for the reference models.
DEFAULT_GUIDANCE = 7.5
#: The environment variable that names the weights folder.
WEIGHTS_ENV = "FASTER_DIFFUSION_WEIGHTS"
#: The default weights folder, relative to the working directory.
DEFAULT_WEIGHTS_DIR = "weights"
#: The command that fills the weights folder.
DOWNLOAD_COMMAND = "script/download-weights"

_SAFETY = ("safety_checker", "feature_extractor")


class WeightsError(RuntimeError):
    """A weights folder that is missing or cannot be used. The message names the folder and the fix."""


def default_weights_dir() -> Path:
    """``$FASTER_DIFFUSION_WEIGHTS`` if set, else ``weights/``."""
    return Path(os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS_DIR)


@dataclass(frozen=True)
class WeightsFolder:
    """A checked weights folder: where it is, its family, which variant it holds, whether it has a safety
    checker."""

    path: Path
    family: Family
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
    family = _family(path, index, fill)
    _check_unet_family(path, family, fill)
    missing = [name for name in family.required if not (path / name).is_dir()]
    if missing:
        raise WeightsError(f"{path} is incomplete: missing {', '.join(missing)}. {fill}")
    variants = set()
    for name in family.models:
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
    if family is SD:
        checker = checker and _has_component(path, index, "safety_checker", fill)
    else:  # not a component of the pipeline: the folders alone say
        checker = checker and any((path / "safety_checker").glob("*.safetensors"))
    return WeightsFolder(path=path, family=family, variant=variants.pop(), has_safety_checker=checker)


def _family(path: Path, index: dict[str, Any], fill: str) -> Family:
    """The family that ``model_index.json`` (``index``) names; :class:`WeightsError` for any other."""
    name = index.get("_class_name")
    supported = ", ".join(f"{f.pipeline} ({f.description})" for f in FAMILIES.values())
    no_text_encoder = not _has_component(path, index, "text_encoder", fill)
    refiner = name == SDXL_REFINER_PIPELINE or (
        name == SDXL.pipeline and (index.get("requires_aesthetics_score") is True or no_text_encoder)
    )
    if refiner:
        raise WeightsError(
            f"{path} holds the SDXL refiner ({name}), which is not supported: it only refines the SDXL base "
            f"model's images. Use the base model (stabilityai/stable-diffusion-xl-base-1.0). {fill}"
        )
    if not isinstance(name, str) or name not in FAMILIES:
        raise WeightsError(
            f"{path / 'model_index.json'} names the pipeline {name!r}, which is not supported; supported: "
            f"{supported}. {fill}"
        )
    return FAMILIES[name]


def _has_component(path: Path, index: dict[str, Any], name: str, fill: str) -> bool:
    """Whether ``model_index.json`` (``index``) lists component ``name``: an entry ``[library, class]``, not
    absent or ``[null, null]``. :class:`WeightsError` for an entry of another form (``null`` included, which
    diffusers cannot load)."""
    if name not in index:
        return False
    entry = index[name]
    if not isinstance(entry, list) or len(entry) != 2:
        raise WeightsError(
            f"{path / 'model_index.json'}: {name} must be [library, class] (or [null, null]), got "
            f"{json.dumps(entry)}. {fill}"
        )
    return entry[0] is not None


def _check_unet_family(path: Path, family: Family, fill: str) -> None:
    """:class:`WeightsError` when the UNet's config says SDXL (``addition_embed_type`` ``"text_time"``) and
    ``model_index.json`` names another pipeline, or the other way round. A config that cannot be read is left
    to the loader to report."""
    try:
        config = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(config, dict):
        return
    sdxl_unet = config.get("addition_embed_type") == "text_time"
    if sdxl_unet == (family is SDXL):
        return
    holds = (
        "SDXL weights (its UNet takes SDXL's 'text_time' embeddings)"
        if sdxl_unet
        else "a UNet without SDXL's 'text_time' embeddings"
    )
    expected = SDXL if sdxl_unet else SD
    raise WeightsError(
        f"{path} holds {holds}, but {path / 'model_index.json'} names the pipeline {family.pipeline!r}; "
        f"{expected.description}'s is {expected.pipeline!r}. {fill}"
    )


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
    """Load the folder's pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, see
    :data:`FAMILIES`) from a local folder: no hub access, safetensors only.

    On CUDA the pipeline runs in fp16 with xformers attention when xformers imports, else PyTorch's SDPA
    (diffusers' default); on the CPU in fp32. A folder without a safety checker loads without one (logged).
    SDXL's safety checker is attached as a :class:`SafetyCheck` (:func:`safety_check_of`).
    """
    import diffusers

    weights = inspect_weights(folder if folder is not None else default_weights_dir())
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    checked = safety_checker and weights.has_safety_checker
    if safety_checker and not weights.has_safety_checker:
        logger.warning("%s has no safety checker; running without one", weights.path)
    extra: dict[str, Any] = {}
    if weights.family is SD and not checked:
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline_class = getattr(diffusers, weights.family.pipeline)
    check = None
    try:
        pipe = pipeline_class.from_pretrained(
            weights.path,
            local_files_only=True,
            use_safetensors=True,
            variant=weights.variant,
            dtype=dtype,
            **extra,
        )
        if weights.family is not SD and checked:
            check = SafetyCheck.load(weights.path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as error:
        raise WeightsError(
            f"Could not load the weights in {weights.path}: {error}. Fill it again with `{DOWNLOAD_COMMAND}`."
        ) from error
    pipe = pipe.to(device)
    if check is not None:
        attach_safety_check(pipe, check.to(device))
    if device.type == "cuda":
        enable_fast_attention(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ SDXL's checker

#: The attribute under which :func:`attach_safety_check` keeps a pipeline's :class:`SafetyCheck`. It is not a
#: pipeline component: ``pipe.components`` (and a pipeline built from them) leaves it out.
SAFETY_CHECK_ATTRIBUTE = "faster_diffusion_safety_check"


@dataclass
class SafetyCheck:
    """SD's safety checker, run on the decoded images of a pipeline that has none of its own (SDXL).

    It does what ``StableDiffusionPipeline`` does with its checker: the feature extractor's pixel values go
    through ``StableDiffusionSafetyChecker``; a flagged image is blacked out and reported.
    """

    checker: Any  # StableDiffusionSafetyChecker
    feature_extractor: Any  # CLIPImageProcessor

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype) -> SafetyCheck:
        """Load ``folder``'s ``safety_checker/`` and ``feature_extractor/`` (safetensors only, offline)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor

        weights = sorted(p.name for p in (folder / "safety_checker").glob("*.safetensors"))
        variant = "fp16" if weights and all(".fp16." in name for name in weights) else None
        options = dict(local_files_only=True, use_safetensors=True, variant=variant, dtype=dtype)
        checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", **options)
        extractor = AutoImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
        return cls(checker=checker.eval(), feature_extractor=extractor)

    def to(self, device: torch.device) -> SafetyCheck:
        self.checker.to(device)
        return self

    def __call__(self, images: list[Any]) -> tuple[list[Any], list[bool]]:
        """``images`` (PIL, or diffusers' ``"np"`` arrays: height x width x 3 in 0..1) with the flagged ones
        blacked out, and which were flagged."""
        from diffusers.image_processor import VaeImageProcessor
        from PIL import Image

        parameter = next(self.checker.parameters())
        pils = [
            image if isinstance(image, Image.Image) else VaeImageProcessor.numpy_to_pil(image)[0]
            for image in images
        ]
        pixels = self.feature_extractor(pils, return_tensors="pt").pixel_values
        with torch.no_grad():
            _, flags = self.checker(
                clip_input=pixels.to(parameter.device, parameter.dtype),
                images=[np.asarray(image) for image in pils],
            )
        flags = [bool(flag) for flag in flags]
        checked = [
            (Image.new(image.mode, image.size) if isinstance(image, Image.Image) else np.zeros_like(image))
            if flagged
            else image
            for image, flagged in zip(images, flags, strict=True)
        ]
        return checked, flags


def attach_safety_check(pipe: Any, check: SafetyCheck | None) -> None:
    """Give ``pipe`` (one without a checker of its own) ``check``, run by
    :func:`~faster_diffusion.app.generate.generate` on its images; ``None`` takes it away."""
    object.__setattr__(pipe, SAFETY_CHECK_ATTRIBUTE, check)


def safety_check_of(pipe: Any) -> SafetyCheck | None:
    """The :class:`SafetyCheck` attached to ``pipe``, if any."""
    return getattr(pipe, SAFETY_CHECK_ATTRIBUTE, None)


def has_safety_checker(pipe: Any) -> bool:
    """Whether ``pipe`` checks its images: its own safety checker (SD) or an attached one (SDXL)."""
    return getattr(pipe, "safety_checker", None) is not None or safety_check_of(pipe) is not None


def without_safety_checker(pipe: Any) -> Any:
    """A second pipeline over ``pipe``'s models that checks nothing (``pipe`` itself is left alone)."""
    if getattr(pipe, "safety_checker", None) is not None:  # SD: the checker is a component
        components = {**pipe.components, "safety_checker": None, "feature_extractor": None}
        unchecked = type(pipe)(**components, requires_safety_checker=False)
    else:  # SDXL: the components leave out the attached check; the settings are passed on as they are
        parameters = inspect.signature(type(pipe)).parameters
        settings = [name for name in parameters if name in pipe.config and name not in pipe.components]
        options = {name: pipe.config[name] for name in settings}
        if "add_watermarker" in parameters:
            options["add_watermarker"] = getattr(pipe, "watermark", None) is not None
        unchecked = type(pipe)(**pipe.components, **options)
    if "_name_or_path" in pipe.config:  # where it was loaded from: its saved calibrations are found there too
        unchecked.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    unchecked.set_progress_bar_config(disable=True)
    return unchecked


def model_size(pipe: Any) -> int:
    """The image size ``pipe``'s model was trained at, in pixels (diffusers' default when none is given):
    1024 for SDXL base, 512 for SD v1.5 and 2.x base, 768 for SD 2.x 768-v."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


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


def default_guidance(pipe: Any) -> float:
    """The guidance scale a request that gives none gets: the one chosen for a built-in reference model
    (:func:`faster_diffusion.reference.guidance_scale`), else Stable Diffusion's usual
    :data:`DEFAULT_GUIDANCE`. The command line and the Cog model both use it, so the same seed gives the same
    image from either."""
    folder = weights_folder(pipe)
    return reference.guidance_scale(folder) if reference.is_model_dir(folder) else DEFAULT_GUIDANCE


def check_trained_size(pipe: Any, width: int, height: int, inputs: str) -> None:
    """Refuse an output size a built-in reference model was not trained for (it draws several shapes, or
    none, at any size but :data:`faster_diffusion.reference.IMAGE_SIZE`). ``inputs`` names what set the size
    (for example ``"width and height"``, or ``"--image"``). Other weights take any size."""
    if not reference.is_model_dir(weights_folder(pipe)):
        return
    size = reference.IMAGE_SIZE
    if (width, height) != (size, size):
        raise ValueError(
            f"{inputs}: the built-in reference model draws {size}x{size} images only (it was trained at that "
            f"size, and draws several shapes or none at others), got {width}x{height}"
        )
