"""Who is champion and how it got there: the champion ledger, kept in the registry itself.

Each promotion or rollback is a version of a second registered model, ``<model>.champion-ledger``
(:func:`ledger_name`), numbered by the registry atomically, so promotions from several hosts are ordered
without a shared lock. :func:`champion_history` reads it (after the entries earlier releases kept as tags of
the registered model), :func:`record_change` appends to it and :func:`converge_champion` points the
``champion`` alias at its newest entry. :func:`registry_client` and :func:`alias_version` are the registry
reads the promotion steps share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipelines.project import CHAMPION_ALIAS, Project

HISTORY_TAG_PREFIX = "champion_history."
"""Where releases before the ledger kept the history (tags of the registered model); still read."""
LEDGER_SUFFIX = ".champion-ledger"
ENTRY_TAG = "entry"


@dataclass(frozen=True)
class HistoryEntry:
    """One change of champion: which version, which it replaced, when, by whom, why."""

    sequence: int
    version: str
    previous: str | None
    at: str
    by: str
    reason: str
    forced: bool
    action: str
    ledger_version: int | None = None
    """The ledger model's version recording this change (None for entries kept as tags before the ledger)."""


def registry_client(project: Project) -> Any:
    """An ``MlflowClient`` connected to the project's tracking server and registry."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import connect

    connect(project)
    return MlflowClient()


_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version holding ``alias``, None when none does; a server that is away is waited for, not read as none."""
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import with_retries

    def read() -> str | None:
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as error:
            if error.error_code in _MISSING:
                return None
            raise

    return with_retries(read, f"read the alias {alias!r} of {name}")


def ledger_name(model_name: str) -> str:
    """The registered model whose versions are the champion changes of ``model_name``, in order."""
    return f"{model_name}{LEDGER_SUFFIX}"


def _ledger(client: Any, model_name: str) -> list[tuple[int, dict[str, Any]]]:
    """(ledger version, entry) of every champion change recorded in the ledger, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{ledger_name(model_name)}'")
    except MlflowException as error:
        if error.error_code in _MISSING:
            return []
        raise
    entries = [(int(item.version), json.loads(item.tags[ENTRY_TAG])) for item in versions if ENTRY_TAG in item.tags]
    return sorted(entries, key=lambda pair: pair[0])


def champion_history(project: Project) -> list[HistoryEntry]:
    """Every change of champion, oldest first.

    Changes are versions of the ledger model (:func:`ledger_name`), numbered by the registry itself, so
    promotions from several hosts at once are ordered without a shared lock; each entry's ``previous`` is
    the version of the entry before it. Entries kept as tags of the registered model by earlier releases
    come first.
    """
    from mlflow.exceptions import MlflowException

    client = registry_client(project)
    name = project.config.registry.model_name
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as error:
        if error.error_code in _MISSING:
            return []
        raise
    history = sorted(
        (HistoryEntry(**json.loads(value)) for key, value in tags.items() if key.startswith(HISTORY_TAG_PREFIX)),
        key=lambda entry: entry.sequence,
    )
    for number, recorded in _ledger(client, name):
        previous = history[-1].version if history else None
        history.append(HistoryEntry(sequence=len(history) + 1, previous=previous, ledger_version=number, **recorded))
    return history


def champion_at(project: Project, when: datetime) -> HistoryEntry | None:
    """The history entry that made the champion serving at ``when`` (UTC), or None before the first."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    serving = None
    for entry in champion_history(project):
        if datetime.fromisoformat(entry.at) <= when:
            serving = entry
    return serving


def record_change(client: Any, name: str, version: str, entry: dict[str, Any]) -> int:
    """Append ``entry`` to the ledger and return its ledger version (a retry finding it last appends nothing).

    The registry numbers the ledger's versions itself, atomically: that is the order of the history.
    """
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import with_retries

    ledger = ledger_name(name)
    recorded = _ledger(client, name)
    if recorded and recorded[-1][1]["version"] == version and recorded[-1][1]["reason"] == entry["reason"]:
        return recorded[-1][0]
    try:
        client.create_registered_model(
            ledger, description=f"Every change of champion of {name}, in order: one version per promotion or rollback"
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    promoted = client.get_model_version(name, version)

    def create() -> Any:
        return client.create_model_version(
            ledger,
            promoted.source,
            run_id=promoted.run_id,
            tags={ENTRY_TAG: json.dumps(entry), "model_version": version},
            description=f"{entry['action']} version {version}: {entry['reason']}",
            model_id=_logged_model_id(promoted),  # a tracking server checks the source against it
        )

    return int(with_retries(create, f"record the promotion of version {version}").version)


def _logged_model_id(version: Any) -> str | None:
    """The logged model a registered version was made from: its ``model_id``, else read from ``models:/m-...``.

    A version read back from a tracking server may come without ``model_id``, while the server refuses a
    ``models:/<id>`` source unless the request names that same id.
    """
    model_id = getattr(version, "model_id", None)
    source = str(version.source or "")
    if not model_id and source.startswith("models:/m-"):
        model_id = source.removeprefix("models:/").split("/", 1)[0]
    return model_id or None


def converge_champion(client: Any, name: str, rounds: int = 10) -> str | None:
    """Point ``champion`` at the newest ledger entry's version until the ledger stops changing; return it.

    Every promoter does this after recording its entry, so whatever the interleaving across hosts the alias
    ends on the version of the last recorded change.
    """
    from pipelines.tracking import with_retries

    target: str | None = None
    for _ in range(rounds):
        recorded = _ledger(client, name)
        newest = str(recorded[-1][1]["version"]) if recorded else None
        if newest is None or newest == target:
            return target
        target = newest

        def point(version: str = newest) -> None:
            client.set_registered_model_alias(name, CHAMPION_ALIAS, version)

        with_retries(point, f"point the champion alias at version {newest}")
    return target
