"""The data half of the flow: images in, a validated, augmented, versioned dataset out.

``ingest`` (sources -> ``data/<name>/`` + manifest) -> ``validate`` (Great Expectations) -> ``augment``
(seeded copies of the train split) -> ``versioning`` (DVC add, push, checkout). ``manifest`` is the
contract between them. Modules here import only the top-level ``config``, ``project`` and ``errors``.
"""
