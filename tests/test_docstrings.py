"""The examples in the package's docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import faster_diffusion
from faster_diffusion import deep, encoder, engine, noise, schedule

MODULES = [faster_diffusion, schedule, noise, engine, encoder, deep]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if module is not faster_diffusion:
        assert result.attempted > 0
