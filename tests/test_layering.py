"""The package layers hold: no package imports one above it, so there is no import cycle.

fedcore < wsi < pipeline < federation < fedpath. Every import statement counts, including the
function-local ones a lazy import hides; a static AST check, so a new upward edge fails here even if
no test exercises that code path. Each package is also imported alone in a fresh interpreter, which
fails if its top-level import needs anything above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["fedcore", "wsi", "pipeline", "federation", "fedpath"]
#: what each package may never import even though it is lower (wsi stays free of torch)
FORBIDDEN_THIRD_PARTY = {"fedcore": {"torch", "numpy", "monai", "opacus"}, "wsi": {"torch", "monai", "opacus"}}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def upward_edges() -> list[str]:
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad: list[str] = []
    for pkg in LAYERS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for lineno, mod in _imports(f):
                top = mod.split(".")[0]
                if top in rank and rank[top] > rank[pkg]:
                    bad.append(f"{f.relative_to(ROOT)}:{lineno} imports {mod} ({pkg} is below {top})")
                if top in FORBIDDEN_THIRD_PARTY.get(pkg, ()):
                    bad.append(f"{f.relative_to(ROOT)}:{lineno} imports {mod} ({pkg} must not need {top})")
    return bad


def test_no_package_imports_a_higher_layer() -> None:
    bad = upward_edges()
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_edge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "wsi" / "bad.py").write_text("def f():\n    from pipeline.train import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert upward_edges() == ["wsi/bad.py:2 imports pipeline.train (wsi is below pipeline)"]


@pytest.mark.parametrize("pkg", LAYERS)
def test_each_package_imports_alone(pkg: str) -> None:
    mods = sorted(
        ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for f in (ROOT / pkg).rglob("*.py")
    )
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n    importlib.import_module(m)\n"
        f"above = {LAYERS[LAYERS.index(pkg) + 1 :]!r}\n"
        "loaded = sorted({n.split('.')[0] for n in sys.modules} & set(above))\n"
        f"assert not loaded, 'importing {pkg} loaded ' + repr(loaded)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_stages_that_never_federate_start_without_torch(tmp_path: Path) -> None:
    """``fedpath synth``/``tile`` load and validate the config without the strategy registry's torch."""
    code = (
        "import sys\n"
        "from fedpath.cli import run\n"
        "rc = run(['synth', '--help'])\n"
        "from fedpath.cli import _cfg\n"
        "cfg = _cfg(None, ['federation.strategy=nope'], federated=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "try:\n"
        "    _cfg(None, ['federation.strategy=nope'])\n"
        "except Exception as e:\n"
        "    assert 'unknown strategy' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('a federating command accepted an unknown strategy')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
