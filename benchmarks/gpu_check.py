"""One command that checks faster diffusion on a CUDA GPU: exactness, then speed and memory against the paper.

On a machine with a CUDA GPU and a CUDA build of torch (this script installs nothing):

1. Exactness, on the device, in fp16 and fp32, with a tiny SD-shaped model (the properties of METHOD.md):
   identity (every step a key step, no noise injection: stock output), parallel = sequential (batched decoder
   against one step at a time), and call counts (the encoder runs |K| times, the decoder N times).
2. Speed, with ``benchmarks/speed.py``'s machinery: the SD v1.5 architecture with random weights at 512 px in
   fp16, with PyTorch SDPA and, when it imports, xformers; DDIM-50 and DPM-Solver-20, each as stock,
   propagation and batched, and in the same interleaved repeats:

   - the product's default, deep reuse with ``faster_diffusion.policy.default_key_steps(..., mode="deep")``:
     ``auto:13`` with DDIM-50 and ``auto:6@feature`` with DPM-Solver-20, which need a calibration that random
     weights lack, so they are timed as 13 and 6 full steps spread evenly (``deep-full:13``, ``deep-full:6``:
     a partial step costs the same wherever it falls); ``uniform:3`` with DPM-Solver++-20;
   - DeepCache (``DeepCacheSDHelper``, branch 0) with the smallest interval that has no more full steps than
     the default (``cache_interval`` 4 with DDIM-50 and DPM-Solver-20), when the ``DeepCache`` package imports
     (the report says so when it does not);
   - deep reuse with ``batched=True`` at DeepCache's interval, whose partial steps run in one UNet batch with
     their full step (a gain only kernel launches can show);
   - with ``--compile`` (the default on CUDA, not on the CPU): stock and the default again with
     ``pipe.unet.compile()``, each after ``--compile-warmups`` untimed warm-ups (compilation is not timed),
     so that the default's speedup is also measured against a compiled stock (a stock bound by kernel
     launches flatters every cache); a compiled mode that fails is reported with its error.

   Medians over repeats, and the peak of ``torch.cuda.max_memory_allocated``.
3. A Markdown report with the paper's A40 figures beside the measured ones, and a table of every mode of the
   run with its full and partial steps, seconds per image, speedups against stock and against compiled
   stock, and peak memory.

    script/gpu-check                                   # -> benchmarks/results/gpu-check.md
    script/gpu-check --device cpu --quick --out /tmp/gpu-check.md   # the same code on the CPU, tiny, seconds
    script/gpu-check --device cpu --quick --compile --out /tmp/gpu-check.md   # with compiled rows: a minute
    script/gpu-check --from-json /tmp/gpu-check.json --out /tmp/again.md   # the report again, from its JSON

The report is rendered from the JSON written beside it alone (the checks, the plans, each speed run's JSON
and the facts of the run), so ``--from-json`` writes it again.
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
from benchmarks.harness import report as harness_report  # noqa: E402
from benchmarks.harness.timing import device_name  # noqa: E402
from faster_diffusion import (  # noqa: E402
    FasterDiffusionConfig,
    KeySteps,
    NoiseInjection,
    Sampler,
    apply_faster_diffusion,
    use_sampler,
)
from faster_diffusion.policy import default_key_steps  # noqa: E402
from faster_diffusion.schedule import KeyStepKind  # noqa: E402
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


@dataclass(frozen=True)
class Plan:
    """What the speed run times with one sampler beside the paper's three modes."""

    sampler: Sampler
    #: The product's default key steps, as ``faster_diffusion.policy.default_key_steps`` gives them.
    default_keys: KeySteps
    #: The ``speed.py`` mode that times the default, e.g. ``deep-full:13``.
    default: str
    #: The ``speed.py`` mode that times DeepCache with as many full steps, e.g. ``deepcache:4``.
    deepcache: str
    #: Full steps of the default.
    full: int

    @property
    def as_given(self) -> bool:
        """Whether the default is timed with its own key steps (uniform), not a stand-in of equal cost."""
        return self.default_keys.kind is KeyStepKind.UNIFORM

    @property
    def default_label(self) -> str:
        timed_as = "" if self.as_given else f", timed as `{self.default}`"
        return f"default: deep reuse `{self.default_keys}`{timed_as}"

    @property
    def cache_interval(self) -> int:
        return int(self.deepcache.partition(":")[2])

    @property
    def batched(self) -> str:
        """The ``speed.py`` mode of deep reuse with ``batched=True`` at DeepCache's interval: a full step and
        its partial steps in one UNet batch, which only a GPU's launch costs can reward."""
        return f"deep-batched:{self.cache_interval}"


def plan_record(p: Plan) -> dict:
    """A plan as the JSON keeps it."""
    return {
        "sampler": p.sampler.value,
        "default_keys": str(p.default_keys),
        "default": p.default,
        "deepcache": p.deepcache,
        "full": p.full,
    }


def plan_of(record: dict) -> Plan:
    """A plan of the JSON (:func:`plan_record`)."""
    return Plan(
        Sampler.parse(record["sampler"]),
        KeySteps.parse(record["default_keys"]),
        record["default"],
        record["deepcache"],
        record["full"],
    )


def plan(sampler: Sampler) -> Plan:
    """The default and DeepCache modes timed with ``sampler``. The default is deep reuse with the key steps of
    ``default_key_steps(pipe, sampler, steps, mode="deep")``; a calibrated placement (``auto:B``) is timed as
    B full steps spread evenly, since random weights have no calibration and a partial step costs the same
    wherever it falls. DeepCache gets the smallest interval with no more full steps: ``ceil(N / B)``."""
    steps = sampler.default_steps
    keys = default_key_steps(None, sampler, steps, mode="deep")  # the pipeline matters to mode="encoder" only
    if keys.kind is KeyStepKind.AUTO:
        full = keys.budget or len(KeySteps.paper().resolve(steps).indices)
    else:
        full = len(keys.resolve(steps).indices)
    default = f"deep:{keys.every}" if keys.kind is KeyStepKind.UNIFORM else f"deep-full:{full}"
    return Plan(sampler, keys, default, f"deepcache:{-(-steps // full)}", full)


def deepcache_missing() -> str | None:
    """``None`` when DeepCache imports, else why it does not."""
    try:
        from DeepCache import DeepCacheSDHelper  # noqa: F401
    except Exception as error:  # any import failure means: no DeepCache row
        return speed.error_text(error)
    return None


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
                    and (stats.full_passes, stats.full_passes + stats.partial_passes) == (keys, steps),
                    f"encoder ran {counter.encoder_calls} times (|K| = {keys}), decoder {counted[1]} steps "
                    f"(N = {steps}) in {stats.unet_batches} batches",
                )
            )
    return checks


def check_record(c: Check) -> dict:
    """A check as the JSON keeps it."""
    return {
        "name": c.name,
        "sampler": c.sampler.value,
        "dtype": str(c.dtype).removeprefix("torch."),
        "passed": c.passed,
        "detail": c.detail,
    }


def check_of(record: dict) -> Check:
    """A check of the JSON (:func:`check_record`)."""
    dtype = getattr(torch, record["dtype"])
    return Check(record["name"], Sampler.parse(record["sampler"]), dtype, record["passed"], record["detail"])


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
        if s.mode not in speed.MODES:
            continue
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


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _seconds(summary: speed.Summary) -> str:
    values = [r.e2e_seconds for r in summary.runs]
    spread = f" ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 else ""
    return f"{summary.e2e:.3f}{spread}"


def modes_table(
    result: speed.Benchmark,
    plans: Sequence[Plan],
    deepcache_error: str | None,
    compiled: bool,
    cuda: bool,
) -> list[str]:
    """Every mode of the speed run side by side, per sampler: full / partial steps, seconds per image, the
    speedup against stock and, for the compiled rows, against compiled stock, and peak memory; a row for
    DeepCache that says it is not installed, and compiled rows that failed, with their error."""
    unit = "GB" if cuda else "GB (peak RSS)"
    lines = [
        "| sampler | mode | full / partial steps | s/img, median (min–max) | speedup vs stock "
        f"| speedup vs compiled stock | peak memory {unit} (vs stock) |",
        "|---|---|---|---|---|---|---|",
    ]
    summaries = {(s.sampler, s.mode): s for s in result.summaries}
    for p in plans:
        rows = [
            ("stock", "stock"),
            (speed.PROPAGATION_MODE, "propagation (paper's key steps)"),
            (speed.BATCHED_MODE, "propagation+batched (paper's key steps)"),
            (p.default, p.default_label),
            (p.deepcache, f"DeepCache, `cache_interval={p.cache_interval}`"),
            (p.batched, f"deep reuse, `batched=True`, `uniform:{p.cache_interval}`"),
        ]
        if compiled:
            rows += [
                ("stock" + speed.COMPILED, "stock, compiled"),
                (p.default + speed.COMPILED, "default, compiled"),
            ]
        compiled_stock = summaries.get((p.sampler, "stock" + speed.COMPILED))
        for mode, label in rows:
            row = f"| {p.sampler.value} | {label} "
            summary = summaries.get((p.sampler, mode))
            if mode == p.deepcache and deepcache_error is not None:
                lines.append(
                    row + f"| – | not installed: `DeepCache` does not import ({_cell(deepcache_error)}) "
                    "| – | – | – |"
                )
            elif summary is None:
                error = result.failed.get((p.sampler, mode), "not timed")
                lines.append(row + f"| – | failed: {_cell(error)} | – | – | – |")
            else:
                first = summary.runs[0]
                if not mode.endswith(speed.COMPILED):
                    against_compiled = "–"
                elif compiled_stock is None:
                    against_compiled = "– (compiled stock failed)"
                else:
                    against_compiled = f"{compiled_stock.e2e / summary.e2e:.2f}x"
                lines.append(
                    row + f"| {first.encoder_passes} / {first.decoder_passes - first.encoder_passes} "
                    f"| {_seconds(summary)} | {summary.e2e_speedup:.2f}x | {against_compiled} "
                    f"| {summary.peak_memory / 1e9:.2f} ({summary.memory_vs_stock:.2f}x) |"
                )
    return lines


def modes_notes(
    result: speed.Benchmark, plans: Sequence[Plan], deepcache_error: str | None, compiled: bool, warmups: int
) -> list[str]:
    """What the rows of :func:`modes_table` are and how they were timed."""
    defaults = "; ".join(
        f"{p.sampler.value}: `{p.default_keys}`"
        + (
            f", timed as `{p.default}` ({p.full} full steps spread evenly: a calibrated placement needs a "
            "calibration, which random weights lack, and costs the same, since a partial step costs the "
            "same wherever it falls)"
            if not p.as_given
            else f" (`{p.default}`, {p.full} full steps)"
        )
        for p in plans
    )
    notes = [
        "- Every row is from the same run as the table above, all modes interleaved in every repeat; seconds "
        "per image are end to end (`pipe(...)`), speedups are ratios of medians.",
        "- Full / partial steps: a full step runs the whole UNet; a partial one runs the decoder alone "
        "(propagation) or only the outermost layers (deep reuse and DeepCache, branch 0).",
        "- **Default**: the product's, deep reuse (`DeepReuseConfig`, branch 0) with the key steps of "
        f'`faster_diffusion.policy.default_key_steps(pipe, sampler, steps, mode="deep")`: {defaults}.',
    ]
    if deepcache_error is None:
        notes.append(
            "- **DeepCache**: `DeepCacheSDHelper` with `cache_branch_id=0` and the smallest `cache_interval` "
            "I whose full steps, ceil(N / I) of N, are no more than the default's: "
            + "; ".join(f"{p.sampler.value}: {p.cache_interval}" for p in plans)
            + "."
        )
    else:
        notes.append(
            f"- **DeepCache**: not installed (the `DeepCache` package does not import: {deepcache_error}); "
            "`pip install DeepCache` to time it."
        )
    notes.append(
        "- **Batched deep reuse**: `DeepReuseConfig(batched=True)` at DeepCache's interval (the same full "
        "steps): a partial step also reuses `conv_in`, so a full step and the partial steps after it run as "
        "one UNet batch, capped as the batched decoder is. It costs some quality on the reference models and "
        "gains nothing on a CPU (`benchmarks/README.md`, deep_variants.py); this row says whether a GPU, "
        "where a partial step is bound by kernel launches, rewards it."
    )
    if compiled:
        graphs = [
            r.graphs_compiled
            for s in result.summaries
            if s.mode.endswith(speed.COMPILED)
            for r in s.runs
            if r.graphs_compiled is not None
        ]
        notes.append(
            "- **Compiled**: stock and the default again with `pipe.unet.compile()` (torch.compile's "
            "defaults), each on a copy of the UNet that shares its weights, the default attached once for "
            f"all its runs; {warmups} untimed warm-up{'s' if warmups != 1 else ''} of each compiled mode "
            "before the timed repeats, where the compilation happens (the other modes: one); graphs compiled "
            f"during the timed runs: {sum(graphs)}"
            + (" (some compilation was timed: rerun with more --compile-warmups)" if sum(graphs) else "")
            + f"; {speed.limit_line(result.recompile_limit_hits)}. 'Speedup vs compiled stock' is compiled "
            "stock's median over the row's: a stock whose time goes to launching kernels flatters every "
            "cache, and a compiled stock launches fewer."
        )
    else:
        notes.append("- **Compiled**: not timed (`--no-compile`; the default on the CPU).")
    return notes


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
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time stock and the default with pipe.unet.compile() (default: on with cuda, off with cpu)",
    )
    parser.add_argument(
        "--compile-warmups",
        type=int,
        default=speed.COMPILE_WARMUPS,
        help=f"untimed runs of each compiled mode before the timed ones (default {speed.COMPILE_WARMUPS})",
    )
    parser.add_argument("--out", type=Path, default=None, help="the report, its JSON beside it")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="write the report again from a run's .json to --out (default: beside the JSON); nothing runs",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        default = REPO_ROOT / "benchmarks" / "results" / "gpu-check.md"
        args.out = args.from_json.with_suffix(".md") if args.from_json is not None else default
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
    if args.compile_warmups < 1:
        parser.error(f"--compile-warmups must be >= 1, got {args.compile_warmups}")
    if args.compile is None:
        args.compile = args.torch_device.type == "cuda"
    try:
        args.sampler_list = [Sampler.parse(name) for name in args.samplers.split(",") if name.strip()]
    except ValueError as error:
        parser.error(f"--samplers: {error}")
    if not args.sampler_list:
        parser.error("--samplers: give at least one sampler")
    return args


def cuda_missing_message() -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"gpu-check: torch {torch.__version__} ({build}) sees no CUDA GPU (torch.cuda.is_available() is "
        "false). Run it on a machine with an NVIDIA GPU and a CUDA build of torch installed (this script "
        "installs nothing), or pass --device cpu to run the same checks on the CPU."
    )


def render(data: dict) -> str:
    """The report of a run's JSON ``data``, and the settings its recorded command line parses to."""
    args = parse_args(data["argv"])
    cuda = args.torch_device.type == "cuda"
    checks = [check_of(c) for c in data["checks"]]
    plans = [plan_of(p) for p in data["plans"]]
    deepcache_error = data["deepcache_error"]
    runs = [(attention, speed.result_of(saved)) for attention, saved in data["speed"]]
    versions = data["versions"]
    name = data["device_name"]
    report = [
        f"# GPU check: {name}",
        "",
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; torch {versions['torch']} (CUDA {versions['cuda']}), diffusers "
        f"{versions['diffusers']}, Python {versions['python']}",
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
            "### The product's default, DeepCache and a compiled UNet, beside the paper's modes (same run)",
            "",
            *modes_table(result, plans, deepcache_error, args.compile, cuda),
            "",
            *modes_notes(result, plans, deepcache_error, args.compile, args.compile_warmups),
            "",
            "<details><summary>Full speed report</summary>",
            "",
            result.report.replace("\n# ", "\n### ").replace("\n## ", "\n### "),
            "</details>",
        ]
    return "\n".join(report) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        harness_report.report_again(args, render)
        return 0
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
    deepcache_error = deepcache_missing()
    if deepcache_error is not None:
        _log(f"DeepCache does not import ({deepcache_error}); no DeepCache row")
    plans = [plan(sampler) for sampler in args.sampler_list]
    extra = [f"{p.default}@{p.sampler.value}" for p in plans]
    extra += [f"{p.batched}@{p.sampler.value}" for p in plans]
    if deepcache_error is None:
        extra += [f"{p.deepcache}@{p.sampler.value}" for p in plans]
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
        speed_argv += ["--extra-modes", ",".join(extra)]
        if args.compile:
            compiled = ",".join(["stock", *(f"{p.default}@{p.sampler.value}" for p in plans)])
            speed_argv += ["--compile", compiled, "--compile-warmups", str(args.compile_warmups)]
        out = Path(tempfile.gettempdir()) / f"faster-diffusion-gpu-check-speed-{attention}.md"
        runs.append((attention, speed.benchmark([*speed_argv, "--out", str(out)])))

    data = {
        "argv": list(sys.argv[1:] if argv is None else argv),
        "command": command,
        "date": date,
        "device_name": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "checks": [check_record(c) for c in checks],
        "deepcache_error": deepcache_error,
        "plans": [plan_record(p) for p in plans],
        "speed": [[attention, result.data] for attention, result in runs],
    }
    harness_report.write(args.out, data, render)
    failed = [c for c in checks if not c.passed]
    _log(f"wrote {args.out}; exactness: {len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
