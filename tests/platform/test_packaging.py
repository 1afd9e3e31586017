"""Packaging (design.md, "Layout" and "Pitfalls: Packaging"): the five top folders map under ``reflade.*``
without ``__init__.py`` (so the standard library's ``platform`` stays intact from the root), every folder with
code is listed in ``pyproject.toml``, and the wheel alone, installed into a fresh environment, imports every
module and carries every data file and entry point."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP = ("platform", "engine", "train", "serve", "eval")
VENV_PYTHON = Path(sys.executable)
DOC_SUFFIXES = (".md", ".rst")
PAGE_FILES = ("index.html", "vote.html", "common.js", "decompose.js", "vote.js", "pages.css")
"""The service's web pages (serve/static/), package data that must reach the wheel."""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REFLADE_", "AWS_")) and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env.update(extra)
    return env


def _run(args: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_clean_env(), timeout=timeout
    )


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _listed_packages() -> list[str]:
    return list(_pyproject()["tool"]["setuptools"]["packages"])


def _skip(path: Path) -> bool:
    return "__pycache__" in path.parts or path.suffix in (".pyc", ".pyo")


def _code_folders() -> dict[str, Path]:
    """Every folder under the five top folders that holds a .py file -> its package name (``reflade.X.sub``)."""
    out: dict[str, Path] = {}
    for top in TOP:
        root = REPO / top
        if not root.is_dir():
            continue
        for py in root.rglob("*.py"):
            if _skip(py):
                continue
            folder = py.parent
            rel = folder.relative_to(REPO)
            out[".".join(("reflade", *rel.parts))] = folder
    return out


def _source_modules() -> set[str]:
    """Dotted names of every module in the source tree (``reflade.platform.cli``, ``reflade.engine.x``, ...)."""
    mods = set()
    for top in TOP:
        root = REPO / top
        if not root.is_dir():
            continue
        for py in root.rglob("*.py"):
            if _skip(py):
                continue
            parts = py.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods.add(".".join(("reflade", *parts)))
    return mods


# ---------------------------------------------------------------------------------------------- layout
def test_stdlib_platform_is_not_shadowed_from_the_root():
    proc = _run(
        [VENV_PYTHON, "-c", "import platform, sys; print(platform.system()); print(platform.__file__)"],
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    system, file = proc.stdout.splitlines()[:2]
    assert system == "Linux"
    file_path = Path(file).resolve()
    assert file_path.name == "platform.py"
    assert not file_path.is_relative_to(REPO)


def test_stdlib_platform_is_not_shadowed_under_pytest_style_sys_path():
    # `python -m` puts the root first on sys.path, as `python -m pytest` does; torch/ray/requests import platform.
    proc = _run([VENV_PYTHON, "-m", "platform"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Linux" in proc.stdout


def test_reflade_imports_from_another_directory(tmp_path):
    proc = _run(
        [VENV_PYTHON, "-c", "import reflade.platform.registry, reflade.platform.cli; print('ok')"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_top_folders_have_no_init():
    for top in TOP:
        assert not (REPO / top / "__init__.py").exists(), (
            f"{top}/__init__.py would shadow or break the mapping"
        )


def test_package_dir_maps_the_five_folders():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    for top in TOP:
        assert mapping.get(f"reflade.{top}") == top


def test_every_code_folder_is_a_listed_package():
    listed = set(_listed_packages())
    folders = _code_folders()
    assert "reflade.platform" in folders
    missing = sorted(set(folders) - listed)
    assert not missing, f"folders with Python code missing from [tool.setuptools] packages: {missing}"


def test_every_listed_package_exists():
    mapping = _pyproject()["tool"]["setuptools"]["package-dir"]
    for pkg in _listed_packages():
        parts = pkg.split(".")
        assert parts[0] == "reflade" and len(parts) >= 2 and parts[1] in TOP, pkg
        folder = REPO / mapping[f"reflade.{parts[1]}"] / Path(*parts[2:])
        assert folder.is_dir(), f"{pkg} is listed but {folder} does not exist"
        assert any(p.suffix == ".py" for p in folder.iterdir()), (
            f"{pkg} is listed but {folder} holds no .py file"
        )


def test_sub_folders_are_ordinary_packages():
    for pkg, folder in _code_folders().items():
        if folder.parent == REPO:
            continue
        assert (folder / "__init__.py").exists(), f"{pkg}: sub-folder {folder} needs an __init__.py"


# ---------------------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the source files (a stale ``build/`` in the checkout would
    otherwise end up in the wheel and hide a missing package)."""
    src = tmp_path_factory.mktemp("src")
    for p in REPO.iterdir():
        if p.is_file():
            shutil.copy2(p, src / p.name)
    for top in TOP:
        if (REPO / top).is_dir():
            shutil.copytree(REPO / top, src / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    proc = _run(
        [VENV_PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, src],
        cwd=out,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("reflade-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding the wheel; third-party dependencies come from .venv through a plain path entry,
    so .venv's editable finder (a .pth there) never runs and ``reflade`` can only come from the wheel."""
    fresh = tmp_path_factory.mktemp("fresh") / "venv"
    proc = _run([sys._base_executable, "-m", "venv", "--without-pip", fresh], cwd=fresh.parent)
    assert proc.returncode == 0, proc.stderr
    python = fresh / "bin" / "python"
    proc = _run(
        [VENV_PYTHON, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel], cwd=fresh.parent
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = _site_packages(python)
    venv_site = Path(_site_packages(VENV_PYTHON))
    (Path(site) / "deps.pth").write_text(f"{venv_site}\n")
    return fresh


def _site_packages(python: Path) -> str:
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=Path("/"))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


IMPORT_ALL = textwrap.dedent(
    """\
    import importlib, json, pkgutil, sys, tomllib
    from importlib.metadata import distribution

    packages = json.loads(sys.argv[1])
    found, files, errors = set(), {}, {}
    for pkg in packages:
        try:
            mod = importlib.import_module(pkg)
        except Exception as e:
            errors[pkg] = f"{type(e).__name__}: {e}"
            continue
        found.add(pkg)
        files[pkg] = list(mod.__path__)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            try:
                m = importlib.import_module(info.name)
            except Exception as e:
                errors[info.name] = f"{type(e).__name__}: {e}"
                continue
            found.add(info.name)
            files[info.name] = [m.__file__] if getattr(m, "__file__", None) else list(m.__path__)
    dist = distribution("reflade")
    print(json.dumps({
        "found": sorted(found), "files": files, "errors": errors,
        "dist": str(dist.locate_file("")),
        "editable_finder": any("__editable__" in type(f).__module__ for f in sys.meta_path),
    }))
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_imports_every_module_from_itself(fresh_env, tmp_path):
    python = fresh_env / "bin" / "python"
    runner = tmp_path / "run" / "import_all.py"  # its folder goes first on sys.path: keep it free of the tree
    runner.parent.mkdir()
    runner.write_text(IMPORT_ALL)
    packages = _listed_packages()
    proc = _run([python, runner, json.dumps(packages)], cwd=tmp_path / "run", timeout=110)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    assert not report["errors"], f"modules that fail to import from the wheel: {report['errors']}"
    assert not report["editable_finder"]
    assert Path(report["dist"]).resolve().is_relative_to(fresh_env.resolve())
    for name, paths in report["files"].items():
        for p in paths:
            resolved = Path(p).resolve()
            assert resolved.is_relative_to(fresh_env.resolve()), f"{name} came from {p}, not from the wheel"
            assert not resolved.is_relative_to(REPO), f"{name} came from the source tree ({p})"
    missing = sorted(_source_modules() - set(report["found"]))
    assert not missing, f"modules in the source tree that the wheel does not provide: {missing}"


def test_wheel_carries_every_source_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    expected = set()
    for top in TOP:
        root = REPO / top
        if not root.is_dir():
            continue
        for p in root.rglob("*"):
            # Documentation (a README.md beside the code) is not shipped; anything else is code or data.
            if p.is_file() and not _skip(p) and p.suffix not in DOC_SUFFIXES:
                expected.add("reflade/" + p.relative_to(REPO).as_posix())
    assert "reflade/platform/config.py" in expected
    # The service's pages are data files (no .py beside them but the package's __init__): they ship too.
    assert {f"reflade/serve/static/{n}" for n in PAGE_FILES} <= expected
    missing = sorted(expected - names)
    assert not missing, f"files of the source tree missing from the wheel: {missing}"
    assert not any(n.startswith(("reflade/__init__", "platform/", "tests/")) for n in names), sorted(names)


def test_wheel_entry_points(wheel):
    with zipfile.ZipFile(wheel) as z:
        (ep_name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        parser = configparser.ConfigParser(delimiters=("=",))
        parser.optionxform = str  # keep names as written
        parser.read_string(z.read(ep_name).decode())
    assert parser["console_scripts"]["reflade"].strip() == "reflade.platform.cli:main"
    jobs = {k: v.strip() for k, v in parser["reflade.jobs"].items()}
    assert jobs["doctor"] == "reflade.platform.doctor:main"
    assert jobs["registry"] == "reflade.platform.cli:registry_job"
    # Every declared entry point of the project is in the wheel.
    declared = _pyproject()["project"].get("entry-points", {})
    for group, eps in declared.items():
        for name, value in eps.items():
            assert parser[group][name].strip() == value, (group, name)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_serves_the_pages_from_itself(fresh_env, tmp_path):
    # What the ingress does (serve/pages.py, importlib.resources) from the installed wheel, not the source tree.
    script = (
        "import json, reflade.serve.static as s; from reflade.serve.pages import static_files; "
        "print(json.dumps({'names': sorted(static_files()), 'file': s.__file__, "
        "'index': static_files()['index.html'].decode()[:200]}))"
    )
    proc = _run([fresh_env / "bin" / "python", "-c", script], cwd=tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(PAGE_FILES) <= set(report["names"]), report["names"]
    assert Path(report["file"]).resolve().is_relative_to(fresh_env.resolve())
    assert report["index"].startswith("<!doctype html>")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_wheel_console_script_runs(fresh_env, tmp_path):
    script = fresh_env / "bin" / "reflade"
    assert script.exists()
    proc = _run([script, "config", "show", "--json"], cwd=tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["storage"]["bucket"] == "reflade"
    proc = _run([script, "jobs", "kinds", "--json"], cwd=tmp_path, timeout=110)
    assert proc.returncode == 0, proc.stderr
    assert {"doctor", "registry"} <= set(json.loads(proc.stdout))
