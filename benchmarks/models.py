"""Stable Diffusion v1.5 and SDXL base 1.0 as published, with random weights, for the benchmarks.

The architectures (UNet, VAE, CLIP text encoders, scheduler configs) are the published ones; the weights are
random, since they do not change the cost of a forward pass. :func:`build_sd15_pipeline` and
:func:`build_sdxl_pipeline` build them, fp32 on CPU, in a few seconds (SDXL: about 14 GB). Used by
``benchmarks/speed.py`` (and through it ``benchmarks/gpu_check.py``), ``benchmarks/calibration_cost.py`` and
the tests of the memory model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from faster_diffusion.reference.components import SD15_SCHEDULER_CONFIG
from fixtures.tiny import build_tiny_tokenizer

__all__ = [
    "SD15_TEXT_ENCODER_CONFIG",
    "SD15_UNET_CONFIG",
    "SD15_VAE_CONFIG",
    "SDXL_SCHEDULER_CONFIG",
    "SDXL_TEXT_ENCODER_2_CONFIG",
    "SDXL_TEXT_ENCODER_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "build_sd15_pipeline",
    "build_sdxl_pipeline",
]

# ------------------------------------------------------------------------------------------ SD v1.5 configs
# From the published config files of SD v1.5 (unet/config.json, vae/config.json, text_encoder/config.json,
# scheduler/scheduler_config.json of stable-diffusion-v1-5).

SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

SD15_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

#: CLIP ViT-L/14 text tower. The token ids are set from the tokenizer (see ``build_sd15_pipeline``).
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

# ------------------------------------------------------------------------------------------ SDXL configs
# From the published config files of SDXL base 1.0 (unet/config.json, vae/config.json,
# text_encoder/config.json, text_encoder_2/config.json, scheduler/scheduler_config.json of
# stabilityai/stable-diffusion-xl-base-1.0), as transcribed with those URLs in huggingface/candle
# (candle-transformers/src/models/stable_diffusion/mod.rs and clip.rs). They agree with the original network
# config, Stability-AI/generative-models configs/inference/sd_xl_base.yaml (adm_in_channels 2816,
# transformer_depth [1, 2, 10], context_dim 2048, 256 channels per size/crop embedding (outdim),
# 64 channels per head). Entries left at diffusers' defaults are not repeated.

SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

SDXL_VAE_CONFIG: dict[str, Any] = {
    **SD15_VAE_CONFIG,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

#: SDXL's first text encoder is the same CLIP ViT-L/14 text tower as SD v1.5's.
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = dict(SD15_TEXT_ENCODER_CONFIG)

#: OpenCLIP ViT-bigG/14 text tower, with its projection (``CLIPTextModelWithProjection``).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

#: SDXL's published scheduler config (``EulerDiscreteScheduler``). The benchmark's samplers are built from it
#: with ``from_config``, as from a real SDXL pipeline's.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


# ------------------------------------------------------------------------------------------ model building


def _random_init_(model: torch.nn.Module, seed: int) -> None:
    """Seeded random values like PyTorch's default init, in place: weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    1-D weights (norm scales) 1, biases 0. Only the cost of the forward pass matters here, not the values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                bound = 1.0 / math.sqrt(param[0].numel())
                param.uniform_(-bound, bound, generator=generator)


def _build_random(factory: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """``factory()`` with its parameters allocated uninitialised and filled by :func:`_random_init_`.

    The model is built with its parameters on the meta device (buffers real, e.g. CLIP's position ids), so
    the stock init (kaiming etc.) is skipped: it took ~14 s for the UNet here, this takes ~7 s, most of it
    the first touch of 3.4 GB of fresh memory.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = factory()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    _random_init_(model, seed)
    return model.eval().requires_grad_(False)


def build_sd15_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """SD v1.5's architecture and scheduler config with random weights, fp32 on CPU, no safety checker.

    The tokenizer is a CLIP BPE tokenizer over a small vocabulary (the real CLIP vocabulary is not available
    offline). The pipeline always pads prompts to 77 tokens, so the text encoder's cost is the real one.
    """
    tokenizer = build_tiny_tokenizer()
    text_config = CLIPTextConfig(
        **SD15_TEXT_ENCODER_CONFIG,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=_build_random(lambda: AutoencoderKL(**SD15_VAE_CONFIG), seed),
        text_encoder=_build_random(lambda: CLIPTextModel(text_config), seed + 1),
        tokenizer=tokenizer,
        unet=_build_random(lambda: UNet2DConditionModel(**SD15_UNET_CONFIG), seed + 2),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_config(config: dict[str, Any], tokenizer: Any) -> CLIPTextConfig:
    """``config`` with the tokenizer's special token ids (its vocabulary is far smaller than CLIP's)."""
    return CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL base 1.0's architecture and scheduler config with random weights, fp32 on CPU, no watermarker.

    Both text encoders share the small CLIP BPE tokenizer of :func:`build_sd15_pipeline` (its ids all lie
    within CLIP's 49408-entry vocabulary); prompts are padded to 77 tokens, so both encoders cost what they
    cost in real use. About 3.5 billion parameters, 14 GB in fp32, 10 GB of it the UNet.
    """
    tokenizer = build_tiny_tokenizer()
    for config in (SDXL_TEXT_ENCODER_CONFIG, SDXL_TEXT_ENCODER_2_CONFIG):
        if len(tokenizer) > config["vocab_size"]:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens, more than the encoder's {config['vocab_size']}"
            )
    pipe = StableDiffusionXLPipeline(
        vae=_build_random(lambda: AutoencoderKL(**SDXL_VAE_CONFIG), seed),
        text_encoder=_build_random(
            lambda: CLIPTextModel(_text_config(SDXL_TEXT_ENCODER_CONFIG, tokenizer)), seed + 1
        ),
        text_encoder_2=_build_random(
            lambda: CLIPTextModelWithProjection(_text_config(SDXL_TEXT_ENCODER_2_CONFIG, tokenizer)), seed + 3
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_build_random(lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG), seed + 2),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
