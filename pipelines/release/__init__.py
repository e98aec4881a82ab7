"""Release: from a trained candidate to the model that serves production.

``metrics`` and ``gate`` are pure scoring and thresholds; ``evaluate`` compares a candidate with the
champion on the same test split; ``register`` makes a passing candidate the ``challenger``; ``promote``
moves ``champion``, after ``infra_check`` (which runs ``consumer_check`` in a clean process), recording each
change in ``champion_ledger``; ``status`` reports. Imports point down the flow: ``pipelines.training``,
``pipelines.data`` and the top-level modules.
"""
