"""The prediction service's HTTP API (FastAPI): its routes and the service behind them.

* ``POST /predict`` – images as multipart files (PNG, JPEG, BMP, WebP...: ``ingest.image_formats``), one raw
  image body (``Content-Type: image/...``) or JSON ``{"images": [HxWxC arrays of 0-255 values]}``; answers,
  per image, the class, its confidence, every class probability and the image's sha256, with the model
  version and the request id. Bad input gets a 4xx whose ``detail`` names the problem; no champion a 503.
* ``POST /feedback`` – ``{"request_id", "image_index", "label", "keep_image"}``: the true label of a served
  image, logged for the monitor; with ``keep_image`` the normalised image is stored as training data.
* ``GET /health`` – 200 only once a model is loaded, warmed and checked; ``GET /model`` – what is served
  (version, run, data version, git commit, promotion); ``GET /metrics`` – Prometheus text.
* ``POST /admin/deploy`` – ``Authorization: Bearer <MLOPS_SERVE_TOKEN>``, optional ``{"version": "N"}``:
  load, check and swap to the champion now (what the promote DAG's ``deploy`` task calls). Without a token
  configured it answers 403 and the service still follows the alias every ``serve.poll_seconds``.

Every response of ``/predict`` names the exact version that computed it: a request takes the served model
once, when it starts (:mod:`~pipelines.release.serving.model_slot`). Request bodies are read by
:mod:`~pipelines.release.serving.bodies`; :mod:`~pipelines.release.serving.server` runs the app on uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response

from pipelines.project import Project
from pipelines.release.serving.batching import MicroBatcher, OverloadedError
from pipelines.release.serving.bodies import SMALL_BODY_BYTES, deploy_version, feedback_request, images_of, read_body
from pipelines.release.serving.client import TOKEN_ENV
from pipelines.release.serving.inputs import BadInputError, PreparedImage, model_batch
from pipelines.release.serving.metrics import ServiceMetrics
from pipelines.release.serving.model_slot import (
    DeployRefusedError,
    ModelSlot,
    NoChampionError,
    RegistryUnavailableError,
    ServedModel,
    SwapResult,
)
from pipelines.release.serving.prediction_log import (
    FLUSH_SECONDS,
    HeldImage,
    HeldImages,
    PredictionLog,
    now_iso,
    store_feedback_image,
)

log = logging.getLogger("pipelines.serve")


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type="application/json", headers=headers)


class Service:
    """What one running service holds: the model slot, the batcher, the log, held images and metrics."""

    def __init__(self, project: Project, token: str | None) -> None:
        settings = project.config.serve
        self.project = project
        self.config = project.config
        self._token = token or None
        self.metrics = ServiceMetrics()
        self.slot = ModelSlot(project)
        self.batcher = MicroBatcher(
            max_batch_size=settings.max_batch_size,
            max_wait_seconds=settings.max_batch_wait_ms / 1000.0,
            max_queue_images=settings.max_queue_images,
            on_batch=self.metrics.batch_size.observe,
        )
        self.held = HeldImages(settings.feedback_requests)
        self.log: PredictionLog | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[str] = set()
        self._entropy = b""
        self._offset = 0

    # ------------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Open the log, start the batcher, the alias poller (which loads the champion) and log rotation."""
        self.log = await asyncio.to_thread(PredictionLog, self.project)
        await self.batcher.start()
        self._tasks = [
            asyncio.create_task(self._follow_champion(), name="mlops-follow-champion"),
            asyncio.create_task(self._rotate_log(), name="mlops-rotate-log"),
        ]

    async def stop(self) -> None:
        """Stop the background tasks and the batcher; flush and close the log."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        if self.log is not None:
            await asyncio.to_thread(self.log.close)

    async def _follow_champion(self) -> None:
        while True:
            try:
                await self.deploy(None, from_poller=True)
            except Exception:  # whatever goes wrong, the poller keeps polling (and the model keeps serving)
                log.exception("following the champion alias failed; retrying in serve.poll_seconds")
            await asyncio.sleep(self.config.serve.poll_seconds)

    async def _rotate_log(self) -> None:
        interval = min(self.config.serve.log_rotate_seconds, FLUSH_SECONDS)
        while True:
            await asyncio.sleep(interval)
            if self.log is not None:
                await asyncio.to_thread(self.log.maybe_rotate)

    async def deploy(self, version: str | None, *, from_poller: bool = False) -> SwapResult | None:
        """Serve the champion (``version``, if given, must be it); the poller's failures are only logged."""
        try:
            result = await asyncio.to_thread(self.slot.deploy, version, retry_failed=not from_poller)
        except DeployRefusedError as error:
            if not from_poller or str(error) not in self._reported:
                self.metrics.swaps.labels("refused").inc()
                self._reported.add(str(error))
                log.warning("not serving the new champion: %s", error)
            if from_poller:
                return None
            raise
        except (NoChampionError, RegistryUnavailableError) as error:
            if from_poller:
                if str(error) not in self._reported:
                    self._reported.add(str(error))
                    log.warning("%s", error)
                return None
            raise
        if result.changed:
            model = self.slot.current
            assert model is not None
            self.metrics.swaps.labels("swapped").inc()
            self.metrics.served(model.name, model.version, model.run_id)
            log.info(
                "serving %s version %s (was %s), loaded and checked in %.1f s",
                model.name, result.version, result.previous or "none", result.seconds,
            )  # fmt: skip
        return result

    # ---------------------------------------------------------------------------------- helpers

    def _request_id(self) -> str:
        """128 random bits as hex: unguessable (feedback names requests by id), one system call per 256 ids."""
        if self._offset + 16 > len(self._entropy):
            self._entropy, self._offset = os.urandom(4096), 0
        self._offset += 16
        return self._entropy[self._offset - 16 : self._offset].hex()

    def unavailable(self) -> str:
        """Why no model serves yet."""
        status = self.slot.status
        name = self.slot.model_name
        if status == "no champion":
            return f"no champion: {name} has no version with the alias 'champion' yet (promote one)"
        if status.startswith("loading"):
            return f"{name}: {status}, not ready yet"
        failed = "; ".join(f"version {version}: {reason}" for version, reason in self.slot.failed.items())
        return f"{name}: no model loaded ({status}){': ' + failed if failed else ''}"

    def authorise(self, request: Request) -> None:
        """Refuse an admin call without the service's bearer token (403 when no token is configured)."""
        if self._token is None:
            raise BadInputError(
                403,
                "admin_disabled",
                f"the admin endpoint is disabled: the service was started without {TOKEN_ENV}; it follows the "
                f"champion alias every serve.poll_seconds ({self.config.serve.poll_seconds:g} s)",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise BadInputError(
                401, "unauthorised", "send Authorization: Bearer <token> (the service's MLOPS_SERVE_TOKEN)"
            )
        if not hmac.compare_digest(given.strip().encode("utf-8"), self._token.encode("utf-8")):
            raise BadInputError(401, "unauthorised", "the bearer token is not this service's MLOPS_SERVE_TOKEN")

    # ---------------------------------------------------------------------------------- endpoints

    async def predict(self, request: Request) -> Response:
        """``POST /predict``."""
        model = self.slot.current  # taken once: this request finishes on this model whatever swaps meanwhile
        if model is None:
            raise BadInputError(503, "no_model", self.unavailable())
        self.batcher.arriving += 1
        try:
            body = await read_body(request, self.config.serve.max_request_bytes, "serve.max_request_bytes")
            kind, images = await images_of(request, body, self.config)
        finally:
            self.batcher.arriving -= 1
        try:
            probabilities = await self.batcher.predict(model, model_batch(images))
        except OverloadedError as error:
            raise BadInputError(503, "overloaded", str(error)) from None
        finally:
            self.metrics.queued.set(self.batcher.queued_images)
        request_id = self._request_id()
        return _json(self._answer(request_id, kind, model, images, probabilities))

    def _answer(
        self, request_id: str, kind: str, model: ServedModel, images: list[PreparedImage], probabilities: Any
    ) -> dict[str, Any]:
        classes = model.classes
        predictions, summaries, held = [], [], []
        for index, (image, row) in enumerate(zip(images, probabilities, strict=True)):
            best = int(row.argmax())
            label, confidence = classes[best], float(row[best])
            predictions.append(
                {
                    "index": index,
                    "class": label,
                    "confidence": confidence,
                    "probabilities": {name: float(value) for name, value in zip(classes, row, strict=True)},
                    "sha256": image.sha256,
                }
            )
            summaries.append(
                {"sha256": image.sha256, "mean": round(image.mean, 6), "std": round(image.std, 6), "class": label,
                 "confidence": round(confidence, 6)}
            )  # fmt: skip
            held.append(HeldImage(image.png, image.sha256, label))
            self.metrics.predictions.labels(label, model.version).inc()
        self.held.hold(request_id, model.version, held)
        if self.log is not None:
            self.log.write(
                {"kind": "prediction", "request_id": request_id, "time": now_iso(), "model": model.name,
                 "model_version": model.version, "input": kind, "images": summaries}
            )  # fmt: skip
        return {
            "request_id": request_id,
            "model": model.name,
            "model_version": model.version,
            "predictions": predictions,
        }

    async def feedback(self, request: Request) -> Response:
        """``POST /feedback``."""
        body = await read_body(request, SMALL_BODY_BYTES, "the feedback body limit")
        checked = feedback_request(body, self.config.dataset.classes)
        request_id, index, label, keep = checked.request_id, checked.image_index, checked.label, checked.keep_image
        found = self.held.get(request_id)
        if found is None:
            raise BadInputError(
                404,
                "unknown_request",
                f"request id {request_id[:80]!r} is unknown to this service (it holds the last "
                f"{self.config.serve.feedback_requests} requests: serve.feedback_requests)",
            )
        version, images = found
        if not 0 <= index < len(images):
            raise BadInputError(
                422, "bad_index", f"image_index {index}: request {request_id} holds {len(images)} images"
            )
        if keep:
            try:
                await asyncio.to_thread(store_feedback_image, self.project, label, images[index])
            except Exception as error:
                from pipelines.tracking import redact

                raise BadInputError(503, "feedback_store", redact(f"cannot store the image: {error}")) from None
        if self.log is not None:
            self.log.write(
                {"kind": "feedback", "request_id": request_id, "time": now_iso(), "image_index": index,
                 "label": label, "model_version": version, "image_kept": keep}
            )  # fmt: skip
        return _json({"request_id": request_id, "image_index": index, "label": label, "image_kept": keep})

    async def admin_deploy(self, request: Request) -> Response:
        """``POST /admin/deploy``."""
        self.authorise(request)
        version = deploy_version(await read_body(request, SMALL_BODY_BYTES, "the admin body limit"))
        serving = self.slot.current
        try:
            result = await self.deploy(version)
        except (DeployRefusedError, NoChampionError) as error:
            kept = serving.version if serving is not None else None
            return _json({"detail": str(error), "error": "refused", "serving": kept}, status=409)
        except RegistryUnavailableError as error:
            raise BadInputError(503, "registry_unavailable", str(error)) from None
        assert result is not None
        return _json(
            {"version": result.version, "previous": result.previous, "changed": result.changed,
             "seconds": round(result.seconds, 3)}
        )  # fmt: skip

    def health(self) -> Response:
        """``GET /health``."""
        model = self.slot.current
        if model is None:
            return _json(
                {"status": self.slot.status, "model": self.slot.model_name, "detail": self.unavailable()}, status=503
            )
        return _json({"status": "ready", "model": model.name, "version": model.version})

    def model(self) -> Response:
        """``GET /model``."""
        model = self.slot.current
        failed = dict(self.slot.failed)
        if model is None:
            return _json(
                {
                    "detail": self.unavailable(),
                    "model": self.slot.model_name,
                    "status": self.slot.status,
                    "failed": failed,
                },
                status=503,
            )
        return _json({**model.describe(), "status": self.slot.status, "failed": failed})


def create_app(project: Project, *, token: str | None = None) -> FastAPI:
    """The service's FastAPI app over ``project``'s registry (``token``: the admin token, or None)."""
    service = Service(project, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="mlops prediction service",
        description=__doc__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service

    async def observed(endpoint: str, handler: Callable[[], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        try:
            response = await handler()
        except BadInputError as error:
            service.metrics.errors.labels(error.kind).inc()
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            response = _json({"detail": error.message, "error": error.kind}, status=error.status, headers=headers)
        except Exception:
            service.metrics.errors.labels("internal").inc()
            log.exception("internal error in %s", endpoint)
            response = _json(
                {"detail": f"internal error in {endpoint} (see the service's log)", "error": "internal"}, 500
            )
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await observed("/predict", lambda: service.predict(request))

    @app.post("/feedback")
    async def feedback(request: Request) -> Response:
        return await observed("/feedback", lambda: service.feedback(request))

    @app.post("/admin/deploy")
    async def admin_deploy(request: Request) -> Response:
        return await observed("/admin/deploy", lambda: service.admin_deploy(request))

    @app.get("/health")
    async def health() -> Response:
        return service.health()

    @app.get("/model")
    async def model() -> Response:
        return service.model()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
