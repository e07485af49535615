"""A hand-written reference of the paper's sampling loop, over the two halves of a diffusers UNet.

It follows METHOD.md step by step and shares no code with the package: the package attaches hooks to the
stock pipeline, this calls the UNet's submodules directly. Only the SD 1.x/2.x features the tiny test models
use are covered (no class embeddings, no attention masks, no adapters).
"""

from __future__ import annotations

import torch


def time_embedding(unet, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    return unet.time_embedding(t_emb)


def encoder(unet, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
    """conv_in, down blocks and mid block: returns (skip features, mid-block output)."""
    emb = time_embedding(unet, sample, timestep)
    hidden = unet.conv_in(sample)
    skips = (hidden,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=text)
        else:
            hidden, residuals = block(hidden_states=hidden, temb=emb)
        skips += residuals
    hidden = unet.mid_block(hidden, emb, encoder_hidden_states=text)
    return skips, hidden


def decoder(unet, skips, mid: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Up blocks and output layers, on given encoder features, with ``timestep``'s embedding."""
    emb = time_embedding(unet, mid, timestep)
    factor = 2**unet.num_upsamplers
    needs_size = any(dim % factor for dim in skips[0].shape[-2:])
    hidden = mid
    for index, block in enumerate(unet.up_blocks):
        residuals = skips[-len(block.resnets) :]
        skips = skips[: -len(block.resnets)]
        size = skips[-1].shape[2:] if needs_size and index < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            hidden = block(
                hidden_states=hidden,
                temb=emb,
                res_hidden_states_tuple=residuals,
                encoder_hidden_states=text,
                upsample_size=size,
            )
        else:
            hidden = block(
                hidden_states=hidden, temb=emb, res_hidden_states_tuple=residuals, upsample_size=size
            )
    hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)


@torch.inference_mode()
def reference_latents(
    pipe,
    prompt: str,
    *,
    num_steps: int,
    key_steps: tuple[int, ...],
    alpha: float,
    tau: float,
    guidance_scale: float,
    seed: int,
    height: int,
    width: int,
    negative_prompt: str | None = None,
    start: int = 0,
    latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final latents of encoder propagation with prior noise injection, as METHOD.md defines them.

    Image-to-image: ``start`` is the first step that runs and ``latents`` the latents there (the noised input
    image); ``key_steps`` are indices into the whole schedule of ``num_steps`` steps.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    positive, negative = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt)
    text = torch.cat([negative, positive])
    scheduler.set_timesteps(num_steps, device="cpu")
    if start and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if latents is None:
        generator = torch.Generator().manual_seed(seed)
        latents = pipe.prepare_latents(
            1, unet.config.in_channels, height, width, text.dtype, torch.device("cpu"), generator, None
        )
    initial = latents
    features = None
    for index, t in enumerate(scheduler.timesteps):
        if index < start:
            continue
        if index in key_steps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            features = encoder(unet, model_input, t, text)
        skips, mid = features
        noise = decoder(unet, skips, mid, t, text)
        uncond, cond = noise.chunk(2)
        noise = uncond + guidance_scale * (cond - uncond)
        if t < tau:
            latents = latents + alpha * initial
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents
