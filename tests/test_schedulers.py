"""Every diffusers scheduler an SD or SDXL pipeline accepts runs deep reuse, and encoder propagation without
prior noise injection, on the tiny pipelines: the one-call default accelerates, every step full gives stock
bit for bit, every UNet call of the loop is served (Heun and KDPM2 make 2N - 1 of them for N steps, PNDM
N + 1), batched equals one step at a time, and the state is dropped after every run. A step of the engine is
one iteration of the pipeline's loop: one UNet call.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from faster_diffusion import (
    CalibrationFallbackWarning,
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    UnsupportedModelError,
    apply_faster_diffusion,
)
from faster_diffusion.calibration import scheduler_key
from faster_diffusion.policy import (
    DEEP_DEFAULT_KEY_STEPS,
    SCHEDULER_DEFAULTS,
    default_key_steps,
    scheduler_family,
)
from fixtures.tiny import SD15_SCHEDULER_CONFIG, build_tiny_pipeline, build_tiny_sdxl_pipeline

from .conftest import assert_equal_up_to_rounding

#: The schedulers, by a short name: the class and the options it is built with from SD's scheduler config
#: (``None``: the class's own defaults, as the EDM schedulers take no beta schedule).
SCHEDULERS: dict[str, tuple[type, dict | None]] = {
    "PNDM": (PNDMScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler-a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "KDPM2": (KDPM2DiscreteScheduler, {}),
    "KDPM2-a": (KDPM2AncestralDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "DPM++": (DPMSolverMultistepScheduler, {}),
    "SDE-DPM++": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    "DPM++-singlestep": (DPMSolverSinglestepScheduler, {}),
    "DPM++-SDE": (DPMSolverSDEScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
    "TCD": (TCDScheduler, {}),
    "EDM-Euler": (EDMEulerScheduler, None),
    "EDM-DPM++": (EDMDPMSolverMultistepScheduler, None),
}

#: Settings that change the sigmas or the timesteps, tried on a sample of the schedulers.
VARIANTS = {
    "karras": dict(use_karras_sigmas=True),
    "exponential": dict(use_exponential_sigmas=True),
    "beta": dict(use_beta_sigmas=True),
    "trailing": dict(timestep_spacing="trailing"),
    "linspace": dict(timestep_spacing="linspace"),
}


def takes(cls: type, option: str) -> bool:
    return option in inspect.signature(cls.__init__).parameters


#: Each scheduler with its default config, and with Karras sigmas where the class takes them.
CASES = [(name, "default") for name in SCHEDULERS] + [
    (name, "karras") for name, (cls, _) in SCHEDULERS.items() if takes(cls, "use_karras_sigmas")
]
#: A sample of the other settings.
SAMPLE = [
    ("Euler", "exponential"),
    ("DPM++", "beta"),
    ("Heun", "trailing"),
    ("KDPM2", "linspace"),
    ("PNDM", "trailing"),
    ("Euler-a", "linspace"),
]

#: The one-call default places its full steps by a calibration on these; without one (the tiny pipelines have
#: none) it runs DeepCache's interval with as many full steps or more, and warns.
CALIBRATED_DEFAULTS = {"DDIM"}

STEPS = 4


def make_scheduler(name: str, variant: str = "default") -> object:
    """A fresh scheduler, built from SD v1.5's scheduler config."""
    cls, options = SCHEDULERS[name]
    extra = {} if variant == "default" else VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # config keys other classes take, deprecated algorithm types
        if options is None:
            return cls(**extra)
        return cls.from_config(SD15_SCHEDULER_CONFIG, **options, **extra)


_PIPES: dict[str, object] = {}


def pipe_with(name: str, variant: str = "default", family: str = "SD", dtype=torch.float32):
    """A tiny pipeline of ``family`` (built once per family and dtype), with a fresh scheduler."""
    key = f"{family}-{dtype}"
    if key not in _PIPES:
        build = build_tiny_pipeline if family == "SD" else build_tiny_sdxl_pipeline
        _PIPES[key] = build(0, dtype=dtype)
    pipe = _PIPES[key]
    pipe.scheduler = make_scheduler(name, variant)
    return pipe


def run(pipe, steps: int = STEPS, seed: int = 0) -> torch.Tensor:
    """Final latents; the global RNG is seeded too (DPMSolverSDE's Brownian tree draws its seed from it)."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        return pipe(
            "a red circle",
            num_inference_steps=steps,
            height=16,
            width=16,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images


def assert_state_dropped(handle) -> None:
    state = handle._state
    assert not state.active and state.cache == {} and state.predictions == {} and state.previous_cache == {}


def loop_calls(pipe, steps: int = STEPS) -> int:
    """The UNet calls of a stock loop of ``steps`` steps: the scheduler's timesteps."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


@pytest.mark.parametrize("family", ["SD", "SDXL"])
@pytest.mark.parametrize(("name", "variant"), CASES + SAMPLE)
def test_the_one_call_default_serves_every_unet_call_with_fewer_full_passes(family, name, variant):
    if family == "SDXL" and (name, variant) in SAMPLE:
        pytest.skip("the sample of settings runs on SD")
    pipe = pipe_with(name, variant, family)
    calls = loop_calls(pipe)
    handle = apply_faster_diffusion(pipe)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run(pipe)
        fallbacks = [w for w in said if issubclass(w.category, CalibrationFallbackWarning)]
        assert len(fallbacks) == (name in CALIBRATED_DEFAULTS)
        stats = handle.last_run
        assert (stats.fallback is not None) == (name in CALIBRATED_DEFAULTS)
        assert stats.full_passes + stats.partial_passes == stats.steps == calls
        assert 0 < stats.full_passes < calls
        assert_state_dropped(handle)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["SD", "SDXL"])
@pytest.mark.parametrize(("name", "variant"), CASES + SAMPLE)
def test_every_step_full_equals_stock_bit_for_bit(family, name, variant):
    if family == "SDXL" and variant != "default":
        pytest.skip("SDXL runs each scheduler's default config here; its Karras runs are the test above's")
    pipe = pipe_with(name, variant, family)
    stock = run(pipe)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.every_step()))
    try:
        assert torch.equal(run(pipe), stock)
        assert handle.last_run.full_passes == loop_calls(pipe)
        assert_state_dropped(handle)
    finally:
        handle.remove()
    assert torch.equal(run(pipe), stock)


@pytest.mark.parametrize(
    ("name", "calls"), [("Heun", 2 * STEPS - 1), ("KDPM2", 2 * STEPS - 1), ("KDPM2-a", 2 * STEPS - 1)]
)
def test_a_two_call_scheduler_counts_each_unet_call_as_a_step_and_serves_them_all(name, calls):
    """No silently stock tail: the progress bar's total is the user's N, the loop makes 2N - 1 calls."""
    pipe = pipe_with(name)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.uniform(3)))
    try:
        run(pipe)
        stats = handle.last_run
        assert stats.schedule.num_steps == stats.steps == calls
        assert (stats.full_passes, stats.partial_passes) == (3, calls - 3)  # steps 0, 3 and 6 of 7
    finally:
        handle.remove()


def test_pndm_counts_its_repeated_warm_up_call_as_a_step():
    pipe = pipe_with("PNDM")
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.uniform(2)))
    try:
        run(pipe)
        stats = handle.last_run
        assert stats.steps == STEPS + 1 == stats.full_passes + stats.partial_passes
        assert stats.full_passes == 3  # steps 0, 2 and 4 of 5
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["PNDM", "Euler", "Heun", "KDPM2-a", "UniPC", "DPM++-singlestep", "TCD"])
def test_batched_deep_reuse_equals_one_step_at_a_time(name):
    pipe = pipe_with(name, dtype=torch.float64)
    results = {}
    for cap in (None, 1):
        config = DeepReuseConfig(key_steps=KeySteps.uniform(3), batched=True, max_decoder_batch=cap)
        handle = apply_faster_diffusion(pipe, config)
        try:
            results[cap] = run(pipe)
            stats = handle.last_run
            assert stats.full_passes + stats.partial_passes == loop_calls(pipe)
            assert_state_dropped(handle)
        finally:
            handle.remove()
    assert_equal_up_to_rounding(results[None], results[1])


@pytest.mark.parametrize("name", ["PNDM", "Euler", "Heun", "LMS", "EDM-Euler"])
def test_encoder_propagation_without_injection_parallel_equals_sequential(name):
    pipe = pipe_with(name, dtype=torch.float64)
    results = {}
    for parallel in (True, False):
        config = FasterDiffusionConfig(
            key_steps=KeySteps.explicit([0, 2]), noise_injection=NoiseInjection.off(), parallel=parallel
        )
        handle = apply_faster_diffusion(pipe, config)
        try:
            results[parallel] = run(pipe)
            assert handle.last_run.full_passes == 2
            assert_state_dropped(handle)
        finally:
            handle.remove()
    assert_equal_up_to_rounding(results[True], results[False])


@pytest.mark.parametrize("name", ["PNDM", "Heun", "KDPM2-a", "UniPC", "DPM++-singlestep", "EDM-Euler"])
def test_prior_noise_injection_is_refused_by_mode_scheduler_and_fix(name):
    pipe = pipe_with(name)
    scheduler = type(pipe.scheduler).__name__
    for config, mode in (
        (FasterDiffusionConfig(), "encoder propagation"),  # injection is on by default here
        (DeepReuseConfig(noise_injection=NoiseInjection()), "deep reuse"),
    ):
        with pytest.raises(UnsupportedModelError) as raised:
            apply_faster_diffusion(pipe, config)
        message = str(raised.value)
        assert f"prior noise injection in {mode}" in message and scheduler in message
        assert "NoiseInjection.off()" in message and "--no-noise-injection" in message
    assert not getattr(pipe.unet, "_diffusers_hook", None) or not pipe.unet._diffusers_hook.hooks


def test_a_flow_matching_config_is_refused_even_without_injection():
    pipe = pipe_with("UniPC")
    pipe.scheduler = UniPCMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG, use_flow_sigmas=True)
    with pytest.raises(UnsupportedModelError, match=r"UniPCMultistepScheduler with use_flow_sigmas=True"):
        apply_faster_diffusion(pipe, DeepReuseConfig())


@pytest.mark.parametrize("name", ["Euler", "DPM++", "Heun", "UniPC", "LMS"])
def test_calibration_keys_differ_for_karras_sigmas(name):
    plain, karras = make_scheduler(name), make_scheduler(name, "karras")
    assert scheduler_key(plain) != scheduler_key(karras)


@pytest.mark.parametrize("name", ["Heun", "KDPM2-a", "PNDM", "DPM++-SDE"])
def test_calibration_refuses_a_scheduler_that_calls_the_unet_more_than_once_a_step(name):
    from faster_diffusion import CalibrationError, calibrate

    pipe = pipe_with(name)
    scheduler = type(pipe.scheduler).__name__
    with pytest.raises(CalibrationError, match=f"do not support the scheduler {scheduler}"):
        calibrate(pipe, budget=2, num_inference_steps=STEPS, prompts=["a red circle"], save=False)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.auto(2)))
    try:
        with pytest.raises(
            CalibrationError, match=rf"{scheduler}: its loop calls the UNet \d+ times for 4 steps"
        ):
            run(pipe)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["Euler-a", "UniPC"])
def test_calibration_on_a_one_call_scheduler_places_auto_full_steps(name):
    """Euler ancestral draws noise in its step from the generators, row by row: final's replays follow the
    stock run. UniPC's corrector reads the sample it is given, as the stock run's."""
    from faster_diffusion import calibrate

    pipe = pipe_with(name)
    calibrate(
        pipe,
        budget=2,
        num_inference_steps=STEPS,
        prompts=["a red circle"],
        target="deep",
        save=False,
        criteria=("final",),
        height=16,
        width=16,
    )
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.auto(2)))
    try:
        run(pipe)
        assert (handle.last_run.full_passes, handle.last_run.partial_passes) == (2, STEPS - 2)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["Heun", "KDPM2-a", "PNDM"])
def test_image_to_image_serves_every_call_from_its_first_step_to_the_end(name):
    """Image-to-image starts later (``timesteps[t_start * order:]``) and announces its sampler steps; the run
    is still served to the end of the timesteps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**pipe_with(name).components)
    image = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3))

    def img2img():
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(0)
            return pipe(
                "a red circle",
                image=image,
                strength=0.5,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images

    stock = img2img()
    calls = [0]
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    for keys in (KeySteps.every_step(), KeySteps.uniform(2)):
        handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys))
        try:
            calls[0] = 0
            latents = img2img()
            stats = handle.last_run
            assert stats.full_passes + stats.partial_passes == stats.steps == calls[0]
            assert_state_dropped(handle)
        finally:
            handle.remove()
        if keys.kind is KeySteps.every_step().kind:
            assert torch.equal(latents, stock)
    hook.remove()


@pytest.mark.parametrize("name", ["Heun", "Euler"])
def test_sdxl_denoising_end_serves_the_calls_that_run_and_ends_the_run(name):
    """SDXL's base stops at ``denoising_end`` (for a refiner): with Heun, the run is served to where the loop
    stops, and leaving the loop ends it (the schedule is the whole one's, uncut)."""
    pipe = pipe_with(name, family="SDXL")
    calls = [0]
    hook = pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def base():
        with torch.inference_mode():
            return pipe(
                "a red circle",
                num_inference_steps=STEPS,
                denoising_end=0.5,
                height=16,
                width=16,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images

    try:
        stock = base()
        ran = calls[0]
        assert 0 < ran < loop_calls(pipe)
        handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.every_step()))
        try:
            assert torch.equal(base(), stock)
            stats = handle.last_run
            assert stats.full_passes == stats.steps == ran
            assert_state_dropped(handle)
        finally:
            handle.remove()
    finally:
        hook.remove()


@pytest.mark.parametrize("name", ["Heun", "PNDM"])
def test_an_interrupted_run_ends_cleanly_and_the_next_run_is_whole(name):
    pipe = pipe_with(name)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.uniform(2)))

    def stop_after_three(pipeline, step, timestep, kwargs):
        pipeline._interrupt = step >= 2
        return kwargs

    try:
        with torch.inference_mode():
            pipe(
                "a red circle",
                num_inference_steps=STEPS,
                height=16,
                width=16,
                callback_on_step_end=stop_after_three,
                output_type="latent",
            )
        assert handle.last_run.steps == 3 == handle.last_run.full_passes + handle.last_run.partial_passes
        assert_state_dropped(handle)
        run(pipe)
        assert handle.last_run.steps == loop_calls(pipe)
    finally:
        handle.remove()


class ReferenceInjection:
    """Prior noise injection written out by hand for sigma-scaled latents, on a stock pipeline's scheduler:
    before step i's update, when ``timesteps[i] < tau``, ``x += alpha * z * sqrt(1 + sigma_i^2) /
    sqrt(1 + sigma_0^2)``, with z the latents at the first step (unit noise times ``init_noise_sigma``)."""

    def __init__(self, scheduler, alpha: float, tau: float) -> None:
        self.scheduler, self.alpha, self.tau = scheduler, alpha, tau
        self.original = scheduler.step
        # Its signature is the step's own: the pipeline passes the generator to a step that takes one.
        scheduler.step = functools.wraps(self.original)(lambda *args, **kwargs: self.step(*args, **kwargs))
        self.index, self.initial = 0, None

    def step(self, model_output, timestep, sample, *args, **kwargs):
        scheduler = self.scheduler
        if self.index == 0:
            self.initial = sample
        sigmas = scheduler.sigmas.double()
        if float(scheduler.timesteps[self.index]) < self.tau:
            ratio = torch.sqrt(1 + sigmas[self.index] ** 2) / torch.sqrt(1 + sigmas[0] ** 2)
            sample = sample + self.alpha * float(ratio) * self.initial
        self.index += 1
        return self.original(model_output, timestep, sample, *args, **kwargs)


@pytest.mark.parametrize("name", ["Euler", "Euler-a", "LMS"])
@pytest.mark.parametrize("variant", ["default", "karras"])
def test_prior_noise_injection_on_sigma_scaled_latents_equals_the_hand_written_reference(name, variant):
    injection = NoiseInjection(alpha=0.05, tau=700)
    pipe = pipe_with(name, variant, dtype=torch.float64)
    stock = run(pipe)
    reference = ReferenceInjection(pipe.scheduler, injection.alpha, injection.tau)
    expected = run(pipe)
    del pipe.scheduler.step  # the class's own step again
    assert reference.index == loop_calls(pipe)
    handle = apply_faster_diffusion(
        pipe, FasterDiffusionConfig(key_steps=KeySteps.every_step(), noise_injection=injection)
    )
    try:
        injected = run(pipe)
        assert 0 < handle.last_run.injected_steps < loop_calls(pipe)
    finally:
        handle.remove()
    assert_equal_up_to_rounding(injected, expected)
    assert (injected - stock).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("name", "variant", "options", "family"),
    [
        ("Euler", "default", {}, "euler"),
        ("Euler", "karras", {}, None),
        ("Euler-a", "default", {}, "euler-ancestral"),
        ("UniPC", "default", {}, "unipc"),
        ("UniPC", "karras", {}, None),
        ("DPM++", "karras", {}, "karras-dpm"),
        ("DPM++", "default", {}, None),
        ("DPM++", "karras", dict(solver_order=3), None),
        ("SDE-DPM++", "karras", {}, None),
        ("DPM++", "exponential", {}, None),
        ("DDIM", "default", {}, None),
        ("Heun", "default", {}, None),
    ],
)
def test_the_measured_schedulers_get_their_own_default_and_no_other_setting_does(
    name, variant, options, family
):
    """The defaults measured for Euler, Euler ancestral, DPM-Solver++ 2M Karras and UniPC
    (policy.SCHEDULER_DEFAULTS) apply to those schedulers as measured, whether set by the library user or by
    their Replicate name, and to no other setting: the rest keep every third step."""
    scheduler = make_scheduler(name, variant)
    if options:
        scheduler = type(scheduler).from_config(scheduler.config, **options)
    assert scheduler_family(scheduler) == family
    pipe = pipe_with("DDIM")
    pipe.scheduler = scheduler
    expected = SCHEDULER_DEFAULTS[family] if family is not None else None
    keys = default_key_steps(pipe)
    if expected is not None:
        assert keys == expected
        with apply_faster_diffusion(pipe) as handle:
            assert handle.config.key_steps == expected
    elif name != "DDIM":
        assert keys == DEEP_DEFAULT_KEY_STEPS


@pytest.mark.parametrize(
    ("sampler", "family"),
    [
        ("K_EULER", "euler"),
        ("K_EULER_ANCESTRAL", "euler-ancestral"),
        ("KarrasDPM", "karras-dpm"),
        ("UniPCMultistep", "unipc"),
    ],
)
def test_replicate_s_names_build_the_schedulers_their_defaults_were_measured_on(sampler, family):
    from faster_diffusion import make_scheduler as build

    assert scheduler_family(build(sampler, SD15_SCHEDULER_CONFIG)) == family
    assert default_key_steps(None, sampler) == SCHEDULER_DEFAULTS[family]
