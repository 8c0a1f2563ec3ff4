"""LoRA fine-tuning of a base model with peft and transformers' Trainer."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import structlog
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from shared.registry import ModelEntry
from shared.schemas import Hyperparameters, optimizer_steps
from shared.training_data import TrainingDataError, parse_training_file
from workers.model_loader import ModelUnavailable, weights_dir
from workers.training_data import IGNORE_INDEX, TokenizedExample, tokenize_example
from workers.training_tokenizers import training_tokenizer

log = structlog.get_logger(__name__)

# About this many loss points per run, so a long run's event history stays small.
LOSS_POINTS = 100


class FineTuneError(Exception):
    """A fine-tune that cannot run; `code` and `message` go into the job's error."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FineTuneSpec:
    """What to train: the base, the data files (absolute paths) and the hyperparameters."""

    base: ModelEntry
    training_file: Path
    validation_file: Path | None
    hyperparameters: dict[str, Any]
    quantization: str = "none"
    max_rows: int = 100_000
    # None picks per device (bf16 on CUDA, fp32 on the CPU); bench/fine_tune_steps.py compares.
    dtype: torch.dtype | None = None


@dataclass
class TrainingReport:
    """How far training got, updated as it runs; final once train_adapter returns."""

    step: int = 0
    total_steps: int = 0
    epoch: float = 0.0
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_step: int | None = None
    train_tokens: int = 0
    # Training rows trained on, and those skipped: their prompt fills max_seq_length, leaving
    # no answer token to learn.
    train_rows: int = 0
    rows_skipped: int = 0
    # The same of the validation file (no eval_loss when all its rows are skipped).
    validation_rows: int = 0
    validation_rows_skipped: int = 0
    seconds: float = 0.0
    stopped: bool = False
    losses: list[float] = field(default_factory=list)
    # The last step the progress hook was told of.
    reported_step: int = 0
    started: float = field(default_factory=time.monotonic)

    def usage(self) -> dict[str, Any]:
        """Return what the run used so far: its charge, also when it failed midway."""
        seconds = self.seconds or time.monotonic() - self.started
        return {"train_tokens": self.train_tokens, "gpu_seconds": round(seconds, 4)}

    def progress(self) -> dict[str, Any]:
        """Return the job's `progress` view."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "epoch": round(self.epoch, 4),
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "train_tokens": self.train_tokens,
            "train_rows": self.train_rows,
            "rows_skipped": self.rows_skipped,
            "validation_rows": self.validation_rows,
            "validation_rows_skipped": self.validation_rows_skipped,
        }


ProgressHook = Callable[[TrainingReport, dict[str, Any]], None]


def train_adapter(
    spec: FineTuneSpec,
    cache_root: Path,
    device: torch.device,
    output_dir: Path,
    *,
    should_stop: Callable[[], bool],
    on_log: ProgressHook,
    report: TrainingReport | None = None,
) -> TrainingReport:
    """Train a LoRA adapter and save it to output_dir (unless stopped); return the report.

    `report` (the caller's) is kept up to date as training runs, so that a run that raises
    midway can still be charged what it used.
    """
    report = report or TrainingReport()
    if spec.quantization != "none" and device.type != "cuda":
        raise FineTuneError(
            "quantization_unavailable",
            f"quantization {spec.quantization} (QLoRA) needs a CUDA worker with bitsandbytes; "
            f"this worker runs on {device.type}. Submit with quantization \"none\".",
        )
    hp = spec.hyperparameters
    folder = weights_dir(spec.base, cache_root)
    tokenizer = training_tokenizer(folder, cache_root)
    train_rows, report.rows_skipped = _tokenized(
        spec.training_file, tokenizer, hp["max_seq_length"], spec.max_rows, "training_file")
    report.train_rows = len(train_rows)
    eval_rows = None
    if spec.validation_file:
        kept, report.validation_rows_skipped = _tokenized(
            spec.validation_file, tokenizer, hp["max_seq_length"], spec.max_rows, "validation_file", required=False)
        report.validation_rows = len(kept)
        eval_rows = kept or None  # every row skipped: the run trains on, without eval_loss
    set_seed(hp["seed"])  # before the LoRA weights are initialised, so a seed reproduces a run
    model = _peft_model(folder, device, spec)
    report.total_steps = optimizer_steps(len(train_rows), Hyperparameters(**hp))
    trainer = Trainer(
        model=model,
        args=_training_arguments(output_dir, device, hp, report.total_steps, has_eval=eval_rows is not None),
        train_dataset=[_as_features(row) for row in train_rows],
        eval_dataset=[_as_features(row) for row in eval_rows] if eval_rows else None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[_JobCallback(report, should_stop, on_log)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; we log JSON
    log.info("training_started", rows=len(train_rows), rows_skipped=report.rows_skipped,
             total_steps=report.total_steps, device=str(device))
    try:
        trainer.train()
        if eval_rows and not report.stopped and report.eval_step != report.step:
            report.eval_loss = _rounded(trainer.evaluate()["eval_loss"])
    except _EvaluationStopped:
        pass  # the report says stopped: nothing is saved
    report.seconds = time.monotonic() - report.started
    if not report.stopped:
        model.save_pretrained(output_dir, safe_serialization=True)
    # Keep only adapter_model.safetensors and adapter_config.json: no model card, no trainer state.
    (output_dir / "README.md").unlink(missing_ok=True)
    shutil.rmtree(output_dir / "trainer", ignore_errors=True)
    return report


def _tokenized(
    path: Path, tokenizer, max_seq_length: int, max_rows: int, name: str, *, required: bool = True
) -> tuple[list[TokenizedExample], int]:
    """Read, check and tokenize a data file; return its rows and how many were skipped
    (truncated to nothing to learn). A `required` file must keep one."""
    try:
        examples = parse_training_file(path.read_bytes(), max_rows=max_rows)
    except FileNotFoundError:
        raise FineTuneError(f"{name}_missing", f"the {name} was deleted before training started") from None
    except TrainingDataError as exc:
        raise FineTuneError(f"invalid_{name}", exc.message) from None
    rows = [tokenize_example(tokenizer, example, max_seq_length) for example in examples]
    kept = [row for row in rows if row.learned_tokens]
    if not kept and required:
        raise FineTuneError(
            "invalid_hyperparameters",
            f"with max_seq_length {max_seq_length} no row of the {name} keeps a token to learn; raise max_seq_length",
        )
    return kept, len(rows) - len(kept)


def _as_features(row: TokenizedExample) -> dict[str, list[int]]:
    return {"input_ids": row.input_ids, "attention_mask": [1] * len(row.input_ids), "labels": row.labels}


def _peft_model(folder: Path, device: torch.device, spec: FineTuneSpec):
    """Load a private copy of the base (never the one serving generation) and wrap it in LoRA."""
    hp = spec.hyperparameters
    kwargs: dict[str, Any] = {}
    if spec.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
            if spec.quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=spec.dtype or training_dtype(device),
            trust_remote_code=False,
            use_safetensors=True,
            local_files_only=True,
            attn_implementation="eager",  # Gemma 3's recommended attention for training
            **kwargs,
        )
    except ImportError as exc:  # bitsandbytes missing on a CUDA worker
        raise FineTuneError(
            "quantization_unavailable", f"quantization {spec.quantization} needs bitsandbytes on this worker: {exc}"
        ) from exc
    except RuntimeError as exc:
        if not kwargs:
            raise
        # bitsandbytes installed without a backend for this GPU: transformers' check raises this.
        raise FineTuneError(
            "quantization_unavailable", f"quantization {spec.quantization} cannot run on this worker: {exc}"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"model {spec.base.id!r}: cannot load from {folder}: {exc}") from exc
    if kwargs:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    else:
        model.to(device)
    config = LoraConfig(
        r=hp["lora_r"],
        lora_alpha=hp["lora_alpha"],
        lora_dropout=hp["lora_dropout"],
        target_modules=list(hp["target_modules"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def training_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA; fp32 on the CPU, where bf16 backward passes are far slower (bench/fine_tune_steps.py)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _training_arguments(
    output_dir: Path, device: torch.device, hp: dict[str, Any], total_steps: int, *, has_eval: bool
) -> TrainingArguments:
    logging_steps = max(1, total_steps // LOSS_POINTS)
    return TrainingArguments(
        output_dir=str(output_dir / "trainer"),
        per_device_train_batch_size=hp["batch_size"],
        per_device_eval_batch_size=hp["batch_size"],
        gradient_accumulation_steps=hp["gradient_accumulation_steps"],
        num_train_epochs=hp["epochs"],
        max_steps=hp.get("max_steps") or -1,
        learning_rate=hp["learning_rate"],
        seed=hp["seed"],
        logging_strategy="steps",
        logging_steps=logging_steps,
        eval_strategy="steps" if has_eval else "no",
        # About five validation passes a run (total_steps // 5 made a run under 10 steps validate at every step).
        eval_steps=max(logging_steps, math.ceil(total_steps / 5)) if has_eval else None,
        # No checkpoints: a retry after a lost worker starts over from the base, cleanly.
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        use_cpu=device.type == "cpu",
        bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )


def _rounded(value: float | None) -> float | None:
    """A loss to store; NaN or infinity (a diverged run) as None, which JSON on PostgreSQL can hold."""
    return None if value is None or not math.isfinite(value) else round(float(value), 5)


class _EvaluationStopped(Exception):
    """Raised out of a validation pass when the job must stop (the Trainer has no way to end one)."""


class _JobCallback(TrainerCallback):
    """Reports losses as the Trainer logs them and stops training when the job must stop."""

    def __init__(self, report: TrainingReport, should_stop: Callable[[], bool], on_log: ProgressHook):
        self.report = report
        self.should_stop = should_stop
        self.on_log_hook = on_log

    def _check(self, control) -> None:
        if self.should_stop():
            self.report.stopped = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_save = False

    def on_step_end(self, args, state, control, **kwargs):
        self.report.step = state.global_step
        self.report.epoch = state.epoch or 0.0
        self.report.train_tokens = int(state.num_input_tokens_seen)
        self._check(control)

    def on_substep_end(self, args, state, control, **kwargs):
        # With gradient accumulation: a run stopped between micro-batches is charged those it ran.
        self.report.train_tokens = int(state.num_input_tokens_seen)
        self._check(control)  # and it stops between micro-batches too

    def on_prediction_step(self, args, state, control, **kwargs):
        # A validation pass has no step end: a cancel, timeout or shutdown waited for all of it.
        if self.should_stop():
            self.report.stopped = True
            raise _EvaluationStopped

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        point: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            self.report.train_loss = point["loss"] = _rounded(logs["loss"])
            self.report.losses.append(point["loss"])
        if "eval_loss" in logs:
            self.report.eval_loss = point["eval_loss"] = _rounded(logs["eval_loss"])
            self.report.eval_step = state.global_step
        if len(point) > 2:
            self.report.reported_step = state.global_step
            self.on_log_hook(self.report, point)

    def on_train_end(self, args, state, control, **kwargs):
        # Losses are logged every `logging_steps`: steps after the last such log would be missing
        # from the job's progress, which must end at the step the result names.
        if self.report.reported_step != state.global_step:
            self.report.reported_step = state.global_step
            self.on_log_hook(self.report, {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)})
