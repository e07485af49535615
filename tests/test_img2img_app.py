"""Image-to-image in the product layer: the input image checks, the request, generate() on the image-to-image
pipeline over the loaded modules (SD and SDXL), the Cog predictor's image and prompt_strength inputs, and the
command line's --image and --strength."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch
from cog import Path as CogPath
from diffusers import (
    AutoencoderKL,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageOps

import predict
from faster_diffusion.app.cli import main
from faster_diffusion.app.generate import (
    DEFAULT_STRENGTH,
    GenerationRequest,
    faster_config,
    generate,
    image_to_image_pipeline,
)
from faster_diffusion.app.images import ImageInputError, load_image, prepare_image
from faster_diffusion.app.serving import TextToImage, check_inputs
from fixtures.tiny import (
    build_tiny_components,
    build_tiny_sdxl_pipeline,
    save_tiny_weights,
)

from .cog_server import SD_SHAPED_VAE

#: Stock pixels from faster diffusion: every step a key step, no noise injection.
EVERY_STEP = dict(faster=faster_config("all", noise_injection=False))


def noise_image(width: int = 64, height: int = 64, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def saved(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def sd_shaped_vae() -> AutoencoderKL:
    """The tiny VAE with SD's scale factor of 8: 64 px images have 8x8 latents, cheap for the tiny UNets."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(**SD_SHAPED_VAE).eval()


def tiny_sd(*, with_safety_checker: bool = False) -> StableDiffusionPipeline:
    components = {**build_tiny_components(0, with_safety_checker=with_safety_checker), "vae": sd_shaped_vae()}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=with_safety_checker)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl() -> StableDiffusionXLPipeline:
    components = {**build_tiny_sdxl_pipeline(0).components, "vae": sd_shaped_vae()}
    pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"SD": tiny_sd, "SDXL": tiny_sdxl}


def img2img(**overrides) -> GenerationRequest:
    values = dict(prompt="a red circle", image=noise_image(72, 64), num_steps=10, seed=3)
    return GenerationRequest(**{**values, **overrides})


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------------------------------ input images


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "missing.png", "image: no such file: {tmp}/missing.png"),
        (lambda tmp: tmp, "image: {tmp} is not an image file that can be read"),
        (
            lambda tmp: (tmp / "notes.png").write_text("not an image") and tmp / "notes.png",
            "image: {tmp}/notes.png is not an image file that can be read (cannot identify image file",
        ),
        (
            lambda tmp: saved(noise_image(2049, 64), tmp / "wide.png"),
            "image ({tmp}/wide.png): 2049x64 px is too large: at most 2048 px a side; resize it first",
        ),
        (
            lambda tmp: saved(noise_image(1032, 1024), tmp / "big.png"),
            "image ({tmp}/big.png): 1032x1024 px is too large: at most 1048576 pixels (1024x1024); resize it",
        ),
        (
            lambda tmp: saved(noise_image(64, 31), tmp / "short.png"),
            "image ({tmp}/short.png): 64x31 px is too small: at least 32 px a side",
        ),
        (
            lambda tmp: saved(noise_image(64, 64, "CMYK"), tmp / "print.jpg"),
            "image ({tmp}/print.jpg): images in mode CMYK are not accepted; use an 8-bit RGB or greyscale",
        ),
        (
            lambda tmp: saved(Image.new("I;16", (64, 64), 1000), tmp / "deep.png"),
            "image ({tmp}/deep.png): images in mode I;16 are not accepted; use an 8-bit RGB or greyscale",
        ),
        (
            lambda tmp: saved(Image.new("1", (64, 64), 1), tmp / "bits.png"),
            "image ({tmp}/bits.png): images in mode 1 are not accepted",
        ),
    ],
    ids=["missing", "folder", "text", "too-long", "too-many-pixels", "too-small", "cmyk", "16-bit", "1-bit"],
)
def test_an_image_that_cannot_be_used_is_refused_naming_the_input_and_the_file(make, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ImageInputError) as error:
        load_image(path)
    assert str(error.value).startswith(message.format(tmp=tmp_path)), str(error.value)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_an_image_with_one_transparent_pixel_is_refused_and_an_opaque_one_taken_as_rgb(mode, tmp_path):
    opaque = noise_image(64, 64, mode)
    opaque.putalpha(255)
    transparent = opaque.copy()
    transparent.putpixel((5, 7), (*transparent.getpixel((5, 7))[:-1], 254))

    with pytest.raises(
        ImageInputError, match="the image has transparent pixels; flatten it onto a background"
    ):
        load_image(saved(transparent, tmp_path / "transparent.png"))
    image = load_image(saved(opaque, tmp_path / "opaque.png"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(opaque.convert("RGB")))


def test_a_palette_image_is_taken_unless_its_transparent_colour_is_used(tmp_path):
    palette = noise_image(64, 64).convert("P")
    used = palette.getpixel((0, 0))
    unused = next(index for index in range(256) if index not in {c for _, c in palette.getcolors()})

    assert load_image(saved(palette, tmp_path / "opaque.png")).mode == "RGB"
    assert load_image(saved(palette, tmp_path / "unused.png", transparency=unused)).mode == "RGB"
    with pytest.raises(ImageInputError, match="transparent pixels"):
        load_image(saved(palette, tmp_path / "transparent.png", transparency=used))


def test_a_greyscale_image_is_taken_as_rgb(tmp_path):
    grey = noise_image(64, 64, "L")
    image = load_image(saved(grey, tmp_path / "grey.png"))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image)[..., 1], np.asarray(grey))


def test_the_exif_orientation_is_applied(tmp_path):
    """A camera stores a portrait photo as landscape pixels with an orientation tag (6: rotate 90 degrees
    clockwise to show it)."""
    stored = Image.new("RGB", (96, 64), "blue")
    stored.putpixel((0, 0), (255, 0, 0))  # top left as stored: top right once shown
    exif = stored.getexif()
    exif[0x0112] = 6
    path = saved(stored, tmp_path / "portrait.png", exif=exif)

    image = load_image(path)
    assert image.size == (64, 96)
    assert image.getpixel((63, 0)) == (255, 0, 0)
    assert np.array_equal(np.asarray(image), np.asarray(ImageOps.exif_transpose(Image.open(path))))


@pytest.mark.parametrize("suffix", ["gif", "png", "webp"])
def test_an_animated_image_is_refused_rather_than_cut_to_its_first_frame(suffix, tmp_path):
    frames = [noise_image(64, 64, seed=seed) for seed in range(3)]
    path = tmp_path / f"moving.{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)

    message = f"image ({path}): an animated image (3 frames) is not accepted, only a still one"
    with pytest.raises(ImageInputError, match=re.escape(message)):
        load_image(path)
    with Image.open(path) as opened, pytest.raises(ImageInputError, match="an animated image"):
        prepare_image(opened)
    frames[0].save(path)
    assert load_image(path).size == (64, 64)


def test_a_jpeg_with_a_second_picture_is_a_still_photo_not_an_animation(tmp_path):
    """Cameras and phones store a preview or a gain map in their JPEGs; Pillow opens such a file as MPO with
    2 frames. It is read as its first picture, as diffusers does."""
    photo, preview = noise_image(64, 48, seed=0), noise_image(32, 24, seed=1)
    path = tmp_path / "camera.jpg"
    photo.save(path, "MPO", save_all=True, append_images=[preview])
    with Image.open(path) as opened:
        assert opened.format == "MPO" and opened.n_frames == 2
        first = np.asarray(opened.convert("RGB"))
        assert prepare_image(opened).size == (64, 48)
    image = load_image(path)
    assert image.size == (64, 48) and np.array_equal(np.asarray(image), first)


def test_a_size_that_is_not_a_multiple_of_8_is_rounded_down_by_resizing():
    image = noise_image(71, 66)
    ready = prepare_image(image)

    assert ready.size == (64, 64)
    assert np.array_equal(np.asarray(ready), np.asarray(image.resize((64, 64), Image.Resampling.LANCZOS)))
    ok = noise_image(72, 64)
    assert prepare_image(ok) is ok  # nothing to do: the same image


# ------------------------------------------------------------------------------------------ the request


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(strength=1.5), "strength must be between 0 and 1, got 1.5"),
        (dict(strength=-0.1), "strength must be between 0 and 1, got -0.1"),
        (dict(strength="0.5"), "strength must be a finite number, got '0.5'"),
        (dict(strength=float("nan")), "strength must be a finite number, got nan"),
        (dict(strength=True), "strength must be a finite number, got True"),
        (dict(image="photo.png"), "image must be a PIL image, got str"),
        (dict(image=noise_image(24, 64)), "image: 24x64 px is too small: at least 32 px a side"),
        (dict(image=noise_image(64, 64, "CMYK")), "image: images in mode CMYK are not accepted"),
        (
            dict(strength=0.09),
            "strength 0.09 with 10 steps runs no step (int(10 * 0.09) = 0); raise strength so that steps * "
            "strength >= 1, or use more steps",
        ),
        (dict(strength=0), "strength 0 with 10 steps runs no step"),
    ],
)
def test_request_validation_names_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        img2img(**overrides)
    assert str(error.value).startswith(message), str(error.value)


def test_the_request_runs_the_last_int_steps_times_strength_steps_at_the_image_size():
    request = img2img(strength=0.6, width=512, height=256)
    text = GenerationRequest(prompt="a red circle", num_steps=10, width=512, height=256, strength=0)

    assert (request.steps, request.steps_run, request.output_size) == (10, 6, (72, 64))
    assert request.describe_image_to_image() == (
        "Image-to-image: strength 0.6, 6 of 10 steps run, output 72x64 (the input image's size)"
    )
    assert (text.steps_run, text.output_size, text.describe_image_to_image()) == (10, (512, 256), None)
    assert img2img(strength=0.1).steps_run == 1 and img2img(strength=1).steps_run == 10
    assert (
        GenerationRequest(prompt="-").strength == DEFAULT_STRENGTH == predict.Inputs.prompt_strength.default
    )


# ------------------------------------------------------------------------------------------ generate()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_the_image_to_image_pipeline_shares_every_module_and_casts_nothing(family):
    pipe = BUILDERS[family]().to(torch.float16)
    runner = image_to_image_pipeline(pipe)

    expected = {"SD": StableDiffusionImg2ImgPipeline, "SDXL": StableDiffusionXLImg2ImgPipeline}[family]
    assert type(runner) is expected
    assert runner.components.keys() <= pipe.components.keys()
    for name, module in runner.components.items():
        assert module is pipe.components[name], name
    assert runner.unet.dtype == pipe.vae.dtype == torch.float16
    assert dict(runner.config).get("force_zeros_for_empty_prompt") == dict(pipe.config).get(
        "force_zeros_for_empty_prompt"
    )
    assert runner._progress_bar_config == {"disable": True}


def test_the_image_to_image_pipeline_keeps_the_safety_checker_or_its_absence():
    model = TextToImage(tiny_sd(with_safety_checker=True))

    checked = image_to_image_pipeline(model.pipe)
    unchecked = image_to_image_pipeline(model.pipe_without_checker)
    assert checked.safety_checker is model.pipe.safety_checker is not None
    assert checked.feature_extractor is model.pipe.feature_extractor
    assert unchecked.safety_checker is None and not unchecked.config.requires_safety_checker


@pytest.mark.parametrize("family", list(BUILDERS))
def test_stock_image_to_image_has_the_image_size_and_starts_from_the_image(family):
    pipe = BUILDERS[family]()
    first = generate(pipe, img2img(strength=0.6), accelerate=False)
    again = generate(pipe, img2img(strength=0.6), accelerate=False)
    other = generate(pipe, img2img(strength=0.6, image=noise_image(72, 64, seed=1)), accelerate=False)

    assert [image.size for image in first.images] == [(72, 64)]
    assert same(first.images, again.images) and not same(first.images, other.images)
    assert first.loop_seconds > 0  # the loop timer ends at the last step that runs (6 of 10)
    assert type(pipe) in (
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )  # the pipeline is left as it was
    assert "progress_bar" not in vars(pipe)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(("strength", "steps_run"), [(1.0, 10), (0.6, 6)])
def test_faster_with_every_step_a_key_step_gives_the_stock_pixels(family, strength, steps_run):
    """Whole runs (strength 1) and part-way runs alike."""
    pipe = BUILDERS[family]()
    request = img2img(strength=strength, num_outputs=2, **EVERY_STEP)

    stock = generate(pipe, request, accelerate=False)
    faster = generate(pipe, request)

    assert same(faster.images, stock.images) and faster.images[0].size == (72, 64)
    assert (faster.stats.full_passes, faster.stats.partial_passes) == (steps_run, 0)
    assert faster.loop_seconds > 0
    assert (
        not hasattr(pipe.unet, "_diffusers_hook")
        or pipe.unet._diffusers_hook.get_hook("faster_diffusion") is None
    )
    text = generate(pipe, GenerationRequest(prompt="a red circle", width=72, height=64, num_steps=10, seed=3))
    assert not same(text.images, stock.images[:1])  # the image changed the result


# ------------------------------------------------------------------------------------------ Cog


RUN = predict.Predictor().run


def defaults() -> dict:
    return {name: getattr(predict.Inputs, name).default for name in inspect.signature(RUN).parameters}


def predictor(tmp_path, pipe) -> predict.Predictor:
    instance = predict.Predictor()
    instance.model = TextToImage(pipe)
    instance.outputs = tmp_path / "outputs"
    instance.record_metric = lambda name, value: None
    return instance


def test_the_image_inputs_are_optional_and_checked(tmp_path):
    check_inputs(RUN, predict.Inputs, {**defaults(), "image": CogPath(tmp_path / "a.png")})
    check_inputs(RUN, predict.Inputs, {**defaults(), "image": tmp_path / "a.png", "prompt_strength": 0})
    for name, value, message in [
        ("image", "a.png", "image must be a file, got 'a.png'"),
        ("prompt_strength", 1.5, "prompt_strength must be between 0.0 and 1.0, got 1.5"),
        ("prompt_strength", "0.5", "prompt_strength must be a finite number, got '0.5'"),
    ]:
        with pytest.raises(ValueError) as error:
            check_inputs(RUN, predict.Inputs, {**defaults(), name: value})
        assert str(error.value) == message


def test_run_with_an_image_and_compare_returns_both_runs_at_the_image_size(tmp_path, capsys):
    image = CogPath(saved(noise_image(80, 64), tmp_path / "input.png"))
    inputs = dict(prompt="a red circle", key_steps="all", noise_injection=False, output_format="png", seed=2)
    inputs.update(image=image, prompt_strength=1.0, compare_with_baseline=True, width=512, height=512)

    paths = predictor(tmp_path, tiny_sd(with_safety_checker=True)).run(**{**defaults(), **inputs})

    assert [path.name for path in paths] == ["faster-0.png", "stock-0.png"]
    images = [Image.open(path) for path in paths]
    assert [image.size for image in images] == [(80, 64)] * 2
    assert same(images[:1], images[1:])
    out = capsys.readouterr().out
    assert "Image-to-image: strength 1, 50 of 50 steps run, output 80x64 (the input image's size)" in out


def test_run_with_an_image_that_cannot_be_used_fails_naming_it(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"GIF89a but not really")
    with pytest.raises(ValueError, match=f"image: {path} is not an image file that can be read"):
        predictor(tmp_path, tiny_sd()).run(**{**defaults(), "image": CogPath(path), "key_steps": "all"})


# ------------------------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strength", "0.5"], "error: --strength applies only with --image"),
        (
            ["--image", "{tmp}/in.png", "--width", "64"],
            "error: --width and --height do not apply with --image",
        ),
        (["--image", "{tmp}/missing.png"], "error: --image: no such file: {tmp}/missing.png"),
        (
            ["--image", "{tmp}/in.png", "--strength", "1.5"],
            "error: --strength must be between 0 and 1, got 1.5",
        ),
        (
            ["--image", "{tmp}/in.png", "--strength", "0.01"],
            "error: --strength 0.01 with 50 steps runs no step",
        ),
        (["--image", "{tmp}/small.png"], "error: --image ({tmp}/small.png): 24x64 px is too small"),
    ],
)
def test_cli_rejects_bad_image_arguments_clearly(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTER_DIFFUSION_WEIGHTS", str(tmp_path / "empty"))
    saved(noise_image(64, 64), tmp_path / "in.png")
    saved(noise_image(24, 64), tmp_path / "small.png")
    argv = [arg.format(tmp=tmp_path) for arg in argv]

    assert main(["a cat", "--out", str(tmp_path / "out"), *argv]) == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_image_to_image_says_what_ran(tmp_path, capsys):
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    image = saved(noise_image(64, 72), tmp_path / "in.png")
    argv = ["a red circle", "--weights", str(weights), "--out", str(tmp_path / "out"), "--steps", "4"]
    argv += [
        "--image",
        str(image),
        "--strength",
        "1",
        "--mode",
        "encoder",
        "--key-steps",
        "all",
        "--no-noise-injection",
        "--compare",
    ]

    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Sampler: DDIM-50, 4 steps, 64x72, seed 0" in out
    assert f"Input image: {image}\n" in out
    assert "Image-to-image: strength 1, 4 of 4 steps run, output 64x72 (the input image's size)" in out
    assert "4 full / 0 partial UNet passes" in out and "PSNR inf dB" in out
    assert Image.open(tmp_path / "out" / "faster-0.png").size == (64, 72)


# ------------------------------------------------------------------------------------------ part-way runs


@pytest.mark.parametrize("family", list(BUILDERS))
def test_faster_image_to_image_skips_the_encoder_at_the_steps_that_run(family):
    pipe = BUILDERS[family]()
    request = img2img(strength=0.6, faster=faster_config("uniform:2"))

    faster = generate(pipe, request)
    stock = generate(pipe, request, accelerate=False)

    # Key steps 0, 2, 4, 6, 8 of 10; steps 4 to 9 run: 4, 6 and 8 are key steps.
    assert (faster.stats.full_passes, faster.stats.partial_passes) == (3, 3)
    # The schedule the request echoes before the run is the one the run used.
    assert request.schedule == faster.stats.schedule
    assert (
        request.schedule.describe()
        == "uniform:2: 3 of the 6 steps that run (4 to 9 of 10) are key steps [4, 6, 8]"
    )
    assert faster.images[0].size == (72, 64) and not same(faster.images, stock.images)


def test_run_with_an_image_at_strength_0_6_compares_with_stock(tmp_path, capsys):
    image = CogPath(saved(noise_image(64, 80), tmp_path / "input.png"))
    inputs = dict(prompt="a red circle", key_steps="all", noise_injection=False, output_format="png", seed=2)
    inputs.update(image=image, prompt_strength=0.6, compare_with_baseline=True)

    paths = predictor(tmp_path, tiny_sd(with_safety_checker=True)).run(**{**defaults(), **inputs})

    images = [Image.open(path) for path in paths]
    assert [image.size for image in images] == [(64, 80)] * 2 and same(images[:1], images[1:])
    assert "Image-to-image: strength 0.6, 30 of 50 steps run, output 64x80" in capsys.readouterr().out


def test_cli_image_to_image_below_strength_1_compares_with_stock(tmp_path, capsys):
    """The untimed warm-up run before --compare runs 2 steps: at strength 1, so that it runs at least one
    (int(2 * 0.375) would be none)."""
    weights = save_tiny_weights(tmp_path / "weights", with_safety_checker=False)
    image = saved(noise_image(64, 64), tmp_path / "in.png")
    argv = ["a red circle", "--weights", str(weights), "--out", str(tmp_path / "out"), "--steps", "8"]
    argv += ["--image", str(image), "--strength", "0.375", "--mode", "encoder", "--key-steps", "all"]
    argv += ["--no-noise-injection"]

    assert main([*argv, "--compare"]) == 0
    out = capsys.readouterr().out
    assert "Image-to-image: strength 0.375, 3 of 8 steps run, output 64x64 (the input image's size)" in out
    assert "3 full / 0 partial UNet passes" in out and "PSNR inf dB" in out


def test_run_with_a_prompt_strength_that_runs_no_step_fails_naming_prompt_strength(tmp_path):
    image = CogPath(saved(noise_image(64, 64), tmp_path / "input.png"))
    inputs = {**defaults(), "image": image, "prompt_strength": 0.01, "key_steps": "all"}

    with pytest.raises(ValueError) as error:
        predictor(tmp_path, tiny_sd()).run(**inputs)

    assert str(error.value).startswith(
        "prompt_strength 0.01 with 50 steps runs no step (int(50 * 0.01) = 0); raise prompt_strength so that "
        "steps * prompt_strength >= 1"
    ), str(error.value)


def test_run_with_an_image_says_that_width_and_height_are_not_used(tmp_path, capsys):
    image = CogPath(saved(noise_image(64, 72), tmp_path / "input.png"))
    inputs = dict(
        prompt="a red circle", key_steps="all", output_format="png", image=image, sampler="DPM-Solver-20"
    )

    predictor(tmp_path, tiny_sd()).run(**{**defaults(), **inputs, "width": 128, "height": 96})
    told = capsys.readouterr().out
    predictor(tmp_path, tiny_sd()).run(**{**defaults(), **inputs})
    quiet = capsys.readouterr().out

    note = "width 128 and height 96 are not used with an image: the outputs have its size, 64x72"
    assert note in told and "are not used with an image" not in quiet
