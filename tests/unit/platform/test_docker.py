"""Structural tests of the container deployment in ``docker/`` (no Docker engine needed, no network).

No Docker engine runs on the development and CI machines, so nothing here builds an image or starts a
container. Instead: the compose file is validated against the Compose Specification schema (vendored in
``tests/schemas/``) before and after interpolation, and checked for consistency (references,
healthchecks, the GPU reservation, secrets only from ``.env``); the Dockerfiles are parsed for their base
images, users and use of the lock; and the scripts the containers run at start-up are run here, against
the real ``params.yaml`` and configuration loader, with stand-ins for the programs they hand over to.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from pipelines.config import load_config
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
SCHEMA_FILE = ROOT / "tests" / "schemas" / "compose-spec.json"
DOCKERFILES = ("airflow.Dockerfile", "trainer.Dockerfile", "mlflow.Dockerfile")

AIRFLOW_BASE = "apache/airflow:3.3.2-python3.11"
EXPECTED_SERVICES = {
    "postgres",
    "redis",
    "s3",
    "s3-init",
    "mlflow",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "trainer-gpu",
    "serving",
}
ONE_SHOT_SERVICES = {"s3-init", "airflow-init"}
EXPECTED_VOLUMES = {"postgres-data", "s3-data", "airflow-logs", "mlops-project"}

# Environment variable names whose value is a credential: it must come from .env, and be required.
KEY_LIKE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|FERNET|KEY")
# Of those, the secrets proper (not identifiers such as an access key id): placeholders in .env.example.
SECRET_LIKE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|FERNET|_KEY$")
REQUIRED_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?[^}]+\}")
# Compose interpolation: `$$` is a literal `$`; `${NAME}`, `${NAME:-default}`, `${NAME-default}`,
# `${NAME:?error}`, `${NAME?error}` and `$NAME` are substituted.
INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


# ------------------------------------------------------------------------------------------ helpers


class InterpolationError(Exception):
    """A required variable is missing, as `docker compose` would report it."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Substitute variables in ``text`` the way Compose does."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        value = env.get(name)
        if op in (":-", ":?"):
            missing = not value
        elif op in ("-", "?"):
            missing = value is None
        else:
            return value or ""
        if not missing:
            return value or ""
        if op.endswith("?"):
            raise InterpolationError(f"required variable {name} is missing a value: {arg}")
        return arg

    return INTERPOLATION.sub(substitute, text)


def interpolate_document(node: Any, env: Mapping[str, str]) -> Any:
    """``node`` with every string value interpolated (keys are left as they are, as in Compose)."""
    if isinstance(node, dict):
        return {key: interpolate_document(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_document(value, env) for value in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML document."""
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def references(text: str) -> Iterator[tuple[str, str | None]]:
    """(name, operator) of every variable reference in ``text``; escaped ``$$`` is skipped."""
    for match in INTERPOLATION.finditer(text):
        if match.group(0) != "$$":
            yield (match.group("name") or match.group("bare"), match.group("op"))


@cache
def compose() -> dict[str, Any]:
    """The parsed compose file (YAML anchors and merge keys resolved)."""
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict), f"{COMPOSE_FILE}: the top level must be a mapping"
    return document


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (the list form ``KEY=VALUE`` too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def airflow_services() -> dict[str, dict[str, Any]]:
    """The services that run Airflow (they carry its executor setting)."""
    return {name: svc for name, svc in services().items() if "AIRFLOW__CORE__EXECUTOR" in environment(svc)}


@cache
def env_example() -> dict[str, str]:
    """The variables defined in ``docker/.env.example``."""
    values = {}
    for number, raw in enumerate(ENV_EXAMPLE.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert "=" in line, f"{ENV_EXAMPLE}:{number}: not a KEY=VALUE line: {raw!r}"
        key, value = line.split("=", 1)
        assert key not in values, f"{ENV_EXAMPLE}:{number}: {key} is defined twice"
        values[key] = value
    return values


@cache
def schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def schema_errors(document: Any) -> list[str]:
    return [
        f"{'/'.join(str(part) for part in error.absolute_path) or '(top)'}: {error.message}"
        for error in schema_validator().iter_errors(document)
    ]


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / name).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
    assert not pending, f"{name}: ends inside a continued line"
    return instructions


def image_reference(from_arguments: str) -> tuple[str, str | None]:
    """(image, stage name) of a FROM instruction's arguments."""
    words = [word for word in from_arguments.split() if not word.startswith("--")]
    stage = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
    return words[0], stage


def env_settings(name: str) -> dict[str, str]:
    """Every variable an ENV instruction of the Dockerfile sets (the last one wins)."""
    settings = {}
    for keyword, arguments in dockerfile_instructions(name):
        if keyword == "ENV":
            for word in arguments.split():
                key, _, value = word.partition("=")
                settings[key] = value
    return settings


def copy_instructions(name: str) -> list[tuple[list[str], list[str], str]]:
    """(flags, sources, destination) of every COPY instruction."""
    copies = []
    for keyword, arguments in dockerfile_instructions(name):
        if keyword == "COPY":
            words = arguments.split()
            flags = [word for word in words if word.startswith("--")]
            paths = [word for word in words if not word.startswith("--")]
            copies.append((flags, paths[:-1], paths[-1]))
    return copies


def shared_blocks(name: str) -> dict[str, str]:
    """The ``# [shared:NAME] begin`` ... ``# [shared:NAME] end`` blocks of a Dockerfile."""
    text = (DOCKER / name).read_text(encoding="utf-8")
    pattern = re.compile(
        r"^# \[shared:(?P<name>[a-z]+)\] begin\n(?P<body>.*?)^# \[shared:(?P=name)\] end$", re.M | re.S
    )
    return {match.group("name"): match.group("body") for match in pattern.finditer(text)}


def dockerignore_includes(ignore_file: Path, path: str) -> bool:
    """Whether ``path`` (relative to the build context) is sent, by Docker's .dockerignore rules."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**", index):
                out += ".*"
                index += 2
            elif pattern[index] == "*":
                out += "[^/]*"
                index += 1
            elif pattern[index] == "?":
                out += "[^/]"
                index += 1
            else:
                out += re.escape(pattern[index])
                index += 1
        return re.compile(out + r"\Z")

    parts = path.split("/")
    candidates = ["/".join(parts[: length + 1]) for length in range(len(parts))]
    included = True
    for raw in ignore_file.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = to_regex(line.lstrip("!").strip().strip("/"))
        if any(pattern.match(candidate) for candidate in candidates):
            included = negated
    return included


def load_script(name: str) -> ModuleType:
    """Import ``docker/<name>.py`` under a private module name (``docker`` is also a PyPI package)."""
    spec = importlib.util.spec_from_file_location(f"_mlops_docker_{name}", DOCKER / f"{name}.py")
    assert spec is not None, f"cannot load docker/{name}.py"
    assert spec.loader is not None, f"cannot load docker/{name}.py"
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fake_program(folder: Path, name: str, body: str) -> None:
    """A stand-in executable ``folder/name`` (a shell script)."""
    program = folder / name
    program.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    program.chmod(0o755)


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A minimal environment for running an entry point: a ``python`` that is this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_program(bin_dir, "python", f'exec "{sys.executable}" "$@"')
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path), **extra}


# ------------------------------------------------------------------------------------ compose: shape


def test_compose_parses_without_version_key() -> None:
    document = compose()
    assert "version" not in document, "the Compose Specification has no top-level `version:` key"
    assert set(document) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        key for key in document if key.startswith("x-")
    }, f"unexpected top-level keys: {sorted(document)}"
    assert "x-airflow-common" in document, "the Airflow services share an `x-airflow-common` anchor"


def test_compose_validates_against_compose_spec_schema() -> None:
    errors = schema_errors(compose())
    assert not errors, "compose.yaml does not validate against tests/schemas/compose-spec.json:\n" + "\n".join(errors)


def test_compose_validates_after_interpolation_with_env_example() -> None:
    resolved = interpolate_document(compose(), env_example())
    errors = schema_errors(resolved)
    assert not errors, "compose.yaml interpolated with .env.example does not validate:\n" + "\n".join(errors)
    malformed = [text for text in strings(compose()) if "$" in INTERPOLATION.sub("", text)]
    assert not malformed, f"a `$` that is neither `$$` nor a well-formed reference: {malformed}"


def test_schema_validation_catches_mistakes() -> None:
    broken = json.loads(json.dumps(compose()))
    broken["services"]["postgres"]["helthcheck"] = broken["services"]["postgres"].pop("healthcheck")
    broken["services"]["airflow-worker"]["depends_on"]["postgres"]["condition"] = "service_ready"
    errors = schema_errors(broken)
    assert len(errors) >= 2, f"the schema should reject a misspelt key and an unknown condition, got {errors}"


def test_expected_services_exist() -> None:
    assert set(services()) == EXPECTED_SERVICES, (
        f"services differ: missing {sorted(EXPECTED_SERVICES - set(services()))}, "
        f"unexpected {sorted(set(services()) - EXPECTED_SERVICES)}"
    )


def test_depends_on_references_existing_services_with_fitting_conditions() -> None:
    names = set(services())
    for name, service in services().items():
        depends_on = service.get("depends_on") or {}
        assert isinstance(depends_on, dict), f"{name}: depends_on must name a condition for each dependency"
        for dependency, settings in depends_on.items():
            assert dependency in names, f"{name} depends on {dependency!r}, which is not a service"
            assert dependency != name, f"{name} depends on itself"
            expected = "service_completed_successfully" if dependency in ONE_SHOT_SERVICES else "service_healthy"
            assert settings.get("condition") == expected, (
                f"{name} -> {dependency}: condition {settings.get('condition')!r}, expected {expected!r}"
            )


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, service in services().items():
        if name in ONE_SHOT_SERVICES:
            assert service.get("restart") == "no", f"{name} is a one-shot: it must not be restarted"
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test"), f"{name} runs for good and has no healthcheck"
        assert not check.get("disable"), f"{name}: its healthcheck is disabled"
        assert service.get("restart") == "unless-stopped", f"{name}: restart should be unless-stopped"


def test_gpu_trainer_reserves_nvidia_gpus() -> None:
    devices = services()["trainer-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1, f"trainer-gpu should reserve one device request, got {devices}"
    device = devices[0]
    assert device.get("driver") == "nvidia", f"GPU driver should be nvidia, got {device.get('driver')!r}"
    assert device.get("capabilities") == ["gpu"], f"capabilities should be [gpu], got {device.get('capabilities')}"
    assert device.get("count") == "${GPU_COUNT:-all}", f"count should be ${{GPU_COUNT:-all}}, got {device.get('count')}"
    for name, service in services().items():
        if name != "trainer-gpu":
            assert "deploy" not in service, f"{name} should not reserve devices: only the trainer needs a GPU"


def test_named_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(compose().get("volumes") or {})
    assert declared == EXPECTED_VOLUMES, f"declared volumes {sorted(declared)}, expected {sorted(EXPECTED_VOLUMES)}"
    used = set()
    for name, service in services().items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (DOCKER / source).is_file(), f"{name}: bind-mounted {source} does not exist in docker/"
            else:
                assert source in declared, f"{name} uses volume {source!r}, which is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {sorted(declared - used)}"


def test_images_are_pinned() -> None:
    for name, service in services().items():
        if "build" in service:
            assert service.get("image", "").endswith(":${MLOPS_IMAGE_TAG:-local}"), (
                f"{name}: a built image is tagged mlops-...:${{MLOPS_IMAGE_TAG:-local}}"
            )
            continue
        image = service.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned (latest)"
        assert "$" not in tag, f"{name}: image {image!r}: write the pinned tag, not a variable"


def test_builds_use_the_repository_root_and_existing_dockerfiles() -> None:
    built = {name: service["build"] for name, service in services().items() if "build" in service}
    assert {build["dockerfile"] for build in built.values()} == {f"docker/{name}" for name in DOCKERFILES}, (
        f"every Dockerfile is built by some service: {built}"
    )
    for name, build in built.items():
        assert build["context"] == "..", f"{name}: the build context is the repository root (.. from docker/)"
        assert (DOCKER / build["context"] / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} is missing"


def test_published_ports_bind_to_bind_address() -> None:
    for name, service in services().items():
        for port in service.get("ports") or []:
            assert isinstance(port, str), f"{name}: write port {port!r} as HOST_IP:HOST_PORT:CONTAINER_PORT"
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), (
                f"{name}: port {port!r} should be published on ${{BIND_ADDRESS:-127.0.0.1}} (this machine by default)"
            )


# ---------------------------------------------------------------------------------- compose: secrets


def test_key_like_env_values_are_required_env_references() -> None:
    for name, service in services().items():
        for key, value in environment(service).items():
            if not KEY_LIKE.search(key) or key.endswith("_FILE"):
                continue
            match = REQUIRED_REFERENCE.fullmatch(value)
            assert match, f"{name}: {key} must be a required reference ${{VAR:?message}} to .env, not {value!r}"
            assert match.group("name") in env_example(), f"{name}: {key} refers to {match.group('name')}, not in .env"


def test_urls_carry_no_literal_credentials() -> None:
    url = re.compile(r"[a-z][a-z0-9+.-]*://(?P<userinfo>[^/@\s]*)@")
    for text in strings(compose()):
        masked = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?[^}]*\}", lambda m: f"<{m[1]}{m[2] or ''}>", text)
        for match in url.finditer(masked):
            _, _, password = match.group("userinfo").partition(":")
            assert re.fullmatch(r"<[A-Za-z_][A-Za-z0-9_]*:\?>", password), (
                f"credentials in {text!r}: the password must be a required reference ${{VAR:?...}}"
            )


def test_postgresql_urls_name_the_installed_driver() -> None:
    # SQLAlchemy 2.1 (uv.lock) maps a bare postgresql:// to psycopg 3, which the lock does not install.
    urls = [text for text in strings(compose()) if re.match(r"(db\+)?postgres(ql)?(\+\w+)?://", text)]
    assert len(urls) >= 3, f"expected Airflow's, Celery's and MLflow's database URLs, found {urls}"
    for url in urls:
        assert re.match(r"(db\+)?postgresql\+psycopg2://", url), f"name the psycopg2 driver explicitly: {url}"


def test_no_secret_has_a_default_value() -> None:
    for text in strings(compose()):
        for name, op in references(text):
            if SECRET_LIKE.search(name):
                assert op == ":?", f"{name} is a secret: reference it as ${{{name}:?...}}, not with {op!r}"


def test_env_example_defines_every_variable_compose_needs() -> None:
    referenced: dict[str, set[str | None]] = {}
    for text in strings(compose()):
        for name, op in references(text):
            referenced.setdefault(name, set()).add(op)
    without_default = {name for name, ops in referenced.items() if ops & {None, ":?", "?"}}
    missing = without_default - set(env_example())
    assert not missing, f".env.example lacks variables compose needs: {sorted(missing)}"
    undocumented = set(referenced) - set(env_example())
    assert not undocumented, f".env.example should document every variable compose reads: {sorted(undocumented)}"
    stale = {key for key in env_example() if key not in referenced and not key.startswith("COMPOSE_")}
    assert not stale, f".env.example defines variables compose never reads: {sorted(stale)}"


def test_env_example_secrets_are_placeholders() -> None:
    secrets = {key: value for key, value in env_example().items() if SECRET_LIKE.search(key)}
    assert len(secrets) >= 10, f"expected the stack's secrets in .env.example, found {sorted(secrets)}"
    for key, value in secrets.items():
        assert value.startswith("change-me"), f".env.example: {key} should be an obvious placeholder, not {value!r}"


def test_compose_refuses_to_start_without_a_secret() -> None:
    required = {name for text in strings(compose()) for name, op in references(text) if op == ":?"}
    secrets = {name for name in env_example() if SECRET_LIKE.search(name)}
    assert secrets <= required, f"secrets compose does not require: {sorted(secrets - required)}"
    for name in sorted(required):
        for env in ({k: v for k, v in env_example().items() if k != name}, {**env_example(), name: ""}):
            with pytest.raises(InterpolationError, match=name):
                interpolate_document(compose(), env)


def test_bootstrap_refuses_env_example_placeholders() -> None:
    bootstrap = load_script("bootstrap")
    flagged = set(bootstrap.placeholder_variables(env_example()))
    expected = {key for key, value in env_example().items() if value.startswith("change-me")}
    assert flagged == expected, f"check-env should flag every placeholder: flagged {sorted(flagged)}"
    resolved = interpolate_document(compose(), env_example())
    for name in ("airflow-apiserver", "mlflow"):
        flagged_here = bootstrap.placeholder_variables(environment(resolved["services"][name]))
        assert flagged_here, f"{name} started with .env.example as is should be refused"


# ---------------------------------------------------------------------------- compose: the pipeline


def test_airflow_services_share_the_common_settings() -> None:
    common = compose()["x-airflow-common"]
    expected = {
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "trainer-gpu",
    }
    assert set(airflow_services()) == expected, f"Airflow services: {sorted(airflow_services())}"
    for name, service in airflow_services().items():
        env = environment(service)
        for key, value in environment(common).items():
            assert env.get(key) == value, f"{name}: {key} differs from x-airflow-common"
        assert service.get("user") == "50000:0", f"{name}: run as the image's airflow user (50000:0)"
        assert set(service.get("volumes", [])) == set(common["volumes"]), f"{name}: volumes differ from the anchor"
        if name != "trainer-gpu":
            assert service.get("image") == common["image"], f"{name}: should run the Airflow image"
    env = environment(common)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", "the executor should be CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:${REDIS_PASSWORD:?"), "broker: Redis"
    assert env["AIRFLOW__CELERY__BROKER_URL"].endswith("@redis:6379/0"), "broker: redis://redis:6379/0"
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql+psycopg2://airflow:"), "results: PostgreSQL"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow"), "metadata DB: airflow"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-apiserver:8080/execution/", (
        "workers reach the task execution API on the API server"
    )
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", "runs go to the MLflow tracking server"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000", "DVC and ingest use the S3 store's endpoint"
    assert env["MLOPS_PARAMS"] == "/opt/mlops/params.yaml", "the project root is the shared /opt/mlops"
    assert env["MLOPS_DVC_REMOTE"] == "${MLOPS_DVC_REMOTE:-s3://mlops-data/dvc}", "DVC remote on S3"


def test_train_queue_is_gpu_for_airflow_services() -> None:
    for name, service in airflow_services().items():
        assert environment(service).get("MLOPS_TRAIN_QUEUE") == "gpu", f"{name}: MLOPS_TRAIN_QUEUE should be gpu"
    worker = services()["airflow-worker"]["command"]
    trainer = services()["trainer-gpu"]["command"]
    assert worker[:3] == ["airflow", "celery", "worker"], f"airflow-worker runs a Celery worker: {worker}"
    assert worker[worker.index("--queues") + 1] == "default", f"airflow-worker should serve the default queue: {worker}"
    assert trainer == ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"], (
        f"trainer-gpu should serve only the gpu queue, one task at a time: {trainer}"
    )


def test_airflow_init_migrates_and_creates_the_dvc_pool() -> None:
    script = " ".join(services()["airflow-init"]["command"])
    assert "airflow db migrate" in script, "airflow-init should migrate the metadata database"
    assert re.search(r"airflow pools set dvc 1 ", script), "airflow-init should create the dvc pool with 1 slot"
    assert "set -euo pipefail" in script, "airflow-init should stop at the first failing command"


def test_mlflow_service_settings() -> None:
    env = environment(services()["mlflow"])
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://mlflow:"), "MLflow's backend: PostgreSQL"
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow"), "MLflow's database is mlflow"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow-artifacts", "artifacts go to s3://mlflow-artifacts"
    assert env["MLFLOW_AUTH"] == "${MLFLOW_AUTH:-basic}", "basic auth is on unless .env says otherwise"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:9000", "MLflow's S3 client uses the S3 store"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"], "MLflow must accept the Host header mlflow:5000"


def test_postgres_creates_both_databases() -> None:
    service = services()["postgres"]
    assert service["image"] == "postgres:16", f"postgres image: {service['image']}"
    mounts = [volume for volume in service["volumes"] if volume.startswith("./")]
    assert mounts == [
        "./postgres-init.sh:/docker-entrypoint-initdb.d/10-mlops-databases.sh:ro",
        "./check-env.sh:/check-env.sh:ro",
    ], mounts
    script = (DOCKER / "postgres-init.sh").read_text(encoding="utf-8")
    for database in ("airflow", "mlflow"):
        assert f"CREATE DATABASE {database} OWNER {database};" in script, f"postgres-init.sh: no {database} database"
        assert f"CREATE ROLE {database} LOGIN PASSWORD :'" in script, f"postgres-init.sh: password of {database}"


def test_s3_init_creates_both_buckets() -> None:
    service = services()["s3-init"]
    assert service["image"].startswith("minio/mc:"), "s3-init uses the MinIO client"
    assert services()["s3"]["command"][:2] == ["server", "/data"], "the S3 store serves /data"
    script = (DOCKER / "s3-init.sh").read_text(encoding="utf-8")
    assert "for bucket in mlops-data mlflow-artifacts" in script, "s3-init.sh creates both buckets"
    assert "mc mb --ignore-existing" in script, "bucket creation must be idempotent"


# --------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_bases_are_pinned(name: str) -> None:
    stages: set[str] = set()
    for keyword, arguments in dockerfile_instructions(name):
        if keyword != "FROM":
            continue
        image, stage = image_reference(arguments)
        if image not in stages:
            assert "$" not in image, f"{name}: FROM {image}: write the pinned reference, not a variable"
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag, f"{name}: FROM {image} has no tag"
            assert tag != "latest", f"{name}: FROM {image} is not pinned (latest)"
        if stage:
            stages.add(stage)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_ends_as_non_root_user(name: str) -> None:
    keyword, arguments = dockerfile_instructions(name)[-1]
    assert keyword == "USER", f"{name}: the last instruction should be USER, got {keyword}"
    user = arguments.split(":")[0]
    assert user not in {"root", "0"}, f"{name}: the image must not run as root (USER {arguments})"


def test_dockerfile_final_stages_use_the_expected_bases() -> None:
    for name, expected in [
        ("airflow.Dockerfile", AIRFLOW_BASE),
        ("trainer.Dockerfile", AIRFLOW_BASE),
        ("mlflow.Dockerfile", "python:3.11-slim"),
    ]:
        froms = [
            image_reference(arguments)[0] for keyword, arguments in dockerfile_instructions(name) if keyword == "FROM"
        ]
        assert froms[-1] == expected, f"{name}: the final stage should be FROM {expected}, got {froms[-1]}"


def test_uv_version_matches_makefile() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    version = re.search(r"^UV_VERSION := (\S+)$", makefile, re.M)
    assert version, "the Makefile pins UV_VERSION"
    for name in DOCKERFILES:
        froms = [arguments for keyword, arguments in dockerfile_instructions(name) if keyword == "FROM"]
        assert f"ghcr.io/astral-sh/uv:{version.group(1)} AS uv" in froms, (
            f"{name}: use uv {version.group(1)} as the Makefile does (it reads this uv.lock)"
        )


@pytest.mark.parametrize("name", ["airflow.Dockerfile", "trainer.Dockerfile"])
def test_airflow_images_install_the_lock_and_copy_the_dags(name: str) -> None:
    runs = [arguments for keyword, arguments in dockerfile_instructions(name) if keyword == "RUN"]
    export = [run for run in runs if "uv export" in run]
    assert export, f"{name}: the lock should be exported with uv export"
    assert "--frozen" in export[0], f"{name}: export uv.lock with --frozen (no re-resolution)"
    assert "--no-dev" in export[0], f"{name}: the images need no development tools"
    assert "uv pip install --requirement /opt/mlops-image/requirements.txt" in export[0], (
        f"{name}: install the exported lock"
    )
    assert any("check_lock.py /opt/mlops-image/requirements.txt" in run for run in runs), (
        f"{name}: check the installed versions against the lock"
    )
    copies = {(tuple(sources), destination) for _, sources, destination in copy_instructions(name)}
    assert (("dags",), "/opt/airflow/dags") in copies, f"{name}: copy dags/ to /opt/airflow/dags"
    assert (("pyproject.toml", "uv.lock", "README.md"), "./") in copies, f"{name}: copy the lock before installing"
    env = env_settings(name)
    assert env.get("MLOPS_PARAMS") == "/opt/mlops/params.yaml", f"{name}: MLOPS_PARAMS=/opt/mlops/params.yaml"
    entrypoint = [arguments for keyword, arguments in dockerfile_instructions(name) if keyword == "ENTRYPOINT"]
    assert entrypoint == ['["/usr/bin/dumb-init", "--", "/usr/local/bin/mlops-entrypoint"]'], (
        f"{name}: keep the official image's dumb-init in front of the entry point"
    )


def test_airflow_and_trainer_images_share_their_install_steps() -> None:
    airflow, trainer = shared_blocks("airflow.Dockerfile"), shared_blocks("trainer.Dockerfile")
    assert set(airflow) == {"lock", "app"}, f"airflow.Dockerfile shared blocks: {sorted(airflow)}"
    assert set(trainer) == set(airflow), f"trainer.Dockerfile shared blocks: {sorted(trainer)}"
    for block, text in airflow.items():
        assert trainer[block] == text, f"the [shared:{block}] block differs between airflow and trainer Dockerfiles"


def test_trainer_adds_cuda_without_reinstalling_tensorflow() -> None:
    env = env_settings("trainer.Dockerfile")
    assert env.get("TF_USE_LEGACY_KERAS") == "1", "the trainer must set TF_USE_LEGACY_KERAS=1"
    runs = [arguments for keyword, arguments in dockerfile_instructions("trainer.Dockerfile") if keyword == "RUN"]
    cuda = [run for run in runs if "tensorflow[and-cuda]" in run]
    assert len(cuda) == 1, "the trainer installs TensorFlow's and-cuda extra once"
    assert "--constraint /opt/mlops-image/requirements.txt" in cuda[0], (
        "the CUDA wheels must be installed with the lock as constraints (tensorflow stays at its locked version)"
    )
    for run in runs:
        assert not re.search(r"--(force-)?reinstall|--upgrade\b|\s-U\s", run), f"trainer must not reinstall: {run}"
    cmd = [arguments for keyword, arguments in dockerfile_instructions("trainer.Dockerfile") if keyword == "CMD"]
    assert cmd == ['["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1"]'], (
        f"the trainer runs the Celery worker of the gpu queue: {cmd}"
    )


def test_mlflow_image_installs_locked_server() -> None:
    instructions = dockerfile_instructions("mlflow.Dockerfile")
    runs = [arguments for keyword, arguments in instructions if keyword == "RUN"]
    assert any("uv export --frozen" in run for run in runs), "the MLflow image exports uv.lock with --frozen"
    install = [run for run in runs if "uv pip install" in run]
    assert install, "the MLflow image installs the server with uv pip"
    assert "--constraint /opt/mlflow-image/requirements.txt" in install[0], "install with the lock as constraints"
    for package in ('"mlflow[auth]"', "psycopg2-binary", "boto3", "flask-wtf"):
        assert package in install[0], f"the MLflow image should install {package}"
    assert ("EXPOSE", "5000") in instructions, "the MLflow image exposes 5000"
    assert ("ENTRYPOINT", '["/usr/local/bin/mlflow-entrypoint"]') in instructions, "mlflow-entrypoint starts it"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_are_in_the_build_context(name: str) -> None:
    ignore_file = DOCKER / f"{name}.dockerignore"
    assert ignore_file.is_file(), f"{name}: the build context is the repository root; add {ignore_file.name}"
    for flags, sources, _ in copy_instructions(name):
        if any(flag.startswith("--from=") for flag in flags):
            continue
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"{name}: COPY {source}: no such file or folder in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" in relative:
                    continue
                assert dockerignore_includes(ignore_file, relative), f"{name}: {relative} is excluded from the context"
    for excluded in (".venv/bin/python", ".git/HEAD", "data/digits/manifest.csv", "artifacts/mlflow/mlflow.db"):
        assert not dockerignore_includes(ignore_file, excluded), f"{name}: {excluded} should stay out of the context"


def test_readme_explains_bring_up_and_validation_status() -> None:
    readme = (DOCKER / "README.md").read_text(encoding="utf-8")
    for text in (
        "cp docker/.env.example docker/.env",
        "docker compose -f docker/compose.yaml --env-file docker/.env up -d --build",
        "validated **structurally only**",
        "nvidia-ctk",
        "/api/v2/dags/promote/dagRuns",
        "remote: s3://mlops-data/dvc",
    ):
        assert text in readme, f"docker/README.md should contain {text!r}"


# -------------------------------------------------------------------------------- scripts they run


@pytest.mark.parametrize(
    ("script", "shell"),
    [
        ("airflow-entrypoint.sh", "bash"),
        ("mlflow-entrypoint.sh", "sh"),
        ("check-env.sh", "sh"),
        ("postgres-init.sh", "bash"),
        ("s3-init.sh", "sh"),
    ],
)
def test_shell_scripts_parse_and_are_executable(script: str, shell: str) -> None:
    path = DOCKER / script
    assert path.stat().st_mode & stat.S_IXUSR, f"{script} should be executable"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first in {"#!/bin/sh", "#!/usr/bin/env bash"}, f"{script}: unexpected interpreter line {first!r}"
    checked = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, f"{shell} -n {script}: {checked.stderr}"


def test_bootstrap_renders_params_with_the_s3_remote(tmp_path: Path) -> None:
    bootstrap = load_script("bootstrap")
    target = tmp_path / "mlops" / "params.yaml"
    bootstrap.render_params(ROOT / "params.yaml", target, "s3://mlops-data/dvc")
    rendered, original = load_config(target), load_config(ROOT / "params.yaml")
    assert rendered.version.remote == "s3://mlops-data/dvc", f"version.remote is {rendered.version.remote!r}"
    assert rendered.model_copy(update={"version": original.version}) == original, (
        "only version.remote may differ from the repository's params.yaml"
    )
    assert target.read_text(encoding="utf-8").startswith("# Generated"), "the rendered file says where it is from"
    bootstrap.render_params(ROOT / "params.yaml", target, "  ")
    assert load_config(target).version.remote == original.version.remote, "an empty MLOPS_DVC_REMOTE keeps params.yaml"


def test_airflow_entrypoint_prepares_the_container_and_hands_over(tmp_path: Path) -> None:
    fake_program(
        tmp_path, "official-entrypoint", 'echo "args: $*"; echo "admin password: ${AIRFLOW_ADMIN_PASSWORD-unset}"'
    )
    env = script_env(
        tmp_path,
        MLOPS_BOOTSTRAP=str(DOCKER / "bootstrap.py"),
        AIRFLOW_IMAGE_ENTRYPOINT=str(tmp_path / "official-entrypoint"),
        MLOPS_PARAMS=str(tmp_path / "mlops" / "params.yaml"),
        MLOPS_PARAMS_SOURCE=str(ROOT / "params.yaml"),
        MLOPS_DVC_REMOTE="s3://mlops-data/dvc",
        AIRFLOW_ADMIN_USERNAME="admin",
        AIRFLOW_ADMIN_PASSWORD="s3cret-Pa55word",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(tmp_path / "passwords.json"),
    )
    run = subprocess.run(
        ["bash", str(DOCKER / "airflow-entrypoint.sh"), "celery", "worker"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, f"airflow-entrypoint.sh failed: {run.stderr}"
    assert "args: celery worker" in run.stdout, f"the official entry point should get the command: {run.stdout}"
    assert "admin password: unset" in run.stdout, "the admin password must not reach Airflow's environment"
    assert load_config(tmp_path / "mlops" / "params.yaml").version.remote == "s3://mlops-data/dvc", "params.yaml"
    passwords = tmp_path / "passwords.json"
    assert json.loads(passwords.read_text(encoding="utf-8")) == {"admin": "s3cret-Pa55word"}, "password file"
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600, "the password file is readable by its owner only"

    env["AIRFLOW__CORE__FERNET_KEY"] = "change-me-fernet-key"
    refused = subprocess.run(
        ["bash", str(DOCKER / "airflow-entrypoint.sh"), "scheduler"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode == 78, f"a placeholder secret should stop the container: {refused.stdout}"
    assert "AIRFLOW__CORE__FERNET_KEY" in refused.stderr, f"the error names the variable: {refused.stderr}"
    assert "change-me-fernet-key" not in refused.stderr, "the error must not print the value"
    assert "args:" not in refused.stdout, "Airflow must not start after a refused check"


FAKE_MLFLOW = """echo "mlflow $*"
echo "backend from the environment: ${MLFLOW_BACKEND_STORE_URI:-unset}"
echo "artifacts from the environment: ${MLFLOW_ARTIFACTS_DESTINATION:-unset}"
echo "admin from the environment: ${MLFLOW_AUTH_ADMIN_USERNAME:-unset}"
if [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    echo "auth config: $MLFLOW_AUTH_CONFIG_PATH"
    cp "$MLFLOW_AUTH_CONFIG_PATH" "$HOME/seen-auth.ini"
fi"""


def mlflow_entrypoint_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of the MLflow image's entry point, with this repository's launcher and a fake mlflow."""
    env = script_env(
        tmp_path,
        MLOPS_BOOTSTRAP=str(DOCKER / "bootstrap.py"),
        MLFLOW_LAUNCHER=str(ROOT / "mlflow" / "start-server.sh"),
        MLFLOW_BIN=str(tmp_path / "bin" / "mlflow"),
        TMPDIR=str(tmp_path),
        **extra,
    )
    fake_program(tmp_path / "bin", "mlflow", FAKE_MLFLOW)
    return env


@pytest.mark.parametrize("auth", ["basic", "none"])
def test_mlflow_entrypoint_runs_the_one_launcher(tmp_path: Path, auth: str) -> None:
    backend = "postgresql+psycopg2://mlflow:p%40ss@postgres:5432/mlflow"
    env = mlflow_entrypoint_env(
        tmp_path,
        MLFLOW_BACKEND_STORE_URI=backend,
        MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow-artifacts",
        MLFLOW_AUTH=auth,
        MLFLOW_AUTH_ADMIN_USERNAME="admin",
        MLFLOW_AUTH_ADMIN_PASSWORD="a-long-admin-password",
        MLFLOW_FLASK_SERVER_SECRET_KEY="0123456789abcdef",
    )
    run = subprocess.run(
        ["sh", str(DOCKER / "mlflow-entrypoint.sh"), "--expose-prometheus", "/tmp/metrics"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, f"mlflow-entrypoint.sh failed: {run.stderr}"
    lines = run.stdout.splitlines()
    command = next(line for line in lines if line.startswith("mlflow ")).split()
    assert command[:2] == ["mlflow", "server"], f"the launcher runs `mlflow server`: {command}"
    for flag, value in [("--host", "0.0.0.0"), ("--port", "5000")]:
        assert command[command.index(flag) + 1] == value, f"{flag} should be {value}: {command}"
    assert "--serve-artifacts" in command, f"artifacts are proxied by the server: {command}"
    assert command[-2:] == ["--expose-prometheus", "/tmp/metrics"], f"extra arguments are passed on: {command}"
    assert f"backend from the environment: {backend}" in lines, (
        "mlflow server reads the backend URI from its environment"
    )
    assert "artifacts from the environment: s3://mlflow-artifacts" in lines, "and the artifact destination"
    for secret in (backend, "p%40ss", "a-long-admin-password"):
        assert not any(secret in line for line in lines if line.startswith("mlflow ")), f"{secret} is off argv"
    if auth == "basic":
        assert command[command.index("--app-name") + 1] == "basic-auth", f"MLFLOW_AUTH=basic: {command}"
        assert "admin from the environment: admin" in lines, "MLflow reads the admin account from MLFLOW_AUTH_ADMIN_*"
        import configparser

        config = configparser.ConfigParser()
        config.read(tmp_path / "seen-auth.ini")
        assert config["mlflow"]["database_uri"] == backend, "users are stored in the backend database, % kept"
        assert "a-long-admin-password" not in (tmp_path / "seen-auth.ini").read_text(), "no admin password in the file"
        rendered = next(line for line in lines if line.startswith("auth config: ")).removeprefix("auth config: ")
        assert not Path(rendered).exists(), "the rendered auth file is removed once the server has stopped"
    else:
        assert "--app-name" not in command, f"MLFLOW_AUTH=none runs the plain server: {command}"


def test_mlflow_image_runs_the_repository_launcher() -> None:
    copies = copy_instructions("mlflow.Dockerfile")
    launcher = [destination for _, sources, destination in copies if sources == ["mlflow/start-server.sh"]]
    assert launcher == ["/opt/mlflow-image/start-server.sh"], f"the image carries mlflow/start-server.sh: {copies}"
    entrypoint = (DOCKER / "mlflow-entrypoint.sh").read_text(encoding="utf-8")
    assert 'exec "$launcher" "$@"' in entrypoint, "the entry point hands over to the launcher"
    assert "/opt/mlflow-image/start-server.sh" in entrypoint, "the launcher's place in the image"
    assert "mlflow server" not in entrypoint.replace("`mlflow server`", ""), "no second way of starting the server"


def test_mlflow_entrypoint_refuses_bad_settings(tmp_path: Path) -> None:
    base = mlflow_entrypoint_env(
        tmp_path,
        MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://mlflow:x@postgres/mlflow",
        MLFLOW_ARTIFACTS_DESTINATION="s3://mlflow-artifacts",
    )
    cases: list[tuple[dict[str, str], int | None, str]] = [
        ({"MLFLOW_AUTH": "ldap"}, 64, "MLFLOW_AUTH"),
        ({"MLFLOW_AUTH": "basic", "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}, 64, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"MLFLOW_AUTH": "none", "MLFLOW_AUTH_ADMIN_PASSWORD": "change-me-mlflow-admin"}, 78, "placeholder"),
    ]
    for extra, status, message in cases:
        run = subprocess.run(
            ["sh", str(DOCKER / "mlflow-entrypoint.sh")],
            env={**base, **extra},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if status is None:
            assert run.returncode != 0, f"{extra}: the entry point should fail: {run.stdout}"
        else:
            assert run.returncode == status, f"{extra}: exit status {run.returncode}, expected {status}: {run.stderr}"
        assert message in run.stderr, f"{extra}: the error should mention {message}: {run.stderr}"
        assert "mlflow server" not in run.stdout, f"{extra}: the server must not start"
        assert not list(tmp_path.glob("mlflow-auth-*")), f"{extra}: no rendered auth file is left"


# ------------------------------------------------------------------- placeholders stop every service


def check_env_script(env: Mapping[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    """Run ``docker/check-env.sh COMMAND`` with ``sh`` (dash here, as in the Debian-based images)."""
    return subprocess.run(
        ["sh", str(DOCKER / "check-env.sh"), *command],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def guard_of(name: str, service: Mapping[str, Any]) -> str:
    """How ``service`` refuses placeholder secrets: ``check-env.sh``, ``bootstrap`` (our images), or ``""``."""
    entrypoint = service.get("entrypoint") or []
    mounts = [volume for volume in service.get("volumes") or [] if isinstance(volume, str)]
    if entrypoint[:2] == ["/bin/sh", "/check-env.sh"]:
        assert "./check-env.sh:/check-env.sh:ro" in mounts, f"{name}: check-env.sh must be mounted read-only"
        return "check-env.sh"
    dockerfile = (service.get("build") or {}).get("dockerfile", "")
    if dockerfile in {f"docker/{image}" for image in DOCKERFILES} and not entrypoint:
        return "bootstrap"
    return ""


def test_every_service_given_a_placeholder_refuses_to_start() -> None:
    bootstrap = load_script("bootstrap")
    resolved = interpolate_document(compose(), env_example())["services"]
    given = {name: environment(service) for name, service in resolved.items()}
    given = {name: env for name, env in given.items() if bootstrap.placeholder_variables(env)}
    assert {"postgres", "redis", "s3", "s3-init", "mlflow", "airflow-scheduler"} <= set(given), (
        f"the services that get a secret: {sorted(given)}"
    )
    for name, env in sorted(given.items()):
        guard = guard_of(name, services()[name])
        assert guard, f"{name} gets .env.example placeholders but nothing stops it from starting with them"
        expected = set(bootstrap.placeholder_variables(env))
        if guard == "bootstrap":
            with pytest.raises(bootstrap.BootstrapError) as refused:
                bootstrap.check_env(env)
            named = set(str(refused.value).split(": ", 1)[1].split(";")[0].split(", "))
        else:
            run = check_env_script(env, "echo", "started")
            assert run.returncode == 78, f"{name}: check-env.sh should exit 78 (EX_CONFIG): {run.stderr}"
            assert "started" not in run.stdout, f"{name}: the service's own command must not run"
            named = set(run.stderr.split("still set in: ", 1)[1].split(";")[0].split(", "))
            for value in env.values():
                if "change-me" in value:
                    assert value not in run.stderr, f"{name}: the message names variables, never their values"
        assert named == expected, f"{name}: the refusal names every placeholder variable: {named} != {expected}"
    for image in ("airflow-entrypoint.sh", "mlflow-entrypoint.sh"):
        script = (DOCKER / image).read_text(encoding="utf-8")
        assert re.search(r'python "\$bootstrap" (airflow|check-env)', script), f"{image} runs the placeholder check"


def test_check_env_script_runs_the_image_command_with_real_secrets(tmp_path: Path) -> None:
    resolved = interpolate_document(compose(), {k: v.replace("change-me", "s3cr3t") for k, v in env_example().items()})
    fake_program(tmp_path, "docker-entrypoint.sh", 'echo "image entry point: $*"')
    for name in ("postgres", "redis", "s3", "s3-init"):
        service = resolved["services"][name]
        command = [*service["entrypoint"][2:], *(service.get("command") or [])]
        env = {**environment(service), "PATH": f"{tmp_path}:/usr/bin:/bin"}
        if name == "postgres":
            run = check_env_script(env, *command)
            assert run.returncode == 0, f"{name}: real secrets pass the check: {run.stderr}"
            assert run.stdout.strip() == "image entry point: postgres", f"{name}: the image's own command runs"
        else:
            run = check_env_script(env, "true")
            assert run.returncode == 0, f"{name}: real secrets pass the check: {run.stderr}"


def test_check_env_script_agrees_with_bootstrap() -> None:
    bootstrap = load_script("bootstrap")
    cases = [
        {},
        {"A": "fine", "B": "also fine"},
        {"POSTGRES_PASSWORD": "change-me-postgres-superuser", "OTHER": "x"},
        {"URL": "postgresql+psycopg2://airflow:change-me-airflow-db@postgres:5432/airflow", "K": "change-me"},
        {"MULTI": "first line\nexport HIDDEN=change-me", "QUOTED": 'it\'s "quoted" $HOME'},
    ]
    for env in cases:
        run = check_env_script(env, "true")
        expected = set(bootstrap.placeholder_variables(env))
        if not expected:
            assert run.returncode == 0, f"{sorted(env)}: no placeholder, the command runs: {run.stderr}"
            continue
        assert run.returncode == 78, f"{sorted(env)}: placeholders refused: {run.stderr}"
        named = set(run.stderr.split("still set in: ", 1)[1].split(";")[0].split(", "))
        assert named == expected, f"check-env.sh and bootstrap.py flag the same variables: {named} != {expected}"


def test_check_lock_compares_installed_versions(tmp_path: Path) -> None:
    import importlib.metadata

    pyyaml = importlib.metadata.version("pyyaml")
    requirements = tmp_path / "requirements.txt"

    def check(text: str, *args: str) -> subprocess.CompletedProcess[str]:
        requirements.write_text(text, encoding="utf-8")
        command = [sys.executable, str(DOCKER / "check_lock.py"), str(requirements), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    header = "# This file was autogenerated by uv\n-e .\n"
    ok = check(f"{header}pyyaml=={pyyaml}\n    # via mlops-image-pipeline\npywin32==312 ; sys_platform == 'win32'\n")
    assert ok.returncode == 0, f"matching pins (and a pin for another platform) should pass: {ok.stderr}"
    wrong = check("PyYAML==0.0.1\nnot-installed-at-all==1.0\n")
    assert wrong.returncode == 1, "a version mismatch should fail the build"
    assert "pyyaml: locked at 0.0.1" in wrong.stderr, f"the mismatch is reported: {wrong.stderr}"
    assert "not-installed-at-all" in wrong.stderr, f"the missing distribution is reported: {wrong.stderr}"
    subset = check(f"pyyaml=={pyyaml}\nnot-installed-at-all==1.0\n", "--installed-only", "--require", "PyYAML")
    assert subset.returncode == 0, f"--installed-only skips what is not installed: {subset.stderr}"
    required = check(f"pyyaml=={pyyaml}\n", "--installed-only", "--require", "not-installed-at-all")
    assert required.returncode == 1, "--require fails when the distribution is missing"
    ignored = check("pyyaml==0.0.1\n", "--ignore", "pyyaml")
    assert ignored.returncode == 0, f"--ignore skips a distribution: {ignored.stderr}"


def test_check_lock_reads_a_real_uv_export(tmp_path: Path) -> None:
    uv = shutil.which("uv") or str(ROOT / ".tools" / "uv" / "bin" / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed here (make setup installs it in .tools/)")
    for name in ("pyproject.toml", "uv.lock"):
        shutil.copy(ROOT / name, tmp_path / name)
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--quiet"],
        cwd=tmp_path,
        env={**os.environ, "UV_OFFLINE": "1", "UV_NO_CACHE": "1"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert exported.returncode == 0, f"uv export --frozen (as the Dockerfiles run it) failed: {exported.stderr}"
    pins = {pin.name: pin for pin in load_script("check_lock").parse_pins(exported.stdout.splitlines())}
    for name in ("apache-airflow", "apache-airflow-providers-celery", "tensorflow", "tf-keras", "mlflow", "dvc-s3"):
        assert name in pins, f"the lock export should pin {name}"
    for name in ("asyncpg", "psycopg2-binary", "boto3", "flask-wtf"):
        assert name in pins, f"{name} is needed in the images and must come from the lock"
