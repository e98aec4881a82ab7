"""Model inputs from the versioned manifest: file lists, a ``tf.data`` pipeline, and plain arrays.

The ``tf.data`` pipeline shards file names per worker before decoding (each worker reads only its
share), decodes in parallel, normalises to [0, 1], caches, shuffles with a seed, batches and
prefetches with AUTOTUNE. TensorFlow is imported inside functions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipelines.data.manifest import read_manifest
from pipelines.errors import PipelineError
from pipelines.project import Project


@dataclass(frozen=True)
class SplitFiles:
    """The absolute image paths and integer labels of one split."""

    split: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.paths)


def split_files(project: Project, split: str, include_augmented: bool = False) -> SplitFiles:
    """Files of ``split`` from the manifest (plus augmented train copies when asked), sorted by path."""
    classes = project.config.dataset.classes
    index = {name: position for position, name in enumerate(classes)}
    rows = [row for row in read_manifest(project.manifest_path) if row.split == split]
    if include_augmented and split == "train" and project.augmented_manifest_path.is_file():
        rows += read_manifest(project.augmented_manifest_path)
    unknown = sorted({row.label for row in rows} - set(index))
    if unknown:
        raise PipelineError(f"{project.manifest_path}: labels {unknown} are not in dataset.classes")
    rows.sort(key=lambda row: row.path)
    return SplitFiles(
        split=split,
        paths=tuple(str(project.dataset_dir / row.path) for row in rows),
        labels=tuple(index[row.label] for row in rows),
    )


def input_shape(project: Project) -> tuple[int, int, int]:
    """The model's input shape (height, width, channels) from the configuration the manifest obeys."""
    height, width = project.config.dataset.image_size
    return height, width, project.config.dataset.channels


def load_arrays(project: Project, split: str) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Decode a whole split into memory: images as float32 in [0, 1] (N, H, W, C) and labels (N,)."""
    files = split_files(project, split)
    if not files.paths:
        raise PipelineError(f"{project.manifest_path}: the {split} split has no rows")
    mode = "L" if project.config.dataset.channels == 1 else "RGB"
    images = np.stack([_decode(path, mode) for path in files.paths])
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return images, np.asarray(files.labels, dtype=np.int64)


def _decode(path: str, mode: str) -> NDArray[np.float32]:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode), dtype=np.float32) / 255.0


def make_dataset(
    files: SplitFiles,
    *,
    channels: int,
    batch_size: int,
    training: bool,
    seed: int,
    shuffle_buffer: int = 4096,
    num_shards: int = 1,
    shard_index: int = 0,
) -> Any:
    """A batched ``tf.data.Dataset`` of (image, label) for one worker's shard of ``files``.

    ``batch_size`` is this worker's batch. Training datasets repeat forever (pass ``steps_per_epoch``
    to ``fit`` so every worker runs the same number of steps) and are shuffled with ``seed``.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    dataset = tf.data.Dataset.from_tensor_slices((list(files.paths), list(files.labels)))
    if num_shards > 1:
        dataset = dataset.shard(num_shards, shard_index)

    def decode(path: Any, label: Any) -> tuple[Any, Any]:
        image = tf.io.decode_png(tf.io.read_file(path), channels=channels)
        return tf.cast(image, tf.float32) / 255.0, label

    dataset = dataset.map(decode, num_parallel_calls=autotune, deterministic=True).cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    # Sharding is done above, by file name; Keras must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return dataset.with_options(options).prefetch(autotune)
