"""The benchmark scripts run end to end (on the tiny model), so the committed results stay reproducible."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> <args>`` from the repository root, on one thread; it must succeed."""
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_regenerates(script: str, out: Path) -> None:
    """``benchmarks/<script> --from-json`` on the JSON a run wrote beside ``out`` writes ``out`` again, byte
    for byte."""
    import importlib

    again = out.with_name(f"again-{out.name}")
    module = importlib.import_module(f"benchmarks.{script.removesuffix('.py')}")
    assert module.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == out.read_text()


def test_speed_benchmark_quick_run_writes_a_report_that_its_json_regenerates(tmp_path):
    out = tmp_path / "speed.md"
    run_script("speed.py", "--quick", "--out", str(out))
    assert_regenerates("speed.py", out)
    report = out.read_text()
    for mode in ("stock", "propagation", "propagation+batched"):
        assert f"| DDIM-50 | {mode} |" in report and f"| DPM-Solver-20 | {mode} |" in report
    # Pass counts of the batched mode: the automatic cap takes at most 5 steps a batch on the CPU.
    assert "9 / 50 (13)" in report and "7 / 20 (7)" in report
    assert "| peak memory MiB (vs stock) |" in report and "(1.00x) |" in report  # stock against itself
    assert "encoder share" in report.lower()


def test_speed_benchmark_quick_sdxl_run_reports_the_encoder_share_at_each_size(tmp_path):
    out = tmp_path / "speed-sdxl.md"
    run_script(
        "speed.py",
        "--model",
        "sdxl",
        "--quick",
        "--samplers",
        "DPM-Solver-20",
        "--share-sizes",
        "16,32",
        "--share-repeats",
        "1",
        "--out",
        str(out),
    )
    report = out.read_text()
    assert report.startswith("# Faster Diffusion speed benchmark: SDXL, 16 px, CPU")
    assert "random weights, `StableDiffusionXLPipeline`; 16 x 16 px" in report  # the tiny SDXL pipeline
    for mode in ("stock", "propagation", "propagation+batched"):
        assert f"| DPM-Solver-20 | {mode} |" in report
    assert "| DDIM-50 |" not in report  # only the samplers asked for
    assert "7 / 20 (7)" in report  # the paper's key steps, the decoder batched per group
    # The extra encoder-share measurement: one row per size, with the bound it gives the sampler.
    assert (
        "| size px | encoder share | median call s | encoder s | loop bound DPM-Solver-20 (7 of 20) |"
        in report
    )
    rows = [line for line in report.splitlines() if line.startswith(("| 16 |", "| 32 |"))]
    assert len(rows) == 2
    for row in rows:
        share, bound = float(row.split("|")[2].strip(" %")) / 100, row.split("|")[5].strip(" x")
        assert 0 < share < 1 and float(bound) == pytest.approx(20 / (20 - 13 * share), abs=2e-3)
    assert "The paper gives no key-step preset for SDXL" in report


def test_speed_benchmark_dry_run_checks_every_mode_and_estimates_the_run(tmp_path):
    out = tmp_path / "never-written.md"
    args = ["--model", "sdxl", "--quick", "--dry-run", "--share-sizes", "32", "--out", str(out)]
    result = run_script("speed.py", *args)
    assert not out.exists()  # a dry run writes no report
    # Two steps, key step 0 only: stock runs the encoder twice, the batched mode decodes both in one batch.
    passes = dict(re.findall(r"([a-z+]+) [\d.]+ s \(passes (\(\d, \d, \d\))\)", result.stdout))
    assert passes == {"stock": "(2, 2, 2)", "propagation": "(1, 2, 2)", "propagation+batched": "(1, 2, 1)"}
    assert re.search(r"- at 32 px: [\d.]+ s, share [\d.]+%", result.stdout)
    assert re.search(
        r"estimated run \(--samplers DDIM-50,DPM-Solver-20 --repeats 1, .*: ~\d+ min", result.stdout
    )


def test_img2img_inputs_show_the_next_held_out_combination():
    from benchmarks.img2img_quality import input_combos
    from faster_diffusion.reference import shapes

    combos = list(shapes.HELD_OUT_COMBOS)
    inputs = input_combos(combos, 3)
    assert len(inputs) == 240
    # Pair i belongs to combination i // 3 and shows the next one, the last wrapping round to the first.
    assert inputs[:6] == [combos[1]] * 3 + [combos[2]] * 3 and inputs[-3:] == [combos[0]] * 3
    assert all(shown != combos[i // 3] for i, shown in enumerate(inputs))
    with pytest.raises(ValueError, match="need at least 2 combinations"):
        input_combos(combos[:1], 3)


def test_img2img_quality_benchmark_quick_run_writes_a_report_its_json_regenerates_and_a_grid(tmp_path):
    from PIL import Image

    out = tmp_path / "img2img.md"
    run_script("img2img_quality.py", "--quick", "--out", str(out))
    assert_regenerates("img2img_quality.py", out)  # the report is rendered from the JSON alone
    report = out.read_text()
    assert "Command: `python benchmarks/img2img_quality.py --quick --out" in report
    assert re.search(r"torch [^,]+, \w+, 1 threads", report)
    # Stock runs the last int(steps x strength) steps; the paper's key steps are cut to them, the first that
    # runs a key step.
    rows = {
        ("DDIM-50", "0.8"): (
            "40 / 40",
            "4 of the 40 steps that run (10 to 49 of 50) are key steps [10, 15, 25, 35]",
        ),
        ("DDIM-50", "0.6"): (
            "30 / 30",
            "3 of the 30 steps that run (20 to 49 of 50) are key steps [20, 25, 35]",
        ),
        ("DPM-Solver-20", "0.8"): (
            "16 / 16",
            "4 of the 16 steps that run (4 to 19 of 20) are key steps [4, 5, 10, 15]",
        ),
        ("DPM-Solver-20", "0.6"): (
            "12 / 12",
            "3 of the 12 steps that run (8 to 19 of 20) are key steps [8, 10, 15]",
        ),
    }
    sections = report.split("\n## ")[1:]
    assert [s.splitlines()[0] for s in sections] == [f"{s}, strength {k}" for s, k in rows]
    for section, (stock_passes, paper_keys) in zip(sections, rows.values(), strict=True):
        lines = [line for line in section.splitlines() if line.startswith("| ")][1:]
        assert [line.split(" | ")[0] for line in lines] == [
            "| input images (sanity)",
            "| stock",
            "| default",
            "| paper",
        ]
        assert f"| {stock_passes} |" in lines[1]
        assert f"| paper: {paper_keys} | {paper_keys.split()[0]} / {stock_passes.split()[0]} |" in lines[3]
        for line in lines[2:]:
            assert re.search(r"\| (within noise of stock|not within noise of stock \(.+\)) \|$", line)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["pairs"] == 8
    sanity = data["input_faithfulness"]
    # The inputs are pictures of another combination: read against their own prompts far more often.
    assert sanity["pair prompt"]["all"] < sanity["own prompt"]["all"]
    for sampler, by_strength in data["results"].items():
        budget = "auto:" if sampler.startswith("DPM") else "auto,"
        for strength, runs in by_strength.items():
            first = int(sampler.split("-")[-1]) - int(int(sampler.split("-")[-1]) * float(strength))
            default = runs["default"]
            assert default["key_steps"].startswith(budget)  # the product's default: calibrated key steps
            assert default["key_steps"].split("key steps [")[1].startswith(f"{first},")
            assert default["encoder_passes"] < runs["stock"]["encoder_passes"] == default["decoder_passes"]
            for name in ("default", "paper"):
                m = runs[name]
                low, high = m["all_delta_ci"]
                within = low <= 0 <= high and m["all_delta"] >= -0.01
                assert (m["judgement"] == "within noise of stock") == within
                assert m["all_delta"] == pytest.approx(m["all"] - runs["stock"]["all"])
                assert 10 < m["psnr"] < 100
    grid = Image.open(tmp_path / "img2img-samples.png")
    # Four columns of 8 pairs, 32 px shown at 128 px, with the prompts beside them.
    assert grid.size == (4 * 132 + 420, 16 + 8 * 132)
    tiles = np.asarray(grid.convert("RGB"), dtype=float)[16 : 16 + 128]
    assert np.abs(tiles[:, :128] - tiles[:, 132:260]).mean() > 5  # the input is not the stock output


def test_placement_search_neighbours_move_one_key_step_and_keep_step_0():
    from benchmarks.placement_search import neighbours

    found = neighbours((0, 2, 5, 19), 20)
    # 2 -> 1, 3, 4 (0 is taken); 5 -> 3, 4, 6, 7; 19 -> 17, 18 (20 and 21 are past the last step).
    assert found == [
        (0, 1, 5, 19), (0, 3, 5, 19), (0, 4, 5, 19),
        (0, 2, 3, 19), (0, 2, 4, 19), (0, 2, 6, 19), (0, 2, 7, 19),
        (0, 2, 5, 17), (0, 2, 5, 18),
    ]  # fmt: skip
    assert all(keys[0] == 0 and len(set(keys)) == 4 for keys in found)
    # A move past a neighbour is kept sorted and never duplicates a list.
    assert neighbours((0, 1, 2), 4) == [(0, 2, 3), (0, 1, 3)]


def test_placement_search_climbs_to_the_best_list_and_stops_when_nothing_is_better():
    from benchmarks.placement_search import steepest_ascent

    target = (0, 4, 9, 15)

    def score(keys):
        return -sum(abs(a - b) for a, b in zip(keys, target, strict=True))

    found, path = steepest_ascent(score, (0, 2, 5, 19), 20, moves=20, log=lambda _: None)
    assert found == target
    # Steepest: the first move gains 2 (three neighbours tie; the first in neighbour order wins), where a
    # climb taking the first better neighbour would move 2 -> 3.
    assert path[1] == ((0, 4, 5, 19), -8)
    assert [s for _, s in path] == sorted(s for _, s in path) and len({s for _, s in path}) == len(path)
    # The moves cap stops early, and a start that is already best does not move.
    capped, capped_path = steepest_ascent(score, (0, 2, 5, 19), 20, moves=1, log=lambda _: None)
    assert len(capped_path) == 2 and capped != target
    assert steepest_ascent(score, target, 20, moves=5, log=lambda _: None) == (target, [(target, 0)])


def test_frontier_judging_rules():
    from benchmarks.frontier import smallest_within_noise
    from benchmarks.harness import within_noise

    assert within_noise(-0.004, (-0.03, 0.02)) and within_noise(0.0, (0.0, 0.0))
    assert not within_noise(-0.011, (-0.05, 0.01))  # point below -1 point
    assert not within_noise(0.02, (0.005, 0.04))  # interval misses 0
    good, bad = {"delta": 0.0, "delta_ci": (-0.02, 0.02)}, {"delta": -0.05, "delta_ci": (-0.08, -0.01)}
    assert smallest_within_noise({5: bad, 6: good, 7: bad, 8: good, 9: good}) == (6, 8)
    assert smallest_within_noise({5: bad, 6: bad}) == (None, None)


def test_placement_search_quick_run_writes_a_report_and_its_data(tmp_path):
    out = tmp_path / "p.md"
    run_script("placement_search.py", "--quick", "--budget", "5", "--out", str(out))
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["budget"] == 5 and data["pairs"] == 8 and data["outcome"] in (1, 2, 3)
    evaluation = data["evaluation"]
    assert set(evaluation) == {"start (auto)", "A: model alone", "B: tuned on the classifier", "uniform"}
    assert all(len(m["key_steps"]) == 5 and m["key_steps"][0] == 0 for m in evaluation.values())
    # Each search starts at the committed calibration's list for 5 key steps and moves at most once.
    start = [0, 3, 7, 12, 16]
    assert evaluation["start (auto)"]["key_steps"] == start
    for search in ("search_a", "search_b"):
        path = data[search]["path"]
        assert path[0][0] == start and len(path) <= 2
        assert len(data["scores"][search[-1]]) == data[search]["scored"]
    text = out.read_text()
    assert "Outcome by the protocol:" in text and "| uniform |" in text


def test_placement_search_outcome_follows_the_written_rule():
    from benchmarks.placement_search import decide

    def listed(delta, within):
        return {"delta": delta, "within_noise": within}

    start = listed(-0.037, False)
    assert decide(listed(-0.004, True), listed(-0.03, False), start) == 1
    # A within noise but below the start is not outcome 1.
    assert decide(listed(-0.004, True), listed(-0.03, False), listed(0.0, True)) == 3
    assert decide(listed(-0.004, True), listed(0.0, True), listed(0.0, True)) == 2
    assert decide(listed(-0.025, False), listed(-0.008, True), start) == 2
    assert decide(listed(-0.025, False), listed(-0.021, False), start) == 3


def test_frontier_quick_run_scores_every_family_and_ranks_the_criteria(tmp_path):
    out = tmp_path / "f.md"
    run_script(
        "frontier.py",
        "--quick",
        "--samplers",
        "DPM-Solver-20",
        "--budgets",
        "DPM-Solver-20=7",
        "--out",
        str(out),
    )
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["pairs"] == 8
    families = data["results"]["DPM-Solver-20"]
    assert set(families) == {"auto", "auto (prediction)", "uniform", "paper-shaped"}
    # The paper's own preset at its budget, and the committed calibration's placement.
    assert families["paper-shaped"]["7"]["key_steps"] == [0, 1, 2, 3, 5, 10, 15]
    assert families["auto"]["7"]["key_steps"] == [0, 2, 5, 8, 11, 14, 17]
    assert all(-1 <= m["delta"] <= 1 and m["psnr"] > 0 for m in (f["7"] for f in families.values()))
    assert set(data["correlations"]["DPM-Solver-20"]) == {"feature", "prediction"}
    assert out.with_suffix(".png").stat().st_size > 0 and "## DPM-Solver-20" in out.read_text()


def test_speed_benchmark_times_deep_reuse_beside_the_three_modes(tmp_path):
    out = tmp_path / "speed.md"
    run_script(
        "speed.py",
        "--quick",
        "--samplers",
        "DPM-Solver-20",
        "--extra-modes",
        "deep:3,deep+forecast:5",
        "--out",
        str(out),
    )
    report = out.read_text()
    assert "| DPM-Solver-20 | deep:3 |" in report and "| 7 / 20 (20) |" in report
    assert "| DPM-Solver-20 | deep+forecast:5 |" in report and "| 4 / 20 (20) |" in report
    bad = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--quick", "--extra-modes", "deep:0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "--extra-modes: 'deep:0' must be KIND:I" in bad.stderr


def test_modes_frontier_quick_run_judges_deep_reuse_and_the_forecast_rule(tmp_path):
    from benchmarks.harness import have_deepcache
    from benchmarks.modes_frontier import forecast_verdict

    out = tmp_path / "m.md"
    speed = ROOT / "benchmarks" / "results" / "speed-256-deep.md"
    options = ["--samplers", "DPM-Solver-20", "--out", str(out), "--speed", str(speed)]
    run_script("modes_frontier.py", "--quick", *options)
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["results"]["DPM-Solver-20"]
    assert data["pairs"] == 8
    assert {"stock", "encoder: paper", "deep:3", "deep+forecast:3", "deep:5", "encoder: auto:4"} <= set(rows)
    # Calibrated deep reuse, placed by each criterion of the shipped calibration, and at the extra budget.
    assert {"deep auto:7", "deep auto:7 (feature)", "deep auto:4", "deep auto:6"} <= set(rows)
    assert rows["deep auto:6"]["full_passes"] == 6
    assert (tmp_path / "m-speed.png").stat().st_size > 0
    assert rows["deep:3"]["full_passes"] == 7 and rows["deep:5"]["full_passes"] == 4
    if have_deepcache():  # a peer, installed in the benchmark environment only
        assert data["agreement"]["DPM-Solver-20"] == {"3": 0.0, "5": 0.0}
    else:
        assert "deepcache:3" not in rows
    assert out.with_suffix(".png").stat().st_size > 0 and "not kept" in forecast_verdict(
        {
            "deep:3": {"psnr": 30.0, "delta": 0.0},
            "deep+forecast:3": {"psnr": 31.0, "delta": -0.02},
        },
        (3,),
    )


def test_modes_frontier_seed_offset_gives_fresh_seeds_and_says_so(tmp_path):
    keep = ["--skip", "^(?!(stock|deep:3)$)", "--samplers", "DPM-Solver-20"]
    psnr = {}
    for offset in (0, 1000):
        out = tmp_path / f"m{offset}.md"
        run_script("modes_frontier.py", "--quick", "--seed-offset", str(offset), "--out", str(out), *keep)
        data = json.loads(out.with_suffix(".json").read_text())
        assert data["seed_offset"] == offset and set(data["results"]["DPM-Solver-20"]) == {"stock", "deep:3"}
        assert f"seeds {offset} to {offset + 7})" in out.read_text()
        psnr[offset] = data["results"]["DPM-Solver-20"]["deep:3"]["psnr"]
    assert psnr[0] != psnr[1000]  # other noise, other images


def test_the_modes_frontier_rules_and_speeds_read_as_written():
    from benchmarks.modes_frontier import criterion_verdict, placement_verdict, read_speedups, speed_of

    rows = {f"deep:{i}": {"full_passes": b} for i, b in ((2, 10), (3, 7), (4, 5), (5, 4))}
    for b, prediction, feature in ((10, 40.0, 37.0), (7, 35.0, 35.1), (5, 31.0, 30.8), (4, 26.9, 26.8)):
        rows[f"deep auto:{b}"] = {"psnr": prediction, "delta": 0.0}
        rows[f"deep auto:{b} (feature)"] = {"psnr": feature, "delta": 0.0}
    assert "**prediction stays**" in criterion_verdict(rows, (2, 3, 4, 5))
    rows["deep auto:5"]["psnr"] = 30.0
    assert "**feature becomes**" in criterion_verdict(rows, (2, 3, 4, 5))
    cache = {"deepcache:2": {"full_passes": 10, "psnr": 37.0, "delta": 0.04}}
    cache["deep auto:10"] = {"psnr": 40.0, "delta": 0.02}  # higher PSNR, 2 points less faithful: no
    assert "at no full passes, not at [10]" in placement_verdict(cache, (2,))
    cache["deep auto:10"]["delta"] = 0.035  # within 1 point: yes
    assert "at [10] full passes" in placement_verdict(cache, (2,))

    speedups = read_speedups(ROOT / "benchmarks" / "results" / "speed-256-deep.md")
    assert speedups[("DPM-Solver-20", "deep:3")] == 2.39 and speedups[("DPM-Solver-20", "stock")] == 1.0
    assert speed_of("deep auto:7", 7, "DPM-Solver-20", speedups, 20) == 2.39  # as many full passes
    assert speed_of("deep auto:6", 6, "DPM-Solver-20", speedups, 20) is None  # none measured
    assert speed_of("encoder: paper", 7, "DPM-Solver-20", speedups, 20) == 1.48


def test_deep_variants_quick_run_checks_its_prototype_against_the_package(tmp_path):
    out = tmp_path / "v.md"
    run_script("deep_variants.py", "--quick", "--threads", "1", "--out", str(out))
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    assert {"stock", "deep:3", "compose:3", "damped:3", "batched:3", "deep:5", "batched:5"} <= set(rows)
    assert any(row["family"] == "depth" for row in rows.values())
    # The step-plan prototype computes deep reuse and its forecast exactly as the package does.
    assert data["agreement"] == {"plan vs deep": 0.0, "gain 1 vs forecast=1": 0.0}
    assert "The rules" in out.read_text()


def test_deep_variants_budgets_plans_and_rules_read_as_written(tmp_path):
    from benchmarks.deep_variants import compose_plan, depth_budgets, verdicts

    costs = {"partial": {"0": 0.05, "1": 0.15, "2": 0.25, "3": 0.9}}
    # DeepCache:3 costs 7 + 13 * 0.05 = 7.65: branch 1 fits 5 full steps (5 + 15 * 0.15 = 7.25), branch 2
    # 3 (3 + 17 * 0.25 = 7.25; 4 would cost 8.0), branch 3 none.
    assert depth_budgets(20, 3, costs) == [(1, 5), (2, 3)]
    assert compose_plan(10, 3) == "FPPEPPFPPE"
    rows = {
        "deep:2": {"family": "baseline", "interval": 2, "psnr": 30.0, "delta": 0.0},
        "depth b1:8 (I=2)": {"family": "depth", "interval": 2, "psnr": 31.0, "delta": -0.005},
        "batched:2": {"family": "batched", "interval": 2, "psnr": 29.6, "delta": -0.02},
    }
    found = verdicts(rows, (2,))
    assert found["depth"].startswith("beats the baseline at intervals [2]")
    assert "faithfulness lower by more than 1 point at [2]" in found["batched"]
    missing = subprocess.run(
        [sys.executable, "benchmarks/deep_variants.py", "--costs-file", str(tmp_path / "none.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "measure it first with --costs" in missing.stderr


def test_depth_choice_budgets_and_rules_read_as_written():
    from benchmarks.depth_choice import verdicts
    from benchmarks.harness.budgets import budget_of

    assert budget_of(3, 20, 0.05) == pytest.approx(7 + 13 * 0.05)  # DeepCache:3's cost
    row = dict(delta_ci=(0, 0), psnr_ci=(0, 0))
    budget = {
        "interval": 2,
        "pick": 3,
        "baseline": {"name": "deep:2", "branch": 0, "psnr": 37.0, "delta": 0.04, **row},
        "candidates": [
            {"name": "b0:10", "branch": 0, "psnr": 40.0, "delta": 0.0, **row},
            {"name": "b3:5", "branch": 3, "psnr": 50.0, "delta": 0.025, **row},
            {"name": "b4:4", "branch": 4, "psnr": 50.4, "delta": 0.03, **row},
        ],
    }
    # The pick is within 0.5 dB and 1 point of the best by PSNR: it ranks well; it has more PSNR than
    # DeepCache and 1.5 points less faithfulness: it does not beat it.
    assert verdicts(budget) == {
        "pick": "b3:5",
        "best": "b4:4",
        "ranks_well": True,
        "beats": False,
        "strictly": False,
    }
    budget["candidates"][2]["psnr"] = 50.6  # more than 0.5 dB better than the pick
    assert verdicts(budget)["ranks_well"] is False
    budget["baseline"]["delta"] = 0.03  # 0.5 points more faithful than the pick: beats, not strictly
    assert verdicts(budget)["beats"] is True and verdicts(budget)["strictly"] is False


def test_head_to_head_rules_and_pairs_read_as_written():
    from benchmarks.head_to_head import fresh_pairs, verdict

    prompts, seeds, labels = fresh_pairs(quick=False)
    assert len(prompts) == len(seeds) == len(labels) == 480
    assert seeds[0] == 2000 and seeds[-1] == 2479  # fresh: other benchmarks use 0-239 and 1000-1239

    def cell(faith, faith_ci, psnr, psnr_ci):
        return {"faith_diff": (faith, faith_ci), "psnr_diff": (psnr, psnr_ci)}

    # Within noise of DeepCache (interval holds 0, point at least -1 point) with more PSNR: holds its own; the
    # PSNR interval above 0 and a faithfulness point of at least 0 make it beat DeepCache.
    assert verdict(cell(0.0, (-0.02, 0.02), 2.0, (1.0, 3.0))) == {"holds": True, "beats": True}
    assert verdict(cell(-0.005, (-0.03, 0.02), 2.0, (1.0, 3.0))) == {"holds": True, "beats": False}
    assert verdict(cell(0.0, (-0.02, 0.02), 0.5, (-0.1, 1.0))) == {"holds": True, "beats": False}
    # 1.5 points less faithful (interval holds 0): not within noise, so not held.
    assert verdict(cell(-0.015, (-0.04, 0.01), 2.0, (1.0, 3.0)))["holds"] is False
    # Less PSNR than DeepCache: not held, however faithful.
    assert verdict(cell(0.05, (0.01, 0.09), -0.1, (-0.5, 0.3)))["holds"] is False
    # More faithful beyond noise (interval above 0): held.
    assert verdict(cell(0.05, (0.01, 0.09), 0.1, (-0.5, 0.3)))["holds"] is True


#: The script that writes each committed report, by the report's name up to its variant.
REPORT_SCRIPTS = {
    "frontier": "frontier",
    "modes-frontier": "modes_frontier",
    "head-to-head": "head_to_head",
    "depth-choice": "depth_choice",
    "deep-variants": "deep_variants",
    "quality": "quality",
    "img2img-quality": "img2img_quality",
    "placement-search": "placement_search",
    "first-call": "first_call",
    "schedulers-25": "modes_frontier",
    "speed-256-schedulers": "speed",
}


def test_every_committed_report_regenerates_identically_from_its_json(tmp_path):
    import importlib

    results = ROOT / "benchmarks" / "results"
    pairs = sorted(p for p in results.glob("*.json") if p.with_suffix(".md").is_file())
    assert len(pairs) == 32
    differ = []
    for path in pairs:
        prefix = max((p for p in REPORT_SCRIPTS if path.stem.startswith(p)), key=len)
        script = importlib.import_module(f"benchmarks.{REPORT_SCRIPTS[prefix]}")
        out = tmp_path / path.with_suffix(".md").name
        assert script.main(["--from-json", str(path), "--out", str(out)]) == 0
        if out.read_text() != path.with_suffix(".md").read_text():
            differ.append(path.name)
    assert not differ, f"reports that do not regenerate from their JSON: {differ}"


def test_every_method_a_committed_report_names_is_one_registration_with_its_full_passes():
    from benchmarks.harness import Context, full_passes
    from benchmarks.harness.methods import METHODS, lookup
    from faster_diffusion import Sampler

    results = ROOT / "benchmarks" / "results"
    # (report, steps, method name, its full passes) of every row whose method is a registration.
    rows = []
    for path in results.glob("modes-frontier*.json"):
        for sampler, by_name in json.loads(path.read_text())["results"].items():
            steps = Sampler.parse(sampler).default_steps
            rows += [(path.name, steps, name, row["full_passes"]) for name, row in by_name.items()]
    for path in (p.with_suffix(".json") for p in results.glob("deep-variants*.md")):
        by_name = json.loads(path.read_text())["rows"]
        # The compose and damped step plans are the script's prototype, not methods of the product.
        rows += [
            (path.name, 20, name, row["full_passes"])
            for name, row in by_name.items()
            if row["family"] not in ("compose", "damped")
        ]
    for path in results.glob("depth-choice*.json"):
        for result in json.loads(path.read_text())["results"]:
            # The candidates bB:F are placed during the run; the baseline is DeepCache:I's rule.
            rows += [(path.name, 20, b["baseline"]["name"], b["baseline"]["full"]) for b in result["budgets"]]
    for path in results.glob("quality*.json"):
        for sampler, by_name in json.loads(path.read_text())["results"].items():
            steps = Sampler.parse(sampler).default_steps
            rows += [(path.name, steps, name, row["encoder_passes"]) for name, row in by_name.items()]
    reports = {report for report, *_ in rows}
    assert {"modes-frontier.json", "deep-variants.json", "depth-choice.json", "quality.json"} <= reports
    for report, steps, name, full in rows:
        assert sum(bool(m.pattern.fullmatch(name)) for m in METHODS) == 1, (report, name)
        assert full_passes(name, Context(steps=steps)) == full, (report, name)
    assert lookup("deepcache:3")[0].needs == "DeepCache"
    with pytest.raises(KeyError, match="no method is registered for 'tgate:3'"):
        lookup("tgate:3")
