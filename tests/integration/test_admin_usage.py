"""Admin key management and the usage ledger, on SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from services.domain.keys import create_key
from shared import job_store
from shared.models import UsageRecord
from tests.integration.helpers import assert_error, make_key, submit
from tests.processes import CLI


@pytest.fixture()
def admin(app) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(app, role='admin')}"}


def test_admin_creates_lists_and_revokes_keys(client, admin):
    created = client.post("/v1/admin/keys", json={"role": "user", "name": "team-a", "rpm": 60}, headers=admin)
    assert created.status_code == 201
    body = created.get_json()
    assert body["key"].startswith("gj_") and body["role"] == "user" and body["rpm"] == 60
    new_key = {"Authorization": f"Bearer {body['key']}"}
    assert client.get("/v1/jobs", headers=new_key).status_code == 200
    listing = client.get("/v1/admin/keys", headers=admin).get_json()
    assert body["id"] in [key["id"] for key in listing["data"]]
    assert body["key"] not in str(listing)
    revoked = client.delete(f"/v1/admin/keys/{body['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.get_json()["revoked_at"]
    error = assert_error(client.get("/v1/jobs", headers=new_key), 401, "unauthenticated")
    assert "revoked" in error["message"]
    assert client.delete(f"/v1/admin/keys/{body['id']}", headers=admin).status_code == 200  # again: fine
    assert_error(client.delete("/v1/admin/keys/key_nope", headers=admin), 404, "not_found")


def test_user_keys_get_403_on_admin_routes(client, auth):
    for method, path in [("post", "/v1/admin/keys"), ("get", "/v1/admin/keys"),
                         ("delete", "/v1/admin/keys/key_x"), ("get", "/v1/admin/usage")]:
        response = getattr(client, method)(path, headers=auth, json={} if method == "post" else None)
        assert_error(response, 403, "forbidden")
    assert_error(client.get("/v1/admin/keys"), 401, "unauthenticated")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"role": "root"}, "role"),
        ({"rpm": 0}, "rpm"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at"),
        ({"expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),  # past year 9999 in UTC: was a 500
        ({"colour": "red"}, "colour"),
        ({"name": "a\u0000b"}, "name"),  # PostgreSQL refuses NUL in text: was a 500
        ({"name": "line\nbreak"}, "name"),
        # Garbled `gemma-jobs keys list`: a C1 control, a line separator, a direction override.
        ({"rpm": True}, "rpm"),  # was a key with rpm 1
        ({"tpm": "5000"}, "tpm"),
        ({"name": "a\u0085b"}, "name"),
        ({"name": "a\u2028b"}, "name"),
        ({"name": "a\u202eb"}, "name"),
    ],
)
def test_bad_key_requests_are_422(client, admin, body, field):
    error = assert_error(client.post("/v1/admin/keys", json=body, headers=admin), 422, "invalid_field")
    assert field in [detail["field"] for detail in error["details"]]


def test_limits_are_json_integers_written_either_way(client, admin):
    """JSON Schema's integer includes 5.0; a fraction or a string is still refused (above)."""
    body = {"rpm": 5.0, "tpm": 60000, "max_concurrent": 2.0}
    created = client.post("/v1/admin/keys", json=body, headers=admin)
    assert created.status_code == 201, created.get_data(as_text=True)
    assert [created.get_json()[name] for name in body] == [5, 60000, 2]
    assert_error(client.post("/v1/admin/keys", json={"rpm": 5.5}, headers=admin), 422, "invalid_field")


def test_key_names_may_hold_any_printable_text(client, admin):
    for name in ("ops team", "équipe nuit", "東京　チーム", "🙂 bots"):
        response = client.post("/v1/admin/keys", json={"name": name}, headers=admin)
        assert response.status_code == 201 and response.get_json()["name"] == name


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/admin/usage?from=0001-01-01T00:00:00%2B01:00", "from"),  # before year 1 in UTC
        ("/v1/usage?to=9999-12-31T23:00:00-05:00", "to"),
        ("/v1/admin/usage?key_id=key_%00", "key_id"),  # PostgreSQL refuses NUL in text
    ],
)
def test_unstorable_usage_queries_are_422(client, admin, path, field):
    error = assert_error(client.get(path, headers=admin), 422, "invalid_field")
    assert field in [detail["field"] for detail in error["details"]]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/admin/usage?from=2025-01-01&to=2024-01-01",
        "/v1/usage?from=2025-01-01T00:00:00Z&to=2025-01-01T00:00:00Z",  # [t, t) is empty
        "/v1/usage?from=2025-01-01T01:00:00%2B01:00&to=2025-01-01T00:00:00",  # the same time, in UTC
    ],
)
def test_a_usage_range_that_ends_before_it_starts_is_422_not_an_empty_report(client, admin, path):
    error = assert_error(client.get(path, headers=admin), 422, "invalid_field")
    assert "`to` must be after `from`" in error["message"] and error["details"][0]["field"] == "to"


def test_a_range_across_timezones_that_is_not_empty_is_answered(client, admin):
    response = client.get("/v1/usage?from=2025-01-01T01:00:00%2B02:00&to=2025-01-01T00:00:00", headers=admin)
    assert response.status_code == 200, response.get_data(as_text=True)


def test_only_a_working_admin_key_counts_as_one_for_up(settings, redis_client):
    """`up` creates (and prints) an admin key when none works; an expired one counted."""
    from datetime import timedelta

    from services.domain.keys import create_key, has_active_admin
    from shared.db import Database
    from shared.models import ApiKey, utcnow

    db = Database(settings.database_url_or_default)
    with db.session_scope() as session:
        assert not has_active_admin(session)
        key, _ = create_key(session, role="admin")
        session.flush()
        key.expires_at = utcnow() - timedelta(minutes=1)
    with db.session_scope() as session:
        assert not has_active_admin(session)
        session.get(ApiKey, key.id).expires_at = utcnow() + timedelta(days=1)
    with db.session_scope() as session:
        assert has_active_admin(session)
    db.dispose()


def test_revoking_an_id_with_nul_is_404(client, admin):
    assert_error(client.delete("/v1/admin/keys/key_%00", headers=admin), 404, "not_found")


def test_an_expired_key_is_refused(client, admin, app):
    future = (datetime.now(timezone.utc) + timedelta(hours=1)).isoformat()
    body = client.post("/v1/admin/keys", json={"expires_at": future}, headers=admin).get_json()
    headers = {"Authorization": f"Bearer {body['key']}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    from shared.models import ApiKey

    with app.extensions["gemma_jobs"].db.session_scope() as session:
        session.execute(update(ApiKey).where(ApiKey.id == body["id"]).values(expires_at=datetime.now(timezone.utc)))
    # A key row changed outside the API is seen once the process's key cache lets it go
    # (KEY_CACHE_TTL_S); here at once.
    app.extensions["gemma_jobs"].keys.ttl_s = 0
    assert "expired" in assert_error(client.get("/v1/jobs", headers=headers), 401, "unauthenticated")["message"]


def charge(app, key_id: str, model: str, prompt: int, completion: int, seconds: float, when: datetime) -> None:
    """Run a job through the real claim/finish path, then date its usage row."""
    from shared.ids import new_id
    from shared.models import Job

    db = app.extensions["gemma_jobs"].db
    with db.session_scope() as session:
        job = Job(id=new_id("job"), owner_key_id=key_id, kind="generation", model=model,
                  queue=f"generation.{model}", status="queued", params={})
        session.add(job)
    held = job_store.claim(db, job.id, "w", device="cpu", lease_s=30, max_attempts=3)
    with db.session_scope() as session:
        job_store.finish(session, held, "w", result={"text": ""},
                         usage={"prompt_tokens": prompt, "completion_tokens": completion, "gpu_seconds": seconds})
        session.execute(update(UsageRecord).where(UsageRecord.job_id == job.id).values(created_at=when))


def test_usage_is_summed_in_sql_by_key_model_and_day(client, admin, app):
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        (alice, alice_key), (bob, _) = create_key(session, role="user"), create_key(session, role="user")
    day1 = datetime(2026, 11, 1, 10, tzinfo=timezone.utc)
    day2 = datetime(2026, 11, 2, 23, 30, tzinfo=timezone.utc)
    charge(app, alice.id, "gemma-3-270m", 10, 20, 1.0, day1)
    charge(app, alice.id, "gemma-3-1b-it", 5, 7, 0.5, day2)
    charge(app, bob.id, "gemma-3-270m", 1, 2, 0.25, day2)
    by_key = client.get("/v1/admin/usage?group_by=key", headers=admin).get_json()
    rows = {row["group"]: row for row in by_key["data"]}
    assert rows[alice.id] | {"group": None} == {"group": None, "jobs": 2, "prompt_tokens": 15, "completion_tokens": 27,
                                                 "train_tokens": 0, "gpu_seconds": 1.5}
    assert rows[bob.id]["jobs"] == 1
    by_model = client.get("/v1/admin/usage?group_by=model", headers=admin).get_json()["data"]
    assert [(row["group"], row["jobs"]) for row in by_model] == [("gemma-3-1b-it", 1), ("gemma-3-270m", 2)]
    by_day = client.get("/v1/admin/usage?group_by=day", headers=admin).get_json()["data"]
    assert [(row["group"], row["completion_tokens"]) for row in by_day] == [("2026-11-01", 20), ("2026-11-02", 9)]
    ranged = client.get(f"/v1/admin/usage?group_by=key&from=2026-11-02T00:00:00Z&key_id={alice.id}", headers=admin)
    assert [(row["group"], row["jobs"]) for row in ranged.get_json()["data"]] == [(alice.id, 1)]
    own = client.get("/v1/usage", headers={"Authorization": f"Bearer {alice_key}"}).get_json()
    assert (own["jobs"], own["completion_tokens"]) == (2, 27)
    own_range = client.get("/v1/usage?to=2026-11-02T00:00:00Z", headers={"Authorization": f"Bearer {alice_key}"})
    assert own_range.get_json()["jobs"] == 1
    assert_error(client.get("/v1/admin/usage?group_by=week", headers=admin), 422, "invalid_field")
    assert_error(client.get("/v1/usage?from=yesterday", headers=admin), 422, "invalid_field")
    assert_error(client.get("/v1/usage?key_id=someone", headers=admin), 422, "invalid_field")
    assert_error(client.get("/v1/admin/usage?key_id=", headers=admin), 422, "invalid_field")

    result = subprocess.run(
        [*CLI, "usage", "--group-by", "model"],
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": app.extensions["gemma_jobs"].settings.database_url},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "jobs"]
    assert lines[2].split()[:4] == ["gemma-3-270m", "2", "11", "22"]


def test_queues_name_the_job_that_waited_longest(client, auth, admin):
    first, second = (submit(client, auth).get_json()["id"] for _ in range(2))
    queues = {queue["name"]: queue for queue in client.get("/v1/admin/queues", headers=admin).get_json()["data"]}
    queue = queues["generation.gemma-3-270m"]
    assert (queue["queued"], queue["oldest_job_id"]) == (2, first)
    assert client.post(f"/v1/jobs/{first}/cancel", headers=auth).status_code == 200
    queues = {queue["name"]: queue for queue in client.get("/v1/admin/queues", headers=admin).get_json()["data"]}
    assert (queues["generation.gemma-3-270m"]["queued"], queues["generation.gemma-3-270m"]["oldest_job_id"]) == (1, second)


@pytest.mark.parametrize("query", ["include_gone=maybe", "alive=1"])
def test_bad_worker_queries_are_422(client, admin, query):
    assert_error(client.get(f"/v1/admin/workers?{query}", headers=admin), 422, "invalid_field")


@pytest.mark.parametrize("path", ["/v1/admin/keys?limit=1", "/v1/admin/queues?x=1", "/v1/files?limit=1",
                                  "/v1/models?after=gemma"])
def test_a_list_that_takes_no_query_refuses_one(client, admin, path):
    """Ignored, `?limit=1` on the keys list seemed to page, and every key came back."""
    error = assert_error(client.get(path, headers=admin), 422, "invalid_field")
    assert path.split("?")[1].split("=")[0] in str(error)
    document = client.get("/openapi.json").get_json()
    assert "422" in document["paths"][path.split("?")[0]]["get"]["responses"]  # as documented


def test_a_key_s_expiry_is_answered_in_utc_as_every_later_read_shows_it(client, admin):
    """The create answer echoed the offset the request gave (-08:00); the list said Z."""
    created = client.post("/v1/admin/keys", json={"expires_at": "2099-01-01T00:00:00-08:00"}, headers=admin).get_json()
    listed = {key["id"]: key for key in client.get("/v1/admin/keys", headers=admin).get_json()["data"]}
    assert created["expires_at"] == listed[created["id"]]["expires_at"] == "2099-01-01T08:00:00Z"


def test_workers_are_the_live_ones_unless_gone_ones_are_asked_for(client, admin, app):
    from shared.models import WorkerRecord, utcnow

    now = utcnow()
    row = {"host": "h", "device": "cpu", "role": "all", "models": [], "queues": [], "started_at": now}
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        session.add(WorkerRecord(id="h:1:cpu", pid=1, state="ready", heartbeat_at=now, **row))
        session.add(WorkerRecord(id="h:2:cpu", pid=2, state="stopped", heartbeat_at=now, stopped_at=now, **row))
        session.add(WorkerRecord(id="h:3:cpu", pid=3, state="ready", heartbeat_at=now - timedelta(minutes=5), **row))
    listed = client.get("/v1/admin/workers", headers=admin).get_json()["data"]
    assert [(worker["id"], worker["alive"]) for worker in listed] == [("h:1:cpu", True)]
    listed = client.get("/v1/admin/workers?include_gone=true", headers=admin).get_json()["data"]
    assert sorted((worker["id"], worker["alive"]) for worker in listed) == [
        ("h:1:cpu", True), ("h:2:cpu", False), ("h:3:cpu", False)]


def test_days_are_iso_dates_whatever_the_server_s_date_style(database_url, settings, postgres_admin_url, redis_client):
    """A PostgreSQL server set to `DateStyle = 'SQL, DMY'` gave `01/03/2026`, April before March."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL setting")
    import psycopg

    from services.gateway import create_app

    with psycopg.connect(postgres_admin_url, autocommit=True) as connection:
        connection.execute(f'ALTER DATABASE "{database_url.rsplit("/", 1)[1]}" SET DateStyle = \'SQL, DMY\'')
    app = create_app(settings)  # its connections start with that DateStyle
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        key, _ = create_key(session, role="user")
    charge(app, key.id, "gemma-3-270m", 1, 2, 0.1, datetime(2026, 4, 2, 12, tzinfo=timezone.utc))
    charge(app, key.id, "gemma-3-270m", 1, 3, 0.1, datetime(2026, 3, 1, 12, tzinfo=timezone.utc))
    admin = {"Authorization": f"Bearer {make_key(app, 'admin')}"}
    by_day = app.test_client().get("/v1/admin/usage?group_by=day", headers=admin)
    assert [(row["group"], row["completion_tokens"]) for row in by_day.get_json()["data"]] == [
        ("2026-03-01", 3), ("2026-04-02", 2)]
    app.extensions["gemma_jobs"].db.dispose()
