"""Small pure pieces: ids, keys, job states, the registry file, Gemma's turn format."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from shared.ids import new_id
from shared.jobs import JobStatus, can_transition
from shared.keys import generate_key, hash_key
from shared.prompts import gemma_turn_format
from shared.registry import DEFAULT_MODEL_ID, ModelRegistry, RegistryError


def test_ids_sort_by_creation_time():
    first = new_id("job")
    time.sleep(0.002)
    second = new_id("job")
    assert first.startswith("job_") and len(first) == 30
    assert first < second


def test_ids_made_in_the_same_millisecond_still_sort_in_order():
    ids = [new_id("job") for _ in range(2000)]  # many share a millisecond
    assert len({identifier[4:14] for identifier in ids}) < len(ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids(monkeypatch):
    import shared.ids

    monkeypatch.setattr(shared.ids, "time", SimpleNamespace(time_ns=lambda: 1_800_000_000_000_000_000))
    new_id("job")  # parent and child both make their next id in this same millisecond
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's side
        os.write(writing, new_id("job").encode())
        os._exit(0)
    mine = new_id("job")
    os.waitpid(child, 0)
    assert os.read(reading, 100).decode() != mine


def test_keys_are_random_and_hashed():
    key = generate_key()
    assert key.startswith("gj_") and len(key) >= 3 + 43  # 256 bits in url-safe base64
    assert generate_key() != key
    assert hash_key(key) == hash_key(key) and key not in hash_key(key)


def test_terminal_states_allow_no_transition():
    for terminal in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED):
        assert terminal.is_terminal
        assert not any(can_transition(terminal, target) for target in JobStatus)
    assert can_transition(JobStatus.QUEUED, JobStatus.RUNNING)
    assert not can_transition(JobStatus.QUEUED, JobStatus.SUCCEEDED)


def test_registry_file_adds_models(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"id": "gemma-3-1b-it", "path": "/models/gemma-3-1b-it"}]}))
    registry = ModelRegistry.load(path)
    assert [entry.id for entry in registry.all()] == ["gemma-3-1b-it", DEFAULT_MODEL_ID]
    assert registry.get(DEFAULT_MODEL_ID).needs_conversion


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"models": [{"id": "x"}]}),  # no source
        json.dumps({"models": [{"id": "x", "path": "/a", "hf_hub_id": "google/x"}]}),  # two sources
        json.dumps({"models": [{"id": "../etc", "path": "/a"}]}),  # id is not a name
        json.dumps({"models": [{"id": "x", "path": "/a", "url": "https://x"}]}),  # unknown field
        json.dumps({"models": [{"id": "x", "path": "/a"}, {"id": "x", "path": "/b"}]}),  # the last one won
        json.dumps({"models": [{"id": DEFAULT_MODEL_ID, "path": "/b"}]}),  # so it did over the built-in
    ],
)
def test_bad_registry_files_are_refused(tmp_path, content):
    path = tmp_path / "models.json"
    path.write_text(content)
    with pytest.raises(RegistryError, match="GEMMA_JOBS_MODEL_REGISTRY") as raised:
        ModelRegistry.load(path)
    assert "\n" not in str(raised.value)  # one line at start-up, as every other error there


def test_a_registry_entry_s_problems_name_the_entry_and_field(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": [{"id": "a", "path": "/a"}, {"id": "b", "path": "/b", "context_length": 1}]}))
    with pytest.raises(RegistryError) as raised:
        ModelRegistry.load(path)
    assert str(raised.value) == (f"GEMMA_JOBS_MODEL_REGISTRY={path}: models[1].context_length: "
                                 "Input should be greater than or equal to 16")


def test_gemma_turn_format_folds_system_into_the_first_user_turn():
    text = gemma_turn_format(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert text == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_a_diverged_loss_is_stored_as_null():
    """NaN or infinity in a loss made PostgreSQL refuse the adapter's row (its JSON has neither),
    and the job was retried until it failed `worker_lost`."""
    from workers.fine_tuning import _rounded

    assert [_rounded(value) for value in (float("nan"), float("inf"), -float("inf"), None)] == [None] * 4
    assert _rounded(0.1234567) == 0.12346
