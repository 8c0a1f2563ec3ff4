"""The worker's tokenizer, loaded from its prepared form, is exactly the one transformers builds."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from shared.prompts import gemma_turn_format
from shared.registry import DEFAULT_MODEL_ID

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And in French? 🇫🇷"},
]
# Gemma's own template, so the test also covers apply_chat_template (the converted folder ships none).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else 'user' }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEXTS = [
    "",
    "Hello, world! The capital of France is",
    "naïve café, Straße, ÆØÅ, 東京タワー, Привет мир, مرحبا, नमस्ते",
    "emoji 😀🎉👩🏽‍💻🇫🇷, a zero-width joiner \u200d and a BOM \ufeff",
    "  leading and trailing spaces  \twith tabs\nnewlines\r\nand  double  spaces",
    "<bos>already has a bos<eos><pad><unk><mask>",
    "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>",
    "not quite special: <start_of_turn <end_of_turn>> <<bos>> <unused0> [multimodal]",
    "code: def f(x):\n    return {'a': [1, 2.5e-3]}  # comment\n",
    "digits 1234567890 3.14159 and symbols ~!@#$%^&*()_+-=[]{}|;':\",./<>?",
    gemma_turn_format(CHAT),
    "The quick brown fox jumps over the lazy dog. 🦊 " * 400,
]


@pytest.fixture(scope="module")
def folder(model_cache_dir: Path) -> Path:
    return model_cache_dir / DEFAULT_MODEL_ID


@pytest.fixture(scope="module")
def reference(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def prepared(folder: Path, cache_root: Path):
    """The tokenizer as a worker's second start loads it: from the prepared form only."""
    from workers import tokenizer_cache

    tokenizer_cache.load_tokenizer(folder, cache_root)  # first start: the full load writes the prepared form
    assert len(_prepared_dirs(cache_root)) == 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_cache.AutoTokenizer, "from_pretrained", _no_full_load)
        return tokenizer_cache.load_tokenizer(folder, cache_root)


def _no_full_load(*_args, **_kwargs):
    raise AssertionError("the prepared tokenizer was not used")


def _prepared_dirs(cache_root: Path) -> list[Path]:
    return [path for path in (cache_root / ".tokenizers").iterdir() if not path.name.startswith(".")]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encodes_and_decodes_like_transformers(prepared, reference, text):
    for add_special_tokens in (True, False):
        ids = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert prepared(text, add_special_tokens=add_special_tokens)["input_ids"] == ids
        assert prepared.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
        for skip_special_tokens in (True, False):
            assert prepared.decode(ids, skip_special_tokens=skip_special_tokens) == reference.decode(
                ids, skip_special_tokens=skip_special_tokens
            )


def test_pads_a_batch_like_transformers(prepared, reference):
    batch = TEXTS[1:6]
    assert dict(prepared(batch, padding=True)) == dict(reference(batch, padding=True))
    assert prepared.batch_decode(reference(batch)["input_ids"]) == reference.batch_decode(reference(batch)["input_ids"])


def test_renders_and_encodes_chat_like_transformers(prepared, reference):
    assert prepared.chat_template == reference.chat_template
    rendered = reference.apply_chat_template(CHAT[1:], chat_template=GEMMA_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    assert prepared.apply_chat_template(CHAT[1:], chat_template=GEMMA_TEMPLATE, tokenize=False,
                                        add_generation_prompt=True) == rendered
    assert prepared(rendered, add_special_tokens=False)["input_ids"] == reference(
        rendered, add_special_tokens=False
    )["input_ids"]


def test_has_the_same_special_tokens_and_settings(prepared, reference):
    assert type(prepared) is type(reference)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "padding_side",
                 "truncation_side", "model_max_length", "all_special_tokens", "all_special_ids", "name_or_path"):
        assert getattr(prepared, name) == getattr(reference, name), name
    assert prepared.padding_side == "left"
    assert prepared.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == reference.convert_tokens_to_ids(
        ["<start_of_turn>", "<end_of_turn>"]
    )
    assert len(prepared) == len(reference)
    assert {index: str(token) for index, token in prepared.added_tokens_decoder.items()} == {
        index: str(token) for index, token in reference.added_tokens_decoder.items()
    }
    assert prepared.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()


def test_a_changed_source_gets_a_new_prepared_form(folder: Path, tmp_path: Path):
    from workers.tokenizer_cache import ABANDONED_STAGING_S, STALE_PREPARED_S, load_tokenizer, tokenizer_fingerprint

    source = tmp_path / "model"
    source.mkdir()
    for path in folder.iterdir():
        if path.name != "model.safetensors":
            (source / path.name).symlink_to(path)
    before = tokenizer_fingerprint(source)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (source / "tokenizer_config.json").unlink()
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    assert tokenizer_fingerprint(source) != before
    # What the source's earlier version left behind goes once the new form is written, if no
    # start used it for a week; one in use (another release, in a rolling upgrade) stays.
    folders = tmp_path / "cache" / ".tokenizers"
    stale, in_use, orphan = folders / before, folders / "other-release", folders / "gone-source"
    for prepared, source_of in ((stale, source), (in_use, source), (orphan, tmp_path / "deleted-model")):
        prepared.mkdir(parents=True)
        (prepared / "wrapper.json").write_text(json.dumps({"source": str(source_of.resolve())}))
    week_ago = time.time() - STALE_PREPARED_S - 60
    for prepared in (stale, orphan):
        os.utime(prepared, (week_ago, week_ago))
    # A killed preparation's staging folder goes; another worker's, being written now, stays.
    abandoned, being_written = folders / ".staging-k1lled_0", folders / ".staging-w0rking1"
    for staging in (abandoned, being_written):
        staging.mkdir()
        (staging / "bpe.marshal").write_bytes(b"half")
    hours_ago = time.time() - ABANDONED_STAGING_S - 60
    os.utime(abandoned, (hours_ago, hours_ago))

    assert load_tokenizer(source, tmp_path / "cache").padding_side == "right"
    assert sorted(path.name for path in _prepared_dirs(tmp_path / "cache")) == sorted(
        [tokenizer_fingerprint(source), "other-release"])
    assert not abandoned.exists() and being_written.is_dir()


def test_a_broken_prepared_form_falls_back_and_is_rewritten(folder, reference, prepared, cache_root, tmp_path,
                                                           monkeypatch):
    from workers import tokenizer_cache

    [good] = _prepared_dirs(cache_root)
    broken = tmp_path / ".tokenizers" / good.name
    shutil.copytree(good, broken)
    tables = (good / "bpe.marshal").read_bytes()
    (broken / "bpe.marshal").write_bytes(tables[: len(tables) // 2])
    text = TEXTS[3]
    assert tokenizer_cache.load_tokenizer(folder, tmp_path).encode(text) == reference.encode(text)
    assert (broken / "bpe.marshal").read_bytes() == tables
    monkeypatch.setattr(tokenizer_cache.AutoTokenizer, "from_pretrained", _no_full_load)
    assert tokenizer_cache.load_tokenizer(folder, tmp_path).encode(text) == reference.encode(text)


def test_gemma_is_prepared_as_bpe_tables_and_the_rest(prepared, cache_root):
    [form] = _prepared_dirs(cache_root)
    assert sorted(path.name for path in form.iterdir()) == ["bpe-rest.json", "bpe.marshal", "wrapper.json"]


def test_a_split_form_that_loads_back_different_is_kept_whole(folder, reference, tmp_path, monkeypatch):
    from workers import tokenizer_backend, tokenizer_cache

    # A split form that loses the normalizer (as a later tokenizers might lose another part).
    monkeypatch.setattr(tokenizer_backend, "PIPELINE_PARTS", ("pre_tokenizer", "post_processor", "decoder"))
    tokenizer_cache.load_tokenizer(folder, tmp_path)
    [form] = _prepared_dirs(tmp_path)
    assert sorted(path.name for path in form.iterdir()) == ["tokenizer.json", "wrapper.json"]
    monkeypatch.setattr(tokenizer_cache.AutoTokenizer, "from_pretrained", _no_full_load)
    loaded = tokenizer_cache.load_tokenizer(folder, tmp_path)
    assert loaded.backend_tokenizer.to_str() == reference.backend_tokenizer.to_str()
    assert loaded.encode(TEXTS[4]) == reference.encode(TEXTS[4])


def test_a_backend_that_is_not_bpe_is_saved_whole(tmp_path):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    from workers.tokenizer_backend import load_backend, save_backend

    backend = Tokenizer(WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<end>"])
    save_backend(backend, tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer.json"]
    loaded = load_backend(tmp_path)
    assert loaded.to_str() == backend.to_str()
    assert loaded.encode("Hello there WORLD<end>").ids == [1, 0, 2, 3]
