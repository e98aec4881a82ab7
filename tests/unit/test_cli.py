from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.project import Project
from tests.support import make_source

ProjectFactory = Callable[..., Project]


def test_wrong_config_type_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("augment:\n  copies: two\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "--params", str(params), "ingest"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 1, f"a bad config exits 1, got {completed.returncode}"
    assert "augment.copies" in completed.stderr, f"the error names the key: {completed.stderr}"
    assert "Traceback" not in completed.stderr, "a user error prints no traceback"
    assert not (tmp_path / "data").exists(), "nothing is written under data/"


def test_missing_source_folder_exits_non_zero(
    tiny_project: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tiny_project()
    missing = tmp_path / "nowhere"
    status = main(["--params", str(project.root / "params.yaml"), "ingest", "--source", f"folder:{missing}"])
    assert status == 1, "a missing folder exits non-zero"
    assert f"{missing}: source folder does not exist" in capsys.readouterr().err, "the error names the folder"


def test_ingest_command_prints_a_summary(
    tiny_project: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:

    project = tiny_project()
    source = make_source(tmp_path / "source", per_class=4)
    status = main(["--params", str(project.root / "params.yaml"), "ingest", "--source", f"folder:{source}"])
    assert status == 0, "a good ingest exits 0"
    assert "ingested 12 images" in capsys.readouterr().out, "the summary counts the images"


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as raised:
        main(["no-such-command"])
    assert raised.value.code == 2, "argparse usage errors exit 2"
