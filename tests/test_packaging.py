"""Where the line runs between the library, the product around it and the test fixtures.

- Importing the library and the command line does not import ``cog``: only the Cog layer
  (``faster_diffusion.app.serving``, behind ``predict.py``) needs it, and ``cog`` is an optional extra.
- The wheel holds the package and its reference model, not the test fixtures (``fixtures/``, the tiny random
  pipelines), the tests, the benchmarks or the training scripts; nothing it imports needs them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
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


def test_library_and_cli_do_not_import_cog_or_the_fixtures():
    modules = _imported_after(
        "import faster_diffusion, faster_diffusion.app, faster_diffusion.reference\n"
        "import faster_diffusion.app.cli, faster_diffusion.app.generate"
    )
    assert "faster_diffusion" in modules
    assert "cog" not in modules
    assert "fixtures" not in modules


def test_cog_is_an_optional_extra_pinned_like_the_image():
    project = PYPROJECT["project"]
    assert "cog" not in {re.split(r"[\s<>=!~\[;]", dep)[0] for dep in project["dependencies"]}
    (pin,) = project["optional-dependencies"]["cog"]
    assert pin in (REPO_ROOT / "requirements" / "cpu.txt").read_text(encoding="utf-8").split()
    cog_yaml = (REPO_ROOT / "cog.yaml").read_text(encoding="utf-8")
    assert f'sdk_version: "{pin.removeprefix("cog==")}"' in cog_yaml


def test_wheel_holds_the_package_and_not_the_fixtures(tmp_path):
    """Build the wheel (setuptools' PEP 517 backend, offline, about a second) from a copy of what it reads."""
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT / "faster_diffusion",
        source / "faster_diffusion",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    dist = tmp_path / "dist"
    dist.mkdir()
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(dist)!r})"],
        cwd=source,
        capture_output=True,
        check=True,
        timeout=300,
    )
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"faster_diffusion", wheel.name.split("-py3")[0] + ".dist-info"}
    modules = {name for name in names if name.endswith(".py")}
    assert "faster_diffusion/reference/components.py" in modules
    assert not [name for name in modules if "tiny" in Path(name).stem or "fixture" in name]
    assert "faster_diffusion/reference/assets/shapes-ldm/model_index.json" in names
    assert "Provides-Extra: cog" in metadata
