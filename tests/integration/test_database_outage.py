"""A gateway process while its database cannot be reached (real Redis, a PostgreSQL URL on a
closed port): it starts (gunicorn shut the whole gateway down when a worker replaced during an
outage could not boot), says it is not ready, and still serves its metrics."""

from __future__ import annotations

from structlog.testing import capture_logs

from services.gateway import create_app
from shared.settings import load_settings

UNREACHABLE = "postgresql://gemma@127.0.0.1:1/gemma_jobs"


def test_a_gateway_process_starts_and_serves_metrics_while_the_database_is_down(tmp_path, redis_url, redis_client):
    settings = load_settings(database_url=UNREACHABLE, redis_url=redis_url, data_dir=tmp_path / "var")
    with capture_logs() as logs:
        app = create_app(settings)
    assert [entry["event"] for entry in logs if entry["event"] == "schema_not_checked"] == ["schema_not_checked"]
    client = app.test_client()
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["error"]["code"] == "not_ready"
    page = client.get("/metrics")
    assert page.status_code == 200
    assert "gemma_jobs_database_up 0.0" in page.text
    assert 'gemma_jobs_http_requests_total{method="GET",route="/readyz",status="503"}' in page.text
    app.extensions["gemma_jobs"].db.dispose()


def test_the_metrics_say_when_the_database_is_up(client):
    assert "gemma_jobs_database_up 1.0" in client.get("/metrics").text
