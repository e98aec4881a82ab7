"""The registry's contract: how a trained network is logged so that anyone can load it with MLflow's own calls.

A model in the registry must load with ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and serve with
``mlflow models serve`` in a fresh process with no project variable set (tf-keras models only load with
``TF_USE_LEGACY_KERAS=1``). So the network is exported as a TensorFlow SavedModel (no Keras needed to load
it) and logged as a pyfunc "model from code" (:mod:`pipelines.training.pyfunc_model`) with:

* a signature describing what a client sends: float32 images (N, height, width, channels) in [0, 1], and
  what it gets back: one probability column per class name and a ``class`` column;
* an input example (real validation images), so a request can be built from the logged model alone;
* requirements pinned to the versions that trained it, told rather than inferred (inference would load the
  model in a subprocess, take seconds and, under ``TF_USE_LEGACY_KERAS``, list tf-keras instead of TensorFlow);
* metadata naming the contract version, the input range and the training libraries.

:func:`contract_problem` tells a version logged otherwise (the earlier tf-keras format) from one that keeps
the contract, by reading its ``MLmodel`` only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

CONTRACT = "pyfunc-savedmodel/1"
"""Written into every model's metadata; what :func:`contract_problem` looks for."""

MODEL_ARTIFACT = "model"
SAVED_MODEL_ARTIFACT = "saved_model"
SERVING_REQUIREMENTS = ("mlflow", "tensorflow", "numpy", "pandas", "cloudpickle")
TRAINING_LIBRARIES = ("tensorflow", "tf-keras")
CODE_LOADER = "mlflow.pyfunc.loaders.code_model"


def pinned_requirements() -> list[str]:
    """``package==version`` of everything the pyfunc model imports, as installed here (what trained it)."""
    return [f"{package}=={metadata.version(package)}" for package in SERVING_REQUIREMENTS]


def signature(input_shape: tuple[int, int, int], classes: Sequence[str]) -> Any:
    """The model signature: a float32 image tensor in, one probability column per class and ``class`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    height, width, channels = input_shape
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, channels))])
    outputs = Schema([*(ColSpec("float", str(name)) for name in classes), ColSpec("string", "class")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(network: Any, classes: Sequence[str], example: NDArray[np.float32]) -> Any:
    """Export ``network`` (a tf-keras model) as a SavedModel and log it to the active run as ``model``."""
    import mlflow

    from pipelines.training import pyfunc_model

    input_shape = tuple(int(side) for side in example.shape[1:])
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / SAVED_MODEL_ARTIFACT
        network.export(str(exported))
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=pyfunc_model.__file__,
            artifacts={SAVED_MODEL_ARTIFACT: str(exported)},
            model_config={"classes": [str(name) for name in classes]},
            signature=signature(input_shape, classes),  # type: ignore[arg-type]
            input_example=np.asarray(example, dtype=np.float32),
            pip_requirements=pinned_requirements(),
            metadata={
                "contract": CONTRACT,
                "input": f"float32 images {list(input_shape)} (height, width, channels) with values in [0, 1]",
                "classes": [str(name) for name in classes],
                "trained_with": {package: metadata.version(package) for package in TRAINING_LIBRARIES},
            },
        )


def contract_problem(model_uri: str) -> str | None:
    """Why the model at ``model_uri`` does not keep the registry's contract, or None when it does."""
    from mlflow.models import get_model_info

    info = get_model_info(model_uri)
    loader = info.flavors.get("python_function", {}).get("loader_module")
    if loader != CODE_LOADER or (info.metadata or {}).get("contract") != CONTRACT:
        return (
            f"{model_uri} was logged as {loader or 'an unknown flavour'}, not as a {CONTRACT} pyfunc: it loads only "
            "inside this project (tf-keras needs TF_USE_LEGACY_KERAS=1), not with mlflow.pyfunc.load_model elsewhere"
        )
    return None


def probabilities(predictions: Any, classes: Sequence[str]) -> NDArray[np.float64]:
    """The (N, k) probabilities, columns in the order of ``classes``, from the pyfunc model's output frame."""
    return np.asarray(predictions[[str(name) for name in classes]].to_numpy(), dtype=np.float64)
