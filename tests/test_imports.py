"""Top-level scripts are leaves: no module of medicalgpt/, tools/, benchmarks/ and no script imports one.

What drives a script in-process loads it by path (tools/scripts.py); what scripts share lives in medicalgpt/.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {path.stem for path in ROOT.glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The top-level names of every module a file imports, at any depth of the file (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_imports_a_top_level_script():
    files = [*ROOT.glob("*.py"), *(path for folder in ("medicalgpt", "tools", "benchmarks")
                                   for path in (ROOT / folder).rglob("*.py"))]
    assert len(files) > 60 and "inference" in SCRIPTS
    offenders = {str(path.relative_to(ROOT)): sorted(imported_modules(path) & SCRIPTS) for path in files}
    assert {path: scripts for path, scripts in offenders.items() if scripts} == {}


def test_the_walk_sees_imports_at_any_depth(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from inference import answer\n    import pretraining.x as p\n")
    assert imported_modules(source) == {"inference", "pretraining"}
