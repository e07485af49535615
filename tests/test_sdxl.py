"""SDXL: encoder propagation on a stock ``StableDiffusionXLPipeline`` (tiny, random weights, on the CPU).

The tiny pipeline has SDXL's two text encoders, the ``text_time`` added embedding and transformer depth 2 in
its lowest-resolution block. SDXL's ``added_cond_kwargs`` reach the blocks only through the time embedding,
which every UNet call computes per row, so they are batched like the text embeddings.
"""

from __future__ import annotations

import pytest
import torch

from faster_diffusion import (
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    UnsupportedModelError,
    apply_faster_diffusion,
    get_calibration,
    use_sampler,
)
from faster_diffusion.support import check_supported_call, check_supported_unet
from fixtures.tiny import TINY_SDXL_UNET_CONFIG, build_tiny_sdxl_pipeline

from .conftest import assert_equal_up_to_rounding

PROMPTS = ["a red circle", "a small blue square"]
SAMPLERS = [("DDIM-50", 50), ("DPM-Solver-20", 20)]


def latents(config, sampler, steps, counter=None, dtype=torch.float32):
    pipe = build_tiny_sdxl_pipeline(dtype=dtype)
    use_sampler(pipe, sampler)
    handle = apply_faster_diffusion(pipe, config) if config is not None else None
    hooks = []
    if counter is not None:
        hooks = [
            pipe.unet.down_blocks[0]
            .resnets[0]
            .register_forward_hook(lambda m, a, o: counter.__setitem__("encoder", counter["encoder"] + 1)),
            pipe.unet.up_blocks[-1]
            .resnets[0]
            .register_forward_hook(
                lambda m, a, o: counter.__setitem__("decoder_rows", counter["decoder_rows"] + o.shape[0])
            ),
        ]
    out = pipe(
        PROMPTS,
        num_inference_steps=steps,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    for hook in hooks:
        hook.remove()
    stats = handle.last_run if handle is not None else None
    if handle is not None:
        handle.remove()
    return out, stats


@pytest.mark.parametrize(("sampler", "steps"), SAMPLERS)
def test_all_key_steps_equal_the_stock_sdxl_pipeline(sampler, steps):
    stock, _ = latents(None, sampler, steps)
    every = FasterDiffusionConfig(
        key_steps=KeySteps.every_step(), noise_injection=NoiseInjection(enabled=False)
    )
    identity, _ = latents(every, sampler, steps)
    assert torch.equal(identity, stock)


@pytest.mark.parametrize(("sampler", "steps"), SAMPLERS)
def test_parallel_equals_sequential_on_sdxl_and_the_encoder_runs_once_per_key_step(sampler, steps):
    one_step = FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False)
    sequential, _ = latents(one_step, sampler, steps, dtype=torch.float64)
    counter = {"encoder": 0, "decoder_rows": 0}
    whole = FasterDiffusionConfig(key_steps=KeySteps.paper())
    parallel, stats = latents(whole, sampler, steps, counter, dtype=torch.float64)
    assert_equal_up_to_rounding(parallel, sequential)
    keys = len(KeySteps.paper().resolve(steps).indices)
    assert (stats.full_passes, stats.partial_passes) == (keys, steps - keys)
    # 2 prompts with guidance: 4 rows a step.
    assert (counter["encoder"], counter["decoder_rows"]) == (keys, 4 * steps)
    assert stats.unet_batches < steps


def test_other_added_conditioning_is_still_refused():
    image_embeds = {"image_embeds": [torch.zeros(1, 4)]}
    pipe = build_tiny_sdxl_pipeline()
    refused = r"added_cond_kwargs \['image_embeds'\] are not supported with deep reuse .*IP-Adapter"
    with pytest.raises(UnsupportedModelError, match=refused):
        check_supported_call(pipe.unet, {"added_cond_kwargs": image_embeds}, "deep reuse")
    from diffusers import UNet2DConditionModel

    image_unet = UNet2DConditionModel(**{**TINY_SDXL_UNET_CONFIG, "addition_embed_type": "text"})
    with pytest.raises(UnsupportedModelError, match="addition_embed_type='text'"):
        check_supported_unet(image_unet, "deep reuse")


def test_key_steps_can_be_calibrated_on_sdxl():
    pipe = build_tiny_sdxl_pipeline()
    use_sampler(pipe, "DPM-Solver-20")
    calibration = get_calibration(
        pipe, num_inference_steps=8, prompts=PROMPTS, criteria=("prediction",), save=False
    )
    assert calibration.matrix.shape == (8, 8)
    assert (calibration.matrix[0, 1:] > 0).all()
    assert len(calibration.indices(3)) == 3


@pytest.mark.parametrize("cutoff_step", [7, 40], ids=["middle-of-a-group", "middle-of-the-last-group"])
def test_sdxl_guidance_cutoff_inside_a_group_equals_one_step_at_a_time(cutoff_step):
    """diffusers' SDXLCFGCutoffCallback also cuts the added text embeddings and time ids to their conditional
    half; the batched decoder decodes the rest of the group again with them, as one step at a time does, and
    with every step a key step the result is the stock pipeline's."""
    from diffusers.callbacks import SDXLCFGCutoffCallback

    def run(config, dtype=torch.float32):
        pipe = build_tiny_sdxl_pipeline(dtype=dtype)
        use_sampler(pipe, "DDIM-50")
        handle = apply_faster_diffusion(pipe, config) if config is not None else None
        out = pipe(
            PROMPTS[0],
            num_inference_steps=50,
            height=16,
            width=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff_step),
        ).images
        if handle is not None:
            handle.remove()
        return out

    every = FasterDiffusionConfig(
        key_steps=KeySteps.every_step(), noise_injection=NoiseInjection(enabled=False)
    )
    assert torch.equal(run(every), run(None))
    batched = run(FasterDiffusionConfig(key_steps=KeySteps.paper()), torch.float64)
    one_at_a_time = run(FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False), torch.float64)
    assert batched.shape == (1, 4, 8, 8)
    assert_equal_up_to_rounding(batched, one_at_a_time)


def test_the_generation_layer_runs_an_sdxl_pipeline():
    """generate() (the CLI's and the Cog model's layer) on SDXL, whose output has no NSFW flags."""
    from faster_diffusion.app.generate import GenerationRequest, faster_config, generate

    pipe = build_tiny_sdxl_pipeline()
    request = GenerationRequest(
        prompt=PROMPTS[0], sampler="DPM-Solver-20", width=16, height=16, faster=faster_config("paper")
    )
    faster = generate(pipe, request)
    stock = generate(pipe, request, accelerate=False)
    assert faster.nsfw == stock.nsfw == [False]
    assert (faster.stats.full_passes, faster.stats.partial_passes) == (7, 13)
    assert faster.images[0].size == stock.images[0].size == (16, 16)


def sdxl_latents(config, sampler, dtype=torch.float32, **call):
    """Final latents of the tiny SDXL pipeline for one prompt, with ``config`` attached (``None``: stock)."""
    pipe = build_tiny_sdxl_pipeline(dtype=dtype)
    use_sampler(pipe, sampler)
    handle = apply_faster_diffusion(pipe, config) if config is not None else None
    with torch.inference_mode():
        out = pipe(
            PROMPTS[0],
            height=16,
            width=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **call,
        ).images
    return out, handle.last_run if handle is not None else None


@pytest.mark.parametrize(("sampler", "steps"), SAMPLERS)
def test_denoising_end_with_two_images_per_prompt(sampler, steps):
    call = dict(num_inference_steps=steps, denoising_end=0.6, num_images_per_prompt=2)
    stock, _ = sdxl_latents(None, sampler, **call)
    every = FasterDiffusionConfig(
        key_steps=KeySteps.every_step(), noise_injection=NoiseInjection(enabled=False)
    )
    identity, _ = sdxl_latents(every, sampler, **call)
    assert torch.equal(identity, stock)
    sequential, _ = sdxl_latents(
        FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False), sampler, torch.float64, **call
    )
    whole = FasterDiffusionConfig(key_steps=KeySteps.paper())
    parallel, stats = sdxl_latents(whole, sampler, torch.float64, **call)
    assert_equal_up_to_rounding(parallel, sequential)
    assert parallel.shape == (2, 4, 8, 8)
    ran = stats.steps
    assert 0 < ran < steps and stats.full_passes + stats.partial_passes == ran
    assert stats.schedule.indices == tuple(i for i in KeySteps.paper().resolve(steps).indices if i < ran)


def load_tiny_ip_adapter(unet, image_embed_dim: int = 16) -> None:
    """Load a random IP-Adapter (diffusers' original format: image projection and per-layer to_k_ip/to_v_ip)
    into ``unet``, as ``pipe.load_ip_adapter`` does with downloaded weights."""
    generator = torch.Generator().manual_seed(1)
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.weight": torch.randn(4 * cross, image_embed_dim, generator=generator),
        "proj.bias": torch.zeros(4 * cross),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    ip_adapter = {}
    key = 1
    for name in unet.attn_processors:
        if not name.endswith("attn2.processor"):
            continue
        level = int(name.split(".")[1]) if not name.startswith("mid_block") else -1
        channels = unet.config.block_out_channels
        width = list(reversed(channels))[level] if name.startswith("up_blocks") else channels[level]
        ip_adapter[f"{key}.to_k_ip.weight"] = torch.randn(width, cross, generator=generator)
        ip_adapter[f"{key}.to_v_ip.weight"] = torch.randn(width, cross, generator=generator)
        key += 2
    unet._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_adapter}])


@pytest.mark.parametrize("loaded", ["before-apply", "after-apply"])
def test_an_ip_adapter_is_refused_by_name(loaded):
    """An IP-Adapter's image tokens are refused with an error that names IP-Adapter and says what to do,
    whether it was loaded before faster diffusion was attached or after."""
    pipe = build_tiny_sdxl_pipeline()
    use_sampler(pipe, "DDIM-50")
    message = r"IP-Adapter is not supported with encoder propagation.*pipe\.unload_ip_adapter\(\)"
    if loaded == "before-apply":
        load_tiny_ip_adapter(pipe.unet)
        with pytest.raises(UnsupportedModelError, match=message):
            apply_faster_diffusion(pipe, FasterDiffusionConfig())
        return
    handle = apply_faster_diffusion(pipe, FasterDiffusionConfig())
    load_tiny_ip_adapter(pipe.unet)
    with pytest.raises(UnsupportedModelError, match=message), torch.inference_mode():
        pipe(
            PROMPTS[0],
            num_inference_steps=4,
            height=16,
            width=16,
            output_type="latent",
            ip_adapter_image_embeds=[torch.randn(2, 1, 16)],
        )
    assert not handle._state.active
