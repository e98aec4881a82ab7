"""Fail an image build unless the installed distributions are the versions a uv.lock export pins.

Usage::

    python check_lock.py REQUIREMENTS [--installed-only] [--require NAME ...] [--ignore NAME ...]

``REQUIREMENTS`` is the output of ``uv export --frozen --no-hashes`` (``name==version ; marker`` lines).
Every line whose environment marker applies here must be installed at exactly that version. With
``--installed-only`` (an image that installs a subset of the lock, e.g. the MLflow server), lines of
distributions that are not installed are skipped, and ``--require`` names those that must be present;
``--ignore`` skips a distribution altogether (the base image's own packaging tools, e.g. setuptools).
Exit status 1 lists every mismatch. Standard library only, plus ``packaging`` when a line has a marker.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?"  # name and optional extras
    r"\s*==\s*(?P<version>[^\s;]+)\s*(?:;(?P<marker>.*))?$"  # ==version and optional ; marker
)


@dataclass(frozen=True)
class Pin:
    """One ``name==version`` line of the requirements file."""

    name: str
    version: str
    marker: str | None


def normalize(name: str) -> str:
    """The PEP 503 normalised form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(lines: Iterable[str]) -> list[Pin]:
    """The pins of a requirements file; comments, blank lines and option lines are skipped."""
    pins = []
    for number, raw in enumerate(lines, start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"line {number}: not a `name==version` pin: {raw.strip()!r}")
        marker = (match.group("marker") or "").strip() or None
        pins.append(Pin(normalize(match.group("name")), match.group("version"), marker))
    return pins


def applies(pin: Pin) -> bool:
    """Whether the pin's environment marker holds for this interpreter."""
    if pin.marker is None:
        return True
    from packaging.markers import Marker

    return bool(Marker(pin.marker).evaluate())


def installed_versions() -> dict[str, str]:
    """Normalised name -> version of every installed distribution (the first on ``sys.path`` wins)."""
    versions: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions.setdefault(normalize(name), distribution.version)
    return versions


def mismatches(
    pins: Iterable[Pin],
    installed: Mapping[str, str],
    installed_only: bool = False,
    required: Iterable[str] = (),
    ignored: Iterable[str] = (),
) -> list[str]:
    """One message per pin that is not installed at its version, and per required name that is missing."""
    skip = {normalize(name) for name in ignored}
    problems = []
    for pin in pins:
        if pin.name in skip or not applies(pin):
            continue
        found = installed.get(pin.name)
        if found is None:
            if not installed_only:
                problems.append(f"{pin.name}: locked at {pin.version}, not installed")
        elif found != pin.version:
            problems.append(f"{pin.name}: locked at {pin.version}, installed {found}")
    for name in required:
        if normalize(name) not in installed:
            problems.append(f"{normalize(name)}: required, not installed")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; return the exit status."""
    parser = argparse.ArgumentParser(description="check installed versions against a uv.lock export")
    parser.add_argument("requirements", type=Path)
    parser.add_argument("--installed-only", action="store_true", help="skip pins that are not installed")
    parser.add_argument("--require", action="append", default=[], metavar="NAME", help="must be installed")
    parser.add_argument("--ignore", action="append", default=[], metavar="NAME", help="not checked")
    args = parser.parse_args(argv)
    try:
        pins = parse_pins(args.requirements.read_text(encoding="utf-8").splitlines())
    except (OSError, ValueError) as error:
        print(f"error: {args.requirements}: {error}", file=sys.stderr)
        return 1
    problems = mismatches(pins, installed_versions(), args.installed_only, args.require, args.ignore)
    if problems:
        print(f"error: the environment does not match {args.requirements}:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    print(f"check_lock: {len(pins)} locked pins checked against the environment: all match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
