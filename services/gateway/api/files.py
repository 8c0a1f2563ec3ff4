"""Uploaded training files: upload (multipart JSONL), list, read, delete."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("files", __name__)
