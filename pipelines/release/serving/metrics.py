"""The service's Prometheus metrics, in a registry of its own (so several apps in one process never clash).

Requests by endpoint and status, errors by kind, request latency, predictions per class, the served model
version, batch sizes, images waiting for the model, and swaps by outcome; ``GET /metrics`` renders them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """Every metric the service exports, registered in one :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlops_serve_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "mlops_serve_errors", "Refused or failed requests by kind", ["kind"], registry=self.registry
        )
        self.latency = Histogram(
            "mlops_serve_request_seconds", "Request latency by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.predictions = Counter(
            "mlops_serve_predictions", "Predicted images by class and model version", ["class_name", "version"],
            registry=self.registry,
        )  # fmt: skip
        self.model_version = Gauge(
            "mlops_serve_model_version", "Registered version being served (0: none)", registry=self.registry
        )
        self.model_info = Info("mlops_serve_model", "The model being served", registry=self.registry)
        self.batch_size = Histogram(
            "mlops_serve_batch_images", "Images per model call", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queued = Gauge("mlops_serve_queued_images", "Images waiting for the model", registry=self.registry)
        self.swaps = Counter("mlops_serve_swaps", "Model loads by outcome", ["outcome"], registry=self.registry)

    def served(self, name: str, version: str, run_id: str) -> None:
        """Record that ``version`` of ``name`` (from ``run_id``) now serves."""
        self.model_version.set(int(version) if version.isdigit() else 0)
        self.model_info.info({"model": name, "version": version, "run_id": run_id})

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
