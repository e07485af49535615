"""The judge of the benchmarks on the reference models: the held-out pairs, and how a run is scored against
stock on them.

- Pairs: every held-out attribute combination (``shapes.HELD_OUT_COMBOS``, which training never saw) with
  :data:`SEEDS_PER_COMBO` seeds, pair i's seed ``seed_offset + i`` (:class:`Pairs`).
- Faithfulness: the share of pairs whose five attributes the reference classifier reads right, as a
  difference to stock with a 95% paired bootstrap interval (:class:`Judge`; :class:`Paired` for the
  difference of two methods pair by pair). Every run of a report is scored on the same draws
  (:func:`bootstrap_draws`).
- Fidelity: PSNR against stock's image of the same pair, capped at 100 dB (:func:`psnr`).
- "Within noise of stock": the faithfulness difference's interval contains 0 and its point is at least
  :data:`WITHIN_NOISE_POINTS` (:func:`within_noise`, :func:`noise_verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from faster_diffusion.reference import shapes

#: Seeds of each held-out combination: 80 combinations x 3 = 240 pairs.
SEEDS_PER_COMBO = 3
#: Within noise of stock: the faithfulness difference's interval contains 0 and its point is >= this.
WITHIN_NOISE_POINTS = -1.0
#: PSNR of identical images is infinite; the mean is taken of values capped here.
PSNR_CAP_DB = 100.0


@dataclass
class Pairs:
    """The benchmark's prompt x seed pairs: ``per_combo`` seeds for each held-out combination, pair i's seed
    being ``seed_offset + i`` (i by default)."""

    combos: list[tuple[str, ...]]
    per_combo: int
    scenes: list
    prompts: list[str]
    seeds: list[int]
    labels: np.ndarray

    @classmethod
    def held_out(cls, quick: bool, seed_offset: int = 0) -> Pairs:
        """All held-out combinations with :data:`SEEDS_PER_COMBO` seeds each, or 4 with 2 for ``quick``; pair
        i's seed is ``seed_offset + i``."""
        combos = list(shapes.HELD_OUT_COMBOS[:4] if quick else shapes.HELD_OUT_COMBOS)
        per_combo = 2 if quick else SEEDS_PER_COMBO
        scenes = [shapes.Scene(*c) for c in combos for _ in range(per_combo)]
        return cls(
            combos=combos,
            per_combo=per_combo,
            scenes=scenes,
            prompts=[shapes.caption(s) for s in scenes],
            seeds=list(range(seed_offset, seed_offset + len(scenes))),
            labels=np.array([s.labels() for s in scenes]),
        )


def bootstrap_draws(
    pairs: int, count: int, seed: int = 0, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """``count`` resamples (with replacement) of ``range(pairs)``, from a generator seeded ``seed``: the draws
    every run of a report is scored on. ``rng``: draw from this generator instead, and leave it advanced;
    ``quality.py`` draws its half samples for FD and KID from the same generator after the draws, so its
    committed numbers need the draws taken from it (a generator of their own would draw the same resamples,
    but the half samples after them would change)."""
    rng = np.random.default_rng(seed) if rng is None else rng
    return [rng.integers(0, pairs, pairs) for _ in range(count)]


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of images in [-1, 1], (N, C, H, W); identical images give inf."""
    mse = ((a.astype(np.float64) - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10 * np.log10(4.0 / mse)


def classify(classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N, 5), features (N, 64))."""
    x = torch.from_numpy(images)
    labels, features = zip(*(classifier.predict_with_features(c) for c in x.split(256)), strict=True)
    return torch.cat(labels).numpy(), torch.cat(features).numpy()


def interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap ``values``."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def all_right(classifier, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
    """1.0 for each image whose five attributes ``classifier`` reads as ``labels``' row, else 0.0."""
    predicted, _ = classify(classifier, images)
    return (predicted == labels).all(axis=1).astype(np.float64)


def within_noise(delta: float, ci: tuple[float, float]) -> bool:
    """The protocol's "within noise of stock": ``ci`` contains 0 and ``delta`` is at least
    :data:`WITHIN_NOISE_POINTS` points."""
    return ci[0] <= 0.0 <= ci[1] and delta * 100 >= WITHIN_NOISE_POINTS


#: :func:`judgement`'s verdict for a run within noise of stock.
WITHIN_NOISE = "within noise of stock"


def judgement(delta: float, ci) -> str:
    """The protocol's "within noise of stock" in words, with the reason when it is not
    (``img2img_quality.py``'s reports)."""
    if within_noise(delta, ci):
        return WITHIN_NOISE
    if not ci[0] <= 0 <= ci[1]:
        return "not within noise of stock (the interval excludes 0)"
    return f"not within noise of stock (below {WITHIN_NOISE_POINTS:g} point)"


def noise_verdict(delta: float, ci) -> str:
    """The protocol's "within noise of stock", or "above stock" when the whole interval is above 0."""
    if ci[0] > 0:
        return "above stock"
    return "yes" if within_noise(delta, ci) else "no"


class Judge:
    """Scores runs against stock on one set of pairs, as the protocol does: faithfulness (all five attributes
    read right) as a difference to stock with a paired bootstrap interval, and PSNR against stock's image of
    the same pair (capped at 100 dB) with its interval. Every run is scored on the same ``draws``."""

    def __init__(
        self,
        classifier,
        labels: np.ndarray,
        stock_images: np.ndarray,
        draws: list[np.ndarray],
        stock_correct: np.ndarray | None = None,
    ):
        """``stock_correct``: :meth:`correct` of the stock images, where the caller has read them already."""
        self.classifier, self.labels, self.stock_images, self.draws = classifier, labels, stock_images, draws
        self.stock_correct = self.correct(stock_images) if stock_correct is None else stock_correct
        self.stock_boot = self.boot(self.stock_correct)

    def correct(self, images: np.ndarray) -> np.ndarray:
        """1.0 for each image whose five attributes the classifier reads right, else 0.0."""
        return all_right(self.classifier, self.labels, images)

    def boot(self, values: np.ndarray) -> np.ndarray:
        """The mean of per-pair ``values`` over each draw."""
        return np.array([values[d].mean() for d in self.draws])

    def faithfulness(self, correct: np.ndarray) -> tuple[float, tuple[float, float]]:
        """The share of pairs fully right, from :meth:`correct`'s ``correct``, and its 95% interval."""
        return float(correct.mean()), interval(self.boot(correct))

    def fidelity(self, images: np.ndarray) -> tuple[float, tuple[float, float]]:
        """Mean PSNR against stock's image of the same pair (capped at 100 dB), and its 95% interval."""
        p = np.minimum(psnr(images, self.stock_images), PSNR_CAP_DB)
        return float(p.mean()), interval(self.boot(p))

    def delta(self, correct: np.ndarray) -> tuple[float, tuple[float, float]]:
        """Faithfulness minus stock's, from :meth:`correct`'s ``correct``, and its paired 95% interval."""
        difference = float(correct.mean() - self.stock_correct.mean())
        return difference, interval(self.boot(correct) - self.stock_boot)

    def __call__(self, images: np.ndarray) -> dict:
        """``all`` (share fully right), ``delta`` and ``delta_ci`` (to stock), ``psnr`` and ``psnr_ci``."""
        correct = self.correct(images)
        delta, delta_ci = self.delta(correct)
        fidelity, fidelity_ci = self.fidelity(images)
        return {
            "all": float(correct.mean()),
            "delta": delta,
            "delta_ci": delta_ci,
            "psnr": fidelity,
            "psnr_ci": fidelity_ci,
        }


class Paired:
    """Per-pair scores of runs, and their differences with paired bootstrap intervals."""

    def __init__(self, classifier, labels: np.ndarray, stock: np.ndarray, draws: list[np.ndarray]):
        self.classifier, self.labels, self.stock, self.draws = classifier, labels, stock, draws
        self.stock_correct = self.correct(stock)

    def correct(self, images: np.ndarray) -> np.ndarray:
        return all_right(self.classifier, self.labels, images)

    def scores(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "correct": self.correct(images),
            "psnr": np.minimum(psnr(images, self.stock), PSNR_CAP_DB),
        }

    def difference(self, a: np.ndarray, b: np.ndarray) -> tuple[float, tuple[float, float]]:
        """Mean of ``a - b`` over the pairs, and its 95% interval over the draws."""
        d = a - b
        return float(d.mean()), interval(np.array([d[i].mean() for i in self.draws]))
