"""Plumbing shared by the ways of reusing features and by calibration: mapping over the (nested) tensors of
module inputs and outputs, and registering diffusers hooks beneath an accelerate hook. Imports nothing of the
package, so that every module can import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook


def map_tensors(value: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a (nested) tuple, list or dict."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(item, fn) for item in value)
    if isinstance(value, dict):
        return {key: map_tensors(item, fn) for key, item in value.items()}
    return value


def map_tensors_once(value: Any, fn) -> Any:
    """:func:`map_tensors`, with ``fn`` applied once per distinct tensor: a tensor met twice maps to one
    shared result, as down blocks return their last output both as hidden states and as a skip feature."""
    seen: dict[int, torch.Tensor] = {}

    def once(tensor: torch.Tensor) -> torch.Tensor:
        key = id(tensor)
        if key not in seen:
            seen[key] = fn(tensor)
        return seen[key]

    return map_tensors(value, once)


def repeat_rows(value: Any, times: int) -> Any:
    """Repeat the batch dimension of every tensor in ``value`` ``times`` times."""
    if times == 1:
        return value
    return map_tensors_once(value, lambda tensor: tensor.repeat(times, *([1] * (tensor.dim() - 1))))


def last_rows(value: Any, rows: int) -> Any:
    """The last ``rows`` rows of every tensor in ``value`` (views)."""
    return map_tensors_once(value, lambda tensor: tensor[tensor.shape[0] - rows :])


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


@contextlib.contextmanager
def beneath_accelerate_hook(module: torch.nn.Module) -> Iterator[None]:
    """Register or remove diffusers hooks on ``module`` beneath an accelerate hook, if it has one.

    accelerate's ``add_hook_to_module`` (model or sequential CPU offload) replaces ``forward`` with a wrapper
    that calls ``module._old_forward``, and diffusers' model CPU offload takes it off and puts it back
    at the end of every pipeline call. A hook registered on top of the wrapper would then be dropped, and
    removing one from on top would overwrite the wrapper. So, for the length of the block, ``forward`` is what
    accelerate wraps; afterwards accelerate's wrapper is outermost again, around what the block left.
    """
    if getattr(module, "_hf_hook", None) is None or "_old_forward" not in vars(module):
        yield
        return
    accelerate_forward = module.forward
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.forward
        module.forward = accelerate_forward


def add_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` on ``module``'s diffusers hook registry, beneath an accelerate hook if it has one."""
    with beneath_accelerate_hook(module):
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def drop_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the hook ``name`` from ``module`` (not from its children), beneath an accelerate hook if any."""
    with beneath_accelerate_hook(module):
        HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
