"""The ``mlops`` command line: one thin sub-command per pipeline step.

Each command loads ``params.yaml`` once, calls the same plain function in ``pipelines/`` that the
Airflow task calls, and prints a short summary. A :class:`~pipelines.errors.PipelineError` is printed
as ``error: ...`` without a traceback and exits with status 1; usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import PipelineError
from pipelines.project import Project

Handler = Callable[[Project, argparse.Namespace], None]


def _ingest(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.ingest import ingest

    result = ingest(project, source=args.source)
    splits = ", ".join(f"{name} {count}" for name, count in result.per_split.items())
    print(f"ingested {result.images} images from {result.source} into {result.dataset_dir} ({splits})")
    if result.duplicates_dropped:
        print(f"dropped {result.duplicates_dropped} duplicate images")


def _validate(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.validate import format_report, validate_or_restore

    print(format_report(validate_or_restore(project)))


def _augment(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.augment import augment_dataset

    result = augment_dataset(project)
    print(f"wrote {result.images_written} augmented train images from {result.source_images} originals")


def _version(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.ingest import last_ingest_source
    from pipelines.data.versioning import version_data

    version = version_data(project, source=last_ingest_source(project))
    state = "new version" if version.is_new else "unchanged"
    print(f"data version {version.version} ({state}): {version.files} files, {version.bytes} bytes")


def _data_checkout(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.versioning import checkout_data

    checkout_data(project, args.data_version)
    print(f"restored data version {args.data_version} into {project.data_dir}")


def _data_list(project: Project, args: argparse.Namespace) -> None:
    from pipelines.data.versioning import list_versions

    versions = list_versions(project)
    if not versions:
        print("no data versions recorded yet (run `mlops version`)")
    for version in versions:
        sizes = f"{version.files:>7} files  {version.bytes:>11} bytes"
        print(f"{version.version}  {version.created_at}  {sizes}  {version.source}")


def _last_run_id(project: Project, given: str | None) -> str:
    from pipelines.training.train import last_run_id

    run_id = given or last_run_id(project)
    if not run_id:
        raise PipelineError("no --run-id given and no training run recorded in this project (run `mlops train`)")
    return run_id


def _train(project: Project, args: argparse.Namespace) -> None:
    from pipelines.training.backends import training_backend
    from pipelines.training.train import train

    if training_backend() == "kubernetes":
        raise PipelineError(
            "MLOPS_TRAIN_BACKEND=kubernetes: jobs across hosts are submitted by the retrain DAG (Airflow's "
            "KubernetesJobOperator); `python -m pipelines.training.kubernetes render` prints the manifests"
        )
    result = train(
        project,
        data_version=args.data_version,
        workers=args.workers or project.config.train.workers,
        job_id=args.job_id,
        max_restarts=project.config.train.max_restarts if args.max_restarts is None else args.max_restarts,
        force=args.force,
    )
    if result.reused:
        print(f"unchanged since run {result.run_id} ({result.run_name}): nothing trained (--force retrains)")
        return
    print(
        f"run {result.run_id} ({result.run_name}): strategy {result.strategy}, {result.replicas} replicas, "
        f"global batch {result.global_batch_size}, val accuracy {result.val_accuracy:.4f}, "
        f"{result.samples_per_second:.0f} samples/s"
    )


def _evaluate(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.evaluate import evaluate_candidate

    result = evaluate_candidate(project, _last_run_id(project, args.run_id))
    against = f"champion version {result.champion_version}" if result.champion_version else "no champion yet"
    line = f"run {result.run_id}: test accuracy {result.candidate_accuracy:.4f} ({against}"
    if result.champion_accuracy is not None:
        line += f": accuracy {result.champion_accuracy:.4f}, McNemar p={result.mcnemar_p_value:.3g}"
    print(line + ")")


def _gate(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.evaluate import gate_candidate

    verdict = gate_candidate(project, _last_run_id(project, args.run_id))
    print(verdict.format_table())
    if not verdict.passed and args.fail_on_reject:
        raise PipelineError("the candidate failed its gate")


def _register(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.register import register_candidate

    result = register_candidate(project, _last_run_id(project, args.run_id))
    if result.registered:
        name = project.config.registry.model_name
        print(f"run {result.run_id}: {result.reason} as {name} version {result.version} (alias challenger)")
    else:
        print(f"run {result.run_id}: not registered ({result.reason})")


def _promote(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.promote import promote

    result = promote(project, args.version, args.reason, force=args.force)
    _print_promotion(project, result)


def _rollback(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.promote import rollback

    _print_promotion(project, rollback(project, args.reason))


def _print_promotion(project: Project, result: Any) -> None:
    name = project.config.registry.model_name
    if not result.changed:
        print(f"{name} version {result.version} is already champion: nothing changed")
    else:
        forced = " (forced)" if result.forced else ""
        print(f"{name} version {result.version} is champion{forced}; it replaced {result.previous or 'no champion'}")


def _compare(project: Project, args: argparse.Namespace) -> None:
    from pipelines.files import write_atomic
    from pipelines.release.compare import compare_models, format_html, format_text

    report = compare_models(project, args.a, args.b)
    if args.html:
        write_atomic(args.html, format_html(report))
        print(f"wrote {args.html}")
    print(report.model_dump_json(indent=2) if args.json else format_text(report))


def _status(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.status import collect_status, format_status

    status = collect_status(project)
    print(json.dumps(status, indent=2) if args.json else format_status(status))


def _serve(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.serving.server import run_server

    run_server(project, args.host, args.port, access_log=args.access_log)


def _predict(project: Project, args: argparse.Namespace) -> None:
    from pipelines.release.serving.client import endpoints, predict_files

    endpoint = args.endpoint or next(
        iter(endpoints(project)), f"http://{project.config.serve.host}:{project.config.serve.port}"
    )
    failed = 0
    for answer in predict_files(endpoint, args.files):
        if "error" in answer:
            failed += 1
            print(f"{answer['file']}: error: {answer['error']}")
        else:
            print(
                f"{answer['file']}: class {answer['class']}  confidence {answer['confidence']:.4f}  "
                f"model version {answer['model_version']}  request {answer['request_id']}"
            )
    if failed:
        raise PipelineError(f"{failed} of {len(args.files)} images got no prediction from {endpoint}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mlops`` and its sub-commands."""
    parser = argparse.ArgumentParser(prog="mlops", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--params",
        type=Path,
        default=None,
        help="configuration file (default: $MLOPS_PARAMS or ./params.yaml)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="read images from a source into data/<dataset>/")
    ingest.add_argument("--source", help="sample | folder:PATH | s3://bucket/prefix (default: ingest.source)")
    ingest.set_defaults(handler=_ingest)

    commands.add_parser("validate", help="run the Great Expectations suite over the dataset").set_defaults(
        handler=_validate
    )
    commands.add_parser("augment", help="write seeded augmented copies of the train split").set_defaults(
        handler=_augment
    )
    commands.add_parser("version", help="version data/ with DVC and push it to the remote").set_defaults(
        handler=_version
    )

    train = commands.add_parser("train", help="train a candidate with a tf.distribute strategy, log it to MLflow")
    train.add_argument("--workers", type=int, help="local worker processes (default: train.workers)")
    train.add_argument("--data-version", help="DVC data version to train on (default: the workspace's)")
    train.add_argument("--job-id", help="resume or reuse this training job (default: a new one)")
    train.add_argument("--max-restarts", type=int, help="restarts of the worker group (default: train.max_restarts)")
    train.add_argument("--force", action="store_true", help="train even if data, code and params are unchanged")
    train.set_defaults(handler=_train)
    for name, handler, text in (
        ("evaluate", _evaluate, "score the candidate and the champion on the same test split"),
        ("gate", _gate, "judge the evaluated candidate against the thresholds"),
        ("register", _register, "register a candidate that passed its gate as challenger"),
    ):
        step = commands.add_parser(name, help=text)
        step.add_argument("--run-id", help="the candidate's MLflow run (default: the last training run)")
        if name == "gate":
            step.add_argument("--fail-on-reject", action="store_true", help="exit 1 when the gate fails")
        step.set_defaults(handler=handler)

    promote = commands.add_parser("promote", help="make a registered version champion (checked and audited)")
    promote.add_argument("--version", required=True, help="a version number, challenger, or previous")
    promote.add_argument("--reason", required=True, help="why (recorded on the version and in the history)")
    promote.add_argument("--force", action="store_true", help="promote even if its gate failed (recorded)")
    promote.set_defaults(handler=_promote)
    rollback = commands.add_parser("rollback", help="make the previous champion champion again")
    rollback.add_argument("--reason", required=True)
    rollback.set_defaults(handler=_rollback)
    compare = commands.add_parser("compare", help="two models side by side: params, metrics, paired test, data, code")
    compare.add_argument("a", metavar="A", help="a version number, champion, challenger, or an MLflow run id")
    compare.add_argument("b", metavar="B", help="the other model, named the same ways")
    compare.add_argument("--json", action="store_true", help="print the report as JSON")
    compare.add_argument("--html", type=Path, help="also write the report as an HTML page to this file")
    compare.set_defaults(handler=_compare)
    status = commands.add_parser("status", help="champion, challenger, recent runs, champion history")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    serve = commands.add_parser("serve", help="serve the champion over HTTP (follows the alias, swaps safely)")
    serve.add_argument("--host", help="address to listen on (default: serve.host)")
    serve.add_argument("--port", type=int, help="port (default: serve.port)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(handler=_serve)
    predict = commands.add_parser("predict", help="send images to the prediction service; print class and version")
    predict.add_argument("files", nargs="+", type=Path, metavar="FILE")
    predict.add_argument("--endpoint", help="the service's URL (default: the first of serve.endpoints)")
    predict.set_defaults(handler=_predict)

    data = commands.add_parser("data", help="data versions: list, checkout")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    checkout = data_commands.add_parser("checkout", help="restore the exact bytes of a data version")
    checkout.add_argument("data_version", metavar="VERSION")
    checkout.set_defaults(handler=_data_checkout)
    data_commands.add_parser("list", help="list recorded data versions").set_defaults(handler=_data_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mlops`` with ``argv``; return the exit status."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        project = Project.load(args.params)
        handler(project, args)
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
