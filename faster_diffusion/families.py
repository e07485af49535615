"""The pipeline families served, one record each: everything that differs between Stable Diffusion 1.x/2.x and
SDXL is here, and nowhere else decides by family.

The method itself has no family branches: SDXL is "more per-row UNet inputs" (``added_cond_kwargs``, batched
like the text embeddings). What differs is around it: which diffusers pipeline classes a family uses
for text-to-image, image-to-image and inpainting, what its weights folder holds, and which variant is
refused (SDXL's refiner, which only refines the base model's images).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import diffusers


@dataclass(frozen=True)
class Family:
    """A family of Stable Diffusion weights and the diffusers pipelines that run it."""

    #: ``"sd"`` or ``"sdxl"``.
    name: str
    #: The text-to-image pipeline class, as ``model_index.json``'s ``_class_name`` names it.
    pipeline: str
    #: The image-to-image pipeline class over the same modules.
    image_to_image: str
    #: The inpainting pipeline class over the same modules (4-channel UNets: it keeps the unmasked part by
    #: blending latents; a 9-channel inpainting UNet takes the mask as input).
    inpaint: str
    #: For messages: ``"Stable Diffusion 1.x/2.x"``.
    description: str
    #: The sub-folders a weights folder must have.
    required: tuple[str, ...]
    #: The sub-folders whose weights must be ``.safetensors``.
    models: tuple[str, ...]

    def pipeline_class(self) -> type:
        return getattr(diffusers, self.pipeline)

    def image_to_image_class(self) -> type:
        return getattr(diffusers, self.image_to_image)

    def inpaint_class(self) -> type:
        return getattr(diffusers, self.inpaint)


SD = Family(
    name="sd",
    pipeline="StableDiffusionPipeline",
    image_to_image="StableDiffusionImg2ImgPipeline",
    inpaint="StableDiffusionInpaintPipeline",
    description="Stable Diffusion 1.x/2.x",
    required=("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    models=("unet", "vae", "text_encoder"),
)
SDXL = Family(
    name="sdxl",
    pipeline="StableDiffusionXLPipeline",
    image_to_image="StableDiffusionXLImg2ImgPipeline",
    inpaint="StableDiffusionXLInpaintPipeline",
    description="SDXL base",
    required=("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    models=("unet", "vae", "text_encoder", "text_encoder_2"),
)
#: The families served, by the ``_class_name`` of their ``model_index.json``.
FAMILIES = {family.pipeline: family for family in (SD, SDXL)}
#: The ``_class_name`` of the SDXL refiner's ``model_index.json``.
SDXL_REFINER_PIPELINE = "StableDiffusionXLImg2ImgPipeline"


def family_of(pipe: Any) -> Family | None:
    """The family whose text-to-image, image-to-image or inpainting pipeline ``pipe`` is, or ``None``."""
    for family in FAMILIES.values():
        if isinstance(pipe, (family.pipeline_class(), family.image_to_image_class(), family.inpaint_class())):
            return family
    return None


def refused_variant(pipe: Any) -> str | None:
    """Why ``pipe`` is a variant of a family that is not served, or ``None``: the SDXL refiner (a pipeline
    with ``requires_aesthetics_score``) only refines the base model's images."""
    if getattr(getattr(pipe, "config", None), "requires_aesthetics_score", False):
        return (
            "the SDXL refiner (a pipeline with requires_aesthetics_score=True) is not supported; use the "
            "SDXL base model, for text-to-image or image-to-image"
        )
    return None
