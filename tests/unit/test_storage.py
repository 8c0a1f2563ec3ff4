"""The storage layout's clean-up: an attempt's folder goes, and its adapter's once empty."""

from __future__ import annotations

from shared.storage import Storage


def test_removing_attempts_removes_the_adapter_folder_with_the_last(tmp_path):
    storage = Storage(tmp_path)
    for attempt in (1, 2):
        storage.write_atomic(f"{Storage.adapter_relative('ft-a', attempt)}/adapter_model.safetensors", b"w")
    storage.remove_attempt("ft-a", 1)
    assert [path.name for path in (tmp_path / "adapters" / "ft-a").iterdir()] == ["attempt-2"]
    storage.remove_attempt("ft-a", 2)
    assert not (tmp_path / "adapters" / "ft-a").exists()
    storage.remove_attempt("ft-a", 3)  # never made: nothing to do
    assert (tmp_path / "adapters").is_dir()
