"""Training on Kubernetes: TF_CONFIG per index, the pod worker, the Service and Job the operators submit.

The manifests come from the real operators, rendered offline by ``python -m pipelines.training.kubernetes
render`` in a subprocess with a throw-away ``AIRFLOW_HOME`` (this process never imports Airflow); a probe
script builds the task group in a DAG the same way. Each runs once per module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.project import Project
from pipelines.training import kubernetes as k8s_job
from pipelines.training.backends import job_id_for_run
from pipelines.training.kubernetes import (
    DEFAULT_PORT,
    EXIT_NOT_RETRYABLE,
    EXIT_RETRYABLE,
    KubernetesSettings,
    tf_config_for_index,
)
from pipelines.training.strategy import plan_strategy
from pipelines.training.train import job_dir_for
from tests.support import REPO_ROOT, write_params

K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
FAKE_AWS_KEY = "AKIAABCDEFGHIJKLMNOP"
FAKE_PASSWORD = "not-in-any-manifest-7319"
RUN_ID = "manual__2026-11-27T10:00:00+00:00"
DATA_VERSION = "ab" * 16
SETTINGS_ENV = {
    "MLOPS_K8S_IMAGE": "registry.example.com:5000/team/trainer:1.2.3",
    "MLOPS_K8S_NAMESPACE": "ml",
    "MLOPS_K8S_PVC": "training-workspace",
    "MLOPS_K8S_SECRET": "mlops-aws",
    "MLOPS_K8S_TRACKING_URI": "https://mlflow.example.com",
}
CASES = {  # name: (workers, max_restarts, gpus_per_worker)
    "one-cpu-worker": (1, 0, 0),
    "two-workers": (2, 1, 1),
    "four-workers": (4, 2, 2),
}


def subprocess_env(airflow_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a render or probe: the settings, a throw-away Airflow home, secrets to leak."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLOPS_", "AIRFLOW"))}
    env.update(SETTINGS_ENV, AIRFLOW_HOME=str(airflow_home), **extra)
    env.update(AWS_ACCESS_KEY_ID=FAKE_AWS_KEY, MLFLOW_TRACKING_PASSWORD=FAKE_PASSWORD)
    return env


def run_python(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, f"{args[:3]} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """``render`` output per case: the raw text, the Service and the Job."""
    outputs: dict[str, dict[str, Any]] = {}
    for name, (workers, max_restarts, gpus) in CASES.items():
        env = subprocess_env(tmp_path_factory.mktemp("airflow-home"))
        args = ["-m", "pipelines.training.kubernetes", "render", "--workers", str(workers), "--run-id", RUN_ID]
        args += ["--max-restarts", str(max_restarts), "--gpus-per-worker", str(gpus), "--data-version", DATA_VERSION]
        text = run_python(args, env)
        service, job = yaml.safe_load_all(text)
        outputs[name] = {"text": text, "Service": service, "Job": job, "workers": workers}
    return outputs


def pod_spec(job: dict[str, Any]) -> dict[str, Any]:
    return dict(job["spec"]["template"]["spec"])


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(job)["containers"]
    assert len(containers) == 1, f"one container per pod, got {[c['name'] for c in containers]}"
    return dict(containers[0])


def pod_args(job: dict[str, Any]) -> argparse.Namespace:
    return k8s_job.build_parser().parse_args(["worker", *trainer(job)["args"]])


# ------------------------------------------------------------------------------ the rendered Service and Job


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_manifests_validate_against_kubernetes_schemas(
    rendered: dict[str, dict[str, Any]], case: str, version: str
) -> None:
    for kind in ("Service", "Job"):
        try:
            kubernetes_validate.validate(rendered[case][kind], version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{kind} of {case} is not valid Kubernetes {version}: {error.message}")


def test_strict_schema_validation_catches_an_unknown_field(rendered: dict[str, dict[str, Any]]) -> None:
    job = json.loads(json.dumps(rendered["two-workers"]["Job"]))
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("case", list(CASES))
def test_n_workers_make_an_indexed_job_of_n_completions(rendered: dict[str, dict[str, Any]], case: str) -> None:
    workers, max_restarts, _ = CASES[case]
    spec = rendered[case]["Job"]["spec"]
    assert spec["completionMode"] == "Indexed", "each pod gets JOB_COMPLETION_INDEX"
    assert (spec["completions"], spec["parallelism"]) == (workers, workers), f"all {workers} workers run at once"
    assert spec["backoffLimit"] == max_restarts * workers, "one whole-group restart costs up to `workers` failures"
    assert pod_args(rendered[case]["Job"]).workers == workers, "the pods know the size of their group"


def test_trainer_container_is_the_one_the_pod_failure_policy_names(rendered: dict[str, dict[str, Any]]) -> None:
    job = rendered["two-workers"]["Job"]
    assert trainer(job)["name"] == "trainer", "the operator's base container is the template's trainer"
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail_job = [rule for rule in rules if rule["action"] == "FailJob"]
    assert len(fail_job) == 1, f"one FailJob rule: {rules}"
    assert fail_job[0]["onExitCodes"]["containerName"] == "trainer", f"the policy names the trainer: {rules}"
    assert fail_job[0]["onExitCodes"]["values"] == [EXIT_NOT_RETRYABLE], "a user error fails the Job at once"
    ignored = [rule["onPodConditions"] for rule in rules if rule["action"] == "Ignore"]
    assert ignored == [[{"type": "DisruptionTarget", "status": "True"}]], "evictions and drains do not count"
    assert job["spec"]["podReplacementPolicy"] == "Failed", "a replacement waits for the old pod to be gone"
    assert pod_spec(job)["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never"


def test_pods_are_locked_down_and_bounded_in_time(rendered: dict[str, dict[str, Any]]) -> None:
    job = rendered["two-workers"]["Job"]
    assert pod_spec(job)["automountServiceAccountToken"] is False, "training never talks to the Kubernetes API"
    assert trainer(job)["securityContext"] == {"allowPrivilegeEscalation": False}, "no privilege escalation"
    assert trainer(job)["terminationMessagePolicy"] == "FallbackToLogsOnError", "a failed pod says why"
    assert job["spec"]["activeDeadlineSeconds"] == 3 * 3600, "a hung group ends after MLOPS_K8S_TIMEOUT_HOURS"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "finished Jobs are cleaned up"


def test_service_is_headless_and_selects_the_pods_of_every_try(rendered: dict[str, dict[str, Any]]) -> None:
    service, job = rendered["two-workers"]["Service"], rendered["two-workers"]["Job"]
    assert service["spec"]["clusterIP"] == "None", "a headless Service gives each pod its own DNS record"
    assert service["spec"]["publishNotReadyAddresses"] is True, "workers resolve each other while starting"
    selector, pod_labels = service["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items(), f"the Service selects the Job's pods: {selector}"
    assert "batch.kubernetes.io/job-name" not in selector, "not by Job name: each try has its own Job"
    assert job["metadata"]["name"] not in selector.values(), f"nothing of the try in {selector}"
    assert "try_number" not in selector, f"the operator's try label is not selected: {selector}"
    assert pod_spec(job)["subdomain"] == service["metadata"]["name"], "the pods live under the Service's domain"
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == "ml", "both in MLOPS_K8S_NAMESPACE"
    ports = [port["containerPort"] for port in trainer(job)["ports"]]
    assert [p["port"] for p in service["spec"]["ports"]] == ports == [DEFAULT_PORT], "the gRPC port, everywhere"


def test_names_follow_the_run_and_the_operators_job_prefix(rendered: dict[str, dict[str, Any]]) -> None:
    service, job = rendered["four-workers"]["Service"], rendered["four-workers"]["Job"]
    digest = uuid.uuid5(uuid.NAMESPACE_URL, job_id_for_run("retrain", RUN_ID)).hex[:10]
    assert service["metadata"]["name"] == f"mlops-train-{digest}", "one Service per DAG run"
    assert job["metadata"]["name"] == f"job-mlops-train-{digest}-1", "job- (the operator's) + Service + try number"
    assert pod_args(job).job_name == job["metadata"]["name"], "the pods compute their peers from the Job's name"
    hostname = f"{job['metadata']['name']}-{CASES['four-workers'][0] - 1}"
    assert len(hostname) <= 63, f"the last worker's hostname is a DNS label: {hostname}"


@pytest.mark.parametrize("case", ["one-cpu-worker", "four-workers"])
def test_pod_arguments_yield_the_tf_config_of_tf_config_for_index(
    rendered: dict[str, dict[str, Any]], case: str
) -> None:
    service, job = rendered[case]["Service"], rendered[case]["Job"]
    assert trainer(job)["command"] == ["python", "-m", "pipelines.training.kubernetes", "worker"], "the pod entry"
    args = pod_args(job)
    name, namespace = service["metadata"]["name"], job["metadata"]["namespace"]
    for index in range(rendered[case]["workers"]):
        from_pod = tf_config_for_index(args.job_name, args.service, args.namespace, args.workers, args.port, index)
        direct = tf_config_for_index(job["metadata"]["name"], name, namespace, args.workers, DEFAULT_PORT, index)
        assert from_pod == direct, f"worker {index}: the pod's arguments give the expected TF_CONFIG"
    assert args.data_version == DATA_VERSION, "the chief pins the data version of the DAG run"


def test_secrets_are_only_referenced(rendered: dict[str, dict[str, Any]]) -> None:
    text, job = rendered["two-workers"]["text"], rendered["two-workers"]["Job"]
    assert trainer(job)["envFrom"] == [{"secretRef": {"name": "mlops-aws"}}], "credentials come from the Secret"
    assert FAKE_AWS_KEY not in text, "no AWS key of the submitter's environment in the manifests"
    assert FAKE_PASSWORD not in text, "no MLflow password of the submitter's environment in the manifests"
    env = {item["name"]: item["value"] for item in trainer(job)["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com", "the pods log to MLOPS_K8S_TRACKING_URI"
    assert all("valueFrom" not in item for item in trainer(job)["env"]), "no per-variable secret either"


def test_shared_pvc_is_mounted_at_workspace_and_holds_the_job_dir(
    rendered: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    job = rendered["two-workers"]["Job"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(job)["volumes"]
        if "persistentVolumeClaim" in v
    }
    mounts = {mount["name"]: mount["mountPath"] for mount in trainer(job)["volumeMounts"]}
    assert mounts[next(iter(claims))] == "/workspace", f"the PVC {claims} is mounted at /workspace: {mounts}"
    assert list(claims.values()) == ["training-workspace"], "the one PVC is MLOPS_K8S_PVC"
    assert mounts["dshm"] == "/dev/shm", "NCCL and tf.data get a memory-backed /dev/shm"
    args = pod_args(job)
    assert args.params == "/workspace/project/params.yaml", "the project is under the mount"
    assert args.job_id == job_id_for_run("retrain", RUN_ID), "the job id is the DAG run's, the same for every try"
    pod_project = Project(root=Path("/workspace/project"), config=Project.load(write_params(tmp_path)).config)
    job_dir = job_dir_for(pod_project, args.job_id)
    assert job_dir.is_relative_to("/workspace"), f"checkpoints are on the shared volume: {job_dir}"


def test_gpu_limits_only_when_gpus_per_worker_is_positive(rendered: dict[str, dict[str, Any]]) -> None:
    cpu_only = trainer(rendered["one-cpu-worker"]["Job"])["resources"]
    four = trainer(rendered["four-workers"]["Job"])["resources"]
    assert "nvidia.com/gpu" not in cpu_only["limits"], f"no GPU asked for with 0 GPUs per worker: {cpu_only}"
    assert four["limits"]["nvidia.com/gpu"] == "2", f"2 GPUs per worker: {four}"
    assert four["requests"] == {"cpu": "4", "memory": "16Gi"}, f"default CPU and memory requested: {four}"


# ------------------------------------------------------------------------------------- the Airflow task group

PROBE = """
import json
from airflow.sdk import DAG, task
from airflow.serialization.serialized_objects import DagSerialization
from pipelines.training.kubernetes import kubernetes_training

with DAG(dag_id="retrain", schedule=None) as dag:
    @task
    def version() -> str:
        return "v"
    result = kubernetes_training(version())
job = dag.get_task("train.run_job")
print(json.dumps({
    "result": result.operator.task_id,
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks},
    "trigger_rule": {t.task_id: str(t.trigger_rule.value) for t in dag.tasks},
    "queue": {t.task_id: t.queue for t in dag.tasks},
    "job": {name: getattr(job, name) for name in (
        "deferrable", "wait_until_job_complete", "get_logs", "do_xcom_push", "completions", "parallelism",
        "backoff_limit", "active_deadline_seconds", "random_name_suffix", "base_container_name")},
    "execution_timeout": job.execution_timeout.total_seconds(),
    "serialized": sorted(DagSerialization.from_dict(DagSerialization.to_dict(dag)).task_dict),
}))
"""


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The task group that ``kubernetes_training`` adds to a DAG, described by a subprocess."""
    params = write_params(tmp_path_factory.mktemp("project"), {"train": {"workers": 3, "max_restarts": 2}})
    env = subprocess_env(tmp_path_factory.mktemp("airflow-home"), MLOPS_PARAMS=str(params), MLOPS_TRAIN_QUEUE="gpu")
    return dict(json.loads(run_python(["-c", PROBE], env).splitlines()[-1]))


def test_training_group_runs_after_the_data_version_and_cleans_up(probed: dict[str, Any]) -> None:
    upstream = probed["upstream"]
    assert upstream["train.create_service"] == ["version"], "the Service comes after the data version"
    assert upstream["train.run_job"] == ["train.create_service", "version"], "the Job after the Service"
    assert upstream["train.find_run"] == ["train.run_job"], "the run id is looked up once the Job is done"
    assert upstream["train.delete_service"] == ["train.run_job"], "the Service goes once the Job is done"
    assert probed["trigger_rule"]["train.delete_service"] == "all_done", "deleted even when the Job failed"
    assert probed["result"] == "train.find_run", "the group's result is the chief's MLflow run id"
    trains = {task for task in probed["queue"] if task.startswith("train.")}
    assert {probed["queue"][task] for task in trains} == {"gpu"}, "MLOPS_TRAIN_QUEUE routes every train task"
    assert sorted(probed["serialized"]) == sorted(upstream), "the DAG serializes for the scheduler"


def test_job_operator_waits_deferred_and_bounded(probed: dict[str, Any]) -> None:
    job = probed["job"]
    assert job["wait_until_job_complete"] is True, f"the task waits for the Job: {job}"
    assert job["deferrable"] is True, f"in the triggerer: no worker slot is held while the Job runs: {job}"
    assert job["get_logs"] is True, f"the pods' logs end up in the task log: {job}"
    assert job["do_xcom_push"] is False, f"no XCom sidecar in the pods: {job}"
    assert (job["completions"], job["parallelism"], job["backoff_limit"]) == (3, 3, 6), f"train.* of params: {job}"
    assert (job["random_name_suffix"], job["base_container_name"]) == (False, "trainer"), f"names kept: {job}"
    assert probed["execution_timeout"] > job["active_deadline_seconds"], "the Job's deadline ends it first"


# ----------------------------------------------------------------------------------------------- settings


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for key in [key for key in os.environ if key.startswith("MLOPS_K8S_") or key == "MLOPS_TRAIN_QUEUE"]:
        monkeypatch.delenv(key)
    return dict(SETTINGS_ENV)


def test_settings_come_from_the_environment_and_params(settings_env: dict[str, str]) -> None:
    settings_env.update(MLOPS_K8S_GPUS_PER_WORKER="0", MLOPS_K8S_CONN_ID="k8s_gpu", MLOPS_TRAIN_QUEUE="gpu")
    settings = KubernetesSettings.from_environment(workers=3, max_restarts=2, environ=settings_env)
    assert (settings.workers, settings.max_restarts) == (3, 2), "group size and restarts from params.yaml"
    assert (settings.gpus_per_worker, settings.conn_id, settings.queue) == (0, "k8s_gpu", "gpu"), f"{settings}"
    assert settings.project_dir == "/workspace/project", "the project sits on the PVC by default"


def test_missing_settings_are_named(settings_env: dict[str, str]) -> None:
    del settings_env["MLOPS_K8S_PVC"], settings_env["MLOPS_K8S_SECRET"]
    with pytest.raises(PipelineError, match="MLOPS_K8S_PVC field required; MLOPS_K8S_SECRET field required"):
        KubernetesSettings.from_environment(workers=1, max_restarts=1, environ=settings_env)


def test_a_tracking_uri_with_a_password_is_refused(settings_env: dict[str, str]) -> None:
    settings_env["MLOPS_K8S_TRACKING_URI"] = "https://admin:hunter2@mlflow.example.com"
    with pytest.raises(PipelineError, match=r"MLOPS_K8S_TRACKING_URI .*password") as caught:
        KubernetesSettings.from_environment(workers=1, max_restarts=1, environ=settings_env)
    assert "hunter2" not in str(caught.value), "the refusal does not repeat the password"


def test_a_setting_that_is_not_a_number_is_named(settings_env: dict[str, str]) -> None:
    settings_env["MLOPS_K8S_GPUS_PER_WORKER"] = "two"
    with pytest.raises(PipelineError, match="MLOPS_K8S_GPUS_PER_WORKER"):
        KubernetesSettings.from_environment(workers=1, max_restarts=1, environ=settings_env)


def test_render_without_settings_says_which_are_missing(
    settings_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert k8s_job.main(["render", "--workers", "2", "--image", "trainer:1"]) == 2, "a usage error"
    error = capsys.readouterr().err
    assert "MLOPS_K8S_NAMESPACE" in error, f"names what is missing: {error}"
    assert "MLOPS_K8S_IMAGE" not in error, f"not what --image gave: {error}"


def test_the_pod_entry_point_needs_neither_airflow_nor_the_kubernetes_client() -> None:
    code = "import sys, pipelines.training.kubernetes; print(sorted({'airflow', 'kubernetes'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", f"imported at module level: {done.stdout}"


# ---------------------------------------------------------------------------------------- the chief's MLflow run


def test_run_id_for_job_finds_the_run_tagged_with_the_job_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from pipelines.tracking import connect

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = Project.load(write_params(tmp_path))
    job_id = job_id_for_run("retrain", RUN_ID)
    with pytest.raises(PipelineError, match="no MLflow run is tagged"):
        k8s_job.run_id_for_job(project, job_id)
    connect(project)
    for folder in ("retrain-another-run", job_dir_for(project, job_id).name):
        with mlflow.start_run(tags={"training_job": folder}) as run:
            expected = run.info.run_id
    assert k8s_job.run_id_for_job(project, job_id) == expected, "the run of this job's folder, not another's"


# ------------------------------------------------------------------------------------------------ TF_CONFIG


@pytest.mark.parametrize("workers", [2, 4, 7])
def test_tf_config_per_index_names_n_distinct_hosts_with_index_0_chief(workers: int) -> None:
    configs = [tf_config_for_index("train-0412", "train-0412", "ml", workers, 23456, i) for i in range(workers)]
    clusters = [json.loads(config)["cluster"]["worker"] for config in configs]
    assert all(cluster == clusters[0] for cluster in clusters), "every worker sees the same cluster, in order"
    assert len(set(clusters[0])) == workers, f"{workers} distinct worker addresses: {clusters[0]}"
    expected = [f"train-0412-{i}.train-0412.ml.svc.cluster.local:23456" for i in range(workers)]
    assert clusters[0] == expected, "worker i is <job>-<i>.<service>.<namespace>.svc.cluster.local:<port>"
    plans = [plan_strategy(config, gpus=1) for config in configs]
    assert [plan.is_chief for plan in plans] == [True] + [False] * (workers - 1), "index 0 alone is the chief"
    assert [plan.worker_index for plan in plans] == list(range(workers)), "the plan follows the completion index"
    assert {(plan.kind, plan.num_workers) for plan in plans} == {("multi_worker_mirrored", workers)}, (
        f"all {workers} pods plan MultiWorkerMirrored over {workers} workers"
    )


def test_one_worker_job_is_a_lone_chief() -> None:
    plan = plan_strategy(tf_config_for_index("solo", "solo", "ml", 1, 23456, 0), gpus=2)
    assert (plan.kind, plan.is_chief) == ("mirrored", True), f"one pod with 2 GPUs mirrors locally: {plan}"


@pytest.mark.parametrize(("workers", "index"), [(0, 0), (3, 3), (3, -1)])
def test_tf_config_refuses_an_index_outside_the_group(workers: int, index: int) -> None:
    with pytest.raises(ValueError, match=r"^(workers|index):"):
        tf_config_for_index("j", "j", "ml", workers, 23456, index)


def test_cluster_domain_is_configurable() -> None:
    config = json.loads(tf_config_for_index("j", "s", "ml", 2, 2222, 1, cluster_domain="corp.internal"))
    assert config["cluster"]["worker"][1] == "j-1.s.ml.svc.corp.internal:2222", f"custom domain: {config}"


# ----------------------------------------------------------------------------------------------- in the pods


def worker_args(project_dir: Path, workers: int = 3, *extra: str) -> argparse.Namespace:
    argv = ["worker", "--params", str(project_dir / "params.yaml"), "--job-id", "job", "--workers", str(workers)]
    argv += ["--job-name", "j", "--service", "j", "--namespace", "ml", "--job-file-wait", "0", *extra]
    return k8s_job.build_parser().parse_args(argv)


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_params(tmp_path)
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": DATA_VERSION + ".dir", "path": "data"}]}))
    # The worker sets TF_CONFIG in this process: setenv first so that monkeypatch removes it afterwards.
    monkeypatch.setenv("TF_CONFIG", "")
    monkeypatch.delenv("TF_CONFIG")
    return tmp_path


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``run_worker`` by a recorder of what it would have trained with."""
    import pipelines.training.train

    calls: list[dict[str, Any]] = []

    def fake_run_worker(project: Any, job_dir: Path) -> None:
        calls.append({"tf_config": os.environ["TF_CONFIG"], "job": json.loads((job_dir / "job.json").read_text())})

    monkeypatch.setattr(pipelines.training.train, "run_worker", fake_run_worker)
    return calls


def test_chief_pod_writes_job_file_and_trains_with_its_tf_config(
    project_dir: Path, trained: list[dict[str, Any]]
) -> None:
    code = k8s_job.run_pod_worker(worker_args(project_dir), {"JOB_COMPLETION_INDEX": "0"})
    assert code == 0, "the chief pod succeeds"
    assert len(trained) == 1, "run_worker was called once"
    plan = plan_strategy(trained[0]["tf_config"], gpus=0)
    assert (plan.is_chief, plan.num_workers) == (True, 3), f"index 0 trains as the chief of 3: {plan}"
    assert trained[0]["job"]["data_version"] == DATA_VERSION, "job.json pins the project's data version"
    assert trained[0]["job"]["job_id"] == "job", "job.json names the training job by its folder, as the MLflow tag does"
    assert (project_dir / "artifacts" / "training" / "job" / "job.json").is_file(), "the job dir is the project's"


def test_other_pod_waits_for_the_chiefs_job_file(project_dir: Path, trained: list[dict[str, Any]]) -> None:
    args = worker_args(project_dir)
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "2"}) == EXIT_RETRYABLE, "no job.json: retry"
    assert not trained, "a worker does not train before the chief wrote job.json"
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "0"}) == 0, "the chief writes it"
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "2"}) == 0, "then worker 2 trains"
    assert plan_strategy(trained[-1]["tf_config"], gpus=0).worker_index == 2, "with its own index"


def test_pod_without_data_version_or_index_fails_the_job(project_dir: Path, trained: list[dict[str, Any]]) -> None:
    args = worker_args(project_dir)
    assert k8s_job.run_pod_worker(args, {}) == EXIT_NOT_RETRYABLE, "no JOB_COMPLETION_INDEX: not an Indexed Job"
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "3"}) == EXIT_NOT_RETRYABLE, "index out of range"
    (project_dir / "data.dvc").unlink()
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "0"}) == EXIT_NOT_RETRYABLE, "no data version"
    assert not trained, "nothing was trained"


def test_pod_of_a_finished_job_exits_at_once(project_dir: Path, trained: list[dict[str, Any]]) -> None:
    job_dir = project_dir / "artifacts" / "training" / "job"
    job_dir.mkdir(parents=True)
    (job_dir / "result.json").write_text("{}")
    assert k8s_job.run_pod_worker(worker_args(project_dir), {"JOB_COMPLETION_INDEX": "1"}) == 0, "already done"
    assert not trained, "a finished job is never trained twice"


def test_chief_checks_out_the_data_version_of_the_dag_run(
    project_dir: Path, trained: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipelines.data.versioning

    checked_out: list[str] = []
    monkeypatch.setattr(
        pipelines.data.versioning, "checkout_data", lambda project, version: checked_out.append(version)
    )
    args = worker_args(project_dir, 3, "--data-version", "cd" * 16)
    assert k8s_job.run_pod_worker(args, {"JOB_COMPLETION_INDEX": "0"}) == 0, "the chief trains"
    assert checked_out == ["cd" * 16], "the PVC project was at another version: the run's is checked out first"
    assert trained[0]["job"]["data_version"] == "cd" * 16, "job.json pins the DAG run's data version"
