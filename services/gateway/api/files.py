"""Uploaded training files: upload (multipart JSONL), list, read, delete."""

from __future__ import annotations

import structlog
from flask import Blueprint, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge

from services.domain import files as file_domain
from services.gateway.auth import current_caller, require_key
from services.gateway.context import gateway
from services.gateway.errors import error_response
from services.gateway.requests import refuse_query
from shared.errors import DomainError, MalformedRequest
from shared.schemas import FileDeleted, FileList

log = structlog.get_logger(__name__)
blueprint = Blueprint("files", __name__)

# Room for the multipart framing (boundaries, part headers, the purpose field) around the file.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
HOW_TO_UPLOAD = "send multipart/form-data with a `file` part (the JSONL) and `purpose=fine-tune`"


class FileTooLarge(DomainError):
    """An upload over max_file_bytes."""

    status, code = 413, "payload_too_large"

    def __init__(self, limit: int):
        super().__init__(f"the file is over the limit of {limit} bytes (max_file_bytes)")


@blueprint.post("/v1/files")
@require_key()
def upload_file():
    """Check and store an uploaded JSONL training file; answer 201 with its description."""
    context = gateway()
    limit = context.settings.max_file_bytes
    # Uploads may be far larger than the JSON bodies the app-wide MAX_CONTENT_LENGTH allows.
    request.max_content_length = limit + MULTIPART_OVERHEAD_BYTES
    if request.mimetype != "multipart/form-data":
        raise MalformedRequest(f"the body is {request.mimetype or 'missing'}; {HOW_TO_UPLOAD}")
    form, files = _multipart_parts()
    upload = files.get("file")
    purpose = form.get("purpose")
    if upload is None or purpose is None:
        missing = " and ".join(name for name, value in (("file", upload), ("purpose", purpose)) if value is None)
        raise MalformedRequest(f"missing {missing}; {HOW_TO_UPLOAD}")
    data = upload.stream.read(limit + 1)
    if len(data) > limit:
        raise FileTooLarge(limit)
    # Parsed before the transaction: a large file must not hold SQLite's write lock.
    rows = file_domain.check_upload(data, purpose=purpose, max_rows=context.settings.max_file_rows)
    with context.db.session_scope() as session:
        # If the commit itself fails the stored bytes stay: its outcome is unknown, and an
        # orphan file is harmless where a row naming a removed file is not.
        row = file_domain.create_file(
            session,
            current_caller(),
            filename=upload.filename,
            purpose=purpose,
            data=data,
            rows=rows,
            storage=context.storage,
            max_files=context.settings.max_files_per_key,
            max_stored_bytes=context.settings.max_file_storage_per_key_bytes,
        )
        body = file_domain.file_info(row)
    log.info("file_uploaded", file_id=body.id, rows=body.rows, bytes=body.bytes)
    return body.model_dump(mode="json"), 201, {"Location": url_for("files.get_file", file_id=body.id)}


def _multipart_parts():
    """Parse the multipart body into its fields and files; one that cannot be parsed is a 400
    that says why (werkzeug drops it silently, which read as "missing file and purpose")."""
    parser = request.make_form_data_parser()
    parser.silent = False
    try:
        _, form, files = parser.parse(request.stream, request.mimetype, request.content_length,
                                      request.mimetype_params)
    except UnicodeError:
        raise MalformedRequest(f"a part's headers are not UTF-8 (its file name?); {HOW_TO_UPLOAD}") from None
    except ValueError as exc:  # no boundary, a body cut short
        raise MalformedRequest(f"the multipart body could not be parsed ({exc}); {HOW_TO_UPLOAD}") from None
    return form, files


@blueprint.errorhandler(RequestEntityTooLarge)
def upload_too_large(_exc: RequestEntityTooLarge):
    """Name the upload limits (not the app-wide JSON body limit) in werkzeug's 413."""
    limit = gateway().settings.max_file_bytes
    if request.content_length is not None and request.content_length <= limit + MULTIPART_OVERHEAD_BYTES:
        # The body fits, so werkzeug refused a non-file form field over its in-memory limit (or too many parts).
        message = (
            f"a form field is over {request.max_form_memory_size} bytes or there are over "
            f"{request.max_form_parts} parts; {HOW_TO_UPLOAD}"
        )
        return error_response(413, "payload_too_large", message)
    error = FileTooLarge(limit)
    return error_response(error.status, error.code, error.message)


@blueprint.get("/v1/files")
@require_key()
def list_files():
    """List the caller's files, newest first."""
    refuse_query()
    with gateway().db.session_scope(read_only=True) as session:
        data = [file_domain.file_info(row) for row in file_domain.list_files(session, current_caller())]
    return FileList(data=data).model_dump(mode="json")


@blueprint.get("/v1/files/<file_id>")
@require_key()
def get_file(file_id: str):
    """Return one of the caller's files."""
    with gateway().db.session_scope(read_only=True) as session:
        body = file_domain.file_info(file_domain.get_file(session, current_caller(), file_id))
    return body.model_dump(mode="json")


@blueprint.delete("/v1/files/<file_id>")
@require_key()
def delete_file(file_id: str):
    """Delete one of the caller's files and its stored bytes."""
    context = gateway()
    with context.db.session_scope() as session:
        file_domain.delete_file(session, current_caller(), file_id, context.storage)
    log.info("file_deleted", file_id=file_id)
    return FileDeleted(id=file_id, object="file").model_dump(mode="json")
