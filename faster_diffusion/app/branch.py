"""Deep reuse's branch chosen for the model, per request: ``--branch auto`` and Cog's ``choose_branch``.

The request's key steps, placed as usual for branch 0, set the run's cost: their full steps, with branch 0's
partial steps between. :func:`~faster_diffusion.depth.choose_depth` then compares every branch at that cost:
as many full steps as each branch affords, placed by that branch's own calibration, read with the criterion
that is comparable across branches; the branch of least predicted error wins. The cost of a partial step of
each branch is timed on the pipeline itself (:func:`~faster_diffusion.depth.measure_step_costs`), once per
process, UNet and image size, from branch 0 deeper until a branch affords no full step at the run's cost
(a deeper branch costs more). Each branch's calibration is found or made as ``auto`` key steps' are.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..calibration import find_calibration, get_calibration
from ..deep import DeepReuseConfig, branch_count
from ..depth import DEPTH_CRITERION, choose_depth, full_steps_within, measure_step_costs, run_cost
from ..propagation import remove_faster_diffusion
from ..samplers import use_sampler
from .generate import GenerationRequest, calibration_options
from .lora import loaded_lora

#: What ``--branch`` and Cog's inputs call the choice.
AUTO_BRANCH = "auto"

#: Partial-step costs timed in this process: UNet -> {(height, width, device, dtype, LoRA): {branch: cost}}.
_STEP_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_branch_choice(deep: bool, image: bool, forecast: int, name: str = "branch 'auto'") -> None:
    """Refuse, before anything runs, what the choice cannot serve: another reuse mode than deep reuse
    (``deep`` false), an input image, forecasting. ``name`` is the setting's, as the user gave it."""
    if not deep:
        raise ValueError(f"{name} applies to deep reuse only (mode deep)")
    if image:
        raise ValueError(
            f"{name} works for text-to-image only (it chooses over the whole schedule); give a branch number "
            "for image-to-image and inpainting"
        )
    if forecast:
        raise ValueError(
            f"{name} predicts the error of copied features, not forecast ones; turn forecasting off, or give "
            "a branch number"
        )


def choose_branch(
    pipe: Any, request: GenerationRequest, log: Callable[[str], None] = print
) -> GenerationRequest:
    """``request`` (deep reuse, text-to-image, key steps already placed by
    :func:`~faster_diffusion.app.generate.prepare_key_steps`) with the branch and full steps that
    :func:`~faster_diffusion.depth.choose_depth` picks at the cost of its key steps at branch 0."""
    faster = request.faster
    deep = isinstance(faster, DeepReuseConfig)
    check_branch_choice(deep, request.image is not None, faster.forecast if deep else 0)
    steps = request.steps
    full = request.schedule.num_key_steps
    if full == steps:  # every step is full (key steps 'all', or one step): no branch runs
        log("Branch: auto: every step is a full step, so no branch runs; nothing to choose")
        return request
    remove_faster_diffusion(pipe)  # timing and calibrating run the pipeline stock, with the request's sampler
    use_sampler(pipe, request.sampler)
    width, height = request.output_size
    costs: dict[int, float] = {}
    budget = 0.0
    for branch in range(branch_count(pipe.unet)):
        cost = _step_cost(pipe, branch, height, width, log)
        if branch == 0:
            budget = run_cost(full, steps, cost)
        elif full_steps_within(budget, steps, cost) < 1:
            break  # this branch affords no full step, and every deeper one costs more
        costs[branch] = cost
    calibrations = {branch: _calibration(pipe, request, branch, log) for branch in costs}
    choice = choose_depth(pipe, budget, costs, num_inference_steps=steps, calibrations=calibrations)
    measured = ", ".join(f"branch {b} {c:.3f}" for b, c in costs.items())
    log(
        f"Branch: auto: {choice.describe()}; a partial step costs, in full UNet passes timed here: {measured}"
    )
    chosen = dataclasses.replace(faster, key_steps=choice.key_steps, branch=choice.branch)
    return dataclasses.replace(request, faster=chosen)


def _step_cost(pipe: Any, branch: int, height: int, width: int, log: Callable[[str], None]) -> float:
    unet = pipe.unet
    lora = loaded_lora(pipe)
    key = (height, width, str(unet.device), str(unet.dtype), None if lora is None else lora.describe())
    known = _STEP_COSTS.setdefault(unet, {}).setdefault(key, {})
    if branch not in known:
        if branch == 0:
            log(f"Timing a partial step of each branch on this machine ({width}x{height}), once")
        started = time.perf_counter()
        known[branch] = measure_step_costs(pipe, [branch], height=height, width=width)[branch]
        seconds = time.perf_counter() - started
        log(f"  branch {branch}: {known[branch]:.3f} full passes (timed in {seconds:.1f} s)")
    return known[branch]


def _calibration(pipe: Any, request: GenerationRequest, branch: int, log: Callable[[str], None]) -> Any:
    target = f"deep:{branch}"
    saved = find_calibration(pipe, request.steps, target=target)
    if saved is not None and DEPTH_CRITERION in (saved.criterion, *saved.other):
        return saved
    log(f"Calibrating {target} reuse for this model ({request.sampler.value}, {request.steps} steps), once")
    started = time.perf_counter()
    calibration = get_calibration(
        pipe,
        num_inference_steps=request.steps,
        target=target,
        criterion=DEPTH_CRITERION,
        **calibration_options(pipe),
    )
    log(f"Calibrated in {time.perf_counter() - started:.1f} s")
    return calibration
