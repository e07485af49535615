"""The work behind the Cog predictor: ``predict.py`` only declares the inputs and maps them to a request.

- :func:`check_inputs` checks every ``run()`` input against its ``cog.Input`` declaration (type, choices,
  bounds), as Cog's schema would: the Cog server validates nothing when it runs without the schema that
  ``cog build`` generates (for example ``python -m cog.server.http`` in a checkout).
- :class:`TextToImage` holds the loaded pipeline and runs a request with faster diffusion and, to compare,
  with stock diffusers; a cancel stops it between steps (:mod:`.cancel`). It drops images the safety checker
  flags, prints what it did, and reports metrics.
- :func:`save_images` writes the outputs as ``out-{i}.{ext}``, or ``faster-{i}.{ext}`` and ``stock-{i}.{ext}``
  when comparing (Replicate lists uploaded outputs in the order their uploads finish; the names keep them
  apart).
"""

from __future__ import annotations

import inspect
import math
import secrets
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import diffusers
import transformers
from cog import FieldInfo

from ..policy import DEFAULT_KEY_STEPS, DEFAULT_MODE, resolve_key_steps
from ..schedule import CalibrationError
from .branch import check_branch_choice
from .branch import choose_branch as choose_branch_for
from .cancel import StoppedBetweenSteps, run_stoppable
from .generate import (
    MAX_SEED,
    GenerationRequest,
    GenerationResult,
    check_for_model,
    describe_speedup,
    faster_config,
    generate,
    prepare_key_steps,
    warm_up,
)
from .loading import (
    default_guidance,
    default_weights_dir,
    has_safety_checker,
    load_pipeline,
    model_size,
    without_safety_checker,
)
from .lora import DEFAULT_SCALE, use_lora

#: The command that puts the weights and their calibrations in place before ``cog build``.
PREPARE_COMMAND = "script/prepare-weights"
#: Pillow's name for each output format.
IMAGE_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
#: How output file names start: ``out`` alone, ``faster`` and ``stock`` when comparing.
OUTPUT_PREFIXES = ("out", "faster", "stock")


class NSFWError(RuntimeError):
    """The safety checker flagged every image of a run."""


# ------------------------------------------------------------------------------------------------ inputs


def check_inputs(run: Callable[..., Any], declarations: type, values: Mapping[str, Any]) -> None:
    """Check the ``values`` of ``run``'s parameters against their ``Input(...)`` declarations.

    ``declarations`` is the class that holds one ``Input(...)`` per parameter, by name: the server replaces
    ``run``'s own defaults with plain values when it loads the predictor, so they cannot be read from there.
    Checks the type from ``run``'s annotation (``str``, ``int``, ``float``, ``bool``, a path, optionally
    ``| None``), the choices and the ``ge``/``le`` bounds. Raises ``ValueError`` naming the input, the value
    and what is allowed.
    """
    for name, parameter in inspect.signature(run).parameters.items():
        spec = getattr(declarations, name, None)
        if isinstance(spec, FieldInfo):
            _check_input(name, values[name], parameter.annotation, spec)


def _check_input(name: str, value: Any, annotation: Any, spec: FieldInfo) -> None:
    kinds = set(annotation.__args__) if isinstance(annotation, types.UnionType) else {annotation}
    if value is None:
        if type(None) not in kinds:
            raise ValueError(f"{name} is required")
        return
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool:
        valid = isinstance(value, bool)
        expected = "true or false"
    elif kind is int:
        valid = isinstance(value, int) and not isinstance(value, bool)
        expected = "a whole number"
    elif kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        expected = "a finite number"
    elif isinstance(kind, type) and issubclass(kind, PurePath):
        valid = isinstance(value, PurePath)
        expected = "a file"
    else:
        valid = isinstance(value, kind)
        expected = "text" if kind is str else kind.__name__
    if not valid:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(repr(choice) for choice in spec.choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    low, high = spec.ge, spec.le
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")
        bound = f">= {low}" if low is not None else f"<= {high}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def check_mode_inputs(
    mode: str,
    branch: int,
    max_decoder_batch: int,
    choose_branch: bool = False,
    image: bool = False,
    forecast: bool = False,
) -> None:
    """Refuse settings of one reuse mode given to the other, and a branch choice it cannot serve
    (:func:`~faster_diffusion.app.branch.check_branch_choice`), naming the input (before anything runs).
    ``image``: whether an input image was given."""
    if mode != "deep" and branch:
        raise ValueError(f"branch applies to mode 'deep' only, got branch {branch} with mode {mode!r}")
    if choose_branch:
        if branch:
            raise ValueError(f"choose_branch chooses the branch: leave branch at 0, got {branch}")
        check_branch_choice(mode == "deep", image, int(forecast), "choose_branch")
    if mode == "deep" and max_decoder_batch:
        raise ValueError(
            "max_decoder_batch applies to mode 'encoder' only (deep reuse runs one step at a time), got "
            f"{max_decoder_batch}"
        )


def describe_unused_size(request: GenerationRequest, width: int | None, height: int | None) -> str | None:
    """One line for the log when ``width`` or ``height`` was given with an input image, which sets the output
    size instead (as in Replicate's Stable Diffusion models); ``None`` otherwise."""
    given = [f"{name} {value}" for name, value in (("width", width), ("height", height)) if value is not None]
    if request.image is None or not given:
        return None
    verb = "are" if len(given) == 2 else "is"
    output_width, output_height = request.output_size
    return (
        f"{' and '.join(given)} {verb} not used with an image: the outputs have its size, "
        f"{output_width}x{output_height}"
    )


def random_seed() -> int:
    """A seed for a request that gave none."""
    return secrets.randbelow(MAX_SEED + 1)


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    """What one prediction made: the images to return and the runs behind them."""

    #: The images that passed the safety checker: the faster ones, then (when comparing) the stock ones.
    images: list[Any]
    faster: GenerationResult
    #: The stock diffusers run, when comparing.
    stock: GenerationResult | None
    #: The file name of each image, without extension: ``out-{i}``, or ``faster-{i}`` and ``stock-{i}`` when
    #: comparing, where ``i`` is the image's number in its run (a gap marks an image that was left out).
    names: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, int | float]:
        """Pass counts and UNet-loop seconds of the faster run (and of the baseline, with the speedup)."""
        stats = self.faster.stats
        metrics: dict[str, int | float] = {
            "full_passes": stats.full_passes,
            "partial_passes": stats.partial_passes,
            # The former names, kept for clients that read them (docs/cog.md): full passes, and every step.
            "encoder_passes": stats.full_passes,
            "decoder_passes": stats.full_passes + stats.partial_passes,
            "unet_seconds": self.faster.loop_seconds,
        }
        if self.stock is not None:
            metrics["baseline_unet_seconds"] = self.stock.loop_seconds
            metrics["speedup"] = self.stock.loop_seconds / self.faster.loop_seconds
        metrics["image_output_count"] = len(self.images)
        return {key: value for key, value in metrics.items() if math.isfinite(value)}


class TextToImage:
    """A loaded Stable Diffusion (SD 1.x/2.x or SDXL) pipeline, served with faster diffusion."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        # The same modules without the safety checker, for requests that turn it off: a second pipeline object
        # over the shared components, so that neither a reload nor a change to ``pipe`` is needed per request.
        self.pipe_without_checker = without_safety_checker(pipe) if has_safety_checker(pipe) else pipe

    @property
    def default_size(self) -> int:
        """The width and height of a request that gives none: the size the model was trained at
        (:func:`~faster_diffusion.app.loading.model_size`: 1024 for SDXL, 512 for SD v1.5). A Cog default
        cannot follow the loaded weights (``cog build`` reads it as a literal), so the inputs default to
        blank, meaning this."""
        return model_size(self.pipe)

    @property
    def default_guidance(self) -> float:
        """The guidance scale of a request that gives none (:func:`~.loading.default_guidance`): 7.5, or the
        one chosen for a built-in reference model, as on the command line."""
        return default_guidance(self.pipe)

    def prepare_default_key_steps(
        self, sampler: str = "DDIM-50", mode: str = DEFAULT_MODE, *, calibrate: bool = True
    ) -> str:
        """The default key steps of ``sampler`` at its own step count, in reuse ``mode`` (by default
        :data:`~faster_diffusion.policy.DEFAULT_MODE`), described; ``auto`` ones are read from the saved
        calibration. With none saved, ``calibrate`` makes and saves it (``script/prepare-weights``, before
        ``cog build``); ``calibrate=False`` raises :class:`~faster_diffusion.schedule.CalibrationError`
        instead, measuring nothing. Defaults that need no calibration measure nothing either way."""
        keys = resolve_key_steps(DEFAULT_KEY_STEPS, self.pipe, sampler, mode=mode)
        request = GenerationRequest(prompt="-", sampler=sampler, faster=faster_config(keys, mode=mode))
        prepared = prepare_key_steps(self.pipe, request, calibrate=calibrate)
        calls = "" if prepared.unet_calls is None else f" ({prepared.describe_sampler()})"
        return prepared.schedule.describe() + calls

    def check_default_key_steps(
        self, samplers: Sequence[str], modes: Sequence[str] = (DEFAULT_MODE,)
    ) -> list[str]:
        """What the Cog setup does about key steps: look the default of each sampler in each reuse mode up and
        log it, measuring nothing. Returns ``"<sampler>, mode <mode>"`` for each calibration that is missing
        (logged with a warning: its first request calibrates first)."""
        missing = []
        for mode in modes:
            for sampler in samplers:
                which = f"{sampler}, mode {mode}"
                try:
                    described = self.prepare_default_key_steps(sampler, mode, calibrate=False)
                    print(f"Default key steps for {which}: {described}")
                except CalibrationError as error:
                    missing.append(which)
                    print(
                        f"Warning: {error}: the first request with the default key steps, {sampler} and mode "
                        f"{mode} calibrates first. Run {PREPARE_COMMAND} before cog build to put it in the "
                        "image."
                    )
        return missing

    def key_steps(
        self, text: str, sampler: str, mode: str = DEFAULT_MODE, num_steps: int | None = None
    ) -> Any:
        """The key-step input as given, or, for ``'default'``, the policy's key steps for these weights, reuse
        ``mode`` and step count (``None``: the sampler's own), by
        :func:`~faster_diffusion.policy.resolve_key_steps`."""
        if text.strip().lower() == DEFAULT_KEY_STEPS:
            return resolve_key_steps(text, self.pipe, sampler, num_steps, mode)
        return text

    @classmethod
    def load(cls, folder: str | Path | None = None) -> TextToImage:
        """Load ``folder`` (default: ``$FASTER_DIFFUSION_WEIGHTS`` or ``weights/``); print what was loaded.

        Raises :class:`~faster_diffusion.app.loading.WeightsError`, naming the folder and the command that
        fills it, when the folder is missing or unusable.
        """
        folder = (Path(folder) if folder is not None else default_weights_dir()).absolute()
        # Loading progress bars would fill the server's setup log with carriage-return redraws.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        pipe = load_pipeline(folder)
        attention = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
        checker = "on" if has_safety_checker(pipe) else f"none ({folder} has no safety checker)"
        if hasattr(pipe, "watermark"):  # SDXL: diffusers adds its watermarker when the package is installed
            marker = "on" if pipe.watermark is not None else "none (invisible-watermark is not installed)"
            checker += f"; watermark: {marker}"
        print(
            f"Loaded {folder} ({type(pipe).__name__}, {model_size(pipe)} px by default) on "
            f"{pipe.device.type} ({str(pipe.unet.dtype).removeprefix('torch.')}, attention: "
            f"{', '.join(attention)}); "
            f"safety checker: {checker}"
        )
        return cls(pipe)

    def generate(
        self,
        request: GenerationRequest,
        *,
        safety_checker: bool = True,
        compare: bool = False,
        lora_weights: str | None = None,
        lora_scale: float = DEFAULT_SCALE,
        choose_branch: bool = False,
    ) -> Outcome:
        """Run ``request`` with faster diffusion and, when ``compare``, with stock diffusers (same seed).

        ``choose_branch``: deep reuse's branch and full steps are chosen for the model at the cost of the
        request's key steps at branch 0 (:func:`~faster_diffusion.app.branch.choose_branch`; partial steps are
        timed once per process and size).

        ``lora_weights`` (a URL or a path to a ``.safetensors`` LoRA; ``None`` or blank: none) is put on the
        pipeline at ``lora_scale`` first, or kept if it is there already at that scale, and ``auto`` key steps
        are placed for the LoRA'd model (:func:`~faster_diffusion.app.lora.use_lora`; the pipeline without the
        safety checker shares the modules). A LoRA that cannot be used raises
        :class:`~faster_diffusion.app.lora.LoraError`, a ``ValueError`` naming the input.

        Images flagged by the safety checker are dropped; :class:`NSFWError` if that leaves none.
        """
        check_for_model(self.pipe, request, choose_branch=choose_branch)
        use_lora(self.pipe, lora_weights, lora_scale)  # after the cheap checks: it may download
        request = prepare_key_steps(self.pipe, request)  # calibrates first for 'auto' if none is saved
        if choose_branch:  # at the cost of those key steps at branch 0
            request = choose_branch_for(self.pipe, request)
        schedule = request.schedule  # raises KeyStepError for key steps that do not fit the sampler's steps
        print(f"Sampler: {request.describe_sampler()}")
        print(f"Key steps: {schedule.describe()}")
        print(f"Noise injection: {request.faster.noise_injection.describe()}")
        if request.image is not None:
            print(request.describe_image_to_image())
        pipe = self.pipe if safety_checker else self.pipe_without_checker
        if compare:  # both timed runs start warm, so the speedup reported is fair
            warm_up(pipe, request)
        faster = _run(pipe, request, accelerate=True)
        print(faster.describe())
        stock = None
        if compare:
            stock = _run(pipe, request, accelerate=False)
            print(stock.describe())
            print(describe_speedup(faster, stock))
        runs = {"out": faster} if stock is None else {"faster": faster, "stock": stock}
        kept, names = [], []
        for label, run in runs.items():
            for index, (image, flagged) in enumerate(zip(run.images, run.nsfw, strict=True)):
                if flagged:
                    which = "" if stock is None else f"{label} "
                    print(f"NSFW content detected in {which}image {index}; it is left out")
                else:
                    kept.append(image)
                    names.append(f"{label}-{index}")
        if not kept:
            total = sum(len(run.images) for run in runs.values())
            raise NSFWError(
                f"NSFW content detected in all {total} outputs. Try running it again with a different "
                "prompt or seed."
            )
        return Outcome(images=kept, faster=faster, stock=stock, names=names)


def _run(pipe: Any, request: GenerationRequest, *, accelerate: bool) -> GenerationResult:
    """:func:`~faster_diffusion.app.generate.generate`, stopped between steps if this thread is
    interrupted."""

    def report(ended: BaseException | None) -> None:
        if isinstance(ended, StoppedBetweenSteps):
            run = "faster diffusion" if accelerate else "stock diffusers"
            steps = "steps" if request.unet_calls is None else "UNet calls"
            print(f"Canceled: {run} stopped after {ended.steps_done} of {request.calls_run} {steps}")

    return run_stoppable(
        lambda stop: generate(pipe, request, accelerate=accelerate, step_callback=stop.callback),
        on_interrupt=report,
    )


# ------------------------------------------------------------------------------------------------ outputs


def save_images(
    images: list[Any], folder: Path, output_format: str, quality: int, names: list[str] | None = None
) -> list[Path]:
    """Save ``images`` into ``folder`` as ``<name>.<ext>``; earlier outputs are removed.

    ``names`` are the file names without extension (:attr:`Outcome.names`); by default ``out-0``, ``out-1``,
    ... ``quality`` (0 to 100) applies to webp and jpg; png is lossless.
    """
    if output_format not in IMAGE_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(IMAGE_FORMATS)}, got {output_format!r}")
    folder.mkdir(parents=True, exist_ok=True)
    names = names if names is not None else [f"out-{index}" for index in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    for prefix in OUTPUT_PREFIXES:
        for old in folder.glob(f"{prefix}-*"):
            old.unlink()
    options = {} if output_format == "png" else {"quality": quality}
    paths = []
    for name, image in zip(names, images, strict=True):
        path = folder / f"{name}.{output_format}"
        image.save(path, format=IMAGE_FORMATS[output_format], **options)
        paths.append(path)
    return paths
