"""The team MLflow server's secrets: ``mlflow/start-server.sh`` started for real, then stopped.

PostgreSQL backend (a throw-away database on 127.0.0.1; its trust authentication accepts the fake
password in the URI), artifacts on moto's S3 server, basic auth. While the server runs, no command line
on the machine holds the database or the admin password; on SIGTERM to the script, the server stops,
the rendered auth file is removed and nothing of the process group is left.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, free_port, postgres_databases, wait_http

pytestmark = pytest.mark.slow


def command_lines() -> dict[int, str]:
    """The command line of every process on the machine, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # the process ended while we looked
    return found


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def status_of(url: str, authorization: str | None = None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_no_secret_on_a_command_line_and_the_auth_file_goes_with_the_server(s3_endpoint: str, tmp_path: Path) -> None:
    db_password = "db-" + secrets.token_hex(10)
    admin_password = "admin-" + secrets.token_hex(10)
    port = free_port()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    with postgres_databases("secrets") as names:
        env = {
            **os.environ,
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg2://postgres:{db_password}@127.0.0.1:5432/{names['secrets']}",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://mlops-data/mlflow",
            "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_PORT": str(port),
            "MLFLOW_WORKERS": "1",
            "MLFLOW_BIN": str(REPO_ROOT / ".venv" / "bin" / "mlflow"),
            "MLFLOW_AUTH": "basic",
            "MLFLOW_ADMIN_USERNAME": "admin",
            "MLFLOW_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "TMPDIR": str(temporary),
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        log_path = tmp_path / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(REPO_ROOT / "mlflow" / "start-server.sh")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", 180, "the MLflow server", process)
            rendered = sorted(temporary.glob("mlflow-auth-*.ini"))
            assert len(rendered) == 1, f"one auth file is rendered while the server runs: {rendered}"
            assert stat.S_IMODE(rendered[0].stat().st_mode) == 0o600, "the auth file is readable by its owner only"
            search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
            token = base64.b64encode(f"admin:{admin_password}".encode()).decode()
            assert status_of(search) == 401, "basic auth is on: no answer without a login"
            assert status_of(search, f"Basic {token}") == 200, "the admin account from the environment logs in"

            lines = command_lines()
            ours = {pid: line for pid, line in lines.items() if _pgid(pid) == process.pid}
            assert any("mlflow" in line for line in ours.values()), f"the server's processes are found: {ours}"
            leaks = {pid: line for pid, line in lines.items() if db_password in line or admin_password in line}
            assert leaks == {}, f"a password is on a command line (visible in ps): {leaks}"
            log_text = log_path.read_text(encoding="utf-8", errors="replace")
            assert db_password not in log_text, "the database password is not in the server's output"
            assert admin_password not in log_text, "the admin password is not in the server's output"

            process.send_signal(signal.SIGTERM)  # to the script alone: it passes the signal on to the server
            status = process.wait(timeout=60)
            assert status in (0, -signal.SIGTERM, 128 + signal.SIGTERM), f"the server stopped on SIGTERM: {status}"
            assert not rendered[0].exists(), "the rendered auth file is removed when the server stops"
            deadline = time.monotonic() + 30
            while group_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.5)
            left = {pid: line for pid, line in command_lines().items() if _pgid(pid) == process.pid}
            assert not group_alive(process.pid), f"every process of the server's group has exited: {left}"
        finally:
            if group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is None:
                process.wait(timeout=30)


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1
