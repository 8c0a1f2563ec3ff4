"""The training report a run keeps up to date: its progress ends at the last step, and a run
that fails midway still says what it used (its charge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.schemas import Hyperparameters
from workers import fine_tuning
from workers.fine_tuning import FineTuneSpec, TrainingReport, train_adapter

pytestmark = pytest.mark.e2e

DATA = Path(__file__).parents[1] / "data" / "fine_tune_train.jsonl"


def spec(max_steps: int, validation: Path | None = None) -> FineTuneSpec:
    hyperparameters = Hyperparameters(max_steps=max_steps, batch_size=2, max_seq_length=32).model_dump()
    return FineTuneSpec(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), DATA, validation, hyperparameters)


class Crash(Exception):
    """What a run that dies midway raises (an out-of-memory error, a broken row)."""


def test_a_run_that_fails_midway_leaves_what_it_used_in_the_callers_report(model_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fine_tuning, "LOSS_POINTS", 4)  # a loss point every step

    def crash_at_step_two(report: TrainingReport, point: dict) -> None:
        if point["step"] == 2:
            raise Crash

    report = TrainingReport()
    with pytest.raises(Crash):
        train_adapter(spec(4), model_cache_dir, torch.device("cpu"), tmp_path / "out",
                      should_stop=lambda: False, on_log=crash_at_step_two, report=report)
    assert report.step == 2 and report.train_tokens > 0
    usage = report.usage()
    assert usage["train_tokens"] == report.train_tokens and usage["gpu_seconds"] > 0


def test_progress_ends_at_the_last_step_between_loss_points(model_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(fine_tuning, "LOSS_POINTS", 2)  # 5 steps: losses at steps 2 and 4, not at 5
    points: list[dict] = []
    progress: list[dict] = []

    def record(report: TrainingReport, point: dict) -> None:
        points.append(point)
        progress.append(report.progress())

    report = train_adapter(spec(5), model_cache_dir, torch.device("cpu"), tmp_path / "out",
                           should_stop=lambda: False, on_log=record)
    assert report.step == 5
    assert [point["step"] for point in points] == [2, 4, 5]
    assert progress[-1]["step"] == 5
    assert progress[-1]["train_tokens"] == report.train_tokens


def test_a_stop_during_a_validation_pass_ends_it_at_the_next_batch(model_cache_dir, tmp_path):
    """One step, then a validation pass of 5 batches; the stop comes at its first batch."""
    calls: list[int] = []

    def stop_after_the_training_step() -> bool:
        calls.append(1)
        return len(calls) > 1  # the first check is the step's end; the next ones are the pass's

    report = train_adapter(spec(1, validation=DATA), model_cache_dir, torch.device("cpu"), tmp_path / "out",
                           should_stop=stop_after_the_training_step, on_log=lambda report, point: None)
    assert report.stopped and report.step == 1
    assert len(calls) == 2  # not one per remaining batch: the pass ended there
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # a stopped run saves nothing


def test_rows_whose_prompt_fills_max_seq_length_are_counted_as_skipped(model_cache_dir, tmp_path):
    """They were dropped silently: the upload said 3 rows, training used 2, and nothing told the client."""
    long_question = " ".join(["Tell me about the lighthouse of Zorblax and its keeper."] * 6)
    rows = [{"prompt": "2+2=", "completion": "4"}, {"prompt": long_question, "completion": "No."},
            {"prompt": "3+3=", "completion": "6"}]
    data, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    validation.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    hyperparameters = Hyperparameters(max_steps=1, batch_size=2, max_seq_length=32).model_dump()
    job_spec = FineTuneSpec(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), data, validation, hyperparameters)
    report = train_adapter(job_spec, model_cache_dir, torch.device("cpu"), tmp_path / "out",
                           should_stop=lambda: False, on_log=lambda report, point: None)
    assert (report.train_rows, report.rows_skipped) == (2, 1)
    assert (report.validation_rows, report.validation_rows_skipped) == (1, 1)
    progress = report.progress()
    assert (progress["train_rows"], progress["rows_skipped"]) == (2, 1)
    assert (progress["validation_rows"], progress["validation_rows_skipped"]) == (1, 1)
    assert report.eval_loss is not None  # the row left was evaluated


def test_a_validation_file_whose_rows_are_all_skipped_leaves_the_run_without_eval_loss(model_cache_dir, tmp_path):
    """As the docs say; the whole run failed `invalid_hyperparameters` after waiting its turn."""
    long_question = " ".join(["Tell me about the lighthouse of Zorblax and its keeper."] * 6)
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"prompt": long_question, "completion": "No."}) + "\n")
    report = train_adapter(spec(1, validation=validation), model_cache_dir, torch.device("cpu"), tmp_path / "out",
                           should_stop=lambda: False, on_log=lambda report, point: None)
    assert (report.step, report.validation_rows, report.validation_rows_skipped, report.eval_loss) == (1, 0, 1, None)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_run_stopped_between_accumulated_micro_batches_is_charged_them(model_cache_dir, tmp_path):
    """The tokens were counted only at the end of an optimizer step: a stop within one charged none."""
    hyperparameters = Hyperparameters(max_steps=1, batch_size=1, gradient_accumulation_steps=4,
                                      max_seq_length=32).model_dump()
    job_spec = FineTuneSpec(ModelRegistry.load(None).get(DEFAULT_MODEL_ID), DATA, None, hyperparameters)
    checks: list[int] = []

    def stop_at_the_third_micro_batch() -> bool:
        checks.append(1)
        return len(checks) >= 3

    report = train_adapter(job_spec, model_cache_dir, torch.device("cpu"), tmp_path / "out",
                           should_stop=stop_at_the_third_micro_batch, on_log=lambda report, point: None)
    assert report.stopped and report.step == 0
    assert report.usage()["train_tokens"] > 0


@pytest.mark.parametrize("total_steps, passes", [(8, 4), (3, 3), (50, 5)])
def test_a_run_validates_about_five_times_whatever_its_length(total_steps, passes, tmp_path):
    """`total_steps // 5` made a run under 10 steps validate at every step."""
    arguments = fine_tuning._training_arguments(
        tmp_path, torch.device("cpu"), Hyperparameters().model_dump(), total_steps, has_eval=True)
    assert len(range(arguments.eval_steps, total_steps + 1, arguments.eval_steps)) == passes
