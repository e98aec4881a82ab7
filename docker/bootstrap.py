"""Start-up steps of the containers in ``docker/``, run by their entry points before Airflow or MLflow.

``python bootstrap.py check-env``
    Refuse to start while an environment value still holds a placeholder from ``docker/.env.example``
    (``change-me...``); only the variable names are printed, never the values.
``python bootstrap.py airflow``
    ``check-env``, then write the project's configuration ``$MLOPS_PARAMS`` (in the shared project volume)
    from the ``params.yaml`` baked into the image (``$MLOPS_PARAMS_SOURCE``), with ``version.remote``
    replaced by ``$MLOPS_DVC_REMOTE`` when that is set (``s3://mlops-data/dvc`` in ``docker/compose.yaml``).
    When ``$AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE`` and ``$AIRFLOW_ADMIN_PASSWORD`` are set
    (the API server only), also write the Simple auth manager's password file for
    ``$AIRFLOW_ADMIN_USERNAME``, so the admin password comes from ``docker/.env`` and is never generated.

The MLflow container runs ``check-env``, then ``mlflow/start-server.sh``, the project's one MLflow
launcher (it renders MLflow's basic-auth file itself). The containers without Python (PostgreSQL, Redis,
the S3 store and its set-up) refuse placeholders with ``docker/check-env.sh``, the same rule in shell.

Standard library only, except PyYAML for ``airflow`` (a locked dependency of the project). Every file is
written to a temporary file beside its target, then renamed into place: several containers start at once
and share the project volume, and a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLACEHOLDER = "change-me"
"""Marker of every placeholder value in ``docker/.env.example``."""

DEFAULT_PARAMS_SOURCE = "/opt/mlops-image/params.yaml"
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h


class BootstrapError(Exception):
    """A setting is missing or wrong; the container must not start."""


def placeholder_variables(environ: Mapping[str, str]) -> list[str]:
    """Names of the variables whose value still contains the ``.env.example`` placeholder."""
    return sorted(name for name, value in environ.items() if PLACEHOLDER in value)


def check_env(environ: Mapping[str, str]) -> None:
    """Raise :class:`BootstrapError` naming every variable that still holds a placeholder."""
    names = placeholder_variables(environ)
    if names:
        raise BootstrapError(
            f"placeholder values from docker/.env.example are still set in: {', '.join(names)}; "
            "put real secrets in docker/.env (see docker/README.md)"
        )


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def render_params(source: Path, target: Path, dvc_remote: str | None = None) -> dict[str, Any]:
    """Write ``target`` from ``source`` with ``version.remote`` set to ``dvc_remote`` (if given); return it."""
    import yaml

    try:
        document = yaml.safe_load(source.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise BootstrapError(f"{source}: cannot read the image's params.yaml: {error}") from None
    if not isinstance(document, dict):
        raise BootstrapError(f"{source}: the top level must be a mapping of sections")
    remote = (dvc_remote or "").strip()
    if remote:
        version = document.setdefault("version", {})
        if not isinstance(version, dict):
            raise BootstrapError(f"{source}: the `version` section must be a mapping")
        version["remote"] = remote
    header = (
        f"# Generated at container start by docker/bootstrap.py from {source}\n"
        "# (the repository's params.yaml, baked into the image); version.remote from $MLOPS_DVC_REMOTE.\n"
        "# Edit params.yaml in the repository and rebuild the images: this file is rewritten at every start.\n"
    )
    body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, default_flow_style=False)
    write_atomic(target, header + body)
    return document


def write_password_file(path: Path, username: str, password: str) -> None:
    """Write the Simple auth manager's password file: ``{"username": "password"}``, readable by its owner."""
    if not username or not password:
        raise BootstrapError("the Airflow admin username and password must not be empty")
    write_atomic(path, json.dumps({username: password}) + "\n", mode=0o600)


def bootstrap_airflow(environ: Mapping[str, str]) -> list[str]:
    """The ``airflow`` command; return what was done, one line per file written."""
    check_env(environ)
    done = []
    target = environ.get("MLOPS_PARAMS", "").strip()
    if not target:
        raise BootstrapError("MLOPS_PARAMS is not set: it names the project's params.yaml inside the container")
    source = Path(environ.get("MLOPS_PARAMS_SOURCE", DEFAULT_PARAMS_SOURCE))
    remote = environ.get("MLOPS_DVC_REMOTE")
    render_params(source, Path(target), remote)
    done.append(f"wrote {target} (version.remote: {remote.strip() if remote and remote.strip() else 'as built'})")
    password_file = environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "").strip()
    password = environ.get("AIRFLOW_ADMIN_PASSWORD", "")
    if password_file and password:
        username = environ.get("AIRFLOW_ADMIN_USERNAME", "admin").strip() or "admin"
        write_password_file(Path(password_file), username, password)
        done.append(f"wrote the password of Airflow user {username!r} to {password_file}")
    return done


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Command line entry point; return the exit status."""
    parser = argparse.ArgumentParser(description="start-up steps of the containers in docker/")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-env", help="refuse placeholder values from .env.example")
    commands.add_parser("airflow", help="check-env, write $MLOPS_PARAMS and the Airflow admin password file")
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        if args.command == "check-env":
            check_env(env)
        else:
            for line in bootstrap_airflow(env):
                print(f"bootstrap: {line}", flush=True)
    except BootstrapError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
