"""The training-file API: upload (every row checked), list, get, delete, per-key isolation."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil

import pytest
from sqlalchemy.exc import IntegrityError
from structlog.testing import capture_logs

from services.domain.files import create_file, safe_filename
from services.domain.keys import Caller
from services.gateway import create_app
from shared.models import TrainingFile
from shared.storage import Storage
from tests.integration.helpers import assert_error, make_key

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
COMPLETION = {"prompt": "2+2=", "completion": "4"}


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def upload(client, auth, data: bytes, filename: str = "train.jsonl", purpose: str | None = "fine-tune"):
    form = {"file": (io.BytesIO(data), filename)}
    if purpose is not None:
        form["purpose"] = purpose
    return client.post("/v1/files", data=form, headers=auth, content_type="multipart/form-data")


def storage_root(app):
    return app.extensions["gemma_jobs"].storage.root


def stored_files(app) -> list[str]:
    folder = storage_root(app) / "files"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def file_row(app, file_id: str) -> TrainingFile | None:
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        return session.get(TrainingFile, file_id)


def test_upload_records_rows_bytes_and_stores_under_the_id(client, auth, app):
    data = jsonl(CHAT, COMPLETION, CHAT)
    with capture_logs() as logs:
        response = upload(client, auth, data, filename="my train.jsonl")
    assert response.status_code == 201, response.get_data(as_text=True)
    body = response.get_json()
    assert re.fullmatch(r"file-[0-9a-z]{26}", body["id"])
    assert body["object"] == "file"
    assert (body["rows"], body["bytes"], body["purpose"]) == (3, len(data), "fine-tune")
    assert body["filename"] == "my train.jsonl"
    assert response.headers["Location"] == f"/v1/files/{body['id']}"
    row = file_row(app, body["id"])
    assert row.sha256 == hashlib.sha256(data).hexdigest()
    stored = storage_root(app) / row.path
    assert stored.name == f"{body['id']}.jsonl"
    assert stored.read_bytes() == data
    assert not list(storage_root(app).rglob("my train.jsonl"))
    assert {"event": "file_uploaded", "file_id": body["id"], "rows": 3, "bytes": len(data)}.items() <= next(
        entry for entry in logs if entry["event"] == "file_uploaded"
    ).items()


@pytest.mark.parametrize(
    ("filename", "stored"),
    [("../../etc/passwd", "passwd"), ("/abs/dir/data.jsonl", "data.jsonl"), ("..", "upload.jsonl"),
     ("x" * 300 + ".jsonl", "x" * 255), ("bad\x00name.jsonl", "badname.jsonl")],
)
def test_client_filename_is_kept_as_a_base_name_only(client, auth, app, filename, stored):
    response = upload(client, auth, jsonl(COMPLETION), filename=filename)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["filename"] == stored
    assert file_row(app, response.get_json()["id"]).path == f"files/{response.get_json()['id']}.jsonl"
    assert not (storage_root(app).parent / "etc").exists()


def test_windows_paths_and_blank_names_are_reduced_too():
    # Werkzeug's header parsing drops backslashes before the domain sees them; a non-HTTP caller may not.
    assert safe_filename("C:\\Users\\me\\data.jsonl") == "data.jsonl"
    assert safe_filename(None) == safe_filename("  ") == safe_filename("dir/") == "upload.jsonl"


def test_bad_json_on_line_3_is_422_naming_the_line(client, auth, app):
    data = jsonl(CHAT, COMPLETION) + b'{"prompt": "x", \n'
    error = assert_error(upload(client, auth, data), 422, "invalid_field")
    assert "line 3" in error["message"]
    assert error["details"][0]["line"] == 3
    assert "JSON" in error["details"][0]["message"]
    assert stored_files(app) == []


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}, "last message"),
        ({"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role"),
        ({"prompt": "p"}, "completion"),
        ({"text": "hello"}, "messages"),
    ],
)
def test_invalid_rows_are_422_with_line_details(client, auth, row, words):
    error = assert_error(upload(client, auth, jsonl(CHAT, row)), 422, "invalid_field")
    assert error["message"].startswith("line 2:")
    assert words in error["message"]
    assert error["details"][0]["line"] == 2
    assert words in error["details"][0]["message"]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"[" * 5000, "nested too deeply"),  # json.loads' RecursionError was a 500
        (b'{"prompt": "\\ud800", "completion": "c"}', "surrogate"),
        (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
         "messages[1].content"),
    ],
)
def test_unusable_text_is_422_naming_the_line(client, auth, app, line, words):
    error = assert_error(upload(client, auth, jsonl(CHAT) + line + b"\n"), 422, "invalid_field")
    assert error["message"].startswith("line 2:") and words in error["message"]
    assert stored_files(app) == []


def test_a_row_over_the_row_limit_is_422_naming_the_line(client, auth, app):
    """A 50 MB row of ~1.6M tiny turns parsed into ~500 MB of objects in the gateway per upload."""
    from shared.training_data import MAX_ROW_CHARS

    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    row = {"messages": turns * (MAX_ROW_CHARS // 60)}
    error = assert_error(upload(client, auth, jsonl(CHAT, row)), 422, "invalid_field")
    assert error["message"].startswith("line 2:") and f"at most {MAX_ROW_CHARS}" in error["message"]
    assert stored_files(app) == []


def test_a_stored_file_with_a_row_over_the_limit_still_trains(monkeypatch):
    """The row limit is the upload's: a file accepted before it must still parse in the worker."""
    from shared import training_data

    data = jsonl(CHAT, {"prompt": "p" * 200, "completion": "c"})
    monkeypatch.setattr(training_data, "MAX_ROW_CHARS", 100)
    assert len(training_data.parse_training_file(data, max_rows=10)) == 2
    with pytest.raises(training_data.TrainingDataError, match="line 2: the row is"):
        training_data.count_training_rows(data, max_rows=10)


def test_line_separators_inside_strings_do_not_split_rows(client, auth):
    """JSON strings may hold U+2028, U+2029 and U+0085 raw; only "\\n" ends a row."""
    rows = [{"prompt": "a\u2028b\u2029c\x85d", "completion": "e"}, CHAT]
    data = "".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows).encode()
    response = upload(client, auth, data)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["rows"] == 2


def test_every_bad_row_is_reported(client, auth):
    error = assert_error(upload(client, auth, jsonl({"x": 1}, CHAT, {"y": 2})), 422, "invalid_field")
    assert [problem["line"] for problem in error["details"]] == [1, 3]
    assert "1 more" in error["message"]


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_or_blank_file_is_422(client, auth, data):
    error = assert_error(upload(client, auth, data), 422, "invalid_field")
    assert "no rows" in error["message"]


def test_non_utf8_is_422_naming_the_line(client, auth):
    data = jsonl(CHAT) + b'{"prompt": "\xff\xfe", "completion": "x"}\n'
    error = assert_error(upload(client, auth, data), 422, "invalid_field")
    assert "UTF-8" in error["message"] and "line 2" in error["message"]
    assert error["details"][0]["line"] == 2


def test_too_many_rows_is_422_naming_the_limit(settings, redis_client):
    app = create_app(settings.model_copy(update={"max_file_rows": 2}))
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_key(app)}"}
        error = assert_error(upload(client, auth, jsonl(CHAT, CHAT, CHAT)), 422, "invalid_field")
        assert "2 rows" in error["message"]
        assert upload(client, auth, jsonl(CHAT, CHAT)).status_code == 201
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_wrong_purpose_is_422_naming_the_field(client, auth):
    error = assert_error(upload(client, auth, jsonl(CHAT), purpose="assistants"), 422, "invalid_field")
    assert error["details"][0]["field"] == "purpose"
    assert "fine-tune" in error["message"]


def test_missing_purpose_or_file_part_is_400(client, auth):
    error = assert_error(upload(client, auth, jsonl(CHAT), purpose=None), 400, "malformed_request")
    assert "purpose" in error["message"]
    response = client.post("/v1/files", data={"purpose": "fine-tune"}, headers=auth, content_type="multipart/form-data")
    error = assert_error(response, 400, "malformed_request")
    assert "`file`" in error["message"]
    # The JSONL sent as a plain text field, not a file part, is not a file either.
    response = client.post(
        "/v1/files", data={"purpose": "fine-tune", "file": jsonl(CHAT).decode()}, headers=auth,
        content_type="multipart/form-data",
    )
    assert_error(response, 400, "malformed_request")


def test_a_multipart_body_that_cannot_be_parsed_is_a_400_that_says_why(client, auth):
    """werkzeug drops such a body without a word: it was answered "missing file and purpose"."""
    def post(body: bytes, content_type: str = "multipart/form-data; boundary=XX"):
        return client.post("/v1/files", data=body, headers={**auth, "Content-Type": content_type})

    purpose = b'--XX\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    latin1_name = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="tr\xe9in.jsonl"\r\n\r\n'
                   + jsonl(CHAT) + b"\r\n--XX--\r\n")
    error = assert_error(post(purpose + latin1_name), 400, "malformed_request")
    assert "not UTF-8" in error["message"] and "missing" not in error["message"]
    error = assert_error(post(purpose + b"--XX\r\nContent-Disposition: form-"), 400, "malformed_request")
    assert "could not be parsed" in error["message"]
    # The same upload with a UTF-8 name is stored, under that name.
    response = post(purpose + latin1_name.replace(b"\xe9", "é".encode()))
    assert response.status_code == 201 and response.get_json()["filename"] == "tréin.jsonl"


def test_non_multipart_body_is_400(client, auth):
    response = client.post("/v1/files", json={"purpose": "fine-tune"}, headers=auth)
    error = assert_error(response, 400, "malformed_request")
    assert "multipart/form-data" in error["message"]
    assert_error(client.post("/v1/files", headers=auth), 400, "malformed_request")


def test_upload_needs_a_key(client):
    assert_error(upload(client, {}, jsonl(CHAT)), 401, "unauthenticated")


def test_file_over_max_file_bytes_is_413_naming_the_limit(settings, redis_client):
    app = create_app(settings.model_copy(update={"max_file_bytes": 2048}))
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_key(app)}"}
        row = {"prompt": "p" * 100, "completion": "c"}
        just_over = jsonl(*[row] * 30)
        assert 2048 < len(just_over) < 2048 + 64 * 1024  # caught by the file check, not werkzeug
        error = assert_error(upload(client, auth, just_over), 413, "payload_too_large")
        assert "2048" in error["message"]
        far_over = jsonl(*[row] * 2000)  # over the whole-body limit: werkzeug refuses it unread
        error = assert_error(upload(client, auth, far_over), 413, "payload_too_large")
        assert "2048" in error["message"]
        assert upload(client, auth, jsonl(row)).status_code == 201
        assert client.get("/v1/files", headers=auth).get_json()["data"][0]["rows"] == 1
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_upload_over_the_json_body_limit_is_accepted(client, auth, app):
    settings = app.extensions["gemma_jobs"].settings
    row = {"prompt": "p" * 1000, "completion": "c" * 1000}
    data = jsonl(*[row] * 750)
    assert settings.max_body_bytes < len(data) < settings.max_file_bytes
    response = upload(client, auth, data)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert (response.get_json()["rows"], response.get_json()["bytes"]) == (750, len(data))
    # The app-wide JSON limit still holds on other routes.
    big = {"model": "gemma-3-270m", "prompt": "x" * (settings.max_body_bytes + 10)}
    error = assert_error(client.post("/v1/generations", json=big, headers=auth), 413, "payload_too_large")
    assert str(settings.max_body_bytes) in error["message"]
    # Sent chunked (no Content-Length, as gunicorn passes it on), it is the same 413, not a body
    # cut at the limit and parsed (400); one byte under the limit is read whole.
    chunked = {"Transfer-Encoding": "chunked", **auth}
    terminated = {"wsgi.input_terminated": True}
    response = client.post("/v1/generations", data=json.dumps(big), headers=chunked, environ_overrides=terminated)
    assert_error(response, 413, "payload_too_large")
    fits = json.dumps({**big, "prompt": "x"}).encode()
    fits = fits[:-1] + b" " * (settings.max_body_bytes - len(fits) - 1) + b"}"
    response = client.post("/v1/generations", data=fits, headers=chunked, environ_overrides=terminated)
    assert response.status_code == 202, response.get_data(as_text=True)


def test_list_get_and_delete(client, auth, app):
    first = upload(client, auth, jsonl(CHAT), filename="a.jsonl").get_json()
    second = upload(client, auth, jsonl(COMPLETION, COMPLETION), filename="b.jsonl").get_json()
    listing = client.get("/v1/files", headers=auth).get_json()
    assert listing["object"] == "list"
    assert [item["id"] for item in listing["data"]] == [second["id"], first["id"]]
    assert client.get(f"/v1/files/{first['id']}", headers=auth).get_json() == first

    stored = storage_root(app) / file_row(app, first["id"]).path
    with capture_logs() as logs:
        response = client.delete(f"/v1/files/{first['id']}", headers=auth)
    assert response.status_code == 200
    assert response.get_json() == {"id": first["id"], "object": "file", "deleted": True}
    assert any(entry["event"] == "file_deleted" and entry["file_id"] == first["id"] for entry in logs)
    assert not stored.exists()
    assert file_row(app, first["id"]) is None
    assert_error(client.get(f"/v1/files/{first['id']}", headers=auth), 404, "not_found")
    assert_error(client.delete(f"/v1/files/{first['id']}", headers=auth), 404, "not_found")
    assert [item["id"] for item in client.get("/v1/files", headers=auth).get_json()["data"]] == [second["id"]]


def test_another_keys_file_is_404_and_survives(client, auth, app):
    mine = upload(client, auth, jsonl(CHAT)).get_json()
    other = {"Authorization": f"Bearer {make_key(app)}"}
    assert_error(client.get(f"/v1/files/{mine['id']}", headers=other), 404, "not_found")
    assert_error(client.delete(f"/v1/files/{mine['id']}", headers=other), 404, "not_found")
    assert client.get("/v1/files", headers=other).get_json()["data"] == []
    assert client.get(f"/v1/files/{mine['id']}", headers=auth).status_code == 200
    assert (storage_root(app) / file_row(app, mine["id"]).path).exists()
    assert_error(client.get("/v1/files/file_doesnotexist", headers=auth), 404, "not_found")


def test_an_id_with_nul_is_404_not_a_server_error(client, auth):
    assert_error(client.get("/v1/files/file_%00x", headers=auth), 404, "not_found")
    assert_error(client.delete("/v1/files/file_%00x", headers=auth), 404, "not_found")


@pytest.mark.parametrize("quota", [{"max_files_per_key": 2}, {"max_file_storage_per_key_bytes": 2 * 1024 + 1023}])
def test_a_key_keeps_at_most_its_quota_of_files(settings, redis_client, quota):
    """Uploads counted against nothing: one key could fill the storage volume every tenant shares."""
    data = jsonl(CHAT) * (1024 // len(jsonl(CHAT)) + 1)  # just over 1 KiB
    app = create_app(settings.model_copy(update=quota))
    try:
        client = app.test_client()
        auth, other = ({"Authorization": f"Bearer {make_key(app)}"} for _ in range(2))
        first, second = (upload(client, auth, data).get_json()["id"] for _ in range(2))
        error = assert_error(upload(client, auth, data), 409, "quota_exceeded")
        assert "DELETE /v1/files/{id}" in error["message"] and error["details"]["files"] == 2
        assert error["details"]["bytes"] == 2 * len(data)  # a number on PostgreSQL too (it summed a Decimal)
        assert len(stored_files(app)) == 2
        assert upload(client, other, data).status_code == 201  # another key's quota is its own
        assert client.delete(f"/v1/files/{first}", headers=auth).status_code == 200
        assert upload(client, auth, data).status_code == 201
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_a_failed_insert_removes_the_stored_bytes(app):
    context = app.extensions["gemma_jobs"]
    # No such key: the foreign key makes the insert fail after the bytes were written.
    with pytest.raises(IntegrityError), context.db.session_scope() as session:
        create_file(
            session, Caller(key_id="key_missing", role="user"), filename="a.jsonl", purpose="fine-tune",
            data=jsonl(CHAT), rows=1, storage=context.storage,
        )
    assert stored_files(app) == []


def test_an_oversized_form_field_is_413_saying_what_to_send(client, auth):
    response = client.post(
        "/v1/files", data={"purpose": "p" * 600_000, "file": (io.BytesIO(jsonl(CHAT)), "a.jsonl")}, headers=auth,
        content_type="multipart/form-data",
    )
    error = assert_error(response, 413, "payload_too_large")
    assert "form field" in error["message"] and "`file`" in error["message"]


def test_an_upload_the_storage_cannot_take_is_503_and_records_nothing(client, auth, app):
    root = storage_root(app)
    root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root / "files", ignore_errors=True)
    (root / "files").write_bytes(b"")  # the folder cannot be made: a broken volume, say
    with capture_logs() as logs:
        error = assert_error(upload(client, auth, jsonl(CHAT)), 503, "storage_unavailable")
    assert "could not store the file" in error["message"] and "nothing was recorded" in error["message"]
    assert any(entry["event"] == "file_not_stored" for entry in logs)
    assert client.get("/v1/files", headers=auth).get_json()["data"] == []
    (root / "files").unlink()
    assert upload(client, auth, jsonl(CHAT)).status_code == 201


def test_a_write_that_fails_leaves_no_partial_file(tmp_path):
    storage = Storage(tmp_path)
    (tmp_path / "files" / "taken.jsonl").mkdir(parents=True)  # the rename onto it fails
    with pytest.raises(IsADirectoryError):
        storage.write_atomic("files/taken.jsonl", b"data")
    assert [path.name for path in (tmp_path / "files").iterdir()] == ["taken.jsonl"]


def test_a_delete_whose_bytes_cannot_be_removed_still_answers_its_commit(client, auth, app):
    """The row's delete committed; a 500 from the clean-up after it told the client it had not."""
    file_id = upload(client, auth, jsonl(CHAT)).get_json()["id"]
    root = storage_root(app)
    shutil.rmtree(root / "files")
    (root / "files").write_bytes(b"")  # unlinking files/<id>.jsonl now fails (not a directory)
    with capture_logs() as logs:
        response = client.delete(f"/v1/files/{file_id}", headers=auth)
    assert response.status_code == 200 and response.get_json()["deleted"] is True
    assert any(entry["event"] == "stored_bytes_not_removed" for entry in logs)
    assert file_row(app, file_id) is None
    assert_error(client.delete(f"/v1/files/{file_id}", headers=auth), 404, "not_found")
