"""Fixtures for the integration tests: the gateway app, and a worker's runtime, on a real
database and Redis."""

from __future__ import annotations

import pytest

from services.gateway import create_app
from tests.integration.helpers import make_key


@pytest.fixture()
def app(settings, redis_client):
    """The gateway app on the test database and an empty Redis db."""
    application = create_app(settings)
    yield application
    application.extensions["gemma_jobs"].db.dispose()


@pytest.fixture()
def client(app):
    return app.test_client()


@pytest.fixture()
def auth(app) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(app)}"}


@pytest.fixture()
def rt(settings, redis_client):
    """A CPU worker's runtime (no model loaded), with its result writer process."""
    import torch  # here, not at the top: the gateway's tests must run without torch imported

    from workers.runtime import WorkerRuntime

    runtime = WorkerRuntime.create(settings, torch.device("cpu"))
    yield runtime
    runtime.results.close()
    runtime.db.dispose()
