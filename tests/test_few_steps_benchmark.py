"""The few-step benchmark's one piece of maths: the steps a gen-PPL curve needs for a target
(benchmarks/few_steps.py, ``steps_for_ppl``), against curves whose crossing is known by hand."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("few_steps", Path(__file__).resolve().parent.parent / "benchmarks" / "few_steps.py")
few_steps = sys.modules["few_steps"] = importlib.util.module_from_spec(_SPEC)  # dataclasses look their module up
_SPEC.loader.exec_module(few_steps)


def test_a_power_law_curve_is_crossed_where_its_formula_says():
    # gen-PPL = 3200 / steps is a straight line in log-log, so the interpolation is exact: 3200 / 150 steps
    crossing = few_steps.steps_for_ppl([8, 16, 32, 64], [400, 200, 100, 50], 150)
    assert crossing.relation == "="
    assert crossing.steps == pytest.approx(3200 / 150, rel=1e-12)


def test_between_two_points_the_line_is_straight_in_log_log():
    # from (16, 90) to (32, 40): log ppl falls by log(90/40) per doubling; the target 60 is log(90/60) into it
    crossing = few_steps.steps_for_ppl([8, 16, 32], [120, 90, 40], 60)
    assert crossing.steps == pytest.approx(16 * 2 ** (math.log(1.5) / math.log(2.25)), rel=1e-12)
    assert few_steps.steps_for_ppl([8, 16, 32], [120, 90, 40], 90) == few_steps.Crossing(16.0, "=")  # on a measured point


def test_the_first_crossing_of_a_noisy_curve_counts():
    crossing = few_steps.steps_for_ppl([8, 16, 32, 64], [300, 100, 400, 50], 200)
    assert crossing.steps == pytest.approx(8 * 2 ** (math.log(1.5) / math.log(3)), rel=1e-12)


def test_a_target_outside_the_measured_range_is_a_bound():
    assert few_steps.steps_for_ppl([8, 16], [100, 50], 120) == few_steps.Crossing(8.0, "<=")
    assert few_steps.steps_for_ppl([8, 16], [100, 50], 10) == few_steps.Crossing(16.0, ">")
    with pytest.raises(ValueError):
        few_steps.steps_for_ppl([16, 8], [100, 50], 60)


def test_the_distillation_ratio_is_teacher_steps_over_student_steps():
    teacher = {8: 400.0, 16: 200.0, 32: 100.0, 64: 50.0}  # 3200 / steps
    r = few_steps.distillation_ratio(teacher, {8: 80.0, 16: 60.0}, 8)
    assert r["teacher_steps"] == pytest.approx(40.0) and r["ratio"] == pytest.approx(5.0) and r["relation"] == "="
    r = few_steps.distillation_ratio(teacher, {8: 20.0}, 8)
    assert r["relation"] == ">" and r["ratio"] == pytest.approx(8.0)  # more than 64 / 8: not reached at the most steps measured
