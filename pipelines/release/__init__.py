"""Release: from a trained candidate to the model that serves production.

``metrics`` and ``gate`` are pure scoring and thresholds; ``evaluate`` compares a candidate with the
champion on the same test split; ``register`` makes a passing candidate the ``challenger``; ``promote``
(with ``consumer_check`` in a clean process) moves ``champion``; ``status`` reports. Imports point down the
flow: ``pipelines.training``, ``pipelines.data`` and the top-level modules.
"""
