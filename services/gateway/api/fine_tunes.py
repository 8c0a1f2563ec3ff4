"""Fine-tuning jobs: submit a LoRA training run."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("fine_tunes", __name__)
