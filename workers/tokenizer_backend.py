"""A tokenizer's Rust backend kept in a form that loads in ~0.7 s instead of ~1.2 s (this machine).

`tokenizers.Tokenizer.from_file` reads Gemma's 33 MB tokenizer.json through a generic JSON
tree, and most of that is the BPE model's 262,144-entry vocab and 514,906 merges. A BPE
backend is kept as those two in `marshal` form (Python's own, fastest to read) beside a small
JSON of the rest (normalizer, pre-tokenizer, decoder, post-processor, added tokens); loading
builds the model from them and puts the rest around it. Other backends keep the one JSON file.
The caller checks that what loads back is identical before it keeps either form.
"""

from __future__ import annotations

import json
import marshal
from pathlib import Path

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import BPE

FULL_FILE = "tokenizer.json"
BPE_TABLES_FILE = "bpe.marshal"  # (vocab, merges): marshal's format is this Python version's
BPE_REST_FILE = "bpe-rest.json"
# What a backend holds around its model, set on the rebuilt one as they were.
PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def save_backend(backend: Tokenizer, folder: Path, *, split_bpe: bool = True) -> None:
    """Write a backend into folder: split when its model is BPE (and split_bpe), else whole."""
    whole = json.loads(backend.to_str())
    model = whole["model"]
    if not split_bpe or model.get("type") != "BPE":
        backend.save(str(folder / FULL_FILE), pretty=False)
        return
    tables = (model["vocab"], [tuple(merge) for merge in model["merges"]])
    (folder / BPE_TABLES_FILE).write_bytes(marshal.dumps(tables))
    # BPE() takes an unset option as absent, not None.
    settings = {name: value for name, value in model.items()
                if name not in ("type", "vocab", "merges") and value is not None}
    # The rest as a backend of its own, with an empty model and no added tokens: those are added
    # once the real model is in, so each gets its id from the vocab as in the original.
    rest = {**whole, "model": {**model, "vocab": {}, "merges": []}, "added_tokens": []}
    (folder / BPE_REST_FILE).write_text(json.dumps(
        {"bpe": settings, "rest": rest, "added_tokens": whole["added_tokens"]}
    ))


def load_backend(folder: Path) -> Tokenizer:
    """Load the backend save_backend wrote into folder."""
    if not (folder / BPE_TABLES_FILE).is_file():
        return Tokenizer.from_file(str(folder / FULL_FILE))
    spec = json.loads((folder / BPE_REST_FILE).read_text())
    vocab, merges = marshal.loads((folder / BPE_TABLES_FILE).read_bytes())
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, **spec["bpe"]))
    rest = Tokenizer.from_str(json.dumps(spec["rest"]))
    for part in PIPELINE_PARTS:
        if getattr(rest, part) is not None:
            setattr(backend, part, getattr(rest, part))
    if rest.truncation is not None:
        backend.enable_truncation(**rest.truncation)
    if rest.padding is not None:
        backend.enable_padding(**rest.padding)
    backend.add_tokens([
        AddedToken(token["content"], **{flag: token[flag] for flag in ADDED_TOKEN_FLAGS})
        for token in spec["added_tokens"]
    ])
    return backend
