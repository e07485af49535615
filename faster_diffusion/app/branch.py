"""Deep reuse's branch chosen for the model, per request: ``--branch auto`` and Cog's ``choose_branch``.

The request's key steps, placed as usual for branch 0, set the run's cost: their full steps, with branch 0's
partial steps between. :func:`~faster_diffusion.depth.choose_depth` then compares every branch that affords at
least :data:`MIN_FULL_STEPS` full steps at that cost: as many full steps as each affords, placed by that
branch's own calibration, read with the criterion that is comparable across branches; the branch of least
predicted error wins. When it is branch 0, the request runs as asked (its key steps are the product's default
placement or the user's); a deeper branch runs with its calibrated full steps.

The cost of a partial step of each branch is timed on the pipeline itself
(:func:`~faster_diffusion.depth.measure_step_costs`), once per process, UNet, image size and batch, from
branch 0 deeper until a branch affords too few full steps; a timing below a shallower branch's is raised to it
(a deeper branch runs every module a shallower one runs). Each branch's calibration is found or made as
``auto`` key steps' are. The choice rests on timings, so it can differ between machines and processes.
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
from ..engine import remove_faster_diffusion
from ..samplers import use_sampler
from .generate import GenerationRequest, calibration_options
from .lora import loaded_lora

#: What ``--branch`` and Cog's inputs call the choice.
AUTO_BRANCH = "auto"
#: A branch is compared when it affords this many full steps at the run's cost (as
#: ``benchmarks/depth_choice.py`` compares them).
MIN_FULL_STEPS = 2

#: Partial-step costs timed in this process: UNet -> {(height, width, batch, device, dtype, LoRA): {branch:
#: cost}}.
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
    :func:`~faster_diffusion.depth.choose_depth` picks at the cost of its key steps at branch 0.

    When branch 0 is the pick, the request is kept as it is: its own key steps (the product's default
    placement or the user's) stay, and only a deeper branch that predicts less error at the same cost changes
    the run.
    A branch is compared when it affords at least :data:`MIN_FULL_STEPS` full steps at that cost."""
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
    costs: dict[int, float] = {}
    budget = 0.0
    for branch in range(branch_count(pipe.unet)):
        # A deeper branch runs every module a shallower one runs, and more: its cost is at least theirs, so a
        # timing below that is noise.
        cost = max(_step_cost(pipe, branch, request, log), *costs.values(), 0.0)
        if branch == 0:
            if cost >= 1:
                log(
                    f"Branch: auto: a partial step timed as costly as a full one here ({cost:.3f} full "
                    "passes), so no branch saves time; keeping branch 0 and the key steps asked for"
                )
                return request
            budget = run_cost(full, steps, cost)
        elif full_steps_within(budget, steps, cost) < MIN_FULL_STEPS:
            break  # this branch affords too few full steps, and every deeper one costs more
        costs[branch] = cost
    measured = ", ".join(f"branch {b} {c:.3f}" for b, c in costs.items())
    if len(costs) == 1:
        log(
            f"Branch: auto: branch 0, as no deeper branch affords {MIN_FULL_STEPS} full steps at "
            f"{budget:g} full passes (a partial step costs, in full UNet passes timed here: {measured}); "
            "keeping the key steps asked for"
        )
        return request
    calibrations = {branch: _calibration(pipe, request, branch, log) for branch in costs}
    choice = choose_depth(pipe, budget, costs, num_inference_steps=steps, calibrations=calibrations)
    timed = f"a partial step costs, in full UNet passes timed here: {measured}"
    if choice.branch == 0:
        log(f"Branch: auto: {choice.describe()}; {timed}; keeping branch 0 with the key steps asked for")
        return request
    log(f"Branch: auto: {choice.describe()}; {timed}")
    chosen = dataclasses.replace(faster, key_steps=choice.key_steps, branch=choice.branch)
    return dataclasses.replace(request, faster=chosen)


def _step_cost(pipe: Any, branch: int, request: GenerationRequest, log: Callable[[str], None]) -> float:
    unet = pipe.unet
    lora = loaded_lora(pipe)
    width, height = request.output_size
    batch = request.num_outputs * (len(request.prompt) if isinstance(request.prompt, list) else 1)
    key = (height, width, batch, str(unet.device), str(unet.dtype), None if lora is None else lora.describe())
    known = _STEP_COSTS.setdefault(unet, {}).setdefault(key, {})
    if branch not in known:
        if branch == 0:
            log(f"Timing a partial step of each branch here ({width}x{height}, batch of {batch}), once")
        started = time.perf_counter()
        timed = measure_step_costs(pipe, [branch], height=height, width=width, batch_size=batch)
        known[branch] = timed[branch]
        seconds = time.perf_counter() - started
        log(f"  branch {branch}: {known[branch]:.3f} full passes (timed in {seconds:.1f} s)")
    return known[branch]


def _calibration(pipe: Any, request: GenerationRequest, branch: int, log: Callable[[str], None]) -> Any:
    target = f"deep:{branch}"
    saved = find_calibration(pipe, request.steps, target=target)
    if saved is not None and DEPTH_CRITERION in saved.criteria:
        return saved
    log(f"Calibrating {target} reuse for this model ({request.sampler.value}, {request.steps} steps), once")
    started = time.perf_counter()
    # None found was just looked up: measure without looking again; a saved one gets the criterion added.
    calibration = get_calibration(
        pipe,
        num_inference_steps=request.steps,
        force=saved is None,
        target=target,
        criterion=DEPTH_CRITERION,
        **calibration_options(pipe),
    )
    log(f"Calibrated in {time.perf_counter() - started:.1f} s")
    return calibration
