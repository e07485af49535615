"""One command that checks faster diffusion on a CUDA GPU: exactness, then speed and memory against the paper.

On a machine with a CUDA GPU and a CUDA build of torch (this script installs nothing):

1. Exactness, on the device, in fp16 and fp32, with a tiny SD-shaped model (the properties of METHOD.md):
   identity (every step a key step, no noise injection: stock output), parallel = sequential (batched decoder
   against one step at a time), and call counts (the encoder runs |K| times, the decoder N times).
2. Speed, with ``benchmarks/speed.py``'s machinery: the SD v1.5 architecture with random weights at 512 px in
   fp16, with PyTorch SDPA and, when it imports, xformers; DDIM-50 and DPM-Solver-20, each as stock,
   propagation and batched; medians over repeats and the peak of ``torch.cuda.max_memory_allocated``.
3. A Markdown report with the paper's A40 figures beside the measured ones.

    script/gpu-check                                   # -> benchmarks/results/gpu-check.md
    script/gpu-check --device cpu --quick --out /tmp/gpu-check.md   # the same code on the CPU, tiny, seconds
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the package and the benchmarks importable
    sys.path.insert(0, str(REPO_ROOT))

import diffusers  # noqa: E402

from benchmarks import speed  # noqa: E402
from faster_diffusion import (  # noqa: E402
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    Sampler,
    apply_faster_diffusion,
    use_sampler,
)
from fixtures.tiny import SD_SHAPED_UNET, build_tiny_pipeline  # noqa: E402

#: The paper's Table (A40 GPU, SD v1.5, 512 px, fp16): seconds per image for stock, propagation alone and
#: propagation with the parallel decoder.
PAPER_SECONDS = {
    Sampler.DDIM: {"stock": 2.42, "propagation": 1.82, "propagation+batched": 1.42},
    Sampler.DPM_SOLVER: {"stock": 1.14, "propagation": 0.92, "propagation+batched": 0.64},
}
#: The paper's GPU memory for DDIM-50, in GB.
PAPER_MEMORY_GB = {"stock": 2.62, "propagation": 2.64, "propagation+batched": 3.95}

#: Tolerances of the exactness checks: max |ours - reference| <= atol + rtol * max |reference|.
TOLERANCES = {
    # Identity: the same kernels on the same shapes; expected bitwise, allowed one rounding step.
    ("identity", torch.float32): (0.0, 1e-6),
    ("identity", torch.float16): (0.0, 1e-3),
    # Batched against one step at a time: other batch shapes can pick other kernels, so rounding differs;
    # fp16 accumulates it over every step.
    ("parallel = sequential", torch.float32): (1e-5, 1e-4),
    ("parallel = sequential", torch.float16): (1e-2, 1e-2),
}

EXACTNESS_SAMPLERS = (Sampler.DDIM, Sampler.DPM_SOLVER)
PROMPT = "a red circle above a blue square"


@dataclass
class Check:
    name: str
    sampler: Sampler
    dtype: torch.dtype
    passed: bool
    detail: str


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _latents(pipe, steps: int, size: int) -> torch.Tensor:
    with torch.inference_mode():
        return pipe(
            PROMPT,
            num_inference_steps=steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images.float()


def _tiny(sampler: Sampler, device: torch.device, dtype: torch.dtype):
    pipe = build_tiny_pipeline(0, unet_kwargs=SD_SHAPED_UNET)
    use_sampler(pipe, sampler)
    return pipe.to(device, dtype)


def _compare(
    name: str, sampler: Sampler, dtype: torch.dtype, ours: torch.Tensor, reference: torch.Tensor
) -> Check:
    atol, rtol = TOLERANCES[(name, dtype)]
    scale = reference.abs().max().item()
    diff = (ours - reference).abs().max().item()
    allowed = atol + rtol * scale
    finite = bool(torch.isfinite(ours).all() and torch.isfinite(reference).all())
    detail = f"max abs diff {diff:.3g} (allowed {allowed:.3g} = {atol:g} + {rtol:g} x max abs {scale:.3g})"
    return Check(name, sampler, dtype, finite and diff <= allowed, detail)


class _Counter:
    """Counts real encoder computations (first resnet of the first down block) and decoder rows."""

    def __init__(self, unet) -> None:
        self.encoder_calls = 0
        self.decoder_rows = 0
        self._hooks = [
            unet.down_blocks[0].resnets[0].register_forward_hook(self._encoder),
            unet.up_blocks[-1].resnets[0].register_forward_hook(self._decoder),
        ]

    def _encoder(self, module, args, output) -> None:
        self.encoder_calls += 1

    def _decoder(self, module, args, output) -> None:
        self.decoder_rows += output.shape[0]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def exactness_checks(device: torch.device, dtypes: Sequence[torch.dtype], size: int = 32) -> list[Check]:
    """Identity, parallel = sequential and call counts on ``device``, for each dtype and sampler."""
    checks = []
    paper = FasterDiffusionConfig(key_steps=KeySteps.paper())
    for dtype in dtypes:
        for sampler in EXACTNESS_SAMPLERS:
            steps = sampler.default_steps
            _log(f"exactness: {sampler.value}, {dtype} on {device} ...")
            stock = _latents(_tiny(sampler, device, dtype), steps, size)
            pipe = _tiny(sampler, device, dtype)
            every = FasterDiffusionConfig(
                key_steps=KeySteps.every_step(), noise_injection=NoiseInjection.off()
            )
            with apply_faster_diffusion(pipe, every):
                identity = _latents(pipe, steps, size)
            checks.append(_compare("identity", sampler, dtype, identity, stock))

            pipe = _tiny(sampler, device, dtype)
            one_at_a_time = FasterDiffusionConfig(key_steps=KeySteps.paper(), parallel=False)
            with apply_faster_diffusion(pipe, one_at_a_time):
                sequential = _latents(pipe, steps, size)
            counter = _Counter(pipe.unet)
            with apply_faster_diffusion(pipe, paper) as handle:
                batched = _latents(pipe, steps, size)
                stats = handle.last_run
            counter.remove()
            checks.append(_compare("parallel = sequential", sampler, dtype, batched, sequential))
            keys = len(stats.schedule.indices)
            counted = (counter.encoder_calls, counter.decoder_rows // 2)
            checks.append(
                Check(
                    "call counts",
                    sampler,
                    dtype,
                    counted == (keys, steps)
                    and (stats.encoder_passes, stats.decoder_passes) == (keys, steps),
                    f"encoder ran {counter.encoder_calls} times (|K| = {keys}), decoder {counted[1]} steps "
                    f"(N = {steps}) in {stats.decoder_batches} batches",
                )
            )
    return checks


def exactness_table(checks: list[Check]) -> list[str]:
    lines = ["| check | sampler | dtype | result | detail |", "|---|---|---|---|---|"]
    for c in checks:
        dtype = str(c.dtype).removeprefix("torch.")
        lines.append(
            f"| {c.name} | {c.sampler.value} | {dtype} | {'PASS' if c.passed else 'FAIL'} | {c.detail} |"
        )
    return lines


def paper_table(summaries: list[speed.Summary], cuda: bool) -> list[str]:
    """Measured figures beside the paper's A40 figures, per sampler and mode."""
    unit = "GB" if cuda else "GB (peak RSS)"
    lines = [
        f"| sampler | mode | paper s/img | paper speedup | measured s/img | measured speedup "
        f"| paper memory GB (DDIM-50) | measured peak memory {unit} (vs stock) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        paper = PAPER_SECONDS.get(s.sampler, {})
        seconds = paper.get(s.mode)
        paper_speedup = paper["stock"] / seconds if seconds else None
        memory = PAPER_MEMORY_GB.get(s.mode) if s.sampler is Sampler.DDIM else None
        lines.append(
            f"| {s.sampler.value} | {s.mode} | {seconds if seconds is not None else '–'} "
            f"| {f'{paper_speedup:.2f}x' if paper_speedup else '–'} | {s.e2e:.3f} | {s.e2e_speedup:.2f}x "
            f"| {memory if memory is not None else '–'} "
            f"| {s.peak_memory / 1e9:.2f} ({s.memory_vs_stock:.2f}x) |"
        )
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--size", type=int, choices=(256, 512, 1024), default=512, help="speed run size in px"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per sampler and mode")
    parser.add_argument("--samplers", default="DDIM-50,DPM-Solver-20", help="samplers of the speed run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny models at 16 px, 1 repeat: a smoke run of the same code (for CI, on the CPU)",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="exactness dtypes (default: float16,float32 on CUDA; float32 on the CPU)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu-check.md")
    args = parser.parse_args(argv)
    try:
        args.torch_device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.torch_device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    default = "float16,float32" if args.torch_device.type == "cuda" else "float32"
    names = [name.strip() for name in (args.dtypes or default).split(",") if name.strip()]
    if not names or any(name not in ("float16", "float32") for name in names):
        parser.error(f"--dtypes must list float16 and/or float32, got {args.dtypes!r}")
    args.dtype_list = [getattr(torch, name) for name in names]
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def cuda_missing_message() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"gpu-check: torch {torch.__version__} ({build}) sees no CUDA GPU (torch.cuda.is_available() is "
        "false). Run it on a machine with an NVIDIA GPU and a CUDA build of torch installed (this script "
        "installs nothing), or pass --device cpu to run the same checks on the CPU."
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.torch_device
    if device.type == "cuda" and not torch.cuda.is_available():
        print(cuda_missing_message(), file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if cuda:
        # fp32 checks in true fp32: TF32 convolutions would round differently per batch shape.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    command = "script/gpu-check " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    checks = exactness_checks(device, args.dtype_list, size=16 if args.quick else 32)

    attentions = ["sdpa"]
    if cuda and importlib.util.find_spec("xformers") is not None:
        try:
            import xformers.ops  # noqa: F401

            attentions.append("xformers")
        except Exception as error:  # any import failure means: no xformers run
            _log(f"xformers does not import ({error}); SDPA only")
    runs: list[tuple[str, speed.Benchmark]] = []
    for attention in attentions:
        speed_argv = [
            "--device",
            args.device,
            "--samplers",
            args.samplers,
            "--attention",
            attention,
        ]
        speed_argv += ["--repeats", str(args.repeats), "--dtype", "float16" if cuda else "float32"]
        speed_argv += ["--quick"] if args.quick else ["--size", str(args.size)]
        out = Path(tempfile.gettempdir()) / f"faster-diffusion-gpu-check-speed-{attention}.md"
        runs.append((attention, speed.benchmark([*speed_argv, "--out", str(out)])))

    name = torch.cuda.get_device_name(device) if cuda else speed._cpu_model()
    report = [
        f"# GPU check: {name}",
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers "
        f"{diffusers.__version__}, Python {platform.python_version()}",
        "",
        "## Exactness (tiny SD-shaped model on the device)",
        "",
        "Tolerance: max |ours - reference| <= atol + rtol x max |reference|, with (atol, rtol) = "
        + "; ".join(
            f"{n}, {str(d).removeprefix('torch.')}: ({a:g}, {r:g})" for (n, d), (a, r) in TOLERANCES.items()
        )
        + ". TF32 is off for the fp32 checks.",
        "",
        *exactness_table(checks),
    ]
    for attention, result in runs:
        model = (
            "tiny SD-shaped model, 16 px (a smoke run)"
            if args.quick
            else f"SD v1.5 architecture, {args.size} px"
        )
        report += [
            "",
            f"## Speed and memory: {model}, {'fp16' if cuda else 'fp32'}, {attention}, against the paper",
            "",
            "The paper's figures are from an A40, SD v1.5, 512 px, fp16; its memory figures are for DDIM-50. "
            "Measured: end-to-end medians; the batched mode uses the automatic decoder-batch cap.",
            "",
            *paper_table(result.summaries, cuda),
            "",
            "<details><summary>Full speed report</summary>",
            "",
            result.report.replace("\n# ", "\n### ").replace("\n## ", "\n### "),
            "</details>",
        ]
    text = "\n".join(report) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    failed = [c for c in checks if not c.passed]
    _log(f"wrote {args.out}; exactness: {len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
