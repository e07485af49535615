"""The reference model: a small trained text-to-image latent diffusion model of Stable Diffusion's family.

It was trained by ``training/train_reference.py`` on the captioned shapes of
:mod:`faster_diffusion.reference.shapes` and ships with the package
(``faster_diffusion/reference/assets/shapes-ldm``, a diffusers folder in safetensors), so the command line
renders real images offline when no Stable Diffusion weights are present. It is also what the quality
benchmark measures. Next to it is a small attribute classifier (shape, colour, size, position, background)
that scores prompt faithfulness and provides features for a Fréchet distance.

Beside the model: :mod:`.shapes`, the world it learned, and :mod:`.components`, the Stable Diffusion parts it
is built from (SD v1.5's scheduler config, a CLIP tokenizer over its vocabulary). The tiny SD-shaped pipelines
with random weights that the tests and benchmarks use are not part of the package: ``fixtures/tiny.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import shapes

__all__ = [
    "ASSETS_DIR",
    "CLASSIFIER_PATH",
    "EXAMPLE_PROMPT",
    "GUIDANCE_SCALE",
    "IMAGE_SIZE",
    "MODEL_DIR",
    "SD15_LAYOUT_GUIDANCE_SCALE",
    "SD15_LAYOUT_MODEL_DIR",
    "SD15_LAYOUT_UNET_CONFIG",
    "SD15_LAYOUT_VAE_CONFIG",
    "TEXT_MAX_LENGTH",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "AttributeClassifier",
    "attribute_accuracy",
    "build_tokenizer",
    "guidance_scale",
    "is_model_dir",
    "load_classifier",
    "text_encoder_config",
    "unknown_words",
]

#: Classifier-free guidance scale the command line uses for this model (chosen on prompts of training
#: combinations with stock DDIM-50, before any accelerated run was scored; see training/README.md).
GUIDANCE_SCALE = 5.0
#: A prompt the model knows, for examples and messages.
EXAMPLE_PROMPT = "a large red circle at the top left on a white background"

#: Calibration prompts for ``key_steps="auto"`` (:mod:`faster_diffusion.calibration`): 16 captions of
#: attribute combinations that training saw, so none is a held-out combination the quality benchmark
#: evaluates, with seeds (:data:`CALIBRATION_SEEDS`) far from the benchmark's 0-239.
CALIBRATION_PROMPTS: tuple[str, ...] = tuple(
    shapes.caption(shapes.sample_scene(rng)) for rng in [np.random.default_rng(31)] for _ in range(16)
)
CALIBRATION_SEEDS: tuple[int, ...] = tuple(90_000 + i for i in range(len(CALIBRATION_PROMPTS)))


def calibration_options(model_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """How a reference model (the first by default) is calibrated: the ``prompts``, ``seeds`` and
    ``guidance_scale`` arguments of :func:`faster_diffusion.calibration.get_calibration`."""
    guidance = GUIDANCE_SCALE if model_dir is None else guidance_scale(model_dir)
    return {"prompts": CALIBRATION_PROMPTS, "seeds": CALIBRATION_SEEDS, "guidance_scale": guidance}


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS_DIR / "shapes-ldm"
#: The second reference model, with Stable Diffusion v1.5's UNet layout (:data:`SD15_LAYOUT_UNET_CONFIG`):
#: the same world, text encoder and classifier, for judging methods whose behaviour depends on the layout
#: (how deep a feature cache reaches). In the repository for the benchmarks, not in the wheel.
SD15_LAYOUT_MODEL_DIR = ASSETS_DIR / "shapes-ldm-sd15"
#: Its guidance scale, chosen by the same procedure as :data:`GUIDANCE_SCALE` (training/README.md).
SD15_LAYOUT_GUIDANCE_SCALE = 3.0
CLASSIFIER_PATH = ASSETS_DIR / "shapes-classifier.safetensors"


#: The image size both reference models were trained at, in pixels a side (the size the shapes are drawn at).
#: At any other size they draw several shapes, or none, where one was asked.
IMAGE_SIZE = shapes.IMAGE_SIZE


def is_model_dir(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` is one of the two reference model folders."""
    if folder is None:
        return False
    return Path(folder).resolve() in (MODEL_DIR.resolve(), SD15_LAYOUT_MODEL_DIR.resolve())


def guidance_scale(model_dir: str | os.PathLike) -> float:
    """The guidance scale chosen for the reference model in ``model_dir`` (either of the two)."""
    folder = Path(model_dir).resolve()
    if folder == SD15_LAYOUT_MODEL_DIR.resolve():
        return SD15_LAYOUT_GUIDANCE_SCALE
    if folder == MODEL_DIR.resolve():
        return GUIDANCE_SCALE
    raise ValueError(f"{model_dir} is not a reference model folder ({MODEL_DIR} or {SD15_LAYOUT_MODEL_DIR})")


#: Captions are at most 13 words; with the start and end tokens 16 is enough, 20 leaves room.
TEXT_MAX_LENGTH = 20
TEXT_HIDDEN_SIZE = 64

#: Stable Diffusion's UNet layout scaled down: three resolutions (8x8, 4x4, 2x2 latents), cross-attention in
#: the two outer ones, a cross-attention mid block, ``attention_head_dim=8`` as in SD 1.x.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 64, 96),
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

#: Stable Diffusion's VAE layout scaled down: 32x32x3 images <-> 8x8x4 latents (``vae_scale_factor == 4``).
VAE_CONFIG: dict[str, Any] = {
    "sample_size": shapes.IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "norm_num_groups": 32,
}


#: Stable Diffusion v1.5's UNet layout scaled down: four resolutions (16x16, 8x8, 4x4, 2x2 latents),
#: cross-attention in the three outer ones and none in the innermost, a cross-attention mid block, two layers
#: per block (so an up block has three), ``attention_head_dim=8``, as in SD v1.5. Channels 32, 48, 64, 64 (SD
#: v1.5: 320, 640, 1280, 1280).
SD15_LAYOUT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (32, 48, 64, 64),
    "layers_per_block": 2,
    "cross_attention_dim": TEXT_HIDDEN_SIZE,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

#: The VAE of the SD v1.5-layout model: the same 32x32x3 images to 16x16x4 latents (``vae_scale_factor ==
#: 2``), so that its UNet sees latents of 16x16.
SD15_LAYOUT_VAE_CONFIG: dict[str, Any] = {
    **VAE_CONFIG,
    "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2,
    "block_out_channels": (32, 64),
}


def build_tokenizer():
    """The reference model's CLIP tokenizer: every word of :data:`shapes.VOCABULARY` is one token."""
    from .components import build_clip_tokenizer

    return build_clip_tokenizer(shapes.VOCABULARY, model_max_length=TEXT_MAX_LENGTH)


def text_encoder_config(tokenizer):
    """The ``CLIPTextConfig`` of the reference model's text encoder."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=4 * TEXT_HIDDEN_SIZE,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=TEXT_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN_SIZE,
        layer_norm_eps=1e-5,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _gaussian_kernel(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class AttributeClassifier(nn.Module):
    """A small CNN that reads a scene's five attributes off a 32x32 image in [-1, 1].

    Its first operation is a fixed Gaussian blur (sigma 1 px): it removes the faint high-frequency noise that
    an undertrained sampler leaves, which would otherwise be read as colour or shape. :meth:`features`
    returns the 64-dimensional penultimate activations used for the Fréchet distance.
    """

    FEATURE_DIM = 64

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("blur", _gaussian_kernel(1.0, 2), persistent=False)
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.GELU(),
            nn.Linear(128, self.FEATURE_DIM),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.FEATURE_DIM, len(values)) for name, values in shapes.ATTRIBUTES.items()}
        )

    def _blur(self, images: torch.Tensor) -> torch.Tensor:
        k = self.blur
        c = images.shape[1]
        padded = nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
        out = nn.functional.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
            raise ValueError(
                f"expected images of shape (N, 3, {shapes.IMAGE_SIZE}, {shapes.IMAGE_SIZE}), "
                f"got {tuple(images.shape)}"
            )
        return self.body(self._blur(images))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict` and :meth:`features` from one pass over ``images``."""
        features = self.features(images)
        labels = torch.stack([self.heads[name](features).argmax(dim=1) for name in shapes.ATTRIBUTES], dim=1)
        return labels, features

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class index of each attribute: (N, 5), columns in :data:`shapes.ATTRIBUTES` order."""
        return self.predict_with_features(images)[0]


def attribute_accuracy(predicted: Any, labels: Any) -> dict[str, float]:
    """How often ``predicted`` (N, 5) matches ``labels`` (N, 5): per attribute, and all five (``"all"``)."""
    correct = np.asarray(predicted) == np.asarray(labels)
    if correct.ndim != 2 or correct.shape[1] != len(shapes.ATTRIBUTES):
        raise ValueError(f"expected (N, {len(shapes.ATTRIBUTES)}) labels, got shape {correct.shape}")
    result = {name: float(correct[:, i].mean()) for i, name in enumerate(shapes.ATTRIBUTES)}
    result["all"] = float(correct.all(axis=1).mean())
    return result


def load_classifier(path: str | os.PathLike = CLASSIFIER_PATH) -> AttributeClassifier:
    """The trained attribute classifier, in eval mode on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"No attribute classifier at {path}; train it with `python training/train_reference.py "
            "--stage classifier`."
        )
    model = AttributeClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def unknown_words(prompt: str) -> list[str]:
    """The words of ``prompt`` that the reference model was never trained on, in order, without repeats."""
    known = set(shapes.VOCABULARY)
    return list(dict.fromkeys(w for w in prompt.lower().replace(",", " ").split() if w not in known))
