"""Seconds per LoRA training step on this machine: fp32 (what the worker uses on the CPU) vs bf16.

    python bench/fine_tune_steps.py --steps 5 --batch-size 4 --max-seq-length 64

Trains gemma-3-270m on tests/data/fine_tune_train.jsonl through workers.fine_tuning.train_adapter
(the worker's own code path: peft LoRA + transformers Trainer), timing optimizer steps after the
first (warm-up), once per dtype in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from shared.registry import DEFAULT_MODEL_ID, ModelRegistry
from shared.schemas import Hyperparameters
from shared.settings import get_settings
from workers.fine_tuning import FineTuneSpec, train_adapter

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "fine_tune_train.jsonl"


def seconds_per_step(dtype: torch.dtype, args) -> tuple[float, list[float]]:
    """Train args.steps steps; return mean seconds per step after the first, and the losses."""
    hyperparameters = Hyperparameters(
        max_steps=args.steps, batch_size=args.batch_size, max_seq_length=args.max_seq_length, learning_rate=2e-3
    ).model_dump()
    spec = FineTuneSpec(
        base=ModelRegistry.load(None).get(DEFAULT_MODEL_ID),
        training_file=DATA,
        validation_file=None,
        hyperparameters=hyperparameters,
        dtype=dtype,
    )
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        report = train_adapter(
            spec,
            get_settings().model_cache_path,
            torch.device("cpu"),
            Path(out),
            should_stop=lambda: False,
            on_log=lambda _report, _point: stamps.append(time.perf_counter()),
        )
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), report.losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=64)
    args = parser.parse_args()
    fp32, fp32_losses = seconds_per_step(torch.float32, args)
    bf16, bf16_losses = seconds_per_step(torch.bfloat16, args)
    print(f"settings: model={DEFAULT_MODEL_ID} device=cpu threads={torch.get_num_threads()} steps={args.steps} "
          f"batch_size={args.batch_size} max_seq_length={args.max_seq_length} lora_r=8 (all linear layers)")
    print(f"baseline (bf16 base weights): {bf16:.2f} s/step  losses={bf16_losses}")
    print(f"result   (fp32 base weights): {fp32:.2f} s/step  losses={fp32_losses}")
    print(f"ratio    fp32 speed-up over bf16: {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
