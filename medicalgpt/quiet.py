"""Library messages that are expected on every run, and so no news to a user, filtered where they are emitted.

Entry scripts import this module before any library (ruff's isort settings keep it first): bitsandbytes prints its
message while being imported, and peft and TRL import it even when nothing is quantized. medicalgpt/__init__.py
imports it too, for the scripts that load peft later.
"""

import logging
import warnings


class DropMessages(logging.Filter):
    """Drops a logger's records whose message contains any of the fragments."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


# On CPUs with AVX512-BF16, importing bitsandbytes tries to fetch a 4-bit matmul kernel from the hub; offline or
# uncached, it falls back to its own CPU code and says so in two lines that advise installing an installed package.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community"))
logging.getLogger("kernels._internals.hf_hub").addFilter(
    DropMessages("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"))
# transformers 5 deprecated the property that peft (wrapping a model) and TRL (generating) still read.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# For MoE models with fused experts (DeepSeek-V3, GLM-4-MoE) peft maps gate_proj + up_proj onto the fused gate_up_proj
# parameter with a rank and alpha pattern of its own (2r, 2 alpha), applies it, then warns that the pattern matched
# no targeted module: it checks modules, not parameters. Only that exact list is dropped: a user's own still warns.
warnings.filterwarnings("ignore", category=RuntimeWarning, message=(
    r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: "
    r"\['\.\*\\\\\.gate_up_proj'\]\.$"))
# ORPO and CPO exist only in trl.experimental: using them is this toolkit's choice, not the user's news.
warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
