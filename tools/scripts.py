"""Run a top-level script's main() in this process, as its command line would, without importing it.

Top-level scripts are leaves: nothing imports them (tests/test_imports.py checks). What drives them in-process
(the support matrix, the training benchmarks, tests) loads one by path, which skips the library imports a
subprocess would pay again (their cost: benchmarks/README.md).
"""

import runpy
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def script_main(name: str) -> Callable:
    """The main() of REPO_ROOT/<name>.py, run under a module name other than __main__ (its CLI does not start)."""
    return runpy.run_path(str(REPO_ROOT / f"{name}.py"), run_name=f"script_{name}")["main"]
