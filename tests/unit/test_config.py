from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

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


HOSTILE_VALUES: dict[str, tuple[str, str]] = {
    # dataset.name becomes data/<name>/: one plain folder name only.
    "name_dot": ("dataset:\n  name: '.'\n", "dataset.name"),
    "name_dot_dot": ("dataset:\n  name: '..'\n", "dataset.name"),
    "name_empty": ("dataset:\n  name: ''\n", "dataset.name"),
    "name_slash": ("dataset:\n  name: a/b\n", "dataset.name"),
    "name_backslash": ("dataset:\n  name: 'a\\b'\n", "dataset.name"),
    "name_nul": ('dataset:\n  name: "a\\0b"\n', "dataset.name"),
    "name_leading_dot": ("dataset:\n  name: .hidden\n", "dataset.name"),
    # Class names become data/<name>/images/<class>/ and augmented/<class>/.
    "class_slash": ("dataset:\n  classes: [a, b/c]\n", "dataset.classes.1"),
    "class_dot_dot": ("dataset:\n  classes: [a, '..']\n", "dataset.classes.1"),
    "class_dot": ("dataset:\n  classes: ['.', b]\n", "dataset.classes.0"),
    "class_empty": ("dataset:\n  classes: [a, '']\n", "dataset.classes.1"),
    "class_backslash": ("dataset:\n  classes: [a, 'x\\y']\n", "dataset.classes.1"),
    "class_nul": ('dataset:\n  classes: [a, "x\\0y"]\n', "dataset.classes.1"),
    "class_leading_dot": ("dataset:\n  classes: [a, .b]\n", "dataset.classes.1"),
    # An infinite or NaN threshold or budget switches its check off (NaN compares false with everything).
    "drift_tolerance_inf": ("validate:\n  drift_tolerance: .inf\n", "validate.drift_tolerance"),
    "imbalance_nan": ("validate:\n  max_class_imbalance_ratio: .nan\n", "validate.max_class_imbalance_ratio"),
    "min_accuracy_nan": ("gate:\n  min_accuracy: .nan\n", "gate.min_accuracy"),
    "min_macro_f1_nan": ("gate:\n  min_macro_f1: .nan\n", "gate.min_macro_f1"),
    "max_primary_drop_nan": ("gate:\n  max_primary_drop: .nan\n", "gate.max_primary_drop"),
    "max_class_recall_drop_nan": ("gate:\n  max_class_recall_drop: .nan\n", "gate.max_class_recall_drop"),
    "latency_budget_inf": ("promote:\n  p95_latency_budget_ms: .inf\n", "promote.p95_latency_budget_ms"),
    "learning_rate_inf": ("train:\n  learning_rate: .inf\n", "train.learning_rate"),
    "learning_rate_nan": ("train:\n  learning_rate: .nan\n", "train.learning_rate"),
    "rotation_nan": ("augment:\n  rotation_degrees: .nan\n", "augment.rotation_degrees"),
    "noise_nan": ("augment:\n  noise_std: .nan\n", "augment.noise_std"),
    "split_fraction_nan": (
        "ingest:\n  split_fractions: {train: .nan, val: 0.5, test: 0.5}\n",
        "ingest.split_fractions.train",
    ),
    "split_fraction_negative_inf": (
        "ingest:\n  split_fractions: {train: 0.7, val: -.inf, test: 0.15}\n",
        "ingest.split_fractions.val",
    ),
    # A cron expression Airflow cannot parse used to break the DAG import instead.
    "cron_out_of_range": ("schedule:\n  cron: '61 * * * *'\n", "schedule.cron"),
    "cron_four_fields": ("schedule:\n  cron: '0 3 * *'\n", "schedule.cron"),
    "cron_words": ("schedule:\n  cron: every monday\n", "schedule.cron"),
    "cron_reboot": ("schedule:\n  cron: '@reboot'\n", "schedule.cron"),
    "cron_empty": ("schedule:\n  cron: ''\n", "schedule.cron"),
    # The decoder allowlist: only formats ingest knows, each once, at least one.
    "formats_eps": ("ingest:\n  image_formats: [PNG, EPS]\n", "ingest.image_formats.1"),
    "formats_lower_case": ("ingest:\n  image_formats: [png]\n", "ingest.image_formats.0"),
    "formats_empty": ("ingest:\n  image_formats: []\n", "ingest.image_formats"),
    "formats_twice": ("ingest:\n  image_formats: [PNG, PNG]\n", "ingest.image_formats"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_VALUES))
def test_value_that_would_break_a_later_step_names_the_key(tmp_path: Path, case: str) -> None:
    text, key = HOSTILE_VALUES[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert f"  {key}:" in message, f"{case}: the error names the key {key}: {message}"
    assert str(path) in message, f"{case}: the error names the configuration file: {message}"


def float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every float field of ``model`` and its sections."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(float_fields(annotation, f"{key}."))
        elif annotation is float:
            keys.append(key)
    return keys


def test_every_float_setting_refuses_infinity(tmp_path: Path) -> None:
    keys = float_fields(Config)
    expected = {"validate.drift_tolerance", "gate.min_accuracy", "promote.p95_latency_budget_ms", "train.learning_rate"}
    assert expected <= set(keys), f"the walk finds the float settings of every section: {keys}"
    for key in keys:
        section, name = key.split(".")
        path = write(tmp_path, f"{section}:\n  {name}: .inf\n")
        with pytest.raises(ConfigError, match=rf"  {re.escape(key)}: .*finite") as raised:
            load_config(path)
        assert str(path) in str(raised.value), f"{key}: the error names the configuration file"


VALID_CRONS = ["0 3 * * 1", "*/15 * * * *", "0 3 * * mon", "@daily", "@weekly", "@quarterly", "0 0 1 1 *"]
INVALID_CRONS = ["61 * * * *", "0 3 * *", "every monday", "@reboot", "@once", "0 3 * * 8"]


def test_cron_verdicts_match_airflows_timetable(tmp_path: Path) -> None:
    from airflow.sdk import CronTriggerTimetable
    from airflow.sdk.exceptions import AirflowTimetableInvalid

    for expression in VALID_CRONS + INVALID_CRONS:
        try:
            CronTriggerTimetable(expression, timezone="UTC").validate()
            airflow_accepts = True
        except AirflowTimetableInvalid:
            airflow_accepts = False
        try:
            load_config(write(tmp_path, f"schedule:\n  cron: '{expression}'\n"))
            refusal = ""
        except ConfigError as error:
            refusal = str(error)
        we_accept = not refusal
        assert we_accept or "schedule.cron" in refusal, f"{expression!r}: the error names schedule.cron: {refusal}"
        assert we_accept == airflow_accepts, (
            f"{expression!r}: params.yaml {'accepts' if we_accept else 'refuses'} it, "
            f"Airflow's CronTriggerTimetable {'accepts' if airflow_accepts else 'refuses'} it"
        )
        assert we_accept == (expression in VALID_CRONS), (
            f"{expression!r} is expected to be {'valid' if we_accept else 'invalid'}"
        )


def test_null_cron_means_no_schedule(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "schedule:\n  cron: null\n")).schedule.cron is None, "null: data-driven only"
