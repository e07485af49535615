"""Measuring the costs that calibration places key steps by: one stock run recorded, then each criterion.

A criterion is a function of a recorded :class:`StockRun` that returns the N x N matrix ``cost[k, j]``, the
cost of reusing step k's features at step j (mean over the run's images), registered by name with
:func:`register_criterion`. The three built in (``"feature"``, ``"prediction"``, ``"final"``) are described in
:mod:`faster_diffusion.calibration`. A new criterion is one function and one registration.

Which features are reused is the calibration's *target*, registered by each reuse mode with
:func:`register_target`: encoder propagation registers ``"encoder"`` (:mod:`faster_diffusion.encoder`), deep
reuse ``"deep:B"``, the modules a partial step of branch B does not run (:mod:`faster_diffusion.deep`). This
module names no mode; importing the package registers them all. The run records and replays exactly the
target's modules, so every criterion measures that mode's reuse.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.hooks import ModelHook

from ._hooks import add_hook, drop_hook, map_tensors
from .memory import available_memory_bytes, decoder_row_bytes
from .schedule import CRITERION_NAME, CalibrationError

_REPLAY_HOOK = "faster_diffusion_calibration"
_TAIL_HOOK = "faster_diffusion_calibration_tail"


class _RecordReplayHook(ModelHook):
    """On an encoder module: record its output at every step, or serve a given output without computing.
    While ``serve["record"]`` is false it computes without recording."""

    def __init__(self, records: list[Any], serve: dict[str, Any]) -> None:
        super().__init__()
        self.records = records
        self.serve = serve

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        served = self.serve.get("outputs")
        if served is not None:
            return served[id(self)]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.serve.get("record", True):
            self.records.append(output)
        return output


class _TailHook(ModelHook):
    """On the UNet, for one run of several copies of the calibration batch: calls before ``step`` return
    ``stock`` (the stock run's outputs, tiled to the batch), so the latents stay stock's without computing;
    the call at ``step`` runs on the encoder outputs in ``served`` (which the :class:`_RecordReplayHook`
    instances return); later calls run as usual."""

    def __init__(self, stock: list[torch.Tensor], step: int, served: dict[int, Any], serve: dict) -> None:
        super().__init__()
        self.stock, self.step, self.served, self.serve = stock, step, served, serve
        self.calls = 0

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        index, self.calls = self.calls, self.calls + 1
        if index < self.step:
            sample = self.stock[index]
            return (sample,) if not kwargs.get("return_dict", True) else _unet_output(sample)
        if index == self.step:
            self.serve["outputs"] = self.served
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.serve.pop("outputs", None)


def _unet_output(sample: torch.Tensor) -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def _flat(value: Any) -> list[torch.Tensor]:
    """Every distinct tensor of a (nested) output, in order."""
    found: dict[int, torch.Tensor] = {}
    map_tensors(value, lambda t: found.setdefault(id(t), t))
    return list(found.values())


def _guided(prediction: torch.Tensor, images: int, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance as diffusers' SD pipelines apply it (unconditional rows first)."""
    if prediction.shape[0] == 2 * images:
        uncond, cond = prediction.chunk(2)
        return (uncond + guidance_scale * (cond - uncond)).double()
    return prediction.double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of ||a - b|| / ||b||."""
    diff = (a - b).flatten(1).norm(dim=1)
    return float((diff / b.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


def _default_max_rows(unet: torch.nn.Module, sample: torch.Tensor) -> int:
    row = decoder_row_bytes(unet.config, sample.shape[-2], sample.shape[-1], sample.element_size())
    return int(max(1, min(512, available_memory_bytes(sample.device) // 4 // max(row, 1))))


def _row_sq(tensor: torch.Tensor) -> torch.Tensor:
    """Squared norm of every row, accumulated in fp32 (fp16 values squared would overflow)."""
    return tensor.flatten(1).float().pow(2).sum(1).double()


def _repeat_per_row(value: Any, rows: int, times: int) -> Any:
    """Repeat ``times`` times every tensor whose first dimension is ``rows`` (per-row inputs), in nested
    tuples, lists and dicts; timesteps and other tensors stay as they are."""

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() > 0 and tensor.shape[0] == rows and times > 1:
            return tensor.repeat(times, *([1] * (tensor.dim() - 1)))
        return tensor

    return map_tensors(value, repeat)


def _tile(parts: list[torch.Tensor], halves: int) -> torch.Tensor:
    """Join per-run tensors into the batch of one pipeline call of their runs' prompts in a row: each part's
    rows are ``halves`` blocks (unconditional then conditional under guidance), and the call's batch is the
    unconditional block of every part, then the conditional block of every part."""
    blocks = [part.chunk(halves) for part in parts]
    return torch.cat([block[h] for h in range(halves) for block in blocks])


def _concat(parts: list[Any], join: Any = torch.cat) -> Any:
    """Concatenate same-structured (nested) outputs along the batch dimension, tensor by tensor (with
    ``join``); a tensor that appears twice in each part (a down block's last output) stays one shared
    tensor."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return join(parts)
    if isinstance(first, (tuple, list)):
        cache: dict[tuple[int, ...], torch.Tensor] = {}

        def walk(items: list[Any]) -> Any:
            head = items[0]
            if isinstance(head, torch.Tensor):
                key = tuple(id(t) for t in items)
                if key not in cache:
                    cache[key] = join(items)
                return cache[key]
            if isinstance(head, (tuple, list)):
                return type(head)(walk([item[i] for item in items]) for i in range(len(head)))
            return head

        return walk(parts)
    return first


#: Gives the modules a target reuses, for a UNet and the text after the target's ``:`` (``None`` if none).
TargetModules = Callable[[torch.nn.Module, "str | None"], list[torch.nn.Module]]

_TARGETS: dict[str, tuple[TargetModules, str | None]] = {}


def register_target(name: str, modules: TargetModules, default_arg: str | None = None) -> None:
    """Make ``name`` (or ``name:ARG``) a calibration target whose reused modules are ``modules(unet, ARG)``;
    ``name`` alone means ``name:default_arg`` when that is given."""
    if not isinstance(name, str) or not name or ":" in name:
        raise TypeError(f"a target's name must be a non-empty string without ':', got {name!r}")
    if not callable(modules):
        raise TypeError(f"modules must be callable, got {modules!r}")
    _TARGETS[name] = (modules, default_arg)


def canonical_target(target: str) -> str:
    """``target`` as calibrations are keyed by: ``"deep"`` is ``"deep:0"``."""
    if not isinstance(target, str):
        raise CalibrationError(f"target must be a text such as 'encoder' or 'deep:0', got {target!r}")
    name, colon, arg = target.strip().partition(":")
    if name not in _TARGETS:
        known = tuple(sorted(_TARGETS))  # not in the order the modes happened to be imported
        raise CalibrationError(
            f"target must be one of {known} (with ':ARG' where one takes it), got {target!r}"
        )
    default = _TARGETS[name][1]
    if not colon and default is not None:
        return f"{name}:{default}"
    return f"{name}:{arg}" if colon else name


def __getattr__(name: str) -> Any:
    """``encoder_modules`` lived here; it is encoder propagation's own now (:mod:`faster_diffusion.encoder`),
    served from the registered ``"encoder"`` target, with a ``DeprecationWarning``."""
    if name == "encoder_modules" and "encoder" in _TARGETS:
        warnings.warn(
            "faster_diffusion.measure.encoder_modules is deprecated: import encoder_modules from "
            "faster_diffusion.encoder",
            DeprecationWarning,
            stacklevel=2,
        )
        return _TARGETS["encoder"][0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def target_modules(unet: torch.nn.Module, target: str) -> list[torch.nn.Module]:
    """The modules ``target`` reuses in ``unet`` (a :class:`CalibrationError` that names the known targets for
    an unknown one, and the target's own for a bad argument)."""
    name, colon, arg = canonical_target(target).partition(":")
    try:
        return _TARGETS[name][0](unet, arg if colon else None)
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"target {target!r}: {error}") from error


@dataclass
class StockRun:
    """One recorded stock run of a pipeline over some prompts, for the criteria to measure from."""

    pipe: Any
    #: The target's modules (:func:`target_modules`) and their record-and-replay hooks.
    modules: list[torch.nn.Module]
    hooks: list[_RecordReplayHook]
    #: Each of those modules' output at every step: ``records[module][step]``.
    records: list[list[Any]]
    #: Shared with the hooks: what they serve instead of computing (see :class:`_RecordReplayHook`).
    serve: dict[str, Any]
    #: Every UNet call of the run: its positional and keyword inputs and its output sample.
    calls: list[tuple[tuple, dict, torch.Tensor]]
    #: Each step's classifier-free-guided prediction, and the run's final latents.
    stock: list[torch.Tensor]
    final: torch.Tensor
    prompts: Sequence[str]
    seeds: Sequence[int]
    num_steps: int
    guidance_scale: float
    height: int
    width: int
    device: Any
    max_rows: int | None

    @property
    def images(self) -> int:
        return len(self.prompts)

    @functools.cached_property
    def rows_per_call(self) -> tuple[int, int]:
        """The rows of one UNet call of the run, and how many of its steps one replay call may hold (the free
        memory is read once per run, whichever criteria replay)."""
        rows = self.calls[0][2].shape[0]
        max_rows = self.max_rows
        if max_rows is None:
            max_rows = _default_max_rows(self.pipe.unet, self.calls[0][2])
        return rows, max(1, max_rows // rows)


#: Measures one criterion's cost matrix from a recorded run.
Criterion = Callable[[StockRun], np.ndarray]

#: The criteria by name, in the order they were registered.
_CRITERIA: dict[str, Criterion] = {}


def register_criterion(name: str, measure: Criterion) -> None:
    """Make ``name`` a calibration criterion, measured by ``measure(run)``. A name is lowercase letters,
    digits, ``_`` and ``-``, starting with a letter, so that key steps can name it (``auto:6@name``)."""
    if not isinstance(name, str) or not CRITERION_NAME.fullmatch(name):
        raise TypeError(
            f"a criterion's name must be lowercase letters, digits, '_' or '-', starting with a letter, got "
            f"{name!r}"
        )
    if not callable(measure):
        raise TypeError(f"measure must be callable, got {measure!r}")
    _CRITERIA[name] = measure


def criterion_names() -> tuple[str, ...]:
    """The registered criteria."""
    return tuple(_CRITERIA)


def feature_cost(run: StockRun) -> np.ndarray:
    """``||F_j - F_k|| / ||F_j||`` over the encoder outputs of steps k < j, from the records alone."""
    n = run.num_steps
    cost = np.zeros((n, n))
    modules = range(len(run.modules))
    tensors = [[t for m in modules for t in _flat(run.records[m][j])] for j in range(n)]
    for j in range(1, n):
        norm = sum(_row_sq(t) for t in tensors[j]).sqrt().clamp_min(1e-12)
        for k in range(j):
            diff = sum(_row_sq(a - b) for a, b in zip(tensors[j], tensors[k], strict=True))
            cost[k, j] = float((diff.sqrt() / norm).mean())
    return cost


def prediction_cost(run: StockRun) -> np.ndarray:
    """The error in step j's guided prediction when its decoder reads step k's recorded encoder outputs."""
    n = run.num_steps
    cost = np.zeros((n, n))
    unet, hooks, records, serve = run.pipe.unet, run.hooks, run.records, run.serve
    rows, per_call = run.rows_per_call
    for j in range(1, n):
        args, kwargs, _ = run.calls[j]
        for start in range(0, j, per_call):
            ks = list(range(start, min(j, start + per_call)))
            serve["outputs"] = {
                id(hook): _concat([record[k] for k in ks])
                for hook, record in zip(hooks, records, strict=True)
            }
            call_args, call_kwargs = _repeat_per_row((args, kwargs), rows, len(ks))
            out = unet(*call_args, **call_kwargs)
            serve.pop("outputs")
            sample = out[0] if isinstance(out, tuple) else out.sample
            for index, k in enumerate(ks):
                part = _guided(sample[index * rows : (index + 1) * rows], run.images, run.guidance_scale)
                cost[k, j] = _relative(part, run.stock[j])
    return cost


def final_cost(run: StockRun) -> np.ndarray:
    """The error in the final latents of a run that reuses step k's encoder outputs at step j alone."""
    n = run.num_steps
    cost = np.zeros((n, n))
    unet, hooks, records, serve, images = run.pipe.unet, run.hooks, run.records, run.serve, run.images
    rows, per_call = run.rows_per_call
    halves = rows // images
    serve["record"] = False
    for j in range(1, n):
        for start in range(0, j, per_call):
            ks = list(range(start, min(j, start + per_call)))
            copies = len(ks)
            tail = _TailHook(
                [_tile([sample] * copies, halves) for _, _, sample in run.calls[:j]],
                j,
                {
                    id(hook): _concat([record[k] for k in ks], lambda p: _tile(p, halves))
                    for hook, record in zip(hooks, records, strict=True)
                },
                serve,
            )
            add_hook(unet, tail, _TAIL_HOOK)
            try:
                out = run.pipe(
                    list(run.prompts) * copies,
                    num_inference_steps=n,
                    guidance_scale=run.guidance_scale,
                    height=run.height,
                    width=run.width,
                    generator=[
                        torch.Generator(device=run.device).manual_seed(int(s)) for _ in ks for s in run.seeds
                    ],
                    output_type="latent",
                ).images
            finally:
                drop_hook(unet, _TAIL_HOOK)
            if tail.calls != n:
                raise CalibrationError(
                    f"calibration expected {n} UNet calls in a run of {n} steps, saw {tail.calls}"
                )
            for index, k in enumerate(ks):
                part = out[index * images : (index + 1) * images].double()
                cost[k, j] = _relative(part, run.final.double())
    return cost


register_criterion("prediction", prediction_cost)
register_criterion("feature", feature_cost)
register_criterion("final", final_cost)


def measure_run(
    pipe: Any,
    *,
    num_inference_steps: int,
    prompts: Sequence[str],
    seeds: Sequence[int],
    guidance_scale: float,
    height: int,
    width: int,
    criteria: Sequence[str],
    max_rows: int | None,
    target: str = "encoder",
) -> dict[str, np.ndarray]:
    """One stock run of ``pipe`` over ``prompts``, recorded, then the cost matrices of ``criteria`` measured
    from it (means over its images), for reusing the modules of ``target``."""
    unknown = [c for c in criteria if c not in _CRITERIA]
    if unknown:
        raise CalibrationError(f"criterion must be among {criterion_names()}, got {unknown[0]!r}")
    unet = pipe.unet
    modules = target_modules(unet, target)
    records: list[list[Any]] = [[] for _ in modules]
    serve: dict[str, Any] = {}
    hooks = [_RecordReplayHook(r, serve) for r in records]
    calls: list[tuple[tuple, dict, torch.Tensor]] = []

    def record_inputs(module, args, kwargs):
        calls.append((args, kwargs))

    def record_output(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        args_kwargs = calls[-1]
        calls[-1] = (*args_kwargs, sample)

    for module, hook in zip(modules, hooks, strict=True):
        add_hook(module, hook, _REPLAY_HOOK)
    handles = [
        unet.register_forward_pre_hook(record_inputs, with_kwargs=True),
        unet.register_forward_hook(record_output, with_kwargs=True),
    ]
    n = num_inference_steps
    try:
        device = getattr(pipe, "_execution_device", unet.device)
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            final = pipe(
                list(prompts),
                num_inference_steps=n,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generators,
                output_type="latent",
            ).images
            for handle in handles:  # the replays below are not stock calls
                handle.remove()
            if len(calls) != n or any(len(r) != n for r in records):
                raise CalibrationError(
                    f"calibration expected {n} UNet calls in a stock run of {n} steps, saw {len(calls)}; the "
                    "sampler must call the UNet once per step"
                )
            run = StockRun(
                pipe=pipe,
                modules=modules,
                hooks=hooks,
                records=records,
                serve=serve,
                calls=calls,
                stock=[_guided(sample, len(prompts), guidance_scale) for _, _, sample in calls],
                final=final,
                prompts=prompts,
                seeds=seeds,
                num_steps=n,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                device=device,
                max_rows=max_rows,
            )
            return {criterion: _CRITERIA[criterion](run) for criterion in criteria}
    finally:
        serve.pop("outputs", None)
        serve.pop("record", None)
        for handle in handles:
            handle.remove()
        for module in modules:
            drop_hook(module, _REPLAY_HOOK)
