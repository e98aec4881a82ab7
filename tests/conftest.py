"""Shared fixtures: a throw-away project folder with its own params.yaml, and a local S3 endpoint.

Helpers (tiny images, sources, service helpers) live in ``tests/support.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipelines.project import Project
from tests.support import free_port, write_params


@pytest.fixture
def tiny_project(tmp_path: Path) -> Callable[..., Project]:
    """Factory: ``tiny_project(overrides=None)`` writes params.yaml in a fresh folder and loads it."""

    def factory(overrides: dict[str, dict[str, Any]] | None = None) -> Project:
        root = tmp_path / "project"
        root.mkdir(exist_ok=True)
        return Project.load(write_params(root, overrides))

    return factory


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with a ``mlops-data`` bucket; dummy credentials in the environment."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="mlops-data")
    try:
        yield endpoint
    finally:
        server.stop()
