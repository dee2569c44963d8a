"""What only a MedicalGPT checkout has: the sample data under data/. A wheel installed elsewhere (`pip install .`)
carries the package alone, so what needs data/ there stops with a message that names the fix."""

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

from medicalgpt.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]  # the checkout, when the package is used from one (or `pip install -e`)


def require_checkout(needed_by: str, relative: str) -> None:
    """A UsageError when this medicalgpt is not a checkout's (so has no ROOT/relative); nothing otherwise."""
    if not (ROOT / "supervised_finetuning.py").is_file():
        raise UsageError(f"{needed_by} needs {relative} from a MedicalGPT checkout, which this installed medicalgpt "
                         f"({ROOT / 'medicalgpt'}) does not have: install it from a checkout instead "
                         f"(`git clone` it, then `pip install -e <checkout>`)")


@cache
def knowledge_table(needed_by: str) -> ModuleType:
    """data/knowledge.py (CONDITIONS, WEIGHT_BASED_DOSES), read from the checkout; a UsageError naming needed_by in
    an installed medicalgpt, which has no data/."""
    path = ROOT / "data" / "knowledge.py"
    if not path.is_file():
        require_checkout(needed_by, "data/knowledge.py")
    spec = importlib.util.spec_from_file_location("medicalgpt_knowledge_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
