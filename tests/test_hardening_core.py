"""Paths of a diffusers run that change the run under the hooks: callbacks that switch guidance off or replace
the text embeddings part-way through a group, image-to-image, and runs that end early."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from faster_diffusion import (
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    UnsupportedModelError,
    apply_faster_diffusion,
)

from .conftest import (
    PAPER,
    PAPER_ONE_STEP_AT_A_TIME,
    STOCK_EQUIVALENT,
    assert_equal_up_to_rounding,
    generate_latents,
)
from .reference import decoder, encoder

PROMPT = "a red circle above a blue square"

#: DDIM-50 with the paper's key steps has the groups [5, 10) (a middle group) and [35, 50) (the last group).
#: A callback at the end of step 7 or 40 changes what steps 8-9 or 41-49 send to the UNet: steps that reuse
#: the features of key step 5 or 35, and whose predictions the batched decoder has already made.
MIDDLE_OF_A_GROUP, MIDDLE_OF_THE_LAST_GROUP = 7, 40


#: Equal up to float64 rounding; the pipelines it compares are built in float64 (F64).
close = assert_equal_up_to_rounding
F64 = dict(dtype=torch.float64)


def tensors_held(handle) -> list[torch.Tensor]:
    """Every tensor the handle's per-run state still references."""
    found: list[torch.Tensor] = []

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    for value in vars(handle._state).values():
        walk(value)
    return found


def cutoff(step: int) -> SDCFGCutoffCallback:
    """diffusers' own callback that switches classifier-free guidance off after ``step``."""
    return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=step)


# --- 1. A callback changes the guidance batch part-way through a group -----------------------------------


@torch.inference_mode()
def reference_with_cfg_cutoff(
    pipe, *, num_steps: int, key_steps: tuple[int, ...], cutoff_step: int, seed: int = 0
) -> torch.Tensor:
    """METHOD.md's loop, written out over the UNet halves, with guidance switched off after ``cutoff_step``.

    After the cutoff the batch holds only the conditional rows. A step that reuses the features of a key step
    from before the cutoff decodes the conditional rows of those features: the encoder treats every row on its
    own, so they are the features the encoder gives for the conditional rows alone.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, None)
    scheduler.set_timesteps(num_steps, device="cpu")
    latents = pipe.prepare_latents(
        1,
        unet.config.in_channels,
        16,
        16,
        positive.dtype,
        torch.device("cpu"),
        torch.Generator().manual_seed(seed),
    )
    features = None
    for index, t in enumerate(scheduler.timesteps):
        guided = index <= cutoff_step
        text = torch.cat([negative, positive]) if guided else positive
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        if index in key_steps:
            features = encoder(unet, model_input, t, text)
        skips, mid = features
        rows = model_input.shape[0]
        skips, mid = tuple(skip[-rows:] for skip in skips), mid[-rows:]
        noise = decoder(unet, skips, mid, t, text)
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + 7.5 * (cond - uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"])
@pytest.mark.parametrize("step", [0, 3, MIDDLE_OF_A_GROUP, MIDDLE_OF_THE_LAST_GROUP - 25])
def test_cfg_cutoff_with_every_step_a_key_step_equals_stock(make_pipe, sampler, step):
    steps = 50 if sampler == "DDIM-50" else 20
    stock = generate_latents(make_pipe(sampler), steps=steps, callback_on_step_end=cutoff(step))
    pipe = make_pipe(sampler)
    apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    ours = generate_latents(pipe, steps=steps, callback_on_step_end=cutoff(step))
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("step", [MIDDLE_OF_A_GROUP, MIDDLE_OF_THE_LAST_GROUP])
@pytest.mark.parametrize("cap", [None, 4])
def test_cfg_cutoff_inside_a_group_matches_the_reference_and_one_step_at_a_time(make_pipe, step, cap):
    no_noise = NoiseInjection.off()
    reference = reference_with_cfg_cutoff(
        make_pipe(**F64), num_steps=50, key_steps=KeySteps.paper().resolve(50).indices, cutoff_step=step
    )
    batched, sequential = make_pipe(**F64), make_pipe(**F64)
    handle = apply_faster_diffusion(
        batched, FasterDiffusionConfig(max_decoder_batch=cap, noise_injection=no_noise)
    )
    apply_faster_diffusion(sequential, FasterDiffusionConfig(parallel=False, noise_injection=no_noise))
    fast = generate_latents(batched, steps=50, callback_on_step_end=cutoff(step))
    assert fast.shape == (1, 4, 8, 8)  # one latent per prompt, not one per guidance row
    close(fast, reference)
    close(generate_latents(sequential, steps=50, callback_on_step_end=cutoff(step)), reference)
    assert handle.last_run.full_passes == 9


def test_cfg_cutoff_keeping_the_conditional_half_of_several_images(make_pipe):
    """Two images per prompt: the conditional half is two rows, kept by ``prompt_embeds.chunk(2)[1]``."""

    def keep_conditional_half(pipeline, step, timestep, tensors):
        if step == MIDDLE_OF_A_GROUP:
            pipeline._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
        return tensors

    call = dict(
        steps=50,
        num_images_per_prompt=2,
        callback_on_step_end=keep_conditional_half,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    stock = generate_latents(make_pipe(), **call)
    same = make_pipe()
    apply_faster_diffusion(same, STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(same, **call), stock)

    batched, sequential = make_pipe(**F64), make_pipe(**F64)
    apply_faster_diffusion(batched, PAPER)
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    fast = generate_latents(batched, **call)
    assert fast.shape == stock.shape == (2, 4, 8, 8)
    close(fast, generate_latents(sequential, **call))


def test_a_batch_change_that_is_not_the_conditional_half_gets_a_clear_error(make_pipe):
    def new_batch(pipeline, step, timestep, tensors):
        if step == MIDDLE_OF_A_GROUP:
            pipeline._guidance_scale = 0.0
            # The unconditional half (the negative prompt's rows), not the conditional half. (A copy of the
            # conditional half is accepted: it is recognised by value, as under model CPU offload.)
            tensors["prompt_embeds"] = tensors["prompt_embeds"][:1]
        return tensors

    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    expected = generate_latents(pipe, steps=50)
    with pytest.raises(UnsupportedModelError, match=r"batch changed from 2 to 1 rows at step 8"):
        generate_latents(
            pipe,
            steps=50,
            callback_on_step_end=new_batch,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    assert tensors_held(handle) == []
    assert torch.equal(generate_latents(pipe, steps=50), expected)


# --- 2. A callback replaces prompt_embeds part-way through a group ---------------------------------------


def replace_embeddings_at(step: int, prompt: str = "a green triangle on a black background"):
    def replace(pipeline, index, timestep, tensors):
        if index == step:
            positive, negative = pipeline.encode_prompt(prompt, "cpu", 1, True, None)
            tensors["prompt_embeds"] = torch.cat([negative, positive])
        return tensors

    return replace


@pytest.mark.parametrize("step", [MIDDLE_OF_A_GROUP, MIDDLE_OF_THE_LAST_GROUP])
@pytest.mark.parametrize("cap", [None, 4])
def test_new_prompt_embeds_inside_a_group_batched_equals_one_step_at_a_time(make_pipe, step, cap):
    call = dict(steps=50, callback_on_step_end=replace_embeddings_at(step))
    batched, sequential = make_pipe(**F64), make_pipe(**F64)
    apply_faster_diffusion(batched, FasterDiffusionConfig(max_decoder_batch=cap))
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    fast = generate_latents(batched, **call)
    close(fast, generate_latents(sequential, **call))
    assert not torch.allclose(fast, generate_latents(batched, steps=50))  # the new prompt matters


def test_new_prompt_embeds_with_every_step_a_key_step_equals_stock(make_pipe):
    call = dict(steps=50, callback_on_step_end=replace_embeddings_at(MIDDLE_OF_A_GROUP))
    stock = generate_latents(make_pipe(), **call)
    pipe = make_pipe()
    apply_faster_diffusion(pipe, STOCK_EQUIVALENT)
    assert torch.equal(generate_latents(pipe, **call), stock)


# --- 3. Image-to-image -----------------------------------------------------------------------------------


def tiny_pipe(sampler: str, make_pipe, **kwargs):
    """A tiny pipeline with the given sampler (SD's default PNDM is refused: test_hardening_sched)."""
    return make_pipe(sampler, **kwargs)


def image_to_image(pipe, *, strength: float, steps: int) -> torch.Tensor:
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return img2img(
            PROMPT,
            image=image,
            strength=strength,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"], ids=["DDIM", "DPM-Solver"])
def test_image_to_image_over_the_whole_schedule_is_exact(make_pipe, sampler):
    stock = image_to_image(tiny_pipe(sampler, make_pipe), strength=1.0, steps=20)
    same = tiny_pipe(sampler, make_pipe)
    apply_faster_diffusion(same, STOCK_EQUIVALENT)
    assert torch.equal(image_to_image(same, strength=1.0, steps=20), stock)

    batched, sequential = tiny_pipe(sampler, make_pipe, **F64), tiny_pipe(sampler, make_pipe, **F64)
    handle = apply_faster_diffusion(batched, PAPER)
    apply_faster_diffusion(sequential, PAPER_ONE_STEP_AT_A_TIME)
    fast = image_to_image(batched, strength=1.0, steps=20)
    close(fast, image_to_image(sequential, strength=1.0, steps=20))
    assert (handle.last_run.full_passes, handle.last_run.partial_passes) == (7, 13)


# --- 5. State is dropped when the pipeline call ends, however it ends ------------------------------------


def interrupt_at(step: int):
    def interrupt(pipeline, index, timestep, tensors):
        if index == step:
            pipeline._interrupt = True
        return tensors

    return interrupt


def raise_at(step: int):
    def explode(pipeline, index, timestep, tensors):
        if index == step:
            raise KeyboardInterrupt("cancelled")
        return tensors

    return explode


@pytest.mark.parametrize("end", ["interrupt", "exception"])
def test_a_run_that_ends_early_leaves_no_state_behind(make_pipe, end):
    stock_unet = make_pipe().unet
    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    fresh = make_pipe()
    apply_faster_diffusion(fresh, PAPER)
    expected = generate_latents(fresh, steps=50)

    if end == "interrupt":
        generate_latents(pipe, steps=50, callback_on_step_end=interrupt_at(MIDDLE_OF_A_GROUP))
    else:
        with pytest.raises(KeyboardInterrupt):
            generate_latents(pipe, steps=50, callback_on_step_end=raise_at(MIDDLE_OF_A_GROUP))
    # (a) Nothing of the run is kept.
    assert not handle._state.active
    assert tensors_held(handle) == []
    # (b) The UNet used directly is stock, even with the timestep of the step the run would have taken next.
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))
    t = pipe.scheduler.timesteps[MIDDLE_OF_A_GROUP + 1]
    with torch.inference_mode():
        direct = pipe.unet(sample, t, encoder_hidden_states=text).sample
        assert torch.equal(direct, stock_unet(sample, t, encoder_hidden_states=text).sample)
    # (c) The next run is a fresh one.
    assert torch.equal(generate_latents(pipe, steps=50), expected)


def test_diffusers_reset_of_stateful_hooks_drops_the_run(make_pipe):
    pipe = make_pipe()
    handle = apply_faster_diffusion(pipe, PAPER)
    held_after_reset = []

    def reset(pipeline, index, timestep, tensors):
        if index == MIDDLE_OF_A_GROUP:
            pipeline.unet._diffusers_hook.reset_stateful_hooks()
            held_after_reset.append(tensors_held(handle))
            pipeline._interrupt = True
        return tensors

    generate_latents(pipe, steps=50, callback_on_step_end=reset)
    assert held_after_reset == [[]]


def test_remove_restores_a_progress_bar_the_pipeline_instance_had_before(make_pipe):
    pipe = make_pipe()
    stock_progress_bar = pipe.progress_bar
    bars = []

    def own_progress_bar(*args, **kwargs):
        bars.append(kwargs.get("total"))
        return stock_progress_bar(*args, **kwargs)

    pipe.progress_bar = own_progress_bar
    handle = apply_faster_diffusion(pipe, PAPER)
    generate_latents(pipe, steps=50)
    handle.remove()
    assert vars(pipe)["progress_bar"] is own_progress_bar
    generate_latents(pipe, steps=50)
    assert bars == [50, 50]


def test_remove_leaves_no_progress_bar_on_an_instance_that_had_none(make_pipe):
    pipe = make_pipe()
    apply_faster_diffusion(pipe, PAPER).remove()
    assert "progress_bar" not in vars(pipe)
