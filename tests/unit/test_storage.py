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


def test_an_adapter_is_made_durable_files_folder_and_the_folders_above(tmp_path, monkeypatch):
    """Registered in a durable commit, its files were still only in the page cache."""
    import os

    from shared import storage as storage_module

    root = tmp_path / "storage"
    storage = Storage(root)
    relative = Storage.adapter_relative("ft-a", 1)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        storage.write_atomic(f"{relative}/{name}", b"{}")
    synced = []
    real_fsync = os.fsync

    def fsync(descriptor):  # the OS's call, watched: which paths reach the disk
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(storage_module.os, "fsync", fsync)
    storage.make_durable(relative)
    folder = root / relative
    assert sorted(synced[:2]) == [str(folder / "adapter_config.json"), str(folder / "adapter_model.safetensors")]
    assert synced[2:] == [str(folder), str(folder.parent), str(root / "adapters"), str(root)]
