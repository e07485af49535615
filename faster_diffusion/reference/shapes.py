"""The captioned shapes world of the reference model: scenes, captions, rendering and the held-out split.

A scene is one coloured shape on a plain background, described by five attributes::

    a small red circle at the top left on a black background

Every image is drawn anti-aliased at 4x and downsampled to 32x32, with a little jitter in position, size and
colour, so two images of the same caption differ. Everything is a pure function of an integer seed.

A fixed set of attribute combinations (:data:`HELD_OUT_COMBOS`) never appears in training; the quality
benchmark and the classifier's held-out score use only those.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "COLOURS",
    "HELD_OUT_COMBOS",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "TRAIN_COMBOS",
    "VOCABULARY",
    "Scene",
    "caption",
    "render",
    "render_batch",
    "sample_scene",
]

IMAGE_SIZE = 32
_SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 75, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SIZES: dict[str, float] = {"small": 4.0, "large": 7.0}  # half-size in pixels at 32x32
#: Position name -> (phrase, grid column, grid row).
POSITIONS: dict[str, tuple[str, int, int]] = {
    "top left": ("at the top left", 0, 0),
    "top": ("at the top", 1, 0),
    "top right": ("at the top right", 2, 0),
    "left": ("on the left", 0, 1),
    "center": ("in the center", 1, 1),
    "right": ("on the right", 2, 1),
    "bottom left": ("at the bottom left", 0, 2),
    "bottom": ("at the bottom", 1, 2),
    "bottom right": ("at the bottom right", 2, 2),
}
BACKGROUNDS: dict[str, int] = {"black": 20, "gray": 125, "white": 235}
#: Attribute name -> its values, in a fixed order (the classifier's class indices).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}
_GRID = (8.0, 16.0, 24.0)
_POSITION_JITTER = 1.5
_SIZE_JITTER = 0.5
_COLOUR_JITTER = 15
_BACKGROUND_JITTER = 10

#: Every word a caption can contain; the reference model's tokenizer encodes each as one token.
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "at", "the", "on", "in", "background", "of", *SHAPES, *COLOURS, *SIZES, *BACKGROUNDS]
        + [word for phrase, _, _ in POSITIONS.values() for word in phrase.split()]
    )
)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One shape on a background: one value of each of :data:`ATTRIBUTES`."""

    shape: str
    colour: str
    size: str
    position: str
    background: str

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in values:
                raise ValueError(f"{name} must be one of {', '.join(values)}; got {value!r}")

    @property
    def combo(self) -> tuple[str, str, str, str, str]:
        return (self.shape, self.colour, self.size, self.position, self.background)

    def labels(self) -> tuple[int, ...]:
        """Class index of each attribute, in :data:`ATTRIBUTES` order."""
        return tuple(ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES)


def caption(scene: Scene, *, drop: Iterable[str] = ()) -> str:
    """The caption of ``scene``; ``drop`` leaves out some of "size", "position" and "background"."""
    drop = set(drop)
    unknown = drop - {"size", "position", "background"}
    if unknown:
        raise ValueError(f"only size, position and background can be dropped; got {sorted(unknown)}")
    words = ["a"]
    if "size" not in drop:
        words.append(scene.size)
    words += [scene.colour, scene.shape]
    if "position" not in drop:
        words.append(POSITIONS[scene.position][0])
    if "background" not in drop:
        words.append(f"on a {scene.background} background")
    return " ".join(words)


def _all_combos() -> list[tuple[str, ...]]:
    return list(itertools.product(*ATTRIBUTES.values()))


def _held_out(count: int = 80, seed: int = 2024) -> tuple[tuple[str, ...], ...]:
    combos = _all_combos()
    order = np.random.default_rng(seed).permutation(len(combos))
    return tuple(sorted(combos[i] for i in order[:count]))


#: Attribute combinations that training never sees (80 of the 972).
HELD_OUT_COMBOS: tuple[tuple[str, ...], ...] = _held_out()
TRAIN_COMBOS: tuple[tuple[str, ...], ...] = tuple(c for c in _all_combos() if c not in set(HELD_OUT_COMBOS))


def sample_scene(rng: np.random.Generator, combos: Sequence[tuple[str, ...]] = TRAIN_COMBOS) -> Scene:
    """A uniformly chosen scene from ``combos``."""
    return Scene(*combos[int(rng.integers(len(combos)))])


def render(scene: Scene, seed: int) -> Image.Image:
    """Draw ``scene`` as a 32x32 RGB image; ``seed`` picks the jitter."""
    rng = np.random.default_rng(seed)
    s = _SUPERSAMPLE
    _, column, row = POSITIONS[scene.position]
    cx = (_GRID[column] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * s
    cy = (_GRID[row] + rng.uniform(-_POSITION_JITTER, _POSITION_JITTER)) * s
    half = (SIZES[scene.size] + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER)) * s
    base = BACKGROUNDS[scene.background] + int(rng.integers(-_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1))
    colour = tuple(
        int(np.clip(c + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1), 0, 255))
        for c in COLOURS[scene.colour]
    )
    image = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), (base, base, base))
    draw = ImageDraw.Draw(image)
    if scene.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif scene.shape == "square":
        h = half * 0.88  # about the same area as the circle
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=colour)
    else:
        h = half * 1.1
        draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=colour)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def render_batch(scenes: Sequence[Scene], seeds: Sequence[int]) -> np.ndarray:
    """``render`` for many scenes: a float32 array (N, 3, 32, 32) in [-1, 1]."""
    if len(scenes) != len(seeds):
        raise ValueError(f"got {len(scenes)} scenes but {len(seeds)} seeds")
    out = np.empty((len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for i, (scene, seed) in enumerate(zip(scenes, seeds, strict=True)):
        out[i] = np.asarray(render(scene, int(seed)), dtype=np.float32).transpose(2, 0, 1)
    return out / 127.5 - 1.0
