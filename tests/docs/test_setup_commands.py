"""The README's two commands set themselves up, and CI runs the README's test command.

The Makefile's decisions (create the venv? install? only run?) are checked with ``make -n``,
which prints what ``make`` would run for the state of a copy of the project in a temporary
directory: the file ages it compares are real files, nothing is installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = '.venv/bin/python -m pip install -e ".[dev]"'
CREATE = "-m venv .venv"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def make(project: Path, *args: str, dry: bool = True) -> subprocess.CompletedProcess[str]:
    flags = ["-n"] if dry else []
    return subprocess.run(["make", "--no-print-directory", "-C", str(project), *flags, *args],
                          capture_output=True, text=True, timeout=120)


def planned(project: Path, *args: str) -> str:
    result = make(project, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _age(path: Path, seconds_ago: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    when = path.stat().st_mtime - seconds_ago
    os.utime(path, (when, when))


def installed(project: Path, *, pyproject_age: float = 100, venv_age: float = 50,
              stamp_age: float = 10) -> None:
    """A venv created and installed at the given ages (seconds ago)."""
    _age(project / "pyproject.toml", pyproject_age)
    _age(project / ".venv" / "pyvenv.cfg", venv_age)
    _age(project / ".venv" / ".installed", stamp_age)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_fresh_checkout_creates_the_venv_installs_then_tests(project: Path) -> None:
    plan = planned(project, "test")
    assert CREATE in plan and INSTALL in plan
    assert plan.index(CREATE) < plan.index(INSTALL)
    assert _last_line(plan) == ".venv/bin/python -m pytest"


def test_demo_runs_the_demo_module_in_the_same_venv(project: Path) -> None:
    plan = planned(project, "demo")
    assert CREATE in plan and INSTALL in plan
    assert _last_line(plan) == ".venv/bin/python -m lightning_spectral.demo"


def test_an_installed_venv_runs_at_once(project: Path) -> None:
    installed(project)
    assert planned(project, "test").strip() == ".venv/bin/python -m pytest"


def test_a_changed_pyproject_reinstalls_into_the_existing_venv(project: Path) -> None:
    installed(project, pyproject_age=5, venv_age=100, stamp_age=50)
    plan = planned(project, "test")
    assert INSTALL in plan and CREATE not in plan


def test_a_recreated_venv_is_reinstalled(project: Path) -> None:
    installed(project, pyproject_age=100, venv_age=5, stamp_age=50)
    plan = planned(project, "test")
    assert INSTALL in plan and CREATE not in plan


def test_pytest_arguments_are_passed_on(project: Path) -> None:
    installed(project)
    plan = planned(project, "test", "ARGS=-x -q tests/functional/test_bounds.py")
    assert plan.strip() == ".venv/bin/python -m pytest -x -q tests/functional/test_bounds.py"


def test_cpu_torch_index_installs_torch_first(project: Path) -> None:
    url = "https://download.pytorch.org/whl/cpu"
    plan = planned(project, "venv", f"TORCH_INDEX={url}")
    torch_line = f".venv/bin/python -m pip install torch --index-url {url}"
    assert torch_line in plan and plan.index(torch_line) < plan.index(INSTALL)
    assert "--index-url" not in planned(project, "venv")


def test_an_unusable_python_is_a_clear_error_and_leaves_no_venv(project: Path) -> None:
    result = make(project, "venv", "PYTHON=no-such-python3", dry=False)
    assert result.returncode != 0
    assert "'no-such-python3' is not a Python >= 3.10" in result.stderr
    assert not (project / ".venv").exists()


# --------------------------------------------------------------------------- README and CI


def readme_commands() -> list[str]:
    """The commands of the README's first ```bash block, comments removed."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no bash block"
    lines = (line.split("#")[0].strip() for line in block[1].splitlines())
    return [line for line in lines if line]


def _runs(command: str, project: Path) -> str:
    """What a ``make <target>`` command of the README finally runs (with a fresh venv)."""
    program, *args = command.split()
    assert program == "make", f"README command is not a make target: {command!r}"
    return _last_line(planned(project, *args))


def test_readme_gives_two_commands_one_for_the_demo_one_for_the_tests(project: Path) -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    assert sorted(_runs(c, project) for c in commands) == [
        ".venv/bin/python -m lightning_spectral.demo",
        ".venv/bin/python -m pytest",
    ]


def test_ci_removes_the_venv_then_runs_exactly_the_readme_test_command(project: Path) -> None:
    test_command = next(c for c in readme_commands() if _runs(c, project).endswith("pytest"))
    script = (ROOT / ".ci" / "run").read_text()
    steps = [line.strip() for line in script.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert steps[-1] == test_command
    assert "rm -rf .venv" in steps[:-1]
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "run")]).returncode == 0
    assert os.access(ROOT / ".ci" / "run", os.X_OK)
