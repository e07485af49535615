"""The engine every reuse mode runs on (faster_diffusion/engine.py): what its run stats count and what its
refusals say, in any mode."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from faster_diffusion import (
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    RunStats,
    UnsupportedModelError,
    apply_faster_diffusion,
    get_faster_diffusion,
)
from fixtures.tiny import build_tiny_pipeline

from .conftest import generate_latents
from .test_img2img import FIRST_STEP, STEPS, run

#: One config of each mode, and deep reuse batched: whole groups, so that a batch serves several steps.
CONFIGS = {
    "encoder": FasterDiffusionConfig(key_steps=KeySteps.paper(), max_decoder_batch=None),
    "deep": DeepReuseConfig(key_steps=KeySteps.uniform(3)),
    "deep-batched": DeepReuseConfig(key_steps=KeySteps.uniform(3), batched=True, max_decoder_batch=None),
}
#: Guidance switched off at step 12: inside a group of every config above, after its batch was decoded.
CUTOFF_STEP = 12


def test_the_old_run_stats_names_read_as_before_and_warn():
    stats = RunStats(full_passes=7, partial_passes=13, unet_batches=9, steps=20)
    with pytest.warns(DeprecationWarning, match="RunStats.encoder_passes is deprecated: use full_passes"):
        assert stats.encoder_passes == 7
    with pytest.warns(DeprecationWarning, match=r"decoder_passes is deprecated: use full_passes \+ partial"):
        assert stats.decoder_passes == 20
    with pytest.warns(DeprecationWarning, match="RunStats.decoder_batches is deprecated: use unet_batches"):
        assert stats.decoder_batches == 9


def assert_every_step_counted_once(stats: RunStats, steps: int) -> None:
    assert stats.full_passes + stats.partial_passes == stats.steps == steps
    assert stats.full_passes == stats.schedule.num_key_steps
    assert stats.partial_passes > 0


@pytest.mark.parametrize("mode", CONFIGS)
def test_every_step_that_ran_is_one_full_or_one_partial_pass(make_pipe, mode):
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, CONFIGS[mode])
    generate_latents(pipe, steps=20)
    assert_every_step_counted_once(handle.last_run, 20)
    batched = mode != "deep"
    assert (handle.last_run.unet_batches < 20) is batched


@pytest.mark.parametrize("mode", CONFIGS)
def test_a_batch_decoded_again_after_guidance_is_cut_counts_its_steps_once(make_pipe, mode):
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, CONFIGS[mode])
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=CUTOFF_STEP)
    generate_latents(pipe, steps=20, callback_on_step_end=cutoff)
    assert_every_step_counted_once(handle.last_run, 20)
    if mode != "deep":  # the batch that served step 12 was decoded again, without the unconditional rows
        groups = len(handle.last_run.schedule.groups)
        assert handle.last_run.unet_batches == groups + 1


@pytest.mark.parametrize("mode", CONFIGS)
def test_an_image_to_image_run_counts_only_the_steps_that_ran(make_pipe, mode):
    pipe = StableDiffusionImg2ImgPipeline(**make_pipe("DDIM-50").components)
    pipe.set_progress_bar_config(disable=True)
    handle = apply_faster_diffusion(pipe, CONFIGS[mode])
    run(pipe)
    assert handle.last_run.schedule.start == FIRST_STEP
    assert_every_step_counted_once(handle.last_run, STEPS - FIRST_STEP)


#: Each mode's default config, by the name its messages give it.
BY_NAME = {config.mode_name: config() for config in (FasterDiffusionConfig, DeepReuseConfig)}


def assert_names_only(message: str, mode: str) -> None:
    """``message`` names ``mode`` and no other mode."""
    assert mode in message
    assert [other for other in BY_NAME if other != mode and other in message] == []


@pytest.mark.parametrize("mode", BY_NAME)
def test_a_refused_scheduler_is_refused_in_the_name_of_the_mode_in_use(mode):
    """PNDM runs every mode, but not prior noise injection (on by default in encoder propagation)."""
    pipe = build_tiny_pipeline(0)  # SD v1.5's PNDMScheduler, as from_pretrained gives it
    config = dataclasses.replace(BY_NAME[mode], noise_injection=NoiseInjection())
    with pytest.raises(UnsupportedModelError, match="does not support the scheduler PNDMScheduler") as error:
        apply_faster_diffusion(pipe, config)
    assert f"prior noise injection in {mode}" in str(error.value)
    assert_names_only(str(error.value), mode)


@pytest.mark.parametrize("residual", ["down_block_additional_residuals", "mid_block_additional_residual"])
@pytest.mark.parametrize("mode", BY_NAME)
def test_controlnet_residuals_are_refused_in_the_name_of_the_mode_in_use(make_pipe, mode, residual):
    pipe = make_pipe("DDIM-50")
    apply_faster_diffusion(pipe, BY_NAME[mode])
    pipe.scheduler.set_timesteps(10)  # a run starts, whose UNet call brings ControlNet's residuals
    unet = pipe.unet
    sample = torch.zeros(2, unet.config.in_channels, 8, 8)
    text = torch.zeros(2, 4, unet.config.cross_attention_dim)
    residuals = (sample,) if residual.startswith("down") else sample
    with pytest.raises(
        UnsupportedModelError, match=f"the UNet input '{residual}' .* is not supported with"
    ) as error:
        unet(sample, pipe.scheduler.timesteps[0], encoder_hidden_states=text, **{residual: residuals})
    assert_names_only(str(error.value), mode)


#: One config of each mode, for copies.
COPIED = {
    "encoder": FasterDiffusionConfig(key_steps=KeySteps.paper()),
    "deep": DeepReuseConfig(key_steps=KeySteps.uniform(3)),
}


def accelerated(make_pipe, mode: str):
    """A tiny DDIM pipeline with ``mode`` attached, its handle, and the latents of a 20-step run of it."""
    pipe = make_pipe("DDIM-50")
    handle = apply_faster_diffusion(pipe, COPIED[mode])
    return pipe, handle, generate_latents(pipe, steps=20)


@pytest.mark.parametrize("removed", ["copy", "original"])
@pytest.mark.parametrize("mode", COPIED)
def test_a_deep_copy_of_an_accelerated_pipeline_is_accelerated_on_its_own(make_pipe, mode, removed):
    config = COPIED[mode]
    stock = generate_latents(make_pipe("DDIM-50"), steps=20)
    pipe, handle, expected = accelerated(make_pipe, mode)  # a run before the copy: none of it is carried over
    before = handle.last_run

    copied = copy.deepcopy(pipe)
    own = get_faster_diffusion(copied)
    assert own is not None and own is not handle and get_faster_diffusion(pipe) is handle
    assert type(own.config) is type(config) and own.config == config
    assert (own.unet, own.scheduler, own._pipe()) == (copied.unet, copied.scheduler, copied)
    assert (handle.unet, handle.scheduler, handle._pipe()) == (pipe.unet, pipe.scheduler, pipe)
    assert copied.unet is not pipe.unet and copied.scheduler is not pipe.scheduler

    assert torch.equal(generate_latents(copied, steps=20), expected)
    assert own.last_run.steps == 20 and handle.last_run is before  # the copy's run is the copy's alone
    assert torch.equal(generate_latents(pipe, steps=20), expected)
    assert handle.last_run is not before and own.last_run.steps == 20

    gone, kept = (own, handle) if removed == "copy" else (handle, own)
    gone_pipe, kept_pipe = (copied, pipe) if removed == "copy" else (pipe, copied)
    gone.remove()
    assert get_faster_diffusion(gone_pipe) is None and get_faster_diffusion(kept_pipe) is kept
    assert torch.equal(generate_latents(gone_pipe, steps=20), stock)
    assert torch.equal(generate_latents(kept_pipe, steps=20), expected)


@pytest.mark.parametrize("mode", COPIED)
def test_a_deep_copy_of_the_unet_or_the_scheduler_alone_is_stock(make_pipe, mode):
    pipe, handle, expected = accelerated(make_pipe, mode)
    unet, scheduler = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.scheduler)
    assert get_faster_diffusion(SimpleNamespace(unet=unet)) is None
    stock = make_pipe("DDIM-50")
    copied = type(stock)(**{**stock.components, "unet": unet, "scheduler": scheduler})
    copied.set_progress_bar_config(disable=True)
    assert torch.equal(generate_latents(copied, steps=20), generate_latents(stock, steps=20))
    assert get_faster_diffusion(pipe) is handle
    assert torch.equal(generate_latents(pipe, steps=20), expected)


@pytest.mark.parametrize("mode", COPIED)
def test_a_deep_copy_made_during_a_run_leaves_the_run_as_it_was(make_pipe, mode):
    pipe, handle, expected = accelerated(make_pipe, mode)
    copies = []

    def copy_at_step_5(pipeline, index, timestep, tensors):
        if index == 5:
            copies.append(copy.deepcopy(pipeline))
        return tensors

    assert torch.equal(generate_latents(pipe, steps=20, callback_on_step_end=copy_at_step_5), expected)
    assert handle.last_run.steps == 20 and handle.last_run.partial_passes > 0
    assert torch.equal(generate_latents(copies[0], steps=20), expected)


def test_a_deep_copy_of_a_pipeline_that_shares_the_unet_gets_a_handle_of_its_own(make_pipe):
    """An image-to-image pipeline built on ``pipe.components`` runs with ``pipe``'s handle; its copy runs with
    a handle of its own, and gives the same latents."""
    pipe, handle, _ = accelerated(make_pipe, "deep")
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    expected = run(other)
    copied = copy.deepcopy(other)
    own = get_faster_diffusion(copied)
    assert own is not handle and get_faster_diffusion(other) is handle
    assert (own.unet, own.scheduler, own._pipe()) == (copied.unet, copied.scheduler, copied)
    assert torch.equal(run(copied), expected) and own.last_run.schedule.start == FIRST_STEP
    assert torch.equal(run(other), expected)


def test_one_deep_copy_of_two_pipelines_that_share_an_accelerated_unet_gives_them_one_handle(make_pipe):
    """Both pipelines copied in one ``copy.deepcopy`` share the copied UNet, as the originals share theirs:
    the copies run with one handle of their own, each giving the originals' latents."""
    pipe, handle, expected = accelerated(make_pipe, "deep")
    other = StableDiffusionImg2ImgPipeline(**pipe.components)
    other.set_progress_bar_config(disable=True)
    expected_other = run(other)  # the handle now watches both pipelines' loops
    copies = copy.deepcopy({"text": pipe, "image": other})
    text, image = copies["text"], copies["image"]
    assert text.unet is image.unet and text.unet is not pipe.unet
    own = get_faster_diffusion(text)
    assert own is not None and own is not handle and get_faster_diffusion(image) is own
    assert torch.equal(generate_latents(text, steps=20), expected)
    assert torch.equal(run(image), expected_other) and own.last_run.schedule.start == FIRST_STEP
    assert get_faster_diffusion(pipe) is handle and torch.equal(generate_latents(pipe, steps=20), expected)


@pytest.mark.parametrize("removed", [False, True], ids=["attached", "removed"])
def test_a_deep_copy_of_a_shallow_copy_is_a_stock_copy_of_it_and_revives_nothing(make_pipe, removed):
    """``copy.copy(pipe)`` carries the instance's attributes, the handle's copy hook among them; a deep copy
    of that shallow copy is a copy of it (not of the original), stock, and leaves the original's handle as it
    was: attached, or removed for good."""
    stock = generate_latents(make_pipe("DDIM-50"), steps=20)
    pipe, handle, expected = accelerated(make_pipe, "deep")
    shallow = copy.copy(pipe)
    shallow.marker = "the shallow copy"
    if removed:
        handle.remove()
    copied = copy.deepcopy(shallow)
    assert copied.marker == "the shallow copy" and get_faster_diffusion(copied) is None
    assert torch.equal(generate_latents(copied, steps=20), stock)
    assert handle.attached is not removed
    assert get_faster_diffusion(pipe) is (None if removed else handle)
    assert torch.equal(generate_latents(pipe, steps=20), stock if removed else expected)
