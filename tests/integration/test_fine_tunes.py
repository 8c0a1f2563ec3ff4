"""The fine-tune API at the gateway: submit checks, queues, limits, events, adapters as models.

No worker runs here: jobs stay queued, and adapters and events are inserted as rows.
"""

from __future__ import annotations

import base64
import io
import json

import pytest

from services.domain.keys import create_key
from services.gateway import create_app
from shared.ids import new_id
from shared.models import Adapter, Job, JobEvent
from shared.registry import DEFAULT_MODEL_ID
from shared.schemas import LORA_TARGET_MODULES, Hyperparameters
from tests.integration.helpers import answers_at_once, assert_error, make_key, submit

FT_QUEUE = f"fine_tune.{DEFAULT_MODEL_ID}"
GEN_QUEUE = f"generation.{DEFAULT_MODEL_ID}"
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def jsonl(rows: int) -> bytes:
    return "".join(json.dumps(CHAT) + "\n" for _ in range(rows)).encode("utf-8")


def upload(client, auth, rows: int = 3) -> str:
    form = {"file": (io.BytesIO(jsonl(rows)), "train.jsonl"), "purpose": "fine-tune"}
    response = client.post("/v1/files", data=form, headers=auth, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


def fine_tune(client, auth, training_file: str, **overrides):
    body = {"base_model": DEFAULT_MODEL_ID, "training_file": training_file, **overrides}
    return client.post("/v1/fine-tunes", json=body, headers=auth)


def queued_ids(redis_client, queue: str) -> list[str]:
    """The job ids of the Celery messages waiting on a Redis list, oldest first."""
    messages = [json.loads(raw) for raw in redis_client.lrange(queue, 0, -1)]
    return [json.loads(base64.b64decode(message["body"]))[0][0] for message in reversed(messages)]


def job_row(app, job_id: str) -> Job:
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        return session.get(Job, job_id)


def key_headers(app, **limits) -> dict[str, str]:
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        _, plaintext = create_key(session, role="user", **limits)
    return {"Authorization": f"Bearer {plaintext}"}


def add_adapter(app, job_id: str) -> str:
    """Register the adapter a (queued) fine-tune job names, as a finished run would."""
    job = job_row(app, job_id)
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        session.add(
            Adapter(
                id=job.adapter_id, owner_key_id=job.owner_key_id, base_model=job.model, job_id=job.id,
                path=f"adapters/{job.adapter_id}/attempt-1", hyperparameters={}, metrics={"train_loss": 0.5},
                size_bytes=10,
            )
        )
    return job.adapter_id


def adapter_of_new_key(client, app) -> tuple[dict[str, str], str]:
    """A fresh key with one adapter of its own."""
    headers = {"Authorization": f"Bearer {make_key(app)}"}
    response = fine_tune(client, headers, upload(client, headers))
    assert response.status_code == 202, response.get_data(as_text=True)
    return headers, add_adapter(app, response.get_json()["id"])


def model_ids(client, auth) -> list[str]:
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    return [model["id"] for model in response.get_json()["data"]]


# --- submit ---------------------------------------------------------------------------------


def test_submit_records_a_queued_fine_tune_and_enqueues_it_on_its_own_queue(client, auth, app, redis_client):
    training, validation = upload(client, auth, rows=4), upload(client, auth, rows=2)
    generation = submit(client, auth).get_json()["id"]  # on another queue: not ahead of the fine-tune
    response = fine_tune(
        client, auth, training, validation_file=validation, hyperparameters={"lora_r": 16, "lora_alpha": 32},
        metadata={"team": "search"},
    )
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job["id"].startswith("job_")
    assert (job["kind"], job["status"], job["model"]) == ("fine_tune", "queued", DEFAULT_MODEL_ID)
    assert job["adapter_id"] is None  # DESIGN: carried on success; until then it names nothing usable
    assert job["queue_position"] == 0
    assert job["metadata"] == {"team": "search"}
    assert job["result"] is None and job["error"] is None
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"

    assert queued_ids(redis_client, FT_QUEUE) == [job["id"]]
    assert queued_ids(redis_client, GEN_QUEUE) == [generation]

    row = job_row(app, job["id"])
    assert (row.kind, row.queue, row.model) == ("fine_tune", FT_QUEUE, DEFAULT_MODEL_ID)
    assert row.adapter_id == "ft-" + job["id"].split("_", 1)[1]
    assert row.reserved_tokens == 0
    assert row.expires_at is None
    expected_hp = {**Hyperparameters().model_dump(), "lora_r": 16, "lora_alpha": 32}
    assert row.params["hyperparameters"] == expected_hp
    assert expected_hp["epochs"] == 3 and expected_hp["target_modules"] == list(LORA_TARGET_MODULES)
    assert row.params["training_file"] == training
    assert row.params["training_path"] == f"files/{training}.jsonl"
    assert row.params["validation_file"] == validation
    assert row.params["validation_path"] == f"files/{validation}.jsonl"
    assert row.params["quantization"] == "none"
    assert row.params["timeout_s"] == app.extensions["gemma_jobs"].settings.fine_tune_timeout_s

    shown = client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()
    assert shown == job
    listed = client.get("/v1/jobs?kind=fine_tune", headers=auth).get_json()
    assert [item["id"] for item in listed["data"]] == [job["id"]]
    assert listed["has_more"] is False
    generations = client.get("/v1/jobs?kind=generation", headers=auth).get_json()
    assert [item["id"] for item in generations["data"]] == [generation]


def test_defaults_without_validation_file_or_hyperparameters(client, auth, app):
    training = upload(client, auth)
    response = fine_tune(client, auth, training, ttl_s=60)
    assert response.status_code == 202, response.get_data(as_text=True)
    row = job_row(app, response.get_json()["id"])
    assert row.params["hyperparameters"] == Hyperparameters().model_dump()
    assert row.params["validation_file"] is None and row.params["validation_path"] is None
    assert row.expires_at is not None
    assert 59 <= (row.expires_at - row.created_at).total_seconds() <= 61


def test_suffix_goes_into_the_adapter_id(client, auth, app):
    response = fine_tune(client, auth, upload(client, auth), suffix="abc")
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert job_row(app, job["id"]).adapter_id == "ft-abc-" + job["id"].split("_", 1)[1]


def test_queued_fine_tunes_have_queue_positions_of_their_own(client, auth):
    training = upload(client, auth)
    ids = [fine_tune(client, auth, training).get_json()["id"] for _ in range(2)]
    submit(client, auth)
    positions = [client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()["queue_position"] for job_id in ids]
    assert positions == [0, 1]


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_is_accepted_at_submit_the_worker_decides(client, auth, app, redis_client, quantization):
    response = fine_tune(client, auth, upload(client, auth), quantization=quantization)
    assert response.status_code == 202, response.get_data(as_text=True)
    job_id = response.get_json()["id"]
    assert job_row(app, job_id).params["quantization"] == quantization
    assert queued_ids(redis_client, FT_QUEUE) == [job_id]


# --- refused submits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hyperparameters": {"lora_r": 0}}, "hyperparameters.lora_r"),
        ({"hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"learning_rate": -1e-4}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"lora_dropout": 1.0}}, "hyperparameters.lora_dropout"),
        ({"hyperparameters": {"epochs": 0}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"target_modules": ["foo"]}}, "hyperparameters.target_modules.0"),
        ({"hyperparameters": {"target_modules": []}}, "hyperparameters.target_modules"),
        ({"hyperparameters": {"max_seq_length": 32769}}, "hyperparameters.max_seq_length"),
        ({"hyperparameters": {"lora_r": 1, "lora_alpha": 65}}, "hyperparameters.lora_alpha"),
        ({"hyperparameters": {"lora_r": 2, "lora_alpha": 129}}, "hyperparameters.lora_alpha"),
        ({"hyperparameters": {"warmup_steps": 10}}, "hyperparameters.warmup_steps"),
        ({"hyperparameters": "fast"}, "hyperparameters"),
        ({"surprise": True}, "surprise"),
        ({"quantization": "3bit"}, "quantization"),
        ({"suffix": "Bad Suffix!"}, "suffix"),
        ({"suffix": "x" * 33}, "suffix"),
        ({"ttl_s": 7 * 86400 + 1}, "ttl_s"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"base_model": "gemma-9000"}, "base_model"),
        ({"base_model": "ft-x"}, "base_model"),
    ],
)
def test_bad_fields_are_422_naming_the_field(client, auth, redis_client, overrides, field):
    error = assert_error(fine_tune(client, auth, upload(client, auth), **overrides), 422, "invalid_field")
    assert field in [detail["field"] for detail in error["details"]], error
    assert redis_client.llen(FT_QUEUE) == 0
    assert client.get("/v1/jobs", headers=auth).get_json()["data"] == []


def test_the_limits_on_alpha_and_ttl_are_inclusive(client, auth, app):
    training = upload(client, auth)
    assert fine_tune(client, auth, training, hyperparameters={"lora_r": 1, "lora_alpha": 64}).status_code == 202
    max_ttl_s = app.extensions["gemma_jobs"].settings.max_ttl_s
    assert fine_tune(client, auth, training, ttl_s=max_ttl_s).status_code == 202


def test_unknown_base_model_lists_the_base_models(client, auth):
    error = assert_error(fine_tune(client, auth, upload(client, auth), base_model="gemma-9000"), 422, "invalid_field")
    assert "gemma-9000" in error["message"] and DEFAULT_MODEL_ID in error["message"]


def test_an_adapter_is_not_a_base_model_even_when_it_is_yours(client, auth, app):
    first = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    adapter_id = add_adapter(app, first)
    for base_model in ("ft-x", adapter_id):
        error = assert_error(fine_tune(client, auth, upload(client, auth), base_model=base_model), 422, "invalid_field")
        assert error["details"][0]["field"] == "base_model"
        assert "adapter is not supported" in error["message"]


def test_unknown_training_file_and_another_keys_file_read_the_same(client, auth, app, redis_client):
    other = {"Authorization": f"Bearer {make_key(app)}"}
    theirs = upload(client, other)
    unknown = new_id("file")
    not_found = assert_error(fine_tune(client, auth, unknown), 422, "invalid_field")
    not_yours = assert_error(fine_tune(client, auth, theirs), 422, "invalid_field")
    for error in (not_found, not_yours):
        assert error["details"][0]["field"] == "training_file"
        assert "training_file" in error["message"]
    # Nothing tells the other key's file apart from one that does not exist.
    assert json.dumps(not_yours).replace(theirs, "ID") == json.dumps(not_found).replace(unknown, "ID")
    assert redis_client.llen(FT_QUEUE) == 0


def test_validation_file_must_be_yours_too(client, auth, app):
    other = {"Authorization": f"Bearer {make_key(app)}"}
    theirs = upload(client, other)
    error = assert_error(fine_tune(client, auth, upload(client, auth), validation_file=theirs), 422, "invalid_field")
    assert error["details"][0]["field"] == "validation_file"
    assert "validation_file" in error["message"]
    response = fine_tune(client, auth, upload(client, auth), validation_file="file_nope")
    error = assert_error(response, 422, "invalid_field")
    assert error["details"][0]["field"] == "validation_file"


def test_a_deleted_training_file_is_no_longer_yours(client, auth):
    training = upload(client, auth)
    assert client.delete(f"/v1/files/{training}", headers=auth).status_code == 200
    error = assert_error(fine_tune(client, auth, training), 422, "invalid_field")
    assert error["details"][0]["field"] == "training_file"


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_file_a_fine_tune_still_needs_is_kept_409(client, auth, app, field):
    """Deleted while its fine-tune was queued, the file was gone when the job started (or was
    retried), and the job failed `training_file_missing`."""
    other = upload(client, auth)
    needed = upload(client, auth)
    files = {"training_file": needed, "validation_file": other}
    if field == "validation_file":
        files = {"training_file": other, "validation_file": needed}
    job_id = fine_tune(client, auth, files["training_file"], validation_file=files["validation_file"]).get_json()["id"]
    error = assert_error(client.delete(f"/v1/files/{needed}", headers=auth), 409, "file_in_use")
    assert job_id in error["message"] and "cancel" in error["message"]
    assert client.get(f"/v1/files/{needed}", headers=auth).status_code == 200
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    assert client.delete(f"/v1/files/{needed}", headers=auth).status_code == 200  # nothing needs it now


@pytest.mark.parametrize("field", ["training_file", "validation_file"])
def test_a_file_id_with_nul_is_422_not_a_server_error(client, auth, field):
    body = {"training_file": upload(client, auth), field: "file_\x00x"}
    error = assert_error(fine_tune(client, auth, **body), 422, "invalid_field")
    assert error["details"][0]["field"] == field


def test_max_seq_length_over_the_models_context_is_422(settings, redis_client, tmp_path):
    registry = tmp_path / "registry.json"
    small = {"id": "tiny-test", "path": str(tmp_path / "tiny"), "context_length": 256}
    registry.write_text(json.dumps({"models": [small]}), encoding="utf-8")
    app = create_app(settings.model_copy(update={"model_registry": registry}))
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_key(app)}"}
        training = upload(client, auth)
        # The default max_seq_length (512) is over this model's context: it must be lowered.
        response = fine_tune(client, auth, training, base_model="tiny-test")
        error = assert_error(response, 422, "invalid_field")
        assert error["details"][0]["field"] == "hyperparameters.max_seq_length"
        assert "256" in error["message"] and "tiny-test" in error["message"]
        response = fine_tune(client, auth, training, base_model="tiny-test", hyperparameters={"max_seq_length": 256})
        assert response.status_code == 202, response.get_data(as_text=True)
        assert queued_ids(redis_client, "fine_tune.tiny-test") == [response.get_json()["id"]]
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_a_run_over_max_train_steps_is_422_naming_the_limit(settings, redis_client):
    app = create_app(settings.model_copy(update={"max_train_steps": 5}))
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_key(app)}"}
        training = upload(client, auth, rows=3)
        # 3 rows, batch 1: 3 micro-batches an epoch. Accumulating them into fewer optimizer steps
        # does not make the run smaller (it passed 256 times the limit).
        for hp in ({"batch_size": 1, "epochs": 2}, {"max_steps": 6},
                   {"batch_size": 1, "epochs": 2, "gradient_accumulation_steps": 3},
                   {"max_steps": 2, "gradient_accumulation_steps": 3}):
            error = assert_error(fine_tune(client, auth, training, hyperparameters=hp), 422, "invalid_field")
            assert error["details"][0]["field"] == "hyperparameters"
            assert "6 micro-batches" in error["message"] and "5" in error["message"]
        for hp in (
            {"batch_size": 1, "epochs": 1},
            {"max_steps": 5},
            {"batch_size": 3, "epochs": 5, "gradient_accumulation_steps": 3},  # 1 micro-batch an epoch
            {"epochs": 5},  # batch 4: one (partial) batch an epoch
        ):
            response = fine_tune(client, auth, training, hyperparameters=hp)
            assert response.status_code == 202, (hp, response.get_data(as_text=True))
        assert redis_client.llen(FT_QUEUE) == 4
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_a_micro_batch_over_the_servers_token_limit_is_422_naming_the_way_out(client, auth, app, redis_client):
    """batch_size 256 x max_seq_length 32768 was accepted: ~6 MB a token, it killed CPU workers."""
    training = upload(client, auth, rows=3)
    error = assert_error(fine_tune(client, auth, training, hyperparameters={"batch_size": 16, "max_seq_length": 512}),
                         422, "invalid_field")
    assert error["details"][0]["field"] == "hyperparameters.batch_size"
    assert "8192 tokens" in error["message"] and "4096" in error["message"]
    assert "gradient_accumulation_steps" in error["message"]
    assert redis_client.llen(FT_QUEUE) == 0
    accepted = fine_tune(client, auth, training, hyperparameters={"batch_size": 8, "max_seq_length": 512,
                                                                  "gradient_accumulation_steps": 2})
    assert accepted.status_code == 202, accepted.get_data(as_text=True)


def test_steps_count_a_partial_gradient_accumulation_as_a_step(settings, redis_client):
    app = create_app(settings.model_copy(update={"max_train_steps": 5}))
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {make_key(app)}"}
        # 3 batches an epoch: the Trainer counts a partial accumulation as a step, 2 an epoch, 6 in all.
        hp = {"batch_size": 1, "gradient_accumulation_steps": 2, "epochs": 3}
        response = fine_tune(client, auth, upload(client, auth, rows=3), hyperparameters=hp)
        error = assert_error(response, 422, "invalid_field")
        assert error["details"][0]["field"] == "hyperparameters"
    finally:
        app.extensions["gemma_jobs"].db.dispose()


def test_malformed_bodies_are_400(client, auth):
    headers = {**auth, "Content-Type": "application/json"}
    assert_error(client.post("/v1/fine-tunes", data="{not json", headers=headers), 400, "malformed_request")
    assert_error(client.post("/v1/fine-tunes", data="[1, 2]", headers=headers), 400, "malformed_request")
    assert_error(client.post("/v1/fine-tunes", headers=auth), 400, "malformed_request")


def test_missing_required_fields_are_422(client, auth):
    error = assert_error(client.post("/v1/fine-tunes", json={}, headers=auth), 422, "invalid_field")
    assert {"base_model", "training_file"} <= {detail["field"] for detail in error["details"]}


def test_fine_tunes_need_a_key(client, auth, redis_client):
    training = upload(client, auth)
    assert_error(fine_tune(client, {}, training), 401, "unauthenticated")
    bad = {"Authorization": "Bearer gj_not-a-real-key-at-all"}
    assert_error(fine_tune(client, bad, training), 401, "unauthenticated")
    assert redis_client.llen(FT_QUEUE) == 0


# --- limits -----------------------------------------------------------------------------------


def test_a_queued_fine_tune_holds_a_concurrency_slot(client, app, redis_client):
    auth = key_headers(app, max_concurrent=1)
    training = upload(client, auth)
    first = fine_tune(client, auth, training)
    assert first.status_code == 202, first.get_data(as_text=True)
    assert '"concurrent";r=0' in first.headers["RateLimit"]
    refused = fine_tune(client, auth, training)
    assert_error(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] == "1"
    assert "concurrent" in refused.get_json()["error"]["message"]
    assert_error(submit(client, auth), 429, "rate_limited")  # one slot for generations and fine-tunes
    assert queued_ids(redis_client, FT_QUEUE) == [first.get_json()["id"]]
    assert len(client.get("/v1/jobs", headers=auth).get_json()["data"]) == 1
    # Cancelling the queued fine-tune frees the slot.
    assert client.post(f"/v1/jobs/{first.get_json()['id']}/cancel", headers=auth).get_json()["status"] == "cancelled"
    assert fine_tune(client, auth, training).status_code == 202


def test_a_fine_tune_counts_as_a_request_but_reserves_no_tokens(client, app):
    auth = key_headers(app, rpm=1, tpm=1)
    training = upload(client, auth)
    response = fine_tune(client, auth, training)
    assert response.status_code == 202, response.get_data(as_text=True)
    assert job_row(app, response.get_json()["id"]).reserved_tokens == 0
    assert_error(fine_tune(client, auth, training), 429, "rate_limited")


# --- events -----------------------------------------------------------------------------------


def add_events(app, job_id: str, types: list[str]) -> list[int]:
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        rows = [JobEvent(job_id=job_id, type=kind, data={"n": index}) for index, kind in enumerate(types)]
        for row in rows:
            session.add(row)
            session.flush()
        return [row.id for row in rows]


def events(client, auth, job_id: str, query: str = ""):
    return client.get(f"/v1/jobs/{job_id}/events{query}", headers=auth)


def test_events_are_listed_oldest_first_with_a_cursor(client, auth, app):
    training = upload(client, auth)
    job_id = fine_tune(client, auth, training).get_json()["id"]
    sibling = fine_tune(client, auth, training).get_json()["id"]
    ids = add_events(app, job_id, ["status", "progress"])
    add_events(app, sibling, ["status"])  # another job's events are not mixed in
    ids += add_events(app, job_id, ["progress", "progress", "status"])

    page = events(client, auth, job_id).get_json()
    assert page["object"] == "list" and page["has_more"] is False
    assert [event["id"] for event in page["data"]] == ids
    assert [event["type"] for event in page["data"]] == ["status", "progress", "progress", "progress", "status"]
    assert [event["data"] for event in page["data"]] == [{"n": 0}, {"n": 1}, {"n": 0}, {"n": 1}, {"n": 2}]
    assert all(event["created_at"] for event in page["data"])

    after = events(client, auth, job_id, f"?after={ids[1]}").get_json()
    assert [event["id"] for event in after["data"]] == ids[2:]
    first = events(client, auth, job_id, "?limit=2").get_json()
    assert ([event["id"] for event in first["data"]], first["has_more"]) == (ids[:2], True)
    second = events(client, auth, job_id, f"?limit=2&after={ids[1]}").get_json()
    assert ([event["id"] for event in second["data"]], second["has_more"]) == (ids[2:4], True)
    last = events(client, auth, job_id, f"?limit=2&after={ids[3]}").get_json()
    assert ([event["id"] for event in last["data"]], last["has_more"]) == (ids[4:], False)
    exact = events(client, auth, job_id, "?limit=5").get_json()
    assert (len(exact["data"]), exact["has_more"]) == (5, False)
    empty = {"object": "list", "data": [], "has_more": False, "next_after": None}
    assert events(client, auth, job_id, f"?after={ids[-1]}").get_json() == empty
    assert events(client, auth, job_id, f"?after={2**63 - 1}&limit=1000").get_json() == empty


def test_a_job_without_events_has_an_empty_list(client, auth):
    job_id = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    empty = {"object": "list", "data": [], "has_more": False, "next_after": None}
    assert events(client, auth, job_id).get_json() == empty


def test_events_of_another_keys_job_or_an_unknown_job_are_404(client, auth, app):
    job_id = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    add_events(app, job_id, ["status"])
    other = {"Authorization": f"Bearer {make_key(app)}"}
    assert_error(events(client, other, job_id), 404, "not_found")
    assert_error(events(client, auth, new_id("job")), 404, "not_found")
    assert_error(events(client, auth, "job_%00x"), 404, "not_found")
    assert_error(events(client, {}, job_id), 401, "unauthenticated")


@pytest.mark.parametrize(
    ("query", "field"),
    [("?after=-1", "after"), ("?after=x", "after"), ("?limit=0", "limit"), ("?limit=1001", "limit"),
     ("?after=9223372036854775808", "after"), ("?cursor=3", "cursor")],
)
def test_bad_event_queries_are_422(client, auth, query, field):
    job_id = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    error = assert_error(events(client, auth, job_id, query), 422, "invalid_field")
    assert field in [detail["field"] for detail in error["details"]]


# --- adapters as models -----------------------------------------------------------------------


def test_base_models_are_listed_for_every_key(client, auth, app):
    response = client.get("/v1/models", headers=auth)
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "list"
    base = next(model for model in body["data"] if model["id"] == DEFAULT_MODEL_ID)
    assert (base["object"], base["kind"], base["context_length"]) == ("model", "base", 32768)
    assert base["base_model"] is None
    assert all(model["kind"] == "base" for model in body["data"])
    assert_error(client.get("/v1/models"), 401, "unauthenticated")


def test_an_adapter_is_listed_for_its_owner_only(client, auth, app):
    job_id = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    adapter_id = add_adapter(app, job_id)
    other, their_adapter = adapter_of_new_key(client, app)

    data = client.get("/v1/models", headers=auth).get_json()["data"]
    assert data[0]["id"] == DEFAULT_MODEL_ID  # base models first
    (mine,) = [model for model in data if model["kind"] == "adapter"]
    assert mine["id"] == adapter_id
    assert mine["object"] == "model"
    assert (mine["base_model"], mine["job_id"], mine["context_length"]) == (DEFAULT_MODEL_ID, job_id, 32768)
    assert mine["metrics"] == {"train_loss": 0.5}
    assert (mine["hyperparameters"], mine["size_bytes"]) == ({}, 10)
    assert mine["created_at"]
    assert their_adapter not in [model["id"] for model in data]

    theirs = model_ids(client, other)
    assert DEFAULT_MODEL_ID in theirs and their_adapter in theirs and adapter_id not in theirs
    assert model_ids(client, {"Authorization": f"Bearer {make_key(app)}"}) == [DEFAULT_MODEL_ID]


def test_adapters_are_listed_newest_first(client, auth, app):
    training = upload(client, auth)
    older = add_adapter(app, fine_tune(client, auth, training).get_json()["id"])
    newer = add_adapter(app, fine_tune(client, auth, training).get_json()["id"])
    assert model_ids(client, auth)[-2:] == [newer, older]


def test_deleting_an_adapter(client, auth, app, settings):
    adapter_id = add_adapter(app, fine_tune(client, auth, upload(client, auth)).get_json()["id"])
    folder = settings.storage_path / "adapters" / adapter_id / "attempt-1"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    other = {"Authorization": f"Bearer {make_key(app)}"}

    assert_error(client.delete(f"/v1/models/{adapter_id}", headers=other), 404, "not_found")
    assert folder.exists() and adapter_id in model_ids(client, auth)
    error = assert_error(client.delete(f"/v1/models/{DEFAULT_MODEL_ID}", headers=auth), 422, "invalid_field")
    assert error["details"][0]["field"] == "model_id"
    assert_error(client.delete("/v1/models/ft-nothing", headers=auth), 404, "not_found")
    assert_error(client.delete("/v1/models/ft-%00x", headers=auth), 404, "not_found")
    assert_error(client.delete(f"/v1/models/{adapter_id}"), 401, "unauthenticated")

    response = client.delete(f"/v1/models/{adapter_id}", headers=auth)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"id": adapter_id, "object": "model", "deleted": True}
    assert adapter_id not in model_ids(client, auth)
    with app.extensions["gemma_jobs"].db.session_scope(read_only=True) as session:
        row = session.get(Adapter, adapter_id)
        assert row is not None and row.deleted_at is not None
    assert not (settings.storage_path / "adapters" / adapter_id).exists()
    assert_error(client.delete(f"/v1/models/{adapter_id}", headers=auth), 404, "not_found")


def test_generations_on_adapters(client, auth, app, redis_client):
    adapter_id = add_adapter(app, fine_tune(client, auth, upload(client, auth)).get_json()["id"])
    _, their_adapter = adapter_of_new_key(client, app)
    doomed = add_adapter(app, fine_tune(client, auth, upload(client, auth)).get_json()["id"])
    assert client.delete(f"/v1/models/{doomed}", headers=auth).status_code == 200
    redis_client.delete(GEN_QUEUE)

    for model in (doomed, their_adapter, "ft-nothing", "ft-\x00x"):
        error = assert_error(submit(client, auth, model=model), 404, "not_found")
        assert "GET /v1/models" in error["message"]
    assert redis_client.llen(GEN_QUEUE) == 0

    response = submit(client, auth, model=adapter_id)
    assert response.status_code == 202, response.get_data(as_text=True)
    job = response.get_json()
    assert (job["kind"], job["model"], job["adapter_id"]) == ("generation", adapter_id, adapter_id)
    row = job_row(app, job["id"])
    assert (row.queue, row.model, row.adapter_id) == (GEN_QUEUE, adapter_id, adapter_id)
    assert row.params["base_model"] == DEFAULT_MODEL_ID
    assert queued_ids(redis_client, GEN_QUEUE) == [job["id"]]
    # /metrics (no key needed) counts it under its base model, never by the adapter's id.
    page = client.get("/metrics").get_data(as_text=True)
    assert f'kind="generation",model="{DEFAULT_MODEL_ID}"' in page and adapter_id not in page
    # A generation on the base model carries no adapter.
    plain = submit(client, auth).get_json()
    assert plain["adapter_id"] is None
    assert "base_model" not in job_row(app, plain["id"]).params


def test_a_fine_tune_shows_its_adapter_id_only_once_it_succeeded(client, auth, app):
    cancelled = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    assert client.post(f"/v1/jobs/{cancelled}/cancel", headers=auth).get_json()["adapter_id"] is None
    finished = fine_tune(client, auth, upload(client, auth)).get_json()["id"]
    adapter_id = add_adapter(app, finished)
    with app.extensions["gemma_jobs"].db.session_scope() as session:
        session.get(Job, finished).status = "succeeded"  # as the worker's finish writes it
    assert client.get(f"/v1/jobs/{finished}", headers=auth).get_json()["adapter_id"] == adapter_id
    listed = client.get("/v1/jobs?kind=fine_tune", headers=auth).get_json()["data"]
    assert {job["id"]: job["adapter_id"] for job in listed} == {finished: adapter_id, cancelled: None}


def test_a_retried_fine_tune_with_its_idempotency_key_is_the_same_job(client, app, redis_client):
    """The key was ignored: a client's retry after a timeout trained, and was charged, twice."""
    headers = key_headers(app, max_concurrent=1)
    training = upload(client, headers)
    keyed = {**headers, "Idempotency-Key": "train-once"}
    first = fine_tune(client, keyed, training, suffix="once")
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers
    again = fine_tune(client, keyed, training, suffix="once")  # its key's only slot is the first job's
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["id"] == first.get_json()["id"]
    assert queued_ids(redis_client, FT_QUEUE) == [first.get_json()["id"]]
    error = assert_error(fine_tune(client, keyed, training, suffix="other"), 409, "idempotency_key_reused")
    assert first.get_json()["id"] in error["message"]
    # The key names one request of any kind: a generation with it is another body.
    assert_error(submit(client, keyed), 409, "idempotency_key_reused")
    assert_error(fine_tune(client, {**headers, "Idempotency-Key": ""}, training), 422, "invalid_field")


def test_concurrent_retries_of_a_fine_tune_make_one_job(app, redis_client):
    headers = key_headers(app, max_concurrent=1)
    training = upload(app.test_client(), headers)
    keyed = {**headers, "Idempotency-Key": "train-race"}
    results = answers_at_once(lambda: fine_tune(app.test_client(), keyed, training), 6)
    assert {status for status, _ in results} == {202}, results
    assert len({job_id for _, job_id in results}) == 1
    assert queued_ids(redis_client, FT_QUEUE) == [results[0][1]]
