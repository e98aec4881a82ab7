"""The prediction service on Kubernetes: a Deployment with readiness on ``/health``, a Service, a headless Service.

:func:`render` fills ``templates/serving.yaml`` with :class:`ServingSettings` (names, namespace, image,
replicas, resources, the Secret holding every credential, the tracking server and the S3 stores) and returns
the three manifests. ``python -m pipelines.release.serving.kubernetes render --image IMAGE ...`` prints them
for ``kubectl apply -f -``, with the endpoint to give the promote DAG (``MLOPS_SERVE_ENDPOINTS``) as a comment:
the headless Service's DNS name with ``dns+``, so one deploy call reaches every ready replica.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipelines.tracking import PasswordFreeUri

TEMPLATE = Path(__file__).resolve().parent / "templates" / "serving.yaml"
PORT = 8000


class ServingSettings(BaseModel):
    """What the manifests depend on; credentials are never among them (they live in ``secret``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(min_length=1)
    name: str = Field("mlops-serving", pattern=r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$")
    namespace: str = Field("default", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    replicas: int = Field(3, ge=1, le=100)
    secret: str = Field("mlops-serving", pattern=r"^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
    tracking_uri: PasswordFreeUri = "http://mlflow:5000"
    log_uri: str = "s3://mlops-data/predictions"
    feedback_uri: str = "s3://mlops-data/feedback"
    cpu: str = "2"
    memory: str = "4Gi"

    @property
    def endpoint(self) -> str:
        """What the promote DAG's deploy task is given: every ready replica, through the headless Service."""
        return f"dns+http://{self.name}-replicas.{self.namespace}.svc.cluster.local:{PORT}"


def render(settings: ServingSettings) -> list[dict[str, Any]]:
    """The Deployment, the Service and the headless Service, as dictionaries."""
    deployment, service, headless = (copy.deepcopy(document) for document in yaml.safe_load_all(TEMPLATE.read_text()))
    labels = {"app.kubernetes.io/name": settings.name, "app.kubernetes.io/component": "prediction-service"}
    for document, name in (
        (deployment, settings.name),
        (service, settings.name),
        (headless, f"{settings.name}-replicas"),
    ):
        document["metadata"] = {"name": name, "namespace": settings.namespace, "labels": dict(labels)}
    spec = deployment["spec"]
    spec["replicas"] = settings.replicas
    spec["selector"] = {"matchLabels": dict(labels)}
    spec["template"]["metadata"] = {"labels": dict(labels)}
    container = spec["template"]["spec"]["containers"][0]
    container["image"] = settings.image
    container["env"] += [
        {"name": "MLFLOW_TRACKING_URI", "value": settings.tracking_uri},
        {"name": "MLOPS_SERVE_LOG_URI", "value": settings.log_uri},
        {"name": "MLOPS_SERVE_FEEDBACK_URI", "value": settings.feedback_uri},
        {"name": "HOME", "value": "/tmp"},
    ]
    container["envFrom"] = [{"secretRef": {"name": settings.secret}}]
    container["resources"] = {
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    for document in (service, headless):
        document["spec"]["selector"] = dict(labels)
    order = ("apiVersion", "kind", "metadata", "spec")
    return [{key: document[key] for key in order} for document in (deployment, service, headless)]


def build_parser() -> argparse.ArgumentParser:
    """``render`` and its options (one per :class:`ServingSettings` field)."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.release.serving.kubernetes", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("render", help="print the manifests for kubectl apply -f -")
    for name, field in ServingSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.is_required():
            command.add_argument(flag, required=True, help=f"{name} (required)")
        else:
            kind = int if isinstance(field.default, int) else str
            command.add_argument(flag, type=kind, default=field.default, help=f"default: {field.default}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the manifests of the settings given on the command line."""
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    values = {name: getattr(args, name) for name in ServingSettings.model_fields}
    try:
        settings = ServingSettings(**values)
    except ValidationError as error:
        problems = "; ".join(f"--{str(item['loc'][0]).replace('_', '-')}: {item['msg']}" for item in error.errors())
        print(f"error: {problems}", file=sys.stderr)
        return 2
    print(f"# MLOPS_SERVE_ENDPOINTS={settings.endpoint}  (for the promote DAG's deploy task)")
    print(yaml.safe_dump_all(render(settings), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
