from __future__ import annotations

import json

import pytest

from pipelines.errors import PipelineError
from pipelines.training.launcher import free_ports, gpu_assignments, tf_configs, visible_gpus
from pipelines.training.strategy import plan_strategy


def cluster(workers: int, index: int, chief: bool = False) -> str:
    spec: dict[str, list[str]] = {"worker": [f"127.0.0.1:{2000 + n}" for n in range(workers)]}
    task = {"type": "worker", "index": index}
    if chief:
        spec["chief"] = ["127.0.0.1:1999"]
    return json.dumps({"cluster": spec, "task": task})


def test_no_tf_config_and_no_gpu_is_the_default_strategy() -> None:
    plan = plan_strategy(None, gpus=0)
    assert plan.kind == "default", f"one CPU process uses the default strategy, got {plan.kind}"
    assert plan.is_chief, "a lone worker is the chief"
    assert not plan.mixed_precision, "no mixed precision without a GPU"


def test_several_gpus_on_one_host_use_mirrored_with_mixed_precision() -> None:
    plan = plan_strategy(None, gpus=4)
    assert plan.kind == "mirrored", f"several local GPUs use MirroredStrategy, got {plan.kind}"
    assert plan.mixed_precision, "GPUs turn mixed precision on when it is auto"
    assert not plan_strategy(None, gpus=4, mixed_precision="off").mixed_precision, "off means off"


def test_one_gpu_is_the_default_strategy_with_mixed_precision() -> None:
    plan = plan_strategy(None, gpus=1)
    assert (plan.kind, plan.mixed_precision) == ("default", True), f"one GPU: default strategy, float16: {plan}"


@pytest.mark.parametrize("gpus", [0, 2])
def test_tf_config_with_two_workers_is_multi_worker(gpus: int) -> None:
    chief = plan_strategy(cluster(2, 0), gpus=gpus)
    other = plan_strategy(cluster(2, 1), gpus=gpus)
    assert chief.kind == other.kind == "multi_worker_mirrored", "a 2-worker TF_CONFIG means MultiWorkerMirrored"
    assert (chief.num_workers, chief.is_chief, other.is_chief) == (2, True, False), "worker 0 is the chief"


def test_tf_config_with_one_worker_is_not_multi_worker() -> None:
    assert plan_strategy(cluster(1, 0), gpus=0).kind == "default", "a one-worker cluster needs no collectives"


def test_explicit_chief_task_counts_as_worker_zero() -> None:
    plan = plan_strategy(cluster(2, 0, chief=True), gpus=0)
    assert (plan.num_workers, plan.worker_index, plan.is_chief) == (3, 1, False), f"chief + 2 workers: {plan}"


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", "not a valid cluster description"),
        (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "ps", "index": 0}}), "task type 'ps'"),
        (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 5}}), "index 5"),
    ],
)
def test_bad_tf_config_is_refused(tf_config: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        plan_strategy(tf_config, gpus=0)


def test_launcher_configs_describe_one_cluster_on_loopback() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3, f"three distinct ports: {ports}"
    configs = [json.loads(text) for text in tf_configs(ports)]
    assert all(c["cluster"] == configs[0]["cluster"] for c in configs), "every worker sees the same cluster"
    assert [c["task"]["index"] for c in configs] == [0, 1, 2], "each worker has its own index"
    assert all(address.startswith("127.0.0.1:") for address in configs[0]["cluster"]["worker"]), "loopback only"


def test_gpus_are_split_between_local_workers() -> None:
    assert gpu_assignments(2, ["0", "1", "2", "3"]) == ["0,1", "2,3"], "four GPUs, two workers: two each"
    assert gpu_assignments(4, ["0", "1", "2", "3"]) == ["0", "1", "2", "3"], "one GPU per worker"
    assert gpu_assignments(2, []) == [None, None], "no GPU: the environment is left alone (CPU)"
    assert gpu_assignments(3, ["0", "1"]) == [None, None, None], "fewer GPUs than workers: no pinning"


def test_visible_gpus_honours_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"], "the host's allotment is respected"
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == [], "-1 hides every GPU"
