"""The package map of docs/architecture.md, enforced: imports point downward only, and the
codec (with the ``inspect`` and ``freeze`` commands built on it) never imports torch.

Why a test: both rules are what keeps the codec usable on machines without torch and keeps
each change in one room; a stray import breaks neither a unit test nor a type check.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dlibbridge"

# Lower layers first; a module may import its own layer and the layers before it.
LAYERS = (
    ("dlibbridge.errors", "dlibbridge._io", "dlibbridge._dlib", "dlibbridge._writable", "dlibbridge._paths", "dlibbridge._lock", "dlibbridge._load", "dlibbridge.assets", "dlibbridge.options", "dlibbridge._codec"),
    ("dlibbridge.codec",),
    ("dlibbridge.data",),
    ("dlibbridge.port",),
    ("dlibbridge.eval",),
    ("dlibbridge.train",),
    ("dlibbridge.cli", "dlibbridge.__main__"),
)


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(line, imported dlibbridge module) for every import in the file, function bodies included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dlibbridge"):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("dlibbridge"):
                continue
            for a in node.names:        # `from . import x` may name a submodule
                sub = f"{mod}.{a.name}"
                yield node.lineno, sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() \
                    or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else mod


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name != "dlibbridge":
            assert _layer(name) is not None, f"{name} is in no layer of tests/test_layering.py"


def test_packages_import_downward_only():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "dlibbridge":        # the public facade re-exports from below
            continue
        rank = _layer(name)
        for line, target in _imports(path):
            t = _layer(target)
            if t is not None and t > rank:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {name} imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _run_without_torch(code: str, tmp_path: Path):
    script = code + "\nimport sys\nassert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_codec_never_imports_torch(tmp_path):
    _run_without_torch("import dlibbridge, dlibbridge.codec, dlibbridge.codec.tree, dlibbridge.codec.records, "
                       "dlibbridge.codec.inspect, dlibbridge.codec.rewrite, dlibbridge.cli", tmp_path)


def test_inspect_and_freeze_commands_never_import_torch(tmp_path, face_model_path):
    pytest.importorskip("dlib")
    _run_without_torch(f"""
from dlibbridge.cli import main
from dlibbridge.codec import rewrite, tree
model = tree.load({str(face_model_path)!r})
rewrite.unfreeze(model)
tree.save(model, "trainable.dat")
assert main(["inspect", "trainable.dat"]) == 0
assert main(["freeze", "trainable.dat", "-o", "frozen.dat"]) == 0
""", tmp_path)


def test_every_internal_import_resolves():
    """Imports inside function bodies run only on the path that needs them; check them all here."""
    import importlib.util
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("dlibbridge")):
                continue
            base = package.split(".")
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            target = importlib.import_module(mod)
            for a in node.names:
                if not hasattr(target, a.name) and importlib.util.find_spec(f"{mod}.{a.name}") is None:
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {mod}.{a.name}")
    assert not missing, "unresolvable imports:\n" + "\n".join(missing)
