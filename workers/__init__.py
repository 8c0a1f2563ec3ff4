"""Celery workers: the only code that imports torch, transformers and peft."""
