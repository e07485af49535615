"""Speed of faster diffusion against stock diffusers, on the SD v1.5 or SDXL architecture, on this machine.

Builds Stable Diffusion v1.5 exactly as published (UNet, VAE, CLIP text encoder, scheduler config;
``benchmarks/models.py``) but with random weights, since the weights do not change the cost of a forward
pass, and times three modes in one process with the repeats interleaved (round-robin), so that drift of the
machine hits every mode alike:

- ``stock``: plain diffusers, nothing attached;
- ``propagation``: encoder propagation with the paper's key steps, decoder one step at a time;
- ``propagation+batched``: the same, with the decoder passes of each group run as one batch (the paper's
  parallel decoder).

Both accelerated modes use prior noise injection (the paper's setting; it costs nothing). The batched mode
caps its decoder batch with ``--max-decoder-batch`` (default ``auto``, the package's default). For each
sampler and mode it reports the UNet-loop and end-to-end seconds per image (medians), the speedups over stock
(ratios of medians), the encoder and decoder pass counts, and the peak memory against stock: the process's
peak RSS on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA. It also measures the share of a UNet step
spent in the encoder (``conv_in`` + down blocks + mid block, at the CFG batch of 2), and the bound that share
puts on propagation alone: ``N / (N - (N - |K|) * share)``.

``--extra-modes`` adds other modes to the same interleaved repeats (deep reuse, DeepCache; ``MODE@SAMPLER``
times one with that sampler only), and ``--compile`` times modes again with ``pipe.unet.compile()``: each on a
copy of the UNet that shares its weights (no extra memory), with the mode's reuse attached once for all its
runs, and ``--compile-warmups`` untimed warm-ups first, so that no compilation is timed. A compiled mode that
fails is reported with its error instead of ending the run.

With ``--model sdxl`` it builds SDXL base 1.0 the same way (UNet, VAE, both text encoders, scheduler config;
``StableDiffusionXLPipeline``) and also measures the encoder share at ``--share-sizes`` (default 256 and 512
px), since the share changes with the size. SDXL runs at 256 px by default: 512 px fits in memory (about 14
GB), but one SDXL UNet call at CFG batch 2 took 37 s at 512 px on one thread of this 2-core CPU (9 s at 256
px), so a stock DDIM-50 image alone takes about half an hour there. The paper gives no SDXL key steps, so the
accelerated modes use its preset (9 of 50, 7 of 20); the cost depends only on their count and groups.

    python benchmarks/speed.py                       # 256 px, 3 repeats -> benchmarks/results/speed-256.md
    python benchmarks/speed.py --size 512
    python benchmarks/speed.py --device cuda --dtype float16 --size 512   # on a GPU (script/gpu-check)
    python benchmarks/speed.py --quick --out /tmp/speed-quick.md   # tiny model, seconds (smoke test)
    python benchmarks/speed.py --model sdxl --samplers DPM-Solver-20 --repeats 1   # -> speed-sdxl-256.md
    python benchmarks/speed.py --model sdxl --samplers DPM-Solver-20 --repeats 1 --dry-run   # check, estimate
    python benchmarks/speed.py --quick --extra-modes deep:3@DPM-Solver-20 --compile stock,deep:3@DPM-Solver-20
    python benchmarks/speed.py --from-json /tmp/speed-quick.json --out /tmp/again.md   # again, from its JSON

The run's measurements and facts go to a JSON beside the report, and the report is rendered from that JSON
alone (and the settings its recorded command line parses to), so ``--from-json`` writes it again.
"""

from __future__ import annotations

import argparse
import collections
import copy
import ctypes
import dataclasses
import datetime
import functools
import gc
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script (python benchmarks/speed.py): make the package importable
    sys.path.insert(0, str(REPO_ROOT))

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from benchmarks.harness import report as harness_report  # noqa: E402
from benchmarks.harness.methods import Context, attach, timed_kinds  # noqa: E402
from benchmarks.harness.timing import cpu_model, device_name, interleaved, median, spread  # noqa: E402
from benchmarks.models import build_sd15_pipeline, build_sdxl_pipeline  # noqa: E402
from faster_diffusion import (  # noqa: E402
    KeySteps,
    Sampler,
    use_sampler,
)
from fixtures.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline  # noqa: E402

MODES = ("stock", "propagation", "propagation+batched")
PROPAGATION_MODE = "propagation"
BATCHED_MODE = "propagation+batched"
#: Extra modes ``--extra-modes`` can add, each with a full-step interval I (``uniform:I``):
#: ``deep:I`` and ``deep+forecast:I`` (this package's deep reuse, branch 0, copy or linear forecast) and
#: ``deepcache:I`` (DeepCache's own ``DeepCacheSDHelper``, branch 0: install ``deepcache`` for it; a peer,
#: never a dependency of the package); and ``deep-full:B``, deep reuse with B full passes spread evenly
#: (steps ``round(i * N / B)``): a calibrated placement of B full passes costs the same, since a partial step
#: costs the same wherever it falls; ``deep-batched:I``, deep reuse at ``uniform:I`` with ``batched=True`` (a
#: full step and its partial steps run as one UNet batch, capped by ``--max-decoder-batch``).
#: A peer registered in ``benchmarks/harness/methods.py`` with ``timed_kinds`` is one more.
EXTRA_MODE_KINDS = timed_kinds()


def parse_extra_mode(text: str, option: str = "--extra-modes") -> tuple[str, int]:
    """``"deep:3"`` -> ``("deep", 3)``; raises ``ValueError`` naming ``option`` otherwise."""
    kind, _, interval = text.partition(":")
    if kind not in EXTRA_MODE_KINDS or not interval.isdigit() or int(interval) < 1:
        raise ValueError(
            f"{option}: {text!r} must be KIND:I with KIND one of {', '.join(EXTRA_MODE_KINDS)} and I a "
            "whole number >= 1"
        )
    return kind, int(interval)


#: Appended to the name of a mode timed with a compiled UNet (``--compile``): ``stock (compiled)``.
COMPILED = " (compiled)"
#: Untimed runs of each compiled mode before its timed ones (``--compile-warmups``): Dynamo compiles in the
#: first; a second one catches what only a second run compiles.
COMPILE_WARMUPS = 2


def parse_modes(option: str, text: str, samplers: Sequence[Sampler]) -> list[tuple[str, Sampler | None]]:
    """The comma-separated modes of ``option``, each ``MODE`` (with every sampler) or ``MODE@SAMPLER`` (with
    that sampler only), as ``(mode, sampler or None)`` in order, without repeats. ``--extra-modes`` takes
    the extra modes (``KIND:I``), ``--compile`` also the three of :data:`MODES`; raises ``ValueError`` naming
    ``option`` otherwise."""
    found: list[tuple[str, Sampler | None]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        mode, at, name = (part.strip() for part in item.partition("@"))
        sampler = None
        if at:
            try:
                sampler = Sampler.parse(name)
            except ValueError as error:
                raise ValueError(f"{option}: {item!r}: {error}") from None
            if sampler not in samplers:
                raise ValueError(f"{option}: {item!r} names {sampler.value}, which --samplers does not time")
        if not (option == "--compile" and mode in MODES):
            parse_extra_mode(mode, option)
        if (mode, sampler) not in found:
            found.append((mode, sampler))
    return found


def modes_of(sampler: Sampler, extra: Sequence[tuple[str, Sampler | None]]) -> list[str]:
    """The modes of ``extra`` (:func:`parse_modes`) that ``sampler`` is timed with."""
    modes = [mode for mode, only in extra if only in (None, sampler)]
    return list(dict.fromkeys(modes))


#: Targets of our issue, as end-to-end speedups over stock in the same run at 256 px on the CPU.
TARGET_SIZE = 256
TARGET_PROPAGATION_BOUND_FRACTION = 0.97
TARGET_BATCHED_SPEEDUP = {Sampler.DDIM: 1.6, Sampler.DPM_SOLVER: 1.7}

DEFAULT_PROMPT = "a photo of an astronaut riding a horse on the moon"
MEMORY_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class ModelSpec:
    """One architecture the benchmark can build: at full size, and as a tiny model for ``--quick``."""

    label: str
    build: Callable[[int], Any]
    tiny_label: str
    build_tiny: Callable[[int], Any]
    default_size: int
    #: Image sizes of the extra encoder-share measurement by default (``--share-sizes``).
    share_sizes: tuple[int, ...]
    #: Inserted into the default report name: ``speed{infix}-{size}.md``.
    out_infix: str


#: SDXL's default size is 256 px. 512 px fits in memory (the process peaks at about 14 GB), but one SDXL UNet
#: call at CFG batch 2 took 37 s at 512 px on one thread of this 2-core CPU (9 s at 256 px), so a stock
#: DDIM-50 image takes about 31 min there, and a comparison of the three modes with one sampler about an
#: hour even with DPM-Solver-20 and a single repeat. The encoder share, the number the bound comes from, is
#: measured at 512 px as well (``--share-sizes``, a few UNet calls).
MODELS: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        label="SD v1.5 architecture (published configs), random weights",
        build=build_sd15_pipeline,
        tiny_label="tiny SD-shaped test model (fixtures/tiny.py), random weights",
        build_tiny=build_tiny_pipeline,
        default_size=256,
        share_sizes=(),
        out_infix="",
    ),
    "sdxl": ModelSpec(
        label="SDXL base 1.0 architecture (published configs), random weights",
        build=build_sdxl_pipeline,
        tiny_label="tiny SDXL-shaped test model (fixtures/tiny.py), random weights",
        build_tiny=build_tiny_sdxl_pipeline,
        default_size=256,
        share_sizes=(256, 512),
        out_infix="-sdxl",
    ),
}


#: What the SDXL report says about its key steps and its encoder share.
SDXL_NOTES: tuple[str, ...] = (
    "## SDXL: key steps and where its transformer layers are",
    "",
    "- **Key steps.** The paper gives no key-step preset for SDXL, and a calibration "
    "(`faster_diffusion.calibration`) on random weights would mean nothing, so the accelerated modes use "
    "the paper's preset for SD (9 key steps of 50 for DDIM, 7 of 20 for DPM-Solver). What a run costs "
    "depends only on how many key steps there are and, for the batched decoder, on the sizes of the groups "
    "between them, not on the weights: these timings hold for SDXL key steps with the same budget and "
    "similar groups.",
    "- **Encoder share.** SDXL puts 10 transformer layers in every attention of its lowest resolution "
    "(two in the lowest down block and the mid block, all encoder, and three in the lowest up block): 34 "
    "of its 70 transformer layers are in the encoder. SD v1.5 has 7 of 16 there, and most of its attention "
    "cost is at its highest resolution, where SDXL has no attention at all. SD v1.5's encoder share at 256 "
    "px on 2-core CPUs: 30.9% (Xeon, `results/speed-256.md`), 36.2% (AMD EPYC, "
    "`results/speed-256-amd-whole-groups.md`); on an H100, 42.5% at 512 px and 36.4% at 1024 px "
    "(`results/gpu-check*.md`). The share changes with the size, so it is also measured at "
    "`--share-sizes`.",
)


# ------------------------------------------------------------------------------------------ measurement


def _malloc_trim() -> bool:
    """Hand freed heap memory back to the OS (glibc), so that RSS growth during the next call is real."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def _rss_reader() -> Callable[[], int]:
    try:
        import psutil

        process = psutil.Process()
        return lambda: process.memory_info().rss
    except ImportError:  # Linux fallback
        page = os.sysconf("SC_PAGE_SIZE")

        def read() -> int:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * page

        return read


class RssSampler:
    """Polls this process's RSS every ``interval`` seconds on a thread; keeps (time, rss) samples."""

    def __init__(self, interval: float = MEMORY_POLL_SECONDS) -> None:
        self.interval = interval
        self.read = _rss_reader()
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.baseline = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.read()))

    def peak_increase(self, start: float = -math.inf, end: float = math.inf) -> int:
        """Largest RSS minus the baseline among samples taken within [start, end] (bytes, >= 0)."""
        window = [rss for t, rss in self.samples if start <= t <= end] or [self.baseline]
        return max(0, max(window) - self.baseline)


class CpuUse:
    """CPU time used by *other* processes over an interval, as a share of the machine's capacity."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
            with open("/proc/self/stat") as own:
                own_fields = own.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        busy_all = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
        busy_own = int(own_fields[11]) + int(own_fields[12])  # utime + stime, all threads
        return time.perf_counter(), busy_all, busy_own

    def others_percent(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        elapsed = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, 100.0 * others / self.tick / (elapsed * self.ncpu)) if elapsed > 0 else None


@dataclass
class Run:
    sampler: Sampler
    mode: str
    repeat: int  # -1 for the warm-up
    loop_seconds: float
    e2e_seconds: float
    unet_calls: int
    encoder_passes: int
    decoder_passes: int
    decoder_batches: int
    peak_loop_bytes: int
    peak_call_bytes: int
    others_cpu_percent: float | None
    #: The process's RSS just before the call (weights and everything else already resident).
    rss_before: int = 0
    #: ``torch.cuda.max_memory_allocated`` over the call (CUDA only), weights included.
    peak_device_bytes: int | None = None
    #: (call seconds, encoder seconds) of each UNet call; stock runs only (one encoder pass per call).
    stock_calls: list[tuple[float, float]] = field(default_factory=list)
    #: Seconds of each UNet call of the pipeline, and the key steps (accelerated modes only).
    call_seconds: list[float] = field(default_factory=list)
    key_steps: tuple[int, ...] = ()
    #: Graphs Dynamo compiled during the call (compiled modes only): 0 in a timed run, or compiling was timed.
    graphs_compiled: int | None = None

    def non_key_calls(self) -> list[float]:
        """Seconds of the UNet calls at non-key steps (decoder only, in the one-step-at-a-time mode)."""
        return [seconds for step, seconds in enumerate(self.call_seconds) if step not in self.key_steps]


def _no_sync() -> None:
    pass


def device_sync(device: torch.device) -> Callable[[], None]:
    """What makes a wall-clock reading on ``device`` count the work queued so far."""
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return _no_sync


class UnetClock:
    """Forward hooks that time every call of a UNet and of its encoder (``conv_in`` .. mid block).

    ``sync`` runs before each reading (``torch.cuda.synchronize`` on CUDA, where kernels run asynchronously).
    With ``sync_each_call`` off, only the first reading after :meth:`clear` syncs: the timed runs on CUDA use
    that, since a sync inside every UNet call would stall stock (one call per step) far more often than the
    batched decoder (one call per group) and bias the speedups; their per-call readings then mean nothing,
    and the encoder share is measured in separate, synced calls.

    ``boundaries_only`` is for a UNet compiled with ``Module.compile()``, whose graphs take in its hooks: the
    clock then times only whole calls (no encoder readings), from hooks that Dynamo leaves out of the graphs
    (``torch.compiler.disable``), so that they break the graph only before and after the UNet's work.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        sync: Callable[[], None] = _no_sync,
        *,
        boundaries_only: bool = False,
    ) -> None:
        self.calls: list[float] = []
        self.returns: list[float] = []
        self.encoder_starts: list[float] = []
        self.encoder_ends: list[float] = []
        self.sync_each_call = True
        last = unet.mid_block if unet.mid_block is not None else unet.down_blocks[-1]

        def now() -> float:
            if self.sync_each_call or not self.calls:
                sync()
            return time.perf_counter()

        def call(module: Any, args: Any) -> None:
            self.calls.append(now())

        def returned(module: Any, args: Any, output: Any) -> None:
            self.returns.append(now())

        if boundaries_only:
            self._hooks = [
                unet.register_forward_pre_hook(torch.compiler.disable(call)),
                unet.register_forward_hook(torch.compiler.disable(returned)),
            ]
            return
        self._hooks = [
            unet.register_forward_pre_hook(call),
            unet.register_forward_hook(returned),
            unet.conv_in.register_forward_pre_hook(lambda m, a: self.encoder_starts.append(now())),
            last.register_forward_hook(lambda m, a, o: self.encoder_ends.append(now())),
        ]

    def clear(self) -> None:
        for marks in (self.calls, self.returns, self.encoder_starts, self.encoder_ends):
            marks.clear()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def call_seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.calls, self.returns, strict=True)]

    def stock_calls(self) -> list[tuple[float, float]]:
        """(call seconds, encoder seconds) of each call, for stock calls (one encoder pass per call)."""
        marks = zip(self.calls, self.returns, self.encoder_starts, self.encoder_ends, strict=True)
        return [(end - start, enc_end - enc_start) for start, end, enc_start, enc_end in marks]


def attach_mode(
    pipe: Any,
    sampler: Sampler,
    mode: str,
    steps: int,
    key_steps: KeySteps,
    max_decoder_batch: int | str | None = "auto",
) -> Any:
    """Attach ``mode`` to ``pipe`` (set for ``sampler``) for a run of ``steps`` steps through its registration
    (``benchmarks/harness/methods.py``); return its handle, whose ``remove()`` makes the pipeline stock again
    and whose ``last_run`` has the pass counts, or ``None`` for ``stock``. ``key_steps`` and
    ``max_decoder_batch``: those of the propagation modes (``max_decoder_batch`` also deep reuse's)."""
    context = Context(steps=steps, key_steps=key_steps, max_decoder_batch=max_decoder_batch)
    return attach(pipe, mode, context)


@dataclass
class Bench:
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    size: int
    prompt: str
    negative_prompt: str
    guidance_scale: float
    seed: int
    trim: bool
    clock: UnetClock
    #: Key steps of the accelerated modes.
    key_steps: KeySteps = field(default_factory=KeySteps.paper)
    #: ``FasterDiffusionConfig.max_decoder_batch`` of the batched mode.
    max_decoder_batch: int | str | None = "auto"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: Whether ``pipe.unet`` is compiled (:func:`compiled_bench`): each run counts the graphs Dynamo compiles.
    compiled: bool = False
    #: A mode attached to ``pipe`` for good (a compiled UNet's: attaching it again would make Dynamo
    #: recompile): runs neither switch the sampler nor attach anything, and read their counts from it.
    reuse: Any = None

    def run(self, sampler: Sampler, mode: str, repeat: int, steps: int | None = None) -> Run:
        """One image with ``sampler`` in ``mode`` (``steps`` steps, default the sampler's); the pipeline is
        stock again afterwards (or as :attr:`reuse` left it). ``mode`` may end in :data:`COMPILED`."""
        pipe = self.pipe
        handle = None
        if self.reuse is None:
            use_sampler(pipe, sampler)
            handle = attach_mode(
                pipe,
                sampler,
                mode.removesuffix(COMPILED),
                steps or sampler.default_steps,
                self.key_steps,
                self.max_decoder_batch,
            )
        counts = handle if handle is not None else self.reuse
        steps = steps or sampler.default_steps
        loop_end: list[float] = []
        sync = device_sync(self.device)
        cuda = self.device.type == "cuda"

        def on_step_end(pipeline: Any, index: int, timestep: Any, callback_kwargs: dict) -> dict:
            if index == steps - 1:
                sync()
                loop_end.append(time.perf_counter())
            return {}

        try:
            gc.collect()
            if self.trim:
                _malloc_trim()
            self.clock.clear()
            self.clock.sync_each_call = not cuda
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(self.device)
            cpu = CpuUse()
            graphs = _graphs_compiled() if self.compiled else None
            with torch.inference_mode(), RssSampler() as rss:
                sync()
                start = time.perf_counter()
                pipe(
                    self.prompt,
                    negative_prompt=self.negative_prompt,
                    num_inference_steps=steps,
                    guidance_scale=self.guidance_scale,
                    height=self.size,
                    width=self.size,
                    generator=torch.Generator().manual_seed(self.seed),
                    output_type="pil",
                    callback_on_step_end=on_step_end,
                )
                sync()
                end = time.perf_counter()
            others = cpu.others_percent()
            peak_device = torch.cuda.max_memory_allocated(self.device) if cuda else None
            loop_start = self.clock.calls[0]
            calls = len(self.clock.calls)
            stock_calls = self.clock.stock_calls() if mode == "stock" and not cuda else []
            call_seconds = self.clock.call_seconds() if not cuda else []
            stats = counts.last_run if counts is not None else None
            if graphs is not None:
                graphs = _graphs_compiled() - graphs
        finally:
            self.clock.sync_each_call = True
            if handle is not None:
                handle.remove()
        return Run(
            sampler=sampler,
            mode=mode,
            repeat=repeat,
            loop_seconds=loop_end[0] - loop_start,
            e2e_seconds=end - start,
            unet_calls=calls,
            encoder_passes=stats.full_passes if stats else calls,
            decoder_passes=stats.full_passes + stats.partial_passes if stats else calls,
            decoder_batches=stats.unet_batches if stats else calls,
            peak_loop_bytes=rss.peak_increase(loop_start, loop_end[0]),
            peak_call_bytes=rss.peak_increase(),
            others_cpu_percent=others,
            rss_before=rss.baseline,
            peak_device_bytes=peak_device,
            stock_calls=stock_calls,
            call_seconds=call_seconds,
            key_steps=stats.schedule.indices if stats else (),
            graphs_compiled=graphs,
        )


class RecompileLimitLog(logging.Handler):
    """Collects, while in a ``with`` block, the functions for which Dynamo warns that it hit a recompile
    limit: it runs them uncompiled from then on (a compiled mode's UNet, or only some bookkeeping)."""

    LOGGER = "torch._dynamo.convert_frame"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.functions: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "hit config." in text:
            found = re.search(r"function: '([^']*)' \(([^)]*)\)", text)
            where = f"{found[1]} ({os.path.basename(found[2])})" if found else text.splitlines()[0]
            self.functions.append(where)

    def __enter__(self) -> RecompileLimitLog:
        logging.getLogger(self.LOGGER).addHandler(self)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self)


def _graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` that shares its parameters and buffers (no memory, the same device and dtype).
    Its forward hooks are copied too: copy a UNet before hooking it."""
    shared = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, shared)


def compiled_bench(bench: Bench, unet: UNet2DConditionModel, sampler: Sampler, mode: str) -> Bench:
    """``bench`` on a pipeline of its own, which shares everything with ``bench.pipe`` but the UNet: ``unet``
    (a :func:`shared_copy` of it, not hooked yet), compiled with ``Module.compile()`` (torch.compile's
    defaults), for ``mode`` (without :data:`COMPILED`). A mode other than ``stock`` is attached for good, set
    for ``sampler``: a compiled UNet takes the hooks into its graphs, and attaching them again for every run
    would make Dynamo compile again in every run. Compilation happens at the first run."""
    pipe = type(bench.pipe).from_pipe(bench.pipe, unet=unet)
    pipe.set_progress_bar_config(**getattr(bench.pipe, "_progress_bar_config", {}))
    reuse = None
    if mode != "stock":
        use_sampler(pipe, sampler)
        reuse = attach_mode(
            pipe, sampler, mode, sampler.default_steps, bench.key_steps, bench.max_decoder_batch
        )
    try:
        clock = UnetClock(unet, device_sync(bench.device), boundaries_only=True)
        unet.compile()
    except BaseException:
        if reuse is not None:
            reuse.remove()
        raise
    return dataclasses.replace(bench, pipe=pipe, clock=clock, compiled=True, reuse=reuse)


@dataclass
class UnetTiming:
    """Medians over repeats of stock UNet calls at one CFG batch."""

    group: int  # steps per call (the CFG batch is 2 * group)
    total: float
    encoder: float
    decoder: float
    others_cpu_percent: float | None
    #: Median over the calls of encoder / call.
    share: float = math.nan
    size: int = 0  # image size in px (latent size times the VAE's scale factor), where known


def unet_inputs(unet: UNet2DConditionModel, latent_size: int, batch: int) -> dict[str, Any]:
    """Seeded random keyword arguments of one UNet call at ``batch`` rows and ``latent_size`` latents, with
    SDXL's added conditions (pooled text embedding, six size/crop ids) where the UNet takes them."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, latent_size, latent_size, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=generator),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator).to(unet.device, unet.dtype),
            "time_ids": torch.tensor(
                [[8.0 * latent_size] * 2 + [0.0] * 2 + [8.0 * latent_size] * 2] * batch
            ).to(unet.device, unet.dtype),
        }
    elif config.addition_embed_type is not None:
        raise ValueError(
            f"unet: addition_embed_type {config.addition_embed_type!r}; allowed: None, 'text_time'"
        )
    for name in ("sample", "encoder_hidden_states"):
        inputs[name] = inputs[name].to(unet.device, unet.dtype)
    inputs["timestep"] = torch.full((batch,), 500, device=unet.device)
    return inputs


def time_unet(
    clock: UnetClock, unet: UNet2DConditionModel, latent_size: int, group: int, repeats: int
) -> UnetTiming:
    """Time stock UNet calls at CFG batch ``2 * group`` (one untimed warm-up, then ``repeats``), splitting
    each call into encoder (``conv_in`` .. mid block) and decoder (everything after the mid block)."""
    inputs = unet_inputs(unet, latent_size, 2 * group)
    with torch.inference_mode():
        unet(**inputs)
        clock.clear()
        cpu = CpuUse()
        for _ in range(repeats):
            unet(**inputs)
    calls = clock.stock_calls()
    decoders = [end - encoder_end for end, encoder_end in zip(clock.returns, clock.encoder_ends, strict=True)]
    return UnetTiming(
        group=group,
        total=statistics.median(call for call, _ in calls),
        encoder=statistics.median(encoder for _, encoder in calls),
        decoder=statistics.median(decoders),
        others_cpu_percent=cpu.others_percent(),
        share=statistics.median(encoder / call for call, encoder in calls),
    )


# ------------------------------------------------------------------------------------------ reporting


def _mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f}"


def propagation_bound(num_steps: int, num_key: int, share: float) -> float:
    """The UNet-loop speedup of propagation alone if skipping the encoder were free: N / (N - (N-|K|) s)."""
    return num_steps / (num_steps - (num_steps - num_key) * share)


@dataclass
class Summary:
    sampler: Sampler
    mode: str
    runs: list[Run]
    stock: list[Run]

    @property
    def loop(self) -> float:
        return median([r.loop_seconds for r in self.runs])

    @property
    def e2e(self) -> float:
        return median([r.e2e_seconds for r in self.runs])

    @property
    def loop_speedup(self) -> float:
        return median([r.loop_seconds for r in self.stock]) / self.loop

    @property
    def e2e_speedup(self) -> float:
        return median([r.e2e_seconds for r in self.stock]) / self.e2e

    @property
    def peak_memory(self) -> float:
        return median([peak_memory_bytes(r) for r in self.runs])

    @property
    def memory_vs_stock(self) -> float:
        return self.peak_memory / median([peak_memory_bytes(r) for r in self.stock])


def peak_memory_bytes(run: Run) -> int:
    """The call's peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak RSS."""
    if run.peak_device_bytes is not None:
        return run.peak_device_bytes
    return run.rss_before + run.peak_call_bytes


def results_table(summaries: list[Summary]) -> list[str]:
    lines = [
        "| sampler | mode | UNet loop s/img | loop speedup | end-to-end s/img | e2e speedup "
        "| encoder / decoder passes (decoder batches) | peak RSS increase MiB, loop / call "
        "| peak memory MiB (vs stock) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        first = s.runs[0]
        loops = [r.loop_seconds for r in s.runs]
        e2es = [r.e2e_seconds for r in s.runs]
        peak_loop = median([r.peak_loop_bytes for r in s.runs])
        peak_call = median([r.peak_call_bytes for r in s.runs])
        lines.append(
            f"| {s.sampler.value} | {s.mode} | {s.loop:.2f} ({spread(loops)}) | {s.loop_speedup:.2f}x "
            f"| {s.e2e:.2f} ({spread(e2es)}) | {s.e2e_speedup:.2f}x "
            f"| {first.encoder_passes} / {first.decoder_passes} ({first.decoder_batches}) "
            f"| {_mib(peak_loop)} / {_mib(peak_call)} | {_mib(s.peak_memory)} ({s.memory_vs_stock:.2f}x) |"
        )
    return lines


def bound_table(summaries: list[Summary], share: float) -> tuple[list[str], dict[Sampler, dict[str, float]]]:
    lines = [
        "| sampler | N | key steps | encoder share | loop bound | e2e bound "
        "| propagation loop speedup (% of loop bound) | propagation e2e speedup (% of e2e bound; "
        "% of loop bound) | share implied by propagation loop | saved per non-key step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    found: dict[Sampler, dict[str, float]] = {}
    for s in summaries:
        if s.mode != PROPAGATION_MODE:
            continue
        n = s.runs[0].decoder_passes
        k = s.runs[0].encoder_passes
        stock_loop = median([r.loop_seconds for r in s.stock])
        stock_e2e = median([r.e2e_seconds for r in s.stock])
        loop_bound = propagation_bound(n, k, share)
        ideal_loop = stock_loop / loop_bound
        e2e_bound = stock_e2e / (stock_e2e - stock_loop + ideal_loop)
        implied = (1 - s.loop / stock_loop) * n / (n - k) if n > k else float("nan")
        non_key = median([c for r in s.runs for c in r.non_key_calls()] or [float("nan")])
        saved = 1 - non_key / median([c for r in s.stock for c in r.call_seconds] or [float("nan")])
        found[s.sampler] = {
            "loop_bound": loop_bound,
            "e2e_bound": e2e_bound,
            "loop_fraction": s.loop_speedup / loop_bound,
            "e2e_fraction": s.e2e_speedup / e2e_bound,
            "e2e_fraction_of_loop_bound": s.e2e_speedup / loop_bound,
        }
        f = found[s.sampler]
        lines.append(
            f"| {s.sampler.value} | {n} | {k} | {share:.1%} | {loop_bound:.3f}x | {e2e_bound:.3f}x "
            f"| {s.loop_speedup:.3f}x ({f['loop_fraction']:.1%}) "
            f"| {s.e2e_speedup:.3f}x ({f['e2e_fraction']:.1%}; {f['e2e_fraction_of_loop_bound']:.1%}) "
            # Per-call times exist only where the timed runs sync per call (not on CUDA): '–' otherwise.
            f"| {implied:.1%} | {'–' if math.isnan(saved) else f'{saved:.1%}'} |"
        )
    return lines, found


def targets_lines(summaries: list[Summary], bounds: dict[Sampler, dict[str, float]], size: int) -> list[str]:
    lines = []
    if size != TARGET_SIZE:
        lines.append(f"(The targets are defined at {TARGET_SIZE} px; shown here for information only.)")
        lines.append("")

    def check(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for s in summaries:
        if s.mode == PROPAGATION_MODE and s.sampler in bounds:
            fraction = bounds[s.sampler]["e2e_fraction"]
            lines.append(
                f"- {check(fraction >= TARGET_PROPAGATION_BOUND_FRACTION)}: {s.sampler.value} propagation "
                f"reaches {fraction:.1%} of its end-to-end bound (target >= "
                f"{TARGET_PROPAGATION_BOUND_FRACTION:.0%}); {bounds[s.sampler]['loop_fraction']:.1%} of the "
                "UNet-loop bound"
            )
        if s.mode == BATCHED_MODE and s.sampler in TARGET_BATCHED_SPEEDUP:
            target = TARGET_BATCHED_SPEEDUP[s.sampler]
            lines.append(
                f"- {check(s.e2e_speedup >= target)}: {s.sampler.value} propagation+batched end-to-end "
                f"{s.e2e_speedup:.2f}x (target >= {target:.2f}x)"
            )
    slower = [s for s in summaries if s.mode != "stock" and (s.e2e_speedup < 1 or s.loop_speedup < 1)]
    names = ", ".join(f"{s.sampler.value} {s.mode}" for s in slower)
    lines.append(
        f"- {check(not slower)}: no mode slower than stock" + (f" (slower: {names})" if slower else "")
    )
    return lines


def compiled_line(warmups: int, graphs: Sequence[int], limit_hits: Sequence[str] = ()) -> str:
    """The settings line of the compiled modes: how they are set up, their warm-ups, whether Dynamo compiled
    anything in the timed runs (``graphs``: the graphs it compiled in each), and where it hit a recompile
    limit (``limit_hits``: :class:`RecompileLimitLog`'s functions)."""
    return (
        "- Compiled modes (`--compile`): `pipe.unet.compile()` with torch.compile's defaults, on a copy of "
        "the UNet that shares its weights: one for `stock` with every sampler, one per sampler for any other "
        "mode, which stays attached for all its runs (attaching it again would make Dynamo compile again); "
        f"{warmups} untimed warm-up{'s' if warmups != 1 else ''} each before the timed repeats, where Dynamo "
        f"compiles; graphs compiled during the {len(graphs)} timed compiled runs: {sum(graphs)}"
        + (" (so some compilation was timed: give more --compile-warmups)" if sum(graphs) else "")
        + "; "
        + limit_line(limit_hits)
    )


def limit_line(limit_hits: Sequence[str]) -> str:
    """Where Dynamo hit a recompile limit (:class:`RecompileLimitLog`), and what that means."""
    if not limit_hits:
        return "Dynamo hit no recompile limit"
    counted = ", ".join(f"{name} ({count}x)" for name, count in collections.Counter(limit_hits).items())
    return f"Dynamo hit a recompile limit in {counted}, and ran these uncompiled from then on"


def raw_table(runs: list[Run]) -> list[str]:
    lines = [
        "| repeat | sampler | mode | UNet loop s | end-to-end s | UNet calls | peak RSS +MiB loop / call "
        "| other processes' CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        others = f"{r.others_cpu_percent:.0f}%" if r.others_cpu_percent is not None else "n/a"
        label = "warm-up" if r.repeat < 0 else str(r.repeat + 1)
        lines.append(
            f"| {label} | {r.sampler.value} | {r.mode} | {r.loop_seconds:.2f} | {r.e2e_seconds:.2f} "
            f"| {r.unet_calls} | {_mib(r.peak_loop_bytes)} / {_mib(r.peak_call_bytes)} | {others} |"
        )
    return lines


def decoder_table(timings: list[UnetTiming]) -> list[str]:
    base = timings[0].decoder / timings[0].group
    lines = [
        "| steps per decoder batch g (CFG batch 2g) | UNet call s | encoder s | decoder s "
        "| decoder s per step | vs first row | other processes' CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in timings:
        per_step = t.decoder / t.group
        others = f"{t.others_cpu_percent:.0f}%" if t.others_cpu_percent is not None else "n/a"
        lines.append(
            f"| {t.group} ({2 * t.group}) | {t.total:.3f} | {t.encoder:.3f} | {t.decoder:.3f} "
            f"| {per_step:.3f} | {per_step / base:.2f} | {others} |"
        )
    return lines


def share_size_lines(
    timings: list[UnetTiming], samplers: Sequence[Sampler], key_steps: KeySteps, repeats: int
) -> list[str]:
    """The encoder share measured at each size, and the bound on propagation alone it gives each sampler."""
    plans = [
        (sampler, sampler.default_steps, len(key_steps.resolve(sampler.default_steps).indices))
        for sampler in samplers
    ]
    lines = [
        f"Encoder share by size: stock UNet calls at CFG batch 2 on random inputs, one untimed, then "
        f"{repeats} timed, with the same forward hooks; share = median over the calls of encoder / call.",
        "",
        "| size px | encoder share | median call s | encoder s "
        + "".join(f"| loop bound {sampler.value} ({k} of {n}) " for sampler, n, k in plans)
        + "| other processes' CPU |",
        "|---|---|---|---" + "|---" * len(plans) + "|---|",
    ]
    for t in timings:
        bounds = "".join(f"| {propagation_bound(n, k, t.share):.3f}x " for _, n, k in plans)
        others = f"{t.others_cpu_percent:.0f}%" if t.others_cpu_percent is not None else "n/a"
        lines.append(f"| {t.size} | {t.share:.1%} | {t.total:.3f} | {t.encoder:.3f} {bounds}| {others} |")
    return lines


def estimate_seconds(
    call: float, share: float, overhead: float, samplers: Sequence[Sampler], key_steps: KeySteps, repeats: int
) -> tuple[float, dict[str, float]]:
    """Estimated seconds of the timed runs and warm-ups, from one stock UNet call of ``call`` seconds, the
    encoder ``share`` and ``overhead`` seconds per image outside the loop; and per image of each mode of the
    first sampler. Non-key steps cost ``call * (1 - share)``; the batched mode is taken to cost what
    propagation does (an upper bound: batching saves a little more)."""
    total = 0.0
    per_image: dict[str, float] = {}
    for index, sampler in enumerate(samplers):
        n = sampler.default_steps
        k = len(key_steps.resolve(n).indices)
        stock = n * call + overhead
        accelerated = (k + (n - k) * (1 - share)) * call + overhead
        total += (repeats + 1) * (stock + 2 * accelerated)
        if index == 0:
            per_image = {"stock": stock, PROPAGATION_MODE: accelerated, BATCHED_MODE: accelerated}
    return total, per_image


def dry_run(bench: Bench, args: argparse.Namespace) -> str:
    """Check the full-size path cheaply before a long run: one stock UNet call (after an untimed one) at the
    run's size and at each ``--share-sizes`` size, and one 2-step image of each mode through the whole
    pipeline (text encoders, hooks, VAE decode; key step 0 only, so the batched decoder runs a group).
    Returns a Markdown summary with the run time that the real run should take."""
    pipe = bench.pipe
    _log(f"dry run: stock UNet calls at CFG batch 2, {bench.size} px ...")
    call = time_unet(bench.clock, pipe.unet, bench.size // pipe.vae_scale_factor, 1, 2)
    shares = []
    for share_size in args.share_size_list:
        if share_size == bench.size:
            timing = call
        else:
            _log(f"dry run: stock UNet calls at CFG batch 2, {share_size} px ...")
            timing = time_unet(bench.clock, pipe.unet, share_size // pipe.vae_scale_factor, 1, 1)
        shares.append(dataclasses.replace(timing, size=share_size))
    short = dataclasses.replace(bench, key_steps=KeySteps.explicit((0,)))
    sampler = args.sampler_list[0]
    runs = {}
    for mode in MODES:
        _log(f"dry run: 2-step {sampler.value} image, {mode} ...")
        runs[mode] = short.run(sampler, mode, -1, steps=2)
    passes = {mode: (r.encoder_passes, r.decoder_passes, r.decoder_batches) for mode, r in runs.items()}
    expected = {"stock": (2, 2, 2), PROPAGATION_MODE: (1, 2, 2), BATCHED_MODE: (1, 2, 1)}
    if passes != expected:
        raise RuntimeError(f"dry run: encoder / decoder passes (batches) {passes}, expected {expected}")
    overhead = runs["stock"].e2e_seconds - runs["stock"].loop_seconds
    total, per_image = estimate_seconds(
        call.total, call.share, overhead, args.sampler_list, args.key_step_spec, args.repeats
    )
    total += sum((args.share_repeats + 1) * t.total for t in shares)
    sizes = ",".join(map(str, args.share_size_list)) or "none"
    lines = [
        f"# Dry run: {args.model}, {bench.size} px, {torch.get_num_threads()} threads",
        "",
        f"- one stock UNet call at CFG batch 2: {call.total:.2f} s, encoder {call.encoder:.2f} s "
        f"(share {call.share:.1%}; median of two calls, a rough figure)",
        *(f"- at {t.size} px: {t.total:.2f} s, share {t.share:.1%}" for t in shares),
        "- 2-step images: "
        + ", ".join(f"{mode} {r.e2e_seconds:.1f} s (passes {passes[mode]})" for mode, r in runs.items())
        + f"; {overhead:.1f} s per image outside the UNet loop",
        f"- per image with {args.sampler_list[0].value}: "
        + ", ".join(f"{mode} ~{seconds / 60:.1f} min" for mode, seconds in per_image.items()),
        f"- estimated run (--samplers {','.join(s.value for s in args.sampler_list)} "
        f"--repeats {args.repeats}, one warm-up each, --share-sizes {sizes}; no decoder probe): "
        f"~{total / 60:.0f} min",
    ]
    return "\n".join(lines) + "\n"


def _attention_backend(unet: UNet2DConditionModel) -> str:
    names = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return ", ".join(names)


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        choices=tuple(MODELS),
        default="sd15",
        help="architecture: sd15 (SD v1.5, default) or sdxl (SDXL base 1.0), from the published configs with "
        "random weights",
    )
    parser.add_argument(
        "--size",
        type=int,
        choices=(256, 512, 1024),
        default=None,
        help=f"image size in px (default: {', '.join(f'{m} {v.default_size}' for m, v in MODELS.items())})",
    )
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="pipeline dtype")
    parser.add_argument(
        "--attention", choices=("sdpa", "xformers"), default="sdpa", help="attention kernels (stock: sdpa)"
    )
    parser.add_argument(
        "--max-decoder-batch",
        default="auto",
        help="cap of the batched mode: auto (the default cap), none (whole groups) or a number of steps",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per sampler and mode")
    parser.add_argument(
        "--samplers", default="DDIM-50,DPM-Solver-20", help="comma-separated: DDIM-50, DPM-Solver-20, ..."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Markdown report, its JSON beside it (default: see --quick; with --from-json, beside the JSON)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="write the report again from a run's .json to --out (nothing is timed; the header is the run's)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model at its native 16 px, 1 repeat, 1 thread unless --threads; writes to a "
        "temp file unless --out is given",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and of the random weights")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--channels-last", action="store_true", help="put the UNet in channels_last (applies to every mode)"
    )
    parser.add_argument(
        "--decoder-probe",
        default="",
        help="after the runs, also time stock UNet calls at CFG batch 2g for these g, e.g. 1,2,5,10,15, "
        "to see what batching saves per decoder step",
    )
    parser.add_argument("--probe-repeats", type=int, default=2, help="timed calls per --decoder-probe size")
    parser.add_argument(
        "--share-sizes",
        default=None,
        help="also measure the encoder share in stock UNet calls (CFG batch 2) at these image sizes in px, "
        "e.g. 256,512 (default: "
        + ", ".join(f"{m} {','.join(map(str, v.share_sizes)) or 'none'}" for m, v in MODELS.items())
        + ")",
    )
    parser.add_argument("--share-repeats", type=int, default=3, help="timed calls per --share-sizes size")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build the model, time one stock UNet call at the run's size (and at --share-sizes), run a "
        "2-step image of each mode through the whole pipeline, and print the estimated run time; no report",
    )
    parser.add_argument(
        "--key-steps",
        default="paper",
        help="key steps of the accelerated modes, for every sampler: paper (default), uniform:K or a list",
    )
    parser.add_argument(
        "--no-malloc-trim",
        action="store_true",
        help="do not return freed heap memory to the OS before each call (makes RSS increases unreliable)",
    )
    parser.add_argument(
        "--extra-modes",
        default="",
        help="comma-separated modes to time beside the three: deep:I, deep+forecast:I, deepcache:I, "
        "deep-batched:I (a full step every I steps, branch 0), deep-full:B (B full steps spread evenly); "
        "MODE@SAMPLER times it with that sampler only, e.g. deep:3@DPM-Solver-20",
    )
    parser.add_argument(
        "--compile",
        default="",
        help="comma-separated modes (stock, the other two, or extra modes; MODE@SAMPLER as in --extra-modes) "
        "to time again with pipe.unet.compile(), as 'MODE (compiled)': each on a copy of the UNet that "
        "shares its weights, with the mode attached once for all its runs; a mode that fails to compile or "
        "run is reported with its error",
    )
    parser.add_argument(
        "--compile-warmups",
        type=int,
        default=COMPILE_WARMUPS,
        help=f"untimed runs of each compiled mode before its timed ones (default {COMPILE_WARMUPS})",
    )
    args = parser.parse_args(argv)
    spec = MODELS[args.model]
    if args.size is None:
        args.size = spec.default_size
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.share_repeats < 1:
        parser.error(f"--share-repeats must be >= 1, got {args.share_repeats}")
    try:
        args.share_size_list = (
            list(spec.share_sizes)
            if args.share_sizes is None
            else [int(size) for size in args.share_sizes.split(",") if size.strip()]
        )
    except ValueError:
        parser.error(f"--share-sizes: expected sizes in px separated by commas, got {args.share_sizes!r}")
    if any(size < 8 or size % 8 for size in args.share_size_list):
        parser.error(f"--share-sizes: sizes must be positive multiples of 8 px, got {args.share_sizes!r}")
    if args.probe_repeats < 1:
        parser.error(f"--probe-repeats must be >= 1, got {args.probe_repeats}")
    try:
        args.sampler_list = [Sampler.parse(name) for name in args.samplers.split(",") if name.strip()]
        args.probe_groups = [int(g) for g in args.decoder_probe.split(",") if g.strip()]
    except ValueError as error:
        parser.error(str(error))
    if not args.sampler_list:
        parser.error("--samplers: give at least one sampler")
    try:
        extra = parse_modes("--extra-modes", args.extra_modes, args.sampler_list)
        args.compile_list = parse_modes("--compile", args.compile, args.sampler_list)
    except ValueError as error:
        parser.error(str(error))
    if args.compile_warmups < 1:
        parser.error(f"--compile-warmups must be >= 1, got {args.compile_warmups}")
    #: The modes each sampler is timed in, in order: the three, the extra modes, the compiled modes.
    args.modes_for = {
        sampler: [
            *MODES,
            *modes_of(sampler, extra),
            *(mode + COMPILED for mode in modes_of(sampler, args.compile_list)),
        ]
        for sampler in args.sampler_list
    }
    if any(g < 1 for g in args.probe_groups):
        parser.error(f"--decoder-probe: group sizes must be >= 1, got {args.decoder_probe!r}")
    try:
        args.key_step_spec = KeySteps.parse(args.key_steps)
        for sampler in args.sampler_list:
            args.key_step_spec.resolve(sampler.default_steps)
    except ValueError as error:
        parser.error(f"--key-steps: {error}")
    cap = args.max_decoder_batch.strip().lower()
    if cap not in ("auto", "none") and not (cap.isdigit() and int(cap) >= 1):
        parser.error(
            f"--max-decoder-batch must be auto, none or a whole number >= 1, got {args.max_decoder_batch!r}"
        )
    args.decoder_cap = None if cap == "none" else cap if cap == "auto" else int(cap)
    try:
        args.torch_device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device: {error}")
    if args.quick:
        args.repeats = 1
        if args.share_sizes is None:  # the defaults are sizes of the real models
            args.share_size_list = []
        if args.threads is None:
            # The tiny model gains nothing from a second thread, and threads that wait for each other at
            # every small op slow down badly when another process shares the cores.
            args.threads = 1
    if args.out is None:
        if args.from_json is not None:
            args.out = args.from_json.with_suffix(".md")
        elif args.quick:
            args.out = Path(tempfile.gettempdir()) / f"faster-diffusion-speed{spec.out_infix}-quick.md"
        else:
            args.out = REPO_ROOT / "benchmarks" / "results" / f"speed{spec.out_infix}-{args.size}.md"
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Benchmark:
    """What one benchmark run measured: the Markdown report and the per-sampler, per-mode summaries."""

    report: str
    summaries: list[Summary]
    #: Compiled modes that failed, by (sampler, mode): the error, on one line.
    failed: dict[tuple[Sampler, str], str] = field(default_factory=dict)
    #: Functions where Dynamo hit a recompile limit during the runs (:class:`RecompileLimitLog`).
    recompile_limit_hits: list[str] = field(default_factory=list)
    #: The run's JSON, from which all of the above is read (empty for a dry run).
    data: dict = field(default_factory=dict)


def error_text(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _twin_key(sampler: Sampler, mode: str) -> tuple[Sampler | None, str]:
    """Which compiled UNet copy times ``mode`` with ``sampler``: stock attaches nothing, so one copy serves
    every sampler; any other mode is attached for good, to a copy per sampler."""
    return (None, mode) if mode == "stock" else (sampler, mode)


def compile_twins(
    unet: UNet2DConditionModel,
    samplers: Sequence[Sampler],
    compile_list: Sequence[tuple[str, Sampler | None]],
) -> dict[tuple[Sampler | None, str], UNet2DConditionModel]:
    """A :func:`shared_copy` of ``unet`` for each compiled UNet that the modes of ``compile_list``
    (:func:`parse_modes`) need: make them before hooking ``unet``."""
    keys = dict.fromkeys(_twin_key(s, mode) for s in samplers for mode in modes_of(s, compile_list))
    return {key: shared_copy(unet) for key in keys}


def compiled_benches(
    bench: Bench,
    twins: dict[tuple[Sampler | None, str], UNet2DConditionModel],
    samplers: Sequence[Sampler],
    compile_list: Sequence[tuple[str, Sampler | None]],
) -> tuple[dict[tuple[Sampler, str], Bench], dict[tuple[Sampler, str], str]]:
    """The benches of the compiled modes by (sampler, ``MODE (compiled)``), on the UNet copies of
    :func:`compile_twins`, and the error of each that could not be set up (reported, not fatal). Dynamo's
    caches are emptied first: the graphs of an earlier run in this process would count against the
    recompile limit of the UNet's code, shared by every copy."""
    if twins:
        torch._dynamo.reset()
    benches: dict[tuple[Sampler, str], Bench] = {}
    failed: dict[tuple[Sampler, str], str] = {}
    made: dict[tuple[Sampler | None, str], Bench | str] = {}
    for sampler in samplers:
        for mode in modes_of(sampler, compile_list):
            key = _twin_key(sampler, mode)
            if key not in made:
                try:
                    made[key] = compiled_bench(bench, twins[key], sampler, mode)
                except Exception as error:
                    made[key] = error_text(error)
                    _log(f"{mode}{COMPILED}: could not be set up: {made[key]}")
            result = made[key]
            if isinstance(result, str):
                failed[(sampler, mode + COMPILED)] = result
            else:
                benches[(sampler, mode + COMPILED)] = result
    return benches, failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        harness_report.report_again(args, render)
        return 0
    benchmark(argv)
    return 0


def benchmark(argv: Sequence[str] | None = None) -> Benchmark:
    """Run the benchmark with command-line arguments ``argv``; write its JSON (``--out`` with suffix
    ``.json``: the measurements and the facts of the run) and the report rendered from that JSON alone
    (:func:`render`, as ``--from-json`` renders it), print the report, and return what the JSON says."""
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]])
    if argv is not None:
        command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_start = os.getloadavg()

    _log("building the pipeline ...")
    build_start = time.perf_counter()
    spec = MODELS[args.model]
    if args.quick:
        pipe = spec.build_tiny(args.seed)
        model = spec.tiny_label
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        pipe = spec.build(args.seed)
        model = spec.label
        size = args.size
    device = args.torch_device
    pipe.to(device, getattr(torch, args.dtype))
    if args.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if args.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    build_seconds = time.perf_counter() - build_start
    _log(f"built in {build_seconds:.1f} s; {size} px, {torch.get_num_threads()} threads")

    # Copies of the UNet for the compiled modes, made before the clock hooks it (a copy takes hooks along).
    twins = {} if args.dry_run else compile_twins(pipe.unet, args.sampler_list, args.compile_list)
    bench = Bench(
        pipe=pipe,
        size=size,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        trim=not args.no_malloc_trim,
        clock=UnetClock(pipe.unet, device_sync(device)),
        max_decoder_batch=args.decoder_cap,
        key_steps=args.key_step_spec,
        device=device,
    )
    if args.dry_run:
        text = dry_run(bench, args)
        print(text)
        return Benchmark(report=text, summaries=[])
    compiled, failed = compiled_benches(bench, twins, args.sampler_list, args.compile_list)
    warmups: list[Run] = []
    runs: list[Run] = []
    timed_cpu = None
    with RecompileLimitLog() as limit_log:
        # Compiled modes take --compile-warmups warm-ups, the others one (in the round before the timed ones).
        order = [(sampler, mode) for sampler in args.sampler_list for mode in args.modes_for[sampler]]
        rounds = interleaved(order, args.repeats, warmups=args.compile_warmups if compiled else 1)
        for repeat, (sampler, mode) in rounds:
            if repeat == 0 and timed_cpu is None:
                timed_cpu = CpuUse()
            runner = compiled.get((sampler, mode), bench)
            if (sampler, mode) in failed or (repeat < -1 and runner is bench):
                continue
            try:
                result = runner.run(sampler, mode, repeat)
            except Exception as error:  # only a compiled mode's failure is reported rather than fatal
                if runner is bench:
                    raise
                failed[(sampler, mode)] = error_text(error)
                _log(f"{sampler.value} {mode} failed: {failed[(sampler, mode)]}")
                continue
            (warmups if repeat < 0 else runs).append(result)
            label = "warm-up" if repeat < 0 else f"repeat {repeat + 1}/{args.repeats}"
            _log(
                f"{label} {sampler.value} {mode}: loop {result.loop_seconds:.2f} s, "
                f"e2e {result.e2e_seconds:.2f} s, peak {_mib(peak_memory_bytes(result))} MiB"
            )
    timed_others = timed_cpu.others_percent() if timed_cpu else None

    latent_size = size // pipe.vae_scale_factor
    probe = []
    for group in args.probe_groups:
        _log(f"decoder probe: {group} steps per batch ...")
        probe.append(time_unet(bench.clock, pipe.unet, latent_size, group, args.probe_repeats))
    share_probe = []
    for share_size in args.share_size_list:
        _log(f"encoder share at {share_size} px: stock UNet calls at CFG batch 2 ...")
        timing = time_unet(bench.clock, pipe.unet, share_size // pipe.vae_scale_factor, 1, args.share_repeats)
        share_probe.append(dataclasses.replace(timing, size=share_size))
    total_seconds = time.perf_counter() - began

    stock_calls = [call for r in runs for call in r.stock_calls]
    if not stock_calls:  # CUDA: the timed runs took no per-call readings; time synced stock calls instead
        _log("encoder share: synced stock UNet calls at CFG batch 2 ...")
        time_unet(bench.clock, pipe.unet, latent_size, 1, max(10, args.probe_repeats))
        stock_calls = bench.clock.stock_calls()
    data = {
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "command": command,
        "date": date,
        "total_seconds": total_seconds,
        "build_seconds": build_seconds,
        "model": model,
        "pipeline": type(pipe).__name__,
        "size": size,
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "attention": _attention_backend(pipe.unet),
        "load": {"timed_others": timed_others, "start": load_start[0], "end": os.getloadavg()[0]},
        "recompile_limit_hits": limit_log.functions,
        "failed": [[sampler.value, mode, error] for (sampler, mode), error in failed.items()],
        "runs": [run_record(r) for r in warmups + runs],
        "stock_calls": stock_calls,
        "probe": [dataclasses.asdict(t) for t in probe],
        "share_probe": [dataclasses.asdict(t) for t in share_probe],
    }
    saved = harness_report.write(args.out, data, render)
    _log(f"wrote {args.out} and its JSON ({total_seconds / 60:.1f} min)")
    return result_of(saved)


def run_record(run: Run) -> dict:
    """A timed (or warm-up) run as the JSON keeps it."""
    return {**dataclasses.asdict(run), "sampler": run.sampler.value}


def run_of(record: dict) -> Run:
    """A run of the JSON (:func:`run_record`) as the report reads it."""
    return Run(
        **{
            **record,
            "sampler": Sampler.parse(record["sampler"]),
            "key_steps": tuple(record["key_steps"]),
            "stock_calls": [tuple(call) for call in record["stock_calls"]],
        }
    )


def result_of(data: dict) -> Benchmark:
    """What a run's JSON ``data`` says: its report (rendered from ``data`` alone and the settings its
    recorded command line parses to), its summaries and its failed modes."""
    args = parse_args(data["argv"])
    device = torch.device(data["device"])
    every = [run_of(r) for r in data["runs"]]
    warmups = [r for r in every if r.repeat < 0]
    runs = [r for r in every if r.repeat >= 0]
    failed = {(Sampler.parse(s), mode): error for s, mode, error in data["failed"]}
    probe = [UnetTiming(**t) for t in data["probe"]]
    share_probe = [UnetTiming(**t) for t in data["share_probe"]]
    stock_calls = data["stock_calls"]
    size, timed_others, load = data["size"], data["load"]["timed_others"], data["load"]
    versions = data["versions"]
    shares = [encoder / call for call, encoder in stock_calls]
    call_median = statistics.median(call for call, _ in stock_calls)
    encoder_median = statistics.median(encoder for _, encoder in stock_calls)
    share = statistics.median(shares)
    share_low, _, share_high = statistics.quantiles(shares, n=4) if len(shares) > 1 else (share, share, share)

    summaries = []
    for sampler in args.sampler_list:
        stock = [r for r in runs if r.sampler is sampler and r.mode == "stock"]
        for mode in args.modes_for[sampler]:
            if (sampler, mode) in failed:
                continue
            summaries.append(
                Summary(sampler, mode, [r for r in runs if r.sampler is sampler and r.mode == mode], stock)
            )
    bounds_lines, bounds = bound_table(summaries, share)
    per_run_others = [r.others_cpu_percent for r in runs if r.others_cpu_percent is not None]

    settings = [
        f"- Command: `{data['command']}`",
        f"- Date: {data['date']}; total run time {data['total_seconds'] / 60:.1f} min "
        f"(pipeline built in {data['build_seconds']:.1f} s)",
        f"- Model: {data['model']}, `{data['pipeline']}`; {size} x {size} px; {args.dtype} on {device}, "
        "eval mode, `torch.inference_mode()`; no safety checker"
        + ("; no watermarker" if args.model == "sdxl" else ""),
        f"- Machine: {data['cpu']}, {data['cpus']} logical CPUs; torch {versions['torch']} "
        f"(`torch.get_num_threads()` = {data['threads']}), diffusers {versions['diffusers']}, "
        f"transformers {versions['transformers']}, Python {versions['python']}",
        f"- UNet memory format: {'channels_last' if args.channels_last else 'contiguous (NCHW), stock'}; "
        f"attention processor: {data['attention']}; threads: "
        f"{'set to ' + str(args.threads) if args.threads is not None else 'torch default'}. "
        "Every setting applies identically to all modes.",
        f"- Generation: prompt {args.prompt!r}, negative prompt {args.negative_prompt!r}, guidance "
        f'{args.guidance_scale}, seed {args.seed} for every run, `output_type="pil"`',
        f"- Accelerated modes: key steps `{args.key_step_spec}`"
        + (" (the paper's)" if args.key_step_spec == KeySteps.paper() else "")
        + ", prior noise injection on "
        "(alpha 0.003, tau 500); `propagation`: `parallel=False`; `propagation+batched`: `parallel=True`, "
        f"`max_decoder_batch={args.decoder_cap!r}`",
        f"- Repeats: {args.repeats} timed per sampler and mode after one untimed warm-up each, interleaved "
        "round-robin (repeat -> sampler -> mode); medians quoted, (min–max) in brackets; speedups are "
        "ratios of medians against `stock` of the same run",
        f"- Load by other processes during the timed runs: {timed_others:.0f}% of the machine's CPU capacity "
        f"on average (per run: {min(per_run_others):.0f}–{max(per_run_others):.0f}%); load average "
        f"{load['start']:.2f} at the start, {load['end']:.2f} at the end"
        if timed_others is not None and per_run_others
        else "- Load by other processes: not measurable on this platform",
    ]
    if args.compile_list:
        graphs = [r.graphs_compiled for r in runs if r.graphs_compiled is not None]
        settings.append(compiled_line(args.compile_warmups, graphs, data["recompile_limit_hits"]))
    method = [
        "- **UNet loop**: from the first call of `pipe.unet` (a forward pre-hook) to the end of the last "
        "scheduler step (`callback_on_step_end` at the last step); measured the same way for every mode.",
        "- **End-to-end**: the whole `pipe(...)` call: text encoding, the loop, VAE decode, PIL conversion.",
        "- **Peak RSS increase**: a thread polls the process RSS every "
        f"{MEMORY_POLL_SECONDS * 1000:.0f} ms during the call; the peak minus the RSS just before the call, "
        "over the UNet loop and over the whole call. Before each call, `gc.collect()` and glibc "
        "`malloc_trim(0)` hand freed memory back to the OS"
        + (" (disabled by --no-malloc-trim)" if args.no_malloc_trim else "")
        + ", so that reuse of memory freed by an earlier run does not hide growth. The weights are "
        "not counted (they are resident before the call).",
        "- **Peak memory (vs stock)**: "
        + (
            "`torch.cuda.max_memory_allocated` over the call (reset before it), weights included; the ratio "
            "is against the median of `stock` with the same sampler."
            if device.type == "cuda"
            else "the process's peak RSS over the call (the RSS before it, weights and everything else "
            "resident, plus the peak increase above); the ratio is against the median of `stock` with the "
            "same sampler."
        ),
        "- **Encoder share**: "
        + (
            "in separate stock UNet calls at CFG batch 2 after the timed runs (random latents at the same "
            "size), with the device synced at every reading; the timed runs themselves sync only at their "
            "start and end, the same for every mode, so that no mode pays more stalls. "
            if device.type == "cuda"
            else "in every UNet call of the timed `stock` runs (CFG batch 2, the real latents), "
        )
        + "forward hooks time the encoder, from `conv_in` being called to the mid block returning, and the "
        f"whole call. Share = median over those {len(shares)} calls of encoder / call = {share:.1%} "
        f"(quartiles {share_low:.1%}–{share_high:.1%}; median call "
        f"{call_median:.3f} s, encoder {encoder_median:.3f} s).",
        "- **Bounds**: loop bound = N / (N - (N - |K|) * share), the loop speedup propagation alone would "
        "reach if skipping the encoder were free and nothing else changed; e2e bound = the same saving "
        "applied to the stock end-to-end time (text encoder and VAE unchanged). 'Share implied' = the "
        "encoder share that the measured propagation loop time corresponds to. 'Saved per non-key step' = "
        "1 - (median UNet call at a non-key step of `propagation`) / (median UNet call of `stock`): what "
        "skipping the encoder actually saved per call, to compare with the encoder share ('–' on a GPU, "
        "whose timed runs do not sync per call).",
    ]

    where = "CPU" if device.type == "cpu" else f"{device.type.upper()} ({data['device_name']})"
    title = f"{size} px, {where}" if args.model == "sd15" else f"{args.model.upper()}, {size} px, {where}"
    report = [f"# Faster Diffusion speed benchmark: {title}", "", *settings, "", "## Results", ""]
    report += results_table(summaries)
    if failed:
        report += ["", "Failed, and left out of the tables:", ""]
        report += [f"- {sampler.value} {mode}: {error}" for (sampler, mode), error in failed.items()]
    report += ["", "## Encoder share and the bound on propagation alone", "", *bounds_lines]
    if share_probe:
        report += [
            "",
            *share_size_lines(share_probe, args.sampler_list, args.key_step_spec, args.share_repeats),
        ]
    if args.model == "sdxl":
        report += ["", *SDXL_NOTES]
    if not args.quick and device.type == "cpu" and args.model == "sd15":
        report += ["", "## Targets (issue: end-to-end speedups over stock at 256 px)", ""]
        report += targets_lines(summaries, bounds, size)
    if len(probe) > 1:
        report += ["", "## Decoder cost per step against the decoder batch (stock UNet calls)", ""]
        report += decoder_table(probe)
    report += ["", "## How it is measured", "", *method, "", "## All runs", ""]
    report += raw_table(warmups + runs)
    text = "\n".join(report) + "\n"

    return Benchmark(
        report=text,
        summaries=summaries,
        failed=failed,
        recompile_limit_hits=data["recompile_limit_hits"],
        data=data,
    )


def render(data: dict) -> str:
    """The report of a run's JSON ``data``."""
    return result_of(data).report


if __name__ == "__main__":
    sys.exit(main())
