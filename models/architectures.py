"""Keras architectures, chosen by ``train.architecture``.

Models are plain functional tf-keras models. Build them inside ``strategy.scope()`` so their
variables are created by (and mirrored across) the distribution strategy. Input shape and class
count come from the dataset manifest, never from constants.

tf-keras (Keras 2) is used rather than Keras 3: ``model.fit`` under ``MultiWorkerMirroredStrategy``
fails with Keras 3.15 (keras issue 20585), and works with tf-keras 2.21.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ARCHITECTURES = ("small_cnn", "resnet")


def _keras() -> Any:
    import tf_keras

    return tf_keras


def small_cnn(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A compact CNN for small grayscale images such as the 8x8 digits sample (about 150k parameters).

    Two 3x3 convolutions at full resolution, one max-pooling down to a 4x4 grid (so the parameter count does
    not grow with the image), then a dense layer on the flattened grid. Chosen by measurement on the sample
    (README, "Training"): a global-average-pooled variant lost 5 points at 8x8, BatchNorm was unstable at
    this batch size, dropout bought nothing.
    """
    keras = _keras()
    layers = keras.layers
    height, width = input_shape[0], input_shape[1]
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(pool_size=(max(1, height // 4), max(1, width // 4)))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def _residual_block(x: Any, filters: int, stride: int) -> Any:
    layers = _keras().layers
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def resnet(input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """A small ResNet (three stages of two residual blocks) for larger or colour images."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for filters, stride in ((32, 1), (64, 2), (128, 2)):
        x = _residual_block(x, filters, stride)
        x = _residual_block(x, filters, 1)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(num_classes, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="resnet")


BUILDERS: dict[str, Callable[[tuple[int, int, int], int], Any]] = {"small_cnn": small_cnn, "resnet": resnet}


def build_model(architecture: str, input_shape: tuple[int, int, int], num_classes: int) -> Any:
    """Build (uncompiled) the named architecture; call inside ``strategy.scope()``."""
    try:
        builder = BUILDERS[architecture]
    except KeyError:
        raise ValueError(
            f"train.architecture: unknown architecture {architecture!r}, expected {ARCHITECTURES}"
        ) from None
    return builder(input_shape, num_classes)
