"""The Kubernetes renderer for multi-host training: manifests, TF_CONFIG per index, submit-and-wait logic."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped, unused-ignore]
import pytest
import yaml

from pipelines.errors import PipelineError
from pipelines.training import kubernetes as k8s_job
from pipelines.training.kubernetes import (
    EXIT_NOT_RETRYABLE,
    EXIT_RETRYABLE,
    JobFailedError,
    JobTimeoutError,
    TrainingJobSpec,
    TransientApiError,
    render_training_job,
    submit_and_wait,
    tf_config_for_index,
    to_yaml,
)
from pipelines.training.strategy import plan_strategy
from tests.support import write_params

K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
FAKE_AWS_KEY = "AKIAABCDEFGHIJKLMNOP"


def make_spec(**overrides: Any) -> TrainingJobSpec:
    fields: dict[str, Any] = {
        "name": "train-0412",
        "namespace": "ml",
        "image": "registry.example.com:5000/team/trainer:1.2.3",
        "workers": 4,
        "gpus_per_worker": 2,
        "cpu": "8",
        "memory": "32Gi",
        "params_path": "/workspace/project/params.yaml",
        "job_dir": "/workspace/project/artifacts/training/train-0412",
        "pvc_name": "training-workspace",
        "tracking_uri": "https://mlflow.example.com",
        "secret_name": "mlops-aws",
    }
    fields.update(overrides)
    return TrainingJobSpec(**fields)


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [manifest for manifest in manifests if manifest["kind"] == kind]
    assert len(found) == 1, f"exactly one {kind} expected, got {len(found)}"
    return found[0]


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(by_kind(manifests, "Job")["spec"]["template"]["spec"])


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    containers = pod_spec(manifests)["containers"]
    assert len(containers) == 1, f"one trainer container per pod, got {len(containers)}"
    return dict(containers[0])


# ------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "overrides",
    [{}, {"workers": 1, "gpus_per_worker": 0}, {"service_account": "trainer", "active_deadline_seconds": 7200}],
)
def test_manifests_validate_against_kubernetes_schemas(version: str, overrides: dict[str, Any]) -> None:
    for manifest in render_training_job(make_spec(**overrides)):
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{manifest['kind']} is not valid Kubernetes {version} ({overrides}): {error.message}")


def test_strict_schema_validation_catches_an_unknown_field() -> None:
    job = by_kind(render_training_job(make_spec()), "Job")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


def test_service_is_headless_and_selects_the_jobs_pods() -> None:
    spec = make_spec()
    manifests = render_training_job(spec)
    assert [m["kind"] for m in manifests] == ["Service", "Job"], "the Service comes first so names resolve early"
    service = by_kind(manifests, "Service")
    assert service["spec"]["clusterIP"] == "None", "a headless Service gives each pod its own DNS record"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": spec.name}, "selects the Job's pods"
    assert service["spec"]["publishNotReadyAddresses"] is True, "workers resolve each other while starting"
    assert [p["port"] for p in service["spec"]["ports"]] == [spec.port], "the Service exposes the gRPC port"
    assert pod_spec(manifests)["subdomain"] == service["metadata"]["name"], "pods live under the Service's domain"


@pytest.mark.parametrize("workers", [1, 2, 4, 7])
def test_n_workers_make_an_indexed_job_of_n_completions(workers: int) -> None:
    job = by_kind(render_training_job(make_spec(workers=workers)), "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed", "each pod gets JOB_COMPLETION_INDEX"
    assert (spec["completions"], spec["parallelism"]) == (workers, workers), f"all {workers} workers run at once"


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


def test_pod_command_computes_the_same_tf_config_as_the_renderer() -> None:
    spec = make_spec(workers=3, port=31000)
    trainer = container(render_training_job(spec))
    assert trainer["command"] == ["python", "-m", "pipelines.training.kubernetes", "worker"], (
        "pods run the worker command"
    )
    args = k8s_job.build_parser().parse_args(["worker", *trainer["args"]])
    for index in range(spec.workers):
        from_pod = tf_config_for_index(
            args.job_name, args.service, args.namespace, args.workers, args.port, index, cluster_domain="cluster.local"
        )
        direct = tf_config_for_index(spec.name, spec.service, spec.namespace, spec.workers, spec.port, index)
        assert from_pod == direct, f"worker {index}: the pod's arguments give the same TF_CONFIG"
    assert args.job_dir == spec.job_dir, "the pods train in the spec's job dir"
    assert trainer["ports"][0]["containerPort"] == 31000, "the container listens on the configured port"


def test_gpu_limits_and_cpu_memory_requests() -> None:
    trainer = container(render_training_job(make_spec(gpus_per_worker=2, cpu="8", memory="32Gi")))
    resources = trainer["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 2, f"2 GPUs per worker: {resources}"
    assert resources["requests"] == {"cpu": "8", "memory": "32Gi"}, f"cpu and memory requested: {resources}"
    assert resources["limits"]["memory"] == "32Gi", "memory is limited to its request (no overcommit)"
    cpu_only = container(render_training_job(make_spec(gpus_per_worker=0)))["resources"]
    assert "nvidia.com/gpu" not in cpu_only["limits"], f"no GPU key for CPU-only workers: {cpu_only}"


def test_secrets_are_only_referenced() -> None:
    spec = make_spec()
    manifests = render_training_job(spec)
    trainer = container(manifests)
    assert trainer["envFrom"] == [{"secretRef": {"name": "mlops-aws"}}], "credentials come from the Secret"
    literal = [e["name"] for e in trainer["env"] if re.search(r"AWS|SECRET|PASSWORD|TOKEN|KEY", e["name"])]
    assert not literal, f"no credential is written as a literal env value: {literal}"
    text = to_yaml(manifests)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key", text, re.IGNORECASE), "no AWS key in the YAML"
    assert "kind: Secret" not in text, "the renderer never creates a Secret"


def test_tracking_uri_with_a_password_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^tracking_uri: .*Secret"):
        make_spec(tracking_uri=f"https://bob:{FAKE_AWS_KEY}@mlflow.example.com")


def test_pods_share_the_job_dir_volume_and_the_training_environment() -> None:
    spec = make_spec(service_account="trainer")
    manifests = render_training_job(spec)
    pod, trainer = pod_spec(manifests), container(manifests)
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["training-workspace"], f"the PVC is the shared volume: {claims}"
    mounts = {m["name"]: m["mountPath"] for m in trainer["volumeMounts"]}
    assert mounts["workspace"] == "/workspace", f"mounted at /workspace: {mounts}"
    assert spec.job_dir.startswith("/workspace/"), "the job dir (checkpoints, result.json) is on the shared volume"
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["TF_USE_LEGACY_KERAS"] == "1", "tf-keras under MultiWorkerMirroredStrategy"
    assert env["MLFLOW_TRACKING_URI"] == spec.tracking_uri, "the workers log to the configured tracking server"
    assert pod["serviceAccountName"] == "trainer", "the service account is used when given"
    assert "serviceAccountName" not in pod_spec(render_training_job(make_spec())), "no service account by default"
    assert by_kind(manifests, "Job")["spec"]["ttlSecondsAfterFinished"] == 86_400, "finished Jobs are cleaned up"
    for manifest in [*manifests, by_kind(manifests, "Job")["spec"]["template"]]:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == spec.name, f"labelled with the job: {labels}"
        assert labels["app.kubernetes.io/name"] == "mlops-trainer", f"labelled with the app: {labels}"


@pytest.mark.parametrize(("max_restarts", "workers", "limit"), [(0, 4, 0), (1, 4, 4), (3, 2, 6)])
def test_restart_policy_restarts_the_whole_group(max_restarts: int, workers: int, limit: int) -> None:
    manifests = render_training_job(make_spec(max_restarts=max_restarts, workers=workers))
    job = by_kind(manifests, "Job")["spec"]
    assert pod_spec(manifests)["restartPolicy"] == "Never", "failed workers get fresh pods (podFailurePolicy needs it)"
    assert job["backoffLimit"] == limit, f"{max_restarts} group restarts of {workers} pods: backoffLimit {limit}"
    assert "backoffLimitPerIndex" not in job, "per-index retries would let the group run with a member missing"
    assert job["podReplacementPolicy"] == "Failed", "a replacement waits until the old pod is gone"
    rules = job["podFailurePolicy"]["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail, f"a FailJob rule: {rules}"
    assert fail[0]["onExitCodes"] == {
        "containerName": container(manifests)["name"],
        "operator": "In",
        "values": [EXIT_NOT_RETRYABLE],
    }, f"a user error fails the Job at once: {rules}"
    ignored = [r for r in rules if r["action"] == "Ignore"]
    assert ignored, f"an Ignore rule: {rules}"
    assert ignored[0]["onPodConditions"][0]["type"] == "DisruptionTarget", "evictions do not count"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Train_Job"),
        ("name", "1-starts-with-a-digit"),
        ("name", "x" * 53),
        ("name", "ends-with-"),
        ("namespace", "ML"),
        ("image", "registry.example.com/trainer"),
        ("image", "localhost:5000/trainer"),
        ("image", "trainer:latest"),
        ("image", "Registry/Trainer:1.0"),
        ("image", ""),
        ("image", "team//trainer:1.0"),
        ("image", "team/trainer-:1.0"),
        ("workers", 0),
        ("workers", -2),
        ("gpus_per_worker", -1),
        ("cpu", "lots"),
        ("memory", "0"),
        ("port", 70000),
        ("job_dir", "/tmp/job"),
        ("job_dir", "/workspace"),
        ("job_dir", "/workspace/../etc"),
        ("params_path", "params.yaml"),
        ("pvc_name", "Shared_Volume"),
        ("secret_name", ""),
        ("tracking_uri", "mlflow.example.com"),
        ("max_restarts", -1),
        ("active_deadline_seconds", 0),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        make_spec(**{field: value})


@pytest.mark.parametrize(
    "image",
    [
        "trainer:1.2.3",
        "registry.example.com:5000/team/trainer:2026.11.1-gpu",
        "ghcr.io/org/trainer@sha256:" + "a" * 64,
        "ghcr.io/org/trainer:1.0@sha256:" + "b" * 64,
    ],
)
def test_tagged_or_pinned_images_are_accepted(image: str) -> None:
    assert make_spec(image=image).image == image, f"{image} names a fixed image"


def test_exactly_52_character_name_is_accepted_and_spec_is_frozen() -> None:
    spec = make_spec(name="a" * 52)
    assert spec.name == "a" * 52, "52 characters leave room for '-<index>-<5 random>' in pod names"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.workers = 8  # type: ignore[misc]


def test_yaml_round_trips() -> None:
    manifests = render_training_job(make_spec(service_account="trainer"))
    text = to_yaml(manifests)
    assert list(yaml.safe_load_all(text)) == manifests, "the YAML reads back as the same manifests"
    assert text.count("\n---\n") + text.startswith("---\n") == 2, "two YAML documents"
    assert not re.search(r"[&*]id\d", text), "no YAML anchors (shared labels are written in full)"


def test_every_template_placeholder_is_bound() -> None:
    documents = list(yaml.safe_load_all(k8s_job.template_text()))  # placeholders in values, not in comments
    used = set(re.findall(r"\$\{([a-z_]+)\}", json.dumps(documents)))
    known = set(k8s_job.template_values(make_spec()))
    assert used == known, f"template and renderer agree: unbound {used - known}, unused {known - used}"
    assert "${" not in to_yaml(render_training_job(make_spec())), "no placeholder survives rendering"


def test_unknown_placeholder_in_a_custom_template_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\$\{nope\}"):
        render_training_job(make_spec(), template="kind: Service\nmetadata:\n  name: ${nope}\n")


def test_cli_render_prints_the_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "render",
        "--name",
        "train-0412",
        "--namespace",
        "ml",
        "--image",
        "registry.example.com:5000/team/trainer:1.2.3",
        "--workers",
        "4",
        "--gpus-per-worker",
        "2",
        "--cpu",
        "8",
        "--memory",
        "32Gi",
        "--params-path",
        "/workspace/project/params.yaml",
        "--pvc-name",
        "training-workspace",
        "--tracking-uri",
        "https://mlflow.example.com",
        "--secret-name",
        "mlops-aws",
    ]
    assert k8s_job.main(argv) == 0, "render succeeds"
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == render_training_job(make_spec()), "the CLI prints the spec's manifests (job dir derived)"
    argv[argv.index("--image") + 1] = "registry.example.com/trainer"
    assert k8s_job.main(argv) == 2, "an untagged image is a usage error"
    assert "image:" in capsys.readouterr().err, "the error names the image field"


# ------------------------------------------------------------------------------------------ submit and wait


class FakeApi:
    """A scripted cluster: each ``job_status`` call returns the next status (or raises it)."""

    def __init__(self, statuses: list[Any], existing: set[str] | None = None, pods: list[str] | None = None) -> None:
        self.statuses = list(statuses)
        self.existing = existing or set()
        self.pods = pods or []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.polls = 0

    def create(self, manifest: Mapping[str, Any], namespace: str) -> bool:
        key = f"{manifest['kind']}/{namespace}/{manifest['metadata']['name']}"
        if key in self.existing:
            return False
        self.created.append(key)
        return True

    def job_status(self, name: str, namespace: str) -> Mapping[str, Any]:
        self.polls += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if isinstance(status, Exception):
            raise status
        return dict(status)

    def failed_pod_messages(self, job_name: str, namespace: str) -> list[str]:
        return list(self.pods)

    def delete_job(self, name: str, namespace: str) -> None:
        self.deleted.append(f"{namespace}/{name}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


RUNNING = {"active": 4}
COMPLETE = {"succeeded": 4, "conditions": [{"type": "Complete", "status": "True"}]}


def wait(api: FakeApi, clock: FakeClock, **kwargs: Any) -> k8s_job.JobOutcome:
    manifests = render_training_job(make_spec())
    return submit_and_wait(
        manifests, "ml", kwargs.pop("timeout_s", 600), 10, api, clock=clock, sleep=clock.sleep, **kwargs
    )


def test_wait_returns_when_the_job_completes() -> None:
    api, clock = FakeApi([RUNNING, RUNNING, COMPLETE]), FakeClock()
    outcome = wait(api, clock)
    assert api.created == ["Service/ml/train-0412", "Job/ml/train-0412"], f"Service, then Job: {api.created}"
    assert (outcome.created, outcome.succeeded, outcome.name) == (True, 4, "train-0412"), f"completed: {outcome}"
    assert clock.sleeps == [10, 10], f"polled every poll_s until complete: {clock.sleeps}"
    assert outcome.seconds == 20, f"elapsed time from the clock: {outcome.seconds}"


def test_wait_raises_on_failure_with_the_job_and_pod_messages() -> None:
    failed = {
        "failed": 1,
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "PodFailurePolicy",
                "message": "Container trainer for pod ml/train-0412-0-abcde failed with exit code 78",
            }
        ],
    }
    pod_line = "pod train-0412-0-abcde (worker 0): container trainer exited with code 78\n    error: no data version"
    api, clock = FakeApi([RUNNING, failed], pods=[pod_line]), FakeClock()
    with pytest.raises(JobFailedError) as caught:
        wait(api, clock)
    message = str(caught.value)
    assert "PodFailurePolicy: Container trainer" in message, f"the Job's condition is reported: {message}"
    assert "error: no data version" in message, f"the failed pod's last lines are reported: {message}"
    assert not caught.value.retryable, "a user error is not retried"


def test_backoff_limit_failure_is_retryable_and_failure_target_counts() -> None:
    failing = {"conditions": [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]}
    with pytest.raises(JobFailedError, match="BackoffLimitExceeded") as caught:
        wait(FakeApi([failing]), FakeClock())
    assert caught.value.retryable, "a Job that ran out of group restarts may pass on another try"


def test_wait_times_out_and_optionally_deletes_the_job() -> None:
    api, clock = FakeApi([RUNNING]), FakeClock()
    with pytest.raises(JobTimeoutError, match=r"not finished after 45 s.*kubectl delete job -n ml train-0412"):
        wait(api, clock, timeout_s=45)
    assert clock.now == 1045, f"waited exactly the timeout: {clock.now - 1000} s"
    assert api.deleted == [], "the Job keeps running unless asked"
    api = FakeApi([RUNNING])
    with pytest.raises(JobTimeoutError, match="deleted it"):
        wait(api, FakeClock(), timeout_s=45, delete_on_timeout=True)
    assert api.deleted == ["ml/train-0412"], "delete_on_timeout deletes the Job"


def test_existing_job_is_reattached_and_a_failed_one_is_reported_as_such() -> None:
    existing = {"Service/ml/train-0412", "Job/ml/train-0412"}
    outcome = wait(FakeApi([COMPLETE], existing=existing), FakeClock())
    assert not outcome.created, "a retry waits for the Job it finds instead of failing on 'already exists'"
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    with pytest.raises(JobFailedError, match="already failed before") as caught:
        wait(FakeApi([failed], existing=existing), FakeClock())
    assert not caught.value.retryable, "re-attaching to a failed Job would fail again"


def test_transient_api_errors_are_waited_out_up_to_a_limit() -> None:
    flaky = FakeApi([TransientApiError("HTTP 503"), TransientApiError("HTTP 503"), COMPLETE])
    assert wait(flaky, FakeClock()).succeeded == 4, "two API errors in a row are waited out"
    down = FakeApi([TransientApiError("HTTP 503")])
    with pytest.raises(TransientApiError, match="4 API errors in a row"):
        wait(down, FakeClock(), max_api_errors=3)


def test_wait_checks_its_arguments() -> None:
    manifests = render_training_job(make_spec())
    with pytest.raises(ValueError, match="namespace"):
        submit_and_wait(manifests, "other", 60, 5, FakeApi([COMPLETE]))
    with pytest.raises(ValueError, match="exactly one Job"):
        submit_and_wait(manifests[:1], "ml", 60, 5, FakeApi([COMPLETE]))
    with pytest.raises(ValueError, match="positive"):
        submit_and_wait(manifests, "ml", 0, 5, FakeApi([COMPLETE]))


def test_without_the_kubernetes_package_submit_says_to_install_it() -> None:
    try:
        import kubernetes  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the kubernetes package is installed here")
    with pytest.raises(PipelineError, match="needs the `kubernetes` package"):
        submit_and_wait(render_training_job(make_spec()), "ml", 60, 5)


def test_job_state_reads_conditions() -> None:
    state = k8s_job.job_state
    assert state({})[0] == "running", "no condition: running"
    assert state({"conditions": [{"type": "Failed", "status": "False"}]})[0] == "running", "False is not failed"
    assert state({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]})[0] == "succeeded", "success"
    both = {"conditions": [{"type": "Complete", "status": "True"}, {"type": "Failed", "status": "True"}]}
    assert state(both)[0] == "failed", "a failure wins over completion"


def test_pod_failure_messages_read_termination_messages_and_evictions() -> None:
    log = "\n".join(f"line {n}" for n in range(40))
    pods: list[dict[str, Any]] = [
        {
            "metadata": {"name": "j-1-abc", "labels": {"batch.kubernetes.io/job-completion-index": "1"}},
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {"name": "trainer", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": log}}}
                ],
            },
        },
        {"metadata": {"name": "j-2-def"}, "status": {"phase": "Failed", "reason": "Evicted", "message": "low memory"}},
        {"metadata": {"name": "j-0-ghi"}, "status": {"phase": "Running"}},
    ]
    messages = k8s_job.pod_failure_messages(pods, max_lines=3)
    assert len(messages) == 2, f"one message per failed pod: {messages}"
    assert messages[0].startswith("pod j-1-abc (worker 1): container trainer exited with code 1 (Error)"), messages[0]
    assert messages[0].endswith("line 37\n    line 38\n    line 39"), f"the last lines of the log: {messages[0]}"
    assert "line 36" not in messages[0], "only max_lines lines of the log"
    assert "Evicted: low memory" in messages[1], f"a pod-level failure is reported: {messages[1]}"


# ----------------------------------------------------------------------------------------- in the pods


def worker_args(tmp_path: Path, workers: int = 3, wait_s: float = 0.0) -> argparse.Namespace:
    argv = ["worker", "--params", str(tmp_path / "params.yaml"), "--job-dir", str(tmp_path / "job")]
    argv += ["--workers", str(workers), "--job-name", "j", "--service", "j", "--namespace", "ml"]
    argv += ["--job-file-wait", str(wait_s)]
    return k8s_job.build_parser().parse_args(argv)


@pytest.fixture
def project_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_params(tmp_path)
    (tmp_path / "data.dvc").write_text(yaml.safe_dump({"outs": [{"md5": "ab" * 16 + ".dir", "path": "data"}]}))
    # The worker sets TF_CONFIG in this process: setenv first so that monkeypatch removes it afterwards.
    monkeypatch.setenv("TF_CONFIG", "")
    monkeypatch.delenv("TF_CONFIG")
    return tmp_path


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``run_worker`` by a recorder of what it would have trained with."""
    import os

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
    assert trained[0]["job"]["data_version"] == "ab" * 16, "job.json pins the project's data version"
    assert trained[0]["job"]["job_id"] == "job", "job.json names the training job by its folder, as the MLflow tag does"


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
    (project_dir / "job").mkdir()
    (project_dir / "job" / "result.json").write_text("{}")
    assert k8s_job.run_pod_worker(worker_args(project_dir), {"JOB_COMPLETION_INDEX": "1"}) == 0, "already done"
    assert not trained, "a finished job is never trained twice"


# ------------------------------------------------------------- the kubernetes-client adapter, on a fake client


class FakeApiError(Exception):
    def __init__(self, status: int, reason: str = "") -> None:
        super().__init__(f"({status}) {reason}")
        self.status, self.reason, self.body = status, reason, "{}"


class FakeConfigError(Exception):
    pass


def fake_kubernetes(monkeypatch: pytest.MonkeyPatch, statuses: list[Any], pods: list[dict[str, Any]]) -> list[str]:
    """Install a stand-in for the ``kubernetes`` package; return the log of calls made to it."""
    import sys
    import types

    calls: list[str] = []

    class ApiClient:
        def sanitize_for_serialization(self, value: Any) -> Any:
            return value

    class CoreV1Api:
        def __init__(self, api_client: ApiClient) -> None:
            pass

        def create_namespaced_service(self, namespace: str, body: dict[str, Any]) -> None:
            calls.append(f"create Service {namespace}/{body['metadata']['name']}")
            raise FakeApiError(409, "AlreadyExists")

        def list_namespaced_pod(self, namespace: str, label_selector: str) -> dict[str, Any]:
            calls.append(f"list pods {label_selector}")
            return {"items": pods}

    class BatchV1Api:
        def __init__(self, api_client: ApiClient) -> None:
            pass

        def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
            calls.append(f"create Job {namespace}/{body['metadata']['name']}")

        def read_namespaced_job_status(self, name: str, namespace: str) -> Any:
            status = statuses.pop(0)
            if isinstance(status, Exception):
                raise status
            return types.SimpleNamespace(status=status)

    def load_incluster_config() -> None:
        raise FakeConfigError("not in a cluster")

    def load_kube_config() -> None:
        calls.append("kubeconfig")

    root, client, config, exceptions = (
        types.ModuleType(name)
        for name in ("kubernetes", "kubernetes.client", "kubernetes.config", "kubernetes.client.exceptions")
    )
    exceptions.ApiException = FakeApiError  # type: ignore[attr-defined]
    for attribute, value in {"ApiClient": ApiClient, "CoreV1Api": CoreV1Api, "BatchV1Api": BatchV1Api}.items():
        setattr(client, attribute, value)
    config.ConfigException = FakeConfigError  # type: ignore[attr-defined]
    config.load_incluster_config = load_incluster_config  # type: ignore[attr-defined]
    config.load_kube_config = load_kube_config  # type: ignore[attr-defined]
    modules = {"kubernetes": root, "kubernetes.client": client, "kubernetes.config": config}
    modules["kubernetes.client.exceptions"] = exceptions
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_client_adapter_creates_polls_and_translates_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    statuses: list[Any] = [FakeApiError(503, "Service Unavailable"), RUNNING, COMPLETE]
    calls = fake_kubernetes(monkeypatch, statuses, pods=[])
    clock = FakeClock()
    manifests = render_training_job(make_spec())
    outcome = submit_and_wait(manifests, "ml", 600, 5, clock=clock, sleep=clock.sleep)
    assert calls == ["kubeconfig", "create Service ml/train-0412", "create Job ml/train-0412"], f"calls: {calls}"
    assert (outcome.created, outcome.succeeded) == (True, 4), "an existing Service is kept, the Job created"
    assert clock.sleeps == [5, 5], "the HTTP 503 was waited out like a running Job"


def test_client_adapter_reports_failed_pods(monkeypatch: pytest.MonkeyPatch) -> None:
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    pod = {
        "metadata": {"name": "train-0412-3-xyz", "labels": {"batch.kubernetes.io/job-completion-index": "3"}},
        "status": {"containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137}}}]},
    }
    calls = fake_kubernetes(monkeypatch, [failed], pods=[pod])
    with pytest.raises(JobFailedError, match=r"worker 3\): container trainer exited with code 137"):
        submit_and_wait(render_training_job(make_spec()), "ml", 600, 5)
    assert "list pods batch.kubernetes.io/job-name=train-0412" in calls, f"pods found by job-name label: {calls}"


def test_client_adapter_refuses_a_client_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_kubernetes(monkeypatch, [FakeApiError(403, "Forbidden")], pods=[])
    with pytest.raises(PipelineError, match="read job ml/train-0412: HTTP 403 Forbidden") as caught:
        submit_and_wait(render_training_job(make_spec()), "ml", 600, 5)
    assert not isinstance(caught.value, TransientApiError), "a 403 is not waited out: RBAC needs fixing"
