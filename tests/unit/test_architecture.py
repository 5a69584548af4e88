"""The house's rules, read from the source: imports flow down only (launch -> engine -> models ->
data, and inside engine/, data/ and models/ in the order their package docstrings give), no import
circles (function-level imports included: a circle hidden in a function is still a circle), every
module importable, no module over 400 lines, and every collective in engine/dist.py."""
import ast
import importlib
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CODE = ("launch", "engine", "models", "data")
FLOOR = {"data": 0, "models": 1, "engine": 2, "launch": 3}
# Inside engine/: what each room may import of the others (and always of itself).
ENGINE_ROOMS = {
    "dist": set(),
    "scoring": set(),
    "inference": {"dist"},
    "retrieval": {"dist", "inference", "scoring"},
    "run": {"dist"},
    "loader": {"dist"},
    "train": {"dist", "run", "loader", "inference", "retrieval", "scoring"},
    "tools": {"dist", "inference", "retrieval", "scoring"},
}
# Inside data/: the top-level modules are the ground floor, images/ stands on them, built/ on both.
DATA_FLOOR = {"ground": 0, "images": 1, "built": 2}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules():
    return {_module_name(p): p for top in CODE for p in sorted((REPO / top).rglob("*.py"))}


def _resolve(name: str, known) -> str:
    """The project module an import names: the longest known prefix ('engine.run.checkpoint.save'
    -> 'engine.run.checkpoint')."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in known:
            return ".".join(parts[:n])
    return ""


def imports_of(module: str, path: Path, known):
    """Every project module `module` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out.update(r for r in (_resolve(n, known) for n in names) if r and r != module)
    return out


@pytest.fixture(scope="module")
def graph():
    known = project_modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def _engine_room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def _data_floor(module: str) -> int:
    room = module.split(".")[1] if module.count(".") >= 1 else ""
    return DATA_FLOOR.get(room, 0)


def test_imports_flow_down_between_floors(graph):
    up = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
          if FLOOR[t.split(".")[0]] > FLOOR[m.split(".")[0]]]
    assert not up, "imports from a lower floor to a higher one:\n" + "\n".join(sorted(up))


def test_engine_rooms_import_only_what_they_may(graph):
    assert {p.name for p in (REPO / "engine").iterdir() if p.name != "__pycache__"} == \
        {"__init__.py", "dist.py"} | {r for r in ENGINE_ROOMS if r != "dist"}
    bad = []
    for m, targets in graph.items():
        if not m.startswith("engine.") :
            continue
        room = _engine_room(m)
        for t in targets:
            if t.startswith("engine.") and _engine_room(t) != room and _engine_room(t) not in ENGINE_ROOMS[room]:
                bad.append(f"{m} -> {t}")
    assert not bad, "engine rooms importing what their docstring does not allow:\n" + "\n".join(sorted(bad))


def test_data_and_models_floors(graph):
    bad = []
    for m, targets in graph.items():
        for t in targets:
            if m.startswith("data.") and t.startswith("data.") and _data_floor(t) > _data_floor(m):
                bad.append(f"{m} -> {t}")
            if m.startswith("models.") and not m.startswith("models.weights") and t.startswith("models.weights"):
                bad.append(f"{m} -> {t}")
    assert not bad, "\n".join(sorted(bad))


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles(graph):
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_imports():
    failed = {}
    for name in project_modules():
        try:
            importlib.import_module(name)
        except Exception as e:  # the message names what is missing
            failed[name] = f"{type(e).__name__}: {e}"
    assert not failed, failed


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in project_modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by idea: {long}"


def test_collectives_live_in_dist_only():
    """torch.distributed and deepspeed.comm are touched by engine/dist.py alone."""
    offenders = defaultdict(list)
    for name, path in project_modules().items():
        if name == "engine.dist":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.startswith(("torch.distributed", "deepspeed.comm")) for m in mods):
                offenders[name].append(node.lineno)
    assert not offenders, dict(offenders)
