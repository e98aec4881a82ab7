from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import Config, load_config
from pipelines.errors import ConfigError
from tests.support import REPO_ROOT

REPO_PARAMS = REPO_ROOT / "params.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_repository_params_load() -> None:
    config = load_config(REPO_PARAMS)
    assert config.dataset.name == "digits", "the shipped params.yaml describes the digits sample"
    assert config.ingest.source == "sample", "the built-in sample is the default source"
    assert config.augment.horizontal_flip is False, "flips corrupt digits and are off by default"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config(), "an empty params.yaml means every default"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    with pytest.raises(Exception, match="frozen"):
        config.dataset.channels = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset:\n  channels: '1'\n", r"dataset\.channels: .*got '1'"),
        ("augment:\n  copies: two\n", r"augment\.copies: .*got 'two'"),
        ("augment:\n  horizontal_flip: 1\n", r"augment\.horizontal_flip: .*got 1"),
        ("dataset:\n  image_size: [32]\n", r"dataset\.image_size"),
        ("validate:\n  min_images_per_class_per_split: 0\n", r"validate\.min_images_per_class_per_split"),
        ("augment:\n  rotation: 10\n", r"augment\.rotation: unknown key"),
        ("trainer: {}\n", r"trainer: unknown key"),
        ("ingest:\n  split_fractions: {train: 0.5, val: 0.2, test: 0.2}\n", r"add up to 1"),
        ("dataset:\n  classes: [a]\n", r"at least two classes"),
        ("- just\n- a list\n", r"top level must be a mapping"),
        ("dataset: [unclosed\n", r"not valid YAML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as raised:
        load_config(path)
    assert str(path) in str(raised.value), "the error names the configuration file"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(tmp_path / "nope.yaml")
