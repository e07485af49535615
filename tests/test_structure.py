"""The package's structure as specifications: imports run one way, and reuse modes and calibration criteria
are added through one registration each."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import faster_diffusion
from faster_diffusion import KeySteps, apply_faster_diffusion, calibrate
from faster_diffusion.calibration import find_calibration, optimal_key_steps
from faster_diffusion.measure import _CRITERIA, register_criterion
from faster_diffusion.modes import MODES, register_mode

PACKAGE = Path(faster_diffusion.__file__).parent


def package_imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports, at module level or inside functions."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if target.startswith("faster_diffusion"):
                    found.add(target)
                    found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("faster_diffusion"))
        graph[name] = found
    return {name: {t for t in targets if t in graph and t != name} for name, targets in graph.items()}


def test_the_package_has_no_import_cycle():
    """Nothing imports back up: no module reaches itself through the imports of the package's modules (a
    package's ``__init__``, which re-exports, is left out as a target)."""
    graph = package_imports()
    packages = {name for name in graph if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()}
    edges = {name: targets - packages for name, targets in graph.items()}

    def reaches(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for target in edges.get(node, ()):
                if target == start:
                    return [*path, target]
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
        return None

    cycles = [cycle for name in edges if (cycle := reaches(name)) is not None]
    assert cycles == []


#: The reuse modes' modules, each a peer of the other.
MODE_MODULES = {"faster_diffusion.encoder", "faster_diffusion.deep"}


def test_the_engine_imports_no_mode_and_not_calibration():
    """The engine runs whichever mode's config it is handed: it imports none of them, nor calibration (the
    resolver of ``auto`` key steps is handed in)."""
    graph = package_imports()
    assert graph["faster_diffusion.engine"] & (MODE_MODULES | {"faster_diffusion.calibration"}) == set()


def test_measure_imports_no_mode_and_not_calibration():
    """Each mode registers its own calibration target; measuring knows none of them by name."""
    graph = package_imports()
    assert graph["faster_diffusion.measure"] & (MODE_MODULES | {"faster_diffusion.calibration"}) == set()
    from faster_diffusion.encoder import encoder_modules

    with pytest.warns(DeprecationWarning, match="import encoder_modules from faster_diffusion.encoder"):
        assert faster_diffusion.measure.encoder_modules is encoder_modules  # the former name, deprecated


def test_each_mode_module_holds_its_config_and_its_choice_of_modules():
    from faster_diffusion import deep, encoder, measure

    for module, config, choice, target in [
        (encoder, encoder.FasterDiffusionConfig, encoder.encoder_modules, "encoder"),
        (deep, deep.DeepReuseConfig, deep.deep_modules, "deep"),
    ]:
        assert config.__module__ == choice.__module__ == module.__name__
        assert isinstance(config.mode_name, str) and config.mode_name
        assert measure.canonical_target(target).startswith(target)  # registered when the package is imported
    assert measure._TARGETS["encoder"][0] is encoder.encoder_modules
    assert {encoder.FasterDiffusionConfig.mode_name, deep.DeepReuseConfig.mode_name} == {
        "encoder propagation",
        "deep reuse",
    }


def test_nothing_in_the_package_imports_the_deprecated_propagation_module():
    graph = package_imports()
    assert [name for name, targets in graph.items() if "faster_diffusion.propagation" in targets] == []


def test_propagation_names_still_import_with_a_deprecation_warning():
    from faster_diffusion import encoder, engine

    with pytest.warns(DeprecationWarning, match="FasterDiffusionConfig from faster_diffusion.encoder"):
        from faster_diffusion.propagation import FasterDiffusionConfig
    assert FasterDiffusionConfig is encoder.FasterDiffusionConfig
    with pytest.warns(DeprecationWarning, match="attach_reuse from faster_diffusion.engine"):
        from faster_diffusion.propagation import attach_reuse
    assert attach_reuse is engine.attach_reuse
    with pytest.raises(ImportError):
        from faster_diffusion.propagation import no_such_name  # noqa: F401
    with pytest.raises(ImportError):  # a name engine.py merely imports was never propagation's to give
        from faster_diffusion.propagation import KeySteps  # noqa: F401
    import faster_diffusion.propagation as propagation

    assert {"RunStats", "FasterDiffusionConfig", "apply_encoder_propagation"} <= set(dir(propagation))
    with pytest.warns(DeprecationWarning):
        namespace: dict = {}
        exec("from faster_diffusion.propagation import *", namespace)
    assert namespace["RunStats"] is engine.RunStats and "KeySteps" not in namespace


@dataclass(frozen=True)
class EchoConfig:
    """A stand-in reuse mode: applying it records what the seam handed it."""

    label: str = "echo"


def test_a_new_reuse_mode_is_one_registration(make_pipe, monkeypatch):
    monkeypatch.setitem(MODES, EchoConfig, None)
    seen = {}

    def apply_echo(pipe, config, *, resolve_auto):
        seen.update(pipe=pipe, config=config, resolve_auto=resolve_auto)
        return "handle"

    register_mode(EchoConfig, apply_echo)
    pipe = make_pipe()
    assert apply_faster_diffusion(pipe, EchoConfig()) == "handle"
    assert seen["pipe"] is pipe and seen["config"] == EchoConfig()
    assert callable(seen["resolve_auto"])  # calibration's, for key_steps="auto"


def test_an_unregistered_config_is_refused_naming_the_modes(make_pipe):
    with pytest.raises(TypeError, match=r"FasterDiffusionConfig.*got dict"):
        apply_faster_diffusion(make_pipe(), {"key_steps": "paper"})


def test_a_new_criterion_is_one_registration(make_pipe, monkeypatch):
    """A criterion that charges reusing any step at step j by j alone places key steps where that says."""
    monkeypatch.setattr("faster_diffusion.measure._CRITERIA", dict(_CRITERIA))

    def later_costs_more(run):
        n = run.num_steps
        return np.triu(np.tile(np.arange(n, dtype=float), (n, 1)), k=1)

    register_criterion("later-costs-more", later_costs_more)
    pipe = make_pipe("DPM-Solver-20")
    keys = calibrate(pipe, budget=5, criterion="later-costs-more", prompts=["a red circle"])
    calibration = find_calibration(pipe, 20)
    assert calibration.criterion == "later-costs-more"  # plain auto reads the criterion it was calibrated by
    expected = optimal_key_steps(later_costs_more(type("Run", (), {"num_steps": 20})), 5)
    assert keys.resolve(20).indices == expected
    # Its name is one key steps can carry (auto:5@later-costs-more); a name they could not carry is refused.
    assert KeySteps.parse("auto:5@later-costs-more").resolve(20, calibration).indices == expected
    for bad in ("SSIM", "", "2nd", "a b", None):
        with pytest.raises(TypeError, match="a criterion's name must be lowercase letters"):
            register_criterion(bad, later_costs_more)


def test_one_record_per_pipeline_family():
    """Each family's pipelines are read from its record: text-to-image and image-to-image, SD and SDXL."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from faster_diffusion.app.generate import image_to_image_pipeline
    from faster_diffusion.families import SD, SDXL, family_of, refused_variant
    from fixtures.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    for family, pipe in [(SD, build_tiny_pipeline(0)), (SDXL, build_tiny_sdxl_pipeline(0))]:
        assert family_of(pipe) is family and refused_variant(pipe) is None
        runner = image_to_image_pipeline(pipe)
        assert type(runner) is family.image_to_image_class() and family_of(runner) is family
    refiner = StableDiffusionXLImg2ImgPipeline(
        **build_tiny_sdxl_pipeline(0).components, requires_aesthetics_score=True
    )
    assert "SDXL refiner" in refused_variant(refiner)
    assert family_of(object()) is None
