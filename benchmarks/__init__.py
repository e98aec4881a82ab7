"""Benchmarks of the pipeline: throughput, overhead and scaling, each reported as a ratio to a plain baseline.

Run with ``python -m benchmarks.run`` (``make bench``) from the repository root. The project's rule: a speed
target is measured here, against a plain baseline run by the same script, never by a timed assertion in a
test. See ``benchmarks/README.md`` for what each benchmark measures and how.
"""
