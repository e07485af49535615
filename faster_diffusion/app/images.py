"""Input images for image-to-image: read and checked in one place, for the command line and the predictor.

An input image is accepted when it is a file Pillow can read, 32 to 2048 px a side and at most 1024x1024
pixels in all (the bounds of the width and height inputs; at least the built-in reference model's 32 px), and
RGB or greyscale; RGBA, LA and palette images only when fully opaque, and a still image (one frame; an
animated GIF, PNG or WebP is refused rather than cut to its first frame). Its EXIF orientation is applied (as
diffusers' ``load_image`` does), it is converted to RGB, and its size is rounded down to a multiple of 8
(resized with Lanczos, as diffusers does with a size that is not a multiple of the VAE's scale factor): the
output images have that size, as in Replicate's Stable Diffusion models, which take the input image's size in
img2img mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageOps

#: Smallest side of an input image, in pixels: the built-in reference model's size (it was trained at 32 px).
MIN_IMAGE_SIDE = 32
#: Longest side of an output or input image, in pixels (the bound on width and height); one side may be this
#: long as long as the image stays within :data:`MAX_PIXELS`.
MAX_SIDE = 2048
#: Most pixels an image may have: 1024x1024, SDXL's training size. Every size of SDXL's aspect-ratio buckets
#: fits (1344x768, 1216x832, 1536x640 and their transposes), and memory stays bounded.
MAX_PIXELS = 1024 * 1024
#: The output size is the input image's rounded down to a multiple of this (SD's VAE scale factor).
IMAGE_SIZE_MULTIPLE = 8
#: Modes taken as they are or converted to RGB; those with transparency only when fully opaque.
OPAQUE_MODES = ("RGB", "L")
ALPHA_MODES = ("RGBA", "LA", "P")
#: The EXIF tag that holds the orientation.
_ORIENTATION = 0x0112


class ImageInputError(ValueError):
    """An input image that cannot be used; the message names the input and says what is allowed."""


def load_image(
    path: str | os.PathLike[str], name: str = "image", prepare: Callable[..., Image.Image] | None = None
) -> Image.Image:
    """Read the image file ``path`` given as input ``name`` and return it checked (:func:`prepare_image`).

    Raises :class:`ImageInputError`, naming the input and the file, when there is no such file, it is not
    an image Pillow can read, or the image is of a size or mode that is not accepted.
    """
    where = os.fspath(path)
    try:
        with Image.open(path) as opened:
            _check_size(opened, name, f" ({where})")  # before decoding the pixels of an oversized image
            _check_still(opened, name, f" ({where})")
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise ImageInputError(f"{name}: no such file: {where}") from None
    except Image.DecompressionBombError as error:
        raise ImageInputError(
            f"{name}: {where} is too large ({error}); at most {MAX_PIXELS} pixels"
        ) from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageInputError):
            raise
        raise ImageInputError(f"{name}: {where} is not an image file that can be read ({error})") from None
    return (prepare or prepare_image)(image, name, f" ({where})")


def load_mask(path: str | os.PathLike[str], name: str = "mask") -> Image.Image:
    """Read the inpainting mask file ``path`` given as input ``name``, checked as :func:`prepare_mask`
    checks it (its size against the image's is checked with the request)."""
    return load_image(path, name, prepare_mask)


def prepare_mask(
    mask: Any, name: str = "mask", where: str = "", size: tuple[int, int] | None = None
) -> Image.Image:
    """An inpainting mask as the pipeline takes it: white is repainted, black is kept, grey in between.

    Checked as an image (:func:`prepare_image`; a 1-bit mask is accepted too), made greyscale, and, when
    ``size`` (the prepared input image's) is given, refused naming input ``name`` unless it has that size.
    """
    if isinstance(mask, Image.Image) and mask.mode == "1":
        mask = mask.convert("L")
    prepared = prepare_image(mask, name, where).convert("L")
    if size is not None and prepared.size != tuple(size):
        width, height = prepared.size
        raise ImageInputError(
            f"{name}{where}: {width}x{height} px (rounded down to a multiple of 8), but the image is "
            f"{size[0]}x{size[1]} px: the mask must have the image's size"
        )
    return prepared


def prepare_image(image: Any, name: str = "image", where: str = "") -> Image.Image:
    """``image`` (a PIL image) as the pipeline will take it: EXIF orientation applied, RGB, its size rounded
    down to a multiple of :data:`IMAGE_SIZE_MULTIPLE`. An image that is that already is returned as it is.

    Raises :class:`ImageInputError` naming input ``name`` (and ``where``, the file) for an image that is not
    a PIL image, of a side under :data:`MIN_IMAGE_SIDE` or over :data:`MAX_SIDE` px, in a mode other
    than RGB, L, or RGBA, LA and P without transparent pixels.
    """
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"{name} must be a PIL image, got {type(image).__name__}")
    _check_still(image, name, where)
    if image.getexif().get(_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    _check_size(image, name, where)
    if image.mode not in OPAQUE_MODES + ALPHA_MODES:
        raise ImageInputError(
            f"{name}{where}: images in mode {image.mode} are not accepted; use an 8-bit RGB or greyscale "
            "image (RGBA, LA and palette images only without transparent pixels)"
        )
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA"):
        lowest, _ = image.getchannel("A").getextrema()
        if lowest < 255:
            raise ImageInputError(
                f"{name}{where}: the image has transparent pixels; flatten it onto a background first"
            )
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = output_size(image.size)
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def output_size(size: tuple[int, int]) -> tuple[int, int]:
    """The output size for an input image of ``size`` (width, height): each side rounded down to a multiple
    of :data:`IMAGE_SIZE_MULTIPLE`."""
    return tuple(side - side % IMAGE_SIZE_MULTIPLE for side in size)  # type: ignore[return-value]


#: Formats whose files can hold an animation.
ANIMATED_FORMATS = frozenset({"GIF", "PNG", "WEBP"})


def _check_still(image: Image.Image, name: str, where: str) -> None:
    """Refuse an animation (GIF, APNG, WebP): diffusers would take its first frame and drop the rest. Other
    files with several pictures are read as their first one, as diffusers does: a JPEG that carries a
    preview or a gain map (which Pillow opens as MPO, with 2 or more frames) is a still photo."""
    if image.format in ANIMATED_FORMATS and getattr(image, "is_animated", False):
        raise ImageInputError(
            f"{name}{where}: an animated image ({image.n_frames} frames) is not accepted, only a still one; "
            "save the frame to use as an image of its own"
        )


def _check_size(image: Image.Image, name: str, where: str) -> None:
    width, height = image.size
    if max(width, height) > MAX_SIDE:
        raise ImageInputError(
            f"{name}{where}: {width}x{height} px is too large: at most {MAX_SIDE} px a side; resize it first"
        )
    if width * height > MAX_PIXELS:
        raise ImageInputError(
            f"{name}{where}: {width}x{height} px is too large: at most {MAX_PIXELS} pixels (1024x1024); "
            "resize it first"
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageInputError(
            f"{name}{where}: {width}x{height} px is too small: at least {MIN_IMAGE_SIDE} px a side"
        )
