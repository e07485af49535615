"""Deprecated: the engine moved to :mod:`faster_diffusion.engine`, encoder propagation to
:mod:`faster_diffusion.encoder`.

``from faster_diffusion.propagation import FasterDiffusionConfig`` still works, with a ``DeprecationWarning``
that names the module the name lives in now.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import encoder, engine


def __getattr__(name: str) -> Any:
    for module in (engine, encoder):  # a name of both is imported into encoder from engine
        if name in vars(module) and not name.startswith("__"):
            warnings.warn(
                f"faster_diffusion.propagation is deprecated: import {name} from {module.__name__}",
                DeprecationWarning,
                stacklevel=2,
            )
            return vars(module)[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
