"""Schedulers, accelerate's CPU offload and torch.compile with faster diffusion attached.

Each scheduler family is either supported, with the method's properties tested on it, or refused at once with
an error that names it. Offload hooks and a compiled UNet must leave the method's results and costs unchanged.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from faster_diffusion import (
    FasterDiffusionConfig,
    KeySteps,
    UnsupportedModelError,
    apply_faster_diffusion,
)
from fixtures.tiny import build_tiny_pipeline

from .conftest import PAPER, STOCK_EQUIVALENT, assert_equal_up_to_rounding, generate_latents
from .test_propagation import CallCounter

#: Supported families: one UNet call per scheduler step, latents at unit scale, a step that advances from the
#: sample it is given. Each entry: a scheduler class and the options it is built with.
SUPPORTED = {
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "DPM-Solver": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
    ),
    "DPM-Solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++")),
    "SDE-DPM-Solver++": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    "DPM-Solver++-Karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "DEIS": (DEISMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}

#: Families that prior noise injection (on in the paper's config, PAPER) refuses, with why: a repeated or
#: second evaluation per step, a step that ignores the sample it is given, latents scaled by
#: ``init_noise_sigma`` other than Euler's, Euler ancestral's and LMS's (whose injection is scaled to them:
#: tests/test_schedulers.py), or flow matching (refused in every config). Without injection, all but flow
#: matching run (tests/test_schedulers.py).
REFUSED = {
    "PNDM": (PNDMScheduler, {}),  # N+1 timesteps with a repeat; its 2nd call steps from the stored sample
    "Heun": (HeunDiscreteScheduler, {}),  # two UNet calls per step
    "KDPM2": (KDPM2DiscreteScheduler, {}),  # two UNet calls per step
    "KDPM2-a": (KDPM2AncestralDiscreteScheduler, {}),  # two UNet calls per step
    "UniPC": (UniPCMultistepScheduler, {}),  # its corrector recomputes the sample it is given
    "DPM-Solver-singlestep": (DPMSolverSinglestepScheduler, {}),  # steps from the sample of the group's start
    "EDM-Euler": (EDMEulerScheduler, None),
    "EDM-DPM-Solver": (EDMDPMSolverMultistepScheduler, None),
    "FlowMatch-Euler": (FlowMatchEulerDiscreteScheduler, None),
}


def make_scheduler_pipe(family: dict, name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny pipeline whose scheduler is built from SD's config (``None`` options: the class defaults)."""
    cls, options = family[name]
    pipe = build_tiny_pipeline(seed, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of some algorithm types
        if options is None:
            pipe.scheduler = cls()
        else:
            pipe.scheduler = cls.from_config(pipe.scheduler.config, **options)
    return pipe


def steps_for(name: str) -> int:
    return 4 if name == "LCM" else 10


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_scheduler_with_every_step_a_key_step_equals_stock(name):
    steps = steps_for(name)
    stock = generate_latents(make_scheduler_pipe(SUPPORTED, name), steps=steps)
    pipe = make_scheduler_pipe(SUPPORTED, name)
    handle = apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(pipe, steps=steps), stock)
    assert handle.last_run.schedule.num_steps == steps == handle.last_run.steps


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_supported_scheduler_parallel_equals_sequential_and_costs_key_steps(name):
    steps = steps_for(name)
    keys = KeySteps.explicit([0, 2]) if name == "LCM" else KeySteps.paper()
    parallel_pipe = make_scheduler_pipe(SUPPORTED, name, dtype=torch.float64)
    sequential_pipe = make_scheduler_pipe(SUPPORTED, name, dtype=torch.float64)
    handle = apply_faster_diffusion(parallel_pipe, FasterDiffusionConfig(key_steps=keys))
    apply_faster_diffusion(sequential_pipe, FasterDiffusionConfig(key_steps=keys, parallel=False))
    counter = CallCounter(parallel_pipe.unet)
    parallel = generate_latents(parallel_pipe, steps=steps)
    assert_equal_up_to_rounding(parallel, generate_latents(sequential_pipe, steps=steps))
    schedule = keys.resolve(steps)
    assert handle.last_run.schedule == schedule
    assert counter.encoder_calls == schedule.num_key_steps == handle.last_run.full_passes
    assert (
        sum(counter.decoder_rows) == 2 * steps
        and handle.last_run.full_passes + handle.last_run.partial_passes == steps
    )
    assert handle.last_run.steps == steps


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_scheduler_is_refused_by_name_at_apply(name):
    pipe = make_scheduler_pipe(REFUSED, name)
    class_name = type(pipe.scheduler).__name__
    with pytest.raises(UnsupportedModelError) as raised:
        apply_faster_diffusion(pipe, PAPER)
    message = str(raised.value)
    assert class_name in message
    assert "DDIMScheduler" in message and "DPMSolverMultistepScheduler" in message
    assert "faster_diffusion.use_sampler" in message and "NoiseInjection.off()" in message
    assert not hasattr(pipe.unet, "_diffusers_hook") or not pipe.unet._diffusers_hook.hooks


def test_flow_matching_configuration_of_a_supported_class_is_refused():
    pipe = build_tiny_pipeline(0)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_flow_sigmas=True)
    with pytest.raises(UnsupportedModelError, match=r"DPMSolverMultistepScheduler with use_flow_sigmas=True"):
        apply_faster_diffusion(pipe, PAPER)


def test_scheduler_configuration_is_checked_again_when_a_run_starts():
    pipe = make_scheduler_pipe(SUPPORTED, "DPM-Solver++")
    handle = apply_faster_diffusion(pipe, PAPER)
    pipe.scheduler.register_to_config(prediction_type="flow_prediction")
    with pytest.raises(UnsupportedModelError, match=r"prediction_type='flow_prediction'"):
        generate_latents(pipe, steps=10)
    handle.remove()


def test_stock_sd_pipeline_with_its_pndm_scheduler_is_refused_with_injection_and_use_sampler_fixes_it():
    from faster_diffusion import use_sampler

    pipe = build_tiny_pipeline(0)  # SD v1.5's PNDMScheduler, as from_pretrained gives it
    with pytest.raises(UnsupportedModelError, match=r"PNDMScheduler"):
        apply_faster_diffusion(pipe, PAPER)
    use_sampler(pipe, "DDIM-50")
    handle = apply_faster_diffusion(pipe, PAPER)
    generate_latents(pipe, steps=10)
    assert handle.last_run.schedule.num_steps == 10


# --- accelerate's model CPU offload -------------------------------------------------------------------------


def enable_offload(pipe) -> None:
    """diffusers' model CPU offload with the CPU as the execution device: the same accelerate ``CpuOffload``
    hooks as on a GPU, removed and added again by ``maybe_free_model_hooks`` at the end of every call."""
    pipe.enable_model_cpu_offload(device="cpu")


def is_unet_forward(method) -> bool:
    return (
        getattr(method, "__func__", None) is type(method.__self__).forward
        if hasattr(method, "__self__")
        else False
    )


def count_offload_hook_calls(unet) -> list[int]:
    """Count the calls that go through the UNet's accelerate hook during the next pipeline call."""
    calls = [0]
    hook = unet._hf_hook
    original = hook.pre_forward

    def pre_forward(module, *args, **kwargs):
        calls[0] += 1
        return original(module, *args, **kwargs)

    hook.pre_forward = pre_forward
    return calls


@pytest.mark.parametrize("offload_first", [True, False], ids=["offload-then-apply", "apply-then-offload"])
def test_model_cpu_offload_in_either_order_keeps_propagation_and_removal_keeps_offload(
    make_pipe, offload_first
):
    plain = make_pipe("DDIM-50")
    stock = generate_latents(plain, steps=50)
    apply_faster_diffusion(plain, PAPER)
    expected = generate_latents(plain, steps=50)

    pipe = make_pipe("DDIM-50")
    if offload_first:
        enable_offload(pipe)
        handle = apply_faster_diffusion(pipe, PAPER)
    else:
        handle = apply_faster_diffusion(pipe, PAPER)
        enable_offload(pipe)
    for _ in range(3):  # the offload hooks are taken off and put back at the end of every call
        counter = CallCounter(pipe.unet)
        calls = count_offload_hook_calls(pipe.unet)
        assert torch.equal(generate_latents(pipe, steps=50), expected)
        assert counter.encoder_calls == 9 == handle.last_run.full_passes
        # The offload hook hands the UNet fresh copies of its inputs at every call; the cached decoder batch
        # must still be recognised as this call's, not decoded again.
        assert sum(counter.decoder_rows) == 2 * 50 and handle.last_run.partial_passes == 41
        assert calls[0] == 50  # every UNet call of the loop still goes through the offload hook

    handle.remove()
    for _ in range(2):
        calls = count_offload_hook_calls(pipe.unet)
        assert torch.equal(generate_latents(pipe, steps=50), stock)
        assert calls[0] == 50
        assert is_unet_forward(pipe.unet._old_forward)  # accelerate wraps the plain forward, nothing of ours
    assert not pipe.unet._diffusers_hook.hooks


@pytest.mark.parametrize("step", [7, 40])
def test_cfg_cutoff_with_model_cpu_offload_equals_the_result_without_offload(make_pipe, step):
    """accelerate hands the UNet a fresh copy of the cut embeddings at every call: the conditional half is
    recognised by value, as without offload by its memory."""
    from diffusers.callbacks import SDCFGCutoffCallback

    def cutoff() -> SDCFGCutoffCallback:
        return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)

    plain = make_pipe("DDIM-50")
    apply_faster_diffusion(plain, PAPER)
    expected = generate_latents(plain, steps=50, callback_on_step_end=cutoff())

    pipe = make_pipe("DDIM-50")
    enable_offload(pipe)
    handle = apply_faster_diffusion(pipe, PAPER)
    assert torch.equal(generate_latents(pipe, steps=50, callback_on_step_end=cutoff()), expected)
    assert handle.last_run.full_passes == 9


# --- torch.compile ------------------------------------------------------------------------------------------


def test_compiled_unet_gives_the_same_latents_within_the_recompile_limit(make_pipe):
    """The bookkeeping stays out of Dynamo's graphs, so a run's step counts and cached predictions do not make
    it recompile at every step. ``backend="eager"`` traces and guards like any backend, with no C compiler."""
    from torch._dynamo.utils import counters

    plain = make_pipe("DDIM-50", dtype=torch.float64)
    apply_faster_diffusion(plain, PAPER)
    expected = generate_latents(plain, steps=10)

    pipe = make_pipe("DDIM-50", dtype=torch.float64)
    handle = apply_faster_diffusion(pipe, PAPER)
    pipe.unet.compile(backend="eager")
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            first = generate_latents(pipe, steps=10)
            graphs = counters["stats"]["unique_graphs"]
            second = generate_latents(pipe, steps=10)
    finally:
        torch._dynamo.reset()
    assert_equal_up_to_rounding(first, expected)
    assert torch.equal(second, first)
    assert (handle.last_run.full_passes, handle.last_run.partial_passes) == (5, 5)
    assert graphs > 0  # the UNet really ran compiled
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # the second run reuses the first run's graphs
