"""How deep deep reuse should reach, per model: chosen from costs measured on the model.

Deep reuse (:mod:`faster_diffusion.deep`) trades two things at a given cost of a run. A deeper ``branch``
makes a partial step run more of the UNet, so it strays less from stock, but costs more, so fewer full steps
fit. Both sides are measured on the model:

- **Time.** :func:`measure_step_costs` times a partial step of each branch, in full UNet passes, on the
  pipeline's own device, size and sampler (each run of one full step and partial ones right after a stock run
  of as many steps, so that drift of the machine cancels). At a cost of ``C`` full passes for ``N`` steps,
  branch ``b`` with a partial step of cost ``p_b`` affords ``F_b = floor((C - N p_b) / (1 - p_b))`` full
  steps (:func:`full_steps_within`).
- **Error.** Each branch has its own calibration (target ``"deep:B"``, :func:`faster_diffusion.calibrate`).
  Read with the ``prediction`` criterion, its cost matrix is the error in a step's guided noise prediction
  when the modules the branch skips serve an earlier full step's outputs: the same quantity for every branch,
  so the predicted errors of each branch's best placement of ``F_b`` full steps (the calibration's exact
  optimiser) can be compared across branches.

:func:`choose_depth` picks the branch of least predicted error and returns it with its placement
(:class:`DepthChoice`, whose :meth:`~DepthChoice.config` is a :class:`~faster_diffusion.DeepReuseConfig`).
Whether the predicted error ranks branches as the images do is judged by ``benchmarks/depth_choice.py``: on
both reference models, at the cost of each of DeepCache's intervals 2 to 5 with DPM-Solver-20, the branch it
picked had the highest PSNR against stock of every branch that fit (branch 4 at interval 2's cost on the first
model, +16.7 dB over DeepCache; branch 0, placed by its calibration, everywhere else).

Example:
    >>> from faster_diffusion import calibrate, choose_depth, measure_step_costs  # doctest: +SKIP
    >>> use_sampler(pipe, "DPM-Solver-20")                                         # doctest: +SKIP
    >>> costs = measure_step_costs(pipe, branches=range(4))                        # doctest: +SKIP
    >>> for b in costs:                                                            # doctest: +SKIP
    ...     calibrate(pipe, target=f"deep:{b}", criterion="prediction")
    >>> choice = choose_depth(pipe, cost=8.0, step_costs=costs)                    # doctest: +SKIP
    >>> handle = apply_faster_diffusion(pipe, choice.config())                     # doctest: +SKIP
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .calibration import Calibration, _default_steps, find_calibration, optimal_key_steps, schedule_cost
from .deep import DeepReuseConfig, branch_count
from .engine import get_faster_diffusion
from .modes import apply_faster_diffusion
from .schedule import CalibrationError, KeySteps

__all__ = [
    "DepthCandidate",
    "DepthChoice",
    "choose_depth",
    "full_steps_within",
    "measure_step_costs",
    "run_cost",
]

#: The criterion :func:`choose_depth` compares branches by: the only built-in one that measures the same
#: quantity (the step's guided prediction) whatever the branch.
DEPTH_CRITERION = "prediction"


def run_cost(full_steps: int, num_steps: int, partial: float) -> float:
    """The cost, in full UNet passes, of a run of ``num_steps`` steps of which ``full_steps`` are full and the
    others partial steps costing ``partial`` each."""
    return full_steps + (num_steps - full_steps) * partial


def full_steps_within(cost: float, num_steps: int, partial: float) -> int:
    """The most full steps of a run of ``num_steps`` steps whose cost ``F + (num_steps - F) * partial`` (in
    full UNet passes) is at most ``cost``; at most ``num_steps``, and 0 when not even one fits."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a whole number >= 1, got {num_steps!r}")
    _check_cost("partial", partial)
    _check_cost("cost", cost)
    if partial >= 1:
        return num_steps if cost >= num_steps else 0
    full = math.floor((cost - num_steps * partial) / (1 - partial) + 1e-9)
    return max(0, min(num_steps, full))


def _check_cost(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class DepthCandidate:
    """One branch at the cost asked for."""

    branch: int
    #: Cost of one partial step, in full UNet passes.
    partial: float
    #: Full steps that fit the cost.
    full_steps: int
    #: Their placement by the branch's calibration (``()`` when fewer than 1 fits).
    indices: tuple[int, ...]
    #: The calibration's predicted error of that placement (``inf`` when none fits).
    predicted: float
    #: The run's cost in full UNet passes, ``F + (N - F) * partial`` (``inf`` when none fits).
    cost: float


@dataclass(frozen=True)
class DepthChoice:
    """What :func:`choose_depth` picked, with every candidate it compared."""

    #: The branch of least predicted error.
    branch: int
    #: Its full steps, as an explicit list that says where it came from.
    key_steps: KeySteps
    #: Every branch compared, in branch order.
    candidates: tuple[DepthCandidate, ...]
    #: The cost asked for, in full UNet passes.
    budget: float

    @property
    def chosen(self) -> DepthCandidate:
        return next(c for c in self.candidates if c.branch == self.branch)

    def config(self, **options: Any) -> DeepReuseConfig:
        """The deep reuse config of the choice (``options``: the config's other fields)."""
        return DeepReuseConfig(key_steps=self.key_steps, branch=self.branch, **options)

    def describe(self) -> str:
        rows = ", ".join(
            f"b{c.branch}: {c.full_steps} full, {c.predicted:.4g}" if c.indices else f"b{c.branch}: none fits"
            for c in self.candidates
        )
        return (
            f"branch {self.branch} with {self.chosen.full_steps} full steps {list(self.chosen.indices)} at "
            f"{self.budget:g} full passes (predicted error per branch: {rows})"
        )


def choose_depth(
    pipe: Any,
    cost: float,
    step_costs: Mapping[int, float],
    *,
    num_inference_steps: int | None = None,
    calibrations: Mapping[int, Calibration] | None = None,
) -> DepthChoice:
    """The branch of deep reuse, and its full steps, of least predicted error at a run cost of ``cost`` full
    UNet passes (see the module docstring).

    ``step_costs``: the cost of a partial step of each branch to compare, in full passes
    (:func:`measure_step_costs`). ``num_inference_steps``: the run's (default: the sampler's, 50 for DDIM and
    20 for DPM-Solver). ``calibrations``: each branch's ``deep:B`` calibration; by default the ones made or
    saved for ``pipe``, its scheduler and the step count (a :class:`CalibrationError` names any that is
    missing, and how to make it). Ties go to the shallower branch.
    """
    if not isinstance(step_costs, Mapping) or not step_costs:
        raise ValueError(f"step_costs must map branches to partial-step costs, got {step_costs!r}")
    count = branch_count(pipe.unet)
    for branch, partial in step_costs.items():
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
            raise ValueError(
                f"step_costs: a branch must be a whole number from 0 to {count - 1}, got {branch!r}"
            )
        _check_cost(f"step_costs[{branch}]", partial)
    _check_cost("cost", cost)
    if num_inference_steps is None:
        try:
            steps = _default_steps(pipe.scheduler)
        except CalibrationError:
            name = type(pipe.scheduler).__name__
            raise ValueError(
                f"choose_depth: pass num_inference_steps; there is no default for {name}"
            ) from None
    else:
        steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"num_inference_steps must be a whole number >= 2, got {steps!r}")
    found = dict(calibrations or {})
    missing = []
    for branch in sorted(step_costs):
        if branch not in found:
            calibration = find_calibration(pipe, steps, target=f"deep:{branch}")
            if calibration is None:
                missing.append(branch)
            else:
                found[branch] = calibration
    if missing:
        calls = "; ".join(
            f"calibrate(pipe, num_inference_steps={steps}, target='deep:{b}', criterion='{DEPTH_CRITERION}')"
            for b in missing
        )
        raise CalibrationError(
            f"choose_depth: no deep:B calibration of this model for branches {missing} with {steps} steps: "
            f"{calls}"
        )
    read = {branch: _read(found[branch], branch, steps) for branch in sorted(step_costs)}
    candidates = []
    for branch, calibration in read.items():
        partial = float(step_costs[branch])
        full = full_steps_within(cost, steps, partial)
        if full < 1:
            candidates.append(DepthCandidate(branch, partial, 0, (), math.inf, math.inf))
            continue
        matrix = calibration.matrix
        indices = optimal_key_steps(matrix, full)
        predicted = schedule_cost(matrix, indices)
        candidates.append(
            DepthCandidate(branch, partial, full, indices, predicted, run_cost(full, steps, partial))
        )
    best = min(candidates, key=lambda c: (c.predicted, c.branch))
    if not best.indices:
        cheapest = min(candidates, key=lambda c: c.partial)
        least = run_cost(1, steps, cheapest.partial)
        raise ValueError(
            f"cost {cost!r} fits no full step of any branch compared; the least is {least:.3g} full passes "
            f"(branch {cheapest.branch}: one full step, the rest partial)"
        )
    origin = f"depth choice at {cost:g} full passes, branch {best.branch}, {read[best.branch].describe()}"
    keys = KeySteps.explicit(best.indices).with_origin(origin)
    return DepthChoice(branch=best.branch, key_steps=keys, candidates=tuple(candidates), budget=float(cost))


def _read(calibration: Calibration, branch: int, steps: int) -> Calibration:
    """``calibration``, checked to be branch ``branch``'s for ``steps`` steps, read with
    :data:`DEPTH_CRITERION`."""
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibrations[{branch}] must be a Calibration, got {type(calibration).__name__}")
    if calibration.target != f"deep:{branch}" or calibration.num_steps != steps:
        raise CalibrationError(
            f"calibrations[{branch}] is a calibration of {calibration.target} for {calibration.num_steps} "
            f"steps, not of deep:{branch} for {steps}"
        )
    if DEPTH_CRITERION not in calibration.criteria:
        raise CalibrationError(
            f"the deep:{branch} calibration did not measure the {DEPTH_CRITERION!r} criterion, the only one "
            "that compares branches; calibrate it again with criterion='prediction'"
        )
    return calibration.with_criterion(DEPTH_CRITERION)


def measure_step_costs(
    pipe: Any,
    branches: Iterable[int] | None = None,
    *,
    num_inference_steps: int = 6,
    repeats: int = 2,
    height: int | None = None,
    width: int | None = None,
    prompt: str = "a photo",
    batch_size: int = 1,
) -> dict[int, float]:
    """The cost of a partial step of each of ``branches`` (default: all of the UNet's), in full UNet passes,
    timed on ``pipe`` as it is (its device, dtype and sampler) at ``height`` x ``width`` (default: its own
    size), for ``batch_size`` images a call (the ratio depends on the batch on a GPU).

    Each branch is timed as a run of ``num_inference_steps`` steps with one full step and partial ones, right
    after a stock run of as many steps; its cost is the median over ``repeats`` of
    ``(t - s / n) / ((n - 1) s / n)`` (``t`` the run's time in the UNet's calls, ``s`` stock's, ``n`` the
    steps), so that drift of the machine between pairs cancels. Only the UNet's calls are timed (forward hooks
    on it), so the text encoder, the scheduler and the VAE do not count. Stock and each branch run once
    untimed first (with a compiled UNet, that is where each compiles).
    """
    if get_faster_diffusion(pipe) is not None:
        raise RuntimeError(
            "measure_step_costs: faster diffusion is attached to this pipeline; call remove() first"
        )
    count = branch_count(pipe.unet)
    chosen = list(range(count)) if branches is None else list(branches)
    if not chosen or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < count for b in chosen):
        raise ValueError(f"branches must be whole numbers from 0 to {count - 1}, got {chosen!r}")
    for name, value, low in (
        ("num_inference_steps", num_inference_steps, 2),
        ("repeats", repeats, 1),
        ("batch_size", batch_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or size, width or size
    one = KeySteps.explicit([0])

    spent = [0.0, 0.0]  # seconds in the UNet's calls; when the current call started

    def before(module, args):
        _synchronize(pipe)
        spent[1] = time.perf_counter()

    def after(module, args, output):
        _synchronize(pipe)
        spent[0] += time.perf_counter() - spent[1]

    def timed(branch: int | None) -> float:
        handle = (
            None
            if branch is None
            else apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=one, branch=branch))
        )
        hooks = [pipe.unet.register_forward_pre_hook(before), pipe.unet.register_forward_hook(after)]
        spent[0] = 0.0
        try:
            with torch.inference_mode():
                pipe(
                    prompt,
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    num_images_per_prompt=batch_size,
                    output_type="latent",
                    generator=torch.Generator().manual_seed(0),
                )
            return spent[0]
        finally:
            for hook in hooks:
                hook.remove()
            if handle is not None:
                handle.remove()

    n = num_inference_steps
    for branch in [
        None,
        *chosen,
    ]:  # warm-ups, untimed: a compiled UNet compiles each variant in its first run
        timed(branch)
    ratios: dict[int, list[float]] = {b: [] for b in chosen}
    for _ in range(repeats):
        for branch in chosen:
            stock = timed(None)
            run = timed(branch)
            ratios[branch].append((run - stock / n) / ((n - 1) * stock / n))
    return {b: float(np.clip(statistics.median(r), 1e-6, None)) for b, r in ratios.items()}


def _synchronize(pipe: Any) -> None:
    device = getattr(pipe, "device", None)
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        torch.cuda.synchronize(device)
