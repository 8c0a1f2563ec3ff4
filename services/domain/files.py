"""Uploading, reading, listing and deleting training files."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import structlog
from sqlalchemy import delete, event, func, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from services.domain.keys import Caller
from shared.db import get_by_id
from shared.errors import Conflict, InvalidField, NotFound, QuotaExceeded, StorageUnavailable
from shared.ids import new_id
from shared.jobs import JobKind, JobStatus
from shared.models import ApiKey, Job, TrainingFile, utcnow
from shared.schemas import FileInfo
from shared.storage import Storage
from shared.training_data import TrainingDataError, count_training_rows

log = structlog.get_logger(__name__)

PURPOSES = ("fine-tune",)
DEFAULT_FILENAME = "upload.jsonl"
MAX_FILENAME_CHARS = 255


def check_upload(data: bytes, *, purpose: str, max_rows: int) -> int:
    """Check an upload's purpose and every row (before any transaction); return its row count."""
    if purpose not in PURPOSES:
        raise InvalidField(
            f"purpose must be one of {', '.join(PURPOSES)}, not {purpose!r}",
            details=[{"field": "purpose", "message": "unknown purpose"}],
        )
    try:
        return count_training_rows(data, max_rows=max_rows)
    except TrainingDataError as exc:
        details = [{"line": problem.line, "message": problem.message} for problem in exc.problems]
        raise InvalidField(exc.message, details=details or None) from None


def _check_quota(session: Session, key_id: str, new_bytes: int, max_files: int | None,
                 max_stored_bytes: int | None) -> None:
    """Refuse an upload that would take the key past its files or stored bytes (409, saying what
    to delete). One key's uploads take turns on its row (FOR NO KEY UPDATE, as its submits' limits
    do) until they commit, so two at once cannot both fit in the last place."""
    session.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update(key_share=True))
    files, stored = session.execute(
        select(func.count(), func.coalesce(func.sum(TrainingFile.bytes), 0)).where(TrainingFile.owner_key_id == key_id)
    ).one()
    stored = int(stored)  # PostgreSQL sums a bigint as a numeric (a Decimal, a string in JSON)
    over = []
    if max_files is not None and files + 1 > max_files:
        over.append(f"this key already has {files} files, the most it may keep on this server")
    if max_stored_bytes is not None and stored + new_bytes > max_stored_bytes:
        over.append(f"this key's files take {stored} bytes, and this one {new_bytes} more would be over the "
                    f"{max_stored_bytes} bytes it may keep on this server")
    if over:
        raise QuotaExceeded(f"{'; '.join(over)}: delete files it no longer needs (DELETE /v1/files/{{id}})",
                            details={"files": files, "bytes": stored, "max_files": max_files,
                                     "max_bytes": max_stored_bytes})


def create_file(
    session: Session,
    caller: Caller,
    *,
    filename: str | None,
    purpose: str,
    data: bytes,
    rows: int,
    storage: Storage,
    max_files: int | None = None,
    max_stored_bytes: int | None = None,
) -> TrainingFile:
    """Store a checked upload's bytes under a server id and record it, within the key's quota
    (`max_files` files, `max_stored_bytes` bytes in all; None: no limit)."""
    file_id = new_id("file", "-")  # `file-…`, as the contract (DESIGN.md) shows it
    relative = Storage.file_relative(file_id)
    # The bytes are on disk before the row exists, so a committed row never names a missing file.
    try:
        storage.write_atomic(relative, data)
    except OSError as exc:
        log.error("file_not_stored", file_id=file_id, error=str(exc))
        raise StorageUnavailable(
            f"the server could not store the file ({exc.strerror or exc}); nothing was recorded, try again later"
        ) from None
    row = TrainingFile(
        id=file_id,
        owner_key_id=caller.key_id,
        purpose=purpose,
        filename=safe_filename(filename),
        bytes=len(data),
        rows=rows,
        sha256=hashlib.sha256(data).hexdigest(),
        path=relative,
        created_at=utcnow(),
    )
    try:
        # Last, after the write and its flush to disk: the quota's lock on the key's row holds
        # that key's limited submits until this transaction commits.
        if max_files is not None or max_stored_bytes is not None:
            _check_quota(session, caller.key_id, len(data), max_files, max_stored_bytes)
        session.add(row)
        session.flush()
    except (QuotaExceeded, SQLAlchemyError):
        storage.remove(relative)  # refused, or the insert failed for sure: nothing will ever point at the file
        raise
    return row


def safe_filename(filename: str | None) -> str:
    """Return the client's base name only: no directories, printable, at most 255 characters."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    # NUL and control characters: PostgreSQL refuses NUL, and neither belongs in a name shown back.
    name = "".join(char for char in name if char.isprintable()).strip()
    if name in ("", ".", ".."):
        return DEFAULT_FILENAME
    return name[:MAX_FILENAME_CHARS]


def get_file(session: Session, caller: Caller, file_id: str, *, lock: str | None = None) -> TrainingFile:
    """Return one of the caller's files; someone else's file is 'not found' too. `lock`:
    "share" (a fine-tune being created names it) or "update" (it is being deleted)."""
    locking = {"share": {"read": True}, "update": True}.get(lock, False)
    row = get_by_id(session, TrainingFile, file_id, with_for_update=locking)
    if row is None or row.owner_key_id != caller.key_id:
        raise NotFound(f"no file {file_id!r}")
    return row


def list_files(session: Session, caller: Caller) -> list[TrainingFile]:
    """Return the caller's files, newest first (ids are time-ordered)."""
    query = select(TrainingFile).where(TrainingFile.owner_key_id == caller.key_id)
    return list(session.scalars(query.order_by(TrainingFile.id.desc())))


def delete_file(session: Session, caller: Caller, file_id: str, storage: Storage) -> None:
    """Delete one of the caller's files; its bytes go once the row's deletion is committed.

    A file a queued or running fine-tune names is kept (409): the job reads it when it starts,
    and again if it is retried. Locked first, so a fine-tune created meanwhile waits, then finds
    it gone (a 422 naming the field).
    """
    path = get_file(session, caller, file_id, lock="update").path
    user = session.scalar(
        select(Job.id).where(
            Job.owner_key_id == caller.key_id,
            Job.kind == JobKind.FINE_TUNE,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
            or_(Job.params["training_file"].as_string() == file_id,
                Job.params["validation_file"].as_string() == file_id),
        ).limit(1)
    )
    if user is not None:
        raise Conflict(
            f"file {file_id!r} is used by fine-tune {user}, which has not ended; cancel it or wait for it to end",
            code="file_in_use",
        )
    # Conditional, so that of two concurrent deletes one wins and the other is a 404.
    result = session.execute(
        delete(TrainingFile).where(TrainingFile.id == file_id, TrainingFile.owner_key_id == caller.key_id)
    )
    if result.rowcount != 1:
        raise NotFound(f"no file {file_id!r}")
    # Removing the bytes only after the commit: a rolled-back delete keeps a usable file.
    _after_commit(session, lambda: storage.remove(path))


def _after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run a clean-up once the session commits; its failure is logged, not raised: the
    committed change stands, and a 500 would tell the client it had not happened."""

    def run(_session: Session) -> None:
        try:
            action()
        except OSError as exc:
            log.error("stored_bytes_not_removed", error=str(exc))

    event.listen(session, "after_commit", run, once=True)


def file_info(row: TrainingFile) -> FileInfo:
    """Return the public view of a file row."""
    return FileInfo(
        id=row.id,
        purpose=row.purpose,
        filename=row.filename,
        bytes=row.bytes,
        rows=row.rows,
        created_at=row.created_at,
    )
