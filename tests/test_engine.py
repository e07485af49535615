"""The engine every reuse mode runs on (faster_diffusion/engine.py): what its run stats count, in any mode."""

from __future__ import annotations

import pytest
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.callbacks import SDCFGCutoffCallback

from faster_diffusion import (
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    RunStats,
    apply_faster_diffusion,
)

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
