"""Encoder propagation on a stock diffusers pipeline: the properties of METHOD.md, as specifications."""

from __future__ import annotations

import pytest
import torch

from faster_diffusion import (
    PAPER_DDIM_50_KEY_STEPS,
    PAPER_DPM_SOLVER_20_KEY_STEPS,
    FasterDiffusionConfig,
    KeyStepError,
    KeySteps,
    NoiseInjection,
    Sampler,
    UnsupportedModelError,
    apply_faster_diffusion,
    get_faster_diffusion,
    remove_faster_diffusion,
    use_sampler,
)
from fixtures.tiny import SD_SHAPED_UNET

from .conftest import (
    PAPER,
    PAPER_ONE_STEP_AT_A_TIME,
    SAMPLERS,
    SD2_SHAPED_UNET,
    STOCK_EQUIVALENT,
    assert_equal_up_to_rounding,
    generate_latents,
)
from .reference import reference_latents


def steps_of(sampler: str) -> int:
    return Sampler.parse(sampler).default_steps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_all_key_steps_equal_stock_pipeline(make_pipe, sampler):
    steps = steps_of(sampler)
    stock = generate_latents(make_pipe(sampler), steps=steps)
    pipe = make_pipe(sampler)
    handle = apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    ours = generate_latents(pipe, steps=steps)
    assert torch.equal(ours, stock)
    assert handle.last_run.full_passes == steps


@pytest.mark.parametrize(
    "call",
    [
        dict(negative_prompt="blurry ugly painting"),
        dict(num_images_per_prompt=2),
        dict(guidance_scale=1.0),
        dict(guidance_scale=0.5),
        dict(guidance_rescale=0.7),
        dict(height=24, width=40, unet_kwargs=SD_SHAPED_UNET),
        dict(unet_kwargs=SD2_SHAPED_UNET),
        dict(prompt=["a red circle", "a green square"], negative_prompt=["blurry", "ugly"]),
    ],
    ids=lambda call: ",".join(call),
)
def test_stock_pipeline_features_keep_working(make_pipe, call):
    call = dict(call)
    prompt = call.pop("prompt", "a red circle above a blue square")
    model = dict(unet_kwargs=call.pop("unet_kwargs", None))
    stock = generate_latents(make_pipe(**model), prompt, steps=10, **call)
    pipe = make_pipe(**model)
    apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(pipe, prompt, steps=10, **call), stock)

    # With the paper preset, batched decoding equals one step at a time for the same call.
    batched, sequential = make_pipe(**model, dtype=torch.float64), make_pipe(**model, dtype=torch.float64)
    apply_faster_diffusion(batched, PAPER)
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    fast = generate_latents(batched, prompt, steps=10, **call)
    assert_equal_up_to_rounding(fast, generate_latents(sequential, prompt, steps=10, **call))
    assert fast.shape == stock.shape
    assert not torch.equal(fast, stock.double())


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("cap", [None, 2, 3])
def test_parallel_equals_sequential(make_pipe, sampler, cap):
    steps = steps_of(sampler)
    sequential_pipe = make_pipe(sampler, dtype=torch.float64)
    parallel_pipe = make_pipe(sampler, dtype=torch.float64)
    apply_faster_diffusion(sequential_pipe, PAPER_ONE_STEP_AT_A_TIME)
    handle = apply_faster_diffusion(
        parallel_pipe, FasterDiffusionConfig(key_steps=KeySteps.paper(), max_decoder_batch=cap)
    )
    parallel = generate_latents(parallel_pipe, steps=steps)
    sequential = generate_latents(sequential_pipe, steps=steps)
    assert_equal_up_to_rounding(parallel, sequential)
    # The decoder really ran in batches: one per group, or more when the cap splits groups.
    groups = handle.last_run.schedule.groups
    expected_batches = sum(-(-(stop - start) // (cap or steps)) for start, stop in groups)
    assert handle.last_run.unet_batches == expected_batches < steps


class CallCounter:
    """Counts real computations of the encoder and the decoder through submodules deep inside each half.

    Hooks on a block's first resnet fire only when the block really computes, not when faster diffusion
    hands back a kept output.
    """

    def __init__(self, unet):
        self.encoder_calls = 0
        self.encoder_rows = []
        self.decoder_rows = []
        self._handles = [
            unet.down_blocks[0].resnets[0].register_forward_hook(self._on_encoder),
            unet.up_blocks[-1].resnets[0].register_forward_hook(self._on_decoder),
        ]

    def _on_encoder(self, module, args, output):
        self.encoder_calls += 1
        self.encoder_rows.append(output.shape[0])

    def _on_decoder(self, module, args, output):
        self.decoder_rows.append(output.shape[0])


@pytest.mark.parametrize(
    ("sampler", "config", "num_key_steps"),
    [
        ("DDIM-50", PAPER, len(PAPER_DDIM_50_KEY_STEPS)),
        ("DDIM-50", PAPER_ONE_STEP_AT_A_TIME, len(PAPER_DDIM_50_KEY_STEPS)),
        ("DDIM-50", FasterDiffusionConfig(key_steps=KeySteps.uniform(4), max_decoder_batch=3), 13),
        ("DPM-Solver-20", PAPER, len(PAPER_DPM_SOLVER_20_KEY_STEPS)),
        ("DPM-Solver++-20", FasterDiffusionConfig(key_steps=KeySteps.explicit([0, 7])), 2),
    ],
)
@pytest.mark.parametrize("images", [1, 2])
def test_encoder_runs_once_per_key_step_and_decoder_once_per_step(
    make_pipe, sampler, config, num_key_steps, images
):
    steps = steps_of(sampler)
    pipe = make_pipe(sampler)
    handle = apply_faster_diffusion(pipe, config)
    counter = CallCounter(pipe.unet)
    generate_latents(pipe, steps=steps, num_images_per_prompt=images)
    rows_per_step = 2 * images  # classifier-free guidance: unconditional and conditional rows
    assert counter.encoder_calls == num_key_steps
    assert set(counter.encoder_rows) == {rows_per_step}
    assert sum(counter.decoder_rows) == steps * rows_per_step
    assert (handle.last_run.full_passes, handle.last_run.partial_passes) == (
        num_key_steps,
        steps - num_key_steps,
    )
    if config.parallel:
        assert max(counter.decoder_rows) > rows_per_step


def test_stock_pipeline_runs_encoder_every_step(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    counter = CallCounter(pipe.unet)
    generate_latents(pipe, steps=20)
    assert counter.encoder_calls == 20
    assert sum(counter.decoder_rows) == 40


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(
    "noise", [NoiseInjection(), NoiseInjection(alpha=0.05, tau=700), NoiseInjection.off()]
)
def test_package_matches_reference_loop_over_unet_halves(make_pipe, sampler, noise):
    steps = steps_of(sampler)
    keys = KeySteps.paper().resolve(steps).indices
    reference = reference_latents(
        make_pipe(sampler, dtype=torch.float64),
        "a red circle above a blue square",
        num_steps=steps,
        key_steps=keys,
        alpha=noise.alpha if noise.enabled else 0.0,
        tau=noise.tau,
        guidance_scale=7.5,
        seed=0,
        height=16,
        width=16,
        negative_prompt="blurry",
    )
    pipe = make_pipe(sampler, dtype=torch.float64)
    apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.paper(), noise_injection=noise))
    ours = generate_latents(pipe, steps=steps, negative_prompt="blurry")
    assert_equal_up_to_rounding(ours, reference)


def test_noise_injection_adds_alpha_times_initial_latents_before_the_scheduler_step(make_pipe):
    """With every step a key step, injection is the only change: check it against stock with the formula
    applied by hand to the sample each scheduler step receives, at exactly the steps below tau."""
    noise = NoiseInjection(alpha=0.01, tau=500)
    pipe = make_pipe("DDIM-50")
    seen = []
    original_step = pipe.scheduler.step

    def recording_step(model_output, timestep, sample, *args, **kwargs):
        seen.append((int(timestep), sample.clone()))
        return original_step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = recording_step
    stock = generate_latents(pipe, steps=50)
    stock_samples = list(seen)
    seen.clear()

    pipe2 = make_pipe("DDIM-50")
    original_step = pipe2.scheduler.step
    pipe2.scheduler.step = recording_step
    handle = apply_faster_diffusion(
        pipe2, FasterDiffusionConfig(key_steps=KeySteps.every_step(), noise_injection=noise)
    )
    ours = generate_latents(pipe2, steps=50)
    initial = stock_samples[0][1]
    injected = [t for t, _ in stock_samples if t < 500]
    assert len(injected) == 25 == handle.last_run.injected_steps  # the last 25 of SD's 50 DDIM steps
    # Before the first injection both runs see the same samples.
    first = next(i for i, (t, _) in enumerate(stock_samples) if t < 500)
    for (_, ours_sample), (_, stock_sample) in zip(seen[:first], stock_samples[:first], strict=True):
        assert torch.equal(ours_sample, stock_sample)
    # At the first injected step, the scheduler sees x + alpha * z_T, with x the un-injected latents.
    torch.testing.assert_close(seen[first][1], stock_samples[first][1] + 0.01 * initial)
    assert not torch.allclose(ours, stock)


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"])
def test_remove_restores_stock_output_exactly(make_pipe, sampler):
    steps = steps_of(sampler)
    pipe = make_pipe(sampler)
    stock = generate_latents(pipe, steps=steps)
    handle = apply_faster_diffusion(pipe, PAPER)
    fast = generate_latents(pipe, steps=steps)
    assert not torch.equal(fast, stock)
    handle.remove()
    assert get_faster_diffusion(pipe) is None
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(generate_latents(pipe, steps=steps), stock)
    handle.remove()  # a second remove is harmless
    assert remove_faster_diffusion(pipe) is False


def test_context_manager_and_remove_by_pipeline(make_pipe):
    pipe = make_pipe()
    stock = generate_latents(pipe, steps=10)
    with apply_faster_diffusion(pipe, PAPER):
        assert not torch.equal(generate_latents(pipe, steps=10), stock)
    assert torch.equal(generate_latents(pipe, steps=10), stock)
    apply_faster_diffusion(pipe, PAPER)
    assert remove_faster_diffusion(pipe) is True
    assert torch.equal(generate_latents(pipe, steps=10), stock)


def test_two_generations_in_a_row_are_identical(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    handle = apply_faster_diffusion(pipe, PAPER)
    first = generate_latents(pipe, steps=20)
    first_stats = handle.last_run
    second = generate_latents(pipe, steps=20)
    assert torch.equal(first, second)
    assert handle.last_run == first_stats


def test_a_run_that_raises_midway_leaves_the_pipeline_usable(make_pipe):
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, PAPER)
    expected = generate_latents(pipe, steps=50)

    def explode(pipeline, step, timestep, tensors):
        if step == 7:  # inside the group that starts at key step 5
            raise KeyboardInterrupt("cancelled")
        return tensors

    with pytest.raises(KeyboardInterrupt):
        generate_latents(pipe, steps=50, callback_on_step_end=explode)
    assert torch.equal(generate_latents(pipe, steps=50), expected)
    assert handle.last_run.full_passes == 9
    # Another step count in between is fine too: state belongs to one run.
    generate_latents(pipe, steps=12)
    assert handle.last_run.schedule.indices == (0, 1, 2, 3, 5, 10)
    assert torch.equal(generate_latents(pipe, steps=50), expected)


def test_callbacks_see_every_step_and_can_change_latents(make_pipe):
    pipe = make_pipe("DDIM-50")
    apply_faster_diffusion(pipe, PAPER)
    steps = []

    def record(pipeline, step, timestep, tensors):
        steps.append(step)
        return tensors

    generate_latents(pipe, steps=50, callback_on_step_end=record)
    assert steps == list(range(50))


def test_key_step_list_out_of_range_fails_the_call_clearly_then_recovers(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.parse("0,5,30")))
    with pytest.raises(
        KeyStepError, match=r"key_steps: index 30 is out of range for 20 steps; allowed indices are 0 to 19"
    ):
        generate_latents(pipe, steps=20)
    out = generate_latents(pipe, steps=40)
    assert out.shape == (1, 4, 8, 8)
    assert get_faster_diffusion(pipe).last_run.full_passes == 3


@pytest.mark.parametrize(
    ("unet_kwargs", "message"),
    [
        (dict(class_embed_type="timestep"), "class_embed_type='timestep'"),
        (dict(num_class_embeds=10), "num_class_embeds=10"),
    ],
)
def test_unsupported_unet_gets_a_clear_error(make_pipe, unet_kwargs, message):
    pipe = make_pipe(unet_kwargs=unet_kwargs)
    with pytest.raises(UnsupportedModelError, match=message):
        apply_faster_diffusion(pipe, PAPER)


def test_unsupported_inputs_and_misuse_get_clear_errors(make_pipe):
    pipe = make_pipe()
    with pytest.raises(TypeError, match="FasterDiffusionConfig"):
        apply_faster_diffusion(pipe, {"key_steps": "paper"})
    with pytest.raises(UnsupportedModelError, match="needs a pipeline with a unet and a scheduler"):
        apply_faster_diffusion(object(), PAPER)
    handle = apply_faster_diffusion(pipe, PAPER)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_faster_diffusion(pipe, PAPER)
    with pytest.raises(RuntimeError, match="call remove\\(\\) first"):
        use_sampler(pipe, "DDIM-50")
    pipe.scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    with pytest.raises(RuntimeError, match=r"pipe\.scheduler was replaced"):
        generate_latents(pipe, steps=10)
    handle.remove()


def test_unet_used_outside_a_pipeline_run_is_stock(make_pipe):
    pipe = make_pipe()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        stock = pipe.unet(sample, 500, encoder_hidden_states=text).sample
        apply_faster_diffusion(pipe, PAPER)
        generate_latents(pipe, steps=10)
        assert torch.equal(pipe.unet(sample, 500, encoder_hidden_states=text).sample, stock)


def test_config_validation():
    with pytest.raises(ValueError, match=r"max_decoder_batch must be 'auto', a whole number >= 1 or None"):
        FasterDiffusionConfig(max_decoder_batch=0)
    with pytest.raises(TypeError, match="key_steps must be a KeySteps value"):
        FasterDiffusionConfig(key_steps="paper")
    with pytest.raises(TypeError, match="parallel must be true or false"):
        FasterDiffusionConfig(parallel="yes")
    assert FasterDiffusionConfig(parallel=False, max_decoder_batch=8).decoder_batch_cap == 1
