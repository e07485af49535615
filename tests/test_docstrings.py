"""The examples in the package's docstrings run and print what they say."""

from __future__ import annotations

import doctest

import pytest

import faster_diffusion
from faster_diffusion import noise, propagation, schedule


@pytest.mark.parametrize("module", [faster_diffusion, schedule, noise, propagation], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if module is not faster_diffusion:
        assert result.attempted > 0
