"""The model a service serves, and how a new version replaces it with no failed request.

:class:`ModelSlot` holds one :class:`ServedModel`. :meth:`ModelSlot.deploy` resolves the ``champion`` alias to
a version number itself, then loads that exact version (``models:/<name>/<version>``) with
``mlflow.pyfunc.load_model`` beside the one serving, warms it, checks it on the infra-validation batch its
evaluation logged (the same probabilities within ``serve.check_tolerance``) and only then swaps it in, with
one reference assignment under a lock. A request takes the reference once, when it starts, so requests in
flight finish on the model they started with. A version that fails to load or to check is never served: the
old one keeps serving, and the reason is kept (:attr:`ModelSlot.failed`) and raised as :class:`DeployRefusedError`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.errors import PipelineError
from pipelines.project import CHAMPION_ALIAS, Project

DETAIL_TAGS = ("data_version", "git_commit", "promoted_at", "promoted_by", "promotion_reason")
"""Registry tags of a version that ``GET /model`` reports."""


class DeployRefusedError(PipelineError):
    """A version cannot be served (it does not load, does not keep the contract, or fails its check)."""


class NoChampionError(PipelineError):
    """The registered model has no version with the alias ``champion`` yet."""


class RegistryUnavailableError(PipelineError):
    """The MLflow registry could not be asked which version is champion."""

    retryable = True


@dataclass(frozen=True)
class ServedModel:
    """One loaded, warmed and checked model version: what a request predicts with."""

    name: str
    version: str
    run_id: str
    classes: tuple[str, ...]
    model: Any = field(repr=False)
    details: Mapping[str, str]
    loaded_at: str
    load_seconds: float
    max_abs_difference: float

    def predict(self, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """(N, k) class probabilities of ``images`` (N, H, W, C) float32 in [0, 1], columns in ``classes`` order."""
        frame = self.model.predict(images)
        return np.asarray(frame[list(self.classes)].to_numpy(), dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        """What ``GET /model`` answers: version, run, data version, git commit, promotion, load figures."""
        return {
            "model": self.name,
            "version": self.version,
            "run_id": self.run_id,
            **{name: self.details.get(name, "") for name in DETAIL_TAGS},
            "classes": list(self.classes),
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "check_max_abs_difference": self.max_abs_difference,
        }


@dataclass(frozen=True)
class SwapResult:
    """The version serving after a deploy, the one before, and whether anything changed."""

    version: str
    previous: str | None
    changed: bool
    seconds: float


class ModelSlot:
    """The served model of one service, replaced only by a loaded, warmed and checked version."""

    def __init__(self, project: Project) -> None:
        self._project = project
        self._current: ServedModel | None = None
        self._swap_lock = threading.Lock()
        self._deploy_lock = threading.Lock()
        self.failed: dict[str, str] = {}
        """Versions that failed to load or check, with the reason; not retried by the alias poller."""
        self.status = "starting"
        """``starting``, ``loading version N``, ``ready``, ``no champion`` or ``registry unavailable: ...``."""
        self._mlflow: Any = None

    def _client(self) -> Any:
        """An MLflow client of the project's registry (connected once, then reused by every poll)."""
        if self._mlflow is None:
            from mlflow.tracking import MlflowClient

            from pipelines.tracking import connect

            connect(self._project)
            self._mlflow = MlflowClient()
        return self._mlflow

    @property
    def current(self) -> ServedModel | None:
        """The model serving now (None before the first version is in). Take it once per request."""
        return self._current

    @property
    def model_name(self) -> str:
        """The registered model this slot serves versions of."""
        return self._project.config.registry.model_name

    def champion_version(self) -> str:
        """The version number the ``champion`` alias points at; :class:`NoChampionError` when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            client = self._client()
            return str(client.get_model_version_by_alias(self.model_name, CHAMPION_ALIAS).version)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise NoChampionError(
                    f"{self.model_name} has no version with the alias {CHAMPION_ALIAS!r} yet (promote one)"
                ) from None
            raise RegistryUnavailableError(
                f"cannot ask the registry for {self.model_name}@{CHAMPION_ALIAS}: {error}"
            ) from None
        except PipelineError as error:  # tracking server unreachable after retries
            raise RegistryUnavailableError(str(error)) from None

    def deploy(self, expected: str | None = None, *, retry_failed: bool = True) -> SwapResult:
        """Serve the champion: load, warm and check it beside the current model, then swap (one at a time).

        ``expected``: the version the caller believes is champion (the promote DAG's); another champion is
        refused, so the service only ever serves the champion. With ``retry_failed`` False (the alias
        poller), a version that already failed is not loaded again. Raises :class:`NoChampionError`,
        :class:`DeployRefusedError` (the current model keeps serving) or :class:`RegistryUnavailableError`.
        """
        from pipelines.tracking import redact

        with self._deploy_lock:
            started = time.monotonic()
            try:
                champion = self.champion_version()
            except NoChampionError:
                if self._current is None:
                    self.status = "no champion"
                raise
            except RegistryUnavailableError as error:
                if self._current is None:
                    self.status = f"registry unavailable: {error}"
                raise
            if expected is not None and str(expected) != champion:
                raise DeployRefusedError(
                    f"version {expected} is not the champion of {self.model_name} (champion is version {champion}); "
                    "promote it first"
                )
            current = self._current
            if current is not None and current.version == champion:
                return SwapResult(champion, champion, False, time.monotonic() - started)
            if not retry_failed and champion in self.failed:
                raise DeployRefusedError(self.failed[champion])
            if current is None:
                self.status = f"loading version {champion}"
            try:
                loaded = self._load(champion)
            except DeployRefusedError as error:
                self.failed[champion] = str(error)
                if self._current is None:
                    self.status = f"version {champion} refused"
                raise
            except Exception as error:  # whatever loading a broken model raises, the old one keeps serving
                reason = redact(f"models:/{self.model_name}/{champion}: {type(error).__name__}: {error}")
                self.failed[champion] = reason
                if self._current is None:
                    self.status = f"version {champion} refused"
                raise DeployRefusedError(reason) from None
            with self._swap_lock:
                previous = self._current
                self._current = loaded
            self.status = "ready"
            self.failed.pop(champion, None)
            return SwapResult(champion, previous.version if previous else None, True, time.monotonic() - started)

    def _load(self, version: str) -> ServedModel:
        """Load ``version``, refuse it if it breaks the contract, warm it and check it on its infra batch."""
        import mlflow
        from mlflow.exceptions import MlflowException

        from pipelines.release.evaluate import INFRA_BATCH_ARTIFACT
        from pipelines.training.model_format import contract_problem

        config = self._project.config
        uri = f"models:/{self.model_name}/{version}"
        started = time.monotonic()
        client = self._client()
        registered = client.get_model_version(self.model_name, version)
        try:
            problem = contract_problem(uri)
        except Exception as error:
            raise DeployRefusedError(f"{uri}: cannot read its MLmodel ({type(error).__name__}: {error})") from None
        if problem is not None:
            raise DeployRefusedError(problem)
        try:
            model = mlflow.pyfunc.load_model(uri)
        except Exception as error:
            raise DeployRefusedError(f"{uri}: does not load ({type(error).__name__}: {error})") from None
        expected_shape = (*config.dataset.image_size, config.dataset.channels)
        shape = _input_shape(model)
        if shape is not None and shape != expected_shape:
            raise DeployRefusedError(
                f"{uri}: takes images of shape {shape}, but the service normalises images to {expected_shape} "
                "(dataset.image_size, dataset.channels)"
            )
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = client.download_artifacts(registered.run_id, INFRA_BATCH_ARTIFACT, folder)
            except MlflowException:
                raise DeployRefusedError(
                    f"{uri}: run {registered.run_id} has no {INFRA_BATCH_ARTIFACT} to check it on (evaluate it first)"
                ) from None
            with np.load(path) as stored:
                images = np.asarray(stored["images"], dtype=np.float32)
                expected = np.asarray(stored["probabilities"], dtype=np.float64)
        try:
            model.predict(images[: min(len(images), config.serve.max_batch_size)])  # warm: trace, allocate
            frame = model.predict(images)
        except Exception as error:
            raise DeployRefusedError(
                f"{uri}: fails to predict its infra batch ({type(error).__name__}: {error})"
            ) from None
        classes = tuple(str(column) for column in frame.columns if column != "class")
        actual = np.asarray(frame[list(classes)].to_numpy(), dtype=np.float64)
        if actual.shape != expected.shape:
            raise DeployRefusedError(
                f"{uri}: predicts {actual.shape[1]} classes on its infra batch, its evaluation {expected.shape[1]}"
            )
        difference = float(np.abs(actual - expected).max()) if actual.size else 0.0
        tolerance = config.serve.check_tolerance
        if not difference <= tolerance:
            raise DeployRefusedError(
                f"{uri}: its predictions on the infra-validation batch differ from those logged at evaluation by "
                f"{difference:.3g} (more than serve.check_tolerance={tolerance:g})"
            )
        details = {name: str(registered.tags.get(name, "")) for name in DETAIL_TAGS}
        return ServedModel(
            name=self.model_name,
            version=str(version),
            run_id=str(registered.run_id),
            classes=classes,
            model=model,
            details=details,
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
            load_seconds=time.monotonic() - started,
            max_abs_difference=difference,
        )


def _input_shape(model: Any) -> tuple[int, ...] | None:
    """(height, width, channels) of the pyfunc model's tensor input signature, or None when it has none."""
    try:
        spec = model.metadata.get_input_schema().inputs[0]
        return tuple(int(side) for side in spec.shape[1:])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
