"""`make demo` / `make test` set up the project's own .venv on first use and reuse it (dry runs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(folder, *args: str) -> str:
    """The commands ``make`` would run in ``folder`` (a copy of the Makefile and pyproject.toml)."""
    # Under `make test` the outer make's settings (MAKEFLAGS: its ARGS=..., MAKELEVEL) would reach this one.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def checkout(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    os.utime(tmp_path / "pyproject.toml", (1_000_000, 1_000_000))
    return tmp_path


def test_first_use_creates_and_installs_the_venv(checkout):
    commands = dry_run(checkout, "test")
    assert "-m venv .venv" in commands
    install = commands.index('.venv/bin/python -m pip install -e ".[dev]"')
    assert install < commands.index(".venv/bin/python -m pip check") < commands.index(".venv/bin/python -m pytest")
    assert "--extra-index-url" not in commands  # the default index unless asked
    assert ".venv/bin/python run.py experiment=demo" in dry_run(checkout, "demo")


def test_later_uses_reuse_the_venv_until_pyproject_changes(checkout):
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / ".installed").touch()
    assert dry_run(checkout, "test", "ARGS=tests/test_x.py -x").strip() == (
        ".venv/bin/python -m pytest -n 2 --dist loadfile tests/test_x.py -x")  # two test processes, a file each
    assert dry_run(checkout, "test", "TEST_WORKERS=0").strip() == ".venv/bin/python -m pytest -n 0 --dist loadfile"
    os.utime(checkout / "pyproject.toml")  # now newer than the last install
    assert "pip install -e" in dry_run(checkout, "test")


def test_cpu_only_torch_wheels_are_an_option(checkout):
    commands = dry_run(checkout, "demo", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert re.search(r'pip install -e "\.\[dev\]" --extra-index-url https://download\.pytorch\.org/whl/cpu', commands)


def test_readme_and_ci_use_the_same_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert "make demo" in commands and "make test" in commands
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test" and "export ANOMALYMOE_REQUIRE_FIXTURES=1" in ci
