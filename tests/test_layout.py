"""The layout holds: no import cycle, vLLM spoken to only through vllm_client, tests/ and benchmarks/ apart."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy", "classifier", "corruption", "vllm_client", "evaluation", "stats")
# Programs that talk to the proxy itself (not to vLLM) may use an HTTP client of their own.
HTTPX_ALLOWED = {"vllm_client", "evaluation.testing"}


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for child in sorted(graph[name]):
            if state.get(child) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(child):] + [child]))
            if child not in state:
                visit(child, path + [child])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_rooms_keep_to_themselves():
    for name, path in _modules().items():
        imports = {m.split(".")[0] for m in _imports(path)}
        if name.startswith(("classifier", "corruption", "vllm_client")):
            assert not imports & {"proxy", "evaluation", "fastapi", "starlette"}, name
        if name.startswith("corruption"):
            assert "classifier" not in imports, name
        if name.startswith("vllm_client"):
            assert not imports & {"corruption", "classifier"}, name
        if name.startswith("stats"):  # neutral ground every room may stand on
            assert not imports & set(PACKAGES), name
        if "httpx" in imports:
            assert any(name == allowed or name.startswith(allowed + ".") for allowed in HTTPX_ALLOWED), name


def test_tests_and_benchmarks_do_not_import_each_other():
    bench = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for path in (ROOT / "benchmarks").glob("*.py"):
        assert not any(m.split(".")[0] == "tests" for m in _imports(path)), path
    own = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for path in (ROOT / "tests").glob("*.py"):
        assert not {m.split(".")[0] for m in _imports(path)} & ((bench - own) | {"benchmarks"}), path
