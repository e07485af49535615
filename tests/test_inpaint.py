"""Inpainting: an image and a mask, on diffusers' inpainting pipelines over the loaded weights' own modules,
from the library's request and the Cog model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image

from faster_diffusion import DeepReuseConfig, KeySteps
from faster_diffusion.app.generate import GenerationRequest, faster_config, generate, inpaint_pipeline
from faster_diffusion.app.images import ImageInputError, load_mask

from .test_img2img_app import BUILDERS, EVERY_STEP, defaults, noise_image, predictor, same, saved

INPAINT_CLASSES = {"SD": StableDiffusionInpaintPipeline, "SDXL": StableDiffusionXLInpaintPipeline}


def half_mask(width: int = 72, height: int = 64) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels, "L")


def inpaint(**overrides) -> GenerationRequest:
    values = dict(prompt="a red circle", image=noise_image(72, 64), mask=half_mask(), num_steps=10, seed=3)
    return GenerationRequest(**{**values, **overrides})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_stock_inpainting_is_diffusers_inpainting_pipeline_over_the_same_modules(family):
    pipe = BUILDERS[family]()
    request = inpaint(strength=0.6)
    ours = generate(pipe, request, accelerate=False)  # sets the pipeline's sampler (DDIM)
    runner = inpaint_pipeline(pipe)
    assert type(runner) is INPAINT_CLASSES[family]
    assert all(runner.components[name] is module for name, module in pipe.components.items() if module)
    with torch.inference_mode():
        theirs = runner(
            "a red circle",
            image=[request.image],
            mask_image=[request.mask],
            strength=0.6,
            width=72,
            height=64,
            num_inference_steps=10,
            generator=torch.Generator().manual_seed(3),
        ).images
    assert same(ours.images, theirs) and ours.images[0].size == (72, 64)
    without_mask = generate(pipe, inpaint(strength=0.6, mask=None), accelerate=False)
    assert not same(ours.images, without_mask.images)  # the mask changed the result


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("mode", ["encoder", "deep"])
@pytest.mark.parametrize(("strength", "steps_run"), [(1.0, 10), (0.6, 6)])
def test_faster_inpainting_with_every_step_full_gives_the_stock_pixels(family, mode, strength, steps_run):
    pipe = BUILDERS[family]()
    faster_settings = (
        EVERY_STEP["faster"] if mode == "encoder" else DeepReuseConfig(key_steps=KeySteps.parse("all"))
    )
    request = inpaint(strength=strength, num_outputs=2, faster=faster_settings)

    stock = generate(pipe, request, accelerate=False)
    faster = generate(pipe, request)

    assert same(faster.images, stock.images)
    assert faster.stats.full_passes == steps_run


@pytest.mark.parametrize("family", list(BUILDERS))
def test_faster_inpainting_places_the_key_steps_on_the_steps_that_run(family):
    pipe = BUILDERS[family]()
    request = inpaint(strength=0.6, faster=faster_config("uniform:2"))
    faster = generate(pipe, request)
    # Key steps 0, 2, 4, 6, 8 of 10; steps 4 to 9 run: 4, 6 and 8 are key steps.
    assert (faster.stats.full_passes, faster.stats.partial_passes) == (3, 3)
    assert request.schedule == faster.stats.schedule
    deep = generate(pipe, inpaint(strength=0.6, faster=faster_config("uniform:2", mode="deep")))
    assert deep.stats.full_passes == 3


def test_a_mask_is_taken_as_greyscale_of_the_image_size_and_a_bilevel_mask_too():
    request = inpaint(mask=half_mask().convert("1"))
    assert request.mask.mode == "L" and request.mask.size == request.image.size
    assert inpaint(mask=half_mask().convert("RGB")).mask.mode == "L"
    # A size that rounds down to the image's (as the image itself is rounded) is the same size.
    assert inpaint(image=noise_image(75, 64), mask=half_mask(74, 64)).mask.size == (72, 64)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"image": None}, "mask needs an image: it marks which part of the image to repaint"),
        (
            {"mask": half_mask(64, 64)},
            "mask: 64x64 px (rounded down to a multiple of 8), but the image is 72x64 px: the mask must have "
            "the image's size",
        ),
        ({"mask": Image.new("CMYK", (72, 64))}, "mask: images in mode CMYK are not accepted"),
        ({"mask": Image.new("RGBA", (72, 64), (0, 0, 0, 0))}, "mask: the image has transparent pixels"),
        ({"mask": "mask.png"}, "mask must be a PIL image, got str"),
    ],
)
def test_a_mask_that_cannot_be_used_is_refused_naming_mask(overrides, message):
    with pytest.raises(ValueError) as error:
        inpaint(**overrides)
    assert str(error.value).startswith(message)


def test_mask_files_are_read_and_checked_naming_mask(tmp_path):
    assert load_mask(saved(half_mask().convert("1"), tmp_path / "bits.png")).mode == "L"
    with pytest.raises(ImageInputError, match=r"^mask: no such file: "):
        load_mask(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match=r"^mask: .* is not an image file that can be read"):
        load_mask(saved_text(tmp_path / "notes.png"))


def saved_text(path):
    path.write_text("not an image")
    return path


# ------------------------------------------------------------------------------------------ Cog


def test_run_with_an_image_and_a_mask_inpaints_and_compares_with_stock(tmp_path, capsys):
    pipe = BUILDERS["SD"]()
    image = saved(noise_image(72, 64), tmp_path / "in.png")
    mask = saved(half_mask(), tmp_path / "mask.png")
    inputs = {**defaults(), "image": image, "mask": mask, "prompt_strength": 0.6, "num_inference_steps": 10}
    paths = predictor(tmp_path, pipe).run(**{**inputs, "compare_with_baseline": True, "output_format": "png"})
    out = capsys.readouterr().out
    assert "Inpainting (white of the mask repainted): strength 0.6, 6 of 10 steps run, output 72x64" in out
    faster, stock = (Image.open(p) for p in sorted(paths))
    assert faster.size == stock.size == (72, 64)
    plain = predictor(tmp_path, pipe).run(**{**inputs, "mask": None, "output_format": "png"})
    assert not same([Image.open(plain[0])], [faster])


def test_run_with_a_mask_of_another_size_or_without_an_image_fails_naming_mask(tmp_path):
    pipe = BUILDERS["SD"]()
    image = saved(noise_image(72, 64), tmp_path / "in.png")
    small = saved(half_mask(64, 64), tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"^mask: 64x64 px .* the mask must have the image.s size"):
        predictor(tmp_path, pipe).run(**{**defaults(), "image": image, "mask": small})
    with pytest.raises(ValueError, match=r"^mask needs an image"):
        predictor(tmp_path, pipe).run(**{**defaults(), "mask": small})


# ------------------------------------------------------------------------------------------ command line


def test_cli_inpaints_with_mask_and_says_so(tmp_path, capsys):
    from faster_diffusion.app.cli import main

    from .test_img2img_app import tiny_sd

    folder = tmp_path / "weights"
    tiny_sd().save_pretrained(folder, safe_serialization=True)
    image = saved(noise_image(72, 64), tmp_path / "in.png")
    mask = saved(half_mask(), tmp_path / "mask.png")
    common = [
        "a red circle",
        "--weights",
        str(folder),
        "--image",
        str(image),
        "--steps",
        "10",
        "--strength",
        "0.6",
    ]
    assert main([*common, "--mask", str(mask), "--out", str(tmp_path / "masked"), "--compare"]) == 0
    out = capsys.readouterr().out
    assert "Inpainting (white of the mask repainted): strength 0.6, 6 of 10 steps run, output 72x64" in out
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    masked = Image.open(tmp_path / "masked" / "faster-0.png")
    assert masked.size == (72, 64)
    assert not same([masked], [Image.open(tmp_path / "plain" / "faster-0.png")])
