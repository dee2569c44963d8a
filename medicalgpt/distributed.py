"""Start-up checks for multi-process training that the libraries make only deep inside, with a traceback."""

import importlib.util

from medicalgpt.errors import UsageError


def check_deepspeed(config: str | dict | None) -> None:
    """--deepspeed needs the deepspeed package. Without it, TrainingArguments fails while it is being built with a
    PackageNotFoundError traceback; call this on the parsed flags before the config dataclass is created."""
    if config and importlib.util.find_spec("deepspeed") is None:
        raise UsageError("--deepspeed needs the deepspeed package: pip install deepspeed (on a machine with CUDA "
                         "GPUs), or drop --deepspeed (torchrun and accelerate launch then run plain DDP)")
