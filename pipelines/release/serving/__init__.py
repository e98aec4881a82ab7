"""The prediction service: serves the champion, swaps it with no failed request, logs what it served.

* :mod:`~pipelines.release.serving.app` – the FastAPI app (``/predict``, ``/feedback``, ``/health``,
  ``/model``, ``/metrics``, ``/admin/deploy``) and the service behind it;
* :mod:`~pipelines.release.serving.server` – how ``mlops serve`` runs the app on uvicorn (or a test, in a thread);
* :mod:`~pipelines.release.serving.bodies` – request bodies read within bounds: images, feedback, a version;
* :mod:`~pipelines.release.serving.model_slot` – load a registered version, warm it, check it on its
  infra-validation batch, swap it in with one reference assignment;
* :mod:`~pipelines.release.serving.batching` – concurrent requests predicted together, bounded;
* :mod:`~pipelines.release.serving.inputs` – request bodies to model input, through the shared preprocessing;
* :mod:`~pipelines.release.serving.prediction_log` – the rotating prediction log, feedback, kept images;
* :mod:`~pipelines.release.serving.metrics` – the Prometheus metrics;
* :mod:`~pipelines.release.serving.client` – what talks to running services: deploy, status, ``mlops predict``.
* :mod:`~pipelines.release.serving.kubernetes` – the Deployment and Services of the scaled-out column.

Importing this package is cheap: FastAPI, MLflow and TensorFlow are imported by the modules that need them.
"""
