"""Image-to-image, and runs that stop early: encoder propagation over the steps that actually run.

diffusers' image-to-image pipelines set the whole schedule of N steps, then run only its last
``int(N * strength)`` steps, starting from the input image's latents noised to the first of them; SDXL's
``denoising_end`` stops early instead. The rule: the whole schedule's key steps, cut to the steps that run,
with the first step that runs always a key step; prior noise injection keeps its timesteps and injects the
run's own z, the latents at its first step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from faster_diffusion import (
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    UnsupportedModelError,
    apply_faster_diffusion,
    calibrate,
    use_sampler,
)
from faster_diffusion.calibration import find_calibration, optimal_key_steps
from faster_diffusion.engine import RunStats
from fixtures.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

from .conftest import PAPER, PAPER_ONE_STEP_AT_A_TIME, STOCK_EQUIVALENT, generate_latents
from .reference import reference_latents
from .test_hardening_core import close, interrupt_at, tensors_held
from .test_hardening_sched import SUPPORTED, make_scheduler_pipe, steps_for

PROMPT = "a red circle above a blue square"
SAMPLERS = ["DDIM-50", "DPM-Solver-20"]
STEPS, STRENGTH = 20, 0.6
#: 20 steps at strength 0.6: diffusers runs the last int(20 * 0.6) = 12 steps, 8 to 19.
FIRST_STEP = 8
#: The paper's key steps for 20 steps, (0, 1, 2, 3, 5, 10, 15), cut to steps 8-19, with step 8 a key step.
CUT_PAPER_KEY_STEPS = (8, 10, 15)
#: Whole groups, so that the decoder batches are the groups (the automatic cap splits them on the CPU).
PAPER_WHOLE_GROUPS = FasterDiffusionConfig(key_steps=KeySteps.paper(), max_decoder_batch=None)
FAMILIES = {
    "SD": (build_tiny_pipeline, StableDiffusionImg2ImgPipeline),
    "SDXL": (build_tiny_sdxl_pipeline, StableDiffusionXLImg2ImgPipeline),
}


#: The dtype of the pipelines whose results are compared up to rounding (``close``).
F64 = torch.float64


def input_image() -> torch.Tensor:
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))


def make_img2img(family: str, sampler: str, dtype: torch.dtype = torch.float32):
    build, pipeline_class = FAMILIES[family]
    pipe = build(0, dtype=dtype)
    use_sampler(pipe, sampler)
    img2img = pipeline_class(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return img2img


@torch.inference_mode()
def run(pipe, *, strength: float = STRENGTH, steps: int = STEPS, **kwargs) -> torch.Tensor:
    if kwargs.get("latents") is not None:  # the user's latents, in the pipeline's dtype
        kwargs["latents"] = kwargs["latents"].to(pipe.unet.dtype)
    return pipe(
        PROMPT,
        image=input_image(),
        strength=strength,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **kwargs,
    ).images


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_key_steps_equal_stock_image_to_image(family, sampler):
    stock = run(make_img2img(family, sampler))
    pipe = make_img2img(family, sampler)
    handle = apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    assert torch.equal(run(pipe), stock)
    assert handle.last_run.schedule.indices == tuple(range(FIRST_STEP, STEPS))
    assert (handle.last_run.full_passes, handle.last_run.partial_passes) == (12, 0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_to_image_parallel_equals_sequential_on_the_cut_key_steps(family, sampler):
    sequential_pipe = make_img2img(family, sampler, F64)
    apply_faster_diffusion(sequential_pipe, PAPER_ONE_STEP_AT_A_TIME)
    pipe = make_img2img(family, sampler, F64)
    handle = apply_faster_diffusion(pipe, PAPER_WHOLE_GROUPS)
    close(run(pipe), run(sequential_pipe))
    stats = handle.last_run
    assert stats.schedule.indices == CUT_PAPER_KEY_STEPS
    assert (stats.schedule.start, stats.schedule.stop) == (FIRST_STEP, STEPS)
    assert stats.schedule.describe() == (
        "paper: 3 of the 12 steps that run (8 to 19 of 20) are key steps [8, 10, 15]"
    )
    # One encoder pass per key step; one decoder batch per group: [8, 10), [10, 15), [15, 20).
    assert (stats.full_passes, stats.partial_passes, stats.unet_batches, stats.steps) == (3, 9, 3, 12)
    # Injection at the steps that ran whose timestep is below 500 (the paper's tau).
    ran = pipe.scheduler.timesteps[FIRST_STEP:]
    assert stats.injected_steps == int((ran < 500).sum()) > 0


#: Strong prior noise injection at every step, so that each image's z matters to the result.
STRONG_INJECTION = NoiseInjection(alpha=0.05, tau=1000)


def noised_input(stock, strength: float, images: int = 1) -> torch.Tensor:
    """The input image's latents noised to the first step that ``strength`` runs, as the pipeline makes them
    with seed 0 (``images`` per prompt)."""
    stock.scheduler.set_timesteps(STEPS)
    timesteps, _ = stock.get_timesteps(STEPS, strength, "cpu")
    return stock.prepare_latents(
        stock.image_processor.preprocess(input_image()),
        timesteps[:1],
        1,
        images,
        stock.unet.dtype,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )


def reference_run(stock, key_steps: tuple[int, ...], start: int, latents: torch.Tensor) -> torch.Tensor:
    """tests/reference.py's loop from ``start`` on ``latents``, with :data:`STRONG_INJECTION`."""
    return reference_latents(
        stock,
        PROMPT,
        num_steps=STEPS,
        key_steps=key_steps,
        alpha=STRONG_INJECTION.alpha,
        tau=STRONG_INJECTION.tau,
        guidance_scale=7.5,
        seed=0,
        height=16,
        width=16,
        start=start,
        latents=latents,
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_image_to_image_follows_the_hand_written_reference(sampler):
    """The package against tests/reference.py, which shares no code with it: key steps cut to the steps that
    run, and prior noise injected from the noised input image's latents at the first step that runs."""
    pipe = make_img2img("SD", sampler, F64)
    config = FasterDiffusionConfig(key_steps=KeySteps.paper(), noise_injection=STRONG_INJECTION)
    apply_faster_diffusion(pipe, config)
    fast = run(pipe)

    stock = make_img2img("SD", sampler, F64)
    close(fast, reference_run(stock, CUT_PAPER_KEY_STEPS, FIRST_STEP, noised_input(stock, STRENGTH)))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_state_is_clean_after_image_to_image_and_text_to_image_is_unaffected(sampler):
    expected_pipe = build_tiny_pipeline(0)
    use_sampler(expected_pipe, sampler)
    apply_faster_diffusion(expected_pipe, PAPER)
    expected = generate_latents(expected_pipe, steps=STEPS)

    img2img = make_img2img("SD", sampler)
    handle = apply_faster_diffusion(img2img, PAPER)
    run(img2img)
    assert not handle._state.active
    assert tensors_held(handle) == []
    # The text-to-image pipeline over the same modules and scheduler, accelerated by the same handle.
    text_to_image = type(expected_pipe)(**img2img.components)
    text_to_image.set_progress_bar_config(disable=True)
    assert torch.equal(generate_latents(text_to_image, steps=STEPS), expected)
    assert handle.last_run.schedule.indices == KeySteps.paper().resolve(STEPS).indices


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_interrupted_image_to_image_run_leaves_nothing_behind(sampler):
    stock = make_img2img("SD", sampler)
    apply_faster_diffusion(stock, PAPER)
    expected = run(stock)

    pipe = make_img2img("SD", sampler)
    handle = apply_faster_diffusion(pipe, PAPER)

    def interrupt(pipeline, index, timestep, tensors):
        if index == 3:  # inside the group of key step 10 (step 11 of the schedule)
            pipeline._interrupt = True
        return tensors

    run(pipe, callback_on_step_end=interrupt)
    assert handle.last_run.steps == 4
    assert not handle._state.active and tensors_held(handle) == []
    assert torch.equal(run(pipe), expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_loop_that_passes_timesteps_as_numbers_finds_its_first_step(sampler):
    """A hand-written loop over the last 12 steps, passing each timestep as a Python number (no view of the
    scheduler's timesteps to locate in memory): the first step is found by value, once per run."""
    pipe = build_tiny_pipeline(0)
    use_sampler(pipe, sampler)
    handle = apply_faster_diffusion(pipe, PAPER)
    text = torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True)[::-1])
    latents = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    pipe.scheduler.set_timesteps(STEPS)
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(FIRST_STEP)
    with torch.inference_mode():
        for t in pipe.scheduler.timesteps[FIRST_STEP:].tolist():
            noise = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
            uncond, cond = noise.chunk(2)
            latents = pipe.scheduler.step(uncond + 7.5 * (cond - uncond), t, latents).prev_sample
    assert handle.last_run.schedule.indices == CUT_PAPER_KEY_STEPS
    assert (handle.last_run.full_passes, handle.last_run.steps) == (3, 12)
    assert not handle._state.active


def test_a_first_timestep_outside_the_schedule_fails_clearly():
    pipe = build_tiny_pipeline(0)
    use_sampler(pipe, "DDIM-50")
    handle = apply_faster_diffusion(pipe, PAPER)
    text = torch.cat(pipe.encode_prompt(PROMPT, "cpu", 1, True)[::-1])
    pipe.scheduler.set_timesteps(STEPS)
    with pytest.raises(UnsupportedModelError, match=r"timestep 999\.5, which is not one of the 20 timesteps"):
        pipe.unet(torch.zeros(2, 4, 2, 2), torch.tensor(999.5), encoder_hidden_states=text)
    assert not handle._state.active and tensors_held(handle) == []


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sdxl_denoising_end_cuts_the_key_steps_to_the_steps_that_run(sampler):
    """SDXL's ``denoising_end`` (the base half of base + refiner) runs only the first steps: no decoder work
    is spent on steps that never run, and every key step a step equals stock."""

    def sdxl(config, dtype=torch.float32):
        pipe = build_tiny_sdxl_pipeline(0, dtype=dtype)
        use_sampler(pipe, sampler)
        handle = apply_faster_diffusion(pipe, config) if config is not None else None
        return pipe, handle

    stock_pipe, _ = sdxl(None)
    stock = generate_latents(stock_pipe, steps=STEPS, denoising_end=0.6)
    identity_pipe, _ = sdxl(STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(identity_pipe, steps=STEPS, denoising_end=0.6), stock)

    sequential_pipe, _ = sdxl(PAPER_ONE_STEP_AT_A_TIME, F64)
    pipe, handle = sdxl(PAPER_WHOLE_GROUPS, F64)
    fast = generate_latents(pipe, steps=STEPS, denoising_end=0.6)
    close(fast, generate_latents(sequential_pipe, steps=STEPS, denoising_end=0.6))
    stats = handle.last_run
    ran = stats.steps  # the steps at timesteps of 400 and above: 12 for DDIM's spacing, 13 for DPM-Solver's
    assert 0 < ran < STEPS
    assert (stats.schedule.start, stats.schedule.stop) == (0, ran)
    assert stats.schedule.indices == tuple(i for i in KeySteps.paper().resolve(STEPS).indices if i < ran)
    assert stats.full_passes + stats.partial_passes == stats.steps == ran
    assert not handle._state.active and tensors_held(handle) == []


def test_the_sdxl_refiner_is_refused_clearly():
    pipe = build_tiny_sdxl_pipeline(0)
    refiner = StableDiffusionXLImg2ImgPipeline(**pipe.components, requires_aesthetics_score=True)
    with pytest.raises(UnsupportedModelError, match=r"SDXL refiner"):
        apply_faster_diffusion(refiner, PAPER)


# --- The scheduler fixes of the hardening work hold for image-to-image too ---------------------------------


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_supported_scheduler_runs_image_to_image_exactly_and_in_parallel(name):
    steps = steps_for(name)
    keys = KeySteps.explicit([0, 2]) if name == "LCM" else KeySteps.paper()

    def img2img(config, dtype=torch.float32):
        pipe = make_scheduler_pipe(SUPPORTED, name, dtype=dtype)
        runner = StableDiffusionImg2ImgPipeline(**pipe.components)
        runner.set_progress_bar_config(disable=True)
        handle = apply_faster_diffusion(runner, config) if config is not None else None
        return run(runner, steps=steps), handle

    stock, _ = img2img(None)
    identity, handle = img2img(STOCK_EQUIVALENT)
    assert torch.equal(identity, stock)
    ran = handle.last_run.steps
    assert 0 < ran < steps and handle.last_run.schedule.num_steps_run == ran
    sequential, _ = img2img(FasterDiffusionConfig(key_steps=keys, parallel=False), F64)
    parallel, handle = img2img(FasterDiffusionConfig(key_steps=keys), F64)
    close(parallel, sequential)
    assert handle.last_run.schedule == keys.resolve(steps).cut(steps - ran)
    assert handle.last_run.full_passes == handle.last_run.schedule.num_key_steps
    assert handle.last_run.full_passes + handle.last_run.partial_passes == ran


def test_a_scheduler_that_injection_does_not_support_is_refused_for_image_to_image_too():
    pipe = StableDiffusionImg2ImgPipeline(**build_tiny_pipeline(0).components)  # SD's own PNDMScheduler
    with pytest.raises(UnsupportedModelError, match=r"PNDMScheduler"):
        apply_faster_diffusion(pipe, PAPER)


def test_replacing_the_scheduler_of_an_image_to_image_pipeline_is_detected():
    pipe = make_img2img("SD", "DDIM-50")
    handle = apply_faster_diffusion(pipe, PAPER)
    pipe.scheduler = copy.deepcopy(pipe.scheduler)  # a new scheduler object, after apply
    with pytest.raises(RuntimeError, match=r"pipe.scheduler was replaced"):
        run(pipe)
    assert not handle._state.active and tensors_held(handle) == []


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_auto_places_its_budget_over_the_steps_that_run(sampler):
    """``auto:B`` asks for B encoder passes: on a run of the last 12 of 20 steps, B key steps placed by the
    same optimiser on the calibration's block for those steps, not the whole run's placement cut to them."""
    pipe = make_img2img("SD", sampler, F64)
    calibration = calibrate_tiny(pipe)
    budget = 5
    expected = tuple(
        FIRST_STEP + i for i in optimal_key_steps(calibration.matrix[FIRST_STEP:, FIRST_STEP:], budget)
    )
    sequential_pipe = make_img2img("SD", sampler, F64)
    calibrate_tiny(sequential_pipe)
    apply_faster_diffusion(
        sequential_pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(budget), parallel=False)
    )
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.auto(budget)))
    close(run(pipe), run(sequential_pipe))
    schedule = handle.last_run.schedule
    assert schedule.indices == expected and handle.last_run.full_passes == budget
    assert schedule.describe().startswith(f"auto:{budget}, calibrated")
    assert "5 of the 12 steps that run (8 to 19 of 20)" in schedule.describe()
    # The explicit list the command line and Cog echo before the run cuts to the same key steps.
    explicit = calibration.key_steps(budget, start=FIRST_STEP)
    assert explicit.resolve(STEPS).cut(FIRST_STEP) == schedule
    # A budget larger than the steps that run gives every step that runs.
    assert calibration.indices(15, FIRST_STEP) == tuple(range(FIRST_STEP, STEPS))


def calibrate_tiny(pipe):
    """A calibration of the tiny model for STEPS steps (a text-to-image run over the image-to-image pipeline's
    modules), kept in this process: the pipeline has no folder."""
    text_to_image = StableDiffusionPipeline(**pipe.components)
    text_to_image.set_progress_bar_config(disable=True)
    calibrate(text_to_image, num_inference_steps=STEPS, prompts=[PROMPT])
    found = find_calibration(pipe, STEPS)
    assert found is not None
    return found


# --- Paths of the image-to-image pipelines beyond strength alone ------------------------------------------

#: DPM-Solver++ on a custom list of 14 timesteps (diffusers' ``timesteps=`` call argument).
CUSTOM_TIMESTEPS = [999, 950, 900, 800, 700, 600, 500, 400, 300, 200, 150, 100, 50, 20]


def dpm_solver_pp_img2img(family: str, dtype: torch.dtype = torch.float32):
    """An image-to-image pipeline with DPM-Solver++, which accepts a custom ``timesteps=`` list."""
    from diffusers import DPMSolverMultistepScheduler

    build, pipeline_class = FAMILIES[family]
    pipe = build(0, dtype=dtype)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++"
    )
    img2img = pipeline_class(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    return img2img


def check_exact_and_parallel(make, call: dict, *, steps: int) -> RunStats:
    """Every key step a step equals stock bit for bit (float32); the paper's key steps batched equal them one
    step at a time (float64, up to rounding). ``make(dtype)`` builds the pipeline. Returns the stats of the
    batched run, with the schedule of ``steps`` steps it was cut from."""
    stock = run(make(), steps=steps, **call)
    identity = make()
    apply_faster_diffusion(identity, STOCK_EQUIVALENT)
    assert torch.equal(run(identity, steps=steps, **call), stock)
    sequential = make(F64)
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    batched = make(F64)
    handle = apply_faster_diffusion(batched, PAPER_WHOLE_GROUPS)
    fast = run(batched, steps=steps, **call)
    close(fast, run(sequential, steps=steps, **call))
    assert not torch.equal(fast, stock.double())
    stats = handle.last_run
    assert stats.full_passes + stats.partial_passes == stats.steps == stats.schedule.num_steps_run
    assert stats.full_passes == stats.schedule.num_key_steps
    assert not handle._state.active and tensors_held(handle) == []
    return stats


def paper_cut(steps: int, start: int, stop: int) -> tuple[int, ...]:
    """The paper's key steps for ``steps`` steps, cut to ``start .. stop-1``, with ``start`` a key step."""
    kept = [i for i in KeySteps.paper().resolve(steps).indices if start < i < stop]
    return (start, *kept)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "call",
    [dict(denoising_start=0.5), dict(denoising_start=0.3, denoising_end=0.7)],
    ids=["start", "start-and-end"],
)
def test_sdxl_denoising_start_runs_the_last_steps_exactly_and_in_parallel(sampler, call):
    """SDXL's ``denoising_start`` (the refiner half of base + refiner, here on the base model) starts at a
    timestep instead of from strength; with ``denoising_end`` too, the run also stops early."""
    stats = check_exact_and_parallel(
        lambda dtype=torch.float32: make_img2img("SDXL", sampler, dtype), call, steps=STEPS
    )
    schedule = stats.schedule
    assert 0 < schedule.start < schedule.stop <= STEPS
    assert (schedule.stop == STEPS) == ("denoising_end" not in call)
    assert schedule.indices == paper_cut(STEPS, schedule.start, schedule.stop)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("strength", [0.07, 0.1], ids=["one-step", "two-steps"])
def test_a_strength_that_runs_one_or_two_steps_is_exact(family, sampler, strength):
    stats = check_exact_and_parallel(
        lambda dtype=torch.float32: make_img2img(family, sampler, dtype), dict(strength=strength), steps=STEPS
    )
    ran = int(STEPS * strength)
    assert stats.schedule.indices == (STEPS - ran,)
    assert (stats.full_passes, stats.partial_passes, stats.unet_batches) == (1, ran - 1, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_timesteps_image_to_image(family):
    """A ``timesteps=`` list: the key steps are indices into it, cut to the steps that strength runs."""
    stats = check_exact_and_parallel(
        lambda dtype=torch.float32: dpm_solver_pp_img2img(family, dtype),
        dict(timesteps=CUSTOM_TIMESTEPS),
        steps=len(CUSTOM_TIMESTEPS),
    )
    first = len(CUSTOM_TIMESTEPS) - int(len(CUSTOM_TIMESTEPS) * STRENGTH)
    assert (stats.schedule.start, stats.schedule.stop) == (first, len(CUSTOM_TIMESTEPS))
    assert stats.schedule.indices == paper_cut(len(CUSTOM_TIMESTEPS), first, len(CUSTOM_TIMESTEPS))


def change_latents_at(*steps: int):
    """A step-end callback that moves the latents at the given loop indices (not key steps of the cut run)."""

    def change(pipeline, index, timestep, tensors):
        if index in steps:
            tensors["latents"] = tensors["latents"] * 0.9 + 0.05
        return tensors

    return change


IMAGE_TO_IMAGE_OPTIONS = {
    "no-guidance": dict(guidance_scale=1.0),
    "two-images": dict(num_images_per_prompt=2),
    "callback-changes-latents": dict(callback_on_step_end=change_latents_at(0, 3, 5)),
}


@pytest.mark.parametrize(
    ("family", "call"),
    [
        *((family, call) for call in IMAGE_TO_IMAGE_OPTIONS.values() for family in FAMILIES),
        ("SDXL", dict(guidance_rescale=0.7, clip_skip=1)),  # SD's image-to-image has no guidance_rescale
    ],
    ids=[
        *(f"{name}-{family}" for name in IMAGE_TO_IMAGE_OPTIONS for family in FAMILIES),
        "rescale-and-clip-skip-SDXL",
    ],
)
def test_image_to_image_call_options_are_exact_and_parallel(family, call):
    stats = check_exact_and_parallel(
        lambda dtype=torch.float32: make_img2img(family, "DPM-Solver-20", dtype), call, steps=STEPS
    )
    assert stats.schedule.indices == CUT_PAPER_KEY_STEPS


def test_sdxl_image_to_image_with_the_users_latents():
    """SDXL's image-to-image takes ``latents=`` as the run's start, instead of the noised image."""
    user_latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    stats = check_exact_and_parallel(
        lambda dtype=torch.float32: make_img2img("SDXL", "DDIM-50", dtype),
        dict(latents=user_latents, strength=0.3),
        steps=STEPS,
    )
    assert stats.schedule.indices == (14, 15)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_image_injects_its_own_prior_noise(sampler):
    """Two images per prompt: each image's z is its own noised latents, as tests/reference.py computes it for
    that image alone."""
    pipe = make_img2img("SD", sampler, F64)
    config = FasterDiffusionConfig(key_steps=KeySteps.paper(), noise_injection=STRONG_INJECTION)
    apply_faster_diffusion(pipe, config)
    fast = run(pipe, num_images_per_prompt=2)

    stock = make_img2img("SD", sampler, F64)
    noised = noised_input(stock, STRENGTH, images=2)
    assert not torch.equal(noised[0], noised[1])
    for image in range(2):
        expected = reference_run(stock, CUT_PAPER_KEY_STEPS, FIRST_STEP, noised[image : image + 1])
        close(fast[image : image + 1], expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_one_step_image_to_image_follows_the_hand_written_reference(sampler):
    pipe = make_img2img("SD", sampler, F64)
    config = FasterDiffusionConfig(key_steps=KeySteps.paper(), noise_injection=STRONG_INJECTION)
    apply_faster_diffusion(pipe, config)
    fast = run(pipe, strength=0.07)

    stock = make_img2img("SD", sampler, F64)
    close(fast, reference_run(stock, (STEPS - 1,), STEPS - 1, noised_input(stock, 0.07)))


def test_sdxl_interrupted_run_then_a_denoising_start_run_on_the_same_pipeline():
    """An interrupted run, then at once a run that starts elsewhere on the same pipeline: the second is a
    fresh run, equal to that run on a pipeline that never ran."""
    fresh = make_img2img("SDXL", "DPM-Solver-20")
    apply_faster_diffusion(fresh, PAPER)
    expected = run(fresh, denoising_start=0.5)

    pipe = make_img2img("SDXL", "DPM-Solver-20")
    handle = apply_faster_diffusion(pipe, PAPER)
    run(pipe, callback_on_step_end=interrupt_at(3))
    assert handle.last_run.steps == 4
    assert torch.equal(run(pipe, denoising_start=0.5), expected)
    assert handle.last_run.schedule.start > FIRST_STEP
