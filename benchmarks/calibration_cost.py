"""What a calibration (``key_steps="auto"``) costs on the SD v1.5 architecture: measured, and estimated from
the FLOP count for the paper's A40.

A calibration is one stock run of N steps for P prompts (2P rows with guidance), recording the encoder's
outputs. The ``feature`` criterion (the default) needs nothing more than distances between them; the
``prediction`` criterion adds, for every pair of steps k < j, one decoder pass of step j on step k's encoder
outputs: N(N-1)/2 x 2P decoder rows, batched. The FLOPs are therefore ``N * 2P * F_unet`` (feature) plus
``N(N-1)/2 * 2P * F_decoder`` (prediction), with the per-row FLOPs of a UNet call and of its decoder (the
call minus ``conv_in``, the down blocks and the mid block) counted by
``torch.utils.flop_counter.FlopCounterMode`` on one call at the same size. The A40 estimate divides that by
the throughput the paper's own stock timing implies (SD v1.5, DDIM-50, 512 px, fp16: 2.42 s per image, of
which the UNet is nearly all): ``2.42 s / (50 x 2 x F_unet(512 px))``.

    python benchmarks/calibration_cost.py --size 256 --samplers DPM-Solver-20 --prompts 1   # CPU, minutes
    python benchmarks/calibration_cost.py --device cuda --dtype float16 --size 512          # a GPU
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness.timing import processor_name  # noqa: E402
from benchmarks.models import build_sd15_pipeline  # noqa: E402
from faster_diffusion import Sampler, get_calibration, use_sampler  # noqa: E402
from faster_diffusion.calibration import DEFAULT_PROMPTS  # noqa: E402

#: The paper's stock SD v1.5 time on an A40 (DDIM-50, 512 px, fp16), seconds per image.
PAPER_A40_STOCK_SECONDS = 2.42
ENCODER_MODULES = ("conv_in", "down_blocks", "mid_block")


def unet_flops_per_row(unet: torch.nn.Module, size: int, dtype: torch.dtype, device: torch.device):
    """(FLOPs of one UNet row, FLOPs of its encoder part) at ``size`` px, from one counted call."""
    latent = size // 8
    sample = torch.randn(1, unet.config.in_channels, latent, latent, dtype=dtype, device=device)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=dtype, device=device)
    counter = FlopCounterMode(display=False, depth=None)
    with torch.inference_mode(), counter:
        unet(sample, torch.tensor(500, device=device), encoder_hidden_states=text)
    by_module = counter.get_flop_counts()
    total = sum(by_module["Global"].values())
    root = next(name for name in by_module if name != "Global" and "." not in name)
    # Counts nest (a block's include its children's): sum the encoder's top-level modules only.
    top = re.compile(rf"{re.escape(root)}\.(conv_in|down_blocks\.\d+|mid_block)")
    encoder = sum(sum(counts.values()) for name, counts in by_module.items() if top.fullmatch(name))
    return total, encoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--size", type=int, default=512, help="image size in px (a multiple of 64)")
    parser.add_argument("--samplers", default="DDIM-50,DPM-Solver-20")
    parser.add_argument("--prompts", type=int, default=len(DEFAULT_PROMPTS), help="calibration prompts")
    parser.add_argument(
        "--criteria",
        default="feature,feature+prediction",
        help="what to time, comma-separated: feature "
        "(the default calibration) and/or feature+prediction (both criteria, as the reference model's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (default: print only)")
    args = parser.parse_args(argv)
    if args.size % 64 or args.size < 64:
        parser.error(f"--size must be a multiple of 64, got {args.size}")
    if not 1 <= args.prompts <= len(DEFAULT_PROMPTS):
        parser.error(f"--prompts must be from 1 to {len(DEFAULT_PROMPTS)}, got {args.prompts}")
    samplers = [Sampler.parse(s) for s in args.samplers.split(",") if s.strip()]
    variants = [v.strip() for v in args.criteria.split(",") if v.strip()]
    if not variants or any(v not in ("feature", "feature+prediction") for v in variants):
        parser.error(f"--criteria: feature and/or feature+prediction, got {args.criteria!r}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pipe = build_sd15_pipeline().to(device, dtype)
    unet_row, encoder_row = unet_flops_per_row(pipe.unet, args.size, dtype, device)
    unet_512 = unet_row if args.size == 512 else unet_flops_per_row(pipe.unet, 512, dtype, device)[0]
    decoder_row = unet_row - encoder_row
    a40_flops_per_second = 50 * 2 * unet_512 / PAPER_A40_STOCK_SECONDS
    prompts = DEFAULT_PROMPTS[: args.prompts]
    name = processor_name(device)
    command = " ".join(
        shlex.quote(a) for a in ["python", "benchmarks/calibration_cost.py", *(argv or sys.argv[1:])]
    )
    lines = [
        "# What a calibration costs: SD v1.5 architecture, random weights",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; {args.device} "
        f"({name}), {args.dtype}, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        f"- {args.size} px, {len(prompts)} prompt(s) with guidance (2 rows each); per row, a UNet call is "
        f"{unet_row / 1e9:.1f} GFLOP of which the encoder {encoder_row / unet_row:.1%}; the paper's A40 "
        f"stock time implies {a40_flops_per_second / 1e12:.1f} TFLOP/s effective",
        "",
        "| sampler | N | criteria | stock rows | decoder rows | calibration TFLOP "
        "| in stock runs of one image | measured s | estimated A40 s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for sampler in samplers:
        use_sampler(pipe, sampler)
        n, rows = sampler.default_steps, 2 * len(prompts)
        for variant in variants:
            criteria = tuple(variant.split("+"))
            stock_rows = n * rows
            decoder_rows = n * (n - 1) // 2 * rows if "prediction" in criteria else 0
            flops = stock_rows * unet_row + decoder_rows * decoder_row
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            get_calibration(
                pipe,
                prompts=prompts,
                height=args.size,
                width=args.size,
                criteria=criteria,
                force=True,
                save=False,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            lines.append(
                f"| {sampler.value} | {n} | {variant} | {stock_rows} | {decoder_rows} | {flops / 1e12:.1f} "
                f"| {flops / (n * 2 * unet_row):.1f} | {seconds:.1f} | {flops / a40_flops_per_second:.1f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
