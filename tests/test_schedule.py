"""Key-step schedules: presets, parsing, validation, and the exact error messages users see."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from faster_diffusion import (
    PAPER_DDIM_50_KEY_STEPS,
    PAPER_DPM_SOLVER_20_KEY_STEPS,
    FasterDiffusionConfig,
    KeyStepError,
    KeySteps,
    KeyStepSchedule,
    NoiseInjection,
)
from faster_diffusion.schedule import KeyStepKind, paper_key_steps


def test_paper_presets_are_the_papers_lists():
    assert KeySteps.paper().resolve(50).indices == PAPER_DDIM_50_KEY_STEPS == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert KeySteps.paper().resolve(20).indices == PAPER_DPM_SOLVER_20_KEY_STEPS == (0, 1, 2, 3, 5, 10, 15)


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (1, (0,)),
        (4, (0, 1, 2, 3)),
        (12, (0, 1, 2, 3, 5, 10)),
        (30, (0, 1, 2, 3, 5, 10, 15, 25)),
        (100, (0, 2, 4, 6, 10, 20, 30, 50, 70)),
        (75, (0, 2, 3, 5, 8, 15, 23, 38, 53)),  # halves round up
    ],
)
def test_paper_preset_rule_for_other_step_counts(steps, expected):
    """Up to 50 steps: the 50-step list cut at N. Above: scaled to N, i * N / 50 rounded half up."""
    assert paper_key_steps(steps) == expected
    schedule = KeySteps.paper().resolve(steps)
    assert schedule.indices == expected
    assert len(set(expected)) == len(expected) and expected[0] == 0 and expected[-1] < steps


def test_uniform_and_every_step():
    assert KeySteps.uniform(4).resolve(10).indices == (0, 4, 8)
    assert KeySteps.uniform(4).resolve(50).indices == tuple(range(0, 50, 4))
    assert KeySteps.uniform(100).resolve(20).indices == (0,)
    assert KeySteps.every_step().resolve(5).indices == (0, 1, 2, 3, 4)
    assert KeySteps.uniform(1).resolve(5).is_every_step


def test_groups_and_per_step_views():
    schedule = KeySteps.paper().resolve(20)
    assert schedule.groups == ((0, 1), (1, 2), (2, 3), (3, 5), (5, 10), (10, 15), (15, 20))
    assert schedule.group_end[3:6] == (5, 5, 10)
    assert schedule.is_key[:6] == (True, True, True, True, False, True)
    assert schedule.num_key_steps == 7


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("paper", KeySteps.paper()),
        ("  PAPER ", KeySteps.paper()),
        ("all", KeySteps.every_step()),
        ("uniform:4", KeySteps.uniform(4)),
        ("uniform = 3", KeySteps.uniform(3)),
        ("0,1,2,3,5,10,15,25,35", KeySteps.explicit(PAPER_DDIM_50_KEY_STEPS)),
        ("[0, 5, 10]", KeySteps.explicit([0, 5, 10])),
        ("0", KeySteps.explicit([0])),
    ],
)
def test_parse_accepts_the_forms_users_type(text, expected):
    assert KeySteps.parse(text) == expected


@pytest.mark.parametrize(
    ("spec", "steps", "echo"),
    [
        ("paper", 50, "paper: 9 of 50 steps are key steps [0, 1, 2, 3, 5, 10, 15, 25, 35]"),
        ("uniform:4", 10, "uniform:4: 3 of 10 steps are key steps [0, 4, 8]"),
        ("0, 7", 20, "0,7: 2 of 20 steps are key steps [0, 7]"),
        ("all", 3, "all: 3 of 3 steps are key steps [0, 1, 2]"),
    ],
)
def test_schedule_is_echoed_back(spec, steps, echo):
    assert KeySteps.parse(spec).resolve(steps).describe() == echo
    assert str(KeySteps.parse(str(KeySteps.parse(spec)))) == str(KeySteps.parse(spec))


BAD_TEXT = [
    ("", "key_steps: invalid value '': expected "),
    ("fast", "key_steps: invalid value 'fast': expected "),
    ("0,a,5", "key_steps: invalid value '0,a,5': expected "),
    ("0,1.5", "key_steps: invalid value '0,1.5': expected "),
    ("0,,5", "key_steps: invalid value '0,,5': expected "),
    (
        "uniform:x",
        "key_steps: invalid value 'uniform:x': uniform spacing must be a whole number >= 1, got 'x'",
    ),
    ("uniform:0", "key_steps: uniform spacing must be a whole number >= 1, got 0"),
    (
        "1,2,3",
        "key_steps: the list must contain step 0 (the first step always runs in full: nothing ran before it "
        "to reuse), got [1, 2, 3]",
    ),
    ("0,5,5,10", "key_steps: step 5 is listed twice in [0, 5, 5, 10]"),
    ("0,10,5", "key_steps: step indices must be in increasing order, got [0, 10, 5]"),
    ("0,-1", "key_steps: step indices must be >= 0, got -1"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TEXT)
def test_parse_rejects_bad_text_with_a_message_naming_the_input(text, message):
    with pytest.raises(KeyStepError) as error:
        KeySteps.parse(text)
    assert str(error.value).startswith(message)
    assert isinstance(error.value, ValueError)


def test_invalid_forms_message_lists_what_is_allowed():
    with pytest.raises(KeyStepError, match=re.escape("'paper', 'all', 'auto', 'auto:B'")):
        KeySteps.parse("sometimes")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (5, "key_steps must be text, got int: 5"),
        (None, "key_steps must be text, got NoneType: None"),
    ],
)
def test_parse_rejects_non_text(value, message):
    with pytest.raises(KeyStepError, match=re.escape(message)):
        KeySteps.parse(value)


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([], "key_steps: the list of step indices is empty; it must start with 0"),
        ([0, 2.0], "key_steps: step indices must be whole numbers, got 2.0"),
        ([0, True], "key_steps: step indices must be whole numbers, got True"),
        ("0,1", "key_steps: expected a list of step indices, got '0,1'"),
    ],
)
def test_explicit_rejects_bad_lists(indices, message):
    with pytest.raises(KeyStepError, match=re.escape(message)):
        KeySteps.explicit(indices)


@pytest.mark.parametrize(
    "indices",
    [
        np.array([0, 3, 5]),
        np.array([0, 3, 5], dtype=np.uint8),
        [np.int32(0), np.int32(3), np.int32(5)],
        (0, np.int64(3), 5),
        torch.tensor([0, 3, 5]),  # iterates to 0-dim integer tensors, which have __index__
        [np.array(0), np.array(3), np.array(5)],  # 0-dim arrays too
        (np.int16(i) for i in (0, 3, 5)),
    ],
    ids=["np-int64", "np-uint8", "list-of-np-int32", "mixed", "torch", "0-dim-arrays", "generator"],
)
def test_explicit_accepts_numpy_and_torch_integers_and_stores_plain_ints(indices):
    keys = KeySteps.explicit(indices)
    plain = KeySteps.explicit([0, 3, 5])
    assert keys == plain and hash(keys) == hash(plain)
    assert [type(i) for i in keys.indices] == [int, int, int]
    assert repr(keys) == repr(plain) and str(keys) == "0,3,5"
    assert json.dumps(keys.indices) == "[0, 3, 5]"
    schedule = keys.resolve(10)
    assert schedule.indices == (0, 3, 5) and [type(i) for i in schedule.indices] == [int, int, int]
    assert FasterDiffusionConfig(key_steps=keys) == FasterDiffusionConfig(key_steps=plain)


def test_every_way_of_building_an_explicit_list_stores_plain_ints():
    """The dataclass itself and a resolved schedule go through the same check as ``explicit``."""
    direct = KeySteps(KeyStepKind.EXPLICIT, indices=np.array([0, 4]))
    assert direct == KeySteps.explicit([0, 4]) and type(direct.indices) is tuple
    assert direct.with_origin("here").indices == (0, 4)
    schedule = KeyStepSchedule(num_steps=8, indices=np.array([0, 4]))
    assert schedule.indices == (0, 4) and [type(i) for i in schedule.indices] == [int, int]
    cut = KeyStepSchedule(num_steps=8, indices=[np.int64(2), np.int64(4)], start=2)
    assert cut.indices == (2, 4) and [type(i) for i in cut.indices] == [int, int]


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([0, np.float64(3.0)], "key_steps: step indices must be whole numbers, got np.float64(3.0)"),
        (np.array([0.0, 3.0]), "key_steps: step indices must be whole numbers, got np.float64(0.0)"),
        ([0, 3.0], "key_steps: step indices must be whole numbers, got 3.0"),
        ([0, np.True_], "key_steps: step indices must be whole numbers, got np.True_"),
        (np.array([True, False]), "key_steps: step indices must be whole numbers, got np.True_"),
        ([0, True], "key_steps: step indices must be whole numbers, got True"),
        (torch.tensor([0.0, 3.0]), "key_steps: step indices must be whole numbers, got tensor(0.)"),
        (torch.tensor([True, False]), "key_steps: step indices must be whole numbers, got tensor(True)"),
        (torch.tensor([[0, 3]]), "key_steps: step indices must be whole numbers, got tensor([0, 3])"),
        (np.array([[0, 3]]), "key_steps: step indices must be whole numbers, got array([0, 3])"),
        (np.array(0), "key_steps: expected a list of step indices, got array(0)"),
        (torch.tensor(0), "key_steps: expected a list of step indices, got tensor(0)"),
        (np.int64(0), "key_steps: expected a list of step indices, got np.int64(0)"),
    ],
    ids=[
        "np-float64",
        "float-array",
        "float",
        "np-bool",
        "bool-array",
        "bool",
        "float-tensor",
        "bool-tensor",
        "2-d-tensor",
        "2-d-array",
        "0-d-array",
        "0-d-tensor",
        "np-int64-alone",
    ],
)
def test_explicit_refuses_floats_bools_and_non_scalars_of_numpy_and_torch(indices, message):
    with pytest.raises(KeyStepError) as error:
        KeySteps.explicit(indices)
    assert str(error.value) == message


def test_out_of_range_is_found_when_the_step_count_is_known():
    spec = KeySteps.parse("0,1,2,3,5,10,15,25,35")  # fine for 50 steps
    assert spec.resolve(50).num_key_steps == 9
    with pytest.raises(KeyStepError) as error:
        spec.resolve(20)
    assert str(error.value) == "key_steps: index 25 is out of range for 20 steps; allowed indices are 0 to 19"


def test_schedule_is_immutable_and_validated():
    schedule = KeySteps.paper().resolve(20)
    with pytest.raises(AttributeError):
        schedule.indices = (0,)
    with pytest.raises(KeyStepError, match="out of range for 3 steps"):
        KeyStepSchedule(num_steps=3, indices=(0, 5))
    with pytest.raises(KeyStepError, match="num_steps must be a whole number >= 1, got 0"):
        KeySteps.paper().resolve(0)


def test_noise_injection_steps_and_validation():
    ddim_timesteps = list(range(981, 0, -20))  # DDIM-50 on SD's schedule
    applies = NoiseInjection().applies_at(ddim_timesteps)
    assert applies == (False,) * 25 + (True,) * 25
    assert NoiseInjection.off().applies_at(ddim_timesteps) == (False,) * 50
    assert NoiseInjection(alpha=0.0).applies_at(ddim_timesteps) == (False,) * 50
    with pytest.raises(
        ValueError, match=re.escape("noise_injection: alpha (strength) must be >= 0, got -0.1")
    ):
        NoiseInjection(alpha=-0.1)
    with pytest.raises(
        ValueError, match=re.escape("noise_injection: tau (threshold) must be a finite number")
    ):
        NoiseInjection(tau=float("nan"))
    with pytest.raises(ValueError, match="enabled must be true or false"):
        NoiseInjection(enabled="yes")


def test_a_schedule_cut_to_the_steps_that_run_keeps_its_key_steps_and_starts_with_one():
    whole = KeySteps.paper().resolve(50)
    cut = whole.cut(10)  # image-to-image at strength 0.8: steps 10 to 49 run
    assert (cut.indices, cut.start, cut.stop, cut.num_steps_run) == ((10, 15, 25, 35), 10, 50, 40)
    assert cut.groups == ((10, 15), (15, 25), (25, 35), (35, 50))
    assert cut.is_key[10] and not cut.is_key[11] and cut.group_end[12] == 15
    assert whole.cut(12, 40).indices == (12, 15, 25, 35)  # 12 is no key step of the whole schedule
    assert KeySteps.paper().resolve(50, start=12, stop=40) == whole.cut(12, 40)  # resolve cuts a list
    assert KeySteps.every_step().resolve(20).cut(8).is_every_step
    assert cut.describe() == (
        "paper: 4 of the 40 steps that run (10 to 49 of 50) are key steps [10, 15, 25, 35]"
    )


@pytest.mark.parametrize(
    ("start", "stop", "indices", "message"),
    [
        (5, 3, (5,), "must lie within the 10 steps"),
        (0, 11, (0,), "must lie within the 10 steps"),
        (4, None, (5, 6), r"first step that runs \(4\) must be a key step"),
        (4, 6, (4, 7), "index 7 is out of range"),
    ],
)
def test_a_cut_schedule_is_validated(start, stop, indices, message):
    with pytest.raises(KeyStepError, match=message):
        KeyStepSchedule(num_steps=10, indices=indices, start=start, stop=stop)
