"""The package as it installs: one import root, and import rules that hold (and fail when broken)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # builds the package with pip


def _package_dirs() -> dict[str, Path]:
    """Each subpackage of authnotify and the folder of the repository it is built from."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    dirs: dict[str, Path] = {}
    for package in setuptools["packages"]:
        parent = next((name for name in sorted(mapped, key=len, reverse=True)
                       if package == name or package.startswith(name + ".")), None)
        if parent is None:
            dirs[package] = ROOT / package.replace(".", "/")
        else:
            dirs[package] = ROOT / mapped[parent] / package[len(parent):].lstrip(".").replace(".", "/")
    return dirs


def test_the_wheel_installs_one_top_level_package_with_every_module(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=120,
                   cwd=tmp_path)
    [wheel] = tmp_path.glob("authnotify-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [top_level] = [name for name in names if name.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["authnotify"]
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"authnotify"}

    expected = set()
    for package, folder in _package_dirs().items():
        assert (folder / "__init__.py").is_file(), f"{package}: {folder} is not a package"
        prefix = package.replace(".", "/")
        expected |= {f"{prefix}/{module.name}" for module in folder.glob("*.py")}
    # Every package folder in the source tree is listed (none is silently left out of the wheel).
    for init in [*ROOT.glob("authnotify/**/__init__.py"), *ROOT.glob("ingress/**/__init__.py"),
                 *ROOT.glob("workers/**/__init__.py"), *ROOT.glob("shared/**/__init__.py")]:
        assert init.parent in _package_dirs().values(), f"{init.parent} is not in [tool.setuptools] packages"
    assert expected <= set(names), sorted(expected - set(names))
    assert "authnotify/py.typed" in names


def _installed_copy(tmp_path: Path) -> Path:
    target = tmp_path / "installed"
    build = tmp_path / "build"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(".git", ".venv", "build", ".typecheck", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", ".mypy_cache"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(build)], check=True, capture_output=True, timeout=120)
    return target


def _lint_imports(installed: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache",
                           str(ROOT / "pyproject.toml")], cwd=installed, capture_output=True, text=True, timeout=120)


def test_the_import_rules_hold_and_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    installed = _installed_copy(tmp_path)
    kept = _lint_imports(installed)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "2 kept, 0 broken" in kept.stdout

    errors = installed / "authnotify" / "errors.py"
    original = errors.read_text()
    errors.write_text(original + "\nfrom authnotify.store import open_store  # planted: the bottom layer reaching up\n")
    upward = _lint_imports(installed)
    assert upward.returncode != 0
    assert "Layers" in upward.stdout and "BROKEN" in upward.stdout
    assert "authnotify.errors -> authnotify.store" in upward.stdout
    errors.write_text(original)

    headers = installed / "authnotify" / "messaging" / "headers.py"
    headers.write_text(headers.read_text() + "\nfrom authnotify.messaging import messages  # planted: a cycle\n")
    cycle = _lint_imports(installed)
    assert cycle.returncode != 0
    assert "No import cycles" in cycle.stdout and "BROKEN" in cycle.stdout
