"""Model inputs from the versioned manifest: file lists, a ``tf.data`` pipeline, and plain arrays.

Images are read through :class:`~pipelines.data.packs.DatasetReader` (from the dataset's packs, or the
loose files of a dataset versioned before packs), each read bounded by ``ingest.max_file_bytes``. The
``tf.data`` pipeline shards the file list per worker first and reads only this worker's share, then
decodes the PNG bytes in parallel, caches the uint8 pixels, shuffles with a seed, batches, scales each batch
to [0, 1] and prefetches with AUTOTUNE. TensorFlow is imported inside functions only.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from pipelines.data.images import DATASET_FORMATS
from pipelines.data.manifest import read_manifest
from pipelines.data.packs import DatasetReader
from pipelines.errors import PipelineError
from pipelines.project import Project


@dataclass(frozen=True)
class SplitFiles:
    """The images of one split: manifest paths (relative to ``dataset_dir``) and integer labels.

    Read the images with :func:`read_images` (or a :class:`~pipelines.data.packs.DatasetReader` of
    ``dataset_dir``): with the packed layout they are members of ``images.zip`` and ``augmented.zip``,
    not files.
    """

    split: str
    paths: tuple[str, ...]
    labels: tuple[int, ...]
    dataset_dir: Path
    """The dataset folder the paths are relative to."""
    max_bytes: int
    """The most bytes one image may hold (``ingest.max_file_bytes``)."""

    def __len__(self) -> int:
        return len(self.paths)


def split_files(project: Project, split: str, include_augmented: bool = False) -> SplitFiles:
    """Images of ``split`` from the manifest (plus augmented train copies when asked), sorted by path."""
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
        paths=tuple(row.path for row in rows),
        labels=tuple(index[row.label] for row in rows),
        dataset_dir=project.dataset_dir,
        max_bytes=project.config.ingest.max_file_bytes,
    )


def read_images(files: SplitFiles, num_shards: int = 1, shard_index: int = 0) -> tuple[list[bytes], list[int]]:
    """The PNG bytes and labels of one shard of ``files`` (elements ``shard_index``, + ``num_shards``, ...).

    Only the shard's images are read. Raises :class:`~pipelines.data.packs.DatasetReadError` naming the
    file or pack of an image that cannot be read.
    """
    paths = files.paths[shard_index::num_shards]
    labels = list(files.labels[shard_index::num_shards])
    with DatasetReader(files.dataset_dir) as reader:
        return [reader.read(path, files.max_bytes) for path in paths], labels


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
    data, labels = read_images(files)
    images = np.stack([_decode(png, mode) for png in data])
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return images, np.asarray(labels, dtype=np.int64)


def _decode(png: bytes, mode: str) -> NDArray[np.float32]:
    with Image.open(io.BytesIO(png), formats=list(DATASET_FORMATS)) as image:
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

    The file list is sharded first (this worker's elements ``shard_index``, + ``num_shards``, ...) and only
    the shard's PNG bytes are read (:func:`read_images`), then decoded inside the pipeline. ``batch_size``
    is this worker's batch. Training datasets repeat forever (pass ``steps_per_epoch`` to ``fit`` so every
    worker runs the same number of steps) and are shuffled with ``seed``.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    data, labels = read_images(files, num_shards, shard_index)
    dataset = tf.data.Dataset.from_tensor_slices(
        (
            tf.constant(data, dtype=tf.string, shape=[len(data)]),
            tf.constant(labels, dtype=tf.int32, shape=[len(labels)]),
        )
    )
    del data

    def decode(png: Any, label: Any) -> tuple[Any, Any]:
        return tf.io.decode_png(png, channels=channels), label

    def scale(images: Any, labels: Any) -> tuple[Any, Any]:
        return tf.cast(images, tf.float32) / 255.0, labels

    # The cache holds the decoded uint8 pixels (a quarter of float32's memory); batches are scaled to [0, 1].
    dataset = dataset.map(decode, num_parallel_calls=autotune, deterministic=True).cache()
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    dataset = dataset.batch(batch_size, drop_remainder=training)
    dataset = dataset.map(scale, num_parallel_calls=autotune, deterministic=True)
    options = tf.data.Options()
    # Sharding is done above, by file name; Keras must not shard again.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.deterministic = True
    return dataset.with_options(options).prefetch(autotune)
