"""Tiny, SD-shaped Stable Diffusion pipelines with random weights.

Everything here is built offline and deterministically from a seed in a fraction of a second on CPU.
The components have the same classes and wiring as Stable Diffusion 1.x (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, ``CLIPTokenizer``, SD v1.5's ``PNDMScheduler`` config and optionally
``StableDiffusionSafetyChecker``), only much smaller. Used by the test-suite and as a demo model when real
weights are absent. The images they produce are noise, but every code path of a real pipeline runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.utils import is_torchvision_available

__all__ = [
    "SD15_SCHEDULER_CONFIG",
    "SD_SHAPED_UNET",
    "TINY_PROMPT_WORDS",
    "TINY_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "build_clip_tokenizer",
    "build_tiny_components",
    "build_tiny_pipeline",
    "build_tiny_tokenizer",
    "make_safety_checker_flag_everything",
    "save_tiny_weights",
    "write_vocab_files",
]

#: Words that the tiny tokenizer encodes as a single token each. Anything else still tokenizes, via
#: byte-level single-character tokens (exactly like the real CLIP tokenizer does for rare words).
TINY_PROMPT_WORDS: tuple[str, ...] = (
    # articles, prepositions, conjunctions
    "a", "an", "the", "of", "on", "in", "and", "with", "at", "by", "to", "is",
    "above", "below", "under", "next", "left", "right",
    # colours
    "red", "green", "blue", "yellow", "white", "black", "orange", "purple", "pink", "gray",
    # sizes and shapes
    "small", "large", "big", "tiny", "huge", "circle", "square", "triangle", "star", "heart",
    # subjects
    "photo", "cat", "dog", "astronaut", "horse", "riding", "man", "woman", "bird", "tree", "house", "car",
    "castle", "flower", "portrait",
    # scenes
    "landscape", "mountain", "lake", "sunset", "city", "night", "forest", "beach", "sky", "sea", "river",
    "snow", "moon", "sun", "space", "street",
    # style and quality (also typical negative-prompt words)
    "painting", "oil", "watercolor", "sketch", "digital", "art", "style", "high", "quality", "detailed",
    "beautiful", "cute", "old", "low", "bad", "blurry", "ugly",
)  # fmt: skip

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's unk and pad token
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

#: Tiny SD-1.x-like UNet: two resolutions, cross-attention in the outer one, 8 heads (SD's
#: ``attention_head_dim=8`` means 8 heads), 8x8 latents (16x16 images with the tiny VAE).
TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

#: ``unet_kwargs`` for a tiny UNet with SD's four resolutions (three down-samplings), so 24 x 40 px images
#: give latents of 12 x 20 that are not a multiple of 8: the UNet then passes explicit up-sampling sizes, as
#: SD does at 8-px sizes that are not multiples of 64. Used by the tests and the GPU check.
SD_SHAPED_UNET: dict[str, Any] = {
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 32, 64, 64),
}


#: Tiny SD-like VAE: two resolutions, so ``vae_scale_factor == 2``.
TINY_VAE_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

#: The scheduler config shipped with Stable Diffusion v1.5. ``clip_sample`` is not a PNDM argument, but
#: ``from_config`` keeps it in the config so that e.g. ``DDIMScheduler.from_config`` inherits it, as with SD.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

_TEXT_HIDDEN_SIZE = 32  # == TINY_UNET_CONFIG["cross_attention_dim"]
_SAFE_THRESHOLD = 2.0  # cosine similarity <= 1, so nothing can exceed this threshold
_FLAG_ALL_THRESHOLD = -2.0  # cosine similarity >= -1, so everything exceeds this threshold


# --------------------------------------------------------------------------------------------- tokenizer


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> tuple[str, ...]:
    """The 256 printable stand-ins for bytes used by CLIP/GPT-2 byte-level BPE, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges like ``tokenizers`` does: repeatedly merge the lowest-ranked (then leftmost) pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        candidates = [(ranks[pair], i) for i, pair in enumerate(itertools.pairwise(symbols)) if pair in ranks]
        if not candidates:
            break
        _, i = min(candidates)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Build a CLIP-style vocabulary and merge list in which every entry of ``words`` is one token.

    Layout mirrors the real CLIP vocabulary: 256 byte symbols, the same with ``</w>``, one token per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>``. The end-of-word marker is always attached to a
    character token (``"d</w>"``), never merged on its own. Merges are added word by word and always
    appended after the existing ones: each word is first segmented with the merges so far and then its
    segments are chained left to right. Appended merges only fire once all earlier ones are exhausted, so
    words handled earlier keep encoding to a single token.
    """
    base = _bytes_to_unicode()
    tokens = list(base) + [c + END_OF_WORD for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        segments = _bpe([*word[:-1], word[-1] + END_OF_WORD], ranks)
        left = segments[0]
        for right in segments[1:]:
            pair = (left, right)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
                tokens.append(left + right)
            left += right
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def build_clip_tokenizer(words: tuple[str, ...], model_max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every entry of ``words`` is a single token.

    Any other text falls back to byte-level character tokens, so nothing ever fails to tokenize.
    """
    vocab, merges = _vocab_and_merges(tuple(words))
    # transformers 5's CLIPTokenizer is backed by `tokenizers`; its BPE takes merges as (left, right)
    # tuples (a list of "left right" strings is rejected).
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer (``model_max_length=77``); each ``TINY_PROMPT_WORDS`` entry is one token."""
    return build_clip_tokenizer(TINY_PROMPT_WORDS)


def write_vocab_files(folder: str | os.PathLike, words: tuple[str, ...] = TINY_PROMPT_WORDS) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (as shipped with real SD weights) into ``folder``."""
    folder = Path(folder)
    vocab, merges = _vocab_and_merges(tuple(words))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- components


def _tiny_text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN_SIZE,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=32,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_feature_extractor():
    # Without torchvision, transformers 5 maps CLIPImageProcessor to CLIPImageProcessorPil (with a warning).
    if is_torchvision_available():
        from transformers import CLIPImageProcessor as processor_cls
    else:
        from transformers import CLIPImageProcessorPil as processor_cls
    return processor_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _tiny_safety_checker(tokenizer: CLIPTokenizer) -> StableDiffusionSafetyChecker:
    vision_config = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 32,
        "patch_size": 4,
        "projection_dim": 32,
    }
    config = CLIPConfig(
        text_config=_tiny_text_config(tokenizer).to_dict(), vision_config=vision_config, projection_dim=32
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        # Stock init leaves all concept embeddings equal to ones; make them distinct random directions.
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(_SAFE_THRESHOLD)
        checker.special_care_embeds_weights.fill_(_SAFE_THRESHOLD)
    return checker


def make_safety_checker_flag_everything(safety_checker: StableDiffusionSafetyChecker) -> None:
    """Lower all concept thresholds (in place) so that the checker flags every image as NSFW."""
    with torch.no_grad():
        safety_checker.concept_embeds_weights.fill_(_FLAG_ALL_THRESHOLD)
        safety_checker.special_care_embeds_weights.fill_(_FLAG_ALL_THRESHOLD)


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` (in place) with its floating-point weights and buffers cast to ``dtype``.

    The models are always initialised in float32, so every dtype holds the same weights (float32 to float64 is
    exact). torch's own ``Module.to`` casts them: diffusers' ``ModelMixin.to`` would warn about modules to be
    kept in float32, of which these models have none.
    """
    if dtype != torch.float32:
        torch.nn.Module.to(module, dtype=dtype)
    return module


def build_tiny_components(
    seed: int = 0,
    *,
    with_safety_checker: bool = False,
    unet_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Components for ``StableDiffusionPipeline(**components, requires_safety_checker=...)``.

    Weights are random but deterministic: every model is initialised right after ``torch.manual_seed(seed)``
    (inside ``torch.random.fork_rng``, so the caller's global RNG state is left untouched).
    ``unet_kwargs`` overrides entries of ``TINY_UNET_CONFIG``, e.g. to build unusual UNets in tests.
    ``dtype``: the models' dtype; the weights are float32's, cast (the tests compare in float64, where
    rounding is far below any difference they look for).
    """
    unet_config = {**TINY_UNET_CONFIG, **(unet_kwargs or {})}
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        safety_checker = feature_extractor = None
        if with_safety_checker:
            torch.manual_seed(seed)
            safety_checker = _tiny_safety_checker(tokenizer)
            feature_extractor = _tiny_feature_extractor()
    if safety_checker is not None:
        safety_checker = _in_dtype(safety_checker, dtype)
    return {
        "unet": _in_dtype(unet, dtype).eval(),
        "vae": _in_dtype(vae, dtype).eval(),
        "text_encoder": _in_dtype(text_encoder, dtype).eval(),
        "tokenizer": tokenizer,
        "scheduler": PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        "safety_checker": safety_checker,
        "feature_extractor": feature_extractor,
        "image_encoder": None,
    }


def build_tiny_pipeline(
    seed: int = 0,
    *,
    with_safety_checker: bool = False,
    unet_kwargs: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A CPU ``StableDiffusionPipeline`` (float32 unless ``dtype`` says otherwise) from
    :func:`build_tiny_components`, progress bar disabled."""
    components = build_tiny_components(
        seed, with_safety_checker=with_safety_checker, unet_kwargs=unet_kwargs, dtype=dtype
    )
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=with_safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_weights(folder: str | os.PathLike, seed: int = 0, *, with_safety_checker: bool = True) -> Path:
    """Save a tiny pipeline to ``folder`` in the diffusers layout of real SD weights (safetensors only).

    The result loads with ``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True,
    use_safetensors=True)``. Returns ``Path(folder)``.
    """
    folder = Path(folder)
    pipe = build_tiny_pipeline(seed, with_safety_checker=with_safety_checker)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Real SD checkpoints also ship the slow-tokenizer files; keep the layout identical.
    write_vocab_files(folder / "tokenizer")
    return folder


#: Tiny SDXL-like UNet: SDXL's ``text_time`` added embedding (pooled text embedding and six size/crop ids),
#: cross-attention on the concatenated hidden states of two text encoders, and transformer depth 2 in the
#: lowest-resolution block, as SDXL puts most of its transformer layers at its lowest resolutions.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "cross_attention_dim": 2 * _TEXT_HIDDEN_SIZE,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "transformer_layers_per_block": (1, 2),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    # the second text encoder's pooled projection (32) and six time ids of 8 each
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
    "norm_num_groups": 32,
}


def build_tiny_sdxl_pipeline(
    seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """A CPU ``StableDiffusionXLPipeline`` with random weights: two CLIP text encoders (the second with a
    projection, as SDXL's), the ``text_time`` UNet above and the tiny VAE; no watermarker. float32 unless
    ``dtype`` says otherwise (float32's weights, cast, as in :func:`build_tiny_components`)."""
    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG)
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer))
    pipe = StableDiffusionXLPipeline(
        vae=_in_dtype(vae, dtype).eval(),
        text_encoder=_in_dtype(text_encoder, dtype).eval(),
        text_encoder_2=_in_dtype(text_encoder_2, dtype).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_in_dtype(unet, dtype).eval(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
