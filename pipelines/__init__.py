"""Image-classification MLOps pipeline: data, training, release and platform stages, and the ``mlops`` CLI."""

import os

# tf-keras (Keras 2), not Keras 3, backs ``tf.keras`` in this project: Keras 3.15's ``model.fit`` fails
# under MultiWorkerMirroredStrategy (keras issue 20585). It must be set before TensorFlow is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
