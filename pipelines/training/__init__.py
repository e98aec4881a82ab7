"""Training: a candidate model from a data version, under a ``tf.distribute`` strategy, tracked in MLflow.

``train`` is the step; ``inputs`` builds the ``tf.data`` pipelines, ``strategy`` picks the distribution
strategy, ``launcher`` starts local worker processes, ``kubernetes`` runs the same workers as an indexed
Job, ``callbacks`` and ``reports`` are what the chief logs. Imports point down the flow: ``pipelines.data``
and the top-level modules only.
"""
