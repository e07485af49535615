"""One text-to-image or image-to-image request, run with faster diffusion or with stock diffusers, timed the
same way.

This is the layer the command line and the Cog predictor share: it maps a validated request onto a stock
``StableDiffusionPipeline`` call (or, with an input image, onto the image-to-image pipeline over the same
modules), attaching faster diffusion for that call only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..deep import DeepReuseConfig, deep_modules
from ..encoder import FasterDiffusionConfig
from ..engine import RunStats, remove_faster_diffusion
from ..families import family_of
from ..memory import AUTO
from ..modes import MODES, apply_faster_diffusion
from ..noise import PRIOR_NOISE_ALPHA, PRIOR_NOISE_TAU, NoiseInjection
from ..policy import parse_key_steps
from ..samplers import Sampler, make_scheduler, scheduler_config_of, use_sampler
from ..schedule import CalibrationError, KeyStepKind, KeySteps, KeyStepSchedule
from ..support import INJECTION_SCHEDULERS, SIGMA_SCALED_INJECTION_SCHEDULERS
from .images import MAX_PIXELS, MAX_SIDE, prepare_image, prepare_mask
from .loading import check_trained_size, safety_check_of
from .lora import loaded_lora

#: Largest seed accepted (torch generators take 64-bit seeds; this keeps seeds printable and portable).
MAX_SEED = 2**32 - 1
#: How much of an input image is replaced by default (Replicate's ``prompt_strength`` default).
DEFAULT_STRENGTH = 0.8


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate. Validated when built; every error names the field."""

    prompt: str | list[str]
    negative_prompt: str | None = None
    sampler: Sampler = Sampler.DDIM
    #: Sampler steps; ``None`` uses the sampler's own (``Sampler.default_steps``: 50 for DDIM and PNDM, 20 for
    #: the paper's DPM-Solvers, 25 for Replicate's other scheduler names).
    num_steps: int | None = None
    width: int = 512
    height: int = 512
    num_outputs: int = 1
    guidance_scale: float = 7.5
    seed: int = 0
    #: The faster-diffusion settings; used when the request is run with ``accelerate=True``.
    faster: FasterDiffusionConfig = field(default_factory=FasterDiffusionConfig)
    #: Image-to-image: the input image (a PIL image), or ``None`` for text-to-image. Checked and made ready by
    #: :func:`~faster_diffusion.app.images.prepare_image`: the outputs have its size, rounded down to a
    #: multiple of 8; ``width`` and ``height`` are not used.
    image: Any = None
    #: Image-to-image: how much of the image is replaced, 0 to 1 (1: all of it, from pure noise). The run
    #: takes the last ``int(steps * strength)`` steps of the sampler's schedule, as diffusers does.
    strength: float = DEFAULT_STRENGTH
    #: Inpainting: a mask of the input image's size (a PIL image; white is repainted, black kept), checked and
    #: made ready by :func:`~faster_diffusion.app.images.prepare_mask`; ``None`` repaints all of it. Needs
    #: ``image``; ``strength`` works as in image-to-image.
    mask: Any = None
    #: SDXL: mark the images with diffusers' invisible watermark (when ``invisible-watermark`` is installed,
    #: as in the Cog image). ``False`` leaves them unmarked. SD 1.x/2.x pipelines have no watermarker.
    watermark: bool = True
    #: For a sampler whose loop calls the UNet other than once a step (Heun: 2N - 1 calls for N steps; PNDM:
    #: N + 1 with SD's config), ``(calls, first)``: the UNet calls of the whole schedule and the index of the
    #: first that runs, which faster diffusion counts as its steps; set from the pipeline's scheduler config
    #: by :func:`with_unet_calls`. ``None``: one call a step.
    unet_calls: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be text or a non-empty list of texts, got {self.prompt!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text, got {self.negative_prompt!r}")
        object.__setattr__(self, "sampler", Sampler.parse(self.sampler))
        if self.num_steps is not None:
            _check_int("num_steps", self.num_steps, 1, 1000)
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(name, value, 8, MAX_SIDE)
            if value % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {value}")
        if self.image is None and self.width * self.height > MAX_PIXELS:
            raise ValueError(
                f"width x height must be at most {MAX_PIXELS} pixels (1024x1024; SDXL's sizes such as "
                f"1344x768 and 1536x640 fit), got {self.width}x{self.height} = {self.width * self.height}"
            )
        if not isinstance(self.watermark, bool):
            raise ValueError(f"watermark must be true or false, got {self.watermark!r}")
        _check_int("num_outputs", self.num_outputs, 1, 64)
        guidance = self.guidance_scale
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, (int, float))
            or not math.isfinite(guidance)
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance!r}")
        if guidance < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance}")
        _check_int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.faster, tuple(MODES)):
            known = ", ".join(cls.__name__ for cls in MODES)
            raise TypeError(f"faster must be the config of a reuse mode ({known}), got {self.faster!r}")
        strength = self.strength
        if (
            isinstance(strength, bool)
            or not isinstance(strength, (int, float))
            or not math.isfinite(strength)
        ):
            raise ValueError(f"strength must be a finite number, got {strength!r}")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        if self.image is not None:
            object.__setattr__(self, "image", prepare_image(self.image))
            check_image_to_image_steps(self.steps, strength)
        if self.mask is not None:
            if self.image is None:
                raise ValueError("mask needs an image: it marks which part of the image to repaint")
            object.__setattr__(self, "mask", prepare_mask(self.mask, size=self.image.size))

    @property
    def steps(self) -> int:
        return self.num_steps or self.sampler.default_steps

    @property
    def steps_run(self) -> int:
        """The steps the pipeline runs: all of them, or with an image the last ``int(steps * strength)``."""
        return self.steps if self.image is None else image_to_image_steps(self.steps, self.strength)

    @property
    def first_step(self) -> int:
        """The first step of the sampler's schedule that runs: 0, or with an image ``steps - steps_run``."""
        return self.steps - self.steps_run

    @property
    def calls_run(self) -> int:
        """The UNet calls of the loop that runs: :attr:`steps_run`, or the calls of :attr:`unet_calls`."""
        if self.unet_calls is None:
            return self.steps_run
        calls, first = self.unet_calls
        return calls - first

    def describe_sampler(self) -> str:
        """The sampler and its steps for logs, such as ``DDIM-50, 50 steps`` or ``HeunDiscrete, 25 steps (49
        UNet calls, each a step of the key steps)``."""
        line = f"{self.sampler.value}, {self.steps} steps"
        if self.unet_calls is not None:
            line += f" ({self.unet_calls[0]} UNet calls, each a step of the key steps)"
        return line

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the output images: the input image's, or ``width`` and ``height``."""
        return self.image.size if self.image is not None else (self.width, self.height)

    def describe_image_to_image(self) -> str | None:
        """One line for logs about the input image, or ``None`` for text-to-image."""
        if self.image is None:
            return None
        width, height = self.output_size
        kind = "Image-to-image" if self.mask is None else "Inpainting (white of the mask repainted)"
        return (
            f"{kind}: strength {self.strength:g}, {self.steps_run} of {self.steps} steps run, "
            f"output {width}x{height} (the input image's size)"
        )

    @property
    def schedule(self) -> KeyStepSchedule:
        """The key steps this request will use (raises ``KeyStepError`` if they do not fit the step count).

        With an image, the whole schedule's key steps cut to the steps that run, as faster diffusion cuts them
        (:meth:`~faster_diffusion.schedule.KeyStepSchedule.cut`). With :attr:`unet_calls`, over the UNet
        calls, as faster diffusion places them."""
        steps, first = self.unet_calls or (self.steps, self.first_step)
        return self.faster.key_steps.resolve(steps, start=first)


def with_unet_calls(pipe: Any, request: GenerationRequest) -> GenerationRequest:
    """``request`` with :attr:`~GenerationRequest.unet_calls` set when its sampler calls the UNet other than
    once a step, counted on a fresh scheduler of the sampler from ``pipe``'s scheduler config
    (:func:`~faster_diffusion.samplers.scheduler_config_of`; the
    image-to-image pipelines start at ``first_step`` times the scheduler's order, as diffusers'
    ``get_timesteps`` does)."""
    from ..calibration import scheduler_timesteps

    if request.sampler.one_call_per_step:
        return dataclasses.replace(request, unet_calls=None)
    scheduler = make_scheduler(request.sampler, scheduler_config_of(pipe))
    calls = len(scheduler_timesteps(scheduler, request.steps))
    first = request.first_step * int(getattr(scheduler, "order", 1))
    return dataclasses.replace(request, unet_calls=(calls, first))


def image_to_image_steps(steps: int, strength: float) -> int:
    """How many of a schedule's ``steps`` an image-to-image run takes at ``strength``: the last
    ``int(steps * strength)``, as diffusers' ``get_timesteps`` does."""
    return min(int(steps * strength), steps)


def check_image_to_image_steps(
    steps: int, strength: float, name: str = "strength", advice: str = ", or use more steps"
) -> None:
    """Raise ``ValueError`` naming input ``name`` when ``strength`` runs no step of ``steps``
    (:func:`image_to_image_steps` is 0); ``advice`` ends the message."""
    if image_to_image_steps(steps, strength) < 1:
        raise ValueError(
            f"{name} {strength} with {steps} steps runs no step (int({steps} * {strength}) = 0); "
            f"raise {name} so that steps * {name} >= 1{advice}"
        )


@dataclass(frozen=True)
class InputNames:
    """How the messages of :func:`check_sampler_choice` name the inputs: the Cog model's by default
    (:data:`COG_INPUTS`); the command line gives its flags."""

    sampler: str = "sampler"
    key_steps: str = "key_steps"
    #: Prior noise injection switched on, and how to switch it off.
    noise_on: str = "noise_injection on (mode 'encoder')"
    noise_off: str = "set noise_injection to false"
    choose_branch: str = "choose_branch"


#: The Cog model's input names.
COG_INPUTS = InputNames()

#: Why prior noise injection cannot work with a sampler's scheduler (:mod:`faster_diffusion.support`).
_NO_INJECTION = {
    Sampler.HEUN: "its second call of a step steps from the first call's sample",
    Sampler.PNDM: "its warm-up repeats a step",
    Sampler.UNIPC: "its corrector recomputes the sample",
}
#: How a sampler that calls the UNet other than once a step calls it.
_CALLS = {
    Sampler.HEUN: "2N - 1 times for N steps (twice a step but the last)",
    Sampler.PNDM: "N + 1 times for N steps with SD's config (its warm-up repeats a step)",
}


def injection_samplers() -> tuple[Sampler, ...]:
    """The samplers whose scheduler prior noise injection supports (:mod:`faster_diffusion.support`)."""
    supported = INJECTION_SCHEDULERS + SIGMA_SCALED_INJECTION_SCHEDULERS
    return tuple(sampler for sampler in Sampler if sampler.scheduler_class in supported)


def check_sampler_choice(
    sampler: Sampler | str, faster: Any, *, choose_branch: bool = False, names: InputNames = COG_INPUTS
) -> None:
    """Refuse, naming the inputs (``names``), what ``sampler`` cannot do with the reuse config ``faster``,
    before any model work: prior noise injection on a scheduler it does not support (the engine's
    :func:`~faster_diffusion.support.check_supported_scheduler` would refuse it at the run), and ``auto`` key
    steps or a branch choice (``choose_branch``), which need a calibration, on a sampler that calls the UNet
    other than once a step (:func:`~faster_diffusion.calibration.check_calibratable`)."""
    sampler = Sampler.parse(sampler)
    noise = faster.noise_injection
    if noise.enabled and noise.alpha > 0 and noise.tau > 0 and sampler not in injection_samplers():
        allowed = ", ".join(
            repr(name) for name in Sampler.names() if Sampler.parse(name) in injection_samplers()
        )
        raise ValueError(
            f"{names.sampler} {sampler.value!r} does not work with {names.noise_on}: the injection needs a "
            f"scheduler whose step advances from the sample it is given, and "
            f"{sampler.scheduler_class.__name__}'s does not ({_NO_INJECTION.get(sampler, 'not supported')}); "
            f"{names.noise_off}, or choose a {names.sampler} that supports it: {allowed}"
        )
    if sampler.one_call_per_step:
        return
    once = ", ".join(repr(name) for name in Sampler.names() if Sampler.parse(name).one_call_per_step)
    why = (
        f"it calls the UNet {_CALLS[sampler]}, and a calibration measures one call a step; {{fix}}, or "
        f"choose a {names.sampler} that calls the UNet once a step: {once}"
    )
    if faster.key_steps.kind is KeyStepKind.AUTO:
        fix = (
            f"give {names.key_steps} that need none, such as 'default' (for this sampler, none is "
            "calibrated), 'uniform:3' or a list of UNet calls"
        )
        raise ValueError(
            f"{names.key_steps} {str(faster.key_steps)!r} needs a calibration, which {names.sampler} "
            f"{sampler.value!r} cannot have: " + why.format(fix=fix)
        )
    if choose_branch:
        raise ValueError(
            f"{names.choose_branch} calibrates each branch, which {names.sampler} {sampler.value!r} cannot "
            "have: " + why.format(fix="give the branch instead")
        )


def check_for_model(pipe: Any, request: GenerationRequest, *, choose_branch: bool = False) -> None:
    """Refuse, before anything runs, what ``request`` asks of ``pipe``'s model that it cannot do: what its
    sampler cannot do with its reuse settings (:func:`check_sampler_choice`; ``choose_branch``: the branch is
    to be chosen), a deep-reuse branch its UNet does not have (``branch: ...``), and an output size a built-in
    reference model was not trained for (``image: ...`` or ``width and height: ...``). The messages name the
    Cog inputs; the command line names the flags."""
    check_sampler_choice(request.sampler, request.faster, choose_branch=choose_branch)
    if isinstance(request.faster, DeepReuseConfig):
        try:
            deep_modules(pipe.unet, request.faster.branch)
        except ValueError as error:  # a branch this UNet does not have
            raise ValueError(f"branch: {error}") from None
    check_trained_size(
        pipe, *request.output_size, "image" if request.image is not None else "width and height"
    )


def calibration_options(pipe: Any) -> dict[str, Any]:
    """The options of ``get_calibration`` for a request's calibration of ``pipe``: a built-in reference
    model's own prompts and settings, never saved into its package folder; and for a pipeline that carries a
    LoRA, nothing saved into the base weights' folder."""
    from .. import reference
    from ..calibration import weights_folder

    options: dict[str, Any] = {}
    folder = weights_folder(pipe)
    if reference.is_model_dir(folder):
        # A built-in model's folder is package data: its saved calibrations are those that
        # training/calibrate_reference.py made; one for another step count is kept for this process only.
        options = {**reference.calibration_options(folder), "save": False}
    if loaded_lora(pipe) is not None:
        # lora.py names the adapter after the file and the scale, so the LoRA'd UNet's fingerprint is its own:
        # the base weights' calibration is never found for it. Its own is not written into their folder.
        options["save"] = False
    return options


def prepare_key_steps(
    pipe: Any, request: GenerationRequest, log: Callable[[str], None] = print, *, calibrate: bool = True
) -> GenerationRequest:
    """``request`` with ``auto`` key steps replaced by the calibrated list (explicit, saying where it came
    from), so that ``request.schedule`` can be echoed before the run, and the run places nothing again. The
    calibration is the one of the request's reuse mode (its ``calibration_target``), looked up for the
    request's sampler without changing the pipeline. Calibrates the model first when none for its sampler and
    step count is saved (the one case that sets the pipeline's sampler here), and says how long that took;
    with ``calibrate=False`` raises :class:`~faster_diffusion.schedule.CalibrationError` instead, measuring
    nothing. A pipeline that carries a LoRA (:mod:`.lora`) is another model to the calibration: it is
    calibrated for itself and kept for this process, never saved into the base weights' file."""
    from ..calibration import (
        CALIBRATION_FILE,
        DEFAULT_PROMPTS,
        find_calibration,
        get_calibration,
        weights_folder,
    )

    request = with_unet_calls(pipe, request)
    keys = request.faster.key_steps
    if keys.kind is not KeyStepKind.AUTO:
        return request
    check_sampler_choice(request.sampler, request.faster)  # auto on Heun or PNDM: an error naming the inputs
    keys = keys.for_steps(request.steps)  # 'auto:B/N': B per N steps, as a budget for the request's
    if keys.budget is not None and keys.budget > request.steps:  # before any calibration is measured
        raise CalibrationError(
            f"key_steps: the budget must be a whole number from 1 to {request.steps}, got {keys.budget}"
        )
    options = calibration_options(pipe)
    folder, lora = weights_folder(pipe), loaded_lora(pipe)
    target = getattr(request.faster, "calibration_target", "encoder")  # a registered mode may have none
    # Looked up for the request's sampler without touching the pipeline (the run sets it, once).
    scheduler = make_scheduler(request.sampler, scheduler_config_of(pipe))
    calibration = find_calibration(pipe, request.steps, scheduler, target=target)
    reuse = "" if target == "encoder" else f" of {target} reuse"
    of = reuse
    lacking = False  # a saved calibration that did not measure the criterion asked for
    if keys.criterion is not None:
        of += f" with the {keys.criterion} criterion"
        if calibration is not None and keys.criterion not in calibration.criteria:
            calibration, lacking = None, True  # the criterion is measured below and added to it
    if calibration is None and not calibrate:
        which = f"{request.sampler.value} with {request.steps} steps"
        message = (
            f"the saved calibration{reuse} for {which} did not measure the {keys.criterion} criterion"
            if lacking
            else f"no calibration{of} of this model for {which} is saved"
        )
        raise CalibrationError(f"key_steps {str(keys)!r}: {message}")
    if calibration is None:
        remove_faster_diffusion(pipe)  # calibration runs the pipeline stock, with the request's sampler
        use_sampler(pipe, request.sampler)
        prompts = len(options.get("prompts", DEFAULT_PROMPTS))
        model = "this model" if lora is None else f"this model with the LoRA {lora.describe()}"
        what = (
            f"the {keys.criterion} criterion, added to the saved calibration"
            if lacking
            else f"a stock run of {prompts} calibration prompts"
        )
        steps = f"{request.sampler.value}, {request.steps} steps"
        log(f"Calibrating key steps{of} for {model} ({steps}): {what}, once")
        started = time.perf_counter()
        # A fresh one measures the target's default criterion and the one asked for; a saved one that lacks
        # the criterion gets that one alone, with its own prompts and settings (get_calibration).
        asked: dict[str, Any] = {}
        if lacking:
            asked["criterion"] = keys.criterion
        elif keys.criterion is not None:
            asked["criteria"] = (keys.criterion,)
        calibration = get_calibration(
            pipe, num_inference_steps=request.steps, force=not lacking, target=target, **asked, **options
        )
        saved = folder is not None and options.get("save", True) and (folder / CALIBRATION_FILE).is_file()
        where = f"saved in {folder / CALIBRATION_FILE}" if saved else "kept for this process"
        log(f"Calibrated in {time.perf_counter() - started:.1f} s; {where}")
    # Image-to-image runs the last steps_run steps: auto's budget is placed over them (Calibration.indices).
    explicit = keys.placed_by(calibration).key_steps(keys.budget, start=request.first_step)
    return dataclasses.replace(request, faster=dataclasses.replace(request.faster, key_steps=explicit))


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


#: The reuse modes by the name the command line gives them: encoder propagation (the paper's) and deep reuse.
MODE_NAMES = ("encoder", "deep")


def faster_config(
    key_steps: str | KeySteps = "paper",
    *,
    mode: str = "encoder",
    parallel: bool = True,
    max_decoder_batch: int | None = None,
    noise_injection: bool | None = None,
    noise_strength: float | None = None,
    noise_threshold: float | None = None,
    branch: int = 0,
    forecast: int = 0,
) -> FasterDiffusionConfig | DeepReuseConfig:
    """The config of reuse ``mode`` (:data:`MODE_NAMES`) from plain user inputs (text key steps, on/off
    switches).

    ``noise_injection``: ``None`` is the mode's default (on for encoder propagation, off for deep reuse).
    ``max_decoder_batch``: 0 or ``None`` gives the automatic cap (``"auto"``, see
    :mod:`faster_diffusion.memory`), a whole number >= 1 caps the steps in one decoder batch, as the CLI's
    ``--max-decoder-batch`` and the Cog input do. Whole groups whatever their size (no cap) are not available
    here: use ``FasterDiffusionConfig(max_decoder_batch=None)``. ``parallel`` and ``max_decoder_batch`` are
    encoder propagation's, ``branch`` is deep reuse's (a partial step runs one step at a time); ``forecast``
    is both modes'.
    """
    if mode not in MODE_NAMES:
        raise ValueError(f"mode must be one of {', '.join(MODE_NAMES)}, got {mode!r}")
    keys = key_steps if isinstance(key_steps, KeySteps) else parse_key_steps(key_steps)
    enabled = (mode == "encoder") if noise_injection is None else noise_injection
    noise = NoiseInjection(
        enabled=enabled,
        alpha=PRIOR_NOISE_ALPHA if noise_strength is None else noise_strength,
        tau=PRIOR_NOISE_TAU if noise_threshold is None else noise_threshold,
    )
    if mode == "deep":
        return DeepReuseConfig(key_steps=keys, branch=branch, forecast=forecast, noise_injection=noise)
    if max_decoder_batch in (None, 0):
        max_decoder_batch = AUTO
    return FasterDiffusionConfig(
        key_steps=keys,
        parallel=parallel,
        max_decoder_batch=max_decoder_batch,
        noise_injection=noise,
        forecast=forecast,
    )


@dataclass
class GenerationResult:
    """Images and what it took to make them."""

    images: list[Any]
    nsfw: list[bool]
    accelerated: bool
    #: Full and partial pass counts (accelerated runs only).
    stats: RunStats | None
    #: Wall time of the whole pipeline call.
    seconds: float
    #: Wall time of the denoising loop: from the first UNet call to the end of the last step.
    loop_seconds: float
    #: The reuse mode of an accelerated run (:data:`MODE_NAMES`).
    mode: str = "encoder"

    def describe(self) -> str:
        """One line for logs: the times and, for an accelerated run, the pass counts."""
        if self.stats is None:
            return f"Stock diffusers: {self.seconds:.2f} s ({self.loop_seconds:.2f} s denoising)"
        stats = self.stats
        mode = DeepReuseConfig.mode_name if self.mode == "deep" else FasterDiffusionConfig.mode_name
        served = stats.full_passes + stats.partial_passes
        batches = f" in {stats.unet_batches} UNet batches" if stats.unet_batches < served else ""
        return (
            f"Faster diffusion ({mode}): {self.seconds:.2f} s ({self.loop_seconds:.2f} s denoising), "
            f"{stats.full_passes} full / {stats.partial_passes} partial UNet passes{batches}"
        )


def describe_speedup(faster: GenerationResult, stock: GenerationResult) -> str:
    """One line for logs: the speedup of ``faster`` over ``stock``, end to end and in the denoising loop."""
    return (
        f"Speedup: {stock.seconds / faster.seconds:.2f}x end to end, "
        f"{stock.loop_seconds / faster.loop_seconds:.2f}x denoising"
    )


def warm_up(pipe: Any, request: GenerationRequest) -> None:
    """An untimed stock run of ``request``'s shape, two steps and one image, so that the one-off costs of a
    process's first pipeline call at a size (allocator, thread pool, lazy imports, kernel selection) stay out
    of the timed runs that follow. Without it, the first comparison of a fresh process reported 0.18x."""
    short = dataclasses.replace(request, num_steps=2, num_outputs=1, strength=1.0, unet_calls=None)
    generate(pipe, short, accelerate=False)


class _LoopTimer:
    """Times the denoising loop of one pipeline call, the same way for stock and accelerated runs.

    The start is the first UNet call (a forward pre-hook); the end is the last step's callback: the loop's
    last iteration, as many as the pipeline's timesteps (``pipe._num_timesteps``, which diffusers' SD and SDXL
    pipelines set before their loop: 2N - 1 for Heun's N steps), else ``num_steps``. On CUDA the end waits for
    the GPU once, so the time is real; there is no sync inside the loop.
    """

    def __init__(self, unet: torch.nn.Module, num_steps: int, user_callback: Callable | None) -> None:
        self.num_steps = num_steps
        self.user_callback = user_callback
        self.start: float | None = None
        self.end: float | None = None
        self._hook = unet.register_forward_pre_hook(self._on_unet)

    def _on_unet(self, module: torch.nn.Module, args: Any) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def callback(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if self.user_callback is not None:
            tensors = self.user_callback(pipe, step, timestep, tensors) or tensors
        last = getattr(pipe, "_num_timesteps", None)
        if step == (last if isinstance(last, int) and last > 0 else self.num_steps) - 1:
            latents = tensors.get("latents")
            if isinstance(latents, torch.Tensor) and latents.device.type == "cuda":
                torch.cuda.synchronize(latents.device)
            self.end = time.perf_counter()
        return tensors

    def close(self) -> float:
        self._hook.remove()
        if self.start is None or self.end is None:
            return float("nan")
        return self.end - self.start


def generate(
    pipe: Any,
    request: GenerationRequest,
    *,
    accelerate: bool = True,
    output_type: str = "pil",
    step_callback: Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]] | None = None,
) -> GenerationResult:
    """Run ``request`` on ``pipe``: with faster diffusion attached for this call, or stock when
    ``accelerate`` is false. The pipeline is left as it was found, apart from its sampler.

    ``step_callback`` is diffusers' ``callback_on_step_end``; raising from it stops the run between steps.
    A pipeline with an attached :class:`~faster_diffusion.app.loading.SafetyCheck` (SDXL) has its images
    (``"pil"`` or ``"np"``; ``"latent"`` are not checked, as in SD's pipeline) checked by it, flagged ones
    blacked out, as SD's own checker does; other output types raise ``ValueError``.

    A request with an image runs on :func:`image_to_image_pipeline` of ``pipe`` (the same modules), and one
    with a mask too on :func:`inpaint_pipeline`, with faster diffusion attached to that pipeline object for
    the call.
    """
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"request must be a GenerationRequest, got {type(request).__name__}")
    check = safety_check_of(pipe)  # SDXL: SD's checker, attached by load_pipeline
    if check is not None and output_type not in ("pil", "np", "latent"):
        raise ValueError(
            f"output_type {output_type!r} is not supported with SDXL's safety checker: use 'pil' or 'np' "
            "(checked), 'latent' (not checked, as in SD's pipeline), or a pipeline without the checker"
        )
    remove_faster_diffusion(pipe)
    use_sampler(pipe, request.sampler)
    if request.image is None:
        runner, inputs = pipe, {"width": request.width, "height": request.height}
    else:  # built after use_sampler, so that it holds the sampler's scheduler
        # One copy of the image per output: diffusers' repeating of fewer images is deprecated.
        prompts = 1 if isinstance(request.prompt, str) else len(request.prompt)
        images = [request.image] * (prompts * request.num_outputs)
        runner, inputs = image_to_image_pipeline(pipe), {"image": images, "strength": request.strength}
        if request.mask is not None:
            width, height = request.output_size  # the inpainting pipelines default to the model's size
            runner = inpaint_pipeline(pipe)
            inputs.update(mask_image=[request.mask] * len(images), width=width, height=height)
    handle = apply_faster_diffusion(runner, request.faster) if accelerate else None
    watermarker = getattr(runner, "watermark", None)  # SDXL's, when invisible-watermark is installed
    if watermarker is not None and not request.watermark:
        runner.watermark = None  # for this call only (cog-sdxl's apply_watermark=false does the same)
    device = getattr(pipe, "_execution_device", torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(request.seed)
    timer = _LoopTimer(pipe.unet, request.calls_run, step_callback)
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            output = runner(
                request.prompt,
                negative_prompt=request.negative_prompt or None,
                num_inference_steps=request.steps,
                **inputs,
                num_images_per_prompt=request.num_outputs,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type=output_type,
                callback_on_step_end=timer.callback,
            )
        seconds = time.perf_counter() - started
    finally:
        loop_seconds = timer.close()
        if watermarker is not None:
            runner.watermark = watermarker
        if handle is not None:
            handle.remove()
    images = list(output.images)
    nsfw = getattr(output, "nsfw_content_detected", None)  # SDXL pipelines have no safety checker
    if nsfw is None and check is not None and output_type != "latent":
        images, nsfw = check(images)
    nsfw = [bool(flag) for flag in nsfw] if nsfw is not None else [False] * len(images)
    return GenerationResult(
        images=images,
        nsfw=nsfw,
        accelerated=accelerate,
        stats=handle.last_run if handle is not None else None,
        seconds=seconds,
        loop_seconds=loop_seconds,
        mode="deep" if isinstance(request.faster, DeepReuseConfig) else "encoder",
    )


def image_to_image_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline over ``pipe``'s own modules (no copy of any weights): diffusers'
    ``StableDiffusionImg2ImgPipeline`` for SD 1.x/2.x, ``StableDiffusionXLImg2ImgPipeline`` for SDXL.

    Built as diffusers' ``AutoPipelineForImage2Image.from_pipe`` builds it: the class's modules and settings
    from ``pipe`` (the safety checker, or its absence, included), and nothing cast, unlike
    ``DiffusionPipeline.from_pipe``, which moves every module to float32 unless told the dtype. The auto
    pipeline itself is not imported: it imports every pipeline family diffusers has, which costs half a
    second and logs warnings about image processors this package never uses. ``pipe``'s progress-bar
    settings and SDXL watermarker are carried over too.
    """
    return _over_modules_of(pipe, _text_to_image_family(pipe, "image-to-image").image_to_image_class())


def inpaint_pipeline(pipe: Any) -> Any:
    """The inpainting pipeline over ``pipe``'s own modules, built as :func:`image_to_image_pipeline` builds
    its pipeline: ``StableDiffusionInpaintPipeline`` for SD 1.x/2.x, ``StableDiffusionXLInpaintPipeline`` for
    SDXL."""
    return _over_modules_of(pipe, _text_to_image_family(pipe, "inpainting").inpaint_class())


def _text_to_image_family(pipe: Any, what: str) -> Any:
    family = family_of(pipe)
    if family is None or not isinstance(pipe, family.pipeline_class()):
        raise TypeError(
            f"{what} needs a StableDiffusionPipeline or StableDiffusionXLPipeline, got {type(pipe).__name__}"
        )
    return family


def _over_modules_of(pipe: Any, runner_class: type) -> Any:
    modules, settings = runner_class._get_signature_keys(runner_class)
    components = {name: module for name, module in pipe.components.items() if name in modules}
    config = {name: value for name, value in pipe.config.items() if name in settings}
    runner = runner_class(**components, **config)
    runner.register_to_config(_name_or_path=pipe.config.get("_name_or_path"))
    runner.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    if hasattr(pipe, "watermark"):
        runner.watermark = pipe.watermark
    return runner
