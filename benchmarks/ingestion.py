"""Ingest, validate and version speed on a generated folder of small PNG images, and a profile of ingest.

A folder of ``N`` 32x32 grayscale PNGs in 10 class folders (``0``..``9``) is generated deterministically
(a class-specific bar plus seeded noise, so no two images are equal). Then, in a project whose dataset
params match (classes ``0``..``9``, ``image_size [32, 32]``, ``channels 1``, a small minimum per split):

* :func:`pipelines.data.ingest.ingest` of ``folder:PATH``, images/s, against a plain loop doing the least the
  same result needs in one process (read, decode, re-encode PNG, sha256, write to a stored ZIP as ingest's
  ``images.zip``);
* :func:`pipelines.data.validate.validate_dataset`, images/s, against a plain loop doing the least per image
  (read from ``images.zip``, sha256, decode);
* :func:`pipelines.data.versioning.version_data` (``dvc add`` + ``dvc push``), seconds;
* ingest again over the dataset in place (what a scheduled retrain does), images/s;
* a second validate, and a first ingest into a fresh project, under :mod:`cProfile`; the top functions by
  cumulative and by own time go to ``benchmarks/profile-validate.txt`` and ``benchmarks/profile-ingest.txt``.
"""

from __future__ import annotations

import cProfile
import hashlib
import io
import pstats
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common import REPO_ROOT, Context, Outcome, Row, fmt, log, ratio, write_params

CLASSES = [str(digit) for digit in range(10)]
SIZE = 32
PROFILE_FILE = "profile-ingest.txt"
VALIDATE_PROFILE_FILE = "profile-validate.txt"
PROFILE_TOP = 15

T = TypeVar("T")


def generate_images(folder: Path, count: int, seed: int = 0) -> int:
    """Write ``count`` distinct 32x32 grayscale PNGs, round-robin over 10 class folders; return the count."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for index in range(count):
        label = index % len(CLASSES)
        pixels = rng.integers(0, 64, size=(SIZE, SIZE), dtype=np.uint8)
        pixels[:, 3 * label : 3 * label + 3] += 160
        pixels[3 * label : 3 * label + 3, :] += 80
        Image.fromarray(pixels, mode="L").save(folder / CLASSES[label] / f"{index:06d}.png")
    return count


def plain_ingest(source: Path, target: Path) -> int:
    """The least work ingest's output needs: read, decode, re-encode as PNG, sha256, write to a ZIP. Returns images.

    One process, as a plain script would do it; the output is a stored ZIP like ingest's ``images.zip``.
    """
    import zipfile

    from PIL import Image

    target.mkdir(parents=True, exist_ok=True)
    count = 0
    with zipfile.ZipFile(target / "images.zip", "w", zipfile.ZIP_STORED) as pack:
        for path in sorted(source.glob("*/*.png")):
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                image.load()
                pixels = image.convert("L")
            buffer = io.BytesIO()
            pixels.save(buffer, format="PNG")
            data = buffer.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            pack.writestr(f"images/{path.parent.name}/{digest[:16]}.png", data)
            count += 1
    return count


def plain_validate(dataset_dir: Path) -> int:
    """The least per-image work validation needs: read (from ``images.zip``), sha256, decode. Returns images."""
    import zipfile

    from PIL import Image

    count = 0
    with zipfile.ZipFile(dataset_dir / "images.zip") as pack:
        for info in pack.infolist():
            data = pack.read(info)
            hashlib.sha256(data).hexdigest()
            with Image.open(io.BytesIO(data)) as image:
                image.load()
            count += 1
    return count


def _timed(label: str, action: Callable[[], T]) -> tuple[T, float]:
    log(f"  {label}")
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def _import_validation_libraries() -> None:
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401


def _profiled(label: str, action: Callable[[], object]) -> tuple[cProfile.Profile, float]:
    log(f"  {label}")
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    try:
        action()
    finally:
        profiler.disable()
    return profiler, time.perf_counter() - started


def write_profile(profiler: cProfile.Profile, path: Path, header: str) -> str:
    """Write the top functions by cumulative time (and by own time) to ``path``; return the text."""
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stream.write(f"== top {PROFILE_TOP} functions by cumulative time ==\n")
    stats.sort_stats(pstats.SortKey.CUMULATIVE).print_stats(PROFILE_TOP)
    stream.write(f"\n== top {PROFILE_TOP} functions by own time (tottime) ==\n")
    stats.sort_stats(pstats.SortKey.TIME).print_stats(PROFILE_TOP)
    text = stream.getvalue()
    paths = sysconfig.get_paths()
    shorter = {
        paths["purelib"]: "site-packages/",
        paths["platlib"]: "site-packages/",
        paths["stdlib"]: "stdlib/",
        str(REPO_ROOT): "",
    }
    for prefix, short in shorter.items():
        text = text.replace(prefix.rstrip("/") + "/", short)
    path.write_text(header + "\n" + text, encoding="utf-8")
    return text


def bench_ingest(ctx: Context) -> Outcome:
    """Images/s of ingest and validate on generated PNGs (vs plain loops), version time, an ingest profile."""
    from pipelines.data.ingest import ingest
    from pipelines.data.validate import validate_dataset
    from pipelines.data.versioning import version_data
    from pipelines.project import Project

    root = ctx.folder("ingest")
    count = ctx.sizes.ingest_images
    source = root / "source"
    _, generate_seconds = _timed(f"generating {count} PNG images", lambda: generate_images(source, count))
    overrides: dict[str, dict[str, Any]] = {
        "dataset": {"name": "generated", "classes": CLASSES, "image_size": [SIZE, SIZE], "channels": 1},
        "validate": {"min_images_per_class_per_split": 1},
    }
    project = Project.load(write_params(root / "project", overrides))
    source_spec = f"folder:{source}"

    result, ingest_seconds = _timed("pipelines.data.ingest.ingest", lambda: ingest(project, source_spec))
    images = result.images
    _, plain_ingest_seconds = _timed("plain ingest loop", lambda: plain_ingest(source, root / "plain-ingest"))
    # Great Expectations and pandas are imported by the first validate_dataset call of a process: timed apart,
    # so the images/s figure does not depend on whether an earlier benchmark already imported them.
    _, import_seconds = _timed("import great_expectations, pandas", _import_validation_libraries)
    _, validate_seconds = _timed("pipelines.data.validate.validate_dataset", lambda: validate_dataset(project))
    _, plain_validate_seconds = _timed("plain validate loop", lambda: plain_validate(project.dataset_dir))
    version, version_seconds = _timed(
        "pipelines.data.versioning.version_data", lambda: version_data(project, source_spec)
    )
    # What a scheduled retrain does: ingest again over the dataset already in place (the old one is retired).
    _, reingest_seconds = _timed("pipelines.data.ingest.ingest over the dataset", lambda: ingest(project, source_spec))

    header = (
        f"on {count} generated {SIZE}x{SIZE} grayscale PNGs in 10 class folders; "
        "written by `python -m benchmarks.run --only ingest`\n"
    )
    validate_profile, profiled_validate_seconds = _profiled(
        "pipelines.data.validate.validate_dataset again, under cProfile", lambda: validate_dataset(project)
    )
    write_profile(
        validate_profile,
        ctx.out_dir / VALIDATE_PROFILE_FILE,
        f"cProfile of pipelines.data.validate.validate_dataset(project) {header}"
        f"wall {validate_seconds:.2f} s unprofiled (first call in the process), {profiled_validate_seconds:.2f} s "
        "under cProfile (second call: one-time setup already done)\n",
    )
    # The ingest profile is of a first ingest, like the timed one, in a fresh project with the same params.
    fresh = Project.load(write_params(root / "project-profile", overrides))
    ingest_profile, profiled_seconds = _profiled(
        "pipelines.data.ingest.ingest in a fresh project, under cProfile", lambda: ingest(fresh, source_spec)
    )
    profile_path = ctx.out_dir / PROFILE_FILE
    write_profile(
        ingest_profile,
        profile_path,
        f"cProfile of pipelines.data.ingest.ingest(project, 'folder:...') into an empty project {header}"
        f"wall {ingest_seconds:.2f} s unprofiled, {profiled_seconds:.2f} s under cProfile; "
        f"an ingest over an existing dataset took {reingest_seconds:.2f} s unprofiled\n",
    )

    def per_second(seconds: float) -> float:
        return images / seconds if seconds > 0 else 0.0

    ingest_rate, plain_ingest_rate = per_second(ingest_seconds), per_second(plain_ingest_seconds)
    reingest_rate = per_second(reingest_seconds)
    validate_rate, plain_validate_rate = per_second(validate_seconds), per_second(plain_validate_seconds)
    files, size = version.files, version.bytes
    imported = (
        f"importing GX + pandas before it took {import_seconds:.1f} s (not included)"
        if import_seconds >= 0.05
        else "GX + pandas already imported by an earlier benchmark"
    )
    rows = [
        Row(
            "ingest",
            "images/s: ingest folder:PATH vs plain decode/encode/hash/write loop",
            fmt(ingest_rate, 0),
            fmt(plain_ingest_rate, 0),
            fmt(ratio(ingest_rate, plain_ingest_rate)),
            f"{images} images in {ingest_seconds:.1f} s, into an empty project; profile in benchmarks/{PROFILE_FILE}",
        ),
        Row(
            "ingest",
            "images/s: ingest again over the existing dataset (scheduled retrain)",
            fmt(reingest_rate, 0),
            fmt(plain_ingest_rate, 0),
            fmt(ratio(reingest_rate, plain_ingest_rate)),
            f"{reingest_seconds:.1f} s; includes retiring (deleting) the previous dataset folder",
        ),
        Row(
            "ingest",
            "images/s: validate_dataset (Great Expectations) vs plain read/hash/decode loop",
            fmt(validate_rate, 0),
            fmt(plain_validate_rate, 0),
            fmt(ratio(validate_rate, plain_validate_rate)),
            f"{validate_seconds:.1f} s, first call in the process; {imported}; "
            f"profile in benchmarks/{VALIDATE_PROFILE_FILE}",
        ),
        Row(
            "ingest",
            "s: version_data (dvc add + push)",
            fmt(version_seconds, 1),
            note=f"{files} files, {size / 1e6:.1f} MB",
        ),
    ]
    data = {
        "images": images,
        "generate_seconds": generate_seconds,
        "ingest_seconds": ingest_seconds,
        "ingest_images_per_second": ingest_rate,
        "reingest_seconds": reingest_seconds,
        "reingest_images_per_second": reingest_rate,
        "plain_ingest_images_per_second": plain_ingest_rate,
        "validation_import_seconds": import_seconds,
        "validate_seconds": validate_seconds,
        "validate_images_per_second": validate_rate,
        "plain_validate_images_per_second": plain_validate_rate,
        "version_seconds": version_seconds,
        "version_files": files,
        "version_bytes": size,
        "profiled_ingest_seconds": profiled_seconds,
        "profiled_validate_seconds": profiled_validate_seconds,
        "profile_file": str(profile_path),
        "validate_profile_file": str(ctx.out_dir / VALIDATE_PROFILE_FILE),
    }
    return Outcome(rows, data)
