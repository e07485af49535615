"""The report writer: what a run records about itself, the header lines built from it, writing the report
beside its JSON, and ``--from-json``, which writes a report again from its JSON alone.

A run's JSON holds ``"run"`` (:func:`run_facts`: its command line, start, wall time, machine, torch version
and threads) beside its results, so that the report, header included, is a function of the JSON: a script's
``report(...)`` reads only the JSON's contents and the settings its recorded command line parses to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def started_now() -> str:
    """The start of a run as reports show it: ``2026-12-06 21:09 UTC``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def argv_of(argv: list[str] | None) -> list[str]:
    """The command line's arguments: ``argv``, or the process's when it is ``None``."""
    return list(argv if argv is not None else sys.argv[1:])


def run_facts(argv: list[str], started: str, began: float, **more) -> dict:
    """What a report's header says about its run: ``argv`` (the script's arguments), ``started``
    (:func:`started_now`), the wall time since ``began`` (``time.perf_counter()``), this machine, torch and
    its threads, and ``more``."""
    return {
        "argv": list(argv),
        "started": started,
        "wall_seconds": round(time.perf_counter() - began, 1),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **more,
    }


def command(script: str, argv) -> str:
    """The command that ran ``benchmarks/<script>`` with ``argv``, as a report shows it."""
    return shlex.join(["python", f"benchmarks/{script}", *argv])


def display_path(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it, as reports show paths."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def fmt_ci(value: float, ci, digits: int = 1, scale: float = 1.0) -> str:
    """``value [low, high]`` scaled by ``scale``, to ``digits`` decimals."""
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def minutes(run: dict) -> str:
    return f"{run['wall_seconds'] / 60:.1f}"


def setting_lines(script: str, run: dict) -> list[str]:
    """The two list items every ``- Command``-style header opens with."""
    return [
        f"- Command: `{command(script, run['argv'])}`",
        f"- Date: {run['started']}; wall time {minutes(run)} min; {run['machine']}, torch {run['torch']}, "
        f"{run['threads']} threads",
    ]


def header(title: str, script: str, run: dict, *items: str) -> list[str]:
    """A report's first lines: its title, the command and where it ran, then one list item per ``items``."""
    return [f"# {title}", "", *setting_lines(script, run), *(f"- {item}" for item in items), ""]


def rendered(saved: dict, render, parser: argparse.ArgumentParser | None = None) -> str:
    """``render(saved)``, or, given the script's ``parser``, ``render(saved, settings)`` with the settings
    the run's recorded command line parses to: how both :func:`write` and :func:`report_again` render."""
    if parser is None:
        return render(saved)
    return render(saved, parser.parse_args(saved["run"]["argv"]))


def write(out: Path, data: dict, render, parser: argparse.ArgumentParser | None = None) -> dict:
    """``data`` to ``out`` with suffix ``.json``, and beside it the report rendered from that JSON, as
    ``--from-json`` renders it (:func:`rendered`: tuples read back as lists, keys as strings), so that a new
    run's report is the one its JSON regenerates; the report also goes to stdout. Returns the data as the
    JSON reads back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    saved_text = json.dumps(data, indent=1)
    saved = json.loads(saved_text)
    text = rendered(saved, render, parser)
    out.write_text(text)
    out.with_suffix(".json").write_text(saved_text)
    print(text)
    return saved


def add_from_json(parser: argparse.ArgumentParser, plots: bool = False) -> None:
    """``--from-json PATH``: write the report (and its plots, if ``plots``) again from a run's JSON."""
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="write the report " + ("and plots " if plots else "") + "again from a run's .json to --out "
        "(nothing is generated; the header is the run's)",
    )


def report_again(args: argparse.Namespace, render, parser: argparse.ArgumentParser | None = None):
    """``--from-json``: write the report of the run saved at ``args.from_json`` to ``args.out`` again, as
    ``render(saved)``, or, given the script's ``parser``, ``render(saved, settings)`` with the settings the
    run's recorded command line parses to. Returns ``(saved, settings)`` (``settings`` ``None`` without a
    parser), for a script that draws its plots again too."""
    saved = json.loads(args.from_json.read_text())
    settings = parser.parse_args(saved["run"]["argv"]) if parser is not None else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(rendered(saved, render, parser))
    return saved, settings
