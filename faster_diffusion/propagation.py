"""Deprecated: the engine moved to :mod:`faster_diffusion.engine`, encoder propagation to
:mod:`faster_diffusion.encoder`.

Each public name this module had still imports from it (``from faster_diffusion.propagation import
FasterDiffusionConfig``, or ``import *``), with a ``DeprecationWarning`` that names the module it lives in
now.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import encoder, engine

#: The public names this module had, and where each lives now.
_MOVED = {
    "FasterDiffusionConfig": encoder,
    "apply_encoder_propagation": encoder,
    "AutoResolver": engine,
    "FORECAST_ORDERS": engine,
    "FasterDiffusion": engine,
    "RunStats": engine,
    "attach_reuse": engine,
    "check_decoder_cap": engine,
    "check_forecast": engine,
    "get_faster_diffusion": engine,
    "remove_faster_diffusion": engine,
}

__all__ = list(_MOVED)  # the names are served by __getattr__


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"faster_diffusion.propagation is deprecated: import {name} from {module.__name__}",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])
