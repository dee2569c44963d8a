"""Renamed to evaluate_model.py: this name shadows the widely used `evaluate` package. This forwarder keeps old
commands working for one release (until 0.2.0) and then goes.

    python evaluate_model.py --help
"""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    print("evaluate.py is now evaluate_model.py; the old name goes in the next release", file=sys.stderr)
    sys.argv[0] = str(Path(__file__).with_name("evaluate_model.py"))
    runpy.run_path(sys.argv[0], run_name="__main__")
