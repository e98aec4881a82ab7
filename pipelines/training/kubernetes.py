"""Distributed training across hosts on Kubernetes, through Airflow's own Kubernetes provider.

:func:`kubernetes_training` is the retrain DAG's train step when ``MLOPS_TRAIN_BACKEND=kubernetes``: a task group
``train`` of ``create_service`` (a headless Service: worker ``i`` resolves as ``<job>-<i>.<service>.<namespace>``)
-> ``run_job`` (``KubernetesJobOperator``: an Indexed Job over ``templates/indexed-job.yaml``, which explains the
restart and failure policy; deferrable, so no worker slot is held while it runs) -> ``find_run`` (the chief's
MLflow run id), and ``delete_service`` (whatever happened). Each pod runs ``python -m
pipelines.training.kubernetes worker``: TF_CONFIG from ``$JOB_COMPLETION_INDEX``, then training in the DAG run's
job folder on the shared PVC, where a retry's Job resumes from the checkpoints. Settings: ``MLOPS_K8S_*``
(:class:`KubernetesSettings`; the cluster is the Airflow connection ``MLOPS_K8S_CONN_ID``, else in-cluster or
``~/.kube/config``). ``python -m pipelines.training.kubernetes render --workers N ...`` prints the Service and
the Job as the tasks would submit them, for ``kubectl apply -f -``.

Limits of the provider (10.25): the Job's pods are looked up once, just after it is created (apache/airflow#70585):
the log shows those pods only, and if none is found in time the try fails while its Job goes on (``kubectl delete
job`` it); a task killed while deferred leaves its Job running; only ``activeDeadlineSeconds``
(``MLOPS_K8S_TIMEOUT_HOURS``, default 3) ends a hung Job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.errors import PipelineError
from pipelines.tracking import PasswordFreeUri

if TYPE_CHECKING:
    from airflow.sdk import XComArg

    from pipelines.project import Project

TEMPLATE = "templates/indexed-job.yaml"
WORKSPACE = PurePosixPath("/workspace")  # where every worker pod mounts the shared PVC
CONTAINER = "trainer"
DEFAULT_PORT = 23456
JOB_NAME_PREFIX = "job-"  # KubernetesJobOperator always prepends it to the Job's name
GROUP_LABEL = "app.kubernetes.io/instance"  # selected by the Service: one value per DAG run, for every try
# A short digest of the job id ``<dag id>-<run id>`` (Airflow's template macros expose the uuid module).
RUN_DIGEST = "{{ macros.uuid.uuid5(macros.uuid.NAMESPACE_URL, dag.dag_id ~ '-' ~ run_id).hex[:10] }}"
SERVICE_NAME = f"mlops-train-{RUN_DIGEST}"

EXIT_NOT_RETRYABLE = 78
"""Worker exit code (EX_CONFIG) for a problem a user must fix; the Job's podFailurePolicy fails at once."""
EXIT_RETRYABLE = 75
"""Worker exit code (EX_TEMPFAIL) for a failure another attempt may get past; it counts as a retry."""
COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
ENV_PREFIX = "MLOPS_K8S_"
NOT_FROM_ENVIRONMENT = ("workers", "max_restarts", "queue")  # train.* of params.yaml, MLOPS_TRAIN_QUEUE


class KubernetesSettings(BaseModel):
    """Where and how the training Job runs: ``MLOPS_K8S_<FIELD>`` variables and ``train.*`` of ``params.yaml``.

    Every worker mounts ``pvc`` (ReadWriteMany) at ``/workspace``; the keys of ``secret`` become its environment.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str
    namespace: str
    pvc: str
    secret: str
    tracking_uri: PasswordFreeUri
    workers: int
    max_restarts: int
    project_dir: str = str(WORKSPACE / "project")
    gpus_per_worker: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    timeout_hours: float = 3.0
    conn_id: str | None = None
    queue: str = "default"

    @classmethod
    def from_environment(cls, *, workers: int, max_restarts: int, environ: Mapping[str, str] | None = None) -> Self:
        """The settings in ``environ`` (default ``os.environ``); a missing or bad one raises :class:`PipelineError`."""
        from pipelines.training.backends import training_queue

        env = os.environ if environ is None else environ
        given = {key: env.get(ENV_PREFIX + key.upper(), "").strip() for key in cls.model_fields}
        values: dict[str, Any] = {key: value for key, value in given.items() if value}
        values.update(workers=workers, max_restarts=max_restarts, queue=training_queue(env))
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            problems = [f"{ENV_PREFIX}{str(e['loc'][0]).upper()} {e['msg'].lower()}" for e in error.errors()]
            raise PipelineError(f"training on Kubernetes: {'; '.join(problems)}") from None


def worker_address(
    job: str, service: str, namespace: str, index: int, port: int, *, cluster_domain: str = "cluster.local"
) -> str:
    """The ``host:port`` of worker ``index``: its Indexed-Job hostname under the headless Service."""
    return f"{job}-{index}.{service}.{namespace}.svc.{cluster_domain}:{port}"


def tf_config_for_index(
    job: str, service: str, namespace: str, workers: int, port: int, index: int, cluster_domain: str = "cluster.local"
) -> str:
    """The ``TF_CONFIG`` JSON of the pod with completion index ``index`` (0 is the chief; ValueError if not a worker).

    Every pod lists the same ``workers`` addresses in index order, as the local launcher does.
    """
    if not 0 <= index < workers:
        raise ValueError(f"index: {index} is not the index of a worker in a group of {workers}")
    hosts = [worker_address(job, service, namespace, i, port, cluster_domain=cluster_domain) for i in range(workers)]
    return json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})


def completion_index(environ: Mapping[str, str], workers: int) -> int:
    """The pod's index, from ``$JOB_COMPLETION_INDEX``; :class:`PipelineError` if missing or out of range."""
    raw = environ.get(COMPLETION_INDEX_ENV, "").strip()
    if not raw.isdigit() or int(raw) >= workers:
        raise PipelineError(f"${COMPLETION_INDEX_ENV}={raw!r}: not a pod of an Indexed Job of {workers} workers")
    return int(raw)


def kubernetes_training(data_version: XComArg | str | None, settings: KubernetesSettings | None = None) -> XComArg:
    """Add the task group ``train`` to the DAG being defined; return the XComArg of the chief's MLflow run id.

    The chief trains on ``data_version``. ``settings`` default to the environment's, with ``params.yaml``'s workers.
    """
    from airflow.providers.cncf.kubernetes.operators import job, resource  # type: ignore[import-untyped, unused-ignore]
    from airflow.sdk import TaskGroup, get_current_context, task
    from kubernetes.client import models as k8s  # type: ignore[import-untyped, unused-ignore]

    from pipelines.platform.orchestration import dag_config, load_project, run_step
    from pipelines.training.backends import job_id_for_run

    if settings is None:
        train = dag_config().train
        settings = KubernetesSettings.from_environment(workers=train.workers, max_restarts=train.max_restarts)
    deadline_s = int(settings.timeout_hours * 3600)
    cluster: dict[str, Any] = {"namespace": settings.namespace, "queue": settings.queue}
    cluster["kubernetes_conn_id"] = settings.conn_id  # None: in-cluster configuration, else ~/.kube/config
    labels = {"app.kubernetes.io/name": "mlops-trainer", GROUP_LABEL: SERVICE_NAME}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE_NAME, "namespace": settings.namespace, "labels": labels},
        "spec": {  # headless; workers look each other up while starting, before any of them would be ready
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(labels),
            "ports": [{"name": "tf-grpc", "port": DEFAULT_PORT, "targetPort": DEFAULT_PORT}],
        },
    }
    service_yaml = yaml.safe_dump(service, sort_keys=False)
    job_name = f"{SERVICE_NAME}-{{{{ ti.try_number }}}}"
    worker_args: list[str | XComArg] = ["--params", f"{settings.project_dir}/params.yaml", "--job-name"]
    worker_args += [JOB_NAME_PREFIX + job_name, "--job-id", "{{ dag.dag_id }}-{{ run_id }}"]
    worker_args += ["--workers", str(settings.workers)]
    worker_args += ["--service", SERVICE_NAME, "--namespace", settings.namespace, "--port", str(DEFAULT_PORT)]
    worker_args += ["--data-version", data_version] if data_version is not None else []
    gpus = {"nvidia.com/gpu": str(settings.gpus_per_worker)} if settings.gpus_per_worker > 0 else {}
    requests = {"cpu": settings.cpu, "memory": settings.memory}
    workspace = k8s.V1PersistentVolumeClaimVolumeSource(claim_name=settings.pvc)

    with TaskGroup(group_id="train", tooltip="an Indexed Job of train.workers pods on Kubernetes"):
        create_service = resource.KubernetesCreateResourceOperator(
            task_id="create_service", yaml_conf=service_yaml, **cluster
        )
        run_job = job.KubernetesJobOperator(
            task_id="run_job",
            name=job_name,
            random_name_suffix=False,
            job_template_file=str(resources.files("pipelines.training").joinpath(TEMPLATE)),
            # `subdomain` is not a templated argument; the pod template dict is.
            pod_template_dict={"spec": {"subdomain": SERVICE_NAME, "containers": [{"name": CONTAINER}]}},
            labels=labels,
            image=settings.image,
            arguments=worker_args,
            env_vars={"MLFLOW_TRACKING_URI": settings.tracking_uri},
            env_from=[k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.secret))],
            volumes=[k8s.V1Volume(name="workspace", persistent_volume_claim=workspace)],
            volume_mounts=[k8s.V1VolumeMount(name="workspace", mount_path=str(WORKSPACE))],
            container_resources=k8s.V1ResourceRequirements(requests=requests, limits={**requests, **gpus}),
            automount_service_account_token=False,
            base_container_name=CONTAINER,
            termination_message_policy="FallbackToLogsOnError",
            completion_mode="Indexed",
            completions=settings.workers,
            parallelism=settings.workers,
            backoff_limit=settings.max_restarts * settings.workers,
            active_deadline_seconds=deadline_s,
            wait_until_job_complete=True,
            deferrable=True,
            get_logs=True,
            do_xcom_push=False,
            on_finish_action="delete_succeeded_pod",
            discover_pods_retry_number=20,
            execution_timeout=timedelta(seconds=deadline_s + 900),
            **cluster,
        )

        @task(task_id="find_run", queue=settings.queue)
        def find_run() -> str:
            context = get_current_context()
            return run_step(run_id_for_job, load_project(), job_id_for_run(context["dag"].dag_id, context["run_id"]))

        run_id = find_run()
        delete_service = resource.KubernetesDeleteResourceOperator(
            task_id="delete_service", yaml_conf=service_yaml, trigger_rule="all_done", **cluster
        )
        create_service >> run_job >> [run_id, delete_service]
        if data_version is not None and not isinstance(data_version, str):
            data_version >> create_service
    return run_id


def run_id_for_job(project: Project, job_id: str) -> str:
    """The MLflow run the chief of job ``job_id`` logged (tagged ``training_job=<job folder>``, on the same server)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect
    from pipelines.training.train import job_dir_for

    folder = job_dir_for(project, job_id).name
    runs = MlflowClient().search_runs([connect(project)], f"tags.training_job = '{folder}'", max_results=1)
    if not runs:
        raise PipelineError(f"the Kubernetes job finished but no MLflow run is tagged training_job={folder}")
    return str(runs[0].info.run_id)


def render_offline(settings: KubernetesSettings, dag_id: str, run_id: str, data_version: str | None) -> list[Any]:
    """The Service and the Job the first try of ``run_id`` submits, rendered offline (an AIRFLOW_HOME, no cluster)."""
    from airflow.sdk import DAG
    from airflow.sdk.execution_time.context import MacrosAccessor
    from kubernetes.client import ApiClient  # type: ignore[import-untyped, unused-ignore]

    with contextlib.redirect_stdout(sys.stderr):  # the operators log to stdout
        with DAG(dag_id=dag_id, schedule=None) as dag:
            kubernetes_training(data_version, settings)
        create_service: Any = dag.get_task("train.create_service")
        run_job: Any = dag.get_task("train.run_job")
        ti = SimpleNamespace(dag_id=dag_id, task_id=run_job.task_id, map_index=-1, try_number=1)
        context: Any = {"dag": dag, "run_id": run_id, "ti": ti, "macros": MacrosAccessor()}
        create_service.render_template_fields(context)
        run_job.render_template_fields(context)
        run_job.hook._is_in_cluster = False  # else the hook loads a kubeconfig to find out
        run_job.name = run_job._set_name(run_job.name)  # as execute() does
        job = ApiClient().sanitize_for_serialization(run_job.build_job_request_obj(context))
    return [yaml.safe_load(create_service.yaml_conf), job]


def prepare_job_file(
    job_dir: Path, project: Project, index: int, wait_s: float, data_version: str | None = None
) -> None:
    """Make sure ``job.json`` (data version, run name) is in ``job_dir`` before training starts.

    The chief (index 0) writes it if no earlier attempt did, pinning ``data_version`` (checked out first) or the
    project's current one; the others wait up to ``wait_s`` for it. Raises :class:`TrainingError` if it can't.
    """
    from pipelines.data.versioning import checkout_data, current_version
    from pipelines.files import write_json_atomic
    from pipelines.training.train import JOB_FILE, TrainingError

    job_file = job_dir / JOB_FILE
    deadline = time.monotonic() + wait_s
    while index != 0 and not job_file.is_file():
        if time.monotonic() > deadline:
            error = TrainingError(f"{job_file}: not written by the chief (worker 0) within {wait_s:g} s")
            error.retryable = True
            raise error
        time.sleep(1.0)
    if job_file.is_file():
        return
    version = current_version(project)
    if data_version and data_version != version:
        checkout_data(project, data_version)
        version = data_version
    if not version:
        raise TrainingError(f"{project.root / 'data.dvc'}: no data version yet (run `mlops version` first)")
    run_name = f"{project.config.dataset.name}-{version[:8]}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    write_json_atomic(job_file, {"data_version": version, "run_name": run_name, "job_id": job_dir.name})


def run_pod_worker(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """One worker pod: ``TF_CONFIG`` from ``$JOB_COMPLETION_INDEX``, then :func:`pipelines.training.train.run_worker`.

    Returns 0, :data:`EXIT_RETRYABLE` or :data:`EXIT_NOT_RETRYABLE` (the Job fails at once); other exceptions
    (a peer lost mid-epoch) propagate, exit 1 and count towards the Job's backoff limit.
    """
    from pipelines.project import Project
    from pipelines.training.chief_tracking import RESULT_FILE
    from pipelines.training.train import job_dir_for, run_worker

    try:
        index = completion_index(os.environ if environ is None else environ, args.workers)
        group = (args.job_name, args.service, args.namespace, args.workers, args.port)
        tf_config = tf_config_for_index(*group, index)
    except (PipelineError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_NOT_RETRYABLE
    os.environ["TF_CONFIG"] = tf_config
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    print(f"[worker {index}] TF_CONFIG={tf_config}", flush=True)
    try:
        project = Project.load(Path(args.params))
        job_dir = job_dir_for(project, args.job_id)
        if (job_dir / RESULT_FILE).is_file():  # e.g. this pod replaces one that failed after the chief finished
            print(f"[worker {index}] {job_dir / RESULT_FILE} exists: the job is finished", flush=True)
            return 0
        prepare_job_file(job_dir, project, index, args.job_file_wait, args.data_version)
        run_worker(project, job_dir)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE if error.retryable else EXIT_NOT_RETRYABLE
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m pipelines.training.kubernetes`` parser: ``render`` and ``worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.kubernetes", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="print the Service and the Job as the train tasks submit them")
    render.add_argument("--workers", type=int, required=True, help="worker pods (train.workers)")
    render.add_argument("--max-restarts", type=int, default=1, help="whole-group restarts (train.max_restarts)")
    for key in (key for key in KubernetesSettings.model_fields if key not in NOT_FROM_ENVIRONMENT):
        render.add_argument("--" + key.replace("_", "-"), dest=key.upper(), help=f"default: ${ENV_PREFIX}{key.upper()}")
    render.add_argument("--dag-id", default="retrain")
    render.add_argument("--run-id", default=f"manual__{datetime.now(UTC).isoformat()}")
    render.add_argument("--data-version", help="the data version the chief pins (default: the PVC project's)")
    worker = commands.add_parser("worker", help="run one worker inside an Indexed-Job pod")
    worker.add_argument("--params", required=True, help="params.yaml of the project on the shared PVC")
    worker.add_argument("--job-id", required=True, help="the job's folder is artifacts/training/<job id> there")
    worker.add_argument("--workers", type=int, required=True)
    for option in ("--job-name", "--service", "--namespace"):
        worker.add_argument(option, required=True)
    worker.add_argument("--port", type=int, default=DEFAULT_PORT)
    worker.add_argument("--data-version", help="the data version to train on (default: the project's)")
    worker.add_argument("--job-file-wait", type=float, default=600.0, help="seconds to wait for the chief's job.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.training.kubernetes``: ``render`` or ``worker``."""
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        return run_pod_worker(args)
    options = {ENV_PREFIX + name: value for name, value in vars(args).items() if name.isupper() and value is not None}
    environ = {**os.environ, **options}
    try:
        settings = KubernetesSettings.from_environment(
            workers=args.workers, max_restarts=args.max_restarts, environ=environ
        )
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="airflow-home-") as scratch:
        os.environ.setdefault("AIRFLOW_HOME", scratch)
        manifests = render_offline(settings, args.dag_id, args.run_id, args.data_version)
    sys.stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, explicit_start=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
