"""Stages as readable text: one function the report, the terminal and the sweep share."""

from __future__ import annotations

import pytest

from compress.compressors.base import StageReport
from compress.report.describe import describe_pipeline, describe_stage, number, percent


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.15000000000000002, "0.15"),
        (0.30000000000000004, "0.3"),
        (200, "200"),
        (200.0, "200"),
        (1e-3, "0.001"),
        (2e-5, "0.00002"),
        (123456.7, "123457"),
        (3.14159265, "3.142"),
    ],
)
def test_number_rounds_float_noise(value, text) -> None:
    assert number(value) == text


def test_percent() -> None:
    assert percent(0.5) == "50%"
    assert percent(0.15000000000000002) == "15%"
    assert percent(0.125) == "12.5%"


def test_pipeline_reads_as_words() -> None:
    pipeline = [
        {"prune": {"sparsity": 0.5}},
        {"distill": {"train": {"max_steps": 60}}},
        {"int8": {}},
    ]
    assert describe_pipeline(pipeline) == "prune 50% magnitude -> distill 60 steps -> int8"


def test_defaults_fill_in_and_settings_show() -> None:
    assert describe_stage("prune") == "prune 50% magnitude"
    assert describe_stage("prune", {"method": "wanda", "pattern": "2:4"}) == "prune 50% wanda 2:4"
    assert describe_stage("rtn", {"bits": 8, "group_size": 64}) == "rtn 8-bit, group 64"
    assert describe_stage("gptq", {"group_size": None}) == "gptq 4-bit, per channel"
    assert describe_stage("nf4") == "nf4 (block 64)"
    assert describe_stage("int8", {"threshold": 4.0}) == "int8 (threshold 4)"
    student = describe_stage("distill", {"student": {"n_layer": 1, "n_embd": 64}})
    assert student == "distill (the run's training) into a new student (n_layer 1, n_embd 64)"
    student = describe_stage("distill", {"student": {"n_layer": 1}, "train": {"max_steps": 90}})
    assert student == "distill 90 steps into a new student (n_layer 1)"
    # a stage report written before the training keys nested under train
    assert describe_stage("distill", {"max_steps": 200}) == "distill 200 steps"
    assert describe_stage("structured", {"ratio": 0.3}) == (
        "structured prune 30% of heads + MLP (magnitude)"
    )
    tune = {"data": {"corpus": "files", "files": ["shakespeare.txt"]}, "train": {"max_steps": 40}}
    assert describe_stage("finetune", tune) == "finetune 40 steps on shakespeare.txt"
    assert describe_stage("finetune") == "finetune (the run's training)"


def test_no_python_reprs() -> None:
    text = describe_pipeline([{"distill": {"student": {"n_layer": 1}, "alpha": 0.7}}])
    assert "{" not in text and "'n_layer'" not in text and "=" not in text


def test_a_stage_report_says_the_steps_it_ran() -> None:
    curve = [{"step": i, "train_loss": 1.0} for i in range(1, 38)]
    report = StageReport(stage="distill", config={"max_steps": 200}, curve=curve)
    assert describe_pipeline([report]) == "distill 37 steps"
    assert describe_pipeline([]) == ""


def test_unknown_stage_falls_back_to_rounded_settings() -> None:
    assert describe_stage("mystery", {"a": 0.15000000000000002}) == "mystery (a 0.15)"
