"""The quality plots' frame: a figure of one row of two panels per sampler (faithfulness against stock, PSNR
against stock), each with the judge's reference lines, saved when the ``with`` block ends; and images as tiles
for the sample grids."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .judge import WITHIN_NOISE_POINTS

#: The two panels of a row: (metric, its axis label, its scale from the judge's values).
PANELS = (("delta", "faithfulness − stock (points)", 100), ("psnr", "PSNR vs stock (dB)", 1))


@contextlib.contextmanager
def figure(path: Path, rows: int, row_height: float) -> Iterator:
    """The axes (``rows`` x 2) of a figure 12 in wide, saved to ``path`` at 100 dpi when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, 2, figsize=(12, row_height * rows), squeeze=False)
    try:
        yield axes
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def reference_lines(ax, metric: str) -> None:
    """On a faithfulness panel, stock (0) and the "within noise" floor (dashed)."""
    if metric == "delta":
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axhline(WITHIN_NOISE_POINTS, color="0.6", linewidth=0.8, linestyle="--")


def label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """A panel's axis labels, title and legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def tiles(images: np.ndarray, size: int) -> list:
    """Images (N, 3, H, W) in [-1, 1] as PIL images of ``size`` x ``size`` px, upscaled with nearest
    neighbours so that 32 px images stay sharp."""
    from PIL import Image

    pixels = ((images.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    return [Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST) for image in pixels]
