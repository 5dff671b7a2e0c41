"""The import direction of the design: loaders -> runtime -> kernels, all three -> formats.

Scans every module's import statements (including the lazy ones inside functions) with ``ast``:
formats imports none of kernels / runtime / loaders; kernels none of runtime / loaders; runtime
never loaders; and torch appears only under loaders (and bench / tests, which are not scanned)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "formats": {"kernels", "runtime", "loaders", "bench", "torch"},
    "kernels": {"runtime", "loaders", "bench", "torch"},
    "runtime": {"loaders", "bench", "torch"},
}


def _imports(path: Path, pkg: list):
    """Yield (lineno, top-level sparsedge subpackage or external top-level module) per import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                yield node.lineno, parts[1] if parts[0] == "sparsedge" and len(parts) > 1 else parts[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                yield node.lineno, parts[1] if parts[0] == "sparsedge" and len(parts) > 1 else parts[0]
            else:
                base = pkg[: len(pkg) - node.level + 1]  # the package the dots point at
                mod = base + (node.module.split(".") if node.module else [])
                if len(mod) >= 2:  # sparsedge.<sub>...
                    yield node.lineno, mod[1]
                else:  # "from .. import x": the names are the subpackages
                    for a in node.names:
                        yield node.lineno, a.name


@pytest.mark.parametrize("sub", sorted(FORBIDDEN))
def test_import_direction(sub):
    bad = []
    for path in sorted((ROOT / sub).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        pkg = ["sparsedge", *rel[:-1]] if rel[-1] != "__init__" else ["sparsedge", *rel[:-1]]
        for line, target in _imports(path, pkg):
            if target in FORBIDDEN[sub]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_scanner_sees_a_violation(tmp_path):
    """The scanner must catch a lazy relative import (the kind this test exists for)."""
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from ..runtime.reference import softmax\n    import torch\n")
    got = {t for _, t in _imports(p, ["sparsedge", "kernels"])}
    assert {"runtime", "torch"} <= got
