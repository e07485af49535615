"""Deep reuse (faster_diffusion/deep.py) and forecasting, against a hand-written reference of DeepCache."""

from __future__ import annotations

import pytest
import torch

from faster_diffusion import (
    DeepReuseConfig,
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    apply_faster_diffusion,
    get_faster_diffusion,
)
from faster_diffusion.deep import branch_count, deep_modules
from fixtures.tiny import SD_SHAPED_UNET

from .conftest import assert_equal_up_to_rounding, generate_latents


class BranchZeroReference:
    """DeepCache's branch 0, written out on the stock UNet: the whole UNet runs at every step, but at a
    partial step the hidden state entering the last layer of the last up block (everything but the skip
    feature of ``conv_in`` that is concatenated to it) is replaced by the one of the latest full step; with
    ``forecast``, by its linear extrapolation from the latest two full steps. With ``batched``, the skip
    feature is the full step's too (the batched variant: a partial step does not see its own latent). Shares
    no code with the package."""

    def __init__(self, unet: torch.nn.Module, full_steps, forecast: int = 0, batched: bool = False) -> None:
        self.full = set(full_steps)
        self.forecast = forecast
        self.batched = batched
        self.kept_skip: torch.Tensor | None = None
        self.step = -1
        self.kept: list[tuple[int, torch.Tensor]] = []
        self.skip_channels = unet.conv_in.out_channels
        self.handles = [
            unet.register_forward_pre_hook(self._on_unet),
            unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(self._on_last_layer),
        ]

    def _on_unet(self, module, args) -> None:
        self.step += 1

    def _on_last_layer(self, module, args):
        hidden, *rest = args
        split = hidden.shape[1] - self.skip_channels
        deep, skip = hidden[:, :split], hidden[:, split:]
        rows = hidden.shape[0]
        if self.step in self.full:
            if self.kept and self.kept[-1][1].shape[0] != rows:
                self.kept = []  # the batch changed at this very step: nothing to extrapolate from yet
            self.kept = [*self.kept, (self.step, deep)][-2:]
            self.kept_skip = skip
            return None
        # Guidance switched off since the full step (a partial step has fewer rows): keep the conditional
        # rows, the last ones, of what was kept.
        self.kept = [(step, kept[-rows:]) for step, kept in self.kept]
        key, kept = self.kept[-1]
        if self.forecast and len(self.kept) == 2:
            previous, before = self.kept[0]
            kept = kept + (kept - before) * ((self.step - key) / (key - previous))
        if self.batched:
            skip = self.kept_skip[-rows:]
        return (torch.cat([kept, skip], dim=1), *rest)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"])
def test_every_step_full_gives_stock_bit_for_bit(make_pipe, sampler):
    pipe = make_pipe(sampler)
    steps = 20 if sampler.startswith("DPM") else 10
    stock = generate_latents(pipe, steps=steps)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.every_step(), forecast=1))
    full = generate_latents(pipe, steps=steps)
    assert handle.last_run.full_passes == steps
    handle.remove()
    assert torch.equal(full, stock)
    assert torch.equal(generate_latents(pipe, steps=steps), stock)


@pytest.mark.parametrize("forecast", [0, 1])
@pytest.mark.parametrize(
    ("sampler", "keys"),
    [
        ("DPM-Solver-20", KeySteps.uniform(3)),
        ("DDIM-50", KeySteps.uniform(4)),
        ("DPM-Solver-20", KeySteps.explicit([0, 1, 2, 4, 8, 13])),
    ],
)
def test_branch_zero_equals_the_reference(make_pipe, sampler, keys, forecast):
    steps = 20 if sampler.startswith("DPM") else 12
    pipe = make_pipe(sampler, dtype=torch.float64)
    full_steps = keys.resolve(steps).indices
    reference = BranchZeroReference(pipe.unet, full_steps, forecast)
    try:
        expected = generate_latents(pipe, steps=steps)
    finally:
        reference.remove()
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys, forecast=forecast))
    actual = generate_latents(pipe, steps=steps)
    stats = handle.last_run
    handle.remove()
    assert (stats.full_passes, stats.partial_passes) == (len(full_steps), steps - len(full_steps))
    assert_equal_up_to_rounding(actual, expected)
    stock = generate_latents(pipe, steps=steps)
    assert (actual - stock).abs().max() > 1e-3  # the partial steps did change something


@pytest.mark.parametrize("cutoff_step", [5, 6])  # guidance off from step 6 (a full step) or 7 (a partial one)
def test_guidance_switched_off_part_way_equals_the_reference(make_pipe, cutoff_step):
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = make_pipe("DDIM-50", dtype=torch.float64)
    keys, steps = KeySteps.uniform(3), 12

    def cutoff():
        return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff_step)

    reference = BranchZeroReference(pipe.unet, keys.resolve(steps).indices, forecast=1)
    try:
        expected = generate_latents(pipe, steps=steps, callback_on_step_end=cutoff())
    finally:
        reference.remove()
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys, forecast=1))
    actual = generate_latents(pipe, steps=steps, callback_on_step_end=cutoff())
    handle.remove()
    assert_equal_up_to_rounding(actual, expected)


def test_forecast_changes_the_result_only_after_the_second_full_step(make_pipe):
    pipe = make_pipe("DPM-Solver-20", dtype=torch.float64)
    # Full steps 0 and 10: steps 1-9 have one full step behind them (copied either way); 11-19 are forecast.
    keys = KeySteps.explicit([0, 10])
    results = {}
    for forecast in (0, 1):
        handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys, forecast=forecast))
        results[forecast] = generate_latents(pipe, steps=20)
        handle.remove()
    assert (results[0] - results[1]).abs().max() > 1e-6
    # With a single full step there is nothing to extrapolate from: forecast 1 copies.
    for forecast in (0, 1):
        handle = apply_faster_diffusion(
            pipe, DeepReuseConfig(key_steps=KeySteps.explicit([0]), forecast=forecast)
        )
        results[forecast] = generate_latents(pipe, steps=20)
        handle.remove()
    assert torch.equal(results[0], results[1])


def test_noise_injection_works_in_deep_mode(make_pipe):
    pipe = make_pipe("DDIM-50")
    noise = NoiseInjection(enabled=True, alpha=0.05)
    handle = apply_faster_diffusion(
        pipe, FasterDiffusionConfig(key_steps=KeySteps.every_step(), noise_injection=noise)
    )
    encoder_mode = generate_latents(pipe, steps=20)
    handle.remove()
    handle = apply_faster_diffusion(
        pipe, DeepReuseConfig(key_steps=KeySteps.every_step(), noise_injection=noise)
    )
    deep_mode = generate_latents(pipe, steps=20)
    injected = handle.last_run.injected_steps
    handle.remove()
    assert injected > 0
    assert torch.equal(deep_mode, encoder_mode)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.every_step()))
    assert handle.config.noise_injection.enabled is False
    assert not torch.equal(generate_latents(pipe, steps=20), deep_mode)
    assert handle.last_run.injected_steps == 0
    handle.remove()


def test_state_is_dropped_after_a_run_and_remove_restores_stock(make_pipe):
    pipe = make_pipe("DPM-Solver-20")
    stock = generate_latents(pipe, steps=20)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(forecast=1))
    generate_latents(pipe, steps=20)
    state = handle._state
    assert state.cache == {} and state.previous_cache == {} and state.predictions == {}
    assert get_faster_diffusion(pipe) is handle
    handle.remove()
    assert get_faster_diffusion(pipe) is None
    assert torch.equal(generate_latents(pipe, steps=20), stock)


def test_every_branch_of_an_sd_shaped_unet_runs(make_pipe):
    pipe = make_pipe("DPM-Solver-20", unet_kwargs=SD_SHAPED_UNET)
    unet = pipe.unet
    assert branch_count(unet) == 12  # 4 up blocks of 3 layers, as SD v1.5
    stock = generate_latents(pipe, steps=20, height=24, width=40)
    errors = []
    for branch in range(12):
        modules = deep_modules(unet, branch)
        assert unet.conv_in not in modules and unet.mid_block in modules
        handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.uniform(3), branch=branch))
        latents = generate_latents(pipe, steps=20, height=24, width=40)
        handle.remove()
        assert torch.isfinite(latents).all()
        errors.append(float((latents - stock).norm() / stock.norm()))
    # A deeper branch runs more of the UNet at a partial step: the shallowest is the furthest from stock.
    assert errors[0] == max(errors) and errors[-1] < errors[0]
    # The deepest branch reuses only the mid block.
    assert deep_modules(unet, 11) == [unet.mid_block]


def test_the_branch_must_fit_the_unet(make_pipe):
    pipe = make_pipe("DDIM-50")
    count = branch_count(pipe.unet)
    with pytest.raises(ValueError, match=f"branch must be a whole number from 0 to {count - 1}"):
        apply_faster_diffusion(pipe, DeepReuseConfig(branch=count))
    assert get_faster_diffusion(pipe) is None
    assert apply_faster_diffusion(pipe, DeepReuseConfig(branch=count - 1)).remove() is None


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"branch": -1}, ValueError, "branch must be a whole number >= 0"),
        ({"branch": True}, ValueError, "branch must be a whole number"),
        ({"branch": 1.0}, ValueError, "branch must be a whole number"),
        ({"forecast": 2}, ValueError, "forecast must be 0"),
        ({"forecast": True}, ValueError, "forecast must be 0"),
        ({"key_steps": "uniform:3"}, TypeError, "key_steps must be a KeySteps value"),
        ({"noise_injection": True}, TypeError, "noise_injection must be a NoiseInjection value"),
    ],
)
def test_bad_settings_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DeepReuseConfig(**kwargs)


def test_encoder_forecast_is_checked():
    with pytest.raises(ValueError, match="forecast must be 0"):
        FasterDiffusionConfig(forecast=3)


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"])
def test_encoder_forecast_batched_equals_one_step_at_a_time(make_pipe, sampler):
    pipe = make_pipe(sampler, dtype=torch.float64)
    steps = 20
    results = {}
    for parallel in (True, False):
        config = FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=parallel, forecast=1)
        handle = apply_faster_diffusion(pipe, config)
        results[parallel] = generate_latents(pipe, steps=steps)
        handle.remove()
    assert_equal_up_to_rounding(results[True], results[False])
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig(key_steps=KeySteps.paper(), forecast=0))
    copied = generate_latents(pipe, steps=steps)
    handle.remove()
    assert (copied - results[True]).abs().max() > 1e-6


def test_deep_mode_on_image_to_image(make_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = make_pipe("DDIM-50")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    image = torch.rand(1, 3, 16, 16)

    def run():
        with torch.inference_mode():
            return img2img(
                "a red circle",
                image=image,
                strength=0.6,
                num_inference_steps=20,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images

    stock = run()
    handle = apply_faster_diffusion(img2img, DeepReuseConfig(key_steps=KeySteps.every_step()))
    assert torch.equal(run(), stock)
    handle.remove()
    handle = apply_faster_diffusion(img2img, DeepReuseConfig(key_steps=KeySteps.uniform(3)))
    partial = run()
    stats = handle.last_run
    handle.remove()
    assert stats.full_passes + stats.partial_passes == 12 and stats.partial_passes > 0  # 12 steps run (8-19)
    assert not torch.equal(partial, stock)


@pytest.mark.parametrize("sampler", ["DDIM-50", "DPM-Solver-20"])
def test_batched_every_step_full_gives_stock_bit_for_bit(make_pipe, sampler):
    pipe = make_pipe(sampler)
    stock = generate_latents(pipe, steps=20)
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=KeySteps.every_step(), batched=True))
    full = generate_latents(pipe, steps=20)
    assert handle.last_run.full_passes == 20 and handle.last_run.unet_batches == 20
    handle.remove()
    assert torch.equal(full, stock)


@pytest.mark.parametrize("forecast", [0, 1])
@pytest.mark.parametrize(
    ("sampler", "keys"),
    [
        ("DPM-Solver-20", KeySteps.uniform(3)),
        ("DDIM-50", KeySteps.uniform(4)),
        ("DPM-Solver-20", KeySteps.explicit([0, 1, 2, 4, 8, 13])),
    ],
)
def test_batched_equals_the_reference_and_one_step_at_a_time(make_pipe, sampler, keys, forecast):
    steps = 20 if sampler.startswith("DPM") else 12
    pipe = make_pipe(sampler, dtype=torch.float64)
    full_steps = keys.resolve(steps).indices
    reference = BranchZeroReference(pipe.unet, full_steps, forecast, batched=True)
    try:
        expected = generate_latents(pipe, steps=steps)
    finally:
        reference.remove()
    results, batches = {}, {}
    for cap in ("auto", None, 1):
        config = DeepReuseConfig(key_steps=keys, forecast=forecast, batched=True, max_decoder_batch=cap)
        handle = apply_faster_diffusion(pipe, config)
        results[cap] = generate_latents(pipe, steps=steps)
        stats = handle.last_run
        handle.remove()
        assert (stats.full_passes, stats.partial_passes) == (len(full_steps), steps - len(full_steps))
        batches[cap] = stats.unet_batches
        assert_equal_up_to_rounding(results[cap], expected)
    # Whole groups: one UNet call per full step; a cap of 1 runs every step on its own.
    assert batches[None] == len(full_steps) and batches[1] == steps
    # Not the same as DeepCache's design, which shows a partial step its own latent.
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys, forecast=forecast))
    assert (generate_latents(pipe, steps=steps) - results[None]).abs().max() > 1e-6
    handle.remove()


def test_batched_with_guidance_switched_off_part_way_equals_the_reference(make_pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    pipe = make_pipe("DDIM-50", dtype=torch.float64)
    keys, steps = KeySteps.uniform(3), 12

    def cutoff():
        return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=7)

    reference = BranchZeroReference(pipe.unet, keys.resolve(steps).indices, batched=True)
    try:
        expected = generate_latents(pipe, steps=steps, callback_on_step_end=cutoff())
    finally:
        reference.remove()
    handle = apply_faster_diffusion(pipe, DeepReuseConfig(key_steps=keys, batched=True))
    actual = generate_latents(pipe, steps=steps, callback_on_step_end=cutoff())
    handle.remove()
    assert_equal_up_to_rounding(actual, expected)


def test_batched_modules_of_every_branch(make_pipe):
    from faster_diffusion.deep import batched_modules
    from faster_diffusion.measure import target_modules

    pipe = make_pipe("DPM-Solver-20", unet_kwargs=SD_SHAPED_UNET)
    unet = pipe.unet
    stock = generate_latents(pipe, steps=20, height=24, width=40)
    for branch in range(branch_count(unet)):
        modules = batched_modules(unet, branch)
        assert modules[0] is unet.conv_in and modules[-len(deep_modules(unet, branch)) :] == deep_modules(
            unet, branch
        )
        # No module is there with one of its own parts (its output would be served twice).
        for module in modules:
            assert not any(other is not module and other in list(module.modules()) for other in modules)
        assert target_modules(unet, f"deep-batched:{branch}") == modules
        config = DeepReuseConfig(key_steps=KeySteps.uniform(3), branch=branch, batched=True)
        assert config.calibration_target == f"deep-batched:{branch}" and config.parallel
        handle = apply_faster_diffusion(pipe, config)
        latents = generate_latents(pipe, steps=20, height=24, width=40)
        handle.remove()
        assert torch.isfinite(latents).all() and not torch.equal(latents, stock)
    assert torch.equal(generate_latents(pipe, steps=20, height=24, width=40), stock)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batched": 1}, TypeError, "batched must be true or false"),
        ({"batched": True, "max_decoder_batch": 0}, ValueError, "max_decoder_batch must be 'auto'"),
        ({"max_decoder_batch": "all"}, ValueError, "max_decoder_batch must be 'auto'"),
    ],
)
def test_batched_bad_settings_get_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DeepReuseConfig(**kwargs)
    assert DeepReuseConfig().decoder_batch_cap == 1 and not DeepReuseConfig().parallel
