"""Command line: ``python -m faster_diffusion "a photo of an astronaut riding a horse"``.

Generates images from a diffusers Stable Diffusion weights folder with faster diffusion, and with
``--compare`` also with stock diffusers from the same seed, printing both times, the speedup and the
difference between the images. ``--image PATH`` (with ``--strength S``) starts from an image instead, and
``--mask PATH`` with it inpaints; ``--lora`` puts a LoRA on the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from .. import reference
from ..noise import PRIOR_NOISE_ALPHA, PRIOR_NOISE_TAU
from ..policy import DEFAULT_KEY_STEPS, DEFAULT_MODE, parse_key_steps, resolve_key_steps
from ..reference import shapes
from ..samplers import Sampler
from ..schedule import ACCEPTED_FORMS, KeyStepError, KeyStepKind
from .branch import AUTO_BRANCH, check_branch_choice, choose_branch
from .generate import (
    DEFAULT_STRENGTH,
    MAX_SEED,
    MODE_NAMES,
    GenerationRequest,
    GenerationResult,
    InputNames,
    check_for_model,
    check_image_to_image_steps,
    check_sampler_choice,
    describe_speedup,
    faster_config,
    generate,
    image_to_image_steps,
    prepare_key_steps,
    warm_up,
)
from .images import load_image, load_mask
from .loading import (
    DEFAULT_GUIDANCE,
    DOWNLOAD_COMMAND,
    WEIGHTS_ENV,
    WeightsError,
    default_guidance,
    default_weights_dir,
    has_weights,
    load_pipeline,
    model_size,
)
from .lora import CACHE_ENV, DEFAULT_SCALE, check_lora_file, check_scale, fetch_lora, use_lora
from .threads import fit_torch_threads

#: The flag of each field that the library's error messages name: :func:`main` prints an error that starts
#: with a field's name with the flag instead (:func:`_flag_message`).
FIELD_FLAGS = {
    "noise_injection: alpha (strength)": "--noise-strength",
    "noise_injection: tau (threshold)": "--noise-threshold",
    "max_decoder_batch": "--max-decoder-batch",
    "guidance_scale": "--guidance-scale",
    "num_outputs": "--num-outputs",
    "key_steps": "--key-steps",
    "lora_weights": "--lora",
    "lora_scale": "--lora-scale",
    "num_steps": "--steps",
    "strength": "--strength",
    "sampler": "--sampler",
    "branch": "--branch",
    "width and height": "--width and --height",
    "height": "--height",
    "width": "--width",
    "image": "--image",
    "mask": "--mask",
    "seed": "--seed",
}


#: How :func:`~faster_diffusion.app.generate.check_sampler_choice` names the inputs here: by their flags.
CLI_INPUTS = InputNames(
    sampler="--sampler",
    key_steps="--key-steps",
    noise_on="prior noise injection (on in --mode encoder)",
    noise_off="pass --no-noise-injection",
    choose_branch="--branch auto",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m faster_diffusion",
        description="Stable Diffusion text-to-image, image-to-image and inpainting, faster by reusing UNet "
        "features: deep reuse by default, or the paper's encoder propagation (--mode encoder).",
    )
    parser.add_argument("prompt", help="the text to render")
    parser.add_argument("--negative-prompt", default="", help="text to steer away from")
    parser.add_argument(
        "--sampler",
        default=Sampler.DDIM.value,
        help=f"one of {', '.join(Sampler.names())} (case-insensitive): the paper's three with their step "
        "counts, then Replicate's scheduler names (DDIM is DDIM-50; KarrasDPM is DPMSolverMultistep with "
        "Karras sigmas); see docs/usage.md, The command line",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: the sampler's own: 50 for DDIM-50, DDIM and PNDM, 20 for the paper's "
        "DPM-Solvers, 25 for the others)",
    )
    parser.add_argument(
        "--key-steps",
        default=DEFAULT_KEY_STEPS,
        help=f"key steps (with --mode deep, the full steps): {ACCEPTED_FORMS}; default: --mode deep: "
        "auto:13 (DDIM, 50 steps), auto:6@feature (DPM-Solver, 20 steps), uniform:4 (K_EULER, "
        "UniPCMultistep) or uniform:3 (DPM-Solver++ and the other scheduler names); --mode encoder: "
        "'paper' for SD v1.5 base weights, otherwise 'auto' "
        "(DDIM) or 'auto:9' (DPM-Solver, 20 steps), and 'paper' for Replicate's scheduler names but DDIM "
        "(not measured on them); see docs/usage.md, Key steps",
    )
    parser.add_argument(
        "--mode",
        choices=MODE_NAMES,
        default=DEFAULT_MODE,
        help="deep: deep reuse (only the shallowest layers run at a partial step, as DeepCache; the key "
        f"steps are the full steps); encoder: the paper's encoder propagation (default: {DEFAULT_MODE})",
    )
    parser.add_argument(
        "--branch",
        type=_branch,
        default=0,
        help="--mode deep: how deep a partial step reaches (DeepCache's cache_branch_id; 0 runs the "
        "least), or 'auto': the branch, and its full steps, of least predicted error at the cost of "
        "--key-steps at branch 0, from partial steps timed on this machine and a calibration of each branch "
        "(text-to-image)",
    )
    parser.add_argument(
        "--forecast",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: extrapolate the reused features linearly from the latest two key steps instead of copying",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="decode one step at a time instead of batching a group's decoder passes",
    )
    parser.add_argument(
        "--max-decoder-batch",
        type=int,
        default=0,
        help=(
            "cap on the steps decoded in one batch (0: automatic, whole groups where they fit a memory "
            "budget; see docs/usage.md, Memory)"
        ),
    )
    parser.add_argument(
        "--no-noise-injection",
        action="store_true",
        help="turn prior noise injection off (it is on in --mode encoder, off in --mode deep)",
    )
    parser.add_argument("--noise-strength", type=float, default=PRIOR_NOISE_ALPHA, help="alpha")
    parser.add_argument("--noise-threshold", type=float, default=PRIOR_NOISE_TAU, help="tau (timestep value)")
    parser.add_argument("--seed", type=int, default=0, help=f"0 to {MAX_SEED}")
    parser.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's size)")
    parser.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's size)")
    parser.add_argument("--num-outputs", type=int, default=1)
    parser.add_argument(
        "--image",
        type=Path,
        default=None,
        help="image-to-image: start from this image (32 to 2048 px a side, at most 1024x1024 pixels); the "
        "outputs have its size, rounded down to a multiple of 8",
    )
    parser.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="with --image: inpaint: repaint the white part of this mask (black is kept); it must have the "
        "image's size",
    )
    parser.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"with --image: how much of the image is replaced, 0 to 1 (default: {DEFAULT_STRENGTH}); the "
        "run takes the last int(steps x strength) steps",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help=f"classifier-free guidance (default: {DEFAULT_GUIDANCE}; the built-in reference models' own, "
        f"{reference.GUIDANCE_SCALE} and {reference.SD15_LAYOUT_GUIDANCE_SCALE}, as the Cog model's)",
    )
    parser.add_argument(
        "--lora",
        default=None,
        help="LoRA weights: a URL or a path to a .safetensors LoRA (diffusers or kohya format) for the "
        f"model's family; a URL is downloaded once, into ${CACHE_ENV} or ~/.cache/faster_diffusion/lora",
    )
    parser.add_argument(
        "--lora-scale",
        type=float,
        default=None,
        help=f"with --lora: the LoRA's additive scale, 0 (none) to 1 (default: {DEFAULT_SCALE})",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs"), help="folder for the PNG files")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"diffusers weights folder (default: ${WEIGHTS_ENV} or weights/)",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps where available (default: cuda if available)"
    )
    parser.add_argument("--no-safety-checker", action="store_true", help="do not run the safety checker")
    parser.add_argument(
        "--compare", action="store_true", help="also run stock diffusers with the same seed and compare"
    )
    return parser


def _load(args: argparse.Namespace):
    """The pipeline named by --weights, or the default folder, or the built-in reference model.

    Returns ``(pipe, description, is_reference)``.
    """
    folder = args.weights if args.weights is not None else default_weights_dir()
    if args.weights is not None or has_weights(folder):
        pipe = load_pipeline(folder, device=args.device, safety_checker=not args.no_safety_checker)
        return pipe, str(folder), False
    print(
        f"No Stable Diffusion weights in {folder}/ (fill it with `{DOWNLOAD_COMMAND}`). Using the built-in "
        "reference model: a small latent diffusion model trained on captioned shapes, 32x32 images. It knows "
        f'prompts like "{reference.EXAMPLE_PROMPT}".',
        flush=True,
    )
    pipe = load_pipeline(reference.MODEL_DIR, device=args.device, safety_checker=False)
    return pipe, f"built-in reference model ({reference.MODEL_DIR})", True


def _input_image(args: argparse.Namespace):
    """The image named by --image, checked; ``None`` without one. Raises ``ValueError`` for --strength
    without --image, for --width or --height with it, and for an image that cannot be used."""
    if args.image is None:
        if args.strength is not None:
            raise ValueError("--strength applies only with --image")
        if args.mask is not None:
            raise ValueError("--mask applies only with --image: it marks which part of the image to repaint")
        return None
    if args.width is not None or args.height is not None:
        raise ValueError(
            "--width and --height do not apply with --image: the outputs have the image's size, rounded down "
            "to a multiple of 8"
        )
    return load_image(args.image)


def _branch(text: str) -> int | str:
    """``--branch``: a whole number (checked by :func:`_check_flags`), or ``auto``."""
    if text.strip().lower() == AUTO_BRANCH:
        return AUTO_BRANCH
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 or 'auto', got {text!r}") from None


def _check_flags(args: argparse.Namespace, image) -> None:
    """Refuse a value that would otherwise be refused only once the model has loaded (which can take
    minutes): the request's own checks, the key steps against the step count (except ``auto``'s, placed by a
    calibration of the model) and the device. ``image``: the input image (already checked), or ``None``.

    Raises ``ValueError``. The request's and the key steps' messages name fields: :func:`main` prints them
    with the flags (:func:`_flag_message`).
    """
    if args.max_decoder_batch < 0:
        raise ValueError(f"--max-decoder-batch must be >= 0 (0: automatic), got {args.max_decoder_batch}")
    if args.branch == AUTO_BRANCH:
        check_branch_choice(args.mode == "deep", image is not None, args.forecast, "--branch auto")
    elif args.branch < 0:
        raise ValueError(f"--branch must be >= 0, got {args.branch}")
    # A request of the given values, for its checks: 8 px for a side left to the model's size, no image.
    given = _request(args, 8, DEFAULT_GUIDANCE)
    first = 0
    if image is not None:
        check_image_to_image_steps(given.steps, given.strength, "--strength", ", or use more --steps")
        first = given.steps - image_to_image_steps(given.steps, given.strength)
    if args.key_steps.strip().lower() != DEFAULT_KEY_STEPS:
        keys = parse_key_steps(args.key_steps)
        # Heun's and PNDM's key steps index UNet calls, counted once the model's scheduler config is read.
        if keys.kind is not KeyStepKind.AUTO and given.sampler.one_call_per_step:
            keys.resolve(given.steps, start=first)
    _check_device(args.device)
    _check_lora(args)


def _request(args: argparse.Namespace, size: int, guidance: float, **more) -> GenerationRequest:
    """The request the flags ask for: ``size`` for a side they leave out, ``guidance`` when --guidance-scale
    is left out, and ``more`` (the reuse config, the input image and mask) as given."""
    return GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
        num_steps=args.steps,
        width=size if args.width is None else args.width,
        height=size if args.height is None else args.height,
        num_outputs=args.num_outputs,
        guidance_scale=guidance if args.guidance_scale is None else args.guidance_scale,
        seed=args.seed,
        strength=DEFAULT_STRENGTH if args.strength is None else args.strength,
        **more,
    )


def _lora_scale(args: argparse.Namespace) -> float:
    return DEFAULT_SCALE if args.lora_scale is None else args.lora_scale


def _check_lora(args: argparse.Namespace) -> None:
    """Refuse --lora-scale without --lora, a scale out of bounds, and a --lora that cannot be fetched or is
    not a LoRA file, before the model loads (a URL is downloaded now, into the cache the load reads)."""
    if args.lora is None:
        if args.lora_scale is not None:
            raise ValueError("--lora-scale applies only with --lora")
        return
    check_scale(_lora_scale(args))
    check_lora_file(fetch_lora(args.lora), args.lora)


def _check_device(device: str | None) -> None:
    """Refuse a --device that torch cannot use here: unknown, or CUDA or MPS where it is missing."""
    if device is None:
        return
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        accepted = ["cpu", *(["cuda", "cuda:N"] if cuda else []), *(["mps"] if mps else [])]
        raise ValueError(f"--device: unknown device {device!r}; accepted here: {', '.join(accepted)}")
    if parsed.type == "cuda" and not cuda:
        missing = "no CUDA GPU is visible" if torch.version.cuda else "this PyTorch build has no CUDA support"
        raise ValueError(f"--device {device}: CUDA is not available on this machine ({missing}); use cpu")
    count = torch.cuda.device_count() if cuda else 0
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= count:
        devices = (
            "1 CUDA device, cuda:0" if count == 1 else f"{count} CUDA devices, cuda:0 to cuda:{count - 1}"
        )
        raise ValueError(f"--device {device}: this machine has {devices}")
    if parsed.type == "mps" and not mps:
        raise ValueError(f"--device {device}: MPS is not available on this machine; use cpu")


def _flag_message(message: str) -> str:
    """``message`` with the field it starts with, if any (``num_steps must ...``, ``key_steps: ...``,
    ``key_steps 'auto:60': ...``), named by its flag (:data:`FIELD_FLAGS`)."""
    for field, flag in FIELD_FLAGS.items():
        if message.startswith((f"{field} must ", f"{field}:", f"{field} '", f"{field} (")):
            return flag + message[len(field) :]
    return message


def _save(result: GenerationResult, folder: Path, prefix: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, flagged) in enumerate(zip(result.images, result.nsfw, strict=True)):
        path = folder / f"{prefix}-{index}.png"
        image.save(path)
        paths.append(path)
        if flagged:
            print(f"  {path}: flagged by the safety checker (blacked out)")
    return paths


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    fit_torch_threads()
    try:
        image = _input_image(args)
        mask = load_mask(args.mask) if args.mask is not None else None
        _check_flags(args, image)
        default = args.key_steps.strip().lower() == DEFAULT_KEY_STEPS
        if args.mode != "deep" and args.branch:
            raise ValueError("--branch applies to --mode deep only")
        if args.mode == "deep" and (args.sequential or args.max_decoder_batch):
            raise ValueError(
                "--sequential and --max-decoder-batch apply to --mode encoder only (deep reuse runs one step "
                "at a time)"
            )
        faster = faster_config(
            "paper" if default else args.key_steps,
            mode=args.mode,
            branch=0 if args.branch == AUTO_BRANCH else args.branch,
            forecast=args.forecast,
            parallel=not args.sequential,
            max_decoder_batch=args.max_decoder_batch,
            noise_injection=False if args.no_noise_injection else None,
            noise_strength=args.noise_strength,
            noise_threshold=args.noise_threshold,
        )
        # For --key-steps default, 'paper' stands in until the model is read; no sampler that calls the UNet
        # more than once a step (Heun, PNDM) has an 'auto' default.
        choosing = args.branch == AUTO_BRANCH
        check_sampler_choice(args.sampler, faster, choose_branch=choosing, names=CLI_INPUTS)
        pipe, source, is_reference = _load(args)
        if default:
            keys = resolve_key_steps(DEFAULT_KEY_STEPS, pipe, args.sampler, args.steps, args.mode)
            faster = dataclasses.replace(faster, key_steps=keys)
        request = _request(
            args, model_size(pipe), default_guidance(pipe), faster=faster, image=image, mask=mask
        )
        check_for_model(pipe, request, choose_branch=choosing)
        if args.lora is not None:  # before the key steps: 'auto' is placed for the LoRA'd model
            use_lora(pipe, args.lora, _lora_scale(args))
        request = prepare_key_steps(pipe, request)
        if args.branch == AUTO_BRANCH:  # at the cost of those key steps at branch 0
            request = choose_branch(pipe, request)
        schedule = request.schedule
    except (KeyStepError, ValueError, TypeError, WeightsError) as error:
        print(f"error: {_flag_message(str(error))}", file=sys.stderr)
        return 2

    print(f"Model: {source}")
    unknown = reference.unknown_words(args.prompt + " " + args.negative_prompt) if is_reference else []
    if unknown:
        print(
            f"Warning: the reference model was never trained on {', '.join(repr(w) for w in unknown)}; it "
            f"knows only these words: {' '.join(shapes.VOCABULARY)}"
        )
    width, height = request.output_size
    print(
        f"Sampler: {request.describe_sampler()}, {width}x{height}, "
        f"seed {request.seed}, guidance {request.guidance_scale}"
    )
    if image is not None:
        print(f"Input image: {args.image}")
        print(request.describe_image_to_image())
    print(f"Key steps: {schedule.describe()}")
    print(f"Noise injection: {faster.noise_injection.describe()}")
    if args.compare:  # both timed runs start warm, so the speedup reported is fair
        warm_up(pipe, request)
    fast = generate(pipe, request, accelerate=True)
    paths = _save(fast, args.out, "faster")
    print(fast.describe())
    for path in paths:
        print(f"  wrote {path}")
    if args.compare:
        stock = generate(pipe, request, accelerate=False)
        stock_paths = _save(stock, args.out, "stock")
        print(stock.describe())
        for path in stock_paths:
            print(f"  wrote {path}")
        print(describe_speedup(fast, stock))
        for index, (a, b) in enumerate(zip(fast.images, stock.images, strict=True)):
            diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
            mse = float(np.mean(diff**2))
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
            print(
                f"Image {index} difference (faster vs stock, 0-255): mean {diff.mean():.2f}, "
                f"max {diff.max():.0f}, PSNR {psnr:.1f} dB"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
