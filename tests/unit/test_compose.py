"""compose.yaml is valid for docker-compose and wires the production stack as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config() -> dict:
    """The file as `docker-compose config` resolves it (anchors, defaults, validation)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("GEMMA_JOBS_REQUIRE_COMPOSE"):
            pytest.fail("docker-compose is not installed (Debian package docker-compose)")
        pytest.skip("docker-compose is not installed (Debian package docker-compose); .ci/run installs it")
    result = subprocess.run(
        [binary, "-f", str(ROOT / "compose.yaml"), "config"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_services_volumes_and_the_one_shot_migrate(config):
    services = config["services"]
    assert {"redis", "postgres", "migrate", "gateway", "worker-gpu0", "worker-gpu1"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    assert _targets(services["redis"]) == ["/data"]
    assert _targets(services["postgres"]) == ["/var/lib/postgresql/data"]
    assert services["migrate"]["command"] == ["gemma-jobs", "migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in ("gateway", "worker-gpu0", "worker-gpu1"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["DATABASE_URL"].startswith("postgresql://")
        assert services[name]["environment"]["GEMMA_JOBS_STORAGE_DIR"] == "/storage"


def _targets(service: dict) -> list[str]:
    """Mount points of a service's volumes, in the short ("name:/path:rw") or long form."""
    return [volume.split(":")[1] if isinstance(volume, str) else volume["target"] for volume in service["volumes"]]


def test_gateway_is_health_checked_on_readyz(config):
    gateway = config["services"]["gateway"]
    assert gateway["command"][:2] == ["gemma-jobs", "gateway"]
    assert any("/readyz" in part for part in gateway["healthcheck"]["test"])


def test_one_worker_per_gpu_by_device_reservation(config):
    workers = {name: service for name, service in config["services"].items() if name.startswith("worker-")}
    reserved = []
    for service in workers.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        reserved += device["device_ids"]
        # The container sees only its GPU, as index 0.
        assert service["command"][:4] == ["gemma-jobs", "worker", "--gpu", "0"]
    assert sorted(reserved) == ["0", "1"]


def test_dockerfiles_exist_and_only_the_worker_gets_cuda_torch():
    gateway = (ROOT / "docker" / "gateway.Dockerfile").read_text()
    worker = (ROOT / "docker" / "worker.Dockerfile").read_text()
    assert 'pip install .' in gateway and "[worker" not in gateway
    assert "cuda" in worker.split("\n", 2)[1].lower() and '".[worker,cuda]"' in worker
    # The image's own CUDA torch is kept: unpinned, pip swapped in a build for a newer CUDA.
    assert "--constraint /tmp/keep-torch.txt" in worker and 'version("torch")' in worker
    # Both images own the volumes' mount points: the first to mount an empty volume gives its owner.
    for image in (gateway, worker):
        assert "mkdir -p /data /models /storage" in image and "chown gemma /data /models /storage" in image


def test_postgres_is_healthy_only_once_it_takes_tcp_connections(config):
    # Without -h, pg_isready passed on the init server's socket, before migrate's TCP could connect.
    check = config["services"]["postgres"]["healthcheck"]["test"]
    assert check[check.index("-h") + 1] == "127.0.0.1"
