"""Where uploaded files and trained adapters live on disk (one volume shared by all machines).

Paths in the database are relative to the storage root, so every machine that mounts the
volume (at any path, set by GEMMA_JOBS_STORAGE_DIR) finds the same files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class Storage:
    """The storage root and its layout: files/<file id>.jsonl and adapters/<adapter id>/<attempt>/."""

    def __init__(self, root: Path):
        self.root = root

    def resolve(self, relative: str) -> Path:
        """Return the absolute path of a stored relative path."""
        return self.root / relative

    @staticmethod
    def file_relative(file_id: str) -> str:
        """Return where an uploaded file is stored, relative to the root (never a client name)."""
        return f"files/{file_id}.jsonl"

    @staticmethod
    def adapter_relative(adapter_id: str, attempt: int) -> str:
        """Return the folder of one training attempt's adapter.

        Each attempt writes its own folder, so a zombie attempt that lost its lease can never
        overwrite the adapter the winning attempt registered.
        """
        return f"adapters/{adapter_id}/attempt-{attempt}"

    def write_atomic(self, relative: str, data: bytes) -> Path:
        """Write a file so that readers see all of it or none of it."""
        target = self.resolve(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk, say: nothing would ever remove it
            raise
        return target

    def make_durable(self, relative: str) -> None:
        """Flush a folder's files, the folder, and each folder above it up to the root to disk.

        A trained adapter is registered in a durable commit just after it is saved: without this,
        a host that lost power soon after kept the row and lost the files (or kept them empty),
        and every job of the adapter failed, with no way back but training again.
        """
        folder = self.resolve(relative)
        for path in folder.iterdir():
            if path.is_file():
                fsync_path(path, os.O_RDONLY)
        while True:
            fsync_path(folder, os.O_RDONLY | os.O_DIRECTORY)  # its entries: the names of what it holds
            if folder == self.root or self.root not in folder.parents:
                return
            folder = folder.parent

    def remove(self, relative: str) -> None:
        """Delete a stored file or folder; a missing one is fine."""
        path = self.resolve(relative)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def remove_attempt(self, adapter_id: str, attempt: int) -> None:
        """Delete one training attempt's folder, and the adapter's folder if that leaves it empty."""
        self.remove(self.adapter_relative(adapter_id, attempt))
        try:
            self.resolve(f"adapters/{adapter_id}").rmdir()  # only ever removes an empty folder
        except OSError:
            pass  # another attempt's folder is there, or it was never made

    def remove_adapter(self, adapter_id: str) -> None:
        """Delete every attempt's folder of an adapter."""
        shutil.rmtree(self.root / "adapters" / adapter_id, ignore_errors=True)


def fsync_path(path: Path, flags: int) -> None:
    """Flush a file (os.O_RDONLY) or a folder's entries (with os.O_DIRECTORY) to disk."""
    descriptor = os.open(path, flags)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
