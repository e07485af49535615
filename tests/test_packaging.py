"""Where the line runs between the library, the product around it and the test fixtures.

- Importing the library and the command line does not import ``cog``: only the Cog layer
  (``faster_diffusion.app.serving``, behind ``predict.py``) needs it, and ``cog`` is an optional extra.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _imported_after(statement: str) -> set[str]:
    """Top-level names in ``sys.modules`` after ``statement`` runs in a fresh interpreter at the repo root."""
    code = f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300
    )
    return set(result.stdout.split())


def test_library_and_cli_do_not_import_cog():
    modules = _imported_after(
        "import faster_diffusion, faster_diffusion.app\n"
        "import faster_diffusion.app.cli, faster_diffusion.app.generate"
    )
    assert "faster_diffusion" in modules
    assert "cog" not in modules


def test_cog_is_an_optional_extra_pinned_like_the_image():
    project = PYPROJECT["project"]
    assert "cog" not in {re.split(r"[\s<>=!~\[;]", dep)[0] for dep in project["dependencies"]}
    (pin,) = project["optional-dependencies"]["cog"]
    assert pin in (REPO_ROOT / "requirements" / "cpu.txt").read_text(encoding="utf-8").split()
    cog_yaml = (REPO_ROOT / "cog.yaml").read_text(encoding="utf-8")
    assert f'sdk_version: "{pin.removeprefix("cog==")}"' in cog_yaml
