"""The engine of every reuse mode: full steps compute some UNet modules' outputs and keep them, partial steps
reuse them, attached to a stock diffusers pipeline.

A *full step* runs the whole UNet and keeps the outputs of the mode's cached modules; a *partial step* is
served those kept outputs (copied, or extrapolated from the latest two full steps) instead of computing them.
The full steps are the key steps of a :class:`~faster_diffusion.schedule.KeySteps` schedule. A *step* is one
iteration of the pipeline's denoising loop, one UNet call: Heun, KDPM2 and DPMSolverSDE make 2N - 1 of them
for N sampler steps, PNDM N + 1 (its warm-up repeats a timestep), and key steps and :class:`RunStats` count
them (as DeepCache does). Every call of the loop is served, to the end of the scheduler's timesteps unless the
loop announces fewer (:meth:`_ReuseHook._start_steps`). A full step and the partial steps after it (its group)
can run as one batch of the stock UNet forward, with the time embedding of each step; the stock pipeline loop
then receives the noise predictions one step at a time, as if the UNet had run in full at every step.

A reuse mode is a config that gives the engine, besides its own checks:

- ``cached_modules(unet)``: the modules whose outputs full steps compute and partial steps reuse, in the
  order a forward pass meets them;
- ``key_steps``: a :class:`~faster_diffusion.schedule.KeySteps`, the full steps;
- ``noise_injection``: a :class:`~faster_diffusion.noise.NoiseInjection` (prior noise injection);
- ``decoder_batch_cap``: steps per batch at most (1: one step at a time; ``None``: whole groups; ``"auto"``:
  :func:`faster_diffusion.memory.auto_decoder_batch_cap`);
- ``forecast_slots(count)``: which of the ``count`` cached modules (by position) are extrapolated rather than
  copied;
- ``copies_served(unet)``: whether a batch of one step is handed copies of the kept outputs (the UNet may
  change them in place);
- ``calibration_target``: what ``key_steps="auto"`` is calibrated for
  (:func:`faster_diffusion.measure.target_modules`);
- ``mode_name``: the mode's name, which the engine's refusals and errors give (a class attribute).

:func:`attach_reuse` checks the pipeline and attaches; each mode's ``apply_*`` function calls it.

How it attaches, without copying ``StableDiffusionPipeline.__call__`` or ``UNet2DConditionModel.forward``:

- A diffusers :class:`~diffusers.hooks.ModelHook` on the UNet decides, per call, which steps to run and calls
  the *stock* ``forward`` once per batch of steps, with the batch's timesteps.
- Hooks on the cached modules either compute their output on the full step's rows of the batch and keep it,
  or hand back the kept output; either way repeated to the batch size.
- A small wrapper on the scheduler instance's ``set_timesteps`` (a run starts: state is reset) and ``step``
  (prior noise injection, then the step count advances). The step index comes from that count, never from a
  lookup by timestep value, so the loop makes no host sync of its own.

``remove()`` takes all of it off again, after which the pipeline gives back stock output exactly.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ._hooks import add_hook, drop_hook, last_rows, map_tensors, map_tensors_once, repeat_rows, tensors_in
from .families import refused_variant
from .memory import AUTO, auto_decoder_batch_cap, available_memory_bytes, resident_weight_bytes
from .noise import NoiseInjection, latent_scales
from .schedule import CalibrationMissing, KeyStepError, KeyStepKind, KeySteps, KeyStepSchedule
from .support import (
    ROW_WISE_PROCESSORS,
    UnsupportedModelError,
    check_supported_call,
    check_supported_scheduler,
    check_supported_unet,
)
from .taps import RunEndTap, SchedulerTap

__all__ = [
    "FORECAST_ORDERS",
    "AutoResolver",
    "CalibrationFallbackWarning",
    "FasterDiffusion",
    "ReuseConfig",
    "RunStats",
    "attach_reuse",
    "check_decoder_cap",
    "check_forecast",
    "get_faster_diffusion",
    "remove_faster_diffusion",
]

_UNET_HOOK = "faster_diffusion"


class CalibrationFallbackWarning(UserWarning):
    """A run with ``auto`` key steps found no calibration of the model for its scheduler and step count and
    placed :meth:`KeySteps.fallback` instead (``RunStats.fallback`` says the same). Given once per handle,
    step count and scheduler; ``warnings.filterwarnings("ignore", category=CalibrationFallbackWarning)``
    silences it."""


_CACHED_HOOK = "faster_diffusion_cached"
_TEXT_HOOK = "faster_diffusion_text"

#: UNet inputs that carry one row per sample; a decoder batch of g steps repeats them g times. SDXL's
#: ``added_cond_kwargs`` (pooled text embeddings and size/crop ids) enter only through the time embedding,
#: which every call computes per row: they are batched like the text embeddings.
_BATCHED_INPUTS = (
    "encoder_hidden_states",
    "timestep_cond",
    "attention_mask",
    "encoder_attention_mask",
    "added_cond_kwargs",
)

#: How many frames above the scheduler's ``set_timesteps`` to look for the pipeline that called it.
_CALLER_DEPTH = 8

#: Finds the calibration that ``key_steps="auto"`` is placed from: called with the pipeline, its scheduler,
#: the step count, the run's timesteps and (by keyword) ``target``, the mode's ``calibration_target``;
#: returns the calibration, or raises a clear error (a
#: :class:`~faster_diffusion.schedule.KeyStepError`) when there is none. Handed in by whoever applies the
#: method (:func:`faster_diffusion.apply_faster_diffusion` hands calibration's), so that the engine does not
#: import calibration.
AutoResolver = Callable[..., Any]


class ReuseConfig(Protocol):
    """What the engine reads from a reuse mode's config (see the module docstring)."""

    #: The mode's name, which refusals and errors give.
    mode_name: ClassVar[str]
    #: The full steps.
    key_steps: KeySteps
    #: Prior noise injection settings.
    noise_injection: NoiseInjection

    @property
    def decoder_batch_cap(self) -> int | str | None:
        """Steps per batch at most: 1, a whole number, ``None`` (whole groups) or ``"auto"``."""

    @property
    def calibration_target(self) -> str:
        """What ``key_steps="auto"`` is calibrated for."""

    def cached_modules(self, unet: torch.nn.Module) -> list[torch.nn.Module]:
        """The modules whose outputs full steps compute and partial steps reuse."""

    def forecast_slots(self, count: int) -> range:
        """Which of the ``count`` cached modules, by position, are extrapolated rather than copied."""

    def copies_served(self, unet: torch.nn.Module) -> bool:
        """Whether a batch of one step is handed copies of the kept outputs."""


def check_decoder_cap(cap: Any) -> None:
    """Raise ``ValueError`` unless ``cap`` is a ``max_decoder_batch`` value: ``"auto"``, a whole number >= 1
    or ``None``.

    Example:
        >>> check_decoder_cap(8)
        >>> check_decoder_cap(0)
        Traceback (most recent call last):
        ValueError: max_decoder_batch must be 'auto', a whole number >= 1 or None (...), got 0
    """
    if cap is not None and cap != AUTO and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(
            f"max_decoder_batch must be 'auto', a whole number >= 1 or None (no cap: whole groups), "
            f"got {cap!r}"
        )


#: The forecast orders a mode accepts: 0 (copy) and 1 (linear extrapolation).
FORECAST_ORDERS = (0, 1)


def check_forecast(value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a forecast order of :data:`FORECAST_ORDERS`."""
    if isinstance(value, bool) or value not in FORECAST_ORDERS:
        raise ValueError(
            f"forecast must be 0 (reuse the features as they are) or 1 (extrapolate them linearly from the "
            f"latest two key steps), got {value!r}"
        )


def _rows_of(cache: dict[int, Any]) -> int | None:
    """The batch rows of kept features (of their first tensor)."""
    for value in cache.values():
        for tensor in tensors_in(value):
            return tensor.shape[0]
    return None


def _forecast(current: Any, previous: Any, weights: Sequence[float]) -> Any:
    """``current + (current - previous) * w`` for each ``w`` of ``weights``, stacked along the batch, for
    every tensor of a (nested) output; a tensor met twice (a down block's last output is both its hidden
    states and a skip feature) is extrapolated once."""
    done: dict[int, torch.Tensor] = {}

    def walk(now: Any, before: Any) -> Any:
        if isinstance(now, torch.Tensor):
            key = id(now)
            if key not in done:
                step = now - before
                parts = [now + step * w if w else now.clone() for w in weights]
                done[key] = parts[0] if len(parts) == 1 else torch.cat(parts)
            return done[key]
        if isinstance(now, (tuple, list)):
            return type(now)(walk(a, b) for a, b in zip(now, before, strict=True))
        if isinstance(now, dict):
            return {name: walk(item, before[name]) for name, item in now.items()}
        return now

    return walk(current, previous)


def _deprecated_stat(old: str, new: str) -> None:
    warnings.warn(f"RunStats.{old} is deprecated: use {new}", DeprecationWarning, stacklevel=3)


@dataclass
class RunStats:
    """What one generation did, in any mode. Counts are per pipeline call, for the whole image batch; each
    step that ran is a full pass or a partial pass (``full_passes + partial_passes`` steps).

    Example:
        >>> stats = RunStats(full_passes=13, partial_passes=37, unet_batches=50, steps=50)
        >>> stats.full_passes + stats.partial_passes == stats.steps
        True
    """

    #: The key steps of the run (cut to the steps that run).
    schedule: KeyStepSchedule | None = None
    #: Full UNet passes: the key steps that ran (each over the whole guidance batch of one step).
    full_passes: int = 0
    #: Steps served without a full pass, from the kept outputs of the latest full step.
    partial_passes: int = 0
    #: Calls of the stock UNet forward (a batch of several steps is one call).
    unet_batches: int = 0
    #: Scheduler steps taken.
    steps: int = 0
    #: Steps at which prior noise was injected.
    injected_steps: int = 0
    #: ``None``, or why the run's key steps are not the ones asked for: ``auto`` key steps on a model with no
    #: calibration for the run's scheduler and step count, which ran :meth:`KeySteps.fallback` instead.
    fallback: str | None = None

    @property
    def encoder_passes(self) -> int:
        """Deprecated: :attr:`full_passes`."""
        _deprecated_stat("encoder_passes", "full_passes")
        return self.full_passes

    @property
    def decoder_passes(self) -> int:
        """Deprecated: ``full_passes + partial_passes``, the steps whose noise prediction was served."""
        _deprecated_stat("decoder_passes", "full_passes + partial_passes")
        return self.full_passes + self.partial_passes

    @property
    def decoder_batches(self) -> int:
        """Deprecated: :attr:`unet_batches`."""
        _deprecated_stat("decoder_batches", "unet_batches")
        return self.unet_batches


class _RunState(threading.local):
    """Per-run state, shared by the hooks. Reset when a run starts, released when it ends.

    One per thread: two threads that call one pipeline at once (as stock diffusers allows, with a scheduler
    whose ``step`` keeps no state across calls, such as DDIM) each run with their own key steps, cached
    features and predictions, since hooks and taps run in the thread of the pipeline call.
    """

    def __init__(self) -> None:
        self.stats = RunStats()
        self.reset()

    def reset(self) -> None:
        """Forget the run and drop every cached tensor; the stats of the last run stay readable."""
        self.active = False
        self.is_key: tuple[bool, ...] = ()
        self.group_end: tuple[int, ...] = ()
        self.inject: tuple[bool, ...] = ()
        self.timesteps: torch.Tensor | None = None
        # The same timesteps read to the host once per run (to place injection and find where a run starts).
        self.timestep_values: tuple[float, ...] = ()
        # The key steps the run places (the config's, or their fallback) and the calibration ``auto`` ones
        # were placed by, kept to place them again on a cut run.
        self.keys: KeySteps | None = None
        self.calibration: Any = None
        # Steps the pipeline's loop announced (its progress bar's total), when it did: a run that stops early.
        self.loop_steps: int | None = None
        # Whether a pipeline whose loop is watched (its progress bar tapped) started the run, and whether that
        # loop has begun: a run whose pipeline failed between set_timesteps() and its loop is stale.
        self.watched = False
        self.in_loop = False
        # Whether the run's first UNet call, which fixes the steps that run, has come.
        self.started = False
        # One past the last step that runs.
        self.num_steps = 0
        self.step = 0
        self.unet_calls = 0
        self.predictions: dict[int, torch.Tensor] = {}
        self.cache: dict[int, Any] = {}
        # The step whose features cache holds; for forecasting, the key step before it and its
        # features (only the slots that are forecast).
        self.cache_step = 0
        self.previous_step: int | None = None
        self.previous_cache: dict[int, Any] = {}
        # The steps of the current decoder batch.
        self.batch_steps: range = range(0)
        # Slots of the cached modules that are forecast, and whether a batch of one step gets copies.
        self.forecast_slots: frozenset[int] = frozenset()
        self.copies_served = True
        self.cache_rows: int | None = None
        # What the cached predictions were decoded from: see _batch_inputs; and the state of what can change
        # in place under the same objects: see _InPlaceState.
        self.decoded_inputs: tuple[Any, ...] = ()
        self.decoded_state: _InPlaceState | None = None
        # The UNet's LoRA layers (peft's), found when the run starts.
        self.adapter_layers: tuple[torch.nn.Module, ...] = ()
        self.initial_latents: torch.Tensor | None = None
        # With prior noise injection on sigma-scaled latents: each step's latent scale (noise.latent_scales),
        # read once per run, and the scale of initial_latents.
        self.latent_scales: tuple[float, ...] = ()
        self.initial_scale = 1.0
        # (resident weight bytes, free device bytes) for the automatic decoder-batch cap, read at the run's
        # first decoder batch and kept for the run.
        self.device_memory: tuple[int, int] | None = None
        # Set at the run's first UNet call when a decoder attention processor splits the batch (PAG's): the
        # decoder then runs one step at a time.
        self.one_step_decoder = False
        # Set by the UNet hook for the length of one stock forward call.
        self.computing_full = False
        self.repeat = 0


def _batch_inputs(inputs: dict[str, Any]) -> tuple[Any, ...]:
    """What a decoder batch depends on besides the latents and the timestep: the shape of the sample and the
    conditioning inputs. Compared by identity, so checking that a call matches a batch needs no host sync."""
    conditioning = tuple(inputs.get(name) for name in (*_BATCHED_INPUTS, "cross_attention_kwargs"))
    return (tuple(inputs["sample"].shape), *conditioning)


def _same_memory(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether tensors ``x`` and ``y`` are views of the very same values: the same shape, dtype, device, first
    element in memory and strides. Decided from metadata alone (no host sync)."""
    return (
        x.shape == y.shape
        and x.dtype == y.dtype
        and x.device == y.device
        and x.data_ptr() == y.data_ptr()
        and x.stride() == y.stride()
    )


def _same_values(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether tensors ``x`` and ``y`` hold the same values.

    The same object, or tensors over the very same memory (:func:`_same_memory`), is decided from metadata
    alone (no host sync): that is every call of a stock pipeline loop. Only when those differ, as under model
    CPU offload, whose accelerate hook hands the UNet a fresh copy of its inputs at every call, are the values
    compared (one host sync for that call)."""
    if x is y:
        return True
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
        return False
    return _same_memory(x, y) or bool(torch.equal(x, y))


def _same_input(x: Any, y: Any) -> bool:
    """Whether ``x`` and ``y`` are the same input: the same object, tensors of the same values
    (:func:`_same_values`), or dicts of the same inputs."""
    if x is y:
        return True
    if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
        return _same_values(x, y)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same_input(x[k], y[k]) for k in x)
    return False


def _same_batch_inputs(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two :func:`_batch_inputs` describe the same batch: equal shapes, the very same inputs."""
    return (
        len(a) == len(b) > 0
        and a[0] == b[0]
        and all(_same_input(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    )


def _adapter_layers(unet: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """The UNet's LoRA layers (peft's ``BaseTunerLayer``); none if peft was never imported."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    if tuners is None:
        return ()
    return tuple(module for module in unet.modules() if isinstance(module, tuners.BaseTunerLayer))


def _adapter_settings(layers: Sequence[torch.nn.Module]) -> tuple[Any, ...]:
    """What LoRA layers apply: active adapters, their scales, disabled or merged ones. Read from the modules,
    so that ``pipe.set_adapters(..., adapter_weights=...)`` and ``pipe.disable_lora()`` show."""
    return tuple(
        (
            tuple(getattr(layer, "active_adapters", ())),
            tuple(sorted(getattr(layer, "scaling", {}).items())),
            bool(getattr(layer, "disable_adapters", False)),
            tuple(getattr(layer, "merged_adapters", ())),
        )
        for layer in layers
    )


class _InPlaceState:
    """What a decoder batch was decoded with that can change in place, under the same objects: the values of
    its conditioning tensors (a step callback's ``prompt_embeds.mul_(0.5)``) and the UNet's LoRA settings (a
    callback's ``pipe.set_adapters([...], adapter_weights=[...])``).

    A tensor that tracks in-place writes is recorded by its version counter (metadata, no host sync). An
    inference tensor (made under ``torch.inference_mode``) tracks none: it is recorded by a copy, and compared
    by value (one host sync at each step served from a batch).
    """

    def __init__(self, tensors: Iterator[torch.Tensor], layers: Sequence[torch.nn.Module]) -> None:
        self._tensors: list[tuple[torch.Tensor, Any]] = [
            (tensor, tensor.clone() if tensor.is_inference() else tensor._version) for tensor in tensors
        ]
        self._layers = layers
        self._adapters = _adapter_settings(layers)

    def unchanged(self) -> bool:
        for tensor, recorded in self._tensors:
            if isinstance(recorded, torch.Tensor):
                if not torch.equal(tensor, recorded):
                    return False
            elif tensor._version != recorded:
                return False
        return _adapter_settings(self._layers) == self._adapters


def _is_last_rows_of(new: Any, old: Any) -> bool:
    """Whether tensor ``new`` holds the last rows of tensor ``old``: a view of them, as ``old[-n:]`` and
    ``old.chunk(2)[1]`` are (metadata only), or, as under model CPU offload, a copy equal in value
    (:func:`_same_values`)."""
    if not isinstance(new, torch.Tensor) or not isinstance(old, torch.Tensor):
        return False
    if (
        new.dim() != old.dim()
        or new.dim() == 0
        or new.shape[1:] != old.shape[1:]
        or new.shape[0] > old.shape[0]
    ):
        return False
    return _same_values(new, old[old.shape[0] - new.shape[0] :])


class _CachedModuleHook(ModelHook):
    """On ``conv_in``, a down block or the mid block: compute and keep, or reuse, its output."""

    def __init__(self, state: _RunState, slot: int) -> None:
        super().__init__()
        self.state = state
        self.slot = slot

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if not state.repeat:
            # Called outside a decoder batch of ours (for example the UNet used directly): stock behaviour.
            return self.fn_ref.original_forward(*args, **kwargs)
        should_run_full = state.computing_full
        if should_run_full:
            if state.repeat > 1:
                rows = state.cache_rows
                total = rows * state.repeat

                def first_rows(tensor: torch.Tensor) -> torch.Tensor:
                    return tensor[:rows] if tensor.dim() > 0 and tensor.shape[0] == total else tensor

                args = map_tensors(args, first_rows)
                kwargs = {name: map_tensors(value, first_rows) for name, value in kwargs.items()}
            output = self.fn_ref.original_forward(*args, **kwargs)
            state.cache[self.slot] = output
        else:
            output = state.cache[self.slot]
        if self.slot in state.forecast_slots and state.previous_step is not None:
            key, previous = state.cache_step, state.previous_step
            weights = [(step - key) / (key - previous) for step in state.batch_steps]
            return _forecast(output, state.previous_cache[self.slot], weights)
        if state.repeat == 1:
            if not state.copies_served:
                return output
            # The decoder may change what it is given in place (FreeU scales the mid block's output in place):
            # a batch of one step gets a copy, so that the kept features stay as they were computed.
            return map_tensors_once(output, torch.Tensor.clone)
        return repeat_rows(output, state.repeat)


class _RepeatedTextHook(ModelHook):
    """On a decoder cross-attention's ``to_k`` or ``to_v``: in a decoder batch of g steps, the text rows are
    the same g times over, so project one copy and repeat the result (the projection is row by row)."""

    def __init__(self, state: _RunState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module: torch.nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        rows = state.cache_rows
        if state.repeat > 1 and rows and hidden.shape[0] == rows * state.repeat:
            output = self.fn_ref.original_forward(hidden[:rows], *args, **kwargs)
            return output.repeat(state.repeat, *([1] * (output.dim() - 1)))
        return self.fn_ref.original_forward(hidden, *args, **kwargs)


class _ReuseHook(ModelHook):
    """On the UNet: serve each step's noise prediction, decoding a whole group per stock forward call.

    Stateful in diffusers' sense: ``HookRegistry.reset_stateful_hooks`` drops the run (:meth:`reset_state`).
    """

    _is_stateful = True

    def __init__(self, state: _RunState, handle: FasterDiffusion) -> None:
        super().__init__()
        self.state = state
        self.handle = handle
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End the run: drop the cached features and predictions."""
        self.state.reset()
        return module

    # Bookkeeping runs outside torch.compile's graphs (the stock forward it calls is still compiled), so
    # Dynamo does not guard on the step count and cached predictions and recompile at every step.
    @torch.compiler.disable(recursive=False)
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        self.handle._check_scheduler()
        if state.active and state.watched and not state.in_loop:
            # set_timesteps() was called by a pipeline whose denoising loop never began (it failed in between,
            # as on a generator list of the wrong length): that run is over, and this call is not part of it.
            state.reset()
        if not state.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        inputs = dict(bound.arguments)
        return_dict = inputs.get("return_dict", True)
        check_supported_call(module, inputs, self.handle.config.mode_name)
        step = state.unet_calls
        if step != state.step:
            raise RuntimeError(
                f"faster_diffusion: the UNet was called twice for one scheduler step. Faster diffusion "
                f"({self.handle.config.mode_name}) supports pipelines that call the UNet once per step with "
                "the whole guidance batch, as StableDiffusionPipeline does."
            )
        if step >= state.num_steps:
            raise RuntimeError(
                f"faster_diffusion: UNet call {step + 1} in a run of {state.num_steps} steps; the "
                "scheduler's "
                "set_timesteps() must be called at the start of every run"
            )
        if not state.started:
            self._start_steps(inputs["timestep"])
            step = state.unet_calls
        if step in state.predictions and not (
            _same_batch_inputs(_batch_inputs(inputs), state.decoded_inputs)
            and state.decoded_state.unchanged()
        ):
            # A callback changed the batch, the text embeddings or the LoRA weights after the batch was
            # decoded (diffusers' SDCFGCutoffCallback drops the unconditional half; a LoRA-scale schedule
            # calls set_adapters; a callback scales prompt_embeds in place): decode the rest of the group
            # again.
            state.predictions.clear()
        if step not in state.predictions:
            self._decode(module, step, inputs)
        prediction = state.predictions.pop(step)
        # Counted as served, so that a batch decoded again after a callback changed it counts each step once.
        if state.is_key[step]:
            state.stats.full_passes += 1
        else:
            state.stats.partial_passes += 1
        state.unet_calls += 1
        if return_dict:
            return UNet2DConditionOutput(sample=prediction)
        return (prediction,)

    # Outside torch.compile's graphs too, like new_forward; the stock forward it calls is compiled.
    @torch.compiler.disable(recursive=False)
    def _decode(self, module: torch.nn.Module, start: int, inputs: dict[str, Any]) -> None:
        """Run the stock forward once for steps ``start .. stop-1`` of the current group."""
        state = self.state
        stop = state.group_end[start]
        cap = 1 if state.one_step_decoder else self.handle.config.decoder_batch_cap
        if cap == AUTO:
            sample = inputs["sample"]
            if state.device_memory is None:
                state.device_memory = (
                    self.handle._resident_weight_bytes(sample.device),
                    available_memory_bytes(sample.device),
                )
            weight_bytes, available = state.device_memory
            cap = auto_decoder_batch_cap(
                module, sample, stop - start, weight_bytes=weight_bytes, available=available
            )
        if cap is not None:
            stop = min(stop, start + cap)
        steps = stop - start
        sample = inputs["sample"]
        rows = sample.shape[0]
        should_run_full = state.is_key[start]
        if should_run_full:
            # A key step whose batch differs from the kept features' (classifier-free guidance switched off
            # since): those features are of other rows, so there is nothing to forecast from until the next.
            if state.cache_rows is not None and state.cache_rows != rows:
                state.previous_step, state.previous_cache = None, {}
            state.cache_rows = rows
        elif rows != state.cache_rows:
            self._keep_conditional_rows(start, rows, inputs)
        state.decoded_inputs = _batch_inputs(inputs)
        # Read back only when the batch serves later steps: a batch of one step records nothing (no copies).
        state.decoded_state = (
            _InPlaceState(tensors_in(state.decoded_inputs[1:]), state.adapter_layers) if steps > 1 else None
        )
        if steps > 1:
            inputs["sample"] = sample.repeat(steps, *([1] * (sample.dim() - 1)))
            inputs["timestep"] = state.timesteps[start:stop].repeat_interleave(rows)
            for name in _BATCHED_INPUTS:
                if inputs.get(name) is not None:
                    inputs[name] = repeat_rows(inputs[name], steps)
        inputs["return_dict"] = False
        if should_run_full and start != state.cache_step:
            if state.forecast_slots and state.cache and state.cache_rows == _rows_of(state.cache):
                state.previous_step = state.cache_step
                state.previous_cache = {slot: state.cache[slot] for slot in state.forecast_slots}
            state.cache = {}
            state.cache_step = start
        state.batch_steps = range(start, stop)
        state.computing_full = should_run_full
        state.repeat = steps
        try:
            noise_pred = self.fn_ref.original_forward(**inputs)[0]
        finally:
            state.computing_full = False
            state.repeat = 0
        for offset, prediction in enumerate(noise_pred.chunk(steps)):
            state.predictions[start + offset] = prediction
        state.stats.unet_batches += 1

    def _keep_conditional_rows(self, step: int, rows: int, inputs: dict[str, Any]) -> None:
        """At a partial step, the batch shrank: keep the last rows of the full step's kept outputs.

        Only classifier-free guidance switched off part-way is supported (diffusers' ``SDCFGCutoffCallback``):
        the new text embeddings are the conditional half of the previous ones, which is the second half of the
        guidance batch (a view of it, or under model CPU offload a copy equal in value). The UNet treats every
        row on its own, so the last rows of the kept outputs are those of the conditional rows alone.
        """
        state = self.state
        old_rows = state.cache_rows
        # The text embeddings of the previous decoder batch (_batch_inputs: the sample's shape, then them).
        previous = state.decoded_inputs[1] if state.decoded_inputs else None
        if 2 * rows != old_rows or not _is_last_rows_of(inputs.get("encoder_hidden_states"), previous):
            state.reset()
            raise UnsupportedModelError(
                f"faster_diffusion: the batch changed from {old_rows} to {rows} rows at step {step}, a "
                f"partial step, which reuses the outputs of full step {state.cache_step}. Faster diffusion "
                f"({self.handle.config.mode_name}) supports only dropping the unconditional half there "
                "(classifier-free guidance switched off, as by diffusers' SDCFGCutoffCallback: prompt_embeds "
                "cut to its conditional half, prompt_embeds.chunk(2)[1]); change the batch at a full step "
                "(a key step), or use key steps 'all'"
            )
        state.cache = {slot: last_rows(value, rows) for slot, value in state.cache.items()}
        state.previous_cache = {slot: last_rows(value, rows) for slot, value in state.previous_cache.items()}
        state.cache_rows = rows

    def _start_steps(self, timestep: Any) -> None:
        """At the run's first UNet call: find the steps that run, and cut the schedule to them.

        Image-to-image (diffusers' ``StableDiffusionImg2ImgPipeline``, ``StableDiffusionXLImg2ImgPipeline``)
        sets the whole schedule of N steps, then runs only its last ``int(N * strength)`` steps; SDXL's
        ``denoising_end`` stops early instead. The rule: the key steps of the whole schedule, cut to the steps
        that run, with the first step that runs always a key step; ``auto:B`` asks for B full passes,
        which are placed again over the steps that run (:meth:`KeySteps.resolve`). Prior noise
        injection keeps its timesteps, and injects the run's own z: the latents at its first step.

        Where the run stops is read from the total of the pipeline's progress bar, which diffusers' SD and
        SDXL pipelines give in sampler steps (the user's ``num_inference_steps``, or for ``denoising_end``
        the loop's iterations), so it counts the loop's iterations only when the scheduler calls the UNet
        once per sampler step (:func:`_one_call_per_step`). Otherwise (Heun, KDPM2, PNDM) the run is served
        to the end of the timesteps, and a loop that stops early (SDXL's ``denoising_end``,
        ``pipe._interrupt``) ends the run when it leaves its progress bar's block, with the schedule uncut.
        """
        state = self.state
        first = self._first_step(timestep)
        stop = state.num_steps
        counts_iterations = _one_call_per_step(self.handle.scheduler)
        if counts_iterations and state.loop_steps is not None and 0 < state.loop_steps < stop - first:
            stop = first + state.loop_steps
        if first > 0 or stop < state.num_steps:
            keys = state.keys or self.handle.config.key_steps
            schedule = keys.resolve(state.num_steps, state.calibration, first, stop)
            state.stats.schedule = schedule
            state.is_key = schedule.is_key
            state.group_end = schedule.group_end
            state.num_steps = stop
        state.step = state.unet_calls = first
        state.started = True
        # Attention processors are set by the pipeline call itself (PAG's, just before its loop): read now.
        several = any(end - step > 1 for step, end in enumerate(state.group_end))  # a group of 2 or more
        if several and self.handle.config.decoder_batch_cap != 1:
            state.one_step_decoder = self.handle._decoder_splits_the_batch()

    def _first_step(self, timestep: Any) -> int:
        """The index, in the schedule set by ``set_timesteps``, of the run's first timestep.

        The pipeline passes a view of the scheduler's own timesteps: its index is read from the view's offset
        in memory, without a host sync. Anything else (a copy, a number) costs one host read per run.
        """
        state = self.state
        timesteps = state.timesteps
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            view = timestep.reshape(-1)[:1]
            if (
                view.dtype == timesteps.dtype
                and view.device == timesteps.device
                and timesteps.dim() == 1
                and view.untyped_storage().data_ptr() == timesteps.untyped_storage().data_ptr()
            ):
                stride = timesteps.stride(0) * timesteps.element_size()
                index, rest = (
                    divmod(view.data_ptr() - timesteps.data_ptr(), stride) if stride > 0 else (-1, 1)
                )
                if rest == 0 and 0 <= index < len(timesteps):
                    return index
            value = float(view[0])
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            value = float(timestep)
        else:
            value = None
        if value is not None and value in state.timestep_values:
            return state.timestep_values.index(value)
        shown = f"{value:g}" if value is not None else repr(timestep)
        values = state.timestep_values
        state.reset()
        raise UnsupportedModelError(
            f"faster_diffusion: the run's first UNet call has timestep {shown}, which is not one of the "
            f"{len(values)} timesteps set by set_timesteps() ({values[0]:g} to {values[-1]:g}). Faster "
            f"diffusion ({self.handle.config.mode_name}) places its full steps on the scheduler's own "
            "timesteps; a pipeline that passes other timesteps is not supported (remove faster diffusion for "
            "this pipeline)"
        )


class _Copier:
    """Set as ``__deepcopy__`` on each object a handle changes (``copy.deepcopy`` looks it up on the
    instance): the object is copied with the handle taken off for the length of the copy, and put back after.

    A copy of the changed object would not be sound: a module copied with diffusers' hook registry still runs
    the original's hooks, on the original's weights (the registry's rewritten ``forward`` is a closure over
    the original's hook chain), the scheduler's and the pipeline's taps are closures over the original's run
    state, and that state is per thread. A copy of the stock object is. A pipeline's copy then gets a handle
    of its own, with the same config (``reattach``); pipelines copied in one ``deepcopy`` that share the
    copied UNet share that handle, as the originals share theirs. A module or scheduler copied alone stays
    stock: it has no pipeline to run in.

    ``copy.copy`` of a changed object carries this attribute along in the instance's ``__dict__``. Called for
    any object but its own target, the copier copies that object stock (without itself and without the
    progress-bar tap it may carry), and touches no handle: a deep copy of a shallow copy is a stock copy of
    it, and a removed handle stays removed.
    """

    def __init__(self, handle: FasterDiffusion, target: Any, reattach: bool) -> None:
        self._handle = handle
        self.target = weakref.ref(target)
        self._reattach = reattach

    def __call__(self, memo: dict[int, Any]) -> Any:
        handle, target = self._handle, self.target()
        copying = _object_being_copied(target)
        if copying is not target or not handle.attached:
            return _stock_deepcopy(copying, memo)
        handle._detach()
        try:
            copied = copy.deepcopy(target, memo)
        finally:
            handle._attach()
        if self._reattach:
            # memo maps the original handle to its copy, for the other pipelines of this deepcopy.
            own = memo.get(id(handle))
            if own is not None and get_faster_diffusion(copied) is own:
                own._watch(copied)
            else:
                memo[id(handle)] = attach_reuse(copied, handle.config, handle._resolve_auto)
        return copied


def _object_being_copied(default: Any) -> Any:
    """The object whose ``__deepcopy__`` is being called: ``copy.deepcopy``'s own argument, read from its
    frame (CPython's ``copy.deepcopy(x, memo)``); ``default`` if the caller is not ``copy.deepcopy``."""
    frame = sys._getframe(2)
    if frame is not None and frame.f_code is copy.deepcopy.__code__:
        return frame.f_locals.get("x", default)
    return default


def _stock_deepcopy(obj: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of ``obj`` without the copy hook and the progress-bar tap that a shallow copy carried over
    in its ``__dict__`` (they are put back on ``obj`` after)."""
    own = vars(obj)
    carried = {
        name: own.pop(name)
        for name in ("__deepcopy__", "progress_bar")
        if name in own and (name == "__deepcopy__" or RunEndTap.is_tap(own[name]))
    }
    try:
        return copy.deepcopy(obj, memo)
    finally:
        own.update(carried)


class FasterDiffusion:
    """Faster diffusion attached to one pipeline. Made by :func:`apply_faster_diffusion`.

    ``last_run`` holds the :class:`RunStats` of the latest generation. Use ``remove()`` (or a ``with``
    block) to take the feature off; the pipeline then gives stock output exactly. ``copy.deepcopy(pipe)``
    gives a pipeline with a handle of its own, of the same config; a UNet or scheduler copied alone is stock,
    and so is a pipeline that shares the UNet but has not run yet (its loop is watched from its first run),
    and a deep copy of a ``copy.copy``. The copy takes the hooks off the original for its length: don't copy
    a pipeline while another thread runs it.
    """

    def __init__(self, pipe: Any, config: ReuseConfig, resolve_auto: AutoResolver | None = None) -> None:
        self.config = config
        self._resolve_auto = resolve_auto
        # (steps, key steps) whose fallback was announced by a CalibrationFallbackWarning.
        self._fallbacks_said: set[tuple[int, str]] = set()
        self._pipe = weakref.ref(pipe)
        self.unet = pipe.unet
        self.scheduler = pipe.scheduler
        self._state = _RunState()
        self._tap = SchedulerTap(self.scheduler, self._state, self)
        # One per pipeline whose loop is watched: this one, and any other that shares the UNet and scheduler
        # (DiffusionPipeline.from_pipe, or an image-to-image pipeline built on pipe.components), tapped at its
        # first run.
        self._run_ends = [RunEndTap(pipe, self._state)]
        # The __deepcopy__ of each object this handle changes (_Copier), while attached.
        self._copiers: list[_Copier] = []
        self._cached_modules = self._current_cached_modules()
        # Attention modules of the decoder, by name, whose processors are read at every run.
        self._decoder_attentions = [
            (f"up_blocks.{name}", module)
            for name, module in self.unet.up_blocks.named_modules()
            if isinstance(module, Attention)
        ]
        self._warned: set[str] = set()
        # The latest run's stats, of whichever thread ran it.
        self._latest: RunStats | None = None
        self._text_projections = [
            projection
            for module in self.unet.up_blocks.modules()
            if isinstance(module, Attention) and module.is_cross_attention
            for projection in (module.to_k, module.to_v)
        ]
        self.attached = False

    @property
    def last_run(self) -> RunStats:
        """The latest run of the calling thread; or, if it ran none, the latest run of any thread."""
        stats = self._state.stats
        if stats.schedule is None and self._latest is not None:
            return self._latest
        return stats

    def _current_cached_modules(self) -> list[torch.nn.Module]:
        return self.config.cached_modules(self.unet)

    def _follow_cached_modules(self) -> None:
        """Move the cached modules' hooks to modules that replaced the hooked ones since: a LoRA that targets
        ``conv_in``, loaded after ``apply_faster_diffusion``, wraps it in a new module (peft's), whose own
        computation on the step's latent would otherwise be added to the kept output of the module inside."""
        current = self._current_cached_modules()
        if len(current) == len(self._cached_modules) and all(
            new is old for new, old in zip(current, self._cached_modules, strict=True)
        ):
            return
        self._unhook_cached_modules()
        self._take_copiers()
        self._cached_modules = current
        self._hook_cached_modules()
        self._put_copiers()

    def _hook_cached_modules(self) -> None:
        for slot, module in enumerate(self._cached_modules):
            add_hook(module, _CachedModuleHook(self._state, slot), _CACHED_HOOK)

    def _unhook_cached_modules(self) -> None:
        for module in self._cached_modules:
            drop_hook(module, _CACHED_HOOK)

    def _decoder_splits_the_batch(self) -> bool:
        """Whether a decoder attention processor splits the batch (Perturbed-Attention Guidance's does, with
        ``chunk(3)``), so that a batch of several steps would mix them; warns once per processor."""
        for name, module in self._decoder_attentions:
            processor = type(module.processor)
            if processor not in ROW_WISE_PROCESSORS:
                if processor.__name__ not in self._warned:
                    self._warned.add(processor.__name__)
                    warnings.warn(
                        f"faster_diffusion: the attention processor {processor.__name__} on {name} (as set "
                        "by Perturbed-Attention Guidance, PAG, for layers of the decoder) may split the "
                        "batch, which would mix the steps of a batch of several steps; the UNet runs one "
                        "step at a time in these runs (partial steps still reuse the full steps' outputs). "
                        "Apply PAG to the mid block only (pag_applied_layers=['mid']) to keep batching steps",
                        stacklevel=2,
                    )
                return True
        return False

    def _watch_calling_pipeline(self) -> bool:
        """Find the pipeline whose call is setting the timesteps (a few frames up), and watch its loop as this
        handle's own pipeline's is watched. Returns whether the run's loop is watched."""
        frame = sys._getframe(1)
        for _ in range(_CALLER_DEPTH):
            if frame is None:
                return False
            caller = frame.f_locals.get("self")
            if isinstance(caller, DiffusionPipeline) and getattr(caller, "unet", None) is self.unet:
                return self._watch(caller)
            frame = frame.f_back
        return False

    def _watch(self, pipe: Any) -> bool:
        """Watch ``pipe``'s denoising loop (a pipeline that shares this handle's UNet), so that its runs end
        when its loop does; returns whether its loop is watched."""
        if any(tap.watches(pipe) for tap in self._run_ends):
            return True
        self._run_ends = [tap for tap in self._run_ends if tap._pipe() is not None]
        tap = RunEndTap(pipe, self._state)
        tap.attach()  # attaches nothing to a pipeline without a progress bar
        self._run_ends.append(tap)
        self._put_copiers()
        return tap.attached

    def _put_copiers(self) -> None:
        """Set a :class:`_Copier` as ``__deepcopy__`` on every object this handle changes that has none: the
        pipelines whose loops it watches (their copies get handles of their own), the UNet, the hooked
        modules inside it and the scheduler (copied stock)."""
        copied = {id(copier.target()) for copier in self._copiers}
        pipes = [(pipe, True) for tap in self._run_ends if (pipe := tap._pipe()) is not None]
        modules = [self.unet, *self._cached_modules, *self._text_projections, self.scheduler]
        targets = pipes + [(module, False) for module in modules]
        for target, reattach in targets:
            if id(target) not in copied and "__deepcopy__" not in vars(target):
                copier = _Copier(self, target, reattach)
                target.__deepcopy__ = copier
                self._copiers.append(copier)
                copied.add(id(target))

    def _take_copiers(self) -> None:
        for copier in self._copiers:
            target = copier.target()
            if target is not None and vars(target).get("__deepcopy__") is copier:
                delattr(target, "__deepcopy__")
        self._copiers = []

    def _attach(self) -> None:
        """Put the hooks, taps and copiers on; the run state is kept (a run in progress goes on)."""
        self._hook_cached_modules()
        add_hook(self.unet, _ReuseHook(self._state, self), _UNET_HOOK)
        for projection in self._text_projections:
            add_hook(projection, _RepeatedTextHook(self._state), _TEXT_HOOK)
        self._tap.attach()
        self._run_ends = [tap for tap in self._run_ends if tap._pipe() is not None]
        for tap in self._run_ends:
            tap.attach()
        self._put_copiers()
        self.attached = True

    def _detach(self) -> None:
        """Take the hooks, taps and copiers off, leaving stock objects; the run state is kept."""
        self._take_copiers()
        self._tap.detach()
        for tap in self._run_ends:
            tap.detach()
        drop_hook(self.unet, _UNET_HOOK)
        self._unhook_cached_modules()
        for projection in self._text_projections:
            drop_hook(projection, _TEXT_HOOK)
        self.attached = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within the block the pipeline is stock (the hooks are off); they go back on after it, as they
        were. A handle that is removed stays removed. :func:`faster_diffusion.calibrate` runs in this."""
        if not self.attached:
            yield
            return
        self._detach()
        try:
            yield
        finally:
            self._attach()

    def remove(self) -> None:
        """Take faster diffusion off the pipeline. Safe to call twice."""
        if not self.attached:
            return
        self._detach()
        self._state.reset()

    def __enter__(self) -> FasterDiffusion:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def schedule_for(self, num_steps: int) -> KeyStepSchedule:
        """The key-step schedule a run of ``num_steps`` steps will use (validates it now): for ``auto`` key
        steps without a calibration, their fallback (:meth:`KeySteps.fallback`)."""
        keys, calibration, _ = self._placement(num_steps)
        return keys.resolve(num_steps, calibration)

    def _placement(
        self, num_steps: int, timesteps: Sequence[float] | None = None
    ) -> tuple[KeySteps, Any, str | None]:
        """The key steps a run of ``num_steps`` steps places, the calibration they are placed by, and why
        they are not the config's (``None`` when they are). ``auto`` key steps on a model with no
        calibration for the run's scheduler and step count fall back to :meth:`KeySteps.fallback`, as the
        rule in ``benchmarks/README.md`` ("The first call without a calibration") says, with a
        :class:`CalibrationFallbackWarning` the first time for this step count and scheduler."""
        keys = self.config.key_steps.for_steps(num_steps)  # 'auto:B/N' scaled to the run
        try:
            return keys, self._calibration(num_steps, timesteps), None
        except CalibrationMissing as missing:
            keys.check_budget_fits(num_steps)
            fallback = keys.fallback(num_steps)
            count = len(fallback.resolve(num_steps).indices)
            reason = (
                f"{missing} This run places {count} key steps as {fallback} (DeepCache's uniform interval) "
                f"instead of {keys}."
            )
            seen = (num_steps, str(keys))  # the handle's scheduler cannot change
            if seen not in self._fallbacks_said:
                self._fallbacks_said.add(seen)
                warnings.warn(f"faster_diffusion: {reason}", CalibrationFallbackWarning, stacklevel=2)
            return fallback, None, reason

    def _calibration(self, num_steps: int, timesteps: Sequence[float] | None = None) -> Any:
        """For ``key_steps="auto"``: the calibration of this model, sampler and step count, from the resolver
        the handle was made with (a clear error if there is none, or if the run's ``timesteps`` are not the
        scheduler's own); ``None`` for the other kinds."""
        if self.config.key_steps.kind is not KeyStepKind.AUTO:
            return None
        if self._resolve_auto is None:
            raise KeyStepError(
                "key_steps 'auto' needs a calibration: apply with faster_diffusion.apply_faster_diffusion(), "
                "which places it from faster_diffusion.calibration"
            )
        target = self.config.calibration_target
        return self._resolve_auto(self._pipe(), self.scheduler, num_steps, timesteps, target=target)

    def _resident_weight_bytes(self, device: torch.device) -> int:
        """Bytes of the weights the pipeline's torch modules hold on ``device`` (the UNet's alone if the
        pipeline is gone): what a stock run's peak holds besides its activations."""
        pipe = self._pipe()
        components = getattr(pipe, "components", None) or {}
        modules = [module for module in components.values() if isinstance(module, torch.nn.Module)]
        if not any(module is self.unet for module in modules):
            modules.append(self.unet)
        return resident_weight_bytes(modules, device)

    def _check_scheduler(self) -> None:
        pipe = self._pipe()
        if pipe is not None and pipe.scheduler is not self.scheduler:
            raise RuntimeError(
                "faster_diffusion: pipe.scheduler was replaced after apply_faster_diffusion(); set the "
                "scheduler first, or call remove() and apply_faster_diffusion() again"
            )

    def _start_run(self, timesteps: torch.Tensor) -> None:
        state = self._state
        state.reset()
        check_supported_unet(self.unet, self.config.mode_name)
        check_supported_scheduler(self.scheduler, self.config.mode_name, _injects(self.config))
        self._follow_cached_modules()
        # One host read of the timesteps per run (not per step), to place the injection steps.
        values = timesteps.detach().to("cpu", torch.float64).tolist()
        keys, calibration, fallback = self._placement(len(values), values)
        schedule = keys.resolve(len(values), calibration)
        state.stats = RunStats(schedule=schedule, fallback=fallback)
        state.keys = keys
        state.calibration = calibration
        state.is_key = schedule.is_key
        state.group_end = schedule.group_end
        state.inject = self.config.noise_injection.applies_at(values)
        state.latent_scales = latent_scales(self.scheduler) if any(state.inject) else ()
        state.timesteps = timesteps
        state.timestep_values = tuple(values)
        state.num_steps = len(values)
        state.adapter_layers = _adapter_layers(self.unet)
        state.forecast_slots = frozenset(self.config.forecast_slots(len(self._cached_modules)))
        state.copies_served = self.config.copies_served(self.unet)
        state.watched = self._watch_calling_pipeline()
        state.active = True
        self._latest = state.stats


def _injects(config: ReuseConfig) -> bool:
    """Whether ``config`` injects prior noise at all (the schedulers that allows are fewer)."""
    injection = config.noise_injection
    return injection.enabled and injection.alpha > 0 and injection.tau > 0


def _one_call_per_step(scheduler: Any) -> bool:
    """Whether the loop over ``scheduler``'s timesteps calls the UNet once per sampler step, so that the
    progress bar's total (sampler steps) counts the loop's iterations: not so for Heun and KDPM2 (2N - 1 calls
    for N steps) or PNDM (N + 1: its warm-up repeats a timestep). A scheduler without ``num_inference_steps``
    is taken at its word."""
    steps = getattr(scheduler, "num_inference_steps", None)
    timesteps = getattr(scheduler, "timesteps", None)
    return not isinstance(steps, int) or timesteps is None or len(timesteps) == steps


def attach_reuse(pipe: Any, config: ReuseConfig, resolve_auto: AutoResolver | None = None) -> FasterDiffusion:
    """Attach the reuse mode of ``config`` (a :class:`ReuseConfig`: which modules full steps compute and
    partial steps reuse, and the rest the module docstring lists) to ``pipe``, in place: the checks, the hooks
    and the handle that every mode shares. Each mode's ``apply_*`` function calls it."""
    unet = getattr(pipe, "unet", None)
    scheduler = getattr(pipe, "scheduler", None)
    if unet is None or scheduler is None:
        raise UnsupportedModelError(
            f"faster_diffusion needs a pipeline with a unet and a scheduler, got {type(pipe).__name__}"
        )
    refused = refused_variant(pipe)
    if refused is not None:
        raise UnsupportedModelError(f"faster_diffusion: {refused}")
    check_supported_unet(unet, config.mode_name)
    for name in ("set_timesteps", "step"):
        if not callable(getattr(scheduler, name, None)):
            raise UnsupportedModelError(f"faster_diffusion: the scheduler has no {name}() method")
    check_supported_scheduler(scheduler, config.mode_name, _injects(config))
    if get_faster_diffusion(pipe) is not None:
        raise RuntimeError(
            "faster_diffusion is already applied to this pipeline, or to another that shares its UNet (as "
            "DiffusionPipeline.from_pipe() and pipelines built on pipe.components do, which then run with "
            "it); call remove() first"
        )
    if SchedulerTap.tapped(scheduler):
        raise UnsupportedModelError(
            "faster_diffusion: this pipeline's scheduler is shared with another pipeline that has faster "
            "diffusion attached, and one scheduler can carry one of them; give this pipeline a scheduler of "
            "its own: pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)"
        )
    handle = FasterDiffusion(pipe, config, resolve_auto)
    handle._attach()
    return handle


def get_faster_diffusion(pipe: Any) -> FasterDiffusion | None:
    """The handle attached to ``pipe``, or ``None``."""
    unet = getattr(pipe, "unet", None)
    registry = getattr(unet, "_diffusers_hook", None)
    hook = registry.get_hook(_UNET_HOOK) if registry is not None else None
    return hook.handle if hook is not None else None


def remove_faster_diffusion(pipe: Any) -> bool:
    """Take faster diffusion off ``pipe`` if it is attached. Returns whether anything was removed."""
    handle = get_faster_diffusion(pipe)
    if handle is None:
        return False
    handle.remove()
    return True
