"""Helpers of the tests that run Airflow as services: free ports, HTTP waits, PostgreSQL databases, REST API."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PG = "postgres@127.0.0.1:5432"
RUN_TIMEOUT = 1200.0


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def wait_http(url: str, timeout: float, what: str, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what} exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status < 500:
                    return
        except urllib.error.HTTPError as error:
            if error.code < 500:
                return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{what} did not answer on {url} within {timeout:.0f} s")


@contextmanager
def postgres_databases(*purposes: str) -> Iterator[dict[str, str]]:
    """Fresh PostgreSQL databases on 127.0.0.1 (trust auth), one per purpose, dropped afterwards."""
    import psycopg2

    suffix = secrets.token_hex(4)
    names = {purpose: f"mlops_it_{purpose}_{suffix}" for purpose in purposes}
    connection = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        for name in names.values():
            cursor.execute(f"CREATE DATABASE {name}")
    try:
        yield names
    finally:
        with connection.cursor() as cursor:
            for name in names.values():
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        connection.close()


class Api:
    """A small client of the Airflow REST API with a bearer token from the simple auth manager."""

    def __init__(self, base_url: str, airflow_home: Path) -> None:
        self.base_url = base_url
        passwords = json.loads((airflow_home / "simple_auth_manager_passwords.json.generated").read_text())
        reply = self.request("POST", "/auth/token", {"username": "admin", "password": passwords["admin"]}, auth=False)
        self.token = str(reply["access_token"])

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, auth: bool = True) -> Any:
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.request("GET", f"/api/v2/dags/{dag_id}")
                return
            except urllib.error.HTTPError:
                time.sleep(3)
        raise AssertionError(f"DAG {dag_id} was not parsed within {timeout:.0f} s")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Trigger a run once the DAG is parsed; return its run id."""
        self.wait_for_dag(dag_id)
        created = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})
        return str(created["dag_run_id"])

    def run(self, dag_id: str, conf: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
        """Trigger a run, wait for it to finish; return its state and its task instances by task id."""
        return self.wait_for_run(dag_id, self.trigger(dag_id, conf))

    def wait_for_run(self, dag_id: str, run_id: str) -> tuple[str, dict[str, dict[str, Any]]]:
        """Wait for a run to finish; return its state and its task instances by task id."""
        deadline = time.monotonic() + RUN_TIMEOUT
        state = "queued"
        while time.monotonic() < deadline:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in ("success", "failed"):
                break
            time.sleep(5)
        instances = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return state, {item["task_id"]: item for item in instances}
