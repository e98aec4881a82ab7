"""The registered model as MLflow loads it: a pyfunc over a TensorFlow SavedModel, naming the classes.

MLflow copies this file into every logged model ("models from code") and runs it when the model is loaded,
so it must stand alone: it imports only what the model declares as its requirements (mlflow, numpy, pandas,
tensorflow), never this project. The SavedModel (``model.export()`` of the trained network) needs no Keras
at load time, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` work in any process with those
packages, whatever ``TF_USE_LEGACY_KERAS`` says.

Input: float32 images of shape (N, height, width, channels) with values in [0, 1] (the model's signature).
Output: a DataFrame with one probability column per class name and a ``class`` column (the most probable).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel

CLASS_COLUMN = "class"


class ImageClassifier(PythonModel):
    """Probabilities per class and the predicted class of a batch of images."""

    def load_context(self, context: Any) -> None:
        """Load the SavedModel and the class names logged with it."""
        import tensorflow as tf

        self._tf = tf
        self._model = tf.saved_model.load(context.artifacts["saved_model"])
        self._classes = [str(name) for name in context.model_config["classes"]]

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score ``model_input`` (N, height, width, channels) float32 in [0, 1]."""
        images = np.asarray(model_input, dtype=np.float32)
        probabilities = self._model.serve(self._tf.constant(images)).numpy()
        frame = pd.DataFrame(probabilities, columns=self._classes)
        frame[CLASS_COLUMN] = np.asarray(self._classes, dtype=object)[probabilities.argmax(axis=1)]
        return frame


set_model(ImageClassifier())
