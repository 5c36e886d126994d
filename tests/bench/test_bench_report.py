"""The table's numbers on hand-made accuracies: average, normalized accuracy, ranking."""

from __future__ import annotations

import dataclasses

import pytest

from splice.bench.methods import SkippedMethod
from splice.bench.report import markdown_table, render_tables, score_row, section_rows
from splice.bench.results import BenchResults, Failure, Row, Sweep, SweepPoint, TaskSummary
from splice.errors import DataError

EXPERTS = {"a": 0.8, "b": 0.5}


def test_score_row_values():
    s = score_row({"a": 0.4, "b": 0.5}, EXPERTS)
    assert s.avg == pytest.approx(0.45)
    assert s.normalized == {"a": pytest.approx(0.5), "b": pytest.approx(1.0)}
    assert s.avg_normalized == pytest.approx(0.75)
    # above the expert is allowed (a merge can help a task)
    assert score_row({"a": 0.8, "b": 0.6}, EXPERTS).avg_normalized == pytest.approx(1.1)


def test_score_row_rejects_a_zero_expert():
    with pytest.raises(DataError, match="undefined"):
        score_row({"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 0.5})


def _rows():
    return [
        Row("full", "baseline", "experts", dict(EXPERTS)),
        Row("shared", "baseline", "multi-task", {"a": 0.7, "b": 0.6}),
        Row("full", "merged", "x", {"a": 0.4, "b": 0.25}, {"lambda": 1.0}, "default"),
        Row("full", "merged", "y", {"a": 0.8, "b": 0.25}, {"lambda": 0.5}, "tuned"),
        Row("lora", "merged", "z", {"a": 0.1, "b": 0.1}),
    ]


def test_section_rows_rank_and_filter():
    rows = section_rows(_rows(), "full", EXPERTS)
    assert [r.method for r in rows] == ["experts", "multi-task", "y", "x"]
    assert [round(r.score.avg_normalized, 4) for r in rows] == [1.0, 1.0375, 0.75, 0.5]
    assert rows[1].score.normalized == {"a": pytest.approx(0.875), "b": pytest.approx(1.2)}
    lora = section_rows(_rows(), "lora", {"a": 0.5, "b": 0.5})
    assert [r.method for r in lora] == ["multi-task", "z"]  # shared rows in every section
    assert lora[1].score.avg_normalized == pytest.approx(0.2)


def test_markdown_table_cells():
    text = markdown_table(section_rows(_rows(), "full", EXPERTS), ["a", "b"])
    lines = text.splitlines()
    assert lines[0] == "| model | setting | a | b | avg acc | norm. acc |"
    assert lines[2] == "| experts |  | 80.0 | 50.0 | 65.0 | 100.0 |"
    assert lines[4] == "| y | tuned: lambda=0.5 | 80.0 | 25.0 | 52.5 | 75.0 |"
    assert lines[5] == "| x | default: lambda=1.0 | 40.0 | 25.0 | 32.5 | 50.0 |"


def test_composition_rows_last_with_their_cost():
    """Composed rows follow the merges (ranked among themselves); the cost column appears
    with them: measured for a composed row, 1.00 for a merge, empty for a baseline."""
    rows = [
        *_rows(),
        Row("full", "composed", "retrieval routing", {"a": 0.4, "b": 0.5}, inference_cost=2.5),
        Row("full", "composed", "oracle routing", {"a": 0.8, "b": 0.5}, inference_cost=1.25),
    ]
    section = section_rows(rows, "full", EXPERTS)
    assert [r.method for r in section] == [
        "experts",
        "multi-task",
        "y",
        "x",
        "oracle routing",
        "retrieval routing",
    ]
    lines = markdown_table(section, ["a", "b"]).splitlines()
    assert lines[0] == "| model | setting | a | b | avg acc | norm. acc | rel. cost |"
    assert lines[2] == "| experts |  | 80.0 | 50.0 | 65.0 | 100.0 |  |"
    assert lines[4] == "| y | tuned: lambda=0.5 | 80.0 | 25.0 | 52.5 | 75.0 | 1.00 |"
    assert lines[6] == "| oracle routing |  | 80.0 | 50.0 | 65.0 | 100.0 | 1.25 |"
    assert lines[7] == "| retrieval routing |  | 40.0 | 50.0 | 45.0 | 75.0 | 2.50 |"


TASKS = {"a": TaskSummary(2, {}, []), "b": TaskSummary(4, {}, [])}


def test_render_tables_has_sections_and_chance():
    results = BenchResults(TASKS, {"full": section_rows(_rows(), "full", EXPERTS)})
    text = render_tables(results)
    assert "### full experts" in text
    assert "chance (balanced test sets): a 50.0, b 25.0" in text
    assert "end of its grid" not in text
    point = SweepPoint(3.0, 0.5, {}, 0.0)
    results.sweeps = [
        Sweep("full", "x", "lambda", 1.0, 3.0, [SweepPoint(1.0, 0.4, {}, 0.0), point]),
        Sweep("full", "y", "lambda", 1.0, 0.5, [point, SweepPoint(0.5, 0.6, {}, 0.0), point]),
    ]
    assert "outside): full x (lambda=3.0)." in render_tables(results)


def test_render_tables_lists_skipped_and_failed():
    results = BenchResults(
        TASKS,
        {"full": section_rows(_rows(), "full", EXPERTS)},
        skipped=[SkippedMethod("slerp", "takes exactly 1 model(s), the pool has 2")],
        failed=[Failure("lora", "m", "SpliceError: boom")],
    )
    text = render_tables(results)
    assert "Not applicable: slerp (takes exactly 1 model(s), the pool has 2)." in text
    assert "Failed on the lora experts, no row: m (SpliceError: boom)." in text


def test_row_json_keeps_the_keys_set_in_order():
    (row,) = section_rows([_rows()[2]], "full", EXPERTS)
    tuned = dataclasses.replace(row, variant="tuned", same_as_default=True)
    assert list(tuned.to_json()) == [
        "kind", "group", "method", "test", "params", "variant", "same_as_default",
        "avg", "normalized", "avg_normalized",
    ]  # fmt: skip
    assert _rows()[0].to_json() == {
        "kind": "full",
        "group": "baseline",
        "method": "experts",
        "test": EXPERTS,
    }
