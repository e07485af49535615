"""The speed protocol: every method timed in the same process, an untimed warm-up of each first, then
interleaved repeats (stock, A, B, stock, A, B, ...) so that drift of the machine falls on every method alike;
medians quoted, with the spread (min–max) beside them.

``benchmarks/speed.py`` (and through it ``gpu_check.py``) and ``deep_variants.py --costs`` order their runs by
:func:`interleaved` and summarise them with :func:`median` and :func:`spread`; the headers name the machine
with :func:`device_name` or :func:`processor_name`.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def interleaved(methods: Iterable[T], repeats: int, warmups: int = 1) -> Iterator[tuple[int, T]]:
    """``(repeat, method)`` in the protocol's order: ``warmups`` untimed rounds (repeat -warmups .. -1), then
    ``repeats`` timed rounds (0 .. repeats - 1), each round every method once, in order."""
    methods = list(methods)
    for repeat in range(-warmups, repeats):
        for method in methods:
            yield repeat, method


def median(values: Sequence[float]) -> float:
    """The median of the timed repeats (what reports quote)."""
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """The repeats' range, ``min–max`` to two decimals (``–`` for a single repeat)."""
    return f"{min(values):.2f}–{max(values):.2f}" if len(values) > 1 else "–"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``, else ``unknown``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model (``speed.py``'s and ``gpu_check.py``'s headers)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def processor_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else ``platform.processor()`` or ``CPU`` (``frontier.py``'s and
    ``calibration_cost.py``'s headers)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
