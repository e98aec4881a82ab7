"""Exceptions the pipeline raises for problems a user can fix.

The CLI prints their message (no traceback) and exits non-zero; Airflow tasks let them fail the task.
"""


class PipelineError(Exception):
    """A problem with input, configuration or state that the user can fix.

    ``retryable`` says whether running the same step again may succeed without a fix (a server that was
    down, a crashed worker): Airflow retries those, and fails the others at once.
    """

    retryable = False


class ConfigError(PipelineError):
    """``params.yaml`` is missing, malformed, has an unknown key or a value of the wrong type."""


class IngestError(PipelineError):
    """The image source is missing, empty, unreadable or holds an invalid image."""


class DataValidationError(PipelineError):
    """The dataset failed its Great Expectations suite."""


class VersioningError(PipelineError):
    """DVC could not version, push or restore the dataset."""

    retryable = True


class PromotionError(PipelineError):
    """The version cannot be promoted (unknown, failed gate, failed infra validation)."""
