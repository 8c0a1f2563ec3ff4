"""Folders published into the model cache: readable by every user of the host, and on disk."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from shared.storage import fsync_path

DEFAULT_UMASK = 0o022


def share_and_flush(folder: Path) -> None:
    """Make a staged folder readable by every user (as the umask allows) and flush it to disk.

    safetensors writes 0600 files and `mkdtemp` makes 0700 folders: a cache converted by one
    account (`up`) could not be loaded by a worker running as another. Flushed before it is
    renamed into place, so a power loss cannot leave a published folder with empty files.
    """
    umask = _umask()
    # Deepest first: a folder's entries are flushed after what they name.
    for path in [*sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True), folder]:
        is_folder = path.is_dir()
        path.chmod((0o755 if is_folder else 0o644) & ~umask)
        fsync_path(path, os.O_RDONLY | (os.O_DIRECTORY if is_folder else 0))


def publish(staging: Path, target: Path) -> None:
    """Share and flush a finished folder, rename it into place (readers never see it half
    written), and flush the rename."""
    share_and_flush(staging)
    os.replace(staging, target)
    fsync_path(target.parent, os.O_RDONLY | os.O_DIRECTORY)


def remove_scratch(folder: Path, prefix: str, *, older_than_s: float = 0.0) -> None:
    """Remove the scratch folders a killed conversion, copy or preparation left in `folder`.

    Only `tempfile`'s names for this prefix (8 characters after it): `.gemma-3-270m-` is also
    the start of another model's scratch (`.gemma-3-270m-short-…`). A caller that holds no lock
    over the prefix passes `older_than_s`, so another process's scratch in use is left alone.
    """
    ours = re.compile(re.escape(prefix) + r"[a-z0-9_]{8}")
    modified_before = time.time() - older_than_s
    for scratch in folder.iterdir():
        try:
            if ours.fullmatch(scratch.name) and scratch.is_dir() and scratch.stat().st_mtime <= modified_before:
                shutil.rmtree(scratch, ignore_errors=True)
        except OSError:
            continue  # removed by another process meanwhile


def _umask() -> int:
    """Return the process's umask without changing it (os.umask sets it, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return DEFAULT_UMASK
