"""Session fixtures: the tiny default tokenizer/model are built once per test session."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# Each session its own datasets cache (set before datasets is imported): no test reuses another run's records.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="medicalgpt-test-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import signal  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny model built by the same code as the embedded default model."""
    from medicalgpt.default_model import build_default_model

    return str(build_default_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def sigint_handled():
    """SIGINT handled as in a foreground shell (Ctrl-C raises KeyboardInterrupt), whatever this process inherited: a
    shell's background job starts Python with SIGINT ignored. The inherited handler is put back afterwards."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)
